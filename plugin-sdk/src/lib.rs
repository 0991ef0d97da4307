//! Write Patchbay call flows in Rust.
//!
//! A flow is ordinary sequential code that handles one phone call. It compiles to a
//! WebAssembly component (target `wasm32-wasip2`) that Patchbay loads per tenant; every call
//! gets its own instance. Operations that take time — [`Call::play`], [`Call::collect_digits`],
//! [`Call::dial`], [`Call::agent`] — simply block: the host suspends the flow while it keeps the
//! call's audio flowing. When the caller hangs up, the pending operation returns
//! [`CallError::Hangup`]; with `?` the flow unwinds and returns.
//!
//! # Example
//!
//! A complete flow (the crate type must be `cdylib`; build with
//! `cargo build --release --target wasm32-wasip2`):
//!
//! ```no_run
//! use patchbay_plugin_sdk::{menu, Call, Flow, FlowError, MenuOptions, DialOptions, HangupCause};
//!
//! struct Reception;
//!
//! impl Flow for Reception {
//!     fn run(call: &Call) -> Result<(), FlowError> {
//!         call.answer()?;
//!         let options = MenuOptions { valid: "12", ..MenuOptions::new("welcome.wav") };
//!         match menu(call, &options)? {
//!             Some('1') => {
//!                 call.dial("sip:sales@pbx.example.com", &DialOptions::ringing_for(30_000))?;
//!             }
//!             Some(_) => {
//!                 call.agent("wss://agent.example.com/voice", &[("lang".into(), "en".into())])?;
//!             }
//!             None => call.hangup(HangupCause::Normal)?,
//!         }
//!         Ok(())
//!     }
//! }
//!
//! patchbay_plugin_sdk::export_flow!(Reception);
//! ```
//!
//! The WIT this crate binds is `wit/patchbay.wit` (package `patchbay:voice@0.1.0`); every type
//! and function there is documented.

/// The raw bindings generated from `wit/patchbay.wit`.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "flow",
        pub_export_macro: true,
        export_macro_name: "__export_flow_world",
        default_bindings_module: "patchbay_plugin_sdk::bindings",
    });
}

pub use bindings::Guest as Flow;
pub use bindings::patchbay::voice::call::{
    AgentEnd, BridgeEnd, Call, CallInfo, CollectEnd, CollectOptions, Collected, DialOptions, DialOutcome, HangupCause,
    PlayOptions, PlayOutcome, RecordEnd, RecordOptions, Recording,
};
pub use bindings::patchbay::voice::kv;
pub use bindings::patchbay::voice::log::{Level, log};
pub use bindings::patchbay::voice::media::{AudioFormat, AudioStream, Dtmf, Encoding, Frame, StreamEvent};
pub use bindings::patchbay::voice::types::{CallError, Direction, FlowError, Header};

/// Exports a type implementing [`Flow`] as the component's `run` function.
#[macro_export]
macro_rules! export_flow {
    ($flow:ident) => {
        $crate::bindings::__export_flow_world!($flow with_types_in $crate::bindings);
    };
}

impl From<CallError> for FlowError {
    fn from(error: CallError) -> Self {
        FlowError::Call(error)
    }
}

impl PlayOptions {
    /// Play once; a key press interrupts the prompt.
    pub fn barge_in() -> Self {
        Self { barge_in: true, repeat: 1 }
    }

    /// Play once, ignoring key presses.
    pub fn uninterruptible() -> Self {
        Self { barge_in: false, repeat: 1 }
    }
}

impl CollectOptions {
    /// Up to `max` digits ended by `#`, 5 s for the first and 3 s between digits.
    pub fn digits(max: u32) -> Self {
        Self {
            max_digits: max,
            terminators: "#".into(),
            first_digit_timeout_ms: 5_000,
            inter_digit_timeout_ms: 3_000,
            prompt: None,
            barge_in: true,
        }
    }
}

impl DialOptions {
    /// Ring for `timeout_ms`, presenting the caller's own From URI, with no extra headers.
    pub fn ringing_for(timeout_ms: u32) -> Self {
        Self { caller_id: None, timeout_ms, headers: Vec::new() }
    }
}

/// Options for [`menu`].
#[derive(Debug, Clone)]
pub struct MenuOptions<'a> {
    /// The menu prompt, played with barge-in.
    pub prompt: &'a str,
    /// The keys that are valid choices.
    pub valid: &'a str,
    /// How many times to ask again after no input or an invalid key.
    pub retries: u32,
    /// Played after an invalid key (none: just ask again).
    pub invalid_prompt: Option<&'a str>,
    /// Played when nobody pressed anything (none: just ask again).
    pub timeout_prompt: Option<&'a str>,
    /// Time to wait for a key after the prompt.
    pub timeout_ms: u32,
}

