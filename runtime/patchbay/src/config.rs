//! Patchbay's configuration file (TOML). Every error names the line and the field.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

/// The configuration compiled into the binary.
pub const DEFAULT: &str = include_str!("default.toml");

/// A configuration error, located in its file.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ConfigError {
    origin: String,
    message: String,
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// SIP listeners.
    pub sip: SipConfig,
    /// The flow host.
    #[serde(default)]
    pub flows: FlowsConfig,
    /// The media engine.
    #[serde(default)]
    pub media: MediaConfig,
    /// Call detail records.
    #[serde(default)]
    pub cdr: CdrConfig,
    /// Where recordings (voicemail) are stored.
    #[serde(default)]
    pub storage: StorageConfig,
    /// The built-in demo AI agent.
    #[serde(default)]
    pub demo_agent: DemoAgentConfig,
    /// The HTTP control API (off without this table).
    pub api: Option<ApiConfig>,
    /// Log format and SIP message tracing.
    #[serde(default)]
    pub log: LogConfig,
    /// Tenants; at least one.
    #[serde(rename = "tenant", default)]
    pub tenants: Vec<TenantConfig>,
    /// Directory relative paths are resolved against (the config file's directory).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[sip]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SipConfig {
    /// `udp:ADDR:PORT`, `tcp:ADDR:PORT` or `tls:ADDR:PORT`.
    pub listen: Vec<Spanned<String>>,
    /// Public address for SDP and Contact behind NAT.
    pub external_ip: Option<std::net::IpAddr>,
    /// Messages per second accepted from one source address (bursts up to twice that);
    /// 0 turns the limit off.
    #[serde(default = "default_max_messages_per_source")]
    pub max_messages_per_source: u32,
    /// Valid messages queued for the endpoint before UDP input is dropped (TCP/TLS
    /// connections stop reading instead).
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    /// Seconds after which a TCP/TLS connection that carried nothing is closed; 0 = never.
    #[serde(default = "default_tcp_idle_timeout_secs")]
    pub tcp_idle_timeout_secs: u64,
    /// TCP/TLS connections open at once (inbound and outbound); more are refused.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// TCP/TLS connections one source (IPv4 address, IPv6 /64) may have open to us at once;
    /// 0 = no cap beyond `max_connections`.
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: usize,
    /// SIP server transactions held at once; a request beyond them gets a stateless 503 with
    /// Retry-After (a flood from spoofed sources holds no more).
    #[serde(default = "default_max_server_transactions")]
    pub max_server_transactions: usize,
    /// Inbound calls not yet answered, across tenants; a new one beyond them gets 503 with
    /// Retry-After.
    #[serde(default = "default_max_pending_calls")]
    pub max_pending_calls: usize,
    /// Seconds a drain (SIGTERM, `POST /v1/drain`) lets the calls up run before ending them.
    #[serde(default = "default_drain_timeout_secs")]
    pub drain_timeout_secs: u64,
    /// `[sip.tls]`: the certificate `tls:` listeners present.
    pub tls: Option<TlsConfig>,
}

/// `[sip.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first (relative to the config file).
    pub cert: Spanned<PathBuf>,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1; relative to the config file).
    pub key: Spanned<PathBuf>,
    /// The loaded server configuration (set by [`Config::parse`]).
    #[serde(skip)]
    pub server: Option<Arc<rustls::ServerConfig>>,
}

fn default_tcp_idle_timeout_secs() -> u64 {
    120
}

fn default_max_connections() -> usize {
    10_000
}

fn default_max_connections_per_source() -> usize {
    64
}

fn default_drain_timeout_secs() -> u64 {
    300
}

fn default_max_pending_calls() -> usize {
    1_000
}

fn default_max_server_transactions() -> usize {
    patchbay_sip::transaction::MAX_SERVER_TRANSACTIONS
}

fn default_max_messages_per_source() -> u32 {
    10_000
}

fn default_queue_depth() -> usize {
    4_096
}

/// `[media]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaConfig {
    /// End a call (BYE, cause "media timeout") when no RTP arrives for this many seconds while
    /// it is not on hold; 0 = never.
    #[serde(default = "default_rtp_timeout_secs")]
    pub rtp_timeout_secs: u64,
    /// Address RTP sockets bind to (default: the first SIP listener's address).
    pub rtp_bind: Option<std::net::IpAddr>,
    /// Offer SRTP (SDES, RFC 4568) to callers whose offer carries `a=crypto`.
    #[serde(default = "default_true")]
    pub srtp: bool,
    /// Exchange SDES keys over unencrypted signalling (UDP, TCP) too. SDES puts the SRTP keys
    /// in the SDP: over plain SIP anyone on the path reads them, so RFC 4568 §8.3 wants the
    /// signalling protected. Off by default: SRTP is then agreed only on calls signalled over
    /// TLS (an `RTP/SAVP` offer over UDP gets 488; an `RTP/AVP` one with `a=crypto`, plain RTP).
    #[serde(default)]
    pub srtp_over_plain: bool,
    /// Our packetisation interval (`a=ptime`): 10, 20, 30 or 40 ms. A caller's own `a=ptime`
    /// wins when it states one (RFC 4566 §6: ptime is what each side prefers to receive).
    #[serde(default = "default_ptime_ms", deserialize_with = "ptime_ms")]
    pub ptime_ms: u16,
}

fn default_ptime_ms() -> u16 {
    20
}

fn ptime_ms<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u16, D::Error> {
    let ms = <u16 as serde::Deserialize>::deserialize(deserializer)?;
    if patchbay_sip::sdp::valid_ptime(ms) {
        Ok(ms)
    } else {
        Err(serde::de::Error::custom(format!("ptime_ms must be 10, 20, 30 or 40 (got {ms})")))
    }
}

fn default_rtp_timeout_secs() -> u64 {
    60
}

fn default_true() -> bool {
    true
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            rtp_timeout_secs: default_rtp_timeout_secs(),
            rtp_bind: None,
            srtp: true,
            srtp_over_plain: false,
            ptime_ms: default_ptime_ms(),
        }
    }
}

/// `[flows]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowsConfig {
    /// Flow instances that may run at once.
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// Largest flow memory in MiB.
    #[serde(default = "default_max_memory_mb")]
    pub max_memory_mb: u32,
    /// Precompiled flow cache.
    pub cache_dir: Option<PathBuf>,
}

fn default_max_instances() -> u32 {
    1_024
}

fn default_max_memory_mb() -> u32 {
    64
}

impl Default for FlowsConfig {
    fn default() -> Self {
        Self { max_instances: default_max_instances(), max_memory_mb: default_max_memory_mb(), cache_dir: None }
    }
}

