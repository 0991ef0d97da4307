//! Compiled flows keyed by (tenant, flow name), and the on-disk cache of precompiled code.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use crate::bindings::FlowPre;
use crate::cache::ArtifactCache;
use crate::engine::FlowEngine;
use crate::error::HostError;
use crate::state::FlowState;

/// Identifies a flow: the tenant that owns it and its name within the tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Tenant id (a default tenant is still a tenant).
    pub tenant: String,
    /// Flow name, for example `ivr-menu`.
    pub flow: String,
}

impl FlowKey {
    /// Builds a key.
    pub fn new(tenant: impl Into<String>, flow: impl Into<String>) -> Self {
        Self { tenant: tenant.into(), flow: flow.into() }
    }
}

/// An immutable compiled flow: the component, its pre-instance (imports resolved once) and its
/// version, the SHA-256 of the component bytes. Calls hold an `Arc` to the entry they started
/// with, so replacing an entry never disturbs a live call.
pub struct CompiledFlow {
    name: String,
    version: String,
    /// Shared by every loaded flow with these bytes (see `FlowEngine::loaded`).
    pre: Arc<FlowPre<FlowState>>,
}

impl std::fmt::Debug for CompiledFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledFlow").field("name", &self.name).field("version", &self.version).finish_non_exhaustive()
    }
}

impl CompiledFlow {
    /// Compiles (or loads from `cache_dir`) a component and checks it against the world.
    ///
    /// Blocking and CPU-heavy (Cranelift): call it outside the async workers.
    pub fn compile(engine: &FlowEngine, name: &str, bytes: &[u8]) -> Result<Self, HostError> {
        let version = hex::encode(Sha256::digest(bytes));
        if let Some(pre) = engine.loaded(&version) {
            return Ok(Self { name: name.into(), version, pre });
        }
        let component = match engine.cache() {
            Some(cache) => load_cached(engine, cache, name, &version, bytes)?,
            None => Component::new(engine.engine(), bytes)
                .map_err(|e| HostError::Compile { flow: name.into(), detail: format!("{e:#}") })?,
        };
        let mismatch = |e: wasmtime::Error| HostError::WorldMismatch { flow: name.into(), detail: format!("{e:#}") };
        let instance_pre = crate::wasi::instantiate_pre(engine.engine(), engine.linker(), name, &component)?;
        let pre = Arc::new(FlowPre::new(instance_pre).map_err(mismatch)?);
        engine.remember(&version, &pre);
        Ok(Self { name: name.into(), version, pre })
    }

    /// The flow's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// SHA-256 of the component bytes, hex.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub(crate) fn pre(&self) -> &FlowPre<FlowState> {
        &self.pre
    }
}

/// Feeds `Hash` output into SHA-256 so that the engine's compatibility hash gives a stable
/// file name (std's `DefaultHasher` is not stable across Rust releases).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        // Only `write` matters here; the digest is read with `finalize`.
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

fn engine_fingerprint(engine: &FlowEngine) -> String {
    let mut hasher = ShaHasher(Sha256::new());
    engine.engine().precompile_compatibility_hash().hash(&mut hasher);
    hex::encode(&hasher.0.finalize()[..8])
}

