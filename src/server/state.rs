//! What the handlers share: configuration, the lifecycle, and — once the
//! model is loaded — the core (model, registry, store, batcher).

use std::sync::{Arc, Mutex, OnceLock};

use super::config::ServeArgs;
use super::error::ApiError;
use super::lifecycle::Lifecycle;
use super::metrics::TaskLabels;
use super::sync::{StoreHealth, StoreSync};
use crate::batch::Batcher;
use crate::model::Model;
use crate::registry::Registry;

/// The loaded half of the server. Set once, after start-up loading; until
/// then the routes that need it answer 503 `not_ready`.
pub struct Core {
    /// The frozen model (tokenizer and text budgets come from it).
    pub model: Arc<Model>,
    /// The served version of every task.
    pub registry: Arc<Registry>,
    /// The prompt store and the poller that converges the registry on it.
    /// Admin writes go through it: store first, then publish, serialized
    /// with each other and with the poller (see [`StoreSync`]).
    pub sync: Arc<StoreSync>,
    /// Resolves a request's task: resident, or loaded from the store on
    /// its first request (see [`super::loader`]).
    pub loader: Arc<super::loader::Loader>,
    /// The queue in front of the inference thread.
    pub batcher: Batcher,
}

/// Shared state of every route.
pub struct AppState {
    /// The flags the server was started with.
    pub args: ServeArgs,
    /// `None`: admin routes refuse every request.
    pub admin_token: Option<String>,
    /// Set once loading is done (see [`Core`]).
    pub core: OnceLock<Core>,
    /// Draining flag and in-flight count.
    pub lifecycle: Arc<Lifecycle>,
    /// Bounded task labels for per-task metrics.
    pub task_labels: TaskLabels,
    /// Renders `/metrics`.
    pub prometheus: metrics_exporter_prometheus::PrometheusHandle,
    /// Whether the prompt store can be read; known before the core exists,
    /// so `/ready` can say why start-up waits.
    pub store_health: Arc<StoreHealth>,
    /// Why the server failed (a supervised component died), once it has.
    failure: Mutex<Option<String>>,
    /// Failed admin logins per client, for slowing guessers down.
    pub auth_failures: super::auth::Failures,
    /// Uploads parsed and validated at once (`--max-concurrent-uploads`).
    pub upload_permits: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// State before loading.
    pub fn new(args: ServeArgs, admin_token: Option<String>) -> Self {
        let task_labels = TaskLabels::new(args.metrics_max_tasks);
        let store_health = Arc::new(StoreHealth::new(args.prompts.to_string()));
        let upload_permits = Arc::new(tokio::sync::Semaphore::new(args.max_concurrent_uploads));
        AppState {
            failure: Mutex::new(None),
            auth_failures: super::auth::Failures::default(),
            upload_permits,
            args,
            admin_token,
            core: OnceLock::new(),
            lifecycle: Arc::new(Lifecycle::default()),
            task_labels,
            prometheus: super::metrics::prometheus(),
            store_health,
        }
    }

    /// The core, or 503 while loading.
    pub fn core(&self) -> Result<&Core, ApiError> {
        self.core.get().ok_or_else(|| {
            ApiError::NotReady(if self.store_health.is_unreachable() {
                "waiting for the prompt store, which cannot be read"
            } else {
                "the model and tasks are loading"
            })
        })
    }

    /// Records that a supervised component died (the first reason wins).
    pub fn set_failure(&self, reason: String) {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(reason);
    }

    /// Why the server failed, if it has.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ready to take traffic: loaded (model and the whole store), warmed
    /// up, not draining. Once ready, a store that becomes unreachable does
    /// not make the replica unready: it keeps serving the tasks it has.
    pub fn readiness(&self) -> &'static str {
        match self.core.get() {
            _ if self.failure().is_some() => "failed",
            _ if self.lifecycle.is_draining() => "draining",
            None if self.store_health.is_unreachable() => "waiting_for_store",
            None => "loading",
            Some(c) if !c.batcher.is_warm() => "warming_up",
            Some(_) => "ready",
        }
    }
}
