//! One call's media stream, sans-IO: what arrives from the peer and what goes out every
//! packetisation interval.
//!
//! ```text
//!   receive(now, from, datagram) ─► strict source → (SRTP) → parse → latch → stats → DTMF | jitter buffer
//!   tick(now, out)               ─► one packet per ptime: DTMF digits, queued audio, or silence
//!   take_received(now)           ─► the jitter buffer's frame for this interval (to a flow/agent)
//!   poll_event()                 ─► key presses, "audio stopped" (RTP timeout), played marks
//! ```
//!
//! The shell calls [`MediaSession::tick`] for every call from one shared clock (no timer per
//! call) and sends what it returns. Whatever the flow is doing, each tick yields a packet once
//! the remote address is known: queued audio if there is some, encoded silence otherwise — so
//! the wire never goes quiet while a flow or an agent is thinking (carriers and NATs drop calls
//! after ~30 s without RTP).
//!
//! RTCP (RFC 3550 §6): [`MediaSession::rtcp_tick`] writes a compound SR (RR while we have not
//! sent since the report before last) with a reception report block and our CNAME about every 5 s (randomised 0.5–1.5×,
//! §6.3.5); [`MediaSession::receive_rtcp`] takes the peer's reports: its SR time for our
//! LSR/DLSR, its report on us for the round-trip time (§6.4.1) and the loss it sees. SRTCP when
//! the call is encrypted.
//!
//! **Strict source** (symmetric RTP without hijacking; the approach of Asterisk's `strictrtp`
//! and rtpengine's strict-source): the session latches onto one source of valid RTP and from
//! then on accepts RTP only from there; anything from elsewhere is dropped and counted in
//! [`SessionStats::foreign`], however long the peer has been silent (hold without re-INVITE,
//! VAD/DTX: a silence-based relatch would hand the call's audio to whoever sends the next
//! packet).
//!
//! ```text
//!              valid packet from the signalled address (from anyone, with SRTP)
//!   ┌──────────┐ ──────────────────────────────────────────────────────► ┌──────────────┐
//!   │ Learning │  PROBATION packets from one other source: one SSRC,      │ Latched(a)   │
//!   │          │  consecutive sequence numbers, ≥ PROBATION_MIN_SPAN ───► │ RTP from a   │
//!   └──────────┘ ◄────────────────────────────────────────────────────── └──────────────┘
//!    others: on probation,        set_remote with a different address     anyone else:
//!    not played, foreign          (a re-INVITE moved the peer)            foreign
//! ```
//!
//! A latch learned on probation yields once to the signalled address's first valid packet (a
//! stranger who won the race to the port before the caller's first packet loses it then; one
//! who forges the signalled address can only send our audio where signalling said to).
//! Otherwise only signalling moves an established latch: a peer whose NAT rebinds mid-call
//! without a re-INVITE looks exactly like a hijack and is treated as one (its call ends by the
//! RTP timeout). RTCP follows the same rule ([`MediaSession::receive_rtcp`]).
//!
//! Silence is sent as RFC 3389 comfort noise when CN was negotiated (a CN packet every interval,
//! so the wire stays as busy as with audio), as encoded silence otherwise.
//!
//! **Not done here:** RTCP BYE, generating noise from received CN (received CN is dropped and
//! concealed as silence), and packet loss concealment beyond inserting silence.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::dtmf::{
    DtmfDigit, DtmfEvent, DtmfReceiver, DtmfReceiverConfig, DtmfSender, DtmfSenderConfig, TelephoneEvent,
};
use crate::jitter::{JitterBuffer, JitterConfig, JitterPacket, Playout};
use crate::rtp::{
    CompoundPacket, NtpTime, ReceiveStats, ReceiveStatsConfig, ReportBlock, RtcpPacket, RtcpWriter, RtpHeader,
    RtpPacket, RtpSender, RtpSenderConfig,
};
use crate::srtp::{MasterKey, SrtpContext, SrtpProfile};
use crate::{AudioEncoding, Frame, FramePool};

/// The speech codec of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// G.711 μ-law.
    Pcmu,
    /// G.711 A-law.
    Pcma,
}

impl Codec {
    /// The frame encoding that matches.
    pub fn encoding(self) -> AudioEncoding {
        match self {
            Codec::Pcmu => AudioEncoding::Pcmu,
            Codec::Pcma => AudioEncoding::Pcma,
        }
    }

    fn silence(self) -> u8 {
        crate::prompt::PromptCodec::from(self).silence()
    }
}

impl From<Codec> for crate::prompt::PromptCodec {
    fn from(codec: Codec) -> Self {
        match codec {
            Codec::Pcmu => Self::Pcmu,
            Codec::Pcma => Self::Pcma,
        }
    }
}

/// How a session is set up (from the SDP offer/answer and the shell's random source).
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The speech codec and its payload type (the offerer's number).
    pub codec: Codec,
    /// Payload type.
    pub payload_type: u8,
    /// The telephone-event payload type, when negotiated (RFC 4733).
    pub telephone_event: Option<u8>,
    /// The comfort noise payload type, when negotiated (RFC 3389): silence then goes out as a
    /// CN packet every interval instead of encoded silence.
    pub comfort_noise: Option<u8>,
    /// Packetisation interval in milliseconds (10–40; 20 is the norm).
    pub ptime_ms: u32,
    /// Where the SDP says to send; replaced by where the audio really comes from (symmetric
    /// RTP) once that source is latched: at once for this address, after a probation for
    /// another (see the module docs).
    pub remote: Option<SocketAddr>,
    /// Our SSRC, initial sequence number and timestamp (random, RFC 3550 §5.1).
    pub ssrc: u32,
    /// Random initial sequence number.
    pub initial_sequence: u16,
    /// Random initial timestamp.
    pub initial_timestamp: u32,
    /// End the call when no RTP arrives for this long (`None`: never).
    pub inactivity_timeout: Option<Duration>,
    /// Detect DTMF tones in the audio (for peers that send no telephone-events).
    pub inband_dtmf: bool,
    /// RTCP shares the RTP port (RFC 5761): reports go to the peer's RTP address, and the shell
    /// hands RTCP arriving on the RTP port to [`MediaSession::receive_rtcp`]
    /// (see [`is_rtcp`]).
    pub rtcp_mux: bool,
    /// Where the SDP says to send RTCP (`a=rtcp`, RFC 3605), when not the RTP port + 1 (RFC
    /// 3550 §11); replaced by where the peer's RTCP really comes from once it arrives. Not used
    /// when `rtcp_mux`.
    pub remote_rtcp: Option<SocketAddr>,
    /// Jitter buffer settings.
    pub jitter: JitterConfig,
    /// SRTP keys (SDES, RFC 4568) when the call is encrypted.
    pub srtp: Option<SrtpKeys>,
}

