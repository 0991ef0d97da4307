//! Outbound calls, CANCEL, digest answers and glare on a virtual clock.

use std::time::{Duration, Instant};

use rsip::headers::{ToTypedHeader, UntypedHeader};
use rsip::prelude::HeadersExt;
use rsip::{Header, Method, SipMessage};

use super::super::tests::{check, digest_server, drain, ua_with_seed};
use super::super::*;
use crate::auth::{AuthKind, DigestClient};
use crate::transaction::{Peer, Transport};

fn trunk() -> Peer {
    Peer { transport: Transport::Udp, addr: "198.51.100.7:5060".parse().unwrap() }
}

fn ua() -> UserAgent {
    ua_with_seed(11)
}

fn dial(ua: &mut UserAgent, now: Instant, credentials: Option<DigestClient>) -> (CallRef, rsip::Request) {
    let call = ua.dial(
        now,
        Dial {
            peer: trunk(),
            target: rsip::Uri::try_from("sip:+15550100@trunk.example").unwrap(),
            from: "<sip:patchbay@192.0.2.1>".into(),
            to: None,
            sdp: b"v=0\r\n".to_vec(),
            credentials,
            headers: vec![],
        },
    );
    let (sent, events) = drain(ua);
    assert!(events.is_empty(), "{events:?}");
    let [SipMessage::Request(invite)] = &sent[..] else { panic!("{sent:?}") };
    (call, invite.clone())
}

/// The callee's response to `request`, with `extra` header lines (Contact, Record-Route,
/// challenges) and the To tag `tag`.
fn respond(request: &rsip::Request, status_line: &str, tag: Option<&str>, extra: &str) -> SipMessage {
    let to = request.to_header().unwrap().value().to_owned();
    let to = match tag {
        Some(tag) if !to.contains(";tag=") => format!("{to};tag={tag}"),
        _ => to,
    };
    let vias: String =
        request.headers.iter().filter(|h| matches!(h, Header::Via(_))).map(|h| format!("{h}\r\n")).collect();
    let text = format!(
        "SIP/2.0 {status_line}\r\n{vias}{}\r\nTo: {to}\r\n{}\r\n{}\r\n{extra}Content-Length: 0\r\n\r\n",
        request.from_header().unwrap(),
        request.call_id_header().unwrap(),
        request.cseq_header().unwrap(),
    );
    SipMessage::try_from(text.as_str()).unwrap()
}

fn requests(sent: &[SipMessage]) -> Vec<&rsip::Request> {
    sent.iter()
        .filter_map(|m| match m {
            SipMessage::Request(r) => Some(r),
            SipMessage::Response(_) => None,
        })
        .collect()
}

fn cseq(request: &rsip::Request) -> u32 {
    request.cseq_header().unwrap().typed().unwrap().seq
}

fn branch(request: &rsip::Request) -> String {
    request.via_header().unwrap().typed().unwrap().branch().unwrap().to_string()
}

const CALLEE: &str = "Contact: <sip:callee@203.0.113.5:5070>\r\n\
                      Record-Route: <sip:edge.trunk.example;lr>\r\n\
                      Record-Route: <sip:core.trunk.example;lr>\r\n";

