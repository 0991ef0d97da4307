//! The part of WASI 0.2 a flow gets, and what happens to the rest.
//!
//! Every host function in the linker is code a flow can reach, so the linker holds only what
//! flows need: clocks, random numbers, the I/O types those use, and the `wasi:cli` pieces a
//! language runtime reads at start (stdout/stderr into the flow's log, an empty environment,
//! no stdin, no terminal). Three groups, one per constant below:
//!
//! - [`PROVIDED`]: linked once, at engine start, with wasmtime-wasi's implementation.
//! - [`STUBBED`]: filesystem and sockets. No implementation is linked, so denial does not rest
//!   on a `WasiCtx` setting. CPython (componentize-py) imports all of them whether or not the
//!   flow uses them, so a flow that imports them still loads: the imports are bound to stubs
//!   that trap when called, except `get-directories`, which returns no directories.
//! - anything else under `wasi:` (HTTP, key-value, WASI 0.3, ...): the flow is refused at load
//!   with [`HostError::UnsupportedImport`] naming the import.
//!
//! `docs/flow-host.md` has the same list with the reason for each interface; keep the two in
//! step.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, HasData, InstancePre, Linker, ResourceTable, ResourceType, Val};
use wasmtime::{Engine, bail};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream, WasiCli, WasiCliView};
use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
use wasmtime_wasi::random::{WasiRandom, WasiRandomView};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

use crate::error::HostError;
use crate::state::{FlowLog, FlowState, Stdio};

/// WASI 0.2 interfaces linked with wasmtime-wasi's implementation (any 0.2.x import of them
/// resolves: the linker matches semver-compatible versions). Keep in step with
/// [`add_to_linker`]; a slip either way refuses flows, it never links more.
const PROVIDED: &[&str] = &[
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/stdin",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
];

/// WASI 0.2 interfaces a flow may import but not use: bound per flow to stubs that trap.
const STUBBED: &[&str] = &[
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:sockets/network",
    "wasi:sockets/instance-network",
    "wasi:sockets/tcp",
    "wasi:sockets/tcp-create-socket",
    "wasi:sockets/udp",
    "wasi:sockets/udp-create-socket",
    "wasi:sockets/ip-name-lookup",
];

/// The only stub that answers instead of trapping: wasi-libc asks for the preopened
/// directories before its first path operation, and "none" is the truthful answer.
const GET_DIRECTORIES: (&str, &str) = ("wasi:filesystem/preopens", "get-directories");

/// Links the [`PROVIDED`] interfaces.
pub(crate) fn add_to_linker(linker: &mut Linker<FlowState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::p2::bindings::{cli, clocks, io, random};

    io::error::add_to_linker::<FlowState, WasiIo>(linker, FlowState::table)?;
    io::poll::add_to_linker::<FlowState, WasiIo>(linker, FlowState::table)?;
    io::streams::add_to_linker::<FlowState, WasiIo>(linker, FlowState::table)?;
    clocks::monotonic_clock::add_to_linker::<FlowState, WasiClocks>(linker, FlowState::clocks)?;
    clocks::wall_clock::add_to_linker::<FlowState, WasiClocks>(linker, FlowState::clocks)?;
    random::random::add_to_linker::<FlowState, WasiRandom>(linker, FlowState::random)?;
    random::insecure::add_to_linker::<FlowState, WasiRandom>(linker, FlowState::random)?;
    random::insecure_seed::add_to_linker::<FlowState, WasiRandom>(linker, FlowState::random)?;
    cli::stdout::add_to_linker::<FlowState, WasiCli>(linker, FlowState::cli)?;
    cli::stderr::add_to_linker::<FlowState, WasiCli>(linker, FlowState::cli)?;
    cli::stdin::add_to_linker::<FlowState, WasiCli>(linker, FlowState::cli)?;
    cli::environment::add_to_linker::<FlowState, WasiCli>(linker, FlowState::cli)?;
    cli::exit::add_to_linker::<FlowState, WasiCli>(linker, FlowState::cli)?;
    cli::terminal_input::add_to_linker::<FlowState, WasiCli>(linker, FlowState::cli)?;
    cli::terminal_output::add_to_linker::<FlowState, WasiCli>(linker, FlowState::cli)?;
    cli::terminal_stdin::add_to_linker::<FlowState, WasiCli>(linker, FlowState::cli)?;
    cli::terminal_stdout::add_to_linker::<FlowState, WasiCli>(linker, FlowState::cli)?;
    cli::terminal_stderr::add_to_linker::<FlowState, WasiCli>(linker, FlowState::cli)?;
    Ok(())
}

/// `wasi:io` host traits are implemented on the resource table itself.
struct WasiIo;

impl HasData for WasiIo {
    type Data<'a> = &'a mut ResourceTable;
}

