#![allow(missing_docs)] // generated code; the WIT file documents every item
//! Host bindings generated from `wit/patchbay.wit` (world `flow`).
//!
//! Operations that take call time (answer, play, collect, dial, ...) are `async` on the host:
//! the guest's fiber is suspended while the call layer works, so a flow is plain sequential
//! code. Cheap accessors (`info`, `get-var`, `log`, frame accessors) are synchronous, which
//! keeps their round trip near a microsecond.

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "flow",
    imports: {
        default: trappable,
        "patchbay:voice/call.[method]call.answer": async | trappable,
        "patchbay:voice/call.[method]call.hangup": async | trappable,
        "patchbay:voice/call.[method]call.play": async | trappable,
        "patchbay:voice/call.[method]call.collect-digits": async | trappable,
        "patchbay:voice/call.[method]call.sleep": async | trappable,
        "patchbay:voice/call.[method]call.dial": async | trappable,
        "patchbay:voice/call.[method]call.transfer": async | trappable,
        "patchbay:voice/call.[method]call.agent": async | trappable,
        "patchbay:voice/call.[method]call.record": async | trappable,
        "patchbay:voice/call.[method]call.send-dtmf": async | trappable,
        "patchbay:voice/call.[method]call.next-dtmf": async | trappable,
        "patchbay:voice/media.[method]audio-stream.read": async | trappable,
        "patchbay:voice/kv.get": async | trappable,
        "patchbay:voice/kv.set": async | trappable,
        "patchbay:voice/kv.delete": async | trappable,
    },
    exports: { default: async },
    with: {
        "patchbay:voice/media.frame": patchbay_media::Frame,
        "patchbay:voice/media.audio-stream": crate::state::AudioStreamHandle,
        "patchbay:voice/call.call": crate::state::CallHandle,
    },
});

pub use patchbay::voice::call::{
    AgentEnd, BridgeEnd, CallInfo, CollectEnd, CollectOptions, Collected, DialOptions, DialOutcome, HangupCause,
    PlayOptions, PlayOutcome, RecordEnd, RecordOptions, Recording,
};
pub use patchbay::voice::log::Level;
pub use patchbay::voice::media::{AudioFormat, Dtmf, Encoding, StreamEvent};
pub use patchbay::voice::types::{CallError, Direction, Header};
