//! Per-call store data and the WIT host functions.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use patchbay_media::{AudioEncoding, Frame};
use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::patchbay::voice::{call, kv, log, media, types};
use crate::bindings::{
    AgentEnd, AudioFormat, CallError, CallInfo, CollectOptions, Collected, DialOptions, DialOutcome, Dtmf, Encoding,
    HangupCause, Level, PlayOptions, PlayOutcome, RecordOptions, Recording, StreamEvent,
};
use crate::config::FlowLimits;
use crate::control::{CallControl, KvStore, MediaEvent};

/// The `call` resource a flow receives. It carries nothing: the store holds the call's
/// control, so a flow can only ever reach its own call.
#[derive(Debug)]
pub struct CallHandle;

/// The `audio-stream` resource. Like [`CallHandle`], the stream's state lives in the call layer.
#[derive(Debug)]
pub struct AudioStreamHandle;

/// Longest call variable name and value, as documented in the WIT.
const MAX_VAR_NAME: usize = 256;
const MAX_VAR_VALUE: usize = 4_096;
/// Most variables one call may hold.
const MAX_VARS: usize = 256;

/// Why the host stopped a flow itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The guest computed longer than `max_slice` without calling the host.
    SliceExceeded,
    /// The guest used up its CPU budget for the call.
    BudgetExceeded,
}

/// Guest CPU accounting. Guest time is wall time spent running the guest: from the start of
/// `run`, the return of an async host call or the end of an epoch yield, to the next async host
/// call, epoch check or yield. Time parked in the executor does not count.
#[derive(Debug)]
pub(crate) struct GuestClock {
    base: Instant,
    /// When the guest last (re)entered, in nanoseconds since `base`. Shared with the yield
    /// future, which stamps it when the executor resumes the guest.
    entered: Arc<AtomicU64>,
    /// Guest time before the current run of guest code.
    total: Duration,
    /// Guest time since the last host call, before the current run (yields do not reset it).
    since_host: Duration,
    /// The most one run between two clock readings can count. The guest is read at every
    /// epoch tick it runs through, so a longer run means it was not computing: it waited in a
    /// WASI call (a sleep, a poll), which is not CPU and must not spend its budget.
    max_run: Duration,
}

impl GuestClock {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            base: now,
            entered: Arc::new(AtomicU64::new(0)),
            total: Duration::ZERO,
            since_host: Duration::ZERO,
            max_run: Duration::MAX,
        }
    }

    /// Counts at most `max` per run between readings (see `max_run`).
    pub(crate) fn cap_runs(&mut self, max: Duration) {
        self.max_run = max;
    }

    fn ran(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.entered()).min(self.max_run)
    }

    fn entered(&self) -> Instant {
        self.base + Duration::from_nanos(self.entered.load(Ordering::Relaxed))
    }

    /// The guest called into the host at `now`: its compute slice ends.
    pub(crate) fn leave(&mut self, now: Instant) {
        self.total += self.ran(now);
        self.since_host = Duration::ZERO;
    }

    /// The guest is parked at `now` by an epoch yield, in the middle of its slice.
    pub(crate) fn pause(&mut self, now: Instant) {
        let ran = self.ran(now);
        self.total += ran;
        self.since_host += ran;
    }

    /// Control came back to the guest at `now`.
    pub(crate) fn enter(&mut self, now: Instant) {
        stamp(&self.entered, self.base, now);
    }

    /// A future for `UpdateDeadline::YieldCustom`: yields to the executor (tokio's
    /// `yield_now` lets the runtime poll its timers and I/O first) and restarts the clock when
    /// the guest is resumed.
    pub(crate) fn yield_now(&self) -> impl Future<Output = ()> + Send + 'static {
        let (entered, base) = (Arc::clone(&self.entered), self.base);
        async move {
            tokio::task::yield_now().await;
            stamp(&entered, base, Instant::now());
        }
    }

    /// (guest time since the last host call, total guest time), as of `now` while the guest
    /// runs.
    pub(crate) fn running(&self, now: Instant) -> (Duration, Duration) {
        let current = self.ran(now);
        (self.since_host + current, self.total + current)
    }
}

fn stamp(entered: &AtomicU64, base: Instant, now: Instant) {
    let nanos = u64::try_from(now.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX);
    entered.store(nanos, Ordering::Relaxed);
}

/// A resource limiter that records a refused memory growth, so that the trap which follows
/// (a Rust guest aborts when its allocator fails) is reported as `limit-exceeded`.
pub(crate) struct FlowLimiter {
    inner: StoreLimits,
    pub(crate) memory_refused: bool,
}

