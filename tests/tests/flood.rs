//! A spoofed-source INVITE flood: 100,000 INVITEs, each from an address of its own (all of
//! 127.0.0.0/8 is this host's, so every one is a different source without raw sockets), sent as
//! fast as this machine sends, at a tenant with digest authentication (the configuration for a
//! public address). Patchbay's memory must stay bounded — each INVITE is challenged statelessly
//! and holds nothing — and the next legitimate caller must get through. The peak is printed
//! (`cargo test --test flood -- --nocapture`) and recorded in docs/security.md.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use patchbay_e2e::{sipp_digest_call, start_challenging_patchbay};

const INVITES: u32 = 100_000;

/// `VmHWM` (peak resident set) and `VmRSS` of `pid`, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[test]
fn a_spoofed_source_invite_flood_leaves_memory_bounded_and_the_next_call_working() {
    let pb = start_challenging_patchbay();
    std::thread::sleep(Duration::from_secs(1));
    let (_, before) = memory_kib(pb.pid());
    let target = SocketAddr::from(([127, 0, 0, 1], pb.port));
    let started = Instant::now();
    let mut sent = 0u32;
    for n in 0..INVITES {
        // 127.1.0.0 onwards: one address per INVITE.
        let source = Ipv4Addr::from(0x7f01_0000 + n);
        let Ok(socket) = UdpSocket::bind((source, 0)) else { continue };
        let local = socket.local_addr().expect("addr");
        let sdp = format!(
            "v=0\r\no=- 1 1 IN IP4 {source}\r\ns=-\r\nc=IN IP4 {source}\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
        );
        let invite = format!(
            "INVITE sip:echo@127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKflood{n}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:bot{n}@{source}>;tag=f{n}\r\nTo: <sip:echo@127.0.0.1>\r\n\
             Call-ID: flood{n}@{source}\r\nCSeq: 1 INVITE\r\nContact: <sip:bot@{local}>\r\n\
             Content-Type: application/sdp\r\nContent-Length: {len}\r\n\r\n{sdp}",
            port = pb.port,
            len = sdp.len(),
        );
        if socket.send_to(invite.as_bytes(), target).is_ok() {
            sent += 1;
        }
    }
    let elapsed = started.elapsed();
    // Let it work through what the socket buffer held.
    std::thread::sleep(Duration::from_secs(5));
    let (peak, after) = memory_kib(pb.pid());
    eprintln!(
        "flood: {sent} INVITEs from {sent} sources in {:.1} s ({:.0}/s); Patchbay RSS {} MiB before, peak {} MiB, {} MiB after",
        elapsed.as_secs_f64(),
        f64::from(sent) / elapsed.as_secs_f64(),
        before / 1024,
        peak / 1024,
        after / 1024
    );
    assert!(sent > INVITES * 9 / 10, "only {sent} INVITEs sent");
    // Bounded: nothing is held per INVITE. (A transaction and a call per INVITE, as before the
    // stateless challenge, would have held hundreds of MiB.)
    assert!(peak < before + 128 * 1024, "peak {peak} KiB against {before} KiB before the flood");
    // The next caller, from an address of its own, gets through.
    let (ok, log) = sipp_digest_call(&pb, "127.0.0.2", "s3cret");
    assert!(ok, "the call after the flood failed:\n{log}");
}