/// The keys of an SRTP session: ours protect what we send, the peer's what we receive.
#[derive(Debug, Clone)]
pub struct SrtpKeys {
    /// The crypto suite both sides agreed on.
    pub profile: SrtpProfile,
    /// Our master key (the `a=crypto` line we sent).
    pub local: MasterKey,
    /// The peer's master key (its `a=crypto` line).
    pub remote: MasterKey,
}

/// What the session reports to the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// A key press, reported once when it ends (RFC 4733 or in-band).
    Dtmf {
        /// The key.
        digit: char,
        /// How long it was held.
        duration_ms: u32,
    },
    /// No RTP for the inactivity timeout: the call should end (cause "media timeout").
    Inactive,
    /// The peer's audio now comes from this address; we send there (symmetric RTP).
    Latched(SocketAddr),
    /// Queued audio up to a [`MediaSession::mark`] has gone out.
    Played(u64),
}

/// Counters of a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// RTP packets accepted.
    pub received: u64,
    /// Datagrams from the peer (or, before a latch, from anyone) dropped: not RTP or RTCP,
    /// wrong payload type.
    pub dropped: u64,
    /// RTP from a source other than the latched peer: dropped (a forged or stray stream). Also
    /// RTCP from anywhere but the peer, and, before a latch, packets of a source on probation
    /// (taken back out of the count for the one that passes and latches).
    pub foreign: u64,
    /// Packets sent.
    pub sent: u64,
    /// Of which silence.
    pub silence_sent: u64,
    /// Frames the jitter buffer had to conceal (lost or late).
    pub concealed: u64,
    /// SRTP packets dropped: authentication failed or replayed (RFC 3711 §3.3).
    pub srtp_failures: u64,
    /// RTCP compound packets sent and received.
    pub rtcp_sent: u64,
    /// RTCP compound packets received and accepted.
    pub rtcp_received: u64,
}

/// What RTCP tells about a call's audio quality.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QualityStats {
    /// Round-trip time from the peer's last report on our stream (RFC 3550 §6.4.1).
    pub rtt: Option<Duration>,
    /// Fraction of our packets the peer lost in its last report interval (0–255 = 0–100 %).
    pub remote_fraction_lost: Option<u8>,
    /// Our packets the peer counts as lost in total.
    pub remote_cumulative_lost: Option<i32>,
    /// Packets of the peer's stream we expected but did not receive.
    pub local_cumulative_lost: i64,
    /// Interarrival jitter of the peer's stream as we measure it (RFC 3550 A.8).
    pub local_jitter: Duration,
}

/// RTCP report interval (RFC 3550 §6.2: 5 s minimum; a two-party call stays well under the
/// 5 % bandwidth share at that rate).
pub const RTCP_INTERVAL: Duration = Duration::from_secs(5);

/// Largest RTCP packet the session writes: SR with one report block, SDES CNAME, SRTCP trailer.
pub const MAX_RTCP: usize = 256;

/// Why [`MediaSession::play`] refused a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlayRefused {
    /// The queue holds [`MAX_QUEUED`] frames already.
    #[error("the playout queue is full")]
    Full,
    /// The frame is empty or longer than the longest packetisation interval (40 ms).
    #[error("a frame of {samples} samples is empty or longer than {max_ms} ms")]
    WrongLength {
        /// Samples in the frame.
        samples: u32,
        /// The longest frame accepted.
        max_ms: u32,
    },
}

/// An entry of the outgoing queue.
#[derive(Debug)]
enum Out {
    Frame(Frame),
    Mark(u64),
}

/// Most frames queued for sending (10 s at 20 ms): prompts are queued a few seconds at a time
/// by the shell, flows writing faster than real time are refused.
pub const MAX_QUEUED: usize = 500;

/// Consecutive packets a source other than the signalled address must send before it is
/// latched (Asterisk's `learning_min_sequential`, whose default is also 4; RFC 3550 A.1
/// validates a new source with 2, but only against stray packets, not against someone aiming
/// at the port). One spoofed or stray packet, or a spray with random sequence numbers, never makes a
/// run; a NAT'd caller loses only its first 3 packets (60 ms at 20 ms, usually silence at the
/// start of a call). Any packet from another source breaks the run, so while the caller
/// streams an attacker would have to fit the whole run between two of its packets, which
/// [`PROBATION_MIN_SPAN`] rules out.
pub const PROBATION: u32 = 4;

/// The shortest time a probation run may span from its first packet to its last (Asterisk's
/// `learning_min_duration` idea): [`PROBATION`] packets of a real stream are at least 3 × 10 ms
/// apart (10 ms is the shortest packetisation interval), less up to 10 ms of jitter. A faster
/// run is a burst — no audio source sends like that — and starts over. It is also one whole
/// interval of the usual 20 ms ptime, so a burst cannot slip in between two packets of a
/// caller streaming at that rate.
pub const PROBATION_MIN_SPAN: Duration = Duration::from_millis(20);

/// Whose RTP the session accepts (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// No latch yet: the signalled address latches on its first valid packet, another source
    /// after a probation (the run in progress, if any). Without SRTP, packets of a source on
    /// probation are not played: if the run is a stranger's, its audio never reaches the flow,
    /// and the caller it might be loses only the run's first packets.
    Learning(Option<Run>),
    /// Only RTP from `addr` is accepted. `signalled`: whether `addr` is the address signalling
    /// gave (else it was learned on probation, and yields once to the signalled address).
    Latched { addr: SocketAddr, signalled: bool },
}

