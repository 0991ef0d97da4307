//! `patchbay-loadgen tenants-rss`: the resident memory of many tenants with loaded flows and no
//! calls, per loaded flow.
//!
//! Each variant writes a configuration of `--tenants` `[[tenant]]` tables (domains
//! `tN.bench.test`), each with `--flows` flows, starts Patchbay twice on it (the first start
//! compiles what the cache does not hold yet, the second finds everything cached) and after
//! each start's ready line and `--settle-secs` reads `/proc/PID/status` (`VmRSS`, `RssAnon`,
//! `RssFile`, `VmHWM`) and `smaps_rollup` (`Pss`). The baseline is the same binary with one
//! tenant and one flow; the figure per flow is (VmRSS − baseline) ÷ (flows − 1).
//!
//! Variants:
//!
//! - `stock`: every tenant's flows are stock flows (`stock = "echo"`, `"menu"`, …): the same
//!   five components for all tenants. Whether identical bytes are shared is what this shows.
//! - `distinct`: five distinct builds per tenant (the stock components with a custom section
//!   naming the tenant appended), loaded from files (`path = …`): every flow its own code.
//! - `flows-dir`: the same files, each tenant's in its own `flows_dir` (watched for hot swap:
//!   one inotify watcher per tenant).
//!
//! The cache (`OUT/cache`) is emptied at the start of the run, so the first start of `stock`
//! and of `distinct` is cold; it is removed at the end (5,000 distinct builds take about 1 GB),
//! as are the generated component files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use super::{Machine, Patchbay, another_build};

/// Stock flow names (as `stock = …` takes them) and the component files the build leaves in
/// `target/wasm-flows/…`, in the order tenants get them.
const FLOWS: [(&str, &str); 6] = [
    ("echo", "echo.wasm"),
    ("menu", "ivr_menu.wasm"),
    ("voicemail", "voicemail.wasm"),
    ("router", "dtmf_router.wasm"),
    ("greet", "greet.wasm"),
    ("agent", "agent_handoff.wasm"),
];

/// Options of `tenants-rss`.
#[derive(Debug, Clone, clap::Args)]
pub struct RssArgs {
    /// The Patchbay binary (a release build).
    #[arg(long, default_value = "target/release/patchbay")]
    pub patchbay: PathBuf,
    /// Tenants.
    #[arg(long, default_value_t = 1000)]
    pub tenants: usize,
    /// Flows per tenant (1–6).
    #[arg(long, default_value_t = 5)]
    pub flows: usize,
    /// Variants, in order: stock, distinct, flows-dir.
    #[arg(long, value_delimiter = ',', default_value = "stock,distinct,flows-dir")]
    pub variants: Vec<String>,
    /// Where the stock components are (for the distinct builds).
    #[arg(long, default_value = super::COMPONENTS_DIR)]
    pub components: PathBuf,
    /// Seconds after the ready line before memory is read.
    #[arg(long, default_value_t = 5)]
    pub settle_secs: u64,
    /// Longest a start may take (a cold start of 5,000 distinct builds compiles each).
    #[arg(long, default_value_t = 1800)]
    pub timeout_secs: u64,
    /// Keep the cache and the generated components.
    #[arg(long)]
    pub keep: bool,
    /// Results directory.
    #[arg(long, default_value = "target/bench-tenants-rss")]
    pub out: PathBuf,
}

impl RssArgs {
    fn command_line(&self) -> String {
        format!(
            "target/release/patchbay-loadgen tenants-rss --patchbay {} --tenants {} --flows {} --variants {} \
             --components {} --settle-secs {} --timeout-secs {}{} --out {}",
            self.patchbay.display(),
            self.tenants,
            self.flows,
            self.variants.join(","),
            self.components.display(),
            self.settle_secs,
            self.timeout_secs,
            if self.keep { " --keep" } else { "" },
            self.out.display()
        )
    }
}

