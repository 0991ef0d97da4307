//! `patchbay-loadgen suite`: the whole system benchmark in one command. Starts Patchbay with a
//! benchmark configuration (`bench.toml`, written next to the results) and the peers, runs
//! every scenario with the same generator, and prints the tables that go into BENCHMARKS.md
//! (also written to `summary.md` with every round's JSON in `rounds.json`).
//!
//! Scenarios: (a) IVR calls (the stock menu plays its prompt and waits for a key; each caller
//! presses 9, which replays it) held together, N rising until a round fails; (b) call set-up
//! rate with sipp's UAC, against Patchbay and against sipp's own UAS (the signalling floor);
//! (c) AI agent calls (Patchbay's echo agent in a second process); (d) bridged calls (the
//! router flow dials the generator back) next to the same media relayed by rtpengine (the
//! media-relay floor); (e) echo calls to Patchbay's echo flow next to the same calls to
//! baresip's echo module (a conventional SIP endpoint terminating media).

use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::LoadArgs;
use crate::calls::{LoadGenerator, RoundReport};
use crate::procstat;

/// Options of the suite.
#[derive(Debug, Clone, clap::Args)]
pub struct SuiteArgs {
    /// The Patchbay binary (a release build with the `bench` feature: the agent rounds run its
    /// `echo-agent`).
    #[arg(long, default_value = "target/release/patchbay")]
    pub patchbay: PathBuf,
    /// Results directory.
    #[arg(long, default_value = "target/bench-system")]
    pub out: PathBuf,
    /// IVR rounds: concurrent calls, rising; the suite stops at the first round that fails.
    #[arg(long, value_delimiter = ',', default_value = "500,1000,1500,2000,2500,3000")]
    pub ivr_calls: Vec<usize>,
    /// Agent rounds.
    #[arg(long, value_delimiter = ',', default_value = "250,500")]
    pub agent_calls: Vec<usize>,
    /// Bridged rounds (and the same through rtpengine).
    #[arg(long, value_delimiter = ',', default_value = "250,500,1000")]
    pub bridge_calls: Vec<usize>,
    /// Set-up rates (calls per second) for sipp.
    #[arg(long, value_delimiter = ',', default_value = "250,500,1000,1500,2000")]
    pub rates: Vec<u32>,
    /// Seconds each sipp rate runs.
    #[arg(long, default_value_t = 10)]
    pub rate_seconds: u32,
    /// Seconds the IVR calls are held (the measurement window).
    #[arg(long, default_value_t = 60.0)]
    pub hold: f64,
    /// Seconds the agent and bridged calls are held.
    #[arg(long, default_value_t = 30.0)]
    pub short_hold: f64,
    /// Calls per second while ramping up.
    #[arg(long, default_value_t = 200.0)]
    pub ramp: f64,
    /// Endpoint rounds: Patchbay's echo flow next to baresip's echo module.
    #[arg(long, value_delimiter = ',', default_value = "100,250")]
    pub endpoint_calls: Vec<usize>,
    /// Only these scenarios (ivr, setup, agent, bridge, endpoint).
    #[arg(long, value_delimiter = ',', default_value = "ivr,setup,agent,bridge,endpoint")]
    pub only: Vec<String>,
}

const SIP_PORT: u16 = 15060;
const LOADGEN_SIP_PORT: u16 = 15070;
const SIPP_UAS_PORT: u16 = 15090;
const AGENT_PORT: u16 = 18766;
const NG_PORT: u16 = 12223;
const BARESIP_PORT: u16 = 15080;

