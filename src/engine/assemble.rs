//! Turns rows of different tasks into the padded tensors of one forward pass.
//!
//! Each row's sequence is its template laid out (virtual tokens and text).
//! Tokens are packed row after row without padding for the per-token work
//! (embeddings, linear layers); attention alone sees rows right-padded to the
//! longest, through the `pad_index`/`pack_index` maps. Embeddings come from two gathers
//! (word vectors for text, a per-batch table of virtual vectors) so that no
//! row's layout depends on another's. Deep prompts are gathered once for all
//! layers from a per-batch table, padded to the longest prefix and masked.

use candle_core::{Device, Tensor};
use std::collections::HashMap;

use super::task_model::TaskModel;
use super::template::Segment;
use super::{EngineError, Row};
pub use crate::model::encoder::Source;
use crate::model::{Encoded, ModelConfig};

/// Additive mask value for keys a query must not see (as HF uses finfo.min).
pub const MASKED: f32 = f32::MIN;

/// Tensors for one forward pass.
pub struct Assembled {
    pub batch: usize,
    pub seq: usize,
    /// Longest deep prefix in the batch (0 when no row has one).
    pub prefix_len: usize,
    /// Real (non-padding) positions in the batch: N = Σ row lengths.
    pub tokens: usize,
    /// `[N, hidden]` input vectors before type/position embeddings, packed
    /// row after row with no padding: the linear layers never see padding.
    /// Only for the candle-ops forward; the fused CPU forward reads
    /// [`Assembled::sources`] instead.
    pub inputs: Option<Tensor>,
    /// Where each packed token's input vector comes from (`task` numbers
    /// the shallow prompts as `groups` orders the tasks).
    pub sources: Vec<Source>,
    /// Token type and position id of each packed token (also as tensors in
    /// `type_ids`, `position_ids`).
    pub types: Vec<u32>,
    pub positions: Vec<u32>,
    /// `[B*S]`: for each padded slot, the packed row it reads (padding
    /// slots read row 0; they are masked as keys and dropped as queries).
    pub pad_index: Tensor,
    /// `[N]`: for each packed token, its padded slot `b*S + i`.
    pub pack_index: Tensor,
    /// `[B]`: packed index of each row's position 0.
    pub first_index: Tensor,
    /// `[B, N]`: mean-pooling weights (1/count on the row's text tokens).
    pub mean_weights: Tensor,
    pub type_ids: Tensor,
    pub position_ids: Tensor,
    /// `[B, 1, 1, P + S]` additive attention mask.
    pub mask: Tensor,
    /// `[L, 2, B, heads, P, head_dim]`, when any row has a deep prompt and
    /// the caller asked for it (the fused CPU forward reads each row's deep
    /// prompt in place instead).
    pub prefix: Option<Tensor>,
    /// `(first packed token, positions)` of each row.
    pub spans: Vec<(usize, usize)>,
    /// Distinct tasks of the batch, in first-seen order, with their rows.
    pub groups: Vec<(usize, Vec<u32>)>,
}

/// One laid-out position of a row.
#[derive(Clone, Copy)]
enum Slot {
    Virtual(u32),
    Text { id: u32, ty: u32 },
}

fn layout(input: &Encoded, task: &TaskModel) -> Vec<Slot> {
    let text = |range: std::ops::Range<usize>| {
        range.map(|i| Slot::Text {
            id: input.ids[i],
            ty: input.type_ids[i],
        })
    };
    let n = input.ids.len();
    let Some(sp) = &task.shallow else {
        return text(0..n).collect();
    };
    let split = match input.pair_start {
        Some(p) if sp.template.has_pair_slot() => p,
        _ => n,
    };
    let mut out = Vec::with_capacity(n + sp.template.num_virtual());
    let mut v = 0u32;
    for seg in sp.template.segments() {
        match *seg {
            Segment::Virtual(k) => {
                out.extend((v..v + k as u32).map(Slot::Virtual));
                v += k as u32;
            }
            Segment::Text => out.extend(text(0..split)),
            Segment::Pair => out.extend(text(split..n)),
        }
    }
    out
}

