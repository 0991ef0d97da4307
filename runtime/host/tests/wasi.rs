//! The WASI a flow gets: only clocks, random, stdio into the log and what language runtimes
//! read at start are linked; sockets and files are stubs that deny; any other WASI import is
//! refused at load, by name.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use patchbay_host::{CallControl, CompiledFlow, FlowCall, FlowEngine, FlowOutcome, HostConfig, HostError, MemoryKv};
use patchbay_stock_flows::{ALL, fixtures};
use support::FakeCall;

static ENGINE: LazyLock<FlowEngine> = LazyLock::new(|| FlowEngine::new(HostConfig::default()).expect("engine"));

async fn run(flow: &CompiledFlow, to: &str) -> FlowOutcome {
    let call = Arc::new(FakeCall::new(to)) as Arc<dyn CallControl>;
    let call = FlowCall { control: call, kv: Arc::new(MemoryKv::new(64 << 10)), vars: BTreeMap::new(), limits: None };
    ENGINE.run(flow, call).await.outcome
}

/// A flow in component text. `imports` adds component imports; `lowered` turns some into core
/// functions, which the core module imports from `host` (`core_imports`, `host_exports`);
/// `run` executes `body`, drops its borrowed call and returns `ok`. Memory and a bump
/// `realloc` come from `$libc`.
fn wat_flow(imports: &str, lowered: &str, core_imports: &str, host_exports: &str, body: &str) -> String {
    format!(
        r#"(component $flow
  (import "patchbay:voice/types@0.1.0" (instance $types
    (type $call-error (variant (case "hangup") (case "timeout") (case "not-allowed" string)
      (case "invalid-argument" string) (case "unavailable" string) (case "limit-exceeded" string)))
    (export "call-error" (type $ce (eq $call-error)))
    (type $flow-error (variant (case "call" $ce) (case "failed" string)))
    (export "flow-error" (type (eq $flow-error)))))
  (alias export $types "flow-error" (type $flow-error))
  (import "patchbay:voice/call@0.1.0" (instance $call (export "call" (type (sub resource)))))
  (alias export $call "call" (type $call))
  {imports}
  (core module $libc
    (memory (export "memory") 1)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) i32.const 1024))
  (core instance $libc (instantiate $libc))
  (core func $drop-call (canon resource.drop $call))
  {lowered}
  (core module $m
    (import "libc" "memory" (memory 1))
    (import "call" "drop" (func $drop-call (param i32)))
    {core_imports}
    (func (export "run") (param i32) (result i32)
      {body}
      ;; A borrowed handle must be given back before `run` returns.
      (call $drop-call (local.get 0))
      i32.const 0))
  (core instance $m (instantiate $m
    (with "libc" (instance $libc))
    (with "call" (instance (export "drop" (func $drop-call))))
    (with "host" (instance {host_exports}))))
  (func (export "run") (param "call" (borrow $call)) (result (result (error $flow-error)))
    (canon lift (core func $m "run") (memory (core memory $libc "memory")))))"#
    )
}

#[test]
fn every_stock_flow_and_fixture_loads_with_the_wasi_patchbay_links() {
    for flow in ALL {
        CompiledFlow::compile(&ENGINE, flow.name, flow.component).unwrap_or_else(|e| panic!("{}: {e}", flow.name));
    }
    CompiledFlow::compile(&ENGINE, "chaos", fixtures::CHAOS).expect("chaos");
}

