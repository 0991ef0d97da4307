//! `patchbay-loadgen setup-rate`: call set-ups per second when the calls go to one tenant and
//! when they are spread over many.
//!
//! For each `--rates` value and each `--tenants` count, a fresh Patchbay is configured with that
//! many tenants (`tN`, domain `tN.bench.test`, each with the stock `echo` flow) and sipp places
//! `rate × --seconds` calls at that rate, each `--call-ms` long, from a scenario that is sipp's
//! built-in UAC with the request-URI host (and `To`) taken from an injection file: the tenants'
//! domains in turn (`SEQUENTIAL`), so with 100 tenants call *n* goes to tenant *n* mod 100.
//! The request-URI host picks the tenant; Patchbay never resolves it (sipp sends everything to
//! Patchbay's address).
//!
//! With `--scrape-ms N` (a list; 0 = none) Patchbay also serves its control API and a task in
//! the load generator fetches `GET /metrics` every N ms through the run, as Prometheus would:
//! `--scrape-ms 0,1000` measures what a 1-second scrape costs (docs/operations.md, "Metrics").
//!
//! Reported per run: calls completed and failed (sipp's counters), the rate achieved (calls
//! over the span from the first INVITE to the last), INVITE → 200 OK as sipp measures it
//! (`-trace_rtt`, whole milliseconds) and, when `dumpcap` is installed, as the loopback
//! interface saw it (kernel timestamps of the INVITE towards Patchbay and of its 200 OK, per
//! Call-ID, microseconds), Patchbay's CPU per call, steal time and what else ran.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::process::Command;

use super::{Machine, Patchbay, Sipp, show};
use crate::procstat;
use crate::stats::MsSummary;

/// Options of `setup-rate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SetupRateArgs {
    /// The Patchbay binary (a release build).
    #[arg(long, default_value = "target/release/patchbay")]
    pub patchbay: PathBuf,
    /// Tenant counts: each run configures this many tenants and spreads its calls over all.
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    pub tenants: Vec<usize>,
    /// Calls per second.
    #[arg(long, value_delimiter = ',', default_value = "200,400")]
    pub rates: Vec<u32>,
    /// Seconds of calls per run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u32,
    /// Length of each call, ms (sipp's `-d`).
    #[arg(long, default_value_t = 1000)]
    pub call_ms: u32,
    /// Capture the SIP port with dumpcap for microsecond INVITE → 200 times.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub capture: bool,
    /// `RUST_LOG` for Patchbay.
    #[arg(long, default_value = "warn")]
    pub patchbay_log: String,
    /// Scrape `GET /metrics` every this many ms during each run (a list; 0: no scrape).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub scrape_ms: Vec<u64>,
    /// Runs of each combination (they alternate, so drift hits each alike).
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Results directory.
    #[arg(long, default_value = "target/bench-setup-rate")]
    pub out: PathBuf,
}

impl SetupRateArgs {
    fn command_line(&self) -> String {
        let list = |v: Vec<String>| v.join(",");
        format!(
            "target/release/patchbay-loadgen setup-rate --patchbay {} --tenants {} --rates {} --seconds {} --call-ms {} \
             --capture {} --patchbay-log {} --scrape-ms {} --rounds {} --out {}",
            self.patchbay.display(),
            list(self.tenants.iter().map(ToString::to_string).collect()),
            list(self.rates.iter().map(ToString::to_string).collect()),
            self.seconds,
            self.call_ms,
            self.capture,
            self.patchbay_log,
            list(self.scrape_ms.iter().map(ToString::to_string).collect()),
            self.rounds,
            self.out.display()
        )
    }
}

