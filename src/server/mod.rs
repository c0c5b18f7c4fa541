//! The HTTP server (`softprompt serve`): axum routes over the batcher.
//!
//! Data flows one way: HTTP → validate/tokenize ([`input`], in the handler)
//! → queue → batch → engine ([`crate::batch`], one inference thread) →
//! reply. Each layer has its own error type; [`error`] alone maps them to
//! HTTP statuses.

pub mod admin;
pub mod api;
pub mod auth;
pub mod classify;
pub mod config;
pub mod connections;
pub mod error;
pub mod extract;
pub mod health;
pub mod input;
pub mod lifecycle;
pub mod loader;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod scores;
pub mod state;
pub mod supervise;
pub mod sync;
pub mod tasks;
pub mod timeouts;
pub mod upload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

pub use config::ServeArgs;
use state::{AppState, Core};

use crate::batch::{BatchConfig, Batcher};
use crate::engine::Engine;
use crate::model::ModelError;
use crate::registry::Registry;
use crate::store::StoreError;
use crate::task::Limits;
use sync::{RoundError, StoreSync};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("model {path}: {source}")]
    Model {
        path: String,
        #[source]
        source: ModelError,
    },
    #[error("prompt store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Device(#[from] crate::model::DeviceError),
    #[error("inference thread: {0}")]
    Thread(std::io::Error),
    #[error("start-up task failed: {0}")]
    Join(String),
}

/// Extra time past the drain bound for closing connections: the close
/// grace of the accept loop plus a margin.
const CLOSE_SLACK: Duration = Duration::from_millis(700);

/// How long the inference thread gets, at exit, to finish its batch.
const WORKER_EXIT_GRACE: Duration = Duration::from_millis(200);

