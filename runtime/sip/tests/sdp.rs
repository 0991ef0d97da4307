//! SDP offer/answer against offers that real phones, carriers and test tools send.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use base64::Engine as _;
use patchbay_sip::sdp::CryptoSuite;
use patchbay_sip::sdp::{
    AudioCodec, Culprit, Direction, LocalMedia, Mki, OfferChange, SdesKey, SdpError, SrtpPolicy, accept_answer, answer,
    compare_offers, offer, reoffer,
};
use proptest::prelude::*;

fn crlf(text: &str) -> String {
    text.lines().map(|line| format!("{}\r\n", line.trim_start())).collect()
}

fn local() -> LocalMedia {
    LocalMedia::new("192.0.2.1:40000".parse().expect("addr"), None, 4242, 1)
}

fn key(byte: u8) -> SdesKey {
    SdesKey([byte; 30])
}

fn b64(key: &SdesKey) -> String {
    base64::engine::general_purpose::STANDARD.encode(key.0)
}

/// Our SDPs must also be acceptable to a strict RFC 4566 parser (webrtc-rs `sdp`).
fn strictly_valid(text: &str) {
    let mut cursor = std::io::Cursor::new(text.as_bytes());
    if let Err(error) = sdp::SessionDescription::unmarshal(&mut cursor) {
        panic!("webrtc-rs sdp rejects our SDP: {error}\n{text}");
    }
}

fn lines(text: &str) -> Vec<&str> {
    text.split("\r\n").filter(|line| !line.is_empty()).collect()
}

fn m_lines(text: &str) -> Vec<&str> {
    lines(text).into_iter().filter(|line| line.starts_with("m=")).collect()
}

const BARESIP: &str = "v=0
    o=- 1577373440 2004374582 IN IP4 192.168.1.40
    s=-
    c=IN IP4 192.168.1.40
    t=0 0
    m=audio 10000 RTP/AVP 0 8 101
    a=rtpmap:0 PCMU/8000
    a=rtpmap:8 PCMA/8000
    a=rtpmap:101 telephone-event/8000
    a=fmtp:101 0-15
    a=sendrecv
    a=label:1
    a=ssrc:1285093418 cname:0fbd5c25-b2c8-4f4c-8f52-1c8a3f5bd1a1
    a=rtcp-rsize
    m=video 10002 RTP/AVP 96
    a=rtpmap:96 H264/90000
    a=fmtp:96 packetization-mode=0;profile-level-id=42002a
    a=sendrecv
";

#[test]
fn baresip_offer_with_video_is_answered_audio_only() {
    let negotiated = answer(&crlf(BARESIP), &local()).expect("answer");
    assert_eq!(negotiated.codec.codec, AudioCodec::Pcmu);
    assert_eq!(
        (negotiated.codec.name(), negotiated.codec.payload_type, negotiated.codec.clock_rate),
        ("PCMU", 0, 8000)
    );
    assert_eq!(negotiated.telephone_event, Some(101));
    assert_eq!(negotiated.remote_rtp, "192.168.1.40:10000".parse::<SocketAddr>().expect("addr"));
    assert_eq!(negotiated.ptime, 20);
    assert_eq!(negotiated.direction, Direction::SendRecv);
    assert_eq!(negotiated.media_index, 0);
    assert!(negotiated.srtp.is_none());

    let text = &negotiated.local_sdp;
    // RFC 3264 §6: same number and order of m-lines; the refused video keeps its place, port 0.
    assert_eq!(m_lines(text), ["m=audio 40000 RTP/AVP 0 101", "m=video 0 RTP/AVP 96"]);
    let all = lines(text);
    assert!(all.contains(&"a=fmtp:101 0-15"), "offerer's fmtp echoed: {text}");
    assert!(all.contains(&"a=rtpmap:101 telephone-event/8000"));
    assert!(all.contains(&"a=sendrecv"));
    assert!(all.contains(&"c=IN IP4 192.0.2.1"));
    assert!(all.contains(&"o=patchbay 4242 1 IN IP4 192.0.2.1"));
    assert!(!text.contains("PCMA"), "single-codec answer");
    strictly_valid(text);
}

#[test]
fn linphone_offer_picks_8khz_telephone_event_among_several() {
    let offer = "v=0
        o=alice 2890 1234 IN IP4 10.0.0.20
        s=Talk
        c=IN IP4 10.0.0.20
        t=0 0
        a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics
        m=audio 7078 RTP/AVP 96 97 98 0 8 18 101 99 100
        a=rtpmap:96 opus/48000/2
        a=fmtp:96 useinbandfec=1
        a=rtpmap:97 speex/16000
        a=fmtp:97 vbr=on
        a=rtpmap:98 speex/8000
        a=rtpmap:101 telephone-event/48000
        a=rtpmap:99 telephone-event/16000
        a=rtpmap:100 telephone-event/8000
        a=rtcp-fb:* trr-int 1000
        m=video 9078 RTP/AVP 96 97
        a=rtpmap:96 VP8/90000
        a=rtpmap:97 H264/90000
        a=fmtp:97 profile-level-id=42801F
        a=rtcp-fb:* ccm fir
    ";
    let negotiated = answer(&crlf(offer), &local()).expect("answer");
    assert_eq!((negotiated.codec.codec, negotiated.codec.payload_type), (AudioCodec::Pcmu, 0));
    assert_eq!(negotiated.telephone_event, Some(100));
    assert_eq!(m_lines(&negotiated.local_sdp), ["m=audio 40000 RTP/AVP 0 100", "m=video 0 RTP/AVP 96 97"]);
    // No fmtp offered for 100: none answered (RFC 4733 §2.4.1 default 0-15 applies).
    assert!(!negotiated.local_sdp.contains("a=fmtp"));
    strictly_valid(&negotiated.local_sdp);
}

