//! Extractors whose rejections are the API's JSON errors: axum's own
//! answer a bad path parameter (say, a task id that is not UTF-8) in plain
//! text.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;

use super::error::ApiError;

/// The `{task}` segment of a route.
pub struct TaskPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for TaskPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| TaskPath(id))
            .map_err(|e| ApiError::BadPath(e.body_text()))
    }
}