#[test]
fn an_outbound_call_rings_is_answered_acknowledged_and_ended_with_bye() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, invite) = dial(&mut ua, t0, None);
    assert_eq!(invite.method, Method::Invite);
    assert_eq!(invite.uri.to_string(), "sip:+15550100@trunk.example");
    assert!(invite.from_header().unwrap().tag().unwrap().is_some(), "§8.1.1.3: From carries our tag");
    assert!(invite.to_header().unwrap().tag().unwrap().is_none());
    assert!(branch(&invite).starts_with("z9hG4bK"));
    assert!(invite.headers.iter().any(|h| matches!(h, Header::Contact(_))), "§8.1.1.8: INVITE carries Contact");
    assert_eq!(cseq(&invite), 1);

    ua.handle_receive(t0, trunk(), respond(&invite, "100 Trying", None, ""));
    assert_eq!(drain(&mut ua), (vec![], vec![]));
    ua.handle_receive(t0, trunk(), respond(&invite, "180 Ringing", Some("b1"), CALLEE));
    assert_eq!(drain(&mut ua).1, vec![UaEvent::Progress { call, status: 180, sdp: None }]);

    let ok = respond(&invite, "200 OK", Some("b1"), CALLEE);
    ua.handle_receive(t0, trunk(), ok.clone());
    let (sent, events) = drain(&mut ua);
    assert_eq!(events, vec![UaEvent::Answered { call, sdp: vec![] }]);
    let [ack] = requests(&sent)[..] else { panic!("{sent:?}") };
    // §13.2.2.4: the ACK goes to the remote target with the route set reversed (§12.1.2),
    // carries the INVITE's CSeq number and a new branch.
    assert_eq!(ack.method, Method::Ack);
    assert_eq!(ack.uri.to_string(), "sip:callee@203.0.113.5:5070");
    let routes: Vec<String> =
        ack.headers.iter().filter(|h| matches!(h, Header::Route(_))).map(|h| h.to_string()).collect();
    assert!(routes.len() == 2 && routes[0].contains("core") && routes[1].contains("edge"), "{routes:?}");
    assert_eq!(cseq(ack), 1);
    assert_ne!(branch(ack), branch(&invite));
    assert_eq!(ack.to_header().unwrap().tag().unwrap().unwrap().to_string(), "b1");

    // A retransmitted 2xx gets the same ACK again and nothing else.
    let first_ack = ack.clone();
    ua.handle_receive(t0 + Duration::from_millis(500), trunk(), ok);
    let (sent, events) = drain(&mut ua);
    assert!(events.is_empty());
    assert_eq!(requests(&sent), vec![&first_ack]);

    ua.hangup(t0, call).unwrap();
    let (sent, _) = drain(&mut ua);
    let [bye] = requests(&sent)[..] else { panic!("{sent:?}") };
    assert_eq!(bye.method, Method::Bye);
    assert_eq!(bye.uri.to_string(), "sip:callee@203.0.113.5:5070");
    assert_eq!(cseq(bye), 2);
    assert_eq!(bye.from_header().unwrap().value(), invite.from_header().unwrap().value());
    ua.handle_receive(t0, trunk(), respond(bye, "200 OK", None, ""));
    assert_eq!(drain(&mut ua).1, vec![UaEvent::Ended { call, cause: EndCause::LocalBye }]);
    assert_eq!(ua.calls(), 0);
}

#[test]
fn the_callee_can_hang_up_an_outbound_call() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, invite) = dial(&mut ua, t0, None);
    ua.handle_receive(t0, trunk(), respond(&invite, "200 OK", Some("b1"), CALLEE));
    drain(&mut ua);
    let from = invite.from_header().unwrap().value().to_owned();
    let to = format!("{};tag=b1", invite.to_header().unwrap().value());
    let text = format!(
        "BYE sip:192.0.2.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.5:5070;branch=z9hG4bKcb\r\n\
         From: {to}\r\nTo: {from}\r\nCall-ID: {}\r\nCSeq: 7 BYE\r\nContent-Length: 0\r\n\r\n",
        invite.call_id_header().unwrap().value()
    );
    ua.handle_receive(t0, trunk(), SipMessage::try_from(text.as_str()).unwrap());
    let (sent, events) = drain(&mut ua);
    assert!(matches!(&sent[..], [SipMessage::Response(r)] if r.status_code.code() == 200), "{sent:?}");
    assert_eq!(events, vec![UaEvent::Ended { call, cause: EndCause::RemoteBye }]);
}

