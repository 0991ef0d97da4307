//! Every transaction timer on a virtual clock: a 64·T1 timeout is a test that takes
//! microseconds.

use std::time::{Duration, Instant};

use rsip::headers::ToTypedHeader;
use rsip::prelude::HeadersExt;
use rsip::{Method, SipMessage};

use super::*;

fn udp() -> Peer {
    Peer { transport: Transport::Udp, addr: "192.0.2.10:5060".parse().unwrap() }
}

fn tcp() -> Peer {
    Peer { transport: Transport::Tcp, addr: "192.0.2.10:5060".parse().unwrap() }
}

fn request(method: &str, branch: &str, cseq: u32) -> rsip::Request {
    let text = format!(
        "{method} sip:bob@example.com SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.1:5060;branch={branch}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@example.com>;tag=a1\r\n\
         To: <sip:bob@example.com>\r\n\
         Call-ID: call-1@192.0.2.1\r\n\
         CSeq: {cseq} {method}\r\n\
         Route: <sip:proxy.example.com;lr>\r\n\
         Content-Length: 0\r\n\r\n"
    );
    rsip::Request::try_from(text.as_str()).unwrap()
}

fn response_to(request: &rsip::Request, code: u16) -> rsip::Response {
    let reason = match code {
        100 => "Trying",
        180 => "Ringing",
        200 => "OK",
        486 => "Busy Here",
        _ => "Whatever",
    };
    let cseq = request.cseq_header().unwrap().clone();
    let text = format!(
        "SIP/2.0 {code} {reason}\r\n\
         Via: SIP/2.0/UDP 192.0.2.1:5060;branch={branch}\r\n\
         From: <sip:alice@example.com>;tag=a1\r\n\
         To: <sip:bob@example.com>;tag=b2\r\n\
         Call-ID: call-1@192.0.2.1\r\n\
         {cseq}\r\n\
         Content-Length: 0\r\n\r\n",
        branch = request.via_header().unwrap().typed().unwrap().branch().unwrap(),
    );
    rsip::Response::try_from(text.as_str()).unwrap()
}

fn drain(layer: &mut TransactionLayer) -> Vec<Output> {
    std::iter::from_fn(|| layer.poll_output()).collect()
}

fn transmits(outputs: &[Output]) -> Vec<SipMessage> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Transmit { message, .. } => Some(message.clone()),
            Output::Event(_) => None,
        })
        .collect()
}

fn events(outputs: &[Output]) -> Vec<Event> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Event(e) => Some(e.clone()),
            Output::Transmit { .. } => None,
        })
        .collect()
}

/// The id of the server transaction the last received request started.
fn request_id(layer: &mut TransactionLayer) -> TransactionId {
    match events(&drain(layer)).into_iter().next() {
        Some(Event::Request { id, .. }) => id,
        other => panic!("expected a new server transaction, got {other:?}"),
    }
}

/// Runs the layer's timers until `until`, returning when each transmit happened (relative to
/// `t0`) and every event.
fn run_until(layer: &mut TransactionLayer, t0: Instant, until: Duration) -> (Vec<Duration>, Vec<Event>) {
    let (mut sent, mut evs) = (Vec::new(), Vec::new());
    while let Some(at) = layer.poll_timeout() {
        if at > t0 + until {
            break;
        }
        layer.handle_timeout(at);
        let out = drain(layer);
        sent.extend(std::iter::repeat_n(at - t0, transmits(&out).len()));
        evs.extend(events(&out));
    }
    (sent, evs)
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn secs(v: u64) -> Duration {
    Duration::from_secs(v)
}

#[test]
fn timer_a_doubles_and_timer_b_times_out_an_unanswered_invite_over_udp() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let id = layer.send_request(t0, udp(), request("INVITE", "z9hG4bKa", 1)).unwrap();
    assert_eq!(transmits(&drain(&mut layer)).len(), 1);
    let (sent, evs) = run_until(&mut layer, t0, secs(40));
    // Timer A: T1, 2T1, 4T1 … (no cap) until Timer B at 64·T1 = 32 s.
    assert_eq!(sent, vec![ms(500), ms(1_500), ms(3_500), ms(7_500), ms(15_500), ms(31_500)]);
    assert_eq!(evs, vec![Event::Timeout { id }, Event::Terminated { id }]);
    assert!(layer.is_empty());
}

