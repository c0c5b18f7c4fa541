//! Engine throughput on the default model. Prints numbers, asserts nothing.
//!
//! `cargo bench --bench engine` (model from `SOFTPROMPT_MODEL`, default
//! `models/all-MiniLM-L6-v2`; fetch it with `scripts/fetch_model.sh`).
//!
//! Prints: the f32 matmul rate at the model's own shapes (candle's `matmul`,
//! the reference; and the engine's own `kernels::matmul_wt`); tokens/s and
//! achieved GFLOP/s for a single-task batch (32 rows × 64 text tokens, one
//! shallow task) and for a mixed batch of the same rows over 8 tasks
//! (4 shallow, 4 deep, prompt lengths 5–32); and for short rows (sentences
//! of 10–40 tokens, 160 rows over 64 tasks, 32 shallow and 32 deep with
//! 20-token prompts) run as mixed batches of 64 rows and as one-task batches
//! of 1–4 rows, where per-batch fixed costs show; and the same short rows
//! in mixed batches of 1, 2, 4 … 64 rows (the cost of a batch against its
//! size, which `bench/online_model.py` fits as A + B·rows).
//!
//! The model is loaded as `serve` holds it (`load_serving_model`: weights
//! packed once for the fused forward); `SOFTPROMPT_QUANTIZE=int8` measures
//! `serve --quantize int8`'s forward instead of f32.

use candle_core::Device;
use softprompt::engine::synthetic::{Kind, random_input, random_task};
use softprompt::engine::{Engine, Kernels, Row, TaskModel, load_serving_model};
use softprompt::model::kernels::matmul_wt;
use softprompt::model::{ModelConfig, Quantize, ServeDtype};
use std::sync::Arc;
use std::time::Instant;

const ROWS: usize = 32;
const TEXT: usize = 64;
const SHORT_TASKS: usize = 64;