/// Memory of a process, KiB.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Memory {
    /// `VmRSS`.
    pub rss: u64,
    /// `RssAnon`: heap, anonymous mappings (compiled code deserialised from the cache is here).
    pub anon: u64,
    /// `RssFile`: file-backed pages (the binary, with the stock components in it).
    pub file: u64,
    /// `VmHWM`: the peak RSS.
    pub peak: u64,
    /// `Pss` from `smaps_rollup`.
    pub pss: u64,
    /// `Threads`.
    pub threads: u64,
}

/// Reads [`Memory`] of `pid`.
pub fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |text: &str, key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Some(Memory {
        rss: kib(&status, "VmRSS:"),
        anon: kib(&status, "RssAnon:"),
        file: kib(&status, "RssFile:"),
        peak: kib(&status, "VmHWM:"),
        pss: kib(&rollup, "Pss:"),
        threads: kib(&status, "Threads:"),
    })
}

/// One start of one variant.
#[derive(Debug, Clone, Serialize)]
pub struct Start {
    /// `baseline`, `stock`, `distinct`, `flows-dir`.
    pub variant: String,
    /// 1 or 2.
    pub start: u32,
    /// Tenants configured.
    pub tenants: usize,
    /// Flows loaded.
    pub flows: usize,
    /// Compiled at this start (cache files written).
    pub compiled: usize,
    /// Spawn → ready line, s. `None`: it did not start (see `error`).
    pub startup_s: Option<f64>,
    /// Memory after the settle time.
    pub memory: Option<Memory>,
    /// (VmRSS − baseline) ÷ (flows − 1), KiB.
    pub kib_per_flow: Option<f64>,
    /// The same from `RssAnon`.
    pub anon_kib_per_flow: Option<f64>,
    /// Why it did not start.
    pub error: Option<String>,
}

fn cache_files(cache: &Path) -> usize {
    std::fs::read_dir(cache)
        .map_or(0, |d| d.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "cwasm")).count())
}

/// The average size of the cache's compiled artifacts, KiB.
fn average_artifact_kib(cache: &Path) -> f64 {
    let sizes: Vec<u64> = std::fs::read_dir(cache)
        .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).collect())
        .unwrap_or_default();
    if sizes.is_empty() { 0.0 } else { sizes.iter().sum::<u64>() as f64 / sizes.len() as f64 / 1024.0 }
}

fn header(sip_port: u16, cache: &Path) -> String {
    format!(
        "# Written by patchbay-loadgen tenants-rss.\n[sip]\nlisten = [\"udp:127.0.0.1:{sip_port}\"]\n\n\
         [flows]\ncache_dir = \"{}\"\n",
        cache.display()
    )
}

/// The configuration of `variant` (`baseline`: one tenant, one stock flow).
fn config(variant: &str, tenants: usize, flows: usize, sip_port: u16, cache: &Path, files: &Path) -> String {
    let mut text = header(sip_port, cache);
    let tenants = if variant == "baseline" { 1 } else { tenants };
    let flows = if variant == "baseline" { 1 } else { flows };
    for t in 0..tenants {
        let _ = write!(text, "\n[[tenant]]\nid = \"t{t}\"\ndomains = [\"t{t}.bench.test\"]\n");
        if variant == "flows-dir" {
            let _ = writeln!(text, "flows_dir = \"{}\"", files.join(format!("t{t}")).display());
            continue;
        }
        for (name, _) in FLOWS.iter().take(flows) {
            match variant {
                "distinct" => {
                    let path = files.join(format!("t{t}")).join(format!("{name}.wasm"));
                    let _ = write!(text, "[[tenant.flow]]\nname = \"{name}\"\npath = \"{}\"\n", path.display());
                }
                _ => {
                    let _ = write!(text, "[[tenant.flow]]\nname = \"{name}\"\nstock = \"{name}\"\n");
                }
            }
        }
    }
    text
}

