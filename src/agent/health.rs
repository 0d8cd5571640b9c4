//! The agent's metrics and readiness rule, served by the shared admin server
//! ([`crate::admin`]): `/healthz`, `/readyz` and `/metrics`.
//!
//! Ready means: the pod can use an unexpired token now (in file mode, the files hold it).
//! Metrics carry the served token's fingerprint, never the token.

use std::{sync::Arc, sync::atomic::AtomicU64};

use jiff::Timestamp;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use super::ServedRx;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FingerprintLabels {
    pub fingerprint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Every metric of the agent, under the `scgtoken_agent` prefix.
pub struct Metrics {
    /// 1 for the fingerprint served.
    pub token_info: Family<FingerprintLabels, Gauge>,
    pub token_age: Gauge<f64, AtomicU64>,
    pub token_expiry: Gauge<f64, AtomicU64>,
    pub ready: Gauge,
    pub updates: Counter,
    pub refused: Family<ReasonLabels, Counter>,
    pub file_write_failures: Counter,
    pub proxy_requests: Family<ResultLabels, Counter>,
    pub proxy_retries: Family<ResultLabels, Counter>,
    pub proxy_duration: Histogram,
    pub report_failures: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            token_info: Family::default(),
            token_age: Gauge::default(),
            token_expiry: Gauge::default(),
            ready: Gauge::default(),
            updates: Counter::default(),
            refused: Family::default(),
            file_write_failures: Counter::default(),
            proxy_requests: Family::default(),
            proxy_retries: Family::default(),
            proxy_duration: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            report_failures: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("scgtoken_agent");
        r.register(
            "token_info",
            "1 for the fingerprint of the token served",
            m.token_info.clone(),
        );
        r.register(
            "token_age_seconds",
            "Seconds since the served token was issued (since it was served, if unknown)",
            m.token_age.clone(),
        );
        r.register(
            "token_expiry_timestamp_seconds",
            "When the served token expires (0 if unknown)",
            m.token_expiry.clone(),
        );
        r.register(
            "ready",
            "1 while an unexpired token is served",
            m.ready.clone(),
        );
        r.register("updates", "Switches to a new token", m.updates.clone());
        r.register(
            "secret_refused",
            "Secret contents not served, by reason",
            m.refused.clone(),
        );
        r.register(
            "file_write_failures",
            "Failed writes of the token files",
            m.file_write_failures.clone(),
        );
        r.register(
            "proxy_requests",
            "Proxied requests by result",
            m.proxy_requests.clone(),
        );
        r.register(
            "proxy_retries",
            "Requests answered 401 by result of the retry decision",
            m.proxy_retries.clone(),
        );
        r.register(
            "proxy_request_duration_seconds",
            "Time to the upstream's response headers, retries included",
            m.proxy_duration.clone(),
        );
        r.register(
            "report_failures",
            "Failed writes of the report Lease",
            m.report_failures.clone(),
        );
        m
    }

    pub(crate) fn switched(&self, previous: Option<&str>, fingerprint: &str) {
        if let Some(p) = previous {
            self.token_info.remove(&FingerprintLabels {
                fingerprint: p.to_string(),
            });
        }
        self.token_info
            .get_or_create(&FingerprintLabels {
                fingerprint: fingerprint.to_string(),
            })
            .set(1);
        self.updates.inc();
    }

    pub(crate) fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub(crate) fn file_write_failed(&self) {
        self.file_write_failures.inc();
    }

    pub(crate) fn proxied(&self, result: &'static str) {
        self.proxy_requests
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub(crate) fn retried(&self, result: &'static str) {
        self.proxy_retries
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

/// The agent's readiness rule for the shared admin server ([`crate::admin`]).
pub struct Readiness {
    served: ServedRx,
    metrics: Arc<Metrics>,
}

impl Readiness {
    pub fn new(served: ServedRx, metrics: Arc<Metrics>) -> Readiness {
        Readiness { served, metrics }
    }

    /// Whether an unexpired token is served at `now`.
    pub fn ready_at(&self, now: Timestamp) -> bool {
        self.served
            .borrow()
            .as_ref()
            .is_some_and(|s| s.is_fresh(now))
    }

    /// Brings the time-dependent gauges up to date.
    fn refresh_gauges(&self, now: Timestamp) {
        let m = &self.metrics;
        m.ready.set(i64::from(self.ready_at(now)));
        if let Some(s) = self.served.borrow().as_ref() {
            let born = s.token.issued_at.unwrap_or(s.since);
            m.token_age
                .set(now.duration_since(born).as_secs_f64().max(0.0));
            m.token_expiry.set(
                s.token
                    .expires_at
                    .map_or(0.0, |t| t.as_millisecond() as f64 / 1000.0),
            );
        }
    }
}

impl crate::admin::Probe for Readiness {
    fn ready(&self) -> bool {
        self.ready_at(Timestamp::now())
    }

    fn not_ready_message(&self) -> &'static str {
        "no unexpired token served"
    }

    fn before_scrape(&self) {
        self.refresh_gauges(Timestamp::now());
    }
}
