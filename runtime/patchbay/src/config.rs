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
        Self { rtp_timeout_secs: default_rtp_timeout_secs(), rtp_bind: None, srtp: true, ptime_ms: default_ptime_ms() }
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
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdrConfig {
    /// Append CDRs to this file (relative to the config file). Without it they are logged
    /// (target `patchbay::cdr`) only.
    pub path: Option<PathBuf>,
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
    /// The tenant's flows.
    #[serde(rename = "flow", default)]
    pub flows: Vec<Spanned<FlowConfig>>,
    /// Digest authentication of inbound calls.
    pub auth: Option<AuthConfig>,
    /// Directory of the tenant's prompts (WAV files, relative to the config file); looked up
    /// before the stock prompts.
    pub prompts: Option<PathBuf>,
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
    /// Source addresses whose calls are not challenged (a carrier's signalling IPs).
    #[serde(default)]
    pub trusted: Vec<std::net::IpAddr>,
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
        let mut config: Config = toml::from_str(text).map_err(|e| error(e.span(), e.message().to_owned()))?;
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
                    _ => {
                        return Err(error(
                            span,
                            format!("tenant.flow {:?}: set exactly one of `stock` and `path`", f.name),
                        ));
                    }
                }
            }
        }
        Ok(config)
    }
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
        assert_eq!(auth.trusted, vec!["192.0.2.1".parse::<std::net::IpAddr>().expect("ip")]);
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
}