fn main() -> anyhow::Result<()> {
    let dir =
        std::env::var("SOFTPROMPT_MODEL").unwrap_or_else(|_| "models/all-MiniLM-L6-v2".into());
    let device = Device::Cpu;
    let quantize = match std::env::var("SOFTPROMPT_QUANTIZE").as_deref() {
        Ok("int8") => Quantize::Int8,
        Ok("" | "none") | Err(_) => Quantize::None,
        Ok(other) => anyhow::bail!("SOFTPROMPT_QUANTIZE={other}: expected int8 or none"),
    };
    let model = Arc::new(load_serving_model(
        std::path::Path::new(&dir),
        &device,
        Kernels::Auto,
        ServeDtype::F32,
        quantize,
    )?);
    let cfg = model.config().clone();
    let engine = Engine::new(model);
    println!(
        "model {dir}; threads {}; linear layers {quantize:?}",
        rayon_threads()
    );

    let inputs: Vec<_> = (0..ROWS)
        .map(|i| random_input(&cfg, TEXT, i as u64))
        .collect();
    let single = random_task(&cfg, &device, Kind::Shallow, 20, 2, 1)?;
    let single_rows: Vec<Row> = inputs
        .iter()
        .map(|input| Row {
            input,
            task: &single,
        })
        .collect();

    let lens = [5, 12, 20, 32, 8, 16, 24, 30];
    let tasks: Vec<TaskModel> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let kind = if i % 2 == 0 {
                Kind::Shallow
            } else {
                Kind::Deep
            };
            random_task(&cfg, &device, kind, n, 2 + i % 3, 100 + i as u64)
        })
        .collect::<Result<_, _>>()?;
    let mixed_rows: Vec<Row> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| Row {
            input,
            task: &tasks[i % tasks.len()],
        })
        .collect();

    // Short rows over 64 tasks: task i has 1 + i % 4 rows of 10–40 tokens.
    let short_tasks: Vec<TaskModel> = (0..SHORT_TASKS)
        .map(|i| {
            let kind = if i % 2 == 0 {
                Kind::Shallow
            } else {
                Kind::Deep
            };
            random_task(&cfg, &device, kind, 20, 2 + i % 3, 1000 + i as u64)
        })
        .collect::<Result<_, _>>()?;
    let mut short_inputs = Vec::new();
    for i in 0..SHORT_TASKS {
        for j in 0..1 + i % 4 {
            let seed = (i * 4 + j) as u64;
            short_inputs.push((
                i,
                random_input(&cfg, 10 + (seed * 7919 % 31) as usize, 5000 + seed),
            ));
        }
    }
    // One task per batch, as a queue that groups requests by task forms them.
    let per_task: Vec<Vec<Row>> = (0..SHORT_TASKS)
        .map(|i| {
            short_inputs
                .iter()
                .filter(|(t, _)| *t == i)
                .map(|(t, input)| Row {
                    input,
                    task: &short_tasks[*t],
                })
                .collect()
        })
        .collect();
    // The same rows interleaved over tasks, in batches of 64.
    let mut interleaved: Vec<Row> = Vec::new();
    for k in 0..4 {
        interleaved.extend(per_task.iter().filter_map(|b| b.get(k).copied()));
    }
    let short_mixed: Vec<Vec<Row>> = interleaved.chunks(64).map(<[Row]>::to_vec).collect();
    // The same rows in mixed batches of each size: the cost of a batch
    // against its rows, what the online queue model fits as A + B * rows.
    let sizes = [1usize, 2, 4, 8, 16, 32, 64];
    let by_size: Vec<Vec<Vec<Row>>> = sizes
        .iter()
        .map(|&n| interleaved.chunks(n).map(<[Row]>::to_vec).collect())
        .collect();
    let mut curve = vec![Vec::new(); sizes.len()];

    // Interleave the measurements over several rounds and report medians,
    // so that load from other processes hits all of them alike.
    let rounds = 5;
    let (mut mm, mut mo, mut ss, mut ms) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut sm, mut sp) = (Vec::new(), Vec::new());
    // Per-op times of each scenario (SOFTPROMPT_PROFILE=1).
    let mut prof = vec![Vec::new(); 4];
    let mut took = |i: usize| softprompt::profile::merge(&mut prof[i], softprompt::profile::take());
    for _ in 0..rounds {
        mm.push(matmul_rate(&cfg, &device)?);
        mo.push(own_matmul_rate(&cfg));
        ss.push(measure(
            &engine,
            std::slice::from_ref(&single_rows),
            &cfg,
            4,
        )?);
        took(0);
        ms.push(measure(
            &engine,
            std::slice::from_ref(&mixed_rows),
            &cfg,
            4,
        )?);
        took(1);
        sm.push(measure(&engine, &short_mixed, &cfg, 1)?);
        took(2);
        sp.push(measure(&engine, &per_task, &cfg, 1)?);
        took(3);
        for (c, batches) in curve.iter_mut().zip(&by_size) {
            c.push(measure(&engine, batches, &cfg, 1)?.0);
            softprompt::profile::take();
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let matmul = median(mm);
    let own = median(mo);
    let s = (
        median(ss.iter().map(|x| x.0).collect()),
        median(ss.iter().map(|x| x.1).collect()),
    );
    let m = (
        median(ms.iter().map(|x| x.0).collect()),
        median(ms.iter().map(|x| x.1).collect()),
    );
    let ratio = median(ss.iter().zip(&ms).map(|(a, b)| b.0 / a.0).collect());
    println!("medians over {rounds} interleaved rounds");
    println!("matmul f32 at model shapes: {matmul:.1} GFLOP/s");
    println!(
        "engine's own matmul (kernels::matmul_wt) at the same shapes: {own:.1} GFLOP/s ({:.0}% of candle's)",
        100.0 * own / matmul
    );
    println!(
        "single-task {ROWS}x{TEXT}: {:.0} text tokens/s, {:.1} GFLOP/s ({:.0}% of matmul)",
        s.0,
        s.1,
        100.0 * s.1 / matmul
    );
    println!(
        "mixed 8 tasks {ROWS}x{TEXT}: {:.0} text tokens/s, {:.1} GFLOP/s ({:.0}% of matmul)",
        m.0,
        m.1,
        100.0 * m.1 / matmul
    );
    println!("mixed / single throughput (median of per-round ratios): {ratio:.3}");
    let short = |name: &str, v: &[(f64, f64)], batches: usize| {
        let (t, g) = (
            median(v.iter().map(|x| x.0).collect()),
            median(v.iter().map(|x| x.1).collect()),
        );
        println!(
            "short rows, {name} ({} rows in {batches} batches): {t:.0} text tokens/s, {g:.1} GFLOP/s ({:.0}% of matmul)",
            short_inputs.len(),
            100.0 * g / matmul
        );
    };
    short(
        &format!("{SHORT_TASKS} tasks mixed"),
        &sm,
        short_mixed.len(),
    );
    short("one task per batch", &sp, per_task.len());
    let per_batch = median(sp.iter().zip(&sm).map(|(a, b)| a.0 / b.0).collect());
    println!("short rows, one-task batches / mixed batches throughput: {per_batch:.3}");
    let text: usize = interleaved.iter().map(|r| r.input.len()).sum();
    println!("short rows in mixed batches of n rows: ms per batch, ms per row, text tokens/s");
    for (&n, c) in sizes.iter().zip(curve) {
        let rate = median(c);
        let per_row = 1e3 * text as f64 / rate / interleaved.len() as f64;
        println!(
            "  n = {n:>2}: {:7.2} ms per batch, {per_row:.3} ms per row, {rate:.0} text tokens/s",
            per_row * n as f64
        );
    }
    if softprompt::profile::on() {
        let names = [
            "single task",
            "mixed 8 tasks",
            "short rows, 64 tasks mixed",
            "short rows, one task per batch",
        ];
        for (name, p) in names.iter().zip(&prof) {
            println!("\nper-op time, {name} (SOFTPROMPT_PROFILE=1):");
            softprompt::profile::print_table(p);
        }
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Useful FLOPs of one row (`softprompt::model::cost::encoder_flops`).
pub fn row_flops(cfg: &ModelConfig, positions: usize, keys: usize, read: usize) -> f64 {
    softprompt::model::cost::encoder_flops(cfg, positions, keys, read)
}

/// (text tokens/s, useful GFLOP/s) of running every batch `iters` times,
/// after one warm-up pass.
fn measure(
    engine: &Engine,
    batches: &[Vec<Row>],
    cfg: &ModelConfig,
    iters: usize,
) -> anyhow::Result<(f64, f64)> {
    let rows = batches.iter().flatten();
    let flops: f64 = rows
        .clone()
        .map(|r| {
            let q = r.input.len() + r.task.shallow_len();
            row_flops(
                cfg,
                q,
                q + r.task.deep_len(),
                r.task.pooling.positions_read(q),
            )
        })
        .sum();
    let text: usize = rows.map(|r| r.input.len()).sum();
    for b in batches {
        engine.classify(b)?; // warm-up
    }
    let t = Instant::now();
    for _ in 0..iters {
        for b in batches {
            engine.classify(b)?;
        }
    }
    let secs = t.elapsed().as_secs_f64() / iters as f64;
    Ok((text as f64 / secs, flops / secs / 1e9))
}

/// The f32 matmul rate at the model's shapes through candle's `matmul`
/// (gemm with its own threading): the reference the forward is measured
/// against.
fn matmul_rate(cfg: &ModelConfig, device: &Device) -> anyhow::Result<f64> {
    Ok(softprompt::model::cost::matmul_rate(
        cfg,
        device,
        ROWS * (TEXT + 20),
        8,
    )?)
}

/// The same rate through the engine's own matmul (gemm split over threads
/// by output blocks), printed so that the forward's share can be read
/// against both.
fn own_matmul_rate(cfg: &ModelConfig) -> f64 {
    let n = ROWS * (TEXT + 20);
    let h = cfg.hidden_size;
    let i = cfg.intermediate_size;
    let mut total_flops = 0.0;
    let mut total_secs = 0.0;
    for (k, m) in [(h, 3 * h), (h, h), (h, i), (i, h)] {
        let x: Vec<f32> = (0..n * k).map(|v| (v % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..m * k).map(|v| (v % 5) as f32 * 0.1).collect();
        let mut out = vec![0f32; n * m];
        matmul_wt(&mut out, &x, &w, k); // warm-up
        let iters = 8;
        let t = Instant::now();
        for _ in 0..iters {
            matmul_wt(&mut out, &x, &w, k);
        }
        total_secs += t.elapsed().as_secs_f64();
        total_flops += 2.0 * (n * k * m) as f64 * iters as f64;
    }
    total_flops / total_secs / 1e9
}
