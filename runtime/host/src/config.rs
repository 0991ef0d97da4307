//! Limits and sizes of the flow host.

use std::path::PathBuf;
use std::time::Duration;

/// Engine-wide settings: how big the instance pool is and the upper bounds of per-call limits.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Flows that may run at once (the pool's semaphore). The pool itself is sized a little
    /// larger so that a full semaphore, not a failed allocation, is what callers meet.
    pub max_instances: u32,
    /// Largest linear memory any flow may have (the pool's slot size). A call's
    /// [`FlowLimits::memory_bytes`] is clamped to it.
    pub max_memory_bytes: usize,
    /// Stack for a flow's fiber (its WebAssembly stack lives inside it).
    pub async_stack_size: usize,
    /// Interval of the epoch ticker: the granularity of CPU accounting and of yielding.
    pub epoch_tick: Duration,
    /// Where precompiled flows are cached (`None`: compile on every load). Entries are
    /// authenticated with a per-install key kept there (`cache-key`); a cache that cannot be
    /// read safely or written is logged and skipped, never a reason to refuse a flow.
    pub cache_dir: Option<PathBuf>,
    /// Use the pooling allocator (falls back to on-demand, with a warning, when the address
    /// space is too small).
    pub pooling: bool,
    /// Limits applied to a call whose tenant sets none. A tenant's limits replace these
    /// (they may be higher or lower); only memory is capped, by `max_memory_bytes`.
    pub default_limits: FlowLimits,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            max_instances: 1_024,
            max_memory_bytes: 64 << 20,
            async_stack_size: 512 << 10,
            epoch_tick: Duration::from_millis(10),
            cache_dir: None,
            pooling: true,
            default_limits: FlowLimits::default(),
        }
    }
}

/// Per-call limits of one flow instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLimits {
    /// Linear memory cap; growing past it stops the flow with `limit-exceeded`.
    pub memory_bytes: usize,
    /// Guest CPU time allowed over the whole call (time spent waiting in host calls such as
    /// `play` does not count).
    pub cpu_budget: Duration,
    /// Longest the guest may compute without waiting in a blocking host call (`play`,
    /// `collect-digits`, `read`, `sleep`, ...). Quick synchronous calls such as `log` or
    /// `get-var` do not end a slice. Stops busy loops quickly even when the total budget is
    /// generous.
    pub max_slice: Duration,
    /// Live resource handles (frames, streams) a flow may hold.
    pub max_handles: usize,
    /// Log lines per second a flow may write (bursts up to twice that); the rest are dropped
    /// and counted.
    pub log_lines_per_sec: u32,
    /// Bytes of log messages a flow may write over the whole run; lines past it are dropped
    /// and counted like rate-limited ones.
    pub log_bytes_per_run: usize,
    /// Longest a run may last, wall clock, whatever the flow is doing: computing, waiting in a
    /// host call, or blocked in WASI (`poll`, a sleep, a clock wait). At the deadline the
    /// instance is dropped, its slot freed, and the outcome is
    /// [`FlowOutcome::WallTimeExceeded`](crate::FlowOutcome::WallTimeExceeded).
    pub max_wall_time: Duration,
    /// kv `set`s and `delete`s one run may make; past it they return `limit-exceeded`.
    pub kv_writes_per_run: u32,
    /// Bytes (keys plus values) one run may write to kv; past it a write returns
    /// `limit-exceeded`.
    pub kv_write_bytes_per_run: usize,
}

impl Default for FlowLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 32 << 20,
            cpu_budget: Duration::from_secs(10),
            max_slice: Duration::from_millis(200),
            max_handles: 1_024,
            log_lines_per_sec: 100,
            log_bytes_per_run: 1 << 20,
            // A call may be long (a conference, an agent session); this only bounds a flow
            // that never returns.
            max_wall_time: Duration::from_secs(24 * 60 * 60),
            kv_writes_per_run: 1_000,
            kv_write_bytes_per_run: 4 << 20,
        }
    }
}
