//! The demo agent: a greeting, then an echo of what the caller says.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::StreamExt as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info};

use super::{accept_loop, accept_websocket, mean_amplitude, send_audio, send_text, tone_ulaw};
use crate::error::AgentError;
use crate::protocol::{AgentEncoder, PatchbayMessage, parse_patchbay_message};

/// Size of the payloads the echo is sent in: 100 ms, so Patchbay re-packetises.
const ECHO_PAYLOAD_MS: u64 = 100;

/// Longest utterance kept; beyond it the caller's audio is not buffered.
const MAX_UTTERANCE_BYTES: usize = 30 * 8000;

/// Energy voice-activity detection of the demo agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VadConfig {
    /// Mean absolute amplitude (16-bit linear) at or above which a frame is speech.
    pub threshold: u32,
    /// Speech needed before an utterance counts (and before barge-in), in ms.
    pub min_speech_ms: u32,
    /// Silence that ends an utterance, in ms.
    pub hangover_ms: u32,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self { threshold: 500, min_speech_ms: 200, hangover_ms: 700 }
    }
}

/// Configuration of the [`DemoAgent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoAgentConfig {
    /// μ-law audio played on `start`, as one payload followed by the mark `greeting`.
    pub greeting: Vec<u8>,
    /// Where DTMF `0` transfers the caller; `None` ignores `0`.
    pub transfer_target: Option<String>,
    /// Voice-activity detection.
    pub vad: VadConfig,
}

impl Default for DemoAgentConfig {
    /// A two-tone chime as greeting, no transfer target.
    fn default() -> Self {
        let mut greeting = tone_ulaw(660.0, 250, 6000);
        greeting.extend(tone_ulaw(880.0, 350, 6000));
        Self { greeting, transfer_target: None, vad: VadConfig::default() }
    }
}

/// The demo agent: greets, then echoes each utterance of the caller.
///
/// - On `start` it sends the greeting as one large `media` payload, then the mark `greeting`.
/// - An energy VAD runs on the caller's audio; once the caller has spoken for
///   [`VadConfig::min_speech_ms`] and then been quiet for [`VadConfig::hangover_ms`], the
///   utterance is sent back in 100 ms payloads followed by a mark `echo-N`.
/// - Barge-in: if the caller starts speaking while a mark it sent has not been echoed (its
///   audio is still playing), it sends `clear`.
/// - DTMF `0` sends `transfer` to the configured target; `#` sends `hangup`.
#[derive(Debug, Clone, Default)]
pub struct DemoAgent {
    config: Arc<DemoAgentConfig>,
}

impl DemoAgent {
    /// A demo agent with this configuration.
    pub fn new(config: DemoAgentConfig) -> Self {
        Self { config: Arc::new(config) }
    }

    /// Serves connections until the future is dropped.
    pub async fn serve(self, listener: TcpListener) {
        accept_loop(listener, "demo", move |tcp| {
            let agent = self.clone();
            async move {
                if let Err(err) = agent.handle(tcp).await {
                    info!(%err, "demo agent session ended with an error");
                }
            }
        })
        .await;
    }

    /// Runs one session on an accepted byte stream.
    pub async fn handle<S>(&self, stream: S) -> Result<(), AgentError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut ws = accept_websocket(stream).await?;
        let mut encoder: Option<AgentEncoder> = None;
        let mut vad = EnergyVad::new(self.config.vad.clone());
        // Marks sent whose audio Patchbay has not finished playing.
        let mut unplayed: HashSet<String> = HashSet::new();
        let mut echoes = 0u64;
        while let Some(message) = ws.next().await {
            let text = match message.map_err(AgentError::websocket)? {
                Message::Text(text) => text,
                Message::Close(_) => break,
                _ => continue,
            };
            let frame = match parse_patchbay_message(&text) {
                Ok(frame) => frame,
                Err(err) => {
                    debug!(%err, "demo agent ignores a malformed message");
                    continue;
                }
            };
            match frame.message {
                PatchbayMessage::Start { info: start, .. } => {
                    info!(
                        stream_sid = %start.stream_sid,
                        call_sid = %start.call_sid,
                        "demo agent started; greeting"
                    );
                    let enc = AgentEncoder::new(start.stream_sid);
                    if !self.config.greeting.is_empty() {
                        send_audio(&mut ws, &enc, &self.config.greeting, 0).await?;
                        send_text(&mut ws, enc.mark("greeting")).await?;
                        unplayed.insert("greeting".to_owned());
                    }
                    encoder = Some(enc);
                }
                PatchbayMessage::Media { payload, .. } => {
                    let Some(enc) = &encoder else { continue };
                    match vad.push(&payload) {
                        VadOutput::Nothing => {}
                        VadOutput::SpeechStarted => {
                            if !unplayed.is_empty() {
                                info!(marks = unplayed.len(), "caller barged in; clearing");
                                send_text(&mut ws, enc.clear()).await?;
                                unplayed.clear();
                            }
                        }
                        VadOutput::Utterance(audio) => {
                            echoes += 1;
                            let name = format!("echo-{echoes}");
                            info!(ms = audio.len() / 8, mark = %name, "echoing the caller");
                            send_audio(&mut ws, enc, &audio, ECHO_PAYLOAD_MS).await?;
                            send_text(&mut ws, enc.mark(&name)).await?;
                            unplayed.insert(name);
                        }
                    }
                }
                PatchbayMessage::Mark { name } => {
                    debug!(%name, "demo agent audio played");
                    unplayed.remove(&name);
                }
                PatchbayMessage::Dtmf { digit } => {
                    let Some(enc) = &encoder else { continue };
                    match (digit, &self.config.transfer_target) {
                        ('0', Some(target)) => {
                            info!(%target, "caller pressed 0; transferring");
                            send_text(&mut ws, enc.transfer(target)).await?;
                        }
                        ('0', None) => info!("caller pressed 0, but no transfer target is set"),
                        ('#', _) => {
                            info!("caller pressed #; hanging up");
                            send_text(&mut ws, enc.hangup()).await?;
                        }
                        _ => debug!(%digit, "demo agent ignores DTMF"),
                    }
                }
                PatchbayMessage::Stop => info!("demo agent stream stopped"),
                other => debug!(message = %other, "demo agent ignores a message"),
            }
        }
        Ok(())
    }
}

