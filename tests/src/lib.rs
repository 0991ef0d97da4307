//! Helpers for Patchbay's end-to-end tests: they start the real `patchbay` binary and drive it
//! from outside, as a user or a SIP peer would.

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of the `patchbay` binary of this build, building it first if needed.
pub fn patchbay_bin() -> PathBuf {
    workspace_bin("patchbay", "patchbay")
}

/// Path of the `patchbay-loadgen` binary (the load generator, crate `patchbay-bench`) of this
/// build, building it first if needed.
pub fn loadgen_bin() -> PathBuf {
    workspace_bin("patchbay-loadgen", "patchbay-bench")
}

/// A binary of this workspace in the same profile directory as this test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/<name>`), built from `package` if missing.
fn workspace_bin(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile> directory");
    let bin = profile_dir.join(name);
    if !bin.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo).args(["build", "--package", package]).status().expect("running cargo build");
        assert!(status.success(), "building the {name} binary failed");
    }
    bin
}

/// A `patchbay` command with its flow cache in a private directory.
pub fn patchbay(cache: &std::path::Path) -> Command {
    let mut cmd = Command::new(patchbay_bin());
    cmd.env("XDG_CACHE_HOME", cache).env("RUST_LOG", "warn");
    cmd
}

/// Runs `patchbay call ARGS…` (the test caller) with its cache in `dir`; returns whether it
/// exited successfully and everything it printed (for assertion messages).
pub fn patchbay_call<S: AsRef<std::ffi::OsStr>>(dir: &std::path::Path, args: &[S]) -> (bool, String) {
    let out = patchbay(dir).arg("call").args(args).output().expect("run patchbay call");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// A port free for both UDP and TCP on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = tcp.local_addr().expect("local addr").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// An even port with `count` ports free for UDP and TCP from it, in 20000–32767 (below Linux's default
/// ephemeral range, 32768–60999, which port-0 binds draw from).
pub fn quiet_port(count: u16) -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + ((seed.wrapping_add(n.wrapping_mul(7_919)) % 6_000) * 2) as u16;
        let free = |q: u16| {
            std::net::UdpSocket::bind(("127.0.0.1", q)).is_ok() && std::net::TcpListener::bind(("127.0.0.1", q)).is_ok()
        };
        if (port..port + count).all(free) {
            return port;
        }
    }
}

/// A running Patchbay; killed on drop.
pub struct Patchbay {
    child: Child,
    /// The port it serves SIP on (UDP, and TCP when configured).
    pub port: u16,
    /// Its working directory (config, flow files, certificates).
    pub dir: tempfile::TempDir,
}

impl Drop for Patchbay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts Patchbay with `config` (TOML text) written into `dir`, serving on `port`, and waits
/// until it is ready.
pub fn launch(dir: tempfile::TempDir, port: u16, config: &str) -> Patchbay {
    spawn(dir, port, config, Stdio::inherit(), "warn")
}

/// [`launch`] with its log (stderr), at `info` level, going to `log`.
pub fn launch_logging(dir: tempfile::TempDir, port: u16, config: &str, log: Stdio) -> Patchbay {
    spawn(dir, port, config, log, "info")
}

fn spawn(dir: tempfile::TempDir, port: u16, config: &str, log: Stdio, level: &str) -> Patchbay {
    let path = dir.path().join("patchbay.toml");
    std::fs::write(&path, config).expect("write config");
    let mut child = patchbay(dir.path())
        .env("RUST_LOG", level)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start patchbay");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(60), "patchbay did not start");
        match lines.next() {
            Some(Ok(line)) if line.contains("Press Ctrl-C") => break,
            Some(Ok(_)) => {}
            _ => panic!("patchbay exited before it was ready"),
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Patchbay { child, port, dir }
}

/// Starts Patchbay on a free UDP port serving `echo`, `menu` (stock), and `ring`, `transfer` and
/// `think` (the chaos fixture: rings 30 s before answering; answers and REFERs to bob; answers
/// and stays silent for 30 s) to tenant `test` on 127.0.0.1, which may transfer to
/// `sip:bob@127.0.0.1` (`[tenant.allow]`).
pub fn start_patchbay() -> Patchbay {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("chaos.wasm"), patchbay_stock_flows::fixtures::CHAOS).expect("write fixture");
    let port = free_port();
    let config = format!(
        "[sip]\nlisten = [\"udp:127.0.0.1:{port}\"]\n\
         [[tenant]]\nid = \"test\"\ndomains = [\"127.0.0.1\"]\n\
         [tenant.allow]\ndial = [\"sip:bob@127.0.0.1\"]\n\
         [[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n\
         [[tenant.flow]]\nname = \"menu\"\nstock = \"menu\"\n\
         [[tenant.flow]]\nname = \"ring\"\npath = \"chaos.wasm\"\n\
         [[tenant.flow]]\nname = \"transfer\"\npath = \"chaos.wasm\"\n\
         [[tenant.flow]]\nname = \"think\"\npath = \"chaos.wasm\"\n"
    );
    launch(dir, port, &config)
}

