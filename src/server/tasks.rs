//! Public task listing: which tasks are served, in which version, with
//! which labels.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;

use super::api::{ErrorResponse, TaskInfo};
use super::error::ApiError;
use super::extract::TaskPath;
use super::state::AppState;

/// Every served task, sorted by id.
#[utoipa::path(
    get,
    path = "/v1/tasks",
    tag = "tasks",
    responses(
        (status = 200, description = "Served tasks", body = Vec<TaskInfo>),
        (status = 503, description = "Not ready", body = ErrorResponse),
    )
)]
pub async fn list_tasks(
    State(state): State<Arc<AppState>>,
) -> Result<Json<Vec<TaskInfo>>, ApiError> {
    let core = state.core()?;
    Ok(Json(
        core.registry
            .list()
            .iter()
            .map(|t| TaskInfo::from(t.as_ref()))
            .collect(),
    ))
}

/// One served task.
#[utoipa::path(
    get,
    path = "/v1/tasks/{task}",
    tag = "tasks",
    params(("task" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "The task", body = TaskInfo),
        (status = 404, description = "Unknown task", body = ErrorResponse),
        (status = 503, description = "Not ready", body = ErrorResponse),
    )
)]
pub async fn get_task(
    State(state): State<Arc<AppState>>,
    TaskPath(id): TaskPath,
) -> Result<Json<TaskInfo>, ApiError> {
    let core = state.core()?;
    let task = core.registry.get(&id).ok_or(ApiError::TaskNotFound(id))?;
    Ok(Json(TaskInfo::from(task.as_ref())))
}
