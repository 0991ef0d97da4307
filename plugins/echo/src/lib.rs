//! Echo: answers, streams the caller's audio back by handle and repeats every key press.
//!
//! Frames go straight from the read side to the write side as handles: the samples never
//! enter this component's memory.

use patchbay_plugin_sdk::{Call, CallError, Flow, FlowError, StreamEvent, export_flow, info};

struct Echo;

impl Flow for Echo {
    fn run(call: &Call) -> Result<(), FlowError> {
        call.answer()?;
        info("echo: answered");
        let stream = call.open_audio_stream()?;
        loop {
            match stream.read() {
                Ok(StreamEvent::Frame(frame)) => stream.write(frame)?,
                Ok(StreamEvent::Dtmf(key)) => call.send_dtmf(&key.digit.to_string())?,
                // The caller hung up: that is how an echo call normally ends.
                Err(CallError::Hangup) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

export_flow!(Echo);
