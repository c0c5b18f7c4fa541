//! The route table: the single list the router is built from, and the list
//! the OpenAPI test compares against the document.

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{MethodRouter, delete, get, post, put};

use super::error::ApiError;
use super::state::AppState;
use super::{admin, classify, health, lifecycle, metrics, tasks};

type Handler = MethodRouter<Arc<AppState>>;

/// Every route: path (axum and OpenAPI share the `{param}` syntax), method,
/// handler with its body limit.
fn table(body_limit: usize, upload_limit: usize) -> Vec<(&'static str, Method, Handler)> {
    vec![
        (
            "/v1/tasks/{task}/classify",
            Method::POST,
            post(classify::classify).layer(DefaultBodyLimit::max(body_limit)),
        ),
        ("/v1/tasks", Method::GET, get(tasks::list_tasks)),
        ("/v1/tasks/{task}", Method::GET, get(tasks::get_task)),
        (
            "/admin/tasks/{task}",
            Method::PUT,
            put(admin::put_task).layer(DefaultBodyLimit::max(upload_limit)),
        ),
        ("/admin/tasks/{task}", Method::DELETE, delete(admin::delete_task)),
        ("/admin/tasks", Method::GET, get(admin::list_tasks)),
        ("/health", Method::GET, get(health::health)),
        ("/ready", Method::GET, get(health::ready)),
        ("/metrics", Method::GET, get(health::metrics)),
        ("/openapi.json", Method::GET, get(health::openapi)),
    ]
}

/// `(method, path)` of every route, for checking the OpenAPI document.
pub fn endpoints() -> Vec<(Method, &'static str)> {
    table(1, 1).into_iter().map(|(p, m, _)| (m, p)).collect()
}

/// The application: routes, JSON 404/405 for everything else, the drain
/// gate and per-request metrics.
pub fn router(state: Arc<AppState>) -> Router {
    let mut router = Router::new();
    for (path, _, handler) in table(state.args.body_limit, state.args.upload_limit) {
        // Same path, other method: axum merges the method routers.
        router = router.route(path, handler);
    }
    router
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(state.clone(), lifecycle::gate))
        .layer(from_fn(metrics::track))
        .with_state(state)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NoRoute(format!("{method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} {}", uri.path()))
}
