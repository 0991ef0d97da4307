//! The user agent core on a virtual clock.

use std::time::{Duration, Instant};

use rsip::prelude::HeadersExt;
use rsip::{Header, Method, SipMessage};

use super::*;
use crate::transaction::{Peer, TimerConfig, Transport};

fn peer() -> Peer {
    Peer { transport: Transport::Udp, addr: "192.0.2.10:5060".parse().unwrap() }
}

/// A user agent at 192.0.2.1:5060 whose tags, branches and cnonces come from `seed`.
pub(super) fn ua_with_seed(seed: u64) -> UserAgent {
    UserAgent::new(UaConfig {
        contact_host: "192.0.2.1:5060".into(),
        user_agent: "Patchbay/test".into(),
        timers: TimerConfig::default(),
        rng_key: super::RngKey::fixed(seed),
    })
}

pub(super) fn ua() -> UserAgent {
    ua_with_seed(7)
}

fn invite(extra: &str) -> SipMessage {
    let sdp = "v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
    let text = format!(
        "INVITE sip:echo@192.0.2.1 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKinv\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@192.0.2.10>;tag=a1\r\n\
         To: <sip:echo@192.0.2.1>\r\n\
         Call-ID: c1@192.0.2.10\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:alice@192.0.2.10:5060>\r\n\
         {extra}\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    );
    SipMessage::try_from(text.as_str()).unwrap()
}

fn in_dialog(method: &str, cseq: u32, branch: &str, to_tag: &str) -> SipMessage {
    let text = format!(
        "{method} sip:192.0.2.1:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.10:5060;branch={branch}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@192.0.2.10>;tag=a1\r\n\
         To: <sip:echo@192.0.2.1>;tag={to_tag}\r\n\
         Call-ID: c1@192.0.2.10\r\n\
         CSeq: {cseq} {method}\r\n\
         Content-Length: 0\r\n\r\n"
    );
    SipMessage::try_from(text.as_str()).unwrap()
}

/// Everything the user agent wants sent and reported, in order (shared with the UAC tests).
pub(super) fn drain(ua: &mut UserAgent) -> (Vec<SipMessage>, Vec<UaEvent>) {
    let (mut sent, mut events) = (Vec::new(), Vec::new());
    while let Some(out) = ua.poll_output() {
        match out {
            UaOutput::Transmit { message, .. } => sent.push(message),
            UaOutput::Event(e) => events.push(e),
        }
    }
    (sent, events)
}

fn status(message: &SipMessage) -> u16 {
    match message {
        SipMessage::Response(r) => r.status_code.code(),
        SipMessage::Request(_) => 0,
    }
}

/// A response to one of our requests, as the peer would send it.
fn reply_to(request: &rsip::Request, status_line: &str) -> SipMessage {
    let text = format!(
        "SIP/2.0 {status_line}\r\n{}\r\n{}\r\n{}\r\n{}\r\n{}\r\nContent-Length: 0\r\n\r\n",
        request.via_header().unwrap(),
        request.from_header().unwrap(),
        request.to_header().unwrap(),
        request.call_id_header().unwrap(),
        request.cseq_header().unwrap()
    );
    SipMessage::try_from(text.as_str()).unwrap()
}

/// Starts a call and answers it; returns the call and our To tag.
fn answered(ua: &mut UserAgent, t0: Instant, extra: &str) -> (CallRef, String, rsip::Response) {
    ua.handle_receive(t0, peer(), invite(extra));
    let (sent, events) = drain(ua);
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![100]);
    let Some(UaEvent::IncomingCall { call, .. }) = events.into_iter().next() else { panic!("no call") };
    ua.ring(t0, call).unwrap();
    ua.answer(t0, call, b"v=0\r\n".to_vec()).unwrap();
    let (sent, _) = drain(ua);
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![180, 200]);
    let SipMessage::Response(ok) = sent[1].clone() else { panic!() };
    let tag = ok.to_header().unwrap().tag().unwrap().unwrap().to_string();
    (call, tag, ok)
}

