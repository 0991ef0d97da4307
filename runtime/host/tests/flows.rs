//! The flow host against real components (the stock flows and the chaos fixture) and a
//! scripted fake call.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use patchbay_host::{
    CallControl, CallError, CompiledFlow, FlowCall, FlowEngine, FlowError, FlowExit, FlowKey, FlowLimits, FlowOutcome,
    FlowRegistry, HostConfig, HostError, MediaEvent, MemoryKv, PlayOutcome,
};
use patchbay_media::Frame;
use patchbay_stock_flows::{ECHO, IVR_MENU, fixtures};
use support::{Cmd, FakeCall, frame};
use wasmtime::component::Component;

static ENGINE: LazyLock<FlowEngine> = LazyLock::new(|| FlowEngine::new(HostConfig::default()).expect("engine"));
static ECHO_FLOW: LazyLock<CompiledFlow> = LazyLock::new(|| compile("echo", ECHO.component));
static MENU_FLOW: LazyLock<CompiledFlow> = LazyLock::new(|| compile("menu", IVR_MENU.component));
static CHAOS_FLOW: LazyLock<CompiledFlow> = LazyLock::new(|| compile("chaos", fixtures::CHAOS));

fn compile(name: &str, bytes: &[u8]) -> CompiledFlow {
    CompiledFlow::compile(&ENGINE, name, bytes).expect("stock flow compiles and links")
}

fn call_for(control: Arc<dyn CallControl>, limits: Option<FlowLimits>) -> FlowCall {
    FlowCall { control, kv: Arc::new(MemoryKv::new(64 << 10)), vars: BTreeMap::new(), limits }
}

async fn run(flow: &CompiledFlow, call: &Arc<FakeCall>, limits: Option<FlowLimits>) -> FlowExit {
    ENGINE.run(flow, call_for(Arc::clone(call) as Arc<dyn CallControl>, limits)).await
}

#[tokio::test]
async fn ivr_menu_routes_key_1_to_dial() {
    let call = Arc::new(FakeCall::new("sip:menu@127.0.0.1").with_collects(&["1"]));
    let exit = run(&MENU_FLOW, &call, None).await;
    assert!(matches!(exit.outcome, FlowOutcome::Completed), "{:?}", exit.outcome);
    assert_eq!(
        call.cmds(),
        vec![
            Cmd::Answer,
            Cmd::Play("menu.wav".into()),
            Cmd::Collect { max: 1, prompt: None },
            Cmd::Dial("sip:sales@127.0.0.1:5070".into()),
            // The flow ends the call once the bridge is over.
            Cmd::Hangup("HangupCause::Normal".into()),
        ]
    );
}

#[tokio::test]
async fn ivr_menu_retries_then_routes_barge_in_key_to_agent() {
    // First attempt: nothing pressed. Second: an invalid key. Third: "2" pressed during the prompt.
    let call = Arc::new(
        FakeCall::new("sip:menu@127.0.0.1")
            .with_plays(vec![
                Ok(PlayOutcome::Completed),
                Ok(PlayOutcome::Completed),
                Ok(PlayOutcome::Completed),
                Ok(PlayOutcome::Interrupted('2')),
            ])
            .with_collects(&["", "7"]),
    );
    let exit = run(&MENU_FLOW, &call, None).await;
    assert!(matches!(exit.outcome, FlowOutcome::Completed), "{:?}", exit.outcome);
    assert_eq!(
        call.cmds(),
        vec![
            Cmd::Answer,
            Cmd::Play("menu.wav".into()),
            Cmd::Collect { max: 1, prompt: None },
            Cmd::Play("menu.wav".into()),
            Cmd::Collect { max: 1, prompt: None },
            Cmd::Play("invalid.wav".into()),
            Cmd::Play("menu.wav".into()),
            Cmd::Agent("ws://127.0.0.1:8765/agent".into()),
            Cmd::Hangup("HangupCause::Normal".into()),
        ]
    );
}

