//! The operator's side of the token's consumers.
//!
//! - Token agents report, each in a Lease of its own, which token their pod serves
//!   ([`report_from_lease`]); [`aggregate`] turns the reports into `status.consumers` and
//!   [`condition`] into the `ConsumersUpToDate` condition. Both are pure.
//! - Pods that mount the target Secret as a plain volume are nudged ([`nudge_pods`]): an
//!   annotation change makes the kubelet sync the pod, and with it its Secret volumes, at
//!   once instead of on its next periodic sync.
//! - Workloads that read the token from an environment variable are restarted
//!   ([`rollout_restart`]), debounced, and only where the token lives long enough
//!   ([`restart_refusal`]).
//!
//! Nothing here sees a token: only fingerprints, pod names and times.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time},
};
use kube::{
    Api, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams},
    core::Selector,
    runtime::events::{Event, EventType},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    crd::{
        ConsumersStatus, NUDGED_FOR_ANNOTATION, RESTART_FOR_ANNOTATION, RESTARTED_AT_ANNOTATION,
        RESTARTED_FOR_ANNOTATION, RestartKind, RolloutRestartTarget, SERVED_FINGERPRINT_ANNOTATION,
        SERVED_SINCE_ANNOTATION,
    },
    k8s::bounded,
    policy::target::is_subdomain,
};

/// Type of the condition this module computes.
pub const CONDITION_TYPE: &str = "ConsumersUpToDate";
/// Most stale pod names kept in `status.consumers.stalePods` and in messages.
pub const MAX_STALE_NAMES: usize = 10;
/// Lease duration assumed for a report Lease that does not say (as kube-node-lease does).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(40);
/// Longest heartbeat a report counts for, the bound the report policy admits
/// (deploy/components/consumer-reports): where that policy is not installed, a Lease
/// claiming years still drops out of the count an hour after its last renewal.
pub const MAX_LEASE_DURATION: Duration = Duration::from_secs(3600);
/// Longest served fingerprint read from a report (the operator's are 16 hex digits).
const MAX_FINGERPRINT_LEN: usize = 64;

/// One agent's report, read from its Lease.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentReport {
    /// The pod the agent runs in (the Lease's `holderIdentity`).
    pub pod: String,
    /// That pod's UID, from the Lease's owner reference (set when the agent knows it).
    pub pod_uid: Option<String>,
    /// Fingerprint of the token the pod serves; `None` while it serves none.
    pub fingerprint: Option<String>,
    /// When the pod started serving that token.
    pub since: Option<Timestamp>,
    /// When the agent started (the Lease's `acquireTime`).
    pub started: Option<Timestamp>,
    /// The last heartbeat (the Lease's `renewTime`).
    pub renewed: Option<Timestamp>,
    /// How long a heartbeat counts.
    pub duration: Duration,
}

/// The report in a Lease written by a token agent, or `None` when the agent released it
/// (it stopped cleanly) or it names no pod. What status and Events may quote is held to
/// what an agent writes, whoever wrote the Lease: the holder must be a pod name, and a
/// served fingerprint anything but a short run of letters and digits reads as none.
pub fn report_from_lease(lease: &Lease) -> Option<AgentReport> {
    let spec = lease.spec.as_ref()?;
    let pod = spec.holder_identity.clone().filter(|h| is_subdomain(h))?;
    let annotations = lease.annotations();
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .filter(|s| *s > 0)
        .map_or(DEFAULT_LEASE_DURATION, Duration::from_secs)
        .min(MAX_LEASE_DURATION);
    let pod_uid = lease
        .owner_references()
        .iter()
        .find(|o| o.kind == "Pod" && o.name == pod)
        .map(|o| o.uid.clone());
    Some(AgentReport {
        pod,
        pod_uid,
        fingerprint: annotations
            .get(SERVED_FINGERPRINT_ANNOTATION)
            .filter(|f| {
                (1..=MAX_FINGERPRINT_LEN).contains(&f.len())
                    && f.bytes().all(|b| b.is_ascii_alphanumeric())
            })
            .cloned(),
        since: annotations
            .get(SERVED_SINCE_ANNOTATION)
            .and_then(|s| s.parse().ok()),
        started: spec.acquire_time.as_ref().map(|t| t.0),
        renewed: spec.renew_time.as_ref().map(|t| t.0),
        duration,
    })
}

fn after(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// Whether the agent's last heartbeat still counts at `now`.
pub fn is_alive(report: &AgentReport, now: Timestamp) -> bool {
    report
        .renewed
        .is_some_and(|renewed| after(renewed, report.duration) >= now)
}

/// What the operator knows of the token the consumers should serve.
#[derive(Debug, Clone, Copy)]
pub struct CurrentToken<'a> {
    /// `status.tokenFingerprint`; `None` before the first token was stored.
    pub fingerprint: Option<&'a str>,
    /// When it was stored (`status.lastRefreshAt`).
    pub stored_at: Option<Timestamp>,
}

/// A pod seen not serving the current token, as the operator remembers it from pass to
/// pass ([`track_behind`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Behind {
    /// What the pod served when it was last seen behind (`None`: nothing).
    pub serving: Option<String>,
    /// When its agent started (the Lease's `acquireTime`): another start is another agent,
    /// or another pod of the same name.
    pub started: Option<Timestamp>,
    /// The store time of the first token the pod did not switch to, as far as the operator
    /// saw it (or when its agent started, if later). Staleness counts from here.
    pub since: Timestamp,
}

/// The pods not serving the current token, by pod name.
pub type BehindPods = BTreeMap<String, Behind>;

/// Since when each reported pod has not served the current token: carried over from
/// `previous` (the last pass's answer) while the pod stays on the token it served then,
/// so that a pod stuck on an old token is not forgiven at each new rotation.
///
/// - A pod first seen behind counts from the current token's store, or from its agent's
///   start if later: the operator does not know of an earlier miss.
/// - A pod that switched since, though not to the current token, made progress: it counts
///   again from the current token's store.
/// - A pod whose agent started again (another `acquireTime`) counts as first seen.
/// - A pod serving the current token, or no longer reported, is forgotten.
///
/// Before a token was stored nothing is behind.
pub fn track_behind(
    previous: &BehindPods,
    reports: &[AgentReport],
    token: CurrentToken<'_>,
) -> BehindPods {
    let mut behind = BehindPods::new();
    let Some(current) = token.fingerprint else {
        return behind;
    };
    for r in reports {
        if r.fingerprint.as_deref() == Some(current) || behind.contains_key(&r.pod) {
            continue;
        }
        let kept = previous.get(&r.pod).filter(|b| {
            b.started == r.started && (r.fingerprint.is_none() || r.fingerprint == b.serving)
        });
        let since = match (kept, token.stored_at, r.started) {
            (Some(b), _, _) => Some(b.since),
            (None, Some(a), Some(b)) => Some(a.max(b)),
            (None, a, b) => a.or(b),
        };
        if let Some(since) = since {
            let serving = r
                .fingerprint
                .clone()
                .or(kept.and_then(|b| b.serving.clone()));
            behind.insert(
                r.pod.clone(),
                Behind {
                    serving,
                    started: r.started,
                    since,
                },
            );
        }
    }
    behind
}