#[test]
fn a_call_is_answered_confirmed_and_ended_by_the_callers_bye() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, tag, ok) = answered(&mut ua, t0, "");
    assert!(ok.headers.iter().any(|h| matches!(h, Header::Contact(_))), "a 2xx to INVITE carries Contact");
    ua.handle_receive(t0, peer(), in_dialog("ACK", 1, "z9hG4bKack", &tag));
    assert_eq!(drain(&mut ua).1, vec![UaEvent::Confirmed { call }]);
    ua.handle_receive(t0, peer(), in_dialog("BYE", 2, "z9hG4bKbye", &tag));
    let (sent, events) = drain(&mut ua);
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![200]);
    assert_eq!(events, vec![UaEvent::Ended { call, cause: EndCause::RemoteBye }]);
    assert_eq!(ua.calls(), 0);
}

#[test]
fn requests_for_unknown_dialogs_get_481_and_unknown_methods_405() {
    let mut ua = ua();
    let t0 = Instant::now();
    ua.handle_receive(t0, peer(), in_dialog("BYE", 2, "z9hG4bKx", "nobody"));
    assert_eq!(drain(&mut ua).0.iter().map(status).collect::<Vec<_>>(), vec![481]);
    let text = "MESSAGE sip:echo@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKm\r\n\
                From: <sip:a@b>;tag=1\r\nTo: <sip:echo@192.0.2.1>\r\nCall-ID: m1\r\nCSeq: 1 MESSAGE\r\n\
                Content-Length: 0\r\n\r\n";
    ua.handle_receive(t0, peer(), SipMessage::try_from(text).unwrap());
    let (sent, _) = drain(&mut ua);
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![405]);
    let SipMessage::Response(r) = &sent[0] else { panic!() };
    assert!(r.headers.iter().any(|h| matches!(h, Header::Allow(_))), "405 lists Allow (§21.4.6)");
}

#[test]
fn our_hangup_sends_a_bye_built_from_the_dialog() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, tag, _) =
        answered(&mut ua, t0, "Record-Route: <sip:p1.example.com;lr>\r\nRecord-Route: <sip:p2.example.com;lr>\r\n");
    ua.handle_receive(t0, peer(), in_dialog("ACK", 1, "z9hG4bKack", &tag));
    drain(&mut ua);
    ua.hangup(t0, call).unwrap();
    let (sent, _) = drain(&mut ua);
    let [SipMessage::Request(bye)] = &sent[..] else { panic!("{sent:?}") };
    assert_eq!(bye.method, Method::Bye);
    // §12.2.1.1: Request-URI = remote target (the INVITE's Contact), Route = route set.
    assert_eq!(bye.uri.to_string(), "sip:alice@192.0.2.10:5060");
    // §12.1.1: the UAS keeps the Record-Route order (p1 is the proxy nearest to us).
    let routes: Vec<String> =
        bye.headers.iter().filter(|&h| matches!(h, Header::Route(_))).map(|h| h.to_string()).collect();
    assert_eq!(routes.len(), 2, "{routes:?}");
    assert!(routes[0].contains("p1.example.com") && routes[1].contains("p2.example.com"), "{routes:?}");
    assert_eq!(bye.from_header().unwrap().tag().unwrap().unwrap().to_string(), tag);
    assert_eq!(bye.to_header().unwrap().tag().unwrap().unwrap().to_string(), "a1");
    assert_eq!(bye.cseq_header().unwrap().typed().unwrap().method, Method::Bye);
}

#[test]
fn a_session_interval_below_min_se_gets_422() {
    let mut ua = ua();
    ua.handle_receive(Instant::now(), peer(), invite("Session-Expires: 30\r\nSupported: timer\r\n"));
    let (sent, events) = drain(&mut ua);
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![100, 422]);
    assert!(events.is_empty());
}

