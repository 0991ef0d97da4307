//! `patchbay bench-agent`: the latency Patchbay adds between a caller's RTP and an AI agent's
//! websocket and back, with many agent calls at once.
//!
//! Each of `--calls` calls is a real media session on the shared clock and a real agent session
//! (`crate::agent::run`, the code flows' `agent` runs) connected over loopback to an echo agent
//! (`patchbay_agent::server::EchoAgent`, which returns every `media` payload at once). One
//! thread plays all the callers: every 20 ms it sends each call an RTP packet (the calls spread
//! over the 20 ms in 1 ms groups, as real callers are not in phase) whose payload
//! carries a tag (call, sequence); μ-law crosses the agent path octet for octet, so the echo
//! comes back with the same tag.
//!
//! Two figures:
//!
//! - **agent turnaround**: from a caller frame being handed to the agent (after the jitter
//!   buffer, on the clock step that releases it) to the agent's answer to that frame being
//!   taken in — JSON and base64 both ways, the loopback websocket both ways and the echo agent.
//!   Its **Patchbay share** leaves the echo agent's own time out (the agent stamps its send
//!   time into each answer): *to the agent* is the hand-over → the frame in the agent's
//!   socket; *from the agent* is what Patchbay adds after the agent sent.
//! - **round trip** as the callers see it: RTP out → echoed RTP back, packetisation included
//!   (the jitter buffer's 20 ms minimum, and waiting for the call's steps).
//!
//! Two ways of running the agent session, as Patchbay does: `ws://` agents on the media clock
//! (the default; `patchbay_agent::ClockLink`) and, with `--task-path`, in tokio tasks (the path
//! `wss://` agents take). Their *from the agent* figures are not measured the same way, since
//! their answers are taken in at different places:
//!
//! - on the clock, the answer is read at one of the call's steps, the same step that plays it:
//!   the turnaround is therefore a ptime or more by construction, and what Patchbay adds is
//!   how late that step is after the earliest step due after the agent sent (the clock's own
//!   lateness, plus a ptime for every step the answer missed);
//! - in a task, the answer arrives in the session's task whenever that task runs, and then
//!   waits for the next step, which is not counted: *from the agent* is the agent's send → the
//!   answer in the task (the turnaround is then mostly well under a ptime).

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::agent::AgentProbe;
use crate::bench_media::percentile;
use crate::media::agent_link::AGENT_STAMP_AT;
use crate::media::{CallSinks, MediaEngine, PTIME};

/// `patchbay echo-agent`: serves [`patchbay_agent::server::EchoAgent`] until killed (run it
/// beside `bench-agent --agent ws://ADDR/agent` to keep the agent's CPU out of the figures).
pub fn serve_echo(listen: SocketAddr) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
        println!("echo agent on ws://{listen}/agent");
        echo_agent().serve(listener).await;
        Ok(())
    })
}

/// The echo agent both modes use: it stamps its send time into each answer, past the tag.
fn echo_agent() -> patchbay_agent::server::EchoAgent {
    patchbay_agent::server::EchoAgent::stamping(AGENT_STAMP_AT)
}

/// Marks a payload as a tagged test frame (the clock's own silence is all 0xFF).
const MAGIC: [u8; 4] = *b"PBag";

