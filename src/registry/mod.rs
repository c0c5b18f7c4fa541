//! The live task map: task id → the version being served, for the tasks
//! resident on the device.
//!
//! A request resolves its task once, at admission, and holds that
//! `Arc<LoadedTask>` until it is answered. So a replace is atomic for
//! traffic: requests admitted before it finish on the old version, every
//! request admitted after `insert` returns sees the new one, and a delete
//! (or an eviction) lets in-flight requests finish on the version they hold.
//!
//! The map is a cache over the prompt store when a byte budget is set
//! (`serve --task-memory`): publishing a task past the budget evicts the
//! least recently used unpinned ones ([`residency`]); the store poller
//! (`server::sync`) loads a cold task on its first request.

pub mod residency;

use dashmap::DashMap;
use std::sync::{Arc, Mutex};

pub use residency::Residency;

use crate::engine::TaskModel;
use crate::model::Model;
use crate::task::{Limits, PromptKind, Task, TaskError, TaskMeta, validate};

/// Why a registry operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "task id {0:?} is invalid: expected 1-128 characters of [A-Za-z0-9._-], starting with a letter or digit"
    )]
    BadId(String),
    #[error("task {id:?}: {source}")]
    Invalid {
        id: String,
        #[source]
        source: TaskError,
    },
    #[error("task {id:?}: cannot place on device: {reason}")]
    Device { id: String, reason: String },
}

/// A task ready to serve: metadata plus the engine model on the device.
pub struct LoadedTask {
    pub id: String,
    /// Content hash of the task file; changes with every replace.
    pub version: String,
    pub kind: PromptKind,
    pub meta: TaskMeta,
    pub model: TaskModel,
    /// Bytes of the task's tensors on the device (what `--task-memory`
    /// counts).
    pub bytes: u64,
}

/// Gauge: tasks resident on the device.
pub const TASKS_RESIDENT: &str = "softprompt_tasks_resident";
/// Gauge: bytes of the resident tasks' tensors.
pub const TASK_BYTES_RESIDENT: &str = "softprompt_task_bytes_resident";
/// Counter: requests whose task was resident.
pub const TASK_CACHE_HITS: &str = "softprompt_task_cache_hits_total";
/// Counter: requests whose task was not resident (loaded from the store,
/// or not found there).
pub const TASK_CACHE_MISSES: &str = "softprompt_task_cache_misses_total";
/// Counter: tasks evicted to stay within `--task-memory`.
pub const TASK_EVICTIONS: &str = "softprompt_task_evictions_total";

/// Task ids are file names in the store and path segments in URLs: this
/// check runs before anything touches either (no traversal, no hidden files).
pub fn validate_id(id: &str) -> Result<(), RegistryError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadId(id.to_string()))
    }
}

/// Concurrent id → task map bound to one resident model.
pub struct Registry {
    model: Arc<Model>,
    limits: Limits,
    tasks: DashMap<String, Arc<LoadedTask>>,
    /// Recency and bytes of `tasks`. Publishing, removing and evicting
    /// change the map under this lock, so the two always agree.
    residency: Mutex<Residency>,
}

impl Registry {
    /// An empty registry for `model` with no memory bound.
    pub fn new(model: Arc<Model>, limits: Limits) -> Self {
        Self::with_budget(model, limits, None, Vec::new())
    }

    /// An empty registry whose resident tasks stay within `budget` bytes
    /// (`None`: unbounded), never evicting `pins`.
    pub fn with_budget(
        model: Arc<Model>,
        limits: Limits,
        budget: Option<u64>,
        pins: Vec<String>,
    ) -> Self {
        Registry {
            model,
            limits,
            tasks: DashMap::new(),
            residency: Mutex::new(Residency::new(budget, pins)),
        }
    }

