//! Dynamic batching between the HTTP handlers and the engine.
//!
//! Data flows one way: a handler parses its body, takes its [`admission`]
//! in tokens (an upper bound, before any tokenizing; a full server refuses
//! here), tokenizes its inputs (off the inference thread), resolves its
//! task once, and [`Batcher::submit`]s one entry per input into the
//! [`queue`]. One dedicated inference thread ([`worker`]) owns the
//! [`Engine`]: it takes the oldest waiting row, adds the rows closest to it
//! in length that fit a padded-token budget ([`former`]), whatever their
//! task (only its task's under the benchmark-only [`BatchPolicy::OneTask`]),
//! runs them as one forward pass and answers each row on its own
//! oneshot channel. Rows whose client hung up (receiver dropped) are
//! discarded before compute.
//!
//! The inference thread is supervised: if it dies, queued rows are failed
//! at once and [`Batcher::died`] resolves with the reason, so the server
//! can report it and exit for its orchestrator to restart it.

pub mod admission;
pub mod former;
pub mod metrics;
mod queue;
mod worker;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use crate::engine::Engine;
use crate::faults::Faults;
use crate::model::Encoded;
use crate::registry::LoadedTask;
use admission::Admission;
pub use admission::Ticket;
pub use former::BatchPolicy;
use queue::Queue;
pub use worker::panic_text;

/// How batches are formed and how much may wait.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Most padded positions in one forward pass (rows × longest row): bounds
    /// the memory and latency of a batch. A single row larger than this
    /// still runs, alone.
    pub max_batch_tokens: usize,
    /// Most rows in one forward pass.
    pub max_batch_rows: usize,
    /// How long the oldest waiting row may wait for company before its batch
    /// runs anyway (`serve --batch-wait-ms`, 0 by default). Under load the
    /// queue fills while the engine computes, so this only matters when
    /// traffic is light, where it is added latency.
    pub wait: Duration,
    /// How long the compute threads spin after a batch, waiting for the
    /// next one, before they sleep (`serve --spin-ms`): a CPU that went
    /// idle runs the next forward much slower.
    pub spin: Duration,
    /// Most tokens (text, virtual tokens and deep prefix positions of
    /// every row) admitted and not yet answered; past it, requests are
    /// refused before they are tokenized.
    pub max_queued_tokens: usize,
    /// Which rows may share a batch: [`BatchPolicy::Mixed`] (any task)
    /// unless a benchmark measures the one-task baseline.
    pub policy: BatchPolicy,
    /// Injected faults (tests only; see [`crate::faults`]).
    pub faults: Faults,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch_tokens: 16_384,
            max_batch_rows: 64,
            wait: Duration::ZERO,
            spin: Duration::ZERO,
            max_queued_tokens: DEFAULT_MAX_QUEUED_TOKENS,
            policy: BatchPolicy::Mixed,
            faults: Faults::default(),
        }
    }
}

/// Default admission bound: ~16 s of work for the default model on 2 cores
/// (~4,000 positions/s), well inside the default 30 s request timeout, and
/// room for a full request (64 inputs of 512 tokens).
pub const DEFAULT_MAX_QUEUED_TOKENS: usize = 65_536;

/// Why rows were not (or could not be) scored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    /// Admission would push the admitted tokens past their bound.
    #[error(
        "server busy: {admitted} tokens admitted, {requested} more would exceed the bound of {capacity}"
    )]
    QueueFull {
        admitted: usize,
        requested: usize,
        capacity: usize,
    },
    /// The request alone needs more tokens than the server ever admits.
    #[error(
        "the request needs up to {requested} tokens, more than the {capacity} the server admits at once; send fewer or shorter inputs"
    )]
    TooLarge { requested: usize, capacity: usize },
    /// The batcher is stopping (or its thread is gone) and takes no work.
    #[error("the inference queue is closed")]
    Closed,
    /// The forward pass failed for the batch this row was in.
    #[error("inference failed: {0}")]
    Engine(String),
}

/// What the inference thread has done since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Forward passes run (warm-up excluded).
    pub batches: u64,
    /// Rows computed in them.
    pub rows: u64,
    /// Rows discarded before compute because their client hung up (or
    /// timed out).
    pub abandoned: u64,
}

/// The answer to one row: its logits, in the task's label order.
pub type RowResult = Result<Vec<f32>, BatchError>;

/// One row waiting for the engine.
pub(crate) struct Entry {
    /// The request's id, for the log of a failed batch.
    pub request_id: Arc<str>,
    pub input: Encoded,
    pub task: Arc<LoadedTask>,
    pub reply: oneshot::Sender<RowResult>,
    pub enqueued: Instant,
}

impl Entry {
    /// Positions the row occupies in a forward pass (text, virtual tokens
    /// and deep prefix): what the token budget counts.
    pub fn cost(&self) -> usize {
        self.input.len() + self.task.model.shallow_len() + self.task.model.deep_len()
    }
}

/// Logits of a submitted request, one per input, once the engine is done.
#[must_use = "dropping Pending abandons its rows"]
pub struct Pending {
    receivers: Vec<oneshot::Receiver<RowResult>>,
    /// The request's admission, held until its rows are answered.
    _ticket: Ticket,
}

impl Pending {
    /// Waits for every row. Dropping this future (client gone, timeout)
    /// drops the receivers, which tells the worker to skip the rows not yet
    /// computed.
    pub async fn wait(self) -> Result<Vec<Vec<f32>>, BatchError> {
        let mut out = Vec::with_capacity(self.receivers.len());
        for rx in self.receivers {
            // A dropped sender means the worker is gone without answering.
            out.push(rx.await.map_err(|_| BatchError::Closed)??);
        }
        Ok(out)
    }
}

