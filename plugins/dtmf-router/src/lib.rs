//! DTMF router: asks for an extension (a fixed number of digits or ended by `#`) and dials
//! the SIP URI the routing table gives for it.
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `router.prompt` | asks for the extension | `extension.wav` |
//! | `router.digits` | digits in an extension (`#` ends a shorter one) | `4` |
//! | `router.timeout-ms` | time for the first digit, and between digits | `5000` |
//! | `router.retries` | extra attempts after no input or an unknown extension | `2` |
//! | `router.invalid-prompt` | played after an unknown extension | `invalid.wav` |
//! | `router.ext.<digits>` | where an extension goes: a SIP URI | none |
//! | `router.default` | where any other extension goes (`{ext}` is replaced by it) | none |
//! | `router.default-match` | extensions `router.default` takes: patterns, comma-separated (`X` any digit, `Z` 1-9, `N` 2-9) | any |
//! | `router.ring-ms` | how long the destination may ring | `30000` |
//! | `router.failed-prompt` | played when the destination does not answer | `goodbye.wav` |
//!
//! The caller's digits reach `router.default` only when they are all `0`-`9` (`*` and `A`-`D`
//! lead to PBX feature codes) and, with `router.default-match`, match one of its patterns.
//!
//! Sets `router.extension`, `router.target` and `router.outcome` for the CDR.

use patchbay_plugin_sdk::{
    Call, CollectOptions, DialOptions, DialOutcome, Flow, FlowError, PlayOptions, dial_outcome_text, export_flow,
    finish, info, var_or, warn,
};

/// Where `extension` goes, from the routing table in the call's variables.
fn target_for(call: &Call, extension: &str) -> Option<String> {
    call.get_var(&format!("router.ext.{extension}"))
        .or_else(|| {
            default_takes(call.get_var("router.default-match").as_deref(), extension)
                .then(|| call.get_var("router.default").map(|t| t.replace("{ext}", extension)))?
        })
        .filter(|t| !t.is_empty())
}

/// Whether `router.default` may take `extension` (caller-supplied): digits only, and one of
/// the comma-separated `patterns` when set (`X` any digit, `Z` 1-9, `N` 2-9, a digit itself).
fn default_takes(patterns: Option<&str>, extension: &str) -> bool {
    let fits = |pattern: &str| {
        pattern.chars().count() == extension.len()
            && pattern.chars().zip(extension.chars()).all(|(p, d)| match p.to_ascii_uppercase() {
                'X' => true,
                'Z' => d != '0',
                'N' => d >= '2',
                p => p == d,
            })
    };
    !extension.is_empty()
        && extension.bytes().all(|b| b.is_ascii_digit())
        && patterns.is_none_or(|list| list.split(',').map(str::trim).any(fits))
}

struct DtmfRouter;

impl Flow for DtmfRouter {
    fn run(call: &Call) -> Result<(), FlowError> {
        call.answer()?;
        let prompt = call.get_var("router.prompt").unwrap_or_else(|| "extension.wav".into());
        let invalid = call.get_var("router.invalid-prompt").unwrap_or_else(|| "invalid.wav".into());
        let timeout = var_or(call, "router.timeout-ms", 5_000);
        let options = CollectOptions {
            max_digits: var_or(call, "router.digits", 4u32).max(1),
            terminators: "#".into(),
            first_digit_timeout_ms: timeout,
            inter_digit_timeout_ms: timeout,
            prompt: Some(prompt),
            barge_in: true,
        };
        for _attempt in 0..=var_or(call, "router.retries", 2u32) {
            let collected = call.collect_digits(&options)?;
            if collected.digits.is_empty() {
                continue;
            }
            let extension = collected.digits;
            let _ = call.set_var("router.extension", &extension);
            let Some(target) = target_for(call, &extension) else {
                warn(&format!("dtmf-router: no route for extension {extension}"));
                call.play(&invalid, PlayOptions::uninterruptible())?;
                continue;
            };
            info(&format!("dtmf-router: extension {extension} -> {target}"));
            let _ = call.set_var("router.target", &target);
            let outcome = call.dial(&target, &DialOptions::ringing_for(var_or(call, "router.ring-ms", 30_000)))?;
            let _ = call.set_var("router.outcome", &dial_outcome_text(&outcome));
            if !matches!(outcome, DialOutcome::Answered(_)) {
                info(&format!("dtmf-router: {target} did not answer: {outcome:?}"));
                let failed = call.get_var("router.failed-prompt").unwrap_or_else(|| "goodbye.wav".into());
                call.play(&failed, PlayOptions::uninterruptible())?;
            }
            finish(call)?;
            return Ok(());
        }
        info("dtmf-router: no extension after retries, hanging up");
        finish(call)?;
        Ok(())
    }
}

export_flow!(DtmfRouter);

#[cfg(test)]
mod tests {
    use super::default_takes;

    #[test]
    fn the_default_route_takes_only_digits() {
        assert!(default_takes(None, "2001"));
        for ext in ["", "*72", "*", "12A4", "9D"] {
            assert!(!default_takes(None, ext), "{ext:?}");
        }
    }

    #[test]
    fn the_default_route_takes_only_what_router_default_match_lists() {
        let patterns = Some("2XXX, 30NZ");
        for ext in ["2000", "2999", "3021"] {
            assert!(default_takes(patterns, ext), "{ext:?}");
        }
        for ext in ["1000", "200", "20000", "3011", "3020", "9001", "2*00"] {
            assert!(!default_takes(patterns, ext), "{ext:?}");
        }
        assert!(!default_takes(Some(""), "2000"), "an empty list closes the default route");
    }
}
