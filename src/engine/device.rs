//! The device backend's batch: what serving runs on a GPU (and on the CPU
//! with `serve --kernels device`). Designed for a device where every copy
//! and every kernel launch costs:
//! - the host lays the batch out ([`assemble::plan`]) and uploads every
//!   index it needs in ONE u32 copy, which the device slices;
//! - prompts were placed on the device in the serving dtype when the task
//!   was loaded (`Task::to_device`); a batch only gathers from them;
//! - attention is the varlen kernel over packed rows
//!   ([`crate::model::Encoder::encode_varlen`]);
//! - pooling and heads run for every row at once: each row's head weights
//!   are gathered from the batch's head table and applied with one batched
//!   matmul, not one launch per task;
//! - logits come back in ONE copy.
//!
//! What is still per task: building the batch's tables (virtual vectors,
//! deep prompts, heads) concatenates each distinct task's tensors, a
//! device-to-device copy per task and table. A resident table per
//! registry, indexed by task slot, would remove it.

use candle_core::{DType, Device, Tensor};

use super::assemble::{self, Plan};
use super::task_model::{Head, Pooling};
use super::{EngineError, Row};
use crate::model::Encoder;
use crate::model::kernels::varlen::{VarlenIndex, VarlenRow};
use crate::profile::time;

/// What a row's features are (the u32 codes of the upload).
const FIRST: u32 = 0;
const POOLER: u32 = 1;
const MEAN: u32 = 2;

/// Offsets of the parts of the one upload.
struct Upload {
    tensor: Tensor,
    at: usize,
}

impl Upload {
    /// The next `len` values as a 1-D u32 view.
    fn next(&mut self, len: usize) -> candle_core::Result<Tensor> {
        let t = self.tensor.narrow(0, self.at, len)?;
        self.at += len;
        Ok(t)
    }
}

/// Logits of every row, each with its task's label count, and the batch's
/// rows grouped by task (as [`assemble::plan`] groups them).
pub(super) type Classified = (Vec<Vec<f32>>, Vec<(usize, Vec<u32>)>);

/// The batch's logits ([`Classified`]).
pub(super) fn classify(enc: &Encoder, rows: &[Row<'_>]) -> Result<Classified, EngineError> {
    let pl = time("assemble", || assemble::plan(rows, &enc.config))?;
    let dev = enc.device();
    let dtype = enc.dtype();
    let (b, n, h) = (pl.batch, pl.tokens, enc.config.hidden_size);

    // Host: every index, in one buffer.
    let varlen_rows: Vec<VarlenRow> = pl
        .spans
        .iter()
        .zip(&pl.task_of_row)
        .map(|(&(start, len), &t)| VarlenRow {
            start,
            len,
            prefix_start: pl.deep_offset[t] as usize,
            prefix_len: pl.tasks[t].deep_len(),
        })
        .collect();
    let deep_rows = 1 + pl.tasks.iter().map(|t| t.deep_len()).sum::<usize>();
    let checked = VarlenIndex::new(&varlen_rows, deep_rows)
        .map_err(|e| candle_core::Error::Msg(format!("batch layout: {e}")))?;
    let kinds: Vec<u32> = rows
        .iter()
        .map(|r| match r.task.pooling {
            Pooling::First => FIRST,
            Pooling::Pooler => POOLER,
            Pooling::Mean => MEAN,
        })
        .collect();
    // Mean pooling: each text token adds into its row, the rest into a
    // spare row b that is dropped.
    let mut mean_target = vec![b as u32; n];
    for (r, &(start, len)) in pl.spans.iter().enumerate() {
        for (k, slot) in mean_target[start..start + len].iter_mut().enumerate() {
            if pl.is_text[start + k] > 0.0 {
                *slot = r as u32;
            }
        }
    }
    let slots: Vec<u32> = pl.task_of_row.iter().map(|&t| t as u32).collect();
    let has_dense: Vec<u32> = pl
        .task_of_row
        .iter()
        .map(|&t| matches!(pl.tasks[t].head, Head::Dense2 { .. }) as u32)
        .collect();
    let mut buf: Vec<u32> = Vec::with_capacity(6 * n + 8 * b);
    for part in [
        &pl.word_ids[..],
        &pl.virt_ids,
        &pl.types,
        &pl.positions,
        checked.values(),
        &pl.first_index,
        &mean_target,
        &pl.text_counts,
        &kinds,
        &slots,
        &has_dense,
    ] {
        buf.extend_from_slice(part);
    }
    let len = buf.len();
    let mut up = Upload {
        tensor: time("upload", || Tensor::from_vec(buf, (len,), dev))?,
        at: 0,
    };
    let (word_ids, virt_ids, types, positions) =
        (up.next(n)?, up.next(n)?, up.next(n)?, up.next(n)?);
    let index = up.next(checked.values().len())?;
    let (first_index, mean_target, counts, kinds_t, slots_t, dense_t) = (
        up.next(b)?,
        up.next(n)?,
        up.next(b)?,
        up.next(b)?,
        up.next(b)?,
        up.next(b)?,
    );

    // Embeddings: word vectors for text, the batch's virtual table for
    // virtual tokens.
    let x = time("embed", || -> Result<Tensor, EngineError> {
        let words = enc.word_embeddings().index_select(&word_ids, 0)?;
        let inputs = if pl.virtual_rows > 1 {
            let table = table(&pl, dev, dtype, h, |t| {
                t.shallow.as_ref().map(|s| s.embeddings.clone())
            })?;
            let virt = table.index_select(&virt_ids, 0)?;
            let is_text = virt_ids.eq(0u32)?.to_dtype(dtype)?.unsqueeze(1)?;
            (words.broadcast_mul(&is_text)? + virt)?
        } else {
            words
        };
        Ok(enc.embed(
            &inputs,
            &types,
            &positions,
            crate::model::OpsMode::ServeDevice,
        )?)
    })?;
    let width = enc.config.num_hidden_layers * 2 * h;
    let prefix = table(&pl, dev, dtype, width, |t| t.deep.clone())?;
    let hidden = enc.encode_varlen(&x, &prefix, &index, &checked)?;

    let logits = time("heads", || {
        heads(
            enc,
            rows,
            &pl,
            &hidden,
            Readout {
                first_index: &first_index,
                mean_target: &mean_target,
                counts: &counts,
                kinds: &kinds_t,
                slots: &slots_t,
                has_dense: &dense_t,
                kinds_host: &kinds,
            },
        )
    })?;
    Ok((logits, pl.groups))
}

/// A batch table: a zero row, then each distinct task's `part` (virtual
/// vectors or deep prompts), in the plan's task order, as the plan's
/// offsets number them.
fn table(
    pl: &Plan<'_>,
    dev: &Device,
    dtype: DType,
    width: usize,
    part: impl Fn(&super::TaskModel) -> Option<Tensor>,
) -> candle_core::Result<Tensor> {
    let mut parts = vec![Tensor::zeros((1, width), dtype, dev)?];
    for t in &pl.tasks {
        if let Some(p) = part(t) {
            // A no-op for tasks the registry placed (prompts already in the
            // serving dtype); converts those built by hand.
            parts.push(p.to_dtype(dtype)?);
        }
    }
    if parts.len() == 1 {
        return Ok(parts.pop().expect("one part"));
    }
    Tensor::cat(&parts, 0)
}

/// Where the heads find their inputs, on the device (and the kinds on the
/// host too, to skip what no row needs).
struct Readout<'a> {
    first_index: &'a Tensor,
    mean_target: &'a Tensor,
    counts: &'a Tensor,
    kinds: &'a Tensor,
    slots: &'a Tensor,
    has_dense: &'a Tensor,
    kinds_host: &'a [u32],
}

