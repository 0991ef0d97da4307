//! The REGISTER client on a virtual clock: digest answers checked by our own `DigestServer`,
//! refreshes, 423, back-off, timeouts and removal.

use std::time::{Duration, Instant};

use rsip::headers::{ToTypedHeader, UntypedHeader};
use rsip::prelude::HeadersExt;
use rsip::{Header, Method, SipMessage};

use super::super::tests::{check, digest_server, drain, ua_with_seed};
use super::super::*;
use crate::auth::{AuthKind, DigestClient};
use crate::transaction::{Peer, Transport};

fn carrier() -> Peer {
    Peer { transport: Transport::Udp, addr: "198.51.100.20:5060".parse().unwrap() }
}

fn ua() -> UserAgent {
    ua_with_seed(5)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Starts a registration asking for `expires`; returns it and its first REGISTER.
fn register(
    ua: &mut UserAgent,
    now: Instant,
    credentials: Option<DigestClient>,
    expires: u32,
) -> (RegRef, rsip::Request) {
    let reg = ua.register(
        now,
        Register {
            peer: carrier(),
            registrar: rsip::Uri::try_from("sip:carrier.test").unwrap(),
            aor: "sip:acct@carrier.test".into(),
            contact_user: "acct".into(),
            expires,
            credentials,
        },
    );
    let (sent, events) = drain(ua);
    assert_eq!(events, vec![UaEvent::Registration { reg, state: RegistrationState::Registering }]);
    (reg, only_register(&sent))
}

/// The one REGISTER in `sent`.
fn only_register(sent: &[SipMessage]) -> rsip::Request {
    let [SipMessage::Request(request)] = sent else { panic!("expected one REGISTER: {sent:?}") };
    assert_eq!(request.method, Method::Register);
    request.clone()
}

/// The registrar's response to `request`, with `extra` header lines.
fn reply(request: &rsip::Request, status_line: &str, extra: &str) -> SipMessage {
    let vias: String =
        request.headers.iter().filter(|h| matches!(h, Header::Via(_))).map(|h| format!("{h}\r\n")).collect();
    let text = format!(
        "SIP/2.0 {status_line}\r\n{vias}{}\r\nTo: {};tag=reg1\r\n{}\r\n{}\r\n{extra}Content-Length: 0\r\n\r\n",
        request.from_header().unwrap(),
        request.to_header().unwrap().value(),
        request.call_id_header().unwrap(),
        request.cseq_header().unwrap(),
    );
    SipMessage::try_from(text.as_str()).unwrap()
}

fn cseq(request: &rsip::Request) -> u32 {
    request.cseq_header().unwrap().typed().unwrap().seq
}

fn call_id(request: &rsip::Request) -> String {
    request.call_id_header().unwrap().value().to_owned()
}

fn header(request: &rsip::Request, name: &str) -> Option<String> {
    request.headers.iter().find_map(|h| {
        let text = h.to_string();
        let (n, v) = text.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

/// Runs the clock from wherever it is to `to`, firing every timer on the way; returns the
/// REGISTERs sent after `last` (retransmissions left out) and the events.
fn advance(ua: &mut UserAgent, to: Instant, last: &rsip::Request) -> (Vec<rsip::Request>, Vec<UaEvent>) {
    let (mut sent, mut events) = (Vec::<rsip::Request>::new(), Vec::new());
    let mut collect = |ua: &mut UserAgent| {
        let (messages, new_events) = drain(ua);
        for message in messages {
            let SipMessage::Request(r) = message else { continue };
            assert_eq!(call_id(&r), call_id(last), "§10.2: one Call-ID per registration");
            let retransmission = cseq(&r) <= cseq(last) || sent.iter().any(|s| cseq(s) == cseq(&r));
            if !retransmission {
                sent.push(r);
            }
        }
        events.extend(new_events);
    };
    while let Some(at) = ua.poll_timeout().filter(|at| *at <= to) {
        ua.handle_timeout(at);
        collect(ua);
    }
    ua.handle_timeout(to);
    collect(ua);
    (sent, events)
}

fn failed(event: &UaEvent) -> (u16, String, Instant) {
    match event {
        UaEvent::Registration { state: RegistrationState::Failed { status, reason, retry_at }, .. } => {
            (*status, reason.clone(), *retry_at)
        }
        other => panic!("expected a failure: {other:?}"),
    }
}

/// A registration answered 200 at `now` with `Contact: …;expires=120`; returns it and the
/// REGISTER that was answered.
fn registered(ua: &mut UserAgent, now: Instant) -> (RegRef, rsip::Request) {
    let (reg, request) = register(ua, now, None, 3600);
    ua.handle_receive(now, carrier(), reply(&request, "200 OK", "Contact: <sip:acct@192.0.2.1:5060>;expires=120\r\n"));
    let (_, events) = drain(ua);
    assert!(matches!(events[..], [UaEvent::Registration { state: RegistrationState::Registered { .. }, .. }]));
    (reg, request)
}

#[test]
fn a_challenged_register_is_answered_registered_and_refreshed_halfway_with_the_same_call_id() {
    let mut ua = ua();
    let t0 = Instant::now();
    let mut registrar = digest_server("carrier.test", AuthKind::Www);
    let (reg, first) = register(&mut ua, t0, Some(DigestClient::new("acct", "s3cret")), 3600);

    // §10.2: Request-URI = the registrar's domain; To = From = the AOR, From with a tag.
    assert_eq!(first.uri.to_string(), "sip:carrier.test");
    assert_eq!(first.to_header().unwrap().uri().unwrap().to_string(), "sip:acct@carrier.test");
    assert_eq!(first.from_header().unwrap().uri().unwrap().to_string(), "sip:acct@carrier.test");
    assert!(first.from_header().unwrap().tag().unwrap().is_some());
    assert!(first.to_header().unwrap().tag().unwrap().is_none());
    assert_eq!(header(&first, "Contact").as_deref(), Some("<sip:acct@192.0.2.1:5060>;expires=3600"));
    assert_eq!(header(&first, "Expires").as_deref(), Some("3600"));
    assert_eq!(header(&first, "Max-Forwards").as_deref(), Some("70"));
    assert_eq!(header(&first, "User-Agent").as_deref(), Some("Patchbay/test"));
    assert!(header(&first, "Allow").is_some_and(|a| a.contains("INVITE")));
    assert_eq!(cseq(&first), 1);
    assert_eq!(ua.registration(reg), Some(&RegistrationState::Registering));

    // 401: answered at once with credentials the registrar accepts (§22.2).
    let challenge = check(&mut registrar, &first, AuthKind::Www).unwrap_err();
    ua.handle_receive(t0, carrier(), reply(&first, "401 Unauthorized", &challenge));
    let (sent, events) = drain(&mut ua);
    assert!(events.is_empty(), "a challenge is no change of state: {events:?}");
    let second = only_register(&sent);
    assert_eq!(cseq(&second), 2);
    assert_eq!(call_id(&second), call_id(&first));
    assert_eq!(second.from_header().unwrap().value(), first.from_header().unwrap().value());
    check(&mut registrar, &second, AuthKind::Www).expect("the registrar accepts our answer");

    // 200 listing another device's binding first: ours is the one with our Contact URI.
    let ok = "Contact: <sip:acct@203.0.113.9:5060>;expires=3600, <sip:acct@192.0.2.1:5060>;expires=120\r\n\
              Expires: 3600\r\n\
              Service-Route: <sip:orig@edge.carrier.test;lr>, <sip:core.carrier.test;lr>\r\n\
              Path: <sip:p1.carrier.test;lr>\r\n";
    ua.handle_receive(t0, carrier(), reply(&second, "200 OK", ok));
    let (sent, events) = drain(&mut ua);
    assert!(sent.is_empty(), "{sent:?}");
    let state = RegistrationState::Registered {
        expires: 120,
        refresh_at: t0 + secs(60),
        service_route: vec!["<sip:orig@edge.carrier.test;lr>".into(), "<sip:core.carrier.test;lr>".into()],
        path: vec!["<sip:p1.carrier.test;lr>".into()],
    };
    assert_eq!(events, vec![UaEvent::Registration { reg, state: state.clone() }]);
    assert_eq!(ua.registration(reg), Some(&state));
    assert_eq!(ua.registration_call_id(reg), Some(call_id(&first).as_str()));
    assert!(ua.poll_timeout().is_some_and(|at| at <= t0 + secs(60)));

    // Nothing before the refresh time; at 60 s (half of 120) the refresh goes out.
    let (sent, events) = advance(&mut ua, t0 + secs(59), &second);
    assert!(sent.is_empty() && events.is_empty(), "{sent:?} {events:?}");
    assert_eq!(ua.poll_timeout(), Some(t0 + secs(60)), "the refresh is the next deadline");
    let (sent, events) = advance(&mut ua, t0 + secs(60), &second);
    assert!(events.is_empty(), "a refresh keeps the state: {events:?}");
    let [refresh] = &sent[..] else { panic!("{sent:?}") };
    assert_eq!(cseq(refresh), 3, "§10.2: CSeq one higher for every REGISTER");
    assert_eq!(call_id(refresh), call_id(&first), "§10.2: the same Call-ID for refreshes");
    // §22.3: the refresh carries credentials up front, so the registrar need not challenge.
    check(&mut registrar, refresh, AuthKind::Www).expect("preemptive credentials on the refresh");

    // The refresh's 200 without Contact parameters: the Expires header decides, and the new
    // Service-Route replaces the old one (RFC 3608 §6).
    let t1 = t0 + secs(60);
    ua.handle_receive(
        t1,
        carrier(),
        reply(refresh, "200 OK", "Expires: 600\r\nService-Route: <sip:new.carrier.test;lr>\r\n"),
    );
    let (_, events) = drain(&mut ua);
    let state = RegistrationState::Registered {
        expires: 600,
        refresh_at: t1 + secs(300),
        service_route: vec!["<sip:new.carrier.test;lr>".into()],
        path: vec![],
    };
    assert_eq!(events, vec![UaEvent::Registration { reg, state }]);
}

#[test]
fn a_407_from_the_outbound_proxy_is_answered_with_proxy_authorization() {
    let mut ua = ua();
    let t0 = Instant::now();
    let mut proxy = digest_server("carrier.test", AuthKind::Proxy);
    let (reg, first) = register(&mut ua, t0, Some(DigestClient::new("acct", "s3cret")), 300);
    let challenge = check(&mut proxy, &first, AuthKind::Proxy).unwrap_err();
    ua.handle_receive(t0, carrier(), reply(&first, "407 Proxy Authentication Required", &challenge));
    let (sent, events) = drain(&mut ua);
    assert!(events.is_empty(), "{events:?}");
    let second = only_register(&sent);
    assert_eq!((cseq(&second), call_id(&second)), (2, call_id(&first)));
    assert!(second.headers.iter().all(|h| !matches!(h, Header::Authorization(_))));
    check(&mut proxy, &second, AuthKind::Proxy).expect("the proxy accepts our answer");

    // Neither a Contact parameter nor Expires: what we asked for holds.
    ua.handle_receive(t0, carrier(), reply(&second, "200 OK", ""));
    let (_, events) = drain(&mut ua);
    let [UaEvent::Registration { reg: r, state: RegistrationState::Registered { expires, refresh_at, .. } }] =
        &events[..]
    else {
        panic!("{events:?}")
    };
    assert_eq!((*r, *expires, *refresh_at), (reg, 300, t0 + secs(150)));
}

#[test]
fn a_second_challenge_after_our_answer_fails_the_registration_and_retries_slowly() {
    let mut ua = ua();
    let t0 = Instant::now();
    let mut registrar = digest_server("carrier.test", AuthKind::Www);
    let (reg, first) = register(&mut ua, t0, Some(DigestClient::new("acct", "wrong")), 3600);
    let challenge = check(&mut registrar, &first, AuthKind::Www).unwrap_err();
    ua.handle_receive(t0, carrier(), reply(&first, "401 Unauthorized", &challenge));
    let second = only_register(&drain(&mut ua).0);
    // The registrar refuses: a new challenge for the same realm, without stale=TRUE.
    let again: String = registrar.challenge(1_001).iter().map(|c| format!("WWW-Authenticate: {c}\r\n")).collect();
    ua.handle_receive(t0, carrier(), reply(&second, "401 Unauthorized", &again));
    let (sent, events) = drain(&mut ua);
    assert!(sent.is_empty(), "no third attempt: {sent:?}");
    let [event] = &events[..] else { panic!("{events:?}") };
    let (status, reason, retry_at) = failed(event);
    assert_eq!(status, 401);
    assert!(reason.contains("credentials rejected"), "{reason}");
    assert!(retry_at >= t0 + secs(3600), "a wrong password is not retried soon");
    assert!(matches!(ua.registration(reg), Some(RegistrationState::Failed { status: 401, .. })));
}

#[test]
fn a_challenge_without_credentials_fails() {
    let mut ua = ua();
    let t0 = Instant::now();
    let mut registrar = digest_server("carrier.test", AuthKind::Www);
    let (_, first) = register(&mut ua, t0, None, 3600);
    let challenge = check(&mut registrar, &first, AuthKind::Www).unwrap_err();
    ua.handle_receive(t0, carrier(), reply(&first, "401 Unauthorized", &challenge));
    let (sent, events) = drain(&mut ua);
    assert!(sent.is_empty(), "{sent:?}");
    let (status, reason, _) = failed(&events[0]);
    assert_eq!((status, reason.as_str()), (401, "Unauthorized (no credentials for the challenge)"));
}

#[test]
fn interval_too_brief_is_retried_at_once_with_min_expires() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (reg, first) = register(&mut ua, t0, None, 60);
    ua.handle_receive(t0, carrier(), reply(&first, "423 Interval Too Brief", "Min-Expires: 3600\r\n"));
    let (sent, events) = drain(&mut ua);
    assert!(events.is_empty(), "{events:?}");
    let second = only_register(&sent);
    assert_eq!(cseq(&second), 2);
    assert_eq!(header(&second, "Expires").as_deref(), Some("3600"), "§10.2.8: ask for Min-Expires");
    assert_eq!(header(&second, "Contact").as_deref(), Some("<sip:acct@192.0.2.1:5060>;expires=3600"));
    ua.handle_receive(t0, carrier(), reply(&second, "200 OK", "Contact: <sip:acct@192.0.2.1>;expires=3600\r\n"));
    let (_, events) = drain(&mut ua);
    assert!(
        matches!(
            &events[..],
            [UaEvent::Registration { state: RegistrationState::Registered { expires: 3600, .. }, .. }]
        ),
        "the Contact without port is ours (§19.1.4: 5060 by default): {events:?}"
    );
    // Refreshes keep asking for the registrar's minimum.
    let (sent, _) = advance(&mut ua, t0 + secs(1800), &second);
    let [refresh] = &sent[..] else { panic!("{sent:?}") };
    assert_eq!(header(refresh, "Expires").as_deref(), Some("3600"));
    assert!(matches!(ua.registration(reg), Some(RegistrationState::Registered { .. })));

    // A 423 that asks for no more than we did cannot be satisfied: a failure, not a loop.
    ua.handle_receive(t0 + secs(1800), carrier(), reply(refresh, "423 Interval Too Brief", "Min-Expires: 60\r\n"));
    let (sent, events) = drain(&mut ua);
    assert!(sent.is_empty(), "{sent:?}");
    assert_eq!(failed(&events[0]).0, 423);
}

#[test]
fn a_registrar_that_keeps_raising_min_expires_fails_the_registration() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (_, mut last) = register(&mut ua, t0, None, 60);
    // Three rounds are honoured; the fourth 423 in a row is a failure, not another REGISTER.
    for min in [120, 240, 480] {
        ua.handle_receive(t0, carrier(), reply(&last, "423 Interval Too Brief", &format!("Min-Expires: {min}\r\n")));
        let (sent, events) = drain(&mut ua);
        assert!(events.is_empty(), "{events:?}");
        last = only_register(&sent);
        assert_eq!(header(&last, "Expires"), Some(min.to_string()));
    }
    ua.handle_receive(t0, carrier(), reply(&last, "423 Interval Too Brief", "Min-Expires: 960\r\n"));
    let (sent, events) = drain(&mut ua);
    assert!(sent.is_empty(), "{sent:?}");
    assert_eq!(failed(&events[0]).0, 423);
}

#[test]
fn forbidden_fails_and_is_not_retried_for_an_hour() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (reg, first) = register(&mut ua, t0, None, 3600);
    ua.handle_receive(t0, carrier(), reply(&first, "403 Forbidden", ""));
    let (sent, events) = drain(&mut ua);
    assert!(sent.is_empty());
    let [event] = &events[..] else { panic!("{events:?}") };
    let (status, reason, retry_at) = failed(event);
    assert_eq!((status, reason.as_str()), (403, "Forbidden"));
    assert!(retry_at >= t0 + secs(3600) && retry_at <= t0 + secs(3600 * 12 / 10), "{:?}", retry_at - t0);
    let state = ua.registration(reg).unwrap();
    assert_eq!(state.to_string(), "failed: 403 Forbidden");
    let wait = (retry_at - t0).as_secs();
    assert_eq!(state.display_at(t0).to_string(), format!("failed: 403 Forbidden, next attempt in {wait} s"));

    let (sent, events) = advance(&mut ua, retry_at - Duration::from_millis(1), &first);
    assert!(sent.is_empty() && events.is_empty(), "nothing before retry_at: {sent:?} {events:?}");
    let (sent, events) = advance(&mut ua, retry_at, &first);
    assert_eq!(events, vec![UaEvent::Registration { reg, state: RegistrationState::Registering }]);
    let [retry] = &sent[..] else { panic!("{sent:?}") };
    assert_eq!((cseq(retry), call_id(retry)), (2, call_id(&first)));
}

#[test]
fn server_errors_back_off_exponentially_with_jitter_up_to_the_cap() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (_, mut request) = register(&mut ua, t0, None, 3600);
    let mut now = t0;
    let mut waits = Vec::new();
    for _ in 0..10 {
        ua.handle_receive(now, carrier(), reply(&request, "500 Server Internal Error", ""));
        let (_, events) = drain(&mut ua);
        let (status, reason, retry_at) = failed(&events[0]);
        assert_eq!((status, reason.as_str()), (500, "Server Internal Error"));
        waits.push(retry_at - now);
        let (sent, _) = advance(&mut ua, retry_at, &request);
        request = sent.last().cloned().expect("the retry");
        now = retry_at;
    }
    let base = [30u64, 60, 120, 240, 480, 960, 1800, 1800, 1800, 1800];
    for (wait, base) in waits.iter().zip(base) {
        let (low, high) = (secs(base) * 8 / 10, secs(base) * 12 / 10);
        assert!(*wait >= low && *wait <= high, "{wait:?} not within ±20 % of {base} s ({waits:?})");
    }
    assert!(waits[1] > waits[0], "the second wait is longer: {waits:?}");
    assert!(waits.iter().any(|w| w.as_secs() % 30 != 0), "jittered: {waits:?}");
}

