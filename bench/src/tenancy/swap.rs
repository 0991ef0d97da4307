//! `patchbay-loadgen swap`: how long a hot swap takes, from a component renamed into a tenant's
//! `flows_dir` to the API reporting it as the version new calls get.
//!
//! One tenant (`bench`, domain 127.0.0.1) whose `flows_dir` holds the flow `swapped` (by default
//! the stock echo component; `--component` takes another, e.g. `ivr_menu.wasm`), its own empty
//! compile cache, and two phases of `--swaps` swaps each:
//!
//! - **cold**: every swap writes a build never seen before (the component with a different
//!   custom section appended), so each is a cache miss: Cranelift compiles it;
//! - **warm**: two builds alternate (A, the one loaded at start, and B, swapped in once before
//!   the phase), so each swap finds its compiled code in the on-disk cache.
//!
//! Each swap writes `.swapped.wasm.tmp` and renames it to `swapped.wasm` (what
//! `docs/hot-swap.md` tells deploy jobs to do); the clock starts just before the rename and
//! stops when a `GET /v1/tenants/bench/flows` (polled every `--poll-ms` on a keep-alive
//! connection) first answers with the new version: an upper bound, at most one poll interval
//! plus one request late. Between swaps the benchmark waits `--gap-ms` after the new version is
//! seen, longer than the watcher's 100 ms debounce, so that no two swaps merge. The compile time
//! is read from Patchbay's own `flow swapped … ms=N` line of each swap; the rest of the swap
//! time is the debounce, the file event, reading and hashing the file, and the polling.
//!
//! With `--call-rate` > 0, sipp places short calls to the flow all along, and the CDRs are
//! checked afterwards: every call ran one of the builds written, none that started after the
//! API showed a version ran an older one, and for each swap the first call on the new version
//! is reported (from the CDR's `start`, milliseconds, wall clock).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use serde::Serialize;

use super::{ApiClient, LogTail, Machine, Patchbay, Sipp, another_build, install, sha256_hex, show, wall_ms};
use crate::procstat;
use crate::stats::MsSummary;

/// The tenant every swap benchmark configures.
pub const TENANT: &str = "bench";
/// Its API token.
pub const TOKEN: &str = "bench-token";
/// The flow swapped (sipp calls `sip:swapped@127.0.0.1`).
pub const FLOW: &str = "swapped";

/// Options of `swap`.
#[derive(Debug, Clone, clap::Args)]
pub struct SwapArgs {
    /// The Patchbay binary (a release build).
    #[arg(long, default_value = "target/release/patchbay")]
    pub patchbay: PathBuf,
    /// The component swapped (other builds of it are made by appending a custom section).
    #[arg(long, default_value = "target/wasm-flows/wasm32-wasip2/release/echo.wasm")]
    pub component: PathBuf,
    /// Swaps per phase (cold, then warm).
    #[arg(long, default_value_t = 50)]
    pub swaps: usize,
    /// Interval of the API polls after a rename, ms.
    #[arg(long, default_value_t = 5)]
    pub poll_ms: u64,
    /// Quiet time after a swap is seen before the next rename, ms (more than the watcher's
    /// 100 ms debounce).
    #[arg(long, default_value_t = 300)]
    pub gap_ms: u64,
    /// Calls per second sipp places to the flow during the swaps (0: none).
    #[arg(long, default_value_t = 20)]
    pub call_rate: u32,
    /// Length of each of those calls, ms.
    #[arg(long, default_value_t = 200)]
    pub call_ms: u32,
    /// `RUST_LOG` for Patchbay; the `flow swapped` lines need `info` for `patchbay::deploy`.
    #[arg(long, default_value = "info")]
    pub patchbay_log: String,
    /// Results directory (configuration, flows_dir, cache, logs, swaps.json).
    #[arg(long, default_value = "target/bench-swap")]
    pub out: PathBuf,
}

impl SwapArgs {
    fn command_line(&self) -> String {
        format!(
            "target/release/patchbay-loadgen swap --patchbay {} --component {} --swaps {} --poll-ms {} --gap-ms {} \
             --call-rate {} --call-ms {} --patchbay-log {} --out {}",
            self.patchbay.display(),
            self.component.display(),
            self.swaps,
            self.poll_ms,
            self.gap_ms,
            self.call_rate,
            self.call_ms,
            self.patchbay_log,
            self.out.display()
        )
    }
}

