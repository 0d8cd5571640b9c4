//! The refresh reconciler: reads the chain, asks [`policy`] what to do, calls the API,
//! stores the token, reports. It orchestrates; every rule lives in the modules it calls.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    core::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder},
        reflector::{ObjectRef, Store, store::Writer},
        watcher,
    },
};
use tracing::{Instrument, info, info_span, warn};

mod act;
mod memory;

use memory::{Key, Memory};

use crate::{
    Error,
    chain::{self, Chain, LoadError, Target},
    crd::{REFRESH_REQUEST_ANNOTATION, ScgToken, ScgTokenStatus},
    k8s,
    leader::Leadership,
    policy::{
        self, Cleared, Clock, Decision, Facts, FailureKind, Footing, Inputs, Stop, TokenTimes,
        Unloaded,
    },
    report::{self, Metrics, Reason, RefreshLabels, TokenLabels},
    scg::{Endpoint, RefreshError, RefreshRequest, TokenApi},
};

/// Field manager of the operator's status writes.
pub const FIELD_MANAGER: &str = "scg-token-operator";
/// At most one `Refreshed` Event per token in this interval; short lifetimes must not
/// flood the API with Events. Failures and recoveries are always reported.
pub const REFRESHED_EVENT_INTERVAL: Duration = Duration::from_secs(600);

/// Everything a reconcile needs; tests build it with fakes.
pub struct Context {
    pub client: kube::Client,
    pub token_api: Arc<dyn TokenApi>,
    pub clock: Arc<dyn Clock>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub leadership: Leadership,
    /// Accept `http://` endpoints (tests and local trials only).
    pub allow_insecure: bool,
    /// The controller's cache of ScgTokens, to spot two of them sharing one chain.
    tokens: Store<ScgToken>,
    memory: Memory,
}

/// What a [`Context`] is built from.
pub struct Deps {
    pub client: kube::Client,
    /// The SCG refresh API.
    pub token_api: Arc<dyn TokenApi>,
    pub clock: Arc<dyn Clock>,
    /// Publishes the Events.
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub leadership: Leadership,
    /// Accept `http://` endpoints (tests and local trials only).
    pub allow_insecure: bool,
    /// The ScgToken cache; its writer goes to [`controller`], which fills it.
    pub tokens: Store<ScgToken>,
}

impl Context {
    /// A context with nothing in memory, as a newly started process has.
    pub fn new(deps: Deps) -> Self {
        let Deps {
            client,
            token_api,
            clock,
            recorder,
            metrics,
            leadership,
            allow_insecure,
            tokens,
        } = deps;
        Context {
            client,
            token_api,
            clock,
            recorder,
            metrics,
            leadership,
            allow_insecure,
            tokens,
            memory: Memory::default(),
        }
    }

    /// The oldest other ScgToken in the same namespace that uses the same credentials
    /// Secret: two refreshers of one chain would revoke each other's tokens, so only the
    /// oldest may run.
    fn chain_owner_other_than(&self, obj: &ScgToken) -> Option<String> {
        let age = |t: &ScgToken| {
            (
                t.metadata.creation_timestamp.clone().map(|c| c.0),
                t.name_any(),
            )
        };
        self.tokens
            .state()
            .iter()
            .filter(|t| {
                t.metadata.namespace == obj.metadata.namespace
                    && t.metadata.deletion_timestamp.is_none()
                    && t.spec.credentials_secret_ref.name == obj.spec.credentials_secret_ref.name
                    && age(t) < age(obj)
            })
            .min_by_key(|t| age(t))
            .map(|t| t.name_any())
    }

