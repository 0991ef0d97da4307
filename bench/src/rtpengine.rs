//! The floor for relaying media: the same two-way G.711 load as a bridged Patchbay call, relayed
//! by rtpengine (userspace forwarding, `--table=-1`). Each call is set up with rtpengine's "ng"
//! control protocol (bencoded dictionaries over UDP, a cookie per request): `offer` with side
//! A's SDP, `answer` with side B's, `delete` at the end. Both sides are streams of the
//! generator's RTP engine, so the figures are measured exactly as for Patchbay.
//!
//! The ng protocol is small enough to write here (a dictionary of strings out, one string field
//! back); there is no maintained Rust client for it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patchbay_sip::sdp::{self, LocalMedia};
use tokio::net::UdpSocket;

use crate::LoadArgs;
use crate::calls::{RoundReport, fill_rtp, process_figures};
use crate::procstat::{self, ProcSample};
use crate::rtp::{RtpEngine, StreamSpec};
use crate::stats::MsSummary;

/// A bencode value as far as ng uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Bytes(Vec<u8>),
    Int(i64),
    List(Vec<Value>),
    Dict(BTreeMap<Vec<u8>, Value>),
}

fn encode(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Bytes(b) => {
            out.extend_from_slice(b.len().to_string().as_bytes());
            out.push(b':');
            out.extend_from_slice(b);
        }
        Value::Int(i) => out.extend_from_slice(format!("i{i}e").as_bytes()),
        Value::List(items) => {
            out.push(b'l');
            for item in items {
                encode(item, out);
            }
            out.push(b'e');
        }
        Value::Dict(entries) => {
            // Keys in sorted order (BTreeMap), as bencode requires.
            out.push(b'd');
            for (k, v) in entries {
                encode(&Value::Bytes(k.clone()), out);
                encode(v, out);
            }
            out.push(b'e');
        }
    }
}

fn decode(input: &[u8]) -> Option<(Value, &[u8])> {
    match *input.first()? {
        b'i' => {
            let end = input.iter().position(|b| *b == b'e')?;
            let n = std::str::from_utf8(&input[1..end]).ok()?.parse().ok()?;
            Some((Value::Int(n), &input[end + 1..]))
        }
        b'l' => {
            let mut rest = &input[1..];
            let mut items = Vec::new();
            while *rest.first()? != b'e' {
                let (item, r) = decode(rest)?;
                items.push(item);
                rest = r;
            }
            Some((Value::List(items), &rest[1..]))
        }
        b'd' => {
            let mut rest = &input[1..];
            let mut entries = BTreeMap::new();
            while *rest.first()? != b'e' {
                let (Value::Bytes(k), r) = decode(rest)? else { return None };
                let (v, r) = decode(r)?;
                entries.insert(k, v);
                rest = r;
            }
            Some((Value::Dict(entries), &rest[1..]))
        }
        b'0'..=b'9' => {
            let colon = input.iter().position(|b| *b == b':')?;
            let len: usize = std::str::from_utf8(&input[..colon]).ok()?.parse().ok()?;
            let body = input.get(colon + 1..colon + 1 + len)?;
            Some((Value::Bytes(body.to_vec()), &input[colon + 1 + len..]))
        }
        _ => None,
    }
}

fn dict(entries: &[(&str, &str)]) -> Value {
    Value::Dict(entries.iter().map(|(k, v)| (k.as_bytes().to_vec(), Value::Bytes(v.as_bytes().to_vec()))).collect())
}

/// An ng control connection.
struct Control {
    socket: UdpSocket,
    server: SocketAddr,
    cookie: u64,
}

impl Control {
    async fn new(server: SocketAddr) -> anyhow::Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").await.context("binding the ng socket")?;
        Ok(Self { socket, server, cookie: 0 })
    }

    /// Sends one command and returns the reply dictionary (retried three times, 1 s apart).
    async fn request(&mut self, command: &Value) -> anyhow::Result<BTreeMap<Vec<u8>, Value>> {
        self.cookie += 1;
        let cookie = format!("{}_{}", std::process::id(), self.cookie);
        let mut message = format!("{cookie} ").into_bytes();
        encode(command, &mut message);
        let mut buf = vec![0u8; 65_536];
        for _ in 0..3 {
            self.socket.send_to(&message, self.server).await.context("sending to rtpengine")?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            while let Ok(received) = tokio::time::timeout_at(deadline, self.socket.recv_from(&mut buf)).await {
                let (len, _) = received.context("receiving from rtpengine")?;
                let reply = &buf[..len];
                let Some(body) = reply.strip_prefix(format!("{cookie} ").as_bytes()) else { continue };
                let Some((Value::Dict(d), _)) = decode(body) else { bail!("rtpengine sent an unreadable reply") };
                match d.get(b"result".as_slice()) {
                    Some(Value::Bytes(r)) if r == b"ok" => return Ok(d),
                    _ => bail!("rtpengine refused: {:?}", d.get(b"error-reason".as_slice())),
                }
            }
        }
        bail!("rtpengine at {} did not answer", self.server)
    }

    async fn sdp(&mut self, command: &Value) -> anyhow::Result<String> {
        match self.request(command).await?.remove(b"sdp".as_slice()) {
            Some(Value::Bytes(sdp)) => Ok(String::from_utf8_lossy(&sdp).into_owned()),
            _ => bail!("rtpengine's reply has no SDP"),
        }
    }
}

