//! Tenants isolated from each other on one Patchbay (issue 14, point 6): tenant A's flows
//! misbehave on purpose (the chaos fixture: an infinite loop, a memory bomb, a trap storm, a log
//! flood, a host-call flood, a flow that never answers, a flow blocked in a WASI wait) while
//! tenant B's calls run; each attack must end only its own call, within a bounded time and with
//! a CDR saying why, and B's audio must keep leaving Patchbay every 20 ms. A tenant at its call
//! cap does not stop another's calls, and a flow reaches only its own tenant's kv space and its
//! own call.
//!
//! Tenant A is the request-URI host `127.0.0.1`, tenant B `localhost` (both sent to Patchbay on
//! 127.0.0.1). B's caller is [`Phone`], a minimal SIP UAC in this file with its own RTP socket,
//! so that the packets Patchbay sends to B are timestamped by the kernel as they arrive on
//! loopback (arrival on loopback ≈ departure).

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use patchbay_e2e::{Patchbay, free_port, launch, patchbay_call, quiet_port};
use patchbay_media::rtp::RtpPacket;
use serde_json::Value;

/// The tests here measure timing or load the machine on purpose: one at a time, so one's
/// attack does not land in another's measurement on a 2-core CI machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Patchbay with CDRs in `cdr.jsonl`, no RTP inactivity timeout (a silent attacker must be
/// ended by what the test is about, not by that), the top-level tables `global`, tenant `a`
/// (domain 127.0.0.1) with `a_extra` (limits, caps) and the chaos fixture under each of
/// `a_flows`, and tenant `b` (domain localhost) with the stock echo and the chaos fixture under
/// each of `b_flows`.
fn start_two_tenants(global: &str, a_extra: &str, a_flows: &[&str], b_flows: &[&str]) -> Patchbay {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("chaos.wasm"), patchbay_stock_flows::fixtures::CHAOS).expect("write fixture");
    let chaos = |names: &[&str]| -> String {
        names.iter().map(|n| format!("[[tenant.flow]]\nname = \"{n}\"\npath = \"chaos.wasm\"\n")).collect()
    };
    let port = free_port();
    let config = format!(
        "[sip]\nlisten = [\"udp:127.0.0.1:{port}\"]\n\
         [media]\nrtp_timeout_secs = 0\n\
         [cdr]\npath = \"cdr.jsonl\"\n{global}\n\
         [[tenant]]\nid = \"a\"\ndomains = [\"127.0.0.1\"]\n{a_extra}\n{}\n\
         [[tenant]]\nid = \"b\"\ndomains = [\"localhost\"]\n\
         [[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n{}\n",
        chaos(a_flows),
        chaos(b_flows),
    );
    launch(dir, port, &config)
}

/// A fresh token for Call-IDs, tags and branches.
fn token() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{:x}{:x}{:x}", std::process::id(), nanos, NEXT.fetch_add(1, Ordering::Relaxed))
}