    /// Writes every token still held in memory, retrying each second until `within`
    /// has passed. Called on shutdown after the last pass, before the Lease is released.
    pub async fn flush_pending(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let pending = self.memory.all_pending();
            if pending.is_empty() {
                return;
            }
            for (key, held) in pending {
                let span = info_span!("flush", namespace = %key.namespace, scgtoken = %key.name);
                self.flush_one(&key, &held).instrument(span).await;
            }
            if Instant::now() >= deadline {
                warn!("shutting down with a token still held in memory");
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn flush_one(&self, key: &Key, held: &Chain) {
        // Only the write: no refresh call may start during shutdown.
        let tokens: Api<ScgToken> = Api::namespaced(self.client.clone(), &key.namespace);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &key.namespace);
        let Ok(Some(obj)) = k8s::bounded(tokens.get_opt(&key.name)).await else {
            return;
        };
        let Ok(target) = chain::load_target(&secrets, &obj).await else {
            return;
        };
        match act::store_held(self, &obj, target.owned(), held).await {
            Ok(_) | Err(chain::PersistError::Superseded(_)) => {}
            Err(e) => warn!(error = %e, "could not store the token held in memory"),
        }
    }

    /// Whether a token received but not yet stored is held for this chain.
    pub fn has_pending(&self, namespace: &str, name: &str) -> bool {
        self.memory.pending(&Key::new(namespace, name)).is_some()
    }

    /// Whether a `Refreshed` Event may be published now (and records that it was).
    fn refreshed_event_due(&self, key: &Key, now: Timestamp) -> bool {
        let interval = SignedDuration::try_from(REFRESHED_EVENT_INTERVAL).unwrap_or_default();
        match self.memory.refreshed_event_at(key) {
            Some(last) if last + interval > now => false,
            _ => {
                self.memory.set_refreshed_event_at(key, now);
                true
            }
        }
    }
}

/// Reconciles one ScgToken.
pub async fn reconcile(obj: Arc<ScgToken>, ctx: Arc<Context>) -> Result<Action, Error> {
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
        Some(obj) => Pass::new(&obj, ctx, namespace, name).run().await,
        None => {
            ctx.memory
                .forget(&Key::new(namespace.clone(), name.clone()));
            ctx.metrics.forget(&TokenLabels { namespace, name });
            Ok(Action::await_change())
        }
    }
}

/// Requeue after a failed pass. A token waiting to be stored is retried quickly.
pub fn error_policy(obj: Arc<ScgToken>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(
        namespace = obj.namespace().unwrap_or_default(),
        name = obj.name_any(),
        error = %error,
        "reconcile failed"
    );
    let pending = ctx.has_pending(&obj.namespace().unwrap_or_default(), &obj.name_any());
    Action::requeue(if pending {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    })
}

/// One reconcile pass over one ScgToken.
struct Pass<'a> {
    obj: &'a ScgToken,
    ctx: &'a Context,
    key: Key,
    secrets: Api<Secret>,
    now: Timestamp,
    prev: ScgTokenStatus,
    next: ScgTokenStatus,
    events: Vec<Event>,
}

impl<'a> Pass<'a> {
    fn new(obj: &'a ScgToken, ctx: &'a Context, namespace: String, name: String) -> Self {
        let prev = obj.status.clone().unwrap_or_default();
        let mut next = prev.clone();
        next.observed_generation = obj.metadata.generation;
        next.target_secret = Some(obj.target_name());
        Pass {
            obj,
            ctx,
            secrets: Api::namespaced(ctx.client.clone(), &namespace),
            key: Key::new(namespace, name),
            now: ctx.clock.now(),
            prev,
            next,
            events: Vec::new(),
        }
    }