impl ResourceLimiter for FlowLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = self.inner.memory_growing(current, desired, maximum)?;
        if !allowed {
            self.memory_refused = true;
        }
        Ok(allowed)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// Token bucket for a flow's log lines, and a cap on the bytes of the whole run.
#[derive(Debug)]
struct LogBudget {
    per_sec: f64,
    tokens: f64,
    refilled: Instant,
    /// Message bytes the run may still write.
    bytes_left: usize,
    dropped: u64,
}

impl LogBudget {
    fn new(per_sec: u32, bytes_per_run: usize, now: Instant) -> Self {
        let per_sec = f64::from(per_sec);
        Self { per_sec, tokens: per_sec * 2.0, refilled: now, bytes_left: bytes_per_run, dropped: 0 }
    }

    /// Whether a line of `bytes` may be written at `now`; charges it if so.
    fn take(&mut self, now: Instant, bytes: usize) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.per_sec * 2.0);
        self.refilled = now;
        if self.tokens >= 1.0 && bytes <= self.bytes_left {
            self.tokens -= 1.0;
            self.bytes_left -= bytes;
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

/// Which of a flow's standard output streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stdio {
    Stdout,
    Stderr,
}

/// A flow's log: lines from the `log` interface and from the flow's stdout and stderr, under
/// one budget. The WASI context owns the stdout/stderr streams, hence the `Arc` and the lock
/// (taken once per line, never across an await).
#[derive(Debug)]
pub(crate) struct FlowLog {
    tenant: String,
    flow: String,
    call_id: String,
    budget: Mutex<LogBudget>,
}

impl FlowLog {
    fn new(info: &CallInfo, limits: &FlowLimits, now: Instant) -> Self {
        Self {
            tenant: info.tenant.clone(),
            flow: info.flow.clone(),
            call_id: info.call_id.clone(),
            budget: Mutex::new(LogBudget::new(limits.log_lines_per_sec, limits.log_bytes_per_run, now)),
        }
    }

    fn take(&self, bytes: usize) -> bool {
        self.budget.lock().unwrap_or_else(PoisonError::into_inner).take(Instant::now(), bytes)
    }

    fn dropped(&self) -> u64 {
        self.budget.lock().unwrap_or_else(PoisonError::into_inner).dropped
    }

    /// A line the flow logged through the `log` interface.
    fn write(&self, level: Level, message: &str) {
        if !self.take(message.len()) {
            return;
        }
        let (call_id, tenant, flow) = (&self.call_id, &self.tenant, &self.flow);
        match level {
            Level::Trace => tracing::trace!(target: "flow", %tenant, %flow, %call_id, "{message}"),
            Level::Debug => tracing::debug!(target: "flow", %tenant, %flow, %call_id, "{message}"),
            Level::Info => tracing::info!(target: "flow", %tenant, %flow, %call_id, "{message}"),
            Level::Warn => tracing::warn!(target: "flow", %tenant, %flow, %call_id, "{message}"),
            Level::Error => tracing::error!(target: "flow", %tenant, %flow, %call_id, "{message}"),
        }
    }

    /// A line the flow wrote to stdout (logged at info) or stderr (at warn: a Rust panic
    /// message or a Python traceback lands there).
    pub(crate) fn write_stdio(&self, stream: Stdio, line: &str) {
        if !self.take(line.len()) {
            return;
        }
        let (call_id, tenant, flow) = (&self.call_id, &self.tenant, &self.flow);
        match stream {
            Stdio::Stdout => tracing::info!(target: "flow", %tenant, %flow, %call_id, stream = "stdout", "{line}"),
            Stdio::Stderr => tracing::warn!(target: "flow", %tenant, %flow, %call_id, stream = "stderr", "{line}"),
        }
    }
}

/// What one run may still write to kv: host work a flow can trigger is bounded per call, not
/// only by the tenant's store quota (which a flow that keeps rewriting one key never reaches).
#[derive(Debug)]
struct KvWriteBudget {
    writes_left: u32,
    bytes_left: usize,
}

impl KvWriteBudget {
    fn new(limits: &FlowLimits) -> Self {
        Self { writes_left: limits.kv_writes_per_run, bytes_left: limits.kv_write_bytes_per_run }
    }