#[tokio::test]
async fn ivr_menu_hangs_up_after_retries_run_out() {
    let call = Arc::new(FakeCall::new("sip:menu@127.0.0.1"));
    let exit = run(&MENU_FLOW, &call, None).await;
    assert!(matches!(exit.outcome, FlowOutcome::Completed), "{:?}", exit.outcome);
    let cmds = call.cmds();
    assert_eq!(cmds.iter().filter(|c| **c == Cmd::Play("menu.wav".into())).count(), 3, "{cmds:?}");
    assert_eq!(cmds.last(), Some(&Cmd::Hangup("HangupCause::Normal".into())));
}

#[tokio::test]
async fn ivr_menu_uses_routes_from_call_variables() {
    let call = Arc::new(FakeCall::new("sip:menu@127.0.0.1").with_collects(&["5"]));
    let mut flow_call = call_for(Arc::clone(&call) as Arc<dyn CallControl>, None);
    flow_call.vars.insert("menu.5".into(), "dial:sip:support@pbx.example.com".into());
    flow_call.vars.insert("menu.prompt".into(), "support-menu.wav".into());
    let exit = ENGINE.run(&MENU_FLOW, flow_call).await;
    assert!(matches!(exit.outcome, FlowOutcome::Completed), "{:?}", exit.outcome);
    assert_eq!(call.cmds()[1], Cmd::Play("support-menu.wav".into()));
    let cmds = call.cmds();
    assert_eq!(cmds[cmds.len() - 2], Cmd::Dial("sip:support@pbx.example.com".into()), "{cmds:?}");
}

#[tokio::test]
async fn ivr_menu_follows_a_sub_menu_and_records_the_path() {
    let call = Arc::new(FakeCall::new("sip:menu@127.0.0.1").with_collects(&["4", "2"]));
    let mut flow_call = call_for(Arc::clone(&call) as Arc<dyn CallControl>, None);
    for (name, value) in [
        ("menu.4", "menu:support"),
        ("menu.support.prompt", "support.wav"),
        ("menu.support.2", "dial:sip:tier2@pbx.example.com"),
    ] {
        flow_call.vars.insert(name.into(), value.into());
    }
    let exit = ENGINE.run(&MENU_FLOW, flow_call).await;
    assert!(matches!(exit.outcome, FlowOutcome::Completed), "{:?}", exit.outcome);
    assert_eq!(
        call.cmds(),
        vec![
            Cmd::Answer,
            Cmd::Play("menu.wav".into()),
            Cmd::Collect { max: 1, prompt: None },
            Cmd::Play("support.wav".into()),
            Cmd::Collect { max: 1, prompt: None },
            Cmd::Dial("sip:tier2@pbx.example.com".into()),
            Cmd::Hangup("HangupCause::Normal".into()),
        ]
    );
    assert_eq!(exit.vars.get("menu.path").map(String::as_str), Some("main:4,support:2"));
}

#[tokio::test]
async fn caller_hangup_unwinds_the_flow_with_a_hangup_error() {
    let call = Arc::new(FakeCall::new("sip:menu@127.0.0.1").with_plays(vec![Err(CallError::Hangup)]));
    let exit = run(&MENU_FLOW, &call, None).await;
    assert!(matches!(exit.outcome, FlowOutcome::Failed(FlowError::Call(CallError::Hangup))), "{:?}", exit.outcome);
    assert_eq!(exit.outcome.cause(), "caller-hangup");
    assert_eq!(call.cmds(), vec![Cmd::Answer, Cmd::Play("menu.wav".into())]);
}

