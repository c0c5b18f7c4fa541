//! The route table: the single list the router is built from, and the list
//! the OpenAPI test compares against the document.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Request, Uri};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{MethodRouter, delete, get, post, put};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use super::classify::REQUEST_ID_HEADER;
use super::error::ApiError;
use super::state::AppState;
use super::{admin, classify, health, lifecycle, metrics, tasks, timeouts};

type Handler = MethodRouter<Arc<AppState>>;

/// Every route: path (axum and OpenAPI share the `{param}` syntax), method,
/// handler with its body limit (and classify with its deadline).
fn table(
    body_limit: usize,
    upload_limit: usize,
    state: Option<&Arc<AppState>>,
) -> Vec<(&'static str, Method, Handler)> {
    let mut classify_route = post(classify::classify).layer(DefaultBodyLimit::max(body_limit));
    if let Some(state) = state {
        classify_route = classify_route.layer(from_fn_with_state(
            state.clone(),
            timeouts::request_deadline,
        ));
    }
    vec![
        ("/v1/tasks/{task}/classify", Method::POST, classify_route),
        ("/v1/tasks", Method::GET, get(tasks::list_tasks)),
        ("/v1/tasks/{task}", Method::GET, get(tasks::get_task)),
        (
            "/admin/tasks/{task}",
            Method::PUT,
            put(admin::put_task).layer(DefaultBodyLimit::max(upload_limit)),
        ),
        (
            "/admin/tasks/{task}",
            Method::DELETE,
            delete(admin::delete_task),
        ),
        ("/admin/tasks", Method::GET, get(admin::list_tasks)),
        ("/health", Method::GET, get(health::health)),
        ("/ready", Method::GET, get(health::ready)),
        ("/metrics", Method::GET, get(health::metrics)),
        ("/openapi.json", Method::GET, get(health::openapi)),
    ]
}

/// `(method, path)` of every route, for checking the OpenAPI document.
pub fn endpoints() -> Vec<(Method, &'static str)> {
    table(1, 1, None)
        .into_iter()
        .map(|(p, m, _)| (m, p))
        .collect()
}

/// The application: routes, JSON 404/405 for everything else, and around
/// them (outermost first) the request id (taken from `x-request-id` or
/// made, and returned on every response), a tracing span carrying it (so
/// every log line of the request names it), per-request metrics, the
/// drain gate and the body deadline.
pub fn router(state: Arc<AppState>) -> Router {
    let mut router = Router::new();
    for (path, _, handler) in table(state.args.body_limit, state.args.upload_limit, Some(&state)) {
        // Same path, other method: axum merges the method routers.
        router = router.route(path, handler);
    }
    let header = axum::http::HeaderName::from_static(REQUEST_ID_HEADER);
    router
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(
            state.clone(),
            timeouts::body_deadline_layer,
        ))
        .layer(from_fn_with_state(state.clone(), lifecycle::gate))
        .layer(from_fn(metrics::track))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                // Failures are logged once, rate-limited, by ApiError.
                .on_failure(()),
        )
        .layer(PropagateRequestIdLayer::new(header.clone()))
        .layer(SetRequestIdLayer::new(header, MakeRequestUuid))
        .with_state(state)
}

/// The span of one request: its id, method and path on every line.
fn request_span(req: &Request<Body>) -> tracing::Span {
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!("request", id, method = %req.method(), path = req.uri().path())
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NoRoute(format!("{method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} {}", uri.path()))
}