    /// Charges a write of `bytes` (key plus value), or refuses it. A refused write does not
    /// touch the store; an accepted one is charged even if the store then refuses it.
    fn charge(&mut self, bytes: usize) -> Result<(), CallError> {
        if self.writes_left == 0 {
            return Err(CallError::LimitExceeded("kv writes per call".into()));
        }
        if bytes > self.bytes_left {
            return Err(CallError::LimitExceeded("kv bytes written per call".into()));
        }
        self.writes_left -= 1;
        self.bytes_left -= bytes;
        Ok(())
    }
}

/// Everything a call's store holds.
pub struct FlowState {
    table: ResourceTable,
    wasi: WasiCtx,
    pub(crate) limiter: FlowLimiter,
    control: Arc<dyn CallControl>,
    kv: Arc<dyn KvStore>,
    info: CallInfo,
    pub(crate) vars: BTreeMap<String, String>,
    pub(crate) clock: GuestClock,
    pub(crate) limits: FlowLimits,
    pub(crate) stopped: Option<Stop>,
    log: Arc<FlowLog>,
    kv_writes: KvWriteBudget,
    stream_open: bool,
}

impl FlowState {
    pub(crate) fn new(
        control: Arc<dyn CallControl>,
        kv: Arc<dyn KvStore>,
        vars: BTreeMap<String, String>,
        limits: FlowLimits,
    ) -> Self {
        let now = Instant::now();
        let info = control.info();
        let log = Arc::new(FlowLog::new(&info, &limits, now));
        let mut table = ResourceTable::new();
        table.set_max_capacity(limits.max_handles);
        let inner =
            StoreLimitsBuilder::new().memory_size(limits.memory_bytes).instances(64).tables(64).memories(16).build();
        Self {
            table,
            wasi: crate::wasi::context(&log),
            limiter: FlowLimiter { inner, memory_refused: false },
            info,
            control,
            kv,
            vars,
            clock: GuestClock::new(now),
            limits,
            stopped: None,
            log,
            kv_writes: KvWriteBudget::new(&limits),
            stream_open: false,
        }
    }

    pub(crate) fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }

    pub(crate) fn log_lines_dropped(&self) -> u64 {
        self.log.dropped()
    }

    /// Runs an async host operation with the guest clock stopped.
    async fn host<F: Future>(&mut self, op: impl FnOnce(Arc<dyn CallControl>) -> F) -> F::Output {
        self.clock.leave(Instant::now());
        let out = op(Arc::clone(&self.control)).await;
        self.clock.enter(Instant::now());
        out
    }
}

impl WasiView for FlowState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl types::Host for FlowState {}

impl media::Host for FlowState {}

fn to_wit_format(format: patchbay_media::AudioFormat) -> AudioFormat {
    AudioFormat {
        encoding: match format.encoding {
            AudioEncoding::Linear16 => Encoding::Linear16,
            AudioEncoding::Pcmu => Encoding::Pcmu,
            AudioEncoding::Pcma => Encoding::Pcma,
        },
        sample_rate: format.sample_rate,
        samples: format.samples,
    }
}

impl media::HostFrame for FlowState {
    fn from_samples(
        &mut self,
        samples: Vec<i16>,
        sample_rate: u32,
    ) -> wasmtime::Result<Result<Resource<Frame>, CallError>> {
        let frame = match Frame::from_linear(&samples, sample_rate, 0) {
            Ok(frame) => frame,
            Err(e) => return Ok(Err(CallError::InvalidArgument(e.to_string()))),
        };
        Ok(push_limited(&mut self.table, frame))
    }

    fn samples(&mut self, frame: Resource<Frame>) -> wasmtime::Result<Vec<i16>> {
        Ok(self.table.get(&frame)?.linear().to_vec())
    }

    fn format(&mut self, frame: Resource<Frame>) -> wasmtime::Result<AudioFormat> {
        Ok(to_wit_format(self.table.get(&frame)?.format()))
    }

    fn timestamp(&mut self, frame: Resource<Frame>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&frame)?.timestamp())
    }

    fn drop(&mut self, frame: Resource<Frame>) -> wasmtime::Result<()> {
        self.table.delete(frame)?;
        Ok(())
    }
}

/// Pushes a host value into the flow's table; a full table is the flow's `limit-exceeded`,
/// not a trap.
fn push_limited<T: Send + 'static>(table: &mut ResourceTable, value: T) -> Result<Resource<T>, CallError> {
    table.push(value).map_err(|_| CallError::LimitExceeded("too many live handles".into()))
}

