//! How a flow's component becomes the version new calls run (`docs/hot-swap.md`).
//!
//! Three ways in, one rule: the component is compiled off the async workers, checked against
//! the WIT world (the linker resolves every import; a missing or mismatched one is refused),
//! and only then swapped in atomically in the [`FlowRegistry`]. A component that does not
//! compile or link never replaces the one serving: the error is logged, counted and kept for
//! the API (`GET /v1/flows`). Live calls finish on the version they started with (each holds
//! it); the old version is freed when its last call ends.
//!
//! - At start: every `[[tenant.flow]]` (stock or file), then each tenant's `flows_dir`
//!   (`NAME.wasm` serves `sip:NAME@domain`; a directory's file wins over a configured flow of
//!   the same name).
//! - The watcher ([`watch`]): `notify` (inotify) on each `flows_dir`; events are debounced
//!   ([`SETTLE`]) so an editor's or `cp`'s partial writes and a `mv` into place arrive as one
//!   change; a file whose content did not change (same SHA-256) is not recompiled; a removed
//!   file stops serving new calls.
//! - The API (`PUT /v1/tenants/{t}/flows/{name}`) and `patchbay flows deploy`: [`deploy`]; with
//!   a `flows_dir` the bytes are also written there (atomically), so a restart keeps them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use patchbay_host::{FlowEngine, FlowKey, FlowRegistry, HostError, Installed};

use crate::config::{Config, FlowSource};
use crate::tenant::{Tenant, Tenants};

/// Quiet time after the last file event before a changed file is read: long enough for a
/// `cp` of a few MB to finish, short enough for the swap target (p99 ≤ 500 ms).
pub const SETTLE: Duration = Duration::from_millis(100);

/// Largest component accepted from a file or the API.
pub const MAX_COMPONENT_BYTES: usize = 32 << 20;

