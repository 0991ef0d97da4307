//! `patchbay bench-media`: how evenly the shared media clock paces many calls.
//!
//! Starts `--calls` media sessions on the real clock threads, each with its own RTP socket and
//! nothing to play (the keep-alive path every answered call runs). Two figures:
//!
//! - **departure**: the clock records when each packet left (after `sendto` returned); per call,
//!   the deviation of each interval from the 20 ms ptime is the clock's pacing jitter;
//! - **arrival**: every `SAMPLE_EVERY`th call sends to a sink that a receiver thread reads and
//!   timestamps — the jitter a peer on loopback sees, receiver scheduling included. The other
//!   calls send to a socket nobody reads (the kernel drops what overflows it), so that reading
//!   100,000 packets a second does not compete with the clock for this machine's cores.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use patchbay_media::session::{Codec, MediaSession, SessionConfig};

use crate::media::{CallSinks, MediaEngine, PTIME};

/// One call in this many sends to the receiver that measures arrivals.
const SAMPLE_EVERY: usize = 20;

/// A PCMU session at 20 ms sending to `remote`, as benchmarks start them (no SDP, no SRTP,
/// no inactivity timeout).
pub fn bench_session(pool: &patchbay_media::FramePool, remote: SocketAddr, ssrc: u32) -> MediaSession {
    MediaSession::new(
        SessionConfig {
            codec: Codec::Pcmu,
            payload_type: 0,
            telephone_event: Some(101),
            comfort_noise: None,
            ptime_ms: PTIME.as_millis() as u32,
            remote: Some(remote),
            ssrc,
            initial_sequence: 0,
            initial_timestamp: 0,
            inactivity_timeout: None,
            inband_dtmf: false,
            rtcp_mux: false,
            remote_rtcp: None,
            jitter: Default::default(),
            srtp: None,
        },
        pool.clone(),
    )
}

