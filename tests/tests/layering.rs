//! The protocol cores stay sans-IO: `patchbay-sip` and `patchbay-media` must not depend on
//! tokio or wasmtime (CONVENTIONS §1), nor read the clock outside their tests (CONVENTIONS
//! §2), so that time and packets remain inputs.

use std::path::{Path, PathBuf};
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

/// Clock reads, which belong to the shell (CONVENTIONS §2: time is an input). `Instant::now`
/// without its parentheses also catches it passed as a function (`unwrap_or_else(Instant::now)`);
/// `.elapsed()` on an `Instant` or `SystemTime` reads the clock too.
const CLOCK_READS: [&str; 5] = ["Instant::now", "SystemTime::now", "Utc::now", "chrono::Local", ".elapsed()"];

/// The source trees that must not read the clock.
const SANS_IO_SOURCES: [&str; 2] = ["runtime/sip/src", "runtime/media/src"];

/// What one source file holds: clock reads outside test code (line number, line), and the
/// paths of the modules it declares under `#[cfg(test)]` (`mod tests;`), which are test code
/// however they are named: `<file>` or `<dir>/` prefixes.
#[derive(Debug, Default)]
struct Scan {
    reads: Vec<(usize, String)>,
    test_modules: Vec<PathBuf>,
}

/// Scans `source`, the text of the file at `path`. Test code is recognised by the attribute,
/// not by names: the item after a `#[cfg(test)]` line is skipped. rustfmt lays items out so
/// that one ends on its first line (`mod tests;`) or on the next line back at its own
/// indentation (`}` closing `mod tests {`); an item that never ends is an error rather than a
/// reason to skip the rest of the file.
fn scan(path: &Path, source: &str) -> Result<Scan, String> {
    let mut scan = Scan::default();
    let lines: Vec<&str> = source.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if trimmed == "#[cfg(test)]" {
            let indent = line.len() - trimmed.len();
            let start = i + 1;
            let mut path_attr = None;
            i += 1;
            while i < lines.len() && lines[i].trim_start().starts_with("#[") {
                if let Some(file) = lines[i].trim().strip_prefix("#[path = \"").and_then(|r| r.strip_suffix("\"]")) {
                    path_attr = Some(file.to_owned());
                }
                i += 1;
            }
            let Some(first) = lines.get(i).map(|l| l.trim()) else {
                return Err(format!("{}:{start}: #[cfg(test)] on nothing", path.display()));
            };
            if let Some(name) = first.strip_prefix("mod ").and_then(|r| r.strip_suffix(';')) {
                scan.test_modules.extend(module_files(path, name, path_attr.as_deref()));
            }
            if !(first.ends_with(';') || first.ends_with('}')) {
                loop {
                    i += 1;
                    let Some(next) = lines.get(i) else {
                        return Err(format!("{}:{start}: no end found for the #[cfg(test)] item", path.display()));
                    };
                    let rest = next.trim_start();
                    if rest.is_empty() || next.len() - rest.len() > indent {
                        continue;
                    }
                    if !rest.starts_with(['}', ')', ']']) {
                        // Back at the item's indentation without a closer: the next item.
                        i -= 1;
                    }
                    break;
                }
            }
        } else if !trimmed.starts_with("//") && CLOCK_READS.iter().any(|read| line.contains(read)) {
            scan.reads.push((i + 1, line.trim().to_owned()));
        }
        i += 1;
    }
    Ok(scan)
}

/// Where `mod name;` declared in `file` lives (the Rust reference's module path rules): the
/// file itself and the directory of its submodules.
fn module_files(file: &Path, name: &str, path_attr: Option<&str>) -> Vec<PathBuf> {
    let dir = file.parent().unwrap_or(Path::new(""));
    if let Some(target) = path_attr {
        let target = dir.join(target);
        return vec![target.with_extension(""), target];
    }
    let owns_dir = matches!(file.file_name().and_then(|n| n.to_str()), Some("mod.rs" | "lib.rs" | "main.rs"));
    let base = if owns_dir { dir.to_path_buf() } else { file.with_extension("") };
    vec![base.join(format!("{name}.rs")), base.join(name)]
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Clock reads outside test code in the `.rs` files under `root`, as `file:line: text` with
/// `file` relative to `root`.
fn clock_reads_under(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    files.sort();
    let mut test_paths = Vec::new();
    let mut reads = Vec::new();
    for file in &files {
        let source = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let scan = scan(file, &source).unwrap_or_else(|e| panic!("{e}"));
        test_paths.extend(scan.test_modules);
        reads.extend(scan.reads.into_iter().map(|(line, text)| (file.clone(), line, text)));
    }
    reads
        .into_iter()
        .filter(|(file, ..)| !test_paths.iter().any(|test| file.starts_with(test)))
        .map(|(file, line, text)| format!("{}:{line}: {text}", file.strip_prefix(root).unwrap_or(&file).display()))
        .collect()
}

#[test]
fn sans_io_cores_do_not_read_the_clock() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace holds tests/");
    for dir in SANS_IO_SOURCES {
        let reads = clock_reads_under(&workspace.join(dir));
        assert!(
            reads.is_empty(),
            "{dir} reads the clock outside test code; take `now: Instant` from the caller instead:\n{}",
            reads.join("\n")
        );
    }
}