#[test]
fn a_session_timer_the_caller_refreshes_is_accepted_and_its_expiry_ends_the_call() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, tag, ok) = answered(&mut ua, t0, "Session-Expires: 120\r\nSupported: timer\r\n");
    let se = ok.headers.iter().find_map(|h| match h {
        Header::Other(name, value) if name == "Session-Expires" => Some(value.clone()),
        _ => None,
    });
    assert_eq!(se.as_deref(), Some("120;refresher=uac"));
    assert!(ok.headers.iter().any(|h| matches!(h, Header::Require(r) if r.to_string().contains("timer"))));
    ua.handle_receive(t0, peer(), in_dialog("ACK", 1, "z9hG4bKack", &tag));
    drain(&mut ua);
    // A refresh by UPDATE at 60 s restarts the timer.
    ua.handle_receive(t0 + Duration::from_secs(60), peer(), in_dialog("UPDATE", 2, "z9hG4bKupd", &tag));
    assert_eq!(drain(&mut ua).0.iter().map(status).collect::<Vec<_>>(), vec![200]);
    // RFC 4028 §10: BYE at interval - min(32, interval/3) = 120 - 32 = 88 s after the last refresh.
    let (expiry, sent) = loop {
        let at = ua.poll_timeout().unwrap();
        ua.handle_timeout(at);
        let (sent, _) = drain(&mut ua);
        if !sent.is_empty() {
            break (at, sent);
        }
    };
    assert_eq!(expiry, t0 + Duration::from_secs(60 + 88));
    assert!(matches!(&sent[..], [SipMessage::Request(r)] if r.method == Method::Bye), "{sent:?}");
    // The BYE's 200 ends the call with the session-timer cause.
    let SipMessage::Request(bye) = &sent[0] else { panic!() };
    ua.handle_receive(expiry, peer(), reply_to(bye, "200 OK"));
    assert_eq!(drain(&mut ua).1, vec![UaEvent::Ended { call, cause: EndCause::SessionExpired }]);
}

#[test]
fn a_reinvite_goes_to_the_application_and_an_overlapping_one_gets_500() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, tag, _) = answered(&mut ua, t0, "");
    ua.handle_receive(t0, peer(), in_dialog("ACK", 1, "z9hG4bKack", &tag));
    drain(&mut ua);
    ua.handle_receive(t0, peer(), in_dialog("INVITE", 2, "z9hG4bKre1", &tag));
    let (sent, events) = drain(&mut ua);
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![100]);
    assert!(matches!(&events[..], [UaEvent::ReInvite { call: c, .. }] if *c == call));
    ua.handle_receive(t0, peer(), in_dialog("INVITE", 3, "z9hG4bKre2", &tag));
    assert_eq!(drain(&mut ua).0.iter().map(status).collect::<Vec<_>>(), vec![100, 500]);
    ua.answer_reinvite(t0, call, Ok(b"v=0\r\n".to_vec())).unwrap();
    assert_eq!(drain(&mut ua).0.iter().map(status).collect::<Vec<_>>(), vec![200]);
}

#[test]
fn cancel_before_answer_gets_200_and_the_invite_487() {
    let mut ua = ua();
    let t0 = Instant::now();
    ua.handle_receive(t0, peer(), invite(""));
    let Some(UaEvent::IncomingCall { call, .. }) = drain(&mut ua).1.into_iter().next() else { panic!() };
    let cancel = "CANCEL sip:echo@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKinv\r\n\
                  Max-Forwards: 70\r\nFrom: <sip:alice@192.0.2.10>;tag=a1\r\nTo: <sip:echo@192.0.2.1>\r\n\
                  Call-ID: c1@192.0.2.10\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n";
    ua.handle_receive(t0, peer(), SipMessage::try_from(cancel).unwrap());
    let (sent, events) = drain(&mut ua);
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![200, 487]);
    assert_eq!(events, vec![UaEvent::Ended { call, cause: EndCause::Cancelled }]);
}

#[test]
fn sip_info_dtmf_is_reported() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, tag, _) = answered(&mut ua, t0, "");
    let body = "Signal=5\r\nDuration=250\r\n";
    let text = format!(
        "INFO sip:192.0.2.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKinfo\r\n\
         From: <sip:alice@192.0.2.10>;tag=a1\r\nTo: <sip:echo@192.0.2.1>;tag={tag}\r\nCall-ID: c1@192.0.2.10\r\n\
         CSeq: 2 INFO\r\nContent-Type: application/dtmf-relay\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    ua.handle_receive(t0, peer(), SipMessage::try_from(text.as_str()).unwrap());
    let (sent, events) = drain(&mut ua);
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![200]);
    assert_eq!(events, vec![UaEvent::InfoDtmf { call, digit: '5', duration_ms: 250 }]);
}