#[tokio::test]
async fn echo_returns_the_same_frame_buffers_and_repeats_digits() {
    let (a, b) = (frame(100), frame(-100));
    let call = Arc::new(FakeCall::new("sip:echo@127.0.0.1").with_media(vec![
        MediaEvent::Frame(a),
        MediaEvent::Dtmf(patchbay_host::Dtmf { digit: '5', duration_ms: 120 }),
        MediaEvent::Frame(b),
        MediaEvent::Dtmf(patchbay_host::Dtmf { digit: '#', duration_ms: 80 }),
    ]));
    let exit = run(&ECHO_FLOW, &call, None).await;
    assert!(matches!(exit.outcome, FlowOutcome::Completed), "{:?}", exit.outcome);
    assert_eq!(
        call.cmds(),
        vec![
            Cmd::Answer,
            Cmd::OpenStream,
            Cmd::WriteFrame { echoed: true },
            Cmd::SendDtmf("5".into()),
            Cmd::WriteFrame { echoed: true },
            Cmd::SendDtmf("#".into()),
            Cmd::CloseStream,
        ]
    );
}

fn limits(f: impl FnOnce(&mut FlowLimits)) -> Option<FlowLimits> {
    let mut l = FlowLimits::default();
    f(&mut l);
    Some(l)
}

#[tokio::test]
async fn busy_loop_is_stopped_by_its_slice_and_other_calls_go_on() {
    let looping = Arc::new(FakeCall::new("loop"));
    let started = Instant::now();
    // On this single-threaded runtime the menu call can only make progress if the looping
    // guest yields to the executor on epoch ticks.
    let busy = tokio::spawn(async move {
        let exit = run(&CHAOS_FLOW, &looping, limits(|l| l.max_slice = Duration::from_millis(300))).await;
        (exit, Instant::now())
    });
    tokio::task::yield_now().await;
    let menu_call =
        Arc::new(FakeCall::new("sip:menu@127.0.0.1").with_collects(&["1"]).with_delay(Duration::from_millis(5)));
    let menu = run(&MENU_FLOW, &menu_call, None).await;
    let menu_done = Instant::now();
    let (exit, busy_done) = busy.await.expect("join");
    assert!(matches!(menu.outcome, FlowOutcome::Completed), "{:?}", menu.outcome);
    assert!(matches!(exit.outcome, FlowOutcome::CpuSliceExceeded { .. }), "{:?}", exit.outcome);
    assert!(exit.outcome.is_limit_exceeded());
    assert!(menu_done < busy_done, "the menu call finished while the loop was still running");
    // Stopped within a few epoch ticks of its slice, not after the 10 s budget.
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(exit.guest_time >= Duration::from_millis(300), "{:?}", exit.guest_time);
}

#[tokio::test]
async fn cpu_budget_caps_total_guest_time() {
    let call = Arc::new(FakeCall::new("loop"));
    let exit = run(
        &CHAOS_FLOW,
        &call,
        limits(|l| {
            l.max_slice = Duration::from_secs(60);
            l.cpu_budget = Duration::from_millis(250);
        }),
    )
    .await;
    assert!(matches!(exit.outcome, FlowOutcome::CpuLimitExceeded { .. }), "{:?}", exit.outcome);
    assert_eq!(exit.outcome.cause(), "cpu-limit-exceeded");
}

#[tokio::test]
async fn memory_growth_past_the_cap_is_limit_exceeded() {
    let call = Arc::new(FakeCall::new("grow"));
    let exit = run(&CHAOS_FLOW, &call, limits(|l| l.memory_bytes = 8 << 20)).await;
    assert!(
        matches!(exit.outcome, FlowOutcome::MemoryLimitExceeded { limit } if limit == 8 << 20),
        "{:?}",
        exit.outcome
    );
    assert!(exit.outcome.is_limit_exceeded());
}