#[test]
fn the_clock_scan_skips_test_code_only() {
    let source = "\
use std::time::Instant;

/// Never calls Instant::now(): time is an input.
pub fn core(now: Instant) -> Instant {
    now
}

#[cfg(test)]
fn helper() -> Instant {
    Instant::now()
}

pub fn shell() -> Instant {
    Instant::now()
}

#[cfg(test)]
#[path = \"core_tests.rs\"]
mod tests;

#[cfg(test)]
mod more {
    fn t() {
        let t0 = std::time::Instant::now();
    }
}

pub fn stamp() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
";
    let found = scan_of("src/transaction/mod.rs", source);
    let lines: Vec<usize> = found.reads.iter().map(|(line, _)| *line).collect();
    assert_eq!(lines, vec![14, 29], "{:?}", found.reads);
    assert_eq!(
        found.test_modules,
        [PathBuf::from("src/transaction/core_tests"), "src/transaction/core_tests.rs".into()]
    );
    // A file that is not `mod.rs` keeps its submodules in a directory named after it.
    let found = scan_of("src/ua.rs", "#[cfg(test)]\nmod tests;\n");
    assert_eq!(found.test_modules, [PathBuf::from("src/ua/tests.rs"), "src/ua/tests".into()]);
    // Without rustfmt's layout the end of a test module is not found: an error, not a pass.
    let unterminated = scan(Path::new("src/lib.rs"), "#[cfg(test)]\nmod tests {\n    fn t() {}\n");
    assert!(unterminated.is_err(), "{unterminated:?}");
}

fn scan_of(path: &str, source: &str) -> Scan {
    scan(Path::new(path), source).expect("scan")
}

/// The binary's modules in layers, lowest first. A module uses modules of its own layer and of
/// the layers below, never one above: so no two of them import each other in a circle, and a
/// newcomer can read the binary bottom-up (media, configuration, tenants, a call, the endpoint
/// that drives calls, the API over it). The one knot left on purpose is the second layer:
/// `config` validates with the parsers of the types it builds (a trunk's address, a
/// capability), which read their own configuration tables.
const BINARY_LAYERS: &[&[&str]] = &[
    &["cdr", "metrics", "prompts", "recording", "random", "transport", "media"],
    &["config", "policy", "trunk", "resolve"],
    &["originate", "tenant", "webhook", "deploy"],
    &["agent", "dial", "reload"],
    &["call"],
    &["endpoint"],
    &["api"],
    &["main", "flows_cli", "caller", "bench_agent", "bench_media"],
];

/// The crate modules `source` names as `crate::<module>` outside comments (also inside
/// `crate::{a, b::c}` groups).
fn crate_uses(source: &str) -> Vec<String> {
    let mut uses = Vec::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = group.split('}').next().unwrap_or("");
                for item in group.split(',') {
                    let name: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    uses.push(name);
                }
            } else {
                uses.push(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
            }
        }
    }
    uses.retain(|u| !u.is_empty() && u.chars().next().is_some_and(|c| c.is_lowercase()));
    uses
}

#[test]
fn the_binarys_modules_do_not_import_each_other_in_a_circle() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace holds tests/");
    let src = workspace.join("runtime/patchbay/src");
    let layer_of = |module: &str| BINARY_LAYERS.iter().position(|layer| layer.contains(&module));
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "found {} files under {}", files.len(), src.display());
    let mut wrong = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src");
        let first = relative.components().next().expect("a path").as_os_str().to_string_lossy();
        let module = first.trim_end_matches(".rs");
        let Some(own) = layer_of(module) else {
            wrong.push(format!("{}: module `{module}` is in no layer of BINARY_LAYERS", relative.display()));
            continue;
        };
        let source = std::fs::read_to_string(file).expect("readable source");
        for used in crate_uses(&source) {
            match layer_of(&used) {
                Some(layer) if layer <= own => {}
                Some(_) => {
                    wrong.push(format!("{}: `{module}` uses `crate::{used}`, a layer above it", relative.display()))
                }
                None => wrong.push(format!("{}: `crate::{used}` is in no layer of BINARY_LAYERS", relative.display())),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_layer_scan_sees_uses_and_groups_but_not_comments() {
    let source = "use crate::media::CallMedia;\n// crate::api in a comment\nuse crate::{dial, tenant::Tenant};\nlet x = crate::random::u64(); // crate::endpoint\n";
    assert_eq!(crate_uses(source), ["media", "dial", "tenant", "random"]);
}
