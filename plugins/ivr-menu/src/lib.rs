//! IVR menu: a tree of menus, each a prompt and one key per choice, with retries, a timeout
//! and an invalid-input prompt. Every key leads to an action.
//!
//! The tree comes from call variables (the tenant's `[tenant.flow.vars]`). The root menu is
//! `main`; its variables may also be written without the menu name (`menu.prompt`, `menu.1`):
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `menu.<id>.prompt` | the menu's prompt | `menu.wav` |
//! | `menu.<id>.invalid-prompt` | played after a key with no action | `invalid.wav` |
//! | `menu.<id>.retries` | extra attempts after no input or a bad key | `2` |
//! | `menu.<id>.timeout-ms` | time for a key after the prompt | `5000` |
//! | `menu.<id>.<key>` | the key's action (below) | see [`DEFAULT_ROUTES`] for `main` |
//! | `menu.ring-ms` | how long a `dial:` destination may ring | `30000` |
//! | `menu.transfer-targets` | where an agent may send the caller: targets, comma-separated (`*`: letters, digits, `+-._~`) | none: no transfers |
//!
//! Actions: `menu:<id>` (a sub-menu), `dial:<sip-uri>`, `agent:<ws-url>` (an AI agent; when it
//! asks for a transfer the caller is transferred if `menu.transfer-targets` lists the target and
//! the tenant's capabilities allow it, else `menu.transfer-refused` says why and the call ends), `voicemail` (take a message, see the
//! voicemail flow's `voicemail.*` variables), `transfer:<sip-uri>` (blind transfer) and
//! `hangup`. Each choice is recorded as the call variable `menu.path` (for example `main:2`).

use patchbay_plugin_sdk::{
    AgentEnd, Call, CallError, DialOptions, Flow, FlowError, MenuOptions, VoicemailOptions, export_flow, finish, info,
    menu, target_listed, var_or, voicemail, warn,
};

/// The root menu's actions when the call has no variables for them.
pub const DEFAULT_ROUTES: &[(char, &str)] = &[
    ('1', "dial:sip:sales@127.0.0.1:5070"),
    ('2', "agent:ws://127.0.0.1:8765/agent"),
    ('3', "voicemail"),
    ('0', "hangup"),
];

/// The root menu's id.
const ROOT: &str = "main";
/// Deepest chain of sub-menus followed (a loop in the configuration ends here).
const MAX_DEPTH: usize = 16;

/// What pressing a key does.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    Menu(String),
    Dial(String),
    Agent(String),
    Transfer(String),
    Voicemail,
    Hangup,
}

fn parse_action(spec: &str) -> Option<Action> {
    match spec.split_once(':') {
        Some(("menu", id)) if !id.is_empty() => Some(Action::Menu(id.to_owned())),
        Some(("dial", uri)) if !uri.is_empty() => Some(Action::Dial(uri.to_owned())),
        Some(("agent", url)) if !url.is_empty() => Some(Action::Agent(url.to_owned())),
        Some(("transfer", uri)) if !uri.is_empty() => Some(Action::Transfer(uri.to_owned())),
        None if spec == "voicemail" => Some(Action::Voicemail),
        None if spec == "hangup" => Some(Action::Hangup),
        _ => None,
    }
}

/// A menu setting: `menu.<id>.<name>`, and for the root also `menu.<name>`.
fn setting(call: &Call, id: &str, name: &str) -> Option<String> {
    call.get_var(&format!("menu.{id}.{name}"))
        .or_else(|| (id == ROOT).then(|| call.get_var(&format!("menu.{name}")))?)
}

fn route(call: &Call, id: &str, key: char) -> Option<String> {
    setting(call, id, &key.to_string()).or_else(|| {
        (id == ROOT).then(|| DEFAULT_ROUTES.iter().find(|(k, _)| *k == key).map(|(_, r)| (*r).to_owned()))?
    })
}