/// Pooled features of every row, then every row's head at once.
fn heads(
    enc: &Encoder,
    rows: &[Row<'_>],
    pl: &Plan<'_>,
    hidden: &Tensor,
    r: Readout<'_>,
) -> Result<Vec<Vec<f32>>, EngineError> {
    let b = pl.batch;
    let h = enc.config.hidden_size;
    let first = hidden
        .index_select(r.first_index, 0)?
        .to_dtype(DType::F32)?;
    let uses = |k: u32| r.kinds_host.contains(&k);
    let is = |k: u32| -> candle_core::Result<Tensor> {
        r.kinds
            .eq(k)?
            .unsqueeze(1)?
            .broadcast_as((b, h))?
            .contiguous()
    };
    let mut features = first.clone();
    if uses(POOLER) {
        let pooled = enc
            .pool(&first.to_dtype(enc.dtype())?)?
            .to_dtype(DType::F32)?;
        features = is(POOLER)?.where_cond(&pooled, &features)?;
    }
    if uses(MEAN) {
        let sums = Tensor::zeros((b + 1, h), hidden.dtype(), hidden.device())?
            .index_add(r.mean_target, hidden, 0)?
            .narrow(0, 0, b)?
            .to_dtype(DType::F32)?;
        let mean = sums.broadcast_div(&r.counts.to_dtype(DType::F32)?.unsqueeze(1)?)?;
        features = is(MEAN)?.where_cond(&mean, &features)?;
    }

    // The batch's head table: per distinct task, its output layer padded
    // to the most labels, and its dense layer where it has one.
    let labels = pl.tasks.iter().map(|t| t.num_labels()).max().unwrap_or(0);
    let (mut outs, mut out_bias, mut dense, mut dense_bias) = (vec![], vec![], vec![], vec![]);
    let any_dense = pl
        .tasks
        .iter()
        .any(|t| matches!(t.head, Head::Dense2 { .. }));
    for t in &pl.tasks {
        let (d, out) = match &t.head {
            Head::Linear(l) => (None, l),
            Head::Dense2 { dense, out } => (Some(dense), out),
        };
        let pad = labels - t.num_labels();
        outs.push(out.weight.pad_with_zeros(0, 0, pad)?);
        out_bias.push(out.bias.pad_with_zeros(0, 0, pad)?);
        if any_dense {
            match d {
                Some(d) => {
                    dense.push(d.weight.clone());
                    dense_bias.push(d.bias.clone());
                }
                None => {
                    dense.push(Tensor::zeros((h, h), DType::F32, hidden.device())?);
                    dense_bias.push(Tensor::zeros(h, DType::F32, hidden.device())?);
                }
            }
        }
    }
    let gather = |parts: &[Tensor]| -> candle_core::Result<Tensor> {
        Tensor::stack(parts, 0)?.index_select(r.slots, 0)
    };
    if any_dense {
        // tanh(W x + b) for rows whose task has a dense layer, x for the rest.
        let w = gather(&dense)?; // [B, h, h]
        let y = w
            .matmul(&features.unsqueeze(2)?)?
            .squeeze(2)?
            .add(&gather(&dense_bias)?)?
            .tanh()?;
        let has = r
            .has_dense
            .eq(1u32)?
            .unsqueeze(1)?
            .broadcast_as((b, h))?
            .contiguous()?;
        features = has.where_cond(&y, &features)?;
    }
    let logits = gather(&outs)?
        .matmul(&features.unsqueeze(2)?)?
        .squeeze(2)?
        .add(&gather(&out_bias)?)?;
    let all: Vec<Vec<f32>> = time("download", || logits.to_vec2())?;
    Ok(all
        .into_iter()
        .zip(rows)
        .map(|(mut v, row)| {
            v.truncate(row.task.num_labels());
            v
        })
        .collect())
}