    async fn run(mut self) -> Result<Action, Error> {
        let mut target = chain::load_target(&self.secrets, self.obj).await?;
        // A token received earlier and not yet stored goes first, whatever else has
        // changed (spec, suspension, credentials): nothing happens until it is safe.
        if let Some(pending) = self.ctx.memory.pending(&self.key) {
            match act::store_held(self.ctx, self.obj, target.owned(), &pending).await {
                Ok(written) => target = Target::Owned(Box::new(written)),
                Err(chain::PersistError::Superseded(_)) => {
                    target = chain::load_target(&self.secrets, self.obj).await?;
                }
                Err(e) => return self.pending(e).await,
            }
        }
        let chain_owner = self.ctx.chain_owner_other_than(self.obj);
        let target_name = self.obj.target_name();
        let credentials = chain::load_credentials(&self.secrets, self.obj)
            .await
            .map_err(|e| match e {
                LoadError::Missing(message) => Unloaded::Missing(message),
                LoadError::Kube(e) => Unloaded::Unreadable(e),
            });
        let facts = Facts {
            now: self.now,
            deleting: self.obj.metadata.deletion_timestamp.is_some(),
            leader: self.ctx.leadership.is_leader(),
            spec: &self.obj.spec,
            endpoint: Endpoint::parse(&self.obj.spec.endpoint, self.ctx.allow_insecure),
            chain_owner: chain_owner.as_deref(),
            target_name: &target_name,
            target_foreign: matches!(target, Target::Foreign),
            credentials,
        };
        let Cleared {
            settings,
            endpoint,
            credentials,
        } = match policy::gates(facts) {
            Ok(cleared) => cleared,
            Err(Stop::Idle) => {
                self.ctx.memory.forget(&self.key);
                return Ok(Action::await_change());
            }
            Err(Stop::Blocked(b)) => {
                self.next.next_refresh_at = None;
                return self.finish(b.reason, b.message, b.recheck).await;
            }
            Err(Stop::Unreadable(e)) => return Err(Error::Kube(e)),
        };
        let mut base = target.owned().cloned();
        let seed_fingerprint = chain::fingerprint(self.obj, credentials.seed.expose());

        let stored = base.as_ref().and_then(|s| chain::stored_chain(s, self.obj));
        let remembered = self.ctx.memory.chain(&self.key);
        let mut rotated = false;
        let current = match policy::footing(&seed_fingerprint, stored, remembered) {
            Footing::Stored(c) => {
                if let Some(s) = &base
                    && let Some(written) =
                        chain::sync_metadata(&self.secrets, self.obj, s, &c).await?
                {
                    base = Some(written);
                }
                c
            }
            Footing::Restore(remembered) => {
                info!(
                    secret = self.obj.target_name(),
                    "restoring the target Secret from memory"
                );
                match act::store_held(self.ctx, self.obj, base.as_ref(), &remembered).await {
                    Ok(written) => base = Some(written),
                    Err(e) => return self.pending(e).await,
                }
                remembered
            }
            Footing::Seed { rotated: r } => {
                rotated = r;
                Chain {
                    token: credentials.seed.clone(),
                    times: TokenTimes::default(),
                    seed_fingerprint: seed_fingerprint.clone(),
                }
            }
        };

        let attempt_fingerprint = inputs_fingerprint(self.obj, &credentials, &current);
        let request = self
            .obj
            .annotations()
            .get(REFRESH_REQUEST_ANNOTATION)
            .cloned();
        let requested = policy::requested(
            request.as_deref(),
            self.prev.last_refresh_request.as_deref(),
            self.ctx.memory.handled_request(&self.key).as_deref(),
        );
        let inputs_changed = self.obj.metadata.generation != self.prev.observed_generation
            || self.prev.credentials_fingerprint.as_ref() != Some(&attempt_fingerprint);
        let jitter_key = policy::jitter_key(&self.obj.uid().unwrap_or_default());
        self.next.credentials_fingerprint = Some(attempt_fingerprint);
        self.show_chain(&current);

        let decision = policy::decide(&Inputs {
            now: self.now,
            settings: &settings,
            token: current.times,
            failures: self.prev.consecutive_failures,
            retry_at: self.prev.next_refresh_at.as_ref().map(|t| t.0),
            inputs_changed,
            requested,
            jitter_key,
        });
        if let Decision::Wait(until) = decision {
            return self.wait(&current, until).await;
        }

        if !self.ctx.leadership.confirm(self.ctx.clock.now()).await {
            warn!("not refreshing: the leader lease is not held with a safe margin");
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        if requested {
            info!("refresh requested by annotation");
            self.ctx
                .memory
                .set_handled_request(&self.key, request.clone());
            self.next.last_refresh_request = request;
        }
        // The token's life starts no later than the request leaves: an expiry computed
        // from the answer's arrival would be late by the call's duration.
        let sent_at = self.ctx.clock.now();
        let call_started = Instant::now();
        let result = self
            .ctx
            .token_api
            .refresh(&RefreshRequest {
                endpoint: &endpoint,
                consumer_key: &credentials.consumer_key,
                consumer_secret: &credentials.consumer_secret,
                old_token: &current.token,
                validity: settings.validity,
                headers: &credentials.headers,
                timeout: settings.timeout,
            })
            .await;
        self.ctx
            .metrics
            .refresh_duration
            .observe(call_started.elapsed().as_secs_f64());
        let refreshed = match result {
            Ok(r) => r,
            Err(e) => return self.failed(e, &current, jitter_key).await,
        };
        self.count_refresh("success");
        // The call succeeded: whatever happens to the write, the failure streak is over.
        let failures = self.prev.consecutive_failures;
        self.next.consecutive_failures = 0;
        let issued_at = sent_at;
        // A lifetime of zero means a token that does not expire: schedule it by the
        // requested validity anyway, so it keeps being rotated.
        let lifetime = if refreshed.lifetime.is_zero() {
            settings.validity
        } else {
            refreshed.lifetime
        };
        let new = Chain {
            token: refreshed.token,
            times: TokenTimes {
                issued_at: Some(issued_at),
                expires_at: Some(
                    SignedDuration::try_from(lifetime)
                        .ok()
                        .and_then(|d| issued_at.checked_add(d).ok())
                        .unwrap_or(Timestamp::MAX),
                ),
            },
            seed_fingerprint,
        };
        // From here on the old token may be dead: the new one is the chain.
        self.ctx.memory.hold(&self.key, new.clone());
        match chain::persist(&self.secrets, self.obj, base.as_ref(), &new).await {
            Ok(_) => self.ctx.memory.stored(&self.key, new.clone()),
            Err(e) => {
                self.show_chain(&new);
                return self.pending(e).await;
            }
        }
        info!(
            expires_at = %new.times.expires_at.unwrap_or(issued_at),
            "token refreshed and stored"
        );

        self.next.credentials_fingerprint = Some(inputs_fingerprint(self.obj, &credentials, &new));
        self.show_chain(&new);
        let due = policy::next_refresh(&settings, new.times, jitter_key);
        self.next.next_refresh_at = due.map(Time);
        if rotated {
            self.event(EventType::Normal, "SeedRotated", "a new seed token was found in the credentials Secret; started a new token chain from it".into());
        }
        if failures > 0 {
            self.event(
                EventType::Normal,
                "Recovered",
                format!("token refreshed after {failures} failed attempts"),
            );
        }
        if self.ctx.refreshed_event_due(&self.key, self.now) {
            let msg = format!(
                "token refreshed into Secret {:?}; valid for {}s",
                self.obj.target_name(),
                lifetime.as_secs()
            );
            self.event(EventType::Normal, "Refreshed", msg);
        }
        let msg = self.valid_message(&new, due);
        self.finish(Reason::Refreshed, msg, due).await
    }

    /// Nothing due: make status show the chain and sleep until `until`.
    async fn wait(mut self, current: &Chain, until: Timestamp) -> Result<Action, Error> {
        self.next.next_refresh_at = Some(Time(until));
        let expires_at = current.times.expires_at;
        let expired = expires_at.is_some_and(|e| e <= self.now);
        let failing = self.prev.consecutive_failures > 0;
        let (reason, msg) = match self.prev_ready() {
            _ if expired => (
                Reason::Expired,
                format!(
                    "the token expired at {}; next attempt at {until}",
                    expires_at.unwrap_or(self.now)
                ),
            ),
            Some((reason, msg)) if failing && reason != Reason::Expired => (reason, msg),
            _ => (Reason::Refreshed, self.valid_message(current, Some(until))),
        };
        // Wake up at expiry too, so the condition says Expired on time.
        let wake = expires_at
            .filter(|e| *e > self.now && *e < until)
            .unwrap_or(until);
        self.finish(reason, msg, Some(wake)).await
    }

    /// The refresh call failed: back off by kind, capped by the expiry.
    async fn failed(
        mut self,
        e: RefreshError,
        current: &Chain,
        jitter_key: u64,
    ) -> Result<Action, Error> {
        self.count_refresh(e.label());
        // Back off from the failure's end, not the pass's start (a timeout takes a while).
        let now = self.ctx.clock.now();
        let (kind, reason) = match &e {
            RefreshError::Rejected { .. } => (FailureKind::Rejected, Reason::Rejected),
            RefreshError::RateLimited { retry_after } => (
                FailureKind::Unavailable {
                    retry_after: *retry_after,
                },
                Reason::Unavailable,
            ),
            RefreshError::InvalidResponse(_) => (
                FailureKind::Unavailable { retry_after: None },
                Reason::InvalidResponse,
            ),
            RefreshError::Unavailable { .. }
            | RefreshError::Timeout(_)
            | RefreshError::Transport(_) => (
                FailureKind::Unavailable { retry_after: None },
                Reason::Unavailable,
            ),
        };
        let failures = self.prev.consecutive_failures.saturating_add(1);
        let expires_at = current.times.expires_at;
        let retry = policy::retry_at(now, kind, failures, expires_at, jitter_key);
        let expired = expires_at.is_some_and(|t| t <= now);
        let validity = match expires_at {
            Some(t) if expired => format!("the token expired at {t}"),
            Some(t) => format!("the current token stays valid until {t}"),
            None => "the seed token's expiry is unknown".into(),
        };
        let msg = format!("{e}; attempt {failures} failed, next at {retry}; {validity}");
        warn!(error = %e, failures, retry_at = %retry, "refresh failed");
        self.next.consecutive_failures = failures;
        self.next.last_failure_at = Some(Time(now));
        self.next.next_refresh_at = Some(Time(retry));
        let reason = if expired { Reason::Expired } else { reason };
        self.finish(reason, msg, Some(retry)).await
    }

    /// A token is held in memory because the target Secret could not be written.
    async fn pending(self, e: chain::PersistError) -> Result<Action, Error> {
        let msg =
            format!("a new token was received and is held in memory until it can be stored: {e}");
        warn!(error = %e, "could not store the new token; holding it in memory");
        // Best effort: the API server may be the thing that is failing.
        let _ = self.finish(Reason::Pending, msg, None).await;
        Err(Error::Persist(e))
    }

    fn valid_message(&self, chain: &Chain, next: Option<Timestamp>) -> String {
        match (chain.times.expires_at, next) {
            (Some(e), Some(n)) => format!("token valid until {e}; next refresh at {n}"),
            (Some(e), None) => format!("token valid until {e}"),
            _ => "the seed token is being refreshed".into(),
        }
    }

    fn show_chain(&mut self, chain: &Chain) {
        self.next.expires_at = chain.times.expires_at.map(Time);
        self.next.last_refresh_at = chain.times.issued_at.map(Time);
        self.next.token_fingerprint = Some(chain::fingerprint(self.obj, chain.token.expose()));
    }

    fn prev_ready(&self) -> Option<(Reason, String)> {
        let c = self.obj.ready_condition()?;
        Some((c.reason.parse().ok()?, c.message.clone()))
    }

    fn count_refresh(&self, result: &'static str) {
        self.ctx
            .metrics
            .refreshes
            .get_or_create(&RefreshLabels {
                namespace: self.key.namespace.clone(),
                name: self.key.name.clone(),
                result,
            })
            .inc();
    }

    fn event(&mut self, type_: EventType, reason: &str, note: String) {
        self.events.push(Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Refresh".into(),
            secondary: None,
        });
    }

