//! The inference thread: the only code that runs the engine while serving.

use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::metrics as m;
use super::queue::Queue;
use super::{BatchConfig, BatchError, Entry, former};
use crate::engine::synthetic::{Kind, random_input, random_task};
use crate::engine::{Engine, Row};

/// Warms up, then forms and runs batches until the queue is closed and
/// drained, with the engine's parallel work on [`compute_pool`].
pub(super) fn run(engine: Engine, config: BatchConfig, queue: Arc<Queue>, warm: Arc<AtomicBool>) {
    match compute_pool() {
        Ok(pool) => pool.install(|| serve(engine, config, queue, warm)),
        Err(e) => {
            tracing::warn!(error = %e, "no thread pool of its own for the inference thread; using rayon's global pool");
            serve(engine, config, queue, warm)
        }
    }
}

/// The pool the engine's kernels (ours and gemm's, both rayon) run on while
/// serving: `RAYON_NUM_THREADS` (else one per CPU) threads, the inference
/// thread being one of them.
///
/// Why not rayon's global pool: from outside it, the inference thread hands
/// each batch to the pool's workers and sleeps, so a 2-CPU machine runs 3
/// compute threads, which the scheduler may stack two to a CPU after an idle
/// gap. With the inference thread inside its pool there are as many threads
/// as CPUs and the one that formed the batch computes its share. Measured on
/// 2 CPUs (AMD EPYC, single sequential requests): p50 after 100 ms idle
/// 14.2-14.7 ms against 14.8-16.2 ms on the global pool, back to back the
/// same (~9-10 ms). (The rest of the idle penalty is not the thread count.)
/// Rayon leaks a pool that adopts its builder thread; this one lives as long
/// as the process's one inference thread.
fn compute_pool() -> Result<rayon::ThreadPool, rayon::ThreadPoolBuildError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(candle_core::utils::get_num_threads().max(1))
        .thread_name(|i| format!("softprompt-compute-{i}"))
        .use_current_thread()
        .build()
}

fn serve(engine: Engine, config: BatchConfig, queue: Arc<Queue>, warm: Arc<AtomicBool>) {
    match warm_up(&engine) {
        Ok(()) => warm.store(true, Ordering::Release),
        // Not warm means not ready: the server keeps answering 503 on /ready
        // and the log says why, rather than failing requests one by one.
        Err(e) => {
            tracing::error!(error = %e, "engine warm-up failed; the server will not report ready")
        }
    }
    let mut batches = 0u64;
    while let Some(batch) = queue.next_batch(&config) {
        if config
            .faults
            .worker_panic_after
            .is_some_and(|n| batches >= n)
        {
            panic!("injected fault: worker-panic-after={batches}");
        }
        if let Some(delay) = config.faults.batch_delay {
            std::thread::sleep(delay);
        }
        run_batch(&engine, &queue, batch, config.faults.batch_fail);
        batches += 1;
        keep_warm(&queue, config.spin);
    }
    tracing::debug!("inference thread stopped");
}

/// Keeps every compute thread busy for up to `spin` while the queue stays
/// empty, then lets them sleep.
///
/// Why: measured in process (`cargo bench --bench idle`, AMD EPYC Zen 3, 2
/// threads, one row of 40 positions): 11.8 ms back to back, 24.5 ms after
/// 100 ms of sleep, with every op (matmuls, attention, norms) slower
/// alike, and no penalty when both threads spin through the gap while
/// spinning the inference thread alone kept it: the CPUs' idle state, not
/// the caches or the thread wake-up. OpenMP runtimes spin for the same
/// reason (Intel's KMP_BLOCKTIME, 200 ms). Hand-written because rayon's
/// threads spin only microseconds before they sleep and have no setting
/// for it.
///
/// The threads poll the queue's event counter (no lock), with pause hints
/// and a yield to any other runnable thread (the HTTP runtime that is
/// about to push the request) on each round.
fn keep_warm(queue: &Queue, spin: std::time::Duration) {
    if spin.is_zero() {
        return;
    }
    let seen = queue.events();
    if queue.len() > 0 {
        return;
    }
    // A spin too long for the clock (any u64 of ms is a valid flag) lasts
    // until work arrives or the queue closes.
    let deadline = Instant::now().checked_add(spin);
    rayon::broadcast(|_| {
        while queue.events() == seen && deadline.is_none_or(|d| Instant::now() < d) {
            for _ in 0..64 {
                std::hint::spin_loop();
            }
            std::thread::yield_now();
        }
    });
}

/// One forward pass per prompt kind, so allocations and lazily built
/// kernels are paid before the first request.
fn warm_up(engine: &Engine) -> Result<(), String> {
    let model = engine.model();
    let config = model.config();
    let device = model.encoder.device();
    let input = random_input(config, 8.min(config.max_sequence()), 0);
    for kind in [Kind::Shallow, Kind::Deep] {
        let task = random_task(config, device, kind, 2, 2, 0).map_err(|e| e.to_string())?;
        engine
            .classify(&[Row {
                input: &input,
                task: &task,
            }])
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn run_batch(engine: &Engine, queue: &Queue, batch: Vec<Entry>, inject_failure: bool) {
    let started = Instant::now();
    // Last look for hung-up clients: their rows would be computed for nobody.
    let (batch, gone): (Vec<Entry>, Vec<Entry>) =
        batch.into_iter().partition(|e| !e.reply.is_closed());
    if !gone.is_empty() {
        queue.note_abandoned(gone.len());
    }
    if batch.is_empty() {
        return;
    }
    for e in &batch {
        metrics::histogram!(m::QUEUE_SECONDS)
            .record(started.duration_since(e.enqueued).as_secs_f64());
    }
    let tasks: HashSet<*const crate::registry::LoadedTask> =
        batch.iter().map(|e| Arc::as_ptr(&e.task)).collect();
    queue.note_batch(batch.len());
    metrics::histogram!(m::BATCH_ROWS).record(batch.len() as f64);
    metrics::histogram!(m::BATCH_TASKS).record(tasks.len() as f64);
    metrics::histogram!(m::BATCH_TOKENS)
        .record(former::padded_tokens(batch.iter().map(Entry::cost)) as f64);

    let rows: Vec<Row> = batch
        .iter()
        .map(|e| Row {
            input: &e.input,
            task: &e.task.model,
        })
        .collect();
    // A panic in the engine must not take the thread (and so every later
    // request) down with it: it fails this batch only.
    let result = match catch_unwind(AssertUnwindSafe(|| {
        if inject_failure {
            return Err(candle_core::Error::Msg("injected fault: batch-fail".into()).into());
        }
        engine.classify(&rows)
    })) {
        Ok(Ok(logits)) => Ok(logits),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!("engine panicked: {}", panic_text(&*panic))),
    };
    drop(rows);
    metrics::histogram!(m::BATCH_SECONDS).record(started.elapsed().as_secs_f64());
    match result {
        Ok(logits) => {
            for (e, l) in batch.into_iter().zip(logits) {
                // The client may have gone meanwhile; nothing to do then.
                let _ = e.reply.send(Ok(l));
            }
        }
        Err(err) => {
            metrics::counter!(m::BATCH_FAILURES).increment(1);
            let mut requests: Vec<&str> = batch.iter().map(|e| &*e.request_id).collect();
            requests.dedup();
            tracing::error!(error = %err, rows = batch.len(), requests = ?requests, "batch failed");
            let err = BatchError::Engine(err);
            for e in batch {
                let _ = e.reply.send(Err(err.clone()));
            }
        }
    }
}

/// The message of a caught panic.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
