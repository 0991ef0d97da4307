//! Configuration reload (SIGHUP or `POST /v1/reload`): all or nothing.
//!
//! The file is read and checked as at start; every flow it names (and every component in a new
//! or moved `flows_dir`) is compiled and linked; the tenants are built. Only when all of that
//! succeeded does anything change: flows are installed (live calls finish on the version they
//! started with, as with any [hot swap](crate::deploy)), flows and tenants no longer configured
//! stop taking new calls, the tenant registry is swapped, and `flows_dir` watchers are started
//! or stopped. Any failure leaves everything as it was and says why.
//!
//! What a reload keeps of a tenant that stays: its kv space, its count of live calls, its caps
//! and instance share while their limits are unchanged (so calls up hold their slots), and its
//! trunks. **Not reloaded** (refused, with the reason, until a restart): changes outside the
//! `[[tenant]]` tables (listeners, media, the flow pool, the API, CDRs) and changes to a
//! tenant's `[[tenant.trunk]]` tables — a trunk's registration and keep-alive tasks live as long
//! as the process.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use patchbay_host::{CompiledFlow, FlowEngine, FlowKey, FlowRegistry};

use crate::config::{Config, FlowSource};
use crate::deploy::Watchers;
use crate::tenant::Tenants;

/// A value swapped whole (the tenant registry): readers take the current `Arc`, a reload
/// replaces it; what a reader holds stays valid.
#[derive(Debug, Default)]
pub struct Current<T>(RwLock<Arc<T>>);

impl<T> Current<T> {
    /// Holds `value`.
    pub fn new(value: Arc<T>) -> Self {
        Self(RwLock::new(value))
    }

    /// The value now.
    pub fn get(&self) -> Arc<T> {
        Arc::clone(&self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn set(&self, value: Arc<T>) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = value;
    }
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// No file to reload (started with the embedded default).
    #[error("started without --config: there is no file to reload")]
    NoFile,
    /// The file could not be read or is not a valid configuration.
    #[error("{0}")]
    Config(String),
    /// A part that only a restart applies changed.
    #[error("{0} changed: restart to apply it (nothing was reloaded)")]
    NeedsRestart(String),
    /// A flow did not compile or link.
    #[error("tenant {tenant:?} flow {flow:?}: {error} (nothing was reloaded)")]
    Flow {
        /// Its tenant.
        tenant: String,
        /// Its name.
        flow: String,
        /// Why.
        error: String,
    },
}

/// What a reload did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Reloaded {
    /// Tenants now configured.
    pub tenants: usize,
    /// Flows installed with a new version.
    pub flows_updated: Vec<String>,
    /// Flows no longer served to new calls.
    pub flows_removed: Vec<String>,
}

/// Everything a reload replaces, and the text it was built from.
pub struct Reloader {
    path: Option<PathBuf>,
    /// The configuration text in force.
    text: Mutex<String>,
    tenants: Arc<Current<Tenants>>,
    engine: Arc<FlowEngine>,
    registry: Arc<FlowRegistry>,
    resolver: Arc<dyn crate::resolve::Resolve>,
    watchers: tokio::sync::Mutex<Watchers>,
}

impl Reloader {
    /// A reloader of the configuration at `path` (none: the embedded default, which cannot be
    /// reloaded), whose text in force is `text`.
    pub fn new(
        path: Option<PathBuf>,
        text: String,
        tenants: Arc<Current<Tenants>>,
        engine: Arc<FlowEngine>,
        registry: Arc<FlowRegistry>,
        resolver: Arc<dyn crate::resolve::Resolve>,
        watchers: Watchers,
    ) -> Self {
        Self {
            path,
            text: Mutex::new(text),
            tenants,
            engine,
            registry,
            resolver,
            watchers: tokio::sync::Mutex::new(watchers),
        }
    }

