//! The long-lived wasmtime engine, its epoch ticker, and running one flow for one call.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{HasSelf, Linker, Resource};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap, UpdateDeadline};

use crate::bindings::{CallError, Flow, FlowError};
use crate::cache::ArtifactCache;
use crate::config::{FlowLimits, HostConfig};
use crate::control::{CallControl, KvStore};
use crate::error::HostError;
use crate::registry::CompiledFlow;
use crate::state::{CallHandle, FlowState, Stop};

/// Extra pool slots above the semaphore, so the pool never runs dry while a permit is free.
const POOL_HEADROOM: u32 = 16;
/// Core instances a component may create (the main module, the WASI adapter, shims; Python
/// flows link several libraries).
const CORE_INSTANCES_PER_FLOW: u32 = 32;

/// One process-wide engine: compiled code, the instance pool and the epoch ticker.
pub struct FlowEngine {
    engine: Engine,
    linker: Linker<FlowState>,
    slots: Arc<Semaphore>,
    config: HostConfig,
    pooling: bool,
    /// Compiled flows by version, while any is loaded: the same component under several
    /// tenants or names is compiled (or read from the cache) once and shares its code and
    /// pre-instance.
    compiled: std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<crate::bindings::FlowPre<FlowState>>>>,
    /// The precompiled-flow cache of `config.cache_dir`.
    cache: Option<ArtifactCache>,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for FlowEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowEngine")
            .field("pooling", &self.pooling)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn base_config(config: &HostConfig) -> Config {
    let mut cfg = Config::new();
    cfg.wasm_component_model(true);
    // Every store gets a deadline and a callback; see `FlowEngine::run`.
    cfg.epoch_interruption(true);
    cfg.async_stack_size(config.async_stack_size);
    // The wasm stack lives inside the fiber stack; leave room for host frames.
    cfg.max_wasm_stack(config.async_stack_size / 2);
    cfg
}

fn pooling_config(config: &HostConfig) -> PoolingAllocationConfig {
    let slots = config.max_instances + POOL_HEADROOM;
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(slots)
        .total_core_instances(slots * 8)
        .max_core_instances_per_component(CORE_INSTANCES_PER_FLOW)
        .total_memories(slots * 2)
        .max_memories_per_component(4)
        .total_tables(slots * 4)
        .max_tables_per_component(8)
        .total_stacks(slots)
        .max_memory_size(config.max_memory_bytes)
        // Keep a freed slot's first pages resident: a new call's flow reuses them without page
        // faults or a fresh madvise (measured start-up with this setting: BENCHMARKS.md).
        .linear_memory_keep_resident(64 << 10)
        .table_keep_resident(16 << 10)
        .async_stack_keep_resident(16 << 10);
    pool
}

impl FlowEngine {
    /// Builds the engine. With `pooling`, it first tries the pooling allocator (which reserves
    /// address space for every slot up front) and falls back to on-demand allocation with a
    /// warning when the host's address space is too small for the pool.
    pub fn new(config: HostConfig) -> Result<Self, HostError> {
        let mut pooling = false;
        let mut engine = None;
        if config.pooling {
            let mut cfg = base_config(&config);
            cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling_config(&config)));
            match Engine::new(&cfg) {
                Ok(e) => {
                    pooling = true;
                    engine = Some(e);
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    slots = config.max_instances,
                    "pooling allocator unavailable (address space too small?); falling back to on-demand instance allocation"
                ),
            }
        }
        let engine = match engine {
            Some(e) => e,
            None => Engine::new(&base_config(&config)).map_err(|e| HostError::Config(e.to_string()))?,
        };
        let mut linker = Linker::new(&engine);
        crate::wasi::add_to_linker(&mut linker).map_err(|e| HostError::Config(e.to_string()))?;
        Flow::add_to_linker::<FlowState, HasSelf<FlowState>>(&mut linker, |s| s)
            .map_err(|e| HostError::Config(e.to_string()))?;
        let ticker = EpochTicker::start(engine.clone(), config.epoch_tick);
        Ok(Self {
            slots: Arc::new(Semaphore::new(config.max_instances as usize)),
            engine,
            linker,
            pooling,
            cache: config.cache_dir.clone().map(ArtifactCache::new),
            config,
            compiled: Default::default(),
            _ticker: ticker,
        })
    }

    /// The wasmtime engine (for compiling components).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn linker(&self) -> &Linker<FlowState> {
        &self.linker
    }

    /// Whether the pooling allocator is in use.
    pub fn pooling(&self) -> bool {
        self.pooling
    }

    /// The configuration the engine was built with.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// The precompiled-flow cache, when the configuration names a directory.
    pub(crate) fn cache(&self) -> Option<&ArtifactCache> {
        self.cache.as_ref()
    }

    /// The loaded pre-instance of `version`, if any flow still holds it.
    pub(crate) fn loaded(&self, version: &str) -> Option<Arc<crate::bindings::FlowPre<FlowState>>> {
        let mut compiled = self.compiled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        compiled.retain(|_, pre| pre.strong_count() > 0);
        compiled.get(version).and_then(std::sync::Weak::upgrade)
    }

    /// Remembers `pre` as the loaded `version` (see [`Self::loaded`]).
    pub(crate) fn remember(&self, version: &str, pre: &Arc<crate::bindings::FlowPre<FlowState>>) {
        let mut compiled = self.compiled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        compiled.insert(version.to_owned(), Arc::downgrade(pre));
    }

    /// Instance slots free right now.
    pub fn free_slots(&self) -> usize {
        self.slots.available_permits()
    }

    /// Takes an instance slot, or fails at once when all are in use (the call layer turns that
    /// into a 503 rather than queueing callers).
    fn slot(&self) -> Result<OwnedSemaphorePermit, HostError> {
        Arc::clone(&self.slots).try_acquire_owned().map_err(|_| HostError::PoolExhausted(self.config.max_instances))
    }

    /// Runs `flow` for one call until it returns, traps, is stopped by a limit or reaches its
    /// wall-clock limit ([`FlowLimits::max_wall_time`]), and reports how it ended.
    ///
    /// The store, the instance and its pool slot live exactly as long as this future; dropping
    /// the future (for example when the call actor shuts down) releases all of them. Needs a
    /// tokio runtime with its timer enabled.
    pub async fn run(&self, flow: &CompiledFlow, call: FlowCall) -> FlowExit {
        let started = Instant::now();
        let limits = call.limits.unwrap_or(self.config.default_limits);
        let limits = FlowLimits { memory_bytes: limits.memory_bytes.min(self.config.max_memory_bytes), ..limits };
        let _slot = match self.slot() {
            Ok(slot) => slot,
            Err(e) => return FlowExit::refused(e, started),
        };
        // The store's WASI context comes from `wasi::context`: no files, no environment, no
        // sockets, stdout and stderr into the flow's log.
        let state = FlowState::new(call.control, call.kv, call.vars, limits);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        // Three ticks: the guest's clock is read at every tick it runs through; anything longer
        // was a wait inside a WASI call, not CPU.
        store.data_mut().clock.cap_runs(self.config.epoch_tick * 3);
        // Check in every tick the guest runs: account its CPU, stop it when over budget, and
        // otherwise yield to the executor so that a busy flow never starves the other calls
        // that share this worker thread.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut ctx| {
            let state = ctx.data_mut();
            let (slice, total) = state.clock.running(Instant::now());
            if total > state.limits.cpu_budget {
                state.stopped = Some(Stop::BudgetExceeded);
                return Ok(UpdateDeadline::Interrupt);
            }
            if slice > state.limits.max_slice {
                state.stopped = Some(Stop::SliceExceeded);
                return Ok(UpdateDeadline::Interrupt);
            }
            state.clock.pause(Instant::now());
            Ok(UpdateDeadline::YieldCustom(1, Box::pin(state.clock.yield_now())))
        });

        let call_handle = match store.data_mut().table().push(CallHandle) {
            Ok(h) => h,
            Err(e) => {
                return FlowExit::refused(
                    HostError::Instantiate { flow: flow.name().into(), detail: e.to_string() },
                    started,
                );
            }
        };
        let mut startup = Duration::ZERO;
        let body = async {
            match flow.pre().instantiate_async(&mut store).await {
                Err(e) => {
                    let outcome = classify_trap(store.data(), &e);
                    match outcome {
                        FlowOutcome::Trapped(detail) => {
                            FlowOutcome::Refused(HostError::Instantiate { flow: flow.name().into(), detail })
                        }
                        other => other,
                    }
                }
                Ok(instance) => {
                    startup = started.elapsed();
                    store.data_mut().clock.enter(Instant::now());
                    let borrow = Resource::<CallHandle>::new_borrow(call_handle.rep());
                    match instance.call_run(&mut store, borrow).await {
                        Ok(Ok(())) => FlowOutcome::Completed,
                        Ok(Err(e)) => FlowOutcome::Failed(e),
                        Err(e) => classify_trap(store.data(), &e),
                    }
                }
            }
        };
        // The CPU budget only counts guest compute; a flow blocked in a WASI wait or in a host
        // call that never returns spends none. The wall-clock deadline bounds those too:
        // dropping `body` at the deadline unwinds the guest's fiber (wasmtime resumes it with
        // an error, so no more guest code runs) and drops whatever host future it waited on.
        let outcome = match started.checked_add(limits.max_wall_time) {
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), body).await {
                Ok(outcome) => outcome,
                Err(_) => FlowOutcome::WallTimeExceeded { limit: limits.max_wall_time },
            },
            // Too far away to represent: no deadline.
            None => body.await,
        };
        let state = store.data();
        let (_, guest_time) = state.clock.running(Instant::now());
        if state.log_lines_dropped() > 0 {
            tracing::warn!(
                flow = flow.name(),
                dropped = state.log_lines_dropped(),
                "flow log lines dropped by the rate limit or the per-run byte cap"
            );
        }
        FlowExit {
            outcome,
            vars: std::mem::take(&mut store.data_mut().vars),
            guest_time,
            startup,
            wall_time: started.elapsed(),
        }
    }
}