/// Handle to the inference thread and its queue. Dropping it closes the
/// queue; the thread finishes what is queued and exits.
pub struct Batcher {
    queue: Arc<Queue>,
    admission: Admission,
    warm: Arc<AtomicBool>,
    /// Set (once) when the inference thread died unexpectedly.
    died: watch::Sender<Option<String>>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Batcher {
    /// Starts the inference thread, which warms the engine up (one forward
    /// per prompt kind) before it takes work; see [`Batcher::is_warm`].
    pub fn start(engine: Engine, config: BatchConfig) -> std::io::Result<Self> {
        let queue = Arc::new(Queue::new());
        let warm = Arc::new(AtomicBool::new(false));
        let died = watch::Sender::new(None);
        let admission = Admission::new(config.max_queued_tokens);
        let thread = {
            let (queue, warm, died) = (queue.clone(), warm.clone(), died.clone());
            std::thread::Builder::new()
                .name("softprompt-infer".into())
                .spawn(move || {
                    let outcome = catch_unwind(AssertUnwindSafe(|| {
                        worker::run(engine, config, queue.clone(), warm)
                    }));
                    // The worker returns only once the queue is closed and
                    // empty; anything else is a death the server must report.
                    let reason = match outcome {
                        Ok(()) if queue.is_closed() => return,
                        Ok(()) => "the inference thread stopped".to_string(),
                        Err(panic) => format!(
                            "the inference thread panicked: {}",
                            worker::panic_text(&*panic)
                        ),
                    };
                    tracing::error!(reason = %reason, "inference thread died");
                    // Nobody will compute what waits: answer it now.
                    queue.close();
                    queue.fail_all();
                    died.send_replace(Some(reason));
                })?
        };
        Ok(Batcher {
            queue,
            admission,
            warm,
            died,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Reserves `tokens` (an upper bound of what the request's rows will
    /// occupy) or refuses at once with [`BatchError::QueueFull`] (retry
    /// later) or [`BatchError::TooLarge`] (never fits).
    pub fn admit(&self, tokens: usize) -> Result<Ticket, BatchError> {
        if self.queue.is_closed() {
            return Err(BatchError::Closed);
        }
        self.admission.try_admit(tokens)
    }

    /// Tokens admitted and not yet answered.
    pub fn admitted_tokens(&self) -> usize {
        self.admission.admitted()
    }

    /// Resolves with the reason if the inference thread dies (never, while
    /// it is healthy or after a requested shutdown).
    pub async fn died(&self) -> String {
        let mut rx = self.died.subscribe();
        let reason = rx
            .wait_for(Option::is_some)
            .await
            .map(|r| r.clone().unwrap_or_default());
        match reason {
            Ok(reason) => reason,
            Err(_) => std::future::pending().await,
        }
    }

    /// Queues one row per input for `task`, all or none: a request is
    /// never half admitted. The task is the version resolved at admission;
    /// `ticket` is the request's admission, shrunk here to the exact cost.
    pub fn submit(
        &self,
        mut ticket: Ticket,
        request_id: Arc<str>,
        task: Arc<LoadedTask>,
        inputs: Vec<Encoded>,
    ) -> Result<Pending, BatchError> {
        let now = Instant::now();
        let mut receivers = Vec::with_capacity(inputs.len());
        let entries = inputs
            .into_iter()
            .map(|input| {
                let (reply, rx) = oneshot::channel();
                receivers.push(rx);
                Entry {
                    request_id: request_id.clone(),
                    input,
                    task: task.clone(),
                    reply,
                    enqueued: now,
                }
            })
            .collect::<Vec<Entry>>();
        ticket.shrink_to(entries.iter().map(Entry::cost).sum());
        self.queue.push(entries)?;
        Ok(Pending {
            receivers,
            _ticket: ticket,
        })
    }

    /// True once the warm-up forward passes have run: the first real
    /// request does not pay for lazy initialisation.
    pub fn is_warm(&self) -> bool {
        self.warm.load(Ordering::Acquire)
    }

    /// Rows waiting (not yet in a batch).
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// Counts since start: what the inference thread did with the rows it
    /// was given.
    pub fn stats(&self) -> BatchStats {
        self.queue.stats()
    }

    /// Holds batch formation until the guard drops; admission goes on until
    /// the token bound is reached. For maintenance windows and for tests that need
    /// requests to stay in flight or the queue to fill deterministically.
    pub fn pause(&self) -> PauseGuard {
        self.queue.pause();
        PauseGuard {
            queue: self.queue.clone(),
        }
    }

    /// Refuses new work, answers what is still queued [`BatchError::Closed`]
    /// (call it once the handlers are done: nobody waits for those rows),
    /// and waits up to `grace` for the thread to finish its batch. A batch
    /// that runs longer is left to end with the process. Blocks: call from
    /// a blocking context.
    pub fn shutdown(&self, grace: Duration) {
        self.queue.close();
        self.queue.fail_all();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(h) = handle else { return };
        let until = Instant::now() + grace;
        while !h.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        if h.is_finished() {
            let _ = h.join();
        } else {
            tracing::warn!("the inference thread is still in a batch; not waiting for it");
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// Keeps batch formation paused while alive (see [`Batcher::pause`]).
pub struct PauseGuard {
    queue: Arc<Queue>,
}

impl Drop for PauseGuard {
    fn drop(&mut self) {
        self.queue.resume();
    }
}
