//! The refresh reconciler. It orchestrates and owns no rule of its own; a pass reads
//! top-down:
//!
//! 1. store a token held in memory, if any (`act.rs`): nothing may come before it;
//! 2. `observe.rs`: every read, into one struct;
//! 3. [`policy::gates`], then [`policy::footing`] and [`policy::decide`]: pure decisions;
//! 4. `act.rs`: the writes the chosen footing implies, a turn in the shared rate budget
//!    ([`crate::budget`]), the refresh call, the store;
//! 5. `outcome.rs`: pure, from what happened to status, Events and the next wake-up;
//! 6. `publish.rs`: the one function that writes status and Events; before it,
//!    `consumers.rs` makes the writes a stored token asks for of its consumers (nudges,
//!    restarts) and adds their part (the agents' reports, aggregated) to the outcome.
//!
//! `memory.rs` keeps one entry per ScgToken between passes; [`controller`] wires the
//! watches.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Resource, ResourceExt, runtime::controller::Action};
use tracing::{Instrument, debug, info, info_span, warn};

mod act;
mod cache;
mod consumers;
mod context;
mod controller;
mod credentials;
mod memory;
mod observe;
mod outcome;
mod publish;

pub use cache::{CachedScgToken, TokenCache, TokenCacheWriter, token_cache};
pub use context::{Context, Deps};
pub use controller::{Wiring, controller};
pub use outcome::REFRESHED_EVENT_INTERVAL;
pub use publish::FIELD_MANAGER;

use act::Standing;
use memory::Key;
use outcome::{Attempt, Happened, Shown};

use crate::{
    Error,
    chain::{self, Chain, Credentials},
    crd::{ScgToken, ScgTokenStatus},
    k8s,
    policy::{self, Backoff, Cleared, Decision, FailureKind, Inputs, Settings, Stop},
    report::{self, TokenLabels},
    scg::{Endpoint, RefreshError},
};

/// Reconciles one ScgToken. Only `obj`'s namespace and name are used: the pass reads the
/// ScgToken afresh, so the controller hands over its [`CachedScgToken`] and tests a whole
/// one.
pub async fn reconcile<K: Resource>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let span = info_span!("reconcile", namespace = %namespace, scgtoken = %name);
    let result = fresh_pass(&ctx, namespace, name).instrument(span).await;
    ctx.metrics.reconciles.inc();
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        ctx.metrics
            .reconcile_errors
            .get_or_create(&report::ErrorLabels { error: e.label() })
            .inc();
    }
    result
}

/// Runs one pass on the ScgToken as the API server has it now. The controller's cached
/// copy can predate this process's own last status write (the watch event of a target
/// Secret it just wrote may trigger the next pass first), and acting on a stale status
/// would repeat a refresh; passes of one object never overlap, so a fresh read sees the
/// last pass's writes.
async fn fresh_pass(ctx: &Context, namespace: String, name: String) -> Result<Action, Error> {
    // A standby does nothing (becoming leader re-reconciles every ScgToken), except
    // store a token it received while it led: storing is not refreshing.
    if !ctx.leadership.is_leader() && !ctx.has_pending(&namespace, &name) {
        return Ok(Action::await_change());
    }
    let api: Api<ScgToken> = Api::namespaced(ctx.client.clone(), &namespace);
    match k8s::bounded(api.get_opt(&name)).await? {
        Some(obj) => Pass::new(&obj, ctx, Key::new(namespace, name)).run().await,
        None => {
            let key = Key::new(namespace.clone(), name.clone());
            ctx.reports.forget(&key);
            ctx.memory.forget(&key);
            ctx.metrics.forget(&TokenLabels { namespace, name });
            Ok(Action::await_change())
        }
    }
}

/// Requeue after a failed pass ([`policy::requeue_after_error`]).
pub fn error_policy(obj: Arc<CachedScgToken>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(
        namespace = obj.namespace().unwrap_or_default(),
        name = obj.name_any(),
        error = %error,
        "reconcile failed"
    );
    let pending = ctx.has_pending(&obj.namespace().unwrap_or_default(), &obj.name_any());
    let now = ctx.clock.now();
    let left = obj
        .status
        .as_ref()
        .and_then(|s| s.expires_at.as_ref())
        .map(|t| now.duration_until(t.0));
    Action::requeue(policy::requeue_after_error(pending, left))
}