#[test]
fn carrier_offer_with_dynamic_telephone_event_and_ptime_30() {
    let offer = "v=0
        o=- 1711234567 1711234567 IN IP4 203.0.113.5
        s=SBC call
        c=IN IP4 203.0.113.5
        t=0 0
        m=audio 20000 RTP/AVP 0 96
        a=rtpmap:0 PCMU/8000
        a=rtpmap:96 telephone-event/8000
        a=fmtp:96 0-16
        a=ptime:30
        a=maxptime:40
        a=sendrecv
    ";
    let negotiated = answer(&crlf(offer), &local()).expect("answer");
    assert_eq!(negotiated.telephone_event, Some(96), "offerer's dynamic pt kept (RFC 3264 §6.1)");
    assert_eq!(negotiated.ptime, 30);
    let all = lines(&negotiated.local_sdp);
    assert!(all.contains(&"m=audio 40000 RTP/AVP 0 96"));
    assert!(all.contains(&"a=rtpmap:96 telephone-event/8000"));
    assert!(all.contains(&"a=fmtp:96 0-16"));
    assert!(all.contains(&"a=ptime:30"));
}

#[test]
fn ptime_is_bounded_by_maxptime_and_sanity() {
    let template = |attrs: &str| {
        format!(
            "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0\r\n{attrs}"
        )
    };
    let ptime = |attrs: &str| answer(&template(attrs), &local()).expect("answer").ptime;
    assert_eq!(ptime(""), 20);
    assert_eq!(ptime("a=ptime:40\r\n"), 40);
    assert_eq!(ptime("a=ptime:1000\r\n"), 20, "absurd ptime ignored");
    assert_eq!(ptime("a=ptime:0\r\n"), 20);
    assert_eq!(ptime("a=ptime:25\r\n"), 20, "not a multiple of 10 ms");
    assert_eq!(ptime("a=ptime:20.0\r\n"), 20);
    assert_eq!(ptime("a=maxptime:10\r\n"), 10, "our 20 ms exceeds the peer's maxptime");
    assert_eq!(ptime("a=ptime:60\r\na=maxptime:40\r\n"), 40);
    assert_eq!(ptime("a=ptime:60\r\n"), 40, "longer than our clock paces");
    assert_eq!(ptime("a=maxptime:5\r\n"), 20, "nonsensical maxptime ignored");
}

#[test]
fn pcma_first_offer_gets_pcma() {
    let offer = "v=0
        o=- 7 7 IN IP4 198.51.100.7
        s=-
        c=IN IP4 198.51.100.7
        t=0 0
        m=audio 5004 RTP/AVP 8 0 101
        a=rtpmap:8 PCMA/8000
        a=rtpmap:0 PCMU/8000
        a=rtpmap:101 telephone-event/8000
        a=fmtp:101 0-16
    ";
    let negotiated = answer(&crlf(offer), &local()).expect("answer");
    assert_eq!((negotiated.codec.name(), negotiated.codec.payload_type), ("PCMA", 8));
    assert!(lines(&negotiated.local_sdp).contains(&"m=audio 40000 RTP/AVP 8 101"));

    // Our own preference only restricts; the offerer's order decides among what we support.
    let mut ulaw_only = local();
    ulaw_only.codecs = vec![AudioCodec::Pcmu];
    assert_eq!(answer(&crlf(offer), &ulaw_only).expect("answer").codec.codec, AudioCodec::Pcmu);
}

#[test]
fn dynamic_payload_types_match_by_name_case_insensitively() {
    let offer = "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\n\
                 m=audio 5000 RTP/AVP 97 110\r\na=rtpmap:97 pcma/8000\r\na=rtpmap:110 Telephone-Event/8000\r\n";
    let negotiated = answer(offer, &local()).expect("answer");
    assert_eq!((negotiated.codec.codec, negotiated.codec.payload_type), (AudioCodec::Pcma, 97));
    assert_eq!(negotiated.telephone_event, Some(110));
    assert!(lines(&negotiated.local_sdp).contains(&"a=rtpmap:97 PCMA/8000"));
}

#[test]
fn comfort_noise_only_when_enabled() {
    let offer = "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\n\
                 m=audio 5000 RTP/AVP 0 13 101\r\na=rtpmap:101 telephone-event/8000\r\n";
    assert_eq!(answer(offer, &local()).expect("answer").comfort_noise, None);
    let mut with_cn = local();
    with_cn.comfort_noise = true;
    let negotiated = answer(offer, &with_cn).expect("answer");
    assert_eq!(negotiated.comfort_noise, Some(13));
    assert!(lines(&negotiated.local_sdp).contains(&"m=audio 40000 RTP/AVP 0 13 101"));
}

fn hold_offer(direction_line: &str, address: &str) -> String {
    format!(
        "v=0\r\no=- 5 6 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 {address}\r\nt=0 0\r\n\
         m=audio 6000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n{direction_line}"
    )
}

#[test]
fn directions_are_answered_in_reverse() {
    let cases = [
        ("a=sendrecv\r\n", Direction::SendRecv),
        ("", Direction::SendRecv),
        ("a=sendonly\r\n", Direction::RecvOnly),
        ("a=recvonly\r\n", Direction::SendOnly),
        ("a=inactive\r\n", Direction::Inactive),
    ];
    for (line, expected) in cases {
        let negotiated = answer(&hold_offer(line, "198.51.100.9"), &local()).expect("answer");
        assert_eq!(negotiated.direction, expected, "offer {line:?}");
        assert!(lines(&negotiated.local_sdp).contains(&format!("a={}", expected.attribute()).as_str()));
    }
}

#[test]
fn session_level_direction_applies_to_media() {
    let offer = "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\na=sendonly\r\n\
                 m=audio 5000 RTP/AVP 0\r\n";
    assert_eq!(answer(offer, &local()).expect("answer").direction, Direction::RecvOnly);
}

#[test]
fn sendonly_hold_offer() {
    let negotiated = answer(&hold_offer("a=sendonly\r\n", "198.51.100.9"), &local()).expect("answer");
    assert_eq!(negotiated.direction, Direction::RecvOnly);
    assert_eq!(negotiated.remote_rtp, "198.51.100.9:6000".parse::<SocketAddr>().expect("addr"));
}

