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

use std::collections::HashMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use candle_core::Device;
use clap::{Parser, Subcommand};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use softprompt::engine::synthetic::{Kind, random_task};
use softprompt::engine::{Engine, Row, TaskModel};
use softprompt::model::{Encoded, Model, ModelConfig};
use softprompt::task::{BaseModelRef, Provenance, Task, TaskMeta, default_labels, peft};

/// Tasks in the workload: half shallow (PROMPT_TUNING), half deep (PREFIX_TUNING).
const TASKS: usize = 64;
/// Labels of every task. One count for all: PEFT keeps one classifier
/// module per base model and swaps in each adapter's copy, so a second
/// shape would not load into the same `PeftModel`.
const LABELS: usize = 2;
/// Virtual-token range of the tasks (inclusive).
const PROMPT_MIN: usize = 5;
const PROMPT_MAX: usize = 32;
/// Seeds: prompt lengths, then each task's tensors (`TASK_SEED + i`), then
/// the task of each request.
const LENGTH_SEED: u64 = 7001;
const TASK_SEED: u64 = 7100;
const REQUEST_SEED: u64 = 7002;
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
        } => prepare(&model, &args.model, &args.out, requests, window, &data),
        Cmd::Run { round, warmup } => {
            // The same weights served int8 (`serve --quantize int8`).
            let mut int8 = Model::load(&args.model, &Device::Cpu)?;
            int8.encoder.pack(softprompt::model::Quantize::Int8)?;
            run(model, int8, &args.out, round, warmup)
        }
    }
}

fn task_id(i: usize) -> String {
    format!("t{i:02}")
}

fn prepare(
    model: &Model,
    model_dir: &Path,
    out: &Path,
    n_requests: usize,
    window: usize,
    data: &[PathBuf],
) -> Result<()> {
    ensure!(
        window >= 1 && n_requests >= 1,
        "window and requests must be ≥ 1"
    );
    let cfg = model.config();
    let adapters = out.join("adapters");
    if adapters.exists() {
        // Stale adapters from another task count must not linger.
        std::fs::remove_dir_all(&adapters)?;
    }
    let mut lengths = StdRng::seed_from_u64(LENGTH_SEED);
    let mut tasks = Vec::with_capacity(TASKS);
    let mut task_info = Vec::with_capacity(TASKS);
    for i in 0..TASKS {
        // Alternate kinds so that both halves see the same length draws.
        let kind = if i % 2 == 0 {
            Kind::Shallow
        } else {
            Kind::Deep
        };
        let n = lengths.random_range(PROMPT_MIN..=PROMPT_MAX);
        let m = random_task(cfg, &Device::Cpu, kind, n, LABELS, TASK_SEED + i as u64)?;
        let meta = TaskMeta {
            labels: default_labels(LABELS),
            template: None,
            pooling: m.pooling,
            base_model: BaseModelRef {
                name: model.name.clone(),
                fingerprint: Some(model.fingerprint.clone()),
            },
            provenance: Provenance {
                method: "synthetic".into(),
                ..Default::default()
            },
        };
        let task = Task::new(meta, m)?;
        let id = task_id(i);
        peft::write_dir(&task, &adapters.join(&id))
            .with_context(|| format!("exporting task {id} as a PEFT adapter"))?;
        let peft_type = if kind == Kind::Shallow {
            "PROMPT_TUNING"
        } else {
            "PREFIX_TUNING"
        };
        task_info.push(json!({"id": id, "peft_type": peft_type, "num_virtual_tokens": n}));
        tasks.push(task.model);
    }

    let texts = read_texts(data, n_requests)?;
    let mut pick = StdRng::seed_from_u64(REQUEST_SEED);
    let mut lines = Vec::with_capacity(n_requests);
    let mut costs = Vec::with_capacity(n_requests);
    for (i, text) in texts.iter().enumerate() {
        let t = pick.random_range(0..TASKS);
        let budget = tasks[t].text_budget(cfg);
        let enc = model
            .tokenizer
            .encode(text, None, budget, false)
            .with_context(|| format!("request {i}: {text:?}"))?;
        costs.push(enc.len() + tasks[t].shallow_len() + tasks[t].deep_len());
        lines.push(json!({"text": text, "task": task_id(t), "ids": enc.ids}));
    }
    for (w, c) in costs.chunks(window).enumerate() {
        let padded = c.len() * c.iter().max().copied().unwrap_or(0);
        ensure!(
            padded <= SERVER_MAX_BATCH_TOKENS,
            "window {w}: {padded} padded positions exceed the server's budget of {SERVER_MAX_BATCH_TOKENS}; use a smaller --window"
        );
    }
    std::fs::create_dir_all(out)?;
    let mut f = BufWriter::new(std::fs::File::create(out.join("requests.jsonl"))?);
    for l in &lines {
        writeln!(f, "{l}")?;
    }
    f.flush()?;
    let workload = json!({
        "model": model_dir,
        "tasks": task_info,
        "labels": LABELS,
        "requests": n_requests,
        "window": window,
        "data": data,
        "data_rule": "the first `requests` lines of the data files, in order",
        "seeds": {"lengths": LENGTH_SEED, "tasks": TASK_SEED, "requests": REQUEST_SEED},
    });
    std::fs::write(
        out.join("workload.json"),
        serde_json::to_vec_pretty(&workload)?,
    )?;
    println!(
        "prepared {TASKS} tasks ({} shallow, {} deep), {n_requests} requests in windows of {window} under {}",
        TASKS.div_ceil(2),
        TASKS / 2,
        out.display()
    );
    Ok(())
}

