//! Errors of the flow host.

use std::path::PathBuf;

/// What went wrong loading or starting a flow. Who caused it is in the variant: the flow's
/// author (`Compile`, `WorldMismatch`, `UnsupportedImport`), the local side (`Config`,
/// `PoolExhausted`, `Cache`) or the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The engine configuration was refused.
    #[error("engine configuration: {0}")]
    Config(String),
    /// The bytes are not a valid WebAssembly component.
    #[error("flow {flow:?} does not compile: {detail}")]
    Compile {
        /// Flow name.
        flow: String,
        /// Compiler message.
        detail: String,
    },
    /// The component does not match the `patchbay:voice/flow` world.
    #[error("flow {flow:?} does not match world patchbay:voice/flow: {detail}")]
    WorldMismatch {
        /// Flow name.
        flow: String,
        /// What is missing or mistyped, as the linker reported it.
        detail: String,
    },
    /// The component imports a WASI interface flows do not get (sockets and files are
    /// stubbed, not refused; see `docs/flow-host.md` for the list). Caused by the flow's
    /// author: rebuild without it.
    #[error("flow {flow:?} imports {import}, which Patchbay does not provide to flows")]
    UnsupportedImport {
        /// Flow name.
        flow: String,
        /// The import, as the component names it (for example `wasi:http/types@0.2.0`).
        import: String,
    },
    /// Every instance slot is in use.
    #[error("all {0} flow instance slots are in use")]
    PoolExhausted(u32),
    /// The precompiled-flow cache could not be read or written. The host itself no longer
    /// fails a load for this: an unusable cache is logged and the flow compiled in memory.
    #[error("flow cache {path}: {source}")]
    Cache {
        /// File or directory involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No flow is installed under this name for this tenant.
    #[error("tenant {tenant:?} has no flow {flow:?}")]
    UnknownFlow {
        /// Tenant.
        tenant: String,
        /// Flow name.
        flow: String,
    },
    /// The flow could not be instantiated (for example its memory does not fit the limit).
    #[error("flow {flow:?} could not start: {detail}")]
    Instantiate {
        /// Flow name.
        flow: String,
        /// Engine message.
        detail: String,
    },
}
