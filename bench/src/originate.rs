//! `patchbay-loadgen originate`: calls placed through the control API into a carrier trunk,
//! measured end to end against the real binary.
//!
//! The benchmark plays both ends Patchbay talks to. As the **API client** it fires `POST
//! /v1/calls` over a few HTTP/1.1 keep-alive connections (a minimal hand-written client: one
//! request at a time per connection, no pipelining). As the **carrier** it is a UDP SIP endpoint
//! on loopback, driven by Patchbay's own sans-IO user agent core: it answers every INVITE at
//! once with 200 OK and a PCMU answer pointing at a UDP socket it owns and never reads (the
//! kernel drops what Patchbay sends there once the socket's buffer is full), and takes the BYE
//! the `greet` flow sends when its prompt has played.
//!
//! Each round is one trunk of the written configuration with `calls_per_second` = the round's
//! cap (huge `max_calls` and `queue`, no registration, no digest). A round either offers its
//! POSTs as fast as the connections allow (`CAP`: the gate's queue fills and the trunk's pacing
//! is what the carrier sees; N = CAP × (seconds + 1), the first second's worth being the gate's
//! burst) or paced at a lower rate (`CAP@OFFER`: no call ever waits for a token, so the time from
//! POST to INVITE is Patchbay's own path: API → gate → SIP endpoint → the wire).
//!
//! POST → INVITE: the monotonic clock read just before the request's bytes are written, against
//! the kernel's arrival stamp of the INVITE on the carrier's socket (`SO_TIMESTAMPNS`, converted
//! to the monotonic clock), so neither the client's nor the carrier's scheduling after the
//! datagram arrived shows up in it. Calls are matched by the number called (the Request-URI
//! user), unique per call.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener as StdTcpListener, UdpSocket as StdUdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patchbay_sip::message::{Limits, Parsed, parse_datagram};
use patchbay_sip::sdp::{self, LocalMedia};
use patchbay_sip::transaction::{Peer, TimerConfig, Transport};
use patchbay_sip::ua::{CallRef, EndCause, UaConfig, UaEvent, UaOutput, UserAgent};
use patchbay_udp::{ArrivalClock, Batch};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::procstat;
use crate::suite::Process;

/// Options of `originate`.
#[derive(Debug, Clone, clap::Args)]
pub struct OriginateArgs {
    /// The Patchbay binary (a release build).
    #[arg(long, default_value = "target/release/patchbay")]
    pub patchbay: PathBuf,
    /// Rounds, in order: `CAP` (the trunk's calls_per_second; POSTs as fast as the connections
    /// allow) or `CAP@OFFER` (POSTs paced at OFFER per second).
    #[arg(long, value_delimiter = ',', default_value = "100,300,500,800,1000@200")]
    pub rounds: Vec<RoundSpec>,
    /// Seconds of steady load per round: a `CAP` round places CAP × (seconds + 1) calls, a
    /// `CAP@OFFER` round OFFER × seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u32,
    /// HTTP/1.1 keep-alive connections the POSTs share.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// `RUST_LOG` for Patchbay (its log is written to OUT/patchbay.log).
    #[arg(long, default_value = "warn")]
    pub patchbay_log: String,
    /// Results directory (the configuration written, Patchbay's log, rounds.json).
    #[arg(long, default_value = "target/bench-originate")]
    pub out: PathBuf,
}

/// One round: the trunk's cap and, when paced, the offered rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundSpec {
    /// The trunk's `calls_per_second`.
    pub cap: u32,
    /// POSTs per second; `None`: as fast as the connections allow.
    pub offer: Option<u32>,
}

impl std::str::FromStr for RoundSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let number = |t: &str| t.trim().parse::<u32>().ok().filter(|n| *n > 0).ok_or(format!("bad rate {t:?}"));
        match s.split_once('@') {
            Some((cap, offer)) => Ok(Self { cap: number(cap)?, offer: Some(number(offer)?) }),
            None => Ok(Self { cap: number(s)?, offer: None }),
        }
    }
}

impl std::fmt::Display for RoundSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.offer {
            Some(offer) => write!(f, "{}@{offer}", self.cap),
            None => write!(f, "{}", self.cap),
        }
    }
}

const TENANT_TOKEN: &str = "bench-token";

/// Percentiles in ms.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Percentiles {
    fn of(samples: &mut [f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
        Self { count: samples.len(), p50_ms: at(0.5), p90_ms: at(0.9), p99_ms: at(0.99), max_ms: at(1.0) }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} p90 {:.2} p99 {:.2} max {:.2} ms (n = {})",
            self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms, self.count
        )
    }
}