/// Why a deploy was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The name cannot be a flow name (it routes as a SIP user part and is a file name).
    #[error("flow name {0:?}: use 1 to 64 letters, digits, '-' or '_'")]
    BadName(String),
    /// More bytes than [`MAX_COMPONENT_BYTES`].
    #[error("the component is {0} bytes; at most {MAX_COMPONENT_BYTES}")]
    TooLarge(usize),
    /// It did not compile or does not fit the WIT world.
    #[error(transparent)]
    Invalid(#[from] HostError),
    /// The compiler task died.
    #[error("the compiler crashed: {0}")]
    Crashed(String),
    /// Installed, but the copy for the next start could not be written.
    #[error("installed, but not saved to {path}: {source}")]
    NotSaved {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Whether `name` may name a flow.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

/// Compiles `bytes` (off the async workers) and installs them as `tenant`'s flow `name`.
pub async fn compile(
    engine: &Arc<FlowEngine>,
    registry: &Arc<FlowRegistry>,
    tenant: &str,
    name: &str,
    bytes: Arc<[u8]>,
    source: String,
) -> Result<Installed, DeployError> {
    if !valid_name(name) {
        return Err(DeployError::BadName(name.to_owned()));
    }
    if bytes.len() > MAX_COMPONENT_BYTES {
        return Err(DeployError::TooLarge(bytes.len()));
    }
    let key = FlowKey::new(tenant, name);
    let (engine, registry) = (Arc::clone(engine), Arc::clone(registry));
    let started = Instant::now();
    let installed =
        tokio::task::spawn_blocking(move || registry.compile_and_install(&engine, key, &bytes, &source)).await;
    let ms = started.elapsed().as_millis() as u64;
    match installed {
        Ok(Ok(installed)) => {
            let new = short(installed.flow.version());
            match &installed.previous {
                Some(old) if old == installed.flow.version() => {
                    tracing::info!(tenant, flow = name, version = new, ms, "flow reloaded (same version)");
                }
                Some(old) => tracing::info!(tenant, flow = name, old = short(old), new, ms, "flow swapped"),
                None => tracing::info!(tenant, flow = name, version = new, ms, "flow loaded"),
            }
            Ok(installed)
        }
        Ok(Err(e)) => {
            tracing::error!(tenant, flow = name, "flow refused, the serving version stays: {e}");
            Err(e.into())
        }
        Err(e) => {
            tracing::error!(tenant, flow = name, "flow compiler crashed: {e}");
            Err(DeployError::Crashed(e.to_string()))
        }
    }
}

/// A deploy through the API or the CLI: compile and install, then, when the tenant has a
/// `flows_dir`, write the component there (temporary file + rename) so the next start and the
/// watcher see the same version.
pub async fn deploy(
    engine: &Arc<FlowEngine>,
    registry: &Arc<FlowRegistry>,
    tenant: &Tenant,
    name: &str,
    bytes: Vec<u8>,
) -> Result<Installed, DeployError> {
    let bytes: Arc<[u8]> = bytes.into();
    let installed = compile(engine, registry, &tenant.id, name, Arc::clone(&bytes), "api".into()).await?;
    if let Some(dir) = &tenant.flows_dir {
        let path = dir.join(format!("{name}.wasm"));
        let tmp = dir.join(format!(".{name}.wasm.{}.tmp", std::process::id()));
        let written = tokio::fs::write(&tmp, &bytes).await.and(tokio::fs::rename(&tmp, &path).await);
        if let Err(source) = written {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(DeployError::NotSaved { path, source });
        }
    }
    Ok(installed)
}

/// Stops serving `tenant`'s flow `name` to new calls and removes its file from the tenant's
/// `flows_dir`. Returns whether it was served.
pub async fn remove(registry: &FlowRegistry, tenant: &Tenant, name: &str) -> bool {
    if let Some(dir) = &tenant.flows_dir
        && valid_name(name)
    {
        let _ = tokio::fs::remove_file(dir.join(format!("{name}.wasm"))).await;
    }
    let removed = registry.remove(&FlowKey::new(&tenant.id, name));
    if removed {
        tracing::info!(tenant = %tenant.id, flow = name, "flow removed");
    }
    removed
}

/// Loads every configured flow and every tenant's `flows_dir`. Returns whether all loaded.
pub async fn load_all(
    config: &Config,
    tenants: &Tenants,
    engine: &Arc<FlowEngine>,
    registry: &Arc<FlowRegistry>,
) -> bool {
    let mut all_loaded = true;
    for tenant in &config.tenants {
        for flow in &tenant.flows {
            let flow = flow.get_ref();
            let Some(source) = flow.source(&config.base_dir) else { continue };
            let (bytes, from): (Arc<[u8]>, String) = match &source {
                FlowSource::Stock(stock) => (stock.component.into(), format!("stock:{}", stock.name)),
                FlowSource::File(path) => match std::fs::read(path) {
                    Ok(bytes) => (bytes.into(), path.display().to_string()),
                    Err(e) => {
                        all_loaded = false;
                        tracing::error!(tenant = %tenant.id, flow = %flow.name, "flow not loaded: {}: {e}", path.display());
                        continue;
                    }
                },
            };
            all_loaded &= compile(engine, registry, &tenant.id, &flow.name, bytes, from).await.is_ok();
        }
    }
    for tenant in tenants.iter() {
        let Some(dir) = &tenant.flows_dir else { continue };
        match components_in(dir) {
            Ok(names) => {
                for name in names {
                    all_loaded &= load_file(engine, registry, tenant, dir, &name).await;
                }
            }
            Err(e) => {
                all_loaded = false;
                tracing::error!(tenant = %tenant.id, "flows_dir {}: {e:#}", dir.display());
            }
        }
    }
    all_loaded
}

/// The flow names of the `NAME.wasm` files in `dir`.
pub(crate) fn components_in(dir: &Path) -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if let Some(name) = flow_name(&path) {
            names.insert(name);
        }
    }
    Ok(names)
}

