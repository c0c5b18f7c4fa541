//! Public task listing: which tasks are served, in which version, with
//! which labels, and which of them this replica holds resident.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};

use super::api::{ErrorResponse, ListQuery, TaskEntry, TaskInfo};
use super::error::ApiError;
use super::extract::TaskPath;
use super::state::AppState;

/// Default and largest page of the listing.
const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;

/// The served tasks, sorted by id, a page at a time: every task resident on
/// this replica and every other task of the store's last listing (except
/// those whose stored version does not load). Resident ones carry their
/// version, kind and labels. Complete once the replica has listed the
/// store in full (`listed_tasks` in `/ready`).
#[utoipa::path(
    get,
    path = "/v1/tasks",
    tag = "tasks",
    params(ListQuery),
    responses(
        (status = 200, description = "One page of tasks, sorted by id; ask for the next with after=<last id>", body = Vec<TaskEntry>),
        (status = 503, description = "Not ready, or catalog_loading: the replica started in front of a store too large to list within --listing-wait-ms and is still listing it (tasks are served meanwhile)", body = ErrorResponse),
    )
)]
pub async fn list_tasks(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<TaskEntry>>, ApiError> {
    let core = state.core()?;
    if !state.store_health.is_listed() {
        return Err(ApiError::CatalogLoading);
    }
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let after = q.after.unwrap_or_default();
    let resident = core.registry.list();
    let failing = core.sync.failing().await;
    let catalog = core.sync.catalog();
    let from = catalog.partition_point(|e| e.id.as_str() <= after.as_str());
    let cold = catalog[from..]
        .iter()
        .filter(|e| !failing.contains(&e.id) && core.registry.get(&e.id).is_none())
        .map(|e| TaskEntry {
            id: e.id.clone(),
            resident: false,
            version: None,
            kind: None,
            labels: None,
        });
    let warm = resident
        .iter()
        .filter(|t| t.id.as_str() > after.as_str())
        .map(|t| TaskEntry::from(t.as_ref()));
    // Both are sorted by id: merge them, then cut the page.
    let mut page: Vec<TaskEntry> = warm.chain(cold.take(limit)).collect();
    page.sort_by(|a, b| a.id.cmp(&b.id));
    page.dedup_by(|a, b| a.id == b.id);
    page.truncate(limit);
    Ok(Json(page))
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
    // A task in the store that is not resident is loaded, as a classify
    // request would.
    let task = core.loader.resolve(&id).await?;
    Ok(Json(TaskInfo::from(task.as_ref())))
}
