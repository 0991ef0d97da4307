//! Tenants: who owns a call, a flow, a trunk or an API token.
//!
//! A [`Tenant`] is built once from its `[[tenant]]` table and holds everything that is the
//! tenant's own: its domains, flows' variables, per-call limits, caps on calls, trunks, prompts,
//! key-value space, inbound credentials and API token. The [`Tenants`] registry answers the
//! questions the rest of the process asks: which tenant serves this domain, this DID, this
//! token. Calls, the API and the hot-swap watcher hold an `Arc<Tenant>`, never a tenant id to
//! look up in some other map. What a tenant's flows may reach beyond its own flows and trunks
//! is its [`Capabilities`] (`[tenant.allow]`, `crate::policy`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use patchbay_host::{FlowLimits, MemoryKv};

use crate::config::{Config, Secret, TenantConfig};
use crate::policy::{Capabilities, Host, LocalAddresses};
use crate::prompts::PromptStore;
use crate::trunk::{TenantCaps, TokenBucket, Trunk};

/// MiB of recordings a tenant may keep unless `recordings_quota_mb` says otherwise.
const TENANT_RECORDINGS_QUOTA_MB: u32 = 1024;

/// Bytes of keys and values a tenant's kv space holds unless `kv_quota_kb` says otherwise.
pub const TENANT_KV_QUOTA: usize = 1 << 20;

/// One tenant (see the module docs).
pub struct Tenant {
    /// Tenant id (`[[tenant]] id`).
    pub id: String,
    /// Domains whose request-URIs route to this tenant.
    pub domains: Vec<String>,
    /// Per-call flow limits (memory, CPU budget).
    pub limits: FlowLimits,
    /// Calls up at once and calls per second, shared by inbound calls, trunks and flows' legs.
    pub caps: TenantCaps,
    /// The cap on calls up at once (`max_calls`), as configured.
    pub max_calls: Option<u32>,
    /// Calls whose flow runs now.
    live: Arc<AtomicUsize>,
    /// Its share of the flow instance pool.
    instances: Arc<tokio::sync::Semaphore>,
    /// The size of that share.
    pub max_instances: u32,
    /// Variables each of its flows' calls starts with, by flow name.
    pub flow_vars: HashMap<String, BTreeMap<String, String>>,
    /// Directory its flows are loaded from and watched in (hot swap), if any.
    pub flows_dir: Option<PathBuf>,
    /// Its carrier trunks.
    pub trunks: Vec<Arc<Trunk>>,
    /// Its prompts (then the stock ones).
    pub prompts: Arc<PromptStore>,
    /// Its key-value space, shared by all its calls (the WIT `kv` interface).
    pub kv: Arc<MemoryKv>,
    /// Bytes its recordings may take on disk (`recordings_quota_mb`).
    pub recordings_quota: u64,
    /// How long a recording is kept (`recordings_retention_days`; `None`: until deleted).
    pub recordings_retention: Option<std::time::Duration>,
    /// Credentials inbound calls must present, if any.
    pub auth: Option<TenantAuth>,
    /// SHA-256 of its API token.
    pub api_token: Option<[u8; 32]>,
    /// URL prefixes its API calls may name as webhooks.
    pub webhooks: Vec<String>,
    /// Key of its webhooks' signatures.
    pub webhook_secret: Option<Secret>,
    /// What its flows may dial, transfer to, connect to as agents and set as headers.
    pub allow: Capabilities,
}

impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenant").field("id", &self.id).field("domains", &self.domains).finish_non_exhaustive()
    }
}

/// A tenant's inbound-call credentials.
pub struct TenantAuth {
    /// Realm in challenges.
    pub realm: String,
    /// User name → password.
    pub users: BTreeMap<String, String>,
    /// Sources not challenged.
    pub trusted: Vec<crate::policy::TrustedSource>,
    /// Algorithms offered, in order (empty: the digest server's default).
    pub algorithms: Vec<patchbay_sip::auth::Algorithm>,
}

