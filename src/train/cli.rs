//! `softprompt train` and `softprompt eval`.

use anyhow::Context;
use candle_core::Device;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::data::{self, DataSource, Example};
use super::params::{Method, Params, PromptInit, Reparam, Spec};
use super::{Metrics, TrainConfig, predict, write_atomic};
use crate::engine::{Engine, Pooling, Template};
use crate::model::{DEFAULT_MODEL_DIR, Model};
use crate::registry::{Registry, validate_id};
use crate::store::{PromptStore, StoreLocation};
use crate::task::{BaseModelRef, Limits, Provenance, Task, TaskMeta, native, validate};

/// Where `softprompt train` puts the trained task (`--output`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskOutput {
    /// A local task file, written atomically (temp file, fsync, rename).
    File(PathBuf),
    /// Task `id` in a prompt store (`s3://bucket/prefix/ID`), written
    /// through [`PromptStore::put`] as an admin upload is.
    Store {
        /// The store, as `softprompt serve --prompts` names it.
        location: StoreLocation,
        /// Task id.
        id: String,
    },
}

impl std::str::FromStr for TaskOutput {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let Some(rest) = s.strip_prefix("s3://") else {
            if s.is_empty() {
                return Err("the output file name is empty".into());
            }
            // A URL of another scheme is a mistake, not a file named "gs:".
            s.parse::<StoreLocation>()?;
            return Ok(TaskOutput::File(PathBuf::from(s)));
        };
        let Some((store, id)) = rest.rsplit_once('/').filter(|(b, _)| !b.is_empty()) else {
            return Err(format!(
                "{s:?}: expected s3://bucket/prefix/ID (the last segment is the task id)"
            ));
        };
        if id.is_empty() {
            return Err(format!(
                "{s:?}: no task id after the last '/'; expected s3://bucket/prefix/ID"
            ));
        }
        if store.ends_with('/') {
            return Err(format!(
                "{s:?}: the prefix has an empty, '.' or '..' segment"
            ));
        }
        let id = id
            .strip_suffix(&format!(".{}", native::EXTENSION))
            .unwrap_or(id);
        validate_id(id).map_err(|e| format!("{s:?}: {e}"))?;
        let location = format!("s3://{store}").parse::<StoreLocation>()?;
        Ok(TaskOutput::Store {
            location,
            id: id.to_string(),
        })
    }
}

impl std::fmt::Display for TaskOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskOutput::File(p) => write!(f, "{}", p.display()),
            TaskOutput::Store { location, id } => {
                write!(f, "{location}/{id}.{}", native::EXTENSION)
            }
        }
    }
}

/// How the prompt starts (command-line form of [`PromptInit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InitArg {
    /// N(0, 1).
    Random,
    /// Sampled vocabulary embeddings.
    Vocab,
    /// Embeddings of `--init-text`.
    Text,
}

/// Pooling choice on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PoolingArg {
    /// Mean over the text tokens.
    Mean,
    /// BERT pooler over position 0 (PEFT's).
    Pooler,
    /// Raw vector at position 0.
    First,
}

impl From<PoolingArg> for Pooling {
    fn from(p: PoolingArg) -> Self {
        match p {
            PoolingArg::Mean => Pooling::Mean,
            PoolingArg::Pooler => Pooling::Pooler,
            PoolingArg::First => Pooling::First,
        }
    }
}

