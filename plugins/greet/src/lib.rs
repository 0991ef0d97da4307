//! Greet: answers (an outbound call placed through the API is already answered), plays a
//! prompt and hangs up — the flow for notification calls and for trying a trunk.
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `greet.prompt` | the prompt to play | `welcome.wav` |
//! | `greet.repeat` | how many times to play it | `2` (about three seconds) |

use patchbay_plugin_sdk::{Call, CallError, Flow, FlowError, HangupCause, PlayOptions, export_flow, info, var_or};

struct Greet;

impl Flow for Greet {
    fn run(call: &Call) -> Result<(), FlowError> {
        call.answer()?;
        let prompt = call.get_var("greet.prompt").unwrap_or_else(|| "welcome.wav".into());
        let repeat = var_or(call, "greet.repeat", 2u32).clamp(1, 20);
        match call.play(&prompt, PlayOptions { barge_in: false, repeat }) {
            Ok(_) => {}
            // The callee hung up first: nothing left to do.
            Err(CallError::Hangup) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        info("greet: played, hanging up");
        call.hangup(HangupCause::Normal)?;
        Ok(())
    }
}

export_flow!(Greet);
