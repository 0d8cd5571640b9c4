//! The token's consumers, within a pass (`spec.consumers`): the agents' reports read from
//! a Lease cache, and after each new token the pod nudges and rollout restarts. It runs at
//! publish time, after the token is stored, and nothing here can fail a pass: a token
//! is never held back by its consumers.
//!
//! - The cache: a watch of the Leases labelled [`AGENT_SCGTOKEN_LABEL`], on only with
//!   `--consumer-reports` (it needs leases list/watch). A Lease starts a pass of its
//!   ScgToken when what it reports changes, not on every heartbeat: the pass wakes up
//!   by itself when a heartbeat expires or a pod turns stale ([`consumers::next_change`]).
//! - The writes: nudges are tried once per token (the kubelet's periodic sync follows
//!   anyway); restarts until every target was handled, debounced.
//! - [`settle`], pure: `status.consumers`, the `ConsumersUpToDate` condition, its Event
//!   and the wake-up.

use std::{
    collections::{BTreeSet, HashMap, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use futures::{Stream, StreamExt, future::FutureExt};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{
    Api, ResourceExt,
    runtime::{
        WatchStreamExt,
        events::{Event, EventType},
        reflector::{ObjectRef, Store, store::Writer},
        watcher,
    },
};
use tracing::{info, warn};

use super::{Pass, cache::CachedScgToken, memory::Key, outcome::Outcome};
use crate::{
    consumers::{
        self, AgentReport, BehindPods, ConditionInputs, CurrentToken, RestartOutcome, Unread,
    },
    crd::{
        AGENT_SCGTOKEN_LABEL, ConsumersSpec, ConsumersStatus, RESTART_FOR_ANNOTATION,
        RolloutRestartTarget, SERVED_FINGERPRINT_ANNOTATION, SERVED_SINCE_ANNOTATION, ScgToken,
        ScgTokenSpec, ScgTokenStatus,
    },
    k8s,
    policy::{self, TokenTimes},
    report::Reason,
};

/// The agents' report Leases, as the Lease watch keeps them, and what the operator
/// remembers of the reporting pods between passes.
#[derive(Default)]
pub struct ReportCache {
    /// `None` without `--consumer-reports`.
    leases: Option<Store<Lease>>,
    /// Why the watch failed, until an event arrives again.
    error: Mutex<Option<String>>,
    /// Per ScgToken, the pods behind the current token and since when
    /// ([`consumers::track_behind`]). In memory only: after a restart, or on a new leader,
    /// a pod still behind counts from the current token's store (or its agent's start),
    /// as a pod first seen does; it is named stale at most `staleAfter` later.
    behind: Mutex<HashMap<Key, BehindPods>>,
}

impl ReportCache {
    pub(super) fn new(leases: Store<Lease>) -> ReportCache {
        ReportCache {
            leases: Some(leases),
            ..ReportCache::default()
        }
    }

    fn set_error(&self, error: Option<String>) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }

    fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn behind_pods(&self) -> MutexGuard<'_, HashMap<Key, BehindPods>> {
        self.behind.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets what is remembered of an ScgToken's pods (it is gone).
    pub(super) fn forget(&self, key: &Key) {
        self.behind_pods().remove(key);
    }
}

/// What a pass knows of the agents' reports.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Reports {
    /// `spec.consumers.agents` is off.
    Off,
    /// Asked for, but the operator runs without `--consumer-reports`.
    Disabled,
    /// The Lease watch has not listed yet and failed, for this reason.
    Unavailable(String),
    /// The Lease watch has not listed yet.
    NotSynced,
    Read(Vec<AgentReport>),
}

/// The reports for `obj`, from the cache (no request).
pub(super) fn read_reports(cache: &ReportCache, obj: &ScgToken) -> Reports {
    if !obj.spec.consumers.as_ref().is_some_and(|c| c.agents) {
        return Reports::Off;
    }
    let Some(leases) = &cache.leases else {
        return Reports::Disabled;
    };
    if leases.wait_until_ready().now_or_never().is_none() {
        return match cache.error() {
            Some(why) => Reports::Unavailable(why),
            None => Reports::NotSynced,
        };
    }
    let name = obj.name_any();
    let reports = leases
        .state()
        .iter()
        .filter(|l| l.metadata.namespace == obj.metadata.namespace)
        .filter(|l| l.labels().get(AGENT_SCGTOKEN_LABEL) == Some(&name))
        .filter_map(|l| consumers::report_from_lease(l))
        .collect();
    Reports::Read(reports)
}

