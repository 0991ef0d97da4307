//! The on-disk cache of precompiled flows, and why its files may be loaded.
//!
//! `Component::deserialize` maps the artifact's native code into the process: loading bytes
//! that someone else wrote runs their code as Patchbay. So an entry is loaded only if this
//! install wrote it:
//!
//! - a per-install key, `cache-key` in the cache directory (32 bytes from the OS's CSPRNG,
//!   mode 0600), authenticates every entry with HMAC-SHA256 over the entry's name and the
//!   artifact. The name carries the component's hash and the engine fingerprint, so a valid
//!   entry renamed to another flow's name does not verify either;
//! - the key file must be a regular file owned by our effective uid and not accessible to group
//!   or others; otherwise the cache is not used at all (one warning), since a key others can
//!   read lets them forge entries;
//! - an entry must be a regular file owned by our effective uid, not writable by group or
//!   others, and its MAC must match (compared in constant time). Anything else is a miss: the
//!   flow is compiled again and the entry overwritten.
//!
//! Writing is best effort: the compiled code is in memory, so a cache that cannot be written
//! (read-only directory, disk full) costs the next start a compile and nothing else. The first
//! failure is logged as a warning naming the directory, later ones at debug.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Name of the key file inside the cache directory.
pub(crate) const KEY_FILE: &str = "cache-key";
const KEY_LEN: usize = 32;
/// An entry is the MAC followed by the artifact.
const MAC_LEN: usize = 32;
/// Separates this use of the key from any other (and this entry format from a later one).
const DOMAIN: &[u8] = b"patchbay flow cache v1\0";

type CacheKey = [u8; KEY_LEN];

/// The precompiled-flow cache of one directory.
#[derive(Debug)]
pub(crate) struct ArtifactCache {
    dir: PathBuf,
    /// Loaded (or created) on first use; `None` when the cache must not be used.
    key: OnceLock<Option<CacheKey>>,
    write_warned: AtomicBool,
}

/// Why an entry was not used.
#[derive(Debug)]
enum Miss {
    /// There is none under this name.
    Absent,
    /// There is one, but it is not provably ours.
    Untrusted(String),
}

impl ArtifactCache {
    /// A cache in `dir`. Touches nothing on disk until first used.
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self { dir, key: OnceLock::new(), write_warned: AtomicBool::new(false) }
    }

    fn key(&self) -> Option<&CacheKey> {
        self.key
            .get_or_init(|| match load_or_create_key(&self.dir, euid()) {
                Ok(key) => Some(key),
                Err(reason) => {
                    tracing::warn!(
                        dir = %self.dir.display(),
                        "flow cache not used, flows are compiled at every load: {reason}"
                    );
                    None
                }
            })
            .as_ref()
    }

    /// The artifact stored as `name`, if this install wrote it and nobody changed it since.
    pub(crate) fn get(&self, name: &str) -> Option<Vec<u8>> {
        let key = self.key()?;
        let path = self.dir.join(name);
        match read_entry(&path, key, name, euid()) {
            Ok(artifact) => Some(artifact),
            Err(Miss::Absent) => None,
            Err(Miss::Untrusted(reason)) => {
                tracing::warn!(path = %path.display(), "ignoring a cached flow, compiling it again: {reason}");
                None
            }
        }
    }

    /// Stores `artifact` as `name`, replacing what is there. Failures are logged, not returned.
    pub(crate) fn put(&self, name: &str, artifact: &[u8]) {
        let Some(key) = self.key() else { return };
        if let Err(e) = write_entry(&self.dir, name, key, artifact) {
            if self.write_warned.swap(true, Ordering::Relaxed) {
                tracing::debug!(dir = %self.dir.display(), error = %e, "could not cache a compiled flow");
            } else {
                tracing::warn!(
                    dir = %self.dir.display(),
                    error = %e,
                    "cannot write the flow cache: flows still run but are compiled again at each start \
                     (further write failures are logged at debug)"
                );
            }
        }
    }

    /// Whether a write has failed (and been reported).
    #[cfg(test)]
    fn write_failed(&self) -> bool {
        self.write_warned.load(Ordering::Relaxed)
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail (POSIX).
    unsafe { libc::geteuid() }
}

/// Opens an existing file for reading without following a symlink in its last component, and
/// without blocking should it be a FIFO (it is then refused as not a regular file).
fn open_existing(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)
}

