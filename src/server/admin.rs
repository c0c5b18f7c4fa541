//! Admin routes: upload (create or replace), delete and list tasks.
//!
//! An upload is parsed and validated against the model (registry.prepare)
//! before anything is written, so a bad upload changes nothing served or
//! stored; it is then written durably to the shared store and published
//! before the answer, so every request to this replica admitted after the
//! answer uses it; the other replicas pick it up on their next store poll
//! (`--sync-interval-ms`). A delete removes from the store, then here.

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa::ToSchema;

use super::api::{ErrorResponse, TaskDetails, UploadResponse};
use super::auth::Admin;
use super::error::ApiError;
use super::extract::TaskPath;
use super::state::AppState;
use super::upload::{AdapterParts, UploadError, native_task};
use crate::registry::validate_id;
use crate::task::Task;

/// Multipart form of a PEFT adapter upload.
#[derive(ToSchema)]
// OpenAPI schema only: the fields are never read (the parts are read by
// `AdapterParts`), so rustc sees them as dead.
#[allow(dead_code)]
pub struct AdapterUpload {
    /// The adapter's `adapter_config.json`.
    #[schema(rename = "adapter_config.json", value_type = String, format = Binary)]
    config: Vec<u8>,
    /// The adapter's `adapter_model.safetensors`.
    #[schema(rename = "adapter_model.safetensors", value_type = String, format = Binary)]
    weights: Vec<u8>,
    /// Optional JSON array of label names, in head order.
    #[schema(value_type = Option<String>)]
    labels: Option<String>,
}

/// Create or replace a task.
#[utoipa::path(
    put,
    path = "/admin/tasks/{task}",
    tag = "admin",
    params(("task" = String, Path, description = "Task id: 1-128 of [A-Za-z0-9._-], starting with a letter or digit")),
    request_body(description = "A native task file, or a PEFT adapter as multipart parts", content(
        ("application/octet-stream"),
        (AdapterUpload = "multipart/form-data"),
    )),
    responses(
        (status = 200, description = "Replaced", body = UploadResponse),
        (status = 201, description = "Created", body = UploadResponse),
        (status = 400, description = "Malformed multipart body", body = ErrorResponse),
        (status = 401, description = "Missing or wrong bearer token, or admin API disabled", body = ErrorResponse),
        (status = 413, description = "Upload too large", body = ErrorResponse),
        (status = 415, description = "Unsupported content type", body = ErrorResponse),
        (status = 422, description = "Invalid task id, task file or adapter", body = ErrorResponse),
        (status = 500, description = "Store write failed", body = ErrorResponse),
        (status = 503, description = "Not ready, shutting down, other uploads took every turn for too long, or the shared store cannot be reached", body = ErrorResponse),
    ),
    security(("admin_token" = []))
)]
pub async fn put_task(
    _admin: Admin,
    State(state): State<Arc<AppState>>,
    TaskPath(id): TaskPath,
    req: Request,
) -> Result<Response, ApiError> {
    let core = state.core()?;
    validate_id(&id)?;
    // Bounded before the body is read: each upload in progress holds about
    // twice its size (the body, then the parsed task and its native bytes).
    // A semaphore with a deadline rather than tower's ConcurrencyLimit,
    // which waits without one and has no JSON answer for giving up.
    let wait = state.args.request_timeout();
    let _permit = tokio::time::timeout(wait, state.upload_permits.clone().acquire_owned())
        .await
        .map_err(|_| ApiError::UploadsBusy(wait.as_millis() as u64))?
        .map_err(|_| ApiError::ShuttingDown)?;
    let task = read_task(&state, req).await?;
    // Validate and place on the device before any write.
    let (task, loaded) = {
        let (registry, id) = (core.registry.clone(), id.clone());
        tokio::task::spawn_blocking(move || registry.prepare(&id, &task).map(|l| (task, l)))
            .await
            .map_err(|e| ApiError::Internal(format!("validation task: {e}")))??
    };
    // Store first (durable, visible to the other replicas), then served here.
    let previous = core.sync.put(&id, &task, loaded.clone()).await?;
    tracing::info!(task = %id, version = %loaded.version, replaced = previous.is_some(), "task uploaded");
    let status = if previous.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let body = UploadResponse {
        replaced: previous.is_some(),
        previous_version: previous.map(|p| p.version.clone()),
        task: TaskDetails::new(&loaded, core.model.config()),
    };
    Ok((status, Json(body)).into_response())
}

