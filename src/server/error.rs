//! Every error a route can answer, and THE place where each becomes an HTTP
//! status and an `error_type`. Lower layers keep their own typed errors
//! ([`InputError`], [`UploadError`], [`BatchError`], [`RegistryError`],
//! [`StoreError`]); handlers only `?` them into [`ApiError`].

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::api::ErrorResponse;
use super::input::InputError;
use super::upload::UploadError;
use crate::batch::BatchError;
use crate::logging::{RateLimit, WARN_INTERVAL};
use crate::registry::RegistryError;
use crate::store::StoreError;

/// An error answer of the HTTP API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Upload(#[from] UploadError),
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Load(#[from] super::loader::LoadError),
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    Body(String),
    #[error("the request body did not arrive within {0} ms")]
    BodyTimeout(u64),
    #[error("invalid path parameter: {0}")]
    BadPath(String),
    #[error("task {0:?} not found")]
    TaskNotFound(String),
    #[error("no route for {0}")]
    NoRoute(String),
    #[error("method not allowed on {0}")]
    MethodNotAllowed(String),
    #[error("not ready: {0}")]
    NotReady(&'static str),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(
        "this replica is still listing the prompt store (it started less than a listing ago); every task is served meanwhile, the listing of them is not"
    )]
    CatalogLoading,
    #[error("other uploads held every upload turn for {0} ms; retry later")]
    UploadsBusy(u64),
    #[error("request timed out after {0} ms")]
    Timeout(u64),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("too many failed admin logins from this client; retry in {retry_after_s} s")]
    AuthBackoff { retry_after_s: u64 },
    #[error("the admin API is disabled: the server was started without an admin token")]
    AdminDisabled,
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// HTTP status and stable `error_type` of every error (the only mapping).
    pub fn classify(&self) -> (StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            ApiError::Input(InputError::Malformed(_)) => (S::BAD_REQUEST, "malformed_json"),
            ApiError::Input(_) => (S::UNPROCESSABLE_ENTITY, "validation"),
            ApiError::Upload(e) => match e {
                UploadError::MediaType(_) => (S::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
                UploadError::TooLarge(_) => (S::PAYLOAD_TOO_LARGE, "body_too_large"),
                UploadError::Malformed(_) => (S::BAD_REQUEST, "malformed_upload"),
                UploadError::BodyTimeout(_) => (S::REQUEST_TIMEOUT, "body_timeout"),
                UploadError::MissingPart(_)
                | UploadError::UnknownPart(_)
                | UploadError::DuplicatePart(_)
                | UploadError::Labels(_) => (S::UNPROCESSABLE_ENTITY, "invalid_upload"),
                UploadError::Task(_) => (S::UNPROCESSABLE_ENTITY, "invalid_task"),
            },
            ApiError::Batch(e) => match e {
                BatchError::QueueFull { .. } => (S::TOO_MANY_REQUESTS, "queue_full"),
                BatchError::TooLarge { .. } => (S::UNPROCESSABLE_ENTITY, "validation"),
                BatchError::Closed => (S::SERVICE_UNAVAILABLE, "shutting_down"),
                BatchError::Engine(_) => (S::INTERNAL_SERVER_ERROR, "backend"),
            },
            ApiError::Registry(e) => registry_status(e),
            ApiError::Store(e) => match e {
                StoreError::NotFound(_) => (S::NOT_FOUND, "not_found"),
                StoreError::Registry(e) => registry_status(e),
                // The shared store is down or refuses us: worth a retry.
                StoreError::Remote { .. } => (S::SERVICE_UNAVAILABLE, "store_unavailable"),
                StoreError::Io { .. } | StoreError::Task { .. } | StoreError::Config(_) => {
                    (S::INTERNAL_SERVER_ERROR, "store")
                }
            },
            ApiError::Load(e) => {
                use super::loader::LoadError as L;
                match e {
                    L::NotFound(_) => (S::NOT_FOUND, "not_found"),
                    L::StoreUnavailable { .. } => (S::SERVICE_UNAVAILABLE, "store_unavailable"),
                    L::Unloadable { .. } => (S::SERVICE_UNAVAILABLE, "task_unloadable"),
                    L::Busy(_) => (S::TOO_MANY_REQUESTS, "loads_busy"),
                }
            }
            ApiError::BodyTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "body_too_large"),
            ApiError::Body(_) => (S::BAD_REQUEST, "malformed_body"),
            ApiError::BodyTimeout(_) => (S::REQUEST_TIMEOUT, "body_timeout"),
            ApiError::BadPath(_) => (S::BAD_REQUEST, "bad_path"),
            ApiError::TaskNotFound(_) => (S::NOT_FOUND, "not_found"),
            ApiError::NoRoute(_) => (S::NOT_FOUND, "no_route"),
            ApiError::MethodNotAllowed(_) => (S::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::NotReady(_) => (S::SERVICE_UNAVAILABLE, "not_ready"),
            ApiError::ShuttingDown => (S::SERVICE_UNAVAILABLE, "shutting_down"),
            ApiError::CatalogLoading => (S::SERVICE_UNAVAILABLE, "catalog_loading"),
            ApiError::UploadsBusy(_) => (S::SERVICE_UNAVAILABLE, "uploads_busy"),
            ApiError::Timeout(_) => (S::SERVICE_UNAVAILABLE, "timeout"),
            ApiError::Unauthorized => (S::UNAUTHORIZED, "unauthorized"),
            ApiError::AuthBackoff { .. } => (S::TOO_MANY_REQUESTS, "auth_backoff"),
            ApiError::AdminDisabled => (S::UNAUTHORIZED, "admin_disabled"),
            ApiError::Internal(_) => (S::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// The `error_type` alone (metrics label: a small fixed set).
    pub fn error_type(&self) -> &'static str {
        self.classify().1
    }
}

fn registry_status(e: &RegistryError) -> (StatusCode, &'static str) {
    match e {
        RegistryError::BadId(_) | RegistryError::Invalid { .. } => {
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_task")
        }
        RegistryError::Device { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "backend"),
    }
}

/// Seconds a client should wait before retrying a 429 or 503.
const RETRY_AFTER_S: u64 = 1;
/// ... a listing asked for while the store's first listing runs (seconds
/// to minutes for a large object store).
const CATALOG_RETRY_AFTER_S: u64 = 5;

impl ApiError {
    /// The Retry-After of a 429 or 503.
    fn retry_after(&self) -> u64 {
        match self {
            ApiError::AuthBackoff { retry_after_s } => *retry_after_s,
            ApiError::CatalogLoading => CATALOG_RETRY_AFTER_S,
            _ => RETRY_AFTER_S,
        }
    }
}

/// One WARN line per error type and interval: a drain or an outage answers
/// thousands of 503s a second, and each line would say the same.
fn log_failure(status: StatusCode, error_type: &'static str, error: &str) {
    static LIMITS: std::sync::OnceLock<dashmap::DashMap<&'static str, RateLimit>> =
        std::sync::OnceLock::new();
    let limits = LIMITS.get_or_init(Default::default);
    let limit = limits
        .entry(error_type)
        .or_insert_with(|| RateLimit::new(WARN_INTERVAL));
    if let Some(suppressed) = limit.check() {
        tracing::warn!(%status, error_type, %error, suppressed, "request failed");
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error_type) = self.classify();
        let error = error_chain(&self);
        if status.is_server_error() {
            log_failure(status, error_type, &error);
        } else {
            tracing::debug!(%status, error_type, %error, "request refused");
        }
        let mut resp = (
            status,
            Json(ErrorResponse {
                error,
                error_type: error_type.to_string(),
            }),
        )
            .into_response();
        let headers = resp.headers_mut();
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(self.retry_after()));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// The message with its sources, so a refused task file says which field.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let m = src.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = src.source();
    }
    s
}
