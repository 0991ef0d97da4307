//! Audio through the real binary: sipp plays speech and DTMF into the echo flow; tshark captures
//! both directions on loopback and the test compares them. And a caller whose flow "thinks" for
//! 30 s still receives RTP every 20 ms.

use patchbay_e2e::{Capture, Datagram, correlation, free_port, run_sipp, scenario, start_patchbay};
use patchbay_media::g711;
use patchbay_media::rtp::RtpPacket;

/// The tests here measure timing on the wire: run them one at a time, so that one's sipp,
/// tshark and Patchbay do not take the other's CPU on a 2-core CI machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The RTP packets of one direction with this payload type, in capture order.
fn rtp<'a>(datagrams: &'a [Datagram], to_sipp: bool, sipp_port: u16, pt: u8) -> Vec<RtpPacket<'a>> {
    datagrams
        .iter()
        .filter(|d| if to_sipp { d.dst_port == sipp_port } else { d.src_port == sipp_port })
        .filter_map(|d| RtpPacket::parse(&d.payload).ok())
        .filter(|p| p.header.payload_type == pt)
        .collect()
}

fn octets(packets: &[RtpPacket<'_>]) -> Vec<u8> {
    packets.iter().flat_map(|p| p.payload.iter().copied()).collect()
}

#[test]
fn echo_returns_the_callers_speech_and_repeats_each_key_once() {
    echo_call(None);
}

/// The same call asking for 30 ms packets (`a=ptime:30`): Patchbay paces it at 30 ms.
#[test]
fn a_caller_that_asks_for_30_ms_packets_gets_them_and_its_echo() {
    echo_call(Some(30));
}

/// sipp (`uac_pcap_echo.xml`, with `a=ptime:N` added when `asked_ptime` is given) plays speech
/// and three keys into the echo flow; Patchbay's packets must be the asked ptime (else 20 ms)
/// long and that far apart, the speech must come back and each key once.
fn echo_call(asked_ptime: Option<u32>) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let ptime_ms = asked_ptime.unwrap_or(20);
    let dir = tempfile::tempdir().expect("tempdir");
    let xml = match asked_ptime {
        None => scenario("uac_pcap_echo.xml"),
        Some(ms) => {
            let text = std::fs::read_to_string(scenario("uac_pcap_echo.xml")).expect("read the scenario");
            let fmtp = "      a=fmtp:101 0-11,16\n";
            assert!(text.contains(fmtp), "the scenario's SDP changed");
            let path = dir.path().join("uac_pcap_echo_ptime.xml");
            std::fs::write(&path, text.replace(fmtp, &format!("{fmtp}      a=ptime:{ms}\n"))).expect("write");
            path.to_string_lossy().into_owned()
        }
    };
    let pb = start_patchbay();
    let media_port = free_port();
    let capture = Capture::start(&format!("udp port {media_port}"));
    let (ok, log) = run_sipp(pb.port, "echo", &["-sf", &xml], 1, &["-mp", &media_port.to_string()]);
    let datagrams = capture.finish();
    assert!(ok, "{log}");

    // Packetisation of what Patchbay sent: every audio packet `ptime_ms` long, and consecutive
    // ones (timestamps one packet apart) typically `ptime_ms` apart on the wire.
    let ours: Vec<(u64, RtpPacket<'_>)> = datagrams
        .iter()
        .filter(|d| d.dst_port == media_port)
        .filter_map(|d| Some((d.time_us, RtpPacket::parse(&d.payload).ok()?)))
        .filter(|(_, p)| p.header.payload_type == 8)
        .collect();
    assert!(ours.len() > 100, "only {} audio packets from Patchbay", ours.len());
    let samples = ptime_ms as usize * 8;
    assert!(ours.iter().all(|(_, p)| p.payload.len() == samples), "every packet is {ptime_ms} ms");
    let mut gaps: Vec<u64> = ours
        .windows(2)
        .filter(|w| w[1].1.header.timestamp.wrapping_sub(w[0].1.header.timestamp) == samples as u32)
        .map(|w| w[1].0 - w[0].0)
        .collect();
    gaps.sort_unstable();
    let median_ms = gaps[gaps.len() / 2] as f64 / 1_000.0;
    assert!((median_ms - f64::from(ptime_ms)).abs() < 1.0, "packets {median_ms:.2} ms apart, not {ptime_ms}");

    // Speech: sipp's A-law pcap (30 ms packets) against what Patchbay sent back (`ptime_ms`).
    let sent = octets(&rtp(&datagrams, false, media_port, 8));
    let returned = octets(&rtp(&datagrams, true, media_port, 8));
    assert!(sent.len() > 8_000 * 3, "sipp sent only {} samples", sent.len());
    // Align each 100 ms on its own (the echo is octet-exact, so a stretch of it is found
    // verbatim): a jitter buffer that grows or shrinks its delay by a frame mid-call shifts the
    // alignment, and one global lag would count all the audio after it as noise. What the shift
    // itself cost (a concealed or a dropped frame) still counts: the stretch of a chunk on the
    // wrong side of it is compared at the wrong lag, and a chunk whose probe did not come back
    // is compared at the lag before it.
    let chunk = 800;
    let mut pairs: Vec<(i16, i16)> = Vec::new();
    let (mut chunks, mut aligned, mut lags) = (0, 0, Vec::new());
    let mut lag = None;
    for start in (0..sent.len().saturating_sub(chunk)).step_by(chunk) {
        let part = &sent[start..start + chunk];
        // Skip the pcap's silent stretches: silence aligns anywhere.
        if part.iter().filter(|&&o| o != 0xd5 && o != 0x55).count() < chunk / 2 {
            continue;
        }
        chunks += 1;
        let probe = &part[chunk / 2 - 80..chunk / 2 + 80];
        // Near the last lag first (the pcap repeats some stretches verbatim), then anywhere.
        let probe_at = (start + chunk / 2 - 80) as isize;
        let near = lag.map(|l: isize| {
            let from = (probe_at + l - 1_600).clamp(0, returned.len() as isize) as usize;
            let to = (probe_at + l + 1_600 + 160).clamp(0, returned.len() as isize) as usize;
            (from, &returned[from..to])
        });
        let found = near
            .and_then(|(from, window)| Some(from + window.windows(probe.len()).position(|w| w == probe)?))
            .or_else(|| returned.windows(probe.len()).position(|w| w == probe));
        if let Some(at) = found {
            lag = Some(at as isize - probe_at);
            aligned += 1;
        }
        let Some(lag) = lag else { continue };
        if lags.last() != Some(&(lag / 8)) {
            lags.push(lag / 8);
        }
        pairs.extend(part.iter().enumerate().map(|(i, &o)| {
            let back = usize::try_from((start + i) as isize + lag).ok().and_then(|j| returned.get(j));
            (g711::alaw_decode(o), back.map_or(0, |&b| g711::alaw_decode(b)))
        }));
    }
    assert!(chunks >= 30, "only {chunks} tenths of a second of speech sent");
    assert!(aligned * 10 >= chunks * 9, "only {aligned} of {chunks} tenths of a second came back (delays {lags:?} ms)");
    let (a, b): (Vec<i16>, Vec<i16>) = pairs.into_iter().unzip();
    let r = correlation(&a, &b);
    eprintln!("echo: correlation {r:.4} over {aligned} of {chunks} tenths of a second, delays {lags:?} ms");
    assert!(r >= 0.95, "correlation {r:.3} (delays {lags:?} ms)");

    // DTMF: sipp pressed 1, 2, # (RFC 2833 pcaps); the echo flow repeats each key it saw, once.
    let events = rtp(&datagrams, true, media_port, 101);
    let mut presses: Vec<(u32, u8)> = events.iter().map(|p| (p.header.timestamp, p.payload[0])).collect();
    presses.dedup();
    let keys: Vec<u8> = presses.iter().map(|&(_, key)| key).collect();
    assert_eq!(keys, vec![1, 2, 11], "keys repeated by the flow (11 is #)");
    let ends = events.iter().filter(|p| p.payload[1] & 0x80 != 0).count();
    assert_eq!(ends, 9, "three end packets per key (RFC 4733 §2.5.1.4)");
}

/// Watches the machine itself: one thread per CPU, pinned to it, sleeping 1 ms at a time and
/// noting every wake-up that came more than 10 ms late — a stall of that (virtual) CPU, which
/// delays whatever runs on it, Patchbay's clock included.
struct Canary {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<(u64, u64)>>>,
}

fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

impl Canary {
    fn start() -> Canary {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (0..cpus)
            .map(|cpu| {
                let flag = std::sync::Arc::clone(&stop);
                std::thread::spawn(move || {
                    // SAFETY: pins this thread to one CPU; the set is a plain bit mask.
                    unsafe {
                        let mut set: libc::cpu_set_t = std::mem::zeroed();
                        libc::CPU_SET(cpu, &mut set);
                        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                    }
                    let mut stalls = Vec::new();
                    while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                        let before = unix_us();
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        let after = unix_us();
                        if after - before > 11_000 {
                            stalls.push((before, after));
                        }
                    }
                    stalls
                })
            })
            .collect();
        Canary { stop, threads }
    }

    /// The stalls seen on any CPU: (start, end) in µs since the epoch.
    fn finish(self) -> Vec<(u64, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.threads.into_iter().flat_map(|t| t.join().unwrap_or_default()).collect()
    }
}