#[test]
fn legacy_rfc2543_hold_with_zero_address() {
    let negotiated = answer(&hold_offer("", "0.0.0.0"), &local()).expect("answer");
    // RFC 3264 §8.4: we must not send to 0.0.0.0; we still accept what the holder sends.
    assert_eq!(negotiated.direction, Direction::RecvOnly);
    assert!(negotiated.remote_rtp.ip().is_unspecified());
    assert!(lines(&negotiated.local_sdp).contains(&"a=recvonly"));
}

#[test]
fn our_own_hold_limits_the_answer() {
    let mut holding = local();
    holding.direction = Direction::SendOnly;
    let negotiated = answer(&hold_offer("a=sendrecv\r\n", "198.51.100.9"), &holding).expect("answer");
    assert_eq!(negotiated.direction, Direction::SendOnly);
}

#[test]
fn media_level_connection_overrides_session_level() {
    let offer = "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\n\
                 m=audio 5000 RTP/AVP 0\r\nc=IN IP4 198.51.100.2\r\n";
    let negotiated = answer(offer, &local()).expect("answer");
    assert_eq!(negotiated.remote_rtp, "198.51.100.2:5000".parse::<SocketAddr>().expect("addr"));

    let media_only =
        "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0\r\nc=IN IP6 2001:db8::7\r\n";
    let negotiated = answer(media_only, &local()).expect("answer");
    assert_eq!(negotiated.remote_rtp, "[2001:db8::7]:5000".parse::<SocketAddr>().expect("addr"));

    let none = "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0\r\n";
    assert!(matches!(answer(none, &local()), Err(SdpError::Malformed { line: 5, .. })));

    let fqdn = "v=0\r\no=- 1 1 IN IP4 x\r\ns=-\r\nc=IN IP4 media.example.net\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0\r\n";
    assert_eq!(answer(fqdn, &local()), Err(SdpError::UnsupportedAddress));
}

#[test]
fn external_ip_is_advertised() {
    let media =
        LocalMedia::new("10.0.0.5:4000".parse().expect("addr"), Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7))), 1, 1);
    let text = offer(&media).expect("offer");
    assert!(lines(&text).contains(&"c=IN IP4 203.0.113.7"));
    assert!(lines(&text).contains(&"o=patchbay 1 1 IN IP4 203.0.113.7"));
    assert!(lines(&text).contains(&"m=audio 4000 RTP/AVP 0 8 101"));
    let bound = LocalMedia::new("10.0.0.5:4000".parse().expect("addr"), None, 1, 1);
    assert!(lines(&offer(&bound).expect("offer")).contains(&"c=IN IP4 10.0.0.5"));
}

fn srtp_offer(proto: &str) -> String {
    format!(
        "v=0\r\no=- 9 9 IN IP4 198.51.100.3\r\ns=-\r\nc=IN IP4 198.51.100.3\r\nt=0 0\r\n\
         m=audio 30000 {proto} 0 101\r\na=rtpmap:101 telephone-event/8000\r\n\
         a=crypto:1 AES_256_CM_HMAC_SHA1_80 inline:{}\r\n\
         a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:{}|2^20|1:32\r\n\
         a=crypto:3 AES_CM_128_HMAC_SHA1_80 inline:{}\r\n",
        base64::engine::general_purpose::STANDARD.encode([7u8; 46]),
        b64(&key(0xaa)),
        b64(&key(0xbb)),
    )
}

#[test]
fn srtp_offer_picks_first_supported_crypto_line_and_echoes_its_tag() {
    let mut ours = local();
    ours.srtp = SrtpPolicy::Require(key(0x11));
    let negotiated = answer(&srtp_offer("RTP/SAVP"), &ours).expect("answer");
    let srtp = negotiated.srtp.expect("srtp negotiated");
    assert_eq!(srtp.suite, CryptoSuite::AesCm128HmacSha1_32);
    assert_eq!(srtp.tag, 2);
    assert_eq!(srtp.remote_key, key(0xaa));
    assert_eq!(srtp.local_key, key(0x11));
    assert_eq!(srtp.remote_lifetime, Some(1 << 20));
    assert_eq!(srtp.remote_mki, Some(Mki { value: 1, length: 32 }));
    let all = lines(&negotiated.local_sdp);
    assert!(all.contains(&"m=audio 40000 RTP/SAVP 0 101"));
    let expected = format!("a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:{}", b64(&key(0x11)));
    assert!(all.contains(&expected.as_str()), "{}", negotiated.local_sdp);
    assert_eq!(all.iter().filter(|line| line.starts_with("a=crypto")).count(), 1);
    strictly_valid(&negotiated.local_sdp);

    // Keys must never reach logs.
    assert!(!format!("{srtp:?}").contains("170"));
}

#[test]
fn srtp_policies() {
    let plain = hold_offer("", "198.51.100.9");
    let mut required = local();
    required.srtp = SrtpPolicy::Require(key(1));
    let error = answer(&plain, &required).expect_err("no crypto offered");
    assert_eq!(error, SdpError::SrtpRequired);
    assert_eq!((error.sip_status(), error.warning()), (488, Some((302, "Incompatible transport protocol"))));

    // Policy off: RTP/SAVP cannot be served.
    assert_eq!(answer(&srtp_offer("RTP/SAVP"), &local()), Err(SdpError::SrtpDisabled));
    // Policy off: crypto lines in an RTP/AVP offer are ignored.
    assert_eq!(answer(&srtp_offer("RTP/AVP"), &local()).expect("answer").srtp, None);

    // Best effort: RTP/AVP with crypto is answered with SRTP when we offer it too.
    let mut optional = local();
    optional.srtp = SrtpPolicy::Offer(key(2));
    let negotiated = answer(&srtp_offer("RTP/AVP"), &optional).expect("answer");
    assert_eq!(negotiated.srtp.map(|srtp| srtp.tag), Some(2));
    assert!(lines(&negotiated.local_sdp).contains(&"m=audio 40000 RTP/AVP 0 101"));
    assert_eq!(answer(&plain, &optional).expect("answer").srtp, None);
    assert!(answer(&srtp_offer("RTP/AVP"), &required).expect("answer").srtp.is_some());
}