/// A running server (in this process). Tests and benchmarks start it
/// directly; `softprompt serve` goes through [`run`].
pub struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    serve: JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Binds, starts answering (probes say 503 while loading), loads the
    /// model and the stored tasks, starts the inference thread and the
    /// store poller, and returns once loading is done. A store that cannot
    /// be read is retried until it can, so this may wait; `/ready` says
    /// why meanwhile. Use `--addr 127.0.0.1:0` for a free port.
    pub async fn start(args: ServeArgs) -> Result<Server, StartError> {
        let admin_token = args.resolve_admin_token()?;
        let batch_config = args.batch_config()?;
        let conn_config = args.conn_config(raise_open_files_limit());
        let listener =
            connections::listen(&args.addr)
                .await
                .map_err(|source| StartError::Bind {
                    addr: args.addr.clone(),
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: args.addr.clone(),
            source,
        })?;
        if admin_token.is_none() {
            tracing::warn!("no admin token configured: the admin routes refuse every request");
        }
        let state = Arc::new(AppState::new(args, admin_token));
        let app = routes::router(state.clone());
        let drained = state
            .lifecycle
            .clone()
            .drained(state.args.shutdown_timeout());
        let serve = tokio::spawn(connections::serve(listener, app, conn_config, drained));
        tracing::info!("listening on http://{addr}");

        match load(&state, batch_config).await {
            Ok(core) => {
                let sync = core.sync.clone();
                if state.core.set(core).is_err() {
                    unreachable!("the core is set once, here");
                }
                let poller =
                    state.args.sync_interval().map(|interval| {
                        let lifecycle = state.lifecycle.clone();
                        let faults = state.args.faults.clone();
                        tokio::spawn(
                            sync.run(interval, faults, async move { lifecycle.draining().await }),
                        )
                    });
                supervise::start(state.clone(), poller);
            }
            Err(e) => {
                state.lifecycle.begin_drain();
                let _ = tokio::time::timeout(CLOSE_SLACK, serve).await;
                return Err(e);
            }
        }
        Ok(Server { addr, state, serve })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The batcher (e.g. to [`Batcher::pause`] it).
    pub fn batcher(&self) -> &Batcher {
        &self
            .state
            .core
            .get()
            .expect("set before start returns")
            .batcher
    }

    /// The tasks this replica serves from memory (what is resident).
    pub fn registry(&self) -> &Arc<Registry> {
        &self
            .state
            .core
            .get()
            .expect("set before start returns")
            .registry
    }

    /// Requests being handled now (probes included).
    pub fn in_flight(&self) -> usize {
        self.state.lifecycle.in_flight()
    }

    /// Begins a graceful shutdown, as SIGTERM does: `/ready` and new
    /// requests answer 503 at once, in-flight requests finish.
    pub fn shutdown(&self) {
        self.state.lifecycle.begin_drain();
    }

    /// Waits until the server has stopped: after [`Server::shutdown`] (or a
    /// signal, under [`run`]) the listener closes once in-flight requests
    /// are done, or once the shutdown bound passes and the requests still
    /// waiting have been answered 503; the inference thread then gets a
    /// moment to finish its batch. Returns an error when the server stopped
    /// because a supervised component died (see [`supervise`]).
    pub async fn wait(self) -> std::io::Result<()> {
        let Server {
            state, mut serve, ..
        } = self;
        let result = tokio::select! {
            r = &mut serve => r,
            _ = state.lifecycle.draining() => {
                let bound = state.args.shutdown_timeout() + CLOSE_SLACK;
                match tokio::time::timeout(bound, &mut serve).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!("connections still open past the shutdown bound; closing them");
                        serve.abort();
                        Ok(Ok(()))
                    }
                }
            }
        };
        state.lifecycle.begin_drain();
        let st = state.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(core) = st.core.get() {
                core.batcher.shutdown(WORKER_EXIT_GRACE);
            }
        })
        .await;
        tracing::info!("server stopped");
        if let Some(reason) = state.failure() {
            return Err(std::io::Error::other(format!("stopped because {reason}")));
        }
        match result {
            Ok(r) => r,
            Err(e) if e.is_cancelled() => Ok(()),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// Loads the model and the store's tasks and starts the inference thread.
/// A store that cannot be read is retried until it can (or a drain
/// starts): `/ready` says `waiting_for_store` with the reason meanwhile.
async fn load(state: &Arc<AppState>, batch_config: BatchConfig) -> Result<Core, StartError> {
    let args = &state.args;
    // Opening parses the configuration only: a bad one fails before the
    // model loads; an unreachable store is found by the first read below.
    let mut store = crate::store::open(&args.prompts)?;
    if let Some(delay) = args.faults.store_list_delay {
        store = Arc::new(crate::faults::SlowListing {
            inner: store,
            delay,
        });
    }
    let device = args.device.open()?;
    tracing::info!(device = %args.device, "model device");
    let dir = args.model.clone();
    let (quantize, kernels) = (args.quantize, args.kernels);
    if quantize != crate::model::Quantize::None && args.kernels != crate::engine::Kernels::Auto {
        return Err(StartError::Model {
            path: args.model.display().to_string(),
            source: crate::model::ModelError::Unsupported(format!(
                "--quantize int8 with --kernels {}: only the fused CPU forward (--kernels auto) serves int8",
                clap::ValueEnum::to_possible_value(&args.kernels)
                    .map_or_else(String::new, |v| v.get_name().to_string())
            )),
        });
    }
    let serve_dtype = args.dtype;
    let model = tokio::task::spawn_blocking(move || {
        crate::engine::load_serving_model(&dir, &device, kernels, serve_dtype, quantize)
    })
    .await
    .map_err(|e| StartError::Join(e.to_string()))?
    .map_err(|source| StartError::Model {
        path: args.model.display().to_string(),
        source,
    })?;
    let model = Arc::new(model);
    tracing::info!(
        model = %model.name,
        quantize = ?model.encoder.quantization(),
        dtype = ?model.encoder.dtype(),
        packed_weight_bytes = model.encoder.packed_bytes(),
        gemm_from_rows = ?Some(model.encoder.gemm_from_rows()).filter(|&r| r != usize::MAX),
        "model loaded"
    );
    let budget = args.task_memory.budget(config::available_memory());
    tracing::info!(
        task_memory = budget.map_or("unlimited".to_string(), |b| format!("{b} bytes")),
        pinned = args.pin.len(),
        "task cache"
    );
    let registry = Arc::new(Registry::with_budget(
        model.clone(),
        Limits::default(),
        budget,
        args.pin.clone(),
    ));
    let sync = Arc::new(
        StoreSync::new(store.clone(), registry.clone(), state.store_health.clone())
            .with_prefetch(args.prefetch),
    );
    // Under a memory bound a replica need not hold every task to serve
    // them all: it waits for the first listing at most --listing-wait-ms,
    // with its pinned tasks loaded first.
    let listing_wait = (sync.loads_on_demand() && !args.strict)
        .then(|| Duration::from_millis(args.listing_wait_ms));
    let mut retry = START_RETRY_MIN;
    loop {
        match first_round(&sync, args, listing_wait).await {
            Ok(report) => {
                if let Some(report) = report {
                    tracing::info!(
                        store = %store.location(),
                        loaded = report.added.len(),
                        skipped = report.failed.len(),
                        "tasks loaded"
                    );
                }
                break;
            }
            Err(RoundError::Strict(e)) => return Err(StartError::Store(e)),
            Err(RoundError::Unavailable(e)) => {
                tracing::warn!(store = %store.location(), error = %e, retry_in_ms = retry.as_millis() as u64,
                    "cannot load the prompt store; not ready until it can be read");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = state.lifecycle.draining() => return Err(StartError::Store(e)),
                }
                retry = (retry * 2).min(START_RETRY_MAX);
            }
        }
    }
    let batcher = Batcher::start(
        Engine::with_kernels(model.clone(), args.kernels),
        batch_config,
    )
    .map_err(StartError::Thread)?;
    let loader = Arc::new(loader::Loader::new(sync.clone(), args.max_concurrent_loads));
    Ok(Core {
        model,
        registry,
        sync,
        loader,
        batcher,
    })
}