fn classify_trap(state: &FlowState, error: &wasmtime::Error) -> FlowOutcome {
    match state.stopped {
        Some(Stop::BudgetExceeded) => return FlowOutcome::CpuLimitExceeded { budget: state.limits.cpu_budget },
        Some(Stop::SliceExceeded) => return FlowOutcome::CpuSliceExceeded { slice: state.limits.max_slice },
        None => {}
    }
    if state.limiter.memory_refused {
        return FlowOutcome::MemoryLimitExceeded { limit: state.limits.memory_bytes };
    }
    let detail = match error.downcast_ref::<Trap>() {
        Some(trap) => format!("{trap}: {error:#}"),
        None => format!("{error:#}"),
    };
    FlowOutcome::Trapped(detail)
}

/// What the host needs to run a flow for one call.
pub struct FlowCall {
    /// The call the flow controls.
    pub control: Arc<dyn CallControl>,
    /// The call's tenant's key-value space.
    pub kv: Arc<dyn KvStore>,
    /// Call variables set before the flow starts (routing config, header mapping).
    pub vars: BTreeMap<String, String>,
    /// The tenant's limits (`None`: the engine defaults).
    pub limits: Option<FlowLimits>,
}

/// How a flow's run ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum FlowOutcome {
    /// `run` returned `ok`.
    Completed,
    /// `run` returned an error.
    Failed(FlowError),
    /// The guest trapped (a panic, an unreachable, a bad host call).
    Trapped(String),
    /// The guest used its CPU budget for the call.
    CpuLimitExceeded {
        /// The budget.
        budget: Duration,
    },
    /// The guest computed too long without calling the host.
    CpuSliceExceeded {
        /// The slice limit.
        slice: Duration,
    },
    /// The guest tried to grow its memory past its cap.
    MemoryLimitExceeded {
        /// The cap in bytes.
        limit: usize,
    },
    /// The run lasted longer than its wall-clock limit (computing, waiting in a host call or
    /// blocked in WASI) and was dropped.
    WallTimeExceeded {
        /// The limit.
        limit: Duration,
    },
    /// The flow could not start.
    Refused(HostError),
}