#[test]
fn jitter_comes_from_the_seed() {
    let retry = |seed| {
        let mut ua = ua_with_seed(seed);
        let t0 = Instant::now();
        let (_, first) = register(&mut ua, t0, None, 3600);
        ua.handle_receive(t0, carrier(), reply(&first, "500 Server Internal Error", ""));
        failed(&drain(&mut ua).1[0]).2 - t0
    };
    assert_eq!(retry(1), retry(1), "deterministic for one seed");
    assert!((1..6).map(retry).collect::<std::collections::HashSet<_>>().len() > 1, "seeds spread retries");
}

#[test]
fn service_unavailable_with_retry_after_is_retried_when_the_registrar_said() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (_, first) = register(&mut ua, t0, None, 3600);
    ua.handle_receive(t0, carrier(), reply(&first, "503 Service Unavailable", "Retry-After: 120 (maintenance)\r\n"));
    let (_, events) = drain(&mut ua);
    let (status, reason, retry_at) = failed(&events[0]);
    assert_eq!((status, reason.as_str(), retry_at), (503, "Service Unavailable", t0 + secs(120)));
    assert!(advance(&mut ua, t0 + secs(119), &first).0.is_empty());
    assert_eq!(advance(&mut ua, t0 + secs(120), &first).0.len(), 1);
}