/// `NAME` for a path `…/NAME.wasm` whose name is a valid flow name (temporary files such as
/// `.NAME.wasm.123.tmp` or `NAME.wasm~` are not).
fn flow_name(path: &Path) -> Option<String> {
    if path.extension().and_then(|e| e.to_str()) != Some("wasm") {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    valid_name(stem).then(|| stem.to_owned())
}

/// (Re)loads `dir/NAME.wasm`, or stops serving `NAME` when the file is gone. Returns false
/// when the file is there but was refused.
async fn load_file(
    engine: &Arc<FlowEngine>,
    registry: &Arc<FlowRegistry>,
    tenant: &Tenant,
    dir: &Path,
    name: &str,
) -> bool {
    let path = dir.join(format!("{name}.wasm"));
    let bytes = match tokio::fs::read(&path).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if registry.remove(&FlowKey::new(&tenant.id, name)) {
                tracing::info!(tenant = %tenant.id, flow = name, "flow file removed: no longer served to new calls");
            }
            return true;
        }
        Err(e) => {
            registry.record_failure(FlowKey::new(&tenant.id, name), format!("reading {}: {e}", path.display()));
            tracing::error!(tenant = %tenant.id, flow = name, "reading {}: {e}", path.display());
            return false;
        }
    };
    // Touched, or written back by an API deploy: nothing to swap.
    let version = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    if registry.get(&tenant.id, name).is_ok_and(|current| current.version() == version) {
        return true;
    }
    let source = path.display().to_string();
    compile(engine, registry, &tenant.id, name, bytes.into(), source).await.is_ok()
}

/// Directory → (tenant id, its debouncing task's inbox).
type Routes = std::collections::HashMap<PathBuf, Vec<(String, tokio::sync::mpsc::UnboundedSender<PathBuf>)>>;

/// The `flows_dir` watches of every tenant: one `notify` watcher (one inotify instance and one
/// thread, however many tenants: Linux allows a user 128 instances by default) whose events are
/// routed by directory to a debouncing task per tenant.
pub struct Watchers {
    watcher: notify::RecommendedWatcher,
    /// Directory (as watched) → the tenants that use it and their tasks' inboxes.
    routes: Arc<std::sync::Mutex<Routes>>,
    /// Tenant id → its directory (as configured, and as watched) and its task.
    tenants: std::collections::HashMap<String, (PathBuf, PathBuf, tokio::task::AbortHandle)>,
}

impl Watchers {
    /// No directory watched yet.
    pub fn new() -> anyhow::Result<Self> {
        let routes: Arc<std::sync::Mutex<Routes>> = Arc::default();
        let routed = Arc::clone(&routes);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) if is_change(&event.kind) => {
                let routes = routed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for path in event.paths {
                    let Some(senders) = path.parent().and_then(|dir| routes.get(dir)) else { continue };
                    for (_, sender) in senders {
                        let _ = sender.send(path.clone());
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("flows_dir watcher: {e}"),
        })
        .context("starting the flows_dir watcher")?;
        Ok(Self { watcher, routes, tenants: Default::default() })
    }

    /// Watches every tenant's `flows_dir`; a directory that cannot be watched is logged (its
    /// flows are loaded, but not swapped while running).
    pub fn start(tenants: &Tenants, engine: &Arc<FlowEngine>, registry: &Arc<FlowRegistry>) -> anyhow::Result<Self> {
        let mut watchers = Self::new()?;
        for tenant in tenants.iter().filter(|t| t.flows_dir.is_some()) {
            if let Err(e) = watchers.add(tenant, engine, registry) {
                tracing::error!(tenant = %tenant.id, "flows_dir not watched (no hot swap for it): {e:#}");
            }
        }
        Ok(watchers)
    }

    /// The directory watched for tenant `id`.
    pub fn dir_of(&self, id: &str) -> Option<&PathBuf> {
        self.tenants.get(id).map(|(dir, _, _)| dir)
    }

    /// The tenants watched.
    pub fn tenant_ids(&self) -> Vec<String> {
        self.tenants.keys().cloned().collect()
    }