/// Loads the precompiled artifact for these bytes, compiling and caching it first if needed.
/// The entry's name holds the content hash and the engine's compatibility hash, so an artifact
/// made by a differently configured engine is never looked up; the cache hands back only
/// entries this install wrote (see `cache.rs`).
fn load_cached(
    engine: &FlowEngine,
    cache: &ArtifactCache,
    name: &str,
    version: &str,
    bytes: &[u8],
) -> Result<Component, HostError> {
    let entry = format!("{version}-{}.cwasm", engine_fingerprint(engine));
    if let Some(artifact) = cache.get(&entry) {
        // SAFETY: the cache returns an artifact only if its MAC under this install's private
        // key matches (bound to this entry's name) and its file is ours and writable by no one
        // else: it is what `precompile_component` produced for these bytes. wasmtime still
        // checks the header and the engine compatibility; anything it refuses is recompiled.
        match unsafe { Component::deserialize(engine.engine(), &artifact) } {
            Ok(component) => return Ok(component),
            Err(e) => tracing::warn!(entry, error = %e, "discarding unusable cached flow"),
        }
    }
    let artifact = engine
        .engine()
        .precompile_component(bytes)
        .map_err(|e| HostError::Compile { flow: name.into(), detail: format!("{e:#}") })?;
    // Best effort: the compiled code is in memory, so a cache that cannot be written only costs
    // the next start a compile; the cache reports it.
    cache.put(&entry, &artifact);
    // SAFETY: `artifact` was produced just now by this engine's `precompile_component`.
    unsafe { Component::deserialize(engine.engine(), &artifact) }
        .map_err(|e| HostError::Compile { flow: name.into(), detail: format!("{e:#}") })
}

/// The flows every tenant has, swapped atomically: new calls take the current entry, live
/// calls keep theirs (each holds an `Arc` to the version it started with, so an old version is
/// freed when its last call ends).
#[derive(Debug, Default)]
pub struct FlowRegistry {
    entries: RwLock<HashMap<FlowKey, Entry>>,
}

/// One flow name's history: what serves new calls, where it came from, the versions still in
/// use by live calls, and the last refused deploy.
#[derive(Debug, Default)]
struct Entry {
    current: Option<Arc<CompiledFlow>>,
    source: String,
    deployed_at: Option<SystemTime>,
    /// Replaced versions, for as long as a live call runs them.
    retired: Vec<Weak<CompiledFlow>>,
    last_error: Option<(SystemTime, String)>,
    swaps: u64,
    failures: u64,
}

/// What [`FlowRegistry::records`] reports about one flow name.
#[derive(Debug, Clone)]
pub struct FlowRecord {
    /// Tenant and name.
    pub key: FlowKey,
    /// The version new calls get (none: removed, or every deploy failed).
    pub version: Option<String>,
    /// Where the current version came from (`stock:echo`, a file path, `api`).
    pub source: String,
    /// When the current version was installed.
    pub deployed_at: Option<SystemTime>,
    /// Live calls per version (the current one first), versions without calls left out.
    pub live: Vec<(String, usize)>,
    /// The last refused deploy: when, and why.
    pub last_error: Option<(SystemTime, String)>,
    /// Times a different version replaced the serving one.
    pub swaps: u64,
    /// Deploys refused (did not compile or link).
    pub failures: u64,
}

/// The outcome of [`FlowRegistry::install`].
#[derive(Debug, Clone)]
pub struct Installed {
    /// The version now serving new calls.
    pub flow: Arc<CompiledFlow>,
    /// The version it replaced, if any.
    pub previous: Option<String>,
}