/// A probation run: consecutive packets of one stream from one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    from: SocketAddr,
    ssrc: u32,
    /// The sequence number of its last packet.
    sequence: u16,
    /// Packets in the run.
    packets: u32,
    /// When its first packet arrived.
    first: Instant,
}

/// One call's media. See the module docs.
#[derive(Debug)]
pub struct MediaSession {
    config: SessionConfig,
    pool: FramePool,
    sender: RtpSender,
    stats_rx: ReceiveStats,
    dtmf_rx: DtmfReceiver,
    dtmf_tx: DtmfSender,
    /// DTMF digits still to send, and the packets of the one being sent with their send
    /// offsets from its start.
    dtmf_pending: VecDeque<(DtmfDigit, u32)>,
    dtmf_current: Option<(VecDeque<crate::dtmf::DtmfPacket>, u32)>,
    tone: Option<crate::dtmf::ToneDetector>,
    jitter: JitterBuffer<Frame>,
    /// Samples per packet the peer sends (learnt from its first audio packet); the jitter
    /// buffer runs at that size.
    peer_frame: Option<u32>,
    /// Received octets waiting to be cut into our frames when the peer's packets are not our
    /// frame size (a 30 ms peer in a 20 ms call).
    reframe: VecDeque<u8>,
    queue: VecDeque<Out>,
    /// 8 kHz samples of the frame at the front of `queue` already sent (frames that are not
    /// the call's packet length are re-cut as they go out).
    queue_offset: usize,
    events: VecDeque<SessionEvent>,
    /// Where packets go: the latched source, else the signalled address.
    remote: Option<SocketAddr>,
    /// The address signalling gave (the SDP's `c=`/`m=`).
    signalled: Option<SocketAddr>,
    source: Source,
    /// The SSRC of the peer's RTP, as last accepted (for its RTCP from a NAT'd port).
    peer_ssrc: Option<u32>,
    last_received: Option<Instant>,
    started: Option<Instant>,
    inactivity_reported: bool,
    hold: bool,
    /// Whether our direction sends (false for `recvonly`/`inactive`, RFC 3264 §5.1).
    sending: bool,
    /// Whether the peer confirmed the session (the ACK): nothing is sent before.
    confirmed: bool,
    /// Ticks of pause still owed after a DTMF digit before the next one starts.
    dtmf_pause: u32,
    stats: SessionStats,
    /// When the next RTCP report is due.
    next_rtcp: Option<Instant>,
    /// Where the peer's RTCP comes from (latched), else the RTP address's port + 1.
    rtcp_remote: Option<SocketAddr>,
    /// The peer's last report on our stream, and the RTT it gave.
    remote_report: Option<ReportBlock>,
    rtt: Option<Duration>,
    rtcp_counter: u32,
    /// RTP packets sent when each of our last two reports went out (newest first): we send an
    /// SR only while we have sent since the one before last (RFC 3550 §6.4).
    sent_at_reports: [u64; 2],
    /// Our SDES CNAME (RFC 3550 §6.5.1), from the SSRC.
    cname: String,
    /// (protect outgoing, unprotect incoming).
    srtp: Option<(SrtpContext, SrtpContext)>,
    samples_per_frame: u32,
    decode_scratch: Vec<i16>,
    /// While the peer is in DTX: the peak amplitude of uniform noise at the level of its last
    /// comfort-noise packet (RFC 3389).
    peer_noise_amplitude: Option<f64>,
    /// State of the generator of that noise.
    noise_state: u32,
}

/// Whether a datagram on a multiplexed RTP port is RTCP (RFC 5761 §4): its second octet, the
/// RTCP packet type, is 192–223 (RTCP's range, which RTP payload types 64–95 would collide with
/// once the marker bit is set; no audio profile uses them).
pub fn is_rtcp(datagram: &[u8]) -> bool {
    datagram.get(1).is_some_and(|b| (192..=223).contains(b))
}

/// Longest frame [`MediaSession::play`] accepts, and the longest ptime: 40 ms at 8 kHz.
pub const MAX_FRAME_SAMPLES: usize = 320;

/// Largest RTP packet the session writes: header, 40 ms of G.711, SRTP tag room.
pub const MAX_PACKET: usize = 12 + 320 + 16;

impl MediaSession {
    /// A session about to send its first packet.
    pub fn new(config: SessionConfig, pool: FramePool) -> Self {
        // Whole 10 ms, 10–40 ms: what the media clock paces (a 0.5 ms wheel turning every 120 ms).
        let samples_per_frame = 8 * (config.ptime_ms / 10 * 10).clamp(10, MAX_FRAME_SAMPLES as u32 / 8);
        let sender = RtpSender::new(RtpSenderConfig {
            ssrc: config.ssrc,
            payload_type: config.payload_type,
            clock_rate: 8_000,
            samples_per_frame,
            initial_sequence: config.initial_sequence,
            initial_timestamp: config.initial_timestamp,
        });
        let jitter_config = JitterConfig { frame_samples: samples_per_frame, ..config.jitter };
        Self {
            sender,
            stats_rx: ReceiveStats::new(ReceiveStatsConfig { clock_rate: 8_000, min_sequential: 1 }),
            dtmf_rx: DtmfReceiver::new(DtmfReceiverConfig::default()),
            dtmf_tx: DtmfSender::new(DtmfSenderConfig { interval: samples_per_frame, ..DtmfSenderConfig::default() }),
            dtmf_pending: VecDeque::new(),
            dtmf_current: None,
            tone: config.inband_dtmf.then(|| crate::dtmf::ToneDetector::new(Default::default())),
            jitter: JitterBuffer::new(jitter_config),
            peer_frame: None,
            reframe: VecDeque::with_capacity(640),
            queue: VecDeque::new(),
            queue_offset: 0,
            events: VecDeque::new(),
            remote: config.remote,
            signalled: config.remote,
            source: Source::Learning(None),
            peer_ssrc: None,
            last_received: None,
            started: None,
            inactivity_reported: false,
            hold: false,
            sending: true,
            confirmed: true,
            dtmf_pause: 0,
            stats: SessionStats::default(),
            next_rtcp: None,
            rtcp_remote: None,
            remote_report: None,
            rtt: None,
            rtcp_counter: 0,
            sent_at_reports: [0; 2],
            cname: format!("patchbay-{:08x}", config.ssrc),
            srtp: config
                .srtp
                .as_ref()
                .map(|k| (SrtpContext::new(k.profile, &k.local), SrtpContext::new(k.profile, &k.remote))),
            samples_per_frame,
            decode_scratch: Vec::with_capacity(320),
            peer_noise_amplitude: None,
            noise_state: config.ssrc | 1,
            pool,
            config,
        }
    }

