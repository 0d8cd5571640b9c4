//! What the operator tells people: the `Ready` condition, Events and Prometheus metrics.
//! Nothing here ever receives a credential or a token: only reasons, names and times.

use std::{
    collections::HashMap,
    str::FromStr,
    sync::{Arc, Mutex, MutexGuard},
};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
    metrics::{MetricType, counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Why `Ready` is what it is. Each has a fixed name used as condition reason, Event
/// reason and metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The target Secret holds a fresh token; refreshes are on schedule.
    Refreshed,
    /// A token was received and is held in memory until the target Secret accepts it.
    Pending,
    CredentialsNotFound,
    /// The credentials or headers Secret is not opted in for this ScgToken (label
    /// `scgtoken.io/credentials`, annotation `scgtoken.io/allowed-scgtokens`).
    CredentialsNotAllowed,
    InvalidSpec,
    /// The API refused the refresh (4xx).
    Rejected,
    /// The API refused the stored, unexpired token on the first call after a start: a
    /// refresh was probably interrupted between the API's answer and the store.
    ChainBroken,
    /// The API or the network failed (5xx, 429, timeouts, connection errors).
    Unavailable,
    /// The API answered 2xx with a body that is not a token response.
    InvalidResponse,
    /// The current token has expired and no new one could be obtained.
    Expired,
    Suspended,
    /// The target Secret exists and is not managed by this ScgToken, or is immutable.
    TargetConflict,
}

impl Reason {
    /// Every reason, for reading one back from a stored condition.
    pub const ALL: [Reason; 12] = [
        Reason::Refreshed,
        Reason::Pending,
        Reason::CredentialsNotFound,
        Reason::CredentialsNotAllowed,
        Reason::InvalidSpec,
        Reason::Rejected,
        Reason::ChainBroken,
        Reason::Unavailable,
        Reason::InvalidResponse,
        Reason::Expired,
        Reason::Suspended,
        Reason::TargetConflict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Refreshed => "Refreshed",
            Reason::Pending => "Pending",
            Reason::CredentialsNotFound => "CredentialsNotFound",
            Reason::CredentialsNotAllowed => "CredentialsNotAllowed",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::Rejected => "Rejected",
            Reason::ChainBroken => "ChainBroken",
            Reason::Unavailable => "Unavailable",
            Reason::InvalidResponse => "InvalidResponse",
            Reason::Expired => "Expired",
            Reason::Suspended => "Suspended",
            Reason::TargetConflict => "TargetConflict",
        }
    }

    /// Whether `Ready` is `True` with this reason.
    pub fn is_ready(self) -> bool {
        self == Reason::Refreshed
    }
}

/// A condition reason this operator does not write (another writer, or an older version).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown reason")]
pub struct UnknownReason;

impl FromStr for Reason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or(UnknownReason)
    }
}