    /// Sets `Ready`, writes status if it changed, publishes Events on transitions and
    /// updates metrics. Requeues at `wake`, or waits for a change.
    async fn finish(
        mut self,
        reason: Reason,
        message: String,
        mut wake: Option<Timestamp>,
    ) -> Result<Action, Error> {
        let previous = self.obj.ready_condition();
        if previous.map(|c| c.reason.as_str()) != Some(reason.as_str()) {
            let type_ = match reason {
                Reason::Refreshed | Reason::Suspended => EventType::Normal,
                _ => EventType::Warning,
            };
            // Successes are announced by Refreshed/Recovered above.
            if reason != Reason::Refreshed {
                self.event(type_, reason.as_str(), message.clone());
            } else if previous.is_some_and(|c| c.reason == Reason::Suspended.as_str()) {
                self.event(type_, "Resumed", "refreshing resumed".into());
            }
        }
        self.next.conditions = vec![report::ready_condition(
            previous,
            reason,
            message,
            self.obj.metadata.generation,
            self.now,
        )];
        let labels = TokenLabels {
            namespace: self.key.namespace.clone(),
            name: self.key.name.clone(),
        };
        self.ctx.metrics.set_token(
            &labels,
            self.next.expires_at.as_ref().map(|t| t.0),
            self.next.next_refresh_at.as_ref().map(|t| t.0),
            reason.is_ready(),
            self.next.consecutive_failures,
        );
        // Compare as serialized: Kubernetes times have whole-second precision, so an
        // instant computed to the millisecond equals its stored form only this way.
        if serde_json::to_value(&self.next).ok() != serde_json::to_value(&self.prev).ok() {
            let api: Api<ScgToken> = Api::namespaced(self.ctx.client.clone(), &self.key.namespace);
            let patch = serde_json::json!({
                "apiVersion": ScgToken::api_version(&()),
                "kind": ScgToken::kind(&()),
                "status": self.next,
            });
            let written = k8s::bounded(api.patch_status(
                &self.key.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(patch),
            ))
            .await;
            if let Err(e) = written {
                // The schedule computed here still holds (a back-off is not cut short);
                // without one, try again soon so the status catches up.
                warn!(error = %k8s::describe(&e), "could not write status");
                wake = wake.or(Some(self.now + SignedDuration::from_secs(5)));
            }
        }
        let reference = self.obj.object_ref(&());
        for event in &self.events {
            if let Err(e) = self.ctx.recorder.publish(event, &reference).await {
                warn!(error = %e, reason = event.reason, "could not publish an Event");
            }
        }
        Ok(match wake {
            Some(at) => Action::requeue(
                self.ctx
                    .clock
                    .now()
                    .duration_until(at)
                    .try_into()
                    .unwrap_or(Duration::ZERO),
            ),
            None => Action::await_change(),
        })
    }
}