/// One swap as measured.
#[derive(Debug, Clone, Serialize)]
pub struct SwapSample {
    /// `cold`, `warm`, or `prime` (B's first swap before the warm phase, not counted).
    pub phase: &'static str,
    /// The version written.
    pub version: String,
    /// Wall clock of the rename, ms since the epoch.
    pub renamed_ms: i64,
    /// Rename → first API answer with the new version, ms (`None`: not seen within 10 s).
    pub seen_after_ms: Option<f64>,
    /// Wall clock of that answer.
    pub seen_ms: Option<i64>,
    /// Polls it took.
    pub polls: u32,
    /// Patchbay's `flow swapped … ms=` for it.
    pub compile_ms: Option<u64>,
    /// Rename → the first call (CDR `start`) that ran the new version, ms.
    pub first_call_ms: Option<i64>,
}

/// The configuration of one tenant whose `flows_dir` is `dir/flows`, with its own cache.
pub fn one_tenant_config(sip_port: u16, api_port: u16, dir: &Path) -> String {
    format!(
        r#"# Written by patchbay-loadgen (swap / soak).
[sip]
listen = ["udp:127.0.0.1:{sip_port}"]

[api]
listen = "127.0.0.1:{api_port}"
admin_token = "bench-admin-token"

[flows]
cache_dir = "{cache}"

[media]
rtp_timeout_secs = 0

[cdr]
path = "{cdr}"

[[tenant]]
id = "{TENANT}"
domains = ["127.0.0.1"]
api_token = "{TOKEN}"
flows_dir = "{flows}"
"#,
        cache = dir.join("cache").display(),
        cdr = dir.join("cdr.jsonl").display(),
        flows = dir.join("flows").display(),
    )
}

/// Writes the flows directory (holding `first` as the flow), clears the cache, the CDRs and
/// the log of a previous run, writes the configuration. Returns (SIP address, API address,
/// config path).
pub fn prepare(out: &Path, first: &[u8]) -> anyhow::Result<(SocketAddr, SocketAddr, PathBuf)> {
    for stale in ["flows", "cache", "sipp"] {
        let _ = std::fs::remove_dir_all(out.join(stale));
    }
    let _ = std::fs::remove_file(out.join("cdr.jsonl"));
    std::fs::create_dir_all(out.join("flows")).context("creating the flows_dir")?;
    std::fs::write(out.join("flows").join(format!("{FLOW}.wasm")), first).context("writing the first build")?;
    let (sip_port, api_port) = (super::free_udp_port()?, super::free_tcp_port()?);
    let config = out.join("patchbay.toml");
    std::fs::write(&config, one_tenant_config(sip_port, api_port, out)).context("writing patchbay.toml")?;
    Ok((SocketAddr::from(([127, 0, 0, 1], sip_port)), SocketAddr::from(([127, 0, 0, 1], api_port)), config))
}