    /// Reloads (see the module docs). Concurrent reloads run one after the other.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        let mut watchers = self.watchers.lock().await;
        let path = self.path.clone().ok_or(ReloadError::NoFile)?;
        let text = tokio::fs::read_to_string(&path)
            .await
            .map_err(|e| ReloadError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
        let config =
            Config::parse(&text, &path.display().to_string(), base).map_err(|e| ReloadError::Config(e.to_string()))?;
        let old_text = self.text.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        check_restart_only(&old_text, &text)?;
        let old = self.tenants.get();
        let built = Tenants::build_with(&config, &self.resolver, |id| old.get(id).cloned())
            .map_err(|e| ReloadError::Config(format!("{e:#}")))?;

        // Compile everything first; nothing is installed unless all of it compiled.
        let mut staged: Vec<(FlowKey, Arc<CompiledFlow>, String)> = Vec::new();
        let mut expected: BTreeSet<FlowKey> = BTreeSet::new();
        for tenant in &config.tenants {
            for flow in tenant.flows.iter().map(toml::Spanned::get_ref) {
                let key = FlowKey::new(&tenant.id, &flow.name);
                let Some(source) = flow.source(&config.base_dir) else { continue };
                expected.insert(key.clone());
                let (bytes, from): (Arc<[u8]>, String) = match &source {
                    FlowSource::Stock(stock) => (stock.component.into(), format!("stock:{}", stock.name)),
                    FlowSource::File(file) => match std::fs::read(file) {
                        Ok(bytes) => (bytes.into(), file.display().to_string()),
                        Err(e) => {
                            return Err(ReloadError::Flow {
                                tenant: key.tenant,
                                flow: key.flow,
                                error: format!("{}: {e}", file.display()),
                            });
                        }
                    },
                };
                if let Some(flow) = self.stage(&key, bytes, from).await? {
                    staged.push(flow);
                }
            }
        }
        for tenant in built.iter() {
            let Some(dir) = &tenant.flows_dir else { continue };
            let names = crate::deploy::components_in(dir).map_err(|e| ReloadError::Config(format!("{e:#}")))?;
            let watched = watchers.dir_of(&tenant.id) == Some(dir);
            for name in names {
                let key = FlowKey::new(&tenant.id, &name);
                expected.insert(key.clone());
                if watched {
                    // Its watcher keeps it current.
                    continue;
                }
                let file = dir.join(format!("{name}.wasm"));
                let bytes: Arc<[u8]> = std::fs::read(&file)
                    .map_err(|e| ReloadError::Flow {
                        tenant: key.tenant.clone(),
                        flow: key.flow.clone(),
                        error: format!("{}: {e}", file.display()),
                    })?
                    .into();
                if let Some(flow) = self.stage(&key, bytes, file.display().to_string()).await? {
                    staged.push(flow);
                }
            }
        }

        // All compiled: apply.
        let mut reloaded = Reloaded { tenants: config.tenants.len(), ..Reloaded::default() };
        for (key, flow, source) in staged {
            let installed = self.registry.install(key.clone(), flow, &source);
            tracing::info!(
                tenant = %key.tenant,
                flow = %key.flow,
                old = installed.previous.as_deref().map_or("-", crate::deploy::short),
                new = crate::deploy::short(installed.flow.version()),
                "flow swapped (reload)"
            );
            reloaded.flows_updated.push(format!("{}/{}", key.tenant, key.flow));
        }
        for record in self.registry.records(None) {
            let key = record.key;
            let tenant_stays = built.get(&key.tenant).is_some();
            // A flow deployed through the API stays while its tenant does.
            let kept = expected.contains(&key) || (tenant_stays && record.source == "api");
            if record.version.is_some() && !kept && self.registry.remove(&key) {
                tracing::info!(tenant = %key.tenant, flow = %key.flow, "flow no longer configured: removed (reload)");
                reloaded.flows_removed.push(format!("{}/{}", key.tenant, key.flow));
            }
        }
        // Watchers: stop those of tenants gone or moved, start the new ones.
        for id in watchers.tenant_ids() {
            let dir = watchers.dir_of(&id).cloned();
            if built.get(&id).is_none_or(|t| t.flows_dir != dir) {
                watchers.remove(&id);
            }
        }
        for tenant in built.iter() {
            if tenant.flows_dir.is_some()
                && watchers.dir_of(&tenant.id).is_none()
                && let Err(e) = watchers.add(tenant, &self.engine, &self.registry)
            {
                tracing::error!(tenant = %tenant.id, "flows_dir not watched: {e:#}");
            }
        }
        self.tenants.set(Arc::new(built));
        *self.text.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = text;
        tracing::info!(
            tenants = reloaded.tenants,
            updated = reloaded.flows_updated.len(),
            removed = reloaded.flows_removed.len(),
            "configuration reloaded"
        );
        Ok(reloaded)
    }