/// What a Lease reports, hashed: a change of it is worth a pass, a heartbeat is not.
fn reported(lease: &Lease) -> u64 {
    let a = lease.annotations();
    let mut h = DefaultHasher::new();
    (
        lease.labels().get(AGENT_SCGTOKEN_LABEL),
        lease.spec.as_ref().and_then(|s| s.holder_identity.as_ref()),
        a.get(SERVED_FINGERPRINT_ANNOTATION),
        a.get(SERVED_SINCE_ANNOTATION),
    )
        .hash(&mut h);
    h.finish()
}

/// A Kubernetes watch error in the operator's own words.
fn describe_watch(e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => k8s::describe(e),
        watcher::Error::WatchError(s) => {
            format!("the Kubernetes API answered {} {}", s.code, s.reason)
        }
        watcher::Error::NoResourceVersion => "the Lease list had no resourceVersion".into(),
    }
}

/// The Lease watch: fills `writer` (the cache's store) and yields the Leases whose report
/// changed, appeared or went away. Errors go through (the controller logs them) and are
/// kept in `cache` for the condition.
pub(super) fn report_changes(
    leases: Api<Lease>,
    writer: Writer<Lease>,
    cache: std::sync::Arc<ReportCache>,
) -> impl Stream<Item = Result<Lease, watcher::Error>> + Send + 'static {
    let config = watcher::Config::default().labels(AGENT_SCGTOKEN_LABEL);
    let mut seen: HashMap<ObjectRef<Lease>, u64> = HashMap::new();
    watcher(leases, config)
        .default_backoff()
        .reflect(writer)
        .filter_map(move |event| {
            if event.is_ok() {
                cache.set_error(None);
            }
            let out = match event {
                Err(e) => {
                    cache.set_error(Some(describe_watch(&e)));
                    Some(Err(e))
                }
                // After a relist every Lease counts as new.
                Ok(watcher::Event::Init) => {
                    seen.clear();
                    None
                }
                Ok(watcher::Event::Apply(l) | watcher::Event::InitApply(l)) => {
                    let hash = reported(&l);
                    let before = seen.insert(ObjectRef::from_obj(&l), hash);
                    (before != Some(hash)).then_some(Ok(l))
                }
                Ok(watcher::Event::Delete(l)) => {
                    seen.remove(&ObjectRef::from_obj(&l));
                    Some(Ok(l))
                }
                Ok(watcher::Event::InitDone) => None,
            };
            futures::future::ready(out)
        })
}

/// The ScgToken a report Lease names.
pub(super) fn scgtoken_of(lease: Lease) -> Option<ObjectRef<CachedScgToken>> {
    let name = lease.labels().get(AGENT_SCGTOKEN_LABEL)?;
    let namespace = lease.namespace()?;
    Some(ObjectRef::new(name).within(&namespace))
}

/// The consumer part of a pass's outcome.
#[derive(Default)]
pub(super) struct Settled {
    pub status: Option<ConsumersStatus>,
    pub condition: Option<Condition>,
    pub events: Vec<Event>,
    pub wake: Option<Timestamp>,
    /// The pods behind the current token, to remember for the next pass.
    pub behind: BehindPods,
}

/// What the writes for consumers asked of the outcome.
#[derive(Default)]
struct Acted {
    events: Vec<Event>,
    wake: Option<Timestamp>,
}

pub(super) fn earliest(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn event(type_: EventType, reason: &str, note: String) -> Event {
    Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "UpdateConsumers".into(),
        secondary: None,
    }
}

/// How long a failed restart waits before it is tried again.
const RESTART_RETRY: Duration = Duration::from_secs(30);
/// How long a pass waits for a Lease watch that has not listed yet.
const SYNC_RETRY: Duration = Duration::from_secs(2);
/// Longest time one nudge (a list and the patches) may take.
const NUDGE_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest time the look at the silent agents' pods may take.
const POD_CHECK_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a pass comes back while pods are lost, to see whether they are gone: a pod's
/// deletion usually comes sooner, as the deletion of the Lease it owns.
const LOST_RECHECK: Duration = Duration::from_secs(30);