/// sipp's built-in UAC calling the flow at `rate` per second, each call `call_ms` long,
/// `total` calls.
pub fn start_calls(dir: &Path, sip: SocketAddr, rate: u32, call_ms: u32, total: u64) -> anyhow::Result<Sipp> {
    let limit = (u64::from(rate) * u64::from(call_ms) / 1000 * 4).max(50);
    let args: Vec<String> = [
        "-sn",
        "uac",
        "-s",
        FLOW,
        &sip.to_string(),
        "-i",
        "127.0.0.1",
        "-p",
        &super::free_udp_port()?.to_string(),
        "-mp",
        &super::free_udp_port()?.to_string(),
        "-r",
        &rate.to_string(),
        "-m",
        &total.to_string(),
        "-d",
        &call_ms.to_string(),
        "-l",
        &limit.to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    Sipp::start(dir, &args)
}

/// Renames `bytes` into place and polls the API until it serves `version`. Returns the
/// sample (without compile time and calls).
pub async fn swap_once(
    api: &mut ApiClient,
    flows: &Path,
    phase: &'static str,
    bytes: &[u8],
    version: &str,
    poll: Duration,
) -> anyhow::Result<SwapSample> {
    let (renamed, wall) = install(flows, FLOW, bytes)?;
    let mut sample = SwapSample {
        phase,
        version: version.to_owned(),
        renamed_ms: wall_ms(wall),
        seen_after_ms: None,
        seen_ms: None,
        polls: 0,
        compile_ms: None,
        first_call_ms: None,
    };
    let mut due = renamed;
    while renamed.elapsed() < Duration::from_secs(10) {
        due += poll;
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        sample.polls += 1;
        let (serving, _) = api.flow_version(TENANT, FLOW).await?;
        if serving.as_deref() == Some(version) {
            sample.seen_after_ms = Some(renamed.elapsed().as_secs_f64() * 1e3);
            sample.seen_ms = Some(wall_ms(SystemTime::now()));
            break;
        }
    }
    Ok(sample)
}

/// Gives each sample its `flow swapped … ms=` (matched in order by the new version's first 12
/// digits).
pub fn attach_compile_times(samples: &mut [SwapSample], log: &str) {
    let lines: Vec<_> = super::swap_lines(log).into_iter().filter(|l| l.tenant == TENANT && l.flow == FLOW).collect();
    let mut next = 0;
    for sample in samples.iter_mut() {
        if let Some(at) = lines[next..].iter().position(|l| sample.version.starts_with(&l.new)) {
            sample.compile_ms = Some(lines[next + at].ms);
            next += at + 1;
        }
    }
}

/// What the CDRs say about the swaps (`samples` in time order; `first` is the version serving
/// before the first of them).
#[derive(Debug, Default, Serialize)]
pub struct CallCheck {
    /// CDRs read.
    pub cdrs: usize,
    /// Calls per version (first 12 digits).
    pub per_version: BTreeMap<String, usize>,
    /// Calls whose version is none of the builds written.
    pub unknown_version: usize,
    /// Calls that did not end with the caller's BYE, by end cause.
    pub other_endings: BTreeMap<String, usize>,
    /// Calls that started after the API showed a version (1 ms later or more) yet ran another
    /// one: a swap not atomic for new calls.
    pub stale: usize,
}

/// Checks the CDRs against the swaps and fills each sample's `first_call_ms`.
pub fn check_calls(cdrs: &[serde_json::Value], first: &str, samples: &mut [SwapSample]) -> CallCheck {
    let mut check = CallCheck { cdrs: cdrs.len(), ..CallCheck::default() };
    let mut known: HashMap<&str, ()> = samples.iter().map(|s| (s.version.as_str(), ())).collect();
    known.insert(first, ());
    let mut calls: Vec<(i64, String)> = Vec::new();
    for cdr in cdrs {
        let version = cdr["flow_version"].as_str().unwrap_or_default().to_owned();
        *check.per_version.entry(super::short(&version).to_owned()).or_default() += 1;
        if !known.contains_key(version.as_str()) {
            check.unknown_version += 1;
        }
        let cause = cdr["end_cause"].as_str().unwrap_or("?");
        if cause != "caller-hangup" {
            *check.other_endings.entry(cause.to_owned()).or_default() += 1;
        }
        if let Some(start) = cdr["start"].as_str().and_then(super::epoch_ms) {
            calls.push((start, version));
        }
    }
    calls.sort();
    for i in 0..samples.len() {
        let from = samples[i].renamed_ms;
        let until = samples.get(i + 1).map_or(i64::MAX, |s| s.renamed_ms);
        let version = samples[i].version.clone();
        let in_window = calls.iter().filter(|(t, _)| *t >= from && *t < until);
        samples[i].first_call_ms = in_window.clone().find(|(_, v)| *v == version).map(|(t, _)| t - from);
        if let Some(seen) = samples[i].seen_ms {
            // CDR times are whole milliseconds: a call in the same millisecond as the answer
            // may have been routed just before it.
            check.stale += in_window.filter(|(t, v)| *t > seen && *v != version).count();
        }
    }
    check
}

/// Percentiles of one phase's figures.
#[derive(Debug, Default, Serialize)]
pub struct PhaseSummary {
    /// `cold` or `warm`.
    pub phase: String,
    /// Swaps made.
    pub swaps: usize,
    /// Swaps the API never showed within 10 s.
    pub not_seen: usize,
    /// Rename → API shows the new version.
    pub rename_to_api: MsSummary,
    /// Patchbay's compile (or cache load) and link time.
    pub compile: MsSummary,
    /// The rest: debounce, file event, read and hash, polling.
    pub rest: MsSummary,
    /// Rename → first call on the new version (with calls).
    pub first_call: MsSummary,
}

/// Summarises the samples of `phase`.
pub fn summarise(phase: &str, samples: &[SwapSample]) -> PhaseSummary {
    let of = samples.iter().filter(|s| s.phase == phase);
    let mut seen: Vec<f64> = of.clone().filter_map(|s| s.seen_after_ms).collect();
    let mut compile: Vec<f64> = of.clone().filter_map(|s| s.compile_ms.map(|m| m as f64)).collect();
    let mut rest: Vec<f64> = of.clone().filter_map(|s| Some(s.seen_after_ms? - s.compile_ms? as f64)).collect();
    let mut first_call: Vec<f64> = of.clone().filter_map(|s| s.first_call_ms.map(|m| m as f64)).collect();
    PhaseSummary {
        phase: phase.to_owned(),
        swaps: of.clone().count(),
        not_seen: of.filter(|s| s.seen_after_ms.is_none()).count(),
        rename_to_api: MsSummary::of(&mut seen),
        compile: MsSummary::of(&mut compile),
        rest: MsSummary::of(&mut rest),
        first_call: MsSummary::of(&mut first_call),
    }
}

fn print_sample(i: usize, s: &SwapSample) {
    let opt = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.1}"));
    println!(
        "  {:<5} {:>3}  {}  rename→API {:>7} ms  compile {:>4} ms  polls {:>3}  first call {:>5} ms",
        s.phase,
        i,
        super::short(&s.version),
        opt(s.seen_after_ms),
        s.compile_ms.map_or("—".into(), |m| m.to_string()),
        s.polls,
        s.first_call_ms.map_or("—".into(), |m| m.to_string()),
    );
}