    /// Where packets go now.
    pub fn remote(&self) -> Option<SocketAddr> {
        self.remote
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Call quality from RTP statistics and the peer's RTCP reports.
    pub fn quality(&self) -> QualityStats {
        QualityStats {
            rtt: self.rtt,
            remote_fraction_lost: self.remote_report.map(|r| r.fraction_lost),
            remote_cumulative_lost: self.remote_report.map(|r| r.cumulative_lost),
            local_cumulative_lost: self.stats_rx.cumulative_lost(),
            local_jitter: self.stats_rx.jitter_duration(),
        }
    }

    /// The codec.
    pub fn codec(&self) -> Codec {
        self.config.codec
    }

    /// Whether RTCP shares the RTP port (RFC 5761).
    pub fn rtcp_mux(&self) -> bool {
        self.config.rtcp_mux
    }

    /// Samples per frame (8 per millisecond of ptime).
    pub fn samples_per_frame(&self) -> u32 {
        self.samples_per_frame
    }

    /// What a new offer/answer says the peer's address is (a re-INVITE). When it differs from
    /// what signalling said before, the peer moved: send there, and latching starts over (the
    /// new address latches on its first valid packet, another source after a probation; RTCP
    /// too). The same address again (a session refresh, hold/resume by direction) keeps the
    /// latch: a NAT'd caller is not put on probation again. `None` stops sending (RFC
    /// 2543-style hold, `c=0.0.0.0`); meanwhile any source must pass the probation to latch.
    pub fn set_remote(&mut self, remote: Option<SocketAddr>) {
        if remote != self.signalled {
            self.signalled = remote;
            self.remote = remote;
            self.source = Source::Learning(None);
            self.peer_ssrc = None;
            self.rtcp_remote = None;
        }
    }

    /// A new offer/answer said where RTCP goes (`a=rtcp`, RFC 3605; `None`: the RTP port + 1):
    /// reports go there until the peer's own RTCP shows where it really is.
    pub fn set_remote_rtcp(&mut self, remote_rtcp: Option<SocketAddr>) {
        if remote_rtcp != self.config.remote_rtcp {
            self.config.remote_rtcp = remote_rtcp;
            self.rtcp_remote = None;
        }
    }

    /// On hold the peer may legitimately send nothing: the inactivity timeout is off.
    pub fn set_hold(&mut self, hold: bool) {
        self.hold = hold;
        self.inactivity_reported = false;
    }

    /// Whether events are waiting for [`MediaSession::poll_event`].
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// A datagram arrived on the call's RTP port from `from`. The buffer is decrypted in place
    /// on an SRTP call. Once a source is latched, RTP from anywhere else is dropped and counted
    /// in [`SessionStats::foreign`] (see the module docs).
    pub fn receive(&mut self, now: Instant, from: SocketAddr, datagram: &mut [u8]) {
        // Strict source: once latched, a stranger's packet is dropped before anything else — it
        // costs no HMAC, and an authentic SRTP packet forwarded from elsewhere (an on-path
        // copy racing the original) cannot use up its index in the replay window. Only the
        // signalled address gets further when the latch was learned on probation.
        if let Source::Latched { addr, signalled } = self.source
            && from != addr
            && (signalled || Some(from) != self.signalled)
        {
            self.stats.foreign += 1;
            return;
        }
        let len = match self.srtp.as_mut() {
            Some((_, inbound)) => match inbound.unprotect_rtp(datagram) {
                Ok(len) => len,
                Err(_) => {
                    // Forged, corrupted or replayed: dropped and counted, never latched onto.
                    self.stats.srtp_failures += 1;
                    return;
                }
            },
            None => datagram.len(),
        };
        let Ok(packet) = RtpPacket::parse(&datagram[..len]) else {
            self.stats.dropped += 1;
            return;
        };
        let header = packet.header;
        let pt = header.payload_type;
        let is_event = Some(pt) == self.config.telephone_event;
        let is_noise = Some(pt) == self.config.comfort_noise;
        if pt != self.config.payload_type && !is_event && !is_noise {
            // A codec we did not agree on, or RTCP on a port we did not agree to share.
            self.stats.dropped += 1;
            return;
        }
        // Symmetric RTP (RFC 4961 practice): send to where valid audio comes from, once that
        // source is latched.
        if !self.admit(now, from, &header) {
            return;
        }
        self.peer_ssrc = Some(header.ssrc);
        self.last_received = Some(now);
        self.inactivity_reported = false;
        self.stats.received += 1;
        let verdict = self.stats_rx.on_packet(now, &header);
        let _ = verdict;
        if is_event {
            if let Ok(event) = TelephoneEvent::parse(packet.payload) {
                self.dtmf_rx.handle_packet(now, &header, event);
                self.drain_dtmf();
            }
            return;
        }
        if is_noise {
            // RFC 3389 §3: the peer went quiet (DTX) and sends its background level now and
            // then: the first octet is the level in -dBov (spectral coefficients, if any, are
            // not used). Until its audio resumes, what we conceal is noise at that level. The
            // packet counts as RTP received: a peer in DTX is not inactive.
            let dbov = packet.payload.first().map_or(127, |level| level & 0x7f);
            let rms = 23_170.0 * 10f64.powf(-f64::from(dbov) / 20.0);
            // Uniform noise in [-a, a] has an RMS of a / √3.
            self.peer_noise_amplitude = Some((rms * 3f64.sqrt()).min(32_767.0));
            return;
        }
        self.peer_noise_amplitude = None;
        let frame = match self.pool.g711(self.config.codec.encoding(), packet.payload, u64::from(header.timestamp)) {
            Ok(frame) => frame,
            Err(_) => {
                self.stats.dropped += 1;
                return;
            }
        };
        if let Some(tone) = self.tone.as_mut() {
            self.decode_scratch.clear();
            self.decode_scratch.extend(frame.linear().iter());
            tone.process(&self.decode_scratch);
            while let Some(detected) = tone.poll_tone() {
                // The detector reports a tone once it is confirmed, before it ends: the
                // duration is not known, so the detector's minimum is reported.
                self.events.push_back(SessionEvent::Dtmf { digit: detected.digit.as_char(), duration_ms: 40 });
            }
        }
        let samples = packet.payload.len() as u32;
        if self.peer_frame != Some(samples) {
            // The peer's packet size: the jitter buffer is rebuilt for it (once per call in
            // practice; a peer that changes ptime mid-call loses what was buffered).
            self.peer_frame = Some(samples);
            self.jitter = JitterBuffer::new(JitterConfig { frame_samples: samples, ..self.config.jitter });
            self.reframe.clear();
        }
        self.jitter.push(
            now,
            JitterPacket {
                ssrc: header.ssrc,
                sequence: header.sequence,
                timestamp: header.timestamp,
                marker: header.marker,
                payload: frame,
            },
        );
    }

    /// Whether a valid packet from `from` is the latched peer's, latching onto its source when
    /// it is the signalled address, when SRTP authenticated it (only the holder of the peer's
    /// key can make one, so a probation would prove nothing more), or when it completes a
    /// probation run. Once latched, only the latched source is admitted, and the signalled
    /// address taking over a learned latch (everyone else [`MediaSession::receive`] has turned
    /// away already, unauthenticated).
    fn admit(&mut self, now: Instant, from: SocketAddr, header: &RtpHeader) -> bool {
        let signalled = Some(from) == self.signalled;
        let run = match self.source {
            Source::Latched { addr, .. } if addr == from => return true,
            Source::Latched { signalled: false, .. } if signalled => {
                self.latch(from, true);
                return true;
            }
            Source::Latched { .. } => {
                // `receive` turns these away first; never a probation once latched.
                self.stats.foreign += 1;
                return false;
            }
            Source::Learning(run) => run,
        };
        if signalled || self.srtp.is_some() {
            self.latch(from, signalled);
            return true;
        }
        // A source on probation: the packet extends its run when it is the next of the same
        // stream from the same place (RFC 3550 A.1's idea, with Asterisk's count); anything
        // else — another source, another SSRC, a gap or reordering — starts a new run here.
        let mut run = match run {
            Some(r) if r.from == from && r.ssrc == header.ssrc && header.sequence == r.sequence.wrapping_add(1) => {
                Run { sequence: header.sequence, packets: r.packets + 1, ..r }
            }
            _ => Run { from, ssrc: header.ssrc, sequence: header.sequence, packets: 1, first: now },
        };
        if run.packets >= PROBATION {
            if now.duration_since(run.first) >= PROBATION_MIN_SPAN {
                // The run's earlier packets were the peer's after all, not a stranger's.
                self.stats.foreign = self.stats.foreign.saturating_sub(u64::from(run.packets - 1));
                self.latch(from, false);
                return true;
            }
            // A burst: starts over from this packet.
            run = Run { packets: 1, first: now, ..run };
        }
        self.source = Source::Learning(Some(run));
        self.stats.foreign += 1;
        false
    }

    /// Latches onto `from`: only its RTP is accepted from now on, and we send there.
    fn latch(&mut self, from: SocketAddr, signalled: bool) {
        if let Source::Latched { .. } = self.source {
            // The signalled address takes over a learned latch: where that source's RTCP came
            // from is no longer trusted either.
            self.rtcp_remote = None;
        }
        self.source = Source::Latched { addr: from, signalled };
        if self.remote != Some(from) {
            self.remote = Some(from);
            self.events.push_back(SessionEvent::Latched(from));
        }
    }

    fn drain_dtmf(&mut self) {
        while let Some(event) = self.dtmf_rx.poll_event() {
            if let DtmfEvent::Released { digit: Some(digit), duration, .. } = event {
                self.events.push_back(SessionEvent::Dtmf {
                    digit: digit.as_char(),
                    duration_ms: (duration / 8).min(u64::from(u32::MAX)) as u32,
                });
            }
        }
    }

    /// The caller's audio for this interval, after the jitter buffer: the next frame, or a
    /// silence frame in its place when one was lost or late. `None` while nothing has arrived
    /// yet or the buffer is filling. Call once per tick.
    ///
    /// When the peer's packets are our frame size the buffered frame is handed on as it came
    /// (no copy). Otherwise (a 30 ms peer in our 20 ms clock) the audio is re-cut: the jitter
    /// buffer runs at the peer's packet size and is popped whenever the octets waiting do not
    /// fill our next frame — on average once per peer packet interval, each time as of when
    /// the popped packet starts to play.
    pub fn take_received(&mut self, now: Instant) -> Option<Frame> {
        let ours = self.samples_per_frame as usize;
        let peer = self.peer_frame.map_or(ours, |p| p as usize);
        let silence = self.config.codec.silence();
        if peer == ours && self.reframe.is_empty() {
            return match self.pop_received(now)? {
                Some(frame) => Some(frame),
                None => {
                    // `conceal` writes every octet.
                    let mut octets = [0u8; MAX_FRAME_SAMPLES];
                    self.conceal(&mut octets[..ours]);
                    self.pool.g711(self.config.codec.encoding(), &octets[..ours], 0).ok()
                }
            };
        }
        while self.reframe.len() < ours {
            // The frame popped now starts playing once what is already waiting has played:
            // ask the jitter buffer as of then (125 µs per sample at 8 kHz), or a 30 ms packet
            // asked for 10 ms early would count as late.
            let starts_at = now + Duration::from_micros(self.reframe.len() as u64 * 125);
            match self.pop_received(starts_at)? {
                Some(frame) => self.reframe.extend(frame.octets()),
                None => {
                    let mut octets = [0u8; MAX_FRAME_SAMPLES];
                    self.conceal(&mut octets[..peer]);
                    self.reframe.extend(&octets[..peer]);
                }
            }
        }
        let mut octets = [silence; 320];
        for (slot, octet) in octets[..ours].iter_mut().zip(self.reframe.drain(..ours)) {
            *slot = octet;
        }
        self.pool.g711(self.config.codec.encoding(), &octets[..ours], 0).ok()
    }

    /// Fills `octets` (the call's law) for a frame that did not arrive: silence, or — while the
    /// peer is in DTX — white noise at the level its last comfort-noise packet gave (RFC 3389
    /// §3, 0 dBov taken as a full-scale sine).
    fn conceal(&mut self, octets: &mut [u8]) {
        let Some(amplitude) = self.peer_noise_amplitude else {
            octets.fill(self.config.codec.silence());
            return;
        };
        let mut noise = [0i16; MAX_FRAME_SAMPLES];
        let n = octets.len().min(MAX_FRAME_SAMPLES);
        for sample in &mut noise[..n] {
            // xorshift32: cheap, and noise needs nothing better.
            let mut x = self.noise_state;
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            self.noise_state = x;
            *sample = ((f64::from(x) / f64::from(u32::MAX) * 2.0 - 1.0) * amplitude) as i16;
        }
        match self.config.codec {
            Codec::Pcmu => crate::g711::encode_ulaw(&noise[..n], octets),
            Codec::Pcma => crate::g711::encode_alaw(&noise[..n], octets),
        };
    }

    /// One jitter-buffer playout: `Some(Some(frame))`, `Some(None)` for a frame to conceal,
    /// `None` when there is nothing to play yet.
    fn pop_received(&mut self, now: Instant) -> Option<Option<Frame>> {
        match self.jitter.pop(now) {
            Playout::Frame(frame) => Some(Some(frame.payload)),
            Playout::Missing(crate::jitter::MissingReason::Lost { .. })
            | Playout::Missing(crate::jitter::MissingReason::Underrun) => {
                self.stats.concealed += 1;
                Some(None)
            }
            Playout::Missing(_) => None,
        }
    }

    /// Queues a frame to be sent after what is queued. Refused when the queue is full or the
    /// frame is empty or longer than 40 ms; a frame that is not the call's packet length is
    /// re-cut across packets as it goes out (each tick sends exactly one interval).
    pub fn play(&mut self, frame: Frame) -> Result<(), PlayRefused> {
        let samples = frame.samples_at_8k();
        if samples == 0 || samples > MAX_FRAME_SAMPLES {
            return Err(PlayRefused::WrongLength {
                samples: frame.format().samples,
                max_ms: MAX_FRAME_SAMPLES as u32 / 8,
            });
        }
        if self.queue.len() >= MAX_QUEUED {
            return Err(PlayRefused::Full);
        }
        self.queue.push_back(Out::Frame(frame));
        Ok(())
    }

    /// Sets whether we send (RFC 3264 §5.1: not while our direction is `recvonly` or
    /// `inactive`). The media clock keeps running; queued audio is consumed unsent.
    pub fn set_sending(&mut self, sending: bool) {
        self.sending = sending;
    }

    /// Holds all sending, RTP and RTCP, until the peer confirms the session — for an answered
    /// INVITE, its ACK (RFC 3261 §13.3.1.4), which needs our 200's To tag and so proves the
    /// caller receives at the address it claims. A forged INVITE naming a victim's address then
    /// makes us send one 200 there, not a stream of RTP. Queued audio waits meanwhile (a
    /// greeting is not clipped by the ACK's round trip). Sessions start confirmed.
    pub fn set_confirmed(&mut self, confirmed: bool) {
        self.confirmed = confirmed;
    }

    /// Frames queued for sending.
    pub fn queued(&self) -> usize {
        self.queue.iter().filter(|o| matches!(o, Out::Frame(_))).count()
    }

    /// Queues a mark: [`SessionEvent::Played`] with `id` is reported when everything queued
    /// before it has been sent (how the shell knows a prompt finished, or an agent's mark).
    pub fn mark(&mut self, id: u64) {
        self.queue.push_back(Out::Mark(id));
    }

    /// Drops all queued audio (barge-in, an agent's `clear`). Marks are reported as played.
    pub fn clear(&mut self) {
        self.queue_offset = 0;
        for out in self.queue.drain(..) {
            if let Out::Mark(id) = out {
                self.events.push_back(SessionEvent::Played(id));
            }
        }
    }

    /// Queues DTMF digits to send as RFC 4733 events (`duration_ms` each, with a pause of the
    /// same length between digits). Returns false when no telephone-event was negotiated.
    pub fn send_dtmf(&mut self, digits: &str, duration_ms: u32) -> bool {
        if self.config.telephone_event.is_none() {
            return false;
        }
        for digit in digits.chars().filter_map(DtmfDigit::from_char) {
            self.dtmf_pending.push_back((digit, duration_ms.clamp(40, 2_000) * 8));
        }
        true
    }

    /// How long sending `digits` DTMF keys of `duration_ms` takes on this session: each key,
    /// its two extra end packets and the pause after it.
    pub fn dtmf_send_time(&self, digits: usize, duration_ms: u32) -> Duration {
        let ptime = self.samples_per_frame / 8;
        let per_digit = duration_ms.clamp(40, 2_000).next_multiple_of(ptime) + 2 * ptime + duration_ms.clamp(40, 2_000);
        Duration::from_millis(u64::from(per_digit) * digits as u64)
    }

    /// The shared clock's tick for this session: writes the packet to send now into `out` and
    /// returns where to send it and its length (`None` while the remote address is unknown).
    /// Also fires the inactivity timeout.
    pub fn tick(&mut self, now: Instant, out: &mut [u8; MAX_PACKET]) -> Option<(SocketAddr, usize)> {
        let started = *self.started.get_or_insert(now);
        if let Some(timeout) = self.config.inactivity_timeout
            && !self.hold
            && !self.inactivity_reported
            && now.duration_since(self.last_received.unwrap_or(started)) >= timeout
        {
            self.inactivity_reported = true;
            self.events.push_back(SessionEvent::Inactive);
        }
        if let Some(at) = self.dtmf_rx.poll_timeout()
            && at <= now
        {
            self.dtmf_rx.handle_timeout(now);
            self.drain_dtmf();
        }
        if !self.confirmed {
            return None;
        }
        let remote = self.remote;
        // DTMF replaces audio while a digit is sent (RFC 4733 §2.5.1.1 leaves it to the sender;
        // sending both confuses many receivers).
        if self.sending
            && remote.is_some()
            && let Some(len) = self.tick_dtmf(out)
        {
            return remote.and_then(|r| self.protect(out, len).map(|len| (r, len)));
        }
        let mut payload = [0u8; MAX_FRAME_SAMPLES];
        let n = self.samples_per_frame as usize;
        // Fill one packet from the queue: a frame of the call's length is one packet; other
        // lengths (an agent's 20 ms frames in a 30 ms call, a flow's odd-sized writes) are
        // re-cut across packets. Marks are reported when the audio before them has gone out.
        let mut filled = 0;
        while filled < n {
            match self.queue.front() {
                Some(&Out::Mark(id)) => {
                    self.queue.pop_front();
                    self.events.push_back(SessionEvent::Played(id));
                }
                Some(Out::Frame(frame)) => {
                    let written = frame.encode_into_from(
                        self.config.codec.encoding(),
                        self.queue_offset,
                        &mut payload[filled..n],
                    );
                    filled += written;
                    self.queue_offset += written;
                    if written == 0 || self.queue_offset >= frame.samples_at_8k() {
                        self.queue.pop_front();
                        self.queue_offset = 0;
                    }
                }
                None => break,
            }
        }
        let silence = filled == 0;
        payload[filled..n].fill(self.config.codec.silence());
        if silence {
            self.stats.silence_sent += 1;
        }
        if silence && let Some(cn) = self.config.comfort_noise {
            return self.send_comfort_noise(cn, remote, out);
        }
        let Some(remote) = remote.filter(|_| self.sending) else {
            // Nowhere to send, or not sending (hold): the media clock advances without using
            // sequence numbers, so that SRTP's index estimate stays right when sending resumes.
            self.sender.skip_frames(1);
            return None;
        };
        let len = self.sender.write_frame(now, &payload[..n], out).ok()?;
        self.stats.sent += 1;
        self.protect(out, len).map(|len| (remote, len))
    }

    /// Writes an RTCP report into `out` when one is due (about every [`RTCP_INTERVAL`]) and
    /// returns where to send it and its length. `ntp` is the wall clock now (the shell's
    /// [`crate::rtp::NtpClock`]).
    pub fn rtcp_tick(&mut self, now: Instant, ntp: NtpTime, out: &mut [u8; MAX_RTCP]) -> Option<(SocketAddr, usize)> {
        let due = *self.next_rtcp.get_or_insert(now + RTCP_INTERVAL / 2);
        if now < due || !self.confirmed {
            return None;
        }
        // §6.3.5: randomise each interval to 0.5–1.5 times the nominal one, so that reports of
        // many calls started together spread out. The session's SSRC (random) seeds it.
        self.rtcp_counter = self.rtcp_counter.wrapping_add(1);
        let mut x = self.config.ssrc ^ self.rtcp_counter.wrapping_mul(0x9e37_79b9);
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb_352d);
        x ^= x >> 15;
        let factor = 500 + (x % 1001);
        self.next_rtcp = Some(now + RTCP_INTERVAL * factor / 1000);
        self.write_rtcp(now, ntp, out, false)
    }

