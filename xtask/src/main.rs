//! Project commands, run as `cargo xtask <command>` (an alias in `.cargo/config.toml`).
//!
//! - `cargo xtask run [ARGS…]`: builds and starts Patchbay with its embedded default config
//!   (extra arguments go to `patchbay run`).
//! - `cargo xtask test`: everything CI checks — formatting, clippy with warnings as errors
//!   (host crates, with the `patchbay/bench` feature, and the wasm flows), and the whole test
//!   suite, including the sipp interop tests (sipp, sox, espeak-ng and tshark are installed from
//!   Debian when missing).
//! - `cargo xtask bench`: the benchmarks whose figures go into `BENCHMARKS.md`: the micro
//!   benchmarks, the media clock and agent path (the binary's subcommands behind its `bench`
//!   feature), then the system benchmark suite
//!   (`patchbay-loadgen suite`: load generator, sipp, rtpengine), then the tenancy and hot-swap
//!   benchmarks. `cargo xtask bench system [ARGS…]` runs only the suite (arguments go to
//!   `patchbay-loadgen suite`); `cargo xtask bench tenancy` only the tenancy benchmarks
//!   (`patchbay-loadgen swap`, `tenants-rss`, `setup-rate`).
//! - `cargo xtask soak [--minutes N] [ARGS…]`: sipp calls without pause for N minutes (default 5)
//!   while the flow is hot-swapped every 10 s between two builds; fails on any failed call or a
//!   CDR naming neither build (`patchbay-loadgen soak`; arguments go to it). Not part of `test`.
//!
//! Each command first installs what it needs and can install itself (the `wasm32-wasip2`
//! target through rustup, sipp/sox/espeak-ng/tshark through apt-get), so that they work on a fresh machine with only rustup and cargo.
//! This crate has no dependencies so that it builds in seconds.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const WASM_TARGET: &str = "wasm32-wasip2";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let result = match command.as_str() {
        "run" => run(&rest),
        "test" => test(&rest),
        "bench" => bench(&rest),
        "soak" => soak(&rest),
        _ => {
            eprintln!("usage: cargo xtask <run [ARGS…] | test | bench [system | tenancy] | soak [--minutes N]>");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    // A CI run starts from a clean clone and builds everything once: the incremental caches
    // (several GB for this workspace) would only fill its disk.
    if std::env::var_os("CI").is_some() && std::env::var_os("CARGO_INCREMENTAL").is_none() {
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    cmd
}

fn step(description: &str, cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: {description}: {cmd:?}");
    let status = cmd.status().map_err(|e| format!("{description}: could not start: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{description} failed ({status})")) }
}

/// `rustup target add` is idempotent and fast when the target is there. Machines that set
/// `RUSTUP_AUTO_INSTALL=0` do not install the targets listed in `rust-toolchain.toml` on
/// their own, so this is not left to the toolchain file.
fn ensure_wasm_target() -> Result<(), String> {
    match Command::new("rustup").current_dir(root()).args(["target", "add", WASM_TARGET]).status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("`rustup target add {WASM_TARGET}` failed ({status})")),
        Err(_) => {
            eprintln!("xtask: rustup not found; assuming the {WASM_TARGET} target is installed");
            Ok(())
        }
    }
}

/// Programs the tests drive, with the Debian package that provides each: sipp for the SIP and
/// RTP interop tests, sox and espeak-ng for the G.711 conformance test (speech, and a reference
/// encoder), tshark to capture what goes over the wire, baresip (core: no sound system) for
/// SRTP against an outside implementation, SIPVicious for the scanner and password-guessing
/// test, Kamailio's dispatcher for the scale-out test.
const TEST_TOOLS: [(&str, &str, &str); 8] = [
    ("sipp", "-v", "sip-tester"),
    // TLS in front of sipp (Debian's sipp is built without TLS) for the trunk tests.
    ("socat", "-V", "socat"),
    ("sox", "--version", "sox"),
    ("espeak-ng", "--version", "espeak-ng"),
    ("tshark", "--version", "tshark"),
    ("baresip", "-h", "baresip-core"),
    ("svcrack", "--version", "sipvicious"),
    // The SIP load balancer in front of two nodes in the scale-out test.
    ("kamailio", "-v", "kamailio"),
];

/// The system benchmark's peers beyond [`TEST_TOOLS`] (sipp, and baresip as a conventional SIP
/// endpoint, are there): rtpengine, the floor for relaying media.
const BENCH_TOOLS: [(&str, &str, &str); 1] = [("rtpengine", "--version", "rtpengine-daemon")];

/// Installs the tools the tests need when they are missing and this is a Debian machine we may
/// install on (root, apt-get present).
fn ensure_test_tools() -> Result<(), String> {
    ensure_tools(&TEST_TOOLS)
}

