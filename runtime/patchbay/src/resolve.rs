//! Locating a carrier trunk's SIP servers in DNS (RFC 3263, "Locating SIP Servers").
//!
//! [`locate`] turns a trunk's `host[:port]` and configured transport into the ordered list of
//! addresses to try. The caller sends to the first and moves to the next on a transaction
//! timeout or a 503 (RFC 3263 §4.3), so the order carries the carrier's SRV priorities and
//! weights.
//!
//! The transport is fixed by configuration, so NAPTR (§4.1) is only used to learn which SRV
//! name the carrier publishes for it; the transport is never chosen from DNS.
//!
//! DNS goes through the [`Resolve`] trait: [`SystemResolver`] in production, canned records in
//! the tests, so every rule here is tested without a name server.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use async_trait::async_trait;
use hickory_resolver::TokioResolver;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::RData;

use crate::config::TrunkTransport;

/// At most this many addresses come back from one [`locate`]: a caller that has failed over this
/// many times is better off reporting the trunk down than walking a long tail.
pub const MAX_TARGETS: usize = 16;

/// At most this many DNS queries (NAPTR, SRV or A/AAAA) for one [`locate`], so a zone with
/// hundreds of SRV records cannot turn one call attempt into a query storm.
pub const MAX_LOOKUPS: usize = 16;

/// At most this many NAPTR replacements are followed (RFC 3263 §4.1): a carrier publishes one
/// SRV name per transport, more is a misconfiguration.
const MAX_SRV_NAMES: usize = 4;

/// One NAPTR record (RFC 3403 §4.1), as far as RFC 3263 §4.1 needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NaptrRecord {
    /// Lower is processed first.
    pub order: u16,
    /// Lower is preferred among records of one order.
    pub preference: u16,
    /// `S` for "the replacement is an SRV name", the only flag RFC 3263 uses.
    pub flags: String,
    /// `SIP+D2U`, `SIP+D2T`, `SIPS+D2T`, ... (RFC 3263 §4.1).
    pub services: String,
    /// Must be empty for SIP: RFC 3263 §4.1 uses the replacement only.
    pub regexp: String,
    /// The SRV name to query next.
    pub replacement: String,
}

/// One SRV record (RFC 2782).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvRecord {
    /// Lower is tried first.
    pub priority: u16,
    /// Share of the load among records of one priority.
    pub weight: u16,
    /// The port to send to.
    pub port: u16,
    /// The host to resolve to A/AAAA; `.` means the service is not offered.
    pub target: String,
}

/// Why one DNS query failed. "No such name" and "no records of that type" are not failures: a
/// [`Resolve`] implementation answers them with an empty list.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    /// No name server answered in time.
    #[error("no answer from the name servers in time")]
    Timeout,
    /// The name servers failed (SERVFAIL, REFUSED, unreachable, malformed answer, ...).
    #[error("{0}")]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// The kind of DNS query that failed, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// NAPTR (RFC 3263 §4.1).
    Naptr,
    /// SRV (RFC 3263 §4.2).
    Srv,
    /// A and AAAA (RFC 3263 §4.2).
    Address,
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Naptr => "NAPTR",
            Self::Srv => "SRV",
            Self::Address => "A/AAAA",
        })
    }
}

/// Why a trunk's servers could not be located. Every variant names the trunk host that was being
/// located, so an operator can tell which trunk's DNS is at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The configured host is empty (local configuration).
    #[error("empty trunk host")]
    EmptyHost,
    /// A DNS query failed (the name servers, or the carrier's zone).
    #[error("DNS {kind} lookup of {name:?} for trunk host {host:?} failed: {reason}")]
    Lookup {
        /// The trunk host being located.
        host: String,
        /// The name queried (the host itself, an SRV name or an SRV target).
        name: String,
        /// What was queried.
        kind: RecordKind,
        /// What went wrong.
        reason: LookupError,
    },
    /// The carrier's SRV records all say "." (RFC 2782: "the service is decidedly not
    /// available at this domain").
    #[error("trunk host {host:?} publishes that it offers no {service} service (SRV target \".\")")]
    ServiceNotOffered {
        /// The trunk host being located.
        host: String,
        /// The SRV name queried.
        service: String,
    },
    /// Every query succeeded and none gave an address (the carrier's zone).
    #[error("trunk host {host:?} has no usable SRV, A or AAAA records")]
    NoAddresses {
        /// The trunk host being located.
        host: String,
    },
    /// [`MAX_LOOKUPS`] queries gave no address (the carrier's zone is too deep or too wide).
    #[error("locating trunk host {host:?} took more than {MAX_LOOKUPS} DNS lookups")]
    TooManyLookups {
        /// The trunk host being located.
        host: String,
    },
}