impl Pass<'_> {
    /// The consumer part of `out`: first the writes the current token asks for, then
    /// [`settle`]. Sets the `scgtoken_consumers` metrics.
    pub(super) async fn consumers(&self, out: &Outcome) -> Settled {
        let (ns, name) = (&self.key.namespace, &self.key.name);
        let Some(spec) = self.obj.spec.consumers.as_ref() else {
            self.ctx.metrics.consumers.forget(ns, name);
            self.ctx.reports.forget(&self.key);
            return Settled::default();
        };
        let refusal = refusal(&self.obj.spec, &out.status, self.jitter_key(), self.now);
        let mut acted = Acted::default();
        if let Some(fingerprint) = self.stored_fingerprint(out) {
            self.nudge(spec, fingerprint, &mut acted).await;
            if refusal.is_none() {
                self.restart(spec, fingerprint, &mut acted).await;
            }
        }
        let now = self.ctx.clock.now();
        let lost = self.lost_pods(now).await;
        let behind = self.ctx.reports.behind_pods().remove(&self.key);
        let mut settled = settle(&Settle {
            spec,
            reports: &self.reports,
            behind: &behind.unwrap_or_default(),
            lost: &lost,
            status: &out.status,
            stored_at: self.stored_at(&out.status),
            prev: &self.prev,
            refusal: refusal.as_deref(),
            generation: self.obj.metadata.generation,
            now,
        });
        match &settled.status {
            Some(s) => self.ctx.metrics.consumers.observe(ns, name, s),
            None => self.ctx.metrics.consumers.forget(ns, name),
        }
        if !settled.behind.is_empty() {
            let behind = std::mem::take(&mut settled.behind);
            self.ctx
                .reports
                .behind_pods()
                .insert(self.key.clone(), behind);
        }
        // A Warning is logged where every Warning Event is published (publish.rs), once;
        // the turn back to normal only here.
        for e in settled
            .events
            .iter()
            .filter(|e| e.type_ == EventType::Normal)
        {
            let note = e.note.as_deref().unwrap_or_default();
            info!(reason = %e.reason, "{note}");
        }
        settled.events.extend(acted.events);
        settled.wake = earliest(settled.wake, acted.wake);
        settled
    }

    /// The pods whose agent went silent (its Lease expired, not released) and that still
    /// run: the pods named by those Leases are read one by one (pods `get`). A pod that
    /// cannot be read counts as lost: the operator cannot tell it is gone, and the
    /// condition must not say all is well while a consumer may hold a dead token.
    async fn lost_pods(&self, now: Timestamp) -> BTreeSet<String> {
        let Reports::Read(reports) = &self.reports else {
            return BTreeSet::new();
        };
        let silent: Vec<AgentReport> = consumers::silent_pods(reports, now)
            .into_iter()
            .cloned()
            .collect();
        if silent.is_empty() {
            return BTreeSet::new();
        }
        let names: BTreeSet<String> = silent.iter().map(|r| r.pod.clone()).collect();
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.key.namespace);
        let checks = futures::stream::iter(silent)
            .map(move |r: AgentReport| {
                let pods = pods.clone();
                async move {
                    let got = k8s::bounded(pods.get_opt(&r.pod)).await;
                    (r, got)
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<_>>();
        let Ok(checked) = tokio::time::timeout(POD_CHECK_TIMEOUT, checks).await else {
            warn!("reading the pods of silent token agents took too long; counting them as lost");
            return names;
        };
        let mut lost = BTreeSet::new();
        let mut unread: Option<(usize, String)> = None;
        for (report, pod) in checked {
            match pod {
                Ok(Some(pod)) if consumers::pod_still_runs(&pod, &report) => {}
                Ok(_) => continue,
                Err(e) => {
                    let (n, _) = unread.get_or_insert_with(|| (0, k8s::describe(&e)));
                    *n += 1;
                }
            }
            lost.insert(report.pod);
        }
        if let Some((n, why)) = unread {
            warn!(
                pods = n,
                error = %why,
                "could not read the pods of silent token agents; counting them as lost \
                 (the operator needs pods get: deploy/components/consumer-reports)"
            );
        }
        lost
    }

    fn jitter_key(&self) -> u64 {
        policy::jitter_key(&self.obj.uid().unwrap_or_default())
    }

    /// The fingerprint of the token in the target Secret, when status shows one the
    /// operator received and stored (not a seed, not one held in memory, not a foreign
    /// Secret's).
    fn stored_fingerprint<'o>(&self, out: &'o Outcome) -> Option<&'o str> {
        let stored = out.status.last_refresh_at.is_some()
            && !matches!(
                out.reason,
                Reason::Pending | Reason::InvalidSpec | Reason::TargetConflict
            )
            && !self.ctx.has_pending(&self.key.namespace, &self.key.name);
        out.status.token_fingerprint.as_deref().filter(|_| stored)
    }

    /// When the current token was issued, to the millisecond when memory still has it
    /// (status keeps whole seconds).
    fn stored_at(&self, status: &ScgTokenStatus) -> Option<Timestamp> {
        let shown = status.token_fingerprint.as_deref()?;
        let exact = self.ctx.memory.chain(&self.key).and_then(|c| {
            let same = crate::chain::fingerprint(self.obj, c.token.expose()) == shown;
            c.times.issued_at.filter(|_| same)
        });
        exact.or(status.last_refresh_at.as_ref().map(|t| t.0))
    }

    /// Annotates the pods of `spec.podSelector` for the token, once per token. Failures
    /// are a Warning Event; the kubelet's periodic sync still follows.
    async fn nudge(&self, spec: &ConsumersSpec, fingerprint: &str, acted: &mut Acted) {
        let Some(selector) = &spec.pod_selector else {
            return;
        };
        if self.ctx.memory.nudged_for(&self.key).as_deref() == Some(fingerprint) {
            return;
        }
        self.ctx.memory.set_nudged_for(&self.key, fingerprint);
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.key.namespace);
        let result = tokio::time::timeout(
            NUDGE_TIMEOUT,
            consumers::nudge_pods(&pods, &self.key.name, selector, fingerprint),
        )
        .await;
        if let Ok(Ok(n)) = &result
            && n.not_allowed > 0
        {
            let note = format!(
                "{} pods of spec.consumers.podSelector do not opt in and were left \
                 unchanged: annotate them (in their pod template) {RESTART_FOR_ANNOTATION}: {}",
                n.not_allowed, self.key.name
            );
            warn!(reason = "NudgeNotAllowed", "{note}");
            acted
                .events
                .push(event(EventType::Warning, "NudgeNotAllowed", note));
        }
        let note = match result {
            Ok(Ok(n)) if n.failed == 0 => {
                info!(
                    nudged = n.nudged,
                    already = n.already,
                    "nudged the pods that mount the target Secret"
                );
                return;
            }
            Ok(Ok(n)) => format!(
                "{} of {} pods of spec.consumers.podSelector could not be annotated for the \
                 new token; their kubelet updates the Secret volume on its next periodic sync",
                n.failed,
                n.failed + n.nudged
            ),
            Ok(Err(e)) => format!(
                "could not nudge the pods of spec.consumers.podSelector: {e}; the operator \
                 needs pods list/patch (deploy/components/consumer-nudge)"
            ),
            Err(_) => {
                "nudging the pods of spec.consumers.podSelector took too long; stopped".into()
            }
        };
        warn!(reason = "NudgeFailed", "{note}");
        acted
            .events
            .push(event(EventType::Warning, "NudgeFailed", note));
    }

    /// Restarts the rollout-restart targets for the token, once per token and debounced;
    /// a failed restart is tried again later.
    async fn restart(&self, spec: &ConsumersSpec, fingerprint: &str, acted: &mut Acted) {
        if spec.rollout_restart_targets.is_empty()
            || self.ctx.memory.restarted_for(&self.key).as_deref() == Some(fingerprint)
        {
            return;
        }
        let mut done = true;
        for target in &spec.rollout_restart_targets {
            let now = self.ctx.clock.now();
            let result = consumers::rollout_restart(
                self.ctx.client.clone(),
                &self.key.namespace,
                &self.key.name,
                target,
                fingerprint,
                now,
            )
            .await;
            let retry = restart_result(&self.key.name, target, result, now, acted);
            done &= retry.is_none();
            acted.wake = earliest(acted.wake, retry);
        }
        if done {
            self.ctx.memory.set_restarted_for(&self.key, fingerprint);
        }
    }
}