#[test]
fn invite_over_tcp_is_not_retransmitted_but_still_times_out() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let id = layer.send_request(t0, tcp(), request("INVITE", "z9hG4bKa", 1)).unwrap();
    drain(&mut layer);
    assert_eq!(layer.poll_timeout(), Some(t0 + secs(32)));
    let (sent, evs) = run_until(&mut layer, t0, secs(40));
    assert!(sent.is_empty());
    assert_eq!(evs, vec![Event::Timeout { id }, Event::Terminated { id }]);
}

#[test]
fn ringing_stops_timers_a_and_b_so_long_ringing_is_the_tus_call() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKa", 1);
    let id = layer.send_request(t0, udp(), invite.clone()).unwrap();
    drain(&mut layer);
    layer.handle_receive(t0 + ms(100), udp(), response_to(&invite, 180).into());
    let out = drain(&mut layer);
    assert!(matches!(&events(&out)[..], [Event::Response { id: got, .. }] if *got == id));
    let (sent, evs) = run_until(&mut layer, t0, secs(120));
    assert!(sent.is_empty() && evs.is_empty(), "{sent:?} {evs:?}");
    assert_eq!(layer.len(), 1);
}

#[test]
fn a_non_2xx_final_is_acked_by_the_transaction_and_timer_d_ends_it() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKa", 7);
    let id = layer.send_request(t0, udp(), invite.clone()).unwrap();
    drain(&mut layer);
    let busy = response_to(&invite, 486);
    layer.handle_receive(t0 + ms(50), udp(), busy.clone().into());
    let out = drain(&mut layer);
    let sent = transmits(&out);
    let [SipMessage::Request(ack)] = &sent[..] else { panic!("expected one ACK, got {sent:?}") };
    // §17.1.1.3: same Request-URI, branch, Call-ID, From and CSeq number; To from the response.
    assert_eq!(ack.method, Method::Ack);
    assert_eq!(ack.uri, invite.uri);
    assert_eq!(ack.via_header().unwrap(), invite.via_header().unwrap());
    assert_eq!(ack.to_header().unwrap(), busy.to_header().unwrap());
    assert_eq!(ack.cseq_header().unwrap().typed().unwrap(), rsip::typed::CSeq { seq: 7, method: Method::Ack });
    assert!(ack.headers.iter().any(|h| matches!(h, rsip::Header::Route(_))), "Route copied from the INVITE");
    assert!(matches!(&events(&out)[..], [Event::Response { .. }]));
    // A retransmitted 486 is ACKed again and not passed up.
    layer.handle_receive(t0 + ms(600), udp(), busy.into());
    let out = drain(&mut layer);
    assert_eq!(transmits(&out).len(), 1);
    assert!(events(&out).is_empty());
    // Timer D: 32 s over UDP.
    assert_eq!(layer.poll_timeout(), Some(t0 + ms(50) + secs(32)));
    let (_, evs) = run_until(&mut layer, t0, secs(40));
    assert_eq!(evs, vec![Event::Terminated { id }]);
}

#[test]
fn timer_d_is_zero_over_tcp() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKa", 1);
    let id = layer.send_request(t0, tcp(), invite.clone()).unwrap();
    layer.handle_receive(t0 + ms(50), tcp(), response_to(&invite, 486).into());
    drain(&mut layer);
    assert_eq!(layer.poll_timeout(), Some(t0 + ms(50)));
    let (_, evs) = run_until(&mut layer, t0, ms(50));
    assert_eq!(evs, vec![Event::Terminated { id }]);
}

#[test]
fn a_2xx_and_its_retransmissions_go_to_the_tu_until_timer_m() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKa", 1);
    let id = layer.send_request(t0, udp(), invite.clone()).unwrap();
    drain(&mut layer);
    let ok = response_to(&invite, 200);
    layer.handle_receive(t0 + ms(10), udp(), ok.clone().into());
    let out = drain(&mut layer);
    assert!(transmits(&out).is_empty(), "the TU, not the transaction, ACKs a 2xx");
    assert_eq!(events(&out).len(), 1);
    layer.handle_receive(t0 + ms(510), udp(), ok.into());
    assert_eq!(events(&drain(&mut layer)).len(), 1, "RFC 6026: 2xx retransmissions reach the TU");
    let (_, evs) = run_until(&mut layer, t0, secs(40));
    assert_eq!(evs, vec![Event::Terminated { id }]);
}

