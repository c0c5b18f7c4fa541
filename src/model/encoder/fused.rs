//! The CPU serving backend: fused kernels ([`super::super::kernels`]) on
//! plain buffers of packed rows, each row's deep prompt read in place, no
//! padded attention grid. What `serve` runs on the CPU (`--kernels auto`).

use candle_core::{CpuStorage, Layout, Storage, Tensor};

use super::PackedLinear;
use super::{Encoder, LayerData};
use crate::model::kernels;

/// One row of a batch for [`Encoder::encode_cpu`]: its packed tokens and
/// its deep prompt, if any.
#[derive(Clone, Copy)]
pub struct RowSpan<'a> {
    /// First packed token of the row.
    pub start: usize,
    /// Positions of the row (virtual and text tokens).
    pub len: usize,
    /// `[n, layers·2·hidden]` in PEFT's layout.
    pub deep: Option<&'a Tensor>,
}

/// The input vector of a packed token, for [`Encoder::embed_cpu`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Row `id` of the word embeddings.
    Word(u32),
    /// Virtual token `index` of shallow prompt number `task`.
    Virtual { task: u32, index: u32 },
}

/// The distinct tensors among `ts` (by id), made contiguous, and each
/// input's index among them: one storage guard per tensor, since a
/// parking_lot read lock taken twice by one thread can deadlock behind a
/// waiting writer.
fn distinct<'t>(
    ts: impl IntoIterator<Item = Option<&'t Tensor>>,
) -> candle_core::Result<(Vec<Tensor>, Vec<Option<usize>>)> {
    let mut ids = Vec::new();
    let mut owned = Vec::new();
    let mut index = Vec::new();
    for t in ts {
        index.push(match t {
            Some(t) => match ids.iter().position(|&id| id == t.id()) {
                Some(i) => Some(i),
                None => {
                    ids.push(t.id());
                    owned.push(t.contiguous()?);
                    Some(owned.len() - 1)
                }
            },
            None => None,
        });
    }
    Ok((owned, index))
}

/// The f32 values behind each storage guard (see [`cpu_f32`]), in order:
/// the guards live in the caller, so that the slices can borrow from them.
pub(super) fn cpu_slices<'a, G: std::ops::Deref<Target = Storage>>(
    guards: &'a [(G, &Layout)],
) -> candle_core::Result<Vec<&'a [f32]>> {
    guards.iter().map(|(s, l)| cpu_f32(s, l)).collect()
}

/// The f32 values of a contiguous CPU tensor behind its storage guard.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused forward: expected a contiguous tensor")
    };
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(&v[start..end]),
        _ => candle_core::bail!("fused forward: expected an f32 CPU tensor"),
    }
}