/// Starts Patchbay on a free UDP port with CDRs written to `cdr.jsonl` and recordings stored
/// under `storage/` in its directory, tenant `test` on 127.0.0.1 serving `flows` (TOML
/// `[[tenant.flow]]` tables, and `[tenant.allow]` for what they may reach beyond the tenant's
/// own flows, see [`allow`]; `{port}` in them is replaced by Patchbay's own port). `extra` is
/// added before the tenant (top-level tables such as `[demo_agent]`).
pub fn start_patchbay_with(extra: &str, flows: &str) -> Patchbay {
    start_patchbay_logging(extra, flows, false)
}

/// [`start_patchbay_with`], its log (stderr) written to `patchbay.log` in its directory when
/// `to_file` (see [`Patchbay::log`]).
pub fn start_patchbay_logging(extra: &str, flows: &str, to_file: bool) -> Patchbay {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("chaos.wasm"), patchbay_stock_flows::fixtures::CHAOS).expect("write fixture");
    let port = free_port();
    let flows = flows.replace("{port}", &port.to_string());
    let config = format!(
        "[sip]\nlisten = [\"udp:127.0.0.1:{port}\"]\n\
         [cdr]\npath = \"cdr.jsonl\"\n[storage]\ndir = \"storage\"\n{extra}\n\
         [[tenant]]\nid = \"test\"\ndomains = [\"127.0.0.1\"]\n{flows}\n"
    );
    if !to_file {
        return launch(dir, port, &config);
    }
    let log = std::fs::File::create(dir.path().join("patchbay.log")).expect("create the log file");
    launch_logging(dir, port, &config, Stdio::from(log))
}

/// Starts Patchbay serving `echo` to tenant `secure` on 127.0.0.1, which challenges every
/// caller (digest, realm `patchbay.test`, user `alice` with password `s3cret`, MD5 only: sipp
/// and SIPVicious know nothing else) and writes CDRs to `cdr.jsonl`.
pub fn start_challenging_patchbay() -> Patchbay {
    let port = free_port();
    let config = format!(
        "[sip]\nlisten = [\"udp:127.0.0.1:{port}\"]\n\
         [cdr]\npath = \"cdr.jsonl\"\n\
         [[tenant]]\nid = \"secure\"\ndomains = [\"127.0.0.1\"]\n\
         [tenant.auth]\nrealm = \"patchbay.test\"\nusers = {{ alice = \"s3cret\" }}\n\
         # sipp answers only the first challenge and knows only MD5.\n\
         algorithms = [\"MD5\"]\n\
         [[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n"
    );
    launch(tempfile::tempdir().expect("tempdir"), port, &config)
}