/// Installs the Debian packages of the `(program, version flag, package)` entries whose
/// programs do not run.
fn ensure_tools(tools: &[(&str, &str, &str)]) -> Result<(), String> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(program, arg, _)| {
            Command::new(program)
                .arg(arg)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_err()
        })
        .map(|(_, _, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages {}", missing.join(" "));
    step("apt-get update", Command::new("apt-get").args(["update", "-qq"]))?;
    step(
        "apt-get install",
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
    .map_err(|e| format!("{e}: the tests need {} (apt-get install them)", missing.join(", ")))
}

fn run(args: &[String]) -> Result<(), String> {
    ensure_wasm_target()?;
    let mut cmd = cargo();
    cmd.args(["run", "--release", "--package", "patchbay", "--", "run"]).args(args);
    step("patchbay run", &mut cmd)
}

/// The benchmark subcommands of the binary (`bench-media`, `bench-agent`, `echo-agent`): not
/// in the production build, so the benchmark builds and clippy turn them on.
const BENCH_FEATURE: &str = "patchbay/bench";

fn test(args: &[String]) -> Result<(), String> {
    ensure_wasm_target()?;
    ensure_test_tools()?;
    step("formatting", cargo().args(["fmt", "--all", "--check"]))?;
    step(
        "clippy (runtime)",
        // With the benchmark subcommands, so that they do not rot; a check build of its own
        // either way, so this costs the tests below no second build of patchbay.
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--features",
            BENCH_FEATURE,
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    let plugins = root().join("plugins/Cargo.toml");
    step(
        "clippy (flows)",
        cargo()
            .args([
                "clippy",
                "--locked",
                "--target",
                WASM_TARGET,
                "--target-dir",
                "target/wasm-flows-clippy",
                "--manifest-path",
            ])
            .arg(&plugins)
            .args(["--", "-D", "warnings"]),
    )?;
    step("formatting (flows)", cargo().current_dir(root().join("plugins")).args(["fmt", "--all", "--check"]))?;
    // The end-to-end tests start the real binaries from target/debug; build them first so
    // they never have to build them while the test run is under way. Built with every test
    // target in one invocation: cargo then unifies features as `cargo test --workspace` does,
    // and the tests below reuse every dependency. (`build -p patchbay -p patchbay-bench`
    // unified them without the dev-dependencies: tokio, hyper, wasmtime and everything above
    // them were compiled twice: a clean run took 30 min and 3.13 GB of target/, now 18–19 min
    // and 2.71 GB on the 2-core CI machine.)
    step("binaries and tests", cargo().args(["build", "--workspace", "--bins", "--tests", "--locked"]))?;
    step("tests", cargo().args(["test", "--workspace", "--locked"]).args(args))
}

fn bench(args: &[String]) -> Result<(), String> {
    ensure_wasm_target()?;
    match args.first().map(String::as_str) {
        Some("system") => return system_bench(&args[1..]),
        Some("tenancy") => return tenancy_bench(),
        _ => {}
    }
    step("benchmarks", cargo().args(["bench", "--workspace", "--locked"]).args(args))?;
    // The binary's own benchmarks: pacing of the media clock and the agent path under load.
    step(
        "patchbay (release)",
        cargo().args(["build", "--release", "--package", "patchbay", "--features", BENCH_FEATURE, "--locked"]),
    )?;
    let patchbay = root().join("target/release/patchbay");
    step("media clock pacing", Command::new(&patchbay).args(["bench-media", "--calls", "2000", "--seconds", "10"]))?;
    for calls in ["100", "500"] {
        step("agent latency", Command::new(&patchbay).args(["bench-agent", "--calls", calls, "--seconds", "10"]))?;
    }
    system_bench(&[])?;
    tenancy_bench()
}

/// The release build that every benchmark and the soak drive: `patchbay` (with the `bench`
/// feature: the system suite's agent rounds run `patchbay echo-agent`) and `patchbay-loadgen`,
/// one build for all of them (the stock components they swap land in `target/wasm-flows`).
fn build_loadgen_release() -> Result<(), String> {
    ensure_tools(&[("sipp", "-v", "sip-tester"), ("dumpcap", "-v", "wireshark-common")])?;
    step(
        "patchbay and patchbay-loadgen (release)",
        cargo().args([
            "build",
            "--release",
            "--package",
            "patchbay",
            "--package",
            "patchbay-bench",
            "--features",
            BENCH_FEATURE,
            "--locked",
        ]),
    )
}

/// Hot-swap latency, memory of 1,000 tenants, set-up rate over 100 tenants; results in
/// `target/bench-swap/`, `target/bench-tenants-rss/`, `target/bench-setup-rate/`.
fn tenancy_bench() -> Result<(), String> {
    build_loadgen_release()?;
    let loadgen = root().join("target/release/patchbay-loadgen");
    // The cold start of 5,000 distinct builds (`--variants distinct`) takes ~12 minutes here:
    // run it by hand (BENCHMARKS.md has the command).
    for (description, args) in [
        ("hot swap latency", &["swap"][..]),
        ("memory of 1,000 tenants", &["tenants-rss", "--variants", "stock"][..]),
        ("set-up rate over tenants", &["setup-rate"][..]),
    ] {
        step(description, Command::new(&loadgen).current_dir(root()).args(args))?;
    }
    Ok(())
}

/// `cargo xtask soak [--minutes N] [ARGS…]`: minutes of calls under repeated hot swaps.
fn soak(args: &[String]) -> Result<(), String> {
    build_loadgen_release()?;
    step(
        "soak: calls under hot swaps",
        Command::new(root().join("target/release/patchbay-loadgen")).current_dir(root()).arg("soak").args(args),
    )
}

/// The system benchmark suite: Patchbay under the load generator next to its peers (sipp's UAS,
/// rtpengine), results in `target/bench-system/`.
fn system_bench(args: &[String]) -> Result<(), String> {
    ensure_test_tools()?;
    ensure_tools(&BENCH_TOOLS)?;
    build_loadgen_release()?;
    step(
        "system benchmark",
        Command::new(root().join("target/release/patchbay-loadgen")).current_dir(root()).arg("suite").args(args),
    )
}