fn setting_or<T: std::str::FromStr>(call: &Call, id: &str, name: &str, default: T) -> T {
    setting(call, id, name).and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

struct IvrMenu;

impl Flow for IvrMenu {
    fn run(call: &Call) -> Result<(), FlowError> {
        call.answer()?;
        let mut id = ROOT.to_owned();
        let mut path = Vec::new();
        for _depth in 0..MAX_DEPTH {
            let prompt = setting(call, &id, "prompt").unwrap_or_else(|| "menu.wav".into());
            let invalid = setting(call, &id, "invalid-prompt").unwrap_or_else(|| "invalid.wav".into());
            let valid: String = "0123456789*#".chars().filter(|k| route(call, &id, *k).is_some()).collect();
            let options = MenuOptions {
                valid: &valid,
                retries: setting_or(call, &id, "retries", 2),
                invalid_prompt: Some(&invalid),
                timeout_ms: setting_or(call, &id, "timeout-ms", 5_000),
                ..MenuOptions::new(&prompt)
            };
            let Some(key) = menu(call, &options)? else {
                info("ivr-menu: no choice after retries, hanging up");
                finish(call)?;
                return Ok(());
            };
            path.push(format!("{id}:{key}"));
            let _ = call.set_var("menu.path", &path.join(","));
            let spec = route(call, &id, key).unwrap_or_default();
            match parse_action(&spec) {
                Some(Action::Menu(next)) => {
                    info(&format!("ivr-menu: key {key} -> menu {next}"));
                    id = next;
                    continue;
                }
                Some(Action::Dial(uri)) => {
                    info(&format!("ivr-menu: key {key} -> dial {uri}"));
                    let outcome = call.dial(&uri, &DialOptions::ringing_for(var_or(call, "menu.ring-ms", 30_000)))?;
                    info(&format!("ivr-menu: {uri}: {outcome:?}"));
                }
                Some(Action::Agent(url)) => {
                    info(&format!("ivr-menu: key {key} -> agent {url}"));
                    match call.agent(&url, &[])? {
                        AgentEnd::TransferRequested(target)
                            if !target_listed(&call.get_var("menu.transfer-targets").unwrap_or_default(), &target) =>
                        {
                            warn(&format!("ivr-menu: transfer to {target} refused: not in menu.transfer-targets"));
                            let _ = call.set_var("menu.transfer-refused", "not in menu.transfer-targets");
                        }
                        AgentEnd::TransferRequested(target) => {
                            info(&format!("ivr-menu: the agent transfers the caller to {target}"));
                            match call.transfer(&target) {
                                Ok(()) => {}
                                // The agent's target came from the network: the host checked it
                                // against the tenant's capabilities.
                                Err(CallError::NotAllowed(why) | CallError::InvalidArgument(why)) => {
                                    warn(&format!("ivr-menu: transfer to {target} refused: {why}"));
                                    let _ = call.set_var("menu.transfer-refused", &why);
                                }
                                Err(e) => return Err(e.into()),
                            }
                        }
                        other => info(&format!("ivr-menu: agent session ended: {other:?}")),
                    }
                }
                Some(Action::Transfer(uri)) => {
                    info(&format!("ivr-menu: key {key} -> transfer {uri}"));
                    call.transfer(&uri)?;
                }
                Some(Action::Voicemail) => {
                    info(&format!("ivr-menu: key {key} -> voicemail"));
                    match voicemail(call, &VoicemailOptions::from_vars(call)) {
                        Ok(_) | Err(CallError::Hangup) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Some(Action::Hangup) => {}
                None => {
                    warn(&format!("ivr-menu: action {spec:?} for key {key} in menu {id} is not valid"));
                    return Err(FlowError::Failed(format!("bad action for key {key} in menu {id}: {spec:?}")));
                }
            }
            finish(call)?;
            return Ok(());
        }
        Err(FlowError::Failed(format!("menus nested deeper than {MAX_DEPTH}: is there a loop?")))
    }
}

export_flow!(IvrMenu);
