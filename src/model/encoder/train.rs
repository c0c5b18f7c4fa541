//! The CPU training backend: the whole frozen encoder as one autograd op.
//!
//! [`Encoder::encode_train`] runs the layer stack of `fused.rs` (packed
//! rows, no padding, each row's deep prompt read in place) through the
//! training kernels of [`kernels::train`], which keep what the backward
//! needs, and hands candle one op whose backward is written by hand: the
//! gradient of the embeddings' inputs (shallow prompts) and of the deep
//! prompt table (every layer's key/value prefix), never of the frozen
//! weights. candle's autograd still does the rest of a step: the prompt
//! encoder before the op, pooling, head and loss after it.
//!
//! The composed-op graph of `ops.rs` (`OpsMode::TrainOps`) computes the same
//! function; `tests/train.rs` checks the two against each other, gradients
//! included.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::fused::cpu_slices;
use super::{Encoder, Layer, LayerData, Norm};
use crate::model::kernels::{self, AttnDims, AttnRow, NormParams, train as tk};

/// Activation buffers reused from one training step to the next.
///
/// A step of the default model over 16 rows of 128 tokens keeps ~300 MB of
/// activations for the backward. Fresh allocations of that size are
/// mapped pages that the kernel zeroes on first touch: measured, 75,000
/// page faults and ~0.1 s of system time per step on 2 cores (`perf stat
/// -e page-faults`), 13% of the step. A pool keeps the pages mapped.
/// Buffers come back with stale values: only buffers that the kernels
/// overwrite completely are taken from it.
mod pool {
    use std::sync::Mutex;

    static FREE: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
    /// Buffers kept at most (a step uses about 60).
    const KEEP: usize = 96;

    /// A buffer of `len` values, contents unspecified.
    pub fn take(len: usize) -> Vec<f32> {
        let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        let mut v = match best {
            Some(i) => free.swap_remove(i),
            None => return vec![0f32; len],
        };
        drop(free);
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, 0.0);
        }
        v
    }

    /// Returns buffers for later steps.
    pub fn give(bufs: impl IntoIterator<Item = Vec<f32>>) {
        let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
        free.extend(bufs.into_iter().filter(|v| v.capacity() > 0));
        if free.len() > KEEP {
            free.sort_by_key(|v| std::cmp::Reverse(v.capacity()));
            free.truncate(KEEP);
        }
    }
}

/// One row of a training batch for [`Encoder::encode_train`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrainRow {
    /// First packed token of the row.
    pub start: usize,
    /// Positions of the row (virtual and text tokens).
    pub len: usize,
    /// First row of its deep prompt in the deep table.
    pub deep_start: usize,
    /// Rows of its deep prompt (0: none).
    pub deep_len: usize,
}

/// What the backward of one layer reads.
struct LayerSaved {
    /// `[N, 3·hidden]` queries (scaled), keys and values, bias added.
    qkv: Vec<f32>,
    /// Softmax of every (row, head), at `kernels::train::probs_offsets`.
    probs: Vec<f32>,
    /// After attention: normalized rows and 1/σ.
    n1: Vec<f32>,
    r1: Vec<f32>,
    /// FFN input of the GELU, `[N, intermediate]`.
    pre: Vec<f32>,
    /// After the FFN: normalized rows and 1/σ.
    n2: Vec<f32>,
    r2: Vec<f32>,
}

/// Gradients of the packed inputs and of the deep table, each when asked.
type Grads = (Option<Vec<f32>>, Option<Vec<f32>>);

impl Saved {
    /// Hands every buffer back to the pool for the next step.
    fn recycle(self) {
        pool::give([self.n0, self.r0]);
        for l in self.layers {
            pool::give([l.qkv, l.probs, l.n1, l.r1, l.pre, l.n2, l.r2]);
        }
    }
}

struct Saved {
    /// Embedding layer norm: normalized rows and 1/σ.
    n0: Vec<f32>,
    r0: Vec<f32>,
    layers: Vec<LayerSaved>,
}

/// The autograd op: the encoder's weights (shared tensors, not copies), the
/// batch layout, and what the forward saved for the backward.
struct EncoderOp {
    layers: Vec<Layer>,
    token_types: Tensor,
    positions_table: Tensor,
    embed_norm: Norm,
    hidden: usize,
    heads: usize,
    rows: Vec<TrainRow>,
    types: Vec<u32>,
    positions: Vec<u32>,
    saved: Mutex<Option<Saved>>,
}

