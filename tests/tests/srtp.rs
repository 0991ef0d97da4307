//! SRTP (RFC 3711) with SDES keys (RFC 4568) against an implementation nobody here wrote:
//! baresip's `srtp` module (libre's SRTP) calls the echo flow with `mediaenc=srtp-mand`, plays
//! speech, and saves what it hears (its `sndfile` module). The speech must come back — which
//! takes both sides encrypting and authenticating what the other can decrypt and verify — and
//! every RTP packet on the wire must carry the 80-bit tag.

use patchbay_e2e::{Capture, correlation, free_port, start_patchbay, wav_samples, write_pcm16_wav};
use patchbay_media::rtp::RtpPacket;

#[test]
fn baresip_calls_the_echo_flow_over_srtp_and_hears_itself() {
    let pb = start_patchbay();
    let dir = tempfile::tempdir().expect("tempdir");
    // The stock menu prompt (μ-law speech), as 16-bit PCM.
    let prompt = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../runtime/patchbay/prompts/menu.wav"))
        .expect("the stock menu prompt");
    let speech = wav_samples(&prompt);
    let speech_path = dir.path().join("speech.wav");
    // baresip's `aufile` reads only 16-bit PCM.
    write_pcm16_wav(&speech_path, &speech);
    // baresip's RTP port range, narrow enough to capture.
    // (Linux hands out odd ports for bind to port 0; RTP wants an even one.)
    let rtp_low = loop {
        let p = free_port() & !1;
        if p < 65_000 && (p..p + 4).all(|q| std::net::UdpSocket::bind(("127.0.0.1", q)).is_ok()) {
            break p;
        }
    };
    let sip_port = free_port();
    let config = format!(
        "poll_method\tepoll\n\
         sip_listen\t127.0.0.1:{sip_port}\n\
         net_interface\t127.0.0.1\n\
         audio_player\taubridge,nil\n\
         audio_source\taufile,{speech}\n\
         audio_alert\taufile,/dev/null\n\
         rtp_ports\t{rtp_low}-{rtp_high}\n\
         snd_path\t{dir}\n\
         module_path\t/usr/lib/baresip/modules\n\
         module\tg711.so\n\
         module\tsrtp.so\n\
         module\taufile.so\n\
         module\taubridge.so\n\
         module\tsndfile.so\n\
         module\taccount.so\n\
         module_app\tmenu.so\n",
        speech = speech_path.display(),
        rtp_high = rtp_low + 3,
        dir = dir.path().display(),
    );
    std::fs::write(dir.path().join("config"), config).expect("baresip config");
    // srtp-mand: SRTP or no call (baresip refuses an answer without a=crypto).
    std::fs::write(
        dir.path().join("accounts"),
        "<sip:caller@127.0.0.1>;regint=0;mediaenc=srtp-mand;audio_codecs=PCMU\n",
    )
    .expect("baresip accounts");

    let capture = Capture::start(&format!("udp portrange {rtp_low}-{}", rtp_low + 3));
    let output = std::process::Command::new("baresip")
        .arg("-f")
        .arg(dir.path())
        .args(["-e", &format!("/dial sip:echo@127.0.0.1:{}", pb.port), "-t", "8"])
        .output()
        .expect("run baresip (cargo xtask test installs it)");
    let datagrams = capture.finish();
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(log.contains("SRTP is Enabled"), "baresip did not switch SRTP on:\n{log}");

    // On the wire: RTP from Patchbay to baresip is PCMU with the 10-byte tag after 160 octets
    // (AES_CM_128_HMAC_SHA1_80), never plain.
    let ours: Vec<usize> = datagrams
        .iter()
        .filter(|d| (rtp_low..rtp_low + 4).contains(&d.dst_port))
        .filter_map(|d| Some((d.payload.len(), RtpPacket::parse(&d.payload).ok()?.header.payload_type)))
        .filter(|&(_, pt)| pt == 0)
        .map(|(len, _)| len)
        .collect();
    assert!(ours.len() > 200, "only {} RTP packets from Patchbay:\n{log}", ours.len());
    assert!(ours.iter().all(|&len| len == 12 + 160 + 10), "packet lengths {:?}", &ours[..10]);

    // What baresip sent (its speech source, before encoding) and what it heard (decrypted and
    // decoded), as its sndfile module saved them: the same audio a round trip apart.
    let dump = |suffix: &str| {
        let path = std::fs::read_dir(dir.path())
            .expect("read dir")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(suffix))
            .unwrap_or_else(|| panic!("baresip saved no {suffix}:\n{log}"));
        wav_samples(&std::fs::read(path).expect("read a baresip dump"))
    };
    let (sent, heard) = (dump("-enc.wav"), dump("-dec.wav"));
    assert!(sent.len() > 8_000 * 4 && heard.len() > 8_000 * 4, "{} samples sent, {} heard", sent.len(), heard.len());
    let loud = sent.iter().filter(|s| s.unsigned_abs() > 1_000).count();
    assert!(loud > sent.len() / 10, "baresip sent no speech ({loud} loud samples)");
    // The round trip (under half a second), found on a second of speech; then each 100 ms is
    // aligned on its own within 60 ms of the last (a jitter buffer on either side may move the
    // delay by a frame or more mid-call, which one global lag would count as noise), skipping
    // quiet stretches (silence aligns anywhere). What a move cost — a concealed or dropped
    // frame — still counts.
    let probe = &sent[8_000..16_000];
    let at = |lag: usize| heard.get(8_000 + lag..16_000 + lag).map_or(-1.0, |h| correlation(probe, h));
    let mut lag = (0..4_000).max_by(|&a, &b| at(a).total_cmp(&at(b))).unwrap_or(0);
    let chunk = 800;
    let (mut a, mut b, mut lags) = (Vec::new(), Vec::new(), Vec::new());
    for start in (0..sent.len().saturating_sub(chunk)).step_by(chunk) {
        let part = &sent[start..start + chunk];
        if part.iter().filter(|s| s.unsigned_abs() > 500).count() < chunk / 4 {
            continue;
        }
        let fit = |l: usize| heard.get(start + l..start + l + chunk).map_or(-1.0, |h| correlation(part, h));
        lag = (lag.saturating_sub(480)..=lag + 480).max_by(|&x, &y| fit(x).total_cmp(&fit(y))).unwrap_or(lag);
        let Some(back) = heard.get(start + lag..start + lag + chunk) else { break };
        if lags.last() != Some(&(lag / 8)) {
            lags.push(lag / 8);
        }
        a.extend_from_slice(part);
        b.extend_from_slice(back);
    }
    assert!(a.len() >= 8_000 * 2, "only {} samples of speech compared (round trips {lags:?} ms)", a.len());
    let r = correlation(&a, &b);
    eprintln!(
        "srtp echo: correlation {r:.5} over {:.1} s of speech, round trips {lags:?} ms",
        a.len() as f64 / 8_000.0
    );
    assert!(r >= 0.95, "correlation {r:.3} (round trips {lags:?} ms)");
}