    /// Compiles `bytes` for `key` unless the registry already serves that version.
    async fn stage(
        &self,
        key: &FlowKey,
        bytes: Arc<[u8]>,
        source: String,
    ) -> Result<Option<(FlowKey, Arc<CompiledFlow>, String)>, ReloadError> {
        let version = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        if self.registry.get(&key.tenant, &key.flow).is_ok_and(|f| f.version() == version) {
            return Ok(None);
        }
        let (engine, name) = (Arc::clone(&self.engine), key.flow.clone());
        let compiled = tokio::task::spawn_blocking(move || CompiledFlow::compile(&engine, &name, &bytes)).await;
        let fail = |error: String| ReloadError::Flow { tenant: key.tenant.clone(), flow: key.flow.clone(), error };
        match compiled {
            Ok(Ok(flow)) => Ok(Some((key.clone(), Arc::new(flow), source))),
            Ok(Err(e)) => Err(fail(e.to_string())),
            Err(e) => Err(fail(format!("the compiler crashed: {e}"))),
        }
    }
}

/// Refuses a reload that changes what only a restart applies: anything outside the
/// `[[tenant]]` tables, and any tenant's `[[tenant.trunk]]` tables.
fn check_restart_only(old: &str, new: &str) -> Result<(), ReloadError> {
    let parse = |text: &str| text.parse::<toml::Table>().map_err(|e| ReloadError::Config(e.to_string()));
    let (mut old, mut new) = (parse(old)?, parse(new)?);
    let old_tenants = old.remove("tenant");
    let new_tenants = new.remove("tenant");
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for key in keys {
        if old.get(key) != new.get(key) {
            return Err(ReloadError::NeedsRestart(format!("[{key}]")));
        }
    }
    let trunks = |tenants: &Option<toml::Value>| -> Vec<(String, Option<toml::Value>)> {
        tenants
            .as_ref()
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
            .map(|t| {
                (t.get("id").and_then(toml::Value::as_str).unwrap_or_default().to_owned(), t.get("trunk").cloned())
            })
            .collect()
    };
    let (before, after) = (trunks(&old_tenants), trunks(&new_tenants));
    for (id, tables) in &after {
        let was = before.iter().find(|(old_id, _)| old_id == id).map(|(_, t)| t);
        // A new tenant's trunks would start now; an existing tenant's must be as they were.
        let changed = match was {
            Some(old) => old != tables,
            None => tables.is_some(),
        };
        if changed {
            return Err(ReloadError::NeedsRestart(format!("tenant {id:?}'s [[tenant.trunk]] tables")));
        }
    }
    for (id, tables) in &before {
        if tables.is_some() && !after.iter().any(|(new_id, _)| new_id == id) {
            return Err(ReloadError::NeedsRestart(format!("tenant {id:?} (it has trunks)")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[sip]\nlisten = [\"udp:127.0.0.1:5060\"]\n[[tenant]]\nid = \"a\"\ndomains = [\"a.test\"]\n";

    #[test]
    fn tenant_changes_reload_and_others_need_a_restart() {
        let more = format!("{BASE}[[tenant.flow]]\nname = \"echo\"\nstock = \"echo\"\n[[tenant]]\nid = \"b\"\n");
        assert!(check_restart_only(BASE, &more).is_ok());
        let moved = BASE.replace("5060", "5070");
        let err = check_restart_only(BASE, &moved).expect_err("listen changed");
        assert!(err.to_string().starts_with("[sip] changed"), "{err}");
        let trunk = format!("{BASE}[[tenant.trunk]]\nname = \"c\"\ngateway = \"127.0.0.1\"\n");
        let err = check_restart_only(BASE, &trunk).expect_err("trunk added");
        assert!(err.to_string().contains("tenant \"a\"'s [[tenant.trunk]]"), "{err}");
        assert!(check_restart_only(&trunk, &trunk.replace("a.test", "b.test")).is_ok());
        let err = check_restart_only(&trunk, BASE).expect_err("trunk removed");
        assert!(err.to_string().contains("trunk"), "{err}");
    }
}