/// One run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RateRun {
    /// Tenants configured and called.
    pub tenants: usize,
    /// Calls per second asked of sipp.
    pub rate: u32,
    /// `GET /metrics` every this many ms (0: none).
    pub scrape_ms: u64,
    /// Scrapes answered, and the largest exposition's size in bytes.
    pub scrapes: u64,
    pub scrape_bytes: usize,
    /// Calls placed.
    pub calls: u64,
    /// sipp: completed.
    pub succeeded: u64,
    /// sipp: failed.
    pub failed: u64,
    /// Non-zero failure counters.
    pub failures: Vec<String>,
    /// sipp's retransmissions.
    pub retransmissions: u64,
    /// (calls − 1) ÷ (last INVITE − first INVITE), from the capture (else from sipp's rtt file).
    pub achieved_cps: f64,
    /// INVITE → 200 as sipp measured it (ms resolution).
    pub sipp_rtt: MsSummary,
    /// INVITE → 200 on the wire (µs resolution), when captured.
    pub wire: Option<MsSummary>,
    /// Patchbay CPU over the run, percent of a core.
    pub patchbay_cpu_percent: f64,
    /// Patchbay CPU per call, µs.
    pub patchbay_cpu_us_per_call: f64,
    /// Patchbay's RSS after the run, MiB.
    pub patchbay_rss_mib: f64,
    /// Steal time over the run.
    pub steal_percent: Option<f64>,
    /// All processes' busy time, percent of one core.
    pub busy_percent: Option<f64>,
}

