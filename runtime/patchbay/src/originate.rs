//! Calls placed from outside (`POST /v1/calls`): what they ask for, and their progress as the
//! API and the webhook report it.
//!
//! An origination waits at its trunk's [`crate::trunk::CallGate`] (`queued`), goes out as an
//! INVITE through the trunk (`ringing`, `early-media`), and once the callee answers runs its
//! flow like an inbound call, with direction `outbound` (`answered`). It ends `completed`
//! after an answer, else `busy`, `no-answer`, `failed` (with the SIP code) or `canceled`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::trunk::{CallSlots, Trunk};

/// Where an origination stands (the `status` of `GET /v1/calls/{id}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CallStatus {
    /// Waiting for its trunk's calls-per-second or concurrent-call cap.
    Queued,
    /// INVITE sent; the callee's phone rings (or will: 100 Trying).
    Ringing,
    /// The callee sent early media (183 with SDP).
    EarlyMedia,
    /// Answered: the flow runs.
    Answered,
    /// Answered and over.
    Completed,
    /// 486 Busy Here / 600 Busy Everywhere.
    Busy,
    /// Nobody answered within the ring timeout (or 408/480/487 from the far end).
    NoAnswer,
    /// Refused by the carrier or the callee, or unreachable (`sip_code` says which).
    Failed,
    /// Hung up through `DELETE /v1/calls/{id}` before it was answered.
    Canceled,
}

impl CallStatus {
    /// Whether the call is over.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Busy | Self::NoAnswer | Self::Failed | Self::Canceled)
    }
}

/// An origination as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CallView {
    /// The call's id (also its CDR's `id`).
    pub id: String,
    /// The tenant that placed it.
    pub tenant: String,
    /// The trunk it goes through.
    pub trunk: String,
    /// The flow that runs on answer.
    pub flow: String,
    /// The number called.
    pub to: String,
    /// The caller ID presented.
    pub from: String,
    /// Where it stands.
    pub status: CallStatus,
    /// The final SIP response when it failed (or 200 once answered).
    pub sip_code: Option<u16>,
    /// Why it failed or ended, in words.
    pub reason: Option<String>,
    /// When it was accepted (RFC 3339).
    pub created: String,
    /// When it was answered.
    pub answered: Option<String>,
    /// When it ended.
    pub ended: Option<String>,
}

/// What an origination asks for, handed from the API to the endpoint once its gate lets it go.
pub struct Origination {
    /// Its id.
    pub id: String,
    /// The trunk.
    pub trunk: Arc<Trunk>,
    /// Number to call.
    pub to: String,
    /// Caller ID (checked against the trunk).
    pub caller_id: String,
    /// Display name with it, if the call gives one.
    pub caller_name: Option<String>,
    /// Flow to run on answer.
    pub flow: String,
    /// Variables the flow starts with (the flow's configured ones, then these).
    pub vars: BTreeMap<String, String>,
    /// How long it may ring.
    pub ring_timeout: Duration,
    /// The call slots it holds until it ends.
    pub slots: CallSlots,
    /// The trunk's further targets, tried in order after a timeout or a 503 (RFC 3263 §4.3).
    pub fallback: Vec<patchbay_sip::transaction::Peer>,
    /// A provisional answer came: the ring timeout runs.
    pub ringing: bool,
    /// A target has been tried already: the next is the same call (counted once in the
    /// metrics' calls started).
    pub attempted: bool,
}

/// Finished originations kept for `GET` after they end; the oldest go first.
const KEEP_FINISHED: usize = 10_000;

/// Every origination's progress, shared by the API and the endpoint.
#[derive(Debug, Default)]
pub struct Originations {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    calls: HashMap<String, CallView>,
    /// Originations the endpoint has taken to place: from then on only the endpoint ends them
    /// (a `DELETE` goes through it), so a call can never be cancelled here and placed there.
    claimed: HashMap<String, Option<patchbay_sip::ua::CallRef>>,
    /// Where each origination with a webhook reports its changes, until it is over. Unbounded
    /// but short: a call moves forward only (see [`CallStatus::rank`]), five events at most.
    webhooks: HashMap<String, tokio::sync::mpsc::UnboundedSender<CallView>>,
    finished: VecDeque<String>,
    /// Shutting down: no new originations.
    closed: bool,
}

