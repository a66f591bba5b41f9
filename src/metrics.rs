//! The Prometheus registry and every metric the gateway exports. Labels are bounded sets (route names,
//! configured jurisdictions, reason codes, issuer names); never a token, subject or client id.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::deny::{Outcome, Reason};

const NS: &str = "residency_gateway";

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub blocked: IntCounterVec,
    pub would_block: IntCounterVec,
    pub token_validations: IntCounterVec,
    pub token_cache: IntCounterVec,
    pub token_service_duration: HistogramVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub tls_failures: IntCounterVec,
    pub connections_refused: IntCounter,
    pub jwks_refreshes: IntCounterVec,
    pub jwks_keys_skipped: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub admin_actions: IntCounterVec,
    pub state_entries: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help).namespace(NS), labels).expect("valid metric definition");
    registry.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).namespace(NS).buckets(buckets), labels)
        .expect("valid metric definition");
    registry.register(Box::new(h.clone())).expect("metric registered once");
    h
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let fast = vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let state_entries = IntGaugeVec::new(
            Opts::new("state_entries", "Active revocations and halts").namespace(NS),
            &["kind"],
        )
        .expect("valid metric definition");
        registry.register(Box::new(state_entries.clone())).expect("metric registered once");
        registry.register(Box::new(AuditDropped::new())).expect("metric registered once");
        Metrics {
            requests: counter(
                &registry,
                "requests_total",
                "Requests by route and outcome",
                &["route", "outcome"],
            ),
            blocked: counter(
                &registry,
                "transfers_blocked_total",
                "Transfers blocked by residency policy",
                &["route", "jurisdiction", "reason", "data_class"],
            ),
            would_block: counter(
                &registry,
                "transfers_would_block_total",
                "Transfers a monitor-mode route forwarded but would have blocked",
                &["route", "jurisdiction", "reason", "data_class"],
            ),
            token_validations: counter(
                &registry,
                "token_validations_total",
                "Token checks against an issuer (cache misses only)",
                &["issuer", "method", "result"],
            ),
            token_cache: counter(
                &registry,
                "token_cache_requests_total",
                "Token validation cache lookups",
                &["cache", "result"],
            ),
            token_service_duration: histogram(
                &registry,
                "token_service_duration_seconds",
                "Latency of calls to JWKS and introspection endpoints",
                &["issuer", "call"],
                fast.clone(),
            ),
            request_duration: histogram(
                &registry,
                "request_duration_seconds",
                "Time from request head to response head",
                &["route"],
                fast.clone(),
            ),
            upstream_duration: histogram(
                &registry,
                "upstream_duration_seconds",
                "Time the upstream took to answer with a response head",
                &["route"],
                fast,
            ),
            tls_failures: counter(
                &registry,
                "tls_handshake_failures_total",
                "TLS handshakes that failed, by reason",
                &["reason"],
            ),
            connections_refused: {
                let c = IntCounter::with_opts(
                    Opts::new(
                        "connections_refused_total",
                        "Connections closed at once because max_connections was reached",
                    )
                    .namespace(NS),
                )
                .expect("valid metric definition");
                registry.register(Box::new(c.clone())).expect("metric registered once");
                c
            },
            jwks_refreshes: counter(&registry, "jwks_refreshes_total", "JWKS fetches", &["issuer", "result"]),
            jwks_keys_skipped: counter(
                &registry,
                "jwks_keys_skipped_total",
                "Keys in a fetched JWKS that cannot verify signatures (enc keys, unknown kty or alg)",
                &["issuer", "reason"],
            ),
            config_reloads: counter(&registry, "config_reloads_total", "Config reloads", &["result"]),
            admin_actions: counter(
                &registry,
                "admin_actions_total",
                "Admin API actions",
                &["action", "result"],
            ),
            state_entries,
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }

    /// Handles for one route, resolved once per config load so the hot path does no label lookups.
    pub fn route(&self, route: &str) -> RouteMetrics {
        let outcome = |o: Outcome| self.requests.with_label_values(&[route, o.as_str()]);
        RouteMetrics {
            outcomes: Outcome::ALL.map(outcome),
            duration: self.request_duration.with_label_values(&[route]),
            upstream: self.upstream_duration.with_label_values(&[route]),
        }
    }

    pub fn transfer_blocked(
        &self,
        route: &str,
        jurisdiction: &str,
        reason: Reason,
        data_class: &str,
        monitor: bool,
    ) {
        let vec = if monitor { &self.would_block } else { &self.blocked };
        vec.with_label_values(&[route, jurisdiction, reason.as_str(), data_class]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// `audit_lines_dropped_total`: audit lines lost because stdout could not keep up. The count lives in
/// the audit writer (one per process); each scrape reads it.
struct AuditDropped(IntCounter);

impl AuditDropped {
    fn opts() -> Opts {
        Opts::new("audit_lines_dropped_total", "Audit lines dropped because the audit writer fell behind")
            .namespace(NS)
    }

    fn new() -> AuditDropped {
        AuditDropped(IntCounter::with_opts(Self::opts()).expect("valid metric definition"))
    }
}

impl Collector for AuditDropped {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = IntCounter::with_opts(Self::opts()).expect("valid metric definition");
        now.inc_by(crate::audit::dropped_lines());
        now.collect()
    }
}

/// Pre-resolved counters for one route.
#[derive(Clone)]
pub struct RouteMetrics {
    outcomes: [IntCounter; Outcome::ALL.len()],
    pub duration: prometheus::Histogram,
    pub upstream: prometheus::Histogram,
}

impl RouteMetrics {
    pub fn outcome(&self, o: Outcome) -> &IntCounter {
        &self.outcomes[o as usize]
    }
}