/// `[cdr]`: one JSON line per call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdrConfig {
    /// Append CDRs to this file (relative to the config file). Without it they are logged
    /// (target `patchbay::cdr`) only.
    pub path: Option<PathBuf>,
    /// Rotate the file when it would grow beyond this many KiB (0: never by size). Default
    /// 102400 (100 MiB).
    #[serde(default = "default_rotate_kb")]
    pub rotate_kb: u64,
    /// Rotate the file once it is this many hours old (0, the default: never by age).
    #[serde(default)]
    pub rotate_hours: u64,
    /// Also `POST` each record (its JSON line) to this `http://` or `https://` URL, retried
    /// with back-off (docs/calls.md, "CDR delivery").
    pub webhook: Option<Spanned<String>>,
    /// Signs each delivery (`X-Patchbay-Signature: sha256=HMAC`) ...
    pub webhook_secret: Option<Secret>,
    /// ... or the environment variable that holds the secret.
    pub webhook_secret_env: Option<Spanned<String>>,
}

fn default_rotate_kb() -> u64 {
    102_400
}

impl Default for CdrConfig {
    fn default() -> Self {
        Self {
            path: None,
            rotate_kb: default_rotate_kb(),
            rotate_hours: 0,
            webhook: None,
            webhook_secret: None,
            webhook_secret_env: None,
        }
    }
}

/// `[log]`: how the log is written (docs/operations.md, "Logs").
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `plain` (default: one human-readable line per event, coloured only on a terminal) or
    /// `json` (one JSON object per line).
    #[serde(default)]
    pub format: LogFormat,
    /// Log every SIP message sent and received, whole (target `patchbay::sip_trace`, at info
    /// level), with credentials masked.
    #[serde(default)]
    pub sip_trace: bool,
    /// With `sip_trace`: only messages to or from these (`[tcp:|tls:]ADDR[/PREFIX]`); empty
    /// traces every peer.
    #[serde(default)]
    pub sip_trace_sources: Vec<crate::policy::TrustedSource>,
}

/// `[log] format`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// The `[log]` table of the file at `path` (the embedded default's without one), read before
/// the whole file is (the log is set up first, so that loading can log). A file that does not
/// parse gives the default here; loading it whole then reports the error with its line.
pub fn log_settings(path: Option<&std::path::Path>) -> LogConfig {
    #[derive(Deserialize)]
    struct OnlyLog {
        #[serde(default)]
        log: LogConfig,
    }
    let text = match path {
        Some(path) => std::fs::read_to_string(path).unwrap_or_default(),
        None => DEFAULT.to_owned(),
    };
    toml::from_str::<OnlyLog>(&text).map(|only| only.log).unwrap_or_default()
}

/// `[storage]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Directory for tenants' recordings: `DIR/<tenant>/recordings/<id>.wav` plus `<id>.json`
    /// (relative to the config file; default `$XDG_DATA_HOME/patchbay` or
    /// `~/.local/share/patchbay`).
    pub dir: Option<PathBuf>,
}

/// `[demo_agent]`: a small AI-agent stand-in served over a websocket (Twilio Media Streams):
/// it greets, repeats what the caller said, transfers on `0` and hangs up on `#`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoAgentConfig {
    /// `ADDR:PORT` to serve it on (off when absent).
    pub listen: Option<std::net::SocketAddr>,
    /// Where it asks to transfer the caller when they press `0`.
    pub transfer_to: Option<String>,
}

/// `[[tenant]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Tenant id.
    pub id: String,
    /// Domains routed to this tenant.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Per-call flow memory in MiB.
    pub memory_mb: Option<u32>,
    /// Per-call guest CPU budget in ms.
    pub cpu_budget_ms: Option<u64>,
    /// Longest a call's flow may run, wall clock, in hours (default 24): a flow blocked
    /// anywhere is ended then (CDR `wall-time-exceeded`). Raise it for calls that last days.
    pub max_flow_hours: Option<u32>,
    /// The tenant's flows.
    #[serde(rename = "flow", default)]
    pub flows: Vec<Spanned<FlowConfig>>,
    /// Directory of the tenant's flow components (`NAME.wasm`, relative to the config file),
    /// loaded at start and watched: a changed file is swapped in (`docs/hot-swap.md`).
    pub flows_dir: Option<Spanned<PathBuf>>,
    /// Digest authentication of inbound calls.
    pub auth: Option<AuthConfig>,
    /// Directory of the tenant's prompts (WAV files, relative to the config file); looked up
    /// before the stock prompts.
    pub prompts: Option<PathBuf>,
    /// The tenant's bearer token for the control API.
    pub api_token: Option<Secret>,
    /// ... or the environment variable that holds it.
    pub api_token_env: Option<Spanned<String>>,
    /// Calls of this tenant up at once (inbound and outbound); more inbound calls get 503,
    /// more originations wait in their trunk's queue.
    pub max_calls: Option<u32>,
    /// Outbound calls per second over all the tenant's trunks.
    pub calls_per_second: Option<f64>,
    /// Flow instances (calls running a flow) this tenant may hold at once, out of
    /// `[flows] max_instances`. Default: the whole pool for a lone tenant; with several, the
    /// pool less an eighth (at least one slot), so no tenant can take all of it.
    pub max_instances: Option<u32>,
    /// Bytes of keys and values the tenant's kv space may hold, in KiB (default 1024).
    pub kv_quota_kb: Option<u32>,
    /// Disk its recordings may take, in MiB (default 1024).
    pub recordings_quota_mb: Option<u32>,
    /// Days a recording is kept before it is deleted (default: kept until deleted).
    pub recordings_retention_days: Option<u32>,
    /// URL prefixes the tenant's API calls may name as `webhook` (none: no webhooks).
    #[serde(default)]
    pub webhooks: Vec<String>,
    /// Key of the webhooks' `X-Patchbay-Signature` (HMAC-SHA256 of the body).
    pub webhook_secret: Option<Secret>,
    /// ... or the environment variable that holds it.
    pub webhook_secret_env: Option<Spanned<String>>,
    /// The tenant's carrier trunks.
    #[serde(rename = "trunk", default)]
    pub trunks: Vec<Spanned<TrunkConfig>>,
    /// What its flows may reach beyond its own flows and trunks (`[tenant.allow]`).
    #[serde(default)]
    pub allow: AllowConfig,
}

/// `[tenant.allow]`: the tenant's capabilities (`crate::policy`, `docs/tenants.md`). Without
/// it, a tenant's flows reach its own flows and trunks only.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowConfig {
    /// Targets `dial` and `transfer` may reach: `sip:USER@HOST[:PORT]` / `sips:…` patterns
    /// (`*` in the user; `*` or `*.domain` as the host; `:*` for any port, no port for the
    /// default one), `tel:NUMBER` patterns (transfer), and `trunk:NAME/NUMBER` patterns, which
    /// narrow the numbers the tenant's trunks may call.
    #[serde(default)]
    pub dial: Vec<Spanned<String>>,
    /// Agent websockets `agent` may connect to: `ws://HOST[:PORT]` / `wss://…` origins.
    #[serde(default)]
    pub agents: Vec<Spanned<String>>,
    /// Headers `dial` may set (`X-…`, a trailing `*` for a prefix, and `User-to-User`); absent:
    /// every `X-` header and `User-to-User`.
    pub headers: Option<Vec<Spanned<String>>>,
    /// Send RTP where an SDP says even when that is a loopback, private or link-local address
    /// other than the one the signalling came from (a carrier's private media network). Off:
    /// such a call's RTP goes only where its audio is seen to come from (symmetric RTP).
    #[serde(default)]
    pub private_media: bool,
}