impl FlowRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<FlowKey, Entry>> {
        self.entries.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<FlowKey, Entry>> {
        self.entries.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Installs a compiled flow from `source`, replacing any previous version (which live calls
    /// keep running).
    pub fn install(&self, key: FlowKey, flow: Arc<CompiledFlow>, source: &str) -> Installed {
        let mut entries = self.write();
        let entry = entries.entry(key).or_default();
        let previous = entry.current.replace(Arc::clone(&flow));
        entry.retired.retain(|w| w.strong_count() > 0);
        if let Some(previous) = &previous
            && previous.version != flow.version
        {
            entry.swaps += 1;
            entry.retired.push(Arc::downgrade(previous));
        }
        entry.source = source.to_owned();
        entry.deployed_at = Some(SystemTime::now());
        Installed { flow, previous: previous.map(|p| p.version.clone()) }
    }

    /// Notes a refused deploy of `key` (the current version, if any, keeps serving).
    pub fn record_failure(&self, key: FlowKey, error: String) {
        let mut entries = self.write();
        let entry = entries.entry(key).or_default();
        entry.failures += 1;
        entry.last_error = Some((SystemTime::now(), error));
    }

    /// Compiles `bytes` and installs the result. A component that fails to compile or link
    /// leaves the current entry untouched and is recorded as the flow's last error.
    pub fn compile_and_install(
        &self,
        engine: &FlowEngine,
        key: FlowKey,
        bytes: &[u8],
        source: &str,
    ) -> Result<Installed, HostError> {
        match CompiledFlow::compile(engine, &key.flow, bytes) {
            Ok(flow) => Ok(self.install(key, Arc::new(flow), source)),
            Err(e) => {
                self.record_failure(key, e.to_string());
                Err(e)
            }
        }
    }

    /// [`Self::compile_and_install`] without a source; returns the installed flow.
    pub fn compile_and_insert(
        &self,
        engine: &FlowEngine,
        key: FlowKey,
        bytes: &[u8],
    ) -> Result<Arc<CompiledFlow>, HostError> {
        self.compile_and_install(engine, key, bytes, "").map(|installed| installed.flow)
    }

    /// Stops serving `key` to new calls (live calls finish on their version). Returns whether
    /// it was served.
    pub fn remove(&self, key: &FlowKey) -> bool {
        let mut entries = self.write();
        let Some(entry) = entries.get_mut(key) else { return false };
        let Some(current) = entry.current.take() else { return false };
        entry.retired.push(Arc::downgrade(&current));
        entry.deployed_at = Some(SystemTime::now());
        entry.source.clear();
        true
    }

    /// The current version of a flow.
    pub fn get(&self, tenant: &str, flow: &str) -> Result<Arc<CompiledFlow>, HostError> {
        self.read()
            .get(&FlowKey::new(tenant, flow))
            .and_then(|e| e.current.clone())
            .ok_or_else(|| HostError::UnknownFlow { tenant: tenant.into(), flow: flow.into() })
    }

    /// Every served flow, sorted by key.
    pub fn list(&self) -> Vec<(FlowKey, Arc<CompiledFlow>)> {
        let mut all: Vec<_> =
            self.read().iter().filter_map(|(k, e)| Some((k.clone(), Arc::clone(e.current.as_ref()?)))).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// What is known about every flow name of `tenant` (all tenants with `None`), sorted by
    /// key; names whose every version is gone and that have no error to show are left out.
    pub fn records(&self, tenant: Option<&str>) -> Vec<FlowRecord> {
        let entries = self.read();
        let mut all: Vec<FlowRecord> = entries
            .iter()
            .filter(|(k, _)| tenant.is_none_or(|t| k.tenant == t))
            .filter_map(|(key, entry)| {
                let mut live = Vec::new();
                if let Some(current) = &entry.current {
                    // The registry's own reference is not a call.
                    live.push((current.version.clone(), Arc::strong_count(current) - 1));
                }
                for old in entry.retired.iter().filter_map(Weak::upgrade) {
                    // Neither is the one just made by `upgrade`.
                    let calls = Arc::strong_count(&old) - 1;
                    if calls > 0 {
                        live.push((old.version.clone(), calls));
                    }
                }
                if entry.current.is_none() && live.is_empty() && entry.last_error.is_none() {
                    return None;
                }
                Some(FlowRecord {
                    key: key.clone(),
                    version: entry.current.as_ref().map(|c| c.version.clone()),
                    source: entry.source.clone(),
                    deployed_at: entry.deployed_at,
                    live,
                    last_error: entry.last_error.clone(),
                    swaps: entry.swaps,
                    failures: entry.failures,
                })
            })
            .collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all
    }
}

/// Default cache directory: `$XDG_CACHE_HOME/patchbay/flows` or `~/.cache/patchbay/flows`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("patchbay").join("flows"))
}
