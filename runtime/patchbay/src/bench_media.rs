//! `patchbay bench-media`: how evenly the shared media clock paces many calls.
//!
//! Starts `--calls` media sessions on the real clock thread, each with its own RTP socket and
//! nothing to play (the keep-alive path every answered call runs), all sending to one sink
//! socket on loopback. A receiver thread timestamps every packet; per stream, the deviation of
//! each inter-arrival time from the 20 ms ptime is the pacing jitter as a peer sees it
//! (receiver scheduling included, so it is an upper bound on the clock's own jitter).

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use patchbay_media::session::{Codec, MediaSession, SessionConfig};

use crate::media::{CallSinks, MediaEngine, PTIME};

/// Raises the soft limit on open files to the hard limit: a media host needs a socket per
/// call, and the usual soft limit (1024) caps it far below what it can carry.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!("could not raise the open-file limit");
            }
        }
    }
}

/// Runs the benchmark and prints its figures.
pub fn run(calls: usize, seconds: u64) -> anyhow::Result<()> {
    raise_fd_limit();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().context("starting tokio")?;
    let sink = UdpSocket::bind("127.0.0.1:0").context("binding the sink")?;
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
        let session = MediaSession::new(
            SessionConfig {
                codec: Codec::Pcmu,
                payload_type: 0,
                telephone_event: Some(101),
                ptime_ms: PTIME.as_millis() as u32,
                remote: Some(sink_addr),
                ssrc: i as u32,
                initial_sequence: 0,
                initial_timestamp: 0,
                inactivity_timeout: None,
                inband_dtmf: false,
                jitter: Default::default(),
                srtp: None,
            },
            engine.pool().clone(),
        );
        let (dtmf, _) = tokio::sync::mpsc::channel(1);
        let (inactive, _) = tokio::sync::mpsc::unbounded_channel();
        let sinks = CallSinks { dtmf, played: tokio::sync::watch::channel(0).0, inactive };
        media.push(engine.start_call(session, socket, sinks).context("starting a call's media")?);
    }
    std::thread::sleep(Duration::from_secs(seconds) + Duration::from_secs(1));
    stop.store(true, Ordering::Release);
    for m in &media {
        m.close();
    }
    let (mut deviations, received) = receiver.join().map_err(|_| anyhow::anyhow!("receiver thread panicked"))?;
    deviations.sort_unstable();
    let pct = |p: f64| deviations.get(((deviations.len() as f64 * p) as usize).min(deviations.len().saturating_sub(1)));
    let expected = calls as u64 * seconds * 1000 / PTIME.as_millis() as u64;
    let stats = engine.stats();
    println!("patchbay bench-media --calls {calls} --seconds {seconds}");
    println!("streams: {calls}, measured for {seconds} s after 1 s of warm-up");
    println!("packets received: {received} (expected about {expected})");
    println!(
        "inter-arrival deviation from {} ms (µs): p50 {} p99 {} p99.9 {} max {}",
        PTIME.as_millis(),
        pct(0.5).copied().unwrap_or_default(),
        pct(0.99).copied().unwrap_or_default(),
        pct(0.999).copied().unwrap_or_default(),
        deviations.last().copied().unwrap_or_default()
    );
    println!(
        "clock: {} ticks, {} sends failed, latest tick start {} µs after its deadline, {} ticks more than 1 ms late",
        stats.ticks.load(Ordering::Relaxed),
        stats.send_errors.load(Ordering::Relaxed),
        stats.max_late_us.load(Ordering::Relaxed),
        stats.late_ticks.load(Ordering::Relaxed)
    );
    Ok(())
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
