//! The reconciler's state: the services a pass uses, the ScgToken cache, and memory.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, ResourceExt,
    runtime::reflector::{self, store::Writer},
};
use tracing::{Instrument, info_span, warn};

use super::{
    act,
    cache::TokenCache,
    consumers::ReportCache,
    memory::{Key, Memory},
};
use crate::{
    access::{AllowedEndpoints, CredentialsPolicy},
    budget::{Budget, TokioTimer},
    chain::{self, Chain},
    crd::ScgToken,
    events::Publisher,
    k8s,
    leader::Leadership,
    policy::Clock,
    report::Metrics,
    scg::TokenApi,
};

/// Everything a reconcile needs; tests build it with fakes.
pub struct Context {
    pub client: kube::Client,
    pub token_api: Arc<dyn TokenApi>,
    pub clock: Arc<dyn Clock>,
    pub events: Publisher,
    pub metrics: Arc<Metrics>,
    pub leadership: Leadership,
    /// Accept `http://` endpoints (tests and local trials only).
    pub allow_insecure: bool,
    /// The hosts refresh calls may go to (`--allowed-endpoints`).
    pub allowed_endpoints: AllowedEndpoints,
    /// What to do with a credentials Secret that is not opted in.
    pub credentials_policy: CredentialsPolicy,
    /// Every refresh call takes its turn here: the shared rate and `Retry-After` pauses.
    pub budget: Budget,
    /// The controller's cache of ScgTokens, to spot two of them sharing one chain.
    pub(super) tokens: TokenCache,
    pub(super) memory: Memory,
    /// The token agents' reports (`--consumer-reports`).
    pub(super) reports: Arc<ReportCache>,
}

/// What a [`Context`] is built from.
pub struct Deps {
    pub client: kube::Client,
    /// The SCG refresh API.
    pub token_api: Arc<dyn TokenApi>,
    pub clock: Arc<dyn Clock>,
    /// Publishes the Events.
    pub events: Publisher,
    pub metrics: Arc<Metrics>,
    pub leadership: Leadership,
    /// Accept `http://` endpoints (tests and local trials only).
    pub allow_insecure: bool,
    /// The hosts refresh calls may go to (`--allowed-endpoints`).
    pub allowed_endpoints: AllowedEndpoints,
    /// What to do with a credentials Secret that is not opted in.
    pub credentials_policy: CredentialsPolicy,
    /// The ScgToken cache ([`token_cache`](super::token_cache)); its writer goes to
    /// [`controller`](super::controller), which fills it.
    pub tokens: TokenCache,
}

impl Context {
    /// A context with nothing in memory, as a newly started process has, and a budget
    /// without a rate limit (429 pauses still apply); see [`Context::with_budget`].
    pub fn new(deps: Deps) -> Self {
        let Deps {
            client,
            token_api,
            clock,
            events,
            metrics,
            leadership,
            allow_insecure,
            allowed_endpoints,
            credentials_policy,
            tokens,
        } = deps;
        let budget = Budget::new(None, Arc::new(TokioTimer), &metrics);
        Context {
            client,
            token_api,
            clock,
            events,
            metrics,
            leadership,
            allow_insecure,
            allowed_endpoints,
            credentials_policy,
            budget,
            tokens,
            memory: Memory::default(),
            reports: Arc::default(),
        }
    }

    /// The same context, its refresh calls sharing `budget`.
    pub fn with_budget(self, budget: Budget) -> Self {
        Context { budget, ..self }
    }

    /// With `on`, aggregates the token agents' reports from a cache of their Leases, and
    /// returns the writer that fills it ([`controller`](super::controller) feeds it from a
    /// Lease watch). Without, `spec.consumers.agents` says that reports are disabled.
    pub fn with_consumer_reports(mut self, on: bool) -> (Self, Option<Writer<Lease>>) {
        if !on {
            return (self, None);
        }
        let (leases, writer) = reflector::store();
        self.reports = Arc::new(ReportCache::new(leases));
        (self, Some(writer))
    }

    /// The oldest other ScgToken in the same namespace that uses the same credentials
    /// Secret: two refreshers of one chain would revoke each other's tokens, so only the
    /// oldest may run.
    pub(super) fn chain_owner_other_than(&self, obj: &ScgToken) -> Option<String> {
        let age = |meta: &ObjectMeta| {
            (
                meta.creation_timestamp.clone().map(|c| c.0),
                meta.name.clone(),
            )
        };
        let namespace = obj.namespace().unwrap_or_default();
        self.tokens
            .sharing_credentials(&namespace, &obj.spec.credentials_secret_ref.name)
            .into_iter()
            .filter(|t| {
                t.metadata.deletion_timestamp.is_none() && age(&t.metadata) < age(&obj.metadata)
            })
            .min_by_key(|t| age(&t.metadata))
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
}
