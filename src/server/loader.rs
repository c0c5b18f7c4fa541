//! Loading a task on its first request when it is not resident.
//!
//! Under `--task-memory` the registry holds only part of the store; a
//! request for any other task that is in the store must not get 404. It
//! waits while the task is read from the store (one read however many
//! requests wait for it), validated and published, evicting the least
//! recently used tasks if the budget needs it. What can go wrong answers at
//! once and is remembered for a short while, so that a missing or broken
//! task, or a store outage, is not hammered in a tight loop:
//!
//! - not in the store: 404, remembered [`NOT_FOUND_BACKOFF`] or until the
//!   store's catalog (the poller's listing or journal, or an upload here)
//!   shows the task;
//! - store unreachable: 503 `store_unavailable` (resident tasks keep
//!   serving, nothing is evicted for a load that did not happen),
//!   remembered [`UNAVAILABLE_BACKOFF`];
//! - in the store but does not load: 503 `task_unloadable`, remembered
//!   [`UNLOADABLE_BACKOFF`];
//! - more than `--max-concurrent-loads` different cold tasks at once: 429
//!   `loads_busy` (a flood of requests for distinct cold tasks is refused,
//!   not queued: each load holds a task's bytes until it is published).
//!
//! Written by hand rather than with a cache crate: loads are async (the
//! store), must publish through the registry's residency policy and the
//! syncer's admin-write ordering, and their failures need a back-off of
//! their own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OnceCell, Semaphore};

use super::sync::StoreSync;
use crate::registry::LoadedTask;
use crate::store::StoreError;

/// How long a task found missing from the store is answered 404 without
/// asking the store again (uploads through this replica are served at
/// once; through another, within the sync interval anyway).
pub const NOT_FOUND_BACKOFF: Duration = Duration::from_secs(1);
/// How long a load that failed on the store itself is not retried.
pub const UNAVAILABLE_BACKOFF: Duration = Duration::from_secs(1);
/// How long a stored task that does not load is not read again.
pub const UNLOADABLE_BACKOFF: Duration = Duration::from_secs(10);
/// Failures remembered at most (a flood of distinct unknown ids must not
/// grow memory without bound; past it, expired entries are dropped, then
/// new failures are not remembered).
const MAX_REMEMBERED: usize = 100_000;

/// Counter: loads of cold tasks, by `outcome` (`loaded`, `not_found`,
/// `store_unavailable`, `unloadable`, `busy`).
pub const TASK_LOADS: &str = "softprompt_task_loads_total";
/// Histogram: seconds from a cold task's first request to its publication
/// (store read, validation, placement on the device).
pub const TASK_LOAD_SECONDS: &str = "softprompt_task_load_seconds";

/// Why a cold task could not be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error("task {0:?} not found")]
    NotFound(String),
    #[error(
        "task {id:?} is not resident on this replica and the prompt store cannot be read: {reason}"
    )]
    StoreUnavailable { id: String, reason: String },
    #[error("task {id:?} is in the prompt store but does not load: {reason}")]
    Unloadable { id: String, reason: String },
    #[error("{0} tasks are being loaded from the store already; retry later")]
    Busy(usize),
}

impl LoadError {
    fn outcome(&self) -> &'static str {
        match self {
            LoadError::NotFound(_) => "not_found",
            LoadError::StoreUnavailable { .. } => "store_unavailable",
            LoadError::Unloadable { .. } => "unloadable",
            LoadError::Busy(_) => "busy",
        }
    }

    fn backoff(&self) -> Option<Duration> {
        match self {
            LoadError::NotFound(_) => Some(NOT_FOUND_BACKOFF),
            LoadError::StoreUnavailable { .. } => Some(UNAVAILABLE_BACKOFF),
            LoadError::Unloadable { .. } => Some(UNLOADABLE_BACKOFF),
            LoadError::Busy(_) => None,
        }
    }
}

type Slot = Arc<OnceCell<Result<Arc<LoadedTask>, LoadError>>>;

/// Resolves task ids for requests: resident, or loaded from the store.
pub struct Loader {
    sync: Arc<StoreSync>,
    /// Loads in flight, by id: requests for the same cold task share one.
    loading: Mutex<HashMap<String, Slot>>,
    /// Recent failures, by id, with when they stop being answered from here.
    failures: Mutex<HashMap<String, (Instant, LoadError)>>,
    permits: Semaphore,
    max_loads: usize,
}

