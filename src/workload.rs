//! The many-task workload of `bench/run.sh` and `bench/gpu.sh`, shared by
//! `examples/workload.rs` (the CPU side, with ONNX Runtime and PEFT beside
//! it) and the hidden `softprompt workload` subcommand, which runs it where
//! there is no Rust toolchain (the GPU machine): build the tasks and the
//! requests once ([`prepare`]), export the tasks as PEFT adapters for the
//! PyTorch side, and time the engine on mixed-task and one-task batches.
//! Definitions and numbers: bench/README.md.

use std::collections::HashMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::engine::synthetic::{Kind, random_task};
use crate::engine::{Engine, Row, TaskModel};
use crate::model::{Encoded, Model, ModelConfig};
use crate::task::{Task, TaskMeta, default_labels, peft};

/// Tasks in the default workload: half shallow (PROMPT_TUNING), half deep
/// (PREFIX_TUNING).
pub const TASKS: usize = 64;
/// Labels of every task. One count for all: PEFT keeps one classifier
/// module per base model and swaps in each adapter's copy, so a second
/// shape would not load into the same `PeftModel`.
pub const LABELS: usize = 2;
/// Virtual-token range of the tasks (inclusive).
const PROMPT_MIN: usize = 5;
const PROMPT_MAX: usize = 32;
/// Seeds: prompt lengths, then each task's tensors (`TASK_SEED + i`), then
/// the task of each request.
const LENGTH_SEED: u64 = 7001;
const TASK_SEED: u64 = 7100;
const REQUEST_SEED: u64 = 7002;

/// What [`prepare`] builds.
pub struct Spec<'a> {
    pub tasks: usize,
    pub requests: usize,
    /// Requests per arrival window (one server batch).
    pub window: usize,
    /// Sentence files read in order until `requests` lines are taken.
    pub data: &'a [PathBuf],
    /// The most padded positions (rows × longest row) a window may hold:
    /// the server's batch budget, so that one window is one server batch.
    pub max_batch_tokens: usize,
    /// Also write every task as a native task file `<store>/<id>.safetensors`
    /// (a directory store `serve --prompts` reads).
    pub store: Option<&'a Path>,
}

/// Task `i`'s id (`t00`, `t01`, …, `t999`).
pub fn task_id(i: usize) -> String {
    format!("t{i:02}")
}

/// Builds the tasks, exports them as PEFT adapter directories
/// (`out/adapters/<id>/`, through our own exporter) and writes the request
/// list (`requests.jsonl`: text, task, token ids) and `workload.json`.
pub fn prepare(model: &Model, model_dir: &Path, out: &Path, spec: &Spec<'_>) -> Result<()> {
    let (n_tasks, n_requests, window, data) = (spec.tasks, spec.requests, spec.window, spec.data);
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
    let mut tasks = Vec::with_capacity(n_tasks);
    let mut task_info = Vec::with_capacity(n_tasks);
    for i in 0..n_tasks {
        // Alternate kinds so that both halves see the same length draws.
        let kind = if i % 2 == 0 {
            Kind::Shallow
        } else {
            Kind::Deep
        };
        let n = lengths.random_range(PROMPT_MIN..=PROMPT_MAX);
        let m = random_task(cfg, &Device::Cpu, kind, n, LABELS, TASK_SEED + i as u64)?;
        let meta = TaskMeta::synthetic(model, default_labels(LABELS), m.pooling);
        let task = Task::new(meta, m)?;
        let id = task_id(i);
        peft::write_dir(&task, &adapters.join(&id))
            .with_context(|| format!("exporting task {id} as a PEFT adapter"))?;
        if let Some(store) = spec.store {
            std::fs::create_dir_all(store)?;
            crate::task::native::write_file(&store.join(format!("{id}.safetensors")), &task)
                .with_context(|| format!("writing task {id} into {}", store.display()))?;
        }
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
        let t = pick.random_range(0..n_tasks);
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
            padded <= spec.max_batch_tokens,
            "window {w}: {padded} padded positions exceed the server's budget of {}; use a smaller --window",
            spec.max_batch_tokens
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
        "prepared {n_tasks} tasks ({} shallow, {} deep), {n_requests} requests in windows of {window} under {}",
        n_tasks.div_ceil(2),
        n_tasks / 2,
        out.display()
    );
    Ok(())
}

