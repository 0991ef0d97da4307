//! `patchbay-loadgen`: Patchbay's load generator and system benchmark suite.
//!
//! - `patchbay-loadgen calls`: N concurrent SIP calls with real-rate G.711 RTP both ways (and
//!   DTMF), ramped at a rate, held together for a measurement window; reports set-up times,
//!   failures, loss and the pacing of what came back, and the CPU and memory of the processes
//!   named with `--pid`. Several `--calls` values run one round each, in order.
//! - `patchbay-loadgen relay`: the same media load through rtpengine (the floor for relaying
//!   media, see `rtpengine.rs`).
//! - `patchbay-loadgen originate`: calls placed through the control API (`POST /v1/calls`)
//!   into a carrier trunk that the benchmark itself plays; reports the originations per second
//!   the trunk achieved against its cap and the time from POST to INVITE on the wire.
//! - `patchbay-loadgen suite`: every scenario of `BENCHMARKS.md` ("System benchmark"), starting
//!   Patchbay, the peers and the generator itself.
//! - `patchbay-loadgen swap`, `tenants-rss`, `setup-rate`, `soak`: multi-tenancy and hot swap
//!   (`BENCHMARKS.md`, "Tenants and hot swap"; see `tenancy/mod.rs`).

mod calls;
mod originate;
mod procstat;
mod rtp;
mod rtpengine;
mod stats;
mod suite;
mod tenancy;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "patchbay-loadgen", about = "Load generator and system benchmarks for Patchbay")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options every load scenario shares.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Concurrent calls; a comma-separated list runs one round per value.
    #[arg(long, value_delimiter = ',', default_value = "100")]
    pub calls: Vec<usize>,
    /// New calls per second while ramping up.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Seconds all calls stay up together (the measurement window).
    #[arg(long, default_value_t = 60.0)]
    pub hold: f64,
    /// Seconds between the last answer and the start of the window.
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
    /// Processes to measure, NAME=PID (repeatable).
    #[arg(long = "pid", value_parser = parse_pid)]
    pub pids: Vec<(String, u32)>,
    /// Stop after the first round where calls failed or dropped, or more than 0.1 % of the
    /// packets were lost (a round that only misses the jitter limit does not stop the series).
    #[arg(long)]
    pub stop_on_fail: bool,
    /// Write the rounds' reports here as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// RTP socket address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub rtp_bind: SocketAddr,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Place calls at a SIP target.
    Calls {
        /// Where to send INVITEs.
        #[arg(long, default_value = "127.0.0.1:5060")]
        target: SocketAddr,
        /// Request URI.
        #[arg(long, default_value = "sip:echo@127.0.0.1")]
        uri: String,
        /// DTMF keys each caller presses (RFC 4733) ...
        #[arg(long)]
        keys: Option<String>,
        /// ... this many seconds after the answer.
        #[arg(long, default_value_t = 1.0)]
        keys_after: f64,
        /// SIP socket address (calls offered to it are answered: the far end of bridges).
        #[arg(long, default_value = "127.0.0.1:0")]
        sip_bind: SocketAddr,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Relay the same media load through rtpengine (its ng control protocol).
    Relay {
        /// rtpengine's ng control address.
        #[arg(long, default_value = "127.0.0.1:2223")]
        ng: SocketAddr,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Run every scenario and print the tables for BENCHMARKS.md.
    Suite(suite::SuiteArgs),
    /// Place calls through the control API into a carrier trunk played by the benchmark.
    Originate(originate::OriginateArgs),
    /// Hot swap latency: a component renamed into a tenant's flows_dir until the API serves it.
    Swap(tenancy::swap::SwapArgs),
    /// Resident memory of many tenants with loaded flows and no calls.
    TenantsRss(tenancy::rss::RssArgs),
    /// Call set-ups per second to one tenant and spread over many (sipp).
    SetupRate(tenancy::setup_rate::SetupRateArgs),
    /// Minutes of calls while the flow is swapped every few seconds; fails on any failed call.
    Soak(tenancy::soak::SoakArgs),
}

fn parse_pid(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or("expected NAME=PID")?;
    Ok((name.to_owned(), pid.parse().map_err(|e| format!("bad pid {pid}: {e}"))?))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Calls { target, uri, keys, keys_after, sip_bind, load } => {
                let mut generator = calls::LoadGenerator::new(sip_bind, load.rtp_bind).await?;
                let keys = keys.map(|k| (k, Duration::from_secs_f64(keys_after)));
                let reports = run_rounds(&mut generator, target, &uri, keys, &load).await?;
                write_json(&load, &reports)?;
                if reports.iter().all(|r| r.pass) { Ok(()) } else { anyhow::bail!("a round did not pass") }
            }
            Command::Relay { ng, load } => {
                let reports = rtpengine::run_rounds(ng, &load).await?;
                write_json(&load, &reports)?;
                Ok(())
            }
            Command::Suite(args) => suite::run(args).await,
            Command::Originate(args) => originate::run(args).await,
            Command::Swap(args) => tenancy::swap::run(args).await,
            Command::TenantsRss(args) => tenancy::rss::run(args).await,
            Command::SetupRate(args) => tenancy::setup_rate::run(args).await,
            Command::Soak(args) => tenancy::soak::run(args).await,
        }
    })
}

/// Runs one round per `--calls` value and prints each report.
pub async fn run_rounds(
    generator: &mut calls::LoadGenerator,
    target: SocketAddr,
    uri: &str,
    keys: Option<(String, Duration)>,
    load: &LoadArgs,
) -> anyhow::Result<Vec<calls::RoundReport>> {
    let mut reports = Vec::new();
    for &n in &load.calls {
        let round = calls::Round {
            target,
            uri: uri.to_owned(),
            calls: n,
            rate: load.rate,
            hold: Duration::from_secs_f64(load.hold),
            settle: Duration::from_secs_f64(load.settle),
            keys: keys.clone(),
            pids: load.pids.clone(),
        };
        eprintln!("loadgen: {n} calls to {uri} at {}/s, held {} s", load.rate, load.hold);
        let report = generator.run(&round).await?;
        println!("{}", serde_json::to_string(&report).context("report as JSON")?);
        let broken = !report.carried();
        reports.push(report);
        if broken && load.stop_on_fail {
            break;
        }
        // Let the target release the round's calls before the next one.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(reports)
}

fn write_json<T: serde::Serialize>(load: &LoadArgs, reports: &T) -> anyhow::Result<()> {
    if let Some(path) = &load.json {
        let text = serde_json::to_string_pretty(reports).context("reports as JSON")?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