/// Runs both phases against one Patchbay.
pub async fn run(args: SwapArgs) -> anyhow::Result<()> {
    if args.swaps == 0 {
        bail!("--swaps must be at least 1");
    }
    let out = super::results_dir(&args.out)?;
    let bin = super::patchbay_binary(&args.patchbay)?;
    let build_a = super::read_component(&args.component)?;
    super::print_header(&args.command_line(), &bin);
    println!("component: {} ({} bytes)", args.component.display(), build_a.len());

    let nonce = wall_ms(SystemTime::now());
    let build_b = another_build(&build_a, &format!("warm-b-{nonce}"));
    let (version_a, version_b) = (sha256_hex(&build_a)?, sha256_hex(&build_b)?);
    let mut cold = Vec::with_capacity(args.swaps);
    for i in 0..args.swaps {
        let bytes = another_build(&build_a, &format!("cold-{nonce}-{i}"));
        let version = sha256_hex(&bytes)?;
        cold.push((bytes, version));
    }

    let (sip, api_addr, config) = prepare(&out, &build_a)?;
    let machine = Machine::now();
    let patchbay =
        Patchbay::start(&bin, &config, &out.join("patchbay.log"), &args.patchbay_log, Duration::from_secs(120)).await?;
    println!("patchbay ready after {:.0} ms (SIP {sip}, API {api_addr})", patchbay.startup.as_secs_f64() * 1e3);
    let mut api = ApiClient::new(api_addr, TOKEN);
    api.wait_ready(Duration::from_secs(10)).await?;
    let serving = api.flow_version(TENANT, FLOW).await?.0;
    if serving.as_deref() != Some(version_a.as_str()) {
        bail!("the flow serves {serving:?}, expected build A {version_a}");
    }
    let mut log = LogTail::at_end(&patchbay.log);
    let rss_before = procstat::sample(patchbay.pid);

    // Enough calls for the whole run; sipp is told to finish once the swaps are done.
    let expected_secs = 2 * args.swaps as u64 * (args.gap_ms + 400) / 1000 + 60;
    let sipp = if args.call_rate > 0 {
        let sipp = start_calls(
            &out.join("sipp"),
            sip,
            args.call_rate,
            args.call_ms,
            u64::from(args.call_rate) * expected_secs,
        )?;
        // Let the calls get going before the first swap.
        tokio::time::sleep(Duration::from_secs(1)).await;
        Some(sipp)
    } else {
        None
    };

    let (flows, poll, gap) =
        (out.join("flows"), Duration::from_millis(args.poll_ms), Duration::from_millis(args.gap_ms));
    let mut samples: Vec<SwapSample> = Vec::new();
    println!();
    println!("swaps (rename → first API answer with the new version; compile = Patchbay's `flow swapped … ms=`):");
    for (bytes, version) in &cold {
        samples.push(swap_once(&mut api, &flows, "cold", bytes, version, poll).await?);
        tokio::time::sleep(gap).await;
    }
    samples.push(swap_once(&mut api, &flows, "prime", &build_b, &version_b, poll).await?);
    tokio::time::sleep(gap).await;
    for i in 0..args.swaps {
        let (bytes, version) = if i % 2 == 0 { (&build_a, &version_a) } else { (&build_b, &version_b) };
        samples.push(swap_once(&mut api, &flows, "warm", bytes, version, poll).await?);
        tokio::time::sleep(gap).await;
    }
    let rss_after = procstat::sample(patchbay.pid);
    let steal = machine.describe();

    let mut check = None;
    let mut sipp_summary = String::new();
    if let Some(sipp) = sipp {
        sipp.finish_soon();
        let stat = sipp.stat.clone();
        let dir = sipp.dir.clone();
        let code = sipp.wait(Duration::from_secs(30)).await;
        let counters = super::sipp_counters(&stat).unwrap_or_default();
        let (ok, failed) = (super::counter(&counters, "SuccessfulCall(C)"), super::counter(&counters, "FailedCall(C)"));
        let failures = super::sipp_failures(&counters);
        sipp_summary = format!(
            "sipp: {ok} calls completed, {failed} failed{} (exit {})",
            if failures.is_empty() { String::new() } else { format!(" ({})", failures.join(", ")) },
            code.map_or("killed".into(), |c| c.to_string())
        );
        if failed > 0 {
            sipp_summary.push_str(&format!("\n  sipp's errors, last lines:\n{}", super::sipp_errors(&dir, 10)));
        }
        let cdrs = super::wait_for_cdrs(&out.join("cdr.jsonl"), (ok + failed) as usize, Duration::from_secs(20)).await;
        check = Some(check_calls(&cdrs, &version_a, &mut samples));
    }
    attach_compile_times(&mut samples, &log.read_new());
    let refused = std::fs::read_to_string(&patchbay.log).unwrap_or_default().matches("flow refused").count();
    patchbay.stop().await;

    for (i, s) in samples.iter().enumerate() {
        let index = match s.phase {
            "cold" => i,
            "prime" => 0,
            _ => i - args.swaps - 1,
        };
        print_sample(index, s);
    }
    let phases = [summarise("cold", &samples), summarise("warm", &samples)];
    println!();
    for p in &phases {
        println!("{} ({} swaps, {} not seen within 10 s):", p.phase, p.swaps, p.not_seen);
        println!("  rename → API shows it: {}", show(&p.rename_to_api));
        println!("  compile + link (log):  {}", show(&p.compile));
        println!("  the rest (debounce, event, read, poll): {}", show(&p.rest));
        if p.first_call.count > 0 {
            println!(
                "  rename → first call on it (CDR start, ms resolution, a call every {} ms): {}",
                1000 / args.call_rate.max(1),
                show(&p.first_call)
            );
        }
    }
    if let Some(check) = &check {
        println!(
            "calls: {} CDRs; per version: {} distinct; unknown version: {}; not ended by the caller: {:?}; \
             started after the API showed a version but ran an older one: {}",
            check.cdrs,
            check.per_version.len(),
            check.unknown_version,
            check.other_endings,
            check.stale
        );
        println!("{sipp_summary}");
    }
    println!("flow refused lines in Patchbay's log: {refused}");
    if let (Some(a), Some(b)) = (rss_before, rss_after) {
        println!(
            "patchbay RSS: {:.1} MiB before the swaps, {:.1} MiB after ({:+.1} MiB over {} swaps); CPU in between {:.1} s",
            a.rss_kib as f64 / 1024.0,
            b.rss_kib as f64 / 1024.0,
            (b.rss_kib as f64 - a.rss_kib as f64) / 1024.0,
            samples.len(),
            b.cpu.saturating_sub(a.cpu).as_secs_f64()
        );
    }
    println!("machine during the run: {steal}; load average after: {}", super::load_average());
    let cold_p99 = phases[0].rename_to_api.p99_ms;
    let warm_compile_p99 = phases[1].compile.p99_ms;
    println!(
        "targets: rename → serving p99 ≤ 500 ms (cold): {} ({cold_p99:.1} ms); cache hit compile+link ≤ 50 ms (warm p99): {} \
         ({warm_compile_p99:.1} ms)",
        if cold_p99 <= 500.0 { "met" } else { "missed" },
        if warm_compile_p99 <= 50.0 { "met" } else { "missed" },
    );
    let json = serde_json::json!({ "samples": samples, "phases": phases, "calls": check });
    std::fs::write(out.join("swaps.json"), serde_json::to_string_pretty(&json)?).context("writing swaps.json")?;
    // The cold builds' compiled code (about 3× the component each) is of no further use.
    let _ = std::fs::remove_dir_all(out.join("cache"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(phase: &'static str, version: &str, renamed_ms: i64, seen_ms: i64) -> SwapSample {
        SwapSample {
            phase,
            version: version.into(),
            renamed_ms,
            seen_after_ms: Some((seen_ms - renamed_ms) as f64),
            seen_ms: Some(seen_ms),
            polls: 1,
            compile_ms: None,
            first_call_ms: None,
        }
    }

    fn cdr(start: &str, version: &str) -> serde_json::Value {
        serde_json::json!({ "start": start, "flow_version": version, "end_cause": "caller-hangup" })
    }

    #[test]
    fn calls_are_checked_against_the_swap_they_fall_in() {
        let mut samples = vec![sample("warm", "bbbb", 1_000, 1_150), sample("warm", "aaaa", 2_000, 2_120)];
        let t = |ms: i64| format!("1970-01-01T00:00:{:02}.{:03}Z", ms / 1000, ms % 1000);
        let cdrs = vec![
            cdr(&t(900), "aaaa"),
            cdr(&t(1_100), "aaaa"), // before the API showed bbbb: either is right
            cdr(&t(1_120), "bbbb"), // the first call on bbbb, 120 ms after its rename
            cdr(&t(1_500), "aaaa"), // after bbbb was seen: stale
            cdr(&t(2_200), "aaaa"),
            cdr(&t(2_300), "cccc"), // no build of ours
        ];
        let check = check_calls(&cdrs, "aaaa", &mut samples);
        assert_eq!(check.cdrs, 6);
        assert_eq!(check.unknown_version, 1);
        assert_eq!(check.stale, 2, "the 1.5 s call on aaaa and the 2.3 s call on cccc");
        assert_eq!(samples[0].first_call_ms, Some(120));
        assert_eq!(samples[1].first_call_ms, Some(200));
    }

    #[test]
    fn compile_times_follow_the_versions_in_order() {
        let mut samples = vec![sample("cold", "111111111111ff", 0, 1), sample("cold", "222222222222ff", 2, 3)];
        let log = "INFO flow swapped tenant=\"bench\" flow=\"swapped\" old=\"x\" new=\"111111111111\" ms=40\n\
                   INFO flow swapped tenant=\"other\" flow=\"swapped\" old=\"x\" new=\"222222222222\" ms=1\n\
                   INFO flow swapped tenant=\"bench\" flow=\"swapped\" old=\"x\" new=\"222222222222\" ms=35\n";
        attach_compile_times(&mut samples, log);
        assert_eq!(samples.iter().map(|s| s.compile_ms).collect::<Vec<_>>(), [Some(40), Some(35)]);
    }
}