    /// The call is ending: writes a last report with a BYE for our SSRC (RFC 3550 §6.6) into
    /// `out` and returns where to send it — unless we never sent RTP or RTCP (§6.3.7: then no
    /// BYE).
    pub fn rtcp_bye(&mut self, now: Instant, ntp: NtpTime, out: &mut [u8; MAX_RTCP]) -> Option<(SocketAddr, usize)> {
        if self.stats.sent == 0 && self.stats.rtcp_sent == 0 {
            return None;
        }
        self.write_rtcp(now, ntp, out, true)
    }

    /// A compound RTCP packet (RFC 3550 §6.1): SR (RR unless we sent since the report before
    /// last, §6.4), SDES CNAME, and a BYE when `bye`; SRTCP-protected on an SRTP call.
    fn write_rtcp(
        &mut self,
        now: Instant,
        ntp: NtpTime,
        out: &mut [u8; MAX_RTCP],
        bye: bool,
    ) -> Option<(SocketAddr, usize)> {
        // RTCP goes on while a stream is held with a direction (RFC 3264 §5.1: recvonly and
        // inactive streams still send RTCP), not once the peer's address is gone (an RFC 2543
        // hold, `c=0.0.0.0`).
        let to = self.rtcp_destination()?;
        let block = self.stats_rx.report_block(now);
        let blocks = block.as_slice();
        let mut writer = RtcpWriter::new(&mut out[..]);
        let we_sent = self.stats.sent > self.sent_at_reports[1];
        self.sent_at_reports = [self.stats.sent, self.sent_at_reports[0]];
        let written = if we_sent {
            let info = self.sender.sender_info(now, ntp);
            writer.sender_report(self.config.ssrc, &info, blocks)
        } else {
            writer.receiver_report(self.config.ssrc, blocks)
        };
        written.ok()?;
        writer.sdes_cname(self.config.ssrc, self.cname.as_bytes()).ok()?;
        if bye {
            writer.bye(&[self.config.ssrc]).ok()?;
        }
        let len = writer.finish();
        let len = match self.srtp.as_mut() {
            Some((outbound, _)) => outbound.protect_rtcp(out, len).ok()?,
            None => len,
        };
        self.stats.rtcp_sent += 1;
        Some((to, len))
    }