/// baresip as a conventional endpoint: its `echo` module answers every call and sends the
/// caller's audio back (decoded, through an `aubridge` device per call, and encoded again),
/// like Patchbay's echo flow. Bound to loopback (`net_interface 127.0.0.1`) so that it sends RTP from
/// the address it advertises.
fn baresip_config() -> String {
    format!(
        "# Written by `patchbay-loadgen suite`.\n\
         poll_method\t\tepoll\n\
         sip_listen\t\t127.0.0.1:{BARESIP_PORT}\n\
         net_interface\t\t127.0.0.1\n\
         call_max_calls\t\t4096\n\
         audio_player\t\taubridge,echo\n\
         audio_source\t\taubridge,echo\n\
         audio_alert\t\taufile,/dev/null\n\
         rtp_ports\t\t40000-60000\n\
         module_path\t\t/usr/lib/baresip/modules\n\
         module\t\t\tg711.so\n\
         module\t\t\taccount.so\n\
         module\t\t\taufile.so\n\
         module\t\t\taubridge.so\n\
         module_app\t\techo.so\n"
    )
}

/// One set-up rate step.
#[derive(Debug, Clone, Serialize)]
struct RateStep {
    target: String,
    rate: u32,
    attempted: u64,
    succeeded: u64,
    failed: u64,
    failure_percent: f64,
    /// CPU µs per call set-up (and its 1 s of call) of the target process.
    target_cpu_us_per_call: f64,
    /// sipp UAC's CPU over the step, percent of one core.
    uac_cpu_percent: f64,
}

#[derive(Debug, Default, Serialize)]
struct Results {
    machine: String,
    date: String,
    command: String,
    ivr: Vec<RoundReport>,
    setup: Vec<RateStep>,
    agent: Vec<RoundReport>,
    bridge: Vec<RoundReport>,
    rtpengine: Vec<RoundReport>,
    endpoint: Vec<RoundReport>,
    baresip: Vec<RoundReport>,
}

/// A child process killed when dropped.
pub(crate) struct Process {
    name: &'static str,
    pub(crate) child: Child,
}