impl media::HostAudioStream for FlowState {
    async fn read(&mut self, _stream: Resource<AudioStreamHandle>) -> wasmtime::Result<Result<StreamEvent, CallError>> {
        let event = self.host(|c| async move { c.read_media().await }).await;
        Ok(match event {
            Ok(MediaEvent::Frame(frame)) => push_limited(&mut self.table, frame).map(StreamEvent::Frame),
            Ok(MediaEvent::Dtmf(dtmf)) => Ok(StreamEvent::Dtmf(dtmf)),
            Err(e) => Err(e),
        })
    }

    fn write(
        &mut self,
        _stream: Resource<AudioStreamHandle>,
        frame: Resource<Frame>,
    ) -> wasmtime::Result<Result<(), CallError>> {
        // Ownership of the handle moves to the host: take it out of the table and pass the
        // frame itself on. No samples are copied.
        let frame = self.table.delete(frame)?;
        Ok(self.control.write_frame(frame))
    }

    fn drop(&mut self, stream: Resource<AudioStreamHandle>) -> wasmtime::Result<()> {
        self.table.delete(stream)?;
        self.stream_open = false;
        self.control.close_audio_stream();
        Ok(())
    }
}

impl call::Host for FlowState {}

impl call::HostCall for FlowState {
    fn info(&mut self, _call: Resource<CallHandle>) -> wasmtime::Result<CallInfo> {
        Ok(self.info.clone())
    }

    async fn answer(&mut self, _call: Resource<CallHandle>) -> wasmtime::Result<Result<(), CallError>> {
        Ok(self.host(|c| async move { c.answer().await }).await)
    }

    async fn hangup(
        &mut self,
        _call: Resource<CallHandle>,
        cause: HangupCause,
    ) -> wasmtime::Result<Result<(), CallError>> {
        Ok(self.host(|c| async move { c.hangup(cause).await }).await)
    }

    async fn play(
        &mut self,
        _call: Resource<CallHandle>,
        prompt: String,
        options: PlayOptions,
    ) -> wasmtime::Result<Result<PlayOutcome, CallError>> {
        Ok(self.host(|c| async move { c.play(&prompt, options).await }).await)
    }

    async fn collect_digits(
        &mut self,
        _call: Resource<CallHandle>,
        options: CollectOptions,
    ) -> wasmtime::Result<Result<Collected, CallError>> {
        if options.max_digits == 0 {
            return Ok(Err(CallError::InvalidArgument("max-digits must be at least 1".into())));
        }
        Ok(self.host(|c| async move { c.collect_digits(options).await }).await)
    }

    async fn sleep(&mut self, _call: Resource<CallHandle>, ms: u32) -> wasmtime::Result<Result<(), CallError>> {
        Ok(self.host(|c| async move { c.sleep(ms).await }).await)
    }

    async fn dial(
        &mut self,
        _call: Resource<CallHandle>,
        target: String,
        options: DialOptions,
    ) -> wasmtime::Result<Result<DialOutcome, CallError>> {
        Ok(self.host(|c| async move { c.dial(&target, options).await }).await)
    }

    async fn transfer(
        &mut self,
        _call: Resource<CallHandle>,
        target: String,
    ) -> wasmtime::Result<Result<(), CallError>> {
        Ok(self.host(|c| async move { c.transfer(&target).await }).await)
    }

    async fn agent(
        &mut self,
        _call: Resource<CallHandle>,
        endpoint: String,
        params: Vec<(String, String)>,
    ) -> wasmtime::Result<Result<AgentEnd, CallError>> {
        Ok(self.host(|c| async move { c.agent(&endpoint, &params).await }).await)
    }

    async fn record(
        &mut self,
        _call: Resource<CallHandle>,
        options: RecordOptions,
    ) -> wasmtime::Result<Result<Recording, CallError>> {
        Ok(self.host(|c| async move { c.record(options).await }).await)
    }

    async fn send_dtmf(
        &mut self,
        _call: Resource<CallHandle>,
        digits: String,
    ) -> wasmtime::Result<Result<(), CallError>> {
        if let Some(bad) = digits.chars().find(|d| !matches!(d, '0'..='9' | '*' | '#' | 'A'..='D' | ',')) {
            return Ok(Err(CallError::InvalidArgument(format!("{bad:?} is not a DTMF digit"))));
        }
        Ok(self.host(|c| async move { c.send_dtmf(&digits).await }).await)
    }