/// Refuses a file unless it is a regular file owned by `euid` without any of the `forbidden`
/// mode bits.
fn check_owned(meta: &std::fs::Metadata, euid: u32, forbidden: u32) -> Result<(), String> {
    if !meta.file_type().is_file() {
        return Err("not a regular file".into());
    }
    if meta.uid() != euid {
        return Err(format!("owned by uid {}, not by uid {euid} that runs Patchbay", meta.uid()));
    }
    let mode = meta.mode() & 0o777;
    if mode & forbidden != 0 {
        return Err(format!("mode {mode:04o} gives group or others access (at most {:04o})", 0o777 & !forbidden));
    }
    Ok(())
}

fn read_key(path: &Path, euid: u32) -> Result<Option<CacheKey>, String> {
    let mut file = match open_existing(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    // Checked on the open file, so a swap between the check and the read changes nothing.
    let meta = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?;
    check_owned(&meta, euid, 0o077).map_err(|reason| format!("{}: {reason}", path.display()))?;
    if meta.len() != KEY_LEN as u64 {
        return Err(format!("{}: {} bytes, not {KEY_LEN}", path.display(), meta.len()));
    }
    let mut key = [0; KEY_LEN];
    file.read_exact(&mut key).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some(key))
}

/// A name for a temporary file next to `name` that no other writer (thread or process) uses.
fn temp_name(dir: &Path, name: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let unique = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{name}.tmp.{}.{unique}", std::process::id()))
}

/// Creates a file only we can read or write; fails if the name exists (even as a symlink).
fn create_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}

fn load_or_create_key(dir: &Path, euid: u32) -> Result<CacheKey, String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create the directory: {e}"))?;
    let path = dir.join(KEY_FILE);
    if let Some(key) = read_key(&path, euid)? {
        return Ok(key);
    }
    let mut key = [0; KEY_LEN];
    getrandom::fill(&mut key).map_err(|e| format!("no randomness for a cache key: {e}"))?;
    // Written under a temporary name and linked into place: two processes starting at once
    // never read a half-written key, and the first link wins (a link never replaces a file).
    let tmp = temp_name(dir, KEY_FILE);
    let written = create_private(&tmp).and_then(|mut file| file.write_all(&key));
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, &path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_key(&path, euid)?.ok_or_else(|| format!("{} vanished while being created", path.display()))
        }
        Err(e) => Err(format!("cannot create {}: {e}", path.display())),
    }
}

fn mac(key: &CacheKey, name: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(DOMAIN);
    mac.update(&(name.len() as u64).to_le_bytes());
    mac.update(name.as_bytes());
    mac
}

fn read_entry(path: &Path, key: &CacheKey, name: &str, euid: u32) -> Result<Vec<u8>, Miss> {
    let mut file = match open_existing(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Miss::Absent),
        Err(e) => return Err(Miss::Untrusted(e.to_string())),
    };
    let meta = file.metadata().map_err(|e| Miss::Untrusted(e.to_string()))?;
    // Checked before reading: a file someone else placed here is never even read.
    check_owned(&meta, euid, 0o022).map_err(Miss::Untrusted)?;
    // Read into memory rather than mapped: a mapped file truncated by someone else while the
    // flow is loaded would bring the process down with SIGBUS.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.read_to_end(&mut bytes).map_err(|e| Miss::Untrusted(e.to_string()))?;
    if bytes.len() < MAC_LEN {
        return Err(Miss::Untrusted("shorter than its MAC".into()));
    }
    let artifact = bytes.split_off(MAC_LEN);
    let mut check = mac(key, name);
    check.update(&artifact);
    // `verify_slice` compares in constant time.
    check.verify_slice(&bytes).map_err(|_| {
        Miss::Untrusted("its MAC does not match (changed since written, or written by another install)".into())
    })?;
    Ok(artifact)
}

