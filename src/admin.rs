//! The admin HTTP server: `/metrics` (Prometheus text), `/healthz` and `/readyz`.
//!
//! Shared by the operator (ready once its caches have synced) and the agent (ready while
//! it serves an unexpired token), which plugs its own rule in through [`Probe`].

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;

/// A readiness rule other than the operator's "caches synced" flag.
pub trait Probe: Send + Sync + 'static {
    /// Whether `/readyz` answers 200 now.
    fn ready(&self) -> bool;
    /// The body of `/readyz` when not ready.
    fn not_ready_message(&self) -> &'static str;
    /// Brings time-dependent gauges up to date just before a scrape.
    fn before_scrape(&self) {}
}

/// Shared state of the admin server.
#[derive(Clone)]
pub struct State(Arc<Inner>);

struct Inner {
    registry: Registry,
    ready: AtomicBool,
    probe: Option<Box<dyn Probe>>,
}

impl State {
    pub fn new(registry: Registry) -> Self {
        State(Arc::new(Inner {
            registry,
            ready: AtomicBool::new(false),
            probe: None,
        }))
    }

    /// A server whose readiness and scrape-time gauges come from `probe`.
    pub fn with_probe(registry: Registry, probe: impl Probe) -> Self {
        State(Arc::new(Inner {
            registry,
            ready: AtomicBool::new(false),
            probe: Some(Box::new(probe)),
        }))
    }

    /// Marks the operator ready: its caches have synced. Standbys are ready too.
    pub fn set_ready(&self) {
        self.0.ready.store(true, Ordering::Release);
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: State,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(extract::State(state): extract::State<State>) -> impl IntoResponse {
    if let Some(probe) = &state.0.probe {
        probe.before_scrape();
    }
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.0.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            String::new(),
        ),
    }
}

async fn readyz(extract::State(state): extract::State<State>) -> impl IntoResponse {
    let (ready, not_ready) = match &state.0.probe {
        Some(probe) => (probe.ready(), probe.not_ready_message()),
        None => (state.0.ready.load(Ordering::Acquire), "caches not synced"),
    };
    if ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, not_ready)
    }
}
