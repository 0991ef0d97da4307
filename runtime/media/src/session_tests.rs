//! The media session on a virtual clock: pacing, echo, latching, DTMF, inactivity, SRTP.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::rtp::{NtpTime, ReportBlock, RtcpWriter, RtpPacket};

const PEER: &str = "192.0.2.10:4000";
const MS20: Duration = Duration::from_millis(20);

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn config() -> SessionConfig {
    SessionConfig {
        codec: Codec::Pcmu,
        payload_type: 0,
        telephone_event: Some(101),
        comfort_noise: None,
        ptime_ms: 20,
        remote: Some(addr(PEER)),
        ssrc: 0x1234_5678,
        initial_sequence: 65_530,
        initial_timestamp: 4_294_967_000,
        inactivity_timeout: Some(Duration::from_secs(60)),
        inband_dtmf: false,
        rtcp_mux: false,
        remote_rtcp: None,
        jitter: JitterConfig::default(),
        srtp: None,
    }
}

fn session() -> MediaSession {
    MediaSession::new(config(), FramePool::new(64))
}

/// An RTP packet as the peer sends it.
fn rtp(pt: u8, seq: u16, ts: u32, marker: bool, payload: &[u8]) -> Vec<u8> {
    let header = RtpHeader { marker, payload_type: pt, sequence: seq, timestamp: ts, ssrc: 0xabcd };
    let mut out = vec![0u8; 12 + payload.len()];
    let n = header.write(payload, &mut out).unwrap();
    out.truncate(n);
    out
}

/// Audio packets as the peer's stream sends them: `count` of them from `from`, one every 20 ms
/// from `at`, with consecutive sequence numbers from `seq` (SSRC 0xabcd, as [`rtp`]).
fn stream(s: &mut MediaSession, from: SocketAddr, at: Instant, seq: u16, count: u16, payload: &[u8]) {
    for i in 0..count {
        let seq = seq.wrapping_add(i);
        s.receive(at + MS20 * u32::from(i), from, &mut rtp(0, seq, 160 * u32::from(seq), false, payload));
    }
}

fn tick(s: &mut MediaSession, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
    let mut out = [0u8; MAX_PACKET];
    s.tick(now, &mut out).map(|(to, len)| (to, out[..len].to_vec()))
}

fn events(s: &mut MediaSession) -> Vec<SessionEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

#[test]
fn every_tick_sends_a_packet_silence_when_nothing_is_queued() {
    let mut s = session();
    let t0 = Instant::now();
    let mut last: Option<(u16, u32)> = None;
    for i in 0..10u32 {
        let (to, packet) = tick(&mut s, t0 + MS20 * i).expect("a packet every tick");
        assert_eq!(to, addr(PEER));
        let p = RtpPacket::parse(&packet).unwrap();
        assert_eq!(p.payload, &[0xFF; 160][..], "encoded μ-law silence");
        assert_eq!(p.header.marker, i == 0, "marker only on the first packet");
        if let Some((seq, ts)) = last {
            // Sequence and timestamp wrap (the initial values are near the top).
            assert_eq!(p.header.sequence, seq.wrapping_add(1));
            assert_eq!(p.header.timestamp, ts.wrapping_add(160));
        }
        last = Some((p.header.sequence, p.header.timestamp));
    }
    assert_eq!(s.stats().silence_sent, 10);
}

#[test]
fn received_audio_comes_out_of_the_jitter_buffer_and_echoes_unchanged() {
    let mut s = session();
    let t0 = Instant::now();
    let voice: Vec<u8> = (0..160).map(|i| (i * 3 % 256) as u8).collect();
    let mut echoed = Vec::new();
    for i in 0..20u16 {
        let now = t0 + MS20 * u32::from(i);
        s.receive(now, addr(PEER), &mut rtp(0, 100 + i, 8_000 + 160 * u32::from(i), i == 0, &voice));
        if let Some(frame) = s.take_received(now) {
            assert!(s.play(frame).is_ok());
        }
        if let Some((_, packet)) = tick(&mut s, now) {
            echoed.push(packet);
        }
    }
    let voiced: Vec<_> = echoed.iter().filter(|p| RtpPacket::parse(p).unwrap().payload == &voice[..]).collect();
    assert!(voiced.len() >= 15, "only {} of 20 echoed", voiced.len());
    assert_eq!(s.stats().received, 20);
}

#[test]
fn the_sender_latches_onto_where_audio_really_comes_from() {
    let mut s = session();
    let t0 = Instant::now();
    let nat = addr("203.0.113.9:31000");
    // Not the SDP's address: latched once its probation is passed (a_natd_caller_… has the
    // details).
    stream(&mut s, nat, t0, 1, PROBATION as u16, &[0xFF; 160]);
    let now = t0 + MS20 * (PROBATION - 1);
    assert_eq!(events(&mut s), vec![SessionEvent::Latched(nat)]);
    assert_eq!(tick(&mut s, now).unwrap().0, nat);
    // A third party spraying packets while the stream is live is ignored.
    s.receive(now + MS20, addr("198.51.100.66:5000"), &mut rtp(0, 2, 160, false, &[0xFF; 160]));
    assert_eq!(s.remote(), Some(nat));
    assert_eq!((s.stats().foreign, s.stats().dropped), (1, 0));
    // Unknown payload types are dropped.
    s.receive(now + MS20, nat, &mut rtp(13, 3, 320, false, &[0x40]));
    assert_eq!(s.stats().dropped, 1);
}

