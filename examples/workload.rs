//! Many-task workload benchmark, Rust side. `bench/run.sh` drives it; see
//! `bench/README.md` for the definitions and the numbers.
//!
//! ```text
//! workload prepare [--out bench/out] [--requests 2048] [--window 64]
//! workload run --round R [--out bench/out] [--warmup 4]
//! ```
//!
//! `prepare` builds the workload once and writes it where the PyTorch side
//! (`bench/peft_workload.py`) reads it: 64 synthetic tasks exported as HF
//! PEFT adapter directories (`adapters/tNN/`, through our own exporter),
//! the request list (`requests.jsonl`: text, task, token ids) and
//! `workload.json` (what was built, with which seeds).
//!
//! `run` times one round of four measurements and writes
//! `rust_round{R}.json`: (a) the engine on mixed-task batches, (b) the same
//! engine on one-task batches, the f32 matmul rate at the model's shapes
//! from which the roofline (d) follows, and (a0) the engine on the plain
//! encoder: the same requests with no prompt at all, every row of a task
//! with neither a shallow nor a deep prompt and the first task's pooling and
//! head, one batch per window, rows in arrival order -- the like-for-like
//! counterpart of ONNX Runtime's (e) and (f) (`bench/ort_workload.py`); then
//! (a0q) and (aq): (a0) and (a) again on the model served int8 (`serve
//! --quantize int8`), (a0q) being the counterpart of ONNX Runtime int8 (f).
//! The tasks are read back from the exported PEFT directories, so both
//! sides run the very same adapter files.
//!
//! Arrival, identical for (a), (b) and (c): requests arrive in file order;
//! the batcher takes windows of `window` consecutive requests (64 = the
//! server's default `max_batch_rows`; at these lengths its 16,384-token
//! budget never binds, which `prepare` checks). (a) runs each window as one
//! batch, rows in arrival order; (b) and (c) split each window into one
//! batch per task, tasks in order of first arrival in the window, rows in
//! arrival order.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::{Parser, Subcommand};
use serde_json::json;
use softprompt::engine::{Engine, TaskModel};
use softprompt::model::{Model, ModelConfig};
use softprompt::workload::{Spec, mixed, per_task, plain_pass, prepare, row_flops};

/// The server's default batch budget (`BatchConfig::default`), checked
/// against the windows so that "one window = one server batch" holds.
const SERVER_MAX_BATCH_TOKENS: usize = 16_384;

