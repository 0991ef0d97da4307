//! A scripted fake call for driving flows without a network.

#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use patchbay_host::{
    AgentEnd, CallControl, CallError, CallInfo, CollectEnd, CollectOptions, Collected, DialOptions, DialOutcome,
    Direction, Dtmf, HangupCause, MediaEvent, PlayOptions, PlayOutcome, RecordEnd, RecordOptions, Recording,
};
use patchbay_media::Frame;

/// One thing a flow asked its call to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    Answer,
    Hangup(String),
    Play(String),
    Collect {
        max: u32,
        prompt: Option<String>,
    },
    Sleep(u32),
    Dial(String),
    Transfer(String),
    Agent(String),
    Record,
    SendDtmf(String),
    OpenStream,
    CloseStream,
    /// A frame came back; `echoed` tells whether it is the very buffer the call handed out.
    WriteFrame {
        echoed: bool,
    },
}

/// A call whose answers are scripted and whose commands are recorded.
pub struct FakeCall {
    info: CallInfo,
    cmds: Mutex<Vec<Cmd>>,
    /// Results for successive `play` calls (default: completed).
    plays: Mutex<VecDeque<Result<PlayOutcome, CallError>>>,
    /// Results for successive `collect-digits` calls (default: timeout with no digits).
    collects: Mutex<VecDeque<Result<String, CallError>>>,
    /// What the audio stream delivers; when empty, `hangup`.
    media: Mutex<VecDeque<MediaEvent>>,
    handed_out: Mutex<Vec<Frame>>,
    /// How long every waiting operation takes.
    pub delay: Duration,
}

impl FakeCall {
    pub fn new(to: &str) -> Self {
        Self {
            info: CallInfo {
                call_id: "fake-1@test".into(),
                tenant: "default".into(),
                flow: "under-test".into(),
                from: "sip:alice@example.com".into(),
                to: to.into(),
                direction: Direction::Inbound,
                headers: Vec::new(),
            },
            cmds: Mutex::new(Vec::new()),
            plays: Mutex::new(VecDeque::new()),
            collects: Mutex::new(VecDeque::new()),
            media: Mutex::new(VecDeque::new()),
            handed_out: Mutex::new(Vec::new()),
            delay: Duration::ZERO,
        }
    }

    pub fn with_collects(self, digits: &[&str]) -> Self {
        self.collects.lock().unwrap().extend(digits.iter().map(|d| Ok(d.to_string())));
        self
    }

    pub fn with_plays(self, plays: Vec<Result<PlayOutcome, CallError>>) -> Self {
        self.plays.lock().unwrap().extend(plays);
        self
    }

    pub fn with_media(self, events: Vec<MediaEvent>) -> Self {
        self.media.lock().unwrap().extend(events);
        self
    }

    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn cmds(&self) -> Vec<Cmd> {
        self.cmds.lock().unwrap().clone()
    }

    fn push(&self, cmd: Cmd) {
        self.cmds.lock().unwrap().push(cmd);
    }

    async fn wait(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

#[async_trait]
impl CallControl for FakeCall {
    fn info(&self) -> CallInfo {
        self.info.clone()
    }

    async fn answer(&self) -> Result<(), CallError> {
        self.push(Cmd::Answer);
        Ok(())
    }

    async fn hangup(&self, cause: HangupCause) -> Result<(), CallError> {
        self.push(Cmd::Hangup(format!("{cause:?}")));
        Ok(())
    }

    async fn play(&self, prompt: &str, _options: PlayOptions) -> Result<PlayOutcome, CallError> {
        self.push(Cmd::Play(prompt.into()));
        self.wait().await;
        self.plays.lock().unwrap().pop_front().unwrap_or(Ok(PlayOutcome::Completed))
    }

    async fn collect_digits(&self, options: CollectOptions) -> Result<Collected, CallError> {
        self.push(Cmd::Collect { max: options.max_digits, prompt: options.prompt.clone() });
        self.wait().await;
        let next = self.collects.lock().unwrap().pop_front();
        match next {
            Some(Ok(digits)) if digits.is_empty() => Ok(Collected { digits, ended_by: CollectEnd::Timeout }),
            Some(Ok(digits)) => Ok(Collected { digits, ended_by: CollectEnd::MaxDigits }),
            Some(Err(e)) => Err(e),
            None => Ok(Collected { digits: String::new(), ended_by: CollectEnd::Timeout }),
        }
    }

    async fn sleep(&self, ms: u32) -> Result<(), CallError> {
        self.push(Cmd::Sleep(ms));
        tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
        Ok(())
    }

    async fn dial(&self, target: &str, _options: DialOptions) -> Result<DialOutcome, CallError> {
        self.push(Cmd::Dial(target.into()));
        self.wait().await;
        Ok(DialOutcome::Answered(patchbay_host::BridgeEnd::Callee))
    }

    async fn transfer(&self, target: &str) -> Result<(), CallError> {
        self.push(Cmd::Transfer(target.into()));
        Ok(())
    }

    async fn agent(&self, endpoint: &str, _params: &[(String, String)]) -> Result<AgentEnd, CallError> {
        self.push(Cmd::Agent(endpoint.into()));
        self.wait().await;
        Ok(AgentEnd::Completed)
    }

    async fn record(&self, _options: RecordOptions) -> Result<Recording, CallError> {
        self.push(Cmd::Record);
        Ok(Recording { id: "rec-1".into(), duration_ms: 0, ended_by: RecordEnd::Terminator })
    }

    async fn send_dtmf(&self, digits: &str) -> Result<(), CallError> {
        self.push(Cmd::SendDtmf(digits.into()));
        Ok(())
    }

    async fn next_dtmf(&self, _timeout_ms: u32) -> Result<Dtmf, CallError> {
        Err(CallError::Timeout)
    }

    fn open_audio_stream(&self) -> Result<(), CallError> {
        self.push(Cmd::OpenStream);
        Ok(())
    }

    fn close_audio_stream(&self) {
        self.push(Cmd::CloseStream);
    }

    async fn read_media(&self) -> Result<MediaEvent, CallError> {
        self.wait().await;
        let event = self.media.lock().unwrap().pop_front().ok_or(CallError::Hangup)?;
        if let MediaEvent::Frame(frame) = &event {
            self.handed_out.lock().unwrap().push(frame.clone());
        }
        Ok(event)
    }

    fn write_frame(&self, frame: Frame) -> Result<(), CallError> {
        let echoed = self.handed_out.lock().unwrap().iter().any(|f| f.same_buffer(&frame));
        self.push(Cmd::WriteFrame { echoed });
        Ok(())
    }
}

pub fn frame(value: i16) -> Frame {
    Frame::from_linear(&[value; 160], 8_000, 0).unwrap()
}

pub fn shared(call: FakeCall) -> Arc<FakeCall> {
    Arc::new(call)
}
