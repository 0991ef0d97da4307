//! Cuts agent audio of any payload length into 20 ms frames.
//!
//! Agents send `media` payloads of whatever length their TTS produced (20 ms, 40 ms, a whole
//! sentence). The caller side plays 160-byte frames, so payloads are concatenated and cut; a
//! remainder shorter than a frame is carried into the next payload. Events that mark a point
//! in the audio (`mark`, and the Patchbay `transfer`/`hangup`) first flush the remainder,
//! padded with μ-law silence, so they land right after the audio sent before them.

use std::collections::VecDeque;

use crate::protocol::{FRAME_BYTES, Frame160, ULAW_SILENCE};
use crate::stream::AgentEvent;

/// The carried remainder of agent audio; output goes into the caller's event queue.
#[derive(Debug)]
pub(crate) struct Repacketizer {
    carry: Frame160,
    carry_len: usize,
}

impl Default for Repacketizer {
    fn default() -> Self {
        Self { carry: [ULAW_SILENCE; FRAME_BYTES], carry_len: 0 }
    }
}

impl Repacketizer {
    /// Appends agent audio, queueing every frame it completes.
    pub(crate) fn push_audio(&mut self, mut payload: &[u8], out: &mut VecDeque<AgentEvent>) {
        if self.carry_len > 0 {
            let take = (FRAME_BYTES - self.carry_len).min(payload.len());
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&payload[..take]);
            self.carry_len += take;
            payload = &payload[take..];
            if self.carry_len < FRAME_BYTES {
                return;
            }
            out.push_back(AgentEvent::Audio(self.carry));
            self.carry_len = 0;
        }
        let mut frames = payload.chunks_exact(FRAME_BYTES);
        for frame in &mut frames {
            if let Ok(full) = Frame160::try_from(frame) {
                out.push_back(AgentEvent::Audio(full));
            }
        }
        let rest = frames.remainder();
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carry_len = rest.len();
    }

    /// Queues the carried remainder as a frame padded with silence, if there is one.
    pub(crate) fn flush(&mut self, out: &mut VecDeque<AgentEvent>) {
        if self.carry_len == 0 {
            return;
        }
        self.carry[self.carry_len..].fill(ULAW_SILENCE);
        out.push_back(AgentEvent::Audio(self.carry));
        self.carry_len = 0;
    }

    /// Flushes the remainder, then queues `event` after it.
    pub(crate) fn push_after_audio(&mut self, event: AgentEvent, out: &mut VecDeque<AgentEvent>) {
        self.flush(out);
        out.push_back(event);
    }

    /// `clear`: drops the remainder and every frame not yet handed to the caller, keeps the
    /// marks among them (the caller echoes them, as Twilio does for cleared marks), then
    /// queues [`AgentEvent::Clear`] so the caller flushes its own playout queue.
    pub(crate) fn clear(&mut self, out: &mut VecDeque<AgentEvent>) {
        self.carry_len = 0;
        out.retain(|event| !matches!(event, AgentEvent::Audio(_)));
        out.push_back(AgentEvent::Clear);
    }

    /// Bytes carried towards the next frame.
    #[cfg(test)]
    pub(crate) fn carried(&self) -> usize {
        self.carry_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(out: &VecDeque<AgentEvent>) -> Vec<Frame160> {
        out.iter()
            .filter_map(|e| match e {
                AgentEvent::Audio(f) => Some(*f),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn odd_payloads_are_cut_into_frames_with_carry() {
        let audio: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let mut r = Repacketizer::default();
        let mut out = VecDeque::new();
        // 1000 bytes in payloads of 7, 333, 1, 159, 500 bytes.
        let mut at = 0;
        for len in [7, 333, 1, 159, 500] {
            r.push_audio(&audio[at..at + len], &mut out);
            at += len;
        }
        assert_eq!(at, 1000);
        let got = frames(&out);
        assert_eq!(got.len(), 6);
        assert_eq!(r.carried(), 40);
        let joined: Vec<u8> = got.iter().flatten().copied().collect();
        assert_eq!(joined, audio[..960]);
    }

    #[test]
    fn mark_flushes_padded_remainder_first() {
        let mut r = Repacketizer::default();
        let mut out = VecDeque::new();
        r.push_audio(&[1; 200], &mut out);
        r.push_after_audio(AgentEvent::Mark("m".into()), &mut out);
        assert_eq!(out.len(), 3);
        match &out[1] {
            AgentEvent::Audio(f) => {
                assert_eq!(f[..40], [1; 40]);
                assert_eq!(f[40..], [ULAW_SILENCE; 120]);
            }
            other => panic!("expected audio, got {other:?}"),
        }
        assert_eq!(out[2], AgentEvent::Mark("m".into()));
        assert_eq!(r.carried(), 0);
    }

    #[test]
    fn clear_drops_carry_and_queued_audio_but_keeps_marks() {
        let mut r = Repacketizer::default();
        let mut out = VecDeque::new();
        r.push_audio(&[1; 160], &mut out);
        r.push_after_audio(AgentEvent::Mark("a".into()), &mut out);
        r.push_audio(&[2; 250], &mut out);
        r.clear(&mut out);
        assert_eq!(out.iter().cloned().collect::<Vec<_>>(), [AgentEvent::Mark("a".into()), AgentEvent::Clear]);
        assert_eq!(r.carried(), 0);
        out.clear();
        r.push_audio(&[3; 160], &mut out);
        assert_eq!(frames(&out), [[3; 160]]);
    }
}
