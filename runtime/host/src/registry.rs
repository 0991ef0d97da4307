//! Compiled flows keyed by (tenant, flow name), and the on-disk cache of precompiled code.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use crate::bindings::FlowPre;
use crate::engine::FlowEngine;
use crate::error::HostError;
use crate::state::FlowState;

/// Identifies a flow: the tenant that owns it and its name within the tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Tenant id (a default tenant is still a tenant).
    pub tenant: String,
    /// Flow name, for example `ivr-menu`.
    pub flow: String,
}

impl FlowKey {
    /// Builds a key.
    pub fn new(tenant: impl Into<String>, flow: impl Into<String>) -> Self {
        Self { tenant: tenant.into(), flow: flow.into() }
    }
}

/// An immutable compiled flow: the component, its pre-instance (imports resolved once) and its
/// version, the SHA-256 of the component bytes. Calls hold an `Arc` to the entry they started
/// with, so replacing an entry never disturbs a live call.
pub struct CompiledFlow {
    name: String,
    version: String,
    pre: FlowPre<FlowState>,
}

impl std::fmt::Debug for CompiledFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledFlow").field("name", &self.name).field("version", &self.version).finish_non_exhaustive()
    }
}

impl CompiledFlow {
    /// Compiles (or loads from `cache_dir`) a component and checks it against the world.
    ///
    /// Blocking and CPU-heavy (Cranelift): call it outside the async workers.
    pub fn compile(engine: &FlowEngine, name: &str, bytes: &[u8]) -> Result<Self, HostError> {
        let version = hex::encode(Sha256::digest(bytes));
        let component = match &engine.config().cache_dir {
            Some(dir) => load_cached(engine, dir, name, &version, bytes)?,
            None => Component::new(engine.engine(), bytes)
                .map_err(|e| HostError::Compile { flow: name.into(), detail: format!("{e:#}") })?,
        };
        let mismatch = |e: wasmtime::Error| HostError::WorldMismatch { flow: name.into(), detail: format!("{e:#}") };
        let instance_pre = engine.linker().instantiate_pre(&component).map_err(mismatch)?;
        let pre = FlowPre::new(instance_pre).map_err(mismatch)?;
        Ok(Self { name: name.into(), version, pre })
    }

    /// The flow's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// SHA-256 of the component bytes, hex.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub(crate) fn pre(&self) -> &FlowPre<FlowState> {
        &self.pre
    }
}

/// Feeds `Hash` output into SHA-256 so that the engine's compatibility hash gives a stable
/// file name (std's `DefaultHasher` is not stable across Rust releases).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        // Only `write` matters here; the digest is read with `finalize`.
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

fn engine_fingerprint(engine: &FlowEngine) -> String {
    let mut hasher = ShaHasher(Sha256::new());
    engine.engine().precompile_compatibility_hash().hash(&mut hasher);
    hex::encode(&hasher.0.finalize()[..8])
}

/// Loads the precompiled artifact for these bytes, compiling and writing it first if needed.
/// The file name holds the content hash and the engine's compatibility hash, so an artifact
/// made by a differently configured engine is never loaded.
fn load_cached(
    engine: &FlowEngine,
    dir: &Path,
    name: &str,
    version: &str,
    bytes: &[u8],
) -> Result<Component, HostError> {
    let path = dir.join(format!("{version}-{}.cwasm", engine_fingerprint(engine)));
    // Read the artifact into memory rather than mapping the file: a mapped file truncated by
    // someone else while the flow is loaded would bring the process down with SIGBUS.
    if let Ok(artifact) = std::fs::read(&path) {
        // SAFETY: the file is one this function wrote (its name carries the content hash and
        // the engine fingerprint, and the directory is Patchbay's own cache). wasmtime checks
        // the header and the engine compatibility; anything it refuses is recompiled below.
        match unsafe { Component::deserialize(engine.engine(), &artifact) } {
            Ok(component) => return Ok(component),
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "discarding unusable cached flow"),
        }
    }
    let artifact = engine
        .engine()
        .precompile_component(bytes)
        .map_err(|e| HostError::Compile { flow: name.into(), detail: format!("{e:#}") })?;
    if let Err(e) = write_artifact(dir, &path, &artifact) {
        // The compiled code is in memory: a cache that cannot be written only costs the next
        // start a compile, so it is no reason to refuse the flow.
        tracing::warn!(error = %e, "could not cache a compiled flow");
    }
    // SAFETY: `artifact` was produced just now by this engine's `precompile_component`.
    unsafe { Component::deserialize(engine.engine(), &artifact) }
        .map_err(|e| HostError::Compile { flow: name.into(), detail: format!("{e:#}") })
}

/// Writes an artifact under a unique temporary name, then renames it into place, so a crash or
/// a concurrent writer never leaves a half-written file under the real name.
fn write_artifact(dir: &Path, path: &Path, artifact: &[u8]) -> Result<(), HostError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let cache_err = |path: &Path, source| HostError::Cache { path: path.to_owned(), source };
    std::fs::create_dir_all(dir).map_err(|e| cache_err(dir, e))?;
    let unique = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{unique}", std::process::id()));
    std::fs::write(&tmp, artifact).map_err(|e| cache_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        cache_err(path, e)
    })
}

/// The flows every tenant has, swapped atomically: new calls take the current entry, live
/// calls keep theirs.
#[derive(Debug, Default)]
pub struct FlowRegistry {
    entries: RwLock<HashMap<FlowKey, Arc<CompiledFlow>>>,
}

impl FlowRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs a compiled flow, replacing any previous version; returns the one replaced.
    pub fn insert(&self, key: FlowKey, flow: CompiledFlow) -> Option<Arc<CompiledFlow>> {
        let mut entries = self.entries.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.insert(key, Arc::new(flow))
    }

    /// Compiles `bytes` and installs the result. A component that fails to compile or link
    /// leaves the current entry untouched.
    pub fn compile_and_insert(
        &self,
        engine: &FlowEngine,
        key: FlowKey,
        bytes: &[u8],
    ) -> Result<Arc<CompiledFlow>, HostError> {
        let flow = CompiledFlow::compile(engine, &key.flow, bytes)?;
        let flow = Arc::new(flow);
        let mut entries = self.entries.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.insert(key, Arc::clone(&flow));
        Ok(flow)
    }

    /// The current version of a flow.
    pub fn get(&self, tenant: &str, flow: &str) -> Result<Arc<CompiledFlow>, HostError> {
        let entries = self.entries.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries
            .get(&FlowKey::new(tenant, flow))
            .cloned()
            .ok_or_else(|| HostError::UnknownFlow { tenant: tenant.into(), flow: flow.into() })
    }

    /// Every installed flow, sorted by key.
    pub fn list(&self) -> Vec<(FlowKey, Arc<CompiledFlow>)> {
        let entries = self.entries.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut all: Vec<_> = entries.iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// Default cache directory: `$XDG_CACHE_HOME/patchbay/flows` or `~/.cache/patchbay/flows`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("patchbay").join("flows"))
}