#[test]
fn a_forged_stream_after_the_latch_is_dropped_and_counted_however_long_the_peer_is_silent() {
    let mut s = session();
    let t0 = Instant::now();
    // The peer talks for 100 ms, then goes quiet (hold without a re-INVITE, VAD).
    stream(&mut s, addr(PEER), t0, 1, 5, &[0x55; 160]);
    // 10 s later, 2 s of forged audio from another port of its host, paced like a real stream.
    let forger = addr("192.0.2.10:4002");
    let forged_at = t0 + Duration::from_secs(10);
    let mut heard_forged = false;
    for i in 0..100u16 {
        let now = forged_at + MS20 * u32::from(i);
        s.receive(now, forger, &mut rtp(0, 1_000 + i, 160 * u32::from(i), i == 0, &[0x11; 160]));
        assert_eq!(tick(&mut s, now).expect("a packet every tick").0, addr(PEER), "our audio went to the forger");
        heard_forged |= s.take_received(now).is_some_and(|frame| frame.octets().contains(&0x11));
    }
    assert!(!heard_forged, "the forged audio reached the flow");
    assert!(!events(&mut s).iter().any(|e| matches!(e, SessionEvent::Latched(_))));
    let stats = s.stats();
    assert_eq!((stats.received, stats.foreign, stats.dropped), (5, 100, 0));
    // The peer resumes: still its call.
    stream(&mut s, addr(PEER), forged_at + Duration::from_secs(2), 6, 1, &[0x55; 160]);
    assert_eq!(s.stats().received, 6);
}

#[test]
fn a_natd_caller_is_latched_after_its_probation_and_not_before() {
    let t0 = Instant::now();
    let nat = addr("203.0.113.9:31000");
    let mut s = session();
    // One packet short: we still send where the SDP says, and nothing is played.
    stream(&mut s, nat, t0, 1, PROBATION as u16 - 1, &[0x55; 160]);
    let last = t0 + MS20 * (PROBATION - 1);
    assert!(events(&mut s).is_empty());
    assert_eq!(tick(&mut s, last).unwrap().0, addr(PEER));
    assert_eq!(s.stats().received, 0);
    assert!(s.take_received(last).is_none(), "audio of a source on probation was played");
    // The run's last packet latches it; the run was the caller's, not foreign.
    stream(&mut s, nat, last, PROBATION as u16, 1, &[0x55; 160]);
    assert_eq!(events(&mut s), vec![SessionEvent::Latched(nat)]);
    assert_eq!(tick(&mut s, last + MS20).unwrap().0, nat);
    assert_eq!((s.stats().received, s.stats().foreign), (1, 0));

    // Whatever breaks a run starts it over: another source's packet, a gap in the sequence
    // numbers, another SSRC.
    let mut s = session();
    let stranger = addr("198.51.100.66:5000");
    stream(&mut s, nat, t0, 1, 3, &[0x55; 160]);
    stream(&mut s, stranger, t0 + MS20 * 3, 500, 1, &[0x11; 160]);
    stream(&mut s, nat, t0 + MS20 * 4, 4, 3, &[0x55; 160]);
    // 7 is missing.
    stream(&mut s, nat, t0 + MS20 * 7, 8, 3, &[0x55; 160]);
    let other_ssrc = RtpHeader { marker: false, payload_type: 0, sequence: 11, timestamp: 1_760, ssrc: 0x5eed };
    let mut packet = vec![0u8; 12 + 160];
    other_ssrc.write(&[0x55; 160], &mut packet).unwrap();
    s.receive(t0 + MS20 * 10, nat, &mut packet);
    assert_eq!((s.remote(), s.stats().received), (Some(addr(PEER)), 0), "a broken run latched");
    assert!(events(&mut s).is_empty());

    // A whole run at once is a burst, not a stream (PROBATION_MIN_SPAN): it starts over, and
    // the stream that goes on at its pace latches.
    let mut s = session();
    for seq in 1..=PROBATION as u16 {
        s.receive(t0, nat, &mut rtp(0, seq, 160 * u32::from(seq), false, &[0x55; 160]));
    }
    assert_eq!(s.remote(), Some(addr(PEER)), "a burst latched");
    stream(&mut s, nat, t0 + MS20, PROBATION as u16 + 1, PROBATION as u16 - 1, &[0x55; 160]);
    assert_eq!(events(&mut s), vec![SessionEvent::Latched(nat)]);
}

#[test]
fn a_spoofed_packet_before_the_callers_first_does_not_take_the_latch() {
    let mut s = session();
    let t0 = Instant::now();
    let spoofer = addr("198.51.100.66:5000");
    s.receive(t0, spoofer, &mut rtp(0, 7, 0, true, &[0x11; 160]));
    assert_eq!(tick(&mut s, t0).unwrap().0, addr(PEER));
    // The caller's packets, from where its SDP said, latch at once.
    stream(&mut s, addr(PEER), t0 + MS20, 1, 3, &[0x55; 160]);
    // The spoofer goes on, as a proper stream now: too late.
    stream(&mut s, spoofer, t0 + MS20 * 4, 8, 10, &[0x11; 160]);
    assert!(events(&mut s).is_empty(), "the latch left the SDP's address");
    assert_eq!(tick(&mut s, t0 + MS20 * 14).unwrap().0, addr(PEER));
    assert_eq!((s.stats().received, s.stats().foreign), (3, 11));
}