/// The DNS queries RFC 3263 needs. Implementations answer a name that does not exist, or has no
/// records of the type, with an empty list, and keep [`LookupError`] for real failures: the
/// difference decides between falling back (§4.1, §4.2) and failing the call attempt.
#[async_trait]
pub trait Resolve: Send + Sync {
    /// NAPTR records of `name`, in any order.
    async fn naptr(&self, name: &str) -> Result<Vec<NaptrRecord>, LookupError>;
    /// SRV records of `name`, in any order.
    async fn srv(&self, name: &str) -> Result<Vec<SrvRecord>, LookupError>;
    /// A and AAAA addresses of `name`, in the order to try them.
    async fn ip(&self, name: &str) -> Result<Vec<IpAddr>, LookupError>;
}

/// DNS through the host's stub resolver configuration (`/etc/resolv.conf`), with hickory's
/// cache. Build one per process and share it: every clone shares the cache and the name server
/// connections.
#[derive(Clone)]
pub struct SystemResolver {
    inner: TokioResolver,
}

impl SystemResolver {
    /// Reads the system configuration. Fails when `/etc/resolv.conf` is missing or unreadable;
    /// needs no runtime and sends nothing until the first lookup.
    pub fn from_system_conf() -> Result<Self, NetError> {
        Ok(Self { inner: TokioResolver::builder_tokio()?.build()? })
    }
}

impl fmt::Debug for SystemResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SystemResolver").finish_non_exhaustive()
    }
}

/// Empty for "no such name" and "no such records", so the caller can fall back; an error
/// otherwise.
fn empty_or_failure<T>(e: NetError) -> Result<Vec<T>, LookupError> {
    if e.is_no_records_found() || e.is_nx_domain() {
        Ok(Vec::new())
    } else if matches!(e, NetError::Timeout) {
        Err(LookupError::Timeout)
    } else {
        Err(LookupError::Failed(Box::new(e)))
    }
}

#[async_trait]
impl Resolve for SystemResolver {
    async fn naptr(&self, name: &str) -> Result<Vec<NaptrRecord>, LookupError> {
        let lookup = match self.inner.lookup(name, hickory_resolver::proto::rr::RecordType::NAPTR).await {
            Ok(lookup) => lookup,
            Err(e) => return empty_or_failure(e),
        };
        // The answer section may hold CNAMEs on the way to the records.
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::NAPTR(naptr) => Some(NaptrRecord {
                    order: naptr.order,
                    preference: naptr.preference,
                    flags: String::from_utf8_lossy(&naptr.flags).into_owned(),
                    services: String::from_utf8_lossy(&naptr.services).into_owned(),
                    regexp: String::from_utf8_lossy(&naptr.regexp).into_owned(),
                    replacement: naptr.replacement.to_ascii(),
                }),
                _ => None,
            })
            .collect())
    }

    async fn srv(&self, name: &str) -> Result<Vec<SrvRecord>, LookupError> {
        let lookup = match self.inner.srv_lookup(name).await {
            Ok(lookup) => lookup,
            Err(e) => return empty_or_failure(e),
        };
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::SRV(srv) => Some(SrvRecord {
                    priority: srv.priority,
                    weight: srv.weight,
                    port: srv.port,
                    target: if srv.target.is_root() { ".".to_owned() } else { srv.target.to_ascii() },
                }),
                _ => None,
            })
            .collect())
    }

    async fn ip(&self, name: &str) -> Result<Vec<IpAddr>, LookupError> {
        match self.inner.lookup_ip(name).await {
            Ok(lookup) => Ok(lookup.iter().collect()),
            Err(e) => empty_or_failure(e),
        }
    }
}

/// The port when neither the configuration nor SRV names one (RFC 3261 §19.1.2; RFC 3263 §4.2).
pub fn default_port(transport: TrunkTransport) -> u16 {
    match transport {
        TrunkTransport::Udp | TrunkTransport::Tcp => 5060,
        TrunkTransport::Tls => 5061,
    }
}