impl Loader {
    /// A loader reading through `sync`, at most `max_loads` different tasks
    /// at once.
    pub fn new(sync: Arc<StoreSync>, max_loads: usize) -> Self {
        let max_loads = max_loads.max(1);
        Loader {
            sync,
            loading: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            permits: Semaphore::new(max_loads),
            max_loads,
        }
    }

    /// The version of `id` to serve a request with: the resident one, or
    /// the store's, loaded now.
    pub async fn resolve(&self, id: &str) -> Result<Arc<LoadedTask>, LoadError> {
        if let Some(t) = self.sync.registry().lookup(id) {
            return Ok(t);
        }
        if let Some(e) = self.recent_failure(id) {
            return Err(e);
        }
        let slot = self
            .loading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone();
        // One waiter runs the load; if its request goes away, the next
        // waiter takes over (OnceCell's contract).
        let result = slot.get_or_init(|| self.load(id)).await.clone();
        let mut loading = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if loading.get(id).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
            loading.remove(id);
        }
        result
    }

    fn recent_failure(&self, id: &str) -> Option<LoadError> {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match failures.get(id) {
            // Remembered as missing, but the store has it now (a round or an
            // upload put it in the catalog): a task in the store is never
            // answered 404, so ask the store again.
            Some((_, LoadError::NotFound(_))) if self.sync.catalog_token(id).is_some() => {
                failures.remove(id);
                None
            }
            Some((until, e)) if Instant::now() < *until => Some(e.clone()),
            Some(_) => {
                failures.remove(id);
                None
            }
            None => None,
        }
    }

    fn remember(&self, id: &str, e: &LoadError) {
        let Some(backoff) = e.backoff() else { return };
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_REMEMBERED {
            failures.retain(|_, (until, _)| now < *until);
        }
        if failures.len() < MAX_REMEMBERED {
            failures.insert(id.to_string(), (now + backoff, e.clone()));
        }
    }

    /// One store read, validation and publication.
    async fn load(&self, id: &str) -> Result<Arc<LoadedTask>, LoadError> {
        let started = Instant::now();
        let result = match self.permits.try_acquire() {
            Ok(_permit) => self.load_now(id).await,
            Err(_) => Err(LoadError::Busy(self.max_loads)),
        };
        let outcome = match &result {
            Ok(_) => "loaded",
            Err(e) => e.outcome(),
        };
        metrics::counter!(TASK_LOADS, "outcome" => outcome).increment(1);
        if let Err(e) = &result {
            self.remember(id, e);
            tracing::debug!(task = %id, error = %e, "cold task not loaded");
        } else {
            metrics::histogram!(TASK_LOAD_SECONDS).record(started.elapsed().as_secs_f64());
            tracing::debug!(task = %id, ms = started.elapsed().as_millis() as u64, "cold task loaded");
        }
        result
    }

    async fn load_now(&self, id: &str) -> Result<Arc<LoadedTask>, LoadError> {
        let epoch = self.sync.epoch().await;
        let unloadable = |e: &dyn std::fmt::Display| LoadError::Unloadable {
            id: id.to_string(),
            reason: e.to_string(),
        };
        let task = match self.sync.store().load(id).await {
            Ok(t) => t,
            Err(StoreError::NotFound(_)) => return Err(LoadError::NotFound(id.to_string())),
            Err(e) if e.is_unavailable() => {
                return Err(LoadError::StoreUnavailable {
                    id: id.to_string(),
                    reason: e.to_string(),
                });
            }
            Err(e) => return Err(unloadable(&e)),
        };
        // Validation and device placement are CPU work: off the async workers.
        let (registry, owned) = (self.sync.registry().clone(), id.to_string());
        let loaded = tokio::task::spawn_blocking(move || registry.prepare(&owned, &task))
            .await
            .map_err(|e| unloadable(&e))?
            .map_err(|e| unloadable(&e))?;
        self.sync
            .publish_loaded(loaded, epoch)
            .await
            .ok_or_else(|| LoadError::NotFound(id.to_string()))
    }
}