/// Arguments of `softprompt train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Base model directory (the container images set SOFTPROMPT_MODEL).
    #[arg(long, env = "SOFTPROMPT_MODEL", default_value = DEFAULT_MODEL_DIR)]
    pub model: PathBuf,
    /// Training data: JSONL (`{"text", "text_pair"?, "label"}`) or CSV with a
    /// header (`.csv`); a local file or `s3://bucket/key` (read with the
    /// `AWS_*` variables the prompt store uses).
    #[arg(long)]
    pub train: DataSource,
    /// Validation data (file or `s3://bucket/key`); without it,
    /// `--val-fraction` of the training data is held out. Its labels must
    /// be among the training data's.
    #[arg(long)]
    pub val: Option<DataSource>,
    /// Share of the training data held out for validation (seeded).
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Labeled test data (file or `s3://bucket/key`), scored once after
    /// training (result goes into the task's provenance); read and checked
    /// before training starts.
    #[arg(long)]
    pub test: Option<DataSource>,
    /// Where the trained task goes: a file path (written atomically), or
    /// `s3://bucket/prefix/ID` to publish task ID to the prompt store
    /// `s3://bucket/prefix` that `softprompt serve --prompts` reads (one
    /// atomic PUT of `<prefix>/ID.safetensors`, as an admin upload; every
    /// replica serves it within its sync interval). The task is validated
    /// against the model with the server's limits before anything is
    /// written; the id and the store (configuration, and one LIST) are
    /// checked before training starts. For a directory store, give the file
    /// `DIR/ID.safetensors`: replicas polling DIR pick it up the same way.
    #[arg(long, short, value_name = "FILE|s3://BUCKET/PREFIX/ID")]
    pub output: TaskOutput,
    /// Soft-prompt method.
    #[arg(long, value_enum, default_value = "prompt-tuning")]
    pub method: Method,
    /// Virtual tokens (shallow) or prefix length (p-tuning-v2).
    #[arg(long, default_value_t = 20)]
    pub virtual_tokens: usize,
    /// Reparameterization encoder [default: mlp for p-tuning, none otherwise].
    #[arg(long, value_enum)]
    pub reparam: Option<Reparam>,
    /// Hidden width of the encoder [default: the model's hidden size, as PEFT].
    #[arg(long)]
    pub encoder_hidden: Option<usize>,
    /// LSTM layers of the P-Tuning encoder.
    #[arg(long, default_value_t = 2)]
    pub encoder_layers: usize,
    /// Prompt init [default: vocab, or random for p-tuning-v2 without encoder].
    #[arg(long, value_enum)]
    pub init: Option<InitArg>,
    /// Text for `--init text`.
    #[arg(long)]
    pub init_text: Option<String>,
    /// Placement of shallow virtual tokens, e.g. `[P:10] {text} [P:10]` (default: all before the text).
    #[arg(long)]
    pub template: Option<String>,
    /// How the head reads the encoder output (mean suits sentence-transformers models).
    #[arg(long, value_enum, default_value = "mean")]
    pub pooling: PoolingArg,
    /// Label names in head order (default: the sorted labels of the data).
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// Most text tokens per row, specials included (longer texts are cut).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Rows per step.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Peak learning rate of the prompt (and encoder).
    #[arg(long, default_value_t = 3e-2)]
    pub lr: f64,
    /// Peak learning rate of the head [default: --lr].
    #[arg(long)]
    pub head_lr: Option<f64>,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Passes over the training data.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Total optimizer steps (overrides --epochs).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Fraction of steps for linear warm-up.
    #[arg(long, default_value_t = 0.06)]
    pub warmup: f64,
    /// Validate every N steps (0: once per epoch).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Stop after N validations without improvement.
    #[arg(long)]
    pub patience: Option<usize>,
    /// Seed of the split, the init and the batch order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Checkpoint file, always local [default: <output>.ckpt; for an s3://
    /// output, ID.safetensors.ckpt in the current directory].
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint if it exists.
    #[arg(long)]
    pub resume: bool,
    /// Stop once this many steps are done, writing the checkpoint as Ctrl-C
    /// would (train in slices; continue with --resume).
    #[arg(long)]
    pub pause_at_step: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Which training forward: auto (on the CPU our fused kernels with
    /// hand-written backward passes; elsewhere candle's composed ops) or
    /// candle (candle's composed ops everywhere: the slower reference,
    /// what training ran before the fused backward existed). `device` is a
    /// serving backend; training treats it as auto.
    #[arg(long, value_enum, default_value_t = crate::engine::Kernels::Auto)]
    pub kernels: crate::engine::Kernels,
    /// Name recorded as the task's data source (default: the training file name).
    #[arg(long)]
    pub data_name: Option<String>,
    /// Also write a PEFT adapter directory. PEFT's BERT head reads the
    /// pooler and places every virtual token first, so this needs
    /// `--pooling pooler` and no free-form template.
    #[arg(long)]
    pub peft_dir: Option<PathBuf>,
}