/// The upload body as a task, by content type.
async fn read_task(state: &Arc<AppState>, req: Request) -> Result<Task, ApiError> {
    let limit = state.args.upload_limit;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let parse = match essence.as_str() {
        "application/octet-stream" => {
            let bytes = read_body(req, limit).await?;
            tokio::task::spawn_blocking(move || native_task(&bytes))
        }
        "multipart/form-data" => {
            let multipart = Multipart::from_request(req, state)
                .await
                .map_err(|e| UploadError::Malformed(e.body_text()))?;
            let parts = AdapterParts::read(multipart, limit).await?;
            tokio::task::spawn_blocking(move || parts.into_task())
        }
        _ => return Err(UploadError::MediaType(content_type).into()),
    };
    Ok(parse
        .await
        .map_err(|e| ApiError::Internal(format!("parse task: {e}")))??)
}

/// Reads a whole body into one buffer sized from `content-length`, frame
/// by frame. axum's `Bytes` extractor keeps every frame until the end and
/// then copies them into one buffer, so a large upload briefly took twice
/// its size (and the frames' memory stayed in the allocator's pools).
async fn read_body(req: Request, limit: usize) -> Result<Vec<u8>, ApiError> {
    use http_body_util::BodyExt;
    let hint = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if hint.is_some_and(|n| n > limit) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let mut body = req.into_body();
    let mut out = Vec::with_capacity(hint.unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match super::timeouts::body_deadline(&e) {
            Some(ms) => ApiError::BodyTimeout(ms),
            None => ApiError::Body(e.to_string()),
        })?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(ApiError::BodyTooLarge { limit });
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// Stop serving a task and remove it from the store.
#[utoipa::path(
    delete,
    path = "/admin/tasks/{task}",
    tag = "admin",
    params(("task" = String, Path, description = "Task id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or wrong bearer token, or admin API disabled", body = ErrorResponse),
        (status = 404, description = "Unknown task", body = ErrorResponse),
        (status = 500, description = "Store delete failed", body = ErrorResponse),
        (status = 503, description = "Not ready, shutting down, or the shared store cannot be reached", body = ErrorResponse),
    ),
    security(("admin_token" = []))
)]
pub async fn delete_task(
    _admin: Admin,
    State(state): State<Arc<AppState>>,
    TaskPath(id): TaskPath,
) -> Result<StatusCode, ApiError> {
    let core = state.core()?;
    if validate_id(&id).is_err() {
        return Err(ApiError::TaskNotFound(id));
    }
    // Store first (the other replicas drop it on their next poll), then here.
    let (stored, served) = core.sync.delete(&id).await?;
    if !stored && !served {
        return Err(ApiError::TaskNotFound(id));
    }
    tracing::info!(task = %id, "task deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Every served task with how it runs.
#[utoipa::path(
    get,
    path = "/admin/tasks",
    tag = "admin",
    responses(
        (status = 200, description = "Served tasks, sorted by id", body = Vec<TaskDetails>),
        (status = 401, description = "Missing or wrong bearer token, or admin API disabled", body = ErrorResponse),
        (status = 503, description = "Not ready", body = ErrorResponse),
    ),
    security(("admin_token" = []))
)]
pub async fn list_tasks(
    _admin: Admin,
    State(state): State<Arc<AppState>>,
) -> Result<Json<Vec<TaskDetails>>, ApiError> {
    let core = state.core()?;
    let config = core.model.config();
    Ok(Json(
        core.registry
            .list()
            .iter()
            .map(|t| TaskDetails::new(t, config))
            .collect(),
    ))
}