#[test]
fn g729_and_opus_only_is_488_incompatible_media_format() {
    let offer = "v=0
        o=- 3 3 IN IP4 198.51.100.4
        s=-
        c=IN IP4 198.51.100.4
        t=0 0
        m=audio 8000 RTP/AVP 18 111 101
        a=rtpmap:18 G729/8000
        a=fmtp:18 annexb=no
        a=rtpmap:111 opus/48000/2
        a=rtpmap:101 telephone-event/8000
    ";
    let error = answer(&crlf(offer), &local()).expect_err("nothing in common");
    assert_eq!(error, SdpError::NoCommonCodec);
    assert_eq!(error.sip_status(), 488);
    assert_eq!(error.warning(), Some((305, "Incompatible media format")));
    assert_eq!(error.culprit(), Culprit::Peer);
}

#[test]
fn offers_without_audio_or_rtp() {
    let video_only =
        "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\nm=video 5000 RTP/AVP 96\r\n";
    let error = answer(video_only, &local()).expect_err("no audio");
    assert_eq!((error.clone(), error.warning()), (SdpError::NoAudio, Some((304, "Media type not available"))));

    let dtls = "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\n\
                m=audio 5000 UDP/TLS/RTP/SAVPF 0\r\n";
    assert_eq!(answer(dtls, &local()), Err(SdpError::UnsupportedTransport));

    // A refused first audio stream does not stop us serving the second one.
    let two = "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\n\
               m=audio 5000 RTP/AVP 18\r\nm=audio 0 RTP/AVP 0\r\nm=audio 5002 RTP/AVP 8\r\n";
    let negotiated = answer(two, &local()).expect("answer");
    assert_eq!(negotiated.media_index, 2);
    assert_eq!(
        m_lines(&negotiated.local_sdp),
        ["m=audio 0 RTP/AVP 18", "m=audio 0 RTP/AVP 0", "m=audio 40000 RTP/AVP 8"]
    );
}

#[test]
fn garbage_is_a_typed_error() {
    let garbage = [
        "",
        "garbage",
        "\0\0\0",
        "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP x\r\n\r\n",
        "v=1\r\n",
        "v=0\r\nm=audio\r\n",
        "v=0\r\nm=audio 99999 RTP/AVP 0\r\n",
        "v=0\r\nc=IN IP4\r\n",
        "v=0\r\no=short\r\n",
        "v=0\r\n=x\r\n",
        "v=0\r\nM=audio 1 RTP/AVP 0\r\n",
    ];
    for text in garbage {
        let error = answer(text, &local()).expect_err(text);
        assert!(matches!(error, SdpError::Malformed { .. }), "{text:?}: {error:?}");
        assert_eq!(error.sip_status(), 400);
    }
    // Valid SDP with no media at all.
    assert_eq!(answer("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nt=0 0\r\n", &local()), Err(SdpError::NoAudio));
    assert_eq!(answer(&"v=0\r\n".repeat(20_000), &local()), Err(SdpError::TooLarge));
    let many_formats = format!("v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 1 RTP/AVP{}\r\n", " 0".repeat(129));
    assert_eq!(answer(&many_formats, &local()), Err(SdpError::TooLarge));
    let many_maps =
        format!("v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 1 RTP/AVP 0\r\n{}", "a=rtpmap:0 PCMU/8000\r\n".repeat(129));
    assert_eq!(answer(&many_maps, &local()), Err(SdpError::TooLarge));
    let many_lines = format!("v=0\r\nc=IN IP4 1.2.3.4\r\n{}", "m=audio 0 RTP/AVP 0\r\n".repeat(33));
    assert_eq!(answer(&many_lines, &local()), Err(SdpError::TooLarge));
}

#[test]
fn sipp_default_uac_offer() {
    let offer = "v=0
        o=user1 53655765 2353687637 IN IP4 127.0.0.1
        s=-
        c=IN IP4 127.0.0.1
        t=0 0
        m=audio 6000 RTP/AVP 0
        a=rtpmap:0 PCMU/8000
    ";
    let negotiated = answer(&crlf(offer), &local()).expect("answer");
    assert_eq!((negotiated.codec.codec, negotiated.codec.payload_type), (AudioCodec::Pcmu, 0));
    assert_eq!(negotiated.remote_rtp, "127.0.0.1:6000".parse::<SocketAddr>().expect("addr"));
    assert_eq!(negotiated.telephone_event, None);
    assert_eq!((negotiated.ptime, negotiated.direction), (20, Direction::SendRecv));
    assert_eq!(m_lines(&negotiated.local_sdp), ["m=audio 40000 RTP/AVP 0"]);
    strictly_valid(&negotiated.local_sdp);
    // sipp writes LF-only when its scenario file is LF-only; that must work too.
    assert_eq!(answer(&offer.replace("        ", ""), &local()).expect("answer").codec, negotiated.codec);
}

#[test]
fn offer_lists_everything_we_support() {
    let mut ours = local();
    ours.comfort_noise = true;
    ours.srtp = SrtpPolicy::Require(key(3));
    let text = offer(&ours).expect("offer");
    let all = lines(&text);
    assert_eq!(m_lines(&text), ["m=audio 40000 RTP/SAVP 0 8 13 101"]);
    for expected in [
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:13 CN/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
        "a=ptime:20",
        "a=sendrecv",
    ] {
        assert!(all.contains(&expected), "{expected} missing from\n{text}");
    }
    assert!(all.iter().any(|line| line.starts_with("a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:")));
    assert!(all.iter().any(|line| line.starts_with("a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:")));
    strictly_valid(&text);

    ours.codecs.clear();
    assert_eq!(offer(&ours).map_err(|error| error.culprit()), Err(Culprit::Local));
}