/// sipp's built-in UAC with `[field0]` (the tenant's domain) as the request-URI host.
const SCENARIO: &str = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<!-- sipp's built-in uac, the request-URI host and To from the injection file (field0). -->
<scenario name="uac to a tenant's echo">
  <send retrans="500">
    <![CDATA[

      INVITE sip:echo@[field0] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:echo@[field0]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Subject: Performance Test
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000

    ]]>
  </send>
  <recv response="100" optional="true"></recv>
  <recv response="180" optional="true"></recv>
  <recv response="183" optional="true"></recv>
  <recv response="200" rtd="true"></recv>
  <send>
    <![CDATA[

      ACK sip:echo@[field0] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:echo@[field0]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <pause/>
  <send retrans="500">
    <![CDATA[

      BYE sip:echo@[field0] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:echo@[field0]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true"></recv>
  <ResponseTimeRepartition value="1, 2, 5, 10, 20, 50, 100, 200"/>
  <CallLengthRepartition value="10, 50, 100, 500, 1000, 5000, 10000"/>
</scenario>
"#;

fn config_text(tenants: usize, sip_port: u16, cache: &Path, api: Option<u16>) -> String {
    let mut text = format!(
        "# Written by patchbay-loadgen setup-rate.\n[sip]\nlisten = [\"udp:127.0.0.1:{sip_port}\"]\n\n\
         [flows]\ncache_dir = \"{}\"\n\n[media]\nrtp_timeout_secs = 0\n",
        cache.display()
    );
    if let Some(port) = api {
        let _ = write!(text, "\n[api]\nlisten = \"127.0.0.1:{port}\"\n");
    }
    for t in 0..tenants {
        let _ = write!(
            text,
            "\n[[tenant]]\nid = \"t{t}\"\ndomains = [\"t{t}.bench.test\"]\n[[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n"
        );
    }
    text
}

fn injection(tenants: usize) -> String {
    let mut text = String::from("SEQUENTIAL\n");
    for t in 0..tenants {
        let _ = writeln!(text, "t{t}.bench.test;");
    }
    text
}

/// INVITE → 200 and the INVITEs' span from sipp's `-trace_rtt` file (`Date_ms;response_time_ms;
/// rtd_no`, both in whole ms from sipp's start).
fn read_rtt(dir: &Path) -> (MsSummary, Option<f64>) {
    let mut samples = Vec::new();
    let mut dates = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if !entry.path().to_string_lossy().ends_with("_rtt.csv") {
            continue;
        }
        for line in std::fs::read_to_string(entry.path()).unwrap_or_default().lines().skip(1) {
            let mut fields = line.split(';');
            let (Some(date), Some(rtt)) = (fields.next(), fields.next()) else { continue };
            if let (Ok(date), Ok(rtt)) = (date.trim().parse::<f64>(), rtt.trim().parse::<f64>()) {
                samples.push(rtt);
                // The INVITE went out `rtt` before the 200 arrived.
                dates.push(date - rtt);
            }
        }
    }
    let span = dates.iter().cloned().fold(f64::NAN, f64::max) - dates.iter().cloned().fold(f64::NAN, f64::min);
    let rate = (dates.len() > 1 && span > 0.0).then(|| (dates.len() - 1) as f64 / (span / 1e3));
    (MsSummary::of(&mut samples), rate)
}

/// What a capture of the SIP port says: per Call-ID, the first INVITE towards Patchbay and
/// the first 200 OK to it from Patchbay, in µs of kernel time.
#[derive(Debug, Default)]
pub struct Wire {
    invites: HashMap<String, u64>,
    oks: HashMap<String, u64>,
}

impl Wire {
    /// INVITE → 200 in ms, and the INVITEs' rate (calls − 1 over first → last).
    pub fn summary(&self) -> (MsSummary, Option<f64>) {
        let mut latency: Vec<f64> = self
            .invites
            .iter()
            .filter_map(|(id, sent)| Some(self.oks.get(id)?.saturating_sub(*sent) as f64 / 1e3))
            .collect();
        let (first, last) = (self.invites.values().min(), self.invites.values().max());
        let rate = match (first, last) {
            (Some(a), Some(b)) if b > a => Some((self.invites.len() - 1) as f64 / ((b - a) as f64 / 1e6)),
            _ => None,
        };
        (MsSummary::of(&mut latency), rate)
    }
}

/// Reads a classic pcap file (µs or ns timestamps; Ethernet, Linux cooked, null or raw IP
/// framing) of UDP SIP to and from `port`.
pub fn read_pcap(bytes: &[u8], port: u16) -> anyhow::Result<Wire> {
    let u32_at = |b: &[u8], at: usize| -> Option<u32> { Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?)) };
    let magic = u32_at(bytes, 0).context("not a pcap file")?;
    let nanos = match magic {
        0xa1b2_c3d4 => false,
        0xa1b2_3c4d => true,
        other => bail!("not a little-endian classic pcap file (magic {other:#x}); capture with dumpcap -P"),
    };
    let link = u32_at(bytes, 20).context("short pcap header")?;
    let skip = match link {
        1 => 14,   // Ethernet (Linux loopback)
        113 => 16, // Linux cooked
        276 => 20, // Linux cooked v2
        0 => 4,    // BSD loopback
        101 => 0,  // raw IP
        other => bail!("link type {other} not handled"),
    };
    let mut wire = Wire::default();
    let mut at = 24;
    while let (Some(secs), Some(frac), Some(len)) = (u32_at(bytes, at), u32_at(bytes, at + 4), u32_at(bytes, at + 8)) {
        let start = at + 16;
        let Some(packet) = bytes.get(start..start + len as usize) else { break };
        at = start + len as usize;
        let micros = u64::from(secs) * 1_000_000 + if nanos { u64::from(frac) / 1000 } else { u64::from(frac) };
        let Some(ip) = packet.get(skip..) else { continue };
        if ip.first().map(|b| b >> 4) != Some(4) || ip.get(9) != Some(&17) {
            continue;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let Some(udp) = ip.get(ihl..) else { continue };
        if udp.len() < 8 {
            continue;
        }
        let (src, dst) = (u16::from_be_bytes([udp[0], udp[1]]), u16::from_be_bytes([udp[2], udp[3]]));
        let text = String::from_utf8_lossy(&udp[8..]);
        let Some(call_id) = call_id(&text) else { continue };
        if dst == port && text.starts_with("INVITE ") {
            wire.invites.entry(call_id).or_insert(micros);
        } else if src == port && text.starts_with("SIP/2.0 200") && cseq_method(&text) == Some("INVITE") {
            wire.oks.entry(call_id).or_insert(micros);
        }
    }
    Ok(wire)
}

fn header_value<'a>(text: &'a str, long: &str, compact: &str) -> Option<&'a str> {
    text.lines().take_while(|l| !l.is_empty()).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        let name = name.trim();
        (name.eq_ignore_ascii_case(long) || name.eq_ignore_ascii_case(compact)).then(|| value.trim())
    })
}

fn call_id(text: &str) -> Option<String> {
    header_value(text, "Call-ID", "i").map(str::to_owned)
}

fn cseq_method(text: &str) -> Option<&str> {
    header_value(text, "CSeq", "CSeq")?.split_whitespace().nth(1)
}

/// dumpcap on the loopback interface, SIP port only, classic pcap.
struct Capture {
    child: tokio::process::Child,
    file: PathBuf,
}

