//! Helpers for Patchbay's end-to-end tests: they start the real `patchbay` binary and drive it
//! from outside, as a user or a SIP peer would.

use std::path::PathBuf;
use std::process::Command;

/// Path of the `patchbay` binary of this build, building it first if needed.
///
/// The binary lives in the same profile directory as this test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/patchbay`).
pub fn patchbay_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile> directory");
    let bin = profile_dir.join("patchbay");
    if !bin.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status =
            Command::new(cargo).args(["build", "--package", "patchbay"]).status().expect("running cargo build");
        assert!(status.success(), "building the patchbay binary failed");
    }
    bin
}

/// A `patchbay` command with its flow cache in a private directory.
pub fn patchbay(cache: &std::path::Path) -> Command {
    let mut cmd = Command::new(patchbay_bin());
    cmd.env("XDG_CACHE_HOME", cache).env("RUST_LOG", "info");
    cmd
}