/// What the VAD concluded from one frame.
#[derive(Debug, PartialEq, Eq)]
enum VadOutput {
    Nothing,
    /// The caller has now spoken for `min_speech_ms`.
    SpeechStarted,
    /// The caller spoke and then was quiet for `hangover_ms`: the utterance, without the
    /// trailing silence.
    Utterance(Vec<u8>),
}

/// Energy VAD over media time (samples received), not wall time, so a burst of frames
/// behaves like the same frames in real time.
#[derive(Debug)]
struct EnergyVad {
    config: VadConfig,
    /// Some while an utterance (confirmed or not) is open.
    audio: Option<Vec<u8>>,
    voiced_samples: usize,
    silent_samples: usize,
    confirmed: bool,
}

impl EnergyVad {
    fn new(config: VadConfig) -> Self {
        Self { config, audio: None, voiced_samples: 0, silent_samples: 0, confirmed: false }
    }

    fn push(&mut self, mulaw: &[u8]) -> VadOutput {
        let loud = mean_amplitude(mulaw) >= self.config.threshold;
        let min_speech = self.config.min_speech_ms as usize * 8;
        let hangover = self.config.hangover_ms as usize * 8;
        let Some(audio) = &mut self.audio else {
            if !loud {
                return VadOutput::Nothing;
            }
            self.audio = Some(mulaw.to_vec());
            self.voiced_samples = mulaw.len();
            self.silent_samples = 0;
            self.confirmed = false;
            return self.confirm(min_speech);
        };
        if audio.len() < MAX_UTTERANCE_BYTES {
            audio.extend_from_slice(mulaw);
        }
        if loud {
            self.voiced_samples += mulaw.len();
            self.silent_samples = 0;
            return self.confirm(min_speech);
        }
        self.silent_samples += mulaw.len();
        if self.silent_samples < hangover {
            return VadOutput::Nothing;
        }
        let mut audio = self.audio.take().unwrap_or_default();
        if !self.confirmed {
            return VadOutput::Nothing;
        }
        let keep = audio.len().saturating_sub(self.silent_samples);
        audio.truncate(keep);
        VadOutput::Utterance(audio)
    }

    fn confirm(&mut self, min_speech: usize) -> VadOutput {
        if !self.confirmed && self.voiced_samples >= min_speech {
            self.confirmed = true;
            VadOutput::SpeechStarted
        } else {
            VadOutput::Nothing
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ULAW_SILENCE;

    fn feed(vad: &mut EnergyVad, audio: &[u8]) -> Vec<VadOutput> {
        audio.chunks(160).map(|f| vad.push(f)).filter(|o| *o != VadOutput::Nothing).collect()
    }

    #[test]
    fn utterance_is_returned_after_hangover_without_trailing_silence() {
        let mut vad = EnergyVad::new(VadConfig::default());
        let tone = tone_ulaw(440.0, 500, 8000);
        let out = feed(&mut vad, &tone);
        assert_eq!(out, [VadOutput::SpeechStarted]);
        let out = feed(&mut vad, &[ULAW_SILENCE; 8 * 1000]);
        assert_eq!(out, [VadOutput::Utterance(tone)]);
    }

    #[test]
    fn short_blips_are_not_utterances() {
        let mut vad = EnergyVad::new(VadConfig::default());
        let mut audio = tone_ulaw(440.0, 100, 8000);
        audio.extend([ULAW_SILENCE; 8 * 1000]);
        assert!(feed(&mut vad, &audio).is_empty());
    }
}
