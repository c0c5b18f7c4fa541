//! Fused CPU kernels for the serving forward.
//!
//! candle runs element-wise ops on one thread and each as its own pass over
//! memory; on a 2-core CPU the bias adds, GELU, residual adds and masking
//! cost as much as a third of a forward. These kernels fuse each chain into
//! one parallel pass. They have no backward: training uses the composed ops
//! (`OpsMode::Train`), and other devices use candle's ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{what}: expected a contiguous tensor")
    };
    match s {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => bail!("{what}: expected f32"),
    }
}

/// erf with |error| < 1.5e-7 (Abramowitz & Stegun 7.1.26); candle's scalar
/// erf is several times slower and this error is far below f32 noise of the
/// surrounding matmuls.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let s = x.signum();
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    s * (1.0 - poly * (-a * a).exp())
}

/// Rows per parallel work item: enough to amortize scheduling.
const CHUNK_ROWS: usize = 16;

struct BiasGelu;

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }
    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, b: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(x, xl, "bias-gelu x")?;
        let b = slice(b, bl, "bias-gelu bias")?;
        let n = b.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n * CHUNK_ROWS)
            .zip(x.par_chunks(n * CHUNK_ROWS))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_mut(n).zip(x.chunks(n)) {
                    for ((o, &x), &b) in o.iter_mut().zip(x).zip(b) {
                        let v = x + b;
                        *o = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
                    }
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// `gelu_erf(x + bias)` over rows of `x` `[N, n]`.
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(bias, &BiasGelu)
}

struct ResidualNorm {
    eps: f32,
}

impl CustomOp3 for ResidualNorm {
    fn name(&self) -> &'static str {
        "bias-residual-layer-norm"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        r: &CpuStorage,
        rl: &Layout,
        p: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(x, xl, "residual-norm x")?;
        let r = slice(r, rl, "residual-norm residual")?;
        // p = [bias; gamma; beta] stacked: [3, n]
        let p = slice(p, pl, "residual-norm params")?;
        let n = p.len() / 3;
        if x.len() != r.len() || x.len() % n != 0 {
            bail!("residual-norm: shapes disagree");
        }
        let (bias, rest) = p.split_at(n);
        let (gamma, beta) = rest.split_at(n);
        let eps = self.eps;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n).zip(r.par_chunks(n)))
            .for_each(|(o, (x, r))| {
                let mut sum = 0f32;
                for i in 0..n {
                    let v = x[i] + bias[i] + r[i];
                    o[i] = v;
                    sum += v;
                }
                let mean = sum / n as f32;
                let mut var = 0f32;
                for v in o.iter() {
                    let d = v - mean;
                    var += d * d;
                }
                let inv = 1.0 / (var / n as f32 + eps).sqrt();
                for i in 0..n {
                    o[i] = (o[i] - mean) * inv * gamma[i] + beta[i];
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// `layer_norm(x + bias + residual)` with `params` = `[bias; gamma; beta]`
/// stacked as `[3, n]`.
pub fn residual_norm(x: &Tensor, residual: &Tensor, params: &Tensor, eps: f64) -> Result<Tensor> {
    x.apply_op3_no_bwd(residual, params, &ResidualNorm { eps: eps as f32 })
}

struct MaskedSoftmax;

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, sl: &Layout, m: &CpuStorage, ml: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = slice(s, sl, "masked-softmax scores")?;
        let m = slice(m, ml, "masked-softmax mask")?;
        let dims = sl.shape().dims();
        let k = *dims.last().unwrap_or(&1);
        let b = dims.first().copied().unwrap_or(1);
        if m.len() != b * k {
            bail!("masked-softmax: mask has {} values, expected {}", m.len(), b * k);
        }
        let rows_per_batch = s.len() / (b * k).max(1);
        let mut out = vec![0f32; s.len()];
        out.par_chunks_mut(k)
            .zip(s.par_chunks(k))
            .enumerate()
            .for_each(|(row, (o, s))| {
                let mask = &m[(row / rows_per_batch) * k..][..k];
                let mut max = f32::NEG_INFINITY;
                for i in 0..k {
                    let v = s[i] + mask[i];
                    o[i] = v;
                    max = max.max(v);
                }
                let mut sum = 0f32;
                for v in o.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                let inv = 1.0 / sum;
                for v in o.iter_mut() {
                    *v *= inv;
                }
            });
        Ok((CpuStorage::F32(out), sl.shape().clone()))
    }
}

/// `softmax(scores + mask)` over the last dim; `scores` `[B, …, K]`, `mask`
/// `[B, K]` additive.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    scores.apply_op2_no_bwd(mask, &MaskedSoftmax)
}

struct QkvHeads {
    batch: usize,
    seq: usize,
    heads: usize,
    q_scale: f32,
}