impl<'a> MenuOptions<'a> {
    /// A menu with the digits 0–9 valid, two retries and a 5 s timeout.
    pub fn new(prompt: &'a str) -> Self {
        Self { prompt, valid: "0123456789", retries: 2, invalid_prompt: None, timeout_prompt: None, timeout_ms: 5_000 }
    }
}

/// Plays a menu and returns the caller's choice: a key from `valid`, or `None` when the
/// retries ran out. A key pressed during the prompt counts at once (barge-in).
pub fn menu(call: &Call, options: &MenuOptions<'_>) -> Result<Option<char>, CallError> {
    for _attempt in 0..=options.retries {
        let key = match call.play(options.prompt, PlayOptions::barge_in())? {
            PlayOutcome::Interrupted(key) => Some(key),
            PlayOutcome::Completed => {
                let collected = call.collect_digits(&CollectOptions {
                    terminators: String::new(),
                    first_digit_timeout_ms: options.timeout_ms,
                    ..CollectOptions::digits(1)
                })?;
                collected.digits.chars().next()
            }
        };
        let reprompt = match key {
            Some(key) if options.valid.contains(key) => return Ok(Some(key)),
            Some(_) => options.invalid_prompt,
            None => options.timeout_prompt,
        };
        if let Some(prompt) = reprompt {
            call.play(prompt, PlayOptions::uninterruptible())?;
        }
    }
    Ok(None)
}