/// Builds the batch tensors, all of them (as the candle-ops forward needs);
/// refuses a row that does not fit the model's positions.
pub fn assemble(
    rows: &[Row<'_>],
    config: &ModelConfig,
    word_embeddings: &Tensor,
    device: &Device,
) -> Result<Assembled, EngineError> {
    assemble_with(rows, config, word_embeddings, device, false)
}

/// The host half of assembling a batch: every row laid out, every index
/// computed, nothing on a device yet. [`assemble_with`] turns it into the
/// tensors of the fused and candle-ops forwards; the device backend
/// (`engine/device.rs`) uploads what it needs in one copy.
pub struct Plan<'t> {
    pub batch: usize,
    /// Longest row (positions).
    pub seq: usize,
    /// Longest deep prefix.
    pub prefix_len: usize,
    /// Packed tokens N.
    pub tokens: usize,
    /// Distinct tasks, in first-seen order.
    pub tasks: Vec<&'t TaskModel>,
    /// Index into `tasks` of each row.
    pub task_of_row: Vec<usize>,
    pub groups: Vec<(usize, Vec<u32>)>,
    /// Rows of the virtual-vector table (row 0 zeros, then each task's
    /// shallow prompt at `virt_offset`).
    pub virtual_rows: u32,
    /// First row of each task's deep prompt in the deep table (row 0
    /// zeros, then each task's deep prompt).
    pub deep_offset: Vec<u32>,
    /// Per packed token: word id (0 for virtual tokens), virtual-table row
    /// (0 for text), 1.0 on text tokens.
    pub word_ids: Vec<u32>,
    pub virt_ids: Vec<u32>,
    pub is_text: Vec<f32>,
    pub sources: Vec<Source>,
    pub types: Vec<u32>,
    pub positions: Vec<u32>,
    /// `[B, P + S]` additive mask, `[B, P]` deep-table rows, `[B*S]` and
    /// `[N]` padding maps: the candle-ops forward's padded attention.
    pub mask: Vec<f32>,
    pub deep_ids: Vec<u32>,
    pub pad_index: Vec<u32>,
    pub pack_index: Vec<u32>,
    /// `[B]` packed index of each row's position 0.
    pub first_index: Vec<u32>,
    /// `[B, N]` mean-pooling weights (1/count on the row's text tokens).
    pub mean_weights: Vec<f32>,
    /// Text tokens of each row (at least 1: the mean's divisor).
    pub text_counts: Vec<u32>,
    pub spans: Vec<(usize, usize)>,
}