#[test]
fn refer_reports_notify_progress_and_a_refused_refer() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, tag, _) = answered(&mut ua, t0, "");
    ua.handle_receive(t0, peer(), in_dialog("ACK", 1, "z9hG4bKack", &tag));
    drain(&mut ua);
    ua.refer(t0, call, "sip:bob@192.0.2.20").unwrap();
    let (sent, _) = drain(&mut ua);
    let [SipMessage::Request(refer)] = &sent[..] else { panic!("{sent:?}") };
    assert_eq!(refer.method, Method::Refer);
    assert!(refer.to_string().contains("Refer-To: <sip:bob@192.0.2.20>"), "{refer}");
    assert!(matches!(ua.refer(t0, call, "sip:carol@192.0.2.21"), Err(UaError::WrongState(..))), "one at a time");
    // A NOTIFY with a provisional sipfrag is progress; 200 OK is the final word.
    for (n, (frag, state, final_)) in
        [("SIP/2.0 100 Trying", "active;expires=60", false), ("SIP/2.0 200 OK", "terminated;reason=noresource", true)]
            .into_iter()
            .enumerate()
    {
        let text = format!(
            "NOTIFY sip:192.0.2.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKn{n}\r\n\
             From: <sip:alice@192.0.2.10>;tag=a1\r\nTo: <sip:echo@192.0.2.1>;tag={tag}\r\nCall-ID: c1@192.0.2.10\r\n\
             CSeq: {} NOTIFY\r\nEvent: refer\r\nSubscription-State: {state}\r\n\
             Content-Type: message/sipfrag\r\nContent-Length: {}\r\n\r\n{frag}\r\n",
            n + 2,
            frag.len() + 2
        );
        ua.handle_receive(t0, peer(), SipMessage::try_from(text.as_str()).unwrap());
        let (sent, events) = drain(&mut ua);
        assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![200]);
        let code = if final_ { 200 } else { 100 };
        assert_eq!(events, vec![UaEvent::Transfer { call, status: code, final_ }]);
    }
    // The REFER itself refused (603): reported as a final failure.
    let SipMessage::Request(refer) = &sent[0] else { panic!() };
    ua.handle_receive(t0, peer(), reply_to(refer, "603 Decline"));
    assert_eq!(drain(&mut ua).1, vec![UaEvent::Transfer { call, status: 603, final_: true }]);
}

#[test]
fn a_bye_in_the_early_dialog_ends_the_invite_with_487() {
    let mut ua = ua();
    let t0 = Instant::now();
    ua.handle_receive(t0, peer(), invite(""));
    let Some(UaEvent::IncomingCall { call, .. }) = drain(&mut ua).1.into_iter().next() else { panic!() };
    ua.ring(t0, call).unwrap();
    let (sent, _) = drain(&mut ua);
    let SipMessage::Response(ringing) = &sent[0] else { panic!() };
    let tag = ringing.to_header().unwrap().tag().unwrap().unwrap().to_string();
    ua.handle_receive(t0, peer(), in_dialog("BYE", 2, "z9hG4bKearly", &tag));
    let (sent, events) = drain(&mut ua);
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![200, 487]);
    assert_eq!(events, vec![UaEvent::Ended { call, cause: EndCause::RemoteBye }]);
}