#[test]
fn timer_e_caps_at_t2_and_timer_f_times_out_a_non_invite() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let id = layer.send_request(t0, udp(), request("OPTIONS", "z9hG4bKo", 1)).unwrap();
    drain(&mut layer);
    let (sent, evs) = run_until(&mut layer, t0, secs(40));
    let expected: Vec<Duration> =
        [500, 1_500, 3_500, 7_500, 11_500, 15_500, 19_500, 23_500, 27_500, 31_500].into_iter().map(ms).collect();
    assert_eq!(sent, expected);
    assert_eq!(evs, vec![Event::Timeout { id }, Event::Terminated { id }]);
}

#[test]
fn timer_e_fires_every_t2_once_proceeding_and_timer_k_absorbs_the_final() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let options = request("OPTIONS", "z9hG4bKo", 1);
    let id = layer.send_request(t0, udp(), options.clone()).unwrap();
    drain(&mut layer);
    layer.handle_receive(t0 + ms(100), udp(), response_to(&options, 100).into());
    assert_eq!(events(&drain(&mut layer)).len(), 1);
    // Timer E was armed for 500 ms; after it fires in Proceeding the interval is T2.
    let (sent, _) = run_until(&mut layer, t0, ms(9_000));
    assert_eq!(sent, vec![ms(500), ms(4_500), ms(8_500)]);
    let ok = response_to(&options, 200);
    layer.handle_receive(t0 + ms(9_000), udp(), ok.clone().into());
    assert_eq!(events(&drain(&mut layer)).len(), 1);
    layer.handle_receive(t0 + ms(9_100), udp(), ok.into());
    assert!(drain(&mut layer).is_empty(), "a retransmitted final response is absorbed");
    // Timer K: T4 = 5 s.
    assert_eq!(layer.poll_timeout(), Some(t0 + ms(14_000)));
    let (sent, evs) = run_until(&mut layer, t0, secs(20));
    assert!(sent.is_empty());
    assert_eq!(evs, vec![Event::Terminated { id }]);
}

#[test]
fn invite_server_sends_100_at_once_and_answers_retransmissions_with_the_last_response() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKs", 1);
    layer.handle_receive(t0, udp(), invite.clone().into());
    let out = drain(&mut layer);
    let sent = transmits(&out);
    let [SipMessage::Response(trying)] = &sent[..] else { panic!("{sent:?}") };
    assert_eq!(trying.status_code, rsip::StatusCode::Trying);
    let [Event::Request { id, request, cancels: None, .. }] = &events(&out)[..] else { panic!("{out:?}") };
    assert_eq!(request, &invite);
    let id = *id;
    // A retransmitted INVITE is absorbed and answered with the 100.
    layer.handle_receive(t0 + ms(500), udp(), invite.clone().into());
    let out = drain(&mut layer);
    assert!(events(&out).is_empty());
    assert!(matches!(&transmits(&out)[..], [SipMessage::Response(r)] if r.status_code == rsip::StatusCode::Trying));
    layer.send_response(t0 + ms(600), id, response_to(&invite, 180)).unwrap();
    drain(&mut layer);
    layer.handle_receive(t0 + ms(1_500), udp(), invite.into());
    let out = drain(&mut layer);
    assert!(matches!(&transmits(&out)[..], [SipMessage::Response(r)] if r.status_code == rsip::StatusCode::Ringing));
}

