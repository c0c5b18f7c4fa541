//! Persistence of task files behind a small trait, so that a replica can
//! keep its tasks in a local directory today and in a shared object store
//! later without the server knowing the difference.

pub mod dir;

use std::sync::Arc;

use crate::registry::{Registry, RegistryError};
use crate::task::{Task, TaskError};

pub use dir::DirStore;

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {location}: {source}")]
    Io {
        location: String,
        #[source]
        source: std::io::Error,
    },
    #[error("task {id:?} in the store: {source}")]
    Task {
        id: String,
        #[source]
        source: TaskError,
    },
    #[error("task {0:?} not found in the store")]
    NotFound(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Where tasks live durably. Writes are all-or-nothing: after `put`
/// returns, the task survives a crash; a crash during `put` leaves the old
/// version (or nothing), never a file that loads half.
#[async_trait::async_trait]
pub trait PromptStore: Send + Sync + 'static {
    /// Ids of every task in the store (native files and PEFT adapter
    /// directories alike), sorted.
    async fn list(&self) -> Result<Vec<String>, StoreError>;
    /// Reads one task.
    async fn load(&self, id: &str) -> Result<Task, StoreError>;
    /// Writes (creates or replaces) a task durably, as a native file.
    async fn put(&self, id: &str, task: &Task) -> Result<(), StoreError>;
    /// Removes a task; `false` when it was not there.
    async fn delete(&self, id: &str) -> Result<bool, StoreError>;
    /// Human-readable location for logs and errors.
    fn location(&self) -> String;
}

/// What a start-up load did.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Ids loaded and published.
    pub loaded: Vec<String>,
    /// Ids skipped, with the reason.
    pub skipped: Vec<(String, String)>,
}

/// Loads every task of `store` into `registry`. A bad task is reported and
/// skipped while the rest load; with `strict` the first bad task is fatal.
pub async fn load_all(
    store: &dyn PromptStore,
    registry: &Arc<Registry>,
    strict: bool,
) -> Result<LoadReport, StoreError> {
    let mut report = LoadReport::default();
    for id in store.list().await? {
        let outcome = match store.load(&id).await {
            Ok(task) => registry.insert(&id, &task).map(|_| ()).map_err(StoreError::from),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => report.loaded.push(id),
            Err(e) if strict => return Err(e),
            Err(e) => {
                tracing::warn!(task = %id, error = %e, "skipping task that does not load");
                report.skipped.push((id, e.to_string()));
            }
        }
    }
    Ok(report)
}