/// The first `n` texts of the JSONL files, in order (each line has `text`).
pub fn read_texts(files: &[PathBuf], n: usize) -> Result<Vec<String>> {
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
pub struct Request {
    pub input: Encoded,
    pub task: usize,
}

/// A prepared workload, loaded for a run.
pub struct Loaded {
    pub workload: Value,
    pub window: usize,
    /// The tasks as PEFT sees them: read back from the exported adapters,
    /// placed on `device` with prompts in `dtype`.
    pub tasks: Vec<TaskModel>,
    /// Task id → index in `tasks`.
    pub index: HashMap<String, usize>,
    pub requests: Vec<Request>,
}

/// Reads what [`prepare`] wrote under `out`.
pub fn load(out: &Path, device: &Device, dtype: candle_core::DType) -> Result<Loaded> {
    let workload: Value = serde_json::from_slice(
        &std::fs::read(out.join("workload.json")).context("workload.json (run `prepare` first)")?,
    )?;
    let window = workload["window"].as_u64().context("window")? as usize;
    let mut index = HashMap::new();
    let mut tasks: Vec<TaskModel> = Vec::new();
    for t in workload["tasks"].as_array().context("tasks")? {
        let id = t["id"].as_str().context("task id")?;
        let task = peft::read_dir(&out.join("adapters").join(id), None)?;
        index.insert(id.to_string(), tasks.len());
        tasks.push(task.to_device(device, dtype)?);
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
    Ok(Loaded {
        workload,
        window,
        tasks,
        index,
        requests,
    })
}

/// (a): each window as one batch, rows in arrival order.
pub fn mixed(
    engine: &Engine,
    tasks: &[TaskModel],
    windows: &[&[Request]],
) -> Result<(Vec<Vec<f32>>, usize)> {
    by_window(engine, windows, |r| &tasks[r.task])
}

/// (a0): each window as one batch of plain rows (every row `plain`, a task
/// without prompts), rows in arrival order.
pub fn plain_pass(
    engine: &Engine,
    plain: &TaskModel,
    windows: &[&[Request]],
) -> Result<(Vec<Vec<f32>>, usize)> {
    by_window(engine, windows, |_| plain)
}

/// One batch per window, each row with the task `task_of` gives it.
fn by_window<'t>(
    engine: &Engine,
    windows: &[&[Request]],
    task_of: impl Fn(&Request) -> &'t TaskModel,
) -> Result<(Vec<Vec<f32>>, usize)> {
    let mut logits = Vec::new();
    for w in windows {
        let rows: Vec<Row> = w
            .iter()
            .map(|r| Row {
                input: &r.input,
                task: task_of(r),
            })
            .collect();
        logits.extend(engine.classify(&rows)?);
    }
    Ok((logits, windows.len()))
}

/// Largest |a − b| over two runs' logits.
pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// (b): each window split into one batch per task, tasks in order of first
/// arrival, rows in arrival order; logits returned in request order.
pub fn per_task(
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
pub fn groups_by_first_arrival(w: &[Request]) -> Vec<Vec<usize>> {
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
/// (`crate::model::cost::encoder_flops`: the last layer only for the
/// `read` positions the head reads), plus the pooler and the classifier on
/// one position; nothing for padding, embeddings, norms or element-wise
/// work.
pub fn row_flops(
    cfg: &ModelConfig,
    positions: usize,
    keys: usize,
    read: usize,
    labels: usize,
) -> f64 {
    let h = cfg.hidden_size as f64;
    crate::model::cost::encoder_flops(cfg, positions, keys, read)
        + 2.0 * h * h
        + 2.0 * h * labels as f64
}

/// `softprompt workload …` (hidden): the workload where there is no Rust
/// toolchain, e.g. on the GPU machine of `bench/gpu.sh`.
#[derive(clap::Args)]
pub struct WorkloadArgs {
    /// Model directory.
    #[arg(long, default_value = "models/all-MiniLM-L6-v2", global = true)]
    pub model: PathBuf,
    /// Where the workload and the results live.
    #[arg(long, default_value = "bench/out", global = true)]
    pub out: PathBuf,
    #[command(subcommand)]
    pub cmd: WorkloadCmd,
}

/// Where and how the engine runs, as `serve` takes it.
#[derive(clap::Args)]
pub struct Serving {
    #[arg(long, default_value = "cpu")]
    pub device: crate::model::DeviceSpec,
    #[arg(long, value_enum, default_value_t = crate::model::ServeDtype::Auto)]
    pub dtype: crate::model::ServeDtype,
    #[arg(long, value_enum, default_value_t = crate::engine::Kernels::Auto)]
    pub kernels: crate::engine::Kernels,
}

#[derive(clap::Subcommand)]
pub enum WorkloadCmd {
    /// Build the tasks, export them as PEFT adapters, write the request list.
    Prepare {
        #[arg(long, default_value_t = TASKS)]
        tasks: usize,
        #[arg(long, default_value_t = 2048)]
        requests: usize,
        #[arg(long, default_value_t = 64)]
        window: usize,
        /// Sentence files (JSONL with `text`) read in order.
        #[arg(long, num_args = 1.., default_values = ["data/sentiment/test.jsonl", "data/sentiment/train.jsonl"])]
        data: Vec<PathBuf>,
        /// The serving batch budget a window must fit (`serve --max-batch-tokens`).
        #[arg(long, default_value_t = 16_384)]
        max_batch_tokens: usize,
        /// Also write the tasks as native files into this directory store.
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Logits of PEFT parity fixtures (`tests/fixtures/*expected.json`
    /// format) on a device, against the file's: prints the worst
    /// |Δlogit|, |Δprobability| and top-label agreement per case as JSON,
    /// and fails past `--tol` (on logits) unless it is 0.
    Parity {
        #[arg(long)]
        expected: PathBuf,
        /// Directory holding each case's adapter directory.
        #[arg(long)]
        adapters: PathBuf,
        #[command(flatten)]
        serving: Serving,
        #[arg(long, default_value_t = 0.0)]
        tol: f32,
    },
    /// Time (a) mixed-task and (b) one-task batches on a device, as `serve`
    /// runs there; writes `<out>/device_<dtype>.json` with the logits.
    Run {
        #[command(flatten)]
        serving: Serving,
        /// Windows run untimed through each path first.
        #[arg(long, default_value_t = 4)]
        warmup: usize,
    },
}

/// Runs `softprompt workload …`.
pub fn cli(args: WorkloadArgs) -> Result<()> {
    match args.cmd {
        WorkloadCmd::Prepare {
            tasks,
            requests,
            window,
            data,
            max_batch_tokens,
            store,
        } => {
            let model = Model::load(&args.model, &Device::Cpu)
                .with_context(|| format!("loading {}", args.model.display()))?;
            let spec = Spec {
                tasks,
                requests,
                window,
                data: &data,
                max_batch_tokens,
                store: store.as_deref(),
            };
            prepare(&model, &args.model, &args.out, &spec)
        }
        WorkloadCmd::Parity {
            expected,
            adapters,
            serving:
                Serving {
                    device,
                    dtype,
                    kernels,
                },
            tol,
        } => {
            let device = device.open()?;
            let model = open_model(&args.model, &device, dtype, kernels)?;
            let worst = parity(model, &expected, &adapters, kernels)?;
            ensure!(
                tol == 0.0 || worst <= tol,
                "worst |Δlogit| {worst} over the bound {tol}"
            );
            Ok(())
        }
        WorkloadCmd::Run {
            serving:
                Serving {
                    device,
                    dtype,
                    kernels,
                },
            warmup,
        } => {
            let device = device.open()?;
            let result = run_device(&args.model, &args.out, &device, dtype, kernels, warmup)?;
            let dtype = result["dtype"].as_str().unwrap_or("dtype").to_string();
            let path = args.out.join(format!("device_{dtype}.json"));
            std::fs::write(&path, serde_json::to_vec(&result)?)?;
            println!("wrote {}", path.display());
            Ok(())
        }
    }
}

/// (a) and (b) of the workload under `out` on `device`, the model resident
/// in `dtype`, served by `kernels` (auto: the device backend on a CUDA GPU,
/// the fused kernels on the CPU). Every batch ends with its logits copied
/// to the host, so wall time is device time.
pub fn run_device(
    model_dir: &Path,
    out: &Path,
    device: &Device,
    dtype: crate::model::ServeDtype,
    kernels: crate::engine::Kernels,
    warmup: usize,
) -> Result<Value> {
    let model = open_model(model_dir, device, dtype, kernels)?;
    let dtype = model.encoder.dtype();
    let l = load(out, device, dtype)?;
    let engine = Engine::with_kernels(std::sync::Arc::new(model), kernels);
    let windows: Vec<&[Request]> = l.requests.chunks(l.window).collect();
    let warm = &windows[..warmup.min(windows.len())];
    mixed(&engine, &l.tasks, warm)?;
    per_task(&engine, &l.tasks, warm)?;
    let t = std::time::Instant::now();
    let (logits_a, batches_a) = mixed(&engine, &l.tasks, &windows)?;
    let secs_a = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let (logits_b, batches_b) = per_task(&engine, &l.tasks, &windows)?;
    let secs_b = t.elapsed().as_secs_f64();
    let text_tokens: usize = l.requests.iter().map(|r| r.input.len()).sum();
    let name = dtype.as_str();
    let max_ab = max_abs_diff(&logits_a, &logits_b);
    println!(
        "{} tasks, {} requests, windows of {}, {device:?}, {name}, {:?}: (a) mixed {:.0} text tokens/s ({secs_a:.3} s, {batches_a} batches); (b) one task per batch {:.0} ({secs_b:.3} s, {batches_b} batches); a/b {:.2}; max |a-b| {max_ab:.2e}",
        l.tasks.len(),
        l.requests.len(),
        l.window,
        engine.serve_mode(),
        text_tokens as f64 / secs_a,
        text_tokens as f64 / secs_b,
        secs_b / secs_a,
    );
    Ok(json!({
        "device": format!("{device:?}"),
        "dtype": name,
        "serve_mode": format!("{:?}", engine.serve_mode()),
        "tasks": l.tasks.len(),
        "requests": l.requests.len(),
        "window": l.window,
        "text_tokens": text_tokens,
        "secs_a": secs_a,
        "secs_b": secs_b,
        "batches_a": batches_a,
        "batches_b": batches_b,
        "tokens_per_s_a": text_tokens as f64 / secs_a,
        "tokens_per_s_b": text_tokens as f64 / secs_b,
        "max_abs_a_b": max_ab,
        "logits_a": logits_a,
        "logits_b": logits_b,
    }))
}

/// The model as `serve` holds it ([`crate::engine::load_serving_model`]).
fn open_model(
    model_dir: &Path,
    device: &Device,
    dtype: crate::model::ServeDtype,
    kernels: crate::engine::Kernels,
) -> Result<Model> {
    crate::engine::load_serving_model(
        model_dir,
        device,
        kernels,
        dtype,
        crate::model::Quantize::None,
    )
    .with_context(|| format!("loading {}", model_dir.display()))
}

fn softmax(x: &[f32]) -> Vec<f32> {
    crate::server::scores::apply(x, crate::server::api::FunctionToApply::Softmax)
}

fn argmax(x: &[f32]) -> usize {
    (0..x.len()).fold(0, |b, i| if x[i] > x[b] { i } else { b })
}

/// Runs every case of a parity file (the tests' format: `cases[]` with
/// `adapter`, `inputs` [{text, text_pair}], `input_ids`, `logits`) and prints one
/// JSON line per case; returns the worst |Δlogit|.
fn parity(
    model: Model,
    expected: &Path,
    adapters: &Path,
    kernels: crate::engine::Kernels,
) -> Result<f32> {
    let exp: Value = serde_json::from_slice(
        &std::fs::read(expected).with_context(|| format!("{}", expected.display()))?,
    )?;
    let model = std::sync::Arc::new(model);
    let engine = Engine::with_kernels(model.clone(), kernels);
    let mut worst = 0f32;
    for case in exp["cases"].as_array().context("cases")? {
        let name = case["adapter"].as_str().context("adapter")?;
        let task = peft::read_dir(&adapters.join(name), None)?
            .to_device(model.encoder.device(), model.encoder.dtype())?;
        let mut inputs = Vec::new();
        for (i, input) in case["inputs"]
            .as_array()
            .context("inputs")?
            .iter()
            .enumerate()
        {
            let text = input["text"].as_str().context("input text")?;
            let pair = input["text_pair"].as_str();
            let enc = model.tokenizer.encode(text, pair, 10_000, false)?;
            let want: Vec<u32> = serde_json::from_value(case["input_ids"][i].clone())?;
            ensure!(
                enc.ids == want,
                "{name} input {i}: token ids differ from the file's"
            );
            inputs.push(enc);
        }
        let rows: Vec<Row> = inputs
            .iter()
            .map(|input| Row { input, task: &task })
            .collect();
        let got = engine.classify(&rows)?;
        let want: Vec<Vec<f32>> = serde_json::from_value(case["logits"].clone())?;
        let (mut dl, mut dp, mut same) = (0f32, 0f32, 0usize);
        for (g, w) in got.iter().zip(&want) {
            dl = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(dl, f32::max);
            dp = softmax(g)
                .iter()
                .zip(softmax(w))
                .map(|(a, b)| (a - b).abs())
                .fold(dp, f32::max);
            same += (argmax(g) == argmax(w)) as usize;
        }
        worst = worst.max(dl);
        println!(
            "{}",
            json!({"case": name, "rows": got.len(), "max_abs_logit": dl, "max_abs_prob": dp,
                   "same_top_label": same, "dtype": format!("{:?}", model.encoder.dtype()),
                   "serve_mode": format!("{:?}", engine.serve_mode())})
        );
    }
    Ok(worst)
}