    fn residency(&self) -> std::sync::MutexGuard<'_, Residency> {
        // The bookkeeping stays consistent even if a holder panicked: every
        // method finishes its updates before anything can panic.
        self.residency.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The model tasks are validated against.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Validation limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Validates `task` and places it on the device without touching the
    /// map: the expensive, fallible half of an insert, usable before the
    /// store write so that a bad upload changes nothing.
    pub fn prepare(&self, id: &str, task: &Task) -> Result<Arc<LoadedTask>, RegistryError> {
        validate_id(id)?;
        validate(task, &self.model, &self.limits).map_err(|source| RegistryError::Invalid {
            id: id.to_string(),
            source,
        })?;
        let model = task
            .to_device(self.model.encoder.device(), self.model.encoder.dtype())
            .map_err(|e| RegistryError::Device {
                id: id.to_string(),
                reason: e.to_string(),
            })?;
        let bytes = crate::task::named_tensors(&model)
            .iter()
            .map(|(_, t)| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum();
        Ok(Arc::new(LoadedTask {
            id: id.to_string(),
            version: task.version.clone(),
            kind: task.kind(),
            meta: task.meta.clone(),
            model,
            bytes,
        }))
    }

    /// Makes a prepared task the served version, resident and most
    /// recently used; evicts least recently used unpinned tasks if the
    /// budget is exceeded. Returns the version it replaced.
    pub fn publish(&self, task: Arc<LoadedTask>) -> Option<Arc<LoadedTask>> {
        let mut r = self.residency();
        let (id, bytes) = (task.id.clone(), task.bytes);
        let previous = self.tasks.insert(id.clone(), task);
        let evicted = r.insert(&id, bytes);
        for v in &evicted {
            self.tasks.remove(v);
            tracing::debug!(task = %v, "task evicted: least recently used");
        }
        if !evicted.is_empty() {
            metrics::counter!(TASK_EVICTIONS).increment(evicted.len() as u64);
        }
        if r.budget().is_some_and(|b| r.bytes() > b) {
            tracing::warn!(task = %id, bytes, budget = r.budget(), resident = r.bytes(),
                "resident tasks exceed --task-memory: only pinned tasks and this one are left");
        }
        Self::export(&r);
        previous
    }

    fn export(r: &Residency) {
        metrics::gauge!(TASKS_RESIDENT).set(r.len() as f64);
        metrics::gauge!(TASK_BYTES_RESIDENT).set(r.bytes() as f64);
    }

    /// The version served for a request: like [`Registry::get`], and marks
    /// the task as used (it is evicted last) and counts a hit or a miss.
    pub fn lookup(&self, id: &str) -> Option<Arc<LoadedTask>> {
        let task = self.get(id);
        match &task {
            Some(_) => {
                self.residency().touch(id);
                metrics::counter!(TASK_CACHE_HITS).increment(1);
            }
            None => metrics::counter!(TASK_CACHE_MISSES).increment(1),
        }
        task
    }

    /// Whether `bytes` more fit in the budget without evicting anything.
    pub fn fits(&self, bytes: u64) -> bool {
        self.residency().fits(bytes)
    }

    /// Bytes of the resident tasks' tensors.
    pub fn resident_bytes(&self) -> u64 {
        self.residency().bytes()
    }

    /// The `--task-memory` bound, if any.
    pub fn budget(&self) -> Option<u64> {
        self.residency().budget()
    }

    /// Whether `id` is pinned (`--pin`).
    pub fn is_pinned(&self, id: &str) -> bool {
        self.residency().is_pinned(id)
    }

    /// `prepare` + `publish`.
    pub fn insert(&self, id: &str, task: &Task) -> Result<Option<Arc<LoadedTask>>, RegistryError> {
        let loaded = self.prepare(id, task)?;
        Ok(self.publish(loaded))
    }

    /// The version currently resident, without marking it used.
    pub fn get(&self, id: &str) -> Option<Arc<LoadedTask>> {
        self.tasks.get(id).map(|t| t.clone())
    }

    /// Stops serving `id`; requests holding it finish.
    pub fn remove(&self, id: &str) -> Option<Arc<LoadedTask>> {
        let mut r = self.residency();
        let removed = self.tasks.remove(id).map(|(_, t)| t);
        r.remove(id);
        Self::export(&r);
        removed
    }

    /// All resident tasks, sorted by id.
    pub fn list(&self) -> Vec<Arc<LoadedTask>> {
        let mut v: Vec<_> = self.tasks.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Number of tasks served.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// True when no task is loaded.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::validate_id;

    #[test]
    fn ids_are_checked_before_they_reach_a_path() {
        for ok in ["a", "sentiment", "Topic-2.v3", "x_y", &"a".repeat(128)] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../etc",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            "é",
            "a\0",
            &"a".repeat(129),
            "a\\b",
            "..",
            "x%2f",
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }
}