/// Lays out every row of a batch on the host ([`Plan`]); refuses a row
/// that does not fit the model's positions or holds an id outside the
/// vocabulary.
pub fn plan<'t>(rows: &[Row<'t>], config: &ModelConfig) -> Result<Plan<'t>, EngineError> {
    if rows.is_empty() {
        return Err(EngineError::EmptyBatch);
    }
    let b = rows.len();

    // Distinct tasks by identity, and their offsets into the batch tables.
    let mut index: HashMap<*const TaskModel, usize> = HashMap::new();
    let mut tasks: Vec<&'t TaskModel> = Vec::new();
    let mut groups: Vec<(usize, Vec<u32>)> = Vec::new();
    let mut task_of_row = Vec::with_capacity(b);
    for (r, row) in rows.iter().enumerate() {
        let t = *index.entry(row.task as *const _).or_insert_with(|| {
            tasks.push(row.task);
            groups.push((r, Vec::new()));
            tasks.len() - 1
        });
        groups[t].1.push(r as u32);
        task_of_row.push(t);
    }
    let mut virt_offset = vec![0u32; tasks.len()];
    let mut deep_offset = vec![0u32; tasks.len()];
    let (mut nv, mut nd) = (1u32, 1u32); // row 0 of each table is zeros
    for (i, t) in tasks.iter().enumerate() {
        virt_offset[i] = nv;
        deep_offset[i] = nd;
        nv += t.shallow_len() as u32;
        nd += t.deep_len() as u32;
    }

    let layouts: Vec<Vec<Slot>> = rows.iter().map(|r| layout(r.input, r.task)).collect();
    let max_seq = config.max_sequence();
    for (r, (l, row)) in layouts.iter().zip(rows).enumerate() {
        let total = l.len() + row.task.deep_len();
        if total > max_seq {
            return Err(EngineError::RowTooLong {
                row: r,
                len: total,
                max: max_seq,
            });
        }
    }
    let s = layouts.iter().map(Vec::len).max().unwrap_or(0);
    let p = rows.iter().map(|r| r.task.deep_len()).max().unwrap_or(0);
    let offset = config.position_offset() as u32;

    let n: usize = layouts.iter().map(Vec::len).sum();
    let mut word_ids = vec![0u32; n];
    let mut virt_ids = vec![0u32; n];
    let mut sources = Vec::with_capacity(n);
    let mut is_text = vec![0f32; n];
    let mut types = vec![0u32; n];
    let mut positions = vec![offset; n];
    let mut mask = vec![MASKED; b * (p + s)];
    let mut deep_ids = vec![0u32; b * p];
    let mut pad_index = vec![0u32; b * s];
    let mut pack_index = vec![0u32; n];
    let mut first_index = vec![0u32; b];
    let mut mean_weights = vec![0f32; b * n];
    let mut text_counts = vec![1u32; b];
    let mut spans = Vec::with_capacity(b);
    let mut k = 0usize;
    for (r, l) in layouts.iter().enumerate() {
        let t = task_of_row[r];
        let nd_row = rows[r].task.deep_len();
        for j in 0..nd_row {
            deep_ids[r * p + j] = deep_offset[t] + j as u32;
            mask[r * (p + s) + j] = 0.0;
        }
        first_index[r] = k as u32;
        spans.push((k, l.len()));
        let texts = l
            .iter()
            .filter(|x| matches!(x, Slot::Text { .. }))
            .count()
            .max(1);
        text_counts[r] = texts as u32;
        for (i, slot) in l.iter().enumerate() {
            positions[k] = offset + (nd_row + i) as u32;
            mask[r * (p + s) + p + i] = 0.0;
            pad_index[r * s + i] = k as u32;
            pack_index[k] = (r * s + i) as u32;
            match *slot {
                Slot::Virtual(v) => {
                    virt_ids[k] = virt_offset[t] + v;
                    sources.push(Source::Virtual {
                        task: t as u32,
                        index: v,
                    });
                }
                Slot::Text { id, ty } => {
                    if id as usize >= config.vocab_size {
                        return Err(EngineError::BadToken {
                            row: r,
                            id,
                            vocab: config.vocab_size,
                        });
                    }
                    if ty as usize >= config.type_vocab_size {
                        return Err(EngineError::BadTokenType {
                            row: r,
                            ty,
                            types: config.type_vocab_size,
                        });
                    }
                    sources.push(Source::Word(id));
                    word_ids[k] = id;
                    types[k] = ty;
                    is_text[k] = 1.0;
                    mean_weights[r * n + k] = 1.0 / texts as f32;
                }
            }
            k += 1;
        }
    }
    Ok(Plan {
        batch: b,
        seq: s,
        prefix_len: p,
        tokens: n,
        tasks,
        task_of_row,
        groups,
        virtual_rows: nv,
        deep_offset,
        word_ids,
        virt_ids,
        is_text,
        sources,
        types,
        positions,
        mask,
        deep_ids,
        pad_index,
        pack_index,
        first_index,
        mean_weights,
        text_counts,
        spans,
    })
}