/// Aggregates the reports into `status.consumers`. A pod not serving the current token is
/// stale once `stale_after` has passed since the first store it missed (`behind`, from
/// [`track_behind`]). Pods whose heartbeat expired drop out, except the `lost` ones: their
/// pod still runs ([`silent_pods`], [`pod_still_runs`]), and they count in the total.
pub fn aggregate(
    reports: &[AgentReport],
    token: CurrentToken<'_>,
    behind: &BehindPods,
    lost: &BTreeSet<String>,
    stale_after: Duration,
    now: Timestamp,
) -> ConsumersStatus {
    let mut status = ConsumersStatus {
        lost: u32::try_from(lost.len()).unwrap_or(u32::MAX),
        lost_pods: lost.iter().take(MAX_STALE_NAMES).cloned().collect(),
        ..ConsumersStatus::default()
    };
    status.total = status.lost;
    let mut stale = Vec::new();
    let mut slowest: Option<SignedDuration> = None;
    for r in reports.iter().filter(|r| is_alive(r, now)) {
        status.total += 1;
        if token.fingerprint.is_some() && r.fingerprint.as_deref() == token.fingerprint {
            status.current += 1;
            // A pod started after the token was stored did not switch to it.
            let was_running = match (r.started, token.stored_at) {
                (Some(started), Some(stored)) => started <= stored,
                _ => true,
            };
            if let (true, Some(since), Some(stored)) = (was_running, r.since, token.stored_at) {
                let took = since.duration_since(stored).max(SignedDuration::ZERO);
                slowest = Some(slowest.map_or(took, |s| s.max(took)));
            }
            continue;
        }
        if stale_at(r, behind, stale_after).is_some_and(|t| t < now) {
            stale.push(r.pod.clone());
        }
    }
    stale.sort();
    stale.dedup();
    status.stale = u32::try_from(stale.len()).unwrap_or(u32::MAX);
    stale.truncate(MAX_STALE_NAMES);
    status.stale_pods = stale;
    status.slowest_switch_seconds = slowest.map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0);
    status.summary = format!("{}/{}", status.current, status.total);
    status
}

/// The pods whose agent stopped reporting without releasing its Lease (a dead or frozen
/// agent: its heartbeat expired) and that no live report names, each with its last report,
/// sorted by pod. A Lease's holder is whatever its writer put there: one that is not a pod
/// name is left out. Whether such a pod still runs is for the caller to ask
/// ([`pod_still_runs`]): a pod that runs is `lost`, not gone.
pub fn silent_pods(reports: &[AgentReport], now: Timestamp) -> Vec<&AgentReport> {
    let alive: BTreeSet<&str> = reports
        .iter()
        .filter(|r| is_alive(r, now))
        .map(|r| r.pod.as_str())
        .collect();
    let mut silent: BTreeMap<&str, &AgentReport> = BTreeMap::new();
    // A holder that is no pod name names no pod, and is never put in a request path.
    let silent_pod = |r: &&AgentReport| {
        !alive.contains(r.pod.as_str()) && crate::policy::target::is_subdomain(&r.pod)
    };
    for r in reports.iter().filter(silent_pod) {
        silent.entry(r.pod.as_str()).or_insert(r);
    }
    silent.into_values().collect()
}

/// Whether `pod` is the one a silent report names and still runs: the same UID when the
/// report knows it (a pod of the same name created since is another pod, with an agent
/// that reports for itself), not being deleted, not finished. Such a pod's consumers still
/// hold whatever token they had, and nobody reports which.
pub fn pod_still_runs(pod: &Pod, report: &AgentReport) -> bool {
    let same = report
        .pod_uid
        .as_ref()
        .is_none_or(|uid| pod.metadata.uid.as_ref() == Some(uid));
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    same && pod.metadata.deletion_timestamp.is_none() && !finished
}

/// When a pod not serving the current token becomes stale: `stale_after` after the first
/// store it missed. `None` when it is not behind.
fn stale_at(r: &AgentReport, behind: &BehindPods, stale_after: Duration) -> Option<Timestamp> {
    behind.get(&r.pod).map(|b| after(b.since, stale_after))
}

/// How long after an instant a look finds it passed: [`aggregate`] counts a pod stale
/// and a heartbeat expired only strictly after their instant.
const LOOK_AFTER: Duration = Duration::from_millis(100);

/// When [`aggregate`] would next give another answer for these reports if nothing else
/// changed: the first heartbeat to expire, or the first switching pod to turn stale.
/// `None` without live reports. Waking then finds staleness and dead agents without
/// polling; a report that changes triggers a pass of its own.
pub fn next_change(
    reports: &[AgentReport],
    behind: &BehindPods,
    stale_after: Duration,
    now: Timestamp,
) -> Option<Timestamp> {
    reports
        .iter()
        .filter(|r| is_alive(r, now))
        .flat_map(|r| {
            let expiry = r.renewed.map(|t| after(t, r.duration));
            let stale = stale_at(r, behind, stale_after).filter(|t| *t >= now);
            [expiry, stale]
        })
        .flatten()
        .min()
        .map(|t| after(t, LOOK_AFTER))
}

/// Why `ConsumersUpToDate` is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionReason {
    /// Every reporting pod serves the current token (some may still be switching).
    UpToDate,
    /// Some pods serve an older token (or none) after the grace.
    StaleConsumers,
    /// No agent reports: none deployed, or none labelled for this ScgToken.
    NoReports,
    /// A rollout restart was asked for and refused; see [`restart_refusal`].
    RestartRefused,
    /// `spec.consumers.agents` is on but the operator runs without `--consumer-reports`.
    ReportsDisabled,
    /// The operator could not read the report Leases (e.g. no permission).
    ReportsUnavailable,
    /// Pods still run whose agent stopped reporting: which token they serve is unknown.
    LostConsumers,
}

impl ConditionReason {
    /// Every reason, for tables that must cover each one.
    pub const ALL: [ConditionReason; 7] = [
        ConditionReason::UpToDate,
        ConditionReason::StaleConsumers,
        ConditionReason::NoReports,
        ConditionReason::RestartRefused,
        ConditionReason::ReportsDisabled,
        ConditionReason::ReportsUnavailable,
        ConditionReason::LostConsumers,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConditionReason::UpToDate => "UpToDate",
            ConditionReason::StaleConsumers => "StaleConsumers",
            ConditionReason::NoReports => "NoReports",
            ConditionReason::RestartRefused => "RestartRefused",
            ConditionReason::ReportsDisabled => "ReportsDisabled",
            ConditionReason::ReportsUnavailable => "ReportsUnavailable",
            ConditionReason::LostConsumers => "LostConsumers",
        }
    }
}

/// Why the reports could not be aggregated although `spec.consumers.agents` is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unread<'a> {
    /// The operator runs without `--consumer-reports`.
    Disabled,
    /// The Lease watch failed before its first complete list; why, in safe words.
    Unavailable(&'a str),
}