/// Writes `files/tN/NAME.wasm` for every tenant: the stock component with a custom section
/// naming the tenant.
fn write_distinct(components: &Path, files: &Path, tenants: usize, flows: usize) -> anyhow::Result<()> {
    let mut base = Vec::new();
    for (name, file) in FLOWS.iter().take(flows) {
        base.push((*name, super::read_component(&components.join(file))?));
    }
    for t in 0..tenants {
        let dir = files.join(format!("t{t}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, bytes) in &base {
            std::fs::write(dir.join(format!("{name}.wasm")), another_build(bytes, &format!("tenant-t{t}")))
                .context("writing a distinct build")?;
        }
    }
    Ok(())
}

/// Starts Patchbay on `config`, waits, reads memory, stops it.
async fn one_start(
    args: &RssArgs,
    bin: &Path,
    out: &Path,
    variant: &str,
    start: u32,
    config_text: &str,
) -> anyhow::Result<Start> {
    let cache = out.join("cache");
    let config = out.join(format!("{variant}.toml"));
    std::fs::write(&config, config_text).context("writing the configuration")?;
    let (tenants, flows) = if variant == "baseline" { (1, 1) } else { (args.tenants, args.tenants * args.flows) };
    let before = cache_files(&cache);
    let log = out.join(format!("{variant}-{start}.log"));
    eprintln!("loadgen: starting {variant} (start {start}): {tenants} tenants, {flows} flows");
    let mut result = Start {
        variant: variant.to_owned(),
        start,
        tenants,
        flows,
        compiled: 0,
        startup_s: None,
        memory: None,
        kib_per_flow: None,
        anon_kib_per_flow: None,
        error: None,
    };
    // Warnings only: at `info` Patchbay logs a line per flow loaded.
    match Patchbay::start(bin, &config, &log, "warn", Duration::from_secs(args.timeout_secs)).await {
        Ok(patchbay) => {
            result.startup_s = Some(patchbay.startup.as_secs_f64());
            tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
            result.memory = memory(patchbay.pid);
            patchbay.stop().await;
        }
        Err(e) => result.error = Some(format!("{e:#}")),
    }
    result.compiled = cache_files(&cache).saturating_sub(before);
    Ok(result)
}

fn print_start(s: &Start) {
    match (&s.memory, s.startup_s) {
        (Some(m), Some(startup)) => println!(
            "  {:<9} start {}  {:>4} tenants {:>5} flows  compiled {:>5}  ready after {:>7.2} s  VmRSS {:>9} KiB \
             (anon {}, file {}, Pss {}, peak {}, threads {})  per flow {} KiB (anon {} KiB)",
            s.variant,
            s.start,
            s.tenants,
            s.flows,
            s.compiled,
            startup,
            m.rss,
            m.anon,
            m.file,
            m.pss,
            m.peak,
            m.threads,
            s.kib_per_flow.map_or("—".into(), |k| format!("{k:.1}")),
            s.anon_kib_per_flow.map_or("—".into(), |k| format!("{k:.1}")),
        ),
        _ => println!(
            "  {:<9} start {}  {:>4} tenants {:>5} flows  did not start: {}",
            s.variant,
            s.start,
            s.tenants,
            s.flows,
            s.error.as_deref().unwrap_or("?").replace('\n', "\n      ")
        ),
    }
}

/// Runs the baseline and every variant.
pub async fn run(args: RssArgs) -> anyhow::Result<()> {
    if !(1..=FLOWS.len()).contains(&args.flows) || args.tenants == 0 {
        bail!("--flows must be 1 to {} and --tenants at least 1", FLOWS.len());
    }
    if let Some(v) = args.variants.iter().find(|v| !["stock", "distinct", "flows-dir"].contains(&v.as_str())) {
        bail!("unknown variant {v:?} (stock, distinct, flows-dir)");
    }
    let out = super::results_dir(&args.out)?;
    let bin = super::patchbay_binary(&args.patchbay)?;
    super::print_header(&args.command_line(), &bin);
    if let Ok(limit) = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances") {
        println!("fs.inotify.max_user_instances: {}", limit.trim());
    }
    let (cache, files) = (out.join("cache"), out.join("flows"));
    let _ = std::fs::remove_dir_all(&cache);
    let _ = std::fs::remove_dir_all(&files);
    let needs_files = args.variants.iter().any(|v| v != "stock");
    if needs_files {
        write_distinct(&args.components, &files, args.tenants, args.flows)?;
    }
    let machine = Machine::now();
    let sip_port = super::free_udp_port()?;

    let mut starts = Vec::new();
    // The baseline twice as well: its second start is the one compared (cache warm, as the
    // variants' second starts are).
    let baseline_text = config("baseline", args.tenants, args.flows, sip_port, &cache, &files);
    for start in 1..=2 {
        starts.push(one_start(&args, &bin, &out, "baseline", start, &baseline_text).await?);
    }
    let baseline = starts.last().and_then(|s| s.memory).context("the baseline did not start")?;
    for variant in &args.variants {
        let text = config(variant, args.tenants, args.flows, sip_port, &cache, &files);
        for start in 1..=2 {
            let mut s = one_start(&args, &bin, &out, variant, start, &text).await?;
            if let Some(m) = s.memory {
                let extra = (s.flows - 1).max(1) as f64;
                s.kib_per_flow = Some((m.rss as f64 - baseline.rss as f64) / extra);
                s.anon_kib_per_flow = Some((m.anon as f64 - baseline.anon as f64) / extra);
            }
            print_start(&s);
            starts.push(s);
        }
    }
    let steal = machine.describe();
    println!();
    println!("raw results (baseline: one tenant, one stock echo; per flow = (VmRSS − baseline) ÷ (flows − 1)):");
    for s in &starts {
        print_start(s);
    }
    println!(
        "compiled artifacts in the cache: {} files, {:.0} KiB each on average",
        cache_files(&cache),
        average_artifact_kib(&cache)
    );
    println!("machine during the run: {steal}; load average after: {}", super::load_average());
    let verdicts: Vec<String> = starts
        .iter()
        .filter(|s| s.variant != "baseline" && s.start == 2)
        .map(|s| match s.kib_per_flow {
            Some(k) => format!("{} {k:.0} KiB ({})", s.variant, if k <= 200.0 { "met" } else { "missed" }),
            None => format!("{} did not start", s.variant),
        })
        .collect();
    println!("target ≤ 200 KiB per loaded flow (second starts): {}", verdicts.join("; "));
    std::fs::write(out.join("starts.json"), serde_json::to_string_pretty(&starts)?).context("writing starts.json")?;
    if !args.keep {
        let _ = std::fs::remove_dir_all(&cache);
        let _ = std::fs::remove_dir_all(&files);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_name_every_tenant_and_flow() {
        let (cache, files) = (Path::new("/c"), Path::new("/f"));
        let stock = config("stock", 3, 5, 5070, cache, files);
        assert_eq!(stock.matches("[[tenant]]").count(), 3);
        assert_eq!(stock.matches("[[tenant.flow]]").count(), 15);
        assert!(stock.contains("domains = [\"t2.bench.test\"]") && stock.contains("stock = \"greet\""));
        let distinct = config("distinct", 2, 2, 5070, cache, files);
        assert!(distinct.contains("path = \"/f/t1/menu.wasm\""));
        let dir = config("flows-dir", 2, 5, 5070, cache, files);
        assert!(dir.contains("flows_dir = \"/f/t1\"") && !dir.contains("[[tenant.flow]]"));
        let base = config("baseline", 1000, 5, 5070, cache, files);
        assert_eq!((base.matches("[[tenant]]").count(), base.matches("[[tenant.flow]]").count()), (1, 1));
        assert!(toml_like(&stock));
    }

    /// Every line is a comment, a table header or `key = value`.
    fn toml_like(text: &str) -> bool {
        text.lines().all(|l| l.is_empty() || l.starts_with('#') || l.starts_with('[') || l.contains(" = "))
    }

    #[test]
    fn memory_of_this_process() {
        let m = memory(std::process::id()).expect("our own /proc entry");
        assert!(m.rss > 0 && m.rss >= m.anon && m.threads >= 1);
    }
}