/// The NAPTR service and the conventional SRV prefix for a transport (RFC 3263 §4.1, §4.2). TLS
/// is `SIPS+D2T` / `_sips._tcp`: a trunk configured for TLS must not be sent to a target
/// published only for plain TCP.
fn service_names(transport: TrunkTransport) -> (&'static str, &'static str) {
    match transport {
        TrunkTransport::Udp => ("SIP+D2U", "_sip._udp"),
        TrunkTransport::Tcp => ("SIP+D2T", "_sip._tcp"),
        TrunkTransport::Tls => ("SIPS+D2T", "_sips._tcp"),
    }
}

/// The ordered addresses to try for a trunk host (RFC 3263 §4), best first; the caller fails
/// over to the next on a timeout or a 503 (§4.3).
///
/// - An IP literal (`192.0.2.1`, `2001:db8::1` or `[2001:db8::1]`) is used as it is, with `port`
///   or the transport's default port.
/// - A name with an explicit port is resolved to A/AAAA only (§4.2).
/// - A name without one goes through NAPTR (§4.1, only to find the SRV name for `transport`),
///   then SRV in priority order, weighted-random within a priority (RFC 2782), each target
///   resolved to A/AAAA; a name with no SRV records is resolved to A/AAAA with the default port
///   (§4.2).
///
/// At most [`MAX_TARGETS`] addresses, found with at most [`MAX_LOOKUPS`] queries. The result is
/// never empty.
pub async fn locate(
    resolver: &dyn Resolve,
    host: &str,
    port: Option<u16>,
    transport: TrunkTransport,
) -> Result<Vec<SocketAddr>, ResolveError> {
    // The seed only spreads load across equal-priority servers (RFC 2782), so an OS RNG failure
    // costs balance, not safety: fall back to a fixed seed rather than fail the call.
    let seed = getrandom::u64().unwrap_or(0x9E37_79B9_7F4A_7C15);
    locate_seeded(resolver, host, port, transport, seed).await
}

/// [`locate`] with the SRV weighting drawn from `seed`, so tests can check the distribution.
async fn locate_seeded(
    resolver: &dyn Resolve,
    host: &str,
    port: Option<u16>,
    transport: TrunkTransport,
    seed: u64,
) -> Result<Vec<SocketAddr>, ResolveError> {
    let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = literal.parse::<IpAddr>() {
        // RFC 3263 §4.2: "If TARGET is a numeric IP address, the client uses that address."
        return Ok(vec![SocketAddr::new(ip, port.unwrap_or_else(|| default_port(transport)))]);
    }
    if host.is_empty() || host == "." {
        return Err(ResolveError::EmptyHost);
    }
    let mut search = Search { resolver, host, lookups: 0, targets: Vec::new() };
    if let Some(port) = port {
        // RFC 3263 §4.2: with a port in the URI, "the client SHOULD perform an A or AAAA record
        // lookup of the domain name" — no NAPTR, no SRV.
        search.addresses_of(host, port).await?;
        return search.finish();
    }

    let srv_names = search.srv_names(transport).await?;
    let mut rng = SplitMix64(seed);
    let mut not_offered = None;
    let mut saw_srv = false;
    let mut first_failure = None;
    let mut out_of_budget = None;
    'names: for srv_name in &srv_names {
        if search.full() {
            break;
        }
        let records = match search.srv(srv_name).await {
            Ok(records) => records,
            Err(e @ ResolveError::TooManyLookups { .. }) => {
                out_of_budget = Some(e);
                break;
            }
            // Not a reason to try the bare domain (§4.2 falls back only when there are no SRV
            // records, and we cannot know that); another NAPTR-named SRV name may still work.
            Err(e) => {
                first_failure.get_or_insert(e);
                continue;
            }
        };
        if records.is_empty() {
            continue;
        }
        saw_srv = true;
        // RFC 2782: a single record with target "." means "decidedly not available"; such a
        // record among others carries nothing to try, so it is skipped.
        let usable: Vec<SrvRecord> = records.into_iter().filter(|r| r.target != ".").collect();
        if usable.is_empty() {
            not_offered.get_or_insert_with(|| srv_name.clone());
            continue;
        }
        for record in order_srv(usable, &mut rng) {
            if search.full() {
                break;
            }
            // One target that does not resolve must not hide the others: the point of several
            // SRV records is that some may be down (RFC 3263 §4.3). Its error is kept in case no
            // target resolves at all.
            match search.addresses_of(&record.target, record.port).await {
                Ok(()) => {}
                Err(e @ ResolveError::TooManyLookups { .. }) => {
                    out_of_budget = Some(e);
                    break 'names;
                }
                Err(e) => {
                    first_failure.get_or_insert(e);
                }
            }
        }
    }
    if !search.targets.is_empty() {
        return search.finish();
    }
    // The first real failure explains more than running out of budget after it.
    if let Some(e) = first_failure.or(out_of_budget) {
        return Err(e);
    }
    if let Some(service) = not_offered {
        return Err(ResolveError::ServiceNotOffered { host: host.to_owned(), service });
    }
    if saw_srv {
        // SRV records exist but name hosts without addresses: the carrier meant those hosts,
        // so falling back to the bare domain would be a guess.
        return Err(ResolveError::NoAddresses { host: host.to_owned() });
    }
    // RFC 3263 §4.2: "If no SRV records were found, the client performs an A or AAAA record
    // lookup of the domain name", on the transport's default port.
    search.addresses_of(host, default_port(transport)).await?;
    search.finish()
}