impl Tenant {
    /// Builds a tenant from its configuration; `resolver` locates its trunks' gateways.
    pub fn build(
        config: &TenantConfig,
        base_dir: &std::path::Path,
        resolver: &Arc<dyn crate::resolve::Resolve>,
        default_instances: u32,
    ) -> anyhow::Result<Self> {
        let max_instances = config.max_instances.unwrap_or(default_instances);
        let limits = limits_of(config);
        let trunks = config
            .trunks
            .iter()
            .map(|trunk| {
                Trunk::new(&config.id, trunk.get_ref(), base_dir, Arc::clone(resolver))
                    .map(Arc::new)
                    .with_context(|| format!("tenant {:?} trunk {:?}", config.id, trunk.get_ref().name))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let trunk_names: Vec<&str> = config.trunks.iter().map(|t| t.get_ref().name.as_str()).collect();
        // Checked when the config was parsed; this names the entry again should it not be.
        let allow = Capabilities::from_config(&config.id, &config.allow, &trunk_names)
            .map_err(|(_, message)| anyhow::anyhow!("tenant {:?}: {message}", config.id))?;
        let auth = config.auth.as_ref().map(|auth| TenantAuth {
            realm: auth.realm.clone().unwrap_or_else(|| config.id.clone()),
            users: auth.users.clone(),
            trusted: auth.trusted.clone(),
            // Checked when the config was parsed.
            algorithms: auth
                .algorithms
                .iter()
                .flatten()
                .filter_map(|a| patchbay_sip::auth::Algorithm::from_token(a.get_ref()).ok())
                .collect(),
        });
        Ok(Self {
            id: config.id.clone(),
            domains: config.domains.clone(),
            limits,
            caps: TenantCaps {
                slots: config.max_calls.map(|n| Arc::new(tokio::sync::Semaphore::new(n as usize))),
                bucket: config.calls_per_second.map(|cps| Arc::new(TokenBucket::new(cps))),
            },
            max_calls: config.max_calls,
            live: Arc::default(),
            instances: Arc::new(tokio::sync::Semaphore::new(max_instances as usize)),
            max_instances,
            flow_vars: config.flows.iter().map(|f| (f.get_ref().name.clone(), f.get_ref().vars.clone())).collect(),
            flows_dir: config.flows_dir.as_ref().map(|d| base_dir.join(d.get_ref())),
            trunks,
            prompts: Arc::new(PromptStore::new(config.prompts.as_ref().map(|d| base_dir.join(d)))),
            kv: Arc::new(MemoryKv::new(config.kv_quota_kb.map_or(TENANT_KV_QUOTA, |kb| (kb as usize) << 10))),
            recordings_quota: u64::from(config.recordings_quota_mb.unwrap_or(TENANT_RECORDINGS_QUOTA_MB)) << 20,
            recordings_retention: config
                .recordings_retention_days
                .map(|days| std::time::Duration::from_secs(u64::from(days) * 86_400)),
            auth,
            api_token: config.api_token.as_ref().map(|t| token_digest(t.expose())),
            webhooks: config.webhooks.clone(),
            webhook_secret: config.webhook_secret.clone(),
            allow,
        })
    }

    /// Counts a call as live until the returned guard is dropped.
    pub fn call_started(&self) -> LiveCallGuard {
        self.live.fetch_add(1, Ordering::Relaxed);
        LiveCallGuard(Arc::clone(&self.live))
    }

    /// One of its flow instance slots, held for as long as the call's flow may run; `None`
    /// when its share of the pool is in use (the call is refused at once, 503).
    pub fn instance_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.instances).try_acquire_owned().ok()
    }

    /// Calls whose flow runs now.
    pub fn live_calls(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Flow instance slots of its share held now.
    pub fn instances_in_use(&self) -> usize {
        (self.max_instances as usize).saturating_sub(self.instances.available_permits())
    }

    /// Whether a request-URI's host names this tenant.
    pub fn serves_domain(&self, host: &str) -> bool {
        self.domains.iter().any(|d| d.eq_ignore_ascii_case(host))
    }

    /// Whether a target's host is one of its domains (names case-insensitively, addresses as
    /// addresses).
    pub fn serves_host(&self, host: &Host) -> bool {
        self.domains.iter().any(|d| crate::policy::parse_host(d).is_ok_and(|h| &h == host))
    }

    /// The variables a call to `flow` starts with.
    pub fn vars_of(&self, flow: &str) -> BTreeMap<String, String> {
        self.flow_vars.get(flow).cloned().unwrap_or_default()
    }

    /// Its trunk called `name`.
    pub fn trunk(&self, name: &str) -> Option<&Arc<Trunk>> {
        self.trunks.iter().find(|t| t.name == name)
    }
}

/// Keeps a call counted in its tenant's live calls.
#[derive(Debug)]
pub struct LiveCallGuard(Arc<AtomicUsize>);

impl Drop for LiveCallGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every tenant, in configuration order.
#[derive(Debug, Default)]
pub struct Tenants {
    all: Vec<Arc<Tenant>>,
    /// Where Patchbay listens for SIP: a target there in a tenant's domain is one of its own
    /// flows.
    pub local: LocalAddresses,
}

impl Tenants {
    /// Builds every tenant of `config`.
    pub fn build(config: &Config, resolver: &Arc<dyn crate::resolve::Resolve>) -> anyhow::Result<Self> {
        // No tenant may take the whole pool while there are others to share it with.
        let pool = config.flows.max_instances;
        let default_instances = match config.tenants.len() {
            0 | 1 => pool,
            _ => pool.saturating_sub((pool / 8).max(1)).max(1),
        };
        let all = config
            .tenants
            .iter()
            .map(|t| Tenant::build(t, &config.base_dir, resolver, default_instances).map(Arc::new))
            .collect::<anyhow::Result<_>>()?;
        let listeners = config
            .sip
            .listen
            .iter()
            .filter_map(|l| crate::config::parse_listen(l.get_ref()).ok())
            .map(|l| l.addr)
            .collect();
        Ok(Self { all, local: LocalAddresses::new(listeners, config.sip.external_ip) })
    }

