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
    /// The SIP call of each origination that is up (placed and not yet over).
    live: HashMap<String, patchbay_sip::ua::CallRef>,
    /// Where each origination with a webhook reports its changes, until it is over.
    webhooks: HashMap<String, tokio::sync::mpsc::Sender<CallView>>,
    finished: VecDeque<String>,
}

impl Originations {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a new origination, `queued`; its changes go to `webhook` as well.
    pub fn insert(&self, view: CallView, webhook: Option<tokio::sync::mpsc::Sender<CallView>>) {
        let mut inner = self.inner();
        if let Some(webhook) = webhook {
            if webhook.try_send(view.clone()).is_err() {
                tracing::warn!(id = %view.id, "webhook queue full: event dropped");
            }
            inner.webhooks.insert(view.id.clone(), webhook);
        }
        inner.calls.insert(view.id.clone(), view);
    }

    /// Notes the SIP call that carries origination `id`.
    pub fn placed(&self, id: &str, call: patchbay_sip::ua::CallRef) {
        let mut inner = self.inner();
        if inner.calls.get(id).is_some_and(|v| !v.status.is_final()) {
            inner.live.insert(id.to_owned(), call);
        }
    }

    /// The SIP call carrying origination `id`, while it is up.
    pub fn call_of(&self, id: &str) -> Option<patchbay_sip::ua::CallRef> {
        self.inner().live.get(id).copied()
    }

    /// The origination `id`, if it is known.
    pub fn get(&self, id: &str) -> Option<CallView> {
        self.inner().calls.get(id).cloned()
    }

    /// Moves `id` to `status` (a final status is never left again). Returns the view when it
    /// changed.
    pub fn update(
        &self,
        id: &str,
        status: CallStatus,
        sip_code: Option<u16>,
        reason: Option<String>,
    ) -> Option<CallView> {
        let mut inner = self.inner();
        let view = inner.calls.get_mut(id)?;
        if view.status.is_final() || (view.status == status && sip_code.is_none()) {
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
        if let Some(webhook) = inner.webhooks.get(id)
            && webhook.try_send(changed.clone()).is_err()
        {
            tracing::warn!(id, "webhook queue full: event dropped");
        }
        if status.is_final() {
            inner.webhooks.remove(id);
            inner.live.remove(id);
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

/// A new call id: 128 bits from the operating system's CSPRNG, hex.
pub fn new_call_id() -> String {
    let mut bytes = [0u8; 16];
    // getrandom fails only where the OS has no randomness source at all; such a host cannot
    // run Patchbay safely either.
    if let Err(e) = getrandom::fill(&mut bytes) {
        tracing::error!("no randomness from the OS: {e}");
    }
    hex::encode(bytes)
}