/// The state of one [`locate`]: the lookup budget and the addresses found so far.
struct Search<'a> {
    resolver: &'a dyn Resolve,
    host: &'a str,
    lookups: usize,
    targets: Vec<SocketAddr>,
}

impl Search<'_> {
    fn full(&self) -> bool {
        self.targets.len() >= MAX_TARGETS
    }

    fn spend_lookup(&mut self) -> Result<(), ResolveError> {
        if self.lookups >= MAX_LOOKUPS {
            return Err(ResolveError::TooManyLookups { host: self.host.to_owned() });
        }
        self.lookups += 1;
        Ok(())
    }

    fn failure(&self, name: &str, kind: RecordKind, reason: LookupError) -> ResolveError {
        ResolveError::Lookup { host: self.host.to_owned(), name: name.to_owned(), kind, reason }
    }

    /// The SRV names to query for `transport`, best first (RFC 3263 §4.1).
    async fn srv_names(&mut self, transport: TrunkTransport) -> Result<Vec<String>, ResolveError> {
        let (service, prefix) = service_names(transport);
        let conventional = vec![format!("{prefix}.{}", self.host)];
        self.spend_lookup()?;
        let records = match self.resolver.naptr(self.host).await {
            Ok(records) => records,
            Err(reason) => {
                // NAPTR only tells us the SRV name, and RFC 3263 §4.1 gives the conventional
                // one for a domain without NAPTR. Name servers that mishandle NAPTR queries are
                // common enough that failing the call on them would be worse than going on.
                let error = self.failure(self.host, RecordKind::Naptr, reason);
                tracing::warn!("{error}; trying the conventional SRV name");
                return Ok(conventional);
            }
        };
        // RFC 3263 §4.1: discard records whose service is not the transport we use, then take
        // them in order, then preference (RFC 3403 §4.1). Only "S" records with an empty regexp
        // are SIP's: the replacement is the SRV name.
        let mut matching: Vec<NaptrRecord> = records
            .into_iter()
            .filter(|r| {
                r.services.eq_ignore_ascii_case(service)
                    && r.flags.eq_ignore_ascii_case("s")
                    && r.regexp.is_empty()
                    && !r.replacement.is_empty()
                    && r.replacement != "."
            })
            .collect();
        matching.sort_by_key(|r| (r.order, r.preference));
        // RFC 3403 §4.1: once a record of one order applies, records of later orders are not
        // considered.
        let Some(first_order) = matching.first().map(|r| r.order) else {
            // No NAPTR records (§4.1: go to SRV directly), or none for our transport. The
            // transport is the operator's choice, not DNS's, so we still ask the conventional
            // SRV name rather than give up: if the carrier really lacks it, SRV and then A/AAAA
            // say so.
            return Ok(conventional);
        };
        let mut names: Vec<String> = Vec::new();
        for record in matching.into_iter().take_while(|r| r.order == first_order) {
            if names.len() == MAX_SRV_NAMES {
                break;
            }
            if !names.contains(&record.replacement) {
                names.push(record.replacement);
            }
        }
        Ok(names)
    }

    async fn srv(&mut self, name: &str) -> Result<Vec<SrvRecord>, ResolveError> {
        self.spend_lookup()?;
        self.resolver.srv(name).await.map_err(|reason| self.failure(name, RecordKind::Srv, reason))
    }

    /// Adds `name`'s addresses on `port`, skipping ones already listed (two SRV records may
    /// name hosts that share an address; trying it twice gains nothing).
    async fn addresses_of(&mut self, name: &str, port: u16) -> Result<(), ResolveError> {
        self.spend_lookup()?;
        let ips = self.resolver.ip(name).await.map_err(|reason| self.failure(name, RecordKind::Address, reason))?;
        for ip in ips {
            if self.full() {
                break;
            }
            let addr = SocketAddr::new(ip, port);
            if !self.targets.contains(&addr) {
                self.targets.push(addr);
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<Vec<SocketAddr>, ResolveError> {
        if self.targets.is_empty() {
            Err(ResolveError::NoAddresses { host: self.host.to_owned() })
        } else {
            Ok(self.targets)
        }
    }
}

/// SRV records in the order to try them (RFC 2782, "Usage rules"): ascending priority; within a
/// priority, repeatedly pick one at random with probability proportional to its weight, with
/// weight-0 records placed first so they are chosen only when the draw is 0.
fn order_srv(mut records: Vec<SrvRecord>, rng: &mut SplitMix64) -> Vec<SrvRecord> {
    // Stable, so weight-0 records end up at the front of each priority group. The cap keeps the
    // quadratic draw below cheap for a hostile answer (a TCP answer can hold ~2000 records); we
    // resolve at most MAX_LOOKUPS targets anyway.
    records.sort_by_key(|r| (r.priority, r.weight != 0));
    records.truncate(MAX_TARGETS * 4);
    let mut ordered = Vec::with_capacity(records.len());
    while !records.is_empty() {
        let priority = records[0].priority;
        let group_len = records.iter().take_while(|r| r.priority == priority).count();
        let mut group: Vec<SrvRecord> = records.drain(..group_len).collect();
        while !group.is_empty() {
            let total: u64 = group.iter().map(|r| u64::from(r.weight)).sum();
            // RFC 2782: "a uniform random number between 0 and the sum computed (inclusive)".
            // The modulo bias is below 2^-40 for sums that fit 16 weights of 16 bits.
            let draw = rng.next_u64() % (total + 1);
            let mut running = 0u64;
            let pick = group
                .iter()
                .position(|r| {
                    running += u64::from(r.weight);
                    running >= draw
                })
                .unwrap_or(group.len() - 1);
            ordered.push(group.remove(pick));
        }
    }
    ordered
}

/// A small seeded generator (SplitMix64) for SRV weighting: only load spreading depends on it,
/// and a seed makes the tests' statistics reproducible.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Canned DNS: records per name, failures per (kind, name), and a log of the queries made.
    #[derive(Default)]
    struct FakeDns {
        naptr: HashMap<String, Vec<NaptrRecord>>,
        srv: HashMap<String, Vec<SrvRecord>>,
        ip: HashMap<String, Vec<IpAddr>>,
        failing: Vec<(RecordKind, String)>,
        queries: Mutex<Vec<(RecordKind, String)>>,
    }

    impl FakeDns {
        fn naptr(mut self, name: &str, records: &[(u16, u16, &str, &str, &str)]) -> Self {
            let records = records
                .iter()
                .map(|&(order, preference, flags, services, replacement)| NaptrRecord {
                    order,
                    preference,
                    flags: flags.to_owned(),
                    services: services.to_owned(),
                    regexp: String::new(),
                    replacement: replacement.to_owned(),
                })
                .collect();
            self.naptr.insert(name.to_owned(), records);
            self
        }

        fn srv(mut self, name: &str, records: &[(u16, u16, u16, &str)]) -> Self {
            let records = records
                .iter()
                .map(|&(priority, weight, port, target)| SrvRecord {
                    priority,
                    weight,
                    port,
                    target: target.to_owned(),
                })
                .collect();
            self.srv.insert(name.to_owned(), records);
            self
        }

        fn ip(mut self, name: &str, ips: &[&str]) -> Self {
            self.ip.insert(name.to_owned(), ips.iter().map(|ip| ip.parse().unwrap()).collect());
            self
        }

        fn failing(mut self, kind: RecordKind, name: &str) -> Self {
            self.failing.push((kind, name.to_owned()));
            self
        }

        fn answer<T: Clone>(
            &self,
            kind: RecordKind,
            name: &str,
            table: &HashMap<String, Vec<T>>,
        ) -> Result<Vec<T>, LookupError> {
            self.queries.lock().unwrap().push((kind, name.to_owned()));
            if self.failing.iter().any(|(k, n)| *k == kind && n == name) {
                return Err(LookupError::Timeout);
            }
            Ok(table.get(name).cloned().unwrap_or_default())
        }

        fn queries(&self) -> Vec<(RecordKind, String)> {
            self.queries.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl Resolve for FakeDns {
        async fn naptr(&self, name: &str) -> Result<Vec<NaptrRecord>, LookupError> {
            self.answer(RecordKind::Naptr, name, &self.naptr)
        }
        async fn srv(&self, name: &str) -> Result<Vec<SrvRecord>, LookupError> {
            self.answer(RecordKind::Srv, name, &self.srv)
        }
        async fn ip(&self, name: &str) -> Result<Vec<IpAddr>, LookupError> {
            self.answer(RecordKind::Address, name, &self.ip)
        }
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[tokio::test]
    async fn ip_literals_are_used_as_they_are() {
        let dns = FakeDns::default();
        let cases = [
            ("192.0.2.7", None, TrunkTransport::Udp, "192.0.2.7:5060"),
            ("192.0.2.7", None, TrunkTransport::Tls, "192.0.2.7:5061"),
            ("192.0.2.7", Some(5080), TrunkTransport::Tcp, "192.0.2.7:5080"),
            ("2001:db8::1", None, TrunkTransport::Udp, "[2001:db8::1]:5060"),
            ("[2001:db8::1]", Some(5062), TrunkTransport::Tls, "[2001:db8::1]:5062"),
        ];
        for (host, port, transport, want) in cases {
            let got = locate(&dns, host, port, transport).await.unwrap();
            assert_eq!(got, addrs(&[want]), "{host} {port:?} {transport:?}");
        }
        assert!(dns.queries().is_empty(), "an IP literal needs no DNS: {:?}", dns.queries());
    }

    #[tokio::test]
    async fn an_explicit_port_skips_naptr_and_srv() {
        let dns = FakeDns::default()
            .srv("_sip._udp.carrier.test", &[(10, 1, 5070, "sip1.carrier.test")])
            .ip("carrier.test", &["192.0.2.1", "2001:db8::5"]);
        let got = locate(&dns, "carrier.test", Some(5080), TrunkTransport::Udp).await.unwrap();
        assert_eq!(got, addrs(&["192.0.2.1:5080", "[2001:db8::5]:5080"]));
        assert_eq!(dns.queries(), vec![(RecordKind::Address, "carrier.test".to_owned())]);
    }

    #[tokio::test]
    async fn srv_priorities_come_in_order_with_each_targets_addresses() {
        let dns = FakeDns::default()
            .srv(
                "_sip._udp.carrier.test",
                &[
                    (20, 0, 5062, "backup.carrier.test"),
                    (10, 0, 5060, "primary.carrier.test"),
                    (30, 0, 5064, "last.carrier.test"),
                ],
            )
            .ip("primary.carrier.test", &["192.0.2.1", "192.0.2.2"])
            .ip("backup.carrier.test", &["198.51.100.1"])
            .ip("last.carrier.test", &["203.0.113.1"]);
        let got = locate(&dns, "carrier.test", None, TrunkTransport::Udp).await.unwrap();
        assert_eq!(got, addrs(&["192.0.2.1:5060", "192.0.2.2:5060", "198.51.100.1:5062", "203.0.113.1:5064"]));
    }

    #[tokio::test]
    async fn srv_weights_share_the_first_place_in_proportion() {
        // RFC 2782: among equal priorities, a server with weight 3 comes first three times as
        // often as one with weight 1; weight 0 comes first only on a zero draw; a lower
        // priority always comes after.
        let dns = FakeDns::default()
            .srv(
                "_sip._tcp.carrier.test",
                &[
                    (10, 30, 5060, "heavy.carrier.test"),
                    (10, 10, 5060, "light.carrier.test"),
                    (10, 0, 5060, "zero.carrier.test"),
                    (20, 50, 5060, "backup.carrier.test"),
                ],
            )
            .ip("heavy.carrier.test", &["192.0.2.3"])
            .ip("light.carrier.test", &["192.0.2.1"])
            .ip("zero.carrier.test", &["192.0.2.0"])
            .ip("backup.carrier.test", &["198.51.100.1"]);
        let heavy: SocketAddr = "192.0.2.3:5060".parse().unwrap();
        let light: SocketAddr = "192.0.2.1:5060".parse().unwrap();
        let backup: SocketAddr = "198.51.100.1:5060".parse().unwrap();
        let draws = 4000u64;
        let mut first = HashMap::<SocketAddr, u64>::new();
        for seed in 0..draws {
            let got = locate_seeded(&dns, "carrier.test", None, TrunkTransport::Tcp, seed).await.unwrap();
            assert_eq!(got.len(), 4);
            assert_eq!(got[3], backup, "the lower priority came before a higher one: {got:?}");
            *first.entry(got[0]).or_default() += 1;
        }
        let (h, l) = (first[&heavy], first[&light]);
        let zero = draws - h - l;
        // The draw is uniform over 0..=40: heavy wins 30 of 41 values (~2927 of 4000), light 10
        // (~976), zero-weight only 0 (~98). Bounds at over four standard deviations (~28).
        assert!((2800..=3050).contains(&h), "heavy first {h} of {draws}");
        assert!((860..=1100).contains(&l), "light first {l} of {draws}");
        assert!((40..=170).contains(&zero), "zero-weight first {zero} of {draws}");
    }

    #[tokio::test]
    async fn naptr_picks_the_srv_name_for_tls() {
        let dns = FakeDns::default()
            .naptr(
                "carrier.test",
                &[
                    (50, 50, "s", "SIP+D2U", "_sip._udp.carrier.test"),
                    (90, 50, "s", "SIPS+D2T", "_sips._tcp.edge.carrier.test"),
                    (80, 50, "s", "SIP+D2T", "_sip._tcp.carrier.test"),
                ],
            )
            .srv("_sips._tcp.edge.carrier.test", &[(0, 0, 5061, "tls.carrier.test")])
            .srv("_sips._tcp.carrier.test", &[(0, 0, 5099, "wrong.carrier.test")])
            .ip("tls.carrier.test", &["192.0.2.61"])
            .ip("wrong.carrier.test", &["192.0.2.99"]);
        let got = locate(&dns, "carrier.test", None, TrunkTransport::Tls).await.unwrap();
        assert_eq!(got, addrs(&["192.0.2.61:5061"]));
        assert_eq!(
            dns.queries(),
            vec![
                (RecordKind::Naptr, "carrier.test".to_owned()),
                (RecordKind::Srv, "_sips._tcp.edge.carrier.test".to_owned()),
                (RecordKind::Address, "tls.carrier.test".to_owned()),
            ]
        );
    }

    #[tokio::test]
    async fn without_naptr_the_conventional_srv_name_is_asked() {
        for (transport, name) in [
            (TrunkTransport::Udp, "_sip._udp.carrier.test"),
            (TrunkTransport::Tcp, "_sip._tcp.carrier.test"),
            (TrunkTransport::Tls, "_sips._tcp.carrier.test"),
        ] {
            let dns = FakeDns::default()
                .srv(name, &[(0, 0, 5099, "sip.carrier.test")])
                .ip("sip.carrier.test", &["192.0.2.9"]);
            let got = locate(&dns, "carrier.test", None, transport).await.unwrap();
            assert_eq!(got, addrs(&["192.0.2.9:5099"]), "{transport:?}");
        }
        // NAPTR present but not for our transport, or failing: the conventional name still.
        let dns = FakeDns::default()
            .naptr("carrier.test", &[(10, 10, "s", "SIP+D2U", "_sip._udp.carrier.test")])
            .srv("_sips._tcp.carrier.test", &[(0, 0, 5061, "sip.carrier.test")])
            .ip("sip.carrier.test", &["192.0.2.9"]);
        let got = locate(&dns, "carrier.test", None, TrunkTransport::Tls).await.unwrap();
        assert_eq!(got, addrs(&["192.0.2.9:5061"]));
        let dns = FakeDns::default()
            .failing(RecordKind::Naptr, "carrier.test")
            .srv("_sip._udp.carrier.test", &[(0, 0, 5060, "sip.carrier.test")])
            .ip("sip.carrier.test", &["192.0.2.9"]);
        let got = locate(&dns, "carrier.test", None, TrunkTransport::Udp).await.unwrap();
        assert_eq!(got, addrs(&["192.0.2.9:5060"]));
    }

    #[tokio::test]
    async fn no_srv_falls_back_to_the_hosts_addresses() {
        let dns = FakeDns::default().ip("carrier.test", &["192.0.2.4"]);
        let got = locate(&dns, "carrier.test", None, TrunkTransport::Tls).await.unwrap();
        assert_eq!(got, addrs(&["192.0.2.4:5061"]));
        assert_eq!(
            dns.queries(),
            vec![
                (RecordKind::Naptr, "carrier.test".to_owned()),
                (RecordKind::Srv, "_sips._tcp.carrier.test".to_owned()),
                (RecordKind::Address, "carrier.test".to_owned()),
            ]
        );
    }

    #[tokio::test]
    async fn failures_are_typed_and_name_the_host() {
        let dns = FakeDns::default().failing(RecordKind::Srv, "_sip._udp.carrier.test");
        let err = locate(&dns, "carrier.test", None, TrunkTransport::Udp).await.unwrap_err();
        assert!(
            matches!(
                &err,
                ResolveError::Lookup { host, name, kind: RecordKind::Srv, reason: LookupError::Timeout }
                    if host == "carrier.test" && name == "_sip._udp.carrier.test"
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("\"carrier.test\""), "{err}");

        let dns = FakeDns::default().failing(RecordKind::Address, "carrier.test");
        let err = locate(&dns, "carrier.test", Some(5060), TrunkTransport::Udp).await.unwrap_err();
        assert!(matches!(err, ResolveError::Lookup { kind: RecordKind::Address, .. }), "{err:?}");

        let dns = FakeDns::default();
        let err = locate(&dns, "nowhere.test", None, TrunkTransport::Udp).await.unwrap_err();
        assert!(matches!(&err, ResolveError::NoAddresses { host } if host == "nowhere.test"), "{err:?}");

        let dns = FakeDns::default().srv("_sip._udp.carrier.test", &[(0, 0, 0, ".")]);
        let err = locate(&dns, "carrier.test", None, TrunkTransport::Udp).await.unwrap_err();
        assert!(matches!(err, ResolveError::ServiceNotOffered { .. }), "{err:?}");

        let err = locate(&dns, "", None, TrunkTransport::Udp).await.unwrap_err();
        assert!(matches!(err, ResolveError::EmptyHost), "{err:?}");
    }

    #[tokio::test]
    async fn a_dead_srv_target_does_not_hide_the_others() {
        let dns = FakeDns::default()
            .srv("_sip._udp.carrier.test", &[(10, 0, 5060, "down.carrier.test"), (20, 0, 5060, "up.carrier.test")])
            .failing(RecordKind::Address, "down.carrier.test")
            .ip("up.carrier.test", &["192.0.2.8"]);
        let got = locate(&dns, "carrier.test", None, TrunkTransport::Udp).await.unwrap();
        assert_eq!(got, addrs(&["192.0.2.8:5060"]));
    }

    #[tokio::test]
    async fn targets_and_lookups_are_capped() {
        // 40 SRV targets with two addresses each: at most MAX_TARGETS addresses, at most
        // MAX_LOOKUPS queries.
        let mut records = Vec::new();
        let mut dns = FakeDns::default();
        let names: Vec<String> = (0..40).map(|i| format!("sip{i}.carrier.test")).collect();
        for (i, name) in names.iter().enumerate() {
            records.push((i as u16, 0, 5060, name.as_str()));
            dns = dns.ip(name, &[&format!("192.0.2.{i}"), &format!("198.51.100.{i}")]);
        }
        let dns = dns.srv("_sip._udp.carrier.test", &records);
        let got = locate(&dns, "carrier.test", None, TrunkTransport::Udp).await.unwrap();
        assert_eq!(got.len(), MAX_TARGETS);
        assert_eq!(got[0], "192.0.2.0:5060".parse().unwrap());
        assert!(dns.queries().len() <= MAX_LOOKUPS, "{} queries", dns.queries().len());

        // Targets that resolve to nothing burn the budget; the search stops and says so.
        let mut records = Vec::new();
        for (i, name) in names.iter().enumerate() {
            records.push((i as u16, 0, 5060, name.as_str()));
        }
        let dns = FakeDns::default().srv("_sip._udp.carrier.test", &records);
        let err = locate(&dns, "carrier.test", None, TrunkTransport::Udp).await.unwrap_err();
        assert!(matches!(err, ResolveError::TooManyLookups { .. }), "{err:?}");
        assert_eq!(dns.queries().len(), MAX_LOOKUPS);
    }

    #[tokio::test]
    async fn the_system_resolver_answers_localhost_without_the_network() {
        // RFC 6761 §6.3: localhost is answered locally, so this checks the hickory wiring (and
        // that /etc/resolv.conf is read) without sending a query.
        let resolver = SystemResolver::from_system_conf().unwrap();
        let got = locate(&resolver, "localhost", Some(5080), TrunkTransport::Udp).await.unwrap();
        assert!(got.iter().all(|a| a.ip().is_loopback() && a.port() == 5080), "{got:?}");
        assert!(!got.is_empty());
    }
}