/// `[api]`: the HTTP/JSON control API (`docs/api.md`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `ADDR:PORT` to serve on.
    #[serde(default = "default_api_listen")]
    pub listen: std::net::SocketAddr,
    /// The admin token (every tenant's calls).
    pub admin_token: Option<Secret>,
    /// ... or the environment variable that holds it.
    pub admin_token_env: Option<Spanned<String>>,
}

fn default_api_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// A password or token: never printed (its `Debug` says `<redacted>`); the configuration's
/// copy is wiped from memory when dropped. (A trunk's digest client keeps its own copy of the
/// password for as long as it answers challenges.)
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(zeroize::Zeroizing<String>);

impl Secret {
    /// The secret itself, for the one place that needs it (a digest answer, a token check).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(zeroize::Zeroizing::new(value))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::from)
    }
}

/// How a trunk's signalling travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrunkTransport {
    /// UDP (port 5060 by default).
    #[default]
    Udp,
    /// TCP (port 5060 by default).
    Tcp,
    /// TLS (port 5061 by default; `sips:` targets).
    Tls,
}

/// SRTP on a trunk's calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SrtpMode {
    /// Plain RTP.
    #[default]
    Off,
    /// Offer SDES keys in an `RTP/AVP` offer; plain RTP when the carrier answers without.
    Optional,
    /// `RTP/SAVP` only: a carrier that cannot do SRTP fails the call.
    Mandatory,
}

/// `[[tenant.trunk]]`: a carrier SIP trunk (`docs/trunks.md`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrunkConfig {
    /// The name flows and the API use (`trunk:NAME/+15551234567`).
    pub name: String,
    /// The carrier's SIP server: `host[:port]`. A name without a port is resolved as RFC
    /// 3263 says (SRV, then A/AAAA); an IP address or an explicit port is used as is.
    pub gateway: Spanned<String>,
    /// `udp`, `tcp` or `tls`.
    #[serde(default)]
    pub transport: TrunkTransport,
    /// Send every request to this `host[:port]` instead (the Request-URI still names the
    /// gateway).
    pub outbound_proxy: Option<Spanned<String>>,
    /// Digest user name (REGISTER and INVITE challenges).
    pub username: Option<String>,
    /// Digest password.
    pub password: Option<Secret>,
    /// ... or the environment variable that holds it.
    pub password_env: Option<Spanned<String>>,
    /// Answer only challenges of this realm (default: any realm the gateway names).
    pub realm: Option<String>,
    /// Host part of our From and the registered address of record (default: the gateway's host).
    pub from_domain: Option<String>,
    /// Register with the gateway (RFC 3261 §10) and keep the registration fresh.
    #[serde(default)]
    pub register: bool,
    /// Registration lifetime we ask for, in seconds.
    #[serde(default = "default_register_expires")]
    pub register_expires_secs: u32,
    /// Caller IDs (E.164 numbers or user parts) the tenant may present on this trunk.
    #[serde(default)]
    pub caller_ids: Vec<Spanned<String>>,
    /// The caller ID used when a call names none (must be one of `caller_ids`).
    pub default_caller_id: Option<Spanned<String>>,
    /// Assert the caller ID in `P-Asserted-Identity` (RFC 3325) as well as in From.
    #[serde(default = "default_true")]
    pub p_asserted_identity: bool,
    /// Display name in From and P-Asserted-Identity (calls may give their own).
    pub caller_name: Option<String>,
    /// `Privacy` header value (RFC 3323/3325): `id` withholds the caller ID from the callee,
    /// `none` says it may be shown.
    pub privacy: Option<Spanned<String>>,
    /// Codecs to offer, in order of preference (`PCMU`, `PCMA`).
    pub codecs: Option<Vec<Spanned<String>>>,
    /// SRTP: `off`, `optional` or `mandatory`.
    #[serde(default)]
    pub srtp: SrtpMode,
    /// New outbound calls per second (token bucket; bursts of one second's worth).
    pub calls_per_second: Option<f64>,
    /// Outbound calls up at once on this trunk.
    pub max_calls: Option<u32>,
    /// Originations waiting for a token or a free call before the API answers 429.
    #[serde(default = "default_trunk_queue")]
    pub queue: usize,
    /// Seconds between keep-alives (OPTIONS over UDP, CRLF over TCP/TLS, RFC 5626 §3.5.1); 0 = none.
    #[serde(default = "default_keepalive_secs")]
    pub keepalive_secs: u64,
    /// A private CA (PEM) trusted for the gateway's TLS certificate, besides the webpki roots.
    pub ca: Option<Spanned<PathBuf>>,
    /// Source addresses of the carrier's inbound calls: trusted (not challenged) for this
    /// trunk's DIDs only.
    #[serde(default)]
    pub source_ips: Vec<std::net::IpAddr>,
    /// Inbound numbers (request-URI or To user) → the flow that answers them.
    #[serde(default)]
    pub dids: std::collections::BTreeMap<String, Spanned<String>>,
}

/// The range of `calls_per_second` (a token bucket slower than one call in 100 s, or faster
/// than a SIP stack serves, is a mistake).
const MIN_CPS: f64 = 0.01;
const MAX_CPS: f64 = 10_000.0;

fn default_register_expires() -> u32 {
    3600
}

fn default_trunk_queue() -> usize {
    1000
}

fn default_keepalive_secs() -> u64 {
    30
}

/// `[tenant.auth]`: challenge INVITEs from untrusted sources (RFC 3261 §22, 407 with
/// `Proxy-Authenticate`, RFC 7616 SHA-256 and MD5).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Realm in the challenge (default: the tenant id).
    pub realm: Option<String>,
    /// User name → password.
    pub users: std::collections::BTreeMap<String, String>,
    /// Sources whose calls are not challenged (a carrier's signalling addresses):
    /// `[tcp:|tls:]ADDRESS[/PREFIX]` (see [`crate::policy::TrustedSource`]).
    #[serde(default)]
    pub trusted: Vec<crate::policy::TrustedSource>,
    /// Algorithms offered, one challenge each, in this order (`SHA-256`, `MD5`, and their
    /// `-sess` forms). Default `["SHA-256", "MD5"]` (RFC 7616 §3.7 / RFC 8760). Many SIP
    /// devices answer only the first challenge and know only MD5: list `MD5` alone for them.
    pub algorithms: Option<Vec<Spanned<String>>>,
}

/// `[[tenant.flow]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowConfig {
    /// Name calls are routed by.
    pub name: String,
    /// A stock flow built into the binary.
    pub stock: Option<Spanned<String>>,
    /// A component file.
    pub path: Option<PathBuf>,
    /// Call variables every call to this flow starts with (for example `menu.1 = "dial:…"`).
    #[serde(default)]
    pub vars: std::collections::BTreeMap<String, String>,
}

