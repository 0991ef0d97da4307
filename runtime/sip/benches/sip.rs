//! SIP signalling benchmarks. Reproduce with:
//!
//! ```sh
//! cargo bench -p patchbay-sip --bench sip
//! ```
//!
//! Every benchmark reports `Throughput::Elements(1)`, so criterion's `thrpt` line is the
//! per-second figure on one core (the benches are single-threaded).
//!
//! - `parse/{invite_sdp,ok_200,bye}`: [`parse_datagram`] (framing, normalisation, strict
//!   validation, then rsip) on a realistic INVITE with an SDP offer, the 200 OK answering it,
//!   and a small BYE (target ≥ 200k parses/s/core on the INVITE); `parse_rsip_only/*` is
//!   rsip's own parser on the same bytes, for contrast;
//! - `serialize/*`: the parsed `rsip::SipMessage` back to bytes with `to_string()`, which is
//!   what the `patchbay` binary does for every datagram it sends; `serialize_into_buf/*` writes
//!   into a reused buffer instead, to show what the per-message allocation costs;
//! - `parse+serialize/*`: both, as a proxy relaying the message would;
//! - `transaction/server INVITE+BYE call`: a [`TransactionLayer`] running the server side of one
//!   call — INVITE in (100 Trying out, request to the TU), 200 sent, ACK in, BYE in, its 200
//!   sent — then the virtual clock jumps past Timer L and J so both transactions end inside the
//!   same iteration; the layer is empty again after every call;
//! - `ua/inbound call`: the [`UserAgent`] doing a whole inbound call — INVITE → IncomingCall →
//!   `answer` with a fixed SDP → ACK (Confirmed) → BYE (200, Ended) — with the ACK and BYE
//!   carrying the To tag taken from the 200, and the clock advanced so the call's transactions
//!   end as well.
//!
//! Messages fed to the transaction layer and the user agent are pre-parsed and cloned in the
//! untimed setup of `iter_batched`, so those two figures exclude parsing and serialising.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput};
use patchbay_sip::message::{Limits, Parsed, parse_datagram};
use patchbay_sip::transaction::{Event, Output, Peer, TimerConfig, TransactionId, TransactionLayer, Transport};
use patchbay_sip::ua::{UaConfig, UaEvent, UaOutput, UserAgent};
use rsip::{Header, SipMessage};

const SDP_OFFER: &str = "v=0\r\n\
o=alice 2890844526 2890844526 IN IP4 192.0.2.10\r\n\
s=-\r\n\
c=IN IP4 192.0.2.10\r\n\
t=0 0\r\n\
m=audio 49170 RTP/AVP 0 8 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-16\r\n\
a=ptime:20\r\n\
a=sendrecv\r\n";

const SDP_ANSWER: &str = "v=0\r\n\
o=patchbay 1 1 IN IP4 127.0.0.1\r\n\
s=patchbay\r\n\
c=IN IP4 127.0.0.1\r\n\
t=0 0\r\n\
m=audio 40000 RTP/AVP 0 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-16\r\n\
a=ptime:20\r\n\
a=sendrecv\r\n";

const CALL_ID: &str = "a84b4c76e66710f3a9c2@pc33.example.com";
const FROM: &str = "\"Alice Example\" <sip:alice@example.com>;tag=1928301774";
const TO: &str = "<sip:echo@127.0.0.1:5060>";
const TO_TAGGED: &str = "<sip:echo@127.0.0.1:5060>;tag=a6c85cf";

fn invite() -> String {
    format!(
        "INVITE sip:echo@127.0.0.1:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK2d4790.1\r\n\
         Via: SIP/2.0/UDP 192.0.2.10:5070;branch=z9hG4bK776asdhds;received=192.0.2.10;rport=5070\r\n\
         Max-Forwards: 69\r\n\
         From: {FROM}\r\n\
         To: {TO}\r\n\
         Call-ID: {CALL_ID}\r\n\
         CSeq: 314159 INVITE\r\n\
         Contact: <sip:alice@192.0.2.10:5070;transport=udp>\r\n\
         Record-Route: <sip:proxy.example.com;lr>\r\n\
         User-Agent: Example Softphone 4.2.1 (Linux)\r\n\
         Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, REFER, NOTIFY, UPDATE\r\n\
         Supported: replaces, timer, norefersub\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{SDP_OFFER}",
        SDP_OFFER.len()
    )
}