/// Runs the benchmark and prints its figures.
pub fn run(calls: usize, seconds: u64, external_agent: Option<String>, clock_link: bool) -> anyhow::Result<()> {
    crate::media::raise_fd_limit();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting tokio")?;
    let engine = MediaEngine::start().context("starting the media clock")?;
    let agent_url = match &external_agent {
        Some(url) => url.clone(),
        None => {
            let listener =
                runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).context("binding the agent")?;
            let url = format!("ws://{}/agent", listener.local_addr().context("agent address")?);
            runtime.spawn(echo_agent().serve(listener));
            url
        }
    };

    // All callers share one socket: calls are told apart by the SSRC Patchbay sends with.
    let phone = UdpSocket::bind("127.0.0.1:0").context("binding the callers' socket")?;
    phone.set_read_timeout(Some(Duration::from_millis(100))).context("socket timeout")?;
    let phone_addr = phone.local_addr().context("callers' address")?;
    let mut targets: Vec<SocketAddr> = Vec::with_capacity(calls);
    let mut media = Vec::with_capacity(calls);
    let connected = Arc::new(AtomicU64::new(0));
    let probe: Arc<std::sync::Mutex<AgentProbe>> = Arc::default();
    for i in 0..calls {
        let (rtp, _rtcp) = crate::media::bind_rtp_pair([127, 0, 0, 1].into()).context("RTP ports (open files?)")?;
        targets.push(rtp.local_addr().context("RTP address")?);
        let session = crate::bench_media::bench_session(engine.pool(), phone_addr, i as u32);
        let (dtmf, mut dtmf_rx) = tokio::sync::mpsc::channel(4);
        let (played, played_rx) = tokio::sync::watch::channel(0);
        let (inactive, _) = tokio::sync::mpsc::unbounded_channel();
        let _guard = runtime.enter();
        let call = engine.start_call(
            session,
            crate::media::MediaPeer::ANY,
            rtp,
            None,
            CallSinks { dtmf, played, inactive },
        )?;
        media.push(Arc::clone(&call));
        let (url, pool, connected) = (agent_url.clone(), engine.pool().clone(), Arc::clone(&connected));
        let probe = Arc::clone(&probe);
        runtime.spawn(async move {
            let start = patchbay_agent::StartInfo {
                account_sid: "bench".into(),
                call_sid: format!("call-{i}"),
                stream_sid: format!("MZ{i:032x}"),
                custom_parameters: Vec::new(),
            };
            connected.fetch_add(1, Ordering::Relaxed);
            let agent_call = crate::agent::AgentCall {
                media: call,
                pool,
                dtmf: &mut dtmf_rx,
                played: played_rx,
                marks: Arc::default(),
                probe: Some(probe),
                clock_link,
                addrs: None,
            };
            let end = crate::agent::run(agent_call, &url, &start, None, std::future::pending()).await;
            tracing::debug!(call = i, ?end, "bench agent session ended");
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    let stop = Arc::new(AtomicBool::new(false));
    let frames = seconds as usize * 1000 / PTIME.as_millis() as usize + 1;
    let sender = {
        let (phone, stop) = (phone.try_clone().context("socket clone")?, Arc::clone(&stop));
        std::thread::spawn(move || send(&phone, &targets, frames, &stop))
    };
    let receiver = {
        let (phone, stop) = (phone.try_clone().context("socket clone")?, Arc::clone(&stop));
        std::thread::spawn(move || receive(&phone, &stop))
    };
    let cpu_before = process_cpu();
    let machine_before = crate::bench_media::cpu_times();
    let sent_at = sender.join().map_err(|_| anyhow::anyhow!("sender thread panicked"))?;
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Release);
    let cpu = process_cpu().saturating_sub(cpu_before);
    let steal = crate::bench_media::steal_since(machine_before);
    let echoes = receiver.join().map_err(|_| anyhow::anyhow!("receiver thread panicked"))?;
    for m in &media {
        m.close();
    }

    let mut rtt = Vec::with_capacity(echoes.len());
    for (call, seq, arrived) in &echoes {
        let Some(sent) = sent_at.get(*seq as usize).and_then(|row| row.get(*call as usize)).copied().flatten() else {
            continue;
        };
        rtt.push(arrived.duration_since(sent).as_micros() as u32);
    }
    let mut probe = std::mem::take(&mut *probe.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    for figures in [&mut probe.turnaround, &mut probe.patchbay, &mut probe.to_agent, &mut probe.from_agent] {
        figures.sort_unstable();
    }
    rtt.sort_unstable();
    let sent_total = sent_at.iter().flatten().filter(|s| s.is_some()).count();
    let where_agent = match &external_agent {
        Some(url) => format!(" --agent {url}"),
        None => String::new(),
    };
    let task_path = if clock_link { "" } else { " --task-path" };
    println!("patchbay bench-agent --calls {calls} --seconds {seconds}{where_agent}{task_path}");
    println!(
        "agent calls: {calls} ({} sessions started) on one echo agent over loopback websockets ({})",
        connected.load(Ordering::Relaxed),
        if external_agent.is_some() { "in another process" } else { "in this process" }
    );
    println!(
        "caller frames sent: {sent_total}, echoed back: {} ({:.2} %)",
        echoes.len(),
        pct(echoes.len(), sent_total)
    );
    let ms = |us: u32| f64::from(us) / 1000.0;
    println!(
        "round trip caller → agent → caller, packetisation included (ms): p50 {:.2} p99 {:.2} max {:.2}",
        ms(percentile(&rtt, 0.5)),
        ms(percentile(&rtt, 0.99)),
        ms(rtt.last().copied().unwrap_or_default())
    );
    let figures = |sorted: &[u32]| {
        format!(
            "p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ({} frames)",
            ms(percentile(sorted, 0.5)),
            ms(percentile(sorted, 0.99)),
            ms(percentile(sorted, 0.999)),
            ms(sorted.last().copied().unwrap_or_default()),
            sorted.len()
        )
    };
    if clock_link {
        println!("agent sessions on the media clock (ws:// agents; --task-path for the task path)");
        println!(
            "agent turnaround (the step that hands a frame over → the step that reads the agent's answer, at least \
             one ptime; ms): {}",
            figures(&probe.turnaround)
        );
        println!(
            "  Patchbay's share, the echo agent's own time and packetisation left out (ms): {}",
            figures(&probe.patchbay)
        );
        println!(
            "    to the agent (the step's hand-over → written to the agent's socket; ms): {}",
            figures(&probe.to_agent)
        );
        println!(
            "    from the agent (the earliest step due after the agent sent → the step that read it; ms): {}",
            figures(&probe.from_agent)
        );
        println!(
            "      answers read a step or more after the earliest one: {} ({:.3} %); the rest is the clock's own lateness",
            probe.missed_step,
            pct(probe.missed_step, probe.from_agent.len())
        );
    } else {
        println!("agent sessions in tokio tasks (--task-path: the path wss:// agents take)");
        println!(
            "agent turnaround, beyond packetisation (frame handed to the agent stream → the agent's answer back in \
             the session; ms): {}",
            figures(&probe.turnaround)
        );
        println!(
            "  Patchbay's share, the echo agent's own time left out (hand-over → flushed to the agent's socket, \
             plus the agent's send → its answer in the session; ms): {}",
            figures(&probe.patchbay)
        );
        println!("    to the agent (ms): {}", figures(&probe.to_agent));
        println!("    from the agent (ms): {}", figures(&probe.from_agent));
    }
    println!(
        "process CPU (Patchbay + the callers{}) during the run: {:.1} % of one core",
        if external_agent.is_some() { "" } else { " + the echo agent" },
        cpu.as_secs_f64() * 100.0 / seconds as f64
    );
    crate::bench_media::print_steal(steal, "the run");
    Ok(())
}

fn pct(part: usize, whole: usize) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 * 100.0 / whole as f64 }
}