/// Reports one restart; when to try it again, if it is not done.
fn restart_result(
    scgtoken: &str,
    target: &RolloutRestartTarget,
    result: Result<RestartOutcome, kube::Error>,
    now: Timestamp,
    acted: &mut Acted,
) -> Option<Timestamp> {
    let what = format!("{:?} {:?}", target.kind, target.name);
    match result {
        Ok(RestartOutcome::Restarted) => {
            info!(target = %what, "restarted for the new token");
            let note = format!("restarted {what} for the new token");
            acted
                .events
                .push(event(EventType::Normal, "RolloutRestarted", note));
            None
        }
        Ok(RestartOutcome::AlreadyDone) => None,
        Ok(RestartOutcome::NotBefore(at)) => Some(at),
        Ok(RestartOutcome::NotAllowed) => {
            let note = format!(
                "rollout-restart target {what} does not opt in and was left unchanged: \
                 annotate it (its own metadata) {RESTART_FOR_ANNOTATION}: {scgtoken}"
            );
            warn!(reason = "RestartNotAllowed", "{note}");
            acted
                .events
                .push(event(EventType::Warning, "RestartNotAllowed", note));
            None
        }
        Ok(RestartOutcome::NotFound) => {
            let note = format!("rollout-restart target {what} does not exist");
            warn!(reason = "RestartTargetNotFound", "{note}");
            acted
                .events
                .push(event(EventType::Warning, "RestartTargetNotFound", note));
            None
        }
        Err(e) => {
            let note = format!(
                "could not restart {what}: {}; the operator needs get/patch on it \
                 (deploy/components/rollout-restart); trying again in {}s",
                k8s::describe(&e),
                RESTART_RETRY.as_secs()
            );
            warn!(reason = "RestartFailed", "{note}");
            acted
                .events
                .push(event(EventType::Warning, "RestartFailed", note));
            let retry = SignedDuration::try_from(RESTART_RETRY).unwrap_or_default();
            Some(now + retry)
        }
    }
}