fn peer() -> LocalMedia {
    LocalMedia::new("198.51.100.50:7000".parse().expect("addr"), None, 99, 5)
}

#[test]
fn accept_answer_validates_against_our_offer() {
    let ours = local();
    let sent = offer(&ours).expect("offer");
    let good = answer(&sent, &peer()).expect("peer answers");
    let negotiated = accept_answer(&sent, &good.local_sdp).expect("accepted");
    assert_eq!(negotiated.codec.codec, AudioCodec::Pcmu);
    assert_eq!(negotiated.telephone_event, Some(101));
    assert_eq!(negotiated.remote_rtp, "198.51.100.50:7000".parse::<SocketAddr>().expect("addr"));
    assert_eq!(negotiated.local_sdp, sent);

    let answer_with = |media: &str| {
        format!("v=0\r\no=- 1 1 IN IP4 198.51.100.50\r\ns=-\r\nc=IN IP4 198.51.100.50\r\nt=0 0\r\n{media}")
    };
    // A codec we did not offer.
    assert_eq!(accept_answer(&sent, &answer_with("m=audio 7000 RTP/AVP 18\r\n")), Err(SdpError::NoCommonCodec));
    // Our pt 0 remapped to something else.
    let remapped = answer_with("m=audio 7000 RTP/AVP 0\r\na=rtpmap:0 G729/8000\r\n");
    assert_eq!(accept_answer(&sent, &remapped), Err(SdpError::NoCommonCodec));
    // Refused stream.
    assert_eq!(accept_answer(&sent, &answer_with("m=audio 0 RTP/AVP 0\r\n")), Err(SdpError::NoCommonCodec));
    // Wrong number of m-lines (RFC 3264 §6).
    let extra = answer_with("m=audio 7000 RTP/AVP 0\r\nm=video 0 RTP/AVP 96\r\n");
    assert!(matches!(accept_answer(&sent, &extra), Err(SdpError::AnswerMismatch(_))));
    // Unasked CN and a foreign pt are tolerated.
    let tolerated = accept_answer(&sent, &answer_with("m=audio 7000 RTP/AVP 99 8 13\r\na=rtpmap:99 foo/8000\r\n"));
    assert_eq!(
        tolerated.map(|negotiated| (negotiated.codec.codec, negotiated.comfort_noise)),
        Ok((AudioCodec::Pcma, None))
    );
    // The answerer's direction limits ours.
    let held = accept_answer(&sent, &answer_with("m=audio 7000 RTP/AVP 0\r\na=recvonly\r\n")).expect("accepted");
    assert_eq!(held.direction, Direction::SendOnly);
    // The answer's ptime is what the peer wants to receive.
    let ptime = accept_answer(&sent, &answer_with("m=audio 7000 RTP/AVP 0\r\na=ptime:40\r\n")).expect("accepted");
    assert_eq!(ptime.ptime, 40);
    // A crypto answer to a plain offer.
    let crypto = answer_with(&format!(
        "m=audio 7000 RTP/AVP 0\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{}\r\n",
        b64(&key(9))
    ));
    assert!(matches!(accept_answer(&sent, &crypto), Err(SdpError::AnswerMismatch(_))));
    // Garbage answer.
    assert!(matches!(accept_answer(&sent, "nonsense"), Err(SdpError::Malformed { .. })));
}

#[test]
fn accept_answer_srtp() {
    let mut ours = local();
    ours.srtp = SrtpPolicy::Require(key(0x21));
    let sent = offer(&ours).expect("offer");
    let mut theirs = peer();
    theirs.srtp = SrtpPolicy::Offer(key(0x42));
    let reply = answer(&sent, &theirs).expect("peer answers");
    let negotiated = accept_answer(&sent, &reply.local_sdp).expect("accepted");
    let srtp = negotiated.srtp.expect("srtp");
    assert_eq!((srtp.tag, srtp.suite), (1, CryptoSuite::AesCm128HmacSha1_80));
    assert_eq!((srtp.local_key, srtp.remote_key), (key(0x21), key(0x42)));

    // An RTP/SAVP offer answered without crypto cannot carry media.
    let plain = reply.local_sdp.lines().filter(|line| !line.starts_with("a=crypto")).map(|line| format!("{line}\r\n"));
    assert_eq!(accept_answer(&sent, &plain.collect::<String>()), Err(SdpError::SrtpRequired));
    // A tag we never offered.
    let wrong_tag = reply.local_sdp.replace("a=crypto:1 ", "a=crypto:7 ");
    assert!(matches!(accept_answer(&sent, &wrong_tag), Err(SdpError::AnswerMismatch(_))));
}

#[test]
fn hold_and_resume_reoffers() {
    let mut ours = local();
    let first = answer(&crlf(BARESIP), &ours).expect("answer");

    let hold = reoffer(&mut ours, &first, Direction::SendOnly).expect("hold");
    assert_eq!(ours.session_version, 2);
    let all = lines(&hold);
    assert!(all.contains(&"o=patchbay 4242 2 IN IP4 192.0.2.1"), "{hold}");
    assert!(all.contains(&"a=sendonly"));
    // RFC 3264 §8: same m-lines in the same order; the refused video stays refused.
    assert_eq!(m_lines(&hold), ["m=audio 40000 RTP/AVP 0 8 101", "m=video 0 RTP/AVP 96"]);
    strictly_valid(&hold);

    // The far end answers recvonly; we now only send (music on hold, say).
    let mut far = peer();
    far.direction = Direction::SendRecv;
    let far_answer = answer(&hold, &far).expect("far end answers");
    assert_eq!(far_answer.direction, Direction::RecvOnly);
    assert_eq!(m_lines(&far_answer.local_sdp), ["m=audio 7000 RTP/AVP 0 101", "m=video 0 RTP/AVP 96"]);
    let held = accept_answer(&hold, &far_answer.local_sdp).expect("accepted");
    assert_eq!(held.direction, Direction::SendOnly);
    assert_eq!(held.codec, first.codec);

    let resume = reoffer(&mut ours, &held, Direction::SendRecv).expect("resume");
    assert!(lines(&resume).contains(&"o=patchbay 4242 3 IN IP4 192.0.2.1"));
    assert!(lines(&resume).contains(&"a=sendrecv"));
    assert_eq!(
        compare_offers(&hold, &resume),
        Ok(OfferChange::DirectionOnly { previous: Direction::SendOnly, current: Direction::SendRecv })
    );
}