#[test]
fn a_thinking_flow_keeps_rtp_flowing_every_20_ms() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let pb = start_patchbay();
    let media_port = free_port();
    let capture = Capture::start(&format!("udp dst port {media_port}"));
    let canary = Canary::start();
    // sipp sends no audio: it calls `think` (the flow answers and does nothing for 30 s, then
    // hangs up) and accepts the BYE, or hangs up itself at 31 s.
    let (ok, log) =
        run_sipp(pb.port, "think", &["-sf", &scenario("uac_silent_caller.xml")], 1, &["-mp", &media_port.to_string()]);
    let stalls = canary.finish();
    let datagrams = capture.finish();
    assert!(ok, "{log}");
    let times: Vec<u64> =
        datagrams.iter().filter(|d| RtpPacket::parse(&d.payload).is_ok()).map(|d| d.time_us).collect();
    assert!(times.len() >= 25 * 50, "only {} packets in 30 s", times.len());
    // Every gap over 40 ms must coincide with a stall of the machine itself (seen by the
    // canary, e.g. the hypervisor not running this VM): such a gap is not Patchbay's doing and
    // hits every process alike. A gap without one is a real failure of the media clock.
    let gaps: Vec<(u64, u64)> = times.windows(2).filter(|w| w[1] - w[0] > 40_000).map(|w| (w[0], w[1])).collect();
    let unexplained: Vec<String> = gaps
        .iter()
        .filter(|(from, to)| !stalls.iter().any(|(s, e)| s < to && e > from))
        .map(|(from, to)| format!("{} µs at {} ms", to - from, (from - times[0]) / 1000))
        .collect();
    assert!(
        unexplained.is_empty(),
        "RTP gaps over 40 ms while the machine ran normally: {unexplained:?} (machine stalls: {})",
        stalls.len()
    );
    // Whatever the machine does, the wire never goes quiet for long.
    let worst = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(u64::MAX);
    assert!(worst < 500_000, "a {worst} µs gap in the RTP stream");
}