#[test]
fn the_sdp_address_takes_the_latch_from_a_stranger_who_passed_the_probation_before_the_caller_spoke() {
    let mut s = session();
    let t0 = Instant::now();
    let (stranger, stranger_rtcp) = (addr("198.51.100.66:5000"), addr("198.51.100.66:5001"));
    stream(&mut s, stranger, t0, 7, PROBATION as u16, &[0x11; 160]);
    assert_eq!(events(&mut s), vec![SessionEvent::Latched(stranger)]);
    let now = t0 + MS20 * PROBATION;
    let ntp = NtpTime::from_unix(Duration::from_secs(3_900_000_000));
    s.receive_rtcp(now, ntp, stranger_rtcp, &mut peer_report(0));
    assert_eq!(s.stats().rtcp_received, 1, "RTCP from the latched source's port + 1");
    // The caller's first packet, from where its SDP said: the call is its own again, for good,
    // RTCP included.
    stream(&mut s, addr(PEER), now, 1, 1, &[0x55; 160]);
    assert_eq!(events(&mut s), vec![SessionEvent::Latched(addr(PEER))]);
    stream(&mut s, stranger, now + MS20, 7 + PROBATION as u16, 10, &[0x11; 160]);
    s.receive_rtcp(now + MS20 * 11, ntp, stranger_rtcp, &mut peer_report(0));
    assert_eq!(tick(&mut s, now + MS20 * 11).unwrap().0, addr(PEER));
    let mut out = [0u8; MAX_RTCP];
    assert_eq!(s.rtcp_tick(now, ntp, &mut out), None, "the first report is due in 2.5 s");
    let (to, _) = s.rtcp_tick(now + RTCP_INTERVAL, ntp, &mut out).expect("a report");
    assert_eq!(to, addr("192.0.2.10:4001"), "our reports still went to the stranger");
    assert!(events(&mut s).is_empty());
    assert_eq!((s.stats().foreign, s.stats().rtcp_received), (11, 1));
}

#[test]
fn a_reinvite_to_a_new_address_starts_latching_over_and_one_to_the_same_address_keeps_the_latch() {
    let t0 = Instant::now();
    let (moved, stranger) = (addr("192.0.2.20:5000"), addr("198.51.100.66:5000"));
    let mut s = session();
    stream(&mut s, addr(PEER), t0, 1, 5, &[0x55; 160]);
    s.set_remote(Some(moved));
    let now = t0 + MS20 * 5;
    assert_eq!(tick(&mut s, now).unwrap().0, moved, "sent where the new SDP says");
    // A stranger's packet before the peer's first from its new address does not take it.
    s.receive(now, stranger, &mut rtp(0, 9, 0, false, &[0x11; 160]));
    stream(&mut s, moved, now + MS20, 100, 5, &[0x55; 160]);
    // The old address is a stranger's now.
    stream(&mut s, addr(PEER), now + MS20 * 6, 6, 5, &[0x55; 160]);
    assert_eq!(tick(&mut s, now + MS20 * 11).unwrap().0, moved);
    assert!(events(&mut s).is_empty());
    assert_eq!((s.stats().received, s.stats().foreign), (10, 6));

    // A NAT'd caller keeps its latch through a re-INVITE that repeats its SDP's address (a
    // session refresh, hold and resume): no new probation, no audio sent to the SDP's address.
    let nat = addr("203.0.113.9:31000");
    let mut s = session();
    stream(&mut s, nat, t0, 1, PROBATION as u16, &[0x55; 160]);
    s.set_remote(Some(addr(PEER)));
    assert_eq!(s.remote(), Some(nat));
    stream(&mut s, nat, t0 + MS20 * PROBATION, PROBATION as u16 + 1, 1, &[0x55; 160]);
    assert_eq!(s.stats().received, 2);
}

#[test]
fn with_srtp_an_authenticated_packet_latches_at_once_and_a_stranger_never_gets_in() {
    let a_key = MasterKey::from_concatenated(&[1; 30]);
    let b_key = MasterKey::from_concatenated(&[2; 30]);
    let profile = SrtpProfile::from_name("AES_CM_128_HMAC_SHA1_80").unwrap();
    let keys =
        |local: &MasterKey, remote: &MasterKey| SrtpKeys { profile, local: local.clone(), remote: remote.clone() };
    let mut a = MediaSession::new(SessionConfig { srtp: Some(keys(&a_key, &b_key)), ..config() }, FramePool::new(8));
    let mut b = MediaSession::new(SessionConfig { srtp: Some(keys(&b_key, &a_key)), ..config() }, FramePool::new(8));
    let t0 = Instant::now();
    let nat = addr("203.0.113.9:31000");
    // Not the SDP's address, but only the holder of the key could have sent it: no probation.
    let first = tick(&mut a, t0).unwrap().1;
    let mut forged = first.clone();
    forged[20] ^= 1;
    b.receive(t0, addr("198.51.100.66:5000"), &mut forged);
    assert_eq!((b.stats().srtp_failures, b.remote()), (1, Some(addr(PEER))), "a forgery latched");
    b.receive(t0, nat, &mut first.clone());
    assert_eq!(events(&mut b), vec![SessionEvent::Latched(nat)]);
    // An authentic packet sent on from elsewhere (an on-path copy racing the original) is a
    // stranger's: dropped before it can use up the original's place in the replay window.
    let second = tick(&mut a, t0 + MS20).unwrap().1;
    b.receive(t0 + MS20, addr("198.51.100.66:5000"), &mut second.clone());
    b.receive(t0 + MS20, nat, &mut second.clone());
    let stats = b.stats();
    assert_eq!((stats.received, stats.foreign, stats.srtp_failures), (2, 1, 1));
}