/// Everything the `ConsumersUpToDate` condition is computed from.
#[derive(Debug, Clone, Copy)]
pub struct ConditionInputs<'a> {
    /// The aggregate, when `spec.consumers.agents` is on and the reports were read.
    pub status: Option<&'a ConsumersStatus>,
    /// Why they were not, when they were asked for.
    pub unread: Option<Unread<'a>>,
    /// A refused rollout restart ([`restart_refusal`]'s message).
    pub refusal: Option<&'a str>,
    pub stale_after: Duration,
    pub generation: Option<i64>,
    pub now: Timestamp,
}

/// How the operator is told to read reports, for messages.
pub const ENABLE_REPORTS_HINT: &str = "run the operator with --consumer-reports \
     (SCG_CONSUMER_REPORTS=true) and the leases list/watch and pods get permissions; \
     deploy/components/consumer-reports does both";

/// The `ConsumersUpToDate` condition, or `None` when nothing is asked of consumers (no
/// agents aggregated and no refusal). A refused restart outranks the rest: it is a
/// setting to fix; reports that cannot be read come next. `lastTransitionTime` is kept
/// while the status does not change.
pub fn condition(previous: Option<&Condition>, inputs: ConditionInputs<'_>) -> Option<Condition> {
    let (status, reason, message) = match (inputs.refusal, inputs.unread, inputs.status) {
        (Some(refusal), _, _) => (
            "False",
            ConditionReason::RestartRefused,
            refusal.to_string(),
        ),
        (None, Some(Unread::Disabled), _) => (
            "Unknown",
            ConditionReason::ReportsDisabled,
            format!(
                "spec.consumers.agents is set but the operator does not read agent reports: \
                 {ENABLE_REPORTS_HINT}"
            ),
        ),
        (None, Some(Unread::Unavailable(why)), _) => (
            "Unknown",
            ConditionReason::ReportsUnavailable,
            format!("the agents' report Leases could not be read ({why}): {ENABLE_REPORTS_HINT}"),
        ),
        (None, None, None) => return None,
        (None, None, Some(s)) => aggregate_condition(s, inputs.stale_after),
    };
    let last_transition_time = previous
        .filter(|p| p.status == status)
        .map(|p| p.last_transition_time.clone())
        .unwrap_or(Time(inputs.now));
    Some(Condition {
        type_: CONDITION_TYPE.into(),
        status: status.into(),
        reason: reason.as_str().into(),
        message,
        last_transition_time,
        observed_generation: inputs.generation,
    })
}

/// The condition's status, reason and message for an aggregate.
fn aggregate_condition(
    s: &ConsumersStatus,
    stale_after: Duration,
) -> (&'static str, ConditionReason, String) {
    let lost = (s.lost > 0).then(|| {
        format!(
            "{} of {} pods with a token agent still run but their agent stopped reporting \
             (its Lease expired), so which token they serve is unknown: {}",
            s.lost,
            s.total,
            names(&s.lost_pods, s.lost)
        )
    });
    if s.stale > 0 {
        let mut m = format!(
            "{} of {} reporting pods still serve an older token (or none) more than {}s \
             after the current one was issued: {}",
            s.stale,
            s.total,
            stale_after.as_secs(),
            names(&s.stale_pods, s.stale)
        );
        if let Some(lost) = lost {
            m.push_str("; ");
            m.push_str(&lost);
        }
        return ("False", ConditionReason::StaleConsumers, m);
    }
    if let Some(lost) = lost {
        return ("False", ConditionReason::LostConsumers, lost);
    }
    if s.total == 0 {
        return (
            "Unknown",
            ConditionReason::NoReports,
            "no token agent reports for this ScgToken (agents label their Lease \
             scgtoken.io/scgtoken=<ScgToken name>)"
                .to_string(),
        );
    }
    let switching = s.total.saturating_sub(s.current + s.stale);
    let mut m = format!(
        "{} of {} reporting pods serve the current token",
        s.current, s.total
    );
    if switching > 0 {
        m.push_str(&format!("; {switching} switching"));
    }
    ("True", ConditionReason::UpToDate, m)
}

fn names(listed: &[String], total: u32) -> String {
    let mut s = listed.join(", ");
    let more = usize::try_from(total)
        .unwrap_or(usize::MAX)
        .saturating_sub(listed.len());
    if more > 0 {
        s.push_str(&format!(" and {more} more"));
    }
    s
}

/// Whether a condition is one users are warned about: `False`, or `Unknown` because the
/// reports cannot be read (a setting to fix). `NoReports` is not: agents may come later.
fn warns(c: &Condition) -> bool {
    c.status == "False"
        || (c.status == "Unknown" && c.reason != ConditionReason::NoReports.as_str())
}

/// The Event for a change of `ConsumersUpToDate`, if it is one worth telling: turning
/// into a warned-about state (a Warning with the condition's message) and recovering
/// from one.
pub fn transition_event(previous: Option<&Condition>, next: &Condition) -> Option<Event> {
    let was_warned = previous.is_some_and(warns);
    let same = previous.is_some_and(|p| p.status == next.status && p.reason == next.reason);
    if warns(next) && !same {
        return Some(Event {
            type_: EventType::Warning,
            reason: next.reason.clone(),
            note: Some(next.message.clone()),
            action: "CheckConsumers".into(),
            secondary: None,
        });
    }
    (next.status == "True" && was_warned).then(|| Event {
        type_: EventType::Normal,
        reason: "ConsumersUpToDate".into(),
        note: Some(next.message.clone()),
        action: "CheckConsumers".into(),
        secondary: None,
    })
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    pub namespace: String,
    pub name: String,
    /// `current`, `switching`, `stale` or `lost`.
    pub state: &'static str,
}

/// `scgtoken_consumers{namespace,name,state}`: pods with a token agent by state.
pub struct ConsumerMetrics {
    pub consumers: Family<ConsumerLabels, Gauge<i64, std::sync::atomic::AtomicI64>>,
}

impl ConsumerMetrics {
    /// Creates the metric and registers it under the `scgtoken` prefix.
    pub fn register(registry: &mut Registry) -> ConsumerMetrics {
        let m = ConsumerMetrics {
            consumers: Family::default(),
        };
        registry.sub_registry_with_prefix("scgtoken").register(
            "consumers",
            "Reporting pods by state",
            m.consumers.clone(),
        );
        m
    }

    /// Records an aggregate.
    pub fn observe(&self, namespace: &str, name: &str, status: &ConsumersStatus) {
        let switching = status
            .total
            .saturating_sub(status.current + status.stale + status.lost);
        for (state, n) in [
            ("current", status.current),
            ("switching", switching),
            ("stale", status.stale),
            ("lost", status.lost),
        ] {
            self.consumers
                .get_or_create(&ConsumerLabels {
                    namespace: namespace.into(),
                    name: name.into(),
                    state,
                })
                .set(i64::from(n));
        }
    }

    /// Drops the series of a deleted ScgToken (or one that stopped aggregating).
    pub fn forget(&self, namespace: &str, name: &str) {
        for state in ["current", "switching", "stale", "lost"] {
            self.consumers.remove(&ConsumerLabels {
                namespace: namespace.into(),
                name: name.into(),
                state,
            });
        }
    }
}

