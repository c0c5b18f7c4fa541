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
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    Body(String),
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
    #[error("request timed out after {0} ms")]
    Timeout(u64),
    #[error("missing or wrong bearer token")]
    Unauthorized,
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
                UploadError::MissingPart(_)
                | UploadError::UnknownPart(_)
                | UploadError::DuplicatePart(_)
                | UploadError::Labels(_) => (S::UNPROCESSABLE_ENTITY, "invalid_upload"),
                UploadError::Task(_) => (S::UNPROCESSABLE_ENTITY, "invalid_task"),
            },
            ApiError::Batch(e) => match e {
                BatchError::QueueFull { .. } => (S::TOO_MANY_REQUESTS, "queue_full"),
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
            ApiError::BodyTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "body_too_large"),
            ApiError::Body(_) => (S::BAD_REQUEST, "malformed_body"),
            ApiError::TaskNotFound(_) => (S::NOT_FOUND, "not_found"),
            ApiError::NoRoute(_) => (S::NOT_FOUND, "no_route"),
            ApiError::MethodNotAllowed(_) => (S::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::NotReady(_) => (S::SERVICE_UNAVAILABLE, "not_ready"),
            ApiError::ShuttingDown => (S::SERVICE_UNAVAILABLE, "shutting_down"),
            ApiError::Timeout(_) => (S::SERVICE_UNAVAILABLE, "timeout"),
            ApiError::Unauthorized => (S::UNAUTHORIZED, "unauthorized"),
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
        RegistryError::BadId(_) | RegistryError::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_task"),
        RegistryError::Device { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "backend"),
    }
}

/// Seconds a client should wait before retrying a 429 or 503.
const RETRY_AFTER_S: &str = "1";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error_type) = self.classify();
        let error = error_chain(&self);
        if status.is_server_error() {
            tracing::warn!(%status, error_type, %error, "request failed");
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
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
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
