//! Audio through the real binary: sipp plays speech and DTMF into the echo flow; tshark captures
//! both directions on loopback and the test compares them. And a caller whose flow "thinks" for
//! 30 s still receives RTP every 20 ms.

use patchbay_e2e::{Capture, Datagram, free_port, run_sipp, scenario, start_patchbay};
use patchbay_media::g711;
use patchbay_media::rtp::RtpPacket;

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

/// Normalised cross-correlation of two equally long signals.
fn correlation(a: &[i16], b: &[i16]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa * bb).sqrt()
}

#[test]
fn echo_returns_the_callers_speech_and_repeats_each_key_once() {
    let pb = start_patchbay();
    let media_port = free_port();
    let capture = Capture::start(&format!("udp port {media_port}"));
    let (ok, log) =
        run_sipp(pb.port, "echo", &["-sf", &scenario("uac_pcap_echo.xml")], 1, &["-mp", &media_port.to_string()]);
    let datagrams = capture.finish();
    assert!(ok, "{log}");

    // Speech: sipp's A-law pcap (30 ms packets) against what Patchbay sent back (20 ms packets).
    let sent = octets(&rtp(&datagrams, false, media_port, 8));
    let returned = octets(&rtp(&datagrams, true, media_port, 8));
    assert!(sent.len() > 8_000 * 3, "sipp sent only {} samples", sent.len());
    // Align on a stretch one second in: the echo is octet-exact, so it is found verbatim.
    let probe = &sent[8_000..8_160];
    let at = returned.windows(probe.len()).position(|w| w == probe).expect("the speech came back");
    let lag = at as isize - 8_000;
    let pairs: Vec<(i16, i16)> = (0..sent.len())
        .filter_map(|i| {
            let j = usize::try_from(i as isize + lag).ok()?;
            Some((g711::alaw_decode(sent[i]), g711::alaw_decode(*returned.get(j)?)))
        })
        .collect();
    assert!(pairs.len() as f64 > sent.len() as f64 * 0.95, "only {} of {} samples came back", pairs.len(), sent.len());
    let (a, b): (Vec<i16>, Vec<i16>) = pairs.into_iter().unzip();
    let r = correlation(&a, &b);
    assert!(r >= 0.95, "correlation {r:.3} after aligning by {lag} samples");

    // DTMF: sipp pressed 1, 2, # (RFC 2833 pcaps); the echo flow repeats each key it saw, once.
    let events = rtp(&datagrams, true, media_port, 101);
    let mut presses: Vec<(u32, u8)> = events.iter().map(|p| (p.header.timestamp, p.payload[0])).collect();
    presses.dedup();
    let keys: Vec<u8> = presses.iter().map(|&(_, key)| key).collect();
    assert_eq!(keys, vec![1, 2, 11], "keys repeated by the flow (11 is #)");
    let ends = events.iter().filter(|p| p.payload[1] & 0x80 != 0).count();
    assert_eq!(ends, 9, "three end packets per key (RFC 4733 §2.5.1.4)");
}

#[test]
fn a_thinking_flow_keeps_rtp_flowing_every_20_ms() {
    let pb = start_patchbay();
    let media_port = free_port();
    let capture = Capture::start(&format!("udp dst port {media_port}"));
    // sipp answers nothing and sends no audio: it calls `think`, waits 31 s and hangs up
    // (the flow would end the call at 30 s anyway).
    let (ok, log) =
        run_sipp(pb.port, "think", &["-sf", &scenario("uac_silent_caller.xml")], 1, &["-mp", &media_port.to_string()]);
    let datagrams = capture.finish();
    assert!(ok, "{log}");
    let times: Vec<u64> =
        datagrams.iter().filter(|d| RtpPacket::parse(&d.payload).is_ok()).map(|d| d.time_us).collect();
    assert!(times.len() >= 25 * 50, "only {} packets in 30 s", times.len());
    let worst = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(u64::MAX);
    assert!(worst <= 40_000, "a {worst} µs gap in the RTP stream");
}
