//! A call in the endpoint: its [`LiveCall`] state, its flow's start in a task of its own,
//! and its end (media stopped, flow woken, record written).

use super::*;

pub(super) struct LiveCall {
    pub(super) ended: watch::Sender<bool>,
    pub(super) dtmf: mpsc::Sender<Dtmf>,
    pub(super) invite: rsip::Request,
    /// The flow waiting in `transfer` for the REFER's outcome.
    pub(super) transfer: Option<oneshot::Sender<Result<(), CallError>>>,
    /// Our side of the session and what was last agreed (kept for re-INVITEs, RFC 3264 §8).
    pub(super) media: Option<(patchbay_sip::sdp::LocalMedia, patchbay_sip::sdp::Negotiated)>,
    /// The RTP session, once answered.
    pub(super) rtp_session: MediaSlot,
    /// Marks played, for the flow's `play`.
    pub(super) played: watch::Sender<u64>,
    /// The call's record, filled as it goes.
    pub(super) cdr: CdrDraft,
    /// For a call placed through the API: its id (its progress is reported there).
    pub(super) origination: Option<String>,
    /// The tenant's and trunk's call slots it holds while it is up.
    pub(super) _slots: crate::trunk::CallSlots,
    /// Counts the call in its tenant's live calls while it lasts.
    pub(super) _live: crate::tenant::LiveCallGuard,
    /// Its flow's task: stopped if the flow has not returned [`FLOW_EXIT_GRACE`] after the
    /// call ended (a flow blocked in a WASI wait does not see the hang-up).
    pub(super) flow_task: Option<tokio::task::AbortHandle>,
    /// Its entry in the API's list of calls up now.
    pub(super) _listed: Listed,
}

/// How long a flow has to return after its call ended before it is stopped.
pub(super) const FLOW_EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// A call that is up, as the API lists it (`GET /v1/calls`).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct CallSummary {
    /// The API's id for it: an API call's id, else the SIP Call-ID (as in its CDR's `id`).
    pub id: String,
    /// The SIP Call-ID.
    pub call_id: String,
    /// Its tenant.
    pub tenant: String,
    /// The flow running it.
    pub flow: String,
    /// The flow's version (SHA-256 of the component) it runs on.
    pub flow_version: String,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Caller.
    pub from: String,
    /// Called.
    pub to: String,
    /// When its flow started (RFC 3339).
    pub started: String,
}

/// The calls up now, by API id, and where the endpoint knows them.
#[derive(Debug, Default)]
pub(crate) struct LiveCalls {
    calls: std::sync::Mutex<HashMap<String, (CallRef, CallSummary)>>,
}

impl LiveCalls {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (CallRef, CallSummary)>> {
        self.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lists a call until the returned entry is dropped.
    fn add(self: &Arc<Self>, call: CallRef, summary: CallSummary) -> Listed {
        let id = summary.id.clone();
        self.lock().insert(id.clone(), (call, summary));
        Listed { calls: Arc::clone(self), id }
    }

    /// The calls of the tenants `visible` accepts, oldest first.
    pub(crate) fn list(&self, visible: impl Fn(&str) -> bool) -> Vec<CallSummary> {
        let mut all: Vec<_> =
            self.lock().values().filter(|(_, s)| visible(&s.tenant)).map(|(_, s)| s.clone()).collect();
        all.sort_by(|a, b| a.started.cmp(&b.started).then_with(|| a.id.cmp(&b.id)));
        all
    }

    /// The call with this API id.
    pub(crate) fn find(&self, id: &str) -> Option<(CallRef, CallSummary)> {
        self.lock().get(id).cloned()
    }
}

/// A call's entry in [`LiveCalls`], removed when dropped (with the call).
#[derive(Debug)]
pub(super) struct Listed {
    calls: Arc<LiveCalls>,
    id: String,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.calls.lock().remove(&self.id);
    }
}

impl LiveCall {
    /// Answers a re-INVITE's offer with the same local media and a bumped `o=` version.
    pub(super) fn reinvite(&mut self, call: CallRef, offer: &[u8], routing: &Routing) -> Result<Vec<u8>, u16> {
        answer_reoffer(self.rtp_session.get().map(|m| &**m), &mut self.media, call, offer, routing)
    }
}

/// A call's flow side channels: key presses in, marks played out.
pub(crate) struct CallChannels {
    pub(super) dtmf: mpsc::Sender<Dtmf>,
    pub(super) dtmf_rx: mpsc::Receiver<Dtmf>,
    pub(super) played: watch::Sender<u64>,
    pub(super) played_rx: watch::Receiver<u64>,
}