/// One reconcile pass over one ScgToken.
struct Pass<'a> {
    obj: &'a ScgToken,
    ctx: &'a Context,
    key: Key,
    secrets: Api<Secret>,
    /// When the pass started.
    now: Timestamp,
    /// Status as read.
    prev: ScgTokenStatus,
    /// The agents' reports, from the Lease cache as the pass started.
    reports: consumers::Reports,
    /// The failure streak before this pass.
    backoff: Backoff,
    /// The Secrets used although not opted in, once read (`credentials.rs`).
    noted: credentials::Noted,
}

/// A refresh a pass is about to make.
struct Refresh {
    settings: Settings,
    endpoint: Endpoint,
    credentials: Credentials,
    standing: Standing,
    /// What status shows of the current chain.
    shown: Shown,
    /// The refresh-request annotation value honoured, if one asked for this refresh.
    request: Option<String>,
    jitter_key: u64,
}

impl<'a> Pass<'a> {
    fn new(obj: &'a ScgToken, ctx: &'a Context, key: Key) -> Self {
        Pass {
            obj,
            ctx,
            secrets: Api::namespaced(ctx.client.clone(), &key.namespace),
            backoff: backoff(ctx, &key, obj, ctx.clock.now()),
            key,
            now: ctx.clock.now(),
            prev: obj.status.clone().unwrap_or_default(),
            reports: consumers::read_reports(&ctx.reports, obj),
            noted: credentials::Noted::default(),
        }
    }

    async fn run(&self) -> Result<Action, Error> {
        debug!("pass started");
        let target = chain::load_target(&self.secrets, self.obj).await?;
        let target = self.store_pending(target).await?;
        let seen = self.observe(target).await;
        let cleared = match policy::gates(seen.facts) {
            Ok(cleared) => cleared,
            Err(Stop::Idle) => {
                self.ctx.memory.forget(&self.key);
                return Ok(Action::await_change());
            }
            Err(Stop::Blocked(b)) => return Ok(self.report(Happened::Blocked(b)).await),
            Err(Stop::Unreadable(e)) => return Err(Error::Kube(e)),
        };
        let standing = self
            .stand(seen.target, seen.remembered, &cleared.credentials.seed)
            .await?;
        let requested = policy::requested(
            seen.request.as_deref(),
            self.prev.last_refresh_request.as_deref(),
            seen.handled_request.as_deref(),
        );
        let request = seen.request.filter(|_| requested);
        self.refresh_if_due(cleared, standing, request).await
    }