/// One sipp call to [`start_challenging_patchbay`]'s `echo` as `alice` with `password`, sent
/// from `local_ip` (any 127.0.0.0/8 address: a source of its own). Returns whether sipp
/// succeeded, and its output.
pub fn sipp_digest_call(pb: &Patchbay, local_ip: &str, password: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new("sipp")
        .current_dir(dir.path())
        .args(["-sf", &scenario("uac_digest.xml"), &format!("127.0.0.1:{}", pb.port)])
        .args(["-s", "echo", "-i", local_ip, "-p", &free_port().to_string()])
        .args(["-mp", &free_port().to_string(), "-m", "1", "-timeout", "30", "-timeout_error", "-nostdin"])
        // sipp's digest `uri` defaults to host:port; the server checks it against the
        // Request-URI (RFC 7616 §3.4.6), so give sipp the real one.
        .args(["-au", "alice", "-ap", password, "-auth_uri", &format!("echo@127.0.0.1:{}", pb.port)])
        .args(["-trace_err"])
        .stdin(Stdio::null())
        .output()
        .expect("run sipp (Debian package sip-tester; `cargo xtask test` installs it)");
    let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
    log.push_str(&String::from_utf8_lossy(&out.stderr));
    for entry in std::fs::read_dir(dir.path()).into_iter().flatten().flatten() {
        if entry.path().to_string_lossy().ends_with("_errors.log") {
            log.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    (out.status.success(), log)
}

/// A `[tenant.allow]` table for [`start_patchbay_with`]'s `flows`: the `dial` and `agents`
/// entries given.
pub fn allow(dial: &[&str], agents: &[&str]) -> String {
    let list = |entries: &[&str]| entries.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>().join(", ");
    format!("[tenant.allow]\ndial = [{}]\nagents = [{}]\n", list(dial), list(agents))
}

impl Patchbay {
    /// Waits up to `timeout` for the process to exit by itself; its status, or `None` if it is
    /// still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Sends SIGTERM, as an orchestrator stopping the service does.
    pub fn terminate(&self) {
        let status = Command::new("kill").arg(self.child.id().to_string()).status().expect("kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// The process id (for /proc figures).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far, when started with its log going to a file.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("patchbay.log")).unwrap_or_default()
    }

    /// The call detail records written so far (one JSON object per line of `cdr.jsonl`).
    pub fn cdrs(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.path().join("cdr.jsonl")).unwrap_or_default();
        text.lines().map(|line| serde_json::from_str(line).expect("a CDR line is JSON")).collect()
    }

    /// Waits for `count` records as [`wait_for_cdrs`](Self::wait_for_cdrs), then 300 ms more,
    /// and returns every record by then: for tests that check no further record is written.
    pub fn settled_cdrs(&self, count: usize, timeout: Duration) -> Vec<serde_json::Value> {
        self.wait_for_cdrs(count, timeout);
        std::thread::sleep(Duration::from_millis(300));
        self.cdrs()
    }

    /// Waits up to `timeout` until `count` records have been written, and returns them.
    pub fn wait_for_cdrs(&self, count: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let started = Instant::now();
        loop {
            let cdrs = self.cdrs();
            if cdrs.len() >= count || started.elapsed() > timeout {
                return cdrs;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The samples of a 16-bit PCM or μ-law WAV (enough of the format for the tests' files).
pub fn wav_samples(bytes: &[u8]) -> Vec<i16> {
    let format = u16::from_le_bytes([bytes[20], bytes[21]]);
    let data = bytes.windows(4).position(|w| w == b"data").expect("a data chunk") + 8;
    match format {
        1 => bytes[data..].chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect(),
        7 => bytes[data..].iter().map(|&b| patchbay_media::g711::ulaw_decode(b)).collect(),
        other => panic!("unexpected WAV format {other}"),
    }
}

/// A mono 8 kHz WAV file: `format` 1 (PCM) or 7 (μ-law), `bits` per sample, `data` as stored.
fn wav_8k(format: u16, bits: u16, data: &[u8]) -> Vec<u8> {
    let block = bits / 8;
    let mut wav = Vec::with_capacity(44 + data.len());
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&format.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes());
    wav.extend_from_slice(&8_000u32.to_le_bytes());
    wav.extend_from_slice(&(8_000 * u32::from(block)).to_le_bytes());
    wav.extend_from_slice(&block.to_le_bytes());
    wav.extend_from_slice(&bits.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&(data.len() as u32).to_le_bytes());
    wav.extend_from_slice(data);
    wav
}

/// Writes 8 kHz μ-law octets as a WAV file (format 7) at `path`.
pub fn write_ulaw_wav(path: &std::path::Path, octets: &[u8]) {
    std::fs::write(path, wav_8k(7, 8, octets)).expect("write WAV");
}

/// Writes 8 kHz 16-bit PCM samples as a WAV file at `path`.
pub fn write_pcm16_wav(path: &std::path::Path, samples: &[i16]) {
    let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    std::fs::write(path, wav_8k(1, 16, &data)).expect("write WAV");
}

/// Normalised cross-correlation of two equally long signals (0 when either is all zeros).
pub fn correlation(a: &[i16], b: &[i16]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 { 0.0 } else { ab / (aa * bb).sqrt() }
}

/// How much of `sent` is found in `heard` sample for sample: the fraction of its 20 ms frames
/// (160 samples) that are heard intact, or `None` when none of 50 frames from a third of the
/// way in is heard at all. The alignment is found on that stretch, then followed frame by frame: an adaptive jitter
/// buffer on the way may move the delay by whole frames (growing by a concealment frame,
/// shrinking by dropping one), so each frame is looked for at the current delay first, then up
/// to ten frames either side of it. A frame that never arrived, or arrived damaged, is not
/// found; a delay change costs at most the frame it dropped.
pub fn fraction_heard(sent: &[i16], heard: &[i16]) -> Option<f64> {
    const FRAME: isize = 160;
    // Anchored on the first frame from a third of the way in that is heard at all (one frame
    // lost on the way must not hide the rest).
    let first = sent.len() / 3 / FRAME as usize;
    let mut lag = (first..(first + 50).min(sent.len() / FRAME as usize)).find_map(|f| {
        let start = f * FRAME as usize;
        let probe = &sent[start..start + FRAME as usize];
        let at = heard.windows(probe.len()).position(|w| w == probe)?;
        Some(at as isize - start as isize)
    })?;
    let frames = sent.len() / FRAME as usize;
    let heard_at = |frame: &[i16], begin: isize| {
        usize::try_from(begin).ok().and_then(|b| heard.get(b..b + frame.len())).is_some_and(|h| h == frame)
    };
    let mut intact = 0;
    for f in 0..frames {
        let begin = f as isize * FRAME;
        let frame = &sent[begin as usize..(begin + FRAME) as usize];
        let shifts = std::iter::once(0).chain((1..=10).flat_map(|k| [k * FRAME, -k * FRAME]));
        if let Some(shift) = shifts.into_iter().find(|shift| heard_at(frame, begin + lag + shift)) {
            lag += shift;
            intact += 1;
        }
    }
    Some(intact as f64 / frames.max(1) as f64)
}

/// componentize-py's version, installed from PyPI on first use.
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";

/// The Python flow `plugins/python-menu` built as a component with componentize-py (into
/// `target/python-flows/`; componentize-py is installed from PyPI into a virtualenv under
/// `target/` the first time). Rebuilt when `app.py` is newer than the component.
pub fn python_menu_component() -> PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = root.join("target");
    let venv = target.join("pyflow-venv");
    let tool = venv.join("bin/componentize-py");
    let out_dir = target.join("python-flows");
    let out = out_dir.join("python_menu.wasm");
    let source = root.join("plugins/python-menu");
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if out.is_file() && modified(&out) >= modified(&source.join("app.py")) {
        return out;
    }
    let run = |what: &str, cmd: &mut Command| {
        let status = cmd.status().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(status.success(), "{what} failed ({status})");
    };
    if !tool.is_file() {
        run("python3 -m venv", Command::new("python3").arg("-m").arg("venv").arg(&venv));
        run("pip install componentize-py", Command::new(venv.join("bin/pip")).args(["install", "-q", COMPONENTIZE_PY]));
    }
    std::fs::create_dir_all(&out_dir).expect("create target/python-flows");
    run(
        "componentize-py",
        Command::new(&tool)
            .current_dir(&source)
            .args(["-q", "-d", "../../wit", "-w", "flow", "componentize", "-p", ".", "app", "-o"])
            .arg(&out),
    );
    out
}

/// Runs sipp against `port`: `scenario_args` pick the scenario (`-sf FILE` or `-sn NAME`),
/// `extra` adds options (transport, rate, loss). Returns whether sipp reported success, and
/// its output and error log for the assertion message.
pub fn run_sipp(port: u16, service: &str, scenario_args: &[&str], calls: u32, extra: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new("sipp")
        .current_dir(dir.path())
        .args(scenario_args)
        .arg(format!("127.0.0.1:{port}"))
        .args(["-s", service, "-i", "127.0.0.1", "-p"])
        .arg(free_port().to_string())
        .arg("-mp")
        .arg(free_port().to_string())
        .args(["-m", &calls.to_string(), "-l", "5", "-timeout", "60", "-timeout_error", "-nostdin", "-trace_err"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run sipp (Debian package sip-tester; `cargo xtask test` installs it)");
    let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
    log.push_str(&String::from_utf8_lossy(&out.stderr));
    for entry in std::fs::read_dir(dir.path()).into_iter().flatten().flatten() {
        if entry.path().to_string_lossy().ends_with("_errors.log") {
            log.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    (out.status.success(), log)
}

/// Path of a sipp scenario in `tests/sipp/`.
pub fn scenario(name: &str) -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sipp").join(name).to_string_lossy().into_owned()
}

/// A packet capture on the loopback interface (tshark, which `cargo xtask test` installs),
/// stopped and read back with [`Capture::finish`].
pub struct Capture {
    child: Child,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

/// One UDP datagram of a capture.
#[derive(Debug, Clone)]
pub struct Datagram {
    /// Capture time, microseconds since the epoch.
    pub time_us: u64,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// UDP payload.
    pub payload: Vec<u8>,
}

impl Capture {
    /// Starts capturing UDP on `lo` matching the BPF `filter` and waits until tshark is ready.
    pub fn start(filter: &str) -> Capture {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("capture.pcap");
        let mut child = Command::new("tshark")
            .args(["-i", "lo", "-F", "pcap", "-f", filter, "-w"])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tshark (Debian package tshark; `cargo xtask test` installs it)");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("Capturing on") => break,
                Some(Ok(_)) => {}
                _ => panic!("tshark did not start capturing (are we allowed to capture on lo?)"),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Capture { child, file, _dir: dir }
    }

    /// Stops the capture and returns its UDP datagrams in capture order.
    pub fn finish(mut self) -> Vec<Datagram> {
        // Let the last packets reach the capture, then stop tshark cleanly (SIGINT flushes).
        std::thread::sleep(Duration::from_millis(500));
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let bytes = std::fs::read(&self.file).expect("read the capture");
        parse_pcap(&bytes)
    }
}

/// Reads the UDP/IPv4 datagrams of a classic pcap file (Ethernet or Linux cooked link types).
pub fn parse_pcap(bytes: &[u8]) -> Vec<Datagram> {
    assert!(bytes.len() >= 24, "not a pcap file");
    let le = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) == 0xa1b2_c3d4;
    let u32_at = |b: &[u8], i: usize| {
        let v = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le { u32::from_le_bytes(v) } else { u32::from_be_bytes(v) }
    };
    let link_type = u32_at(bytes, 20);
    let link_header = match link_type {
        1 => 14,   // Ethernet (Linux loopback has zeroed MAC addresses)
        113 => 16, // Linux cooked capture
        other => panic!("unexpected pcap link type {other}"),
    };
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let time_us = u64::from(u32_at(bytes, at)) * 1_000_000 + u64::from(u32_at(bytes, at + 4));
        let len = u32_at(bytes, at + 8) as usize;
        let frame = &bytes[at + 16..(at + 16 + len).min(bytes.len())];
        at += 16 + len;
        let Some(ip) = frame.get(link_header..) else { continue };
        if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 17 {
            continue;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let Some(udp) = ip.get(ihl..) else { continue };
        if udp.len() < 8 {
            continue;
        }
        out.push(Datagram {
            time_us,
            src_port: u16::from_be_bytes([udp[0], udp[1]]),
            dst_port: u16::from_be_bytes([udp[2], udp[3]]),
            payload: udp[8..].to_vec(),
        });
    }
    out
}

/// One HTTP/1.1 request to `127.0.0.1:port` (the control API), with a bearer token; returns
/// the status code, the headers and the body parsed as JSON (`Null` when empty or not JSON).
pub fn http(method: &str, port: u16, path: &str, token: &str, body: Option<&str>) -> (u16, String, serde_json::Value) {
    let (status, head, body) = http_raw(method, port, path, token, body);
    (status, head, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
}

/// [`http`] with the body as text (the metrics' exposition, the health checks'): the status,
/// the head and the body.
pub fn http_raw(method: &str, port: u16, path: &str, token: &str, body: Option<&str>) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the API");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send the request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}