#[test]
fn an_unanswered_register_fails_as_408_and_is_retried_later() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (reg, first) = register(&mut ua, t0, None, 3600);
    // Timer F: 64·T1 = 32 s (§17.1.2.2), retransmitting meanwhile.
    let (sent, events) = advance(&mut ua, t0 + secs(31), &first);
    assert!(sent.is_empty() && events.is_empty(), "only retransmissions so far: {sent:?} {events:?}");
    let (sent, events) = advance(&mut ua, t0 + secs(33), &first);
    assert!(sent.is_empty(), "{sent:?}");
    let [event] = &events[..] else { panic!("{events:?}") };
    let (status, reason, retry_at) = failed(event);
    assert_eq!((status, reason.as_str()), (408, "Request Timeout"));
    assert!(retry_at >= t0 + secs(32) + secs(24), "back-off after the timeout: {:?}", retry_at - t0);
    let (sent, events) = advance(&mut ua, retry_at, &first);
    assert_eq!(events, vec![UaEvent::Registration { reg, state: RegistrationState::Registering }]);
    let [retry] = &sent[..] else { panic!("{sent:?}") };
    assert_eq!((cseq(retry), call_id(retry)), (2, call_id(&first)));
}

#[test]
fn unregister_removes_our_binding_with_expires_zero_and_ends_the_registration() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (reg, first) = registered(&mut ua, t0);
    let t1 = t0 + secs(10);
    ua.unregister(t1, reg).unwrap();
    let (sent, events) = drain(&mut ua);
    assert_eq!(events, vec![UaEvent::Registration { reg, state: RegistrationState::Unregistering }]);
    let removal = only_register(&sent);
    assert_eq!(header(&removal, "Expires").as_deref(), Some("0"));
    assert_eq!(header(&removal, "Contact").as_deref(), Some("<sip:acct@192.0.2.1:5060>;expires=0"));
    assert_eq!((cseq(&removal), call_id(&removal)), (2, call_id(&first)));
    ua.handle_receive(t1, carrier(), reply(&removal, "200 OK", ""));
    let (_, events) = drain(&mut ua);
    assert_eq!(events, vec![UaEvent::Registration { reg, state: RegistrationState::Unregistered }]);
    assert_eq!(ua.registration(reg), None);
    assert_eq!(ua.unregister(t1, reg), Err(UaError::UnknownRegistration(reg)));
    // The refresh that was due at 60 s is gone with it.
    let (sent, events) = advance(&mut ua, t0 + secs(300), &removal);
    assert!(sent.is_empty() && events.is_empty(), "{sent:?} {events:?}");
}