impl FlowOutcome {
    /// A short machine-readable cause for CDRs and metrics.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::Completed => "flow-completed",
            // A flow that let the `hangup` error propagate ended because the caller hung up.
            Self::Failed(FlowError::Call(CallError::Hangup)) => "caller-hangup",
            Self::Failed(_) => "flow-error",
            Self::Trapped(_) => "flow-trap",
            Self::CpuLimitExceeded { .. } | Self::CpuSliceExceeded { .. } => "cpu-limit-exceeded",
            Self::MemoryLimitExceeded { .. } => "memory-limit-exceeded",
            Self::WallTimeExceeded { .. } => "wall-time-exceeded",
            Self::Refused(_) => "flow-refused",
        }
    }

    /// Whether the flow was stopped by one of its limits (the WIT's `limit-exceeded`).
    pub fn is_limit_exceeded(&self) -> bool {
        matches!(
            self,
            Self::CpuLimitExceeded { .. }
                | Self::CpuSliceExceeded { .. }
                | Self::MemoryLimitExceeded { .. }
                | Self::WallTimeExceeded { .. }
        )
    }
}

/// The result of [`FlowEngine::run`].
#[derive(Debug)]
pub struct FlowExit {
    /// How the flow ended.
    pub outcome: FlowOutcome,
    /// Call variables at the end (for the CDR).
    pub vars: BTreeMap<String, String>,
    /// Guest CPU time (wall time inside the guest).
    pub guest_time: Duration,
    /// Time from the start of the run to the guest's `run` being entered: taking a slot,
    /// building the store and instantiating from the pre-instance.
    pub startup: Duration,
    /// Time from start to end of the run.
    pub wall_time: Duration,
}

impl FlowExit {
    fn refused(error: HostError, started: Instant) -> Self {
        Self {
            outcome: FlowOutcome::Refused(error),
            vars: BTreeMap::new(),
            guest_time: Duration::ZERO,
            startup: Duration::ZERO,
            wall_time: started.elapsed(),
        }
    }
}

/// The one OS thread that advances the engine's epoch. It is not a tokio task: a tokio worker
/// busy with a guest could never run it, and the guest would never be interrupted.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine, tick: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("patchbay-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })
            .ok();
        if thread.is_none() {
            tracing::error!("could not start the epoch ticker thread: flows will not be interrupted");
        }
        Self { stop, thread }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