/// Runs the benchmark and prints its figures.
pub fn run(calls: usize, seconds: u64) -> anyhow::Result<()> {
    crate::media::raise_fd_limit();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().context("starting tokio")?;
    let sink = UdpSocket::bind("127.0.0.1:0").context("binding the sink")?;
    let blackhole = UdpSocket::bind("127.0.0.1:0").context("binding the unread sink")?;
    let blackhole_addr = blackhole.local_addr().context("sink address")?;
    sink.set_read_timeout(Some(Duration::from_millis(100))).context("sink timeout")?;
    let sink_addr = sink.local_addr().context("sink address")?;
    let stop = Arc::new(AtomicBool::new(false));
    let warmup = Instant::now() + Duration::from_secs(1);
    let receiver = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || receive(&sink, &stop, warmup))
    };
    let engine = MediaEngine::start().context("starting the media clock")?;
    let _guard = runtime.enter();
    let mut media = Vec::with_capacity(calls);
    for i in 0..calls {
        let socket = UdpSocket::bind("127.0.0.1:0").context("binding an RTP socket (open-file limit?)")?;
        let remote = if i % SAMPLE_EVERY == 0 { sink_addr } else { blackhole_addr };
        let session = bench_session(engine.pool(), remote, i as u32);
        let (dtmf, _) = tokio::sync::mpsc::channel(1);
        let (inactive, _) = tokio::sync::mpsc::unbounded_channel();
        let sinks = CallSinks { dtmf, played: tokio::sync::watch::channel(0).0, inactive };
        media.push(
            engine
                .start_call(session, crate::media::MediaPeer::ANY, socket, None, sinks)
                .context("starting a call's media")?,
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    // Room for every departure up front, so recording them never reallocates on the clock.
    *engine.stats().departures.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
        Vec::with_capacity(calls * (seconds as usize + 1) * 1000 / PTIME.as_millis() as usize);
    // The clock's counters cover the measured seconds only (not the calls' set-up).
    let clock = engine.stats();
    for counter in [&clock.ticks, &clock.max_late_us, &clock.late_ticks, &clock.send_errors] {
        counter.store(0, Ordering::Relaxed);
    }
    let cpu_before = cpu_times();
    clock.record_departures.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(seconds));
    clock.record_departures.store(false, Ordering::Relaxed);
    let (ticks, max_late, late, send_errors) = (
        clock.ticks.load(Ordering::Relaxed),
        clock.max_late_us.load(Ordering::Relaxed),
        clock.late_ticks.load(Ordering::Relaxed),
        clock.send_errors.load(Ordering::Relaxed),
    );
    let steal = steal_since(cpu_before);
    stop.store(true, Ordering::Release);
    for m in &media {
        m.close();
    }
    let (mut deviations, received) = receiver.join().map_err(|_| anyhow::anyhow!("receiver thread panicked"))?;
    deviations.sort_unstable();
    let expected = calls.div_ceil(SAMPLE_EVERY) as u64 * seconds * 1000 / PTIME.as_millis() as u64;
    // The clock's own pacing: per call, each departure's distance from 20 ms after the last.
    let departures = std::mem::take(&mut *clock.departures.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    let mut last: HashMap<usize, Instant> = HashMap::new();
    let mut clock_dev: Vec<u32> = Vec::with_capacity(departures.len());
    for (call, at) in departures {
        if let Some(previous) = last.insert(call, at) {
            let gap = at.duration_since(previous).as_micros() as i64;
            clock_dev.push((gap - PTIME.as_micros() as i64).unsigned_abs() as u32);
        }
    }
    clock_dev.sort_unstable();
    println!("patchbay bench-media --calls {calls} --seconds {seconds}");
    println!("streams: {calls}, measured for {seconds} s after 1 s of warm-up");
    println!(
        "packets received by the sampling peer (every {SAMPLE_EVERY}th call): {received} (expected about {expected})"
    );
    println!(
        "departure (clock) deviation from {} ms (µs): p50 {} p99 {} p99.9 {} max {}",
        PTIME.as_millis(),
        percentile(&clock_dev, 0.5),
        percentile(&clock_dev, 0.99),
        percentile(&clock_dev, 0.999),
        clock_dev.last().copied().unwrap_or_default()
    );
    println!(
        "arrival (peer) deviation from {} ms (µs): p50 {} p99 {} p99.9 {} max {}",
        PTIME.as_millis(),
        percentile(&deviations, 0.5),
        percentile(&deviations, 0.99),
        percentile(&deviations, 0.999),
        deviations.last().copied().unwrap_or_default()
    );
    println!(
        "clock (the measured seconds): {ticks} steps, {send_errors} sends failed, latest step start {max_late} µs \
         after its deadline, {late} steps more than 1 ms late"
    );
    print_steal(steal, "the measured seconds");
    Ok(())
}

/// The share (%) of all CPU time the hypervisor stole since `before` (a [`cpu_times`] reading).
pub(crate) fn steal_since(before: Option<(u64, u64)>) -> Option<f64> {
    cpu_times().zip(before).map(|((total, steal), (total0, steal0))| {
        steal.saturating_sub(steal0) as f64 * 100.0 / total.saturating_sub(total0).max(1) as f64
    })
}

/// Prints the VM's steal time `during` a run: a VM's vCPUs are sometimes not running at all
/// (the host runs something else), and nothing inside it is on time then.
pub(crate) fn print_steal(steal: Option<f64>, during: &str) {
    match steal {
        Some(steal) => println!("VM steal time during {during}: {steal:.1} % of all CPU time"),
        None => println!("VM steal time: not available (/proc/stat)"),
    }
}

/// All CPUs' time and the part of it stolen by the hypervisor, in clock ticks (`/proc/stat`).
pub(crate) fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    Some((fields.iter().take(8).sum(), *fields.get(7)?))
}

/// The `p` quantile of sorted values (0 when there are none).
pub(crate) fn percentile(sorted: &[u32], p: f64) -> u32 {
    let index = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(index).copied().unwrap_or_default()
}

/// Receives until stopped; returns every inter-arrival deviation (µs) after the warm-up and
/// the packets counted.
fn receive(sink: &UdpSocket, stop: &AtomicBool, warmup: Instant) -> (Vec<u32>, u64) {
    let mut last: HashMap<SocketAddr, Instant> = HashMap::new();
    let mut deviations = Vec::with_capacity(1 << 20);
    let mut received = 0u64;
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Acquire) {
        let Ok((_, from)) = sink.recv_from(&mut buf) else { continue };
        let now = Instant::now();
        if now < warmup {
            last.insert(from, now);
            continue;
        }
        received += 1;
        if let Some(previous) = last.insert(from, now) {
            let gap = now.duration_since(previous).as_micros() as i64;
            deviations.push((gap - PTIME.as_micros() as i64).unsigned_abs() as u32);
        }
    }
    (deviations, received)
}
