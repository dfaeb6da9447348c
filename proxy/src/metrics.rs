//! Prometheus metrics, served on the admin listener at `/metrics`.
//!
//! Everything on the request path is an atomic update of a pre-resolved series; the
//! gauges that describe state (snapshot revision and age, usage queue depth) are
//! read when scraped.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::sync::Shared;
use crate::usage::UsageQueue;

/// The routes metrics are labelled with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteLabel {
    Invoke,
    Validate,
    Usage,
    Health,
    /// The control plane's API, passed on through the front door.
    ControlPlane,
    /// The chat widget's assets, visitor sessions and CORS preflights.
    Widget,
    Other,
}

impl RouteLabel {
    pub const ALL: [RouteLabel; 7] = [
        RouteLabel::Invoke,
        RouteLabel::Validate,
        RouteLabel::Usage,
        RouteLabel::Health,
        RouteLabel::ControlPlane,
        RouteLabel::Widget,
        RouteLabel::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteLabel::Invoke => "invoke",
            RouteLabel::Validate => "validate",
            RouteLabel::Usage => "usage",
            RouteLabel::Health => "health",
            RouteLabel::ControlPlane => "control_plane",
            RouteLabel::Widget => "widget",
            RouteLabel::Other => "other",
        }
    }
}

/// Statuses whose series are resolved once, so counting them takes no lookup.
const COMMON_STATUSES: [u16; 8] = [200, 400, 401, 403, 429, 502, 503, 504];

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    by_status: [[prometheus::IntCounter; 8]; RouteLabel::ALL.len()],
    duration: [Histogram; RouteLabel::ALL.len()],
    overhead: [Histogram; RouteLabel::ALL.len()],
    auth_failures: IntCounterVec,
    rate_limited: IntCounterVec,
    pub in_flight: IntGauge,
    snapshot_revision: IntGauge,
    snapshot_age: Gauge,
    snapshot_loaded: IntGauge,
    queue_depth: IntGauge,
    usage_enqueued: IntGauge,
    usage_dropped: IntGauge,
    usage_written: IntGauge,
    usage_sink_errors: IntGauge,
    spill_bytes: IntGauge,
    spill_full: IntGauge,
    store_failing: IntGauge,
    usage_shipped: IntGauge,
    store_errors: IntGauge,
    spill_dropped: IntGauge,
    pub upstream_errors: IntCounterVec,
    connections_refused: IntCounterVec,
    global_degraded: IntGauge,
    global_gateways: IntGauge,
    global_rounds: IntGauge,
    global_round_failures: IntGauge,
    global_waits: IntGauge,
    global_wait_timeouts: IntGauge,
}