/// Start-up's round: the store listed and loaded, or with `listing_wait`,
/// the pinned tasks loaded and the listing given at most that long
/// (`Ok(None)`: it goes on in the background, logged when done).
async fn first_round(
    sync: &Arc<StoreSync>,
    args: &ServeArgs,
    listing_wait: Option<Duration>,
) -> Result<Option<sync::RoundReport>, RoundError> {
    if listing_wait.is_some() && !args.pin.is_empty() {
        sync.load_ids(&args.pin).await?;
    }
    let mut round = tokio::spawn({
        let (sync, strict) = (sync.clone(), args.strict);
        async move { sync.round(strict).await }
    });
    let joined = match listing_wait {
        None => (&mut round).await,
        Some(wait) => match tokio::time::timeout(wait, &mut round).await {
            Ok(joined) => joined,
            Err(_) => {
                tracing::info!(store = %sync.store().location(), waited_ms = wait.as_millis() as u64,
                    pinned = args.pin.len(),
                    "the store is still being listed; ready now, other tasks load on their first request");
                tokio::spawn(async move {
                    match round.await {
                        Ok(Ok(r)) => tracing::info!(
                            loaded = r.added.len(),
                            skipped = r.failed.len(),
                            "first listing of the store done"
                        ),
                        // Logged by StoreHealth; the poller retries.
                        Ok(Err(_)) => {}
                        Err(e) => tracing::error!(error = %e, "first listing of the store"),
                    }
                });
                return Ok(None);
            }
        },
    };
    match joined {
        Ok(result) => result.map(Some),
        // A bug, not a store problem: surface it.
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(RoundError::Unavailable(StoreError::Io {
            location: "store sync".into(),
            source: std::io::Error::other(e.to_string()),
        })),
    }
}

/// Back-off between start-up attempts to read an unreachable store.
const START_RETRY_MIN: Duration = Duration::from_millis(250);
const START_RETRY_MAX: Duration = Duration::from_secs(5);

/// `softprompt serve`: runs until SIGTERM/SIGINT, then shuts down
/// gracefully and returns.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        // A signal while the model loads stops the start-up cleanly too.
        let server = tokio::select! {
            started = Server::start(args) => started?,
            _ = lifecycle::shutdown_signal() => return anyhow::Ok(()),
        };
        let lifecycle = server.state.lifecycle.clone();
        tokio::spawn(async move {
            lifecycle::shutdown_signal().await;
            lifecycle.begin_drain();
        });
        server.wait().await?;
        anyhow::Ok(())
    });
    // Blocking work still running (a tokenization, a store write whose
    // request is gone) must not hold the exit past the shutdown bound.
    runtime.shutdown_timeout(Duration::from_millis(100));
    result
}

/// Raises the soft open-files limit to the hard limit (one descriptor per
/// client connection) and returns the limit now in force, if known.
fn raise_open_files_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::debug!(open_files_limit = limit, "open-files limit");
            Some(limit)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
            rlimit::Resource::NOFILE.get().ok().map(|(soft, _)| soft)
        }
    }
}