#[test]
fn a_merged_invite_gets_482_and_out_of_dialog_answers_carry_a_stable_to_tag() {
    let mut ua = ua();
    let t0 = Instant::now();
    ua.handle_receive(t0, peer(), invite(""));
    drain(&mut ua);
    // The same INVITE (Call-ID, From tag, CSeq) under another branch: it forked and came back
    // to us by a second path (§8.2.2.2).
    let SipMessage::Request(mut copy) = invite("") else { panic!() };
    let mut headers: Vec<Header> = copy.headers.iter().cloned().collect();
    headers[0] = Header::Via("SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKother".into());
    copy.headers = headers.into();
    ua.handle_receive(t0, peer(), SipMessage::Request(copy));
    let (sent, events) = drain(&mut ua);
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![100, 482]);
    assert!(events.is_empty());

    // §8.2.6.2: OPTIONS 200 carries a To tag, and the same one when the request comes again
    // under another branch (a new transaction, so the tag is not just a retransmitted response).
    let options = |branch: &str| {
        format!(
            "OPTIONS sip:echo@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10;branch={branch}\r\n\
             From: <sip:a@b>;tag=1\r\nTo: <sip:echo@192.0.2.1>\r\nCall-ID: o1\r\nCSeq: 1 OPTIONS\r\n\
             Content-Length: 0\r\n\r\n"
        )
    };
    let tag_of = |ua: &mut UserAgent, branch: &str| {
        ua.handle_receive(t0, peer(), SipMessage::try_from(options(branch).as_str()).unwrap());
        let (sent, _) = drain(ua);
        let SipMessage::Response(r) = &sent[0] else { panic!() };
        r.to_header().unwrap().tag().unwrap().map(|t| t.to_string())
    };
    let first = tag_of(&mut ua, "z9hG4bKo1");
    assert!(first.is_some());
    assert_eq!(tag_of(&mut ua, "z9hG4bKo2"), first);
}

/// A trunk's or registrar's digest server for `realm` (user `acct`, password `s3cret` in
/// [`check`]).
pub(super) fn digest_server(realm: &str, kind: crate::auth::AuthKind) -> crate::auth::DigestServer {
    let mut config = crate::auth::ServerConfig::new(realm, vec![7u8; 32]);
    config.kind = kind;
    crate::auth::DigestServer::new(config, 1_000).unwrap()
}

/// Checks `request` against `server` the way a trunk or registrar would: `Ok` when
/// authorised, `Err` with the challenge header lines when not.
pub(super) fn check(
    server: &mut crate::auth::DigestServer,
    request: &rsip::Request,
    kind: crate::auth::AuthKind,
) -> Result<(), String> {
    use crate::auth::{AuthKind, DigestRequest, Outcome, StoredSecret};
    use rsip::headers::UntypedHeader;
    let creds: Vec<&str> = request
        .headers
        .iter()
        .filter_map(|h| match (kind, h) {
            (AuthKind::Www, Header::Authorization(v)) => Some(v.value()),
            (AuthKind::Proxy, Header::ProxyAuthorization(v)) => Some(v.value()),
            _ => None,
        })
        .collect();
    let (method, uri) = (request.method.to_string(), request.uri.to_string());
    let store = |user: &str, _: &str, _| (user == "acct").then(|| StoredSecret::Password("s3cret".into()));
    match server.verify(1_001, &DigestRequest::new(&method, &uri, &request.body), &creds, &store) {
        Outcome::Authorized { username } => {
            assert_eq!(username, "acct");
            Ok(())
        }
        Outcome::Challenge { challenges, .. } => {
            Err(challenges.iter().map(|c| format!("{}: {c}\r\n", kind.challenge_header())).collect())
        }
        Outcome::Rejected(why) => panic!("rejected: {why:?}"),
    }
}

#[test]
fn identifiers_come_from_a_csprng_not_a_seed_and_a_counter() {
    let mut agent = ua();
    let ids: Vec<String> = (0..64).map(|_| agent.unique()).collect();
    assert!(ids.iter().all(|id| id.len() == 24 && id.chars().all(|c| c.is_ascii_hexdigit())), "{ids:?}");
    assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>().len(), ids.len());
    // A seed and a counter gave every identifier the seed's digits up front and the count
    // after: one sample told the next. Random 96-bit identifiers share nothing.
    let common = |a: &str, b: &str| a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
    let longest = ids.windows(2).map(|w| common(&w[0], &w[1])).max().unwrap_or(0);
    assert!(longest < 6, "consecutive identifiers share {longest} leading digits: {ids:?}");
    // Every bit of the key matters.
    let mut key = RngKey::fixed(7);
    key.0[31] ^= 1;
    let mut other = UserAgent::new(UaConfig {
        contact_host: "192.0.2.1:5060".into(),
        user_agent: "Patchbay/test".into(),
        timers: TimerConfig::default(),
        rng_key: key,
    });
    assert_ne!(other.unique(), ua().unique());
    assert_eq!(ua().unique(), ua().unique(), "a fixed key replays (deterministic tests)");
}