#[test]
fn reoffer_keeps_current_codec_and_payload_types() {
    let carrier = "v=0\r\no=- 1 1 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\n\
                   m=audio 20000 RTP/AVP 8 96\r\na=rtpmap:96 telephone-event/8000\r\n";
    let mut ours = local();
    let first = answer(carrier, &ours).expect("answer");
    let hold = reoffer(&mut ours, &first, Direction::SendOnly).expect("hold");
    assert_eq!(m_lines(&hold), ["m=audio 40000 RTP/AVP 8 0 96"], "PCMA first, telephone-event still 96");
}

#[test]
fn classifying_re_offers() {
    let base = hold_offer("a=sendrecv\r\n", "198.51.100.9");
    let bumped = |text: &str| text.replace("o=- 5 6 ", "o=- 5 7 ");
    assert_eq!(compare_offers(&base, &base), Ok(OfferChange::Unchanged));
    assert_eq!(compare_offers(&base, &bumped(&base)), Ok(OfferChange::Unchanged));
    let sendonly = bumped(&hold_offer("a=sendonly\r\n", "198.51.100.9"));
    assert_eq!(
        compare_offers(&base, &sendonly),
        Ok(OfferChange::DirectionOnly { previous: Direction::SendRecv, current: Direction::SendOnly })
    );
    let legacy = bumped(&hold_offer("a=sendrecv\r\n", "0.0.0.0"));
    assert_eq!(
        compare_offers(&base, &legacy),
        Ok(OfferChange::DirectionOnly { previous: Direction::SendRecv, current: Direction::SendOnly })
    );
    assert_eq!(compare_offers(&base, &bumped(&base.replace("6000", "6002"))), Ok(OfferChange::Media));
    assert_eq!(compare_offers(&base, &bumped(&base.replace("198.51.100.9", "198.51.100.10"))), Ok(OfferChange::Media));
    assert_eq!(compare_offers(&base, &bumped(&base.replace("RTP/AVP 0 101", "RTP/AVP 8 101"))), Ok(OfferChange::Media));
    assert!(compare_offers(&base, "junk").is_err());
}

/// Deviations from the RFC 4566 §5 line order that the webrtc-rs `sdp` crate rejects and that
/// our lenient reader accepts, as we must: each comes from a real implementation.
#[test]
fn webrtc_rs_parser_is_stricter_than_real_world_sdp() {
    let field = [
        // No s= line.
        "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0\r\n",
        // c= after t=.
        "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nt=0 0\r\nc=IN IP4 198.51.100.1\r\nm=audio 5000 RTP/AVP 0\r\n",
        // Session-level a= before c=.
        "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\na=sendrecv\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0\r\n",
        // An RFC 4571 TCP/RTP/AVP alternative next to the UDP stream.
        "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0\r\nm=audio 5002 TCP/RTP/AVP 0\r\n",
    ];
    for text in field {
        let mut cursor = std::io::Cursor::new(text.as_bytes());
        assert!(sdp::SessionDescription::unmarshal(&mut cursor).is_err(), "webrtc-rs now accepts {text:?}");
        let negotiated = answer(text, &local()).unwrap_or_else(|error| panic!("{error}: {text:?}"));
        assert_eq!(negotiated.remote_rtp, "198.51.100.1:5000".parse::<SocketAddr>().expect("addr"));
    }
}

// ---- properties ----

fn arb_local() -> impl Strategy<Value = LocalMedia> {
    let codecs = prop_oneof![
        Just(vec![AudioCodec::Pcmu]),
        Just(vec![AudioCodec::Pcma]),
        Just(vec![AudioCodec::Pcmu, AudioCodec::Pcma]),
        Just(vec![AudioCodec::Pcma, AudioCodec::Pcmu]),
    ];
    let address = prop_oneof![
        (1u8..=223, any::<[u8; 3]>()).prop_map(|(a, [b, c, d])| IpAddr::from([a, b, c, d])),
        any::<u128>()
            .prop_filter("specified and unicast", |bits| *bits != 0 && bits >> 120 != 0xff)
            .prop_map(|bits| IpAddr::from(bits.to_be_bytes())),
    ];
    let srtp = prop_oneof![
        Just(None),
        any::<[u8; 30]>().prop_map(|bytes| Some(SrtpPolicy::Offer(SdesKey(bytes)))),
        any::<[u8; 30]>().prop_map(|bytes| Some(SrtpPolicy::Require(SdesKey(bytes)))),
    ];
    let direction = prop_oneof![
        Just(Direction::SendRecv),
        Just(Direction::SendOnly),
        Just(Direction::RecvOnly),
        Just(Direction::Inactive)
    ];
    (
        codecs,
        (any::<bool>(), 96u8..=127, any::<bool>()),
        (prop::sample::select(vec![10u16, 20, 30, 40]), any::<bool>()),
        (address, 1u16..=u16::MAX),
        srtp,
        direction,
        (any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |(
                codecs,
                (telephone_event, telephone_event_pt, comfort_noise),
                (ptime, rtcp_mux),
                (address, port),
                srtp,
                direction,
                (id, version),
            )| {
                let mut media = LocalMedia::new(SocketAddr::new(address, port), None, id, version);
                media.codecs = codecs;
                media.telephone_event = telephone_event;
                media.telephone_event_pt = telephone_event_pt;
                media.comfort_noise = comfort_noise;
                media.ptime = ptime;
                media.rtcp_mux = rtcp_mux;
                media.srtp = srtp.unwrap_or_default();
                media.direction = direction;
                media
            },
        )
}

fn sdp_ish_text() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        Just("v=0".to_owned()),
        Just("c=IN IP4 192.0.2.1".to_owned()),
        Just("c=IN IP4 0.0.0.0".to_owned()),
        Just("m=audio 4000 RTP/AVP 0 8 101".to_owned()),
        Just("m=audio 4000 RTP/SAVP 0".to_owned()),
        Just("a=sendonly".to_owned()),
        Just("a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32".to_owned()),
        "[a-z]=[ -~]{0,40}",
        "a=(rtpmap|fmtp|ptime|maxptime|crypto):[ -~]{0,40}",
        "m=[a-z]{1,6} [0-9]{1,6} [A-Z/]{1,10}( [0-9]{1,4}){0,4}",
        "c=IN IP[46] [0-9a-f.:]{0,20}",
    ];
    prop::collection::vec(line, 0..16).prop_map(|lines| lines.join("\r\n"))
}