/// The f32 values of each tensor, read in place behind its storage guard.
macro_rules! with_f32 {
    ($tensors:expr, |$data:ident| $body:expr) => {{
        let guards: Vec<_> = $tensors.iter().map(|t| t.storage_and_layout()).collect();
        let $data = cpu_slices(&guards)?;
        $body
    }};
}

impl EncoderOp {
    fn width(&self) -> usize {
        self.layers.len() * 2 * self.hidden
    }

    fn dims(&self, layer: usize) -> AttnDims {
        AttnDims {
            hidden: self.hidden,
            heads: self.heads,
            layers: self.layers.len(),
            layer,
            scale: 1.0 / ((self.hidden / self.heads) as f32).sqrt(),
        }
    }

    fn attn_rows<'a>(&self, deep: &'a [f32]) -> candle_core::Result<Vec<AttnRow<'a>>> {
        let w = self.width();
        self.rows
            .iter()
            .map(|r| {
                let Some(prefix) = deep.get(r.deep_start * w..(r.deep_start + r.deep_len) * w)
                else {
                    candle_core::bail!("training forward: deep prompt rows outside the table")
                };
                Ok(AttnRow {
                    start: r.start,
                    len: r.len,
                    prefix,
                })
            })
            .collect()
    }

    /// Embeddings and every layer, keeping what the backward needs.
    fn forward(&self, x: &[f32], deep: &[f32]) -> candle_core::Result<(Vec<f32>, Saved)> {
        use crate::profile::time;
        let h = self.hidden;
        let n = x.len() / h;
        if x.len() != n * h || self.types.len() != n || self.positions.len() != n {
            candle_core::bail!("training forward: inputs are not [{n}, {h}] packed tokens");
        }
        let rows = self.attn_rows(deep)?;
        let fixed = [
            &self.token_types,
            &self.positions_table,
            &self.embed_norm.weight,
            &self.embed_norm.bias,
        ];
        let (mut y, n0, r0) = with_f32!(fixed, |e| {
            let (types, pos) = (e[0], e[1]);
            let mut z = pool::take(n * h);
            for (k, z) in z.chunks_exact_mut(h).enumerate() {
                let (t, p) = (self.types[k] as usize, self.positions[k] as usize);
                let (Some(t), Some(p)) =
                    (types.get(t * h..(t + 1) * h), pos.get(p * h..(p + 1) * h))
                else {
                    candle_core::bail!("training forward: token type or position out of range")
                };
                for (((o, &x), &t), &p) in z.iter_mut().zip(&x[k * h..][..h]).zip(t).zip(p) {
                    *o = x + t + p;
                }
            }
            let (mut y, mut nn, mut r) = (pool::take(n * h), pool::take(n * h), pool::take(n));
            let zero = vec![0f32; h];
            let p = NormParams {
                bias: &zero,
                gamma: e[2],
                beta: e[3],
                eps: self.embed_norm.eps as f32,
            };
            tk::residual_norm_saving(&mut y, &mut nn, &mut r, &z, None, p);
            pool::give([z]);
            (y, nn, r)
        });
        let mut saved = Saved {
            n0,
            r0,
            layers: Vec::with_capacity(self.layers.len()),
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let eps = layer.attn_norm.eps as f32;
            let s = with_f32!(layer.tensors(), |w| {
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
                } = LayerData::new(&w);
                let inter = in_b.len();
                let mut qkv = pool::take(n * 3 * h);
                time("train.qkv.matmul", || {
                    kernels::matmul_wt(&mut qkv, &y, qkv_w, h)
                });
                let dims = self.dims(l);
                let mut probs = pool::take(*tk::probs_offsets(&rows, dims).last().unwrap_or(&0));
                let mut ctx = pool::take(n * h);
                time("train.attention", || {
                    tk::attention_saving(&mut ctx, &mut probs, &mut qkv, qkv_b, &rows, dims)
                });
                let mut proj = pool::take(n * h);
                time("train.attn_out.matmul", || {
                    kernels::matmul_wt(&mut proj, &ctx, ao_w, h)
                });
                let (mut x1, mut n1, mut r1) =
                    (pool::take(n * h), pool::take(n * h), pool::take(n));
                let p = NormParams {
                    bias: ao_b,
                    gamma: an_g,
                    beta: an_b,
                    eps,
                };
                time("train.attn_out.norm", || {
                    tk::residual_norm_saving(&mut x1, &mut n1, &mut r1, &proj, Some(&y), p)
                });
                let mut mid = pool::take(n * inter);
                time("train.ffn.in.matmul", || {
                    kernels::matmul_wt(&mut mid, &x1, in_w, h)
                });
                let mut pre = pool::take(n * inter);
                time("train.ffn.gelu", || {
                    tk::bias_gelu_saving(&mut mid, &mut pre, in_b)
                });
                time("train.ffn.out.matmul", || {
                    kernels::matmul_wt(&mut proj, &mid, out_w, inter)
                });
                let (mut n2, mut r2) = (pool::take(n * h), pool::take(n));
                let p = NormParams {
                    bias: out_b,
                    gamma: on_g,
                    beta: on_b,
                    eps,
                };
                time("train.ffn.out.norm", || {
                    tk::residual_norm_saving(&mut y, &mut n2, &mut r2, &proj, Some(&x1), p)
                });
                pool::give([ctx, proj, x1, mid]);
                LayerSaved {
                    qkv,
                    probs,
                    n1,
                    r1,
                    pre,
                    n2,
                    r2,
                }
            });
            saved.layers.push(s);
        }
        Ok((y, saved))
    }

    /// Gradients of the packed inputs `[N, hidden]` (when `want_x`) and of
    /// the deep table `[D, width]` (when `want_deep`) for the output
    /// gradient `dy`.
    fn backward(
        &self,
        saved: &Saved,
        mut g: Vec<f32>,
        deep: &[f32],
        want_x: bool,
        want_deep: bool,
    ) -> candle_core::Result<Grads> {
        use crate::profile::time;
        let h = self.hidden;
        let n = g.len() / h;
        let w2 = 2 * h;
        let width = self.width();
        let rows = self.attn_rows(deep)?;
        let mut ddeep = want_deep.then(|| vec![0f32; deep.len()]);
        // The residual branch's gradient, added to `g` by the next norm.
        let mut extra: Option<Vec<f32>> = None;
        for (l, layer) in self.layers.iter().enumerate().rev() {
            let s = &saved.layers[l];
            let last = l == 0 && !want_x;
            let (gx, dz1) = with_f32!(layer.tensors(), |w| {
                let LayerData {
                    qkv_w,
                    ao_w,
                    an_g,
                    in_w,
                    out_w,
                    on_g,
                    ..
                } = LayerData::new(&w);
                let inter = s.pre.len() / n;
                let mut dz2 = pool::take(n * h);
                time("train.bwd.norm", || {
                    tk::norm_backward(&mut dz2, &g, extra.as_deref(), &s.n2, &s.r2, on_g)
                });
                let mut dmid = pool::take(n * inter);
                time("train.bwd.ffn.out.matmul", || {
                    kernels::matmul_w(&mut dmid, &dz2, out_w, h)
                });
                time("train.bwd.gelu", || tk::gelu_backward(&mut dmid, &s.pre));
                let mut dx1 = pool::take(n * h);
                time("train.bwd.ffn.in.matmul", || {
                    kernels::matmul_w(&mut dx1, &dmid, in_w, inter)
                });
                let mut dz1 = pool::take(n * h);
                time("train.bwd.norm", || {
                    tk::norm_backward(&mut dz1, &dx1, Some(&dz2), &s.n1, &s.r1, an_g)
                });
                let mut dctx = dx1;
                time("train.bwd.attn_out.matmul", || {
                    kernels::matmul_w(&mut dctx, &dz1, ao_w, h)
                });
                let mut dqkv = pool::take(n * 3 * h);
                let mut dpre =
                    pool::take(rows.iter().map(|r| r.prefix.len() / width).sum::<usize>() * w2);
                time("train.bwd.attention", || {
                    tk::attention_backward(
                        &mut dqkv,
                        &mut dpre,
                        &dctx,
                        &s.qkv,
                        &s.probs,
                        &rows,
                        self.dims(l),
                    )
                });
                if let Some(dd) = ddeep.as_mut() {
                    // Rows sharing a task share its prompt rows: sum them.
                    let mut at = 0;
                    for r in &self.rows {
                        for j in 0..r.deep_len {
                            let dst = &mut dd[(r.deep_start + j) * width + l * w2..][..w2];
                            for (o, &v) in dst.iter_mut().zip(&dpre[at..][..w2]) {
                                *o += v;
                            }
                            at += w2;
                        }
                    }
                }
                let mut gx = Vec::new();
                if last {
                    pool::give([dctx]);
                } else {
                    gx = dctx;
                    time("train.bwd.qkv.matmul", || {
                        kernels::matmul_w(&mut gx, &dqkv, qkv_w, 3 * h)
                    });
                }
                pool::give([dz2, dmid, dqkv, dpre]);
                (gx, dz1)
            });
            if last {
                pool::give([g, dz1]);
                pool::give(extra);
                return Ok((None, ddeep));
            }
            pool::give([std::mem::replace(&mut g, gx)]);
            pool::give(extra.replace(dz1));
        }
        let dx = with_f32!([&self.embed_norm.weight], |e| {
            let mut dx = vec![0f32; n * h];
            tk::norm_backward(&mut dx, &g, extra.as_deref(), &saved.n0, &saved.r0, e[0]);
            dx
        });
        pool::give([g]);
        pool::give(extra);
        Ok((Some(dx), ddeep))
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("training forward: expected contiguous f32 CPU tensors"),
    }
}