    /// Where our RTCP goes: where the peer's comes from once known, else where signalling
    /// and the RTP latch say. `None` while the peer's address is gone (`c=0.0.0.0`).
    fn rtcp_destination(&self) -> Option<SocketAddr> {
        let remote = self.remote?;
        Some(match (self.rtcp_remote, self.config.rtcp_mux) {
            (Some(latched), _) => latched,
            (None, true) => remote,
            // RFC 3605 §2.1, else RFC 3550 §11.
            (None, false) => {
                self.config.remote_rtcp.unwrap_or_else(|| SocketAddr::new(remote.ip(), remote.port().wrapping_add(1)))
            }
        })
    }

    /// An RTCP packet arrived from `from` (decrypted in place on an SRTP call). `ntp` is the
    /// wall clock now, for the round-trip time.
    ///
    /// Strict source, as for RTP: RTCP is taken only from where our reports go (the address
    /// the peer's RTCP came from before, else the one signalling or the RTP latch gives: the
    /// RTP address itself with RFC 5761 multiplexing, `a=rtcp` or the RTP port + 1), or —
    /// without multiplexing — from the latched RTP source's host on another port when the
    /// report is about the very stream we accept (its reporter SSRC is the peer's RTP SSRC,
    /// as Asterisk's strict RTP checks): a NAT maps the peer's RTCP port independently of its
    /// RTP port. Its RTCP then comes from there and our reports go there. Anything else is
    /// dropped and counted in [`SessionStats::foreign`]: fake reports would skew the call's
    /// quality figures, and a stranger must not redirect our reports.
    pub fn receive_rtcp(&mut self, now: Instant, ntp: NtpTime, from: SocketAddr, buf: &mut [u8]) {
        let expected = self.rtcp_destination() == Some(from);
        let peer_host = match self.source {
            Source::Latched { addr, .. } => !self.config.rtcp_mux && addr.ip() == from.ip(),
            Source::Learning(_) => false,
        };
        if !expected && !peer_host {
            // Before an HMAC is spent on it, as for RTP.
            self.stats.foreign += 1;
            return;
        }
        let len = match self.srtp.as_mut() {
            Some((_, inbound)) => match inbound.unprotect_rtcp(buf) {
                Ok(len) => len,
                Err(_) => {
                    self.stats.srtp_failures += 1;
                    return;
                }
            },
            None => buf.len(),
        };
        let Ok(compound) = CompoundPacket::parse(&buf[..len]) else {
            self.stats.dropped += 1;
            return;
        };
        if !expected {
            // RFC 3550 §6.1: a compound packet starts with an SR or RR, whose SSRC is the
            // reporter's.
            let reporter = match compound.iter().next() {
                Some(RtcpPacket::SenderReport(sr)) => Some(sr.ssrc),
                Some(RtcpPacket::ReceiverReport(rr)) => Some(rr.ssrc),
                _ => None,
            };
            if reporter.is_none() || reporter != self.peer_ssrc {
                self.stats.foreign += 1;
                return;
            }
        }
        self.stats.rtcp_received += 1;
        self.rtcp_remote = Some(from);
        for packet in compound.iter() {
            let blocks = match packet {
                RtcpPacket::SenderReport(sr) => {
                    self.stats_rx.on_sender_report(now, sr.ssrc, sr.info.ntp);
                    sr.blocks
                }
                RtcpPacket::ReceiverReport(rr) => rr.blocks,
                _ => continue,
            };
            for block in blocks.filter(|b| b.ssrc == self.config.ssrc) {
                if let Some(rtt) = block.round_trip_time(ntp) {
                    self.rtt = Some(rtt);
                }
                self.remote_report = Some(block);
            }
        }
    }