#[derive(Parser)]
#[command(about = "Many-task workload benchmark (Rust side); run via bench/run.sh")]
struct Args {
    /// Model directory.
    #[arg(long, default_value = "models/all-MiniLM-L6-v2", global = true)]
    model: PathBuf,
    /// Where the workload and the results live.
    #[arg(long, default_value = "bench/out", global = true)]
    out: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the tasks, export them as PEFT adapters, write the request list.
    Prepare {
        /// Number of requests (sentences, in file order).
        #[arg(long, default_value_t = 2048)]
        requests: usize,
        /// Requests per arrival window.
        #[arg(long, default_value_t = 64)]
        window: usize,
        /// Sentence files read in order until `requests` lines are taken.
        #[arg(long, default_values = ["data/sentiment/test.jsonl", "data/sentiment/train.jsonl"])]
        data: Vec<PathBuf>,
    },
    /// Time one round of (a), (b), the matmul rate and (a0); write rust_round{R}.json.
    Run {
        #[arg(long)]
        round: usize,
        /// Windows run untimed through each path first.
        #[arg(long, default_value_t = 4)]
        warmup: usize,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut model = Model::load(&args.model, &Device::Cpu)
        .with_context(|| format!("loading {}", args.model.display()))?;
    // As `serve` runs it: the linear weights packed once at load.
    model.encoder.pack(softprompt::model::Quantize::None)?;
    match args.cmd {
        Cmd::Prepare {
            requests,
            window,
            data,
        } => prepare(
            &model,
            &args.model,
            &args.out,
            &Spec {
                tasks: softprompt::workload::TASKS,
                requests,
                window,
                data: &data,
                max_batch_tokens: SERVER_MAX_BATCH_TOKENS,
                store: None,
            },
        ),
        Cmd::Run { round, warmup } => {
            // The same weights served int8 (`serve --quantize int8`).
            let mut int8 = Model::load(&args.model, &Device::Cpu)?;
            int8.encoder.pack(softprompt::model::Quantize::Int8)?;
            run(model, int8, &args.out, round, warmup)
        }
    }
}

fn run(model: Model, int8: Model, out: &Path, round: usize, warmup: usize) -> Result<()> {
    let cfg = model.config().clone();
    let device = Device::Cpu;
    let softprompt::workload::Loaded {
        workload,
        window,
        tasks,
        index,
        requests,
    } = softprompt::workload::load(out, &device, candle_core::DType::F32)?;
    let windows: Vec<&[softprompt::workload::Request]> = requests.chunks(window).collect();
    let engine = Engine::new(std::sync::Arc::new(model));

    // Work counts, identical for every path: text tokens are the request's
    // own tokens ([CLS] and [SEP] included), no virtual tokens, no padding.
    let text_tokens: usize = requests.iter().map(|r| r.input.len()).sum();
    let positions: usize = requests
        .iter()
        .map(|r| r.input.len() + tasks[r.task].shallow_len())
        .sum();
    let flops: f64 = requests
        .iter()
        .map(|r| {
            let t = &tasks[r.task];
            let q = r.input.len() + t.shallow_len();
            row_flops(
                &cfg,
                q,
                q + t.deep_len(),
                t.pooling.positions_read(q),
                t.num_labels(),
            )
        })
        .sum();
    // The matmul rate is measured with as many rows as a window packs on
    // average: the shapes the engine's linear layers see in this workload.
    let matmul_rows = positions.div_ceil(windows.len());

    let warm = &windows[..warmup.min(windows.len())];
    mixed(&engine, &tasks, warm)?;
    per_task(&engine, &tasks, warm)?;

    let matmul = matmul_rate(&cfg, &device, matmul_rows)?;
    // With SOFTPROMPT_PROFILE=1, a per-op table for each timed path (the
    // timers then cost a little, so compare profiled runs only with each other).
    let profiling = std::env::var("SOFTPROMPT_PROFILE").is_ok_and(|v| v != "0" && !v.is_empty());
    softprompt::profile::take();
    let t = Instant::now();
    let (logits_a, batches_a) = mixed(&engine, &tasks, &windows)?;
    let secs_a = t.elapsed().as_secs_f64();
    if profiling {
        println!("(a) mixed, per op:");
        softprompt::profile::print();
    }
    let t = Instant::now();
    let (logits_b, batches_b) = per_task(&engine, &tasks, &windows)?;
    let secs_b = t.elapsed().as_secs_f64();
    if profiling {
        println!("(b) per task, per op:");
        softprompt::profile::print();
    }

    // (a0): the plain encoder, no prompt, the first task's pooling and head
    // (so its logits can be checked against ONNX Runtime's pooler output
    // through the same head). Run after (a) and (b), which stay as they were.
    let plain_task = workload["tasks"][0]["id"]
        .as_str()
        .context("task id")?
        .to_string();
    let plain = {
        let t = &tasks[index[&plain_task]];
        TaskModel {
            shallow: None,
            deep: None,
            head: t.head.clone(),
            pooling: t.pooling,
        }
    };
    plain_pass(&engine, &plain, warm)?;
    softprompt::profile::take();
    let t = Instant::now();
    let (logits_a0, batches_a0) = plain_pass(&engine, &plain, &windows)?;
    let secs_a0 = t.elapsed().as_secs_f64();
    if profiling {
        println!("(a0) plain encoder, per op:");
        softprompt::profile::print();
    }

    // (a0q), (aq): (a0) and (a) on the int8 model, after the f32 paths.
    let engine_q = Engine::new(std::sync::Arc::new(int8));
    plain_pass(&engine_q, &plain, warm)?;
    mixed(&engine_q, &tasks, warm)?;
    softprompt::profile::take();
    let t = Instant::now();
    let (logits_a0q, _) = plain_pass(&engine_q, &plain, &windows)?;
    let secs_a0q = t.elapsed().as_secs_f64();
    if profiling {
        println!("(a0q) plain encoder int8, per op:");
        softprompt::profile::print();
    }
    let t = Instant::now();
    let (logits_aq, _) = mixed(&engine_q, &tasks, &windows)?;
    let secs_aq = t.elapsed().as_secs_f64();

    let max_ab = softprompt::workload::max_abs_diff(&logits_a, &logits_b);
    let threads = candle_core::utils::get_num_threads();
    println!(
        "round {round}: (a) mixed {:.0} text tokens/s ({secs_a:.2} s, {batches_a} batches); \
         (b) per task {:.0} text tokens/s ({secs_b:.2} s, {batches_b} batches); \
         matmul {matmul:.1} GFLOP/s at {matmul_rows} rows -> roofline {:.0} text tokens/s; \
         (a0) plain encoder {:.0} text tokens/s ({secs_a0:.2} s, {batches_a0} batches); \
         int8 ({:?}): (a0q) plain {:.0}, (aq) mixed {:.0} text tokens/s; \
         max |a-b| {max_ab:.2e}; {threads} threads",
        text_tokens as f64 / secs_a,
        text_tokens as f64 / secs_b,
        text_tokens as f64 / (flops / (matmul * 1e9)),
        text_tokens as f64 / secs_a0,
        softprompt::model::kernels::int8::Int8Kernel::detect(),
        text_tokens as f64 / secs_a0q,
        text_tokens as f64 / secs_aq,
    );
    let result = json!({
        "round": round,
        "threads": threads,
        "rayon_threads": rayon::current_num_threads(),
        "requests": requests.len(),
        "window": window,
        "text_tokens": text_tokens,
        "positions": positions,
        "flops": flops,
        "matmul_rows": matmul_rows,
        "matmul_gflops": matmul,
        "secs_a": secs_a,
        "secs_b": secs_b,
        "batches_a": batches_a,
        "batches_b": batches_b,
        "logits_a": logits_a,
        "logits_b": logits_b,
        "secs_a0": secs_a0,
        "batches_a0": batches_a0,
        "plain_head_task": plain_task,
        "logits_a0": logits_a0,
        "int8_kernel": format!("{:?}", softprompt::model::kernels::int8::Int8Kernel::detect()),
        "secs_a0q": secs_a0q,
        "logits_a0q": logits_a0q,
        "secs_aq": secs_aq,
        "logits_aq": logits_aq,
    });
    std::fs::write(
        out.join(format!("rust_round{round}.json")),
        serde_json::to_vec(&result)?,
    )?;
    Ok(())
}

/// f32 matmul rate (GFLOP/s) at the encoder's linear shapes with `n` rows
/// (`softprompt::model::cost::matmul_rate`, 16 timed calls per shape).
fn matmul_rate(cfg: &ModelConfig, device: &Device, n: usize) -> Result<f64> {
    if n == 0 {
        bail!("no rows to measure the matmul rate with");
    }
    Ok(softprompt::model::cost::matmul_rate(cfg, device, n, 16)?)
}