/// RFC 4733 packets for one key press: start, two updates, three end packets.
fn key_press(event: u8, seq: u16, ts: u32) -> Vec<Vec<u8>> {
    let mut packets = Vec::new();
    for (i, (end, duration)) in
        [(false, 160), (false, 320), (false, 480), (true, 640), (true, 640), (true, 640)].into_iter().enumerate()
    {
        let payload = [event, if end { 0x80 | 10 } else { 10 }, (duration >> 8) as u8, duration as u8];
        packets.push(rtp(101, seq + i as u16, ts, i == 0, &payload));
    }
    packets
}

#[test]
fn a_key_press_is_reported_once_with_its_duration() {
    let mut s = session();
    let t0 = Instant::now();
    for (i, mut packet) in key_press(5, 10, 1_000).into_iter().chain(key_press(11, 20, 5_000)).enumerate() {
        s.receive(t0 + MS20 * i as u32, addr(PEER), &mut packet);
    }
    let digits: Vec<_> = events(&mut s).into_iter().filter(|e| matches!(e, SessionEvent::Dtmf { .. })).collect();
    assert_eq!(
        digits,
        vec![SessionEvent::Dtmf { digit: '5', duration_ms: 80 }, SessionEvent::Dtmf { digit: '#', duration_ms: 80 }]
    );
}

#[test]
fn dtmf_is_sent_as_telephone_events_on_the_audio_clock() {
    let mut s = session();
    let t0 = Instant::now();
    let first = tick(&mut s, t0).unwrap().1;
    let first_ts = RtpPacket::parse(&first).unwrap().header.timestamp;
    assert!(s.send_dtmf("7", 100));
    let mut events_sent = Vec::new();
    let mut i = 1;
    loop {
        let (_, packet) = tick(&mut s, t0 + MS20 * i).unwrap();
        let p = RtpPacket::parse(&packet).unwrap();
        i += 1;
        if p.header.payload_type != 101 {
            // Audio resumes on the same clock, as a new talkspurt.
            assert!(p.header.marker);
            assert_eq!(p.header.timestamp, first_ts.wrapping_add(160 * (i - 1)));
            break;
        }
        events_sent.push((p.header.marker, p.header.timestamp, p.payload.to_vec()));
        assert!(i < 20, "the digit never ended");
    }
    assert!(events_sent[0].0, "marker on the first event packet");
    assert!(events_sent.iter().all(|e| e.1 == first_ts.wrapping_add(160)), "one timestamp per event");
    assert!(events_sent.iter().all(|e| e.2[0] == 7));
    let ends = events_sent.iter().filter(|e| e.2[1] & 0x80 != 0).count();
    assert_eq!(ends, 3, "three end packets (RFC 4733 §2.5.1.4)");
    let mut no_events = session();
    no_events.config.telephone_event = None;
    assert!(!no_events.send_dtmf("1", 100));
}

#[test]
fn silence_from_the_peer_raises_inactive_once_except_on_hold() {
    let mut s = session();
    let t0 = Instant::now();
    s.receive(t0, addr(PEER), &mut rtp(0, 1, 0, true, &[0xFF; 160]));
    events(&mut s);
    tick(&mut s, t0 + Duration::from_secs(59));
    assert!(events(&mut s).is_empty());
    tick(&mut s, t0 + Duration::from_secs(60));
    assert_eq!(events(&mut s), vec![SessionEvent::Inactive]);
    tick(&mut s, t0 + Duration::from_secs(61));
    assert!(events(&mut s).is_empty(), "reported once");
    let mut held = session();
    held.set_hold(true);
    tick(&mut held, t0);
    tick(&mut held, t0 + Duration::from_secs(120));
    assert!(events(&mut held).is_empty());
}

#[test]
fn marks_report_when_queued_audio_has_gone_out_and_clear_flushes() {
    let mut s = session();
    let t0 = Instant::now();
    let pool = FramePool::new(4);
    for _ in 0..2 {
        s.play(pool.g711(AudioEncoding::Pcmu, &[0x55; 160], 0).unwrap()).unwrap();
    }
    s.mark(7);
    tick(&mut s, t0);
    assert!(events(&mut s).is_empty());
    tick(&mut s, t0 + MS20);
    tick(&mut s, t0 + MS20 * 2);
    assert_eq!(events(&mut s), vec![SessionEvent::Played(7)]);
    s.play(pool.g711(AudioEncoding::Pcmu, &[0x55; 160], 0).unwrap()).unwrap();
    s.mark(8);
    s.clear();
    assert_eq!(events(&mut s), vec![SessionEvent::Played(8)]);
    assert_eq!(s.queued(), 0);
    assert_eq!(RtpPacket::parse(&tick(&mut s, t0 + MS20 * 3).unwrap().1).unwrap().payload, &[0xFF; 160][..]);
}

