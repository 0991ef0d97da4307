//! Each tenant's prompts: WAV files from the tenant's `prompts` directory, then the stock
//! prompts built into the binary, each decoded once and kept (with its G.711 encodings, made
//! once per codec by [`Prompt::encoded`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use patchbay_host::CallError;
use patchbay_media::prompt::Prompt;

/// The stock prompts (8 kHz μ-law WAV; the speech was made with espeak-ng).
const STOCK: [(&str, &[u8]); 12] = [
    ("menu.wav", include_bytes!("../prompts/menu.wav")),
    ("invalid.wav", include_bytes!("../prompts/invalid.wav")),
    ("goodbye.wav", include_bytes!("../prompts/goodbye.wav")),
    ("welcome.wav", include_bytes!("../prompts/welcome.wav")),
    ("beep.wav", include_bytes!("../prompts/beep.wav")),
    ("voicemail.wav", include_bytes!("../prompts/voicemail.wav")),
    ("thanks.wav", include_bytes!("../prompts/thanks.wav")),
    ("extension.wav", include_bytes!("../prompts/extension.wav")),
    ("connecting.wav", include_bytes!("../prompts/connecting.wav")),
    ("agent-unavailable.wav", include_bytes!("../prompts/agent-unavailable.wav")),
    // The built-in demo agent's greeting.
    ("agent-greeting.wav", include_bytes!("../prompts/agent-greeting.wav")),
    // North American ringback (440 + 480 Hz, 2 s on, 4 s off), played while `dial` rings.
    ("ringback.wav", include_bytes!("../prompts/ringback.wav")),
];

/// Most prompts one tenant keeps decoded (a prompt of 10 s at 8 kHz is ~160 KB with its
/// encodings).
const MAX_CACHED: usize = 1_024;

/// One tenant's prompts.
#[derive(Debug)]
pub struct PromptStore {
    dir: Option<PathBuf>,
    cache: Mutex<HashMap<String, Arc<Prompt>>>,
}

impl PromptStore {
    /// Prompts from `dir` (if any), then the stock ones.
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir, cache: Mutex::new(HashMap::new()) }
    }

    /// The prompt called `name` (a file name such as `menu.wav`; `.wav` may be left out).
    pub fn get(&self, name: &str) -> Result<Arc<Prompt>, CallError> {
        let file = if name.ends_with(".wav") { name.to_owned() } else { format!("{name}.wav") };
        // A prompt name is a file name, never a path: flows must not read outside the
        // tenant's directory.
        if file.is_empty() || file.contains(['/', '\\', '\0']) || file.starts_with('.') {
            return Err(CallError::InvalidArgument(format!("prompt {name:?} is not a file name")));
        }
        if let Some(prompt) = self.cache.lock().unwrap_or_else(PoisonError::into_inner).get(&file) {
            return Ok(Arc::clone(prompt));
        }
        let prompt = self.load(&file)?;
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(file, Arc::clone(&prompt));
        Ok(prompt)
    }

    fn load(&self, file: &str) -> Result<Arc<Prompt>, CallError> {
        if let Some(dir) = &self.dir {
            let path = dir.join(file);
            match std::fs::read(&path) {
                Ok(bytes) => {
                    return Prompt::from_wav(&path.display().to_string(), &bytes)
                        .map(Arc::new)
                        .map_err(|e| CallError::InvalidArgument(e.to_string()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CallError::Unavailable(format!("prompt {}: {e}", path.display()))),
            }
        }
        let Some((_, bytes)) = STOCK.iter().find(|(stock, _)| *stock == file) else {
            return Err(CallError::InvalidArgument(format!("no prompt {file:?}")));
        };
        Prompt::from_wav(file, bytes).map(Arc::new).map_err(|e| CallError::InvalidArgument(e.to_string()))
    }
}

/// A stock prompt's audio as μ-law octets (for the demo agent, which speaks Twilio's format).
pub fn stock_ulaw(name: &str) -> Option<Vec<u8>> {
    let (_, bytes) = STOCK.iter().find(|(n, _)| *n == name)?;
    let prompt = Prompt::from_wav(name, bytes).ok()?;
    let mut out = Vec::new();
    let mut frame = [0u8; 160];
    let mut index = 0;
    while prompt.frame_into(patchbay_media::prompt::PromptCodec::Pcmu, index, &mut frame) {
        out.extend_from_slice(&frame);
        index += 1;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stock_prompts_load_and_tenant_files_come_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PromptStore::new(Some(dir.path().to_owned()));
        for (name, _) in STOCK {
            let prompt = store.get(name).expect("stock prompt");
            assert!(prompt.duration_ms() > 200, "{name}");
        }
        assert!(Arc::ptr_eq(&store.get("menu").expect("menu"), &store.get("menu.wav").expect("menu")), "cached");
        // A tenant's own beep.wav replaces the stock one.
        let fresh = PromptStore::new(Some(dir.path().to_owned()));
        std::fs::write(dir.path().join("beep.wav"), STOCK[2].1).expect("write");
        assert_eq!(
            fresh.get("beep").expect("beep").duration_ms(),
            store.get("goodbye").expect("goodbye").duration_ms()
        );
    }

    #[test]
    fn bad_names_and_bad_files_are_refused_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("broken.wav"), b"not a wav").expect("write");
        let store = PromptStore::new(Some(dir.path().to_owned()));
        for bad in ["../etc/passwd", "a/b.wav", ".hidden", ""] {
            assert!(matches!(store.get(bad), Err(CallError::InvalidArgument(_))), "{bad}");
        }
        let Err(CallError::InvalidArgument(message)) = store.get("broken") else { panic!("accepted") };
        assert!(message.contains("broken.wav") && message.contains("not a WAV file"), "{message}");
        let Err(CallError::InvalidArgument(message)) = store.get("nothing") else { panic!("accepted") };
        assert!(message.contains("no prompt"), "{message}");
    }
}