/// Writes an entry under a unique temporary name, then renames it into place, so a crash or a
/// concurrent writer never leaves a half-written file under the real name.
fn write_entry(dir: &Path, name: &str, key: &CacheKey, artifact: &[u8]) -> std::io::Result<()> {
    let mut tag = mac(key, name);
    tag.update(artifact);
    let tag = tag.finalize().into_bytes();
    let tmp = temp_name(dir, name);
    let result = create_private(&tmp)
        .and_then(|mut file| {
            file.write_all(&tag)?;
            file.write_all(artifact)
        })
        .and_then(|()| std::fs::rename(&tmp, dir.join(name)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const NAME: &str = "abc-0123.cwasm";

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn an_entry_round_trips_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::new(dir.path().join("flows"));
        assert_eq!(cache.get(NAME), None);
        cache.put(NAME, b"artifact");
        assert_eq!(cache.get(NAME).as_deref(), Some(&b"artifact"[..]));
        let entry = std::fs::metadata(dir.path().join("flows").join(NAME)).unwrap();
        assert_eq!(entry.mode() & 0o777, 0o600);
        let key = std::fs::metadata(dir.path().join("flows").join(KEY_FILE)).unwrap();
        assert_eq!((key.mode() & 0o777, key.len()), (0o600, KEY_LEN as u64));
        // A second cache on the same directory (the next start) reads the same key.
        assert_eq!(ArtifactCache::new(dir.path().join("flows")).get(NAME).as_deref(), Some(&b"artifact"[..]));
        assert!(!cache.write_failed());
    }

    #[test]
    fn a_flipped_byte_a_renamed_entry_or_a_foreign_key_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::new(dir.path().to_owned());
        cache.put(NAME, b"artifact");
        let path = dir.path().join(NAME);
        let good = std::fs::read(&path).unwrap();
        for at in [0, MAC_LEN, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            std::fs::write(&path, &bad).unwrap();
            assert_eq!(cache.get(NAME), None, "byte {at} flipped");
        }
        // A valid entry under another flow's name does not verify.
        std::fs::write(&path, &good).unwrap();
        std::fs::copy(&path, dir.path().join("other-0123.cwasm")).unwrap();
        assert_eq!(cache.get("other-0123.cwasm"), None);
        // Nor does one made with another install's key.
        let elsewhere = tempfile::tempdir().unwrap();
        ArtifactCache::new(elsewhere.path().to_owned()).put(NAME, b"artifact");
        std::fs::copy(elsewhere.path().join(NAME), &path).unwrap();
        assert_eq!(cache.get(NAME), None);
        // Truncated below the MAC.
        std::fs::write(&path, &good[..MAC_LEN - 1]).unwrap();
        assert_eq!(cache.get(NAME), None);
    }

    #[test]
    fn an_entry_others_may_write_or_a_symlink_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::new(dir.path().to_owned());
        cache.put(NAME, b"artifact");
        let path = dir.path().join(NAME);
        for mode in [0o620, 0o602, 0o666] {
            chmod(&path, mode);
            assert_eq!(cache.get(NAME), None, "mode {mode:o}");
        }
        // Readable by others is fine: the code is not secret, only its integrity matters.
        chmod(&path, 0o644);
        assert!(cache.get(NAME).is_some());
        std::fs::rename(&path, dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), &path).unwrap();
        assert_eq!(cache.get(NAME), None);
    }

    #[test]
    fn a_key_others_can_read_or_that_is_not_ours_disables_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        ArtifactCache::new(dir.path().to_owned()).put(NAME, b"artifact");
        let key = dir.path().join(KEY_FILE);
        for mode in [0o644, 0o640, 0o604, 0o620] {
            chmod(&key, mode);
            let cache = ArtifactCache::new(dir.path().to_owned());
            assert_eq!(cache.get(NAME), None, "key mode {mode:o}");
            assert!(cache.key().is_none());
        }
        chmod(&key, 0o600);
        assert!(read_key(&key, euid()).unwrap().is_some());
        let err = read_key(&key, euid().wrapping_add(1)).expect_err("another owner");
        assert!(err.contains("owned by uid"), "{err}");
        // A key of the wrong length is refused too, not padded.
        std::fs::write(&key, [7; KEY_LEN + 1]).unwrap();
        assert!(read_key(&key, euid()).is_err());
    }

    #[test]
    fn an_entry_not_ours_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::new(dir.path().to_owned());
        cache.put(NAME, b"artifact");
        let key = cache.key().copied().unwrap();
        let path = dir.path().join(NAME);
        assert!(read_entry(&path, &key, NAME, euid()).is_ok());
        assert!(matches!(read_entry(&path, &key, NAME, euid().wrapping_add(1)), Err(Miss::Untrusted(_))));
    }

    #[test]
    fn a_write_failure_is_reported_once_and_reading_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::new(dir.path().to_owned());
        cache.put(NAME, b"artifact");
        // A non-empty directory where the entry should go: renaming onto it fails even for
        // root, whom a read-only mode would not stop.
        let blocked = "blocked-0123.cwasm";
        std::fs::create_dir(dir.path().join(blocked)).unwrap();
        std::fs::write(dir.path().join(blocked).join("x"), b"").unwrap();
        cache.put(blocked, b"artifact");
        assert!(cache.write_failed());
        assert_eq!(cache.get(blocked), None);
        assert!(cache.get(NAME).is_some());
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }
}
