//! The live task map: task id → the version being served.
//!
//! A request resolves its task once, at admission, and holds that
//! `Arc<LoadedTask>` until it is answered. So a replace is atomic for
//! traffic: requests admitted before it finish on the old version, every
//! request admitted after `insert` returns sees the new one, and a delete
//! lets in-flight requests finish on the version they hold.

use dashmap::DashMap;
use std::sync::Arc;

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
}

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
}

impl Registry {
    /// An empty registry for `model`.
    pub fn new(model: Arc<Model>, limits: Limits) -> Self {
        Registry {
            model,
            limits,
            tasks: DashMap::new(),
        }
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
        let model =
            task.to_device(self.model.encoder.device())
                .map_err(|e| RegistryError::Device {
                    id: id.to_string(),
                    reason: e.to_string(),
                })?;
        Ok(Arc::new(LoadedTask {
            id: id.to_string(),
            version: task.version.clone(),
            kind: task.kind(),
            meta: task.meta.clone(),
            model,
        }))
    }

    /// Makes a prepared task the served version; returns the one it replaced.
    pub fn publish(&self, task: Arc<LoadedTask>) -> Option<Arc<LoadedTask>> {
        self.tasks.insert(task.id.clone(), task)
    }

    /// `prepare` + `publish`.
    pub fn insert(&self, id: &str, task: &Task) -> Result<Option<Arc<LoadedTask>>, RegistryError> {
        let loaded = self.prepare(id, task)?;
        Ok(self.publish(loaded))
    }

    /// The version currently served.
    pub fn get(&self, id: &str) -> Option<Arc<LoadedTask>> {
        self.tasks.get(id).map(|t| t.clone())
    }

    /// Stops serving `id`; requests holding it finish.
    pub fn remove(&self, id: &str) -> Option<Arc<LoadedTask>> {
        self.tasks.remove(id).map(|(_, t)| t)
    }

    /// All tasks, sorted by id.
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