fn unix_ns(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// A SIP message's header value (first one), by full name, case-insensitive.
fn header<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message.split("\r\n\r\n").next()?.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A minimal SIP UAC over UDP on 127.0.0.1 (RFC 3261 just enough for Patchbay on loopback:
/// INVITE with retransmission until a response, ACK, BYE), with an RTP socket pair of its own.
struct Phone {
    sip: UdpSocket,
    server: SocketAddr,
    uri: String,
    call_id: String,
    from_tag: String,
    to: Option<String>,
    cseq: u32,
    rtp: UdpSocket,
    _rtcp: UdpSocket,
}

/// How an INVITE ended: the final response's code, the response, and (answered) Patchbay's RTP
/// address from its SDP.
struct Answer {
    code: u16,
    response: String,
    remote_rtp: Option<SocketAddr>,
}

impl Phone {
    /// A phone that will call `sip:user@host:port` (Patchbay's port), sent to 127.0.0.1.
    fn new(port: u16, user: &str, host: &str) -> Phone {
        let sip = UdpSocket::bind("127.0.0.1:0").expect("bind SIP");
        sip.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        // An even RTP port with its RTCP port (+1) bound too: Patchbay's RTCP must not meet a
        // closed port.
        let (rtp, rtcp) = loop {
            let p = quiet_port(2);
            if let (Ok(a), Ok(b)) = (UdpSocket::bind(("127.0.0.1", p)), UdpSocket::bind(("127.0.0.1", p + 1))) {
                break (a, b);
            }
        };
        Phone {
            sip,
            server: SocketAddr::from(([127, 0, 0, 1], port)),
            uri: format!("sip:{user}@{host}:{port}"),
            call_id: format!("{}@isolation", token()),
            from_tag: token(),
            to: None,
            cseq: 1,
            rtp,
            _rtcp: rtcp,
        }
    }

    fn local(&self) -> SocketAddr {
        self.sip.local_addr().expect("local addr")
    }

    fn request(&self, method: &str, cseq: u32, branch: &str, to: &str, body: &str) -> String {
        let local = self.local();
        let content_type = if body.is_empty() { "" } else { "Content-Type: application/sdp\r\n" };
        format!(
            "{method} {uri} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK{branch};rport\r\n\
             From: <sip:phone@{local}>;tag={tag}\r\n\
             To: {to}\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} {method}\r\n\
             Contact: <sip:phone@{local}>\r\n\
             Max-Forwards: 70\r\n\
             {content_type}Content-Length: {len}\r\n\r\n{body}",
            uri = self.uri,
            tag = self.from_tag,
            call_id = self.call_id,
            len = body.len(),
        )
    }

    fn send(&self, message: &str) {
        self.sip.send_to(message.as_bytes(), self.server).expect("send SIP");
    }

    /// The next message from Patchbay within the socket's read timeout. Requests Patchbay
    /// sends us (a BYE, an OPTIONS) are answered 200 and returned too.
    fn receive(&self) -> Option<String> {
        let mut buf = [0u8; 8192];
        let (n, _) = self.sip.recv_from(&mut buf).ok()?;
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        if !message.starts_with("SIP/2.0") && !message.starts_with("ACK") {
            let mut ok = String::from("SIP/2.0 200 OK\r\n");
            for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
                for line in
                    message.lines().filter(|l| l.split(':').next().is_some_and(|n| n.eq_ignore_ascii_case(name)))
                {
                    ok.push_str(line);
                    ok.push_str("\r\n");
                }
            }
            ok.push_str("Content-Length: 0\r\n\r\n");
            self.send(&ok);
        }
        Some(message)
    }

    /// Sends the INVITE (PCMU and telephone-event, our RTP socket) and waits up to `timeout`
    /// for its final response, which it acknowledges.
    fn invite(&mut self, timeout: Duration) -> Answer {
        let rtp_port = self.rtp.local_addr().expect("rtp addr").port();
        let sdp = format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio {rtp_port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n\
             a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=sendrecv\r\n"
        );
        let branch = token();
        let to = format!("<{}>", self.uri);
        let invite = self.request("INVITE", 1, &branch, &to, &sdp);
        self.send(&invite);
        let started = Instant::now();
        let (mut provisional, mut resent) = (false, Instant::now());
        loop {
            assert!(started.elapsed() < timeout, "no final response to the INVITE for {} within {timeout:?}", self.uri);
            // RFC 3261 §17.1.1.2, timer A (a fixed 500 ms is enough on loopback).
            if !provisional && resent.elapsed() > Duration::from_millis(500) {
                self.send(&invite);
                resent = Instant::now();
            }
            let Some(message) = self.receive() else { continue };
            if !message.starts_with("SIP/2.0") || !header(&message, "CSeq").is_some_and(|c| c.ends_with("INVITE")) {
                continue;
            }
            let code: u16 = message.get(8..11).and_then(|c| c.parse().ok()).unwrap_or(0);
            if code < 200 {
                provisional = true;
                continue;
            }
            let to = header(&message, "To").unwrap_or_default().to_owned();
            if code < 300 {
                // RFC 3261 §13.2.2.4: the ACK of a 2xx is a new transaction.
                self.send(&self.request("ACK", 1, &token(), &to, ""));
            } else {
                // §17.1.1.3: the ACK of a failure shares the INVITE's branch.
                self.send(&self.request("ACK", 1, &branch, &to, ""));
            }
            self.to = Some(to);
            let body = message.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            let ip = body.lines().find_map(|l| l.strip_prefix("c=IN IP4 ")).map(str::trim);
            let port = body.lines().find_map(|l| l.strip_prefix("m=audio ")?.split(' ').next()?.parse::<u16>().ok());
            let remote_rtp = match (ip, port) {
                (Some(ip), Some(port)) => format!("{ip}:{port}").parse().ok(),
                _ => None,
            };
            return Answer { code, response: message, remote_rtp };
        }
    }

    /// Hangs up an answered call; returns the BYE's response code (none: no answer in 5 s).
    fn bye(&mut self) -> Option<u16> {
        self.cseq += 1;
        let to = self.to.clone().unwrap_or_else(|| format!("<{}>", self.uri));
        let bye = self.request("BYE", self.cseq, &token(), &to, "");
        self.send(&bye);
        let started = Instant::now();
        let mut resent = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if resent.elapsed() > Duration::from_millis(500) {
                self.send(&bye);
                resent = Instant::now();
            }
            let Some(message) = self.receive() else { continue };
            if message.starts_with("SIP/2.0") && header(&message, "CSeq").is_some_and(|c| c.ends_with("BYE")) {
                return message.get(8..11).and_then(|c| c.parse().ok());
            }
        }
        None
    }

    /// Answers whatever Patchbay sends on the signalling socket (a retransmitted 2xx is
    /// acknowledged again) until `until`.
    fn idle_until(&self, until: Instant) {
        while Instant::now() < until {
            if let Some(message) = self.receive()
                && message.starts_with("SIP/2.0 2")
                && header(&message, "CSeq").is_some_and(|c| c.ends_with("INVITE"))
            {
                let to = header(&message, "To").unwrap_or_default();
                self.send(&self.request("ACK", 1, &token(), to, ""));
            }
        }
    }
}