#[test]
fn frames_that_are_not_the_calls_ptime_are_recut_across_its_packets() {
    // A 30 ms call fed 20 ms frames (an agent's audio, a 20 ms bridge leg).
    let mut s = MediaSession::new(SessionConfig { ptime_ms: 30, ..config() }, FramePool::new(8));
    let t0 = Instant::now();
    let pool = FramePool::new(8);
    let octets: Vec<u8> = (0..480u32).map(|i| (i % 251) as u8).collect();
    for part in octets.chunks(160) {
        s.play(pool.g711(AudioEncoding::Pcmu, part, 0).unwrap()).unwrap();
    }
    s.mark(3);
    let ms30 = Duration::from_millis(30);
    let mut sent = Vec::new();
    let mut timestamps = Vec::new();
    for i in 0..2u32 {
        let packet = tick(&mut s, t0 + ms30 * i).unwrap().1;
        let p = RtpPacket::parse(&packet).unwrap();
        assert_eq!(p.payload.len(), 240, "30 ms packets");
        sent.extend_from_slice(p.payload);
        timestamps.push(p.header.timestamp);
        assert!(events(&mut s).is_empty(), "the mark waits for its audio");
    }
    assert_eq!(sent, octets, "every sample once, in order, across packet boundaries");
    assert_eq!(timestamps[1].wrapping_sub(timestamps[0]), 240);
    let last = tick(&mut s, t0 + ms30 * 2).unwrap().1;
    assert_eq!(RtpPacket::parse(&last).unwrap().payload, &[0xFF; 240][..]);
    assert_eq!(events(&mut s), vec![SessionEvent::Played(3)]);

    // A 10 ms frame in a 20 ms call is padded with silence, not held back.
    let mut s = session();
    s.play(pool.g711(AudioEncoding::Pcmu, &[0x11; 80], 0).unwrap()).unwrap();
    let p = tick(&mut s, t0).unwrap().1;
    let payload = RtpPacket::parse(&p).unwrap().payload.to_vec();
    assert_eq!(&payload[..80], &[0x11; 80][..]);
    assert_eq!(&payload[80..], &[0xFF; 80][..]);
}

#[test]
fn srtp_sessions_understand_each_other_and_drop_forgeries_and_replays() {
    let a_key = MasterKey::from_concatenated(&[1; 30]);
    let b_key = MasterKey::from_concatenated(&[2; 30]);
    let profile = SrtpProfile::from_name("AES_CM_128_HMAC_SHA1_80").unwrap();
    let mut a = MediaSession::new(
        SessionConfig { srtp: Some(SrtpKeys { profile, local: a_key.clone(), remote: b_key.clone() }), ..config() },
        FramePool::new(8),
    );
    let mut b = MediaSession::new(
        SessionConfig { srtp: Some(SrtpKeys { profile, local: b_key, remote: a_key }), ..config() },
        FramePool::new(8),
    );
    let t0 = Instant::now();
    let pool = FramePool::new(4);
    a.play(pool.g711(AudioEncoding::Pcmu, &[0x42; 160], 0).unwrap()).unwrap();
    let (_, sent) = tick(&mut a, t0).unwrap();
    assert_eq!(sent.len(), 12 + 160 + 10, "80-bit tag appended");
    assert_ne!(&sent[12..172], &[0x42; 160][..], "payload encrypted");
    b.receive(t0, addr(PEER), &mut sent.clone());
    assert_eq!(b.stats().received, 1);
    b.receive(t0, addr(PEER), &mut sent.clone());
    let mut forged = tick(&mut a, t0 + MS20).unwrap().1;
    forged[20] ^= 1;
    b.receive(t0 + MS20, addr(PEER), &mut forged);
    assert_eq!((b.stats().received, b.stats().srtp_failures), (1, 2), "replay and forgery dropped");
}

#[test]
fn a_30_ms_peer_is_recut_into_20_ms_frames_without_losing_a_sample() {
    let mut s = session();
    let t0 = Instant::now();
    // 30 ms packets whose octets count up, so any lost or repeated octet shows.
    let sent: Vec<u8> = (0..240 * 40).map(|i| (i % 251) as u8).collect();
    let mut received = Vec::new();
    for tick_no in 0..80u32 {
        let now = t0 + MS20 * tick_no;
        // Packets due by now (one every 30 ms).
        let due = (tick_no * 20 / 30) as usize;
        while s.stats().received as usize <= due && (s.stats().received as usize) < 40 {
            let i = s.stats().received as usize;
            s.receive(
                now,
                addr(PEER),
                &mut rtp(0, 7 + i as u16, 240 * i as u32, i == 0, &sent[i * 240..(i + 1) * 240]),
            );
        }
        if let Some(frame) = s.take_received(now) {
            assert_eq!(frame.octets().len(), 160);
            received.extend_from_slice(frame.octets());
        }
    }
    let start = received.iter().position(|&o| o != 0xFF).expect("audio came out");
    let audio = &received[start..];
    assert!(audio.len() >= 240 * 38, "only {} octets", audio.len());
    assert_eq!(&audio[..240 * 38], &sent[..240 * 38], "re-cut audio differs from what was sent");
}

