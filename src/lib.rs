//! scg-token-operator: keeps Syniverse SCG access tokens fresh in Kubernetes Secrets.
//!
//! The road a refresh travels: a watch event reaches [`reconcile`], which reads the chain
//! ([`chain`]), asks [`policy`] whether it may go on and whether a refresh is due, calls
//! the API ([`scg`]), stores the new token ([`chain::persist`]) and reports ([`report`]).
//! [`k8s`] bounds every Kubernetes request in time.
#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod agent;
pub mod budget;
pub mod chain;
pub mod consumers;
pub mod crd;
pub mod events;
pub mod k8s;
pub mod leader;
pub mod plugin;
pub mod policy;
pub mod reconcile;
pub mod report;
pub mod scg;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use kube::runtime::events::Reporter;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::info;

/// Errors of a reconcile pass or of start-up. Messages never carry a secret.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", k8s::describe(.0))]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Persist(#[from] chain::PersistError),
    #[error("leader election: {0}")]
    Election(#[from] kube_lease_manager::LeaseManagerError),
    #[error("admin server: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Persist(_) => "persist",
            Error::Election(_) => "election",
            Error::Io(_) => "io",
        }
    }
}

/// How to run the operator.
pub struct Config {
    /// Watch one namespace only; `None` watches all.
    pub namespace: Option<String>,
    /// Accept `http://` endpoints (tests and local trials only).
    pub allow_insecure: bool,
    /// The hosts refresh calls may go to (`--allowed-endpoints`).
    pub allowed_endpoints: access::AllowedEndpoints,
    /// What to do with a credentials Secret that is not opted in.
    pub credentials_policy: access::CredentialsPolicy,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None` serves nothing.
    pub admin_addr: Option<SocketAddr>,
    /// Leader election; `None` makes this replica always lead.
    pub election: Option<leader::ElectionConfig>,
    /// Name of this replica in Events and the Lease.
    pub identity: String,
    pub token_api: Arc<dyn scg::TokenApi>,
    pub clock: Arc<dyn policy::Clock>,
    /// Most refresh calls across all ScgTokens; `None` sets no limit.
    pub max_refresh_rate: Option<budget::Rate>,
    /// Most reconcile passes at once.
    pub concurrent_reconciles: u16,
    /// Watch the token agents' report Leases for `spec.consumers.agents` (needs leases
    /// list/watch).
    pub consumer_reports: bool,
}

/// Runs the operator until `shutdown` resolves: then starts no new refresh, lets the one
/// in flight finish with its Secret write, releases the Lease and returns.
pub async fn run(
    client: kube::Client,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        info!("shutting down: no new refreshes; finishing the one in flight");
        stop_tx.send_replace(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let mut registry = Registry::default();
    let metrics = Arc::new(report::Metrics::register(&mut registry));
    let state = admin::State::new(registry);
    if let Some(addr) = config.admin_addr {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        info!(addr = %listener.local_addr()?, "admin server listening");
        tokio::spawn(admin::serve(listener, state.clone(), stopped()));
    }

    // The Lease is released only after the controller has finished its last refresh,
    // so a standby cannot start refreshing while this replica still is.
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let released = async move {
        let _ = release_rx.await;
    };
    let (leadership, election) = lead(&client, config.election, &metrics, released).await?;

    let reporter = Reporter {
        controller: "scg-token-operator".into(),
        instance: Some(config.identity.clone()),
    };
    let budget = refresh_budget(config.max_refresh_rate, &metrics, stopped());
    let (tokens, tokens_writer) = reconcile::token_cache();
    let (ctx, leases) = reconcile::Context::new(reconcile::Deps {
        client: client.clone(),
        token_api: config.token_api,
        clock: config.clock,
        events: events::Publisher::new(client, reporter),
        metrics,
        leadership,
        allow_insecure: config.allow_insecure,
        allowed_endpoints: config.allowed_endpoints,
        credentials_policy: config.credentials_policy,
        tokens,
    })
    .with_budget(budget)
    .with_consumer_reports(config.consumer_reports);
    let ctx = Arc::new(ctx);
    let wiring = reconcile::Wiring {
        tokens: tokens_writer,
        leases,
        namespace: config.namespace,
        concurrency: config.concurrent_reconciles,
    };
    control(ctx.clone(), wiring, &state, stopped).await;
    // A token received in the last pass whose write failed is still ours to store.
    ctx.flush_pending(Duration::from_secs(15)).await;
    let _ = release_tx.send(());
    if let Some(task) = election {
        let _ = task.await;
    }
    info!("stopped");
    Ok(())
}

/// Runs the controller until `stopped` resolves and its passes in flight have ended;
/// marks `state` ready once the caches have synced.
async fn control<S, F>(
    ctx: Arc<reconcile::Context>,
    wiring: reconcile::Wiring,
    state: &admin::State,
    stopped: S,
) where
    S: Fn() -> F,
    F: Future<Output = ()> + Send + Sync + 'static,
{
    use futures::StreamExt;
    let synced = Arc::new(AtomicBool::new(false));
    let on_sync = synced.clone();
    let ready = state.clone();
    let controller = reconcile::controller(ctx, wiring, stopped(), move || {
        on_sync.store(true, Ordering::SeqCst);
        info!("caches synced; ready");
        ready.set_ready();
    })
    .for_each(|()| async {});
    // kube's controller starts no pass before the ScgToken cache has synced, and until
    // then does not end on shutdown either (say the API server was never reachable).
    // Both happen in the stream this task polls, so "not synced" at shutdown means no
    // pass ever started, and the controller can be dropped.
    let stopped_unsynced = {
        let stopped = stopped();
        async move {
            stopped.await;
            if synced.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = controller => {}
        () = stopped_unsynced => info!("stopping before the caches synced"),
    }
}

/// The budget every refresh call waits on. Refreshes still waiting when `stopped`
/// resolves end instead of starting a call.
fn refresh_budget(
    rate: Option<budget::Rate>,
    metrics: &report::Metrics,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> budget::Budget {
    let budget = budget::Budget::new(rate, Arc::new(budget::TokioTimer), metrics);
    let closing = budget.clone();
    tokio::spawn(async move {
        stopped.await;
        closing.close();
    });
    budget
}

/// Joins the leader election, if there is one; `released` ends the election task's hold
/// on the Lease. Keeps the `leader` metric current.
async fn lead(
    client: &kube::Client,
    election: Option<leader::ElectionConfig>,
    metrics: &Arc<report::Metrics>,
    released: impl Future<Output = ()> + Send + 'static,
) -> Result<(leader::Leadership, Option<tokio::task::JoinHandle<()>>), Error> {
    let Some(election) = election else {
        metrics.leader.set(1);
        return Ok((leader::Leadership::always(), None));
    };
    let m = metrics.clone();
    let (leadership, task) = leader::elect(client.clone(), election, released, move |leading| {
        m.leader.set(i64::from(leading));
    })
    .await?;
    Ok((leadership, Some(task)))
}