impl CallChannels {
    pub(crate) fn new() -> Self {
        // Bounded: a flow that never reads key presses must not let a peer grow this queue.
        let (dtmf, dtmf_rx) = mpsc::channel(DTMF_QUEUE);
        let (played, played_rx) = watch::channel(0);
        Self { dtmf, dtmf_rx, played, played_rx }
    }
}

/// What it takes to start a call's flow: an inbound call routed to it, or a call placed
/// through the API that was just answered.
pub(super) struct FlowStart {
    pub(super) call: CallRef,
    pub(super) info: CallInfo,
    pub(super) flow: Arc<patchbay_host::CompiledFlow>,
    pub(super) tenant: Arc<crate::tenant::Tenant>,
    pub(super) vars: std::collections::BTreeMap<String, String>,
    pub(super) refer: bool,
    pub(super) invite: rsip::Request,
    /// An answered call's running media, channels, and what was agreed.
    pub(super) media:
        Option<(Arc<CallMedia>, CallChannels, (patchbay_sip::sdp::LocalMedia, patchbay_sip::sdp::Negotiated))>,
    pub(super) cdr: CdrDraft,
    pub(super) origination: Option<String>,
    pub(super) slots: crate::trunk::CallSlots,
    /// The call's slot in its tenant's share of the flow instance pool.
    pub(super) instance: tokio::sync::OwnedSemaphorePermit,
}

/// Makes `start.call` a live call and runs its flow in a task of its own; the flow's end
/// comes back as [`Command::FlowDone`].
pub(super) fn start_flow(
    calls: &mut HashMap<CallRef, LiveCall>,
    routing: &Arc<Routing>,
    engine: &Arc<FlowEngine>,
    commands: &mpsc::UnboundedSender<Command>,
    start: FlowStart,
) {
    let FlowStart { call, info, flow, tenant, vars, refer, invite, media, cdr, origination, slots, instance } = start;
    let (ended, ended_rx) = watch::channel(false);
    let rtp_session: MediaSlot = Arc::default();
    let (channels, agreed) = match media {
        Some((running, channels, agreed)) => {
            let _ = rtp_session.set(running);
            (channels, Some(agreed))
        }
        None => (CallChannels::new(), None),
    };
    let CallChannels { dtmf, dtmf_rx, played, played_rx } = channels;
    let summary = CallSummary {
        id: origination.clone().unwrap_or_else(|| info.call_id.clone()),
        call_id: info.call_id.clone(),
        tenant: info.tenant.clone(),
        flow: info.flow.clone(),
        flow_version: flow.version().to_owned(),
        direction: match info.direction {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        },
        from: info.from.clone(),
        to: info.to.clone(),
        started: crate::cdr::rfc3339(std::time::SystemTime::now()),
    };
    let listed = routing.live.add(call, summary);
    calls.insert(
        call,
        LiveCall {
            ended,
            dtmf,
            invite,
            media: agreed,
            transfer: None,
            rtp_session: Arc::clone(&rtp_session),
            played,
            cdr,
            origination,
            _slots: slots,
            _live: tenant.call_started(),
            flow_task: None,
            _listed: listed,
        },
    );
    let control = Arc::new(SipCall::new(
        call,
        info,
        commands.clone(),
        ended_rx,
        dtmf_rx,
        rtp_session,
        played_rx,
        Arc::clone(&tenant),
        Arc::clone(routing),
        refer,
    ));
    let (engine, commands) = (Arc::clone(engine), commands.clone());
    let kv: Arc<dyn patchbay_host::KvStore> = Arc::clone(&tenant.kv) as Arc<dyn patchbay_host::KvStore>;
    let limits = tenant.limits;
    let flow_call = FlowCall { control, kv, vars, limits: Some(limits) };
    // The flow runs in a task of its own: should the host panic inside it, or the flow be
    // stopped after its call, the call still gets its FlowDone (and so its hang-up and its
    // record). The tenant's instance slot is held for as long as the instance lives.
    let task = tokio::spawn(async move {
        let exit = engine.run(&flow, flow_call).await;
        drop(instance);
        exit
    });
    if let Some(live) = calls.get_mut(&call) {
        live.flow_task = Some(task.abort_handle());
        if live.media.is_none() {
            let commands = commands.clone();
            tokio::spawn(async move {
                tokio::time::sleep(MAX_RING).await;
                let _ = commands.send(Command::RingTimeout { call });
            });
        }
    }
    tokio::spawn(async move {
        let exit = match task.await {
            Ok(exit) => exit,
            Err(e) if e.is_cancelled() => {
                tracing::warn!(?call, "the flow had not returned {FLOW_EXIT_GRACE:?} after its call ended: stopped");
                let detail = Some(format!("the flow had not returned {FLOW_EXIT_GRACE:?} after its call ended"));
                let end = FlowEnd { outcome: "flow-stopped", detail, vars: Default::default() };
                let _ = commands.send(Command::FlowDone { call, end });
                return;
            }
            Err(e) => {
                tracing::error!(?call, "the flow's task failed: {e}");
                let detail = Some(e.to_string());
                let end = FlowEnd { outcome: "host-error", detail, vars: Default::default() };
                let _ = commands.send(Command::FlowDone { call, end });
                return;
            }
        };
        let detail = match &exit.outcome {
            FlowOutcome::Completed => None,
            FlowOutcome::Failed(FlowError::Failed(message)) => Some(message.clone()),
            other => Some(format!("{other:?}")),
        };
        match &detail {
            None => tracing::info!(?call, cause = exit.outcome.cause(), "flow ended"),
            Some(detail) => tracing::info!(?call, cause = exit.outcome.cause(), "flow ended: {detail}"),
        }
        let end = FlowEnd { outcome: exit.outcome.cause(), detail, vars: exit.vars };
        let _ = commands.send(Command::FlowDone { call, end });
    });
}