#[test]
fn rtcp_reports_flow_both_ways_and_give_the_round_trip_time() {
    let a_addr = addr("192.0.2.1:4000");
    let b_addr = addr("192.0.2.10:6000");
    let mut a = MediaSession::new(SessionConfig { remote: Some(b_addr), ssrc: 0xa, ..config() }, FramePool::new(8));
    let mut b = MediaSession::new(SessionConfig { remote: Some(a_addr), ssrc: 0xb, ..config() }, FramePool::new(8));
    let t0 = Instant::now();
    let ntp0 = NtpTime::from_unix(Duration::from_secs(3_900_000_000));
    let ntp = |t: Instant| ntp0.add_duration(t - t0);
    let one_way = Duration::from_millis(15);
    let mut rtcp = [0u8; MAX_RTCP];
    let (mut from_a, mut from_b) = (None, None);
    for i in 0..400u32 {
        let now = t0 + MS20 * i;
        // RTP both ways, arriving one way-delay later (close enough at 20 ms steps).
        if let Some((_, mut p)) = tick(&mut a, now) {
            b.receive(now + one_way, a_addr, &mut p);
        }
        if let Some((_, mut p)) = tick(&mut b, now) {
            a.receive(now + one_way, b_addr, &mut p);
        }
        if let Some((to, len)) = a.rtcp_tick(now, ntp(now), &mut rtcp) {
            assert_eq!(to, addr("192.0.2.10:6001"), "RTCP goes to the RTP port + 1");
            from_a = Some(rtcp[..len].to_vec());
        }
        if let Some(mut packet) = from_a.take() {
            let at = now + one_way;
            b.receive_rtcp(at, ntp(at), addr("192.0.2.1:4001"), &mut packet);
        }
        if let Some((_, len)) = b.rtcp_tick(now, ntp(now), &mut rtcp) {
            from_b = Some(rtcp[..len].to_vec());
        }
        if let Some(mut packet) = from_b.take() {
            let at = now + one_way;
            a.receive_rtcp(at, ntp(at), addr("192.0.2.10:6001"), &mut packet);
        }
    }
    // 8 s: each side reported at least once, so A knows the RTT from B's report on A's SR.
    assert!(a.stats().rtcp_sent >= 1 && b.stats().rtcp_sent >= 1);
    let rtt = a.quality().rtt.expect("an RTT from B's report");
    assert!(rtt.abs_diff(one_way * 2) < Duration::from_millis(25), "rtt {rtt:?}");
    assert_eq!(a.quality().remote_cumulative_lost, Some(0));
    // A malformed RTCP packet is dropped, not trusted.
    let before = a.stats().rtcp_received;
    a.receive_rtcp(t0, ntp(t0), b_addr, &mut [0x80, 200, 0, 99]);
    assert_eq!(a.stats().rtcp_received, before);
}

#[test]
fn with_rtcp_mux_reports_go_to_the_rtp_port_and_are_told_apart_from_rtp() {
    let peer = addr("192.0.2.10:6000");
    let mut s = MediaSession::new(SessionConfig { remote: Some(peer), rtcp_mux: true, ..config() }, FramePool::new(8));
    let t0 = Instant::now();
    let ntp = NtpTime::from_unix(Duration::from_secs(3_900_000_000));
    let mut rtcp = [0u8; MAX_RTCP];
    let mut report = None;
    for i in 0..400u32 {
        let now = t0 + MS20 * i;
        let (_, packet) = tick(&mut s, now).expect("RTP every tick");
        assert!(!is_rtcp(&packet), "our RTP (PT 0) never looks like RTCP");
        if let Some((to, len)) = s.rtcp_tick(now, ntp, &mut rtcp) {
            assert_eq!(to, peer, "RTCP goes to the RTP port (RFC 5761)");
            report = Some(rtcp[..len].to_vec());
        }
    }
    let report = report.expect("a report within 8 s");
    assert!(is_rtcp(&report), "an SR's packet type (200) marks it as RTCP");
    // RTP with the marker bit and payload types up to 127 is still RTP, except 64–95 (which
    // RFC 5761 §4 reserves for this demultiplexing).
    assert!(!is_rtcp(&rtp(101, 1, 0, true, &[1, 0, 0, 160])));
    assert!(!is_rtcp(&rtp(8, 1, 0, true, &[0xd5; 160])));
}

/// A session sending to 192.0.2.10:6000, ticked every 20 ms by [`RtcpRun`].
fn peer_session() -> MediaSession {
    MediaSession::new(SessionConfig { remote: Some(addr("192.0.2.10:6000")), ..config() }, FramePool::new(8))
}

/// Ticks a session every 20 ms, on from where the last call left off, and collects its RTCP.
struct RtcpRun {
    t0: Instant,
    ntp: NtpTime,
    ticks: u32,
    out: [u8; MAX_RTCP],
}

impl RtcpRun {
    fn new() -> Self {
        Self {
            t0: Instant::now(),
            ntp: NtpTime::from_unix(Duration::from_secs(3_900_000_000)),
            ticks: 0,
            out: [0; MAX_RTCP],
        }
    }

    /// Ticks until the session writes a report: where it goes and its bytes.
    fn next_report(&mut self, s: &mut MediaSession) -> (SocketAddr, Vec<u8>) {
        for _ in 0..100_000 {
            if let Some(report) = self.tick(s) {
                return report;
            }
        }
        panic!("no report");
    }

    /// Whether the next report starts with an SR (else an RR).
    fn next_report_is_sr(&mut self, s: &mut MediaSession) -> bool {
        let (_, report) = self.next_report(s);
        let compound = crate::rtp::CompoundPacket::parse(&report).expect("a compound packet");
        matches!(compound.iter().next(), Some(crate::rtp::RtcpPacket::SenderReport(_)))
    }

    /// Reports written over the next `ticks` ticks.
    fn reports_in(&mut self, s: &mut MediaSession, ticks: u32) -> usize {
        (0..ticks).filter(|_| self.tick(s).is_some()).count()
    }

    fn tick(&mut self, s: &mut MediaSession) -> Option<(SocketAddr, Vec<u8>)> {
        self.ticks += 1;
        let now = self.t0 + MS20 * self.ticks;
        tick(s, now);
        s.rtcp_tick(now, self.ntp, &mut self.out).map(|(to, len)| (to, self.out[..len].to_vec()))
    }
}