impl CallStatus {
    /// Calls only move forward: a 180 after a 183 does not take a call back to `ringing`.
    fn rank(self) -> u8 {
        match self {
            Self::Queued => 0,
            Self::Ringing => 1,
            Self::EarlyMedia => 2,
            Self::Answered => 3,
            _ => 4,
        }
    }
}

/// Why an origination could not be recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Patchbay is shutting down")]
pub struct ShuttingDown;

impl Originations {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a new origination, `queued`.
    pub fn insert(&self, view: CallView) -> Result<(), ShuttingDown> {
        let mut inner = self.inner();
        if inner.closed {
            return Err(ShuttingDown);
        }
        inner.calls.insert(view.id.clone(), view);
        Ok(())
    }

    /// Forgets an origination refused before it was queued (it never existed for the caller).
    pub fn remove(&self, id: &str) {
        let mut inner = self.inner();
        inner.calls.remove(id);
        inner.webhooks.remove(id);
    }

    /// Reports `id`'s changes, from its present state on, to `webhook` as well.
    pub fn watch(&self, id: &str, webhook: tokio::sync::mpsc::UnboundedSender<CallView>) {
        let mut inner = self.inner();
        let Some(view) = inner.calls.get(id).cloned() else { return };
        let _ = webhook.send(view.clone());
        if !view.status.is_final() {
            inner.webhooks.insert(id.to_owned(), webhook);
        }
    }

    /// The endpoint takes `id` to place it (or to place it again at the next target): false
    /// when it is over (cancelled while it waited).
    pub fn claim(&self, id: &str) -> bool {
        let mut inner = self.inner();
        if inner.calls.get(id).is_none_or(|v| v.status.is_final()) {
            return false;
        }
        inner.claimed.entry(id.to_owned()).or_default();
        true
    }

    /// Notes the SIP call that carries origination `id`.
    pub fn placed(&self, id: &str, call: patchbay_sip::ua::CallRef) {
        if let Some(slot) = self.inner().claimed.get_mut(id) {
            *slot = Some(call);
        }
    }

    /// The SIP call carrying origination `id`, while it is up.
    pub fn call_of(&self, id: &str) -> Option<patchbay_sip::ua::CallRef> {
        self.inner().claimed.get(id).copied().flatten()
    }

    /// Cancels `id` if it is still waiting at its gate, not yet taken by the endpoint (under
    /// the lock [`Originations::claim`] takes: one of the two wins).
    pub fn cancel_queued(&self, id: &str, reason: &str) -> Option<CallView> {
        let mut inner = self.inner();
        if inner.claimed.contains_key(id) {
            return None;
        }
        Self::update_locked(&mut inner, id, CallStatus::Canceled, None, Some(reason.to_owned()))
    }