proptest! {
    #[test]
    fn answer_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = answer(&text, &local());
        let _ = accept_answer(&offer(&local()).expect("offer"), &text);
        let _ = compare_offers(&text, &text);
    }

    #[test]
    fn answer_never_panics_on_sdp_like_text(text in sdp_ish_text()) {
        let prefixed = format!("v=0\r\n{text}");
        for candidate in [&text, &prefixed] {
            // Refused m-lines echo the offerer's text, so only our own reader judges the answer.
            if let Ok(negotiated) = answer(candidate, &local()) {
                prop_assert_eq!(compare_offers(&negotiated.local_sdp, &negotiated.local_sdp), Ok(OfferChange::Unchanged));
                prop_assert!(negotiated.local_sdp.contains("m=audio 40000 "));
            }
            let _ = accept_answer(&offer(&local()).expect("offer"), candidate);
        }
    }

    #[test]
    fn offer_answer_accept_round_trips(offerer in arb_local(), answerer in arb_local()) {
        let sent = offer(&offerer).expect("valid local config");
        strictly_valid(&sent);
        let common = offerer.codecs.iter().find(|codec| answerer.codecs.contains(codec)).copied();
        let srtp_possible = !matches!(
            (&offerer.srtp, &answerer.srtp),
            (SrtpPolicy::Require(_), SrtpPolicy::Off) | (SrtpPolicy::Off, SrtpPolicy::Require(_))
        );
        let result = answer(&sent, &answerer);
        let Some(codec) = common.filter(|_| srtp_possible) else {
            prop_assert!(result.is_err());
            return Ok(());
        };
        let answered = result.expect("compatible configurations negotiate");
        strictly_valid(&answered.local_sdp);
        let accepted = accept_answer(&sent, &answered.local_sdp).expect("our answer is acceptable");

        prop_assert_eq!(answered.codec.codec, codec);
        prop_assert_eq!(accepted.codec, answered.codec);
        let telephone_event = (offerer.telephone_event && answerer.telephone_event).then_some(offerer.telephone_event_pt);
        prop_assert_eq!(answered.telephone_event, telephone_event);
        prop_assert_eq!(accepted.telephone_event, telephone_event);
        let comfort_noise = (offerer.comfort_noise && answerer.comfort_noise).then_some(13);
        prop_assert_eq!(answered.comfort_noise, comfort_noise);
        prop_assert_eq!(accepted.comfort_noise, comfort_noise);
        prop_assert_eq!(answered.remote_rtp, SocketAddr::new(offerer.address, offerer.port));
        prop_assert_eq!(accepted.remote_rtp, SocketAddr::new(answerer.address, answerer.port));
        prop_assert_eq!(answered.ptime, offerer.ptime);
        prop_assert_eq!(accepted.ptime, offerer.ptime);
        // RFC 5761 §5.1.1: multiplexed only when both want it, and both sides agree on it.
        prop_assert_eq!(answered.rtcp_mux, offerer.rtcp_mux && answerer.rtcp_mux);
        prop_assert_eq!(accepted.rtcp_mux, answered.rtcp_mux);
        prop_assert_eq!(accepted.direction, answered.direction.reversed());
        prop_assert!(!answered.direction.sends() || (offerer.direction.receives() && answerer.direction.sends()));
        prop_assert!(!answered.direction.receives() || (offerer.direction.sends() && answerer.direction.receives()));

        let expect_srtp = offerer.srtp != SrtpPolicy::Off && answerer.srtp != SrtpPolicy::Off;
        prop_assert_eq!(answered.srtp.is_some(), expect_srtp);
        if let (Some(theirs), Some(ours)) = (&answered.srtp, &accepted.srtp) {
            prop_assert_eq!(&theirs.local_key, &ours.remote_key);
            prop_assert_eq!(&theirs.remote_key, &ours.local_key);
            prop_assert_eq!((theirs.suite, theirs.tag), (ours.suite, ours.tag));
        } else {
            prop_assert!(accepted.srtp.is_none());
        }

        // A hold re-offer of the same session is a direction-only change (or none when we were
        // already only sending), unless it had to reorder codecs or drop declined crypto lines.
        let mut holder = offerer.clone();
        let hold = reoffer(&mut holder, &accepted, Direction::SendOnly).expect("reoffer");
        prop_assert_eq!(holder.session_version, offerer.session_version.wrapping_add(1));
        let change = compare_offers(&sent, &hold).expect("both parse");
        let srtp_declined = offerer.srtp != SrtpPolicy::Off && accepted.srtp.is_none();
        if offerer.codecs.first() == Some(&codec) && !srtp_declined {
            prop_assert_ne!(change, OfferChange::Media);
            let expected = if offerer.direction == Direction::SendOnly {
                OfferChange::Unchanged
            } else {
                OfferChange::DirectionOnly { previous: offerer.direction, current: Direction::SendOnly }
            };
            prop_assert_eq!(change, expected);
        }
    }
}

/// A WebRTC-gateway-style offer that multiplexes RTCP on the RTP port.
const RTCP_MUX_OFFER: &str = "v=0
    o=- 1 1 IN IP4 192.0.2.40
    s=-
    c=IN IP4 192.0.2.40
    t=0 0
    m=audio 10000 RTP/AVP 0 101
    a=rtpmap:0 PCMU/8000
    a=rtpmap:101 telephone-event/8000
    a=rtcp-mux
    a=sendrecv