/// A call's WASI context: no arguments, no environment, no preopened directories, stdin at
/// end of file, stdout and stderr into the flow's log. The socket switches are off too,
/// although nothing linked reads them (sockets are never linked, see [`STUBBED`]).
pub(crate) fn context(log: &Arc<FlowLog>) -> WasiCtx {
    let mut wasi = WasiCtxBuilder::new();
    wasi.stdout(LogStream { log: Arc::clone(log), stream: Stdio::Stdout })
        .stderr(LogStream { log: Arc::clone(log), stream: Stdio::Stderr })
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    wasi.build()
}

/// What the host does with one `wasi:` import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    Provided,
    Stubbed,
    Refused,
}

/// Sorts one import, such as `wasi:clocks/wall-clock@0.2.3`. Only 0.2 versions qualify: WASI
/// 0.3 is a different set of interfaces with its own async model, none of it linked.
fn disposition(import: &str) -> Disposition {
    let Some((interface, version)) = import.split_once('@') else {
        return Disposition::Refused;
    };
    if !version.starts_with("0.2.") {
        return Disposition::Refused;
    }
    if PROVIDED.contains(&interface) {
        Disposition::Provided
    } else if STUBBED.contains(&interface) {
        Disposition::Stubbed
    } else {
        Disposition::Refused
    }
}

/// Resolves a flow's imports: refuses a `wasi:` import Patchbay does not provide by name,
/// binds the [`STUBBED`] ones to traps, and leaves the rest (the `patchbay:voice` world) to
/// the linker's type check.
pub(crate) fn instantiate_pre(
    engine: &Engine,
    linker: &Linker<FlowState>,
    flow: &str,
    component: &Component,
) -> Result<InstancePre<FlowState>, HostError> {
    let mismatch = |e: wasmtime::Error| HostError::WorldMismatch { flow: flow.into(), detail: format!("{e:#}") };
    let mut needs_stubs = false;
    for (import, _) in component.component_type().imports(engine) {
        if !import.starts_with("wasi:") {
            continue;
        }
        match disposition(import) {
            Disposition::Provided => {}
            Disposition::Stubbed => needs_stubs = true,
            Disposition::Refused => {
                return Err(HostError::UnsupportedImport { flow: flow.into(), import: import.into() });
            }
        }
    }
    if !needs_stubs {
        return linker.instantiate_pre(component).map_err(mismatch);
    }
    // Stubs are shaped after this component's own import types, so they live in a copy of
    // the linker for this component only.
    let mut linker = linker.clone();
    define_stubs(engine, &mut linker, component).map_err(mismatch)?;
    linker.instantiate_pre(component).map_err(mismatch)
}

/// The host type behind every stubbed resource. It has no values: no stub ever returns a
/// socket or a file, so the guest can never hold one.
enum DeniedResource {}

/// Binds the component's [`STUBBED`] imports: each function traps naming itself, each
/// resource an interface introduces becomes a [`DeniedResource`]. A resource the interface
/// only `use`s from an earlier import (a `pollable`, the `network` a socket takes) is already
/// bound there and must not be redefined, so resources are tracked in import order, which is
/// dependency order in a component.
fn define_stubs(engine: &Engine, linker: &mut Linker<FlowState>, component: &Component) -> wasmtime::Result<()> {
    // `ResourceType` has no `Hash`; a component imports a few dozen resources at most.
    let mut seen: Vec<ResourceType> = Vec::new();
    for (import, item) in component.component_type().imports(engine) {
        let ComponentItem::ComponentInstance(instance) = item.ty else { continue };
        if import.starts_with("wasi:") && disposition(import) == Disposition::Stubbed {
            let interface = import.split_once('@').map_or(import, |(interface, _)| interface);
            let mut stub = linker.instance(import)?;
            for (name, item) in instance.exports(engine) {
                match item.ty {
                    ComponentItem::ComponentFunc(_) if (interface, name) == GET_DIRECTORIES => {
                        stub.func_new(name, |_, _, _, results| {
                            // The component chose the signature: a wrong one must trap, not
                            // panic the host.
                            let [directories] = results else {
                                bail!("flow imports get-directories with a signature WASI does not have")
                            };
                            *directories = Val::List(Vec::new());
                            Ok(())
                        })?;
                    }
                    ComponentItem::ComponentFunc(_) => {
                        let called = format!("{import}#{name}");
                        stub.func_new(name, move |_, _, _, _| {
                            bail!("flow called {called}: flows have no sockets or files (denied by Patchbay)")
                        })?;
                    }
                    ComponentItem::Resource(ty) if !seen.contains(&ty) => {
                        seen.push(ty);
                        stub.resource(name, ResourceType::host::<DeniedResource>(), |_, _| Ok(()))?;
                    }
                    _ => {}
                }
            }
        } else {
            for (_, item) in instance.exports(engine) {
                if let ComponentItem::Resource(ty) = item.ty
                    && !seen.contains(&ty)
                {
                    seen.push(ty);
                }
            }
        }
    }
    Ok(())
}

