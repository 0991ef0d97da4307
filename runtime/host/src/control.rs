//! The seam between flows and the call layer.
//!
//! Host functions are implemented against [`CallControl`], which the call actor (SIP dialog +
//! media session) implements. Tests implement it with a scripted fake call, so this crate
//! needs no network. Every method that waits must return [`CallError::Hangup`] as soon as the
//! call ends, so that a flow blocked in `play` or `collect-digits` unwinds at once.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use patchbay_media::Frame;

use crate::bindings::{
    AgentEnd, CallError, CallInfo, CollectOptions, Collected, DialOptions, DialOutcome, Dtmf, HangupCause, PlayOptions,
    PlayOutcome, RecordOptions, Recording,
};

/// What a flow's audio stream delivers: host frames (handles, not samples) and key presses.
#[derive(Debug, Clone)]
pub enum MediaEvent {
    /// The next frame of the caller's audio.
    Frame(Frame),
    /// A key press.
    Dtmf(Dtmf),
}

/// Call control as the flow host needs it. One value per call; the host shares it with the
/// flow's store for the call's lifetime.
#[async_trait]
pub trait CallControl: Send + Sync + 'static {
    /// Facts about the call, fixed when the flow starts.
    fn info(&self) -> CallInfo;
    /// Answers the call. Idempotent.
    async fn answer(&self) -> Result<(), CallError>;
    /// Ends the call with the given cause.
    async fn hangup(&self, cause: HangupCause) -> Result<(), CallError>;
    /// Plays a prompt from the tenant's prompt store.
    async fn play(&self, prompt: &str, options: PlayOptions) -> Result<PlayOutcome, CallError>;
    /// Collects key presses.
    async fn collect_digits(&self, options: CollectOptions) -> Result<Collected, CallError>;
    /// Waits while the call's audio keeps flowing.
    async fn sleep(&self, ms: u32) -> Result<(), CallError>;
    /// Places an outbound call and bridges it until one side hangs up.
    async fn dial(&self, target: &str, options: DialOptions) -> Result<DialOutcome, CallError>;
    /// Blind transfer (REFER or bridge).
    async fn transfer(&self, target: &str) -> Result<(), CallError>;
    /// Runs an AI agent session over a websocket.
    async fn agent(&self, endpoint: &str, params: &[(String, String)]) -> Result<AgentEnd, CallError>;
    /// Records the caller.
    async fn record(&self, options: RecordOptions) -> Result<Recording, CallError>;
    /// Sends DTMF to the caller.
    async fn send_dtmf(&self, digits: &str) -> Result<(), CallError>;
    /// Waits for the next key press outside digit collection.
    async fn next_dtmf(&self, timeout_ms: u32) -> Result<Dtmf, CallError>;
    /// Switches the call's audio to the flow's stream (frames and key presses go to
    /// [`CallControl::read_media`] from now on).
    fn open_audio_stream(&self) -> Result<(), CallError>;
    /// Switches the call's audio back from the flow's stream (the flow dropped it): key presses
    /// go to `collect-digits` / `next-dtmf` again.
    fn close_audio_stream(&self);
    /// Waits for the next frame or key press on the flow's stream.
    async fn read_media(&self) -> Result<MediaEvent, CallError>;
    /// Queues a frame to be played to the caller. Must not block: a full queue is
    /// [`CallError::LimitExceeded`].
    fn write_frame(&self, frame: Frame) -> Result<(), CallError>;
}

/// A tenant's key-value space. The host hands each flow the store of its call's tenant only.
#[async_trait]
pub trait KvStore: Send + Sync + 'static {
    /// Reads a value.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CallError>;
    /// Writes a value.
    async fn set(&self, key: &str, value: Vec<u8>) -> Result<(), CallError>;
    /// Removes a key.
    async fn delete(&self, key: &str) -> Result<(), CallError>;
}

/// Longest key a flow may use, in bytes.
pub const MAX_KV_KEY: usize = 256;

/// A tenant key-value space in process memory with a byte quota (keys + values).
///
/// Enough for one node and for tests; a shared backend implements [`KvStore`] the same way.
#[derive(Debug)]
pub struct MemoryKv {
    quota_bytes: usize,
    entries: Mutex<HashMap<String, Vec<u8>>>,
}

impl MemoryKv {
    /// An empty space holding at most `quota_bytes` of keys and values.
    pub fn new(quota_bytes: usize) -> Self {
        Self { quota_bytes, entries: Mutex::new(HashMap::new()) }
    }

    /// Bytes of keys and values held.
    pub fn used(&self) -> usize {
        self.entries().iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// The most it may hold.
    pub fn quota(&self) -> usize {
        self.quota_bytes
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        // A panic while holding this lock cannot leave the map half-updated (every update is a
        // single insert or remove), so a poisoned lock is still safe to use.
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn check_key(key: &str) -> Result<(), CallError> {
    if key.is_empty() || key.len() > MAX_KV_KEY {
        return Err(CallError::InvalidArgument(format!("kv key must be 1..={MAX_KV_KEY} bytes")));
    }
    Ok(())
}

#[async_trait]
impl KvStore for MemoryKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CallError> {
        check_key(key)?;
        Ok(self.entries().get(key).cloned())
    }

    async fn set(&self, key: &str, value: Vec<u8>) -> Result<(), CallError> {
        check_key(key)?;
        let mut entries = self.entries();
        let used: usize = entries.iter().filter(|(k, _)| k.as_str() != key).map(|(k, v)| k.len() + v.len()).sum();
        if used + key.len() + value.len() > self.quota_bytes {
            return Err(CallError::LimitExceeded(format!("tenant kv quota of {} bytes", self.quota_bytes)));
        }
        entries.insert(key.to_owned(), value);
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), CallError> {
        check_key(key)?;
        self.entries().remove(key);
        Ok(())
    }
}