impl CustomOp3 for QkvHeads {
    fn name(&self) -> &'static str {
        "qkv-heads"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
        idx: &CpuStorage,
        il: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(x, xl, "qkv-heads x")?;
        let bias = slice(b, bl, "qkv-heads bias")?;
        let Some((i0, i1)) = il.contiguous_offsets() else { bail!("qkv-heads: index not contiguous") };
        let CpuStorage::U32(idx) = idx else { bail!("qkv-heads: index must be u32") };
        let idx = &idx[i0..i1];
        let (bsz, seq, heads) = (self.batch, self.seq, self.heads);
        let w = bias.len(); // 3 * hidden
        let d = w / 3 / heads;
        if idx.len() != bsz * seq || x.len() % w != 0 {
            bail!("qkv-heads: shapes disagree");
        }
        let tokens = x.len() / w;
        // Output [3, B, heads, S, D]; one work item per (kind, b, head).
        let mut out = vec![0f32; 3 * bsz * heads * seq * d];
        out.par_chunks_mut(seq * d).enumerate().for_each(|(item, o)| {
            let kind = item / (bsz * heads);
            let b = (item / heads) % bsz;
            let h = item % heads;
            let col = (kind * heads + h) * d;
            let scale = if kind == 0 { self.q_scale } else { 1.0 };
            for i in 0..seq {
                let t = idx[b * seq + i] as usize;
                if t >= tokens {
                    continue;
                }
                let src = &x[t * w + col..][..d];
                let bb = &bias[col..][..d];
                for ((o, &v), &c) in o[i * d..][..d].iter_mut().zip(src).zip(bb) {
                    *o = (v + c) * scale;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from_dims(&[3, bsz, heads, seq, d])))
    }
}

/// From packed `x @ Wqkv^T` `[N, 3*hidden]`: adds the bias, scatters tokens
/// to the padded grid through `pad_index` `[B*S]`, splits heads and scales
/// the queries, giving `[3, B, heads, S, head_dim]` in one pass.
pub fn qkv_heads(
    qkv: &Tensor,
    bias: &Tensor,
    pad_index: &Tensor,
    (batch, seq, heads): (usize, usize, usize),
    q_scale: f64,
) -> Result<Tensor> {
    qkv.apply_op3_no_bwd(bias, pad_index, &QkvHeads { batch, seq, heads, q_scale: q_scale as f32 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d: f32 = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(d <= tol, "max |Δ| {d}");
    }

    #[test]
    fn fused_kernels_match_candle_ops() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3.0, (37, 24), &dev).unwrap()).contiguous().unwrap();
        let b = Tensor::randn(0f32, 1.0, 24, &dev).unwrap();
        let want = x.broadcast_add(&b).unwrap().gelu_erf().unwrap();
        close(&bias_gelu(&x, &b).unwrap(), &want, 1e-6);

        let r = Tensor::randn(0f32, 1.0, (37, 24), &dev).unwrap();
        let g = Tensor::randn(1f32, 0.2, 24, &dev).unwrap();
        let beta = Tensor::randn(0f32, 0.2, 24, &dev).unwrap();
        let params = Tensor::stack(&[&b, &g, &beta], 0).unwrap();
        let sum = x.broadcast_add(&b).unwrap().add(&r).unwrap();
        let want = candle_nn::ops::layer_norm(&sum, &g, &beta, 1e-12).unwrap();
        close(&residual_norm(&x, &r, &params, 1e-12).unwrap(), &want, 1e-5);

        let s = Tensor::randn(0f32, 2.0, (3, 4, 5, 9), &dev).unwrap();
        let mut m = vec![0f32; 27];
        m[8] = f32::MIN;
        m[20] = f32::MIN;
        let mask = Tensor::from_vec(m, (3, 9), &dev).unwrap();
        let want = candle_nn::ops::softmax(&s.broadcast_add(&mask.reshape((3, 1, 1, 9)).unwrap()).unwrap(), D::Minus1).unwrap();
        close(&masked_softmax(&s, &mask).unwrap(), &want, 1e-6);

        // qkv: 5 packed tokens of 2 rows (lengths 3 and 2) on a [2, 3] grid.
        let (heads, d) = (2, 4);
        let x = Tensor::randn(0f32, 1.0, (5, 3 * heads * d), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 3 * heads * d, &dev).unwrap();
        let pad = Tensor::new(&[0u32, 1, 2, 3, 4, 0], &dev).unwrap();
        let got = qkv_heads(&x, &bias, &pad, (2, 3, heads), 0.5).unwrap();
        let want = x
            .broadcast_add(&bias).unwrap()
            .index_select(&pad, 0).unwrap()
            .reshape((2, 3, 3, heads, d)).unwrap()
            .permute((2, 0, 3, 1, 4)).unwrap()
            .contiguous().unwrap();
        let scale = Tensor::new(&[0.5f32, 1.0, 1.0], &dev).unwrap().reshape((3, 1, 1, 1, 1)).unwrap();
        close(&got, &want.broadcast_mul(&scale).unwrap(), 1e-6);
    }
}