impl Process {
    pub(crate) fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let log = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log file")?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Self { name, child })
    }

    pub(crate) fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().with_context(|| format!("{} exited", self.name))
    }

    pub(crate) async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SIGTERM twice: the first starts a drain (calls up would be left to end on their
            // own), the second makes Patchbay hang up at once and flush its records.
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            // SAFETY: as above.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

fn bench_config(agent: &str) -> String {
    format!(
        r#"# Written by `patchbay-loadgen suite`: the system benchmark's Patchbay.
[sip]
listen = ["udp:127.0.0.1:{SIP_PORT}"]
# The generator and sipp each send everything from one address.
max_messages_per_source = 0
queue_depth = 65536

[flows]
max_instances = 8000
max_memory_mb = 64

[media]
rtp_timeout_secs = 60
srtp = false

[[tenant]]
id = "bench"
domains = ["127.0.0.1"]
memory_mb = 32
cpu_budget_ms = 10000

# (a) the IVR: the stock menu waits for a key after its prompt; 9 replays it.
[[tenant.flow]]
name = "ivr"
stock = "menu"
[tenant.flow.vars]
"menu.timeout-ms" = "600000"
"menu.9" = "menu:main"

# (b) set-up rate: the echo flow.
[[tenant.flow]]
name = "echo"
stock = "echo"

# (c) agent calls: Patchbay's echo agent in a second process.
[[tenant.flow]]
name = "agent"
stock = "agent"
[tenant.flow.vars]
"agent.url" = "{agent}"
"agent.fallback" = ""

# (d) bridged calls: the router dials the extension at the generator.
[[tenant.flow]]
name = "bridge"
stock = "router"
[tenant.flow.vars]
"router.default" = "sip:{{ext}}@127.0.0.1:{LOADGEN_SIP_PORT}"
"router.timeout-ms" = "10000"
"#
    )
}

/// Waits until something answers SIP OPTIONS on UDP `addr`.
async fn wait_for_sip(addr: SocketAddr, process: &mut Process) -> anyhow::Result<()> {
    let socket = StdUdpSocket::bind("127.0.0.1:0").context("probe socket")?;
    socket.set_read_timeout(Some(Duration::from_millis(200))).context("probe socket")?;
    let local = socket.local_addr().context("probe socket")?;
    let options = format!(
        "OPTIONS sip:{addr} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKprobe{}\r\nMax-Forwards: 70\r\n\
         From: <sip:probe@{local}>;tag=probe\r\nTo: <sip:{addr}>\r\nCall-ID: probe-{}@{local}\r\nCSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n",
        std::process::id(),
        std::process::id()
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(Some(status)) = process.child.try_wait() {
            bail!("{} exited ({status}) before answering SIP", process.name);
        }
        let _ = socket.send_to(options.as_bytes(), addr);
        if socket.recv_from(&mut buf).is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bail!("nothing answered SIP at {addr}")
}

fn load_args(calls: &[usize], hold: f64, ramp: f64, pids: Vec<(String, u32)>, stop_on_fail: bool) -> LoadArgs {
    LoadArgs {
        calls: calls.to_vec(),
        rate: ramp,
        hold,
        settle: 2.0,
        pids,
        stop_on_fail,
        json: None,
        rtp_bind: SocketAddr::from(([127, 0, 0, 1], 0)),
    }
}

/// Runs the suite.
pub async fn run(args: SuiteArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let out = std::fs::canonicalize(&args.out).context("results directory")?;
    let patchbay_bin = std::fs::canonicalize(&args.patchbay).with_context(|| {
        format!("{} (build it: cargo build --release -p patchbay --features bench)", args.patchbay.display())
    })?;
    let only = |s: &str| args.only.iter().any(|o| o == s);
    // The agent, endpoint and bridged rounds: held `short_hold`, measuring `pids`.
    let short_load =
        |calls: &[usize], pids: Vec<(String, u32)>| load_args(calls, args.short_hold, args.ramp, pids, false);
    let mut results = Results {
        machine: machine(),
        date: date_utc(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        ..Results::default()
    };
    let agent_url = format!("ws://127.0.0.1:{AGENT_PORT}/agent");
    let config = out.join("bench.toml");
    std::fs::write(&config, bench_config(&agent_url)).context("writing bench.toml")?;
    let target = SocketAddr::from(([127, 0, 0, 1], SIP_PORT));

    let mut patchbay = Process::spawn(
        "patchbay",
        Command::new(&patchbay_bin).arg("run").arg("--config").arg(&config).env("RUST_LOG", "warn"),
        &out.join("patchbay.log"),
    )?;
    wait_for_sip(target, &mut patchbay).await?;
    let patchbay_pid = patchbay.pid()?;
    let mut generator =
        LoadGenerator::new(SocketAddr::from(([127, 0, 0, 1], LOADGEN_SIP_PORT)), SocketAddr::from(([127, 0, 0, 1], 0)))
            .await?;

    if only("ivr") {
        let load = load_args(&args.ivr_calls, args.hold, args.ramp, vec![("patchbay".into(), patchbay_pid)], true);
        let keys = Some(("9".to_owned(), Duration::from_secs(10)));
        results.ivr = crate::run_rounds(&mut generator, target, "sip:ivr@127.0.0.1", keys, &load).await?;
    }
    if only("agent") {
        let agent = Process::spawn(
            "echo-agent",
            Command::new(&patchbay_bin).arg("echo-agent").arg("--listen").arg(format!("127.0.0.1:{AGENT_PORT}")),
            &out.join("echo-agent.log"),
        )?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pids = vec![("patchbay".into(), patchbay_pid), ("agent".into(), agent.pid()?)];
        let load = short_load(&args.agent_calls, pids);
        results.agent = crate::run_rounds(&mut generator, target, "sip:agent@127.0.0.1", None, &load).await?;
        agent.stop().await;
    }
    if only("endpoint") {
        let load = short_load(&args.endpoint_calls, vec![("patchbay".into(), patchbay_pid)]);
        results.endpoint = crate::run_rounds(&mut generator, target, "sip:echo@127.0.0.1", None, &load).await?;
        let dir = out.join("baresip");
        std::fs::create_dir_all(&dir).context("baresip config directory")?;
        std::fs::write(dir.join("config"), baresip_config()).context("writing the baresip config")?;
        std::fs::write(dir.join("accounts"), format!("<sip:echo@127.0.0.1:{BARESIP_PORT}>;regint=0\n"))
            .context("writing the baresip accounts")?;
        match Process::spawn("baresip", Command::new("baresip").arg("-f").arg(&dir), &out.join("baresip.log")) {
            Ok(baresip) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let load = short_load(&args.endpoint_calls, vec![("baresip".into(), baresip.pid()?)]);
                let baresip_target = SocketAddr::from(([127, 0, 0, 1], BARESIP_PORT));
                let uri = format!("sip:echo@127.0.0.1:{BARESIP_PORT}");
                results.baresip = crate::run_rounds(&mut generator, baresip_target, &uri, None, &load).await?;
                baresip.stop().await;
            }
            Err(e) => eprintln!("loadgen: baresip not run ({e:#}); apt-get install baresip"),
        }
    }
    if only("bridge") {
        let load = short_load(&args.bridge_calls, vec![("patchbay".into(), patchbay_pid)]);
        let keys = Some(("2000".to_owned(), Duration::from_secs(3)));
        results.bridge = crate::run_rounds(&mut generator, target, "sip:bridge@127.0.0.1", keys, &load).await?;
        match Process::spawn(
            "rtpengine",
            Command::new("rtpengine").args([
                "--foreground",
                "--log-stderr",
                "--table=-1",
                "--interface=127.0.0.1",
                &format!("--listen-ng=127.0.0.1:{NG_PORT}"),
                "--port-min=30000",
                "--port-max=40000",
                "--log-level=4",
            ]),
            &out.join("rtpengine.log"),
        ) {
            Ok(rtpengine) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let load = short_load(&args.bridge_calls, vec![("rtpengine".into(), rtpengine.pid()?)]);
                results.rtpengine =
                    crate::rtpengine::run_rounds(SocketAddr::from(([127, 0, 0, 1], NG_PORT)), &load).await?;
                rtpengine.stop().await;
            }
            Err(e) => eprintln!("loadgen: rtpengine not run ({e:#}); apt-get install rtpengine-daemon"),
        }
    }
    drop(generator);
    if only("setup") {
        for &rate in &args.rates {
            results
                .setup
                .push(sipp_step("patchbay", target, "echo", rate, args.rate_seconds, patchbay_pid, &out).await?);
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    }
    patchbay.stop().await;
    if only("setup") {
        let uas = Process::spawn(
            "sipp-uas",
            Command::new("sipp").args(["-sn", "uas", "-i", "127.0.0.1", "-p", &SIPP_UAS_PORT.to_string(), "-nostdin"]),
            &out.join("sipp-uas.log"),
        )?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let uas_target = SocketAddr::from(([127, 0, 0, 1], SIPP_UAS_PORT));
        for &rate in &args.rates {
            results
                .setup
                .push(sipp_step("sipp-uas", uas_target, "echo", rate, args.rate_seconds, uas.pid()?, &out).await?);
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        uas.stop().await;
    }
    let json = serde_json::to_string_pretty(&results).context("results as JSON")?;
    std::fs::write(out.join("rounds.json"), json).context("writing rounds.json")?;
    let summary = summary(&results);
    std::fs::write(out.join("summary.md"), &summary).context("writing summary.md")?;
    println!("{summary}");
    Ok(())
}

/// One sipp UAC run at `rate` calls per second for `seconds`, each call 1 s long.
async fn sipp_step(
    name: &str,
    target: SocketAddr,
    service: &str,
    rate: u32,
    seconds: u32,
    pid: u32,
    out: &Path,
) -> anyhow::Result<RateStep> {
    let total = u64::from(rate) * u64::from(seconds);
    let stat = out.join(format!("sipp-{name}-{rate}.csv"));
    let _ = std::fs::remove_file(&stat);
    let before = procstat::sample(pid);
    let mut cmd = Command::new("sipp");
    cmd.current_dir(out)
        .args(["-sn", "uac", "-s", service, "-i", "127.0.0.1", "-p", "0"])
        .arg(target.to_string())
        .args(["-r", &rate.to_string(), "-m", &total.to_string(), "-d", "1000"])
        .args(["-l", &(rate * 4).to_string(), "-timeout", &(seconds + 40).to_string(), "-nostdin"])
        .args(["-trace_stat", "-fd", "1", "-stf"])
        .arg(&stat)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    eprintln!("loadgen: sipp {total} calls at {rate}/s to {name}");
    let mut child = cmd.spawn().context("starting sipp (Debian package sip-tester)")?;
    let uac_pid = child.id();
    let mut uac_cpu = Duration::ZERO;
    let started = Instant::now();
    // sipp's own CPU, sampled until it exits.
    loop {
        if let Some(s) = uac_pid.and_then(procstat::sample) {
            uac_cpu = s.cpu;
        }
        match tokio::time::timeout(Duration::from_millis(250), child.wait()).await {
            Ok(_) => break,
            Err(_) => continue,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = procstat::sample(pid);
    let (succeeded, failed) = read_sipp_stats(&stat).unwrap_or((0, total));
    let attempted = succeeded + failed;
    let cpu = match (before, after) {
        (Some(a), Some(b)) => b.cpu.saturating_sub(a.cpu).as_secs_f64(),
        _ => 0.0,
    };
    Ok(RateStep {
        target: name.to_owned(),
        rate,
        attempted,
        succeeded,
        failed,
        failure_percent: if attempted == 0 { 100.0 } else { 100.0 * failed as f64 / attempted as f64 },
        target_cpu_us_per_call: if attempted == 0 { 0.0 } else { cpu * 1e6 / attempted as f64 },
        uac_cpu_percent: 100.0 * uac_cpu.as_secs_f64() / elapsed,
    })
}

/// Successful and failed calls from the last line of sipp's `-trace_stat` file (columns named
/// in its header line, `;`-separated).
fn read_sipp_stats(path: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next()?.split(';').collect();
    let last: Vec<&str> = lines.next_back()?.split(';').collect();
    let column = |name: &str| -> Option<u64> { last.get(header.iter().position(|h| *h == name)?)?.trim().parse().ok() };
    Some((column("SuccessfulCall(C)")?, column("FailedCall(C)")?))
}

/// Now, as `date -u` prints it (to the second).
pub(crate) fn date_utc() -> String {
    String::from_utf8_lossy(
        &std::process::Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M:%S UTC")
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default(),
    )
    .trim()
    .to_owned()
}

/// Cores, CPU model and memory of this machine.
pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned()))
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned()))
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024 / 1024);
    format!("{cores} cores ({cpu}), {mem} GiB")
}