/// The call's session is over (RFC 3261 §15: for us as soon as we send BYE): stop its media,
/// wake its flow, and fill in its record (written now if the flow has already ended).
pub(super) fn call_ended(
    calls: &mut HashMap<CallRef, LiveCall>,
    ending: &mut HashMap<CallRef, CdrDraft>,
    routing: &Routing,
    call: CallRef,
    cause: EndCause,
) {
    if let Some(live) = calls.remove(&call) {
        if let Some(media) = live.rtp_session.get() {
            let (stats, quality) = media.with(|s| (s.stats(), s.quality()));
            tracing::info!(
                ?call,
                rtp_in = stats.received,
                rtp_out = stats.sent,
                concealed = stats.concealed,
                lost = quality.local_cumulative_lost,
                jitter_ms = quality.local_jitter.as_secs_f64() * 1e3,
                peer_lost = ?quality.remote_cumulative_lost,
                rtt_ms = ?quality.rtt.map(|d| d.as_secs_f64() * 1e3),
                srtp_failures = stats.srtp_failures,
                "media stopped"
            );
            media.close();
        }
        let _ = live.ended.send(true);
        if let Some(task) = live.flow_task.clone() {
            // A flow that does not return once told its call is over (blocked in a WASI
            // wait, say) is stopped, so its instance is freed and its record written.
            tokio::spawn(async move {
                tokio::time::sleep(FLOW_EXIT_GRACE).await;
                task.abort();
            });
        }
        if let Some(id) = &live.origination {
            let reason = Some("answered, then hung up".to_owned());
            routing.originations.update(id, crate::originate::CallStatus::Completed, Some(200), reason);
        }
        let mut draft = live.cdr;
        let answered = draft.is_answered();
        let local = draft.local_reason().map(|(c, b)| (c.to_owned(), b));
        let local = || local.clone().unwrap_or_else(|| ("patchbay-hangup".to_owned(), "patchbay"));
        let (cause, by, sip_code) = match cause {
            EndCause::RemoteBye => ("caller-hangup".to_owned(), "caller", 200),
            EndCause::Cancelled => ("caller-cancel".to_owned(), "caller", 487),
            EndCause::LocalBye => {
                let (c, b) = local();
                (c, b, 200)
            }
            EndCause::Rejected(code) => {
                let (c, b) = local();
                (c, b, code)
            }
            EndCause::Failed(code) => ("failed".to_owned(), "callee", code),
            EndCause::AckTimeout => ("ack-timeout".to_owned(), "network", 200),
            EndCause::SessionExpired => ("session-expired".to_owned(), "network", 200),
        };
        let sip_code = if answered { 200 } else { sip_code };
        tracing::info!(?call, cause = %cause, hung_up_by = by, "call ended");
        draft.sip_ended(SipEnd { cause, by, sip_code });
        match draft.finish() {
            Some(record) => routing.cdr.write(record),
            None => {
                ending.insert(call, draft);
            }
        }
    }
}
