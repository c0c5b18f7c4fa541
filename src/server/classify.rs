//! `POST /v1/tasks/{task}/classify`: parse, admit (in tokens, before any
//! tokenizing), tokenize, queue the rows, wait for the batcher, rank the
//! scores. The whole request runs under `--request-timeout-ms`
//! (`super::timeouts::request_deadline`).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::api::{ClassifyRequest, ClassifyResponse, ErrorResponse};
use super::error::ApiError;
use super::extract::TaskPath;
use super::metrics::{CLASSIFY_REQUESTS, TASK_INPUTS, TASK_REQUESTS, UNKNOWN_TASK};
use super::state::AppState;
use super::{input, scores};

/// Header naming the task version that scored the request.
pub const TASK_VERSION_HEADER: &str = "x-task-version";

/// Classify one input or a list of inputs with a task.
#[utoipa::path(
    post,
    path = "/v1/tasks/{task}/classify",
    tag = "classify",
    params(("task" = String, Path, description = "Task id")),
    request_body = ClassifyRequest,
    responses(
        (status = 200, description = "One list per input, in input order; labels sorted by score, descending, cut to top_k",
            body = ClassifyResponse,
            headers(("x-task-version" = String, description = "Version of the task that scored the request"))),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 404, description = "Unknown task", body = ErrorResponse),
        (status = 408, description = "The body did not arrive within --body-timeout-ms", body = ErrorResponse),
        (status = 413, description = "Body too large", body = ErrorResponse),
        (status = 422, description = "Invalid input or parameter: empty text, too long without truncate, too many inputs, more tokens than the server ever admits", body = ErrorResponse),
        (status = 429, description = "Server busy (admitted tokens at their bound, or too many cold tasks loading: loads_busy); retry after the Retry-After header", body = ErrorResponse),
        (status = 500, description = "Inference failed", body = ErrorResponse),
        (status = 503, description = "Not ready, shutting down, timed out, or the task is not resident and cannot be loaded (store_unavailable, task_unloadable)", body = ErrorResponse),
    )
)]
pub async fn classify(
    State(state): State<Arc<AppState>>,
    TaskPath(task): TaskPath,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request_id: Arc<str> = headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .into();
    let result = run(&state, &task, request_id, body).await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.error_type(),
    };
    let served = state
        .core()
        .ok()
        .is_some_and(|c| c.registry.get(&task).is_some());
    let label = if served {
        state.task_labels.label(&task)
    } else {
        UNKNOWN_TASK.to_string()
    };
    metrics::counter!(CLASSIFY_REQUESTS, "outcome" => outcome).increment(1);
    metrics::counter!(TASK_REQUESTS, "task" => label.clone(), "outcome" => outcome).increment(1);
    match result {
        Ok((version, answer)) => {
            metrics::counter!(TASK_INPUTS, "task" => label).increment(answer.0.len() as u64);
            let mut resp = Json(answer).into_response();
            if let Ok(v) = HeaderValue::from_str(&version) {
                resp.headers_mut().insert(TASK_VERSION_HEADER, v);
            }
            resp
        }
        Err(e) => e.into_response(),
    }
}

/// The request, layer by layer; returns the task version used and the answer.
async fn run(
    state: &AppState,
    id: &str,
    request_id: Arc<str>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(String, ClassifyResponse), ApiError> {
    let core = state.core()?;
    let body = body.map_err(|e| body_error(e, state.args.body_limit))?;
    let (inputs, params) = input::parse(&body, state.args.max_inputs)?;
    drop(body);
    // The version resolved here scores every input of the request.
    // Resident, or loaded from the store now (under --task-memory).
    let task = core.loader.resolve(id).await?;
    let budget = task.model.text_budget(core.model.config());
    // Admission before any tokenizing: a full server refuses here.
    let prompt = task.model.shallow_len() + task.model.deep_len();
    let ticket = core
        .batcher
        .admit(input::token_bound(&inputs, budget, prompt))?;
    let model = core.model.clone();
    let truncate = params.truncate;
    let encoded = tokio::task::spawn_blocking(move || {
        input::tokenize(&model.tokenizer, &inputs, budget, truncate)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("tokenizer task: {e}")))??;
    let pending = core
        .batcher
        .submit(ticket, request_id, task.clone(), encoded)?;
    // Dropping `pending` (timeout, hang-up, shutdown bound) abandons the
    // rows not yet computed; the worker skips them.
    let logits = tokio::select! {
        logits = pending.wait() => logits?,
        _ = state.lifecycle.expired() => return Err(ApiError::ShuttingDown),
    };
    let top_k = params.top_k.map(|k| k as usize);
    let answer = logits
        .iter()
        .map(|l| scores::rank(l, &task.meta.labels, params.function_to_apply, top_k))
        .collect();
    Ok((task.version.clone(), ClassifyResponse(answer)))
}

/// Header carrying the request id (taken from the client or made).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// A body that could not be buffered: over the limit, too slow, or broken
/// off.
pub fn body_error(e: BytesRejection, limit: usize) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::BodyTooLarge { limit }
    } else if let Some(ms) = super::timeouts::body_deadline(&e) {
        ApiError::BodyTimeout(ms)
    } else {
        ApiError::Body(e.body_text())
    }
}