/// Why rollout restarts are refused for this ScgToken's tokens, when it has targets: by
/// the lifetime of the current token and the time between its issue and its refresh,
/// or for a token not yet issued, by the requested validity.
pub(super) fn refusal(
    spec: &ScgTokenSpec,
    status: &ScgTokenStatus,
    jitter_key: u64,
    now: Timestamp,
) -> Option<String> {
    let targets = spec.consumers.as_ref()?.rollout_restart_targets.len();
    if targets == 0 {
        return None;
    }
    let settings = policy::validate(spec).ok()?;
    let (issued, expires) = match (&status.last_refresh_at, &status.expires_at) {
        (Some(i), Some(e)) if e.0 > i.0 => (i.0, e.0),
        _ => {
            let validity = SignedDuration::try_from(settings.validity).ok()?;
            (now, now.checked_add(validity).ok()?)
        }
    };
    let times = TokenTimes {
        issued_at: Some(issued),
        expires_at: Some(expires),
    };
    let due = policy::next_refresh(&settings, times, jitter_key)?;
    let span = |to: Timestamp| Duration::try_from(to.duration_since(issued)).unwrap_or_default();
    consumers::restart_refusal(span(expires), span(due))
}

/// What [`settle`] works from.
pub(super) struct Settle<'a> {
    pub spec: &'a ConsumersSpec,
    pub reports: &'a Reports,
    /// The pods behind the current token as the last pass left them.
    pub behind: &'a BehindPods,
    /// The pods whose agent went silent while the pod still runs.
    pub lost: &'a BTreeSet<String>,
    /// Status as the pass leaves it (token fingerprint and times).
    pub status: &'a ScgTokenStatus,
    /// When the current token was issued.
    pub stored_at: Option<Timestamp>,
    /// Status as the pass read it.
    pub prev: &'a ScgTokenStatus,
    pub refusal: Option<&'a str>,
    pub generation: Option<i64>,
    pub now: Timestamp,
}

/// `spec.consumers.staleAfter`, within its bounds (the CRD's rule), else the default.
fn stale_after(spec: &ConsumersSpec) -> Duration {
    policy::parse_duration(&spec.stale_after)
        .filter(|d| (Duration::from_secs(1)..=Duration::from_secs(600)).contains(d))
        .unwrap_or(Duration::from_secs(10))
}