#[test]
fn a_failed_or_unanswered_outbound_call_ends_with_its_status() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, invite) = dial(&mut ua, t0, None);
    ua.handle_receive(t0, trunk(), respond(&invite, "486 Busy Here", Some("b1"), ""));
    let (sent, events) = drain(&mut ua);
    // The transaction acknowledges the non-2xx itself (§17.1.1.3) with the INVITE's branch.
    let [ack] = requests(&sent)[..] else { panic!("{sent:?}") };
    assert_eq!((ack.method, branch(ack)), (Method::Ack, branch(&invite)));
    assert_eq!(events, vec![UaEvent::Ended { call, cause: EndCause::Failed(486) }]);

    // A challenge without credentials is a failure too.
    let (call, invite) = dial(&mut ua, t0, None);
    ua.handle_receive(
        t0,
        trunk(),
        respond(
            &invite,
            "407 Proxy Authentication Required",
            Some("p"),
            "Proxy-Authenticate: Digest realm=\"t\", nonce=\"n\"\r\n",
        ),
    );
    assert_eq!(drain(&mut ua).1, vec![UaEvent::Ended { call, cause: EndCause::Failed(407) }]);

    // Nobody answers: timer B (64·T1) fails the call with 408 (§8.1.3.1).
    let (call, _) = dial(&mut ua, t0, None);
    let mut now = t0;
    while let Some(at) = ua.poll_timeout() {
        now = at;
        ua.handle_timeout(at);
        if drain(&mut ua).1.contains(&UaEvent::Ended { call, cause: EndCause::Failed(408) }) {
            break;
        }
        assert!(at < t0 + Duration::from_secs(40), "no timeout");
    }
    assert!(now >= t0 + Duration::from_secs(32), "timer B is 64·T1");
    assert_eq!(ua.calls(), 0);
}

#[test]
fn cancel_waits_for_a_provisional_response_and_ends_the_call_on_487() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, invite) = dial(&mut ua, t0, None);
    ua.hangup(t0, call).unwrap();
    assert_eq!(drain(&mut ua), (vec![], vec![]), "§9.1: no CANCEL before a provisional response");
    ua.handle_receive(t0, trunk(), respond(&invite, "100 Trying", None, ""));
    let (sent, events) = drain(&mut ua);
    assert!(events.is_empty());
    let [cancel] = requests(&sent)[..] else { panic!("{sent:?}") };
    // §9.1: same Request-URI, Call-ID, From, To (no tag), CSeq number and branch.
    assert_eq!(cancel.method, Method::Cancel);
    assert_eq!(cancel.uri, invite.uri);
    assert_eq!(branch(cancel), branch(&invite));
    assert_eq!(cseq(cancel), cseq(&invite));
    assert_eq!(cancel.to_header().unwrap().value(), invite.to_header().unwrap().value());
    ua.handle_receive(t0, trunk(), respond(cancel, "200 OK", Some("b1"), ""));
    assert_eq!(drain(&mut ua).1, vec![]);
    ua.handle_receive(t0, trunk(), respond(&invite, "487 Request Terminated", Some("b1"), ""));
    let (sent, events) = drain(&mut ua);
    assert_eq!(requests(&sent).iter().map(|r| r.method).collect::<Vec<_>>(), vec![Method::Ack]);
    assert_eq!(events, vec![UaEvent::Ended { call, cause: EndCause::Cancelled }]);
}

#[test]
fn a_2xx_that_crosses_our_cancel_is_acknowledged_and_ended_with_bye() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, invite) = dial(&mut ua, t0, None);
    ua.handle_receive(t0, trunk(), respond(&invite, "180 Ringing", Some("b1"), CALLEE));
    drain(&mut ua);
    ua.hangup(t0, call).unwrap();
    let (sent, _) = drain(&mut ua);
    assert_eq!(requests(&sent)[0].method, Method::Cancel);
    ua.handle_receive(t0, trunk(), respond(&invite, "200 OK", Some("b1"), CALLEE));
    let (sent, events) = drain(&mut ua);
    let methods: Vec<Method> = requests(&sent).iter().map(|r| r.method).collect();
    assert_eq!(methods, vec![Method::Ack, Method::Bye]);
    assert!(events.is_empty(), "the application already hung up: {events:?}");
    let bye = requests(&sent)[1].clone();
    ua.handle_receive(t0, trunk(), respond(&bye, "200 OK", None, ""));
    assert_eq!(drain(&mut ua).1, vec![UaEvent::Ended { call, cause: EndCause::LocalBye }]);
}

