//! Feeds arbitrary bytes to every entry point of the SIP message layer: none may panic, loop
//! or allocate without bound, and stream framing must agree with itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use patchbay_sip::message::{Limits, StreamFrame, frame_stream, parse_datagram, parse_stream_message};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Err(err) = parse_datagram(data, &limits) {
        let mut out = Vec::new();
        let _ = err.write_response(Some("fuzz"), &mut out);
    }
    // Drain the buffer as a transport would, one frame at a time.
    let mut rest = data;
    while !rest.is_empty() {
        match frame_stream(rest, &limits) {
            StreamFrame::Complete { len } | StreamFrame::KeepAlive { len } => {
                assert!(len > 0 && len <= rest.len());
                let _ = parse_stream_message(&rest[..len], &limits);
                rest = &rest[len..];
            }
            StreamFrame::Incomplete | StreamFrame::Invalid(_) => break,
        }
    }
});
