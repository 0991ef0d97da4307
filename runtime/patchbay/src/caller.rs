//! `patchbay call`: a test caller. Dials a SIP URI over UDP with the same user agent core the
//! server uses, answers digest challenges, waits, hangs up, and reports what happened.
//!
//! **Not implemented yet:** media. The INVITE offers PCMU/PCMA/telephone-event on a reserved
//! RTP port, but no audio is sent or recorded and no DTMF is sent: playing a WAV, sending
//! digits and saving what the call hears arrive with the media engine. TCP/TLS dialling is not
//! offered either (UDP only).

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
    // The RTP port the offer names (media itself is not implemented yet, see the module docs).
    let rtp = std::net::UdpSocket::bind(SocketAddr::new(local.ip(), 0)).context("reserving an RTP port")?;
    let media = patchbay_sip::sdp::LocalMedia::new(rtp.local_addr().context("RTP port")?, None, 1, 1);
    let offer = patchbay_sip::sdp::offer(&media).context("building the SDP offer")?;

    let (inbound_tx, mut inbound) = tokio::sync::mpsc::channel::<Inbound>(64);
    tokio::spawn(udp_receiver(Arc::clone(&socket), inbound_tx, 0));
    let outbound = Outbound::default().with_udp(Arc::clone(&socket));
    let seed = std::collections::hash_map::RandomState::new();
    let seed = std::hash::BuildHasher::hash_one(&seed, local);
    let mut ua = UserAgent::new(UaConfig {
        contact_host: local.to_string(),
        user_agent: format!("Patchbay/{} (call)", env!("CARGO_PKG_VERSION")),
        timers: TimerConfig::default(),
        seed,
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
            sdp: offer.into_bytes(),
            credentials,
            headers: Vec::new(),
        },
    );
    let mut hangup_at = Some(started + Duration::from_secs_f64(args.ring_timeout.max(0.0)));
    let mut answered = false;
    loop {
        while let Some(output) = ua.poll_output() {
            match output {
                UaOutput::Transmit { peer, message } => outbound.send(peer, message.to_string().into_bytes()).await,
                UaOutput::Event(UaEvent::Progress { status, sdp, .. }) => {
                    let early = if sdp.is_some() { " with early media" } else { "" };
                    println!("{status}{early} after {:.2} s", started.elapsed().as_secs_f64());
                }
                UaOutput::Event(UaEvent::Answered { .. }) => {
                    answered = true;
                    println!("answered after {:.2} s", started.elapsed().as_secs_f64());
                    hangup_at = Some(Instant::now() + Duration::from_secs_f64(args.hangup_after.max(0.0)));
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
                    return Ok(ok);
                }
                UaOutput::Event(other) => tracing::debug!(?other, "call event"),
            }
        }
        let deadline = [ua.poll_timeout(), hangup_at].into_iter().flatten().min();
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