impl Encoder {
    /// The embedding layer of the fused CPU forward: packed `[N, hidden]`
    /// from each token's source (word or virtual vector, read in place),
    /// token type and position, in one parallel pass.
    pub fn embed_cpu(
        &self,
        sources: &[Source],
        prompts: &[Option<&Tensor>],
        types: &[u32],
        positions: &[u32],
    ) -> candle_core::Result<Vec<f32>> {
        let c = &self.config;
        let h = c.hidden_size;
        if types.len() != sources.len() || positions.len() != sources.len() {
            candle_core::bail!("fused embed: sources, types and positions differ in length");
        }
        let (tables, table_of) = distinct(prompts.iter().copied())?;
        let fixed = [
            &self.word_embeddings,
            &self.token_type_embeddings,
            &self.position_embeddings,
            &self.embed_norm.weight,
            &self.embed_norm.bias,
        ];
        let guards: Vec<_> = fixed
            .iter()
            .copied()
            .chain(&tables)
            .map(|t| t.storage_and_layout())
            .collect();
        let data = cpu_slices(&guards)?;
        let (words, type_emb, pos_emb, gamma, beta) = (data[0], data[1], data[2], data[3], data[4]);
        fn row<'a>(
            table: &'a [f32],
            h: usize,
            i: u32,
            what: &str,
        ) -> candle_core::Result<&'a [f32]> {
            match table.get(i as usize * h..(i as usize + 1) * h) {
                Some(r) => Ok(r),
                None => candle_core::bail!("fused embed: {what} {i} out of range"),
            }
        }
        let tokens: Vec<kernels::EmbedToken> = sources
            .iter()
            .zip(types.iter().zip(positions))
            .map(|(src, (&ty, &pos))| {
                let input = match *src {
                    Source::Word(id) => row(words, h, id, "word id")?,
                    Source::Virtual { task, index } => {
                        let Some(Some(t)) = table_of.get(task as usize) else {
                            candle_core::bail!("fused embed: no shallow prompt for task {task}")
                        };
                        row(data[fixed.len() + t], h, index, "virtual token")?
                    }
                };
                Ok(kernels::EmbedToken {
                    input,
                    token_type: row(type_emb, h, ty, "token type")?,
                    position: row(pos_emb, h, pos, "position")?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        let mut out = vec![0f32; sources.len() * h];
        kernels::embed(&mut out, &tokens, gamma, beta, c.layer_norm_eps as f32);
        Ok(out)
    }

    /// The serving layer stack on the CPU: packed `[N, hidden]` in and out.
    ///
    /// Works on plain buffers allocated once per batch and reused by every
    /// layer; weights and deep prompts are read in place through their
    /// storage guards. Per layer: the QKV matmul (bias added later), fused
    /// attention per (row, head) straight from and into packed tokens (see
    /// [`kernels::attention`]), the output matmul with bias + residual +
    /// layer norm in one pass, the FFN matmul with bias + GELU in one pass,
    /// and the last matmul with bias + residual + layer norm. The linear
    /// layers run on the weights [`Encoder::pack`] packed, else gemm.
    ///
    /// `outputs`: the packed tokens whose final states the caller reads
    /// (sorted, distinct), or `None` for all. The last layer needs every
    /// token's keys and values, but its attention output and FFN (¾ of its
    /// linear work) only for these: a head that reads one position per row
    /// (CLS or pooler) leaves the rest undone. The result is
    /// `[outputs.len(), hidden]` in their order.
    pub fn encode_cpu(
        &self,
        x: Vec<f32>,
        rows: &[RowSpan<'_>],
        outputs: Option<&[u32]>,
    ) -> candle_core::Result<Tensor> {
        use crate::profile::time;
        let c = &self.config;
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let eps = c.layer_norm_eps as f32;
        let n = x.len() / h;
        if x.len() != n * h {
            candle_core::bail!(
                "fused forward: {} input values are not rows of {h}",
                x.len()
            );
        }
        let (deep, deep_of_row) = distinct(rows.iter().map(|r| r.deep))?;
        let deep_guards: Vec<_> = deep.iter().map(|t| t.storage_and_layout()).collect();
        let deep_data = cpu_slices(&deep_guards)?;
        let width = c.num_hidden_layers * 2 * h;
        let attn_rows: Vec<kernels::AttnRow> = rows
            .iter()
            .zip(&deep_of_row)
            .map(|(r, d)| {
                let prefix = d.map_or(&[][..], |i| deep_data[i]);
                if prefix.len() % width != 0 {
                    candle_core::bail!("fused forward: deep prompt is not [n, {width}]");
                }
                Ok(kernels::AttnRow {
                    start: r.start,
                    len: r.len,
                    prefix,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        if attn_rows.iter().map(|r| r.len).sum::<usize>() != n
            || attn_rows
                .windows(2)
                .any(|w| w[0].start + w[0].len != w[1].start)
            || attn_rows.first().is_some_and(|r| r.start != 0)
        {
            candle_core::bail!("fused forward: rows do not tile the {n} packed tokens");
        }
        if let Some(o) = outputs
            && (o.windows(2).any(|w| w[0] >= w[1]) || o.last().is_some_and(|&t| t as usize >= n))
        {
            candle_core::bail!("fused forward: outputs are not distinct sorted tokens below {n}");
        }

        // Every weight of every layer, read in place for this call.
        let weights: Vec<&Tensor> = self.layers.iter().flat_map(|l| l.tensors()).collect();
        let guards: Vec<_> = weights.iter().map(|t| t.storage_and_layout()).collect();
        let w = cpu_slices(&guards)?;

        let mut x = x;
        let mut qkv = vec![0f32; n * 3 * h];
        let mut ctx = vec![0f32; n * h];
        let mut proj = vec![0f32; n * h];
        let mut x1 = vec![0f32; n * h];
        let mut mid = vec![0f32; n * inter];
        let scale = 1.0 / (c.head_dim() as f32).sqrt();
        // The linear layers on the weights packed at load (f32 or int8),
        // else gemm on the checkpoint's (an encoder never packed: tools,
        // training's evaluation).
        let linear =
            |out: &mut [f32], x: &[f32], w: &[f32], p: Option<&PackedLinear>, k: usize| match p {
                Some(p) => p.forward(out, x, w, k, self.gemm_from_rows),
                None => kernels::matmul_wt(out, x, w, k),
            };
        let layers = w.len() / 12;
        for (l, w) in w.chunks_exact(12).enumerate() {
            let q = self.packed.as_ref().map(|(_, p)| &p[l]);
            let LayerData {
                qkv_w,
                qkv_b,
                ao_w,
                ao_b,
                an_g,
                an_b,
                in_w,
                in_b,
                out_w,
                out_b,
                on_g,
                on_b,
            } = LayerData::new(w);
            time("qkv.matmul", || {
                linear(&mut qkv, &x, qkv_w, q.map(|q| &q.qkv), h)
            });
            let dims = kernels::AttnDims {
                hidden: h,
                heads: c.num_attention_heads,
                layers: c.num_hidden_layers,
                layer: l,
                scale,
            };
            time("attention", || {
                kernels::attention(&mut ctx, &qkv, qkv_b, &attn_rows, dims)
            });
            // The last layer goes on with the tokens read only.
            if l + 1 == layers
                && let Some(o) = outputs
            {
                let gather = |v: &[f32]| -> Vec<f32> {
                    o.iter()
                        .flat_map(|&t| &v[t as usize * h..][..h])
                        .copied()
                        .collect()
                };
                (ctx, x) = (gather(&ctx), gather(&x));
            }
            // Tokens this layer carries on.
            let m = x.len() / h;
            let (proj, x1, mid) = (&mut proj[..m * h], &mut x1[..m * h], &mut mid[..m * inter]);
            time("attn_out.matmul", || {
                linear(proj, &ctx, ao_w, q.map(|q| &q.attn_out), h)
            });
            let norm = kernels::NormParams {
                bias: ao_b,
                gamma: an_g,
                beta: an_b,
                eps,
            };
            time("attn_out.norm", || {
                kernels::residual_norm(x1, proj, &x, norm)
            });
            time("ffn.in.matmul", || {
                linear(mid, x1, in_w, q.map(|q| &q.intermediate), h)
            });
            time("ffn.gelu", || kernels::bias_gelu(mid, in_b));
            time("ffn.out.matmul", || {
                linear(proj, mid, out_w, q.map(|q| &q.output), inter)
            });
            let norm = kernels::NormParams {
                bias: out_b,
                gamma: on_g,
                beta: on_b,
                eps,
            };
            time("ffn.out.norm", || {
                kernels::residual_norm(&mut x, proj, x1, norm)
            });
        }
        let m = x.len() / h;
        Tensor::from_vec(x, (m, h), &self.device)
    }
}