#[test]
fn a_wasi_import_patchbay_does_not_provide_is_refused_by_name() {
    // HTTP and key-value were never linked; WASI 0.3 is refused even for interfaces whose 0.2
    // version is linked. An import with no functions used to load: nothing was checked.
    for import in
        ["wasi:http/outgoing-handler@0.2.0", "wasi:keyvalue/store@0.2.0-draft", "wasi:clocks/wall-clock@0.3.0"]
    {
        let wat = format!(r#"(component (import "{import}" (instance)))"#);
        let err = CompiledFlow::compile(&ENGINE, "outside", wat.as_bytes()).expect_err(import);
        assert!(matches!(&err, HostError::UnsupportedImport { import: named, .. } if named == import), "{err:?}");
        assert!(err.to_string().contains(&format!("imports {import}, which Patchbay does not provide")), "{err}");
    }
}

#[tokio::test]
async fn a_flow_importing_sockets_loads_but_cannot_get_a_network() {
    // The shape CPython's libc has: sockets interfaces that `use` a pollable from the linked
    // `wasi:io/poll` and the network from `wasi:sockets/network`. With wasmtime-wasi's
    // sockets linked (before), `instance-network` handed out a network and `run` returned ok.
    let imports = r#"
  (import "wasi:io/poll@0.2.0" (instance $poll (export "pollable" (type (sub resource)))))
  (alias export $poll "pollable" (type $pollable))
  (import "wasi:sockets/network@0.2.0" (instance $network (export "network" (type (sub resource)))))
  (alias export $network "network" (type $net))
  (import "wasi:sockets/instance-network@0.2.0" (instance $instance-network
    (alias outer $flow $net (type $n))
    (export "network" (type $n2 (eq $n)))
    (export "instance-network" (func (result (own $n2))))))
  (import "wasi:sockets/ip-name-lookup@0.2.0" (instance
    (alias outer $flow $pollable (type $p))
    (export "pollable" (type $p2 (eq $p)))
    (alias outer $flow $net (type $n))
    (export "network" (type (eq $n)))
    (export "resolve-address-stream" (type $s (sub resource)))
    (export "[method]resolve-address-stream.subscribe" (func (param "self" (borrow $s)) (result (own $p2))))))"#;
    let lowered = r#"(core func $get-network (canon lower (func $instance-network "instance-network")))"#;
    let core_imports = r#"(import "host" "instance-network" (func $get-network (result i32)))"#;
    let wat = wat_flow(
        imports,
        lowered,
        core_imports,
        r#"(export "instance-network" (func $get-network))"#,
        "(drop (call $get-network))",
    );
    let flow =
        CompiledFlow::compile(&ENGINE, "sockets", wat.as_bytes()).expect("sockets imports are stubbed, not refused");
    match run(&flow, "sip:sockets@127.0.0.1").await {
        FlowOutcome::Trapped(detail) => {
            assert!(detail.contains("wasi:sockets/instance-network@0.2.0#instance-network"), "{detail}");
            assert!(detail.contains("denied"), "{detail}");
        }
        other => panic!("a flow got a network: {other:?}"),
    }
}

#[tokio::test]
async fn a_flow_importing_the_filesystem_sees_no_directories() {
    // wasi-libc asks for the preopened directories before any path operation: the stub
    // answers "none" (a trap here would break every Python flow that touches a path).
    let imports = r#"
  (import "wasi:filesystem/types@0.2.0" (instance $fs (export "descriptor" (type (sub resource)))))
  (alias export $fs "descriptor" (type $descriptor))
  (import "wasi:filesystem/preopens@0.2.0" (instance $preopens
    (alias outer $flow $descriptor (type $d))
    (export "descriptor" (type $d2 (eq $d)))
    (export "get-directories" (func (result (list (tuple (own $d2) string)))))))"#;
    let lowered = r#"(core func $get-directories
    (canon lower (func $preopens "get-directories") (memory (core memory $libc "memory")) (realloc (core func $libc "realloc"))))"#;
    let core_imports = r#"(import "host" "get-directories" (func $get-directories (param i32)))"#;
    // The list comes back as (pointer, length) at offset 16: trap unless the length is 0.
    let body = "(call $get-directories (i32.const 16)) (if (i32.load (i32.const 20)) (then unreachable))";
    let wat = wat_flow(imports, lowered, core_imports, r#"(export "get-directories" (func $get-directories))"#, body);
    let flow = CompiledFlow::compile(&ENGINE, "files", wat.as_bytes()).expect("filesystem imports are stubbed");
    let outcome = run(&flow, "sip:files@127.0.0.1").await;
    assert!(matches!(outcome, FlowOutcome::Completed), "{outcome:?}");
}

/// Collects the events of target `flow` (the flow's log) on the thread it is installed on.
#[derive(Clone, Default)]
struct FlowLogCapture(Arc<Mutex<Vec<String>>>);

impl FlowLogCapture {
    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl tracing::Subscriber for FlowLogCapture {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target() == "flow"
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(event.metadata().level().to_string());
        event.record(&mut fields);
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(fields.0);
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test]
async fn a_flows_stderr_goes_to_its_log() {
    // The chaos fixture panics on `trap`: Rust's panic message is written to stderr before
    // the abort. It used to be discarded; now it is a warning in the flow's log.
    let flow = CompiledFlow::compile(&ENGINE, "chaos", fixtures::CHAOS).expect("chaos");
    let capture = FlowLogCapture::default();
    // The test runtime has one thread, so the stream's writer task logs on this one too.
    let _guard = tracing::subscriber::set_default(capture.clone());
    let outcome = run(&flow, "trap").await;
    assert!(matches!(outcome, FlowOutcome::Trapped(_)), "{outcome:?}");
    let lines = capture.lines();
    assert!(
        lines.iter().any(|l| l.starts_with("WARN")
            && l.contains("chaos flow asked to trap")
            && l.contains("stream=\"stderr\"")
            && l.contains("call_id=fake-1@test")),
        "{lines:#?}"
    );
}
