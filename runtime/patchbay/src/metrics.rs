//! Prometheus metrics (`GET /metrics` on the control API's listener; docs/operations.md lists
//! every metric and what an alert on it means).
//!
//! Two kinds of figures:
//!
//! - **Events** (calls set up and ended, SIP messages, drops, RTP totals, clock lateness, agent
//!   sessions, CDR writes) are counted where they happen, in [`METRICS`]: one process-wide set,
//!   as `tracing`'s dispatcher is one process-wide logger, so the transports, the endpoint, the
//!   media clock threads and the CDR writer count without a handle threaded through each.
//!   Counting is an atomic add (a histogram: a short uncontended lock).
//! - **State** that already has an owner (flows loaded and swapped in the flow registry, trunk
//!   registrations, each tenant's live calls and instance slots, draining) is read from that
//!   owner when scraped ([`Metrics::encode`]), not mirrored.
//!
//! Labels are bounded by the configuration: `tenant`, `flow` (a configured flow's name; a call
//! refused before it reached a flow has `flow=""`), `trunk`, `direction`, and fixed vocabularies
//! (`cause`, `reason`, `class`, `transport`). Never call ids, URIs or addresses.
//!
//! The exposition is OpenMetrics text (`prometheus-client`, the Prometheus project's own Rust
//! client), which Prometheus scrapes natively.

use std::sync::LazyLock;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// A call's labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CallLabels {
    pub tenant: String,
    pub flow: String,
    pub direction: &'static str,
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EndLabels {
    pub tenant: String,
    pub flow: String,
    pub direction: &'static str,
    pub cause: String,
}

/// A flow.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FlowLabels {
    pub tenant: String,
    pub flow: String,
}