/// The `Ready` condition for `reason`, keeping `lastTransitionTime` of `previous` when the
/// condition's status did not change (so an unchanged state never causes a write).
pub fn ready_condition(
    previous: Option<&Condition>,
    reason: Reason,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if reason.is_ready() { "True" } else { "False" };
    let last_transition_time = previous
        .filter(|p| p.status == status)
        .map(|p| p.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.as_str().into(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    pub namespace: String,
    pub name: String,
    /// `success` or a [`crate::scg::RefreshError::label`].
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// A [`crate::Error::label`].
    pub error: &'static str,
}

/// Every metric the operator exports. Label values are ScgToken namespaces and names and
/// fixed words: never a secret, a URL or an error text.
pub struct Metrics {
    /// `token_expiry_timestamp_seconds`, `next_refresh_timestamp_seconds`, `ready` and
    /// `consecutive_failures`.
    pub tokens: Arc<TokenGauges>,
    pub refreshes: Family<RefreshLabels, Counter>,
    pub refresh_duration: Histogram,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub leader: Gauge,
    /// Refreshes due and waiting for the shared rate budget.
    pub refreshes_waiting: Gauge,
    pub budget_waits: Counter,
    pub budget_pauses: Counter,
    /// `scgtoken_consumers{namespace,name,state}`.
    pub consumers: crate::consumers::ConsumerMetrics,
    /// 1 for each ScgToken whose credentials or headers Secret is not opted in; no
    /// series for the others.
    pub credentials_not_allowed: Family<TokenLabels, Gauge>,
}

impl Metrics {
    /// Creates the metrics and registers them under the `scgtoken` prefix.
    pub fn register(registry: &mut Registry) -> Metrics {
        let buckets =
            || Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        let m = Metrics {
            tokens: Arc::default(),
            refreshes: Family::default(),
            refresh_duration: buckets(),
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: buckets(),
            leader: Gauge::default(),
            refreshes_waiting: Gauge::default(),
            budget_waits: Counter::default(),
            budget_pauses: Counter::default(),
            consumers: crate::consumers::ConsumerMetrics::register(registry),
            credentials_not_allowed: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("scgtoken");
        r.register_collector(Box::new(m.tokens.clone()));
        r.register("refreshes", "Refresh calls by result", m.refreshes.clone());
        r.register(
            "refresh_duration_seconds",
            "Duration of refresh calls to the SCG API",
            m.refresh_duration.clone(),
        );
        r.register("reconciles", "Reconcile passes", m.reconciles.clone());
        r.register(
            "reconcile_errors",
            "Reconcile passes that ended in an error, by error kind",
            m.reconcile_errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Duration of reconcile passes",
            m.reconcile_duration.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader Lease",
            m.leader.clone(),
        );
        r.register(
            "refreshes_waiting",
            "Refreshes that are due and wait for the shared rate budget (--max-refresh-rate)",
            m.refreshes_waiting.clone(),
        );
        r.register(
            "refresh_budget_waits",
            "Refreshes that had to wait for the shared rate budget",
            m.budget_waits.clone(),
        );
        r.register(
            "credentials_not_allowed",
            "1 for each ScgToken whose credentials or headers Secret is not opted in \
             (label scgtoken.io/credentials, annotation scgtoken.io/allowed-scgtokens)",
            m.credentials_not_allowed.clone(),
        );
        r.register(
            "refresh_budget_pauses",
            "HTTP 429 answers that paused every refresh through their endpoint",
            m.budget_pauses.clone(),
        );
        m
    }

    /// Publishes the per-token gauges.
    pub fn set_token(
        &self,
        labels: &TokenLabels,
        expires: Option<Timestamp>,
        next: Option<Timestamp>,
        ready: bool,
        failures: u32,
    ) {
        let secs = |t: Option<Timestamp>| t.map_or(0.0, |t| t.as_millisecond() as f64 / 1000.0);
        let state = TokenState {
            expiry: secs(expires),
            next_refresh: secs(next),
            ready: i64::from(ready),
            failures: i64::from(failures),
        };
        let mut tokens = self.tokens.lock();
        match tokens.get_mut(labels) {
            Some(s) => *s = state,
            None => {
                tokens.insert(labels.clone(), state);
            }
        }
    }

    /// Publishes whether the ScgToken's Secrets are opted in: a series only when not.
    pub fn set_credentials_not_allowed(&self, labels: &TokenLabels, not_allowed: bool) {
        if not_allowed {
            self.credentials_not_allowed.get_or_create(labels).set(1);
        } else {
            self.credentials_not_allowed.remove(labels);
        }
    }

    /// Drops the series of a deleted ScgToken.
    pub fn forget(&self, labels: &TokenLabels) {
        self.tokens.lock().remove(labels);
        self.credentials_not_allowed.remove(labels);
        self.consumers.forget(&labels.namespace, &labels.name);
    }
}

/// The per-token gauges, one map entry per ScgToken, encoded on each scrape. Four
/// `Family`s would hold every token's labels four times over (about 5 MiB at 10,000
/// ScgTokens).
#[derive(Debug, Default)]
pub struct TokenGauges(Mutex<HashMap<TokenLabels, TokenState>>);

#[derive(Debug, Clone, Copy, PartialEq)]
struct TokenState {
    expiry: f64,
    next_refresh: f64,
    ready: i64,
    failures: i64,
}

impl TokenGauges {
    fn lock(&self) -> MutexGuard<'_, HashMap<TokenLabels, TokenState>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Collector for TokenGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let tokens = self.lock();
        let mut gauge = |name: &str, help: &str, value: &dyn Fn(&TokenState) -> GaugeValue| {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, state) in tokens.iter() {
                let mut family = metric.encode_family(labels)?;
                match value(state) {
                    GaugeValue::Float(v) => family.encode_gauge(&v)?,
                    GaugeValue::Int(v) => family.encode_gauge(&v)?,
                }
            }
            Ok::<_, std::fmt::Error>(())
        };
        gauge(
            "token_expiry_timestamp_seconds",
            "Unix time at which the current token expires",
            &|s| GaugeValue::Float(s.expiry),
        )?;
        gauge(
            "next_refresh_timestamp_seconds",
            "Unix time of the next scheduled refresh or retry",
            &|s| GaugeValue::Float(s.next_refresh),
        )?;
        gauge(
            "ready",
            "1 when the ScgToken's Ready condition is True",
            &|s| GaugeValue::Int(s.ready),
        )?;
        gauge(
            "consecutive_failures",
            "Refresh attempts that failed in a row",
            &|s| GaugeValue::Int(s.failures),
        )
    }
}

enum GaugeValue {
    Float(f64),
    Int(i64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let first = ready_condition(None, Reason::Rejected, "no".into(), Some(1), t0);
        assert_eq!(first.status, "False");
        let same = ready_condition(Some(&first), Reason::Unavailable, "x".into(), Some(1), t1);
        assert_eq!(same.last_transition_time, Time(t0));
        assert_eq!(same.reason, "Unavailable");
        let flipped = ready_condition(Some(&same), Reason::Refreshed, "ok".into(), Some(1), t1);
        assert_eq!(
            (flipped.status.as_str(), flipped.last_transition_time),
            ("True", Time(t1))
        );
    }

    #[test]
    fn every_reason_reads_back_from_its_name() {
        for reason in Reason::ALL {
            assert_eq!(reason.as_str().parse(), Ok(reason));
        }
        assert_eq!("Ready".parse::<Reason>(), Err(UnknownReason));
        assert_eq!("refreshed".parse::<Reason>(), Err(UnknownReason));
    }

    #[test]
    fn metrics_render_with_bounded_labels() {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry);
        let labels = TokenLabels {
            namespace: "ns".into(),
            name: "tok".into(),
        };
        m.set_token(
            &labels,
            Some(Timestamp::from_second(100).unwrap()),
            None,
            true,
            0,
        );
        m.refreshes
            .get_or_create(&RefreshLabels {
                namespace: "ns".into(),
                name: "tok".into(),
                result: "success",
            })
            .inc();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        for needle in [
            "scgtoken_token_expiry_timestamp_seconds{namespace=\"ns\",name=\"tok\"} 100.0",
            "scgtoken_ready{namespace=\"ns\",name=\"tok\"} 1",
            "scgtoken_refreshes_total{namespace=\"ns\",name=\"tok\",result=\"success\"} 1",
            "# TYPE scgtoken_refresh_duration_seconds histogram",
            "scgtoken_leader 0",
            "scgtoken_refreshes_waiting 0",
            "scgtoken_refresh_budget_waits_total 0",
            "scgtoken_refresh_budget_pauses_total 0",
        ] {
            assert!(out.contains(needle), "missing {needle} in\n{out}");
        }
        m.forget(&labels);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(!out.contains("scgtoken_ready{"), "{out}");
    }
}
