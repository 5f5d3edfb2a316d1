//! The HTTP side of a process: the /metrics, /healthz and /readyz endpoints and the build-info
//! metric every registry carries. The operator and the relay each serve their own registry.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    pub version: &'static str,
}

/// `<prefix>_build_info{version} 1`: which version a scraped process runs (joins in dashboards and
/// alerts, and shows a half-done upgrade).
pub fn register_build_info(registry: &mut Registry) {
    let info = Family::<BuildLabel, Gauge>::default();
    info.get_or_create(&BuildLabel {
        version: env!("CARGO_PKG_VERSION"),
    })
    .set(1);
    registry.register("build_info", "The running lockstep version (always 1)", info);
}

/// Health shared with the HTTP endpoints.
#[derive(Default)]
pub struct Health {
    /// Set once the process can serve: controllers running, or standing by for the Lease.
    pub ready: AtomicBool,
}

/// Renders the metrics text; the operator and the relay each have their own registry.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct AppState {
    render: Render,
    health: Arc<Health>,
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        (s.render)(),
    )
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Serve /metrics, /healthz and /readyz until `shutdown` completes. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    render: Render,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { render, health });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}