    /// RFC 3389 §3: a CN payload is the noise level in -dBov (one octet); we describe near
    /// silence (-70 dBov) and no spectrum. The audio clock advances as for a frame; the first
    /// audio packet after it starts a new talkspurt (RFC 3551 §4.1).
    fn send_comfort_noise(
        &mut self,
        pt: u8,
        remote: Option<SocketAddr>,
        out: &mut [u8; MAX_PACKET],
    ) -> Option<(SocketAddr, usize)> {
        let Some(remote) = remote.filter(|_| self.sending) else {
            self.sender.skip_frames(1);
            return None;
        };
        let timestamp = self.sender.next_timestamp();
        let header = RtpHeader {
            marker: false,
            payload_type: pt,
            sequence: self.sender.take_sequence(),
            timestamp,
            ssrc: self.config.ssrc,
        };
        let len = header.write(&[70], out).ok()?;
        self.sender.record_sent(1);
        self.sender.skip_frames(1);
        self.stats.sent += 1;
        self.protect(out, len).map(|len| (remote, len))
    }

    fn protect(&mut self, out: &mut [u8; MAX_PACKET], len: usize) -> Option<usize> {
        match self.srtp.as_mut() {
            Some((outbound, _)) => outbound.protect_rtp(out, len).ok(),
            None => Some(len),
        }
    }