impl CustomOp2 for EncoderOp {
    fn name(&self) -> &'static str {
        "softprompt-encoder-train"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        deep: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, xl)?;
        let deep = contiguous_f32(deep, dl)?;
        let (y, saved) = self.forward(x, deep)?;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        deep: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_x, want_deep) = (x.track_op(), deep.track_op());
        if !want_x && !want_deep {
            return Ok((None, None));
        }
        let Some(saved) = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            candle_core::bail!("training backward: run once per forward")
        };
        let g: Vec<f32> = grad.contiguous()?.flatten_all()?.to_vec1()?;
        let table: Vec<f32> = deep.contiguous()?.flatten_all()?.to_vec1()?;
        let grads = self.backward(&saved, g, &table, want_x, want_deep);
        saved.recycle();
        let (dx, dd) = grads?;
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), x.device()))
            .transpose()?;
        let dd = dd
            .map(|v| Tensor::from_vec(v, deep.shape(), deep.device()))
            .transpose()?;
        Ok((dx, dd))
    }
}

impl Encoder {
    /// Whether [`Encoder::encode_train`] trains on this device.
    pub fn fused_train(&self) -> bool {
        self.device.is_cpu()
            && self
                .config
                .hidden_size
                .is_multiple_of(self.config.num_attention_heads)
    }