/// Where a flow's component comes from.
#[derive(Debug, Clone)]
pub enum FlowSource {
    /// Built into the binary.
    Stock(&'static patchbay_stock_flows::StockFlow),
    /// A file.
    File(PathBuf),
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { origin: path.display().to_string(), message: e.to_string() })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, &path.display().to_string(), base)
    }

    /// The embedded default.
    pub fn embedded() -> Result<Self, ConfigError> {
        Self::parse(DEFAULT, "embedded default config", PathBuf::from("."))
    }

    /// Parses and checks configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str, base_dir: PathBuf) -> Result<Self, ConfigError> {
        let error = |span: Option<std::ops::Range<usize>>, message: String| ConfigError {
            origin: match span {
                Some(span) => format!("{origin}:{}", line_of(text, span.start)),
                None => origin.to_owned(),
            },
            message,
        };
        // toml's message names the field; its span gives the line.
        let mut config: Config =
            toml::from_str(text).map_err(|e| error(e.span(), name_the_field(text, e.span(), e.message())))?;
        config.base_dir = base_dir;
        let mut tls_listener = None;
        for listen in &config.sip.listen {
            let parsed =
                parse_listen(listen.get_ref()).map_err(|m| error(Some(listen.span()), format!("sip.listen: {m}")))?;
            if parsed.transport == "tls" {
                tls_listener.get_or_insert(listen.span());
            }
        }
        match (&mut config.sip.tls, tls_listener) {
            (Some(tls), _) => {
                let server = load_tls(tls, &config.base_dir).map_err(|(span, m)| error(Some(span), m))?;
                tls.server = Some(server);
            }
            (None, Some(span)) => {
                return Err(error(
                    Some(span),
                    "sip.listen: a tls: listener needs [sip.tls] with `cert` and `key`".into(),
                ));
            }
            (None, None) => {}
        }
        if config.tenants.is_empty() {
            return Err(error(None, "at least one [[tenant]] is required".into()));
        }
        let mut tenant_ids = std::collections::HashSet::new();
        for tenant in &config.tenants {
            for algorithm in tenant.auth.iter().flat_map(|a| a.algorithms.iter().flatten()) {
                if patchbay_sip::auth::Algorithm::from_token(algorithm.get_ref()).is_err() {
                    return Err(error(
                        Some(algorithm.span()),
                        format!(
                            "tenant.auth.algorithms: unknown algorithm {:?} (SHA-256, MD5, SHA-256-sess, MD5-sess)",
                            algorithm.get_ref()
                        ),
                    ));
                }
            }
            if !tenant_ids.insert(tenant.id.as_str()) {
                return Err(error(None, format!("tenant.id: tenant {:?} is defined twice", tenant.id)));
            }
            if let Some(dir) = &tenant.flows_dir {
                let path = config.base_dir.join(dir.get_ref());
                if !path.is_dir() {
                    return Err(error(
                        Some(dir.span()),
                        format!("tenant.flows_dir: {} is not a directory", path.display()),
                    ));
                }
            }
            let mut flow_names = std::collections::HashSet::new();
            for flow in &tenant.flows {
                if !flow_names.insert(flow.get_ref().name.as_str()) {
                    return Err(error(
                        Some(flow.span()),
                        format!(
                            "tenant.flow.name: tenant {:?} has two flows named {:?}",
                            tenant.id,
                            flow.get_ref().name
                        ),
                    ));
                }
                let span = Some(flow.span());
                let f = flow.get_ref();
                match (&f.stock, &f.path) {
                    (Some(stock), None) => {
                        if stock_flow(stock.get_ref()).is_none() {
                            let known: Vec<_> = patchbay_stock_flows::ALL.iter().map(|s| s.name).collect();
                            return Err(error(
                                Some(stock.span()),
                                format!(
                                    "tenant.flow.stock: no stock flow {:?} (known: {})",
                                    stock.get_ref(),
                                    known.join(", ")
                                ),
                            ));
                        }
                    }
                    (None, Some(_)) => {}
                    // Variables for a flow that comes from the tenant's `flows_dir`.
                    (None, None) if tenant.flows_dir.is_some() => {}
                    _ => {
                        return Err(error(
                            span,
                            format!(
                                "tenant.flow {:?}: set exactly one of `stock` and `path` (or `flows_dir` on the tenant)",
                                f.name
                            ),
                        ));
                    }
                }
            }
        }
        // A DID names one trunk.
        let mut dids = std::collections::HashMap::new();
        for tenant in &config.tenants {
            for trunk in &tenant.trunks {
                for (did, flow) in &trunk.get_ref().dids {
                    if let Some(other) = dids.insert(did.as_str(), (&tenant.id, &trunk.get_ref().name)) {
                        return Err(error(
                            Some(flow.span()),
                            format!(
                                "tenant.trunk.dids: {did:?} is also a DID of trunk {:?} of tenant {:?}",
                                other.1, other.0
                            ),
                        ));
                    }
                }
            }
        }
        {
            let cdr = &mut config.cdr;
            secret_from_env(&mut cdr.webhook_secret, &cdr.webhook_secret_env, "cdr.webhook_secret")
                .map_err(|(span, m)| error(span, m))?;
            if let Some(url) = &cdr.webhook {
                let text = url.get_ref();
                let parsed = text.parse::<hyper::Uri>().ok().filter(|u| {
                    matches!(u.scheme_str(), Some("http" | "https"))
                        && u.authority().is_some_and(|a| !a.as_str().contains('@'))
                });
                if parsed.is_none() {
                    return Err(error(
                        Some(url.span()),
                        format!("cdr.webhook: {text:?} is not an http:// or https:// URL"),
                    ));
                }
            }
        }
        if let Some(api) = &mut config.api {
            let (token, env) = (&mut api.admin_token, &api.admin_token_env);
            secret_from_env(token, env, "api.admin_token").map_err(|(span, m)| error(span, m))?;
        }
        for tenant in &mut config.tenants {
            secret_from_env(&mut tenant.api_token, &tenant.api_token_env, "tenant.api_token")
                .map_err(|(span, m)| error(span, m))?;
            secret_from_env(&mut tenant.webhook_secret, &tenant.webhook_secret_env, "tenant.webhook_secret")
                .map_err(|(span, m)| error(span, m))?;
            if let Some(cps) = tenant.calls_per_second
                && !(MIN_CPS..=MAX_CPS).contains(&cps)
            {
                return Err(error(None, format!("tenant.calls_per_second: {MIN_CPS} to {MAX_CPS} (got {cps})")));
            }
            if let Some(n) = tenant.max_instances
                && !(1..=config.flows.max_instances).contains(&n)
            {
                return Err(error(
                    None,
                    format!(
                        "tenant.max_instances: 1 to [flows] max_instances ({}), got {n}",
                        config.flows.max_instances
                    ),
                ));
            }
            if let Some(kb) = tenant.kv_quota_kb
                && !(1..=1 << 20).contains(&kb)
            {
                return Err(error(None, format!("tenant.kv_quota_kb: 1 to 1048576 (1 GiB), got {kb}")));
            }
            if let Some(mb) = tenant.recordings_quota_mb
                && !(1..=1 << 24).contains(&mb)
            {
                return Err(error(None, format!("tenant.recordings_quota_mb: 1 to 16777216 (16 TiB), got {mb}")));
            }
            if let Some(days) = tenant.recordings_retention_days
                && !(1..=36_500).contains(&days)
            {
                return Err(error(None, format!("tenant.recordings_retention_days: 1 to 36500, got {days}")));
            }
            if tenant.max_calls == Some(0) {
                return Err(error(None, "tenant.max_calls: must be at least 1 (leave it out for no cap)".into()));
            }
            let trunk_names: Vec<&str> = tenant.trunks.iter().map(|t| t.get_ref().name.as_str()).collect();
            crate::policy::Capabilities::from_config(&tenant.id, &tenant.allow, &trunk_names)
                .map_err(|(span, m)| error(Some(span), m))?;
            // With a flows directory, a DID may name a flow that is deployed later.
            let flows: Option<Vec<String>> =
                tenant.flows_dir.is_none().then(|| tenant.flows.iter().map(|f| f.get_ref().name.clone()).collect());
            let mut names = std::collections::HashSet::new();
            for trunk in &tenant.trunks {
                let t = trunk.get_ref();
                if t.srtp != SrtpMode::Off && t.transport != TrunkTransport::Tls && !config.media.srtp_over_plain {
                    return Err(error(
                        Some(trunk.span()),
                        format!(
                            "tenant.trunk.srtp: trunk {:?} would send its SRTP keys (SDES) over {:?} in the clear \
                             (RFC 4568 §8.3): use transport = \"tls\", srtp = \"off\", or [media] srtp_over_plain = true",
                            t.name, t.transport
                        ),
                    ));
                }
            }
            for trunk in &mut tenant.trunks {
                let span = trunk.span();
                let t = trunk.get_mut();
                if !names.insert(t.name.clone()) {
                    return Err(error(
                        Some(span),
                        format!("tenant.trunk.name: tenant {:?} has two trunks named {:?}", tenant.id, t.name),
                    ));
                }
                check_trunk(t, flows.as_deref(), &config.base_dir)
                    .map_err(|(at, m)| error(Some(at.unwrap_or(span)), m))?;
            }
        }
        // Every token names one principal (read after the environment has been).
        let mut tokens = std::collections::HashSet::new();
        let admin = config.api.as_ref().and_then(|a| a.admin_token.as_ref()).map(Secret::expose);
        let tenant_tokens = config.tenants.iter().filter_map(|t| t.api_token.as_ref().map(Secret::expose));
        for token in admin.into_iter().chain(tenant_tokens) {
            if !tokens.insert(token) {
                return Err(error(None, "api tokens: two principals (admin, tenants) share one token".into()));
            }
        }
        Ok(config)
    }
}