#[test]
fn keys_are_wiped_on_drop_and_never_printed() {
    fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
    wiped_on_drop::<RngKey>();
    wiped_on_drop::<crate::sdp::SdesKey>();
    assert_eq!(format!("{:?}", RngKey::fixed(1)), "RngKey(..)");
    assert!(!format!("{:?}", ua()).contains("ChaCha"), "the CSPRNG's state is not printed");
}

#[test]
fn a_required_extension_we_lack_gets_420_naming_it() {
    // RFC 3261 §8.2.2.3: 420 Bad Extension with Unsupported listing what we lack; `timer`
    // (RFC 4028), which we support, is not listed and does not refuse the call by itself.
    let mut ua = ua();
    ua.handle_receive(Instant::now(), peer(), invite("Require: 100rel, timer, foo\r\nSupported: timer\r\n"));
    let (sent, events) = drain(&mut ua);
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![100, 420]);
    let text = sent[1].to_string();
    assert!(text.contains("Unsupported: 100rel, foo\r\n"), "{text}");
    assert!(events.is_empty(), "no call starts: {events:?}");

    let mut ua = ua_with_seed(8);
    ua.handle_receive(
        Instant::now(),
        peer(),
        invite("Require: timer\r\nSession-Expires: 1800\r\nSupported: timer\r\n"),
    );
    let (sent, events) = drain(&mut ua);
    assert!(!sent.iter().any(|m| status(m) == 420), "timer is supported");
    assert!(events.iter().any(|e| matches!(e, UaEvent::IncomingCall { .. })), "{events:?}");
}

#[test]
fn an_in_dialog_request_with_another_remote_tag_is_not_the_peers() {
    // §12.2.2: the dialog is Call-ID, our tag and the peer's tag. A BYE, re-INVITE, INFO or
    // NOTIFY that guessed our tag but not the caller's gets 481 and leaves the call alone.
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, tag, _) = answered(&mut ua, t0, "");
    ua.handle_receive(t0, peer(), in_dialog("ACK", 1, "z9hG4bKack", &tag));
    drain(&mut ua);
    for (n, method) in ["BYE", "INVITE", "INFO", "NOTIFY"].into_iter().enumerate() {
        let forged = in_dialog(method, 10 + n as u32, &format!("z9hG4bKforged{n}"), &tag).to_string();
        let forged = forged.replace("tag=a1", "tag=mallory");
        ua.handle_receive(t0, peer(), SipMessage::try_from(forged.as_str()).unwrap());
        let (sent, events) = drain(&mut ua);
        // (An INVITE gets its 100 Trying from the transaction first.)
        let answers: Vec<u16> = sent.iter().map(status).filter(|s| *s != 100).collect();
        assert_eq!(answers, vec![481], "{method}");
        assert!(events.is_empty(), "{method}: {events:?}");
    }
    // The caller's own BYE still ends the call.
    ua.handle_receive(t0, peer(), in_dialog("BYE", 20, "z9hG4bKbye", &tag));
    let (sent, events) = drain(&mut ua);
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![200]);
    assert!(events.iter().any(|e| matches!(e, UaEvent::Ended { call: c, .. } if *c == call)), "{events:?}");
}