#[test]
fn timer_g_retransmits_a_final_response_until_the_ack_and_timer_i_ends_it() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKs", 1);
    layer.handle_receive(t0, udp(), invite.clone().into());
    let id = request_id(&mut layer);
    layer.send_response(t0, id, response_to(&invite, 486)).unwrap();
    drain(&mut layer);
    let (sent, evs) = run_until(&mut layer, t0, ms(12_000));
    // Timer G: T1, doubling, capped at T2.
    assert_eq!(sent, vec![ms(500), ms(1_500), ms(3_500), ms(7_500), ms(11_500)]);
    assert!(evs.is_empty());
    // The ACK for a non-2xx carries the INVITE's branch and lands in this transaction.
    layer.handle_receive(t0 + ms(12_000), udp(), request("ACK", "z9hG4bKs", 1).into());
    assert!(drain(&mut layer).is_empty(), "the ACK is absorbed, not passed to the TU");
    // Timer I: T4 over UDP; no more retransmissions meanwhile.
    let (sent, evs) = run_until(&mut layer, t0, secs(30));
    assert!(sent.is_empty());
    assert_eq!(evs, vec![Event::Terminated { id }]);
}

#[test]
fn a_response_to_an_unverified_caller_is_sent_once_yet_answers_retransmissions() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKs", 1);
    layer.handle_receive(t0, udp(), invite.clone().into());
    let id = request_id(&mut layer);
    layer.send_response_once(t0, id, response_to(&invite, 407)).unwrap();
    let out = drain(&mut layer);
    assert_eq!(transmits(&out).len(), 1, "the 407 goes out");
    // Nothing is held for a source that never ACKs, and nothing is sent to it again.
    assert_eq!(events(&out), vec![Event::Terminated { id }]);
    assert!(layer.is_empty(), "no transaction kept");
    let (sent, _) = run_until(&mut layer, t0, secs(40));
    assert!(sent.is_empty(), "retransmitted at {sent:?}");
    // A real caller that lost the 407 retransmits its INVITE: the TU sees it anew and answers.
    layer.handle_receive(t0 + ms(500), udp(), invite.into());
    let again = request_id(&mut layer);
    assert_ne!(again, id);
}

#[test]
fn timer_h_reports_a_final_response_that_was_never_acked() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKs", 1);
    layer.handle_receive(t0, tcp(), invite.clone().into());
    let id = request_id(&mut layer);
    layer.send_response(t0, id, response_to(&invite, 486)).unwrap();
    drain(&mut layer);
    let (sent, evs) = run_until(&mut layer, t0, secs(40));
    assert!(sent.is_empty(), "no Timer G over TCP");
    assert_eq!(evs, vec![Event::AckTimeout { id }, Event::Terminated { id }]);
}

#[test]
fn a_2xx_is_retransmitted_until_its_ack_which_goes_to_the_tu() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKs", 5);
    layer.handle_receive(t0, udp(), invite.clone().into());
    let id = request_id(&mut layer);
    layer.send_response(t0, id, response_to(&invite, 200)).unwrap();
    assert_eq!(transmits(&drain(&mut layer)).len(), 1);
    let (sent, _) = run_until(&mut layer, t0, ms(2_000));
    assert_eq!(sent, vec![ms(500), ms(1_500)]);
    // The ACK for a 2xx is a new transaction (new branch) with the INVITE's CSeq number.
    let ack = request("ACK", "z9hG4bKnew", 5);
    layer.handle_receive(t0 + ms(2_000), udp(), ack.clone().into());
    let out = drain(&mut layer);
    assert_eq!(events(&out), vec![Event::Ack { peer: udp(), request: ack }]);
    // No more 2xx retransmissions; Timer L ends the transaction without an ACK timeout.
    let (sent, evs) = run_until(&mut layer, t0, secs(40));
    assert!(sent.is_empty(), "{sent:?}");
    assert_eq!(evs, vec![Event::Terminated { id }]);
}

#[test]
fn a_2xx_never_acked_is_reported_after_64_t1() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKs", 5);
    layer.handle_receive(t0, udp(), invite.clone().into());
    let id = request_id(&mut layer);
    layer.send_response(t0, id, response_to(&invite, 200)).unwrap();
    drain(&mut layer);
    let (sent, evs) = run_until(&mut layer, t0, secs(40));
    assert_eq!(sent.first(), Some(&ms(500)));
    assert!(sent.windows(2).all(|w| w[1] - w[0] <= secs(4)), "capped at T2: {sent:?}");
    assert_eq!(evs, vec![Event::AckTimeout { id }, Event::Terminated { id }]);
}