/// Fingerprint of what a refresh attempt sends: when it changes, a human changed the
/// credentials or the seed, and a back-off no longer applies.
fn inputs_fingerprint(obj: &ScgToken, credentials: &chain::Credentials, current: &Chain) -> String {
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

/// The ScgTokens in `store` that name `secret` (as credentials, headers or target).
fn referencing(
    store: &Store<ScgToken>,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<ScgToken>> {
    let (Some(ns), Some(name)) = (&secret.metadata.namespace, &secret.metadata.name) else {
        return Vec::new();
    };
    store
        .state()
        .iter()
        .filter(|t| t.metadata.namespace.as_ref() == Some(ns))
        .filter(|t| {
            let s = &t.spec;
            s.credentials_secret_ref.name == *name
                || s.headers_from.as_ref().is_some_and(|h| h.name == *name)
                || t.target_name() == *name
        })
        .map(|t| ObjectRef::from_obj(t.as_ref()))
        .collect()
}

/// The controller: ScgTokens, plus a metadata-only watch of Secrets (never their data)
/// mapped to the ScgTokens that reference them. `tokens` fills the context's ScgToken
/// cache. Runs until `shutdown` resolves, letting in-flight reconciles (and so any
/// refresh and its Secret write) finish.
pub fn controller(
    ctx: Arc<Context>,
    tokens: Writer<ScgToken>,
    namespace: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ready: impl FnOnce() + Send + 'static,
) -> impl Stream<Item = ()> {
    let client = ctx.client.clone();
    let (token_api, secrets): (Api<ScgToken>, Api<PartialObjectMeta<Secret>>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    // The ScgToken reflector is built here rather than by the Controller so that its
    // first complete list (InitDone) can mark the operator ready.
    let store = ctx.tokens.clone();
    let mut ready = Some(ready);
    let token_events = watcher(token_api, watcher::Config::default())
        .default_backoff()
        .reflect(tokens)
        .inspect(move |event| {
            if let Ok(watcher::Event::InitDone) = event
                && let Some(ready) = ready.take()
            {
                ready();
            }
        })
        .applied_objects();
    let ctrl = Controller::for_stream(token_events, store.clone());
    let secret_events = watcher(secrets, watcher::Config::default())
        .default_backoff()
        .touched_objects();
    let mut ctrl = ctrl.watches_stream(secret_events, move |s| referencing(&store, &s));
    if let Some(mut rx) = ctx.leadership.changes() {
        let became_leader = async_stream(move |tx| async move {
            while rx.changed().await.is_ok() {
                if *rx.borrow_and_update() && tx.send(()).is_err() {
                    break;
                }
            }
        });
        ctrl = ctrl.reconcile_all_on(became_leader);
    }
    ctrl.graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .filter_map(|r| async move {
            if let Err(e) = r {
                warn!(error = %e, "controller");
            }
            Some(())
        })
}

/// A stream fed by a task through an unbounded channel.
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = ()> + Send
where
    F: FnOnce(tokio::sync::mpsc::UnboundedSender<()>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(f(tx));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}