/// Shortest token lifetime for which rollout restarts are done. A rollout takes minutes
/// (the default progress deadline is 10 minutes), and env-var consumers hold the old
/// token until their pod is replaced: with shorter lifetimes they would hold a dead token
/// for most of each lifetime.
pub const MIN_LIFETIME_FOR_RESTART: Duration = Duration::from_secs(600);
/// Shortest time between refreshes for which rollout restarts are done: restarting more
/// often keeps the workload in a permanent rollout.
pub const MIN_REFRESH_INTERVAL_FOR_RESTART: Duration = Duration::from_secs(300);
/// Least time between two restarts of one workload: tokens that arrive in a burst (a
/// requested refresh, a new seed) cause one restart, not several.
pub const RESTART_DEBOUNCE: Duration = Duration::from_secs(120);

/// Why rollout restarts are refused for tokens of this `lifetime` refreshed every
/// `refresh_interval`, or `None` when they are allowed. The rule: refuse below
/// [`MIN_LIFETIME_FOR_RESTART`] or [`MIN_REFRESH_INTERVAL_FOR_RESTART`].
pub fn restart_refusal(lifetime: Duration, refresh_interval: Duration) -> Option<String> {
    if lifetime < MIN_LIFETIME_FOR_RESTART {
        return Some(format!(
            "rollout restarts refused: tokens live {}s, less than {}s; a restarted workload \
             would hold a dead token for most of each lifetime. Use the token agent",
            lifetime.as_secs(),
            MIN_LIFETIME_FOR_RESTART.as_secs()
        ));
    }
    if refresh_interval < MIN_REFRESH_INTERVAL_FOR_RESTART {
        return Some(format!(
            "rollout restarts refused: tokens are refreshed every {}s, more often than every \
             {}s; the workload would be rolling all the time. Use the token agent",
            refresh_interval.as_secs(),
            MIN_REFRESH_INTERVAL_FOR_RESTART.as_secs()
        ));
    }
    None
}

/// What to do with one rollout-restart target for the current token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    Restart,
    /// The pod template already carries this token's fingerprint.
    AlreadyDone,
    /// The last restart was too recent; restart at this time if still wanted.
    NotBefore(Timestamp),
}

/// Decides from the pod template's annotations whether to restart for `fingerprint`.
pub fn restart_decision(
    template_annotations: &BTreeMap<String, String>,
    fingerprint: &str,
    now: Timestamp,
) -> RestartDecision {
    if template_annotations
        .get(RESTARTED_FOR_ANNOTATION)
        .is_some_and(|f| f == fingerprint)
    {
        return RestartDecision::AlreadyDone;
    }
    let last = template_annotations
        .get(RESTARTED_AT_ANNOTATION)
        .and_then(|at| at.parse::<Timestamp>().ok());
    match last.map(|at| after(at, RESTART_DEBOUNCE)) {
        Some(not_before) if not_before > now => RestartDecision::NotBefore(not_before),
        _ => RestartDecision::Restart,
    }
}

/// What [`rollout_restart`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartOutcome {
    Restarted,
    AlreadyDone,
    /// Debounced: call again at this time.
    NotBefore(Timestamp),
    /// No such workload.
    NotFound,
    /// The workload does not opt in ([`opted_in`]): left unchanged.
    NotAllowed,
}

/// Whether `annotations` opt in to restarts and nudges for the ScgToken `scgtoken`:
/// [`RESTART_FOR_ANNOTATION`] lists its name.
pub fn opted_in(annotations: &BTreeMap<String, String>, scgtoken: &str) -> bool {
    annotations
        .get(RESTART_FOR_ANNOTATION)
        .is_some_and(|names| names.split(',').any(|n| n.trim() == scgtoken))
}

/// Field manager of the operator's writes to pods and workloads.
const FIELD_MANAGER: &str = "scg-token-operator";

fn kind_name(kind: RestartKind) -> &'static str {
    match kind {
        RestartKind::Deployment => "Deployment",
        RestartKind::StatefulSet => "StatefulSet",
        RestartKind::DaemonSet => "DaemonSet",
    }
}

/// Restarts `target` (in `namespace`) for the token with `fingerprint` the way
/// `kubectl rollout restart` does: by changing pod-template annotations
/// ([`RESTARTED_FOR_ANNOTATION`], [`RESTARTED_AT_ANNOTATION`]) with a merge patch. At most
/// once per token and once per [`RESTART_DEBOUNCE`], and only a workload that opts in
/// for the ScgToken `scgtoken` ([`opted_in`], on its own metadata); the caller checks
/// [`restart_refusal`] first. Needs `get` and `patch` on the workload.
pub async fn rollout_restart(
    client: kube::Client,
    namespace: &str,
    scgtoken: &str,
    target: &RolloutRestartTarget,
    fingerprint: &str,
    now: Timestamp,
) -> Result<RestartOutcome, kube::Error> {
    let gvk = GroupVersionKind::gvk("apps", "v1", kind_name(target.kind));
    let api: Api<DynamicObject> =
        Api::namespaced_with(client, namespace, &ApiResource::from_gvk(&gvk));
    let Some(obj) = bounded(api.get_opt(&target.name)).await? else {
        return Ok(RestartOutcome::NotFound);
    };
    if !opted_in(obj.annotations(), scgtoken) {
        return Ok(RestartOutcome::NotAllowed);
    }
    let annotations: BTreeMap<String, String> = obj
        .data
        .pointer("/spec/template/metadata/annotations")
        .and_then(|a| serde_json::from_value(a.clone()).ok())
        .unwrap_or_default();
    match restart_decision(&annotations, fingerprint, now) {
        RestartDecision::AlreadyDone => Ok(RestartOutcome::AlreadyDone),
        RestartDecision::NotBefore(t) => Ok(RestartOutcome::NotBefore(t)),
        RestartDecision::Restart => {
            let patch = serde_json::json!({"spec": {"template": {"metadata": {"annotations": {
                RESTARTED_FOR_ANNOTATION: fingerprint,
                RESTARTED_AT_ANNOTATION: now.to_string(),
            }}}}});
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            bounded(api.patch(&target.name, &params, &Patch::Merge(&patch))).await?;
            Ok(RestartOutcome::Restarted)
        }
    }
}

/// What [`nudge_pods`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NudgeOutcome {
    /// Pods annotated now.
    pub nudged: u32,
    /// Pods that match the selector and do not opt in ([`opted_in`]): left unchanged.
    pub not_allowed: u32,
    /// Pods already annotated for this token.
    pub already: u32,
    /// Pods that are terminating or finished.
    pub skipped: u32,
    /// Pods whose patch failed (gone meanwhile, or an API error).
    pub failed: u32,
}

/// Why pods could not be nudged.
#[derive(Debug, thiserror::Error)]
pub enum NudgeError {
    #[error("podSelector is invalid: {0}")]
    Selector(String),
    #[error("listing pods failed: {}", crate::k8s::describe(.0))]
    Kube(#[from] kube::Error),
}

/// What a pod needs for one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodNudge {
    Needed,
    /// Already annotated for this token.
    Already,
    /// Terminating or finished: its volumes no longer matter.
    Skip,
}

