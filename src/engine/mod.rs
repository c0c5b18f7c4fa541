//! The batched forward: rows of different tasks (shallow, deep or plain),
//! different prompt and text lengths, in one pass through the frozen model.

pub mod assemble;
mod device;
pub mod split;
pub mod synthetic;
pub mod task_model;
pub mod template;

use candle_core::{D, DType, Tensor};
use std::sync::Arc;

use crate::model::encoder::{Packing, RowSpan, TrainRow};
use crate::model::{Encoded, Encoder, Model, ModelError, OpsMode};
use crate::profile::time;
pub use task_model::{Head, Pooling, ShallowPrompt, TaskModel};
pub use template::{Segment, Template};

/// Why a batch could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("empty batch")]
    EmptyBatch,
    #[error("row {row}: {len} positions (prompt + text) but the model has {max}")]
    RowTooLong { row: usize, len: usize, max: usize },
    #[error("row {row}: token id {id} outside the vocabulary of {vocab}")]
    BadToken { row: usize, id: u32, vocab: usize },
    #[error("row {row}: token type {ty} but the model has {types}")]
    BadTokenType { row: usize, ty: u32, types: usize },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

impl EngineError {
    /// This error with its row index counted from `start`: for a chunk of a
    /// batch run as its own forward.
    fn rows_from(self, start: usize) -> Self {
        match self {
            EngineError::RowTooLong { row, len, max } => EngineError::RowTooLong {
                row: row + start,
                len,
                max,
            },
            EngineError::BadToken { row, id, vocab } => EngineError::BadToken {
                row: row + start,
                id,
                vocab,
            },
            EngineError::BadTokenType { row, ty, types } => EngineError::BadTokenType {
                row: row + start,
                ty,
                types,
            },
            other => other,
        }
    }
}

/// One row of a batch: a tokenized input and the task it is for.
#[derive(Clone, Copy)]
pub struct Row<'a> {
    pub input: &'a Encoded,
    pub task: &'a TaskModel,
}

impl Row<'_> {
    /// Positions the row runs through every layer: its text and its task's
    /// virtual tokens (a deep prefix adds keys, not positions). What
    /// [`split::chunks`] divides a batch by.
    pub fn positions(&self) -> usize {
        self.input.len() + self.task.shallow_len()
    }
}

/// Logits of the rows of one task (all rows of a task share a head).
pub struct TaskLogits {
    /// Row indices into the batch, in batch order.
    pub rows: Vec<u32>,
    /// `[rows.len(), num_labels]`.
    pub logits: Tensor,
}

/// Which forward serves requests (`serve --kernels`): one backend per
/// device, behind [`Engine::classify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Kernels {
    /// The backend made for the device: our fused kernels on the CPU, the
    /// device backend on a CUDA GPU, candle's ops on other devices.
    #[default]
    Auto,
    /// The device backend (`engine/device.rs`): packed rows, our varlen
    /// attention kernel, one upload and one download per batch. What a
    /// CUDA GPU runs; on the CPU it runs the kernel's host build, so that
    /// CI tests it (slower there than `auto`).
    Device,
    /// candle's ops over a padded attention grid on every device (the
    /// reference the others are tested against; Metal serves with it).
    Candle,
}

impl Kernels {
    /// Whether these kernels serve through the device backend on `device`
    /// (the only one that serves 16-bit weights).
    pub fn device_backend(self, device: &candle_core::Device) -> bool {
        self == Kernels::Device || (self == Kernels::Auto && device.is_cuda())
    }
}

/// Loads the model as `serve` holds it for `kernels` on `device`: weights
/// in the serving dtype (`dtype` resolved for the backend that will
/// serve), and packed (f32 or `quantize`) where the fused CPU forward
/// serves. `serve` and the hidden `workload` subcommand both load this way.
pub fn load_serving_model(
    dir: &std::path::Path,
    device: &candle_core::Device,
    kernels: Kernels,
    dtype: crate::model::ServeDtype,
    quantize: crate::model::Quantize,
) -> Result<Model, ModelError> {
    let dtype = dtype.resolve(device, kernels.device_backend(device))?;
    let mut model = Model::load(dir, device)?;
    model.encoder.cast(dtype)?;
    // Only the fused CPU forward reads packed weights (it serves f32).
    if kernels == Kernels::Auto && dtype == DType::F32 {
        model.encoder.pack(quantize)?;
    }
    Ok(model)
}

/// Runs batches on the resident model. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    model: Arc<Model>,
    kernels: Kernels,
}

impl Engine {
    /// Wraps a loaded model; serves with [`Kernels::Auto`].
    pub fn new(model: Arc<Model>) -> Self {
        Self::with_kernels(model, Kernels::Auto)
    }

