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

/// IVR menu: a menu prompt, one key with retries, then dial / agent / hang up.
pub const IVR_MENU: StockFlow = StockFlow {
    name: "menu",
    summary: "plays a menu; 1 dials sales, 2 connects the AI agent, 0 hangs up",
    component: include_bytes!(concat!(env!("OUT_DIR"), "/ivr_menu.wasm")),
};

/// Every stock flow.
pub const ALL: &[StockFlow] = &[ECHO, IVR_MENU];

/// Test fixtures: flows that misbehave on purpose. Not served by the binary.
pub mod fixtures {
    /// Loops, grows memory, traps or hoards handles depending on the call's `to`.
    pub const CHAOS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chaos.wasm"));
}