/// Takes a secret from the environment variable `env` names when the value is not in the file.
fn secret_from_env(
    value: &mut Option<Secret>,
    env: &Option<Spanned<String>>,
    field: &str,
) -> Result<(), (Option<std::ops::Range<usize>>, String)> {
    let Some(env) = env else { return Ok(()) };
    if value.is_some() {
        return Err((Some(env.span()), format!("{field}: set `{field}` or `{field}_env`, not both")));
    }
    match std::env::var(env.get_ref()) {
        Ok(secret) if !secret.is_empty() => {
            *value = Some(Secret::from(secret));
            Ok(())
        }
        _ => Err((Some(env.span()), format!("{field}_env: the environment variable {:?} is not set", env.get_ref()))),
    }
}

/// Checks one `[[tenant.trunk]]`; an error carries the span of the field at fault when there
/// is one (else the trunk's table is named).
fn check_trunk(
    t: &mut TrunkConfig,
    flows: Option<&[String]>,
    base_dir: &Path,
) -> Result<(), (Option<std::ops::Range<usize>>, String)> {
    let at = |span: std::ops::Range<usize>, m: String| (Some(span), m);
    let name = t.name.clone();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err((None, format!("tenant.trunk.name: {name:?} must be letters, digits, '-', '_' or '.'")));
    }
    crate::trunk::HostPort::parse(t.gateway.get_ref())
        .map_err(|m| at(t.gateway.span(), format!("tenant.trunk.gateway: {m}")))?;
    if let Some(proxy) = &t.outbound_proxy {
        crate::trunk::HostPort::parse(proxy.get_ref())
            .map_err(|m| at(proxy.span(), format!("tenant.trunk.outbound_proxy: {m}")))?;
    }
    secret_from_env(&mut t.password, &t.password_env, "tenant.trunk.password")?;
    match (&t.username, &t.password) {
        (Some(_), None) => {
            return Err((None, format!("tenant.trunk {name:?}: `username` needs `password` (or `password_env`)")));
        }
        (None, Some(_)) => return Err((None, format!("tenant.trunk {name:?}: `password` needs `username`"))),
        (None, None) if t.register => {
            return Err((None, format!("tenant.trunk {name:?}: `register = true` needs `username` and `password`")));
        }
        _ => {}
    }
    if t.register_expires_secs < 60 {
        return Err((
            None,
            format!("tenant.trunk.register_expires_secs: at least 60 (got {})", t.register_expires_secs),
        ));
    }
    for id in &t.caller_ids {
        crate::trunk::check_caller_id(id.get_ref())
            .map_err(|m| at(id.span(), format!("tenant.trunk.caller_ids: {m}")))?;
    }
    if let Some(default) = &t.default_caller_id
        && !t.caller_ids.iter().any(|id| id.get_ref() == default.get_ref())
    {
        if !t.caller_ids.is_empty() {
            return Err(at(
                default.span(),
                format!("tenant.trunk.default_caller_id: {:?} is not one of `caller_ids`", default.get_ref()),
            ));
        }
        // A default alone is the one caller ID the trunk may present.
        crate::trunk::check_caller_id(default.get_ref())
            .map_err(|m| at(default.span(), format!("tenant.trunk.default_caller_id: {m}")))?;
        t.caller_ids.push(default.clone());
    }
    for codec in t.codecs.iter().flatten() {
        if !matches!(codec.get_ref().to_ascii_uppercase().as_str(), "PCMU" | "PCMA") {
            return Err(at(
                codec.span(),
                format!("tenant.trunk.codecs: unknown codec {:?} (PCMU, PCMA)", codec.get_ref()),
            ));
        }
    }
    if t.codecs.as_ref().is_some_and(Vec::is_empty) {
        return Err((None, format!("tenant.trunk {name:?}: `codecs` is empty")));
    }
    if let Some(cps) = t.calls_per_second
        && !(MIN_CPS..=MAX_CPS).contains(&cps)
    {
        return Err((None, format!("tenant.trunk.calls_per_second: {MIN_CPS} to {MAX_CPS} (got {cps})")));
    }
    if let Some(privacy) = &t.privacy {
        let known = ["none", "id", "header", "session", "user", "critical"];
        let values: Vec<&str> = privacy.get_ref().split(';').map(str::trim).collect();
        if values.iter().any(|v| !known.contains(&v.to_ascii_lowercase().as_str())) {
            return Err(at(
                privacy.span(),
                format!(
                    "tenant.trunk.privacy: {:?} (RFC 3323 values: {}, joined by ;)",
                    privacy.get_ref(),
                    known.join(", ")
                ),
            ));
        }
    }
    if t.caller_name.as_ref().is_some_and(|n| n.chars().any(char::is_control) || n.len() > 64) {
        return Err((None, "tenant.trunk.caller_name: at most 64 characters, no control characters".into()));
    }
    if t.keepalive_secs > 3600 {
        return Err((None, format!("tenant.trunk.keepalive_secs: at most 3600 (got {})", t.keepalive_secs)));
    }
    if t.max_calls == Some(0) {
        return Err((None, "tenant.trunk.max_calls: must be at least 1 (leave it out for no cap)".into()));
    }
    if let Some(ca) = &t.ca {
        let path = base_dir.join(ca.get_ref());
        std::fs::read(&path).map_err(|e| at(ca.span(), format!("tenant.trunk.ca: {}: {e}", path.display())))?;
    }
    for (did, flow) in &t.dids {
        if flows.is_some_and(|flows| !flows.iter().any(|f| f == flow.get_ref())) {
            return Err(at(
                flow.span(),
                format!(
                    "tenant.trunk.dids: DID {did:?} names flow {:?}, which the tenant does not have",
                    flow.get_ref()
                ),
            ));
        }
    }
    Ok(())
}