/// What one round measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OriginateReport {
    /// `CAP` or `CAP@OFFER`.
    pub round: String,
    /// The trunk's calls_per_second.
    pub cap: u32,
    /// POSTs per second offered; 0: as fast as the connections allow.
    pub offered: u32,
    /// POSTs sent.
    pub posts: usize,
    /// POSTs answered 201.
    pub accepted: usize,
    /// POSTs answered 429.
    pub refused: usize,
    /// Other answers, by HTTP status (0: the connection failed).
    pub post_errors: BTreeMap<u16, usize>,
    /// First POST written → last POST answered, seconds.
    pub post_seconds: f64,
    /// POSTs per second over that time.
    pub post_rate: f64,
    /// POST written → its answer read.
    pub post_answer: Percentiles,
    /// Distinct INVITEs the carrier received for this round's calls.
    pub invites: usize,
    /// INVITE copies beyond the first (retransmissions: our 200 OK was late or lost).
    pub invite_retransmissions: u64,
    /// First INVITE → last INVITE, seconds.
    pub invite_seconds: f64,
    /// INVITEs received in each second from the first one.
    pub invites_per_second: Vec<usize>,
    /// INVITEs per second from 1.5 s after the first INVITE to the last (after the gate's burst
    /// of one second's worth).
    pub steady_cps: f64,
    /// INVITEs per second over the whole round (first to last INVITE).
    pub overall_cps: f64,
    /// Calls that ended with Patchbay's BYE after the prompt (completed).
    pub completed: usize,
    /// Accepted calls whose INVITE never reached the carrier.
    pub missing_invites: usize,
    /// Calls that ended any other way, by cause (or `still up` when the round's wait ran out).
    pub failures: BTreeMap<String, usize>,
    /// POST written → INVITE arrived on the carrier's socket. In a `CAP` round this includes
    /// the wait for the gate's tokens; in a `CAP@OFFER` round below the cap it does not.
    pub post_to_invite: Percentiles,
    /// Carrier INVITE → BYE received (the flow's prompt plus signalling), ms.
    pub call_length: Percentiles,
    /// Patchbay's CPU from the first POST to the last call's end, percent of one core.
    pub patchbay_cpu_percent: f64,
    /// Of which in the kernel.
    pub patchbay_system_percent: f64,
    /// Patchbay CPU per completed call, µs (API, gate, SIP, the flow and its 1.7 s of media).
    pub patchbay_cpu_us_per_call: f64,
    /// The benchmark's own CPU over the same time, percent of one core.
    pub loadgen_cpu_percent: f64,
    /// CPU that other processes on the machine used over the same time (the machine's busy time
    /// less Patchbay's and the benchmark's), percent of one core.
    pub other_cpu_percent: f64,
    /// VM steal time over the round, percent of all CPU time.
    pub steal_percent: Option<f64>,
    /// Datagrams the carrier's SIP socket dropped (its own overload).
    pub carrier_socket_drops: u32,
    /// Warning and error lines Patchbay logged during the round.
    pub patchbay_log_lines: usize,
}

/// How a carrier-side call is doing.
#[derive(Debug, Clone)]
struct CarrierCall {
    /// Kernel arrival time of the first INVITE copy.
    invited: Instant,
    copies: u64,
    ended: Option<(Instant, Ending)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    /// Patchbay's BYE after the prompt.
    Bye,
    Other(String),
}

/// What the carrier thread shares with the rounds, by number called.
#[derive(Debug, Default)]
struct CarrierBook {
    calls: HashMap<String, CarrierCall>,
    socket_drops: u32,
}