fn process<'a>(r: &'a RoundReport, name: &str) -> Option<&'a crate::calls::ProcessFigures> {
    r.processes.iter().find(|p| p.name == name)
}

fn media_table(title: &str, rounds: &[RoundReport], names: &[&str]) -> String {
    let mut s = format!(
        "\n### {title}\n\n| calls | answered | failed | dropped | lost | silent | set-up p99 ms | arrival jitter p50/p99/max µs |"
    );
    for n in names {
        s += &format!(" {n} CPU % (kernel) | {n} µs/call-s | {n} KiB/call |");
    }
    s += " generator CPU % | pass |\n|";
    s += &" --- |".repeat(8 + 3 * names.len() + 2);
    s += "\n";
    for r in rounds {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {}/{}/{} |",
            r.calls,
            r.answered,
            r.failed.values().sum::<usize>(),
            r.dropped,
            r.packets_lost,
            r.silent_streams,
            r.setup.p99_ms,
            r.arrival_jitter.p50_us,
            r.arrival_jitter.p99_us,
            r.arrival_jitter.max_us
        );
        for n in names {
            match process(r, n) {
                Some(p) => {
                    s += &format!(
                        " {:.0} ({:.0}) | {:.0} | {:.0} |",
                        p.cpu_percent, p.system_percent, p.cpu_us_per_call_second, p.rss_kib_per_call
                    )
                }
                None => s += " – | – | – |",
            }
        }
        let gen_cpu = process(r, "loadgen").map_or(0.0, |p| p.cpu_percent);
        // A generator that dropped datagrams or ran whole periods late limits the round, not
        // the target.
        let generator_limited = r.generator_socket_drops > 0 || r.generator_late_ticks > (r.window_s * 10.0) as u64;
        let verdict = match (r.pass, generator_limited) {
            (true, _) => "yes",
            (false, true) => "**no** (generator late or dropping)",
            (false, false) => "**no**",
        };
        s += &format!(" {gen_cpu:.0} | {verdict} |\n");
    }
    s
}

