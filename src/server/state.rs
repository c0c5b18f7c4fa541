//! What the handlers share: configuration, the lifecycle, and — once the
//! model is loaded — the core (model, registry, store, batcher).

use std::sync::{Arc, OnceLock};

use super::config::ServeArgs;
use super::error::ApiError;
use super::lifecycle::Lifecycle;
use super::metrics::TaskLabels;
use crate::batch::Batcher;
use crate::model::Model;
use crate::registry::Registry;
use crate::store::PromptStore;

/// The loaded half of the server. Set once, after start-up loading; until
/// then the routes that need it answer 503 `not_ready`.
pub struct Core {
    /// The frozen model (tokenizer and text budgets come from it).
    pub model: Arc<Model>,
    /// The served version of every task.
    pub registry: Arc<Registry>,
    /// Where uploads are written before they are published.
    pub store: Arc<dyn PromptStore>,
    /// The queue in front of the inference thread.
    pub batcher: Batcher,
    /// Serializes admin writes so that the order of store writes and the
    /// order of publishes agree (two racing PUTs of one id cannot leave the
    /// store on one version and the registry on the other).
    pub admin_lock: tokio::sync::Mutex<()>,
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
}

impl AppState {
    /// State before loading.
    pub fn new(args: ServeArgs, admin_token: Option<String>) -> Self {
        let task_labels = TaskLabels::new(args.metrics_max_tasks);
        AppState {
            args,
            admin_token,
            core: OnceLock::new(),
            lifecycle: Arc::new(Lifecycle::default()),
            task_labels,
            prometheus: super::metrics::prometheus(),
        }
    }

    /// The core, or 503 while loading.
    pub fn core(&self) -> Result<&Core, ApiError> {
        self.core.get().ok_or(ApiError::NotReady("the model is loading"))
    }

    /// Ready to take traffic: loaded, warmed up, not draining.
    pub fn readiness(&self) -> &'static str {
        match self.core.get() {
            _ if self.lifecycle.is_draining() => "draining",
            None => "loading",
            Some(c) if !c.batcher.is_warm() => "warming_up",
            Some(_) => "ready",
        }
    }
}