    /// Shutting down: refuses new originations and cancels the ones still waiting at their
    /// gates; returns them (for their records).
    pub fn close(&self) -> Vec<CallView> {
        let mut inner = self.inner();
        inner.closed = true;
        let waiting: Vec<String> = inner
            .calls
            .iter()
            .filter(|(id, v)| !v.status.is_final() && !inner.claimed.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect();
        waiting
            .iter()
            .filter_map(|id| {
                let reason = Some("Patchbay shut down before it was placed".to_owned());
                Self::update_locked(&mut inner, id, CallStatus::Canceled, None, reason)
            })
            .collect()
    }

    /// The origination `id`, if it is known.
    pub fn get(&self, id: &str) -> Option<CallView> {
        self.inner().calls.get(id).cloned()
    }

    /// Moves `id` to `status` (forward only; a final status is never left again). Returns the
    /// view when it changed.
    pub fn update(
        &self,
        id: &str,
        status: CallStatus,
        sip_code: Option<u16>,
        reason: Option<String>,
    ) -> Option<CallView> {
        Self::update_locked(&mut self.inner(), id, status, sip_code, reason)
    }

    fn update_locked(
        inner: &mut Inner,
        id: &str,
        status: CallStatus,
        sip_code: Option<u16>,
        reason: Option<String>,
    ) -> Option<CallView> {
        let view = inner.calls.get_mut(id)?;
        if view.status.is_final() || status.rank() < view.status.rank() || (view.status == status && sip_code.is_none())
        {
            return None;
        }
        view.status = status;
        if sip_code.is_some() {
            view.sip_code = sip_code;
        }
        if reason.is_some() {
            view.reason = reason;
        }
        let now = crate::cdr::rfc3339(SystemTime::now());
        if status == CallStatus::Answered {
            view.answered = Some(now);
        } else if status.is_final() {
            view.ended = Some(now);
        }
        let changed = view.clone();
        if let Some(webhook) = inner.webhooks.get(id) {
            let _ = webhook.send(changed.clone());
        }
        if status.is_final() {
            inner.webhooks.remove(id);
            inner.claimed.remove(id);
            inner.finished.push_back(id.to_owned());
            while inner.finished.len() > KEEP_FINISHED {
                if let Some(old) = inner.finished.pop_front() {
                    inner.calls.remove(&old);
                }
            }
        }
        tracing::info!(id, status = ?changed.status, sip_code = ?changed.sip_code, "origination");
        Some(changed)
    }
}

/// A new call id: 128 bits from the operating system's CSPRNG, hex. An error when the OS has
/// no randomness to give (never fall back to a guessable id: ids are capabilities).
pub fn new_call_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// The record of a call refused before it was placed.
pub fn write_refused(cdr: &crate::cdr::CdrSink, view: &CallView, cause: &str) {
    let info = patchbay_host::CallInfo {
        call_id: String::new(),
        tenant: view.tenant.clone(),
        flow: view.flow.clone(),
        from: view.from.clone(),
        to: view.to.clone(),
        direction: patchbay_host::Direction::Outbound,
        headers: Vec::new(),
    };
    let mut draft = crate::cdr::CdrDraft::new(&info, "");
    draft.set_id(&view.id);
    let sip = crate::cdr::SipEnd { cause: cause.to_owned(), by: "patchbay", sip_code: 0 };
    let flow = crate::cdr::FlowEnd { outcome: "not-run", detail: None, vars: Default::default() };
    if let Some(record) = draft.close(sip, flow) {
        cdr.write(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: &str) -> CallView {
        CallView {
            id: id.into(),
            tenant: "t".into(),
            trunk: "c".into(),
            flow: "f".into(),
            to: "+1".into(),
            from: "+2".into(),
            status: CallStatus::Queued,
            sip_code: None,
            reason: None,
            created: String::new(),
            answered: None,
            ended: None,
        }
    }

    #[test]
    fn a_claimed_call_is_not_cancelled_behind_the_endpoints_back_and_a_cancelled_one_is_not_placed() {
        let store = Originations::default();
        store.insert(view("a")).expect("open");
        store.insert(view("b")).expect("open");
        assert!(store.claim("a"));
        assert!(store.cancel_queued("a", "api").is_none(), "the endpoint has it: DELETE goes through it");
        assert!(store.cancel_queued("b", "api").is_some());
        assert!(!store.claim("b"), "cancelled while queued: never placed");
    }

    #[test]
    fn calls_move_forward_only_and_webhooks_see_each_step_once() {
        let store = Originations::default();
        store.insert(view("a")).expect("open");
        let (hook, mut events) = tokio::sync::mpsc::unbounded_channel();
        store.watch("a", hook);
        store.update("a", CallStatus::Ringing, None, None);
        store.update("a", CallStatus::EarlyMedia, None, None);
        assert!(store.update("a", CallStatus::Ringing, None, None).is_none(), "a 180 after a 183");
        store.update("a", CallStatus::Answered, Some(200), None);
        store.update("a", CallStatus::Completed, Some(200), None);
        assert!(store.update("a", CallStatus::Failed, Some(500), None).is_none(), "final stays final");
        let mut seen = Vec::new();
        while let Ok(view) = events.try_recv() {
            seen.push(view.status);
        }
        use CallStatus::*;
        assert_eq!(seen, [Queued, Ringing, EarlyMedia, Answered, Completed]);
    }

    #[test]
    fn shutting_down_cancels_what_waits_and_refuses_new_calls() {
        let store = Originations::default();
        store.insert(view("waiting")).expect("open");
        store.insert(view("placed")).expect("open");
        assert!(store.claim("placed"));
        let cancelled = store.close();
        assert_eq!(cancelled.len(), 1);
        assert_eq!((cancelled[0].id.as_str(), cancelled[0].status), ("waiting", CallStatus::Canceled));
        assert_eq!(store.get("placed").map(|v| v.status), Some(CallStatus::Queued));
        assert_eq!(store.insert(view("new")), Err(ShuttingDown));
    }
}
