//! Controller wiring: the ScgToken and Secret watches that trigger passes.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Secret};
use kube::{
    Api,
    core::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt,
        reflector::{ObjectRef, Store, store::Writer},
        watcher,
    },
};
use tracing::warn;

use super::{Context, consumers, error_policy, reconcile};
use crate::crd::ScgToken;

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
/// mapped to the ScgTokens that reference them, and with `leases` (the writer of the
/// cache given to [`Context::with_consumer_reports`]) a watch of the token agents'
/// report Leases. `tokens` fills the context's ScgToken cache. Runs until `shutdown`
/// resolves, letting in-flight reconciles (and so any refresh and its Secret write)
/// finish.
pub fn controller(
    ctx: Arc<Context>,
    tokens: Writer<ScgToken>,
    leases: Option<Writer<Lease>>,
    namespace: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ready: impl FnOnce() + Send + 'static,
) -> impl Stream<Item = ()> {
    let client = ctx.client.clone();
    let lease_api: Api<Lease> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
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
