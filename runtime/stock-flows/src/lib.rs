//! The stock flows from `plugins/`, compiled to WebAssembly components by this crate's build
//! script and embedded as bytes, so the `patchbay` binary serves them with no files on disk.

/// A flow that ships with Patchbay.
#[derive(Debug, Clone, Copy)]
pub struct StockFlow {
    /// The name calls are routed by (for example `sip:echo@127.0.0.1` reaches `echo`).
    pub name: &'static str,
    /// What it does, in one line (for listings and docs).
    pub summary: &'static str,
    /// The component bytes.
    pub component: &'static [u8],
}

/// Echo: answers, streams the caller's audio back by handle and repeats key presses.
pub const ECHO: StockFlow = StockFlow {
    name: "echo",
    summary: "answers and plays your own audio and key presses back to you",
    component: include_bytes!(concat!(env!("OUT_DIR"), "/echo.wasm")),
};

/// IVR menu: a tree of menus from the flow's variables; keys lead to sub-menus, dial, agent,
/// voicemail, transfer or hang-up.
pub const IVR_MENU: StockFlow = StockFlow {
    name: "menu",
    summary: "plays a menu; 1 dials sales, 2 connects the AI agent, 3 takes a message, 0 hangs up",
    component: include_bytes!(concat!(env!("OUT_DIR"), "/ivr_menu.wasm")),
};

/// Voicemail: greeting, beep, a message recorded into the tenant's storage.
pub const VOICEMAIL: StockFlow = StockFlow {
    name: "voicemail",
    summary: "greets, beeps and records a message until # or silence (WAV + JSON in storage)",
    component: include_bytes!(concat!(env!("OUT_DIR"), "/voicemail.wasm")),
};

/// DTMF router: collects an extension and dials where the routing table says.
pub const DTMF_ROUTER: StockFlow = StockFlow {
    name: "router",
    summary: "asks for an extension (digits or #) and dials the SIP URI routed to it",
    component: include_bytes!(concat!(env!("OUT_DIR"), "/dtmf_router.wasm")),
};

/// Agent handoff: an AI agent over a websocket, a human over SIP when it fails or transfers.
pub const AGENT_HANDOFF: StockFlow = StockFlow {
    name: "agent",
    summary: "connects an AI voice agent (Twilio Media Streams websocket), falls back to a human",
    component: include_bytes!(concat!(env!("OUT_DIR"), "/agent_handoff.wasm")),
};

/// Greet: plays a prompt (about three seconds) and hangs up; for outbound notification calls.
pub const GREET: StockFlow = StockFlow {
    name: "greet",
    summary: "plays a prompt (greet.prompt, twice by default) and hangs up",
    component: include_bytes!(concat!(env!("OUT_DIR"), "/greet.wasm")),
};

/// Every stock flow.
pub const ALL: &[StockFlow] = &[ECHO, IVR_MENU, VOICEMAIL, DTMF_ROUTER, AGENT_HANDOFF, GREET];

/// Test fixtures: flows that misbehave on purpose. Not served by the binary.
pub mod fixtures {
    /// Loops, grows memory, traps or hoards handles depending on the call's `to`.
    pub const CHAOS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chaos.wasm"));
}
