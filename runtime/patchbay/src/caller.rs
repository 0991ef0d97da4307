//! `patchbay call`: a test caller. Dials a SIP URI over UDP with the same user agent core the
//! server uses, answers digest challenges, and once answered plays a WAV file (`--play`), sends
//! DTMF (`--dtmf`) and saves what it hears (`--record`, 8 kHz 16-bit WAV) through the same media
//! engine, then hangs up and reports what happened.
//!
//! **Not implemented yet:** TCP/TLS dialling (UDP only), SRTP offers.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patchbay_sip::auth::DigestClient;
use patchbay_sip::transaction::{Peer, TimerConfig, Transport};
use patchbay_sip::ua::{Dial, EndCause, UaConfig, UaEvent, UaOutput, UserAgent};
use tokio::net::UdpSocket;

use crate::transport::{Inbound, Outbound, udp_receiver};

/// What to dial and how.
#[derive(Debug, clap::Args)]
pub struct CallArgs {
    /// The SIP URI to call, e.g. `sip:echo@127.0.0.1:5060`.
    pub uri: String,
    /// Send the INVITE here (host:port) instead of the URI's host (an outbound proxy or trunk).
    #[arg(long)]
    pub proxy: Option<String>,
    /// Our identity in From.
    #[arg(long, default_value = "sip:patchbay@invalid")]
    pub from: String,
    /// Digest user name for 401/407 challenges.
    #[arg(long)]
    pub user: Option<String>,
    /// Digest password (or set PATCHBAY_PASSWORD).
    #[arg(long, env = "PATCHBAY_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Hang up this many seconds after the call is answered.
    #[arg(long, default_value_t = 2.0)]
    pub hangup_after: f64,
    /// Give up (CANCEL) when nobody answers within this many seconds.
    #[arg(long, default_value_t = 30.0)]
    pub ring_timeout: f64,
    /// Local address to bind (default: loopback for a loopback target, else any).
    #[arg(long)]
    pub bind: Option<SocketAddr>,
    /// Play this WAV file once the call is answered (mono, 8/16 kHz, PCM, A-law or μ-law).
    #[arg(long)]
    pub play: Option<std::path::PathBuf>,
    /// Send these DTMF keys (RFC 4733) after the file has played.
    #[arg(long)]
    pub dtmf: Option<String>,
    /// Send the --dtmf keys this many seconds after the answer instead, while the file plays.
    #[arg(long)]
    pub dtmf_after: Option<f64>,
    /// Save what the call hears to this WAV file (8 kHz, 16-bit PCM).
    #[arg(long)]
    pub record: Option<std::path::PathBuf>,
}

/// The audio side of a placed call.
struct CallAudio {
    media: Arc<crate::media::CallMedia>,
    heard: tokio::sync::mpsc::Receiver<patchbay_media::Frame>,
    /// The file to play and the next frame of it to queue; `None` once it is all queued.
    to_play: Option<(Arc<patchbay_media::prompt::Prompt>, usize)>,
    dtmf: Option<String>,
    /// When to send `dtmf` (none: once the file has played).
    dtmf_at: Option<Instant>,
    recorded: Vec<i16>,
}

impl CallAudio {
    /// Keeps about a second of the file queued; once it is all out, sends the DTMF keys.
    fn feed(&mut self, pool: &patchbay_media::FramePool) {
        let (to_play, dtmf) = (&mut self.to_play, &mut self.dtmf);
        // At the given time, or once the file has played out.
        let keys_due = match self.dtmf_at {
            Some(at) => Instant::now() >= at,
            None => to_play.is_none(),
        };
        let timed = self.dtmf_at.is_some();
        self.media.with(|session| {
            if let Some((prompt, next)) = to_play.as_mut() {
                let codec = patchbay_media::prompt::PromptCodec::from(session.codec());
                if crate::media::feed_prompt(session, pool, prompt, codec, next, 0) {
                    *to_play = None;
                }
            }
            if keys_due
                && (timed || session.queued() == 0)
                && let Some(keys) = dtmf.take()
                && !session.send_dtmf(&keys, 100)
            {
                tracing::warn!("the callee did not negotiate telephone-event: DTMF not sent");
            }
        });
    }
}