#[test]
fn digest_challenges_are_answered_on_invite_and_bye_and_reused_on_the_ack() {
    let mut ua = ua();
    let t0 = Instant::now();
    let mut proxy = digest_server("trunk.example", AuthKind::Proxy);
    let mut uas = digest_server("trunk.example", AuthKind::Www);
    let (call, invite) = dial(&mut ua, t0, Some(DigestClient::new("acct", "s3cret")));
    let challenge = check(&mut proxy, &invite, AuthKind::Proxy).unwrap_err();
    ua.handle_receive(t0, trunk(), respond(&invite, "407 Proxy Authentication Required", Some("p"), &challenge));
    let (sent, events) = drain(&mut ua);
    assert!(events.is_empty(), "{events:?}");
    let [ack, invite2] = requests(&sent)[..] else { panic!("{sent:?}") };
    assert_eq!(ack.method, Method::Ack);
    // §22.2: the same request again, CSeq incremented, new branch, with credentials.
    assert_eq!(invite2.method, Method::Invite);
    assert_eq!(cseq(invite2), 2);
    assert_ne!(branch(invite2), branch(&invite));
    assert_eq!(invite2.call_id_header().unwrap().value(), invite.call_id_header().unwrap().value());
    assert_eq!(invite2.from_header().unwrap().value(), invite.from_header().unwrap().value());
    check(&mut proxy, invite2, AuthKind::Proxy).expect("the proxy accepts the credentials");

    ua.handle_receive(t0, trunk(), respond(invite2, "200 OK", Some("b1"), CALLEE));
    let (sent, events) = drain(&mut ua);
    assert_eq!(events, vec![UaEvent::Answered { call, sdp: vec![] }]);
    let [ack] = requests(&sent)[..] else { panic!("{sent:?}") };
    assert_eq!(cseq(ack), 2);
    assert!(
        ack.headers.iter().any(|h| matches!(h, Header::ProxyAuthorization(_))),
        "§22.1: ACK repeats the INVITE's credentials"
    );

    // The BYE carries the proxy credentials up front (§22.3) and answers the UAS's 401.
    ua.hangup(t0, call).unwrap();
    let (sent, _) = drain(&mut ua);
    let [bye] = requests(&sent)[..] else { panic!("{sent:?}") };
    check(&mut proxy, bye, AuthKind::Proxy).expect("preemptive proxy credentials on BYE");
    let challenge = check(&mut uas, bye, AuthKind::Www).unwrap_err();
    ua.handle_receive(t0, trunk(), respond(bye, "401 Unauthorized", None, &challenge));
    let (sent, events) = drain(&mut ua);
    assert!(events.is_empty(), "{events:?}");
    let [bye2] = requests(&sent)[..] else { panic!("{sent:?}") };
    assert_eq!((bye2.method, cseq(bye2)), (Method::Bye, cseq(bye) + 1));
    check(&mut uas, bye2, AuthKind::Www).expect("the UAS accepts the BYE's credentials");
    ua.handle_receive(t0, trunk(), respond(bye2, "200 OK", None, ""));
    assert_eq!(drain(&mut ua).1, vec![UaEvent::Ended { call, cause: EndCause::LocalBye }]);
}

