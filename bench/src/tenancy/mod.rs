//! Multi-tenancy and hot swap against the real binary (`BENCHMARKS.md`, "Tenants and hot swap"):
//!
//! - [`swap`]: from a component renamed into a tenant's `flows_dir` to the API serving the new
//!   version, over many swaps, each a cache miss (cold) or alternating two builds (warm);
//! - [`rss`]: resident memory of 1,000 tenants with five loaded flows each and no calls;
//! - [`setup_rate`]: sipp call set-ups at a fixed rate to one tenant, or spread over 100;
//! - [`soak`]: minutes of calls while the flow is swapped every few seconds (`cargo xtask soak`).
//!
//! What they share lives here: starting Patchbay and waiting for its ready line, a small
//! keep-alive HTTP client for the control API, other builds of a component (a custom section
//! appended, as `tests/tests/tenants.rs` does), the log lines `flow swapped … ms=N`, and the
//! machine's state (steal time, load) printed beside every figure.

pub mod rss;
pub mod setup_rate;
pub mod soak;
pub mod swap;

use std::net::{SocketAddr, TcpListener as StdTcpListener, UdpSocket as StdUdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::procstat;
use crate::stats::MsSummary;
use crate::suite::Process;

/// The line Patchbay prints once every flow is loaded, the watchers are set and it serves.
pub const READY_LINE: &str = "Press Ctrl-C to stop.";

/// The stock components as the build leaves them (`runtime/stock-flows/build.rs`).
pub const COMPONENTS_DIR: &str = "target/wasm-flows/wasm32-wasip2/release";

/// A running Patchbay whose stdout and stderr go to one log file.
pub struct Patchbay {
    process: Process,
    /// Its process id.
    pub pid: u32,
    /// The log file.
    pub log: PathBuf,
    /// From spawn to the ready line.
    pub startup: Duration,
}

impl Patchbay {
    /// Starts `bin run --config CONFIG` with `RUST_LOG=log_level` and waits (at most `timeout`)
    /// for [`READY_LINE`]. On failure the log's last lines are in the error.
    pub async fn start(
        bin: &Path,
        config: &Path,
        log: &Path,
        log_level: &str,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        let mut process = Process::spawn(
            "patchbay",
            Command::new(bin)
                .arg("run")
                .arg("--config")
                .arg(config)
                .env("RUST_LOG", log_level)
                // The log is a file: no terminal colour codes in it.
                .env("NO_COLOR", "1"),
            log,
        )?;
        let mut tail = LogTail::new(log);
        loop {
            if tail.read_new().contains(READY_LINE) {
                break;
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                bail!("patchbay exited ({status}) before it was ready; its log ends:\n{}", last_lines(log, 15));
            }
            if started.elapsed() > timeout {
                process.stop().await;
                bail!("patchbay was not ready after {timeout:?}; its log ends:\n{}", last_lines(log, 15));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let startup = started.elapsed();
        let pid = process.pid()?;
        Ok(Self { process, pid, log: log.to_owned(), startup })
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub async fn stop(self) {
        self.process.stop().await;
    }
}

/// Reads what was appended to a file since the last read.
pub struct LogTail {
    path: PathBuf,
    offset: u64,
}

impl LogTail {
    /// From the file's start.
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_owned(), offset: 0 }
    }

    /// From the file's current end.
    pub fn at_end(path: &Path) -> Self {
        Self { path: path.to_owned(), offset: std::fs::metadata(path).map_or(0, |m| m.len()) }
    }

    /// What was appended since the last call (complete lines only).
    pub fn read_new(&mut self) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let mut bytes = Vec::new();
        if let Ok(mut file) = std::fs::File::open(&self.path)
            && file.seek(SeekFrom::Start(self.offset)).is_ok()
        {
            let _ = file.read_to_end(&mut bytes);
        }
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        self.offset += complete as u64;
        String::from_utf8_lossy(&bytes[..complete]).into_owned()
    }
}

fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `text` without terminal escape sequences (`ESC [ … letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One `flow swapped` line: the new version (12 hex digits) and the compile-and-link time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapLine {
    /// The tenant.
    pub tenant: String,
    /// The flow.
    pub flow: String,
    /// First 12 hex digits of the new version.
    pub new: String,
    /// `ms=`: reading the cache or compiling, then linking (`deploy::compile`).
    pub ms: u64,
}

/// Parses the `flow swapped` lines of a log excerpt, in order.
pub fn swap_lines(log: &str) -> Vec<SwapLine> {
    strip_ansi(log)
        .lines()
        .filter(|l| l.contains("flow swapped"))
        .filter_map(|l| {
            Some(SwapLine {
                tenant: field(l, "tenant")?,
                flow: field(l, "flow")?,
                new: field(l, "new")?,
                ms: field(l, "ms")?.parse().ok()?,
            })
        })
        .collect()
}

/// The value of ` NAME=value` or ` NAME="value"` in a tracing line.
fn field(line: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=");
    let start = line.find(&key)? + key.len();
    let rest = &line[start..];
    match rest.strip_prefix('"') {
        Some(quoted) => Some(quoted[..quoted.find('"')?].to_owned()),
        None => Some(rest.split_whitespace().next()?.to_owned()),
    }
}

/// `component` with a custom section named `patchbay-bench-build` holding `tag` appended:
/// another build (another SHA-256, so another cache entry) that behaves the same, as a rebuild
/// with a changed timestamp would be.
pub fn another_build(component: &[u8], tag: &str) -> Vec<u8> {
    let name = b"patchbay-bench-build";
    let mut payload = leb128(name.len());
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut bytes = component.to_vec();
    bytes.push(0); // custom section
    bytes.extend(leb128(payload.len()));
    bytes.extend_from_slice(&payload);
    bytes
}

fn leb128(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// SHA-256 of `bytes`, hex: the version Patchbay gives a component. Asked of `sha256sum`
/// (coreutils) rather than computed here, so that the benchmark does not carry a second
/// implementation of what it checks.
pub fn sha256_hex(bytes: &[u8]) -> anyhow::Result<String> {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running sha256sum (coreutils)")?;
    std::io::Write::write_all(&mut child.stdin.take().context("sha256sum stdin")?, bytes).context("sha256sum")?;
    let out = child.wait_with_output().context("sha256sum")?;
    let hex = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned();
    if hex.len() != 64 {
        bail!("sha256sum printed {hex:?}");
    }
    Ok(hex)
}

/// Writes `bytes` as `dir/NAME.wasm` the way `docs/hot-swap.md` tells a deploy job to: under a
/// temporary name in the same directory, then a rename. Returns the instant and the wall-clock
/// time just before the rename.
pub fn install(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<(Instant, SystemTime)> {
    let tmp = dir.join(format!(".{name}.wasm.tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    let (at, wall) = (Instant::now(), SystemTime::now());
    std::fs::rename(&tmp, dir.join(format!("{name}.wasm"))).context("renaming the new build into place")?;
    Ok((at, wall))
}

/// A free loopback UDP port (bound and released: Patchbay binds it a moment later).
pub fn free_udp_port() -> anyhow::Result<u16> {
    Ok(StdUdpSocket::bind("127.0.0.1:0").context("probing for a free port")?.local_addr()?.port())
}

/// A free loopback TCP port.
pub fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(StdTcpListener::bind("127.0.0.1:0").context("probing for a free port")?.local_addr()?.port())
}

/// Creates `dir` (and parents) and returns its absolute path.
pub fn results_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))
}

/// The absolute path of the Patchbay binary, or how to build it.
pub fn patchbay_binary(path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(path)
        .with_context(|| format!("{} (build it: cargo build --release -p patchbay)", path.display()))
}

/// Reads a component file, or says how to get it.
pub fn read_component(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path)
        .with_context(|| format!("reading {} (any build of patchbay builds the stock flows there)", path.display()))
}

/// What the machine was doing: steal time and busy time since a [`Machine::now`].
#[derive(Debug, Clone, Copy)]
pub struct Machine {
    cpu: Option<(u64, u64)>,
    busy: Option<(u64, u64)>,
}

impl Machine {
    /// A reading of `/proc/stat`.
    pub fn now() -> Self {
        Self { cpu: procstat::cpu_times(), busy: procstat::busy_times() }
    }

    /// Steal since this reading, percent of all CPU time.
    pub fn steal_percent(&self) -> Option<f64> {
        procstat::steal_since(self.cpu)
    }

    /// Busy time of all CPUs since this reading, percent of one core.
    pub fn busy_percent_of_a_core(&self) -> Option<f64> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        procstat::busy_times()
            .zip(self.busy)
            .map(|((t, b), (t0, b0))| 100.0 * cores * b.saturating_sub(b0) as f64 / t.saturating_sub(t0).max(1) as f64)
    }

    /// "steal X % of all CPU time, machine busy Y % of a core" since this reading.
    pub fn describe(&self) -> String {
        let steal = self.steal_percent().map_or("n/a".into(), |s| format!("{s:.1} %"));
        let busy = self.busy_percent_of_a_core().map_or("n/a".into(), |b| format!("{b:.0} %"));
        // /proc/stat's busy time is sampled at the scheduler tick, and on this VM it has read
        // lower than a single process's exact CPU time during bursty loads (timers every 20 ms):
        // a hint of other load, not a measure.
        format!("VM steal {steal} of all CPU time; all CPUs busy {busy} of one core (tick-sampled)")
    }
}

/// The 1/5/15-minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

/// Prints the header every run starts with: the command that reproduces it, date, machine,
/// load, the binary.
pub fn print_header(command: &str, patchbay: &Path) {
    println!("command: {command}");
    println!("date: {}", crate::suite::date_utc());
    println!("machine: {}", crate::suite::machine());
    println!("load average before: {}", load_average());
    println!("patchbay: {}", patchbay.display());
}

/// `p50 … p95 … p99 … max … ms (n = …)`.
pub fn show(s: &MsSummary) -> String {
    format!("p50 {:.1} p95 {:.1} p99 {:.1} max {:.1} ms (n = {})", s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms, s.count)
}

/// Milliseconds since the epoch of a CDR time (`2026-12-06T23:37:52.820Z`).
pub fn epoch_ms(rfc3339: &str) -> Option<i64> {
    let at = humantime::parse_rfc3339(rfc3339).ok()?;
    at.duration_since(std::time::UNIX_EPOCH).ok().and_then(|d| i64::try_from(d.as_millis()).ok())
}

/// The first 12 hex digits of a version, as Patchbay's logs show it.
pub fn short(version: &str) -> &str {
    version.get(..12).unwrap_or(version)
}

/// Milliseconds since the epoch.
pub fn wall_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Every JSON line of a CDR file.
pub fn read_cdrs(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Waits until `path` holds at least `n` CDRs or `timeout` passes; returns them.
pub async fn wait_for_cdrs(path: &Path, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let cdrs = read_cdrs(path);
        if cdrs.len() >= n || Instant::now() >= deadline {
            return cdrs;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A keep-alive HTTP/1.1 client for the control API (GET only, one request at a time).
pub struct ApiClient {
    addr: SocketAddr,
    token: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl ApiClient {
    /// A client for the API at `addr` with a bearer token.
    pub fn new(addr: SocketAddr, token: &str) -> Self {
        Self { addr, token: token.to_owned(), stream: None, buf: Vec::with_capacity(8192) }
    }

    /// `GET path`: the status and the body as JSON (`Null` when it is not JSON).
    pub async fn get(&mut self, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr).await.with_context(|| format!("connecting to {}", self.addr))?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
        }
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\r\n", self.addr, self.token);
        let stream = self.stream.as_mut().context("no connection")?;
        let result = async {
            stream.write_all(request.as_bytes()).await?;
            crate::originate::read_response(stream, &mut self.buf).await
        }
        .await;
        match result {
            Ok((status, body, close)) => {
                if close {
                    self.stream = None;
                }
                Ok((status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)))
            }
            Err(e) => {
                self.stream = None;
                Err(e).context(format!("GET {path}"))
            }
        }
    }

    /// The version serving new calls of `tenant`'s flow `flow` and its `failed_deploys`
    /// (`GET /v1/tenants/{tenant}/flows`).
    pub async fn flow_version(&mut self, tenant: &str, flow: &str) -> anyhow::Result<(Option<String>, u64)> {
        let (status, body) = self.get(&format!("/v1/tenants/{tenant}/flows")).await?;
        if status != 200 {
            bail!("GET /v1/tenants/{tenant}/flows: {status} {body}");
        }
        let entry = body["flows"].as_array().and_then(|flows| flows.iter().find(|f| f["name"] == flow));
        Ok(entry.map_or((None, 0), |f| {
            (f["version"].as_str().map(str::to_owned), f["failed_deploys"].as_u64().unwrap_or(0))
        }))
    }

    /// Waits until the API answers at all.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.get("/v1/tenants").await {
                Ok((200, _)) => return Ok(()),
                _ if Instant::now() >= deadline => bail!("the API at {} did not answer", self.addr),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

/// sipp placing calls in the background until told to stop.
pub struct Sipp {
    child: tokio::process::Child,
    /// Its `-trace_stat` file.
    pub stat: PathBuf,
    /// Its working directory (error log, rtt file).
    pub dir: PathBuf,
}

impl Sipp {
    /// Starts sipp in `dir` with `args` (the scenario, rate, target …); adds `-trace_stat`
    /// to `stat.csv`, `-trace_err`, `-nostdin`.
    pub fn start(dir: &Path, args: &[String]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let stat = dir.join("stat.csv");
        let _ = std::fs::remove_file(&stat);
        let child = Command::new("sipp")
            .current_dir(dir)
            .args(args)
            .args(["-nostdin", "-trace_err", "-trace_stat", "-fd", "1", "-stf"])
            .arg(&stat)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sipp.stderr")).context("sipp's stderr file")?)
            .kill_on_drop(true)
            .spawn()
            .context("starting sipp (Debian package sip-tester)")?;
        Ok(Self { child, stat, dir: dir.to_owned() })
    }

    /// SIGUSR1: sipp places no new calls, lets the ones up finish, then exits.
    pub fn finish_soon(&self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGUSR1);
            }
        }
    }

    /// Waits for sipp to exit (killing it after `timeout`); returns its exit code.
    pub async fn wait(mut self, timeout: Duration) -> Option<i32> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => {
                let _ = self.child.kill().await;
                None
            }
        }
    }
}

/// sipp's counters from the last row of its `-trace_stat` file, by column name.
pub fn sipp_counters(stat: &Path) -> Option<std::collections::BTreeMap<String, String>> {
    let text = std::fs::read_to_string(stat).ok()?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next()?.split(';').collect();
    let last: Vec<&str> = lines.next_back()?.split(';').collect();
    Some(header.iter().zip(last).map(|(h, v)| ((*h).to_owned(), v.trim().to_owned())).collect())
}

/// A counter of [`sipp_counters`] as a number.
pub fn counter(counters: &std::collections::BTreeMap<String, String>, name: &str) -> u64 {
    counters.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The failure counters (`Failed…(C)`) that are not zero, as `name=n`.
pub fn sipp_failures(counters: &std::collections::BTreeMap<String, String>) -> Vec<String> {
    counters
        .iter()
        .filter(|(k, v)| k.starts_with("Failed") && k.ends_with("(C)") && v.as_str() != "0" && !v.is_empty())
        .map(|(k, v)| format!("{}={v}", k.trim_end_matches("(C)")))
        .collect()
}

/// The last lines of sipp's error log in `dir`, if it wrote one.
pub fn sipp_errors(dir: &Path, n: usize) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().to_string_lossy().ends_with("_errors.log") {
            text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_lines_are_read_with_or_without_colours() {
        let log = "2026-12-07T00:01:02.345Z  INFO patchbay::deploy: flow swapped tenant=\"acme\" flow=\"echo\" \
                   old=\"8b9044105845\" new=\"9178ce643b3b\" ms=252\n\
                   \u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m flow swapped \u{1b}[3mtenant\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"b\" \
                   \u{1b}[3mflow\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"echo\" \u{1b}[3mnew\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"abc\" \
                   \u{1b}[3mms\u{1b}[0m\u{1b}[2m=\u{1b}[0m7\n\
                   INFO flow loaded tenant=\"acme\" flow=\"vm\" version=\"f027f1068898\" ms=165\n";
        let lines = swap_lines(log);
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            SwapLine { tenant: "acme".into(), flow: "echo".into(), new: "9178ce643b3b".into(), ms: 252 }
        );
        assert_eq!((lines[1].new.as_str(), lines[1].ms), ("abc", 7));
    }

    #[test]
    fn another_build_is_a_valid_custom_section() {
        let base = b"\0asm\x0d\0\x01\0".to_vec();
        let long = "x".repeat(300);
        for tag in ["b", long.as_str()] {
            let built = another_build(&base, tag);
            assert_eq!(&built[..base.len()], &base[..]);
            let rest = &built[base.len()..];
            assert_eq!(rest[0], 0, "section id: custom");
            // Section size (LEB128), then the name's length and the name.
            let (mut size, mut shift, mut at) = (0usize, 0, 1);
            loop {
                let b = rest[at];
                size |= usize::from(b & 0x7f) << shift;
                at += 1;
                if b & 0x80 == 0 {
                    break;
                }
                shift += 7;
            }
            assert_eq!(rest.len() - at, size, "the section runs to the end");
            assert_eq!(usize::from(rest[at]), b"patchbay-bench-build".len());
            assert!(rest.ends_with(tag.as_bytes()));
        }
    }

    #[test]
    fn cdr_times_convert() {
        assert_eq!(epoch_ms("1970-01-01T00:00:01.250Z"), Some(1250));
        assert_eq!(epoch_ms("2026-12-06T23:37:52.820Z"), Some(1_796_600_272_820));
        assert_eq!(epoch_ms("bad"), None);
    }
}