    async fn next_dtmf(
        &mut self,
        _call: Resource<CallHandle>,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<Dtmf, CallError>> {
        Ok(self.host(|c| async move { c.next_dtmf(timeout_ms).await }).await)
    }

    fn open_audio_stream(
        &mut self,
        _call: Resource<CallHandle>,
    ) -> wasmtime::Result<Result<Resource<AudioStreamHandle>, CallError>> {
        if self.stream_open {
            return Ok(Err(CallError::NotAllowed("the call's audio stream is already open".into())));
        }
        // Take the handle slot first: switching the call's audio to a stream the flow never
        // receives would swallow its key presses.
        let stream = match push_limited(&mut self.table, AudioStreamHandle) {
            Ok(stream) => stream,
            Err(e) => return Ok(Err(e)),
        };
        if let Err(e) = self.control.open_audio_stream() {
            self.table.delete(stream)?;
            return Ok(Err(e));
        }
        self.stream_open = true;
        Ok(Ok(stream))
    }

    fn get_var(&mut self, _call: Resource<CallHandle>, name: String) -> wasmtime::Result<Option<String>> {
        Ok(self.vars.get(&name).cloned())
    }

    fn set_var(
        &mut self,
        _call: Resource<CallHandle>,
        name: String,
        value: String,
    ) -> wasmtime::Result<Result<(), CallError>> {
        if name.is_empty() || name.len() > MAX_VAR_NAME || value.len() > MAX_VAR_VALUE {
            return Ok(Err(CallError::InvalidArgument(format!(
                "variable names are 1..={MAX_VAR_NAME} bytes and values at most {MAX_VAR_VALUE}"
            ))));
        }
        if self.vars.len() >= MAX_VARS && !self.vars.contains_key(&name) {
            return Ok(Err(CallError::LimitExceeded(format!("at most {MAX_VARS} call variables"))));
        }
        self.vars.insert(name, value);
        Ok(Ok(()))
    }

    fn drop(&mut self, call: Resource<CallHandle>) -> wasmtime::Result<()> {
        // The host passes the call as a borrow; an owned handle can only be one the host made.
        if call.owned() {
            self.table.delete(call)?;
        }
        Ok(())
    }
}

impl log::Host for FlowState {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        self.log.write(level, &message);
        Ok(())
    }
}

impl kv::Host for FlowState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, CallError>> {
        let kv = Arc::clone(&self.kv);
        Ok(self.host(|_| async move { kv.get(&key).await }).await)
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), CallError>> {
        if let Err(e) = self.kv_writes.charge(key.len() + value.len()) {
            return Ok(Err(e));
        }
        let kv = Arc::clone(&self.kv);
        Ok(self.host(|_| async move { kv.set(&key, value).await }).await)
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<Result<(), CallError>> {
        if let Err(e) = self.kv_writes.charge(key.len()) {
            return Ok(Err(e));
        }
        let kv = Arc::clone(&self.kv);
        Ok(self.host(|_| async move { kv.delete(&key).await }).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_bytes_are_capped_over_the_run() {
        let now = Instant::now();
        let mut budget = LogBudget::new(1_000, 100, now);
        assert!(budget.take(now, 60));
        // Lines are plentiful, bytes are not: 60 + 50 would pass 100.
        assert!(!budget.take(now, 50));
        assert!(budget.take(now, 40));
        assert!(!budget.take(now + Duration::from_secs(3_600), 1), "the byte cap does not refill");
        assert_eq!(budget.dropped, 2);
    }

    #[test]
    fn log_lines_are_still_rate_limited() {
        let now = Instant::now();
        let mut budget = LogBudget::new(10, usize::MAX, now);
        let written = (0..100).filter(|_| budget.take(now, 1)).count();
        assert_eq!(written, 20, "a burst of twice the rate");
        assert!(budget.take(now + Duration::from_secs(1), 1));
    }

    #[test]
    fn kv_writes_are_capped_by_count_and_bytes() {
        let limits = FlowLimits { kv_writes_per_run: 3, kv_write_bytes_per_run: 100, ..FlowLimits::default() };
        let mut budget = KvWriteBudget::new(&limits);
        assert!(budget.charge(10).is_ok());
        assert!(matches!(budget.charge(91), Err(CallError::LimitExceeded(m)) if m.contains("bytes")));
        assert!(budget.charge(90).is_ok());
        assert!(budget.charge(0).is_ok());
        assert!(matches!(budget.charge(0), Err(CallError::LimitExceeded(m)) if m.contains("writes")));
    }
}