#[test]
fn refused_credentials_fail_the_call_instead_of_looping() {
    let mut ua = ua();
    let t0 = Instant::now();
    let mut proxy = digest_server("trunk.example", AuthKind::Proxy);
    let (call, invite) = dial(&mut ua, t0, Some(DigestClient::new("acct", "wrong")));
    let challenge = check(&mut proxy, &invite, AuthKind::Proxy).unwrap_err();
    ua.handle_receive(t0, trunk(), respond(&invite, "407 Proxy Authentication Required", Some("p"), &challenge));
    let (sent, _) = drain(&mut ua);
    let invite2 = requests(&sent)[1].clone();
    // The server refuses and challenges again without stale=TRUE: the password is wrong.
    let again = proxy.challenge(1_001).iter().map(|c| format!("Proxy-Authenticate: {c}\r\n")).collect::<String>();
    ua.handle_receive(t0, trunk(), respond(&invite2, "407 Proxy Authentication Required", Some("p"), &again));
    let (sent, events) = drain(&mut ua);
    assert_eq!(requests(&sent).iter().map(|r| r.method).collect::<Vec<_>>(), vec![Method::Ack]);
    assert_eq!(events, vec![UaEvent::Ended { call, cause: EndCause::Failed(407) }]);
}

/// An answered outbound call, ACKed; returns the call, the INVITE and the callee's tag.
fn established(ua: &mut UserAgent, t0: Instant) -> (CallRef, rsip::Request) {
    let (call, invite) = dial(ua, t0, None);
    ua.handle_receive(t0, trunk(), respond(&invite, "200 OK", Some("b1"), CALLEE));
    drain(ua);
    (call, invite)
}

fn peer_reinvite(invite: &rsip::Request, seq: u32) -> SipMessage {
    let from = invite.from_header().unwrap().value().to_owned();
    let to = format!("{};tag=b1", invite.to_header().unwrap().value());
    let sdp = "v=0\r\n";
    let text = format!(
        "INVITE sip:192.0.2.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.5:5070;branch=z9hG4bKri{seq}\r\n\
         From: {to}\r\nTo: {from}\r\nCall-ID: {}\r\nCSeq: {seq} INVITE\r\nContact: <sip:callee@203.0.113.5:5070>\r\n\
         Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        invite.call_id_header().unwrap().value(),
        sdp.len()
    );
    SipMessage::try_from(text.as_str()).unwrap()
}

#[test]
fn reinvite_glare_gets_491_and_our_reinvite_is_retried_after_the_owner_wait() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, invite) = established(&mut ua, t0);
    ua.reinvite(t0, call, b"v=0\r\na=sendonly\r\n".to_vec()).unwrap();
    let (sent, _) = drain(&mut ua);
    let [ours] = requests(&sent)[..] else { panic!("{sent:?}") };
    assert_eq!((ours.method, cseq(ours)), (Method::Invite, 2));
    assert!(ua.reinvite(t0, call, vec![]).is_err(), "§14.1: one re-INVITE at a time");

    // The peer's re-INVITE crosses ours: 491 (§14.2).
    ua.handle_receive(t0, trunk(), peer_reinvite(&invite, 5));
    let (sent, events) = drain(&mut ua);
    assert!(events.is_empty());
    assert!(sent.iter().any(|m| matches!(m, SipMessage::Response(r) if r.status_code.code() == 491)), "{sent:?}");

    // Ours is refused with 491 too: nothing reported, retried within 2.1–4 s (we own the
    // Call-ID).
    ua.handle_receive(t0, trunk(), respond(ours, "491 Request Pending", None, ""));
    let (sent, events) = drain(&mut ua);
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(requests(&sent).len(), 1, "only the ACK for the 491: {sent:?}");
    // The transaction layer's own timers may come first; step until the retry goes out.
    let mut now;
    let retry = loop {
        let at = ua.poll_timeout().unwrap();
        assert!(at <= t0 + Duration::from_secs(4), "retry later than 4 s");
        now = at;
        ua.handle_timeout(at);
        let (sent, _) = drain(&mut ua);
        if let Some(r) = requests(&sent).into_iter().find(|r| r.method == Method::Invite) {
            break r.clone();
        }
    };
    assert!(now >= t0 + Duration::from_millis(2_100), "retry earlier than 2.1 s");
    assert_eq!(cseq(&retry), 3);
    assert_eq!(retry.body, b"v=0\r\na=sendonly\r\n");
    ua.handle_receive(now, trunk(), respond(&retry, "200 OK", None, "Contact: <sip:callee@203.0.113.9>\r\n"));
    let (sent, events) = drain(&mut ua);
    assert_eq!(events, vec![UaEvent::ReInviteAnswered { call, result: Ok(vec![]) }]);
    let [ack] = requests(&sent)[..] else { panic!("{sent:?}") };
    // The 2xx refreshed the remote target (§12.2.1.2).
    assert_eq!((ack.method, cseq(ack), ack.uri.to_string()), (Method::Ack, 3, "sip:callee@203.0.113.9".into()));
}