/// The carrier: a UDP SIP endpoint on its own thread.
struct Carrier {
    sip: SocketAddr,
    book: Arc<Mutex<CarrierBook>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock(book: &Mutex<CarrierBook>) -> MutexGuard<'_, CarrierBook> {
    book.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Carrier {
    fn start() -> anyhow::Result<Self> {
        let socket = StdUdpSocket::bind("127.0.0.1:0").context("binding the carrier's SIP socket")?;
        socket.set_nonblocking(true).context("carrier socket")?;
        let fd = socket.as_raw_fd();
        patchbay_udp::set_buffer_sizes(fd, 8 << 20);
        patchbay_udp::enable_timestamps(fd).context("SO_TIMESTAMPNS")?;
        patchbay_udp::enable_drop_counter(fd).context("SO_RXQ_OVFL")?;
        // Where the answers point Patchbay's RTP; never read.
        let media = StdUdpSocket::bind("127.0.0.1:0").context("binding the carrier's media socket")?;
        let sip = socket.local_addr().context("carrier address")?;
        let book = Arc::new(Mutex::new(CarrierBook::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (book, stop) = (Arc::clone(&book), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("carrier".into())
                .spawn(move || carrier_loop(&socket, &media, &book, &stop))
                .context("carrier thread")?
        };
        Ok(Self { sip, book, stop, thread: Some(thread) })
    }
}

impl Drop for Carrier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Receives in batches (with kernel arrival stamps), feeds the user agent, answers every INVITE
/// and records what happened to each number.
fn carrier_loop(socket: &StdUdpSocket, media: &StdUdpSocket, book: &Mutex<CarrierBook>, stop: &AtomicBool) {
    let fd = socket.as_raw_fd();
    let local = socket.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    let mut ua = UserAgent::new(UaConfig {
        contact_host: local.to_string(),
        user_agent: format!("patchbay-loadgen-carrier/{}", env!("CARGO_PKG_VERSION")),
        timers: TimerConfig::default(),
        rng_key: patchbay_sip::ua::RngKey::fixed(std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            local,
        )),
    });
    let mut local_media =
        LocalMedia::new(media.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0))), None, 1, 1);
    local_media.codecs = vec![sdp::AudioCodec::Pcmu];
    let limits = Limits::default();
    let mut numbers: HashMap<CallRef, String> = HashMap::new();
    let mut batch = Batch::new(64);
    let mut text = String::new();
    while !stop.load(Ordering::Acquire) {
        let received = batch.receive(fd).unwrap_or(0);
        if received == 0 {
            let wait = ua.poll_timeout().map_or(Duration::from_millis(10), |t| {
                t.saturating_duration_since(Instant::now()).min(Duration::from_millis(10))
            });
            wait_readable(fd, wait);
            ua.handle_timeout(Instant::now());
            pump(&mut ua, socket, &local_media, &mut numbers, book, &mut text);
            continue;
        }
        let clock = ArrivalClock::now();
        for i in 0..received {
            let datagram = batch.received(i);
            let (Some(from), arrival_ns, drops) = (datagram.from, datagram.arrival_ns, datagram.drops) else {
                continue;
            };
            let arrived = if arrival_ns == 0 { clock.instant() } else { clock.arrival(arrival_ns) };
            let Ok(Parsed::Sip(message)) = parse_datagram(datagram.data, &limits) else { continue };
            if let rsip::SipMessage::Request(request) = &message
                && request.method == rsip::Method::Invite
            {
                let number = request.uri.auth.as_ref().map(|a| a.user.clone()).unwrap_or_default();
                let mut book = lock(book);
                if let Some(drops) = drops {
                    book.socket_drops = drops;
                }
                book.calls.entry(number).and_modify(|c| c.copies += 1).or_insert(CarrierCall {
                    invited: arrived,
                    copies: 1,
                    ended: None,
                });
            }
            ua.handle_receive(Instant::now(), Peer { transport: Transport::Udp, addr: from }, message);
        }
        ua.handle_timeout(Instant::now());
        pump(&mut ua, socket, &local_media, &mut numbers, book, &mut text);
    }
}

fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration) {
    let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe {
        libc::poll(&mut pollfd, 1, ms);
    }
}

fn pump(
    ua: &mut UserAgent,
    socket: &StdUdpSocket,
    local_media: &LocalMedia,
    numbers: &mut HashMap<CallRef, String>,
    book: &Mutex<CarrierBook>,
    text: &mut String,
) {
    use std::fmt::Write;
    while let Some(output) = ua.poll_output() {
        let now = Instant::now();
        match output {
            UaOutput::Transmit { peer, message } => {
                text.clear();
                let _ = write!(text, "{message}");
                for _ in 0..200 {
                    match socket.send_to(text.as_bytes(), peer.addr) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_micros(50));
                        }
                        _ => break,
                    }
                }
            }
            UaOutput::Event(UaEvent::IncomingCall { call, request, .. }) => {
                let number = request.uri.auth.as_ref().map(|a| a.user.clone()).unwrap_or_default();
                match sdp::answer(&String::from_utf8_lossy(&request.body), local_media) {
                    Ok(answer) => {
                        let _ = ua.answer(now, call, answer.local_sdp.into_bytes());
                    }
                    Err(e) => {
                        let _ = ua.reject(now, call, e.sip_status());
                    }
                }
                numbers.insert(call, number);
            }
            UaOutput::Event(UaEvent::ReInvite { call, .. }) => {
                let sdp = ua.local_sdp(call).map(<[u8]>::to_vec);
                let _ = ua.answer_reinvite(now, call, sdp.ok_or(488));
            }
            UaOutput::Event(UaEvent::Ended { call, cause }) => {
                let Some(number) = numbers.remove(&call) else { continue };
                let ending = match cause {
                    EndCause::RemoteBye => Ending::Bye,
                    other => Ending::Other(format!("{other:?}")),
                };
                if let Some(c) = lock(book).calls.get_mut(&number) {
                    c.ended = Some((now, ending));
                }
            }
            UaOutput::Event(_) => {}
        }
    }
}