#[test]
fn unregister_waits_for_the_register_in_flight_and_an_unanswered_removal_still_ends() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (reg, first) = register(&mut ua, t0, None, 3600);
    ua.unregister(t0, reg).unwrap();
    let (sent, events) = drain(&mut ua);
    // §10.2: no second REGISTER while one is in flight.
    assert!(sent.is_empty(), "{sent:?}");
    assert_eq!(events, vec![UaEvent::Registration { reg, state: RegistrationState::Unregistering }]);
    ua.handle_receive(t0, carrier(), reply(&first, "200 OK", "Contact: <sip:acct@192.0.2.1:5060>;expires=3600\r\n"));
    let (sent, events) = drain(&mut ua);
    assert!(events.is_empty(), "{events:?}");
    let removal = only_register(&sent);
    assert_eq!((header(&removal, "Expires").as_deref(), cseq(&removal)), (Some("0"), 2));
    let (_, events) = advance(&mut ua, t0 + secs(40), &removal);
    assert_eq!(events, vec![UaEvent::Registration { reg, state: RegistrationState::Unregistered }]);
    assert_eq!(ua.registration(reg), None);
}

#[test]
fn registration_states_read_well_in_logs() {
    let t0 = Instant::now();
    let registered =
        RegistrationState::Registered { expires: 120, refresh_at: t0 + secs(60), service_route: vec![], path: vec![] };
    assert_eq!(registered.to_string(), "registered");
    assert_eq!(registered.display_at(t0).to_string(), "registered for 120 s, refresh in 60 s");
    let failed =
        RegistrationState::Failed { status: 503, reason: "Service Unavailable".into(), retry_at: t0 + secs(90) };
    assert_eq!(failed.display_at(t0 + secs(30)).to_string(), "failed: 503 Service Unavailable, next attempt in 60 s");
    assert_eq!(RegistrationState::Registering.display_at(t0).to_string(), "registering");
    assert_eq!(RegistrationState::Unregistered.to_string(), "unregistered");
}

