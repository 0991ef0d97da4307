//! OPTIONS pings on a virtual clock: the request's shape, answers (challenges included), timer
//! E retransmissions, timer F, and that a finished ping leaves nothing behind.

use std::time::{Duration, Instant};

use rsip::headers::{ToTypedHeader, UntypedHeader};
use rsip::prelude::HeadersExt;
use rsip::{Method, SipMessage};

use super::super::tests::{drain, ua_with_seed};
use super::super::*;
use crate::transaction::{Peer, TimerConfig, Transport};

fn carrier(transport: Transport) -> Peer {
    Peer { transport, addr: "198.51.100.20:5060".parse().unwrap() }
}

fn ua() -> UserAgent {
    ua_with_seed(11)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Sends a ping to the carrier; returns it and its OPTIONS.
fn ping(ua: &mut UserAgent, now: Instant, transport: Transport) -> (PingRef, rsip::Request) {
    let ping = ua.ping(
        now,
        Ping {
            peer: carrier(transport),
            target: rsip::Uri::try_from("sip:carrier.test").unwrap(),
            from: "<sip:patchbay@carrier.test>".into(),
        },
    );
    let (sent, events) = drain(ua);
    assert_eq!(events, vec![]);
    let [SipMessage::Request(options)] = sent.as_slice() else { panic!("expected one OPTIONS: {sent:?}") };
    (ping, options.clone())
}

/// The carrier's response to `request`, with `extra` header lines.
fn reply(request: &rsip::Request, status_line: &str, extra: &str) -> SipMessage {
    let text = format!(
        "SIP/2.0 {status_line}\r\n{}\r\n{}\r\nTo: {};tag=carrier1\r\n{}\r\n{}\r\n{extra}Content-Length: 0\r\n\r\n",
        request.via_header().unwrap(),
        request.from_header().unwrap(),
        request.to_header().unwrap().value(),
        request.call_id_header().unwrap(),
        request.cseq_header().unwrap(),
    );
    SipMessage::try_from(text.as_str()).unwrap()
}

/// What happened while the clock ran: each message sent and each event, with when.
type Timeline = (Vec<(Instant, SipMessage)>, Vec<(Instant, UaEvent)>);

/// Runs the clock to `to`, firing every timer on the way.
fn advance(ua: &mut UserAgent, to: Instant) -> Timeline {
    let (mut sent, mut events) = (Vec::new(), Vec::new());
    while let Some(at) = ua.poll_timeout().filter(|at| *at <= to) {
        ua.handle_timeout(at);
        let (messages, new_events) = drain(ua);
        sent.extend(messages.into_iter().map(|m| (at, m)));
        events.extend(new_events.into_iter().map(|e| (at, e)));
    }
    (sent, events)
}

/// The user agent holds nothing for pings: no client transaction of its own, none in the
/// transaction layer, no timer.
fn assert_no_ping_state(ua: &mut UserAgent) {
    assert!(ua.client_txs.is_empty(), "client transactions left: {:?}", ua.client_txs);
    assert!(ua.layer.is_empty(), "transactions left in the layer");
    assert_eq!(ua.poll_timeout(), None);
}

fn header(request: &rsip::Request, name: &str) -> Option<String> {
    request.headers.iter().find_map(|h| {
        let text = h.to_string();
        let (n, v) = text.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

#[test]
fn a_ping_is_a_well_formed_out_of_dialog_options() {
    let mut ua = ua();
    let now = Instant::now();
    let (_, options) = ping(&mut ua, now, Transport::Udp);
    assert_eq!(options.method, Method::Options);
    assert_eq!(options.uri.to_string(), "sip:carrier.test");
    assert_eq!(header(&options, "Max-Forwards").as_deref(), Some("70"));
    let cseq = options.cseq_header().unwrap().typed().unwrap();
    assert_eq!((cseq.seq, cseq.method), (1, Method::Options));
    let from = options.from_header().unwrap();
    assert!(from.value().starts_with("<sip:patchbay@carrier.test>;tag="), "{from}");
    assert!(from.tag().unwrap().is_some_and(|t| !t.to_string().is_empty()));
    // §8.1.1.2: outside a dialog the To carries no tag.
    let to = options.to_header().unwrap();
    assert_eq!(to.value(), "<sip:carrier.test>");
    assert_eq!(to.tag().unwrap(), None);
    let via = options.via_header().unwrap().value().to_owned();
    assert!(via.starts_with("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK"), "{via}");
    assert_eq!(header(&options, "Contact").as_deref(), Some("<sip:192.0.2.1:5060>"));
    assert_eq!(header(&options, "Accept").as_deref(), Some("application/sdp"));
    assert_eq!(header(&options, "Allow").as_deref(), Some(ALLOW));
    assert_eq!(header(&options, "User-Agent").as_deref(), Some("Patchbay/test"));
    assert_eq!(header(&options, "Content-Length").as_deref(), Some("0"));
    assert!(options.body.is_empty());
    // It passes our own strict validator, as a well-formed request (RFC 4475) must.
    let text = SipMessage::Request(options.clone()).to_string();
    let parsed = crate::message::parse_datagram(text.as_bytes(), &crate::message::Limits::default());
    assert!(matches!(parsed, Ok(crate::message::Parsed::Sip(SipMessage::Request(_)))), "{text}: {parsed:?}");

    // Each ping is its own transaction: a fresh Call-ID, From tag and branch.
    let (_, second) = ping(&mut ua, now, Transport::Udp);
    assert_ne!(second.call_id_header().unwrap().value(), options.call_id_header().unwrap().value());
    assert_ne!(second.from_header().unwrap().tag().unwrap(), from.tag().unwrap());
    assert_ne!(second.via_header().unwrap().value(), via);
}

#[test]
fn a_200_answers_the_ping_and_leaves_no_state() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (id, options) = ping(&mut ua, t0, Transport::Udp);
    ua.handle_receive(t0 + ms(40), carrier(Transport::Udp), reply(&options, "200 OK", ""));
    let (sent, events) = drain(&mut ua);
    assert_eq!(sent, vec![]);
    assert_eq!(events, vec![UaEvent::PingAnswered { ping: id, status: Some(200) }]);
    assert!(ua.client_txs.is_empty());

    // A retransmitted 200 is absorbed by the transaction (§17.1.2.2, Completed).
    ua.handle_receive(t0 + ms(600), carrier(Transport::Udp), reply(&options, "200 OK", ""));
    assert_eq!(drain(&mut ua), (vec![], vec![]));

    // Timer K (T4 over UDP) ends the transaction; then nothing is left.
    let (sent, events) = advance(&mut ua, t0 + ms(40) + TimerConfig::default().t4);
    assert_eq!((sent, events), (vec![], vec![]));
    assert_no_ping_state(&mut ua);
}

#[test]
fn a_407_counts_as_an_answer_and_is_not_answered_with_credentials() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (id, options) = ping(&mut ua, t0, Transport::Udp);
    let challenge = "Proxy-Authenticate: Digest realm=\"carrier.test\", nonce=\"abc\", algorithm=MD5, qop=\"auth\"\r\n";
    ua.handle_receive(
        t0 + ms(40),
        carrier(Transport::Udp),
        reply(&options, "407 Proxy Authentication Required", challenge),
    );
    let (sent, events) = drain(&mut ua);
    assert_eq!(sent, vec![], "no second OPTIONS with credentials");
    assert_eq!(events, vec![UaEvent::PingAnswered { ping: id, status: Some(407) }]);

    // Nothing more is sent, not even once the timers have run.
    let (sent, events) = advance(&mut ua, t0 + TimerConfig::default().t1_x64() * 2);
    assert_eq!((sent, events), (vec![], vec![]));
    assert_no_ping_state(&mut ua);
}

#[test]
fn any_final_status_counts_as_an_answer() {
    for (status_line, code, extra) in [
        ("401 Unauthorized", 401, "WWW-Authenticate: Digest realm=\"carrier.test\", nonce=\"abc\"\r\n"),
        ("404 Not Found", 404, ""),
        ("405 Method Not Allowed", 405, "Allow: INVITE, ACK, BYE, CANCEL\r\n"),
        ("503 Service Unavailable", 503, ""),
    ] {
        let mut ua = ua();
        let t0 = Instant::now();
        let (id, options) = ping(&mut ua, t0, Transport::Udp);
        ua.handle_receive(t0 + ms(40), carrier(Transport::Udp), reply(&options, status_line, extra));
        let (sent, events) = drain(&mut ua);
        assert_eq!(sent, vec![], "{status_line}");
        assert_eq!(events, vec![UaEvent::PingAnswered { ping: id, status: Some(code) }], "{status_line}");
        advance(&mut ua, t0 + ms(40) + TimerConfig::default().t4);
        assert_no_ping_state(&mut ua);
    }
}

#[test]
fn an_unanswered_ping_is_retransmitted_per_timer_e_and_times_out_after_64_t1() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (id, options) = ping(&mut ua, t0, Transport::Udp);
    let timers = TimerConfig::default();
    let (sent, events) = advance(&mut ua, t0 + timers.t1_x64() * 2);

    // §17.1.2.2: timer E starts at T1 and doubles up to T2 (500 ms, 1, 2, 4, 4, … s).
    let expected: Vec<Duration> =
        [500, 1_500, 3_500, 7_500, 11_500, 15_500, 19_500, 23_500, 27_500, 31_500].into_iter().map(ms).collect();
    let at: Vec<Duration> = sent.iter().map(|(at, _)| at.duration_since(t0)).collect();
    assert_eq!(at, expected);
    for (_, message) in &sent {
        assert_eq!(message, &SipMessage::Request(options.clone()), "a retransmission is the same request");
    }
    // Timer F: 64·T1 after the OPTIONS, the ping ends unanswered.
    assert_eq!(events, vec![(t0 + timers.t1_x64(), UaEvent::PingAnswered { ping: id, status: None })]);
    assert_no_ping_state(&mut ua);

    // A final response after the timeout matches nothing and reports nothing.
    ua.handle_receive(t0 + timers.t1_x64() + ms(100), carrier(Transport::Udp), reply(&options, "200 OK", ""));
    assert_eq!(drain(&mut ua), (vec![], vec![]));
    assert_no_ping_state(&mut ua);
}

#[test]
fn a_provisional_response_does_not_answer_the_ping() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (id, options) = ping(&mut ua, t0, Transport::Udp);
    ua.handle_receive(t0 + ms(40), carrier(Transport::Udp), reply(&options, "100 Trying", ""));
    assert_eq!(drain(&mut ua), (vec![], vec![]));
    // §17.1.2.2: in Proceeding the request is retransmitted every T2.
    let (sent, events) = advance(&mut ua, t0 + ms(5_000));
    assert_eq!(sent.iter().map(|(at, _)| at.duration_since(t0)).collect::<Vec<_>>(), vec![ms(500), ms(4_500)]);
    assert_eq!(events, vec![]);
    ua.handle_receive(t0 + ms(5_000), carrier(Transport::Udp), reply(&options, "200 OK", ""));
    assert_eq!(drain(&mut ua).1, vec![UaEvent::PingAnswered { ping: id, status: Some(200) }]);
}

