//! One round of load: place N calls at a rate, hold them all up for a while, hang them up, and
//! report what the calls saw (set-up times, failures, RTP loss and pacing) and what the measured
//! processes spent (CPU, memory).
//!
//! Signalling uses Patchbay's own sans-IO user agent core (`patchbay-sip`: transactions,
//! retransmissions, dialogs), driven here from one UDP socket; calls offered to us (the far end
//! of a bridged call) are answered on the same socket. Media runs on the [`RtpEngine`] thread.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use patchbay_sip::message::{Limits, Parsed, parse_datagram};
use patchbay_sip::sdp::{self, LocalMedia};
use patchbay_sip::transaction::{Peer, TimerConfig, Transport};
use patchbay_sip::ua::{CallRef, Dial, EndCause, UaConfig, UaEvent, UaOutput, UserAgent};
use serde::Serialize;
use tokio::net::UdpSocket;

use crate::procstat::{self, ProcSample};
use crate::rtp::{EngineReport, RtpEngine, StreamSpec};
use crate::stats::{MsSummary, Summary};

/// What one round does.
#[derive(Debug, Clone)]
pub struct Round {
    /// Where to send INVITEs.
    pub target: SocketAddr,
    /// Request URI.
    pub uri: String,
    /// Concurrent calls.
    pub calls: usize,
    /// New calls per second while ramping up (and BYEs per second when tearing down).
    pub rate: f64,
    /// How long all calls stay up together (the measurement window), after `settle`.
    pub hold: Duration,
    /// Wait after the last call is answered before measuring (prompts start, flows settle).
    pub settle: Duration,
    /// DTMF keys the caller presses, and when after the answer.
    pub keys: Option<(String, Duration)>,
    /// Processes to measure, by name.
    pub pids: Vec<(String, u32)>,
}

/// What one process spent during the window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessFigures {
    /// Name given on the command line.
    pub name: String,
    /// CPU used during the window, percent of one core.
    pub cpu_percent: f64,
    /// The kernel's part of it (system calls, the network stack), percent of one core.
    pub system_percent: f64,
    /// CPU µs per call-second (calls up × window seconds).
    pub cpu_us_per_call_second: f64,
    /// Resident memory at the start of the window, MiB.
    pub rss_mib: f64,
    /// Growth of resident memory from before the round to the window, per call, KiB.
    pub rss_kib_per_call: f64,
}

/// Everything a round measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoundReport {
    /// Request URI.
    pub uri: String,
    /// Calls placed.
    pub calls: usize,
    /// Calls answered.
    pub answered: usize,
    /// Calls offered to us (far ends of bridged calls) and answered.
    pub callee_legs: usize,
    /// Calls that failed before being answered, by SIP status (408: no final answer).
    pub failed: BTreeMap<u16, usize>,
    /// Answered calls the far side ended before we hung up.
    pub dropped: usize,
    /// INVITE sent → 200 OK received.
    pub setup: MsSummary,
    /// Measurement window, seconds.
    pub window_s: f64,
    /// Streams (caller and callee legs) measured.
    pub streams: usize,
    /// Packets received on all streams.
    pub packets_received: u64,
    /// Packets lost on all streams (sequence gaps; duplicates do not offset loss).
    pub packets_lost: u64,
    /// Streams that received nothing.
    pub silent_streams: usize,
    /// Streams (each call's audio toward the generator; a bridged call has two) that lost any
    /// packet.
    pub streams_with_loss: usize,
    /// The most packets any one stream lost.
    pub worst_stream_loss: u64,
    /// Packets that arrived after a later one.
    pub reordered: u64,
    /// Deviation of each packet's arrival from 20 ms after the previous one of its stream, over
    /// the window: the pacing of what the target sends, as received.
    pub arrival_jitter: Summary,
    /// Largest RFC 3550 interarrival jitter of any stream, ms.
    pub max_rfc3550_jitter_ms: f64,
    /// Packets whose source matched no stream.
    pub unknown_source: u64,
    /// Datagrams our own socket dropped (a generator limit, not the target's loss).
    pub generator_socket_drops: u64,
    /// Generator ticks run late (the generator could not keep up).
    pub generator_late_ticks: u64,
    /// Datagrams the kernel refused to send (e.g. the far port was closed).
    pub generator_send_errors: u64,
    /// Per measured process (the generator itself is `loadgen`).
    pub processes: Vec<ProcessFigures>,
    /// Zero failures, drops, loss and silent streams, and arrival jitter p99 ≤ 2 ms.
    pub pass: bool,
}