/// Places the call. Returns whether it was answered and ended normally.
pub async fn call(args: CallArgs) -> anyhow::Result<bool> {
    let target = rsip::Uri::try_from(args.uri.as_str()).with_context(|| format!("not a SIP URI: {}", args.uri))?;
    let next_hop = match &args.proxy {
        Some(proxy) => proxy.clone(),
        None => {
            let port = target.host_with_port.port.map_or(5060, |p| *p.value());
            format!("{}:{port}", target.host_with_port.host)
        }
    };
    let next_hop: SocketAddr = tokio::net::lookup_host(next_hop.as_str())
        .await
        .with_context(|| format!("resolving {next_hop}"))?
        .next()
        .with_context(|| format!("{next_hop} has no address"))?;
    let bind = args.bind.unwrap_or_else(|| {
        let ip: IpAddr = if next_hop.ip().is_loopback() { [127, 0, 0, 1].into() } else { [0, 0, 0, 0].into() };
        SocketAddr::new(ip, 0)
    });
    let socket = Arc::new(UdpSocket::bind(bind).await.with_context(|| format!("binding {bind}"))?);
    let mut local = socket.local_addr().context("local address")?;
    if local.ip().is_unspecified() {
        // The address the kernel would route to the next hop from, for Contact and SDP.
        let probe = std::net::UdpSocket::bind(SocketAddr::new(local.ip(), 0)).context("probing the route")?;
        probe.connect(next_hop).context("probing the route")?;
        local.set_ip(probe.local_addr().context("probing the route")?.ip());
    }
    let prompt = match &args.play {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Some(Arc::new(patchbay_media::prompt::Prompt::from_wav(&path.display().to_string(), &bytes)?))
        }
        None => None,
    };
    let (rtp, rtcp) = crate::media::bind_rtp_pair(local.ip()).context("reserving RTP ports")?;
    let media = patchbay_sip::sdp::LocalMedia::new(rtp.local_addr().context("RTP port")?, None, 1, 1);
    let offer = patchbay_sip::sdp::offer(&media).context("building the SDP offer")?;
    let engine = crate::media::MediaEngine::start().context("starting the media clock")?;
    let mut sockets = Some((rtp, rtcp));
    let mut audio: Option<CallAudio> = None;

    let (inbound_tx, mut inbound) = tokio::sync::mpsc::channel::<Inbound>(64);
    tokio::spawn(udp_receiver(Arc::clone(&socket), inbound_tx, 0));
    let outbound = Outbound::default().with_udp(Arc::clone(&socket));
    let mut ua = UserAgent::new(UaConfig {
        contact_host: local.to_string(),
        user_agent: format!("Patchbay/{} (call)", env!("CARGO_PKG_VERSION")),
        timers: TimerConfig::default(),
        rng_key: crate::random::rng_key(),
    });
    let credentials = match (&args.user, &args.password) {
        (Some(user), Some(password)) => Some(DigestClient::new(user.clone(), password.clone())),
        (Some(_), None) => bail!("--user needs --password (or PATCHBAY_PASSWORD)"),
        _ => None,
    };
    let from = if args.from.contains('<') { args.from.clone() } else { format!("<{}>", args.from) };
    let started = Instant::now();
    println!("calling {target} via {next_hop} from {local}");
    let call = ua.dial(
        started,
        Dial {
            peer: Peer { transport: Transport::Udp, addr: next_hop },
            target,
            from,
            to: None,
            sdp: offer.clone().into_bytes(),
            credentials,
            headers: Vec::new(),
        },
    );
    let mut hangup_at = Some(started + Duration::from_secs_f64(args.ring_timeout.max(0.0)));
    let mut answered = false;
    let mut finished = None;
    loop {
        while let Some(output) = ua.poll_output() {
            match output {
                UaOutput::Transmit { peer, message } => outbound.send(peer, message.to_string().into_bytes()).await,
                UaOutput::Event(UaEvent::Progress { status, sdp, .. }) => {
                    let early = if sdp.is_some() { " with early media" } else { "" };
                    println!("{status}{early} after {:.2} s", started.elapsed().as_secs_f64());
                }
                UaOutput::Event(UaEvent::Answered { sdp, .. }) => {
                    answered = true;
                    println!("answered after {:.2} s", started.elapsed().as_secs_f64());
                    hangup_at = Some(Instant::now() + Duration::from_secs_f64(args.hangup_after.max(0.0)));
                    match patchbay_sip::sdp::accept_answer(&offer, &String::from_utf8_lossy(&sdp)) {
                        Ok(negotiated) => {
                            let session = crate::media::session_for(
                                &negotiated,
                                negotiated.ptime,
                                engine.pool(),
                                None,
                                crate::random::u64(),
                                crate::media::MediaPeer::ANY,
                            );
                            let to_play = prompt.clone().map(|p| (p, 0));
                            let (tx, heard) = tokio::sync::mpsc::channel(crate::media::FLOW_AUDIO_QUEUE * 4);
                            let (dtmf, _) = tokio::sync::mpsc::channel(16);
                            let (inactive, _) = tokio::sync::mpsc::unbounded_channel();
                            let sinks =
                                crate::media::CallSinks { dtmf, played: tokio::sync::watch::channel(0).0, inactive };
                            if let Some((rtp, rtcp)) = sockets.take() {
                                let started_media = engine
                                    .start_call(session, crate::media::MediaPeer::ANY, rtp, Some(rtcp), sinks)
                                    .context("starting media")?;
                                started_media.listen(Some(crate::media::Listener::Frames(tx)));
                                println!("media: {} with {}", negotiated.codec.name(), negotiated.remote_rtp);
                                audio = Some(CallAudio {
                                    media: started_media,
                                    heard,
                                    to_play,
                                    dtmf: args.dtmf.clone(),
                                    dtmf_at: args
                                        .dtmf_after
                                        .map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0))),
                                    recorded: Vec::new(),
                                });
                            }
                        }
                        Err(e) => println!("the answer's SDP is not usable ({e}): no audio"),
                    }
                }
                UaOutput::Event(UaEvent::Ended { cause, .. }) => {
                    let ok = answered && matches!(cause, EndCause::LocalBye | EndCause::RemoteBye);
                    let what = match cause {
                        EndCause::LocalBye => "we hung up".to_owned(),
                        EndCause::RemoteBye => "the callee hung up".to_owned(),
                        EndCause::Cancelled => "cancelled: nobody answered in time".to_owned(),
                        EndCause::Failed(code) => format!("failed: SIP {code}"),
                        other => format!("{other:?}"),
                    };
                    println!("call ended after {:.2} s: {what}", started.elapsed().as_secs_f64());
                    if let Some(mut audio) = audio.take() {
                        audio.media.close();
                        while let Ok(frame) = audio.heard.try_recv() {
                            audio.recorded.extend_from_slice(&frame.linear());
                        }
                        if let Some(path) = &args.record {
                            std::fs::write(path, crate::recording::wav_bytes(&audio.recorded))
                                .with_context(|| format!("writing {}", path.display()))?;
                            println!("recorded {:.2} s to {}", audio.recorded.len() as f64 / 8_000.0, path.display());
                        }
                    }
                    // Not returning yet: the answer to the callee's BYE may still be queued.
                    finished = Some(ok);
                }
                UaOutput::Event(other) => tracing::debug!(?other, "call event"),
            }
        }
        if let Some(ok) = finished {
            return Ok(ok);
        }
        if let Some(audio) = audio.as_mut() {
            audio.feed(engine.pool());
            while let Ok(frame) = audio.heard.try_recv() {
                audio.recorded.extend_from_slice(&frame.linear());
            }
        }
        // Wake at least every 100 ms while there is audio to feed and record.
        let feed_at = audio.as_ref().map(|_| Instant::now() + Duration::from_millis(100));
        let deadline = [ua.poll_timeout(), hangup_at, feed_at].into_iter().flatten().min();
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            received = inbound.recv() => {
                let Some(Inbound { peer, message }) = received else { bail!("the UDP receiver stopped") };
                ua.handle_receive(Instant::now(), peer, message);
            }
            () = sleep => {
                let now = Instant::now();
                if hangup_at.is_some_and(|at| at <= now) {
                    hangup_at = None;
                    let _ = ua.hangup(now, call);
                }
                ua.handle_timeout(now);
            }
            _ = tokio::signal::ctrl_c() => {
                hangup_at = None;
                let _ = ua.hangup(Instant::now(), call);
            }
        }
    }
}