    fn tick_dtmf(&mut self, out: &mut [u8]) -> Option<usize> {
        let pt = self.config.telephone_event?;
        if self.dtmf_current.is_none() {
            if self.dtmf_pause > 0 {
                // The pause between two keys: audio (or silence) goes out meanwhile.
                self.dtmf_pause -= 1;
                return None;
            }
            let (digit, duration) = self.dtmf_pending.pop_front()?;
            self.dtmf_pause = duration.div_ceil(self.samples_per_frame);
            let start = self.sender.next_timestamp();
            let packets: VecDeque<_> = self.dtmf_tx.sequence(digit, duration, start).collect();
            self.dtmf_current = Some((packets, 0));
        }
        let (packets, elapsed) = self.dtmf_current.as_mut()?;
        // Every packet due by now goes out; one per tick keeps the pacing (the end packets are
        // one interval apart by construction).
        let packet = packets.pop_front()?;
        *elapsed += self.samples_per_frame;
        let done = packets.is_empty();
        let header = RtpHeader {
            marker: packet.marker,
            payload_type: pt,
            sequence: self.sender.take_sequence(),
            timestamp: packet.timestamp,
            ssrc: self.config.ssrc,
        };
        let mut payload = [0u8; TelephoneEvent::LEN];
        packet.event.write(&mut payload).ok()?;
        let len = header.write(&payload, out).ok()?;
        self.sender.record_sent(payload.len());
        // The audio clock runs on under the event.
        self.sender.skip_frames(1);
        if done {
            self.dtmf_current = None;
        }
        self.stats.sent += 1;
        Some(len)
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