/// Arguments of `softprompt eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Base model directory (the container images set SOFTPROMPT_MODEL).
    #[arg(long, env = "SOFTPROMPT_MODEL", default_value = DEFAULT_MODEL_DIR)]
    pub model: PathBuf,
    /// A native task file or a PEFT adapter directory.
    pub task: PathBuf,
    /// Labeled data (JSONL or CSV; a file or `s3://bucket/key`).
    pub data: DataSource,
    /// Label names for a PEFT adapter (which stores none), in head order.
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// Most text tokens per row (default: all that fit next to the prompt).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Print the metrics as JSON.
    #[arg(long)]
    pub json: bool,
    /// Precision of the linear layers, as `serve --quantize`: evaluates
    /// what an int8 server would answer.
    #[arg(long, value_enum, default_value_t = crate::model::Quantize::None)]
    pub quantize: crate::model::Quantize,
}

fn load_model(dir: &Path) -> anyhow::Result<Arc<Model>> {
    Ok(Arc::new(Model::load(dir, &Device::Cpu)?))
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// An opened output store: the store, the task id, and a runtime to drive
/// its async calls from this synchronous command.
struct Publisher {
    store: Arc<dyn PromptStore>,
    id: String,
    rt: tokio::runtime::Runtime,
}

impl Publisher {
    /// Opens the store of an `s3://…/ID` output and reads it once (a LIST
    /// of the prefix), so that a misconfigured or unreachable store fails
    /// now rather than after training.
    fn open(location: &StoreLocation, id: &str) -> anyhow::Result<Publisher> {
        validate_id(id)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start the store client's runtime")?;
        let store = crate::store::open(location)
            .with_context(|| format!("--output: cannot open the prompt store {location}"))?;
        let tasks = rt.block_on(store.list()).with_context(|| {
            format!("--output: cannot read the prompt store {location} (checked before training)")
        })?;
        tracing::info!(
            store = %location,
            task = id,
            tasks = tasks.len(),
            replaces = tasks.iter().any(|t| t.id == id),
            "publishing to the prompt store after training"
        );
        Ok(Publisher {
            store,
            id: id.to_string(),
            rt,
        })
    }
}

/// Runs `softprompt train`.
pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    // Where the task goes is checked first: a bad id or store must not
    // cost a training run.
    let publisher = match &args.output {
        TaskOutput::Store { location, id } => Some(Publisher::open(location, id)?),
        TaskOutput::File(path) => {
            // In a directory a server polls, the file name is the task id.
            if let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(&format!(".{}", native::EXTENSION)))
                && validate_id(stem).is_err()
            {
                tracing::warn!(
                    output = %path.display(),
                    "{stem:?} is not a valid task id: a server polling this directory will skip the file"
                );
            }
            None
        }
    };
    let model = load_model(&args.model)?;
    let engine = Engine::new(model.clone());
    let train_name = args.train.to_string();
    let all_train = data::read_examples(&args.train)?;
    // The head's classes are the training data's labels (or --labels);
    // validation and test labels must be among them.
    data::ensure_two_classes(&all_train, &train_name)?;
    let (labels, whose) = match &args.labels {
        Some(l) => (l.clone(), "the --labels"),
        None => (data::label_set(&all_train), "the training labels"),
    };
    data::ensure_known_labels(&all_train, &labels, &train_name, whose)?;
    let (train_ex, val_ex): (Vec<Example>, Vec<Example>) = match &args.val {
        Some(p) => {
            let val = data::read_examples(p)?;
            data::ensure_known_labels(&val, &labels, &p.to_string(), whose)?;
            (all_train, val)
        }
        None => data::split(&all_train, args.val_fraction, args.seed),
    };
    let test_ex = match &args.test {
        Some(p) => {
            let ex = data::read_examples(p)?;
            data::ensure_known_labels(&ex, &labels, &p.to_string(), whose)?;
            Some((p, ex))
        }
        None => None,
    };
    let reparam = args.reparam.unwrap_or(if args.method == Method::PTuning {
        Reparam::Mlp
    } else {
        Reparam::None
    });
    let n = args.virtual_tokens;
    let template = match (&args.template, args.method.is_deep()) {
        (Some(t), _) => t.clone(),
        (None, false) => Template::prefix(n).to_string(),
        (None, true) => Template::prefix(0).to_string(),
    };
    let spec = Spec {
        method: args.method,
        num_virtual: n,
        reparam,
        encoder_hidden: args.encoder_hidden.unwrap_or(model.config().hidden_size),
        encoder_layers: args.encoder_layers,
        template,
        pooling: args.pooling.into(),
        num_labels: labels.len(),
    };
    let deep_raw = args.method.is_deep() && reparam == Reparam::None;
    let init = match args.init.unwrap_or(if deep_raw {
        InitArg::Random
    } else {
        InitArg::Vocab
    }) {
        InitArg::Random => PromptInit::Random,
        InitArg::Vocab => PromptInit::Vocab,
        InitArg::Text => PromptInit::Text(
            args.init_text
                .clone()
                .context("--init text needs --init-text")?,
        ),
    };
    if args.peft_dir.is_some() {
        anyhow::ensure!(
            spec.pooling == Pooling::Pooler
                && Template::parse(&spec.template).is_ok_and(|t| t.is_prefix()),
            "--peft-dir: PEFT reads the BERT pooler and puts every virtual token first; train with --pooling pooler and without --template"
        );
    }
    let params = Params::init(spec, &model, &init, args.seed)?;
    let budget = model
        .config()
        .max_sequence()
        .saturating_sub(n)
        .min(args.max_tokens);
    let tok = &model.tokenizer;
    let train_s = data::encode(tok, &train_ex, &labels, budget, &train_name)?;
    let val_s = data::encode(tok, &val_ex, &labels, budget, "validation")?;
    tracing::info!(
        method = args.method.as_str(),
        train = train_s.len(),
        validation = val_s.len(),
        labels = ?labels,
        trainable = params.num_trainable(),
        "training"
    );

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // Only one handler per process; a second train() in-process keeps the first.
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    // Checkpoints stay local whatever the output is.
    let ckpt = match &args.output {
        TaskOutput::File(p) => {
            let mut c = p.as_os_str().to_owned();
            c.push(".ckpt");
            c
        }
        TaskOutput::Store { id, .. } => format!("{id}.{}.ckpt", native::EXTENSION).into(),
    };
    let cfg = TrainConfig {
        batch_size: args.batch_size,
        lr: args.lr,
        head_lr: args.head_lr.unwrap_or(args.lr),
        weight_decay: args.weight_decay,
        epochs: args.epochs,
        max_steps: args.steps,
        warmup: args.warmup,
        eval_every: args.eval_every,
        patience: args.patience,
        seed: args.seed,
        checkpoint: Some(
            args.checkpoint
                .clone()
                .unwrap_or_else(|| PathBuf::from(ckpt)),
        ),
        resume: args.resume,
        pause_at: args.pause_at_step,
        progress: !args.quiet,
        eval_batch: 64,
        forward: match args.kernels {
            crate::engine::Kernels::Auto | crate::engine::Kernels::Device => {
                crate::model::OpsMode::Train
            }
            crate::engine::Kernels::Candle => crate::model::OpsMode::TrainOps,
        },
    };
    let outcome = super::train(&engine, &params, &train_s, &val_s, &cfg, &stop)?;
    let ckpt_path = cfg.checkpoint.as_ref().expect("set above");
    if outcome.interrupted {
        anyhow::bail!(
            "stopped at step {}/{}; checkpoint {} — rerun with --resume to continue",
            outcome.steps,
            outcome.total_steps,
            ckpt_path.display()
        );
    }

    let folded = params.fold()?;
    let mut metrics = serde_json::json!({
        "steps": outcome.steps,
        "best_step": outcome.best_step,
        "train_examples": train_s.len(),
        "val_examples": val_s.len(),
        "val_accuracy": outcome.best_val_accuracy,
        "train_seconds": (outcome.seconds * 10.0).round() / 10.0,
        "seconds_per_step": (outcome.step_seconds / outcome.steps_run.max(1) as f64 * 1e4).round() / 1e4,
        "max_tokens": budget,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "reparam": reparam,
        "encoder_hidden": params.spec.encoder_hidden,
        "seed": args.seed,
    });
    if let Some((test, ex)) = &test_ex {
        let s = data::encode(tok, ex, &labels, budget, &test.to_string())?;
        let pred = predict(&engine, &folded, &s, 64)?;
        let gold: Vec<usize> = s.iter().map(|x| x.label).collect();
        let m = Metrics::compute(&gold, &pred, &labels);
        eprintln!("test {test}\n{}", m.report());
        metrics["test_accuracy"] = serde_json::json!(m.accuracy);
        metrics["test_macro_f1"] = serde_json::json!(m.macro_f1);
        metrics["test_examples"] = serde_json::json!(m.examples);
    }
    let meta = TaskMeta {
        labels,
        template: (!args.method.is_deep()
            && !params.spec.template.eq(&Template::prefix(n).to_string()))
        .then(|| params.spec.template.clone()),
        pooling: params.spec.pooling,
        base_model: BaseModelRef {
            name: model.name.clone(),
            fingerprint: Some(model.fingerprint.clone()),
        },
        provenance: Provenance {
            method: args.method.as_str().into(),
            data: Some(
                args.data_name
                    .clone()
                    .unwrap_or_else(|| args.train.file_name()),
            ),
            metrics,
            created: Some(now_rfc3339()),
        },
    };
    let task = Task::new(meta, folded)?;
    let summary = format!(
        "{} steps in {:.0}s ({:.3}s per step), best validation accuracy {}",
        outcome.steps,
        outcome.seconds,
        outcome.step_seconds / outcome.steps_run.max(1) as f64,
        outcome
            .best_val_accuracy
            .map_or("n/a".into(), |a| format!("{a:.4}"))
    );
    match (&args.output, publisher) {
        (TaskOutput::File(path), _) => {
            // The server's limits (serve builds its registry with the defaults).
            validate(&task, &model, &Limits::default())?;
            write_atomic(path, &native::to_bytes(&task)?)?;
            println!(
                "wrote {} ({} bytes, version {}): {summary}",
                path.display(),
                std::fs::metadata(path)?.len(),
                task.version,
            );
        }
        (TaskOutput::Store { location, id }, Some(p)) => {
            // What an admin upload does: validate (id, task against the
            // model, the server's limits) before anything is written, then
            // one durable, atomic store write that every replica polls.
            Registry::new(model.clone(), Limits::default()).prepare(id, &task)?;
            let put = p.rt.block_on(p.store.put(&p.id, &task));
            if let Err(e) = put {
                // Keep the trained task: it cost a training run.
                let keep = ckpt_path.with_file_name(format!("{id}.{}", native::EXTENSION));
                let kept = write_atomic(&keep, &native::to_bytes(&task)?);
                let note = match kept {
                    Ok(()) => format!(
                        "the trained task is saved in {} (upload it with PUT /admin/tasks/{id})",
                        keep.display()
                    ),
                    Err(k) => format!("saving it locally failed too: {k:#}"),
                };
                return Err(anyhow::Error::new(e)
                    .context(format!("publish task {id:?} to {location}; {note}")));
            }
            println!(
                "published {} (task {id}, version {}): {summary}",
                args.output, task.version,
            );
        }
        (TaskOutput::Store { .. }, None) => unreachable!("the store is opened first"),
    }
    if let Some(dir) = &args.peft_dir {
        crate::task::peft::write_dir(&task, dir)?;
        println!("wrote PEFT adapter {}", dir.display());
    }
    Ok(())
}

