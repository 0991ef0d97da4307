//! Voicemail: greets the caller, beeps and records a message until `#`, silence, the time limit
//! or a hang-up; the host stores it as a WAV file plus JSON metadata in the tenant's storage.
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `voicemail.greeting` | greeting prompt (a key skips it) | `voicemail.wav` |
//! | `voicemail.thanks` | played after the message (empty: none) | `thanks.wav` |
//! | `voicemail.max-ms` | longest message | `120000` |
//! | `voicemail.silence-ms` | silence that ends the message (0: off) | `5000` |
//!
//! Sets `voicemail.recording` (the recording id) and `voicemail.duration-ms` for the CDR.

use patchbay_plugin_sdk::{Call, CallError, Flow, FlowError, VoicemailOptions, export_flow, finish, info, voicemail};

struct Voicemail;

impl Flow for Voicemail {
    fn run(call: &Call) -> Result<(), FlowError> {
        match voicemail(call, &VoicemailOptions::from_vars(call)) {
            Ok(recording) => {
                info(&format!(
                    "voicemail: stored {} ({} ms, ended by {:?})",
                    recording.id, recording.duration_ms, recording.ended_by
                ));
                finish(call)?;
                Ok(())
            }
            // Hanging up before the beep leaves no message: a normal end.
            Err(CallError::Hangup) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

export_flow!(Voicemail);