/// One RTP packet Patchbay sent, as it arrived: kernel receive time (ns since the epoch,
/// `SO_TIMESTAMPNS`), sequence number, RTP timestamp.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    at_ns: i64,
    seq: u16,
}

/// Receives on `socket` until `stop`, noting each RTP packet's kernel receive time: what the
/// test thread does (or how late it is scheduled on a loaded machine) does not enter the figure.
fn receive_rtp(socket: UdpSocket, stop: Arc<AtomicBool>) -> JoinHandle<Vec<Arrival>> {
    use std::os::fd::AsRawFd;
    std::thread::spawn(move || {
        socket.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        let fd = socket.as_raw_fd();
        let on: libc::c_int = 1;
        // SAFETY: a valid socket and a c_int option value of the right size.
        let set = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "SO_TIMESTAMPNS: {}", std::io::Error::last_os_error());
        let mut arrivals = Vec::new();
        let mut buf = [0u8; 2048];
        let mut control = [0u64; 16];
        while !stop.load(Ordering::Relaxed) {
            let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
            // SAFETY: zeroed msghdr is valid; its pointers are set to live buffers below.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            // SAFETY: msg points at buffers that outlive the call.
            let n = unsafe { libc::recvmsg(fd, &raw mut msg, 0) };
            if n < 0 {
                continue; // the read timeout: look at `stop` again
            }
            let mut at_ns = None;
            // SAFETY: walking the control messages the kernel wrote into `control`.
            unsafe {
                let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
                while !cmsg.is_null() {
                    if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS {
                        let ts = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>());
                        at_ns = Some(ts.tv_sec * 1_000_000_000 + ts.tv_nsec);
                    }
                    cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
                }
            }
            let (Some(at_ns), Ok(packet)) = (at_ns, RtpPacket::parse(&buf[..n as usize])) else { continue };
            if packet.header.payload_type == 0 {
                arrivals.push(Arrival { at_ns, seq: packet.header.sequence });
            }
        }
        arrivals
    })
}

/// Sends 20 ms PCMU packets (a quiet square wave) to `remote` until `stop`, on an absolute
/// schedule.
fn send_rtp(socket: UdpSocket, remote: SocketAddr, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let ssrc = std::process::id() ^ 0x5eed_0b0e;
        let start = Instant::now();
        let mut packet = [0u8; 12 + 160];
        for (i, octet) in packet[12..].iter_mut().enumerate() {
            *octet = if (i / 10) % 2 == 0 { 0xe0 } else { 0x60 };
        }
        let mut n: u32 = 0;
        while !stop.load(Ordering::Relaxed) {
            packet[0] = 0x80;
            packet[1] = 0;
            packet[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            packet[4..8].copy_from_slice(&(n * 160).to_be_bytes());
            packet[8..12].copy_from_slice(&ssrc.to_be_bytes());
            let _ = socket.send_to(&packet, remote);
            n += 1;
            let next = start + Duration::from_millis(20 * u64::from(n));
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    })
}

/// Inter-arrival figures of one stream over a window.
#[derive(Debug)]
struct Jitter {
    packets: usize,
    /// Packets expected in the window at one per 20 ms.
    expected: usize,
    /// |gap − 20 ms|, median / 99th percentile / worst, in ms.
    p50_ms: f64,
    p99_ms: f64,
    max_dev_ms: f64,
    /// The longest gap between two packets, in ms.
    max_gap_ms: f64,
    /// Sequence numbers skipped (packets Patchbay never sent, or lost on loopback).
    seq_skipped: u32,
}

impl std::fmt::Display for Jitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of ~{} packets, |gap−20 ms| p50 {:.2} p99 {:.2} max {:.2} ms, longest gap {:.1} ms, {} seq skipped",
            self.packets, self.expected, self.p50_ms, self.p99_ms, self.max_dev_ms, self.max_gap_ms, self.seq_skipped
        )
    }
}