/// The longest line kept whole; a longer one is logged in pieces of this size, so a flow
/// that writes without newlines cannot grow host memory.
const MAX_LINE: usize = 4_096;

/// A flow's stdout or stderr: every line goes to the flow's log, under the log's budget.
struct LogStream {
    log: Arc<FlowLog>,
    stream: Stdio,
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter { log: Arc::clone(&self.log), stream: self.stream, lines: Lines::default() })
    }
}

/// Cuts a byte stream into lines of at most [`MAX_LINE`] bytes, without the `\n` (or `\r\n`).
/// A partial line waits for its newline, or for [`Lines::finish`].
#[derive(Default)]
struct Lines {
    pending: Vec<u8>,
}

impl Lines {
    fn push(&mut self, mut bytes: &[u8], line: &mut impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            // Never zero: `pending` is handed out as soon as it reaches `MAX_LINE`.
            let room = MAX_LINE - self.pending.len();
            match bytes.iter().position(|&b| b == b'\n') {
                Some(end) if end <= room => {
                    self.pending.extend_from_slice(&bytes[..end]);
                    bytes = &bytes[end + 1..];
                    self.finish(line);
                }
                None if bytes.len() < room => {
                    self.pending.extend_from_slice(bytes);
                    bytes = &[];
                }
                _ => {
                    // Longer than a line may be: hand out what fits, carry on with the rest.
                    self.pending.extend_from_slice(&bytes[..room]);
                    bytes = &bytes[room..];
                    self.finish(line);
                }
            }
        }
    }

    /// Hands out the pending partial line, if any.
    fn finish(&mut self, line: &mut impl FnMut(&[u8])) {
        let text = self.pending.strip_suffix(b"\r").unwrap_or(&self.pending);
        if !text.is_empty() {
            line(text);
        }
        self.pending.clear();
    }
}

/// The writer behind one stdout or stderr handle: each line becomes a log line.
struct LineWriter {
    log: Arc<FlowLog>,
    stream: Stdio,
    lines: Lines,
}

impl LineWriter {
    fn push(&mut self, bytes: &[u8]) {
        let Self { log, stream, lines } = self;
        lines.push(bytes, &mut |line| log.write_stdio(*stream, &String::from_utf8_lossy(line)));
    }

    fn finish(&mut self) {
        let Self { log, stream, lines } = self;
        lines.finish(&mut |line| log.write_stdio(*stream, &String::from_utf8_lossy(line)));
    }
}

impl AsyncWrite for LineWriter {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.get_mut().push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // A flush is not a line end: languages flush mid-line (Python when its buffer fills).
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().finish();
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        // The stream closes with the store: a last line without a newline is still logged.
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wasi_0_2_of_the_listed_interfaces_is_accepted() {
        assert_eq!(disposition("wasi:clocks/wall-clock@0.2.9"), Disposition::Provided);
        assert_eq!(disposition("wasi:cli/stdout@0.2.0"), Disposition::Provided);
        assert_eq!(disposition("wasi:sockets/tcp@0.2.6"), Disposition::Stubbed);
        assert_eq!(disposition("wasi:filesystem/preopens@0.2.9"), Disposition::Stubbed);
        assert_eq!(disposition("wasi:http/outgoing-handler@0.2.0"), Disposition::Refused);
        assert_eq!(disposition("wasi:clocks/wall-clock@0.3.0"), Disposition::Refused);
        assert_eq!(disposition("wasi:clocks/wall-clock"), Disposition::Refused);
    }

    fn lines_of(writes: &[&[u8]], finish: bool) -> Vec<String> {
        let mut out = Vec::new();
        let mut lines = Lines::default();
        let mut collect = |line: &[u8]| out.push(String::from_utf8_lossy(line).into_owned());
        for bytes in writes {
            lines.push(bytes, &mut collect);
        }
        if finish {
            lines.finish(&mut collect);
        }
        out
    }

    #[test]
    fn output_is_logged_by_line_and_long_lines_in_pieces() {
        assert_eq!(lines_of(&[b"one\ntw", b"o\r\n\nthree"], false), ["one", "two"]);
        assert_eq!(lines_of(&[b"one\ntw", b"o\r\n\nthree"], true), ["one", "two", "three"]);
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        let pieces = lines_of(&[&long, b"\n"], false);
        assert_eq!(pieces.iter().map(String::len).collect::<Vec<_>>(), [MAX_LINE, MAX_LINE, 10]);
        // A line of exactly `MAX_LINE` bytes is one line, newline or not.
        let exact = [vec![b'y'; MAX_LINE], b"\nz\n".to_vec()].concat();
        assert_eq!(lines_of(&[&exact], false).iter().map(String::len).collect::<Vec<_>>(), [MAX_LINE, 1]);
    }
}