    /// Decides; refreshes when due and this replica still holds the Lease.
    async fn refresh_if_due(
        &self,
        cleared: Cleared<Endpoint, Credentials>,
        standing: Standing,
        request: Option<String>,
    ) -> Result<Action, Error> {
        let Cleared {
            settings,
            endpoint,
            credentials,
        } = cleared;
        let attempt_fingerprint = inputs_fingerprint(self.obj, &credentials, &standing.chain);
        let inputs_changed = self.obj.metadata.generation != self.prev.observed_generation
            || self.prev.credentials_fingerprint.as_ref() != Some(&attempt_fingerprint);
        let jitter_key = policy::jitter_key(&self.obj.uid().unwrap_or_default());
        let shown = self.shown(&standing.chain, attempt_fingerprint);
        let decision = policy::decide(&Inputs {
            now: self.now,
            settings: &settings,
            token: standing.chain.times,
            failures: self.backoff.failures,
            retry_at: self.backoff.retry_at,
            inputs_changed,
            requested: request.is_some(),
            jitter_key,
        });
        if let Decision::Wait(until) = decision {
            return Ok(self.report(Happened::Waiting { shown, until }).await);
        }
        let expires_at = standing.chain.times.expires_at;
        if let Some(action) = self.take_turn(&endpoint, expires_at).await? {
            return Ok(action);
        }
        if !self.ctx.leadership.confirm(self.ctx.clock.now()).await {
            warn!("not refreshing: the leader lease is not held with a safe margin");
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        if request.is_some() {
            info!("refresh requested by annotation");
            self.ctx
                .memory
                .set_handled_request(&self.key, request.clone());
        }
        let refresh = Refresh {
            settings,
            endpoint,
            credentials,
            standing,
            shown,
            request,
            jitter_key,
        };
        self.refresh(refresh).await
    }

    /// Calls the API, stores the new token, reports.
    async fn refresh(&self, r: Refresh) -> Result<Action, Error> {
        let current = &r.standing.chain;
        let first_call = self.ctx.memory.chain(&self.key).is_none();
        debug!("sending the refresh call");
        let (sent_at, result) = self
            .call(&r.settings, &r.endpoint, &r.credentials, current)
            .await;
        let refreshed = match result {
            Ok(refreshed) => refreshed,
            Err(error) => return Ok(self.refresh_failed(r, error, first_call).await),
        };
        // From here until "stored" a kill loses the new token: the window is measured
        // from these two lines.
        debug!("refresh answered; storing the new token");
        let (times, lifetime) = policy::issued(sent_at, refreshed.lifetime, r.settings.validity);
        let new = Chain {
            token: refreshed.token,
            times,
            seed_fingerprint: current.seed_fingerprint.clone(),
        };
        if let Err(e) = self.store_new(r.standing.base.as_ref(), &new).await {
            let shown = self.shown(&new, r.shown.credentials_fingerprint);
            let received = Attempt {
                shown,
                request: r.request,
            };
            return Err(self.held_back(e, Some(received)).await);
        }
        info!(
            expires_at = %new.times.expires_at.unwrap_or(sent_at),
            "token refreshed and stored"
        );
        let due = policy::next_refresh(&r.settings, new.times, r.jitter_key);
        let shown = self.shown(&new, inputs_fingerprint(self.obj, &r.credentials, &new));
        let attempt = Attempt {
            shown,
            request: r.request,
        };
        let rotated = r.standing.rotated;
        let happened = Happened::Refreshed {
            attempt,
            lifetime,
            due,
            rotated,
        };
        Ok(self.report(happened).await)
    }

    /// The call failed: back off (the outcome says until when) and report.
    async fn refresh_failed(&self, r: Refresh, error: RefreshError, first_call: bool) -> Action {
        let at = self.ctx.clock.now();
        // Status shows the failure's class; the operator's log has the detail.
        let logged = error.detail();
        let out = self.outcome(Happened::Failed {
            attempt: Attempt {
                shown: r.shown,
                request: r.request,
            },
            error,
            at,
            jitter_key: r.jitter_key,
            first_call,
        });
        let failures = out.status.consecutive_failures;
        let retry_at = out.wake.unwrap_or(at);
        warn!(error = %logged, failures, retry_at = %retry_at, "refresh failed");
        self.publish(out).await
    }

    /// What status shows of `chain`.
    fn shown(&self, chain: &Chain, credentials_fingerprint: String) -> Shown {
        Shown {
            times: chain.times,
            token_fingerprint: chain::fingerprint(self.obj, chain.token.expose()),
            credentials_fingerprint,
        }
    }
}

/// The failure streak before a pass: as this process counted it, or, when it has not
/// (it started, or it leads again), resumed from the last status written
/// ([`policy::resumed_backoff`]). A count in memory that status contradicts is another
/// replica's older view and is dropped: status has moved on past it.
fn backoff(ctx: &Context, key: &Key, obj: &ScgToken, now: Timestamp) -> Backoff {
    let status = obj.status.clone().unwrap_or_default();
    let written = status.consecutive_failures;
    let remembered = ctx
        .memory
        .backoff(key)
        .filter(|b| b.failures >= written && (b.failures == 0) == (written == 0));
    if let Some(b) = remembered {
        return b;
    }
    let kind = match obj
        .ready_condition()
        .and_then(|c| c.reason.parse::<report::Reason>().ok())
    {
        Some(report::Reason::Rejected | report::Reason::ChainBroken) => FailureKind::Rejected,
        _ => FailureKind::Unavailable { retry_after: None },
    };
    let time =
        |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| t.as_ref().map(|t| t.0);
    policy::resumed_backoff(
        written,
        time(&status.last_failure_at),
        time(&status.next_refresh_at),
        kind,
        time(&status.expires_at),
        policy::jitter_key(&obj.uid().unwrap_or_default()),
        now,
    )
}

/// Fingerprint of what a refresh attempt sends: when it changes, a human changed the
/// credentials or the seed, and a back-off no longer applies.
fn inputs_fingerprint(obj: &ScgToken, credentials: &Credentials, current: &Chain) -> String {
    chain::fingerprint(
        obj,
        &format!(
            "{}\0{}\0{}",
            credentials.consumer_key.expose(),
            credentials.consumer_secret.expose(),
            current.token.expose()
        ),
    )
}