/// Writes a line to Patchbay's log, tagged with the call and tenant.
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Writes a warning to Patchbay's log.
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Reads a call variable and parses it, falling back to `default` when it is absent or does
/// not parse.
pub fn var_or<T: std::str::FromStr>(call: &Call, name: &str, default: T) -> T {
    call.get_var(name).and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

/// Options for [`voicemail`].
#[derive(Debug, Clone)]
pub struct VoicemailOptions {
    /// The greeting (a key press skips it).
    pub greeting: String,
    /// Played after the message was stored (none: nothing).
    pub thanks: Option<String>,
    /// Longest message.
    pub max_ms: u32,
    /// Stop after this much silence (0: never).
    pub silence_ms: u32,
}

impl VoicemailOptions {
    /// The stock prompts, at most two minutes, five seconds of silence ends the message.
    pub fn new() -> Self {
        Self { greeting: "voicemail.wav".into(), thanks: Some("thanks.wav".into()), max_ms: 120_000, silence_ms: 5_000 }
    }

    /// The options from the call's `voicemail.*` variables (`voicemail.greeting`,
    /// `voicemail.thanks`, `voicemail.max-ms`, `voicemail.silence-ms`), defaults otherwise.
    pub fn from_vars(call: &Call) -> Self {
        let defaults = Self::new();
        Self {
            greeting: call.get_var("voicemail.greeting").unwrap_or(defaults.greeting),
            thanks: call.get_var("voicemail.thanks").or(defaults.thanks).filter(|t| !t.is_empty()),
            max_ms: var_or(call, "voicemail.max-ms", defaults.max_ms),
            silence_ms: var_or(call, "voicemail.silence-ms", defaults.silence_ms),
        }
    }
}

impl Default for VoicemailOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Takes a message: plays the greeting, beeps, records until `#`, silence, the time limit or
/// the caller hanging up, and thanks the caller. The recording's id and length are also set as
/// the call variables `voicemail.recording` and `voicemail.duration-ms` (they appear in the
/// CDR). Returns the recording.
pub fn voicemail(call: &Call, options: &VoicemailOptions) -> Result<Recording, CallError> {
    call.answer()?;
    // A key during the greeting skips to the beep.
    call.play(&options.greeting, PlayOptions::barge_in())?;
    let recording = call.record(&RecordOptions {
        max_duration_ms: options.max_ms,
        silence_timeout_ms: options.silence_ms,
        terminators: "#".into(),
        beep: true,
    })?;
    // Variables are best effort: a full variable table must not lose the message.
    let _ = call.set_var("voicemail.recording", &recording.id);
    let _ = call.set_var("voicemail.duration-ms", &recording.duration_ms.to_string());
    if recording.ended_by != RecordEnd::Hangup
        && let Some(thanks) = &options.thanks
    {
        call.play(thanks, PlayOptions::uninterruptible())?;
    }
    Ok(recording)
}

/// Ends the call normally at the end of a flow; a call that is already over (the caller hung
/// up, a transfer completed) is not an error.
pub fn finish(call: &Call) -> Result<(), CallError> {
    match call.hangup(HangupCause::Normal) {
        Ok(()) | Err(CallError::Hangup) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A short, stable text for a dial outcome, for call variables and CDRs: `answered:caller`,
/// `answered:callee`, `busy`, `no-answer` or `failed:<code>`.
pub fn dial_outcome_text(outcome: &DialOutcome) -> String {
    match outcome {
        DialOutcome::Answered(BridgeEnd::Caller) => "answered:caller".into(),
        DialOutcome::Answered(BridgeEnd::Callee) => "answered:callee".into(),
        DialOutcome::Busy => "busy".into(),
        DialOutcome::NoAnswer => "no-answer".into(),
        DialOutcome::Failed(code) => format!("failed:{code}"),
    }
}

/// A short, stable text for how an agent session ended: `completed`, `hangup-requested`,
/// `transfer-requested:<target>` or `disconnected:<detail>`.
pub fn agent_end_text(end: &AgentEnd) -> String {
    match end {
        AgentEnd::Completed => "completed".into(),
        AgentEnd::HangupRequested => "hangup-requested".into(),
        AgentEnd::TransferRequested(target) => format!("transfer-requested:{target}"),
        AgentEnd::Disconnected(detail) => format!("disconnected:{detail}"),
    }
}

/// Whether `target` — an address from the network, such as the transfer an AI agent asks for —
/// is one of the comma-separated `patterns` a flow's configuration lists (`agent.transfer-targets`,
/// `menu.transfer-targets`). In a pattern `*` stands for a run of letters, digits and `+-._~`,
/// never `@`, `:`, `;` or `/`, so it cannot reach another host, port or parameter. An empty
/// list lets nothing through. Linear in the target's length per pattern (no backtracking: a
/// long target sent to a flow costs it little).
pub fn target_listed(patterns: &str, target: &str) -> bool {
    patterns.split(',').map(str::trim).any(|p| !p.is_empty() && glob(p.as_bytes(), target.as_bytes()))
}

/// `*`-glob where `*` matches only [`target_listed`]'s run characters, by dynamic programming
/// over the pattern (one row of states per target byte).
fn glob(pattern: &[u8], target: &[u8]) -> bool {
    let run = |b: u8| b.is_ascii_alphanumeric() || b"+-._~".contains(&b);
    // `at[i]`: the first `i` pattern bytes match what has been read of the target.
    let mut at = vec![false; pattern.len() + 1];
    at[0] = true;
    for i in 0..pattern.len() {
        at[i + 1] = at[i] && pattern[i] == b'*';
    }
    for &byte in target {
        let mut next = vec![false; pattern.len() + 1];
        for i in 0..pattern.len() {
            next[i + 1] = match pattern[i] {
                // `*` takes this byte (staying at `*`) or, empty, lets the next byte match on.
                b'*' => (at[i + 1] && run(byte)) || next[i],
                c => at[i] && c == byte,
            };
        }
        at = next;
    }
    at[pattern.len()]
}

#[cfg(test)]
mod tests {
    use super::target_listed;

    #[test]
    fn only_listed_targets_pass() {
        let list = "sip:human@pbx.example.com, sip:*@desk.example.com:5070";
        assert!(target_listed(list, "sip:human@pbx.example.com"));
        assert!(target_listed(list, "sip:+4930123@desk.example.com:5070"));
        for target in [
            "sip:human@pbx.example.com:5080",
            "sip:x@evil.example;a=@desk.example.com:5070",
            "sip:x@evil.example:5070@desk.example.com:5070",
            "sip:@desk.example.com:5070x",
            "trunk:carrier/+19005550100",
            "tel:+19005550100",
        ] {
            assert!(!target_listed(list, target), "{target}");
        }
        assert!(target_listed("sip:*@desk.example.com:5070", "sip:@desk.example.com:5070"), "* may be empty");
        assert!(target_listed("*", "abc") && !target_listed("*", "a@b"));
        assert!(!target_listed("", "sip:human@pbx.example.com"), "no list: nothing passes");
        // Many stars against a long target: linear, not exponential.
        let long = "a".repeat(100_000);
        assert!(!target_listed("*a*a*a*a*a*a*a*a*b", &long));
    }
}