#[tokio::test]
async fn trap_ends_only_that_call_and_the_flow_runs_again() {
    let trapping = Arc::new(FakeCall::new("trap"));
    let exit = run(&CHAOS_FLOW, &trapping, None).await;
    match &exit.outcome {
        FlowOutcome::Trapped(detail) => assert!(detail.contains("unreachable"), "{detail}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    let next = Arc::new(FakeCall::new("ok"));
    let exit = run(&CHAOS_FLOW, &next, None).await;
    assert!(matches!(exit.outcome, FlowOutcome::Completed), "{:?}", exit.outcome);
    assert_eq!(next.cmds(), vec![Cmd::Answer]);
}

#[tokio::test]
async fn handle_table_cap_is_limit_exceeded_for_the_flow() {
    let call = Arc::new(FakeCall::new("handles"));
    let exit = run(&CHAOS_FLOW, &call, limits(|l| l.max_handles = 32)).await;
    assert!(
        matches!(exit.outcome, FlowOutcome::Failed(FlowError::Call(CallError::LimitExceeded(_)))),
        "{:?}",
        exit.outcome
    );
}

#[tokio::test]
async fn tenant_kv_round_trips_and_enforces_its_quota() {
    let call = Arc::new(FakeCall::new("kv"));
    let exit = run(&CHAOS_FLOW, &call, None).await;
    assert!(matches!(exit.outcome, FlowOutcome::Completed), "{:?}", exit.outcome);
    assert_eq!(exit.vars.get("kv").map(String::as_str), Some("hello"));
    // The 1 MiB write is within the per-call caps: the store's 64 KiB quota refuses it.
    assert!(
        exit.vars.get("kv-quota").is_some_and(|v| v.contains("LimitExceeded") && v.contains("quota")),
        "{:?}",
        exit.vars
    );
}

#[test]
fn a_component_missing_the_run_export_is_refused_by_name() {
    let err = CompiledFlow::compile(&ENGINE, "empty", b"(component)").expect_err("must not link");
    assert!(matches!(err, HostError::WorldMismatch { .. }), "{err}");
    assert!(err.to_string().contains("run"), "{err}");
}

#[test]
fn a_component_importing_an_unknown_interface_is_refused_by_name() {
    let wat = br#"(component (import "acme:billing/charge@1.0.0" (instance (export "charge" (func)))))"#;
    let err = CompiledFlow::compile(&ENGINE, "billing", wat).expect_err("must not link");
    assert!(matches!(err, HostError::WorldMismatch { .. }), "{err}");
    assert!(err.to_string().contains("acme:billing/charge@1.0.0"), "{err}");
}

#[test]
fn garbage_is_a_compile_error() {
    let err = CompiledFlow::compile(&ENGINE, "junk", b"\0asm\x0d\0\x01\0garbage").expect_err("must not compile");
    assert!(matches!(err, HostError::Compile { .. }), "{err}");
}

#[test]
fn a_bad_component_never_replaces_a_good_one() {
    let registry = FlowRegistry::new();
    let key = FlowKey::new("acme", "menu");
    let good = registry.compile_and_insert(&ENGINE, key.clone(), IVR_MENU.component).expect("good flow");
    assert!(registry.compile_and_insert(&ENGINE, key.clone(), b"(component)").is_err());
    let current = registry.get("acme", "menu").expect("still installed");
    assert_eq!(current.version(), good.version());
    assert!(matches!(registry.get("other-tenant", "menu"), Err(HostError::UnknownFlow { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_calls_on_one_flow_complete() {
    let calls: Vec<Arc<FakeCall>> = (0..1_000)
        .map(|_| {
            Arc::new(FakeCall::new("sip:menu@127.0.0.1").with_collects(&["1"]).with_delay(Duration::from_millis(50)))
        })
        .collect();
    let tasks: Vec<_> = calls
        .iter()
        .map(|call| {
            let call = Arc::clone(call);
            tokio::spawn(async move { run(&MENU_FLOW, &call, None).await })
        })
        .collect();
    let mut completed = 0;
    for task in tasks {
        let exit = task.await.expect("join");
        assert!(matches!(exit.outcome, FlowOutcome::Completed), "{:?}", exit.outcome);
        completed += 1;
    }
    assert_eq!(completed, 1_000);
    for call in &calls {
        let cmds = call.cmds();
        assert_eq!(cmds[cmds.len() - 2], Cmd::Dial("sip:sales@127.0.0.1:5070".into()), "{cmds:?}");
    }
    // Every slot comes back (other tests share ENGINE and may hold a few for a moment).
    let max = HostConfig::default().max_instances as usize;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ENGINE.free_slots() != max && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ENGINE.free_slots(), max);
}

#[tokio::test]
async fn a_full_pool_refuses_new_calls_instead_of_failing_running_ones() {
    let engine = FlowEngine::new(HostConfig { max_instances: 2, ..HostConfig::default() }).expect("engine");
    let flow = CompiledFlow::compile(&engine, "menu", IVR_MENU.component).expect("compiles");
    let slow =
        || Arc::new(FakeCall::new("sip:menu@127.0.0.1").with_collects(&["1"]).with_delay(Duration::from_millis(200)));
    let (a, b, c) = (slow(), slow(), slow());
    let (ea, eb, ec) =
        tokio::join!(engine.run(&flow, call_for(a, None)), engine.run(&flow, call_for(b, None)), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            engine.run(&flow, call_for(c, None)).await
        });
    assert!(matches!(ea.outcome, FlowOutcome::Completed));
    assert!(matches!(eb.outcome, FlowOutcome::Completed));
    assert!(matches!(ec.outcome, FlowOutcome::Refused(HostError::PoolExhausted(2))), "{:?}", ec.outcome);
    assert_eq!(engine.free_slots(), 2);
}

fn cache_engine(dir: &Path) -> FlowEngine {
    FlowEngine::new(HostConfig { cache_dir: Some(dir.to_owned()), max_instances: 4, ..HostConfig::default() })
        .expect("engine")
}

/// The cache's entries (the key file left out).
fn cache_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("cache dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .collect();
    entries.sort();
    entries
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Compiles `bytes` with a cache in `dir` and returns the one entry it leaves there.
fn cached_entry(engine: &FlowEngine, dir: &Path, bytes: &[u8]) -> PathBuf {
    drop(CompiledFlow::compile(engine, "flow", bytes).expect("compiles"));
    let entries = cache_entries(dir);
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries[0].clone()
}

#[test]
fn precompiled_flows_are_cached_by_content_and_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = cache_engine(dir.path());
    let first = CompiledFlow::compile(&engine, "echo", ECHO.component).expect("compiles");
    let files = cache_entries(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().and_then(|n| n.to_str()).expect("utf-8 name").to_owned();
    assert!(name.starts_with(first.version()) && name.ends_with(".cwasm"), "{name}");
    assert_eq!(mode(&files[0]), 0o600);
    assert_eq!(mode(&dir.path().join("cache-key")), 0o600);
    let second = CompiledFlow::compile(&engine, "echo", ECHO.component).expect("shares the loaded one");
    assert_eq!(second.version(), first.version());
    // Once no flow holds it, the next load reads the cache; a damaged artifact there is
    // discarded and rebuilt, never trusted.
    drop((first, second));
    std::fs::write(&files[0], b"not an artifact").expect("overwrite");
    CompiledFlow::compile(&engine, "echo", ECHO.component).expect("recompiles");
    assert!(std::fs::read(&files[0]).expect("artifact").len() > 1_000);
}

#[tokio::test]
async fn a_tampered_cache_entry_is_recompiled_not_loaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = cache_engine(dir.path());
    let entry = cached_entry(&engine, dir.path(), fixtures::CHAOS);
    let good = std::fs::read(&entry).expect("entry");
    // Find a one-byte change wasmtime by itself would accept (a byte of machine code, say):
    // the header and compatibility checks do not catch it, only the MAC does.
    let tampered = [good.len() / 2, good.len() / 3, good.len() * 2 / 3, good.len() / 4]
        .into_iter()
        .map(|at| {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            bad
        })
        // The entry is a 32-byte MAC, then the artifact.
        // SAFETY: only loads the artifact to see whether wasmtime refuses it; nothing runs.
        .find(|bad| unsafe { Component::deserialize(engine.engine(), &bad[32..]) }.is_ok())
        .expect("some flipped byte that wasmtime's own checks accept");
    std::fs::write(&entry, &tampered).expect("tamper");
    let flow = CompiledFlow::compile(&engine, "chaos", fixtures::CHAOS).expect("recompiles");
    let now = std::fs::read(&entry).expect("entry");
    assert_ne!(now, tampered, "the tampered entry was loaded instead of being replaced");
    assert_eq!(mode(&entry), 0o600);
    let exit = engine.run(&flow, call_for(Arc::new(FakeCall::new("ok")), None)).await;
    assert!(matches!(exit.outcome, FlowOutcome::Completed), "{:?}", exit.outcome);
}

#[test]
fn a_cache_entry_others_may_write_is_not_loaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = cache_engine(dir.path());
    let entry = cached_entry(&engine, dir.path(), ECHO.component);
    chmod(&entry, 0o664);
    drop(CompiledFlow::compile(&engine, "echo", ECHO.component).expect("recompiles"));
    // Replaced by a fresh private file, which is the only way its mode goes back to 0600.
    assert_eq!(mode(&entry), 0o600);
}

#[test]
fn a_cache_key_others_can_read_or_that_is_not_ours_leaves_the_cache_unused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entry = cached_entry(&cache_engine(dir.path()), dir.path(), ECHO.component);
    let key = dir.path().join("cache-key");
    std::fs::remove_file(&entry).expect("remove entry");
    chmod(&key, 0o644);
    // A new engine (the next start) reads the key once: it must refuse it and neither read
    // nor write entries.
    drop(CompiledFlow::compile(&cache_engine(dir.path()), "echo", ECHO.component).expect("compiles without cache"));
    assert_eq!(cache_entries(dir.path()), Vec::<PathBuf>::new());
    chmod(&key, 0o600);
    // Another owner: only root can hand a file to someone else; elsewhere the unit tests in
    // cache.rs check the owner rule with a made-up uid.
    let uid = std::fs::metadata(&key).expect("key").uid();
    if std::os::unix::fs::chown(&key, Some(uid + 1), None).is_ok() {
        drop(CompiledFlow::compile(&cache_engine(dir.path()), "echo", ECHO.component).expect("compiles"));
        assert_eq!(cache_entries(dir.path()), Vec::<PathBuf>::new());
        std::os::unix::fs::chown(&key, Some(uid), None).expect("chown back");
    }
    // A proper key makes the cache work again.
    cached_entry(&cache_engine(dir.path()), dir.path(), ECHO.component);
}

#[tokio::test]
async fn a_cache_that_cannot_be_written_still_runs_the_flow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entry = cached_entry(&cache_engine(dir.path()), dir.path(), fixtures::CHAOS);
    std::fs::remove_file(&entry).expect("remove entry");
    // A read-only directory stops everyone but root; a non-empty directory where the entry
    // goes stops the rename for root too.
    std::fs::create_dir(&entry).expect("obstacle");
    std::fs::write(entry.join("x"), b"").expect("obstacle content");
    chmod(dir.path(), 0o500);
    let engine = cache_engine(dir.path());
    let flow = CompiledFlow::compile(&engine, "chaos", fixtures::CHAOS);
    chmod(dir.path(), 0o700);
    let flow = flow.expect("a cache write failure does not refuse the flow");
    let exit = engine.run(&flow, call_for(Arc::new(FakeCall::new("ok")), None)).await;
    assert!(matches!(exit.outcome, FlowOutcome::Completed), "{:?}", exit.outcome);
    assert!(entry.is_dir());
}

#[tokio::test]
async fn a_flow_blocked_past_its_wall_time_limit_is_ended_and_its_slot_freed() {
    let engine = FlowEngine::new(HostConfig { max_instances: 2, ..HostConfig::default() }).expect("engine");
    let flow = CompiledFlow::compile(&engine, "chaos", fixtures::CHAOS).expect("compiles");
    let limit = Duration::from_millis(300);
    // Blocked in a WASI clock wait for an hour, then in a host call (`sleep`) that outlasts
    // the limit: neither spends CPU, so only the wall-clock limit can end them.
    for to in ["wasi-wait", "never-answer"] {
        let call = Arc::new(FakeCall::new(to));
        let started = Instant::now();
        let run = engine.run(&flow, call_for(call, limits(|l| l.max_wall_time = limit)));
        let exit = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .unwrap_or_else(|_| panic!("{to}: still running 30 s after a {limit:?} wall-clock limit"));
        assert!(
            matches!(exit.outcome, FlowOutcome::WallTimeExceeded { limit: l } if l == limit),
            "{to}: {:?}",
            exit.outcome
        );
        assert_eq!(exit.outcome.cause(), "wall-time-exceeded");
        assert!(exit.outcome.is_limit_exceeded());
        assert!(exit.wall_time >= limit, "{to}: {:?}", exit.wall_time);
        assert!(started.elapsed() < Duration::from_secs(5), "{to}: took {:?}", started.elapsed());
        assert!(exit.guest_time < limit, "{to}: waiting counted as CPU: {:?}", exit.guest_time);
        assert_eq!(engine.free_slots(), 2, "{to}: slot not freed");
    }
    // The slots are usable again, and a flow that returns in time is not affected.
    let exit = engine
        .run(&flow, call_for(Arc::new(FakeCall::new("wasi-sleep:50")), limits(|l| l.max_wall_time = limit)))
        .await;
    assert!(matches!(exit.outcome, FlowOutcome::Completed), "{:?}", exit.outcome);
}

#[tokio::test]
async fn kv_writes_past_the_per_call_caps_are_limit_exceeded() {
    // The `kv` mode writes `greeting` (13 bytes), then `big` (1 MiB + 3), which this store's
    // 4 MiB quota holds: only a per-call cap can refuse it.
    let cases = [
        (limits(|l| l.kv_writes_per_run = 1), Some("kv writes per call")),
        (limits(|l| l.kv_write_bytes_per_run = 64 << 10), Some("kv bytes written per call")),
        (None, None),
    ];
    for (limits, refused) in cases {
        let call = Arc::new(FakeCall::new("kv"));
        let kv = Arc::new(MemoryKv::new(4 << 20));
        let flow_call = FlowCall {
            control: call as Arc<dyn CallControl>,
            kv: Arc::clone(&kv) as Arc<dyn patchbay_host::KvStore>,
            vars: BTreeMap::new(),
            limits,
        };
        let exit = ENGINE.run(&CHAOS_FLOW, flow_call).await;
        assert!(matches!(exit.outcome, FlowOutcome::Completed), "{:?}", exit.outcome);
        assert_eq!(exit.vars.get("kv").map(String::as_str), Some("hello"));
        let result = exit.vars.get("kv-quota").cloned().unwrap_or_default();
        match refused {
            Some(why) => {
                assert!(result.contains("LimitExceeded") && result.contains(why), "{result}");
                assert_eq!(kv.used(), "greeting".len() + "hello".len());
            }
            None => {
                assert_eq!(result, "Ok(())");
                assert_eq!(kv.used(), 13 + 3 + (1 << 20));
            }
        }
    }
}

#[test]
fn frames_built_by_the_host_keep_their_samples() {
    let f = Frame::from_linear(&[7; 320], 16_000, 640).expect("whole frame");
    assert_eq!((f.format().samples, f.timestamp(), f.linear()[319]), (320, 640, 7));
}