/// Scores a task on labeled data; returns the metrics (and prints them).
pub fn evaluate(args: &EvalArgs) -> anyhow::Result<Metrics> {
    let mut model = Model::load(&args.model, &Device::Cpu)?;
    model.encoder.pack(args.quantize)?;
    let model = Arc::new(model);
    let task = if args.task.is_dir() {
        crate::task::peft::read_dir(&args.task, args.labels.clone())?
    } else {
        let t = native::read_file(&args.task)?;
        if let Some(l) = &args.labels {
            anyhow::ensure!(
                *l == t.meta.labels,
                "--labels {l:?} differ from the task's {:?}",
                t.meta.labels
            );
        }
        t
    };
    validate(&task, &model, &Limits::default())?;
    let tm = task.to_device(model.encoder.device(), model.encoder.dtype())?;
    let budget = tm
        .text_budget(model.config())
        .min(args.max_tokens.unwrap_or(usize::MAX));
    let ex = data::read_examples(&args.data)?;
    let s = data::encode(
        &model.tokenizer,
        &ex,
        &task.meta.labels,
        budget,
        &args.data.to_string(),
    )?;
    let engine = Engine::new(model);
    let pred = predict(&engine, &tm, &s, args.batch_size)?;
    let gold: Vec<usize> = s.iter().map(|x| x.label).collect();
    Ok(Metrics::compute(&gold, &pred, &task.meta.labels))
}