    /// Wraps a loaded model, serving with `kernels`.
    pub fn with_kernels(model: Arc<Model>, kernels: Kernels) -> Self {
        Engine { model, kernels }
    }

    /// The forward [`Engine::classify`] runs.
    pub fn serve_mode(&self) -> OpsMode {
        let dev = self.model.encoder.device();
        match self.kernels {
            k if k.device_backend(dev) => OpsMode::ServeDevice,
            // A 16-bit encoder serves through the device backend only.
            Kernels::Auto if dev.is_cpu() && self.model.encoder.dtype() == DType::F32 => {
                OpsMode::Serve
            }
            Kernels::Auto if dev.is_cpu() => OpsMode::ServeDevice,
            _ => OpsMode::ServeOps,
        }
    }

    /// The resident model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Logits for every row, in row order (each row has its task's label
    /// count).
    pub fn classify(&self, rows: &[Row<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        let mode = self.serve_mode();
        if mode == OpsMode::ServeDevice {
            return Ok(device::classify(&self.model.encoder, rows)?.0);
        }
        if mode == OpsMode::Serve {
            // The fused CPU forward: large batches as several whole forwards
            // taken by the threads as they come free (engine/split.rs says why).
            let positions: Vec<usize> = rows.iter().map(Row::positions).collect();
            let parts = split::chunks(&positions, rayon::current_num_threads(), split::SERVE);
            if parts.len() > 1 {
                use rayon::prelude::*;
                let outs: Vec<Result<Vec<Vec<f32>>, EngineError>> = parts
                    .into_par_iter()
                    .map(|r| {
                        let start = r.start;
                        self.classify_whole(&rows[r])
                            .map_err(|e| e.rows_from(start))
                    })
                    .collect();
                let mut out = Vec::with_capacity(rows.len());
                for o in outs {
                    out.extend(o?);
                }
                return Ok(out);
            }
        }
        self.classify_whole(rows)
    }

    /// [`Engine::classify`] as one forward over every row.
    fn classify_whole(&self, rows: &[Row<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        let mut out = vec![Vec::new(); rows.len()];
        for g in self.forward(rows, self.serve_mode())? {
            let values: Vec<Vec<f32>> = g.logits.to_vec2()?;
            for (r, v) in g.rows.iter().zip(values) {
                out[*r as usize] = v;
            }
        }
        Ok(out)
    }

    /// The differentiable forward: logits grouped by task. Training calls
    /// this with [`OpsMode::Train`]; serving goes through [`Engine::classify`].
    pub fn forward(&self, rows: &[Row<'_>], mode: OpsMode) -> Result<Vec<TaskLogits>, EngineError> {
        let enc: &Encoder = &self.model.encoder;
        if mode == OpsMode::ServeDevice {
            // The device backend answers per row; group them by task.
            let (logits, groups) = device::classify(enc, rows)?;
            return groups
                .into_iter()
                .map(|(_, members)| {
                    let v: Vec<f32> = members
                        .iter()
                        .flat_map(|&r| logits[r as usize].iter().copied())
                        .collect();
                    let cols = logits[members[0] as usize].len();
                    Ok(TaskLogits {
                        logits: Tensor::from_vec(v, (members.len(), cols), enc.device())?,
                        rows: members,
                    })
                })
                .collect();
        }
        let fused = enc.fused(mode);
        let a = time("assemble", || {
            assemble::assemble_with(
                rows,
                &enc.config,
                enc.word_embeddings(),
                enc.device(),
                fused,
            )
        })?;
        let hidden = if fused {
            // Shallow prompts by task, in the order `a.sources` numbers them.
            let prompts: Vec<Option<&Tensor>> = a
                .groups
                .iter()
                .map(|(first, _)| rows[*first].task.shallow.as_ref().map(|s| &s.embeddings))
                .collect();
            let x = time("embed", || {
                enc.embed_cpu(&a.sources, &prompts, &a.types, &a.positions)
            })?;
            let spans: Vec<RowSpan> = a
                .spans
                .iter()
                .zip(rows)
                .map(|(&(start, len), r)| RowSpan {
                    start,
                    len,
                    deep: r.task.deep.as_ref(),
                })
                .collect();
            // The tokens the heads read: a row's first position (CLS,
            // pooler), or all of them (mean pooling).
            let mut outputs = Vec::with_capacity(rows.len());
            let mut first = Vec::with_capacity(rows.len());
            for (&(start, len), r) in a.spans.iter().zip(rows) {
                first.push(outputs.len() as u32);
                let read = r.task.pooling.positions_read(len);
                outputs.extend((start..start + read).map(|t| t as u32));
            }
            if outputs.len() == a.mean_weights.dim(1)? {
                enc.encode_cpu(x, &spans, None)?
            } else {
                let hidden = enc.encode_cpu(x, &spans, Some(&outputs))?;
                let readout = Readout {
                    first_index: Tensor::new(first.as_slice(), enc.device())?,
                    mean_weights: a
                        .mean_weights
                        .index_select(&Tensor::new(outputs.as_slice(), enc.device())?, 1)?,
                };
                return time("heads", || self.heads(rows, &a, &readout, &hidden));
            }
        } else if mode == OpsMode::Train && enc.fused_train() {
            self.encode_train(rows, &a)?
        } else {
            let inputs = a
                .inputs
                .as_ref()
                .expect("assembled for the candle-ops forward");
            let x = time("embed", || {
                enc.embed(inputs, &a.type_ids, &a.position_ids, mode)
            })?;
            let pack = Packing {
                batch: a.batch,
                seq: a.seq,
                pad_index: &a.pad_index,
                pack_index: &a.pack_index,
            };
            enc.encode(&x, &pack, &a.mask, a.prefix.as_ref(), mode)?
        };
        let readout = Readout {
            first_index: a.first_index.clone(),
            mean_weights: a.mean_weights.clone(),
        };
        time("heads", || self.heads(rows, &a, &readout, &hidden))
    }

    /// The CPU training forward ([`Encoder::encode_train`]) of an assembled
    /// batch: the batch's distinct deep prompts are stacked into one table
    /// (so that the backward reaches each), and every row points at its
    /// task's part.
    fn encode_train(
        &self,
        rows: &[Row<'_>],
        a: &assemble::Assembled,
    ) -> Result<Tensor, EngineError> {
        let enc: &Encoder = &self.model.encoder;
        let inputs = a
            .inputs
            .as_ref()
            .expect("assembled for the candle-ops forward");
        let mut parts = Vec::new();
        let mut deep_start = vec![0usize; rows.len()];
        let mut at = 0;
        for (first, members) in &a.groups {
            let task = rows[*first].task;
            for &r in members {
                deep_start[r as usize] = at;
            }
            if let Some(d) = &task.deep {
                parts.push(d.clone());
                at += task.deep_len();
            }
        }
        let deep = if parts.is_empty() {
            None
        } else {
            Some(Tensor::cat(&parts, 0)?)
        };
        let train_rows: Vec<TrainRow> = a
            .spans
            .iter()
            .zip(rows)
            .zip(deep_start)
            .map(|((&(start, len), row), deep_start)| TrainRow {
                start,
                len,
                deep_start,
                deep_len: row.task.deep_len(),
            })
            .collect();
        Ok(time("train.encoder", || {
            enc.encode_train(inputs, &a.types, &a.positions, &train_rows, deep.as_ref())
        })?)
    }

    /// Pooling and each task's head over the encoder's output (every
    /// packed token, or the ones the heads read: `readout` says where).
    fn heads(
        &self,
        rows: &[Row<'_>],
        a: &assemble::Assembled,
        readout: &Readout,
        hidden: &Tensor,
    ) -> Result<Vec<TaskLogits>, EngineError> {
        let enc: &Encoder = &self.model.encoder;

        let needs = |p: Pooling| {
            a.groups
                .iter()
                .any(|(first, _)| rows[*first].task.pooling == p)
        };
        let first = hidden.index_select(&readout.first_index, 0)?;
        let pooled = if needs(Pooling::Pooler) {
            Some(enc.pool(&first)?)
        } else {
            None
        };
        let mean = if needs(Pooling::Mean) {
            Some(readout.mean_weights.matmul(hidden)?)
        } else {
            None
        };

        let mut out = Vec::with_capacity(a.groups.len());
        for (first_row, members) in a.groups.iter().cloned() {
            let task = rows[first_row].task;
            let features = match task.pooling {
                Pooling::Pooler => pooled.as_ref(),
                Pooling::First => Some(&first),
                Pooling::Mean => mean.as_ref(),
            }
            .expect("features computed for every pooling in use");
            let feats = if members.len() == a.batch {
                features.clone()
            } else {
                let idx = Tensor::new(members.as_slice(), enc.device())?;
                features.index_select(&idx, 0)?
            };
            let logits = task.head.forward(&feats)?;
            debug_assert_eq!(logits.dim(D::Minus1)?, task.num_labels());
            out.push(TaskLogits {
                rows: members,
                logits,
            });
        }
        Ok(out)
    }
}

/// Where the heads find each row's features in the encoder's output.
struct Readout {
    /// `[rows]`: the output row of each row's first position.
    first_index: Tensor,
    /// `[rows, output rows]`: each row's mean over its text tokens.
    mean_weights: Tensor,
}
