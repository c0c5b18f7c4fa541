//! Registry cost with many tasks loaded. Prints numbers, asserts nothing.
//!
//! `cargo bench --bench registry` (model from `SOFTPROMPT_MODEL`, default
//! `models/all-MiniLM-L6-v2`; fetch it with `scripts/fetch_model.sh`;
//! `REGISTRY_TASKS` overrides the 10,000 tasks).
//!
//! Loads shallow tasks of 20 virtual tokens (2 labels, linear head on the
//! pooler) into a `Registry` in three steps (10, 1,000, 10,000 tasks) and at
//! each step prints: the resident-set growth since the empty registry
//! (VmRSS from /proc/self/status), the cost of one `Registry::get`, and the
//! cost of assembling one 32-row batch (`engine::assemble::assemble`) whose
//! rows belong to 10 tasks picked at random among those loaded. The batch
//! shape is the same at every step, so any growth is the task count's doing.

use candle_core::Device;
use softprompt::engine::Row;
use softprompt::engine::assemble::assemble;
use softprompt::engine::synthetic::{Kind, random_input, random_task};
use softprompt::model::Model;
use softprompt::registry::{LoadedTask, Registry};
use softprompt::task::{BaseModelRef, Limits, Provenance, Task, TaskMeta, default_labels};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

const VIRTUAL: usize = 20;
const LABELS: usize = 2;
const ROWS: usize = 32;
const TASKS_PER_BATCH: usize = 10;
const TEXT: usize = 24;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Small deterministic generator for picking ids (no dependency on rand's API).
struct Pick(u64);
impl Pick {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn id(i: usize) -> String {
    format!("task-{i:05}")
}

/// Median of `reps` timings of `iters` calls, in nanoseconds per call.
fn time_ns(reps: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[reps / 2]
}

fn main() -> anyhow::Result<()> {
    let dir =
        std::env::var("SOFTPROMPT_MODEL").unwrap_or_else(|_| "models/all-MiniLM-L6-v2".into());
    let total: usize = std::env::var("REGISTRY_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let device = Device::Cpu;
    let model = Arc::new(Model::load(std::path::Path::new(&dir), &device)?);
    let cfg = model.config().clone();
    let registry = Registry::new(model.clone(), Limits::default());
    let per_task = (VIRTUAL * cfg.hidden_size + LABELS * cfg.hidden_size + LABELS) * 4;
    println!(
        "model {dir} (hidden {}); tasks: shallow, {VIRTUAL} virtual tokens, {LABELS} labels = {per_task} tensor bytes each",
        cfg.hidden_size
    );

    let inputs: Vec<_> = (0..ROWS)
        .map(|i| random_input(&cfg, TEXT, i as u64))
        .collect();
    let rss0 = rss_kib();
    let mut loaded = 0;
    let mut pick = Pick(0x2545_F491_4F6C_DD1D);
    println!(
        "{:>8} {:>14} {:>15} {:>12} {:>22}",
        "tasks", "RSS growth MiB", "KiB/task (RSS)", "get() ns", "assemble 32 rows µs"
    );
    for step in [10, 1_000, total] {
        let load_start = Instant::now();
        while loaded < step {
            let tm = random_task(&cfg, &device, Kind::Shallow, VIRTUAL, LABELS, loaded as u64)?;
            let meta = TaskMeta {
                labels: default_labels(LABELS),
                template: None,
                pooling: tm.pooling,
                base_model: BaseModelRef {
                    name: model.name.clone(),
                    fingerprint: Some(model.fingerprint.clone()),
                },
                provenance: Provenance::default(),
            };
            let task = Task::new(meta, tm)?;
            registry.insert(&id(loaded), &task)?;
            loaded += 1;
        }
        let load_s = load_start.elapsed().as_secs_f64();
        let grown = rss_kib().saturating_sub(rss0);

        // Lookup: one get() of a random loaded id (id strings prepared up front).
        let ids: Vec<String> = (0..4096).map(|_| id(pick.next(loaded))).collect();
        let mut k = 0;
        let get_ns = time_ns(7, 200_000, || {
            k = (k + 1) & 4095;
            black_box(registry.get(black_box(&ids[k])));
        });

        // Assembly: 32 rows over 10 random loaded tasks, resolved once.
        let held: Vec<Arc<LoadedTask>> = (0..TASKS_PER_BATCH)
            .map(|_| registry.get(&id(pick.next(loaded))).expect("loaded"))
            .collect();
        let rows: Vec<Row> = inputs
            .iter()
            .enumerate()
            .map(|(i, input)| Row {
                input,
                task: &held[i % TASKS_PER_BATCH].model,
            })
            .collect();
        let asm_ns = time_ns(7, 200, || {
            black_box(
                assemble(&rows, &cfg, model.encoder.word_embeddings(), &device).expect("assemble"),
            );
        });
        println!(
            "{:>8} {:>14.1} {:>15.1} {:>12.0} {:>22.1}   (loading took {load_s:.1} s)",
            loaded,
            grown as f64 / 1024.0,
            grown as f64 / loaded as f64,
            get_ns,
            asm_ns / 1000.0
        );
    }
    println!(
        "tensor bytes alone for {loaded} tasks: {:.1} MiB",
        (loaded * per_task) as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}