    /// The tenant `id`.
    pub fn get(&self, id: &str) -> Option<&Arc<Tenant>> {
        self.all.iter().find(|t| t.id == id)
    }

    /// The tenant serving the domain `host`.
    pub fn by_domain(&self, host: &str) -> Option<&Arc<Tenant>> {
        self.all.iter().find(|t| t.serves_domain(host))
    }

    /// The trunk (and its tenant) a DID belongs to, with the flow it routes to.
    pub fn by_did(&self, number: &str) -> Option<(&Arc<Tenant>, &Arc<Trunk>, String)> {
        self.all.iter().find_map(|tenant| {
            tenant.trunks.iter().find_map(|trunk| trunk.dids.get(number).map(|flow| (tenant, trunk, flow.clone())))
        })
    }

    /// The tenant whose API token has this SHA-256.
    pub fn by_token(&self, digest: &[u8; 32]) -> Option<&Arc<Tenant>> {
        self.all.iter().find(|t| t.api_token.as_ref() == Some(digest))
    }

    /// Every tenant.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.all.iter()
    }

    /// Every tenant's trunks.
    pub fn trunks(&self) -> impl Iterator<Item = &Arc<Trunk>> {
        self.all.iter().flat_map(|t| t.trunks.iter())
    }
}

impl Tenants {
    /// Builds every tenant of `config` for a reload: a tenant that `old` still knows keeps its
    /// kv space, its count of live calls, its trunks (whose tasks run on), and its caps and
    /// instance share where their limits did not change — so calls up keep holding their slots.
    pub fn build_with(
        config: &Config,
        resolver: &Arc<dyn crate::resolve::Resolve>,
        old: impl Fn(&str) -> Option<Arc<Tenant>>,
    ) -> anyhow::Result<Self> {
        let mut built = Self::build(config, resolver)?;
        for tenant in &mut built.all {
            if let (Some(previous), Some(fresh)) = (old(&tenant.id), Arc::get_mut(tenant)) {
                fresh.carry_over(&previous);
            }
        }
        Ok(built)
    }
}

impl Tenant {
    /// Takes over what must outlive a reload from the tenant it replaces (see
    /// [`Tenants::build_with`]).
    fn carry_over(&mut self, old: &Tenant) {
        // The kv space keeps its contents (a changed quota applies from the next start).
        self.kv = Arc::clone(&old.kv);
        self.live = Arc::clone(&old.live);
        self.trunks = old.trunks.clone();
        if self.max_calls == old.max_calls {
            self.caps.slots = old.caps.slots.clone();
        }
        if self.max_instances == old.max_instances {
            self.instances = Arc::clone(&old.instances);
        }
    }
}

/// The per-call flow limits a tenant's configuration asks for (memory, CPU budget, wall time).
pub fn limits_of(config: &TenantConfig) -> FlowLimits {
    let defaults = FlowLimits::default();
    FlowLimits {
        memory_bytes: config.memory_mb.map_or(defaults.memory_bytes, |mb| (mb as usize) << 20),
        cpu_budget: config.cpu_budget_ms.map_or(defaults.cpu_budget, Duration::from_millis),
        max_wall_time: config
            .max_flow_hours
            .map_or(defaults.max_wall_time, |h| Duration::from_secs(u64::from(h.max(1)) * 3_600)),
        ..defaults
    }
}

/// SHA-256 of an API token: what the registry keeps and compares (never the token).
pub fn token_digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}
