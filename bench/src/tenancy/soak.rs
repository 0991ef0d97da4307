//! `patchbay-loadgen soak` (`cargo xtask soak`): calls without pause while the flow is swapped
//! every few seconds, for minutes: the hot-swap test of `tests/tests/tenants.rs`, longer.
//!
//! One tenant whose `flows_dir` holds the echo flow (build A); sipp's built-in UAC calls it at
//! `--rate` calls per second, each call `--call-ms` long (by default 50/s of 2 s: about 100 up
//! at once); every `--swap-every` seconds the benchmark renames the other build into place (B,
//! then A, …: the component with a custom section appended) and polls the API until it serves.
//! At the end every call must have completed (sipp: no failed call), every CDR must name build
//! A or B and end with the caller's BYE, every swap must have been served within 10 s, no
//! deploy may have been refused, and no call may still hold an old version. Patchbay's
//! resident memory is sampled at each swap, so a leak per swap or per call shows.
//!
//! Exits non-zero when any of that fails. Not part of `cargo xtask test` (CI): it runs minutes.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};

use super::swap::{FLOW, TENANT, TOKEN, attach_compile_times, prepare, start_calls, swap_once};
use super::{ApiClient, LogTail, Machine, Patchbay, another_build, sha256_hex, show, wall_ms};
use crate::procstat;
use crate::stats::MsSummary;

/// Options of `soak`.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// The Patchbay binary (a release build).
    #[arg(long, default_value = "target/release/patchbay")]
    pub patchbay: PathBuf,
    /// The component (build A; build B is it with a custom section appended).
    #[arg(long, default_value = "target/wasm-flows/wasm32-wasip2/release/echo.wasm")]
    pub component: PathBuf,
    /// How long calls run.
    #[arg(long, default_value_t = 5.0)]
    pub minutes: f64,
    /// Seconds between swaps.
    #[arg(long, default_value_t = 10.0)]
    pub swap_every: f64,
    /// New calls per second.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Length of each call, ms.
    #[arg(long, default_value_t = 2000)]
    pub call_ms: u32,
    /// `RUST_LOG` for Patchbay.
    #[arg(long, default_value = "info")]
    pub patchbay_log: String,
    /// Results directory.
    #[arg(long, default_value = "target/bench-soak")]
    pub out: PathBuf,
}

impl SoakArgs {
    fn command_line(&self) -> String {
        format!(
            "target/release/patchbay-loadgen soak --patchbay {} --component {} --minutes {} --swap-every {} --rate {} \
             --call-ms {} --patchbay-log {} --out {}",
            self.patchbay.display(),
            self.component.display(),
            self.minutes,
            self.swap_every,
            self.rate,
            self.call_ms,
            self.patchbay_log,
            self.out.display()
        )
    }
}