fn summary(r: &Results) -> String {
    let mut s = format!("## System benchmark — {} — {}\n\n`{}`\n", r.date, r.machine, r.command);
    if !r.ivr.is_empty() {
        s += &media_table("(a) IVR calls (menu prompt, waits for a key)", &r.ivr, &["patchbay"]);
        let best = r.ivr.iter().filter(|x| x.pass).map(|x| x.calls).max().unwrap_or(0);
        s += &format!("\nLargest passing N: **{best}** (zero loss, arrival jitter p99 ≤ 2 ms).\n");
    }
    if !r.setup.is_empty() {
        s += "\n### (b) Call set-up rate (sipp UAC, 1 s calls)\n\n| target | rate/s | attempted | ok | failed | failed % | target CPU µs/call | sipp UAC CPU % |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n";
        for x in &r.setup {
            s += &format!(
                "| {} | {} | {} | {} | {} | {:.3} | {:.0} | {:.0} |\n",
                x.target,
                x.rate,
                x.attempted,
                x.succeeded,
                x.failed,
                x.failure_percent,
                x.target_cpu_us_per_call,
                x.uac_cpu_percent
            );
        }
        for x in r.setup.iter().filter(|x| x.target == "patchbay") {
            if let Some(floor) = r.setup.iter().find(|f| f.target == "sipp-uas" && f.rate == x.rate)
                && floor.target_cpu_us_per_call > 0.0
            {
                s += &format!(
                    "\nAt {}/s Patchbay spends {:.1}× the CPU per call of sipp's UAS.",
                    x.rate,
                    x.target_cpu_us_per_call / floor.target_cpu_us_per_call
                );
            }
        }
        s += "\n";
    }
    if !r.endpoint.is_empty() {
        s += &media_table("(e) Echo endpoint: Patchbay's echo flow", &r.endpoint, &["patchbay"]);
    }
    if !r.baresip.is_empty() {
        s += &media_table("(e′) The same calls to baresip's echo module", &r.baresip, &["baresip"]);
        s += &ratio_lines(&r.endpoint, &r.baresip, "baresip", "echo calls", "baresip's");
        s += "\n";
    }
    if !r.agent.is_empty() {
        s += &media_table("(c) AI agent calls (echo agent in a second process)", &r.agent, &["patchbay", "agent"]);
    }
    if !r.bridge.is_empty() {
        s += &media_table("(d) Bridged calls (router dials the generator back)", &r.bridge, &["patchbay"]);
    }
    if !r.rtpengine.is_empty() {
        s += &media_table("(d′) The same media relayed by rtpengine (userspace)", &r.rtpengine, &["rtpengine"]);
        s += &ratio_lines(&r.bridge, &r.rtpengine, "rtpengine", "bridged calls", "rtpengine's");
        s += "\n";
    }
    s
}

/// "At N <what> Patchbay spends R× <whose> CPU per call-second." for each round of `ours` with a
/// round of the same size in `theirs` (whose process is named `peer`).
fn ratio_lines(ours: &[RoundReport], theirs: &[RoundReport], peer: &str, what: &str, whose: &str) -> String {
    let mut s = String::new();
    for round in ours {
        let floor = theirs.iter().find(|x| x.calls == round.calls);
        if let (Some(p), Some(f)) = (process(round, "patchbay"), floor.and_then(|f| process(f, peer)))
            && f.cpu_us_per_call_second > 0.0
        {
            s += &format!(
                "\nAt {} {what} Patchbay spends {:.2}× {whose} CPU per call-second.",
                round.calls,
                p.cpu_us_per_call_second / f.cpu_us_per_call_second
            );
        }
    }
    s
}