/// The consumer part of the outcome: the aggregate, the condition, its Event, and when
/// the aggregate would next change. While the Lease watch has not listed yet, status
/// keeps what it showed and the pods behind stay as remembered.
pub(super) fn settle(i: &Settle<'_>) -> Settled {
    let stale_after = stale_after(i.spec);
    let previous = i
        .prev
        .conditions
        .iter()
        .find(|c| c.type_ == consumers::CONDITION_TYPE);
    let token = CurrentToken {
        fingerprint: i.status.token_fingerprint.as_deref(),
        stored_at: i.stored_at,
    };
    let mut behind = BehindPods::new();
    let (status, unread, wake) = match i.reports {
        Reports::Off => (None, None, None),
        Reports::Disabled => (None, Some(Unread::Disabled), None),
        Reports::Unavailable(why) => (None, Some(Unread::Unavailable(why)), None),
        Reports::NotSynced if i.refusal.is_none() => {
            let wake = SignedDuration::try_from(SYNC_RETRY).unwrap_or_default();
            return Settled {
                status: i.prev.consumers.clone(),
                condition: previous.cloned(),
                events: Vec::new(),
                wake: Some(i.now + wake),
                behind: i.behind.clone(),
            };
        }
        Reports::NotSynced => (i.prev.consumers.clone(), None, None),
        Reports::Read(reports) => {
            behind = consumers::track_behind(i.behind, reports, token);
            let recheck = (!i.lost.is_empty())
                .then(|| i.now + SignedDuration::try_from(LOST_RECHECK).unwrap_or_default());
            (
                Some(consumers::aggregate(
                    reports,
                    token,
                    &behind,
                    i.lost,
                    stale_after,
                    i.now,
                )),
                None,
                earliest(
                    consumers::next_change(reports, &behind, stale_after, i.now),
                    recheck,
                ),
            )
        }
    };
    let condition = consumers::condition(
        previous,
        ConditionInputs {
            status: status.as_ref(),
            unread,
            refusal: i.refusal,
            stale_after,
            generation: i.generation,
            now: i.now,
        },
    );
    let events = condition
        .as_ref()
        .and_then(|c| consumers::transition_event(previous, c))
        .into_iter()
        .collect();
    Settled {
        status,
        condition,
        events,
        wake,
        behind,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::crd::RestartKind;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_900_000_000 + secs).unwrap()
    }

    fn spec() -> ConsumersSpec {
        ConsumersSpec {
            agents: true,
            stale_after: "5s".into(),
            ..ConsumersSpec::default()
        }
    }

    /// A live agent serving `fingerprint` since the token was issued at 0.
    fn agent(pod: &str, fingerprint: &str) -> AgentReport {
        AgentReport {
            pod: pod.into(),
            pod_uid: None,
            fingerprint: Some(fingerprint.into()),
            since: Some(t(1)),
            started: Some(t(-100)),
            renewed: Some(t(2)),
            duration: Duration::from_secs(30),
        }
    }

    fn status() -> ScgTokenStatus {
        ScgTokenStatus {
            token_fingerprint: Some("new".into()),
            last_refresh_at: Some(Time(t(0))),
            expires_at: Some(Time(t(3600))),
            ..ScgTokenStatus::default()
        }
    }

    fn run(reports: &Reports, prev: &ScgTokenStatus, refusal: Option<&str>, now: i64) -> Settled {
        let spec = spec();
        let status = status();
        settle(&Settle {
            spec: &spec,
            reports,
            behind: &BehindPods::new(),
            lost: &BTreeSet::new(),
            status: &status,
            stored_at: Some(t(0)),
            prev,
            refusal,
            generation: Some(4),
            now: t(now),
        })
    }

    fn reasons(s: &Settled) -> Vec<(EventType, String)> {
        s.events
            .iter()
            .map(|e| (e.type_, e.reason.clone()))
            .collect()
    }

    #[test]
    fn a_stale_pod_turns_the_condition_false_with_a_warning_and_a_wake_up() {
        let reports = Reports::Read(vec![agent("a", "new"), agent("b", "old")]);
        let none = ScgTokenStatus::default();
        // Within the grace: b is switching; wake when it would turn stale.
        let early = run(&reports, &none, None, 3);
        let c = early.condition.clone().unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "UpToDate"));
        assert_eq!(early.status.as_ref().unwrap().summary, "1/2");
        assert_eq!(early.wake, Some(t(5) + SignedDuration::from_millis(100)));
        assert!(early.events.is_empty());
        // After it: stale, named, warned about once.
        let prev = ScgTokenStatus {
            conditions: vec![c],
            ..ScgTokenStatus::default()
        };
        let late = run(&reports, &prev, None, 6);
        let c = late.condition.clone().unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "StaleConsumers")
        );
        assert!(c.message.contains(": b"), "{}", c.message);
        assert_eq!(c.observed_generation, Some(4));
        assert_eq!(
            reasons(&late),
            [(EventType::Warning, "StaleConsumers".to_string())]
        );
        assert_eq!(late.status.unwrap().stale_pods, ["b"]);
        // The next change ahead is a heartbeat's expiry.
        assert_eq!(late.wake, Some(t(32) + SignedDuration::from_millis(100)));
    }

    #[test]
    fn without_reports_the_condition_says_why_and_keeps_no_aggregate() {
        let none = ScgTokenStatus::default();
        let off = run(&Reports::Off, &none, None, 1);
        assert!(off.condition.is_none() && off.status.is_none() && off.wake.is_none());

        let disabled = run(&Reports::Disabled, &none, None, 1);
        let c = disabled.condition.clone().unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("Unknown", "ReportsDisabled")
        );
        assert!(disabled.status.is_none());
        assert_eq!(
            reasons(&disabled),
            [(EventType::Warning, "ReportsDisabled".to_string())]
        );

        let why = "the Kubernetes API answered 403 Forbidden".to_string();
        let c = run(&Reports::Unavailable(why), &none, None, 1)
            .condition
            .unwrap();
        assert_eq!(c.reason, "ReportsUnavailable");
        assert!(c.message.contains("403"), "{}", c.message);
    }

    #[test]
    fn before_the_lease_watch_has_listed_status_keeps_what_it_showed() {
        let shown = run(
            &Reports::Read(vec![agent("a", "new")]),
            &ScgTokenStatus::default(),
            None,
            3,
        );
        let prev = ScgTokenStatus {
            conditions: vec![shown.condition.clone().unwrap()],
            consumers: shown.status.clone(),
            ..ScgTokenStatus::default()
        };
        let waiting = run(&Reports::NotSynced, &prev, None, 10);
        assert_eq!(waiting.status, prev.consumers);
        assert_eq!(waiting.condition.as_ref(), prev.conditions.first());
        assert!(waiting.events.is_empty());
        assert_eq!(waiting.wake, Some(t(12)));
        // A refusal needs no reports to be said.
        let refused = run(&Reports::NotSynced, &prev, Some("refused"), 10);
        assert_eq!(refused.condition.unwrap().reason, "RestartRefused");
    }

    #[test]
    fn restarts_are_refused_by_the_current_tokens_lifetime_or_else_the_validity() {
        let with = |validity: &str, targets: usize| {
            let mut spec = ScgTokenSpec::new("c");
            spec.validity = validity.into();
            spec.consumers = Some(ConsumersSpec {
                rollout_restart_targets: (0..targets)
                    .map(|i| RolloutRestartTarget {
                        kind: RestartKind::Deployment,
                        name: format!("web-{i}"),
                    })
                    .collect(),
                ..ConsumersSpec::default()
            });
            spec
        };
        let none = ScgTokenStatus::default();
        assert_eq!(refusal(&with("60s", 0), &none, 7, t(0)), None);
        let r = refusal(&with("60s", 1), &none, 7, t(0)).unwrap();
        assert!(r.contains("tokens live 60s"), "{r}");
        assert_eq!(refusal(&with("24h", 1), &none, 7, t(0)), None);
        // The API returned a shorter lifetime than asked for: that is what counts.
        let short = ScgTokenStatus {
            last_refresh_at: Some(Time(t(0))),
            expires_at: Some(Time(t(300))),
            ..ScgTokenStatus::default()
        };
        let r = refusal(&with("24h", 1), &short, 7, t(0)).unwrap();
        assert!(r.contains("tokens live 300s"), "{r}");
        // Refreshed too often although long-lived: a 90% margin on 40 minutes.
        let mut spec = with("40m", 1);
        spec.refresh_before_percentage = Some(90);
        let r = refusal(&spec, &none, 7, t(0)).unwrap();
        assert!(r.contains("refreshed every 240s"), "{r}");
    }
}