/// Runs `softprompt eval`.
pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let m = evaluate(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        print!("{}", m.report());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_parse_to_a_file_or_a_store_and_id() {
        let store = |b: &str, p: &str, id: &str| TaskOutput::Store {
            location: StoreLocation::S3 {
                bucket: b.into(),
                prefix: p.into(),
            },
            id: id.into(),
        };
        let parse = |s: &str| s.parse::<TaskOutput>();
        assert_eq!(parse("s3://b/p/q/topic"), Ok(store("b", "p/q", "topic")));
        assert_eq!(parse("s3://b/topic.v2"), Ok(store("b", "", "topic.v2")));
        assert_eq!(
            parse("s3://b/p/topic.safetensors"),
            Ok(store("b", "p", "topic"))
        );
        assert_eq!(
            parse("s3://b/p/topic").unwrap().to_string(),
            "s3://b/p/topic.safetensors"
        );
        assert_eq!(
            parse("prompts/x.safetensors"),
            Ok(TaskOutput::File("prompts/x.safetensors".into()))
        );
        for (bad, says) in [
            ("s3://b/p/", "no task id"),
            ("s3://b", "expected s3://bucket/prefix/ID"),
            ("s3:///x", "expected s3://bucket/prefix/ID"),
            ("s3://b/p/a b", "is invalid"),
            ("s3://b/p/..", "is invalid"),
            ("s3://b/p//x", "segment"),
            ("s3://b/../x", "segment"),
            ("gs://b/p/x", "unsupported store scheme"),
            ("", "empty"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn data_sources_parse_to_a_file_or_an_object() {
        let parse = |s: &str| s.parse::<DataSource>();
        let src = parse("s3://b/data/train.CSV").unwrap();
        assert_eq!(
            src,
            DataSource::S3 {
                bucket: "b".into(),
                key: "data/train.CSV".into()
            }
        );
        assert!(src.is_csv());
        assert_eq!(src.file_name(), "train.CSV");
        assert_eq!(src.to_string(), "s3://b/data/train.CSV");
        let file = parse("data/t.jsonl").unwrap();
        assert_eq!(file, DataSource::File("data/t.jsonl".into()));
        assert!(!file.is_csv());
        for bad in [
            "s3://b",
            "s3://b/",
            "s3:///k",
            "s3://b/d/",
            "s3://b/a//k",
            "gs://b/k",
            "",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