/// This process's CPU time (user + system).
fn process_cpu() -> Duration {
    let mut usage = libc::rusage {
        ru_utime: libc::timeval { tv_sec: 0, tv_usec: 0 },
        ru_stime: libc::timeval { tv_sec: 0, tv_usec: 0 },
        ru_maxrss: 0,
        ru_ixrss: 0,
        ru_idrss: 0,
        ru_isrss: 0,
        ru_minflt: 0,
        ru_majflt: 0,
        ru_nswap: 0,
        ru_inblock: 0,
        ru_oublock: 0,
        ru_msgsnd: 0,
        ru_msgrcv: 0,
        ru_nsignals: 0,
        ru_nvcsw: 0,
        ru_nivcsw: 0,
    };
    // SAFETY: getrusage only writes the struct passed in.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Callers are sent in this many groups spread evenly over each 20 ms.
const GROUPS: usize = 20;

/// Plays every caller: each 20 ms, one tagged PCMU packet per call. Returns when each frame
/// went out, by [sequence][call].
fn send(socket: &UdpSocket, targets: &[SocketAddr], frames: usize, stop: &AtomicBool) -> Vec<Vec<Option<Instant>>> {
    let mut sent = vec![vec![None; targets.len()]; frames];
    let mut packet = [0u8; 12 + 160];
    packet[0] = 0x80; // RTP version 2, PT 0 (PCMU)
    let start = Instant::now();
    for (seq, row) in sent.iter_mut().enumerate() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let due = start + PTIME * seq as u32;
        for (call, target) in targets.iter().enumerate() {
            // Real callers are not in phase: spread them over the 20 ms in 1 ms groups.
            if call % targets.len().div_ceil(GROUPS) == 0 {
                let group = (call / targets.len().div_ceil(GROUPS)) as u32;
                let at = due + PTIME * group / GROUPS as u32;
                if let Some(wait) = at.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            packet[2..4].copy_from_slice(&(seq as u16).to_be_bytes());
            packet[4..8].copy_from_slice(&((seq as u32) * 160).to_be_bytes());
            packet[8..12].copy_from_slice(&(0x1000_0000 + call as u32).to_be_bytes());
            let payload = &mut packet[12..];
            payload.fill(0x7E);
            payload[..4].copy_from_slice(&MAGIC);
            payload[4..8].copy_from_slice(&(call as u32).to_be_bytes());
            payload[8..12].copy_from_slice(&(seq as u32).to_be_bytes());
            if socket.send_to(&packet, target).is_ok() {
                row[call] = Some(Instant::now());
            }
        }
    }
    sent
}

/// Receives Patchbay's packets for every call and returns the tagged echoes (call, sequence,
/// arrival).
fn receive(socket: &UdpSocket, stop: &AtomicBool) -> Vec<(u32, u32, Instant)> {
    let mut echoes = Vec::with_capacity(1 << 20);
    let mut buf = [0u8; 2048];
    let mut seen: HashMap<(u32, u32), ()> = HashMap::new();
    while !stop.load(Ordering::Acquire) {
        let Ok((len, _)) = socket.recv_from(&mut buf) else { continue };
        let now = Instant::now();
        if len < 12 + 12 {
            continue;
        }
        let payload = &buf[12..len];
        if payload[..4] == MAGIC {
            let call = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
            let seq = u32::from_be_bytes([payload[8], payload[9], payload[10], payload[11]]);
            if seen.insert((call, seq), ()).is_none() {
                echoes.push((call, seq, now));
            }
        }
    }
    echoes
}