fn jitter(arrivals: &[Arrival], from_ns: i64, to_ns: i64) -> Jitter {
    let window: Vec<&Arrival> = arrivals.iter().filter(|a| (from_ns..=to_ns).contains(&a.at_ns)).collect();
    let gaps: Vec<i64> = window.windows(2).map(|w| w[1].at_ns - w[0].at_ns).collect();
    let mut devs: Vec<f64> = gaps.iter().map(|g| (*g as f64 / 1e6 - 20.0).abs()).collect();
    devs.sort_by(f64::total_cmp);
    let pick = |q: f64| devs.get(((devs.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
    let seq_skipped = window
        .windows(2)
        .map(|w| u32::from(w[1].seq.wrapping_sub(w[0].seq)).saturating_sub(1))
        .filter(|&s| s < 1000)
        .sum();
    Jitter {
        packets: window.len(),
        expected: ((to_ns - from_ns) / 20_000_000) as usize,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        max_dev_ms: devs.last().copied().unwrap_or(f64::NAN),
        max_gap_ms: gaps.iter().max().map_or(f64::NAN, |g| *g as f64 / 1e6),
        seq_skipped,
    }
}

/// A call of tenant B to the echo flow with audio both ways, hung up after `hold`; returns the
/// arrivals of Patchbay's packets and what went wrong on the signalling side.
fn echo_call_of_b(port: u16, hold: Duration) -> JoinHandle<(Vec<Arrival>, Result<(), String>)> {
    std::thread::spawn(move || {
        let mut phone = Phone::new(port, "echo", "localhost");
        let answer = phone.invite(Duration::from_secs(10));
        let Some(remote) = answer.remote_rtp.filter(|_| answer.code == 200) else {
            return (Vec::new(), Err(format!("B's call was not answered with SDP:\n{}", answer.response)));
        };
        let stop = Arc::new(AtomicBool::new(false));
        let receiver = receive_rtp(phone.rtp.try_clone().expect("clone rtp"), Arc::clone(&stop));
        let sender = send_rtp(phone.rtp.try_clone().expect("clone rtp"), remote, Arc::clone(&stop));
        phone.idle_until(Instant::now() + hold);
        let bye = phone.bye();
        stop.store(true, Ordering::Relaxed);
        let _ = sender.join();
        let arrivals = receiver.join().expect("rtp receiver");
        let result = if bye == Some(200) { Ok(()) } else { Err(format!("B's BYE got {bye:?}")) };
        (arrivals, result)
    })
}

/// What `patchbay call` printed for one attack, and how long it took.
type Attacked = (String, Duration);

/// One attack of tenant A, placed with `patchbay call`.
fn attack(port: u16, flow: &'static str, args: &'static [&'static str]) -> JoinHandle<Attacked> {
    std::thread::spawn(move || {
        let dir = tempfile::tempdir().expect("tempdir");
        let started = Instant::now();
        let uri = format!("sip:{flow}@127.0.0.1:{port}");
        let mut all = vec![uri.as_str()];
        all.extend_from_slice(args);
        let (_, text) = patchbay_call(dir.path(), &all);
        (text, started.elapsed())
    })
}

/// User plus system CPU time of process `pid` so far, in seconds (`/proc/PID/stat`).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks: u64 = fields.get(11..13).map_or(0, |f| f.iter().filter_map(|t| t.parse::<u64>().ok()).sum());
    // SAFETY: sysconf only reads a system constant.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / per_sec as f64
}

fn ms(cdr: &Value, field: &str) -> u64 {
    cdr[field].as_u64().unwrap_or(u64::MAX)
}

#[test]
fn adversarial_flows_end_only_their_own_calls() {
    let _serial = serial();
    // A's limits: a memory cap well below the pool's slot, and a CPU budget of 1.5 s of guest
    // time per call (the 200 ms compute slice is the host's default and not configurable).
    let attacks = ["loop", "grow", "trap", "log-flood", "kv-flood", "never-answer", "wasi-wait"];
    let pb = start_two_tenants("", "memory_mb = 16\ncpu_budget_ms = 1500\n", &attacks, &[]);
    let port = pb.port;

    // B: two echo calls with audio both ways through the whole attack.
    const B_CALLS: usize = 2;
    let b_hold = Duration::from_secs(11);
    let b: Vec<_> = (0..B_CALLS).map(|_| echo_call_of_b(port, b_hold)).collect();
    // A second of calm first (the baseline), then every attack at once.
    std::thread::sleep(Duration::from_millis(1_500));
    let attack_start = SystemTime::now();
    let attack_clock = Instant::now();
    let cpu_before = cpu_secs(pb.pid());
    // Each attacker places its calls back to back for ATTACK (the short ones, ended in well
    // under a second, many times over), so the machine is under attack for the whole window
    // and not only at its start; `once` attackers place one call.
    const ATTACK: Duration = Duration::from_secs(6);
    let mut attackers: Vec<(&str, JoinHandle<Vec<Attacked>>)> = Vec::new();
    for (flow, args, callers, once) in [
        ("loop", &["--ring-timeout", "30", "--hangup-after", "30"][..], 1, false),
        ("grow", &["--ring-timeout", "30", "--hangup-after", "30"][..], 1, false),
        // The trap storm: two callers placing traps back to back.
        ("trap", &["--ring-timeout", "30", "--hangup-after", "30"][..], 2, false),
        // Once: each call writes its burst of 200 lines (twice the rate) to the log before
        // the rate limit drops the rest, and they land in this test's output.
        ("log-flood", &["--hangup-after", "30"][..], 1, true),
        ("kv-flood", &["--hangup-after", "30"][..], 2, false),
        // The caller gives up after 3 s (CANCEL); the flow must then end with the call.
        ("never-answer", &["--ring-timeout", "3"][..], 1, true),
        // The caller hangs up after 3 s; the flow, blocked in WASI, must not hold the call.
        ("wasi-wait", &["--hangup-after", "3"][..], 1, true),
    ] {
        let args: &'static [&'static str] = args;
        let flow: &'static str = flow;
        for _ in 0..callers {
            let thread = std::thread::spawn(move || {
                let mut placed = vec![attack(port, flow, args).join().expect("attacker")];
                while !once && attack_clock.elapsed() < ATTACK {
                    placed.push(attack(port, flow, args).join().expect("attacker"));
                }
                placed
            });
            attackers.push((flow, thread));
        }
    }
    let mut outputs: BTreeMap<&str, Vec<Attacked>> = BTreeMap::new();
    for (flow, handle) in attackers {
        outputs.entry(flow).or_default().extend(handle.join().expect("attacker thread"));
    }
    let attack_end = SystemTime::now();
    let attack_secs = attack_clock.elapsed().as_secs_f64();
    // How hard the attack pressed: Patchbay's own CPU time over the window (2 cores: 2 s a
    // second at most).
    eprintln!("Patchbay used {:.1} s of CPU in the {attack_secs:.1} s of attack", cpu_secs(pb.pid()) - cpu_before);
    let b_results: Vec<_> = b.into_iter().map(|h| h.join().expect("B's caller")).collect();

    // Every call leaves one record: B's, and each attack's (the WASI-blocked one only once
    // its flow is no longer holding the call).
    let attack_calls: usize = outputs.values().map(Vec::len).sum();
    let cdrs = pb.wait_for_cdrs(B_CALLS + attack_calls, Duration::from_secs(15));
    let mut problems: Vec<String> = Vec::new();

    // What each attack must end with (the record's end_cause and sip_code: the ones that
    // never answered are refused with 480, the answered ones hung up by Patchbay), and within
    // how long of its INVITE (duration_ms; the record itself must be written within 15 s of
    // the last attacker's end). Observed, every run: loop 0.3–0.8 s (the 200 ms compute slice,
    // stretched by the contention), grow 0.04–0.4 s, trap 0–0.2 s, log-flood 0.3–0.8 s,
    // kv-flood 2–6 s (the 1.5 s budget counts guest time only, not the host's side of the
    // calls nor time parked behind other work).
    let expected: [(&str, &str, u16, u64); 7] = [
        ("loop", "cpu-limit-exceeded", 480, 10_000),
        ("grow", "memory-limit-exceeded", 480, 10_000),
        ("trap", "flow-trap", 480, 10_000),
        ("log-flood", "cpu-limit-exceeded", 200, 10_000),
        ("kv-flood", "cpu-limit-exceeded", 200, 30_000),
        // Ended by its caller (CANCEL at 3 s): Patchbay has no ring limit of its own.
        ("never-answer", "caller-cancel", 487, 10_000),
        // Ended by its caller (BYE at 3 s); its flow must not keep the record from being
        // written (nor its instance: see `a_flow_blocked_in_wasi_…` below).
        ("wasi-wait", "caller-hangup", 200, 10_000),
    ];
    for (flow, cause, sip_code, bound_ms) in expected {
        let records: Vec<&Value> = cdrs.iter().filter(|c| c["tenant"] == "a" && c["flow"] == flow).collect();
        let placed = outputs.get(flow).map_or(0, Vec::len);
        let tally = |field: &str| {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for cdr in &records {
                *counts.entry(format!("{} {}", cdr[field].as_str().unwrap_or("?"), cdr["sip_code"])).or_default() += 1;
            }
            counts
        };
        let mut durations: Vec<u64> = records.iter().map(|c| ms(c, "duration_ms")).collect();
        durations.sort_unstable();
        eprintln!(
            "attack {flow}: {placed} calls, {} records; end_cause/sip_code {:?}; flow_outcome {:?}; duration_ms min {:?} max {:?}; e.g. {:?}",
            records.len(),
            tally("end_cause"),
            tally("flow_outcome"),
            durations.first(),
            durations.last(),
            records.first().map(|c| c["flow_detail"].as_str().unwrap_or("-").chars().take(160).collect::<String>()),
        );
        if records.len() != placed {
            let said = outputs.get(flow).and_then(|o| o.last()).map_or("", |(t, _)| t.as_str());
            problems.push(format!("{flow}: {placed} calls but {} records (last caller said: {said})", records.len()));
        }
        for cdr in records {
            if cdr["end_cause"] != cause || cdr["sip_code"] != sip_code {
                problems.push(format!(
                    "{flow}: end_cause {} sip_code {} (expected {cause} {sip_code}): {cdr}",
                    cdr["end_cause"], cdr["sip_code"]
                ));
            }
            if ms(cdr, "duration_ms") > bound_ms {
                problems.push(format!("{flow}: took {} ms (bound {bound_ms} ms): {cdr}", ms(cdr, "duration_ms")));
            }
        }
    }

    // B: answered, hung up by its caller, and its packets on time during the attack. The
    // bounds are generous, for a loaded 2-core CI machine. Measured on a 2-vCPU VM over
    // 7.4–8 s of attack (Patchbay alone using 3–4.3 s of CPU in it; each B call, 370–400
    // gaps), five runs: |gap − 20 ms| p99 0.08–0.5 ms, worst 0.1–17 ms, longest gap 20–37 ms;
    // no packet missing. The bounds: p99 ≤ 15 ms, no gap over 100 ms (five packets), at least
    // 90 % of the packets.
    let b_records: Vec<&Value> = cdrs.iter().filter(|c| c["tenant"] == "b").collect();
    if b_records.len() != B_CALLS {
        problems.push(format!("B: {} records for {B_CALLS} calls: {b_records:?}", b_records.len()));
    }
    for cdr in &b_records {
        if cdr["end_cause"] != "caller-hangup" || cdr["sip_code"] != 200 || cdr["flow"] != "echo" {
            problems.push(format!("B's call did not end normally: {cdr}"));
        }
    }
    let (from, to) = (unix_ns(attack_start), unix_ns(attack_end));
    for (i, (arrivals, result)) in b_results.iter().enumerate() {
        if let Err(e) = result {
            problems.push(format!("B call {i}: {e}"));
        }
        let first = arrivals.first().map_or(from, |a| a.at_ns);
        let last = arrivals.last().map_or(to, |a| a.at_ns);
        let calm = jitter(arrivals, first + 200_000_000, from);
        let during = jitter(arrivals, from, to.min(last));
        eprintln!("B call {i}: before the attack: {calm}");
        eprintln!("B call {i}: during the attack ({attack_secs:.1} s): {during}");
        if during.packets * 10 < during.expected * 9 {
            problems.push(format!("B call {i}: too few packets during the attack: {during}"));
        }
        if during.p99_ms.is_nan() || during.p99_ms > 15.0 || during.max_gap_ms > 100.0 {
            problems.push(format!("B call {i}: packets late during the attack: {during}"));
        }
    }
    assert!(problems.is_empty(), "isolation failures:\n  {}", problems.join("\n  "));
}

#[test]
fn a_tenant_at_its_call_cap_does_not_stop_another() {
    let _serial = serial();
    let pb = start_two_tenants("", "max_calls = 2\n", &["think"], &[]);
    // A's two calls up (the `think` flow answers and stays silent for 30 s).
    let mut held: Vec<Phone> = Vec::new();
    for _ in 0..2 {
        let mut phone = Phone::new(pb.port, "think", "127.0.0.1");
        let answer = phone.invite(Duration::from_secs(10));
        assert_eq!(answer.code, 200, "A's call under its cap: {}", answer.response);
        held.push(phone);
    }
    // A third is refused at once with a hint when to retry (RFC 3261 §21.5.4) ...
    let mut third = Phone::new(pb.port, "think", "127.0.0.1");
    let refused = third.invite(Duration::from_secs(10));
    assert_eq!(refused.code, 503, "A's third call: {}", refused.response);
    assert!(header(&refused.response, "Retry-After").is_some(), "no Retry-After: {}", refused.response);
    // ... while B, at the same time, is answered.
    let mut b = Phone::new(pb.port, "echo", "localhost");
    let answer = b.invite(Duration::from_secs(10));
    assert_eq!(answer.code, 200, "B's call while A is at its cap: {}", answer.response);
    assert_eq!(b.bye(), Some(200), "B's BYE");
    for phone in &mut held {
        assert_eq!(phone.bye(), Some(200), "A's BYE");
    }
    let cdrs = pb.settled_cdrs(4, Duration::from_secs(10));
    assert_eq!(cdrs.len(), 4, "{cdrs:#?}");
    let busy: Vec<&Value> = cdrs.iter().filter(|c| c["end_cause"] == "tenant-busy").collect();
    assert_eq!(busy.len(), 1, "one refusal: {cdrs:#?}");
    assert_eq!(busy[0]["tenant"], "a", "{}", busy[0]);
    assert_eq!(busy[0]["sip_code"], 503, "{}", busy[0]);
    assert_eq!(busy[0]["call_id"], third.call_id.as_str(), "{}", busy[0]);
    let b_cdr = cdrs.iter().find(|c| c["tenant"] == "b").expect("B's record");
    assert_eq!(b_cdr["end_cause"], "caller-hangup", "{b_cdr}");
    assert_eq!(b_cdr["sip_code"], 200, "{b_cdr}");
    let a_up = cdrs.iter().filter(|c| c["tenant"] == "a" && c["end_cause"] == "caller-hangup").count();
    assert_eq!(a_up, 2, "A's held calls ended by their caller: {cdrs:#?}");
}

/// A BYE, re-INVITE, INFO or NOTIFY carrying the call's whole dialog ID (Call-ID and both
/// tags, which anyone on the signalling path sees) but sent from another port is answered 481
/// and leaves the call up; the caller's own BYE then ends it.
#[test]
fn forged_in_dialog_requests_from_another_port_never_touch_the_call() {
    let _serial = serial();
    let pb = start_two_tenants("", "", &["think"], &[]);
    let mut phone = Phone::new(pb.port, "think", "127.0.0.1");
    let answer = phone.invite(Duration::from_secs(10));
    assert_eq!(answer.code, 200, "{}", answer.response);
    let attacker = UdpSocket::bind("127.0.0.1:0").expect("bind");
    attacker.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let to = phone.to.clone().expect("the dialog's To");
    for (n, method) in ["BYE", "INVITE", "INFO", "NOTIFY"].into_iter().enumerate() {
        let forged = phone.request(method, 10 + n as u32, &token(), &to, "");
        attacker.send_to(forged.as_bytes(), phone.server).expect("send");
        let mut buf = [0u8; 4096];
        let code = loop {
            let (len, _) = attacker.recv_from(&mut buf).expect("an answer to the forged request");
            let reply = String::from_utf8_lossy(&buf[..len]).into_owned();
            let code: u16 = reply.get(8..11).and_then(|c| c.parse().ok()).unwrap_or(0);
            if code >= 200 {
                break code;
            }
        };
        assert_eq!(code, 481, "forged {method} from another port");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(phone.bye(), Some(200), "the call survived the forgeries and ends by the caller's BYE");
    let cdrs = pb.settled_cdrs(1, Duration::from_secs(10));
    assert_eq!(cdrs[0]["end_cause"], "caller-hangup", "{}", cdrs[0]);
}

/// A ringing call holds one of `[sip] max_pending_calls` until it is answered: beyond the cap
/// any tenant's new call gets 503 with Retry-After and a record, and once the ringing call is
/// answered its place is free again.
#[test]
fn calls_beyond_the_cap_on_unanswered_calls_get_503_until_one_is_answered() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("chaos.wasm"), patchbay_stock_flows::fixtures::CHAOS).expect("write fixture");
    let port = free_port();
    let config = format!(
        "[sip]\nlisten = [\"udp:127.0.0.1:{port}\"]\nmax_pending_calls = 1\n\
         [media]\nrtp_timeout_secs = 0\n[cdr]\npath = \"cdr.jsonl\"\n\
         [[tenant]]\nid = \"a\"\ndomains = [\"127.0.0.1\"]\n\
         [[tenant.flow]]\nname = \"ring\"\npath = \"chaos.wasm\"\n\
         [[tenant]]\nid = \"b\"\ndomains = [\"localhost\"]\n\
         [[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n"
    );
    let pb = launch(dir, port, &config);
    // A's call rings (the fixture answers after 30 s) and holds the only place.
    let mut ringing = Phone::new(pb.port, "ring", "127.0.0.1");
    let ringer = std::thread::spawn(move || {
        let answer = ringing.invite(Duration::from_secs(60));
        (ringing, answer)
    });
    std::thread::sleep(Duration::from_secs(2));
    let mut b = Phone::new(pb.port, "echo", "localhost");
    let refused = b.invite(Duration::from_secs(10));
    assert_eq!(refused.code, 503, "B's call while A's rings: {}", refused.response);
    assert!(header(&refused.response, "Retry-After").is_some(), "no Retry-After: {}", refused.response);
    let (mut ringing, answer) = ringer.join().expect("the ringing call");
    assert_eq!(answer.code, 200, "A's call is answered in the end: {}", answer.response);
    // Answered, it no longer counts: B gets in.
    let mut again = Phone::new(pb.port, "echo", "localhost");
    let answer = again.invite(Duration::from_secs(10));
    assert_eq!(answer.code, 200, "B's call once A's was answered: {}", answer.response);
    assert_eq!(again.bye(), Some(200));
    assert_eq!(ringing.bye(), Some(200));
    let cdrs = pb.settled_cdrs(3, Duration::from_secs(10));
    let refusal = cdrs.iter().find(|c| c["end_cause"] == "pending-calls").expect("a record of the refusal");
    assert_eq!((refusal["tenant"].as_str(), refusal["sip_code"].as_u64()), (Some("b"), Some(503)), "{refusal}");
}

/// Calls `flow` of the tenant at `host` (no answer expected: the fixture's kv modes return
/// without answering) and returns the call's record.
fn one_call_record(pb: &Patchbay, flow: &str, host: &str) -> Value {
    let before = pb.cdrs().len();
    let mut phone = Phone::new(pb.port, flow, host);
    let answer = phone.invite(Duration::from_secs(10));
    if answer.code == 200 {
        phone.bye();
    }
    let cdrs = pb.wait_for_cdrs(before + 1, Duration::from_secs(10));
    cdrs.into_iter()
        .find(|c| c["call_id"] == phone.call_id.as_str())
        .unwrap_or_else(|| panic!("no record of {flow}@{host} (answered {}):\n{}", answer.code, answer.response))
}

#[test]
fn a_flow_reaches_only_its_own_tenants_kv() {
    let _serial = serial();
    let pb = start_two_tenants("", "", &["kv", "kv-read"], &["kv-read"]);
    // A writes `greeting` (and reads it back in the same call).
    let wrote = one_call_record(&pb, "kv", "127.0.0.1");
    assert_eq!(wrote["vars"]["kv"], "hello", "A's own write read back: {wrote}");
    // B, under the same key, sees nothing of it; A, in a later call, still does.
    let b_read = one_call_record(&pb, "kv-read", "localhost");
    assert_eq!(b_read["tenant"], "b", "{b_read}");
    assert_eq!(b_read["vars"]["kv-read"], "<none>", "B read A's key: {b_read}");
    let a_read = one_call_record(&pb, "kv-read", "127.0.0.1");
    assert_eq!(a_read["vars"]["kv-read"], "hello", "A's key did not outlive its call: {a_read}");
}

#[test]
fn a_flow_reaches_only_its_own_call() {
    let _serial = serial();
    let pb = start_two_tenants("", "", &["forge-call", "think"], &[]);
    // Another call is up (same tenant, same component) while the forger tries every handle.
    let mut other = Phone::new(pb.port, "think", "127.0.0.1");
    let answer = other.invite(Duration::from_secs(10));
    assert_eq!(answer.code, 200, "{}", answer.response);
    let forger = one_call_record(&pb, "forge-call", "127.0.0.1");
    assert_eq!(other.bye(), Some(200));
    let own = forger["call_id"].as_str().expect("call_id");
    let reached: BTreeMap<&String, &Value> =
        forger["vars"].as_object().expect("vars").iter().filter(|(k, _)| k.starts_with("forged.")).collect();
    eprintln!(
        "forge-call reached {reached:?} (own {own}); ended {}: {}",
        forger["flow_outcome"], forger["flow_detail"]
    );
    assert!(reached.values().all(|v| *v == own), "a forged handle reached another call: {reached:?} (own {own})");
    assert!(!reached.values().any(|v| *v == other.call_id.as_str()), "reached the other call: {forger}");
    // The first index past its own is refused: a trap of this call only.
    assert_eq!(forger["flow_outcome"], "flow-trap", "{forger}");
    assert!(reached.len() < 64, "every index resolved: {forger}");
    let cdrs = pb.settled_cdrs(2, Duration::from_secs(10));
    let other_cdr = cdrs.iter().find(|c| c["call_id"] == other.call_id.as_str()).expect("the other call's record");
    assert_eq!(other_cdr["end_cause"], "caller-hangup", "the other call went on: {other_cdr}");
}

#[test]
fn a_flow_blocked_in_wasi_does_not_keep_its_instance_after_its_call() {
    let _serial = serial();
    // A pool of four instances; with two tenants each may hold three at once.
    let pb = start_two_tenants("[flows]\nmax_instances = 4\n", "", &["wasi-wait"], &[]);
    // A places four calls, one after the other, to a flow that answers and blocks in a WASI
    // wait, hanging each up. The blocked flow does not see the hang-up; Patchbay stops it a
    // few seconds after the call ended, frees its instance and writes its record. Four calls
    // are more than A's share (three): each one gets in only because the one before was freed.
    let mut ended = Vec::new();
    for n in 1..=4 {
        let mut phone = Phone::new(pb.port, "wasi-wait", "127.0.0.1");
        let answer = phone.invite(Duration::from_secs(10));
        assert_eq!(answer.code, 200, "A's call {n}: {}", answer.response);
        assert_eq!(phone.bye(), Some(200), "A's BYE");
        ended.push(phone.call_id.clone());
        let cdrs = pb.wait_for_cdrs(n, Duration::from_secs(10));
        assert_eq!(cdrs.len(), n, "A's call {n} has no record 10 s after it ended: {cdrs:#?}");
        let cdr = &cdrs[n - 1];
        assert_eq!(cdr["call_id"], ended[n - 1].as_str(), "{cdr}");
        assert_eq!(cdr["end_cause"], "caller-hangup", "{cdr}");
        assert_eq!(cdr["flow_outcome"], "flow-stopped", "{cdr}");
    }
    // Every one of those flows is gone: B finds an instance.
    let mut b = Phone::new(pb.port, "echo", "localhost");
    let answer = b.invite(Duration::from_secs(10));
    assert_eq!(answer.code, 200, "B refused after A's flows were stopped: {}", answer.response);
    b.bye();
}

#[test]
fn a_wasi_wait_is_waiting_not_computing() {
    let _serial = serial();
    let pb = start_two_tenants("", "", &["wasi-sleep"], &[]);
    // The fixture answers, waits 500 ms in WASI (`std::thread::sleep`) and returns: no CPU
    // to speak of, so the 200 ms compute slice must not stop it.
    // `wasi-sleep:500@…`: Patchbay routes on the user part (`wasi-sleep`; the `:500` is the
    // URI's password field), the fixture reads the whole of it.
    let mut phone = Phone::new(pb.port, "wasi-sleep:500", "127.0.0.1");
    let answer = phone.invite(Duration::from_secs(10));
    assert_eq!(answer.code, 200, "{}", answer.response);
    phone.idle_until(Instant::now() + Duration::from_secs(2));
    let cdrs = pb.wait_for_cdrs(1, Duration::from_secs(5));
    let cdr = cdrs.first().unwrap_or_else(|| panic!("no record: the caller still holds the call"));
    assert_eq!(cdr["flow_outcome"], "flow-completed", "a WASI wait counted as computing: {cdr}");
}