const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 60.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("agora_proxy".into()), None).expect("registry");
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Requests by route and response status."),
            &["route", "status"],
        )
        .expect("metric");
        let duration_vec = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time from request to the end of the response.",
            )
            .buckets(BUCKETS.to_vec()),
            &["route"],
        )
        .expect("metric");
        let overhead_vec = HistogramVec::new(
            HistogramOpts::new(
                "overhead_seconds",
                "The proxy's own share of a request: total time minus time spent waiting on the runtime.",
            )
            .buckets(BUCKETS.to_vec()),
            &["route"],
        )
        .expect("metric");
        let auth_failures = IntCounterVec::new(
            Opts::new("auth_failures_total", "Refused keys, by reason."),
            &["reason"],
        )
        .expect("metric");
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "rate_limited_total",
                "Requests refused by a rate, in-flight or quota limit.",
            ),
            &["limit"],
        )
        .expect("metric");
        let upstream_errors = IntCounterVec::new(
            Opts::new("upstream_errors_total", "Runtime failures, by kind."),
            &["kind"],
        )
        .expect("metric");
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "connections_refused_total",
                "Client connections answered and closed at once for being over a cap, by cap.",
            ),
            &["cap"],
        )
        .expect("metric");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("metric");
        let metrics = Metrics {
            by_status: RouteLabel::ALL.map(|r| {
                COMMON_STATUSES.map(|s| requests.with_label_values(&[r.as_str(), status_label(s)]))
            }),
            duration: RouteLabel::ALL.map(|r| duration_vec.with_label_values(&[r.as_str()])),
            overhead: RouteLabel::ALL.map(|r| overhead_vec.with_label_values(&[r.as_str()])),
            in_flight: gauge("in_flight", "Requests being served."),
            snapshot_revision: gauge("snapshot_revision", "Revision of the configuration in use."),
            snapshot_age: Gauge::new(
                "snapshot_age_seconds",
                "Seconds since the configuration was last confirmed current by the control plane.",
            )
            .expect("metric"),
            snapshot_loaded: gauge("snapshot_loaded", "1 when a configuration is loaded."),
            queue_depth: gauge("usage_queue_depth", "Usage records waiting for the sink."),
            usage_enqueued: gauge("usage_enqueued_total", "Usage records queued."),
            usage_dropped: gauge(
                "usage_dropped_total",
                "Usage records dropped (queue full or sink failing at shutdown).",
            ),
            usage_written: gauge("usage_written_total", "Usage records the sink accepted."),
            usage_sink_errors: gauge("usage_sink_errors_total", "Batches the sink refused."),
            spill_bytes: gauge(
                "usage_spill_bytes",
                "Bytes in the usage spill log not yet in the store.",
            ),
            spill_full: gauge(
                "usage_spill_full",
                "1 while the usage spill log is full (invokes refused under the refuse policy).",
            ),
            store_failing: gauge(
                "usage_store_failing",
                "1 while the usage store refuses batches.",
            ),
            usage_shipped: gauge("usage_shipped_total", "Usage records the store took."),
            store_errors: gauge(
                "usage_store_errors_total",
                "Shipments the usage store refused.",
            ),
            spill_dropped: gauge(
                "usage_spill_dropped_total",
                "Usage records dropped because the spill log was full (serve_unmetered policy).",
            ),
            global_degraded: gauge(
                "global_limits_degraded",
                "1 while Redis is unreachable and this gateway holds its share of each limit; 0 otherwise (or without Redis).",
            ),
            global_gateways: gauge(
                "global_limits_gateways",
                "Gateways alive at the last heartbeat through Redis (0 without Redis).",
            ),
            global_rounds: gauge(
                "global_limits_rounds_total",
                "Rounds of lease claims and heartbeats Redis answered.",
            ),
            global_round_failures: gauge(
                "global_limits_round_failures_total",
                "Rounds that failed or timed out.",
            ),
            global_waits: gauge(
                "global_limits_waits_total",
                "Requests that waited for a lease.",
            ),
            global_wait_timeouts: gauge(
                "global_limits_wait_timeouts_total",
                "Requests decided on the local share because Redis did not answer in time.",
            ),
            requests,
            auth_failures,
            rate_limited,
            upstream_errors,
            connections_refused,
            registry,
        };
        let r = &metrics.registry;
        r.register(Box::new(metrics.requests.clone()))
            .expect("register");
        r.register(Box::new(duration_vec)).expect("register");
        r.register(Box::new(overhead_vec)).expect("register");
        r.register(Box::new(metrics.auth_failures.clone()))
            .expect("register");
        r.register(Box::new(metrics.rate_limited.clone()))
            .expect("register");
        r.register(Box::new(metrics.upstream_errors.clone()))
            .expect("register");
        r.register(Box::new(metrics.connections_refused.clone()))
            .expect("register");
        for g in [
            &metrics.in_flight,
            &metrics.snapshot_revision,
            &metrics.snapshot_loaded,
            &metrics.queue_depth,
            &metrics.usage_enqueued,
            &metrics.usage_dropped,
            &metrics.usage_written,
            &metrics.usage_sink_errors,
            &metrics.spill_bytes,
            &metrics.spill_full,
            &metrics.store_failing,
            &metrics.usage_shipped,
            &metrics.store_errors,
            &metrics.spill_dropped,
            &metrics.global_degraded,
            &metrics.global_gateways,
            &metrics.global_rounds,
            &metrics.global_round_failures,
            &metrics.global_waits,
            &metrics.global_wait_timeouts,
        ] {
            r.register(Box::new(g.clone())).expect("register");
        }
        r.register(Box::new(metrics.snapshot_age.clone()))
            .expect("register");
        metrics
    }

    pub fn request(&self, route: RouteLabel, status: u16, total_secs: f64, overhead_secs: f64) {
        match COMMON_STATUSES.iter().position(|s| *s == status) {
            Some(i) => self.by_status[route as usize][i].inc(),
            None => self
                .requests
                .with_label_values(&[route.as_str(), status_label(status)])
                .inc(),
        }
        self.duration[route as usize].observe(total_secs);
        self.overhead[route as usize].observe(overhead_secs);
    }

    pub fn auth_failure(&self, reason: &str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }

    pub fn connection_refused(&self, cap: &str) {
        self.connections_refused.with_label_values(&[cap]).inc();
    }

    pub fn rate_limited(&self, limit: &str) {
        self.rate_limited.with_label_values(&[limit]).inc();
    }

    /// Reads the state gauges, then encodes everything.
    pub fn render(
        &self,
        shared: &Shared,
        usage: &UsageQueue,
        pipeline: Option<&agora_usage::Pipeline>,
        global: Option<&crate::global::Global>,
    ) -> Vec<u8> {
        let now = crate::sync::now_ms();
        self.snapshot_revision
            .set(i64::try_from(shared.load().revision()).unwrap_or(i64::MAX));
        self.snapshot_loaded.set(i64::from(shared.is_loaded()));
        self.snapshot_age.set(shared.age_secs(now).unwrap_or(-1.0));
        self.queue_depth.set(usage.depth() as i64);
        let stats = usage.stats();
        let load = |c: &std::sync::atomic::AtomicU64| {
            i64::try_from(c.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(i64::MAX)
        };
        self.usage_enqueued.set(load(&stats.enqueued));
        self.usage_dropped.set(load(&stats.dropped));
        self.usage_written.set(load(&stats.written));
        self.usage_sink_errors.set(load(&stats.sink_errors));
        if let Some(p) = pipeline {
            let ps = p.stats();
            let flag = |b: &std::sync::atomic::AtomicBool| {
                i64::from(b.load(std::sync::atomic::Ordering::Relaxed))
            };
            self.spill_bytes.set(load(&ps.spill_bytes));
            self.spill_full.set(flag(&ps.spill_full));
            self.store_failing.set(flag(&ps.store_failing));
            self.usage_shipped.set(load(&ps.shipped));
            self.store_errors.set(load(&ps.store_errors));
            self.spill_dropped.set(load(&ps.dropped));
        }
        if let Some(g) = global {
            self.global_degraded
                .set(i64::from(g.mode() == crate::global::Mode::LocalShare));
            self.global_gateways.set(i64::from(g.gateways()));
            self.global_rounds.set(load(&g.stats.rounds_ok));
            self.global_round_failures.set(load(&g.stats.rounds_failed));
            self.global_waits.set(load(&g.stats.waits));
            self.global_wait_timeouts.set(load(&g.stats.wait_timeouts));
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn status_label(status: u16) -> &'static str {
    match status {
        0 => "0",
        200 => "200",
        202 => "202",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        413 => "413",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        100..=199 => "1xx",
        201..=299 => "2xx",
        300..=399 => "3xx",
        402..=499 => "4xx",
        _ => "5xx",
    }
}

/// The admin listener's application: `GET /metrics`.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub shared: Arc<Shared>,
    pub usage: UsageQueue,
    pub pipeline: Option<Arc<agora_usage::Pipeline>>,
    pub global: Option<Arc<crate::global::Global>>,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let path = session.req_header().uri.path();
        let (status, content_type, body) = if path == "/metrics" {
            (
                200,
                "text/plain; version=0.0.4",
                self.metrics.render(
                    &self.shared,
                    &self.usage,
                    self.pipeline.as_deref(),
                    self.global.as_deref(),
                ),
            )
        } else {
            (
                404,
                "application/json",
                crate::error::error_body("not_found", "The admin listener serves /metrics."),
            )
        };
        http::Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("content-length", body.len())
            .body(body)
            .unwrap_or_default()
    }
}
