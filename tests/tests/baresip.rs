//! Media against an endpoint nobody here wrote: baresip calls the echo flow, plays speech, and
//! saves what it hears (its `sndfile` module); the speech must come back.
//!
//! - SRTP (RFC 3711) with SDES keys (RFC 4568): baresip's `srtp` module (libre's SRTP) with
//!   `mediaenc=srtp-mand` — both sides must decrypt and authenticate what the other sends, and
//!   every RTP packet on the wire must carry the 80-bit tag.
//! - RTCP multiplexed on the RTP port (RFC 5761): baresip offers `a=rtcp-mux`; Patchbay's
//!   reports must go to baresip's RTP port, none to the port above.

use patchbay_e2e::{
    Capture, Datagram, Patchbay, correlation, quiet_port, start_patchbay, start_patchbay_with, wav_samples,
    write_pcm16_wav,
};
use patchbay_media::rtp::{CompoundPacket, RTCP_BYE, RtcpPacket, RtpPacket};

/// What one baresip call to the echo flow left behind.
struct EchoCall {
    /// baresip's RTP port (RTCP on the next one unless multiplexed); the capture covers both.
    rtp_port: u16,
    /// Datagrams to and from baresip's ports.
    datagrams: Vec<Datagram>,
    /// baresip's console output.
    log: String,
    /// What baresip sent and what it heard, aligned 100 ms at a time: the correlation, the
    /// seconds of speech compared and the round trips seen (ms).
    correlation: f64,
    compared_s: f64,
    round_trips_ms: Vec<usize>,
}

/// baresip (`config` lines and `account` parameters added to a minimal set-up) calls the echo
/// flow for about 7 s playing the stock menu prompt.
fn baresip_echo_call(pb: &Patchbay, config_extra: &str, account_params: &str) -> EchoCall {
    let dir = tempfile::tempdir().expect("tempdir");
    // The stock menu prompt (μ-law speech), as 16-bit PCM.
    let prompt = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../runtime/patchbay/prompts/menu.wav"))
        .expect("the stock menu prompt");
    let speech = wav_samples(&prompt);
    let speech_path = dir.path().join("speech.wav");
    // baresip's `aufile` reads only 16-bit PCM.
    write_pcm16_wav(&speech_path, &speech);
    // baresip's RTP port range, narrow enough to capture, and its SIP port: below the kernel's
    // ephemeral range, where the Patchbay of a test running beside this one (which binds its
    // RTP ports to port 0) cannot take them between this check and baresip's own bind.
    let rtp_low = quiet_port(2);
    let sip_port = quiet_port(1);
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
         module_app\tmenu.so\n\
         {config_extra}",
        speech = speech_path.display(),
        rtp_high = rtp_low + 1,
        dir = dir.path().display(),
    );
    std::fs::write(dir.path().join("config"), config).expect("baresip config");
    std::fs::write(
        dir.path().join("accounts"),
        format!("<sip:caller@127.0.0.1>;regint=0;audio_codecs=PCMU{account_params}\n"),
    )
    .expect("baresip accounts");

    let capture = Capture::start(&format!("udp portrange {rtp_low}-{}", rtp_low + 1));
    let output = std::process::Command::new("baresip")
        .arg("-f")
        .arg(dir.path())
        .args(["-e", &format!("/dial sip:echo@127.0.0.1:{}", pb.port), "-t", "8"])
        .output()
        .expect("run baresip (cargo xtask test installs it)");
    let datagrams = capture.finish();
    let log = String::from_utf8_lossy(&output.stdout).into_owned();

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
    EchoCall {
        rtp_port: rtp_low,
        datagrams,
        log,
        correlation: correlation(&a, &b),
        compared_s: a.len() as f64 / 8_000.0,
        round_trips_ms: lags,
    }
}

impl EchoCall {
    /// The speech came back: at least 2 s of it compared, correlation ≥ 0.95.
    fn assert_heard_itself(&self, what: &str) {
        let (r, lags) = (self.correlation, &self.round_trips_ms);
        eprintln!("{what}: correlation {r:.5} over {:.1} s of speech, round trips {lags:?} ms", self.compared_s);
        assert!(self.compared_s >= 2.0, "only {:.1} s of speech compared:\n{}", self.compared_s, self.log);
        assert!(r >= 0.95, "correlation {r:.3} (round trips {lags:?} ms)");
    }

    /// Datagrams from Patchbay to baresip's port `port`.
    fn to_port(&self, port: u16) -> impl Iterator<Item = &Datagram> {
        self.datagrams.iter().filter(move |d| d.dst_port == port)
    }
}

#[test]
fn baresip_calls_the_echo_flow_over_srtp_and_hears_itself() {
    // srtp-mand: SRTP or no call (baresip refuses an answer without a=crypto). Over UDP, so SDES
    // keys in the clear must be allowed (RFC 4568 §8.3; loopback here).
    let pb = start_patchbay_with(
        "[media]\nsrtp_over_plain = true\n",
        "[[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n",
    );
    let call = baresip_echo_call(&pb, "", ";mediaenc=srtp-mand");
    assert!(call.log.contains("SRTP is Enabled"), "baresip did not switch SRTP on:\n{}", call.log);
    // On the wire: RTP from Patchbay to baresip is PCMU with the 10-byte tag after 160 octets
    // (AES_CM_128_HMAC_SHA1_80), never plain.
    let ours: Vec<usize> = call
        .to_port(call.rtp_port)
        .filter(|d| RtpPacket::parse(&d.payload).is_ok_and(|p| p.header.payload_type == 0))
        .map(|d| d.payload.len())
        .collect();
    assert!(ours.len() > 200, "only {} RTP packets from Patchbay:\n{}", ours.len(), call.log);
    assert!(ours.iter().all(|&len| len == 12 + 160 + 10), "packet lengths {:?}", &ours[..10]);
    call.assert_heard_itself("srtp echo");
}

#[test]
fn baresip_offering_rtcp_mux_gets_reports_on_its_rtp_port() {
    let call = baresip_echo_call(&start_patchbay(), "rtcp_mux\tyes\n", "");
    // Patchbay's sender reports (packet type 200) arrive on baresip's RTP port, none on the
    // port above (RFC 5761 §5.1.3).
    let reports = call
        .to_port(call.rtp_port)
        .filter(|d| matches!(rtcp(&d.payload).first(), Some(RtcpPacket::SenderReport(_))))
        .count();
    assert!(reports >= 1, "no RTCP from Patchbay on baresip's RTP port:\n{}", call.log);
    assert_eq!(call.to_port(call.rtp_port + 1).count(), 0, "RTCP still sent to the port above");
    // When baresip hangs up, Patchbay's last report carries a BYE for its stream (RFC 3550
    // §6.6), on the same port.
    let byes = call
        .to_port(call.rtp_port)
        .filter(|d| rtcp(&d.payload).iter().any(|p| matches!(p, RtcpPacket::Other { packet_type: RTCP_BYE, .. })))
        .count();
    assert_eq!(byes, 1, "one RTCP BYE at the end of the call:\n{}", call.log);
    call.assert_heard_itself("rtcp-mux echo");
}

/// The RTCP packets of a datagram (RFC 3550 §6.1); none if it is not an RTCP compound packet.
fn rtcp(datagram: &[u8]) -> Vec<RtcpPacket<'_>> {
    CompoundPacket::parse(datagram).map(|compound| compound.iter().collect()).unwrap_or_default()
}