#[test]
fn reports_go_where_the_sdp_says_until_the_peers_own_rtcp_shows_where_it_is() {
    let (named, nat) = (addr("192.0.2.10:7777"), addr("198.51.100.9:51234"));
    let mut s = peer_session();
    let mut run = RtcpRun::new();
    assert_eq!(run.next_report(&mut s).0, addr("192.0.2.10:6001"), "no a=rtcp: the RTP port + 1 (RFC 3550 §11)");
    s.set_remote_rtcp(Some(named));
    assert_eq!(run.next_report(&mut s).0, named, "a=rtcp (RFC 3605)");
    // The peer is behind a NAT: its RTP comes from one port of the NAT's address (latched
    // after the probation), its reports from another one. Ours follow them.
    let now = run.t0 + MS20 * run.ticks;
    stream(&mut s, addr("198.51.100.9:40000"), now, 1, PROBATION as u16, &[0x55; 160]);
    s.receive_rtcp(now, run.ntp, nat, &mut peer_report(0));
    assert_eq!(s.stats().rtcp_received, 1);
    assert_eq!(run.next_report(&mut s).0, nat);
    // A new offer names another port: it holds until the peer's RTCP says otherwise again
    // (no a=rtcp: the latched RTP port + 1).
    s.set_remote_rtcp(None);
    assert_eq!(run.next_report(&mut s).0, addr("198.51.100.9:40001"));
}

/// The peer's receiver report (its SSRC, 0xabcd, as [`rtp`]'s) on our stream, with the
/// fraction of it lost.
fn peer_report(fraction_lost: u8) -> Vec<u8> {
    let mut buf = [0u8; MAX_RTCP];
    let mut writer = RtcpWriter::new(&mut buf);
    let block = ReportBlock {
        ssrc: config().ssrc,
        fraction_lost,
        cumulative_lost: 0,
        extended_highest_seq: 0,
        jitter: 0,
        last_sr: 0,
        delay_since_last_sr: 0,
    };
    writer.receiver_report(0xabcd, &[block]).unwrap();
    writer.sdes_cname(0xabcd, b"peer").unwrap();
    let len = writer.finish();
    buf[..len].to_vec()
}

#[test]
fn rtcp_from_a_stranger_is_counted_and_ignored() {
    let mut s = peer_session();
    let mut run = RtcpRun::new();
    s.receive_rtcp(run.t0, run.ntp, addr("198.51.100.66:6001"), &mut peer_report(200));
    assert_eq!((s.stats().rtcp_received, s.stats().foreign), (0, 1));
    assert_eq!(s.quality().remote_fraction_lost, None, "a stranger's report was believed");
    assert_eq!(run.next_report(&mut s).0, addr("192.0.2.10:6001"), "our reports went to a stranger");
    // The peer's own, from where its RTCP is expected (the RTP port + 1).
    s.receive_rtcp(run.t0, run.ntp, addr("192.0.2.10:6001"), &mut peer_report(10));
    assert_eq!(s.quality().remote_fraction_lost, Some(10));
    // Once its RTP is latched, a report from another port of its host is taken only when it is
    // about the peer's stream (its SSRC): not from someone else behind the same NAT.
    let now = run.t0 + MS20 * run.ticks;
    stream(&mut s, addr("192.0.2.10:6000"), now, 1, 1, &[0x55; 160]);
    let mut other = peer_report(99);
    other[4..8].copy_from_slice(&0x5eed_u32.to_be_bytes());
    s.receive_rtcp(now, run.ntp, addr("192.0.2.10:7000"), &mut other);
    assert_eq!((s.stats().rtcp_received, s.stats().foreign), (1, 2));
    assert_eq!(s.quality().remote_fraction_lost, Some(10));
}

#[test]
fn reports_go_on_while_held_with_a_direction_but_not_once_the_peers_address_is_gone() {
    let mut s = peer_session();
    let mut run = RtcpRun::new();
    // Held with a=recvonly/inactive: no RTP, but RTCP goes on (RFC 3264 §5.1).
    s.set_sending(false);
    assert!(run.reports_in(&mut s, 500) >= 1, "no report while held");
    // An RFC 2543 hold (c=0.0.0.0): nowhere to send.
    s.set_remote(None);
    assert_eq!(run.reports_in(&mut s, 500), 0);
}

#[test]
fn a_held_stream_reports_as_a_receiver_once_two_reports_have_gone_by_without_sending() {
    let mut s = peer_session();
    let mut run = RtcpRun::new();
    assert!(run.next_report_is_sr(&mut s), "sending: SR");
    s.set_sending(false);
    // RFC 3550 §6.4: SR while we sent since the report before last, then RR.
    assert!(run.next_report_is_sr(&mut s), "sent since the report before last");
    assert!(!run.next_report_is_sr(&mut s), "nothing sent across two reports: RR");
    s.set_sending(true);
    assert!(run.next_report_is_sr(&mut s), "sending again");
}

#[test]
fn a_session_that_sent_says_goodbye_with_its_last_report_and_one_that_never_did_stays_silent() {
    let mut run = RtcpRun::new();
    // RFC 3550 §6.3.7: never sent RTP or RTCP, no BYE.
    assert_eq!(peer_session().rtcp_bye(run.t0, run.ntp, &mut run.out), None);

    let mut s = peer_session();
    for _ in 0..5 {
        run.tick(&mut s);
    }
    let now = run.t0 + MS20 * 6;
    let (to, len) = s.rtcp_bye(now, run.ntp, &mut run.out).expect("a BYE");
    assert_eq!(to, addr("192.0.2.10:6001"), "where its reports go");
    // §6.1: a compound packet that starts with a report; here SR, SDES, BYE for our SSRC.
    let compound = crate::rtp::CompoundPacket::parse(&run.out[..len]).expect("a valid compound packet");
    let packets: Vec<_> = compound.iter().collect();
    assert!(matches!(packets[0], crate::rtp::RtcpPacket::SenderReport(_)), "{packets:?}");
    let ssrc = config().ssrc.to_be_bytes();
    assert!(
        packets.iter().any(|p| matches!(p, crate::rtp::RtcpPacket::Other { packet_type: crate::rtp::RTCP_BYE, count: 1, body } if body[..4] == ssrc)),
        "{packets:?}"
    );
}

