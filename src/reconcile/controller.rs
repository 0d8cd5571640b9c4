//! Controller wiring: the ScgToken and Secret watches that trigger passes.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Secret};
use kube::{
    Api, ResourceExt,
    core::PartialObjectMeta,
    runtime::{
        Controller, PredicateConfig, WatchStreamExt,
        controller::Config,
        reflector::{ObjectRef, store::Writer},
        watcher,
    },
};
use tracing::warn;

use super::{
    Context,
    cache::{CachedScgToken, TokenCacheWriter},
    consumers, error_policy,
    memory::Key,
    reconcile,
};
use crate::crd::REFRESH_REQUEST_ANNOTATION;

/// The ScgTokens that name `secret` (as credentials, headers or target), except one whose
/// target this is and that wrote exactly this version itself: that pass has already
/// seen it.
fn referencing(
    ctx: &Context,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<CachedScgToken>> {
    let (Some(ns), Some(name)) = (&secret.metadata.namespace, &secret.metadata.name) else {
        return Vec::new();
    };
    let mut refs = ctx.tokens.referencing(ns, name);
    refs.retain(|r| {
        !ctx.memory
            .is_own_write(&Key::new(ns.as_str(), r.name.as_str()), &secret.metadata)
    });
    refs
}

/// What in an ScgToken event can ask for a pass: its identity, its spec (generation),
/// the refresh-request annotation and deletion. A status write (this operator's own,
/// after every pass) or a relist of unchanged objects starts none; the schedule keeps
/// its own requeue.
fn wants_pass(token: &CachedScgToken) -> Option<u64> {
    let mut h = DefaultHasher::new();
    (
        &token.metadata.uid,
        token.metadata.generation,
        token.annotations().get(REFRESH_REQUEST_ANNOTATION),
        token.metadata.deletion_timestamp.is_some(),
    )
        .hash(&mut h);
    Some(h.finish())
}

/// How the controller is wired.
pub struct Wiring {
    /// Fills the context's ScgToken cache ([`super::token_cache`]).
    pub tokens: TokenCacheWriter,
    /// With consumer reports, the writer of the Lease cache given to
    /// [`Context::with_consumer_reports`].
    pub leases: Option<Writer<Lease>>,
    /// Watch one namespace only; `None` watches all.
    pub namespace: Option<String>,
    /// Most passes at once (each holds at most one Kubernetes and one SCG connection).
    pub concurrency: u16,
}

/// The controller: ScgTokens, plus a metadata-only watch of Secrets (never their data)
/// mapped to the ScgTokens that reference them, and with `wiring.leases` a watch of the
/// token agents' report Leases. Runs until `shutdown` resolves, letting in-flight
/// reconciles (and so any refresh and its Secret write) finish.
pub fn controller(
    ctx: Arc<Context>,
    wiring: Wiring,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ready: impl FnOnce() + Send + 'static,
) -> impl Stream<Item = ()> {
    let Wiring {
        tokens,
        leases,
        namespace,
        concurrency,
    } = wiring;
    let client = ctx.client.clone();
    let lease_api: Api<Lease> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (token_api, secrets): (Api<CachedScgToken>, Api<PartialObjectMeta<Secret>>) =
        match &namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client, ns),
            ),
            None => (Api::all(client.clone()), Api::all(client)),
        };
    // The ScgToken reflector is built here rather than by the Controller so that its
    // first complete list (InitDone) can mark the operator ready, and so that the
    // Secret index follows it.
    let store = ctx.tokens.store().clone();
    let (tokens, index) = tokens.split();
    let mut ready = Some(ready);
    let token_events = watcher(token_api, watcher::Config::default())
        .default_backoff()
        // Nothing reads them (see CachedScgToken).
        .modify(|t| t.managed_fields_mut().clear())
        .inspect(move |event| {
            if let Ok(event) = event {
                index.apply(event);
            }
        })
        .reflect(tokens)
        .inspect(move |event| {
            if let Ok(watcher::Event::InitDone) = event
                && let Some(ready) = ready.take()
            {
                ready();
            }
        })
        .applied_objects()
        .predicate_filter(wants_pass, PredicateConfig::default());
    let ctrl = Controller::for_stream(token_events, store)
        .with_config(Config::default().concurrency(concurrency));
    let secret_events = watcher(secrets, watcher::Config::default())
        .default_backoff()
        .touched_objects();
    let mapper = ctx.clone();
    let mut ctrl = ctrl.watches_stream(secret_events, move |s| referencing(&mapper, &s));
    if let Some(writer) = leases {
        let changes = consumers::report_changes(lease_api, writer, ctx.reports.clone());
        ctrl = ctrl.watches_stream(changes, consumers::scgtoken_of);
    }
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