#[test]
fn non_invite_server_absorbs_retransmissions_and_timer_j_ends_it() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let options = request("OPTIONS", "z9hG4bKq", 1);
    layer.handle_receive(t0, udp(), options.clone().into());
    let out = drain(&mut layer);
    assert!(transmits(&out).is_empty(), "no 100 for non-INVITE");
    let Some(Event::Request { id, .. }) = events(&out).into_iter().next() else { panic!() };
    layer.handle_receive(t0 + ms(500), udp(), options.clone().into());
    assert!(drain(&mut layer).is_empty(), "absorbed in Trying");
    layer.send_response(t0 + ms(600), id, response_to(&options, 200)).unwrap();
    assert_eq!(transmits(&drain(&mut layer)).len(), 1);
    layer.handle_receive(t0 + ms(1_000), udp(), options.into());
    assert_eq!(transmits(&drain(&mut layer)).len(), 1, "answered with the last response");
    assert_eq!(layer.poll_timeout(), Some(t0 + ms(600) + secs(32)));
    let (_, evs) = run_until(&mut layer, t0, secs(40));
    assert_eq!(evs, vec![Event::Terminated { id }]);
    assert!(matches!(
        layer.send_response(t0, id, response_to(&request("OPTIONS", "z9hG4bKq", 1), 200)),
        Err(TransactionError::UnknownTransaction(_))
    ));
}

#[test]
fn timer_j_is_zero_over_tcp() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let options = request("OPTIONS", "z9hG4bKq", 1);
    layer.handle_receive(t0, tcp(), options.clone().into());
    let id = request_id(&mut layer);
    layer.send_response(t0, id, response_to(&options, 200)).unwrap();
    drain(&mut layer);
    assert_eq!(layer.poll_timeout(), Some(t0));
}

#[test]
fn a_cancel_finds_the_invite_it_cancels() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    layer.handle_receive(t0, udp(), request("INVITE", "z9hG4bKc", 1).into());
    let invite_id = request_id(&mut layer);
    layer.handle_receive(t0 + ms(10), udp(), request("CANCEL", "z9hG4bKc", 1).into());
    let evs = events(&drain(&mut layer));
    let [Event::Request { id, cancels, .. }] = &evs[..] else { panic!("{evs:?}") };
    assert_ne!(*id, invite_id, "the CANCEL is its own transaction");
    assert_eq!(*cancels, Some(invite_id));
    layer.handle_receive(t0 + ms(20), udp(), request("CANCEL", "z9hG4bKother", 1).into());
    let evs = events(&drain(&mut layer));
    assert!(matches!(&evs[..], [Event::Request { cancels: None, .. }]), "{evs:?}");
}

#[test]
fn rfc_2543_requests_without_the_magic_cookie_still_match() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let invite = request("INVITE", "old-style-1", 1);
    layer.handle_receive(t0, udp(), invite.clone().into());
    assert_eq!(events(&drain(&mut layer)).len(), 1);
    layer.handle_receive(t0 + ms(500), udp(), invite.into());
    let out = drain(&mut layer);
    assert!(events(&out).is_empty(), "the retransmission matched by the RFC 2543 rules");
    assert_eq!(transmits(&out).len(), 1);
}

#[test]
fn responses_without_a_transaction_are_stray_and_acks_are_not_sent_in_one() {
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKz", 1);
    layer.handle_receive(t0, udp(), response_to(&invite, 200).into());
    assert!(matches!(&events(&drain(&mut layer))[..], [Event::StrayResponse { .. }]));
    assert_eq!(
        layer.send_request(t0, udp(), request("ACK", "z9hG4bKz", 1)),
        Err(TransactionError::AckNotTransactional)
    );
}

#[test]
fn t1_t2_t4_are_configurable() {
    let timers = TimerConfig { t1: ms(100), t2: ms(400), t4: ms(1_000) };
    let mut layer = TransactionLayer::new(timers);
    let t0 = Instant::now();
    let id = layer.send_request(t0, udp(), request("OPTIONS", "z9hG4bKo", 1)).unwrap();
    drain(&mut layer);
    let (sent, evs) = run_until(&mut layer, t0, secs(10));
    assert_eq!(&sent[..4], &[ms(100), ms(300), ms(700), ms(1_100)]);
    assert_eq!(evs, vec![Event::Timeout { id }, Event::Terminated { id }]);
    assert!(sent.last().is_some_and(|last| *last < ms(6_400)));
}