    /// Watches `tenant`'s `flows_dir` (it must have one).
    pub fn add(
        &mut self,
        tenant: &Arc<Tenant>,
        engine: &Arc<FlowEngine>,
        registry: &Arc<FlowRegistry>,
    ) -> anyhow::Result<()> {
        use notify::Watcher;
        let given = tenant.flows_dir.clone().context("the tenant has no flows_dir")?;
        // Events name paths under the directory as notify resolved it: route on the
        // canonical path, so a relative `flows_dir` (a config file given as a relative path)
        // matches too.
        let dir = given.canonicalize().with_context(|| format!("resolving {}", given.display()))?;
        let (events, mut changes) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
        let shared = Arc::clone(&self.routes);
        let mut routes = shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let id = tenant.id.clone();
        self.remove_route(&mut routes, &id);
        if !routes.contains_key(&dir) {
            self.watcher
                .watch(&dir, notify::RecursiveMode::NonRecursive)
                .with_context(|| format!("watching {}", dir.display()))?;
        }
        routes.entry(dir.clone()).or_default().push((id.clone(), events));
        drop(routes);
        tracing::info!(tenant = %tenant.id, dir = %dir.display(), "watching flows for hot swap");
        let (tenant, engine, registry, watched) =
            (Arc::clone(tenant), Arc::clone(engine), Arc::clone(registry), given.clone());
        let task = tokio::spawn(async move {
            while let Some(first) = changes.recv().await {
                let mut names = BTreeSet::new();
                names.extend(flow_name(&first));
                // Debounce: gather until the directory has been quiet for SETTLE.
                while let Ok(Some(path)) = tokio::time::timeout(SETTLE, changes.recv()).await {
                    names.extend(flow_name(&path));
                }
                for name in names {
                    load_file(&engine, &registry, &tenant, &watched, &name).await;
                }
            }
        });
        if let Some((_, _, old)) = self.tenants.insert(id, (given, dir, task.abort_handle())) {
            old.abort();
        }
        Ok(())
    }

    /// Takes tenant `id` out of `routes`, unwatching a directory nobody else uses.
    fn remove_route(&mut self, routes: &mut Routes, id: &str) {
        // (`routes` is the locked `self.routes`: the caller holds the lock.)
        use notify::Watcher;
        let Some((_, dir, _)) = self.tenants.get(id) else { return };
        if let Some(senders) = routes.get_mut(dir) {
            senders.retain(|(tenant, _)| tenant != id);
            if senders.is_empty() {
                routes.remove(dir);
                let _ = self.watcher.unwatch(dir);
            }
        }
    }

    /// Stops watching for tenant `id`.
    pub fn remove(&mut self, id: &str) {
        let routes = Arc::clone(&self.routes);
        let mut routes = routes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.remove_route(&mut routes, id);
        if let Some((_, _, task)) = self.tenants.remove(id) {
            task.abort();
        }
    }
}

/// Events that may change what a `NAME.wasm` holds: created, written, closed after writing,
/// renamed into or out of place, removed.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    matches!(
        kind,
        EventKind::Create(_)
            | EventKind::Modify(_)
            | EventKind::Remove(_)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}

/// The first 12 hex digits of a version, as logs show it.
pub fn short(version: &str) -> &str {
    version.get(..12).unwrap_or(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_component_files_are_flows() {
        assert_eq!(flow_name(Path::new("/f/echo.wasm")).as_deref(), Some("echo"));
        assert_eq!(flow_name(Path::new("/f/ivr_menu-2.wasm")).as_deref(), Some("ivr_menu-2"));
        for other in ["/f/.echo.wasm.12.tmp", "/f/echo.wasm~", "/f/echo.wat", "/f/a b.wasm", "/f/.wasm", "/f/x.y.wasm"]
        {
            assert_eq!(flow_name(Path::new(other)), None, "{other}");
        }
    }

    #[test]
    fn names_are_bounded_and_plain() {
        assert!(valid_name("menu"));
        assert!(!valid_name(""));
        assert!(!valid_name(&"a".repeat(65)));
        assert!(!valid_name("../x"));
        assert!(!valid_name("a@b"));
    }
}
