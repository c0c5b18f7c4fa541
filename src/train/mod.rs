//! Training soft-prompt tasks on the frozen base model.
//!
//! The base model's weights are plain tensors and never change; the prompt,
//! its optional reparameterization encoder and the head are
//! [`candle_core::Var`]s (see [`params`]). A step runs the batched forward
//! ([`Engine::forward`] in [`OpsMode::Train`]: on the CPU the fused layer
//! stack as one op with a hand-written backward, see
//! `model::encoder::train`), takes the cross-entropy, and updates the
//! variables with AdamW ([`optim`]) under a linear warm-up / linear decay
//! schedule. Validation runs through
//! [`Engine::classify`] on the folded task, exactly what serving computes.
//!
//! Checkpoints (one safetensors file, replaced atomically) hold the current
//! and best parameters, AdamW's moments and the loop state; Ctrl-C stops at
//! the next step boundary and writes one, and a resumed run continues the
//! trajectory an uninterrupted run would have taken.

pub mod cli;
pub mod data;
pub mod metrics;
pub mod optim;
pub mod params;

use anyhow::Context;
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::engine::{Engine, Row, TaskModel};
use crate::model::OpsMode;
use crate::profile::time;
pub use data::{Example, Sample};
pub use metrics::Metrics;
pub use params::{Method, Params, PromptInit, Reparam, Spec};

/// Optimization and bookkeeping settings of one run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Training rows per optimizer step.
    pub batch_size: usize,
    /// Peak learning rate of the prompt and its encoder.
    pub lr: f64,
    /// Peak learning rate of the head.
    pub head_lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Passes over the training set (ignored when `max_steps` is set).
    pub epochs: usize,
    /// Total optimizer steps, overriding `epochs`.
    pub max_steps: Option<usize>,
    /// Fraction of the steps spent warming the learning rate up linearly.
    pub warmup: f64,
    /// Validate every this many steps; 0 = once per epoch.
    pub eval_every: usize,
    /// Stop after this many validations without a new best accuracy.
    pub patience: Option<usize>,
    /// Seed of the batch order.
    pub seed: u64,
    /// Checkpoint file (written at every validation and on Ctrl-C).
    pub checkpoint: Option<PathBuf>,
    /// Continue from `checkpoint` when it exists.
    pub resume: bool,
    /// Pause (as Ctrl-C would: checkpoint written, `interrupted` set) once
    /// this many steps are done, so a long run can be done in slices on a
    /// shared machine and resumed with the same schedule.
    pub pause_at: Option<usize>,
    /// Draw a progress bar.
    pub progress: bool,
    /// Rows per validation batch.
    pub eval_batch: usize,
    /// The training forward: [`OpsMode::Train`] (fused on the CPU) or
    /// [`OpsMode::TrainOps`] (candle's composed ops, `train --kernels
    /// candle`).
    pub forward: OpsMode,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 32,
            lr: 3e-2,
            head_lr: 3e-2,
            weight_decay: 0.01,
            epochs: 3,
            max_steps: None,
            warmup: 0.06,
            eval_every: 0,
            patience: None,
            seed: 42,
            checkpoint: None,
            resume: false,
            pause_at: None,
            progress: true,
            eval_batch: 64,
            forward: OpsMode::Train,
        }
    }
}

/// One validation during training.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalPoint {
    /// Optimizer steps done.
    pub step: usize,
    /// Mean training loss since the previous validation.
    pub train_loss: f64,
    /// Accuracy of the folded task on the validation set.
    pub val_accuracy: f64,
}

/// What a run did. After [`train`] returns, the parameters hold the best
/// validation state (the last one when there is no validation set).
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Steps done (the checkpoint's position).
    pub steps: usize,
    /// Steps the run was planned for.
    pub total_steps: usize,
    /// Step whose parameters were kept.
    pub best_step: usize,
    /// Best validation accuracy (None without a validation set).
    pub best_val_accuracy: Option<f64>,
    /// Every validation, in order (resumed runs include earlier ones).
    pub evals: Vec<EvalPoint>,
    /// Wall-clock seconds of this invocation (a resumed run counts its own).
    pub seconds: f64,
    /// Seconds of this invocation spent in optimizer steps (prompt encoder,
    /// forward, backward, update), without validation and checkpoints: what
    /// `bench/train.sh` compares per step with PEFT.
    pub step_seconds: f64,
    /// Steps this invocation ran (a resumed run counts its own).
    pub steps_run: usize,
    /// Stopped by the stop flag (Ctrl-C); a checkpoint was written.
    pub interrupted: bool,
    /// Stopped by `patience`.
    pub early_stopped: bool,
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    spec: Spec,
    step: usize,
    total_steps: usize,
    best_step: usize,
    best_val_accuracy: Option<f64>,
    stale_evals: usize,
    evals: Vec<EvalPoint>,
}