#[test]
fn a_response_from_where_the_request_did_not_go_is_dropped_and_counted() {
    // RFC 3261 §18.1.2 / §17.1.3: a forged 200 OK from another port, another address or over
    // another transport is not the callee's answer, whatever branch it carries.
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKforged", 1);
    let id = layer.send_request(t0, udp(), invite.clone()).unwrap();
    drain(&mut layer);
    let elsewhere = [
        Peer { transport: Transport::Udp, addr: "192.0.2.10:5070".parse().unwrap() },
        Peer { transport: Transport::Udp, addr: "198.51.100.7:5060".parse().unwrap() },
        tcp(),
    ];
    for (n, forger) in elsewhere.into_iter().enumerate() {
        layer.handle_receive(t0 + ms(10), forger, response_to(&invite, 200).into());
        let out = drain(&mut layer);
        assert!(matches!(&events(&out)[..], [Event::StrayResponse { .. }]), "{forger:?}: {out:?}");
        assert_eq!(layer.foreign_responses(), n as u64 + 1);
    }
    // The callee's own answer, from where the INVITE went (an IPv4-mapped form of it too).
    let mapped = Peer { transport: Transport::Udp, addr: "[::ffff:192.0.2.10]:5060".parse().unwrap() };
    layer.handle_receive(t0 + ms(20), mapped, response_to(&invite, 200).into());
    let out = drain(&mut layer);
    assert!(matches!(&events(&out)[..], [Event::Response { id: got, .. }] if *got == id), "{out:?}");
    assert_eq!(layer.foreign_responses(), 3);
}

#[test]
fn beyond_the_server_transaction_cap_requests_get_a_stateless_503() {
    // A flood of new requests (spoofed sources each under their rate limit) holds at most the
    // cap; the rest are answered 503 + Retry-After without a transaction (RFC 3261 §21.5.4).
    let mut layer = TransactionLayer::new(TimerConfig::default());
    layer.set_max_server_transactions(2);
    let t0 = Instant::now();
    let options = request("OPTIONS", "z9hG4bK1", 1);
    layer.handle_receive(t0, udp(), options.clone().into());
    let Some(Event::Request { id: options_id, .. }) = events(&drain(&mut layer)).into_iter().next() else {
        panic!("the OPTIONS reaches the TU")
    };
    layer.handle_receive(t0, udp(), request("INVITE", "z9hG4bK2", 2).into());
    drain(&mut layer);
    assert_eq!(layer.len(), 2);
    let third = request("INVITE", "z9hG4bK3", 3);
    layer.handle_receive(t0, udp(), third.clone().into());
    let out = drain(&mut layer);
    assert!(events(&out).is_empty(), "no transaction, nothing for the TU: {out:?}");
    let sent = transmits(&out);
    let [SipMessage::Response(busy)] = &sent[..] else { panic!("one response: {sent:?}") };
    assert_eq!(busy.status_code.code(), 503);
    let text = busy.to_string();
    assert!(text.contains("Retry-After: 5\r\n") && text.contains(";tag=overload"), "{text}");
    assert_eq!((layer.len(), layer.overloaded()), (2, 1));
    // A retransmission of a request already held is still its transaction's.
    layer.handle_receive(t0, udp(), request("INVITE", "z9hG4bK2", 2).into());
    assert_eq!(layer.overloaded(), 1);
    // Once transactions end (the OPTIONS answered, Timer J over), new requests are taken again.
    layer.send_response(t0, options_id, response_to(&options, 200)).expect("answered");
    let (_, _) = run_until(&mut layer, t0, secs(40));
    assert!(layer.len() < 2, "the OPTIONS transaction ended");
    layer.handle_receive(t0 + secs(40), udp(), third.into());
    assert!(matches!(&events(&drain(&mut layer))[..], [Event::Request { .. }]));
}