/// How a flow's run ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FlowRunLabels {
    pub tenant: String,
    pub flow: String,
    pub outcome: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MessageLabels {
    /// `in` or `out`.
    pub direction: &'static str,
    /// `udp`, `tcp` or `tls`.
    pub transport: &'static str,
    /// `request` or `response`.
    pub kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResponseLabels {
    /// `in` (answers to our requests) or `out` (our answers).
    pub direction: &'static str,
    /// `2xx` … `6xx`.
    pub class: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TenantLabel {
    pub tenant: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TrunkLabels {
    pub tenant: String,
    pub trunk: String,
}

/// Every event metric, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Calls up now.
    pub calls_active: Family<CallLabels, Gauge>,
    /// Calls set up (routed to a flow, or an outbound leg placed).
    pub calls_started: Family<CallLabels, Counter>,
    /// Calls ended (one per CDR, refused calls included).
    pub calls_ended: Family<EndLabels, Counter>,
    /// INVITE → answer.
    pub call_setup: Family<DirectionLabel, Histogram>,
    /// Flow runs by outcome.
    pub flow_runs: Family<FlowRunLabels, Counter>,
    /// How long each flow run took (instantiation to return), wall clock.
    pub flow_run_time: Family<FlowLabels, Histogram>,
    /// SIP messages received and sent.
    pub sip_messages: Family<MessageLabels, Counter>,
    /// Final responses by class.
    pub sip_responses: Family<ResponseLabels, Counter>,
    /// SIP input dropped before the endpoint.
    pub sip_dropped: Family<ReasonLabel, Counter>,
    /// Server and client transactions alive.
    pub sip_transactions: Gauge,
    /// Dialogs (calls and legs) alive in the SIP core.
    pub sip_dialogs: Gauge,
    /// Requests the SIP core refused or dropped: `overload` (stateless 503 beyond the
    /// transaction cap), `foreign-response`, `foreign-request` (set from the core's counters).
    pub sip_refused: Family<ReasonLabel, Counter>,
    /// RTP packets received and sent (each call's added about once a second and at its end).
    pub rtp_packets: Family<DirectionLabel, Counter>,
    /// Datagrams on RTP ports not played: `invalid` (not RTP, or a payload type not agreed),
    /// `foreign` (not from the latched peer), `srtp` (failed authentication or replayed).
    pub rtp_dropped: Family<ReasonLabel, Counter>,
    /// Packets the peer never sent us (sequence gaps).
    pub rtp_lost: Counter,
    /// Frames played as concealment (nothing arrived in time).
    pub rtp_concealed: Counter,
    /// Each call's interarrival jitter (RFC 3550 §6.4.1) when its media ended.
    pub rtp_jitter: Histogram,
    /// How late each step of the media clock started.
    pub clock_lateness: Histogram,
    /// Steps that started more than 1 ms late.
    pub clock_missed: Counter,
    /// RTP sends that failed (socket buffer full, unreachable).
    pub rtp_send_errors: Counter,
    /// Agent sessions connected.
    pub agent_sessions: Counter,
    /// Agent connections that failed.
    pub agent_failures: Counter,
    /// CDRs written / failed to write.
    pub cdrs_written: Counter,
    pub cdr_failures: Counter,
    /// CDR webhook: records delivered, given up after every retry, and not queued (full).
    pub cdr_deliveries: Counter,
    pub cdr_delivery_failures: Counter,
    pub cdr_deliveries_dropped: Counter,
    /// Scraped state, set from its owners by [`Metrics::encode`].
    state: State,
    /// The series counted per SIP message and per dropped datagram, made once (their labels
    /// are fixed): no label hashing on the hot path, and every one in the exposition at 0.
    hot: Hot,
}

/// Directions, transports, kinds, classes and drop reasons, in the order [`Hot`] keeps them.
const DIRECTIONS: [&str; 2] = ["in", "out"];
const TRANSPORTS: [&str; 3] = ["udp", "tcp", "tls"];
const KINDS: [&str; 2] = ["request", "response"];
const CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "6xx"];
const DROPS: [&str; 4] = ["rate-limit", "parse-error", "queue-full", "too-slow"];
const REFUSALS: [&str; 3] = ["overload", "foreign-response", "foreign-request"];

#[derive(Debug, Default)]
struct Hot {
    /// `[direction][transport][kind]`, flattened.
    messages: Vec<Counter>,
    /// `[direction][class]`, flattened.
    responses: Vec<Counter>,
    /// By [`DROPS`].
    dropped: Vec<Counter>,
    /// By [`REFUSALS`].
    refused: Vec<Counter>,
    /// RTP packets by [`DIRECTIONS`].
    rtp: Vec<Counter>,
}

/// Gauges and counters whose values have an owner elsewhere, copied in at scrape time.
#[derive(Debug)]
struct State {
    flows_loaded: Family<TenantLabel, Gauge>,
    flow_swaps: Family<TenantLabel, Counter>,
    flow_deploy_failures: Family<TenantLabel, Counter>,
    tenant_calls: Family<TenantLabel, Gauge>,
    tenant_instances: Family<TenantLabel, Gauge>,
    tenant_instance_limit: Family<TenantLabel, Gauge>,
    trunk_registered: Family<TrunkLabels, Gauge>,
    draining: Gauge,
    /// Serialises scrapes: each one clears and refills the state families.
    scrape: std::sync::Mutex<()>,
}

/// Histogram buckets in seconds: 1 ms … ~16 s, doubling.
fn seconds_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15)
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("patchbay");
        let setup_buckets = || Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        let metrics = Self {
            calls_active: Family::default(),
            calls_started: Family::default(),
            calls_ended: Family::default(),
            call_setup: Family::new_with_constructor(setup_buckets),
            flow_runs: Family::default(),
            flow_run_time: Family::new_with_constructor(|| {
                Histogram::new([0.01, 0.1, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0])
            }),
            sip_messages: Family::default(),
            sip_responses: Family::default(),
            sip_dropped: Family::default(),
            sip_transactions: Gauge::default(),
            sip_dialogs: Gauge::default(),
            sip_refused: Family::default(),
            rtp_packets: Family::default(),
            rtp_dropped: Family::default(),
            rtp_lost: Counter::default(),
            rtp_concealed: Counter::default(),
            rtp_jitter: Histogram::new(seconds_buckets()),
            // 50 µs … ~100 ms: a step is 0.5 ms, a ptime 20 ms.
            clock_lateness: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.000_05, 2.0, 12,
            )),
            clock_missed: Counter::default(),
            rtp_send_errors: Counter::default(),
            agent_sessions: Counter::default(),
            agent_failures: Counter::default(),
            cdrs_written: Counter::default(),
            cdr_failures: Counter::default(),
            cdr_deliveries: Counter::default(),
            cdr_delivery_failures: Counter::default(),
            cdr_deliveries_dropped: Counter::default(),
            state: State {
                flows_loaded: Family::default(),
                flow_swaps: Family::default(),
                flow_deploy_failures: Family::default(),
                tenant_calls: Family::default(),
                tenant_instances: Family::default(),
                tenant_instance_limit: Family::default(),
                trunk_registered: Family::default(),
                draining: Gauge::default(),
                scrape: std::sync::Mutex::new(()),
            },
            registry: Registry::default(),
            hot: Hot::default(),
        };
        let mut metrics = metrics;
        for direction in DIRECTIONS {
            for transport in TRANSPORTS {
                for kind in KINDS {
                    let labels = MessageLabels { direction, transport, kind };
                    metrics.hot.messages.push(metrics.sip_messages.get_or_create(&labels).clone());
                }
            }
            for class in CLASSES {
                let labels = ResponseLabels { direction, class };
                metrics.hot.responses.push(metrics.sip_responses.get_or_create(&labels).clone());
            }
        }
        for reason in DROPS {
            metrics.hot.dropped.push(metrics.sip_dropped.get_or_create(&ReasonLabel { reason }).clone());
        }
        for direction in DIRECTIONS {
            metrics.hot.rtp.push(metrics.rtp_packets.get_or_create(&DirectionLabel { direction }).clone());
        }
        for reason in REFUSALS {
            metrics.hot.refused.push(metrics.sip_refused.get_or_create(&ReasonLabel { reason }).clone());
        }
        let m = &metrics;
        let r = &mut registry;
        r.register("calls_active", "Calls up now", m.calls_active.clone());
        r.register(
            "calls_started",
            "Calls set up: routed to a flow, or an outbound leg placed",
            m.calls_started.clone(),
        );
        r.register(
            "calls_ended",
            "Calls ended, by end cause (one per CDR, refused calls included)",
            m.calls_ended.clone(),
        );
        r.register("call_setup_seconds", "From the INVITE to the answer", m.call_setup.clone());
        r.register("flow_runs", "Flow runs ended, by outcome", m.flow_runs.clone());
        r.register("flow_run_seconds", "How long each flow run took, wall clock", m.flow_run_time.clone());
        r.register("sip_messages", "SIP messages received (in) and sent (out)", m.sip_messages.clone());
        r.register("sip_final_responses", "Final SIP responses by class", m.sip_responses.clone());
        r.register("sip_dropped", "SIP input dropped before the endpoint, by reason", m.sip_dropped.clone());
        r.register("sip_transactions", "SIP transactions alive", m.sip_transactions.clone());
        r.register("sip_dialogs", "Calls and legs alive in the SIP core", m.sip_dialogs.clone());
        r.register("sip_refused", "SIP messages the core refused or dropped, by reason", m.sip_refused.clone());
        r.register("rtp_packets", "RTP packets received (in) and sent (out)", m.rtp_packets.clone());
        r.register("rtp_dropped", "RTP packets received but not played, by reason", m.rtp_dropped.clone());
        r.register("rtp_lost", "RTP packets the peer sent that never arrived (sequence gaps)", m.rtp_lost.clone());
        r.register(
            "rtp_concealed_frames",
            "Frames played as concealment because nothing arrived in time",
            m.rtp_concealed.clone(),
        );
        r.register(
            "rtp_jitter_seconds",
            "Each call's interarrival jitter (RFC 3550) when its media ended",
            m.rtp_jitter.clone(),
        );
        r.register(
            "media_clock_lateness_seconds",
            "How late each 0.5 ms step of the media clock started",
            m.clock_lateness.clone(),
        );
        r.register(
            "media_clock_missed_steps",
            "Media clock steps that started more than 1 ms late",
            m.clock_missed.clone(),
        );
        r.register("rtp_send_errors", "RTP sends that failed", m.rtp_send_errors.clone());
        r.register("agent_sessions", "AI agent sessions connected", m.agent_sessions.clone());
        r.register("agent_connect_failures", "AI agent connections that failed", m.agent_failures.clone());
        r.register("cdrs_written", "CDRs written to the CDR file or log", m.cdrs_written.clone());
        r.register("cdr_write_failures", "CDRs that could not be written to the file", m.cdr_failures.clone());
        r.register("cdr_deliveries", "CDRs delivered to the CDR webhook", m.cdr_deliveries.clone());
        r.register(
            "cdr_delivery_failures",
            "CDRs the webhook did not take after every retry",
            m.cdr_delivery_failures.clone(),
        );
        r.register(
            "cdr_deliveries_dropped",
            "CDRs not queued for the webhook (queue full)",
            m.cdr_deliveries_dropped.clone(),
        );
        let s = &m.state;
        r.register("flows_loaded", "Flows serving new calls", s.flows_loaded.clone());
        r.register("flow_swaps", "Times a new version replaced a serving flow (hot swap)", s.flow_swaps.clone());
        r.register("flow_deploy_failures", "Deploys refused (did not compile or link)", s.flow_deploy_failures.clone());
        r.register("tenant_calls", "A tenant's live calls", s.tenant_calls.clone());
        r.register("tenant_instances_in_use", "A tenant's flow instance slots in use", s.tenant_instances.clone());
        r.register(
            "tenant_instance_slots",
            "A tenant's share of the flow instance pool",
            s.tenant_instance_limit.clone(),
        );
        r.register("trunk_registered", "1 while a registering trunk is registered", s.trunk_registered.clone());
        r.register("draining", "1 while draining (no new calls)", s.draining.clone());
        metrics.registry = registry;
        metrics
    }

    /// A finished call's record: calls ended and flow outcomes.
    pub fn record_ended(&self, cdr: &crate::cdr::Cdr) {
        // A call refused before it reached a flow names what was asked for in `flow`: not a label.
        let flow = if cdr.flow_version.is_empty() { String::new() } else { cdr.flow.clone() };
        self.calls_ended
            .get_or_create(&EndLabels {
                tenant: cdr.tenant.clone(),
                flow: flow.clone(),
                direction: cdr.direction,
                cause: cdr.end_cause.clone(),
            })
            .inc();
        if !flow.is_empty() && cdr.flow_outcome != "outbound-leg" {
            self.flow_runs
                .get_or_create(&FlowRunLabels { tenant: cdr.tenant.clone(), flow, outcome: cdr.flow_outcome.clone() })
                .inc();
        }
    }

    /// A SIP message in or out (`direction` `in` or `out`).
    pub fn sip_message(
        &self,
        direction: &'static str,
        transport: patchbay_sip::transaction::Transport,
        message: &rsip::SipMessage,
    ) {
        use patchbay_sip::transaction::Transport;
        let d = usize::from(direction == "out");
        let t = match transport {
            Transport::Udp => 0,
            Transport::Tcp => 1,
            Transport::Tls => 2,
        };
        let k = match message {
            rsip::SipMessage::Request(_) => 0,
            rsip::SipMessage::Response(response) => {
                let class = match response.status_code.code() {
                    200..=299 => Some(0),
                    300..=399 => Some(1),
                    400..=499 => Some(2),
                    500..=599 => Some(3),
                    600..=699 => Some(4),
                    _ => None,
                };
                if let Some(class) = class {
                    self.hot.responses[d * CLASSES.len() + class].inc();
                }
                1
            }
        };
        self.hot.messages[(d * TRANSPORTS.len() + t) * KINDS.len() + k].inc();
    }

    /// SIP input dropped before the endpoint: one of [`DROPS`] (`rate-limit`, `parse-error`,
    /// `queue-full`, `too-slow`: a message not complete within its deadline).
    pub fn sip_drop(&self, reason: &'static str) {
        match DROPS.iter().position(|r| *r == reason) {
            Some(i) => {
                self.hot.dropped[i].inc();
            }
            None => {
                self.sip_dropped.get_or_create(&ReasonLabel { reason }).inc();
            }
        }
    }

    /// The SIP core's own figures, after each of its turns.
    pub fn sip_core(&self, ua: &patchbay_sip::ua::UserAgent) {
        self.sip_transactions.set(i64::try_from(ua.transactions()).unwrap_or(i64::MAX));
        self.sip_dialogs.set(i64::try_from(ua.calls()).unwrap_or(i64::MAX));
        // The core's counters only grow: copied, not added.
        let values = [ua.overloaded(), ua.foreign_responses(), ua.foreign_requests()];
        for (counter, value) in self.hot.refused.iter().zip(values) {
            counter.inner().store(value, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A call's media counters now: what they moved since `counted` is added (about once a
    /// second while the call lasts, so the RTP figures are live).
    pub fn media_progress(
        &self,
        counted: &mut MediaCounted,
        stats: &patchbay_media::session::SessionStats,
        quality: &patchbay_media::session::QualityStats,
    ) {
        let add = |counter: &Counter, now: u64, before: &mut u64| {
            counter.inc_by(now.saturating_sub(*before));
            *before = (*before).max(now);
        };
        let before = &mut counted.stats;
        add(&self.hot.rtp[0], stats.received, &mut before.received);
        add(&self.hot.rtp[1], stats.sent, &mut before.sent);
        for (reason, now, was) in [
            ("invalid", stats.dropped, &mut before.dropped),
            ("foreign", stats.foreign, &mut before.foreign),
            ("srtp", stats.srtp_failures, &mut before.srtp_failures),
        ] {
            if now > *was {
                add(&self.rtp_dropped.get_or_create(&ReasonLabel { reason }), now, was);
            }
        }
        add(&self.rtp_concealed, stats.concealed, &mut before.concealed);
        let lost = u64::try_from(quality.local_cumulative_lost).unwrap_or(0);
        add(&self.rtp_lost, lost, &mut counted.lost);
    }

    /// A call's media has ended: the rest of its counters, and its jitter.
    pub fn media_ended(
        &self,
        counted: &mut MediaCounted,
        stats: &patchbay_media::session::SessionStats,
        quality: &patchbay_media::session::QualityStats,
    ) {
        self.media_progress(counted, stats, quality);
        if stats.received > 0 {
            self.rtp_jitter.observe(quality.local_jitter.as_secs_f64());
        }
    }

    /// One step of the media clock started `late`.
    pub fn clock_step(&self, late: Duration) {
        self.clock_lateness.observe(late.as_secs_f64());
        if late > Duration::from_millis(1) {
            self.clock_missed.inc();
        }
    }

    /// Copies the scraped state in from its owners and encodes everything (OpenMetrics text).
    pub fn encode(&self, now: &Scraped) -> String {
        let _one_at_a_time = self.state.scrape.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = &self.state;
        // Cleared first: a tenant or trunk removed by a reload leaves the exposition.
        for family in [&s.flows_loaded, &s.tenant_calls, &s.tenant_instances, &s.tenant_instance_limit] {
            family.clear();
        }
        s.trunk_registered.clear();
        // Swaps and failed deploys are summed per tenant over the registry's records, which
        // leave out a flow removed without calls or errors: a total that would go down keeps
        // its last value (a counter never goes back).
        let mut swaps: std::collections::HashMap<&str, (u64, u64)> = std::collections::HashMap::new();
        for record in &now.flows {
            let tenant = TenantLabel { tenant: record.key.tenant.clone() };
            if record.version.is_some() {
                s.flows_loaded.get_or_create(&tenant).inc();
            }
            let sums = swaps.entry(record.key.tenant.as_str()).or_default();
            sums.0 += record.swaps;
            sums.1 += record.failures;
        }
        for (tenant, (swapped, failed)) in swaps {
            let label = TenantLabel { tenant: tenant.to_owned() };
            s.flow_swaps.get_or_create(&label).inner().fetch_max(swapped, std::sync::atomic::Ordering::Relaxed);
            s.flow_deploy_failures
                .get_or_create(&label)
                .inner()
                .fetch_max(failed, std::sync::atomic::Ordering::Relaxed);
        }
        for tenant in &now.tenants {
            let label = TenantLabel { tenant: tenant.id.clone() };
            s.tenant_calls.get_or_create(&label).set(gauge(tenant.calls));
            s.tenant_instances.get_or_create(&label).set(gauge(tenant.instances_in_use));
            s.tenant_instance_limit.get_or_create(&label).set(gauge(tenant.instance_slots));
        }
        for trunk in &now.trunks {
            s.trunk_registered
                .get_or_create(&TrunkLabels { tenant: trunk.tenant.clone(), trunk: trunk.trunk.clone() })
                .set(i64::from(trunk.registered));
        }
        s.draining.set(i64::from(now.draining));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("encoding the metrics: {e}");
        }
        out
    }
}

/// The scraped state, as read from its owners (the API gathers it).
#[derive(Debug, Default)]
pub struct Scraped {
    /// The flow registry's records.
    pub flows: Vec<patchbay_host::FlowRecord>,
    pub tenants: Vec<TenantFigures>,
    /// Registering trunks.
    pub trunks: Vec<TrunkFigures>,
    pub draining: bool,
}

/// A tenant's live figures.
#[derive(Debug)]
pub struct TenantFigures {
    pub id: String,
    pub calls: usize,
    pub instances_in_use: usize,
    pub instance_slots: usize,
}

/// A registering trunk's state.
#[derive(Debug)]
pub struct TrunkFigures {
    pub tenant: String,
    pub trunk: String,
    pub registered: bool,
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// What of one call's media counters has been added to the metrics.
#[derive(Debug, Default)]
pub struct MediaCounted {
    stats: patchbay_media::session::SessionStats,
    lost: u64,
}

/// Keeps a call counted in `calls_active` until dropped (it lives in the call's record draft,
/// which every call has from its routing to its record).
#[derive(Debug)]
pub struct ActiveCall(Gauge<i64, AtomicI64>);

impl ActiveCall {
    /// Counts a call up now, and as set up when `started` (not for another attempt at it).
    pub fn start(labels: CallLabels, started: bool) -> Self {
        if started {
            METRICS.calls_started.get_or_create(&labels).inc();
        }
        let gauge = METRICS.calls_active.get_or_create(&labels).clone();
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for ActiveCall {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_counters_are_added_as_they_move_and_the_rest_at_the_end() {
        let metrics = Metrics::new();
        let mut counted = MediaCounted::default();
        let mut stats = patchbay_media::session::SessionStats { received: 50, sent: 48, ..Default::default() };
        let mut quality = patchbay_media::session::QualityStats { local_cumulative_lost: 2, ..Default::default() };
        metrics.media_progress(&mut counted, &stats, &quality);
        let packets = |direction| metrics.rtp_packets.get_or_create(&DirectionLabel { direction }).get();
        assert_eq!((packets("in"), packets("out"), metrics.rtp_lost.get()), (50, 48, 2));
        // A second later: only what moved is added. A loss count that went down (a late packet
        // filled a gap) is not taken back.
        stats.received = 100;
        stats.sent = 98;
        stats.concealed = 3;
        quality.local_cumulative_lost = 1;
        metrics.media_progress(&mut counted, &stats, &quality);
        assert_eq!((packets("in"), packets("out"), metrics.rtp_lost.get()), (100, 98, 2));
        assert_eq!(metrics.rtp_concealed.get(), 3);
        // The end adds what is left, and the call's jitter.
        stats.received = 120;
        quality.local_jitter = Duration::from_millis(3);
        metrics.media_ended(&mut counted, &stats, &quality);
        assert_eq!(packets("in"), 120);
        let exposition = metrics.encode(&Scraped::default());
        assert!(exposition.contains("patchbay_rtp_jitter_seconds_count 1"), "{exposition}");
        assert!(exposition.contains("patchbay_rtp_packets_total{direction=\"in\"} 120"), "{exposition}");
    }
}