/// Checkpoint header key holding [`CheckpointState`] as JSON.
const CKPT_STATE: &str = "softprompt.train.state";

/// What a checkpoint holds besides the loop state: tensors by name.
struct CheckpointTensors {
    current: HashMap<String, Tensor>,
    best: HashMap<String, Tensor>,
    /// AdamW's state; empty in checkpoints written before it was saved.
    optimizer: HashMap<String, Tensor>,
}

fn save_checkpoint(
    path: &Path,
    state: &CheckpointState,
    t: &CheckpointTensors,
) -> anyhow::Result<()> {
    let mut bufs = Vec::new();
    for (prefix, map) in [
        ("param.", &t.current),
        ("best.", &t.best),
        ("adamw.", &t.optimizer),
    ] {
        for (name, t) in map {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            bufs.push((
                format!("{prefix}{name}"),
                t.dims().to_vec(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
            ));
        }
    }
    let views = bufs
        .iter()
        .map(|(n, s, b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta = HashMap::from([(CKPT_STATE.to_string(), serde_json::to_string(state)?)]);
    let bytes = safetensors::serialize(views, Some(meta))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` with [`crate::fsutil::write_atomic`] (a
/// reader, a crash or Ctrl-C sees the old file or the new one), creating
/// the parent directory first.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    crate::fsutil::write_atomic(path, bytes).with_context(|| path.display().to_string())
}

type Loaded = (CheckpointState, CheckpointTensors);

fn load_checkpoint(path: &Path) -> anyhow::Result<Loaded> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let state_json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(CKPT_STATE))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{}: not a training checkpoint (no {CKPT_STATE} header)",
                path.display()
            )
        })?;
    let state: CheckpointState = serde_json::from_str(state_json)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)?;
    let mut out = CheckpointTensors {
        current: HashMap::new(),
        best: HashMap::new(),
        optimizer: HashMap::new(),
    };
    for (name, t) in tensors {
        if let Some(n) = name.strip_prefix("param.") {
            out.current.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("best.") {
            out.best.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("adamw.") {
            out.optimizer.insert(n.to_string(), t);
        }
    }
    Ok((state, out))
}

/// Reads the loop position of a checkpoint (for tests and `--resume` messages).
pub fn checkpoint_step(path: &Path) -> anyhow::Result<usize> {
    Ok(load_checkpoint(path)?.0.step)
}

/// Batches of one epoch: a seeded shuffle, then rows of similar length
/// grouped (within windows of 32 batches) so that little is padding, then
/// the batches themselves shuffled.
pub fn epoch_batches(lens: &[usize], batch: usize, seed: u64, epoch: usize) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut idx: Vec<usize> = (0..lens.len()).collect();
    idx.shuffle(&mut rng);
    let mut out = Vec::new();
    for window in idx.chunks(batch * 32) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| lens[i]);
        out.extend(w.chunks(batch).map(|c| c.to_vec()));
    }
    out.shuffle(&mut rng);
    out
}

/// Predicted label index for every sample, through the serving path
/// ([`Engine::classify`]), in batches of rows of similar length.
pub fn predict(
    engine: &Engine,
    task: &TaskModel,
    samples: &[Sample],
    batch: usize,
) -> anyhow::Result<Vec<usize>> {
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| samples[i].input.len());
    let mut out = vec![0usize; samples.len()];
    for chunk in order.chunks(batch.max(1)) {
        let rows: Vec<Row> = chunk
            .iter()
            .map(|&i| Row {
                input: &samples[i].input,
                task,
            })
            .collect();
        let logits = engine.classify(&rows)?;
        for (&i, l) in chunk.iter().zip(logits) {
            out[i] = l
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (j, &v)| {
                    if v > best.1 { (j, v) } else { best }
                })
                .0;
        }
    }
    Ok(out)
}

/// Accuracy of the task's folded form on `samples`.
pub fn accuracy(
    engine: &Engine,
    task: &TaskModel,
    samples: &[Sample],
    batch: usize,
) -> anyhow::Result<f64> {
    let pred = predict(engine, task, samples, batch)?;
    let ok = pred
        .iter()
        .zip(samples)
        .filter(|(p, s)| **p == s.label)
        .count();
    Ok(ok as f64 / samples.len().max(1) as f64)
}

/// Cross-entropy of one training batch, differentiable with respect to the
/// parameters (exposed for tests).
pub fn batch_loss(
    engine: &Engine,
    task: &TaskModel,
    samples: &[&Sample],
) -> anyhow::Result<Tensor> {
    batch_loss_in(engine, task, samples, OpsMode::Train)
}

/// [`batch_loss`] through the forward of `mode`: [`OpsMode::TrainOps`] is
/// the composed-op reference of the fused training op.
pub fn batch_loss_in(
    engine: &Engine,
    task: &TaskModel,
    samples: &[&Sample],
    mode: OpsMode,
) -> anyhow::Result<Tensor> {
    let rows: Vec<Row> = samples
        .iter()
        .map(|s| Row {
            input: &s.input,
            task,
        })
        .collect();
    let groups = engine.forward(&rows, mode)?;
    anyhow::ensure!(groups.len() == 1, "a training batch holds one task");
    let g = &groups[0];
    let labels: Vec<u32> = g
        .rows
        .iter()
        .map(|&r| samples[r as usize].label as u32)
        .collect();
    let target = Tensor::new(labels.as_slice(), g.logits.device())?;
    Ok(candle_nn::loss::cross_entropy(&g.logits, &target)?)
}

fn lr_factor(step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        (step + 1) as f64 / warmup as f64
    } else {
        ((total - step) as f64 / (total - warmup).max(1) as f64).max(0.0)
    }
}

/// Trains `params` on `train`, validating on `val`. Returns when the steps
/// are done, early stopping triggers, or `stop` is set (then a checkpoint is
/// written, when configured, and `interrupted` is true).
pub fn train(
    engine: &Engine,
    params: &Params,
    train: &[Sample],
    val: &[Sample],
    cfg: &TrainConfig,
    stop: &AtomicBool,
) -> anyhow::Result<Outcome> {
    anyhow::ensure!(!train.is_empty(), "no training examples");
    anyhow::ensure!(cfg.batch_size > 0, "--batch-size: expected at least 1");
    let started = Instant::now();
    let per_epoch = train.len().div_ceil(cfg.batch_size);
    let total = cfg.max_steps.unwrap_or(per_epoch * cfg.epochs.max(1));
    let warmup = (cfg.warmup * total as f64).round() as usize;
    let eval_every = if cfg.eval_every == 0 {
        per_epoch
    } else {
        cfg.eval_every
    };
    let lens: Vec<usize> = train.iter().map(|s| s.input.len()).collect();

    // Group 0: the prompt and its encoder; group 1: the head.
    let adamw = optim::AdamWConfig {
        weight_decay: cfg.weight_decay,
        ..Default::default()
    };
    let mut opt = optim::AdamW::new(
        params.named(),
        |name| usize::from(name.starts_with("head.")),
        adamw,
    )?;

    let mut st = CheckpointState {
        spec: params.spec.clone(),
        step: 0,
        total_steps: total,
        best_step: 0,
        best_val_accuracy: None,
        stale_evals: 0,
        evals: Vec::new(),
    };
    let mut best = params.values()?;
    if let (true, Some(path)) = (cfg.resume, &cfg.checkpoint)
        && path.is_file()
    {
        let (s, saved) = load_checkpoint(path)?;
        anyhow::ensure!(
            s.spec == params.spec,
            "{}: checkpoint was made for {:?}, this run is {:?}",
            path.display(),
            s.spec,
            params.spec
        );
        params.set_values(&saved.current)?;
        if saved.optimizer.is_empty() {
            tracing::warn!(checkpoint = %path.display(), "checkpoint has no optimizer state (older format); AdamW restarts from zero");
        } else {
            opt.set_state(&saved.optimizer)
                .with_context(|| path.display().to_string())?;
        }
        best = saved.best;
        tracing::info!(step = s.step, checkpoint = %path.display(), "resuming");
        st = CheckpointState {
            total_steps: total,
            ..s
        };
    }

    let pb = if cfg.progress {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}<{eta_precise}] {wide_bar} {pos}/{len} {msg}",
        )
        .expect("valid template"),
    );
    pb.set_position(st.step as u64);
    let mut loss_sum = 0.0;
    let mut loss_n = 0usize;
    let mut interrupted = false;
    let mut early = false;
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut batches_epoch = usize::MAX;
    let (mut step_seconds, mut steps_run) = (0.0, 0usize);

    let checkpoint = |st: &CheckpointState,
                      best: &HashMap<String, Tensor>,
                      opt: &optim::AdamW|
     -> anyhow::Result<()> {
        if let Some(p) = &cfg.checkpoint {
            let tensors = CheckpointTensors {
                current: params.values()?,
                best: best.clone(),
                optimizer: opt.state()?,
            };
            save_checkpoint(p, st, &tensors)?;
        }
        Ok(())
    };

    while st.step < total {
        if stop.load(Ordering::SeqCst) || cfg.pause_at.is_some_and(|p| st.step >= p) {
            interrupted = true;
            break;
        }
        let epoch = st.step / per_epoch;
        if epoch != batches_epoch {
            batches = epoch_batches(&lens, cfg.batch_size, cfg.seed, epoch);
            batches_epoch = epoch;
        }
        let batch: Vec<&Sample> = batches[st.step % per_epoch]
            .iter()
            .map(|&i| &train[i])
            .collect();
        let f = lr_factor(st.step, total, warmup);
        let step_start = Instant::now();
        let task = time("train.prompt_encoder", || params.task_model())?;
        let loss = time("train.forward", || {
            batch_loss_in(engine, &task, &batch, cfg.forward)
        })?;
        let grads = time("train.backward", || loss.backward())?;
        time("train.optimizer", || {
            opt.step(&grads, &[cfg.lr * f, cfg.head_lr * f])
        })?;
        let l = loss.to_scalar::<f32>()? as f64;
        step_seconds += step_start.elapsed().as_secs_f64();
        steps_run += 1;
        anyhow::ensure!(
            l.is_finite(),
            "step {}: loss is {l}; lower --lr",
            st.step + 1
        );
        loss_sum += l;
        loss_n += 1;
        st.step += 1;
        pb.set_position(st.step as u64);
        let last = st
            .best_val_accuracy
            .map_or(String::new(), |a| format!(" best val {a:.4}"));
        pb.set_message(format!("loss {:.4}{last}", loss_sum / loss_n as f64));

        if st.step.is_multiple_of(eval_every) || st.step == total {
            let train_loss = loss_sum / loss_n.max(1) as f64;
            loss_sum = 0.0;
            loss_n = 0;
            if val.is_empty() {
                best = params.values()?;
                st.best_step = st.step;
            } else {
                let acc = time("train.validation", || {
                    accuracy(engine, &params.fold()?, val, cfg.eval_batch)
                })?;
                st.evals.push(EvalPoint {
                    step: st.step,
                    train_loss,
                    val_accuracy: acc,
                });
                if st.best_val_accuracy.is_none_or(|b| acc > b) {
                    st.best_val_accuracy = Some(acc);
                    st.best_step = st.step;
                    st.stale_evals = 0;
                    best = params.values()?;
                } else {
                    st.stale_evals += 1;
                }
                pb.suspend(|| {
                    tracing::info!(
                        step = st.step,
                        total,
                        train_loss = format!("{train_loss:.4}"),
                        val_accuracy = format!("{acc:.4}"),
                        best = format!("{:.4}", st.best_val_accuracy.unwrap_or(0.0)),
                        "validation"
                    )
                });
                if cfg.patience.is_some_and(|p| st.stale_evals >= p) {
                    early = true;
                }
            }
            checkpoint(&st, &best, &opt)?;
            if early {
                break;
            }
        }
    }
    if crate::profile::on() {
        // SOFTPROMPT_PROFILE=1: where the steps went. The forward's own rows
        // (qkv.matmul, attn.*, …) are inside train.forward.
        pb.suspend(crate::profile::print);
    }
    if interrupted {
        checkpoint(&st, &best, &opt)?;
    }
    pb.finish_and_clear();
    if !interrupted {
        params.set_values(&best)?;
    }
    Ok(Outcome {
        steps: st.step,
        total_steps: total,
        best_step: st.best_step,
        best_val_accuracy: st.best_val_accuracy,
        evals: st.evals,
        seconds: started.elapsed().as_secs_f64(),
        step_seconds,
        steps_run,
        interrupted,
        early_stopped: early,
    })
}