impl Capture {
    async fn start(dir: &Path, port: u16) -> anyhow::Result<Self> {
        let file = dir.join("sip.pcap");
        let _ = std::fs::remove_file(&file);
        let child = Command::new("dumpcap")
            .args(["-i", "lo", "-f", &format!("udp port {port}"), "-P", "-q", "-w"])
            .arg(&file)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("dumpcap.stderr")).context("dumpcap's stderr")?)
            .kill_on_drop(true)
            .spawn()
            .context("starting dumpcap (Debian package wireshark-common/tshark; or pass --capture false)")?;
        // dumpcap writes the file's header once it captures.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&file).map_or(0, |m| m.len()) < 24 {
            if Instant::now() > deadline {
                bail!("dumpcap did not start capturing: {}", std::fs::read_to_string(dir.join("dumpcap.stderr"))?);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self { child, file })
    }

    async fn stop(mut self) -> anyhow::Result<Vec<u8>> {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid; SIGINT makes dumpcap flush and exit.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGINT);
            }
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
        std::fs::read(&self.file).context("reading the capture")
    }
}

/// Fetches `GET /metrics` from `port` every `every` until stopped; (answers, largest body).
async fn scrape(port: u16, every: Duration, stop: tokio::sync::watch::Receiver<bool>) -> (u64, usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut answered, mut largest) = (0, 0);
    let mut tick = tokio::time::interval(every);
    while !*stop.borrow() {
        tick.tick().await;
        let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { continue };
        let request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        let mut response = Vec::new();
        if stream.write_all(request).await.is_ok()
            && stream.read_to_end(&mut response).await.is_ok()
            && response.starts_with(b"HTTP/1.1 200")
        {
            answered += 1;
            largest = largest.max(response.len());
        }
    }
    (answered, largest)
}