impl FlowConfig {
    /// Where this flow's component comes from (valid after [`Config::parse`]).
    pub fn source(&self, base_dir: &Path) -> Option<FlowSource> {
        match (&self.stock, &self.path) {
            (Some(stock), None) => stock_flow(stock.get_ref()).map(FlowSource::Stock),
            (None, Some(path)) => Some(FlowSource::File(base_dir.join(path))),
            _ => None,
        }
    }
}

/// Reads `[sip.tls]`'s PEM files and builds the TLS server configuration (ring provider).
/// An error names the field and the file.
fn load_tls(tls: &TlsConfig, base_dir: &Path) -> Result<Arc<rustls::ServerConfig>, (std::ops::Range<usize>, String)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let read = |field: &str, spanned: &Spanned<PathBuf>| {
        let path = base_dir.join(spanned.get_ref());
        let fail = |m: String| (spanned.span(), format!("sip.tls.{field}: {}: {m}", path.display()));
        std::fs::read(&path).map(|bytes| (bytes, path.clone())).map_err(|e| fail(e.to_string()))
    };
    let (cert_pem, cert_path) = read("cert", &tls.cert)?;
    let cert_error = |m: String| (tls.cert.span(), format!("sip.tls.cert: {}: {m}", cert_path.display()));
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(cert_error("no CERTIFICATE block".into()));
    }
    let (key_pem, key_path) = read("key", &tls.key)?;
    let key_error = |m: String| (tls.key.span(), format!("sip.tls.key: {}: {m}", key_path.display()));
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| key_error(format!("no PEM private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| key_error(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| key_error(format!("unusable with the certificate: {e}")))?;
    Ok(Arc::new(server))
}

fn stock_flow(name: &str) -> Option<&'static patchbay_stock_flows::StockFlow> {
    patchbay_stock_flows::ALL.iter().find(|s| s.name == name)
}

/// A SIP listener: transport and socket address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// `udp`, `tcp` or `tls`.
    pub transport: &'static str,
    /// Socket address.
    pub addr: std::net::SocketAddr,
}

/// Parses `udp:127.0.0.1:5060`.
pub fn parse_listen(spec: &str) -> Result<Listen, String> {
    let (transport, addr) = spec.split_once(':').ok_or_else(|| format!("{spec:?} is not TRANSPORT:ADDR:PORT"))?;
    let transport = match transport {
        "udp" => "udp",
        "tcp" => "tcp",
        "tls" => "tls",
        other => return Err(format!("unknown transport {other:?} (udp, tcp or tls)")),
    };
    let addr = addr.parse().map_err(|e| format!("{addr:?}: {e}"))?;
    Ok(Listen { transport, addr })
}

