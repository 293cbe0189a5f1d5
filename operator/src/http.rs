//! HTTP endpoints: `GET /healthz`, `GET /readyz` (ready once every watch's cache is filled)
//! and `GET /metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// What the endpoints report.
#[derive(Clone, Debug)]
pub(crate) struct Probes {
    /// Set once every watch's cache has been filled.
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(p): State<Probes>) -> (StatusCode, &'static str) {
    if p.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches are not filled yet\n")
    }
}

async fn metrics(State(p): State<Probes>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], p.metrics.encode())
}

/// The routes: probes when `health`, metrics when `metrics`.
fn router(probes: Probes, health: bool, with_metrics: bool) -> Router {
    let mut router = Router::new();
    if health {
        router = router.route("/healthz", get(healthz)).route("/readyz", get(readyz));
    }
    if with_metrics {
        router = router.route("/metrics", get(metrics));
    }
    router.with_state(probes)
}

/// Serves the probes and/or the metrics on `listener` until `shutdown` completes.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    probes: Probes,
    health: bool,
    with_metrics: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, health, metrics = with_metrics, "serving HTTP endpoints");
    axum::serve(listener, router(probes, health, with_metrics)).with_graceful_shutdown(shutdown).await
}
