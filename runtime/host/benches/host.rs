//! Flow host benchmarks. Reproduce with:
//!
//! ```sh
//! cargo bench -p patchbay-host --bench host
//! ```
//!
//! - `flow start (pooled instantiate)`: taking a slot, building the store and instantiating
//!   from the cached pre-instance, up to the guest's `run` (target median ≤ 20 µs);
//! - `flow start+finish`: a whole trivial call (start, one `info` and one `answer`, teardown);
//! - `host call, sync` / `host call, async`: one guest→host→guest round trip (target ≤ 2 µs);
//! - `echo frame by handle` vs `echo frame by sample copy`: per 20 ms frame;
//! - resident memory per live idle instance (a flow blocked in `play`), printed at the end
//!   (target ≤ 64 KiB).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use criterion::Criterion;
use patchbay_host::{
    AgentEnd, CallControl, CallError, CallInfo, CollectOptions, Collected, CompiledFlow, DialOptions, DialOutcome,
    Direction, Dtmf, FlowCall, FlowEngine, FlowOutcome, HangupCause, HostConfig, MediaEvent, MemoryKv, PlayOptions,
    PlayOutcome, RecordOptions, Recording,
};
use patchbay_media::Frame;
use patchbay_stock_flows::{IVR_MENU, fixtures};

/// A call that answers everything at once; `play` can be made to block forever (an idle call).
struct NullCall {
    to: String,
    frame: Frame,
    play_blocks: bool,
}

#[async_trait]
impl CallControl for NullCall {
    fn info(&self) -> CallInfo {
        CallInfo {
            call_id: "bench".into(),
            tenant: "bench".into(),
            flow: "bench".into(),
            from: "sip:a@b".into(),
            to: self.to.clone(),
            direction: Direction::Inbound,
            headers: Vec::new(),
        }
    }
    async fn answer(&self) -> Result<(), CallError> {
        Ok(())
    }
    async fn hangup(&self, _: HangupCause) -> Result<(), CallError> {
        Ok(())
    }
    async fn play(&self, _: &str, _: PlayOptions) -> Result<PlayOutcome, CallError> {
        if self.play_blocks {
            std::future::pending::<()>().await;
        }
        Ok(PlayOutcome::Completed)
    }
    async fn collect_digits(&self, _: CollectOptions) -> Result<Collected, CallError> {
        Err(CallError::Hangup)
    }
    async fn sleep(&self, _: u32) -> Result<(), CallError> {
        Ok(())
    }
    async fn dial(&self, _: &str, _: DialOptions) -> Result<DialOutcome, CallError> {
        Ok(DialOutcome::NoAnswer)
    }
    async fn transfer(&self, _: &str) -> Result<(), CallError> {
        Ok(())
    }
    async fn agent(&self, _: &str, _: &[(String, String)]) -> Result<AgentEnd, CallError> {
        Ok(AgentEnd::Completed)
    }
    async fn record(&self, _: RecordOptions) -> Result<Recording, CallError> {
        Err(CallError::Unavailable("bench".into()))
    }
    async fn send_dtmf(&self, _: &str) -> Result<(), CallError> {
        Ok(())
    }
    async fn next_dtmf(&self, _: u32) -> Result<Dtmf, CallError> {
        Err(CallError::Timeout)
    }
    fn open_audio_stream(&self) -> Result<(), CallError> {
        Ok(())
    }
    fn close_audio_stream(&self) {}
    async fn read_media(&self) -> Result<MediaEvent, CallError> {
        Ok(MediaEvent::Frame(self.frame.clone()))
    }
    fn write_frame(&self, frame: Frame) -> Result<(), CallError> {
        std::hint::black_box(frame);
        Ok(())
    }
}

fn call(to: &str, play_blocks: bool) -> FlowCall {
    let frame = Frame::from_linear(&[1_000; 160], 8_000, 0).expect("frame");
    FlowCall {
        control: Arc::new(NullCall { to: to.into(), frame, play_blocks }),
        kv: Arc::new(MemoryKv::new(1 << 16)),
        vars: BTreeMap::new(),
        limits: None,
    }
}

fn expect_completed(outcome: &FlowOutcome) {
    assert!(matches!(outcome, FlowOutcome::Completed), "{outcome:?}");
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let engine = FlowEngine::new(HostConfig::default()).expect("engine");
    assert!(engine.pooling(), "benchmarks expect the pooling allocator");
    let chaos = CompiledFlow::compile(&engine, "chaos", fixtures::CHAOS).expect("chaos flow");

    c.bench_function("flow start (pooled instantiate)", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let exit = engine.run(&chaos, call("ok", false)).await;
                    expect_completed(&exit.outcome);
                    total += exit.startup;
                }
                total
            })
        })
    });
    c.bench_function("flow start+finish", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    expect_completed(&engine.run(&chaos, call("ok", false)).await.outcome);
                }
                started.elapsed()
            })
        })
    });
    // Per-operation benches run the loop inside one call and divide by the count; the
    // figure includes one call's start-up amortised over 10,000 operations.
    let per_op = |name: &str, mode: &'static str, c: &mut Criterion| {
        c.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let n = 10_000u32;
                    let rounds = iters.div_ceil(u64::from(n)).max(1);
                    let started = Instant::now();
                    for _ in 0..rounds {
                        let exit = engine.run(&chaos, call(&format!("{mode}:{n}"), false)).await;
                        expect_completed(&exit.outcome);
                    }
                    started.elapsed().mul_f64(iters as f64 / (rounds * u64::from(n)) as f64)
                })
            })
        });
    };
    per_op("host call, sync (get-var)", "sync-calls", &mut c);
    per_op("host call, async (send-dtmf)", "async-calls", &mut c);
    per_op("echo frame by handle", "frames", &mut c);
    per_op("echo frame by sample copy", "samples", &mut c);
    c.final_summary();

    idle_instance_memory(&rt);
}

/// Resident memory of live flows blocked in a host call (the state of every call waiting on a
/// prompt or the caller), measured from /proc/self/statm around 1,000 of them.
fn idle_instance_memory(rt: &tokio::runtime::Runtime) {
    const N: usize = 1_000;
    let engine = Arc::new(FlowEngine::new(HostConfig::default()).expect("engine"));
    let menu = Arc::new(CompiledFlow::compile(&engine, "menu", IVR_MENU.component).expect("menu flow"));
    rt.block_on(async {
        // Warm one call through so code pages and first-use allocations are not counted.
        let warm = engine.run(&menu, call("sip:menu@bench", false)).await;
        assert!(matches!(warm.outcome, FlowOutcome::Failed(_)), "{:?}", warm.outcome);
        let before = rss_bytes();
        let tasks: Vec<_> = (0..N)
            .map(|_| {
                let (engine, menu) = (Arc::clone(&engine), Arc::clone(&menu));
                tokio::spawn(async move { engine.run(&menu, call("sip:menu@bench", true)).await })
            })
            .collect();
        while engine.free_slots() > engine.config().max_instances as usize - N {
            tokio::task::yield_now().await;
        }
        // Let every flow reach its blocking `play`.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = rss_bytes();
        let per = after.saturating_sub(before) / N as u64;
        println!(
            "resident memory per live idle instance: {} KiB ({N} flows blocked in play; RSS {} -> {} MiB)",
            per / 1024,
            before >> 20,
            after >> 20
        );
        for task in tasks {
            task.abort();
        }
    });
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}