    /// The training forward on the CPU: embeddings and every layer over
    /// packed rows as one differentiable op.
    ///
    /// * `inputs`: `[N, hidden]` input vectors before the token-type and
    ///   position embeddings (word vectors, shallow prompts), rows packed;
    /// * `types`, `positions`: each packed token's ids;
    /// * `deep`: `[D, layers·2·hidden]` deep prompts in PEFT's layout, the
    ///   batch's tasks one after another (`rows` point into it), or `None`.
    ///
    /// Returns `[N, hidden]`; its backward reaches `inputs` and `deep`.
    pub fn encode_train(
        &self,
        inputs: &Tensor,
        types: &[u32],
        positions: &[u32],
        rows: &[TrainRow],
        deep: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let width = self.layers.len() * 2 * self.config.hidden_size;
        let deep = match deep {
            Some(d) => d.clone(),
            None => self.zeros(&[1, width])?,
        };
        let op = EncoderOp {
            layers: self.layers.clone(),
            token_types: self.token_type_embeddings.clone(),
            positions_table: self.position_embeddings.clone(),
            embed_norm: self.embed_norm.clone(),
            hidden: self.config.hidden_size,
            heads: self.config.num_attention_heads,
            rows: rows.to_vec(),
            types: types.to_vec(),
            positions: positions.to_vec(),
            saved: Mutex::new(None),
        };
        inputs.apply_op2(&deep, op)
    }
}