/// The first `n` texts of the JSONL files, in order (each line has `text`).
fn read_texts(files: &[PathBuf], n: usize) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(n);
    for path in files {
        let f = std::fs::File::open(path)
            .with_context(|| format!("{} (run scripts/fetch_data.sh)", path.display()))?;
        for line in std::io::BufReader::new(f).lines() {
            if out.len() == n {
                return Ok(out);
            }
            let v: Value = serde_json::from_str(&line?)?;
            let text = v["text"].as_str().context("line without \"text\"")?;
            out.push(text.to_string());
        }
    }
    ensure!(
        out.len() == n,
        "only {} sentences in {files:?}, {n} asked",
        out.len()
    );
    Ok(out)
}

/// One request: its tokens and the index of its task.
struct Request {
    input: Encoded,
    task: usize,
}

fn run(model: Model, int8: Model, out: &Path, round: usize, warmup: usize) -> Result<()> {
    let workload: Value = serde_json::from_slice(
        &std::fs::read(out.join("workload.json")).context("workload.json (run `prepare` first)")?,
    )?;
    let window = workload["window"].as_u64().context("window")? as usize;
    let cfg = model.config().clone();
    let device = Device::Cpu;

    // The tasks as PEFT sees them: read back from the exported directories.
    let mut index = HashMap::new();
    let mut tasks: Vec<TaskModel> = Vec::new();
    for t in workload["tasks"].as_array().context("tasks")? {
        let id = t["id"].as_str().context("task id")?;
        let task = peft::read_dir(&out.join("adapters").join(id), None)?;
        index.insert(id.to_string(), tasks.len());
        tasks.push(task.to_device(&device, candle_core::DType::F32)?);
    }
    let mut requests = Vec::new();
    let f = std::fs::File::open(out.join("requests.jsonl"))?;
    for line in std::io::BufReader::new(f).lines() {
        let v: Value = serde_json::from_str(&line?)?;
        let ids: Vec<u32> = serde_json::from_value(v["ids"].clone())?;
        let task = *index
            .get(v["task"].as_str().context("task")?)
            .context("unknown task")?;
        requests.push(Request {
            input: Encoded {
                type_ids: vec![0; ids.len()],
                ids,
                pair_start: None,
            },
            task,
        });
    }
    let windows: Vec<&[Request]> = requests.chunks(window).collect();
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

    let max_ab = logits_a
        .iter()
        .flatten()
        .zip(logits_b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
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

/// (a): each window as one batch, rows in arrival order.
fn mixed(
    engine: &Engine,
    tasks: &[TaskModel],
    windows: &[&[Request]],
) -> Result<(Vec<Vec<f32>>, usize)> {
    let mut logits = Vec::new();
    for w in windows {
        let rows: Vec<Row> = w
            .iter()
            .map(|r| Row {
                input: &r.input,
                task: &tasks[r.task],
            })
            .collect();
        logits.extend(engine.classify(&rows)?);
    }
    Ok((logits, windows.len()))
}

/// (a0): each window as one batch of plain rows (every row `plain`, a task
/// without prompts), rows in arrival order.
fn plain_pass(
    engine: &Engine,
    plain: &TaskModel,
    windows: &[&[Request]],
) -> Result<(Vec<Vec<f32>>, usize)> {
    let mut logits = Vec::new();
    for w in windows {
        let rows: Vec<Row> = w
            .iter()
            .map(|r| Row {
                input: &r.input,
                task: plain,
            })
            .collect();
        logits.extend(engine.classify(&rows)?);
    }
    Ok((logits, windows.len()))
}

/// (b): each window split into one batch per task, tasks in order of first
/// arrival, rows in arrival order; logits returned in request order.
fn per_task(
    engine: &Engine,
    tasks: &[TaskModel],
    windows: &[&[Request]],
) -> Result<(Vec<Vec<f32>>, usize)> {
    let mut logits = Vec::new();
    let mut batches = 0;
    for w in windows {
        let mut out = vec![Vec::new(); w.len()];
        for group in groups_by_first_arrival(w) {
            let rows: Vec<Row> = group
                .iter()
                .map(|&i| Row {
                    input: &w[i].input,
                    task: &tasks[w[i].task],
                })
                .collect();
            for (&i, l) in group.iter().zip(engine.classify(&rows)?) {
                out[i] = l;
            }
            batches += 1;
        }
        logits.extend(out);
    }
    Ok((logits, batches))
}

/// Indices of a window's requests grouped by task, groups in order of their
/// task's first arrival (the rule `bench/peft_workload.py` follows too).
fn groups_by_first_arrival(w: &[Request]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = Vec::new();
    let mut members: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, r) in w.iter().enumerate() {
        members
            .entry(r.task)
            .or_insert_with(|| {
                order.push(r.task);
                Vec::new()
            })
            .push(i);
    }
    order
        .into_iter()
        .map(|t| members.remove(&t).unwrap_or_default())
        .collect()
}

/// Useful FLOPs of one row, as `benches/engine.rs` counts them
/// (`softprompt::model::cost::encoder_flops`: the last layer only for the
/// `read` positions the head reads), plus the pooler and the classifier on
/// one position; nothing for padding, embeddings, norms or element-wise
/// work.
fn row_flops(cfg: &ModelConfig, positions: usize, keys: usize, read: usize, labels: usize) -> f64 {
    let h = cfg.hidden_size as f64;
    softprompt::model::cost::encoder_flops(cfg, positions, keys, read)
        + 2.0 * h * h
        + 2.0 * h * labels as f64
}

/// f32 matmul rate (GFLOP/s) at the encoder's linear shapes with `n` rows
/// (`softprompt::model::cost::matmul_rate`, 16 timed calls per shape).
fn matmul_rate(cfg: &ModelConfig, device: &Device, n: usize) -> Result<f64> {
    if n == 0 {
        bail!("no rows to measure the matmul rate with");
    }
    Ok(softprompt::model::cost::matmul_rate(cfg, device, n, 16)?)
}