async fn one_run(
    args: &SetupRateArgs,
    bin: &Path,
    out: &Path,
    (tenants, rate, scrape_ms, round): (usize, u32, u64, u32),
) -> anyhow::Result<RateRun> {
    let dir = out.join(format!("t{tenants}-r{rate}-s{scrape_ms}-{round}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).context("creating the run's directory")?;
    let sip_port = super::free_udp_port()?;
    let api = if scrape_ms > 0 { Some(super::free_tcp_port()?) } else { None };
    let config = dir.join("patchbay.toml");
    std::fs::write(&config, config_text(tenants, sip_port, &out.join("cache"), api))
        .context("writing patchbay.toml")?;
    std::fs::write(dir.join("uac_tenants.xml"), SCENARIO).context("writing the scenario")?;
    std::fs::write(dir.join("tenants.csv"), injection(tenants)).context("writing the injection file")?;
    let patchbay =
        Patchbay::start(bin, &config, &dir.join("patchbay.log"), &args.patchbay_log, Duration::from_secs(300)).await?;
    let capture = if args.capture { Some(Capture::start(&dir, sip_port).await?) } else { None };

    let calls = u64::from(rate) * u64::from(args.seconds);
    let limit = (u64::from(rate) * u64::from(args.call_ms) / 1000 * 4).max(100);
    let sipp_args: Vec<String> = vec![
        "-sf".into(),
        "uac_tenants.xml".into(),
        "-inf".into(),
        "tenants.csv".into(),
        format!("127.0.0.1:{sip_port}"),
        "-i".into(),
        "127.0.0.1".into(),
        "-p".into(),
        super::free_udp_port()?.to_string(),
        "-mp".into(),
        super::free_udp_port()?.to_string(),
        "-r".into(),
        rate.to_string(),
        "-m".into(),
        calls.to_string(),
        "-d".into(),
        args.call_ms.to_string(),
        "-l".into(),
        limit.to_string(),
        "-timeout".into(),
        format!("{}", args.seconds + 60),
        "-timeout_error".into(),
        "-trace_rtt".into(),
        "-rtt_freq".into(),
        "1".into(),
    ];
    eprintln!("loadgen: {calls} calls at {rate}/s over {tenants} tenant(s), scraping every {scrape_ms} ms (0: never)");
    let machine = Machine::now();
    let before = procstat::sample(patchbay.pid);
    let started = Instant::now();
    let (stop_scraping, stop) = tokio::sync::watch::channel(false);
    let scraper = api.map(|port| tokio::spawn(scrape(port, Duration::from_millis(scrape_ms), stop)));
    let sipp = Sipp::start(&dir, &sipp_args)?;
    let stat = sipp.stat.clone();
    sipp.wait(Duration::from_secs(u64::from(args.seconds) + 90)).await;
    let seconds = started.elapsed().as_secs_f64();
    let after = procstat::sample(patchbay.pid);
    let _ = stop_scraping.send(true);
    let (scrapes, scrape_bytes) = match scraper {
        Some(task) => task.await.unwrap_or_default(),
        None => (0, 0),
    };
    let (steal, busy) = (machine.steal_percent(), machine.busy_percent_of_a_core());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let wire = match capture {
        Some(capture) => Some(read_pcap(&capture.stop().await?, sip_port)?),
        None => None,
    };
    patchbay.stop().await;

    let counters = super::sipp_counters(&stat).unwrap_or_default();
    let (rtt, rtt_rate) = read_rtt(&dir);
    let (wire_latency, wire_rate) = wire.as_ref().map_or((None, None), |w| {
        let (l, r) = w.summary();
        (Some(l), r)
    });
    let mut run = RateRun {
        tenants,
        rate,
        scrape_ms,
        scrapes,
        scrape_bytes,
        calls,
        succeeded: super::counter(&counters, "SuccessfulCall(C)"),
        failed: super::counter(&counters, "FailedCall(C)"),
        failures: super::sipp_failures(&counters),
        retransmissions: super::counter(&counters, "Retransmissions(C)"),
        achieved_cps: wire_rate.or(rtt_rate).unwrap_or(0.0),
        sipp_rtt: rtt,
        wire: wire_latency,
        steal_percent: steal,
        busy_percent: busy,
        ..RateRun::default()
    };
    if let (Some(a), Some(b)) = (before, after) {
        let cpu = b.cpu.saturating_sub(a.cpu).as_secs_f64();
        run.patchbay_cpu_percent = 100.0 * cpu / seconds;
        run.patchbay_cpu_us_per_call = cpu * 1e6 / calls.max(1) as f64;
        run.patchbay_rss_mib = b.rss_kib as f64 / 1024.0;
    }
    print_run(&run);
    if run.failed > 0 {
        println!("    sipp's errors, last lines:\n{}", super::sipp_errors(&dir, 8));
    }
    Ok(run)
}

fn print_run(r: &RateRun) {
    println!(
        "  {} tenant(s), {} calls/s, scrape every {} ms ({} scrapes, up to {} bytes): {} calls, {} completed, {} failed{}, \
         {} retransmissions; achieved {:.1} calls/s",
        r.tenants,
        r.rate,
        r.scrape_ms,
        r.scrapes,
        r.scrape_bytes,
        r.calls,
        r.succeeded,
        r.failed,
        if r.failures.is_empty() { String::new() } else { format!(" ({})", r.failures.join(", ")) },
        r.retransmissions,
        r.achieved_cps
    );
    println!("    INVITE → 200, sipp (-trace_rtt, whole ms): {}", show(&r.sipp_rtt));
    if let Some(w) = &r.wire {
        println!("    INVITE → 200 on the wire (dumpcap, µs): {}", show(w));
    }
    println!(
        "    patchbay CPU {:.0} % of a core, {:.0} µs per call, RSS {:.1} MiB; steal {}; all CPUs busy {} of a core \
             (tick-sampled)",
        r.patchbay_cpu_percent,
        r.patchbay_cpu_us_per_call,
        r.patchbay_rss_mib,
        r.steal_percent.map_or("n/a".into(), |s| format!("{s:.1} %")),
        r.busy_percent.map_or("n/a".into(), |b| format!("{b:.0} %")),
    );
}

/// Runs every rate against every tenant count, alternating, each against a fresh Patchbay.
pub async fn run(args: SetupRateArgs) -> anyhow::Result<()> {
    if args.tenants.is_empty() || args.rates.is_empty() || args.tenants.contains(&0) || args.rates.contains(&0) {
        bail!("--tenants and --rates need positive values");
    }
    let out = super::results_dir(&args.out)?;
    let bin = super::patchbay_binary(&args.patchbay)?;
    super::print_header(&args.command_line(), &bin);
    let whole = Machine::now();
    let mut runs = Vec::new();
    for round in 1..=args.rounds.max(1) {
        for &rate in &args.rates {
            for &tenants in &args.tenants {
                for &scrape_ms in &args.scrape_ms {
                    runs.push(one_run(&args, &bin, &out, (tenants, rate, scrape_ms, round)).await?);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    println!();
    println!(
        "| tenants | rate | scrape ms | calls | completed | failed | achieved calls/s | INVITE→200 sipp p50/p99/max ms | \
         INVITE→200 wire p50/p99/max ms | patchbay CPU µs/call | steal % |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &runs {
        let wire = r.wire.map_or("—".into(), |w| format!("{:.2}/{:.2}/{:.2}", w.p50_ms, w.p99_ms, w.max_ms));
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.0}/{:.0}/{:.0} | {wire} | {:.0} | {} |",
            r.tenants,
            r.rate,
            r.scrape_ms,
            r.calls,
            r.succeeded,
            r.failed,
            r.achieved_cps,
            r.sipp_rtt.p50_ms,
            r.sipp_rtt.p99_ms,
            r.sipp_rtt.max_ms,
            r.patchbay_cpu_us_per_call,
            r.steal_percent.map_or("n/a".into(), |s| format!("{s:.1}")),
        );
    }
    println!("machine over the whole run: {}; load average after: {}", whole.describe(), super::load_average());
    std::fs::write(out.join("runs.json"), serde_json::to_string_pretty(&runs)?).context("writing runs.json")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(micros: u64, src: u16, dst: u16, payload: &str) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1];
        ip.extend_from_slice(&src.to_be_bytes());
        ip.extend_from_slice(&dst.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0]);
        ip.extend_from_slice(payload.as_bytes());
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&ip);
        let mut rec = Vec::new();
        rec.extend_from_slice(&((micros / 1_000_000) as u32).to_le_bytes());
        rec.extend_from_slice(&((micros % 1_000_000) as u32).to_le_bytes());
        rec.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        rec.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        rec.extend_from_slice(&frame);
        rec
    }

    #[test]
    fn a_capture_gives_invite_to_200_per_call() {
        let mut pcap = Vec::new();
        pcap.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        pcap.extend_from_slice(&[2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        pcap.extend_from_slice(&65535u32.to_le_bytes());
        pcap.extend_from_slice(&1u32.to_le_bytes());
        let invite =
            |id: &str| format!("INVITE sip:echo@t1.bench.test SIP/2.0\r\nCall-ID: {id}\r\nCSeq: 1 INVITE\r\n\r\n");
        let ok = |id: &str, method: &str| format!("SIP/2.0 200 OK\r\ni: {id}\r\nCSeq: 1 {method}\r\n\r\n");
        pcap.extend(record(1_000_000, 6000, 5060, &invite("a")));
        pcap.extend(record(1_000_400, 5060, 6000, "SIP/2.0 100 Trying\r\nCall-ID: a\r\nCSeq: 1 INVITE\r\n\r\n"));
        pcap.extend(record(1_000_900, 5060, 6000, &ok("a", "INVITE")));
        pcap.extend(record(1_004_000, 6000, 5060, &invite("b")));
        pcap.extend(record(1_505_000, 6000, 5060, &invite("b"))); // a retransmission
        pcap.extend(record(1_506_000, 5060, 6000, &ok("b", "INVITE")));
        pcap.extend(record(2_000_000, 5060, 6000, &ok("a", "BYE")));
        let wire = read_pcap(&pcap, 5060).expect("parses");
        let (latency, rate) = wire.summary();
        assert_eq!(latency.count, 2);
        assert!((latency.p50_ms - 0.9).abs() < 1e-9, "{latency:?}");
        assert!((latency.max_ms - 502.0).abs() < 1e-9, "{latency:?}");
        assert!((rate.expect("two INVITEs") - 250.0).abs() < 1e-6);
    }

    #[test]
    fn injection_lists_every_domain() {
        assert_eq!(injection(2), "SEQUENTIAL\nt0.bench.test;\nt1.bench.test;\n");
        let c = config_text(3, 5070, Path::new("/c"), None);
        assert_eq!(c.matches("[[tenant]]").count(), 3);
        assert!(c.contains("domains = [\"t2.bench.test\"]"));
        assert!(!c.contains("[api]"), "no API unless scraped");
        let scraped = config_text(1, 5070, Path::new("/c"), Some(8099));
        assert!(scraped.contains("[api]\nlisten = \"127.0.0.1:8099\""), "{scraped}");
    }
}