#[test]
fn over_tls_the_binding_names_our_tls_listener_with_a_sips_contact() {
    let mut ua = ua();
    ua.set_listener(Transport::Tls, "192.0.2.1:5061".into());
    let now = Instant::now();
    ua.register(
        now,
        Register {
            peer: Peer { transport: Transport::Tls, addr: "198.51.100.20:5061".parse().unwrap() },
            registrar: rsip::Uri::try_from("sips:carrier.test").unwrap(),
            aor: "sips:acct@carrier.test".into(),
            contact_user: "acct".into(),
            expires: 600,
            credentials: None,
        },
    );
    let (sent, _) = drain(&mut ua);
    let first = only_register(&sent);
    // §8.1.1.8: a sips: Contact over TLS, at the TLS listener; §18.1.1: Via says TLS there.
    assert_eq!(header(&first, "Contact").as_deref(), Some("<sips:acct@192.0.2.1:5061>;expires=600"));
    let via = header(&first, "Via").unwrap_or_default();
    assert!(via.starts_with("SIP/2.0/TLS 192.0.2.1:5061;"), "{via}");
    // Other transports keep the default address.
    let (_, udp) = register(&mut ua, now, None, 60);
    assert_eq!(header(&udp, "Contact").as_deref(), Some("<sip:acct@192.0.2.1:5060>;expires=60"));
}