#[test]
fn in_dialog_requests_from_another_address_do_not_touch_the_call() {
    // The whole dialog ID (Call-ID and both tags, as an eavesdropper on the signalling path
    // has them) is not enough: a BYE, re-INVITE, INFO, NOTIFY, REFER or ACK must come from the
    // dialog's peer. From elsewhere it gets 481 and is counted.
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, tag, _) = answered(&mut ua, t0, "");
    let mallory = Peer { transport: Transport::Udp, addr: "203.0.113.66:5060".parse().unwrap() };
    // A forged ACK does not confirm the call.
    ua.handle_receive(t0, mallory, in_dialog("ACK", 1, "z9hG4bKforgedack", &tag));
    let (_, events) = drain(&mut ua);
    assert!(events.is_empty(), "a forged ACK confirmed the call: {events:?}");
    ua.handle_receive(t0, peer(), in_dialog("ACK", 1, "z9hG4bKack", &tag));
    let (_, events) = drain(&mut ua);
    assert!(events.iter().any(|e| matches!(e, UaEvent::Confirmed { .. })), "{events:?}");
    for (n, method) in ["BYE", "INVITE", "INFO", "NOTIFY", "REFER"].into_iter().enumerate() {
        ua.handle_receive(t0, mallory, in_dialog(method, 10 + n as u32, &format!("z9hG4bKforged{n}"), &tag));
        let (sent, events) = drain(&mut ua);
        let answers: Vec<u16> = sent.iter().map(status).filter(|s| *s != 100).collect();
        assert_eq!(answers, vec![481], "{method}");
        assert!(events.is_empty(), "{method}: {events:?}");
    }
    // Another port of the caller's own host, over UDP, is not the caller either.
    let neighbour = Peer { transport: Transport::Udp, addr: "192.0.2.10:5999".parse().unwrap() };
    ua.handle_receive(t0, neighbour, in_dialog("BYE", 20, "z9hG4bKneighbour", &tag));
    let (sent, events) = drain(&mut ua);
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![481]);
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(ua.foreign_requests(), 7);
    // A carrier edge configured for the call may send in its dialog.
    let edge = Peer { transport: Transport::Udp, addr: "198.51.100.2:5060".parse().unwrap() };
    ua.trust_sources(call, &[edge.addr.ip()]);
    ua.handle_receive(t0, edge, in_dialog("BYE", 30, "z9hG4bKedgebye", &tag));
    let (sent, events) = drain(&mut ua);
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![200]);
    assert!(events.iter().any(|e| matches!(e, UaEvent::Ended { call: c, .. } if *c == call)), "{events:?}");
}

#[test]
fn a_cancel_from_another_address_does_not_cancel_the_call() {
    let mut ua = ua();
    let t0 = Instant::now();
    ua.handle_receive(t0, peer(), invite(""));
    drain(&mut ua);
    let cancel = |to_branch: &str| {
        SipMessage::try_from(
            format!(
                "CANCEL sip:echo@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5060;branch={to_branch}\r\n\
                 Max-Forwards: 70\r\nFrom: <sip:alice@192.0.2.10>;tag=a1\r\nTo: <sip:echo@192.0.2.1>\r\n\
                 Call-ID: c1@192.0.2.10\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n"
            )
            .as_str(),
        )
        .unwrap()
    };
    let mallory = Peer { transport: Transport::Udp, addr: "203.0.113.66:5060".parse().unwrap() };
    ua.handle_receive(t0, mallory, cancel("z9hG4bKinv"));
    let (sent, events) = drain(&mut ua);
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![481]);
    assert!(events.is_empty(), "{events:?}");
    // The caller's own CANCEL works: 200 for it, 487 for the INVITE.
    ua.handle_receive(t0, peer(), cancel("z9hG4bKinv"));
    let (sent, _) = drain(&mut ua);
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![200, 487]);
}

#[test]
fn a_forged_ack_leaves_the_2xx_retransmissions_and_the_ack_timeout_running() {
    // The transaction layer stops retransmitting the 200 only for an ACK from where the INVITE
    // came from: a forged one must not silence the call (no ACK timeout, media never released).
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, tag, _) = answered(&mut ua, t0, "");
    let mallory = Peer { transport: Transport::Udp, addr: "203.0.113.66:5060".parse().unwrap() };
    ua.handle_receive(t0, mallory, in_dialog("ACK", 1, "z9hG4bKforgedack", &tag));
    drain(&mut ua);
    // 200 OK retransmissions go on (T1, 2·T1, …).
    let mut retransmitted = 0;
    let mut now = t0;
    while let Some(at) = ua.poll_timeout() {
        if at > t0 + Duration::from_secs(40) {
            break;
        }
        now = at;
        ua.handle_timeout(at);
        let (sent, events) = drain(&mut ua);
        retransmitted += sent.iter().filter(|m| status(m) == 200).count();
        if events.iter().any(|e| matches!(e, UaEvent::Ended { call: c, .. } if *c == call)) {
            break;
        }
    }
    assert!(retransmitted >= 5, "the 200 was retransmitted {retransmitted} times");
    assert!(now >= t0 + Duration::from_secs(30), "the call ended by the ACK timeout (64·T1), not before");
}