/// One POST as the client saw it.
#[derive(Debug, Clone)]
struct Post {
    index: usize,
    sent: Instant,
    answered: Instant,
    status: u16,
    id: Option<String>,
}

/// A minimal HTTP/1.1 client connection (keep-alive, one request at a time).
struct HttpConnection {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl HttpConnection {
    fn new(addr: SocketAddr) -> Self {
        Self { addr, stream: None, buf: Vec::with_capacity(4096) }
    }

    async fn connect(&mut self) -> std::io::Result<()> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
        }
        Ok(())
    }

    /// Sends `request` (complete, with headers) and reads the answer; returns the instant just
    /// before the bytes were written, the status and the body.
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<(Instant, u16, Vec<u8>)> {
        self.connect().await?;
        let stream = self.stream.as_mut().ok_or(std::io::ErrorKind::NotConnected)?;
        let sent = Instant::now();
        let result = async {
            stream.write_all(request).await?;
            read_response(stream, &mut self.buf).await
        }
        .await;
        match result {
            Ok((status, body, close)) => {
                if close {
                    self.stream = None;
                }
                Ok((sent, status, body))
            }
            Err(e) => {
                self.stream = None;
                Err(e)
            }
        }
    }
}

/// Reads one response: status, body (Content-Length framing; axum always sends it for these
/// answers) and whether the server will close the connection. Shared with the tenancy benchmarks.
pub(crate) async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<(u16, Vec<u8>, bool)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("response head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut length = 0usize;
    let mut close = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().map_err(|_| bad("bad Content-Length"))?;
        } else if name.eq_ignore_ascii_case("connection") && value.trim().eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((status, buf[head_end..head_end + length].to_vec(), close))
}

fn post_request(api: SocketAddr, body: &str) -> Vec<u8> {
    format!(
        "POST /v1/calls HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {TENANT_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn get_request(api: SocketAddr, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {TENANT_TOKEN}\r\n\r\n").into_bytes()
}

/// The number round `round` calls for its call `index`: unique per call, so the carrier's
/// INVITE names its POST.
fn number(round: usize, index: usize) -> String {
    format!("+1999{round:02}{index:07}")
}

/// Fires the round's POSTs from `connections` keep-alive connections; paced at `offer` per
/// second when given, else back to back.
async fn fire(
    api: SocketAddr,
    trunk: &str,
    round: usize,
    calls: usize,
    offer: Option<u32>,
    connections: usize,
) -> Vec<Post> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now() + Duration::from_millis(20);
    let mut tasks = Vec::new();
    for _ in 0..connections.max(1) {
        let next = Arc::clone(&next);
        let trunk = trunk.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut connection = HttpConnection::new(api);
            let mut posts = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= calls {
                    break;
                }
                if let Some(offer) = offer {
                    let due = start + Duration::from_secs_f64(index as f64 / f64::from(offer));
                    tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
                }
                let body = format!(
                    r#"{{"to":"{}","trunk":"{trunk}","flow":"greet","vars":{{"greet.repeat":"1"}}}}"#,
                    number(round, index)
                );
                let request = post_request(api, &body);
                let post = match connection.exchange(&request).await {
                    Ok((sent, status, body)) => {
                        let id = serde_json::from_slice::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|v| v["id"].as_str().map(str::to_owned));
                        Post { index, sent, answered: Instant::now(), status, id }
                    }
                    Err(e) => {
                        eprintln!("loadgen: POST {index} failed: {e}");
                        let now = Instant::now();
                        Post { index, sent: now, answered: now, status: 0, id: None }
                    }
                };
                posts.push(post);
            }
            posts
        }));
    }
    let mut posts = Vec::with_capacity(calls);
    for task in tasks {
        posts.extend(task.await.unwrap_or_default());
    }
    posts.sort_by_key(|p| p.index);
    posts
}

/// A free loopback TCP port (bound and released: Patchbay binds it a moment later).
fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(StdTcpListener::bind("127.0.0.1:0").context("probing for a free port")?.local_addr()?.port())
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(StdUdpSocket::bind("127.0.0.1:0").context("probing for a free port")?.local_addr()?.port())
}