#[test]
fn over_tcp_a_ping_is_not_retransmitted_and_still_times_out_after_64_t1() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (id, options) = ping(&mut ua, t0, Transport::Tcp);
    assert!(options.via_header().unwrap().value().starts_with("SIP/2.0/TCP "));
    let timers = TimerConfig::default();
    let (sent, events) = advance(&mut ua, t0 + timers.t1_x64() * 2);
    assert_eq!(sent, vec![]);
    assert_eq!(events, vec![(t0 + timers.t1_x64(), UaEvent::PingAnswered { ping: id, status: None })]);
    assert_no_ping_state(&mut ua);
}

#[test]
fn pings_do_not_disturb_each_other() {
    let mut ua = ua();
    let t0 = Instant::now();
    let (first, first_options) = ping(&mut ua, t0, Transport::Udp);
    let (second, second_options) = ping(&mut ua, t0, Transport::Udp);
    assert_ne!(first, second);
    ua.handle_receive(t0 + ms(40), carrier(Transport::Udp), reply(&second_options, "200 OK", ""));
    assert_eq!(drain(&mut ua).1, vec![UaEvent::PingAnswered { ping: second, status: Some(200) }]);
    ua.handle_receive(t0 + ms(60), carrier(Transport::Udp), reply(&first_options, "403 Forbidden", ""));
    assert_eq!(drain(&mut ua).1, vec![UaEvent::PingAnswered { ping: first, status: Some(403) }]);
    advance(&mut ua, t0 + ms(60) + TimerConfig::default().t4);
    assert_no_ping_state(&mut ua);
}