/// Whether a pod should be annotated for `fingerprint` (whether it may be is
/// [`opted_in`]).
pub fn pod_nudge(pod: &Pod, fingerprint: &str) -> PodNudge {
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    if pod.metadata.deletion_timestamp.is_some() || finished {
        PodNudge::Skip
    } else if pod
        .annotations()
        .get(NUDGED_FOR_ANNOTATION)
        .map(String::as_str)
        == Some(fingerprint)
    {
        PodNudge::Already
    } else {
        PodNudge::Needed
    }
}

/// Annotates every live pod matching `selector` that opts in for `scgtoken`
/// ([`opted_in`]) with [`NUDGED_FOR_ANNOTATION`] = `fingerprint`, which makes its kubelet
/// sync the pod and update its Secret volumes at once. Idempotent per token. Needs
/// `list` and `patch` on pods. An empty selector is refused: it would match every pod in
/// the namespace.
pub async fn nudge_pods(
    pods: &Api<Pod>,
    scgtoken: &str,
    selector: &LabelSelector,
    fingerprint: &str,
) -> Result<NudgeOutcome, NudgeError> {
    let selector =
        Selector::try_from(selector.clone()).map_err(|e| NudgeError::Selector(e.0.clone()))?;
    if selector.selects_all() {
        return Err(NudgeError::Selector(
            "it is empty and would match every pod".into(),
        ));
    }
    let list = bounded(pods.list(&ListParams::default().labels_from(&selector))).await?;
    let mut outcome = NudgeOutcome::default();
    let mut todo = Vec::new();
    for pod in list.items {
        if !opted_in(pod.annotations(), scgtoken) {
            outcome.not_allowed += 1;
            continue;
        }
        match pod_nudge(&pod, fingerprint) {
            PodNudge::Skip => outcome.skipped += 1,
            PodNudge::Already => outcome.already += 1,
            PodNudge::Needed => todo.push(pod.name_any()),
        }
    }
    let patch =
        serde_json::json!({"metadata": {"annotations": {NUDGED_FOR_ANNOTATION: fingerprint}}});
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let results: Vec<bool> = futures::stream::iter(todo)
        .map(|name| {
            let (patch, params) = (&patch, &params);
            async move {
                bounded(pods.patch(&name, params, &Patch::Merge(patch)))
                    .await
                    .is_ok()
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for ok in results {
        if ok {
            outcome.nudged += 1;
        } else {
            outcome.failed += 1;
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::coordination::v1::LeaseSpec,
        apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference},
    };

    use super::*;

    const STORED: &str = "2030-01-01T00:00:00Z";
    const GRACE: Duration = Duration::from_secs(10);

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// `at` seconds after the token was stored.
    fn at(secs: i64) -> Timestamp {
        t(STORED) + SignedDuration::from_secs(secs)
    }

    /// A live agent (renewed at `renewed`, 30 s lease) started long before the token.
    fn agent(pod: &str, fingerprint: Option<&str>, since: i64, renewed: i64) -> AgentReport {
        AgentReport {
            pod: pod.into(),
            pod_uid: None,
            fingerprint: fingerprint.map(str::to_string),
            since: Some(at(since)),
            started: Some(at(-3600)),
            renewed: Some(at(renewed)),
            duration: Duration::from_secs(30),
        }
    }

    /// [`aggregate`] as a first pass sees it: nothing remembered of the pods.
    fn aggregate_fresh(
        reports: &[AgentReport],
        token: CurrentToken<'_>,
        stale_after: Duration,
        now: Timestamp,
    ) -> ConsumersStatus {
        let behind = track_behind(&BehindPods::new(), reports, token);
        aggregate(reports, token, &behind, &BTreeSet::new(), stale_after, now)
    }

    fn next_change_fresh(
        reports: &[AgentReport],
        token: CurrentToken<'_>,
        stale_after: Duration,
        now: Timestamp,
    ) -> Option<Timestamp> {
        let behind = track_behind(&BehindPods::new(), reports, token);
        next_change(reports, &behind, stale_after, now)
    }

    fn current() -> CurrentToken<'static> {
        CurrentToken {
            fingerprint: Some("new"),
            stored_at: Some(t(STORED)),
        }
    }

    #[test]
    fn aggregate_counts_current_switching_stale_and_dead_pods() {
        struct Case {
            name: &'static str,
            reports: Vec<AgentReport>,
            now: i64,
            summary: &'static str,
            stale: &'static [&'static str],
            slowest: Option<f64>,
        }
        let cases = [
            Case {
                name: "all switched",
                reports: vec![agent("a", Some("new"), 0, 1), agent("b", Some("new"), 2, 2)],
                now: 5,
                summary: "2/2",
                stale: &[],
                slowest: Some(2.0),
            },
            Case {
                name: "within the grace an old token is switching, not stale",
                reports: vec![
                    agent("a", Some("new"), 1, 1),
                    agent("b", Some("old"), -50, 0),
                ],
                now: 9,
                summary: "1/2",
                stale: &[],
                slowest: Some(1.0),
            },
            Case {
                name: "after the grace an old token is stale",
                reports: vec![
                    agent("a", Some("new"), 1, 1),
                    agent("b", Some("old"), -50, 20),
                ],
                now: 21,
                summary: "1/2",
                stale: &["b"],
                slowest: Some(1.0),
            },
            Case {
                name: "an agent serving nothing is stale after the grace",
                reports: vec![agent("c", None, 0, 20)],
                now: 21,
                summary: "0/1",
                stale: &["c"],
                slowest: None,
            },
            Case {
                name: "an expired heartbeat drops out, even with an old token",
                reports: vec![
                    agent("a", Some("new"), 0, 25),
                    agent("dead", Some("old"), -50, -5),
                ],
                now: 26,
                summary: "1/1",
                stale: &[],
                slowest: Some(0.0),
            },
            Case {
                name: "a token served before it was stored switched in no time",
                reports: vec![agent("a", Some("new"), -1, 0)],
                now: 1,
                summary: "1/1",
                stale: &[],
                slowest: Some(0.0),
            },
        ];
        for c in cases {
            let s = aggregate_fresh(&c.reports, current(), GRACE, at(c.now));
            assert_eq!(s.summary, c.summary, "{}", c.name);
            assert_eq!(s.stale_pods, c.stale, "{}", c.name);
            assert_eq!(s.stale as usize, c.stale.len(), "{}", c.name);
            assert_eq!(s.slowest_switch_seconds, c.slowest, "{}", c.name);
        }
    }

    #[test]
    fn a_pod_started_after_the_rotation_neither_switched_nor_is_stale_at_once() {
        let mut late = agent("late", Some("new"), 300, 300);
        late.started = Some(at(290));
        let mut booting = agent("booting", None, 300, 300);
        booting.started = Some(at(295));
        let s = aggregate_fresh(&[late, booting.clone()], current(), GRACE, at(301));
        assert_eq!((s.current, s.total, s.stale), (1, 2, 0));
        // Its 290 s "switch" is a start, not a switch.
        assert_eq!(s.slowest_switch_seconds, None);
        // Ten seconds after its own start it counts as stale.
        booting.renewed = Some(at(306));
        let s = aggregate_fresh(&[booting], current(), GRACE, at(306));
        assert_eq!(s.stale_pods, ["booting"]);
    }

    #[test]
    fn a_pod_stuck_on_an_old_token_stays_stale_across_rotations() {
        // Token "t1" stored at 0, "t2" at 22, "t3" at 44; pod "b" stays on "t0".
        let token = |fp: &'static str, stored: i64| CurrentToken {
            fingerprint: Some(fp),
            stored_at: Some(at(stored)),
        };
        let a = |fp: &str, renewed: i64| agent("a", Some(fp), renewed, renewed);
        let b = |renewed: i64| agent("b", Some("t0"), -50, renewed);
        let pass = |prev: &BehindPods, reports: &[AgentReport], tok, now| {
            let behind = track_behind(prev, reports, tok);
            let s = aggregate(reports, tok, &behind, &BTreeSet::new(), GRACE, at(now));
            (behind, s)
        };
        let (behind, s) = pass(&BehindPods::new(), &[a("t1", 1), b(1)], token("t1", 0), 11);
        assert_eq!(s.stale_pods, ["b"]);
        // The next token: "b" missed "t1" at 0, so it is still stale right after "t2".
        let reports = [a("t2", 23), b(23)];
        let (behind, s) = pass(&behind, &reports, token("t2", 22), 23);
        assert_eq!((s.stale, s.current, s.total), (1, 1, 2));
        assert_eq!(behind["b"].since, at(0));
        assert_eq!(
            next_change(&reports, &behind, GRACE, at(23)),
            Some(at(53) + SignedDuration::from_millis(100))
        );
        let (behind, s) = pass(&behind, &[a("t3", 45), b(45)], token("t3", 44), 45);
        assert_eq!(s.stale_pods, ["b"]);
        // Progress, though not to the current token: counted from the current store.
        let (behind, s) = pass(
            &behind,
            &[a("t3", 46), agent("b", Some("t2"), 46, 46)],
            token("t3", 44),
            47,
        );
        assert_eq!((s.stale, behind["b"].since), (0, at(44)));
        // Serving nothing for a moment is no progress.
        let (behind, _) = pass(&behind, &[agent("b", None, 46, 47)], token("t3", 44), 48);
        assert_eq!(behind["b"].since, at(44));
        // Switched: forgotten; a restarted agent counts from its start.
        let (behind, _) = pass(
            &behind,
            &[agent("b", Some("t3"), 49, 49)],
            token("t3", 44),
            50,
        );
        assert!(behind.is_empty());
        let mut restarted = b(60);
        restarted.started = Some(at(58));
        let prev = BehindPods::from([(
            "b".to_string(),
            Behind {
                serving: Some("t0".into()),
                started: Some(at(-3600)),
                since: at(0),
            },
        )]);
        let behind = track_behind(&prev, &[restarted], token("t3", 44));
        assert_eq!(behind["b"].since, at(58));
        // Nothing is behind before a token was stored.
        let none = CurrentToken {
            fingerprint: None,
            stored_at: None,
        };
        assert!(track_behind(&prev, &[b(1)], none).is_empty());
    }

    #[test]
    fn a_silent_agent_whose_pod_still_runs_is_lost_and_turns_the_condition_false() {
        // "a" current; "dead" renewed at -5 for 30 s, so silent at 26; "moved" has a
        // silent Lease but a live one too (its agent reports again).
        let mut moved_old = agent("moved", Some("old"), -50, -40);
        moved_old.duration = Duration::from_secs(10);
        let reports = [
            agent("a", Some("new"), 0, 25),
            agent("dead", Some("old"), -50, -5),
            moved_old,
            agent("moved", Some("new"), 1, 25),
            agent("../secrets/x", Some("old"), -50, -5),
        ];
        let silent: Vec<&str> = silent_pods(&reports, at(26))
            .iter()
            .map(|r| r.pod.as_str())
            .collect();
        assert_eq!(silent, ["dead"]);
        assert!(silent_pods(&reports, at(20)).is_empty());
        let lost = BTreeSet::from(["dead".to_string()]);
        let behind = track_behind(&BehindPods::new(), &reports, current());
        let s = aggregate(&reports, current(), &behind, &lost, GRACE, at(26));
        assert_eq!(
            (s.summary.as_str(), s.total, s.current, s.stale, s.lost),
            ("2/3", 3, 2, 0, 1)
        );
        assert_eq!(s.lost_pods, ["dead"]);
        let c = condition(
            None,
            ConditionInputs {
                status: Some(&s),
                unread: None,
                refusal: None,
                stale_after: GRACE,
                generation: None,
                now: at(26),
            },
        )
        .unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "LostConsumers")
        );
        assert!(c.message.contains("1 of 3 pods"), "{}", c.message);
        assert!(c.message.ends_with("unknown: dead"), "{}", c.message);
        let e = transition_event(None, &c).unwrap();
        assert_eq!(
            (e.type_, e.reason.as_str()),
            (EventType::Warning, "LostConsumers")
        );
    }

    #[test]
    fn a_pod_still_runs_unless_replaced_deleted_or_finished() {
        let pod = |uid: &str, phase: &str, deleting: bool| Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                uid: Some(uid.into()),
                deletion_timestamp: deleting.then(|| Time(at(0))),
                ..ObjectMeta::default()
            },
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
            ..Pod::default()
        };
        let mut report = agent("p", Some("old"), 0, 0);
        report.pod_uid = Some("u1".into());
        assert!(pod_still_runs(&pod("u1", "Running", false), &report));
        assert!(pod_still_runs(&pod("u1", "Pending", false), &report));
        assert!(!pod_still_runs(&pod("u2", "Running", false), &report));
        assert!(!pod_still_runs(&pod("u1", "Running", true), &report));
        assert!(!pod_still_runs(&pod("u1", "Failed", false), &report));
        assert!(!pod_still_runs(&pod("u1", "Succeeded", false), &report));
        // An agent that does not know its pod's UID: the name decides.
        report.pod_uid = None;
        assert!(pod_still_runs(&pod("u2", "Running", false), &report));
    }

    #[test]
    fn nothing_is_stale_before_a_token_was_stored() {
        let none = CurrentToken {
            fingerprint: None,
            stored_at: None,
        };
        let s = aggregate_fresh(&[agent("a", None, 0, 100)], none, GRACE, at(100));
        assert_eq!((s.total, s.current, s.stale), (1, 0, 0));
    }

    #[test]
    fn stale_names_are_sorted_and_capped() {
        let reports: Vec<_> = (0..15)
            .rev()
            .map(|i| agent(&format!("pod-{i:02}"), Some("old"), -50, 20))
            .collect();
        let s = aggregate_fresh(&reports, current(), GRACE, at(21));
        assert_eq!(s.stale, 15);
        assert_eq!(s.stale_pods.len(), MAX_STALE_NAMES);
        assert_eq!(s.stale_pods[0], "pod-00");
        let c = condition(
            None,
            ConditionInputs {
                status: Some(&s),
                unread: None,
                refusal: None,
                stale_after: GRACE,
                generation: Some(3),
                now: at(21),
            },
        )
        .unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "StaleConsumers")
        );
        assert!(c.message.contains("15 of 15"), "{}", c.message);
        assert!(c.message.ends_with("pod-09 and 5 more"), "{}", c.message);
        assert_eq!(c.observed_generation, Some(3));
    }

    fn cond(status: Option<&ConsumersStatus>, refusal: Option<&str>) -> Option<Condition> {
        condition(
            None,
            ConditionInputs {
                status,
                unread: None,
                refusal,
                stale_after: GRACE,
                generation: None,
                now: at(0),
            },
        )
    }

    #[test]
    fn condition_says_up_to_date_no_reports_or_refused() {
        let ok = aggregate_fresh(
            &[agent("a", Some("new"), 0, 0), agent("b", Some("old"), 0, 0)],
            current(),
            GRACE,
            at(1),
        );
        let c = cond(Some(&ok), None).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "UpToDate"));
        assert_eq!(
            c.message,
            "1 of 2 reporting pods serve the current token; 1 switching"
        );

        let empty = aggregate_fresh(&[], current(), GRACE, at(1));
        assert_eq!(empty.summary, "0/0");
        let c = cond(Some(&empty), None).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("Unknown", "NoReports")
        );

        let c = cond(Some(&ok), Some("rollout restarts refused: ...")).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "RestartRefused")
        );

        assert_eq!(cond(None, None), None);
    }

    #[test]
    fn condition_keeps_its_transition_time_while_the_status_holds() {
        let s = aggregate_fresh(&[agent("a", Some("new"), 0, 0)], current(), GRACE, at(1));
        let inputs = |now| ConditionInputs {
            status: Some(&s),
            unread: None,
            refusal: None,
            stale_after: GRACE,
            generation: None,
            now,
        };
        let first = condition(None, inputs(at(1))).unwrap();
        let second = condition(Some(&first), inputs(at(50))).unwrap();
        assert_eq!(second.last_transition_time, Time(at(1)));
        let refused = ConditionInputs {
            refusal: Some("no"),
            ..inputs(at(60))
        };
        let third = condition(Some(&second), refused).unwrap();
        assert_eq!(third.last_transition_time, Time(at(60)));
    }

    #[test]
    fn events_on_turning_false_and_on_recovery_only() {
        let mk = |status: &str, reason: &str| Condition {
            type_: CONDITION_TYPE.into(),
            status: status.into(),
            reason: reason.into(),
            message: format!("{status} {reason}"),
            last_transition_time: Time(at(0)),
            observed_generation: None,
        };
        let up = mk("True", "UpToDate");
        let stale = mk("False", "StaleConsumers");
        let refused = mk("False", "RestartRefused");
        let unknown = mk("Unknown", "NoReports");

        let e = transition_event(Some(&up), &stale).unwrap();
        assert_eq!(
            (e.type_, e.reason.as_str()),
            (EventType::Warning, "StaleConsumers")
        );
        assert_eq!(e.note.as_deref(), Some("False StaleConsumers"));
        assert!(transition_event(None, &stale).is_some());
        assert!(transition_event(Some(&stale), &stale).is_none());
        assert!(transition_event(Some(&stale), &refused).is_some());
        let e = transition_event(Some(&stale), &up).unwrap();
        assert_eq!(
            (e.type_, e.reason.as_str()),
            (EventType::Normal, "ConsumersUpToDate")
        );
        assert!(transition_event(Some(&up), &up).is_none());
        assert!(transition_event(None, &up).is_none());
        assert!(transition_event(Some(&up), &unknown).is_none());

        // Reports that cannot be read are a setting to fix: warned about, and recovery told.
        let disabled = mk("Unknown", "ReportsDisabled");
        let e = transition_event(Some(&up), &disabled).unwrap();
        assert_eq!(
            (e.type_, e.reason.as_str()),
            (EventType::Warning, "ReportsDisabled")
        );
        assert!(transition_event(Some(&disabled), &disabled).is_none());
        let e = transition_event(Some(&disabled), &up).unwrap();
        assert_eq!(e.reason, "ConsumersUpToDate");
        assert!(transition_event(Some(&unknown), &up).is_none());
    }

    #[test]
    fn reports_that_cannot_be_read_say_how_to_enable_them() {
        let s = aggregate_fresh(&[agent("a", Some("new"), 0, 0)], current(), GRACE, at(1));
        let with = |unread, refusal| {
            condition(
                None,
                ConditionInputs {
                    status: Some(&s),
                    unread: Some(unread),
                    refusal,
                    stale_after: GRACE,
                    generation: None,
                    now: at(1),
                },
            )
            .unwrap()
        };
        let c = with(Unread::Disabled, None);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("Unknown", "ReportsDisabled")
        );
        for needle in [
            "--consumer-reports",
            "SCG_CONSUMER_REPORTS",
            "consumer-reports",
        ] {
            assert!(c.message.contains(needle), "{}", c.message);
        }
        let c = with(
            Unread::Unavailable("the Kubernetes API answered 403 Forbidden"),
            None,
        );
        assert_eq!(c.reason, "ReportsUnavailable");
        assert!(c.message.contains("403 Forbidden"), "{}", c.message);
        // A refused restart still outranks it.
        let c = with(Unread::Disabled, Some("rollout restarts refused"));
        assert_eq!(c.reason, "RestartRefused");
    }

    #[test]
    fn the_next_change_is_the_first_expiry_or_the_first_pod_to_turn_stale() {
        let look = |t: Timestamp| t + SignedDuration::from_millis(100);
        // A current pod renewed at 5 (30 s lease): its expiry is the only change ahead.
        let a = agent("a", Some("new"), 1, 5);
        assert_eq!(
            next_change_fresh(std::slice::from_ref(&a), current(), GRACE, at(6)),
            Some(look(at(35)))
        );
        // A switching pod turns stale 10 s after the store, before that expiry.
        let b = agent("b", Some("old"), -50, 5);
        assert_eq!(
            next_change_fresh(&[a.clone(), b.clone()], current(), GRACE, at(6)),
            Some(look(at(10)))
        );
        // Once it is stale only expiries are ahead.
        assert_eq!(
            next_change_fresh(&[a.clone(), b], current(), GRACE, at(11)),
            Some(look(at(35)))
        );
        // Dead agents have nothing ahead; nor does an empty list.
        assert_eq!(next_change_fresh(&[a], current(), GRACE, at(36)), None);
        assert_eq!(next_change_fresh(&[], current(), GRACE, at(0)), None);
        // Waking then sees the change.
        let b = agent("b", Some("old"), -50, 5);
        let s = aggregate_fresh(&[b], current(), GRACE, look(at(10)));
        assert_eq!(s.stale_pods, ["b"]);
    }

    #[test]
    fn restarts_are_refused_for_short_lifetimes_and_frequent_refreshes() {
        let m = |s: u64| Duration::from_secs(s * 60);
        for (lifetime, interval, refused) in [
            (m(24 * 60), m(16 * 60), None),
            (m(10), m(6), None),
            (m(10), m(5), None),
            (Duration::from_secs(599), m(6), Some("tokens live 599s")),
            (
                Duration::from_secs(60),
                Duration::from_secs(40),
                Some("tokens live 60s"),
            ),
            (m(24 * 60), m(4), Some("refreshed every 240s")),
        ] {
            let got = restart_refusal(lifetime, interval);
            match refused {
                None => assert_eq!(got, None, "{lifetime:?} {interval:?}"),
                Some(needle) => {
                    let got = got.unwrap_or_default();
                    assert!(got.contains(needle), "{got}");
                    assert!(got.contains("token agent"), "{got}");
                }
            }
        }
    }

    #[test]
    fn restarts_happen_once_per_token_and_are_debounced() {
        let ann = |fp: &str, at_: Timestamp| {
            BTreeMap::from([
                (RESTARTED_FOR_ANNOTATION.to_string(), fp.to_string()),
                (RESTARTED_AT_ANNOTATION.to_string(), at_.to_string()),
            ])
        };
        assert_eq!(
            restart_decision(&BTreeMap::new(), "new", at(0)),
            RestartDecision::Restart
        );
        assert_eq!(
            restart_decision(&ann("new", at(-1000)), "new", at(0)),
            RestartDecision::AlreadyDone
        );
        assert_eq!(
            restart_decision(&ann("old", at(-30)), "new", at(0)),
            RestartDecision::NotBefore(at(90))
        );
        assert_eq!(
            restart_decision(&ann("old", at(-120)), "new", at(0)),
            RestartDecision::Restart
        );
        let garbled = BTreeMap::from([(RESTARTED_AT_ANNOTATION.to_string(), "x".to_string())]);
        assert_eq!(
            restart_decision(&garbled, "new", at(0)),
            RestartDecision::Restart
        );
    }

    #[test]
    fn pods_are_nudged_once_per_token_and_only_while_alive() {
        let pod = |fp: Option<&str>, phase: &str, deleting: bool| Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                annotations: fp.map(|f| BTreeMap::from([(NUDGED_FOR_ANNOTATION.into(), f.into())])),
                deletion_timestamp: deleting.then(|| Time(at(0))),
                ..ObjectMeta::default()
            },
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
            ..Pod::default()
        };
        assert_eq!(
            pod_nudge(&pod(None, "Running", false), "new"),
            PodNudge::Needed
        );
        assert_eq!(
            pod_nudge(&pod(Some("old"), "Pending", false), "new"),
            PodNudge::Needed
        );
        assert_eq!(
            pod_nudge(&pod(Some("new"), "Running", false), "new"),
            PodNudge::Already
        );
        assert_eq!(
            pod_nudge(&pod(None, "Running", true), "new"),
            PodNudge::Skip
        );
        assert_eq!(
            pod_nudge(&pod(None, "Succeeded", false), "new"),
            PodNudge::Skip
        );
        assert_eq!(
            pod_nudge(&pod(None, "Failed", false), "new"),
            PodNudge::Skip
        );
    }

    /// A report Lease as an agent writes it, held by `holder`.
    fn lease(holder: Option<&str>, duration: Option<i32>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("p-scgtoken-messaging".into()),
                annotations: Some(BTreeMap::from([
                    (SERVED_FINGERPRINT_ANNOTATION.into(), "abc".into()),
                    (SERVED_SINCE_ANNOTATION.into(), at(3).to_string()),
                ])),
                owner_references: Some(vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Pod".into(),
                    name: "p".into(),
                    uid: "uid-p".into(),
                    ..OwnerReference::default()
                }]),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: duration,
                acquire_time: Some(MicroTime(at(-10))),
                renew_time: Some(MicroTime(at(4))),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn reports_are_read_from_leases_and_released_ones_are_ignored() {
        let r = report_from_lease(&lease(Some("p"), Some(30))).unwrap();
        assert_eq!(
            r,
            AgentReport {
                pod: "p".into(),
                pod_uid: Some("uid-p".into()),
                fingerprint: Some("abc".into()),
                since: Some(at(3)),
                started: Some(at(-10)),
                renewed: Some(at(4)),
                duration: Duration::from_secs(30),
            }
        );
        assert!(is_alive(&r, at(34)));
        assert!(!is_alive(&r, at(35)));
        let r = report_from_lease(&lease(Some("p"), None)).unwrap();
        assert_eq!(r.duration, DEFAULT_LEASE_DURATION);
        assert_eq!(report_from_lease(&lease(None, Some(30))), None);
        assert_eq!(report_from_lease(&lease(Some(""), Some(30))), None);
    }

    #[test]
    fn a_workload_opts_in_by_naming_the_scgtoken() {
        let with = |v: &str| BTreeMap::from([(RESTART_FOR_ANNOTATION.to_string(), v.to_string())]);
        assert!(opted_in(&with("messaging"), "messaging"));
        assert!(opted_in(&with("voice, messaging ,sms"), "messaging"));
        assert!(!opted_in(&with("messaging-old"), "messaging"));
        assert!(
            !opted_in(&with("*"), "messaging"),
            "no wildcard: names only"
        );
        assert!(!opted_in(&with(""), "messaging"));
        assert!(!opted_in(&BTreeMap::new(), "messaging"));
    }

    /// A Lease written by hand, not by an agent: what it claims is bounded, and nothing
    /// in it that is not a pod name or a fingerprint reaches status or an Event.
    #[test]
    fn a_forged_report_is_held_to_what_an_agent_writes() {
        let forged = "ACTION REQUIRED: paste consumerSecret at https://evil.example/";
        assert_eq!(report_from_lease(&lease(Some(forged), Some(30))), None);
        assert_eq!(report_from_lease(&lease(Some("Pod_1"), Some(30))), None);
        let r = report_from_lease(&lease(Some("p"), Some(i32::MAX))).unwrap();
        assert_eq!(r.duration, MAX_LEASE_DURATION);
        assert!(!is_alive(
            &r,
            after(r.renewed.unwrap(), Duration::from_secs(3601))
        ));
        for bad in [forged, "", "abc def", &"a".repeat(65)] {
            let mut l = lease(Some("p"), Some(30));
            l.metadata
                .annotations
                .get_or_insert_default()
                .insert(SERVED_FINGERPRINT_ANNOTATION.into(), bad.into());
            assert_eq!(report_from_lease(&l).unwrap().fingerprint, None, "{bad:?}");
        }
    }

    #[test]
    fn metrics_count_pods_by_state_and_forget_them() {
        let mut registry = Registry::default();
        let m = ConsumerMetrics::register(&mut registry);
        let s = aggregate_fresh(
            &[
                agent("a", Some("new"), 0, 20),
                agent("b", Some("old"), 0, 20),
                agent("c", Some("old"), 0, 20),
            ],
            current(),
            GRACE,
            at(21),
        );
        m.observe("ns", "messaging", &s);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"scgtoken_consumers{namespace="ns",name="messaging",state="stale"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"state="current"} 1"#), "{text}");
        m.forget("ns", "messaging");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(!text.contains("messaging"), "{text}");
    }
}