impl RoundReport {
    /// Every call was answered and stayed up, and at most 0.1 % of the packets were lost.
    pub fn carried(&self) -> bool {
        self.failed.is_empty()
            && self.answered == self.calls
            && self.dropped == 0
            && self.packets_lost * 1000 <= self.packets_received
    }
}

/// How long a call may ring before the generator cancels it.
const RING_TIMEOUT: Duration = Duration::from_secs(32);

#[derive(Debug)]
struct CallState {
    /// Caller legs have a stream once answered; callee legs at once.
    stream: Option<usize>,
    caller: bool,
    invited: Instant,
    answered: bool,
    hung_up: bool,
}

/// Places calls from one SIP socket and one RTP engine; rounds run one after another.
pub struct LoadGenerator {
    socket: Arc<UdpSocket>,
    ua: UserAgent,
    engine: RtpEngine,
    limits: Limits,
    calls: HashMap<CallRef, CallState>,
    next_stream: usize,
    round: RoundState,
}

#[derive(Debug, Default)]
struct RoundState {
    /// The SDP offer every call of the round sends.
    offer: String,
    keys: Option<(String, Duration)>,
    answered: usize,
    callee_legs: usize,
    failed: BTreeMap<u16, usize>,
    dropped: usize,
    setup_ms: Vec<f64>,
}