/// [`assemble`]; with `fused`, for the fused CPU forward, which reads word
/// vectors, shallow and deep prompts in place: the `inputs` and padded
/// `prefix` tensors are not built.
pub fn assemble_with(
    rows: &[Row<'_>],
    config: &ModelConfig,
    word_embeddings: &Tensor,
    device: &Device,
    fused: bool,
) -> Result<Assembled, EngineError> {
    let pl = plan(rows, config)?;
    let (b, s, p, hidden) = (pl.batch, pl.seq, pl.prefix_len, config.hidden_size);
    let n = pl.tokens;
    let u32s = |v: Vec<u32>| {
        let len = v.len();
        Tensor::from_vec(v, (len,), device)
    };
    let inputs = if fused {
        None
    } else {
        Some(input_vectors(
            pl.word_ids,
            pl.virt_ids,
            pl.is_text,
            pl.virtual_rows,
            &pl.tasks,
            word_embeddings,
            device,
        )?)
    };

    let prefix = if p > 0 && !fused {
        let width = config.num_hidden_layers * 2 * hidden;
        let mut table = vec![Tensor::zeros((1, width), candle_core::DType::F32, device)?];
        table.extend(pl.tasks.iter().filter_map(|t| t.deep.clone()));
        let table = Tensor::cat(&table, 0)?;
        let ids = Tensor::from_vec(pl.deep_ids, (b * p,), device)?;
        let heads = config.num_attention_heads;
        let gathered = table
            .index_select(&ids, 0)?
            .reshape((b, p, config.num_hidden_layers * 2, heads, config.head_dim()))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?
            .reshape((config.num_hidden_layers, 2, b, heads, p, config.head_dim()))?;
        Some(gathered)
    } else {
        None
    };

    Ok(Assembled {
        batch: b,
        seq: s,
        prefix_len: p,
        tokens: n,
        inputs,
        pad_index: u32s(pl.pad_index)?,
        pack_index: u32s(pl.pack_index)?,
        first_index: u32s(pl.first_index)?,
        mean_weights: Tensor::from_vec(pl.mean_weights, (b, n), device)?,
        type_ids: u32s(pl.types.clone())?,
        position_ids: u32s(pl.positions.clone())?,
        types: pl.types,
        positions: pl.positions,
        sources: pl.sources,
        mask: Tensor::from_vec(pl.mask, (b, 1, 1, p + s), device)?,
        prefix,
        spans: pl.spans,
        groups: pl.groups,
    })
}

/// The `[N, hidden]` input vectors for the candle-ops forward: word vectors
/// of text tokens plus a per-batch table of virtual vectors (row 0 zeros),
/// so that gradients reach the shallow prompts.
fn input_vectors(
    word_ids: Vec<u32>,
    virt_ids: Vec<u32>,
    is_text: Vec<f32>,
    nv: u32,
    tasks: &[&TaskModel],
    word_embeddings: &Tensor,
    device: &Device,
) -> Result<Tensor, EngineError> {
    let n = word_ids.len();
    let hidden = word_embeddings.dim(1)?;
    let u32s = |v: Vec<u32>| Tensor::from_vec(v, (n,), device);
    let words = word_embeddings.index_select(&u32s(word_ids)?, 0)?;
    Ok(if nv > 1 {
        let mut table = vec![Tensor::zeros((1, hidden), candle_core::DType::F32, device)?];
        table.extend(
            tasks
                .iter()
                .filter_map(|t| t.shallow.as_ref().map(|sp| sp.embeddings.clone())),
        );
        let table = Tensor::cat(&table, 0)?;
        let virt = table.index_select(&u32s(virt_ids)?, 0)?;
        let text_mask = Tensor::from_vec(is_text, (n, 1), device)?;
        (words.broadcast_mul(&text_mask)? + virt)?
    } else {
        words
    })
}
