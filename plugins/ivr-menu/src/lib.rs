//! IVR menu: plays a menu prompt, collects one key with retries and routes the call.
//!
//! Routing comes from call variables (set by the tenant's routing config):
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `menu.prompt` | the menu prompt | `menu.wav` |
//! | `menu.invalid-prompt` | played after a key with no route | `invalid.wav` |
//! | `menu.retries` | extra attempts after no input or a bad key | `2` |
//! | `menu.timeout-ms` | time for a key after the prompt | `5000` |
//! | `menu.<key>` | `dial:<sip-uri>`, `agent:<ws-url>` or `hangup` | see [`DEFAULT_ROUTES`] |

use patchbay_plugin_sdk::{
    AgentEnd, Call, DialOptions, Flow, FlowError, HangupCause, MenuOptions, export_flow, info, menu, warn,
};

/// Routes used when the call has no `menu.<key>` variables.
pub const DEFAULT_ROUTES: &[(char, &str)] =
    &[('1', "dial:sip:sales@127.0.0.1"), ('2', "agent:ws://127.0.0.1:8765/agent"), ('0', "hangup")];

/// What pressing a key does.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    Dial(String),
    Agent(String),
    Hangup,
}

fn parse_action(spec: &str) -> Option<Action> {
    match spec.split_once(':') {
        Some(("dial", uri)) if !uri.is_empty() => Some(Action::Dial(uri.to_owned())),
        Some(("agent", url)) if !url.is_empty() => Some(Action::Agent(url.to_owned())),
        None if spec == "hangup" => Some(Action::Hangup),
        _ => None,
    }
}

fn route(call: &Call, key: char) -> Option<String> {
    call.get_var(&format!("menu.{key}"))
        .or_else(|| DEFAULT_ROUTES.iter().find(|(k, _)| *k == key).map(|(_, r)| (*r).to_owned()))
}

fn var_or<T: std::str::FromStr>(call: &Call, name: &str, default: T) -> T {
    call.get_var(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct IvrMenu;

impl Flow for IvrMenu {
    fn run(call: &Call) -> Result<(), FlowError> {
        call.answer()?;
        let prompt = call.get_var("menu.prompt").unwrap_or_else(|| "menu.wav".into());
        let invalid = call.get_var("menu.invalid-prompt").unwrap_or_else(|| "invalid.wav".into());
        let valid: String = "0123456789*#".chars().filter(|k| route(call, *k).is_some()).collect();
        let options = MenuOptions {
            valid: &valid,
            retries: var_or(call, "menu.retries", 2),
            invalid_prompt: Some(&invalid),
            timeout_ms: var_or(call, "menu.timeout-ms", 5_000),
            ..MenuOptions::new(&prompt)
        };
        let Some(key) = menu(call, &options)? else {
            info("ivr-menu: no choice after retries, hanging up");
            call.hangup(HangupCause::Normal)?;
            return Ok(());
        };
        let spec = route(call, key).unwrap_or_default();
        match parse_action(&spec) {
            Some(Action::Dial(uri)) => {
                info(&format!("ivr-menu: key {key} -> dial {uri}"));
                call.dial(&uri, &DialOptions::ringing_for(30_000))?;
            }
            Some(Action::Agent(url)) => {
                info(&format!("ivr-menu: key {key} -> agent {url}"));
                if let AgentEnd::TransferRequested(target) = call.agent(&url, &[])? {
                    call.transfer(&target)?;
                }
            }
            Some(Action::Hangup) => call.hangup(HangupCause::Normal)?,
            None => {
                warn(&format!("ivr-menu: route {spec:?} for key {key} is not dial:, agent: or hangup"));
                return Err(FlowError::Failed(format!("bad route for key {key}: {spec:?}")));
            }
        }
        Ok(())
    }
}

export_flow!(IvrMenu);