impl LoadGenerator {
    /// Binds SIP at `sip_bind` and RTP at `rtp_bind`.
    pub async fn new(sip_bind: SocketAddr, rtp_bind: SocketAddr) -> anyhow::Result<Self> {
        let socket = UdpSocket::bind(sip_bind).await.with_context(|| format!("binding SIP to {sip_bind}"))?;
        let local = socket.local_addr().context("SIP address")?;
        let engine = RtpEngine::start(rtp_bind).with_context(|| format!("binding RTP to {rtp_bind}"))?;
        let seed = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), local);
        let ua = UserAgent::new(UaConfig {
            contact_host: local.to_string(),
            user_agent: format!("patchbay-loadgen/{}", env!("CARGO_PKG_VERSION")),
            timers: TimerConfig::default(),
            // A load generator: a fixed key per run is all it needs.
            rng_key: patchbay_sip::ua::RngKey::fixed(seed),
        });
        Ok(Self {
            socket: Arc::new(socket),
            ua,
            engine,
            limits: Limits::default(),
            calls: HashMap::new(),
            next_stream: 0,
            round: RoundState::default(),
        })
    }

    fn local_media(&self) -> LocalMedia {
        let mut media = LocalMedia::new(self.engine.local_addr(), None, 1, 1);
        media.codecs = vec![sdp::AudioCodec::Pcmu];
        // The generator's one socket carries RTP only: RTCP stays on port + 1, unread.
        media.rtcp_mux = false;
        media
    }

    fn new_stream(&mut self, spec: StreamSpec) -> usize {
        let id = self.next_stream;
        self.next_stream += 1;
        self.engine.start_stream(id, spec);
        id
    }

    /// Runs one round; calls still up at the end are hung up.
    pub async fn run(&mut self, round: &Round) -> anyhow::Result<RoundReport> {
        self.round = RoundState { keys: round.keys.clone(), ..RoundState::default() };
        let _ = self.engine.report(true);
        self.next_stream = 0;
        let me = std::process::id();
        let mut pids = round.pids.clone();
        pids.push(("loadgen".into(), me));
        let before: Vec<Option<ProcSample>> = pids.iter().map(|(_, pid)| procstat::sample(*pid)).collect();

        let target: rsip::Uri =
            rsip::Uri::try_from(round.uri.as_str()).with_context(|| format!("not a SIP URI: {}", round.uri))?;
        // Every call offers the same SDP: one RTP socket serves them all.
        let offer = sdp::offer(&self.local_media()).context("building the SDP offer")?;
        self.round.offer = offer.clone();
        let interval = Duration::from_secs_f64(1.0 / round.rate.max(0.1));
        let started = Instant::now();
        let mut dialled = 0;
        let mut window: Option<(Instant, Vec<Option<ProcSample>>)> = None;
        let mut all_up_at: Option<Instant> = None;
        let mut window_end: Option<Instant> = None;
        let mut hung_up = 0usize;
        let mut teardown_started: Option<Instant> = None;
        let mut next_stuck_check = started + RING_TIMEOUT;
        let mut report = RoundReport { uri: round.uri.clone(), calls: round.calls, ..RoundReport::default() };
        let mut buf = vec![0u8; 65_536];
        loop {
            let now = Instant::now();
            // Ramp: every call due by now.
            while dialled < round.calls && started + interval * dialled as u32 <= now {
                let call = self.ua.dial(
                    now,
                    Dial {
                        peer: Peer { transport: Transport::Udp, addr: round.target },
                        target: target.clone(),
                        from: "<sip:loadgen@invalid>".into(),
                        to: None,
                        sdp: offer.clone().into_bytes(),
                        credentials: None,
                        headers: Vec::new(),
                    },
                );
                self.calls.insert(
                    call,
                    CallState { stream: None, caller: true, invited: now, answered: false, hung_up: false },
                );
                dialled += 1;
            }
            // A call still unanswered after RING_TIMEOUT (ringing forever: an INVITE
            // transaction that got a provisional response has no timeout of its own, RFC 3261
            // §17.1.1.2) is cancelled and counts as failed. Looked for once a second, not on
            // every datagram.
            let stuck: Vec<CallRef> = if now < next_stuck_check {
                Vec::new()
            } else {
                next_stuck_check = now + Duration::from_secs(1);
                self.calls
                    .iter()
                    .filter(|(_, c)| {
                        c.caller && !c.answered && !c.hung_up && now.duration_since(c.invited) > RING_TIMEOUT
                    })
                    .map(|(call, _)| *call)
                    .collect()
            };
            for call in stuck {
                if let Some(c) = self.calls.get_mut(&call) {
                    c.hung_up = true;
                }
                let _ = self.ua.hangup(now, call);
            }
            self.pump(now).await;
            let settled = self.round.answered + self.round.failed.values().sum::<usize>();
            if all_up_at.is_none() && dialled == round.calls && settled >= round.calls {
                all_up_at = Some(now);
            }
            if let Some(up) = all_up_at
                && window.is_none()
                && now >= up + round.settle
            {
                self.engine.measure(true);
                window = Some((now, pids.iter().map(|(_, pid)| procstat::sample(*pid)).collect()));
                window_end = Some(now + round.hold);
            }
            if let (Some(end), None) = (window_end, teardown_started)
                && now >= end
            {
                self.engine.measure(false);
                let end_samples: Vec<Option<ProcSample>> = pids.iter().map(|(_, pid)| procstat::sample(*pid)).collect();
                if let Some((start, start_samples)) = &window {
                    report.window_s = now.duration_since(*start).as_secs_f64();
                    report.processes = process_figures(
                        &pids,
                        &before,
                        start_samples,
                        &end_samples,
                        report.window_s,
                        self.round.answered,
                    );
                }
                teardown_started = Some(now);
            }
            // Teardown: hang up the callers at the ramp rate.
            if let Some(since) = teardown_started {
                let due = ((now.duration_since(since).as_secs_f64() * round.rate.max(0.1)) as usize + 1).min(dialled);
                if hung_up < due {
                    let mut to_hang: Vec<CallRef> = self
                        .calls
                        .iter()
                        .filter(|(_, c)| c.caller && !c.hung_up)
                        .map(|(call, _)| *call)
                        .take(due - hung_up)
                        .collect();
                    to_hang.sort();
                    for call in to_hang {
                        if let Some(c) = self.calls.get_mut(&call) {
                            c.hung_up = true;
                        }
                        hung_up += 1;
                        // An unanswered call is cancelled, an answered one gets a BYE.
                        let _ = self.ua.hangup(now, call);
                    }
                    self.pump(now).await;
                }
                if self.calls.is_empty() {
                    break;
                }
                if now.duration_since(since) > Duration::from_secs(40) + interval * dialled as u32 {
                    warn(&format!("{} calls did not end in time", self.calls.len()));
                    break;
                }
            }
            // Sleep until the next thing to do or a datagram.
            let mut wake = now + Duration::from_millis(20);
            if let Some(t) = self.ua.poll_timeout() {
                wake = wake.min(t);
            }
            if dialled < round.calls {
                wake = wake.min(started + interval * dialled as u32);
            }
            let deadline = tokio::time::Instant::from_std(wake.max(now));
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => {
                    if let Ok((len, from)) = received {
                        self.on_datagram(&buf[..len], from);
                    }
                    // Whatever else is queued, without waiting.
                    while let Ok((len, from)) = self.socket.try_recv_from(&mut buf) {
                        self.on_datagram(&buf[..len], from);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
            self.ua.handle_timeout(Instant::now());
        }
        // Streams may still be receiving the last packets in flight.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let rtp = self.engine.report(true);
        self.calls.clear();
        self.fill(&mut report, &rtp);
        Ok(report)
    }

    fn fill(&mut self, report: &mut RoundReport, rtp: &EngineReport) {
        let r = std::mem::take(&mut self.round);
        report.answered = r.answered;
        report.callee_legs = r.callee_legs;
        report.failed = r.failed;
        report.dropped = r.dropped;
        let mut setup = r.setup_ms;
        report.setup = MsSummary::of(&mut setup);
        fill_rtp(report, rtp);
    }

    fn on_datagram(&mut self, bytes: &[u8], from: SocketAddr) {
        let Ok(Parsed::Sip(message)) = parse_datagram(bytes, &self.limits) else { return };
        self.ua.handle_receive(Instant::now(), Peer { transport: Transport::Udp, addr: from }, message);
    }

    /// Sends what the user agent wants sent and acts on its events.
    async fn pump(&mut self, now: Instant) {
        while let Some(output) = self.ua.poll_output() {
            match output {
                UaOutput::Transmit { peer, message } => {
                    let bytes = message.to_string().into_bytes();
                    if self.socket.try_send_to(&bytes, peer.addr).is_err() {
                        let _ = self.socket.send_to(&bytes, peer.addr).await;
                    }
                }
                UaOutput::Event(event) => self.on_event(now, event),
            }
        }
    }

    fn on_event(&mut self, now: Instant, event: UaEvent) {
        match event {
            UaEvent::Answered { call, sdp } => {
                let Some(state) = self.calls.get(&call) else { return };
                let invited = state.invited;
                let keys = self.round.keys.clone();
                self.round.answered += 1;
                self.round.setup_ms.push(now.duration_since(invited).as_secs_f64() * 1e3);
                let stream = match sdp::accept_answer(&self.round.offer, &String::from_utf8_lossy(&sdp)) {
                    Ok(n) => Some(self.new_stream(StreamSpec {
                        remote: n.remote_rtp,
                        payload_type: n.codec.payload_type,
                        telephone_event: n.telephone_event,
                        keys,
                        ssrc: ssrc_for(call),
                    })),
                    Err(e) => {
                        warn(&format!("unusable SDP answer: {e}"));
                        None
                    }
                };
                if let Some(state) = self.calls.get_mut(&call) {
                    state.answered = true;
                    state.stream = stream;
                }
            }
            UaEvent::IncomingCall { call, request, .. } => {
                let offer = String::from_utf8_lossy(&request.body).into_owned();
                match sdp::answer(&offer, &self.local_media()) {
                    Ok(n) => {
                        let _ = self.ua.answer(now, call, n.local_sdp.clone().into_bytes());
                        self.round.callee_legs += 1;
                        let stream = self.new_stream(StreamSpec {
                            remote: n.remote_rtp,
                            payload_type: n.codec.payload_type,
                            telephone_event: n.telephone_event,
                            keys: None,
                            ssrc: ssrc_for(call) ^ 0x8000_0000,
                        });
                        self.calls.insert(
                            call,
                            CallState {
                                stream: Some(stream),
                                caller: false,
                                invited: now,
                                answered: true,
                                hung_up: false,
                            },
                        );
                    }
                    Err(e) => {
                        let _ = self.ua.reject(now, call, e.sip_status());
                    }
                }
            }
            UaEvent::ReInvite { call, .. } => {
                // Not part of any scenario: keep the session as it is.
                let sdp = self.ua.local_sdp(call).map(<[u8]>::to_vec);
                let _ = self.ua.answer_reinvite(now, call, sdp.ok_or(488));
            }
            UaEvent::Ended { call, cause } => {
                let Some(state) = self.calls.remove(&call) else { return };
                if let Some(stream) = state.stream {
                    self.engine.stop_stream(stream);
                }
                if !state.caller {
                    return;
                }
                if !state.answered {
                    let code = match cause {
                        EndCause::Failed(code) | EndCause::Rejected(code) => code,
                        // We gave up on it (ring timeout, or the round ended): no final answer.
                        EndCause::Cancelled if state.hung_up => 408,
                        EndCause::Cancelled => 487,
                        _ => 0,
                    };
                    *self.round.failed.entry(code).or_default() += 1;
                } else if !state.hung_up {
                    self.round.dropped += 1;
                }
            }
            UaEvent::Progress { .. }
            | UaEvent::Confirmed { .. }
            | UaEvent::ReInviteAnswered { .. }
            | UaEvent::Transfer { .. }
            | UaEvent::InfoDtmf { .. }
            | UaEvent::Registration { .. }
            | UaEvent::PingAnswered { .. } => {}
        }
    }
}

fn ssrc_for(call: CallRef) -> u32 {
    (call.0 as u32).wrapping_mul(0x9E37_79B9) | 1
}

/// The generator reports on stderr (its stdout carries the JSON reports).
fn warn(message: &str) {
    eprintln!("loadgen: {message}");
}

/// Fills the RTP figures of a report and decides whether the round passed.
pub fn fill_rtp(report: &mut RoundReport, rtp: &EngineReport) {
    report.streams = rtp.streams.len();
    report.packets_received = rtp.streams.iter().map(|s| s.received).sum();
    report.packets_lost = rtp.streams.iter().map(|s| s.lost.max(0) as u64).sum();
    report.silent_streams = rtp.streams.iter().filter(|s| s.received == 0).count();
    report.streams_with_loss = rtp.streams.iter().filter(|s| s.lost > 0).count();
    report.worst_stream_loss = rtp.streams.iter().map(|s| s.lost.max(0) as u64).max().unwrap_or(0);
    report.reordered = rtp.streams.iter().map(|s| s.reordered).sum();
    report.max_rfc3550_jitter_ms = rtp.streams.iter().map(|s| s.jitter_ms).fold(0.0, f64::max);
    report.arrival_jitter = rtp.gaps.summary();
    report.unknown_source = rtp.unknown_source;
    report.generator_socket_drops = rtp.socket_drops;
    report.generator_late_ticks = rtp.late_ticks;
    report.generator_send_errors = rtp.send_errors;
    report.pass = report.failed.is_empty()
        && report.answered == report.calls
        && report.dropped == 0
        && report.packets_lost == 0
        && report.silent_streams == 0
        && report.arrival_jitter.p99_us <= 2_000;
}

/// CPU and memory figures of each measured process over the window.
pub fn process_figures(
    pids: &[(String, u32)],
    before: &[Option<ProcSample>],
    start: &[Option<ProcSample>],
    end: &[Option<ProcSample>],
    seconds: f64,
    calls: usize,
) -> Vec<ProcessFigures> {
    let up = calls.max(1) as f64;
    let mut figures = Vec::new();
    for (i, (name, _)) in pids.iter().enumerate() {
        let (Some(a), Some(b)) = (start[i], end[i]) else { continue };
        let cpu = b.cpu.saturating_sub(a.cpu).as_secs_f64();
        let system = b.system.saturating_sub(a.system).as_secs_f64();
        let base = before[i].map_or(a.rss_kib, |s| s.rss_kib);
        figures.push(ProcessFigures {
            name: name.clone(),
            cpu_percent: 100.0 * cpu / seconds,
            system_percent: 100.0 * system / seconds,
            cpu_us_per_call_second: cpu * 1e6 / (up * seconds),
            rss_mib: a.rss_kib as f64 / 1024.0,
            rss_kib_per_call: (a.rss_kib as f64 - base as f64) / up,
        });
    }
    figures
}