/// toml names the field in some messages (`unknown field`, `missing field`) but not in others
/// (`unknown variant`, `invalid type`): prefix the key written on the error's line then.
fn name_the_field(text: &str, span: Option<std::ops::Range<usize>>, message: &str) -> String {
    let key = span.and_then(|span| {
        let start = text.get(..span.start)?.rfind('\n').map_or(0, |i| i + 1);
        let line = text.get(start..)?.lines().next()?;
        let (key, _) = line.split_once('=')?;
        Some(key.trim().trim_matches('"').to_owned())
    });
    match key {
        Some(key) if !key.is_empty() && !message.contains(&key) => format!("{key}: {message}"),
        _ => message.to_owned(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |before| before.matches('\n').count()) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_is_valid() {
        let config = Config::embedded().expect("embedded config parses");
        assert_eq!(config.tenants[0].id, "demo");
        let names: Vec<_> = config.tenants[0].flows.iter().map(|f| f.get_ref().name.as_str()).collect();
        assert_eq!(names, ["echo", "menu", "voicemail", "agent", "router"]);
        let router = config.tenants[0].flows[4].get_ref();
        assert_eq!(router.vars.get("router.default").map(String::as_str), Some("sip:{ext}@127.0.0.1:5070"));
        let listen = parse_listen(config.sip.listen[0].get_ref()).expect("listen");
        assert_eq!(listen.addr, "127.0.0.1:5060".parse().expect("addr"));
    }

    #[test]
    fn the_embedded_default_allows_what_its_flows_use_and_nothing_else() {
        let config = Config::embedded().expect("embedded config parses");
        let allow = &config.tenants[0].allow;
        let dial: Vec<&str> = allow.dial.iter().map(|d| d.get_ref().as_str()).collect();
        let agents: Vec<&str> = allow.agents.iter().map(|a| a.get_ref().as_str()).collect();
        assert_eq!((dial, agents), (vec!["sip:*@127.0.0.1:5070"], vec!["ws://127.0.0.1:8765"]));
        assert!(allow.headers.is_none());
    }

    #[test]
    fn a_bad_allow_entry_names_its_line_and_field() {
        let tenant = "[sip]\nlisten = []\n[[tenant]]\nid = \"t\"\n[tenant.allow]\n";
        let cases = [
            (
                "dial = [\"sip:a@b.example\",\n  \"sip:*@ev*il.example\"]\n",
                7,
                "tenant.allow.dial: \"sip:*@ev*il.example\"",
            ),
            ("dial = [\"trunk:nope/+1*\"]\n", 6, "the tenant has no trunk \"nope\""),
            ("agents = [\"ws://127.0.0.1:8765/agent\"]\n", 6, "tenant.allow.agents: "),
            ("headers = [\"From\"]\n", 6, "tenant.allow.headers: "),
            ("dail = []\n", 6, "unknown field `dail`"),
        ];
        for (allow, line, says) in cases {
            let err =
                Config::parse(&format!("{tenant}{allow}"), "t.toml", PathBuf::new()).expect_err(allow).to_string();
            assert!(err.starts_with(&format!("t.toml:{line}: ")) && err.contains(says), "{allow:?}: {err}");
        }
    }

    #[test]
    fn log_and_cdr_settings_are_read_and_bad_ones_named() {
        let tenant = "[[tenant]]\nid = \"t\"\n";
        let text = format!(
            "[sip]\nlisten = []\n[log]\nformat = \"json\"\nsip_trace = true\nsip_trace_sources = [\"tcp:192.0.2.0/24\"]\n\
             [cdr]\npath = \"c.jsonl\"\nrotate_kb = 64\nwebhook = \"https://billing.example/cdr\"\n{tenant}"
        );
        let config = Config::parse(&text, "t.toml", PathBuf::new()).expect("valid");
        assert_eq!(
            (config.log.format, config.log.sip_trace, config.log.sip_trace_sources.len()),
            (LogFormat::Json, true, 1)
        );
        assert_eq!((config.cdr.rotate_kb, config.cdr.rotate_hours), (64, 0));
        let defaults =
            Config::parse(&format!("[sip]\nlisten = []\n{tenant}"), "t.toml", PathBuf::new()).expect("valid");
        assert_eq!((defaults.log.format, defaults.cdr.rotate_kb), (LogFormat::Plain, 102_400));
        for (bad, line, field) in [
            ("[log]\nformat = \"xml\"\n", 4, "xml"),
            ("[log]\nsip_trace_sources = [\"not an address\"]\n", 4, "not an address"),
            ("[cdr]\nwebhook = \"ftp://billing.example/\"\n", 4, "cdr.webhook"),
        ] {
            let err = Config::parse(&format!("[sip]\nlisten = []\n{bad}{tenant}"), "t.toml", PathBuf::new())
                .expect_err(bad)
                .to_string();
            assert!(err.starts_with(&format!("t.toml:{line}: ")) && err.contains(field), "{bad}: {err}");
        }
        assert_eq!(log_settings(None).format, LogFormat::Plain, "the embedded default logs plain lines");
    }

    #[test]
    fn an_unknown_field_names_its_line_and_field() {
        let text = "[sip]\nlisten = []\n\n[flows]\nmax_instance = 3\n";
        let err = Config::parse(text, "test.toml", PathBuf::new()).expect_err("unknown field").to_string();
        assert!(err.starts_with("test.toml:5: "), "{err}");
        assert!(err.contains("max_instance"), "{err}");
    }

    #[test]
    fn a_ptime_the_clock_cannot_pace_names_its_line_and_field() {
        let text = "[sip]\nlisten = []\n\n[media]\nsrtp = true\nptime_ms = 25\n";
        let err = Config::parse(text, "test.toml", PathBuf::new()).expect_err("ptime 25").to_string();
        assert!(err.starts_with("test.toml:6: ") && err.contains("ptime_ms must be 10, 20, 30 or 40"), "{err}");
        let text = "[sip]\nlisten = []\n[media]\nptime_ms = 30\n[[tenant]]\nid = \"t\"\n[[tenant.flow]]\nname = \"e\"\nstock = \"echo\"\n";
        let ok = Config::parse(text, "test.toml", PathBuf::new()).expect("30");
        assert_eq!(ok.media.ptime_ms, 30);
    }

    #[test]
    fn an_unknown_stock_flow_names_its_line() {
        let text = "[sip]\nlisten = []\n[[tenant]]\nid = \"t\"\n[[tenant.flow]]\nname = \"x\"\nstock = \"nope\"\n";
        let err = Config::parse(text, "t.toml", PathBuf::new()).expect_err("unknown stock").to_string();
        assert!(err.starts_with("t.toml:7: tenant.flow.stock"), "{err}");
    }

    #[test]
    fn duplicates_and_a_missing_tenant_are_refused() {
        let text = "[sip]\nlisten = []\n[[tenant]]\nid = \"t\"\n[[tenant.flow]]\nname = \"x\"\nstock = \"echo\"\n[[tenant.flow]]\nname = \"x\"\nstock = \"menu\"\n";
        let err = Config::parse(text, "t.toml", PathBuf::new()).expect_err("duplicate flow").to_string();
        assert!(err.starts_with("t.toml:8: tenant.flow.name"), "{err}");
        let err = Config::parse("[sip]\nlisten = []\n", "t.toml", PathBuf::new()).expect_err("no tenant").to_string();
        assert!(err.contains("at least one [[tenant]]"), "{err}");
    }

    #[test]
    fn recording_quota_and_retention_are_checked_and_named() {
        for (line, field) in [
            ("recordings_quota_mb = 0", "tenant.recordings_quota_mb"),
            ("recordings_retention_days = 0", "tenant.recordings_retention_days"),
        ] {
            let text = format!("[sip]\nlisten = []\n[[tenant]]\nid = \"t\"\n{line}\n");
            let err = Config::parse(&text, "t.toml", PathBuf::new()).expect_err(line).to_string();
            assert!(err.contains(field), "{err}");
        }
        let text =
            "[sip]\nlisten = []\n[[tenant]]\nid = \"t\"\nrecordings_quota_mb = 5\nrecordings_retention_days = 30\n";
        let config = Config::parse(text, "t.toml", PathBuf::new()).expect("valid");
        assert_eq!(
            (config.tenants[0].recordings_quota_mb, config.tenants[0].recordings_retention_days),
            (Some(5), Some(30))
        );
    }

    #[test]
    fn tls_needs_readable_pem_files_and_errors_name_the_field_and_file() {
        let text = "[sip]\nlisten = [\"tls:127.0.0.1:5061\"]\n[[tenant]]\nid = \"t\"\n";
        let err = Config::parse(text, "t.toml", PathBuf::new()).expect_err("no [sip.tls]").to_string();
        assert!(err.starts_with("t.toml:2: sip.listen: a tls: listener needs [sip.tls]"), "{err}");

        let dir = std::env::temp_dir().join(format!("patchbay-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let text = "[sip]\nlisten = []\n[sip.tls]\ncert = \"missing.pem\"\nkey = \"k.pem\"\n[[tenant]]\nid = \"t\"\n";
        let err = Config::parse(text, "t.toml", dir.clone()).expect_err("missing cert").to_string();
        assert!(err.starts_with("t.toml:4: sip.tls.cert: "), "{err}");
        assert!(err.contains("missing.pem"), "{err}");

        std::fs::write(dir.join("c.pem"), "not pem at all\n").expect("write");
        let text = "[sip]\nlisten = []\n[sip.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n[[tenant]]\nid = \"t\"\n";
        let err = Config::parse(text, "t.toml", dir.clone()).expect_err("bad cert").to_string();
        assert!(err.starts_with("t.toml:4: sip.tls.cert: "), "{err}");
        assert!(err.contains("no CERTIFICATE"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tenant_auth_parses_and_an_unknown_algorithm_is_located() {
        let good = "[sip]\nlisten = []\n[[tenant]]\nid = \"t\"\n[tenant.auth]\nusers = { alice = \"pw\" }\n\
                    trusted = [\"192.0.2.1\"]\nalgorithms = [\"MD5\"]\n";
        let config = Config::parse(good, "t.toml", PathBuf::new()).expect("valid auth");
        let auth = config.tenants[0].auth.as_ref().expect("auth");
        assert_eq!(auth.users.get("alice").map(String::as_str), Some("pw"));
        assert_eq!(auth.trusted, vec!["192.0.2.1".parse::<crate::policy::TrustedSource>().expect("source")]);
        let bad = good.replace("192.0.2.1", "192.0.2.0/33");
        let err = Config::parse(&bad, "t.toml", PathBuf::new()).expect_err("bad prefix").to_string();
        assert!(err.starts_with("t.toml:7: ") && err.contains("prefix"), "{err}");
        let bad = good.replace("[\"MD5\"]", "[\"MD4\"]");
        let err = Config::parse(&bad, "t.toml", PathBuf::new()).expect_err("unknown algorithm").to_string();
        assert!(err.starts_with("t.toml:8: tenant.auth.algorithms: unknown algorithm \"MD4\""), "{err}");
    }

    #[test]
    fn a_bad_listener_and_a_wrong_type_are_located() {
        let text = "[sip]\nlisten = [\n  \"sctp:1.2.3.4:5060\",\n]\n[[tenant]]\nid = \"t\"\n";
        let err = Config::parse(text, "t.toml", PathBuf::new()).expect_err("bad transport").to_string();
        assert!(err.starts_with("t.toml:3: sip.listen: unknown transport"), "{err}");
        let text = "[sip]\nlisten = []\n[flows]\nmax_memory_mb = \"lots\"\n[[tenant]]\nid = \"t\"\n";
        let err = Config::parse(text, "t.toml", PathBuf::new()).expect_err("wrong type").to_string();
        assert!(err.starts_with("t.toml:4: "), "{err}");
    }

    const TRUNK_TENANT: &str =
        "[sip]\nlisten = []\n[[tenant]]\nid = \"t\"\n[[tenant.flow]]\nname = \"greet\"\nstock = \"greet\"\n";

    fn with_trunk(trunk: &str) -> Result<Config, String> {
        let text = format!("{TRUNK_TENANT}[[tenant.trunk]]\nname = \"carrier\"\n{trunk}");
        Config::parse(&text, "t.toml", PathBuf::new()).map_err(|e| e.to_string())
    }

    #[test]
    fn srtp_keys_over_a_plain_trunk_are_a_config_error_unless_allowed() {
        let err = with_trunk("gateway = \"sip.carrier.example\"\nsrtp = \"optional\"\n").expect_err("SDES over UDP");
        assert!(err.starts_with("t.toml:8: tenant.trunk.srtp:") && err.contains("RFC 4568"), "{err}");
        let text = format!(
            "{}[[tenant.trunk]]\nname = \"carrier\"\ngateway = \"sip.carrier.example\"\nsrtp = \"optional\"\n",
            TRUNK_TENANT.replace("listen = []\n", "listen = []\n[media]\nsrtp_over_plain = true\n")
        );
        Config::parse(&text, "t.toml", PathBuf::new()).expect("allowed explicitly");
    }

    #[test]
    fn a_trunk_parses_and_its_password_never_prints() {
        let config = with_trunk(
            "gateway = \"sip.carrier.example:5070\"\ntransport = \"tls\"\nusername = \"acct\"\n\
             password = \"hunter2\"\nregister = true\ncaller_ids = [\"+15550100\"]\ndefault_caller_id = \"+15550100\"\n\
             calls_per_second = 10\nsrtp = \"mandatory\"\n[tenant.trunk.dids]\n\"+15550199\" = \"greet\"\n",
        )
        .expect("valid trunk");
        let trunk = config.tenants[0].trunks[0].get_ref();
        assert_eq!(trunk.transport, TrunkTransport::Tls);
        assert_eq!(trunk.srtp, SrtpMode::Mandatory);
        assert_eq!(trunk.password.as_ref().map(Secret::expose), Some("hunter2"));
        assert!(!format!("{config:?}").contains("hunter2"), "the password shows in Debug output");
    }

    #[test]
    fn bad_trunk_entries_name_their_line_and_field() {
        // (the trunk's fields, the line the error must name, what it must say)
        let cases = [
            ("gateway = \"a b\"\n", 10, "tenant.trunk.gateway"),
            ("gateway = \"h\"\ntransport = \"sctp\"\n", 11, "transport"),
            (
                "gateway = \"h\"\ncaller_ids = [\"+1\"]\ndefault_caller_id = \"+2\"\n",
                12,
                "tenant.trunk.default_caller_id",
            ),
            ("gateway = \"h\"\ncaller_ids = [\"+1\\r\\nX: y\"]\n", 11, "tenant.trunk.caller_ids"),
            ("gateway = \"h\"\ncodecs = [\"G729\"]\n", 11, "tenant.trunk.codecs"),
            ("gateway = \"h\"\n[tenant.trunk.dids]\n\"+1\" = \"nope\"\n", 12, "tenant.trunk.dids"),
            ("gateway = \"h\"\npassword_env = \"PATCHBAY_TEST_SURELY_UNSET\"\n", 11, "password_env"),
            ("gateway = \"h\"\nregister = true\n", 8, "needs `username` and `password`"),
        ];
        for (trunk, line, says) in cases {
            let err = with_trunk(trunk).expect_err(trunk);
            assert!(err.starts_with(&format!("t.toml:{line}: ")), "{trunk:?}: {err}");
            assert!(err.contains(says), "{trunk:?}: {err}");
        }
        let two = format!(
            "{TRUNK_TENANT}[[tenant.trunk]]\nname = \"c\"\ngateway = \"h\"\n[[tenant.trunk]]\nname = \"c\"\ngateway = \"h\"\n"
        );
        let err = Config::parse(&two, "t.toml", PathBuf::new()).expect_err("two trunks named c").to_string();
        assert!(err.starts_with("t.toml:11: tenant.trunk.name"), "{err}");
    }

    #[test]
    fn tokens_and_dids_each_name_one_principal_and_one_trunk() {
        let shared = "[sip]\nlisten = []\n[api]\nadmin_token = \"x\"\n[[tenant]]\nid = \"t\"\napi_token = \"x\"\n";
        let err = Config::parse(shared, "t.toml", PathBuf::new()).expect_err("shared token").to_string();
        assert!(err.contains("share one token"), "{err}");
        let twice = "gateway = \"h\"\n[tenant.trunk.dids]\n\"+1\" = \"greet\"\n\
                     [[tenant.trunk]]\nname = \"other\"\ngateway = \"h\"\n[tenant.trunk.dids]\n\"+1\" = \"greet\"\n";
        let err = with_trunk(twice).expect_err("a DID on two trunks");
        assert!(err.starts_with("t.toml:17: tenant.trunk.dids") && err.contains("also a DID"), "{err}");
        let err = with_trunk("gateway = \"h\"\ncalls_per_second = 0.0000001\n").expect_err("tiny cps");
        assert!(err.contains("calls_per_second"), "{err}");
    }

    #[test]
    fn the_shipped_trunk_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/trunk.toml");
        let config = Config::load(&path).expect("examples/trunk.toml");
        let trunk = config.tenants[0].trunks[0].get_ref();
        assert_eq!((trunk.name.as_str(), trunk.gateway.get_ref().as_str()), ("carrier", "127.0.0.1:5070"));
        assert_eq!(config.api.as_ref().map(|a| a.listen.to_string()), Some("127.0.0.1:8080".to_owned()));
    }
}