#[test]
fn a_refused_reinvite_keeps_the_call_and_a_481_ends_it() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, _) = established(&mut ua, t0);
    ua.reinvite(t0, call, b"v=0\r\n".to_vec()).unwrap();
    let (sent, _) = drain(&mut ua);
    let ours = requests(&sent)[0].clone();
    ua.handle_receive(t0, trunk(), respond(&ours, "488 Not Acceptable Here", None, ""));
    assert_eq!(drain(&mut ua).1, vec![UaEvent::ReInviteAnswered { call, result: Err(488) }]);
    assert_eq!(ua.calls(), 1);
    ua.reinvite(t0, call, b"v=0\r\n".to_vec()).unwrap();
    let (sent, _) = drain(&mut ua);
    let ours = requests(&sent)[0].clone();
    ua.handle_receive(t0, trunk(), respond(&ours, "481 Call/Transaction Does Not Exist", None, ""));
    let (sent, events) = drain(&mut ua);
    assert_eq!(events, vec![UaEvent::ReInviteAnswered { call, result: Err(481) }]);
    assert!(requests(&sent).iter().any(|r| r.method == Method::Bye), "§12.2.1.2: 481 ends the dialog");
}

#[test]
fn a_challenge_that_crosses_our_cancel_ends_the_call_instead_of_reinviting() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, invite) = dial(&mut ua, t0, Some(DigestClient::new("acct", "s3cret")));
    ua.handle_receive(t0, trunk(), respond(&invite, "100 Trying", None, ""));
    ua.hangup(t0, call).unwrap();
    assert_eq!(requests(&drain(&mut ua).0)[0].method, Method::Cancel);
    let challenge = "Proxy-Authenticate: Digest realm=\"t\", nonce=\"n\", qop=\"auth\"\r\n";
    ua.handle_receive(t0, trunk(), respond(&invite, "407 Proxy Authentication Required", Some("p"), challenge));
    let (sent, events) = drain(&mut ua);
    assert_eq!(requests(&sent).iter().map(|r| r.method).collect::<Vec<_>>(), vec![Method::Ack], "no new INVITE");
    assert_eq!(events, vec![UaEvent::Ended { call, cause: EndCause::Cancelled }]);
}

#[test]
fn a_cancel_that_never_gets_its_487_ends_the_call_after_64_t1() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (call, invite) = dial(&mut ua, t0, None);
    ua.handle_receive(t0, trunk(), respond(&invite, "180 Ringing", Some("b1"), ""));
    drain(&mut ua);
    ua.hangup(t0, call).unwrap();
    let (sent, _) = drain(&mut ua);
    let cancel = requests(&sent)[0].clone();
    ua.handle_receive(t0, trunk(), respond(&cancel, "200 OK", Some("b1"), ""));
    drain(&mut ua);
    let mut ended_at = None;
    while let Some(at) = ua.poll_timeout() {
        assert!(at <= t0 + Duration::from_secs(40), "the call never ended");
        ua.handle_timeout(at);
        if drain(&mut ua).1.contains(&UaEvent::Ended { call, cause: EndCause::Cancelled }) {
            ended_at = Some(at);
            break;
        }
    }
    assert_eq!(ended_at, Some(t0 + Duration::from_secs(32)));
    assert_eq!(ua.calls(), 0);
}
