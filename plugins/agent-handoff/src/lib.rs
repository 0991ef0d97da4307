//! Agent handoff: connects the caller to an AI voice agent over a websocket (Twilio Media
//! Streams protocol), transfers the caller where the agent asks, and falls back to a human over
//! SIP when the agent is unreachable or drops.
//!
//! The agent is on the network, and so is whatever made it ask: where it asks to send the
//! caller is a request, not an instruction. The host checks the target against the tenant's
//! capabilities (`[tenant.allow] dial`, or one of the tenant's own flows); a target refused
//! there (`not-allowed`) or malformed (`invalid-argument`) sends the caller to the human
//! fallback instead, and `agent.transfer-refused` says why. The same holds for the agent's URL
//! (`[tenant.allow] agents`): a refused agent is treated as an unreachable one.
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `agent.url` | the agent's websocket (`ws://` or `wss://`) | `ws://127.0.0.1:8765/agent` |
//! | `agent.params` | names of the custom parameters to send, comma-separated | none |
//! | `agent.param.<name>` | a custom parameter's value (`from` and `to` are always sent) | none |
//! | `agent.transfer-targets` | where the agent may send the caller: targets, comma-separated (`*`: letters, digits, `+-._~`) | none: no transfers |
//! | `agent.fallback` | the human to dial when the agent fails (empty: hang up) | `sip:operator@127.0.0.1:5070` |
//! | `agent.fallback-prompt` | played before dialling the fallback | `agent-unavailable.wav` |
//! | `agent.ring-ms` | how long the human may ring | `30000` |
//!
//! Sets `agent.end` (how the agent session ended; `not-allowed` when the tenant does not allow
//! the agent's URL) and, after a refused transfer, `agent.transfer-refused` for the CDR.

use patchbay_plugin_sdk::{
    AgentEnd, Call, CallError, DialOptions, Flow, FlowError, PlayOptions, agent_end_text, export_flow, finish, info,
    target_listed, var_or, warn,
};

/// Variables passed to the agent as custom parameters: `agent.param.<name>`.
const PARAM_PREFIX: &str = "agent.param.";

/// The agent's custom parameters. Flows cannot list variables, so the known names are asked
/// for one by one (`agent.params` lists them, comma-separated).
fn params(call: &Call) -> Vec<(String, String)> {
    let info = call.info();
    let mut params = vec![("from".to_owned(), info.from), ("to".to_owned(), info.to)];
    for name in call.get_var("agent.params").unwrap_or_default().split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if let Some(value) = call.get_var(&format!("{PARAM_PREFIX}{name}")) {
            params.push((name.to_owned(), value));
        }
    }
    params
}

/// Hands the caller to a human: the fallback destination, dialled and bridged.
fn to_human(call: &Call) -> Result<(), FlowError> {
    let fallback = call.get_var("agent.fallback").unwrap_or_else(|| DEFAULT_FALLBACK.into());
    if fallback.is_empty() {
        finish(call)?;
        return Ok(());
    }
    let prompt = call.get_var("agent.fallback-prompt").unwrap_or_else(|| "agent-unavailable.wav".into());
    call.play(&prompt, PlayOptions::uninterruptible())?;
    info(&format!("agent-handoff: dialling {fallback}"));
    let outcome = call.dial(&fallback, &DialOptions::ringing_for(var_or(call, "agent.ring-ms", 30_000)))?;
    info(&format!("agent-handoff: {fallback}: {outcome:?}"));
    finish(call)?;
    Ok(())
}

const DEFAULT_FALLBACK: &str = "sip:operator@127.0.0.1:5070";

struct AgentHandoff;

impl Flow for AgentHandoff {
    fn run(call: &Call) -> Result<(), FlowError> {
        call.answer()?;
        let url = call.get_var("agent.url").unwrap_or_else(|| "ws://127.0.0.1:8765/agent".into());
        let end = match call.agent(&url, &params(call)) {
            Ok(end) => end,
            Err(CallError::Unavailable(why)) => {
                warn(&format!("agent-handoff: agent {url} unavailable: {why}"));
                let _ = call.set_var("agent.end", "unavailable");
                return to_human(call);
            }
            Err(CallError::NotAllowed(why)) => {
                warn(&format!("agent-handoff: agent {url} not allowed: {why}"));
                let _ = call.set_var("agent.end", "not-allowed");
                return to_human(call);
            }
            Err(e) => return Err(e.into()),
        };
        let _ = call.set_var("agent.end", &agent_end_text(&end));
        match end {
            AgentEnd::Completed | AgentEnd::HangupRequested => {
                finish(call)?;
                Ok(())
            }
            AgentEnd::TransferRequested(target) => {
                if !target_listed(&call.get_var("agent.transfer-targets").unwrap_or_default(), &target) {
                    warn(&format!("agent-handoff: transfer to {target} refused: not in agent.transfer-targets"));
                    let _ = call.set_var("agent.transfer-refused", "not in agent.transfer-targets");
                    return to_human(call);
                }
                info(&format!("agent-handoff: the agent transfers the caller to {target}"));
                match call.transfer(&target) {
                    Ok(()) => Ok(()),
                    Err(CallError::NotAllowed(why) | CallError::InvalidArgument(why)) => {
                        warn(&format!("agent-handoff: transfer to {target} refused: {why}"));
                        let _ = call.set_var("agent.transfer-refused", &why);
                        to_human(call)
                    }
                    Err(e) => Err(e.into()),
                }
            }
            AgentEnd::Disconnected(why) => {
                warn(&format!("agent-handoff: agent dropped: {why}"));
                to_human(call)
            }
        }
    }
}

export_flow!(AgentHandoff);