fn ok_200() -> String {
    format!(
        "SIP/2.0 200 OK\r\n\
         Via: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK2d4790.1\r\n\
         Via: SIP/2.0/UDP 192.0.2.10:5070;branch=z9hG4bK776asdhds;received=192.0.2.10;rport=5070\r\n\
         Record-Route: <sip:proxy.example.com;lr>\r\n\
         From: {FROM}\r\n\
         To: {TO_TAGGED}\r\n\
         Call-ID: {CALL_ID}\r\n\
         CSeq: 314159 INVITE\r\n\
         Contact: <sip:127.0.0.1:5060>\r\n\
         Server: Patchbay/0.1.0\r\n\
         Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{SDP_ANSWER}",
        SDP_ANSWER.len()
    )
}

fn ack(to: &str) -> String {
    format!(
        "ACK sip:127.0.0.1:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK2d4790.2\r\n\
         Via: SIP/2.0/UDP 192.0.2.10:5070;branch=z9hG4bK5d8a1f02;received=192.0.2.10;rport=5070\r\n\
         Max-Forwards: 69\r\n\
         From: {FROM}\r\n\
         To: {to}\r\n\
         Call-ID: {CALL_ID}\r\n\
         CSeq: 314159 ACK\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn bye(to: &str) -> String {
    format!(
        "BYE sip:127.0.0.1:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK2d4790.3\r\n\
         Via: SIP/2.0/UDP 192.0.2.10:5070;branch=z9hG4bK9e3c7b44;received=192.0.2.10;rport=5070\r\n\
         Max-Forwards: 69\r\n\
         From: {FROM}\r\n\
         To: {to}\r\n\
         Call-ID: {CALL_ID}\r\n\
         CSeq: 314160 BYE\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn bye_200() -> String {
    format!(
        "SIP/2.0 200 OK\r\n\
         Via: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK2d4790.3\r\n\
         Via: SIP/2.0/UDP 192.0.2.10:5070;branch=z9hG4bK9e3c7b44;received=192.0.2.10;rport=5070\r\n\
         From: {FROM}\r\n\
         To: {TO_TAGGED}\r\n\
         Call-ID: {CALL_ID}\r\n\
         CSeq: 314160 BYE\r\n\
         Server: Patchbay/0.1.0\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn parse(text: &str) -> SipMessage {
    match parse_datagram(text.as_bytes(), &Limits::default()).expect("benchmark message parses") {
        Parsed::Sip(message) => message,
        other => panic!("expected a SIP message, got {other:?}"),
    }
}

fn request(text: &str) -> rsip::Request {
    match parse(text) {
        SipMessage::Request(request) => request,
        SipMessage::Response(_) => panic!("expected a request"),
    }
}

fn response(text: &str) -> rsip::Response {
    match parse(text) {
        SipMessage::Response(response) => response,
        SipMessage::Request(_) => panic!("expected a response"),
    }
}

fn peer() -> Peer {
    Peer { transport: Transport::Udp, addr: "203.0.113.5:5060".parse().expect("address") }
}

/// Past Timer L (INVITE server, 64·T1) and Timer J (non-INVITE server, 64·T1 over UDP) with the
/// default T1 of 500 ms, so a call's transactions end within its own iteration.
const PAST_TIMERS: Duration = Duration::from_secs(33);

fn bench_messages(c: &mut Criterion) {
    let messages = [("invite_sdp", invite()), ("ok_200", ok_200()), ("bye", bye(TO_TAGGED))];
    for (name, text) in &messages {
        println!("message {name}: {} bytes", text.len());
    }
    let limits = Limits::default();

    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(1));
    for (name, text) in &messages {
        let bytes = text.as_bytes();
        group.bench_function(*name, |b| b.iter(|| parse_datagram(black_box(bytes), &limits)));
    }
    group.finish();

    // rsip's own parser on the same bytes, without our framing and RFC 4475 validation: the
    // contrast says how much of a parse is ours.
    let mut group = c.benchmark_group("parse_rsip_only");
    group.throughput(Throughput::Elements(1));
    for (name, text) in &messages {
        let bytes = text.as_bytes();
        group.bench_function(*name, |b| b.iter(|| SipMessage::try_from(black_box(bytes))));
    }
    group.finish();

    let mut group = c.benchmark_group("serialize");
    group.throughput(Throughput::Elements(1));
    for (name, text) in &messages {
        let message = parse(text);
        group.bench_function(*name, |b| b.iter(|| black_box(&message).to_string()));
    }
    group.finish();

    let mut group = c.benchmark_group("serialize_into_buf");
    group.throughput(Throughput::Elements(1));
    for (name, text) in &messages {
        let message = parse(text);
        let mut buf = String::with_capacity(2048);
        group.bench_function(*name, |b| {
            b.iter(|| {
                buf.clear();
                write!(buf, "{}", black_box(&message)).expect("write to a String");
                buf.len()
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("parse+serialize");
    group.throughput(Throughput::Elements(1));
    for (name, text) in &messages {
        let bytes = text.as_bytes();
        group.bench_function(*name, |b| {
            b.iter(|| match parse_datagram(black_box(bytes), &limits) {
                Ok(Parsed::Sip(message)) => message.to_string().into_bytes(),
                _ => Vec::new(),
            })
        });
    }
    group.finish();
}

/// The server side of one call through the transaction layer; returns (transmits, events).
fn transaction_call(
    layer: &mut TransactionLayer,
    now: &mut Instant,
    (invite, ok, ack, bye, bye_ok): (rsip::Request, rsip::Response, rsip::Request, rsip::Request, rsip::Response),
) -> (usize, usize) {
    let (mut transmits, mut events) = (0, 0);
    let mut drain = |layer: &mut TransactionLayer| {
        let mut request_id: Option<TransactionId> = None;
        while let Some(output) = layer.poll_output() {
            match output {
                Output::Transmit { message, .. } => {
                    black_box(message);
                    transmits += 1;
                }
                Output::Event(event) => {
                    if let Event::Request { id, .. } = event {
                        request_id = Some(id);
                    }
                    events += 1;
                }
            }
        }
        request_id
    };
    let peer = peer();
    layer.handle_receive(*now, peer, invite.into());
    let invite_tx = drain(layer).expect("the INVITE reaches the TU");
    layer.send_response(*now, invite_tx, ok).expect("200 for the INVITE");
    drain(layer);
    layer.handle_receive(*now, peer, ack.into());
    drain(layer);
    layer.handle_receive(*now, peer, bye.into());
    let bye_tx = drain(layer).expect("the BYE reaches the TU");
    layer.send_response(*now, bye_tx, bye_ok).expect("200 for the BYE");
    drain(layer);
    *now += PAST_TIMERS;
    layer.handle_timeout(*now);
    drain(layer);
    (transmits, events)
}

fn bench_transactions(c: &mut Criterion) {
    let messages = (
        request(&invite()),
        response(&ok_200()),
        request(&ack(TO_TAGGED)),
        request(&bye(TO_TAGGED)),
        response(&bye_200()),
    );
    let mut layer = TransactionLayer::new(TimerConfig::default());
    let mut now = Instant::now();
    // 100 + 200 + 200 out; Request (INVITE), Ack, Request (BYE), Terminated ×2 up.
    assert_eq!(transaction_call(&mut layer, &mut now, messages.clone()), (3, 5));
    assert!(layer.is_empty(), "every transaction ends within its call");

    let mut group = c.benchmark_group("transaction");
    group.throughput(Throughput::Elements(1));
    group.bench_function("server INVITE+BYE call", |b| {
        b.iter_batched(
            || messages.clone(),
            |messages| transaction_call(&mut layer, &mut now, messages),
            BatchSize::SmallInput,
        )
    });
    group.finish();
    assert!(layer.is_empty(), "no transaction leaked across iterations");
}

/// One inbound call through the user agent; returns (transmits, events).
fn ua_call(
    ua: &mut UserAgent,
    now: &mut Instant,
    (invite, mut ack, mut bye): (rsip::Request, rsip::Request, rsip::Request),
    answer_sdp: &[u8],
) -> (usize, usize) {
    let peer = peer();
    let (mut transmits, mut events) = (0, 0);
    ua.handle_receive(*now, peer, invite.into());
    let mut call = None;
    while let Some(output) = ua.poll_output() {
        match output {
            UaOutput::Transmit { message, .. } => {
                black_box(message);
                transmits += 1;
            }
            UaOutput::Event(event) => {
                if let UaEvent::IncomingCall { call: c, .. } = event {
                    call = Some(c);
                }
                events += 1;
            }
        }
    }
    let call = call.expect("the INVITE becomes a call");
    ua.answer(*now, call, answer_sdp.to_vec()).expect("answer");
    // The caller takes our To (with its tag) from the 200 into its ACK and BYE.
    let mut to = None;
    while let Some(output) = ua.poll_output() {
        match output {
            UaOutput::Transmit { message: SipMessage::Response(ok), .. } => {
                to = ok.headers.iter().find(|h| matches!(h, Header::To(_))).cloned();
                black_box(ok);
                transmits += 1;
            }
            UaOutput::Transmit { message, .. } => {
                black_box(message);
                transmits += 1;
            }
            UaOutput::Event(_) => events += 1,
        }
    }
    let to = to.expect("a 200 with a To header");
    for request in [&mut ack, &mut bye] {
        request.headers.retain(|h| !matches!(h, Header::To(_)));
        request.headers.push(to.clone());
    }
    ua.handle_receive(*now, peer, ack.into());
    ua.handle_receive(*now, peer, bye.into());
    *now += PAST_TIMERS;
    ua.handle_timeout(*now);
    while let Some(output) = ua.poll_output() {
        match output {
            UaOutput::Transmit { message, .. } => {
                black_box(message);
                transmits += 1;
            }
            UaOutput::Event(_) => events += 1,
        }
    }
    (transmits, events)
}

fn bench_user_agent(c: &mut Criterion) {
    // The ACK and BYE templates get the real To (with the UA's tag) per call.
    let messages = (request(&invite()), request(&ack(TO)), request(&bye(TO)));
    let answer_sdp = SDP_ANSWER.as_bytes();
    let mut ua = UserAgent::new(UaConfig {
        contact_host: "127.0.0.1:5060".into(),
        user_agent: "Patchbay/bench".into(),
        timers: TimerConfig::default(),
        rng_key: patchbay_sip::ua::RngKey::fixed(0x5eed),
    });
    let mut now = Instant::now();
    // 100, 200 (INVITE), 200 (BYE) out; IncomingCall, Confirmed, Ended up.
    assert_eq!(ua_call(&mut ua, &mut now, messages.clone(), answer_sdp), (3, 3));
    assert_eq!(ua.calls(), 0);

    let mut group = c.benchmark_group("ua");
    group.throughput(Throughput::Elements(1));
    group.bench_function("inbound call", |b| {
        b.iter_batched(
            || messages.clone(),
            |messages| ua_call(&mut ua, &mut now, messages, answer_sdp),
            BatchSize::SmallInput,
        )
    });
    group.finish();
    assert_eq!(ua.calls(), 0, "no call leaked across iterations");
    assert!(ua.poll_timeout().is_none(), "no timer left running");
}

fn main() {
    println!("reproduce: cargo bench -p patchbay-sip --bench sip");
    let mut c = Criterion::default().configure_from_args();
    bench_messages(&mut c);
    bench_transactions(&mut c);
    bench_user_agent(&mut c);
    c.final_summary();
}