#[test]
fn comfort_noise_from_a_peer_in_dtx_keeps_the_call_alive_and_is_heard_as_noise() {
    let mut s = MediaSession::new(SessionConfig { comfort_noise: Some(13), ..config() }, FramePool::new(64));
    let t0 = Instant::now();
    let rms = |frame: &Frame| {
        let linear = frame.linear();
        (linear.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / linear.len() as f64).sqrt()
    };
    // 1 s of speech-level audio, then the peer goes quiet: nothing for 200 ms, then one CN
    // packet (level 40 dBov) every 200 ms for 61 s, then audio again.
    let (mut seq, mut ts) = (1u16, 0u32);
    let (mut heard_before_cn, mut heard_in_dtx) = (Vec::new(), Vec::new());
    for i in 0..3_150u32 {
        let now = t0 + MS20 * i;
        let audio = !(50..3_100).contains(&i);
        if audio || (i >= 60 && i % 10 == 0) {
            let packet = if audio { rtp(0, seq, ts, false, &[0x90; 160]) } else { rtp(13, seq, ts, false, &[40]) };
            s.receive(now, addr(PEER), &mut packet.clone());
            seq = seq.wrapping_add(1);
        }
        ts = ts.wrapping_add(160);
        tick(&mut s, now);
        if let Some(frame) = s.take_received(now) {
            match i {
                50..60 => heard_before_cn.push(rms(&frame)),
                500..3_000 => heard_in_dtx.push(rms(&frame)),
                _ => {}
            }
        }
    }
    assert!(!events(&mut s).contains(&SessionEvent::Inactive), "CN is RTP: a peer in DTX is not inactive");
    // In DTX the caller's side is heard as noise at about -40 dBov (0 dBov = full-scale sine):
    // 23170 × 10^(-2) ≈ 232 RMS, within 3 dB.
    let mean = heard_in_dtx.iter().sum::<f64>() / heard_in_dtx.len() as f64;
    assert!(heard_in_dtx.len() > 2_000, "{} frames", heard_in_dtx.len());
    assert!((164.0..328.0).contains(&mean), "noise RMS {mean:.0}");
    assert!(heard_in_dtx.iter().all(|&r| r > 100.0), "no silent frame while in DTX");
    // Before any CN, a missing frame is silence.
    assert!(heard_before_cn.contains(&0.0), "{heard_before_cn:?}");
    assert_eq!(s.stats().dropped, 0, "CN packets are not dropped");
}

#[test]
fn with_comfort_noise_negotiated_silence_goes_out_as_cn_every_interval() {
    let mut s = MediaSession::new(SessionConfig { comfort_noise: Some(13), ..config() }, FramePool::new(4));
    let t0 = Instant::now();
    let first = RtpPacket::parse(&tick(&mut s, t0).unwrap().1).unwrap().header;
    let second = tick(&mut s, t0 + MS20).unwrap().1;
    let second = RtpPacket::parse(&second).unwrap();
    assert_eq!((first.payload_type, second.header.payload_type), (13, 13));
    assert_eq!(second.payload, &[70][..], "RFC 3389 noise level in -dBov");
    assert_eq!(second.header.sequence, first.sequence.wrapping_add(1));
    assert_eq!(second.header.timestamp, first.timestamp.wrapping_add(160), "the media clock runs on");
    // Audio after comfort noise starts a talkspurt.
    let pool = FramePool::new(2);
    s.play(pool.g711(AudioEncoding::Pcmu, &[0x42; 160], 0).unwrap()).unwrap();
    let audio = tick(&mut s, t0 + MS20 * 2).unwrap().1;
    let audio = RtpPacket::parse(&audio).unwrap().header;
    assert_eq!((audio.payload_type, audio.marker), (0, true));
    assert_eq!(audio.timestamp, first.timestamp.wrapping_add(320));
}

/// Nothing goes out before the peer confirms the session (its ACK): a forged INVITE naming a
/// victim's address gets no RTP stream sent there. Queued audio waits and goes out once
/// confirmed, so a greeting is not clipped.
#[test]
fn nothing_is_sent_until_the_session_is_confirmed_and_queued_audio_waits() {
    let mut s = session();
    s.set_confirmed(false);
    let t0 = Instant::now();
    let voice: Vec<u8> = (0..160).map(|i| (i * 3 % 256) as u8).collect();
    let mut queued = 0;
    for i in 0..10u16 {
        let now = t0 + MS20 * u32::from(i);
        s.receive(now, addr(PEER), &mut rtp(0, 100 + i, 8_000 + 160 * u32::from(i), i == 0, &voice));
        if let Some(frame) = s.take_received(now) {
            assert!(s.play(frame).is_ok());
            queued += 1;
        }
        assert_eq!(tick(&mut s, now), None, "RTP sent before the ACK");
        let mut rtcp = [0u8; MAX_RTCP];
        assert_eq!(
            s.rtcp_tick(now + Duration::from_secs(10), NtpTime::default(), &mut rtcp),
            None,
            "RTCP before the ACK"
        );
    }
    assert!(queued > 0, "the test played something");
    s.set_confirmed(true);
    let (to, packet) = tick(&mut s, t0 + MS20 * 10).expect("sending once confirmed");
    assert_eq!(to, addr(PEER));
    assert_eq!(RtpPacket::parse(&packet).unwrap().payload, &voice[..], "the held audio, not silence");
}
