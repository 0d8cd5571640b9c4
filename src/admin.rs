//! The admin HTTP server: `/metrics` (Prometheus text), `/healthz` and `/readyz`.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;

/// Shared state of the admin server.
#[derive(Clone)]
pub struct State(Arc<Inner>);

struct Inner {
    registry: Registry,
    ready: AtomicBool,
}

impl State {
    pub fn new(registry: Registry) -> Self {
        State(Arc::new(Inner {
            registry,
            ready: AtomicBool::new(false),
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
    if state.0.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
    }
}
