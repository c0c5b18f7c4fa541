//! The queue between admission (async handlers) and the inference thread;
//! its bound is the token admission in front of it ([`super::admission`]). A plain mutex + condvar: the worker is a std thread and blocks;
//! handlers only ever hold the lock for a push.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::metrics as m;
use super::{BatchConfig, BatchError, BatchStats, Entry, former};

struct State {
    entries: VecDeque<Entry>,
    closed: bool,
    paused: usize,
}

/// Rows waiting for the engine, in arrival order.
pub(super) struct Queue {
    state: Mutex<State>,
    ready: Condvar,
    abandoned: AtomicU64,
    batches: AtomicU64,
    rows_run: AtomicU64,
    /// Pushes and closes so far: what threads spinning for work watch
    /// without taking the lock ([`Queue::events`]).
    events: AtomicU64,
}

impl Queue {
    pub fn new() -> Self {
        Queue {
            state: Mutex::new(State {
                entries: VecDeque::new(),
                closed: false,
                paused: 0,
            }),
            ready: Condvar::new(),
            abandoned: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            rows_run: AtomicU64::new(0),
            events: AtomicU64::new(0),
        }
    }

    /// A counter that changes whenever rows are pushed or the queue is
    /// closed, readable without the lock.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the queue consistent (every
        // mutation is a single VecDeque call), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends all entries or none.
    pub fn push(&self, entries: Vec<Entry>) -> Result<(), BatchError> {
        let mut s = self.lock();
        if s.closed {
            return Err(BatchError::Closed);
        }
        s.entries.extend(entries);
        metrics::gauge!(m::QUEUE_ROWS).set(s.entries.len() as f64);
        drop(s);
        self.events.fetch_add(1, Ordering::Release);
        self.ready.notify_all();
        Ok(())
    }

    /// Counts rows dropped because their client hung up.
    pub fn note_abandoned(&self, n: usize) {
        self.abandoned.fetch_add(n as u64, Ordering::Relaxed);
        metrics::counter!(m::ROWS_ABANDONED).increment(n as u64);
    }

    /// Counts a forward pass of `rows` rows.
    pub fn note_batch(&self, rows: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.rows_run.fetch_add(rows as u64, Ordering::Relaxed);
    }

    pub fn stats(&self) -> BatchStats {
        BatchStats {
            batches: self.batches.load(Ordering::Relaxed),
            rows: self.rows_run.load(Ordering::Relaxed),
            abandoned: self.abandoned.load(Ordering::Relaxed),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn pause(&self) {
        self.lock().paused += 1;
    }

    pub fn resume(&self) {
        let mut s = self.lock();
        s.paused = s.paused.saturating_sub(1);
        drop(s);
        self.ready.notify_all();
    }

    /// True once [`Queue::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Answers every queued row [`BatchError::Closed`] and empties the
    /// queue: for when nobody will compute them.
    pub fn fail_all(&self) {
        let entries: Vec<Entry> = self.lock().entries.drain(..).collect();
        metrics::gauge!(m::QUEUE_ROWS).set(0.0);
        for e in entries {
            let _ = e.reply.send(Err(BatchError::Closed));
        }
    }

    /// Refuses further pushes; queued rows are still handed out.
    pub fn close(&self) {
        self.lock().closed = true;
        self.events.fetch_add(1, Ordering::Release);
        self.ready.notify_all();
    }

    /// Blocks until a batch is due and removes it from the queue; `None`
    /// once the queue is closed and empty. Rows whose client hung up are
    /// dropped here, before they cost compute.
    pub fn next_batch(&self, config: &BatchConfig) -> Option<Vec<Entry>> {
        let mut s = self.lock();
        loop {
            let before = s.entries.len();
            s.entries.retain(|e| !e.reply.is_closed());
            let abandoned = before - s.entries.len();
            if abandoned > 0 {
                self.note_abandoned(abandoned);
                metrics::gauge!(m::QUEUE_ROWS).set(s.entries.len() as f64);
            }
            if s.entries.is_empty() {
                if s.closed {
                    return None;
                }
                s = self.ready.wait(s).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            if s.paused > 0 && !s.closed {
                s = self.ready.wait(s).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // Light traffic: give the oldest row up to `wait` to find company,
            // unless the queue already holds a full batch.
            let deadline = s.entries[0].enqueued + config.wait;
            let now = Instant::now();
            if !s.closed && now < deadline && !holds_full_batch(&s.entries, config) {
                s = self
                    .ready
                    .wait_timeout(s, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            let costs: Vec<usize> = s.entries.iter().map(Entry::cost).collect();
            // Task ids only matter to the one-task benchmark policy; the
            // server's mixed policy does not pay for collecting them.
            let tasks: Vec<&str> = match config.policy {
                former::BatchPolicy::Mixed => Vec::new(),
                former::BatchPolicy::OneTask => {
                    s.entries.iter().map(|e| e.task.id.as_str()).collect()
                }
            };
            let picked = former::select_with(
                config.policy,
                &costs,
                &tasks,
                config.max_batch_tokens,
                config.max_batch_rows,
            );
            let batch = take(&mut s.entries, &picked);
            metrics::gauge!(m::QUEUE_ROWS).set(s.entries.len() as f64);
            return Some(batch);
        }
    }
}

fn holds_full_batch(entries: &VecDeque<Entry>, config: &BatchConfig) -> bool {
    entries.len() >= config.max_batch_rows
        || entries.iter().map(Entry::cost).sum::<usize>() >= config.max_batch_tokens
}

/// Removes the entries at `picked` (distinct indices), returned in the
/// order of `picked`; the rest keep their arrival order.
fn take(entries: &mut VecDeque<Entry>, picked: &[usize]) -> Vec<Entry> {
    let mut slots: Vec<Option<Entry>> = entries.drain(..).map(Some).collect();
    let batch = picked
        .iter()
        .map(|&i| slots[i].take().expect("picked indices are distinct"))
        .collect();
    entries.extend(slots.into_iter().flatten());
    batch
}
