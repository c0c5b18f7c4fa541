//! Dynamic batching between the HTTP handlers and the engine.
//!
//! Data flows one way: a handler tokenizes its inputs (off the inference
//! thread), resolves its task once, and [`Batcher::submit`]s one entry per
//! input into a bounded [`queue`]. One dedicated inference thread
//! ([`worker`]) owns the [`Engine`]: it takes the oldest waiting row, adds
//! the rows closest to it in length that fit a padded-token budget
//! ([`former`]), whatever their task, runs them as one forward pass and
//! answers each row on its own oneshot channel. Rows whose client hung up
//! (receiver dropped) are discarded before compute; a full queue refuses
//! new work instead of growing.

pub mod former;
pub mod metrics;
mod queue;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::engine::Engine;
use crate::model::Encoded;
use crate::registry::LoadedTask;
use queue::Queue;

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
    /// runs anyway. Under load the queue fills while the engine computes, so
    /// this only matters when traffic is light.
    pub wait: Duration,
    /// Most rows waiting at once; past it, submissions are refused.
    pub queue_capacity: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch_tokens: 16_384,
            max_batch_rows: 64,
            wait: Duration::from_millis(2),
            queue_capacity: 1024,
        }
    }
}

/// Why rows were not (or could not be) scored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    /// Admission would push the queue past its bound.
    #[error("queue full: {waiting} rows waiting, {requested} more would exceed the bound of {capacity}")]
    QueueFull {
        waiting: usize,
        requested: usize,
        capacity: usize,
    },
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
    warm: Arc<AtomicBool>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Batcher {
    /// Starts the inference thread, which warms the engine up (one forward
    /// per prompt kind) before it takes work; see [`Batcher::is_warm`].
    pub fn start(engine: Engine, config: BatchConfig) -> std::io::Result<Self> {
        let queue = Arc::new(Queue::new(config.queue_capacity));
        let warm = Arc::new(AtomicBool::new(false));
        let thread = {
            let (queue, warm) = (queue.clone(), warm.clone());
            std::thread::Builder::new()
                .name("softprompt-infer".into())
                .spawn(move || worker::run(engine, config, queue, warm))?
        };
        Ok(Batcher {
            queue,
            warm,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Queues one row per input for `task`, all or none: a request is
    /// never half admitted. The task is the version resolved at admission.
    pub fn submit(&self, task: Arc<LoadedTask>, inputs: Vec<Encoded>) -> Result<Pending, BatchError> {
        let now = Instant::now();
        let mut receivers = Vec::with_capacity(inputs.len());
        let entries = inputs
            .into_iter()
            .map(|input| {
                let (reply, rx) = oneshot::channel();
                receivers.push(rx);
                Entry {
                    input,
                    task: task.clone(),
                    reply,
                    enqueued: now,
                }
            })
            .collect();
        self.queue.push(entries)?;
        Ok(Pending { receivers })
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
    /// the queue is full. For maintenance windows and for tests that need
    /// requests to stay in flight or the queue to fill deterministically.
    pub fn pause(&self) -> PauseGuard {
        self.queue.pause();
        PauseGuard {
            queue: self.queue.clone(),
        }
    }

    /// Refuses new work, lets the thread finish every queued row (pauses
    /// no longer hold it), and joins it. Blocks: call from a blocking
    /// context.
    pub fn shutdown(&self) {
        self.queue.close();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("inference thread panicked");
            }
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