/// Patchbay's configuration: one trunk per round, all to the carrier.
fn config(sip_port: u16, api_port: u16, carrier: SocketAddr, rounds: &[RoundSpec], queue: usize) -> String {
    let mut text = format!(
        r#"# Written by `patchbay-loadgen originate`.
[sip]
listen = ["udp:127.0.0.1:{sip_port}"]
# The carrier sends everything from one address.
max_messages_per_source = 0
queue_depth = 65536

[api]
listen = "127.0.0.1:{api_port}"
admin_token = "bench-admin-token"

[flows]
max_instances = 8000
max_memory_mb = 64

[media]
rtp_timeout_secs = 60
srtp = false

[[tenant]]
id = "bench"
domains = ["127.0.0.1"]
api_token = "{TENANT_TOKEN}"
memory_mb = 32
cpu_budget_ms = 10000

# Plays welcome.wav `greet.repeat` times (about 1.7 s each), then hangs up.
[[tenant.flow]]
name = "greet"
stock = "greet"
"#
    );
    for (i, round) in rounds.iter().enumerate() {
        text.push_str(&format!(
            r#"
[[tenant.trunk]]
name = "{}"
gateway = "{carrier}"
transport = "udp"
from_domain = "carrier.test"
caller_ids = ["+15550100"]
default_caller_id = "+15550100"
codecs = ["PCMU"]
srtp = "off"
calls_per_second = {}
max_calls = 100000
queue = {queue}
keepalive_secs = 0
"#,
            trunk_name(i, round),
            round.cap
        ));
    }
    text
}

fn trunk_name(i: usize, round: &RoundSpec) -> String {
    format!("r{i}-cap{}", round.cap)
}

fn calls_in(round: &RoundSpec, seconds: u32) -> usize {
    match round.offer {
        Some(offer) => offer as usize * seconds as usize,
        None => round.cap as usize * (seconds as usize + 1),
    }
}

/// Waits until `GET /v1/trunks` answers 200.
async fn wait_for_api(api: SocketAddr, patchbay: &mut Process) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = patchbay.child.try_wait() {
            bail!("patchbay exited ({status}) before serving the API");
        }
        let mut connection = HttpConnection::new(api);
        if let Ok((_, 200, _)) = connection.exchange(&get_request(api, "/v1/trunks")).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the API at {api} did not answer")
}

/// The explicit command line (every option spelled out) that reproduces a run.
fn command_line(args: &OriginateArgs) -> String {
    let rounds: Vec<String> = args.rounds.iter().map(ToString::to_string).collect();
    format!(
        "target/release/patchbay-loadgen originate --patchbay {} --rounds {} --seconds {} --connections {} \
         --patchbay-log {} --out {}",
        args.patchbay.display(),
        rounds.join(","),
        args.seconds,
        args.connections,
        args.patchbay_log,
        args.out.display()
    )
}

