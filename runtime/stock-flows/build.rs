//! Builds the flows in `plugins/` (a separate cargo workspace) for `wasm32-wasip2` and copies
//! the components into `OUT_DIR`, so that every host build embeds current flows with no manual
//! step. Cargo has no artifact dependencies on stable for another target, which is why this is
//! a build script running a nested cargo (the pattern substrate's wasm-builder uses); it builds
//! into its own target directory so it never waits on the outer build's lock.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The components this crate embeds: (cargo package, file stem of the .wasm).
const FLOWS: &[(&str, &str)] = &[
    ("echo", "echo"),
    ("ivr-menu", "ivr_menu"),
    ("voicemail", "voicemail"),
    ("dtmf-router", "dtmf_router"),
    ("agent-handoff", "agent_handoff"),
    ("greet", "greet"),
    ("chaos", "chaos"),
];
const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.join("../..");
    let plugins = root.join("plugins");
    for watched in [
        "plugins/Cargo.toml",
        "plugins/Cargo.lock",
        "plugins/echo",
        "plugins/ivr-menu",
        "plugins/voicemail",
        "plugins/dtmf-router",
        "plugins/agent-handoff",
        "plugins/greet",
        "plugins/fixtures",
        "plugin-sdk",
        "wit",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let target_dir = flows_target_dir(&out_dir);

    check_target_installed();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .arg("build")
        .arg("--release")
        .arg("--target")
        .arg(TARGET)
        .arg("--manifest-path")
        .arg(plugins.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    if plugins.join("Cargo.lock").is_file() {
        build.arg("--locked");
    }
    for (package, _) in FLOWS {
        build.arg("--package").arg(package);
    }
    // Settings meant for the outer build (clippy's wrapper, host RUSTFLAGS, a forced target)
    // must not leak into the flows' build.
    for var in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_PKG_NAME",
    ] {
        build.env_remove(var);
    }
    // Cargo reads a build script's stdout as directives: send the nested build's to stderr.
    build.stdout(std::io::stderr());
    let status = build.status().unwrap_or_else(|e| panic!("could not run cargo to build the flows: {e}"));
    if !status.success() {
        panic!("building the flows in plugins/ for {TARGET} failed (see the output above)");
    }
    for (_, stem) in FLOWS {
        let built = target_dir.join(TARGET).join("release").join(format!("{stem}.wasm"));
        let embedded = out_dir.join(format!("{stem}.wasm"));
        std::fs::copy(&built, &embedded)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", built.display(), embedded.display()));
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo did not set {name}"))
}

/// `<target>/wasm-flows`, next to the outer build's profile directories (found by cargo's
/// `CACHEDIR.TAG` at the target root), so all profiles share one flows build.
fn flows_target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(|target| target.join("wasm-flows"))
        .unwrap_or_else(|| out_dir.join("wasm-flows"))
}

fn check_target_installed() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(rustc).args(["--print", "sysroot"]).output().ok().filter(|o| o.status.success());
    let Some(sysroot) = sysroot else { return };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib").join(TARGET).is_dir() {
        panic!(
            "the {TARGET} target is not installed for {}: run `rustup target add {TARGET}` \
             (`cargo xtask run` and `cargo xtask test` do this for you)",
            sysroot.display()
        );
    }
}
