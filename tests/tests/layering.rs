//! The protocol cores stay sans-IO: `patchbay-sip` and `patchbay-media` must not depend on
//! tokio or wasmtime (CONVENTIONS §1), so that time and packets remain inputs.

use std::process::Command;

fn normal_dependencies(package: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "--offline", "--edges", "normal", "--prefix", "none", "--package", package])
        .output()
        .expect("running cargo tree");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn sans_io_cores_do_not_depend_on_tokio_or_wasmtime() {
    for package in ["patchbay-sip", "patchbay-media"] {
        let tree = normal_dependencies(package);
        assert!(tree.starts_with(package), "{tree}");
        for forbidden in ["tokio ", "wasmtime ", "mio "] {
            assert!(!tree.lines().any(|l| l.starts_with(forbidden)), "{package} depends on {forbidden}:\n{tree}");
        }
    }
}
