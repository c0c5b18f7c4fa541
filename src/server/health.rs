//! Probes and introspection: liveness, readiness, Prometheus metrics, and
//! the OpenAPI document.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;

use super::api::{HealthResponse, ReadyResponse, StoreStatus};
use super::openapi::ApiDoc;
use super::state::AppState;

/// Alive, and the model is loaded (503 while it loads).
#[utoipa::path(
    get,
    path = "/health",
    tag = "ops",
    responses(
        (status = 200, description = "Alive with the model loaded", body = HealthResponse),
        (status = 503, description = "Alive, model still loading", body = HealthResponse),
    )
)]
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.core.get() {
        Some(core) => Json(HealthResponse {
            status: "ok".into(),
            model: Some(core.model.name.clone()),
            tasks: core.registry.len(),
        })
        .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(HealthResponse {
                status: "loading".into(),
                model: None,
                tasks: 0,
            }),
        )
            .into_response(),
    }
}

/// 200 only when loaded (model and the whole prompt store), warmed up and
/// not draining. Stays 200 when the store becomes unreachable later: the
/// replica serves what it has and reports the store in the body.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "ops",
    responses(
        (status = 200, description = "Ready for traffic (the body says whether the prompt store is reachable)", body = ReadyResponse),
        (status = 503, description = "Loading, waiting for the prompt store, warming up or draining", body = ReadyResponse),
    )
)]
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let status = state.readiness();
    let ready = status == "ready";
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let store = state.store_health.snapshot();
    (
        code,
        Json(ReadyResponse {
            ready,
            status: status.into(),
            reason: state.failure(),
            store: StoreStatus {
                location: store.location,
                reachable: store.reachable,
                last_sync_age_s: store.last_sync_age.map(|d| d.as_secs_f64()),
                error: store.error,
                failing_tasks: store.failing_tasks,
                listed_tasks: store.listed_tasks,
            },
        }),
    )
        .into_response()
}

/// Prometheus text exposition.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"))
)]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.store_health.export_age();
    state.prometheus.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.prometheus.render(),
    )
        .into_response()
}

/// This API's OpenAPI document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "ops",
    responses((status = 200, description = "OpenAPI document", body = Object))
)]
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