/// Runs the soak; `Err` when anything failed.
pub async fn run(args: SoakArgs) -> anyhow::Result<()> {
    if args.minutes <= 0.0 || args.swap_every <= 0.0 || args.rate == 0 {
        bail!("--minutes, --swap-every and --rate must be positive");
    }
    let out = super::results_dir(&args.out)?;
    let bin = super::patchbay_binary(&args.patchbay)?;
    let build_a = super::read_component(&args.component)?;
    super::print_header(&args.command_line(), &bin);
    let build_b = another_build(&build_a, &format!("soak-b-{}", wall_ms(SystemTime::now())));
    let (version_a, version_b) = (sha256_hex(&build_a)?, sha256_hex(&build_b)?);
    println!("build A {} ({} bytes), build B {}", super::short(&version_a), build_a.len(), super::short(&version_b));

    let (sip, api_addr, config) = prepare(&out, &build_a)?;
    let patchbay =
        Patchbay::start(&bin, &config, &out.join("patchbay.log"), &args.patchbay_log, Duration::from_secs(120)).await?;
    let mut api = ApiClient::new(api_addr, TOKEN);
    api.wait_ready(Duration::from_secs(10)).await?;
    let mut log = LogTail::at_end(&patchbay.log);
    let machine = Machine::now();
    let first = procstat::sample(patchbay.pid).context("patchbay's /proc entry")?;

    let seconds = args.minutes * 60.0;
    let total = (f64::from(args.rate) * seconds).round() as u64;
    let sipp = start_calls(&out.join("sipp"), sip, args.rate, args.call_ms, total)?;
    println!(
        "{total} calls at {}/s of {} ms each to sip:{FLOW}@{sip}; a swap every {} s for {} min",
        args.rate, args.call_ms, args.swap_every, args.minutes
    );
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut rss_max = first.rss_kib;
    let mut next = started + Duration::from_secs_f64(args.swap_every);
    let poll = Duration::from_millis(5);
    while next.duration_since(started).as_secs_f64() < seconds {
        tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
        next += Duration::from_secs_f64(args.swap_every);
        let to_b = samples.len() % 2 == 0;
        let (bytes, version) = if to_b { (&build_b, &version_b) } else { (&build_a, &version_a) };
        let sample = swap_once(&mut api, &out.join("flows"), "soak", bytes, version, poll).await?;
        let now = procstat::sample(patchbay.pid);
        rss_max = rss_max.max(now.map_or(0, |s| s.rss_kib));
        let counters = super::sipp_counters(&sipp.stat).unwrap_or_default();
        println!(
            "  t={:>5.0} s  swap {:>3} → {}  served after {} ms  RSS {:.1} MiB  sipp: {} ok, {} failed",
            started.elapsed().as_secs_f64(),
            samples.len() + 1,
            if to_b { "B" } else { "A" },
            sample.seen_after_ms.map_or("— (not within 10 s)".into(), |ms| format!("{ms:.0}")),
            now.map_or(0.0, |s| s.rss_kib as f64 / 1024.0),
            super::counter(&counters, "SuccessfulCall(C)"),
            super::counter(&counters, "FailedCall(C)"),
        );
        samples.push(sample);
    }
    let stat = sipp.stat.clone();
    let sipp_dir = sipp.dir.clone();
    let code = sipp.wait(Duration::from_secs_f64(seconds) + Duration::from_secs(120)).await;
    let counters = super::sipp_counters(&stat).unwrap_or_default();
    let (ok, failed) = (super::counter(&counters, "SuccessfulCall(C)"), super::counter(&counters, "FailedCall(C)"));
    let cdrs = super::wait_for_cdrs(&out.join("cdr.jsonl"), (ok + failed) as usize, Duration::from_secs(30)).await;
    let last = procstat::sample(patchbay.pid);
    let (status, listing) = api.get(&format!("/v1/tenants/{TENANT}/flows")).await?;
    attach_compile_times(&mut samples, &log.read_new());
    let steal = machine.describe();
    patchbay.stop().await;

    let mut problems = Vec::new();
    if code != Some(0) || failed > 0 || ok != total {
        let failures = super::sipp_failures(&counters);
        problems.push(format!(
            "sipp: {ok} of {total} calls completed, {failed} failed ({}), exit {}\n{}",
            failures.join(", "),
            code.map_or("killed".into(), |c| c.to_string()),
            super::sipp_errors(&sipp_dir, 10)
        ));
    }
    if cdrs.len() as u64 != ok + failed {
        problems.push(format!("{} CDRs for {} calls", cdrs.len(), ok + failed));
    }
    let (mut on_a, mut on_b) = (0usize, 0usize);
    for cdr in &cdrs {
        match cdr["flow_version"].as_str() {
            Some(v) if v == version_a => on_a += 1,
            Some(v) if v == version_b => on_b += 1,
            _ => problems.push(format!("a call ran neither build: {cdr}")),
        }
        if cdr["end_cause"] != "caller-hangup" {
            problems.push(format!("a call did not end with the caller's BYE: {cdr}"));
        }
    }
    let not_seen = samples.iter().filter(|s| s.seen_after_ms.is_none()).count();
    if not_seen > 0 {
        problems.push(format!("{not_seen} swaps were not served within 10 s"));
    }
    let echo = listing["flows"].as_array().and_then(|f| f.iter().find(|f| f["name"] == FLOW)).cloned();
    match &echo {
        Some(flow) if status == 200 => {
            if flow["failed_deploys"].as_u64() != Some(0) {
                problems.push(format!("refused deploys: {flow}"));
            }
            let live = flow["live_calls"].as_array().cloned().unwrap_or_default();
            if live.len() != 1 || live[0]["calls"] != 0 {
                problems.push(format!("versions still held after every call ended: {flow}"));
            }
        }
        _ => problems.push(format!("GET /v1/tenants/{TENANT}/flows: {status} {listing}")),
    }

    let mut served: Vec<f64> = samples.iter().filter_map(|s| s.seen_after_ms).collect();
    let mut compile: Vec<f64> = samples.iter().filter_map(|s| s.compile_ms.map(|m| m as f64)).collect();
    let (served, compile) = (MsSummary::of(&mut served), MsSummary::of(&mut compile));
    let end_rss = last.map_or(0, |s| s.rss_kib);
    println!();
    println!("soak summary ({:.1} min):", started.elapsed().as_secs_f64() / 60.0);
    println!("  calls: {ok} completed, {failed} failed, of {total}; CDRs {} ({on_a} on A, {on_b} on B)", cdrs.len());
    println!("  swaps: {} (alternating B and A), rename → served {}", samples.len(), show(&served));
    println!("  compile + link (cache hits after the first of each build): {}", show(&compile));
    println!(
        "  patchbay RSS: {:.1} MiB at the start, {:.1} MiB at the end, peak seen {:.1} MiB; CPU {:.1} s",
        first.rss_kib as f64 / 1024.0,
        end_rss as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        last.map_or(0.0, |s| s.cpu.saturating_sub(first.cpu).as_secs_f64())
    );
    println!("  machine: {steal}; load average at the end: {}", super::load_average());
    if problems.is_empty() {
        println!("soak passed");
        Ok(())
    } else {
        for p in problems.iter().take(20) {
            println!("FAIL: {p}");
        }
        bail!("soak failed ({} problems)", problems.len())
    }
}
