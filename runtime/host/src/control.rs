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
/// The bytes held are kept as a running total, so a write costs the same however many keys
/// the space holds.
#[derive(Debug)]
pub struct MemoryKv {
    quota_bytes: usize,
    space: Mutex<Space>,
}

/// The entries and their size, changed together under one lock.
#[derive(Debug, Default)]
struct Space {
    entries: HashMap<String, Vec<u8>>,
    /// Sum of `key.len() + value.len()` over `entries`.
    used_bytes: usize,
}

fn entry_size(key: &str, value: &[u8]) -> usize {
    key.len() + value.len()
}

impl MemoryKv {
    /// An empty space holding at most `quota_bytes` of keys and values.
    pub fn new(quota_bytes: usize) -> Self {
        Self { quota_bytes, space: Mutex::new(Space::default()) }
    }

    /// Bytes of keys and values held.
    pub fn used(&self) -> usize {
        self.space().used_bytes
    }

    /// The most it may hold.
    pub fn quota(&self) -> usize {
        self.quota_bytes
    }

    fn space(&self) -> std::sync::MutexGuard<'_, Space> {
        // Every update checks first and then changes the map and the total with no fallible
        // step between them, so a panic cannot leave them disagreeing: a poisoned lock is
        // still safe to use.
        self.space.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
        Ok(self.space().entries.get(key).cloned())
    }

    async fn set(&self, key: &str, value: Vec<u8>) -> Result<(), CallError> {
        check_key(key)?;
        let mut space = self.space();
        let replaced = space.entries.get(key).map_or(0, |old| entry_size(key, old));
        let after = space.used_bytes - replaced + entry_size(key, &value);
        if after > self.quota_bytes {
            return Err(CallError::LimitExceeded(format!("tenant kv quota of {} bytes", self.quota_bytes)));
        }
        space.entries.insert(key.to_owned(), value);
        space.used_bytes = after;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), CallError> {
        check_key(key)?;
        let mut space = self.space();
        if let Some(old) = space.entries.remove(key) {
            space.used_bytes -= entry_size(key, &old);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    impl MemoryKv {
        /// The total recomputed from the entries, the slow way.
        fn recount(&self) -> usize {
            self.space().entries.iter().map(|(k, v)| entry_size(k, v)).sum()
        }
    }

    /// A small deterministic generator (xorshift), so the sequence is the same on every run.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[tokio::test]
    async fn the_running_total_matches_the_entries_through_sets_overwrites_and_deletes() {
        let kv = MemoryKv::new(4_096);
        let mut state = 0x9e37_79b9_7f4a_7c15;
        for step in 0..20_000 {
            let key = format!("k{}", next(&mut state) % 24);
            match next(&mut state) % 4 {
                0 => kv.delete(&key).await.unwrap(),
                _ => {
                    let len = usize::try_from(next(&mut state) % 600).unwrap();
                    let before = kv.used();
                    match kv.set(&key, vec![0; len]).await {
                        Ok(()) => {}
                        // Refused: nothing changed, and it was refused because it would not fit.
                        Err(CallError::LimitExceeded(_)) => {
                            assert_eq!(kv.used(), before, "step {step}");
                            let current = kv.get(&key).await.unwrap().map_or(0, |v| entry_size(&key, &v));
                            assert!(before - current + key.len() + len > kv.quota(), "step {step}");
                        }
                        Err(e) => panic!("step {step}: {e:?}"),
                    }
                }
            }
            assert_eq!(kv.used(), kv.recount(), "step {step}");
            assert!(kv.used() <= kv.quota(), "step {step}");
        }
    }

    #[tokio::test]
    async fn the_quota_counts_an_overwrite_once() {
        let kv = MemoryKv::new(10);
        kv.set("k", vec![0; 9]).await.unwrap();
        // Replacing the value frees the old one first: 1 + 9 fits again.
        kv.set("k", vec![1; 9]).await.unwrap();
        assert!(matches!(kv.set("j", vec![]).await, Err(CallError::LimitExceeded(_))));
        kv.delete("k").await.unwrap();
        kv.delete("k").await.unwrap();
        assert_eq!(kv.used(), 0);
        kv.set("j", vec![0; 9]).await.unwrap();
        assert_eq!(kv.used(), 10);
    }

    #[tokio::test]
    async fn a_write_into_a_large_space_keeps_the_total_without_recounting() {
        let kv = MemoryKv::new(usize::MAX);
        for i in 0..50_000 {
            kv.set(&format!("key-{i}"), vec![0; 8]).await.unwrap();
        }
        let before = kv.used();
        assert_eq!(before, kv.recount());
        // One write changes the total by exactly its own size: the bookkeeping is an update
        // of the running sum, not a walk over 50,000 entries.
        kv.set("key-7", vec![0; 100]).await.unwrap();
        assert_eq!(kv.used(), before - 8 + 100);
        kv.set("new", vec![0; 5]).await.unwrap();
        assert_eq!(kv.used(), before - 8 + 100 + 3 + 5);
        assert_eq!(kv.used(), kv.recount());
    }
}