/// Sets up one relayed call; returns side A's and side B's stream specs.
async fn relay_call(control: &mut Control, engine: &RtpEngine, n: usize) -> anyhow::Result<(StreamSpec, StreamSpec)> {
    let call_id = format!("loadgen-{}-{n}", std::process::id());
    let mut media = LocalMedia::new(engine.local_addr(), None, 1, 1);
    media.codecs = vec![sdp::AudioCodec::Pcmu];
    // RTP only on the generator's socket (as in `calls`).
    media.rtcp_mux = false;
    let offer_a = sdp::offer(&media).context("SDP offer")?;
    let to_b = control
        .sdp(&dict(&[("command", "offer"), ("call-id", &call_id), ("from-tag", "a"), ("sdp", &offer_a)]))
        .await?;
    let b = sdp::answer(&to_b, &media).context("answering rtpengine's offer")?;
    let to_a = control
        .sdp(&dict(&[
            ("command", "answer"),
            ("call-id", &call_id),
            ("from-tag", "a"),
            ("to-tag", "b"),
            ("sdp", &b.local_sdp),
        ]))
        .await?;
    let a = sdp::accept_answer(&offer_a, &to_a).context("rtpengine's answer")?;
    let spec = |remote, pt, te, ssrc| StreamSpec { remote, payload_type: pt, telephone_event: te, keys: None, ssrc };
    let ssrc = (n as u32).wrapping_mul(0x9E37_79B9) | 1;
    Ok((
        spec(a.remote_rtp, a.codec.payload_type, a.telephone_event, ssrc),
        spec(b.remote_rtp, b.codec.payload_type, b.telephone_event, ssrc ^ 0x8000_0000),
    ))
}

/// One round per `--calls` value through rtpengine at `ng`.
pub async fn run_rounds(ng: SocketAddr, load: &LoadArgs) -> anyhow::Result<Vec<RoundReport>> {
    let engine = RtpEngine::start(load.rtp_bind).context("RTP engine")?;
    let mut control = Control::new(ng).await?;
    let mut reports = Vec::new();
    let mut pids = load.pids.clone();
    pids.push(("loadgen".into(), std::process::id()));
    for &calls in &load.calls {
        eprintln!("loadgen: {calls} relayed calls through rtpengine at {ng}, held {} s", load.hold);
        let _ = engine.report(true);
        let before: Vec<Option<ProcSample>> = pids.iter().map(|(_, pid)| procstat::sample(*pid)).collect();
        let mut report = RoundReport { uri: format!("rtpengine {ng}"), calls, ..RoundReport::default() };
        let interval = Duration::from_secs_f64(1.0 / load.rate.max(0.1));
        let started = Instant::now();
        let mut setup = Vec::new();
        for n in 0..calls {
            if let Some(wait) = (started + interval * n as u32).checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
            let t = Instant::now();
            match relay_call(&mut control, &engine, n).await {
                Ok((a, b)) => {
                    setup.push(t.elapsed().as_secs_f64() * 1e3);
                    engine.start_stream(2 * n, a);
                    engine.start_stream(2 * n + 1, b);
                    report.answered += 1;
                    report.callee_legs += 1;
                }
                Err(e) => {
                    eprintln!("loadgen: relay {n}: {e:#}");
                    *report.failed.entry(0).or_default() += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs_f64(load.settle)).await;
        engine.measure(true);
        let start = Instant::now();
        let start_samples: Vec<Option<ProcSample>> = pids.iter().map(|(_, pid)| procstat::sample(*pid)).collect();
        tokio::time::sleep(Duration::from_secs_f64(load.hold)).await;
        engine.measure(false);
        let end_samples: Vec<Option<ProcSample>> = pids.iter().map(|(_, pid)| procstat::sample(*pid)).collect();
        report.window_s = start.elapsed().as_secs_f64();
        report.processes =
            process_figures(&pids, &before, &start_samples, &end_samples, report.window_s, report.answered);
        for n in 0..calls {
            engine.stop_stream(2 * n);
            engine.stop_stream(2 * n + 1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for n in 0..calls {
            let call_id = format!("loadgen-{}-{n}", std::process::id());
            let _ = control.request(&dict(&[("command", "delete"), ("call-id", &call_id), ("from-tag", "a")])).await;
        }
        report.setup = MsSummary::of(&mut setup);
        fill_rtp(&mut report, &engine.report(true));
        println!("{}", serde_json::to_string(&report).context("report as JSON")?);
        reports.push(report);
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bencode_round_trips() {
        let mut d = BTreeMap::new();
        d.insert(b"sdp".to_vec(), Value::Bytes(b"v=0\r\n".to_vec()));
        d.insert(b"result".to_vec(), Value::Bytes(b"ok".to_vec()));
        d.insert(b"n".to_vec(), Value::Int(-3));
        d.insert(b"l".to_vec(), Value::List(vec![Value::Bytes(b"x".to_vec())]));
        let value = Value::Dict(d);
        let mut out = Vec::new();
        encode(&value, &mut out);
        assert_eq!(out, b"d1:ll1:xe1:ni-3e6:result2:ok3:sdp5:v=0\r\ne");
        assert_eq!(decode(&out), Some((value, &b""[..])));
        assert_eq!(decode(b"5:abc"), None, "a string longer than the input");
    }
}