";

#[test]
fn rtcp_mux_is_answered_only_when_offered_and_wanted() {
    // RFC 5761 §5.1.1: the answer says a=rtcp-mux only to an offer that did.
    let muxed = answer(&crlf(RTCP_MUX_OFFER), &local()).expect("answer");
    assert!(muxed.rtcp_mux);
    assert!(lines(&muxed.local_sdp).contains(&"a=rtcp-mux"), "{}", muxed.local_sdp);
    strictly_valid(&muxed.local_sdp);

    let plain = answer(&crlf(BARESIP), &local()).expect("answer");
    assert!(!plain.rtcp_mux);
    assert!(!plain.local_sdp.contains("rtcp-mux"), "{}", plain.local_sdp);

    let mut unwilling = local();
    unwilling.rtcp_mux = false;
    let declined = answer(&crlf(RTCP_MUX_OFFER), &unwilling).expect("answer");
    assert!(!declined.rtcp_mux && !declined.local_sdp.contains("rtcp-mux"), "{}", declined.local_sdp);
}

#[test]
fn our_offer_of_rtcp_mux_holds_once_the_answer_accepts_it() {
    let ours = local();
    let sent = offer(&ours).expect("offer");
    assert!(lines(&sent).contains(&"a=rtcp-mux"), "{sent}");
    let with = |mux: &str| {
        crlf(&format!(
            "v=0\no=- 2 2 IN IP4 192.0.2.50\ns=-\nc=IN IP4 192.0.2.50\nt=0 0\nm=audio 20000 RTP/AVP 0\n{mux}a=sendrecv\n"
        ))
    };
    assert!(accept_answer(&sent, &with("a=rtcp-mux\n")).expect("answer").rtcp_mux);
    assert!(!accept_answer(&sent, &with("")).expect("answer").rtcp_mux, "an answer without it keeps port + 1");
}

#[test]
fn a_peer_that_names_its_rtcp_port_gets_its_reports_there() {
    // RFC 3605 §2.1: `a=rtcp:<port>` at the stream's address, or with an address of its own
    // (a NAT'd phone whose RTCP port is not RTP + 1).
    let offer_with = |rtcp: &str| {
        crlf(&format!(
            "v=0\no=- 1 1 IN IP4 192.0.2.40\ns=-\nc=IN IP4 192.0.2.40\nt=0 0\nm=audio 10000 RTP/AVP 0\n{rtcp}a=sendrecv\n"
        ))
    };
    let rtcp = |line: &str| answer(&offer_with(line), &local()).expect("answer").remote_rtcp;
    assert_eq!(rtcp("a=rtcp:53020\n"), Some("192.0.2.40:53020".parse().expect("address")));
    assert_eq!(rtcp("a=rtcp:53020 IN IP4 126.16.64.4\n"), Some("126.16.64.4:53020".parse().expect("address")));
    assert_eq!(rtcp("a=rtcp:9 IN IP6 2001:db8::7\n"), Some("[2001:db8::7]:9".parse().expect("address")));
    assert_eq!(rtcp("a=rtcp:53020\t IN IP4 126.16.64.4\n"), Some("126.16.64.4:53020".parse().expect("address")));
    // An RFC 2543 hold (c=0.0.0.0) with a port only: nowhere to send.
    let held =
        crlf("v=0\no=- 1 1 IN IP4 192.0.2.40\ns=-\nc=IN IP4 0.0.0.0\nt=0 0\nm=audio 10000 RTP/AVP 0\na=rtcp:10001\n");
    assert_eq!(answer(&held, &local()).expect("answer").remote_rtcp, None);
    assert_eq!(rtcp(""), None, "without it: the RTP port + 1");
    for unusable in
        ["a=rtcp:x\n", "a=rtcp:0\n", "a=rtcp:70000\n", "a=rtcp:5000 IN IP4 0.0.0.0\n", "a=rtcp:5000 ATM NSAP x\n"]
    {
        assert_eq!(rtcp(unusable), None, "{unusable:?} is ignored, not fatal");
    }
    // The same in an answer to our offer.
    let sent = offer(&local()).expect("offer");
    let answered = crlf(
        "v=0\no=- 2 2 IN IP4 192.0.2.50\ns=-\nc=IN IP4 192.0.2.50\nt=0 0\nm=audio 20000 RTP/AVP 0\na=rtcp:20011\na=sendrecv\n",
    );
    assert_eq!(
        accept_answer(&sent, &answered).expect("answer").remote_rtcp,
        Some("192.0.2.50:20011".parse().expect("address"))
    );
}

#[test]
fn multicast_and_broadcast_media_addresses_are_refused() {
    // Media is never sent to a group or a whole network because an SDP said so.
    for address in ["IP4 224.0.0.1", "IP4 239.255.255.250", "IP4 255.255.255.255", "IP6 ff02::1"] {
        let offer = crlf(&format!(
            "v=0
            o=- 1 1 IN {address}
            s=-
            c=IN {address}
            t=0 0
            m=audio 4000 RTP/AVP 0"
        ));
        assert_eq!(answer(&offer, &local()).err(), Some(SdpError::UnsupportedAddress), "{address}");
    }
    // An a=rtcp pointing at a group is ignored: RTCP goes to the RTP port + 1, as without it.
    let offer = crlf(
        "v=0
        o=- 1 1 IN IP4 192.0.2.10
        s=-
        c=IN IP4 192.0.2.10
        t=0 0
        m=audio 4000 RTP/AVP 0
        a=rtcp:4001 IN IP4 224.0.0.1",
    );
    let negotiated = answer(&offer, &local()).expect("answer");
    assert_eq!(negotiated.remote_rtcp, None);
    assert_eq!(negotiated.remote_rtp, "192.0.2.10:4000".parse().expect("addr"));
}