/// Runs every round against one Patchbay.
pub async fn run(args: OriginateArgs) -> anyhow::Result<()> {
    if args.rounds.is_empty() {
        bail!("no rounds");
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let out = std::fs::canonicalize(&args.out).context("results directory")?;
    let patchbay_bin = std::fs::canonicalize(&args.patchbay)
        .with_context(|| format!("{} (build it: cargo build --release -p patchbay)", args.patchbay.display()))?;
    println!("command: {}", command_line(&args));
    println!("date: {}", crate::suite::date_utc());
    println!("machine: {}, nproc {}", crate::suite::machine(), nproc());
    println!("patchbay: {}", patchbay_bin.display());

    let carrier = Carrier::start()?;
    let (sip_port, api_port) = (free_udp_port()?, free_tcp_port()?);
    let api = SocketAddr::from(([127, 0, 0, 1], api_port));
    let queue = args.rounds.iter().map(|r| calls_in(r, args.seconds)).max().unwrap_or(1000) * 2;
    let config_path = out.join("originate.toml");
    std::fs::write(&config_path, config(sip_port, api_port, carrier.sip, &args.rounds, queue))
        .context("writing originate.toml")?;
    let log_path = out.join("patchbay.log");
    let mut patchbay = Process::spawn(
        "patchbay",
        Command::new(&patchbay_bin).arg("run").arg("--config").arg(&config_path).env("RUST_LOG", &args.patchbay_log),
        &log_path,
    )?;
    wait_for_api(api, &mut patchbay).await?;
    let patchbay_pid = patchbay.pid()?;
    println!("carrier (SIP) at {}, Patchbay SIP 127.0.0.1:{sip_port}, API {api}", carrier.sip);

    let run_steal = procstat::cpu_times();
    let mut reports = Vec::new();
    for (i, round) in args.rounds.iter().enumerate() {
        let report = run_round(i, round, &args, api, patchbay_pid, &carrier, &log_path).await?;
        println!("{}", serde_json::to_string(&report).context("report as JSON")?);
        reports.push(report);
        // Let the round's last calls and their transactions end before the next one.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let steal = procstat::steal_since(run_steal);
    patchbay.stop().await;
    drop(carrier);

    println!();
    println!("{}", summary(&reports));
    match steal {
        Some(steal) => println!("VM steal time over the whole run: {steal:.1} % of all CPU time"),
        None => println!("VM steal time: not available (/proc/stat)"),
    }
    let json = serde_json::to_string_pretty(&reports).context("reports as JSON")?;
    std::fs::write(out.join("rounds.json"), json).context("writing rounds.json")?;
    Ok(())
}

fn nproc() -> usize {
    std::thread::available_parallelism().map_or(0, usize::from)
}

async fn run_round(
    i: usize,
    round: &RoundSpec,
    args: &OriginateArgs,
    api: SocketAddr,
    patchbay_pid: u32,
    carrier: &Carrier,
    log_path: &Path,
) -> anyhow::Result<OriginateReport> {
    let calls = calls_in(round, args.seconds);
    let trunk = trunk_name(i, round);
    let offered = match round.offer {
        Some(o) => format!("{o}/s"),
        None => "as fast as possible".into(),
    };
    println!();
    println!("round {round}: trunk {trunk}, cap {} calls/s, {calls} POSTs offered {offered}", round.cap);
    let log_offset = std::fs::metadata(log_path).map_or(0, |m| m.len());
    let steal_before = procstat::cpu_times();
    let busy_before = procstat::busy_times();
    let me = std::process::id();
    let (pb_before, me_before) = (procstat::sample(patchbay_pid), procstat::sample(me));
    let started = Instant::now();

    let posts = fire(api, &trunk, i, calls, round.offer, args.connections).await;
    let posts_done = Instant::now();
    let accepted: Vec<&Post> = posts.iter().filter(|p| p.status == 201).collect();
    // Wait for every accepted call to end at the carrier: the gate's queue drains at the cap,
    // each call lasts about 1.7 s; 20 s more for stragglers.
    let drain = Duration::from_secs_f64(accepted.len() as f64 / f64::from(round.cap)) + Duration::from_secs(20);
    let deadline = posts_done + drain;
    let numbers: Vec<String> = accepted.iter().map(|p| number(i, p.index)).collect();
    loop {
        let ended = {
            let book = lock(&carrier.book);
            numbers.iter().filter(|n| book.calls.get(*n).is_some_and(|c| c.ended.is_some())).count()
        };
        if ended == numbers.len() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let finished = Instant::now();
    let (pb_after, me_after) = (procstat::sample(patchbay_pid), procstat::sample(me));
    let steal = procstat::steal_since(steal_before);
    let busy = procstat::busy_times().zip(busy_before).map(|((t, b), (t0, b0))| {
        100.0 * nproc() as f64 * b.saturating_sub(b0) as f64 / t.saturating_sub(t0).max(1) as f64
    });

    let mut report = OriginateReport {
        round: round.to_string(),
        cap: round.cap,
        offered: round.offer.unwrap_or(0),
        posts: posts.len(),
        accepted: accepted.len(),
        refused: posts.iter().filter(|p| p.status == 429).count(),
        steal_percent: steal,
        ..OriginateReport::default()
    };
    for p in posts.iter().filter(|p| p.status != 201 && p.status != 429) {
        *report.post_errors.entry(p.status).or_default() += 1;
    }
    if let (Some(first), Some(last)) = (posts.iter().map(|p| p.sent).min(), posts.iter().map(|p| p.answered).max()) {
        report.post_seconds = last.duration_since(first).as_secs_f64();
        report.post_rate = posts.len() as f64 / report.post_seconds.max(1e-9);
    }
    let mut answer_ms: Vec<f64> = posts.iter().map(|p| p.answered.duration_since(p.sent).as_secs_f64() * 1e3).collect();
    report.post_answer = Percentiles::of(&mut answer_ms);

    // Take this round's calls out of the book.
    let mut seen: Vec<(&Post, CarrierCall)> = Vec::new();
    let mut missing: Vec<&Post> = Vec::new();
    {
        let mut book = lock(&carrier.book);
        report.carrier_socket_drops = book.socket_drops;
        for (post, n) in accepted.iter().zip(&numbers) {
            match book.calls.remove(n) {
                Some(call) => seen.push((post, call)),
                None => missing.push(post),
            }
        }
        // INVITEs for this round that no accepted POST asked for (none expected).
        let prefix = format!("+1999{i:02}");
        let strays: Vec<String> = book.calls.keys().filter(|k| k.starts_with(&prefix)).cloned().collect();
        if !strays.is_empty() {
            eprintln!("loadgen: {} INVITEs for numbers no accepted POST asked for", strays.len());
            for s in strays {
                book.calls.remove(&s);
            }
        }
    }
    report.invites = seen.len();
    report.missing_invites = missing.len();
    report.invite_retransmissions = seen.iter().map(|(_, c)| c.copies - 1).sum();
    let mut latency: Vec<f64> = seen
        .iter()
        .map(|(p, c)| c.invited.checked_duration_since(p.sent).unwrap_or_default().as_secs_f64() * 1e3)
        .collect();
    report.post_to_invite = Percentiles::of(&mut latency);
    let mut invited: Vec<Instant> = seen.iter().map(|(_, c)| c.invited).collect();
    invited.sort();
    if let (Some(&first), Some(&last)) = (invited.first(), invited.last()) {
        report.invite_seconds = last.duration_since(first).as_secs_f64();
        report.overall_cps = (invited.len() - 1) as f64 / report.invite_seconds.max(1e-9);
        let mut bins = vec![0usize; report.invite_seconds as usize + 1];
        for t in &invited {
            bins[t.duration_since(first).as_secs() as usize] += 1;
        }
        report.invites_per_second = bins;
        let steady: Vec<&Instant> =
            invited.iter().filter(|t| t.duration_since(first) >= Duration::from_millis(1500)).collect();
        if let (Some(a), Some(b)) = (steady.first(), steady.last())
            && steady.len() > 1
        {
            report.steady_cps = (steady.len() - 1) as f64 / b.duration_since(**a).as_secs_f64().max(1e-9);
        }
    }
    let mut lengths = Vec::new();
    for (_, call) in &seen {
        match &call.ended {
            Some((at, Ending::Bye)) => {
                report.completed += 1;
                lengths.push(at.duration_since(call.invited).as_secs_f64() * 1e3);
            }
            Some((_, Ending::Other(cause))) => *report.failures.entry(cause.clone()).or_default() += 1,
            None => *report.failures.entry("still up".into()).or_default() += 1,
        }
    }
    report.call_length = Percentiles::of(&mut lengths);
    let seconds = finished.duration_since(started).as_secs_f64();
    if let (Some(a), Some(b)) = (pb_before, pb_after) {
        let cpu = b.cpu.saturating_sub(a.cpu).as_secs_f64();
        report.patchbay_cpu_percent = 100.0 * cpu / seconds;
        report.patchbay_system_percent = 100.0 * b.system.saturating_sub(a.system).as_secs_f64() / seconds;
        report.patchbay_cpu_us_per_call = cpu * 1e6 / report.completed.max(1) as f64;
    }
    if let (Some(a), Some(b)) = (me_before, me_after) {
        report.loadgen_cpu_percent = 100.0 * b.cpu.saturating_sub(a.cpu).as_secs_f64() / seconds;
    }
    if let Some(busy) = busy {
        report.other_cpu_percent = (busy - report.patchbay_cpu_percent - report.loadgen_cpu_percent).max(0.0);
    }
    let log = read_from(log_path, log_offset);
    report.patchbay_log_lines = log.lines().filter(|l| !l.trim().is_empty()).count();

    print_round(&report);
    if report.patchbay_log_lines > 0 {
        println!("  patchbay log during the round ({} lines), first ones:", report.patchbay_log_lines);
        for line in log.lines().filter(|l| !l.trim().is_empty()).take(8) {
            println!("    {line}");
        }
    }
    // What Patchbay says about a few calls that did not complete.
    let stuck: Vec<&Post> = missing
        .iter()
        .copied()
        .chain(seen.iter().filter(|(_, c)| !matches!(c.ended, Some((_, Ending::Bye)))).map(|(p, _)| *p))
        .take(5)
        .collect();
    if !stuck.is_empty() {
        let mut connection = HttpConnection::new(api);
        for post in stuck {
            let Some(id) = &post.id else { continue };
            if let Ok((_, status, body)) = connection.exchange(&get_request(api, &format!("/v1/calls/{id}"))).await {
                println!("  GET /v1/calls/{id} → {status} {}", String::from_utf8_lossy(&body));
            }
        }
    }
    Ok(report)
}

fn read_from(path: &Path, offset: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(path)
        && file.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = file.read_to_string(&mut text);
    }
    text
}

fn print_round(r: &OriginateReport) {
    let errors: Vec<String> = r.post_errors.iter().map(|(s, n)| format!("{n}×{s}")).collect();
    println!(
        "  POSTs: {} sent, {} accepted (201), {} refused (429), other: {} — {:.2} s, {:.0} POSTs/s",
        r.posts,
        r.accepted,
        r.refused,
        if errors.is_empty() { "none".into() } else { errors.join(" ") },
        r.post_seconds,
        r.post_rate
    );
    println!("  POST → its 201: {}", r.post_answer);
    println!(
        "  INVITEs: {} received ({} retransmitted copies), {} accepted calls never arrived; first → last {:.2} s",
        r.invites, r.invite_retransmissions, r.missing_invites, r.invite_seconds
    );
    println!(
        "  achieved: steady {:.1} calls/s (from 1.5 s after the first INVITE), overall {:.1} calls/s; cap {}",
        r.steady_cps, r.overall_cps, r.cap
    );
    println!("  INVITEs per second: {:?}", r.invites_per_second);
    let failures: Vec<String> = r.failures.iter().map(|(c, n)| format!("{n}×{c}")).collect();
    println!(
        "  calls: {} completed (BYE after the prompt), failed: {}",
        r.completed,
        if failures.is_empty() { "none".into() } else { failures.join(" ") }
    );
    let gate = if r.offered == 0 { " (includes the wait at the gate)" } else { "" };
    println!("  POST → INVITE on the wire{gate}: {}", r.post_to_invite);
    println!("  INVITE → BYE: {}", r.call_length);
    println!(
        "  CPU: patchbay {:.0} % of a core ({:.0} % kernel), {:.0} µs per completed call; loadgen {:.0} %; \
         other processes {:.0} %",
        r.patchbay_cpu_percent,
        r.patchbay_system_percent,
        r.patchbay_cpu_us_per_call,
        r.loadgen_cpu_percent,
        r.other_cpu_percent
    );
    match r.steal_percent {
        Some(steal) => println!("  VM steal time during the round: {steal:.1} % of all CPU time"),
        None => println!("  VM steal time: not available (/proc/stat)"),
    }
    println!("  carrier socket drops: {}", r.carrier_socket_drops);
}

fn summary(reports: &[OriginateReport]) -> String {
    let mut s = String::from(
        "| round | calls | POSTs 201/429/other | POSTs/s | INVITEs | steady cps | ÷ min(cap, offer) | completed | failed | \
         POST→INVITE p50/p90/p99/max ms | patchbay CPU % | other CPU % | steal % |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in reports {
        let other: usize = r.post_errors.values().sum();
        let failed: usize = r.failures.values().sum::<usize>() + r.missing_invites;
        let p = &r.post_to_invite;
        s.push_str(&format!(
            "| {} | {} | {}/{}/{} | {:.0} | {} | {:.1} | {:.2} | {} | {} | {:.2}/{:.2}/{:.2}/{:.2} | {:.0} | {:.0} | {} |\n",
            r.round,
            r.posts,
            r.accepted,
            r.refused,
            other,
            r.post_rate,
            r.invites,
            r.steady_cps,
            r.steady_cps / f64::from(if r.offered == 0 { r.cap } else { r.cap.min(r.offered) }),
            r.completed,
            failed,
            p.p50_ms,
            p.p90_ms,
            p.p99_ms,
            p.max_ms,
            r.patchbay_cpu_percent,
            r.other_cpu_percent,
            r.steal_percent.map_or("n/a".into(), |v| format!("{v:.1}")),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_parse_and_print() {
        let r: RoundSpec = "1000@200".parse().expect("paced round");
        assert_eq!(r, RoundSpec { cap: 1000, offer: Some(200) });
        assert_eq!(r.to_string(), "1000@200");
        let r: RoundSpec = "500".parse().expect("round");
        assert_eq!((r.cap, r.offer), (500, None));
        assert!("0".parse::<RoundSpec>().is_err());
        assert!("10@x".parse::<RoundSpec>().is_err());
    }

    #[test]
    fn numbers_are_unique_per_round_and_call_and_valid() {
        let a = number(1, 42);
        assert_ne!(a, number(2, 42));
        assert_ne!(a, number(1, 43));
        assert!(a.len() <= 32 && a.chars().all(|c| c.is_ascii_digit() || c == '+'));
    }

    #[tokio::test]
    async fn the_client_reads_keep_alive_answers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 4096];
            for _ in 0..2 {
                let _ = s.read(&mut buf).await;
                let body = r#"{"id":"abc","status":"queued"}"#;
                let answer = format!("HTTP/1.1 201 Created\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                s.write_all(answer.as_bytes()).await.expect("write");
            }
        });
        let mut c = HttpConnection::new(addr);
        for _ in 0..2 {
            let (_, status, body) = c.exchange(&post_request(addr, "{}")).await.expect("exchange");
            assert_eq!(status, 201);
            assert_eq!(body, br#"{"id":"abc","status":"queued"}"#);
        }
    }
}
