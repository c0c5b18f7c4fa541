//! Training kernels: forward passes that keep what the backward needs, and
//! the backward passes themselves, on plain `f32` slices.
//!
//! Training differentiates with respect to the inputs of the frozen encoder
//! only (shallow prompts through the embeddings, deep prompts through every
//! layer's keys and values), never its weights. So each backward here
//! returns the gradient of an op's input, and the linear layers' backward is
//! one matmul with the weight as stored ([`super::matmul_w`]).
//!
//! candle's autograd would compose these from element-wise ops that run on
//! one thread and keep every intermediate; written by hand they are one
//! parallel pass each, built from the same branch-free `exp`/`erf` as the
//! serving kernels, and checked against finite differences and against
//! candle's composed-op graph (tests here and in `tests/train.rs`).

use rayon::prelude::*;
use std::cell::RefCell;

use super::{
    Arith, AttnDims, AttnRow, CHUNK_ROWS, Fused, LANES, NormParams, Plain, SharedOut, Simd, erf,
    exp, gelu, mean_inv_std, softmax_row,
};

/// Layer norm of one row whose input `z` is in `n`: leaves the normalized
/// values in `n`, `γ·n + β` in `y`, and returns 1/σ.
#[inline(always)]
fn norm_saving_row<F: Arith>(
    n: &mut [f32],
    y: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> f32 {
    let (mean, inv) = mean_inv_std::<F>(n, eps);
    for (((v, o), &g), &b) in n.iter_mut().zip(y.iter_mut()).zip(gamma).zip(beta) {
        *v = (*v - mean) * inv;
        *o = F::fma(*v, g, b);
    }
    inv
}

#[inline(always)]
fn residual_norm_saving_impl<F: Arith>(
    y: &mut [f32],
    n: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    residual: Option<&[f32]>,
    p: NormParams<'_>,
) {
    let h = p.gamma.len();
    for (k, ((y, n), x)) in y
        .chunks_exact_mut(h)
        .zip(n.chunks_exact_mut(h))
        .zip(x.chunks_exact(h))
        .enumerate()
    {
        match residual {
            Some(r) => {
                for (((o, &x), &b), &r) in n.iter_mut().zip(x).zip(p.bias).zip(&r[k * h..][..h]) {
                    *o = x + b + r;
                }
            }
            None => {
                for ((o, &x), &b) in n.iter_mut().zip(x).zip(p.bias) {
                    *o = x + b;
                }
            }
        }
        rstd[k] = norm_saving_row::<F>(n, y, p.gamma, p.beta, p.eps);
    }
}

dispatch! {
    fn residual_norm_saving_rows(
        y: &mut [f32],
        n: &mut [f32],
        rstd: &mut [f32],
        x: &[f32],
        residual: Option<&[f32]>,
        p: NormParams<'_>,
    ) => residual_norm_saving_impl;
}

/// `y ← layer_norm(x + bias + residual)` over rows of `p.gamma.len()`, as
/// [`super::residual_norm`], also keeping the normalized rows in `n` and
/// each row's 1/σ in `rstd` for [`norm_backward`].
pub fn residual_norm_saving(
    y: &mut [f32],
    n: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    residual: Option<&[f32]>,
    p: NormParams<'_>,
) {
    let h = p.gamma.len();
    assert!(
        h > 0
            && x.len().is_multiple_of(h)
            && [y.len(), n.len()].iter().all(|&l| l == x.len())
            && rstd.len() * h == x.len()
            && residual.is_none_or(|r| r.len() == x.len())
            && p.bias.len() == h
            && p.beta.len() == h,
        "residual-norm-saving: shapes disagree"
    );
    let c = h * CHUNK_ROWS;
    y.par_chunks_mut(c)
        .zip(n.par_chunks_mut(c))
        .zip(rstd.par_chunks_mut(CHUNK_ROWS))
        .zip(x.par_chunks(c))
        .enumerate()
        .for_each(|(i, (((y, n), rstd), x))| {
            let r = residual.map(|r| &r[i * c..][..x.len()]);
            residual_norm_saving_rows(y, n, rstd, x, r, p)
        });
}

#[inline(always)]
fn norm_backward_impl<F: Arith>(
    dz: &mut [f32],
    dy: &[f32],
    extra: Option<&[f32]>,
    n: &[f32],
    rstd: &[f32],
    gamma: &[f32],
) {
    let h = gamma.len();
    for (k, (dz, (dy, n))) in dz
        .chunks_exact_mut(h)
        .zip(dy.chunks_exact(h).zip(n.chunks_exact(h)))
        .enumerate()
    {
        // dz holds dn = (dy + extra)·γ first.
        match extra {
            Some(e) => {
                for (((o, &d), &e), &g) in dz.iter_mut().zip(dy).zip(&e[k * h..][..h]).zip(gamma) {
                    *o = (d + e) * g;
                }
            }
            None => {
                for ((o, &d), &g) in dz.iter_mut().zip(dy).zip(gamma) {
                    *o = d * g;
                }
            }
        }
        let mut sa = [0f32; LANES];
        let mut sb = [0f32; LANES];
        let mut dc = dz.chunks_exact(LANES);
        let mut nc = n.chunks_exact(LANES);
        for (d, nn) in (&mut dc).zip(&mut nc) {
            for l in 0..LANES {
                sa[l] += d[l];
                sb[l] = F::fma(d[l], nn[l], sb[l]);
            }
        }
        let (mut a, mut b) = (sa.iter().sum::<f32>(), sb.iter().sum::<f32>());
        for (&d, &nn) in dc.remainder().iter().zip(nc.remainder()) {
            a += d;
            b += d * nn;
        }
        let (a, b) = (a / h as f32, b / h as f32);
        let r = rstd[k];
        for (o, &nn) in dz.iter_mut().zip(n) {
            *o = r * (*o - a - nn * b);
        }
    }
}

dispatch! {
    fn norm_backward_rows(
        dz: &mut [f32],
        dy: &[f32],
        extra: Option<&[f32]>,
        n: &[f32],
        rstd: &[f32],
        gamma: &[f32],
    ) => norm_backward_impl;
}

/// Backward of `y = γ·n + β`, `n = (z − mean(z))·rstd` with respect to `z`,
/// for the incoming gradient `dy + extra` (`extra`: a residual branch's
/// gradient, added in the same pass): `dz = rstd·(dn − mean(dn) −
/// n·mean(dn·n))` with `dn = (dy + extra)·γ`.
pub fn norm_backward(
    dz: &mut [f32],
    dy: &[f32],
    extra: Option<&[f32]>,
    n: &[f32],
    rstd: &[f32],
    gamma: &[f32],
) {
    let h = gamma.len();
    assert!(
        h > 0
            && dz.len().is_multiple_of(h)
            && [dy.len(), n.len()].iter().all(|&l| l == dz.len())
            && extra.is_none_or(|e| e.len() == dz.len())
            && rstd.len() * h == dz.len(),
        "norm-backward: shapes disagree"
    );
    let c = h * CHUNK_ROWS;
    dz.par_chunks_mut(c)
        .zip(dy.par_chunks(c).zip(n.par_chunks(c)))
        .zip(rstd.par_chunks(CHUNK_ROWS))
        .enumerate()
        .for_each(|(i, ((dz, (dy, n)), rstd))| {
            let e = extra.map(|e| &e[i * c..][..dz.len()]);
            norm_backward_rows(dz, dy, e, n, rstd, gamma)
        });
}

#[inline(always)]
fn bias_gelu_saving_impl<F: Arith>(x: &mut [f32], pre: &mut [f32], bias: &[f32]) {
    for (row, pre) in x
        .chunks_exact_mut(bias.len())
        .zip(pre.chunks_exact_mut(bias.len()))
    {
        for ((v, p), &b) in row.iter_mut().zip(pre.iter_mut()).zip(bias) {
            *p = *v + b;
            *v = gelu::<F>(*p);
        }
    }
}

dispatch! {
    fn bias_gelu_saving_rows(x: &mut [f32], pre: &mut [f32], bias: &[f32]) => bias_gelu_saving_impl;
}

/// `x ← gelu_erf(x + bias)` as [`super::bias_gelu`], keeping `x + bias`
/// in `pre` for [`gelu_backward`].
pub fn bias_gelu_saving(x: &mut [f32], pre: &mut [f32], bias: &[f32]) {
    let n = bias.len();
    assert!(
        n > 0 && x.len().is_multiple_of(n) && pre.len() == x.len(),
        "bias-gelu-saving: shapes disagree"
    );
    x.par_chunks_mut(n * CHUNK_ROWS)
        .zip(pre.par_chunks_mut(n * CHUNK_ROWS))
        .for_each(|(x, p)| bias_gelu_saving_rows(x, p, bias));
}

#[inline(always)]
fn gelu_backward_impl<F: Arith>(d: &mut [f32], pre: &[f32]) {
    // gelu(x) = x·Φ(x), so gelu'(x) = Φ(x) + x·φ(x).
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    for (d, &x) in d.iter_mut().zip(pre) {
        let cdf = 0.5 * (1.0 + erf::<F>(x * std::f32::consts::FRAC_1_SQRT_2));
        let pdf = exp::<F>(-0.5 * x * x) * INV_SQRT_2PI;
        *d *= F::fma(x, pdf, cdf);
    }
}

dispatch! {
    fn gelu_backward_rows(d: &mut [f32], pre: &[f32]) => gelu_backward_impl;
}

/// `d ← d · gelu_erf'(pre)`: the GELU's backward, in place.
pub fn gelu_backward(d: &mut [f32], pre: &[f32]) {
    assert_eq!(d.len(), pre.len(), "gelu-backward: shapes disagree");
    const CHUNK: usize = 16 * 1024;
    d.par_chunks_mut(CHUNK)
        .zip(pre.par_chunks(CHUNK))
        .for_each(|(d, p)| gelu_backward_rows(d, p));
}

#[inline(always)]
fn softmax_rows_impl<F: Arith>(x: &mut [f32], width: usize) {
    for row in x.chunks_exact_mut(width) {
        softmax_row::<F>(row);
    }
}

dispatch! {
    fn softmax_rows(x: &mut [f32], width: usize) => softmax_rows_impl;
}

/// `dst[m, n] ← scale · A · B` on contiguous buffers, with `A[m, k]` stored
/// as is or (`at`) as its transpose `[k, m]`, and `B[k, n]` likewise (`bt`:
/// stored `[n, k]`). One single-threaded gemm call: the attention work
/// items are already one per thread.
fn gemm_small(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    at: bool,
    b: &[f32],
    bt: bool,
    scale: f32,
) {
    assert!(
        dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "gemm: buffers too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst[..m * n].fill(0.0);
        return;
    }
    let (a_cs, a_rs) = if at { (m, 1) } else { (1, k) };
    let (b_cs, b_rs) = if bt { (k, 1) } else { (1, n) };
    // SAFETY: dst holds m·n values written row-major (column stride 1, row
    // stride n); A's element (i, e) is at i·a_rs + e·a_cs ≤ (m−1)·k + k − 1
    // < m·k ≤ a.len() in either layout, and B's (e, j) likewise below
    // k·n ≤ b.len() (all checked above). dst is a unique borrow, so it
    // overlaps neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

thread_local! {
    /// Per-thread scratch of the training attention's work items.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Where each row's saved probabilities start in the buffer that
/// [`attention_saving`] fills: rows one after another, each
/// `[heads, S, P + S]`. The last entry is the total length.
pub fn probs_offsets(rows: &[AttnRow<'_>], dims: AttnDims) -> Vec<usize> {
    let width = dims.layers * 2 * dims.hidden;
    let mut out = Vec::with_capacity(rows.len() + 1);
    let mut at = 0;
    out.push(0);
    for r in rows {
        let t = r.len + r.prefix.len() / width.max(1);
        at += dims.heads * r.len * t;
        out.push(at);
    }
    out
}

/// Checks what [`attention_saving`] and [`attention_backward`] assume of
/// their rows: inside the batch, sorted and disjoint, deep prompts of the
/// right width.
fn check_rows(rows: &[AttnRow<'_>], n: usize, dims: AttnDims) {
    assert!(
        dims.heads > 0 && dims.hidden.is_multiple_of(dims.heads) && dims.layer < dims.layers,
        "attention: heads must divide hidden"
    );
    let width = dims.layers * 2 * dims.hidden;
    let mut end = 0;
    for r in rows {
        assert!(
            r.start >= end && r.start.checked_add(r.len).is_some_and(|e| e <= n),
            "attention: rows must be inside the batch, sorted and disjoint"
        );
        end = r.start + r.len;
        assert!(r.prefix.len() % width == 0, "attention: deep prompt shape");
    }
}

/// Copies head `head` of a row's queries `[S, d]`, keys and values `[P + S,
/// d]` (deep prompt first) into `q`, `k`, `v`. `qkv` has the bias added and
/// the queries scaled.
fn gather_head(
    (q, k, v): (&mut [f32], &mut [f32], &mut [f32]),
    qkv: &[f32],
    row: &AttnRow<'_>,
    head: usize,
    dims: AttnDims,
) {
    let h = dims.hidden;
    let d = h / dims.heads;
    let width = dims.layers * 2 * h;
    let p = row.prefix.len() / width;
    let (kc, vc) = (
        (2 * dims.layer * dims.heads + head) * d,
        ((2 * dims.layer + 1) * dims.heads + head) * d,
    );
    for j in 0..p {
        let src = &row.prefix[j * width..][..width];
        k[j * d..][..d].copy_from_slice(&src[kc..][..d]);
        v[j * d..][..d].copy_from_slice(&src[vc..][..d]);
    }
    for i in 0..row.len {
        let src = &qkv[(row.start + i) * 3 * h..][..3 * h];
        q[i * d..][..d].copy_from_slice(&src[head * d..][..d]);
        k[(p + i) * d..][..d].copy_from_slice(&src[h + head * d..][..d]);
        v[(p + i) * d..][..d].copy_from_slice(&src[2 * h + head * d..][..d]);
    }
}

/// Adds the qkv bias and scales the queries, in place.
fn bias_scale(qkv: &mut [f32], bias: &[f32], h: usize, scale: f32) {
    qkv.par_chunks_mut(3 * h * CHUNK_ROWS).for_each(|c| {
        for row in c.chunks_exact_mut(3 * h) {
            for (x, &b) in row.iter_mut().zip(bias) {
                *x += b;
            }
            for x in &mut row[..h] {
                *x *= scale;
            }
        }
    });
}

/// The training forward of self-attention over packed rows, as
/// [`super::attention`] computes it, keeping what [`attention_backward`]
/// needs:
///
/// * `qkv` `[N, 3·hidden]` comes in as `x · Wqkvᵀ` and leaves with the
///   bias added and the queries scaled (the backward reads it so);
/// * `probs` receives each (row, head)'s softmax `[S, P + S]` at
///   [`probs_offsets`];
/// * `out` `[N, hidden]` receives the merged heads' context.
///
/// One work item per (row, head): the head's queries, keys and values are
/// copied into thread-local scratch and multiplied there by gemm.
pub fn attention_saving(
    out: &mut [f32],
    probs: &mut [f32],
    qkv: &mut [f32],
    bias: &[f32],
    rows: &[AttnRow<'_>],
    dims: AttnDims,
) {
    let h = dims.hidden;
    let n = out.len() / h;
    assert!(
        out.len() == n * h && qkv.len() == n * 3 * h && bias.len() == 3 * h,
        "attention: buffer sizes"
    );
    check_rows(rows, n, dims);
    let offsets = probs_offsets(rows, dims);
    assert_eq!(probs.len(), offsets[rows.len()], "attention: probs size");
    bias_scale(qkv, bias, h, dims.scale);
    let qkv: &[f32] = qkv;
    let d = h / dims.heads;
    let width = dims.layers * 2 * h;
    let (out, probs_out) = (SharedOut(out.as_mut_ptr()), SharedOut(probs.as_mut_ptr()));
    (0..rows.len() * dims.heads)
        .into_par_iter()
        .for_each(|item| {
            let (r, head) = (item / dims.heads, item % dims.heads);
            let row = &rows[r];
            let s = row.len;
            let t = s + row.prefix.len() / width;
            if s == 0 {
                return;
            }
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.resize(s * d + 2 * t * d + s * t + s * d, 0.0);
                let (q, rest) = scratch.split_at_mut(s * d);
                let (k, rest) = rest.split_at_mut(t * d);
                let (v, rest) = rest.split_at_mut(t * d);
                let (sc, ctx) = rest.split_at_mut(s * t);
                gather_head((q, k, v), qkv, row, head, dims);
                gemm_small(sc, (s, t, d), q, false, k, true, 1.0);
                softmax_rows(sc, t);
                gemm_small(ctx, (s, d, t), sc, false, v, false, 1.0);
                let at = offsets[r] + head * s * t;
                // SAFETY: this item's probabilities fill [at, at + s·t) of
                // probs, inside the row's [offsets[r], offsets[r + 1]) (its
                // heads·s·t values; checked length above); no other item writes
                // there: rows have disjoint offset ranges and heads disjoint
                // slices of them. `sc` is scratch, not part of probs.
                unsafe {
                    std::ptr::copy_nonoverlapping(sc.as_ptr(), probs_out.ptr().add(at), s * t)
                };
                let out = out.ptr();
                for i in 0..s {
                    // SAFETY: token start + i < N (rows checked inside the
                    // batch) and head·d + d ≤ hidden, so the write stays in
                    // out's N·hidden values; this (row, head) block is written by
                    // no other item (disjoint rows, one item per head).
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            ctx[i * d..].as_ptr(),
                            out.add((row.start + i) * h + head * d),
                            d,
                        )
                    };
                }
            });
        });
}

/// The backward of [`attention_saving`] with respect to its queries, keys
/// and values (the deep prompt's included).
///
/// * `dctx` `[N, hidden]`: gradient of the merged context;
/// * `qkv`, `probs`: what the forward left;
/// * `dqkv` `[N, 3·hidden]` receives the gradient of `x · Wqkvᵀ + b` (the
///   query's scale applied), ready for `matmul_w` with `Wqkv`;
/// * `dprefix`: for each row, its deep prompt's key and value gradient for
///   this layer, `[P, 2·hidden]` (keys, then values, heads in order), rows
///   one after another. Rows sharing a prompt each get their own part; the
///   caller sums them.
pub fn attention_backward(
    dqkv: &mut [f32],
    dprefix: &mut [f32],
    dctx: &[f32],
    qkv: &[f32],
    probs: &[f32],
    rows: &[AttnRow<'_>],
    dims: AttnDims,
) {
    let h = dims.hidden;
    let n = dctx.len() / h;
    assert!(
        dctx.len() == n * h && qkv.len() == n * 3 * h && dqkv.len() == n * 3 * h,
        "attention backward: buffer sizes"
    );
    check_rows(rows, n, dims);
    let offsets = probs_offsets(rows, dims);
    assert_eq!(
        probs.len(),
        offsets[rows.len()],
        "attention backward: probs size"
    );
    let d = h / dims.heads;
    let width = dims.layers * 2 * h;
    let mut prefix_at = Vec::with_capacity(rows.len() + 1);
    prefix_at.push(0);
    for r in rows {
        prefix_at.push(prefix_at.last().unwrap() + r.prefix.len() / width * 2 * h);
    }
    assert_eq!(
        dprefix.len(),
        prefix_at[rows.len()],
        "attention backward: dprefix size"
    );
    let (dqkv, dpre) = (
        SharedOut(dqkv.as_mut_ptr()),
        SharedOut(dprefix.as_mut_ptr()),
    );
    (0..rows.len() * dims.heads)
        .into_par_iter()
        .for_each(|item| {
            let (r, head) = (item / dims.heads, item % dims.heads);
            let row = &rows[r];
            let s = row.len;
            let p = row.prefix.len() / width;
            let t = s + p;
            if s == 0 {
                return;
            }
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.resize(s * d + 2 * t * d + s * t + s * d + s * d + 2 * t * d, 0.0);
                let (q, rest) = scratch.split_at_mut(s * d);
                let (k, rest) = rest.split_at_mut(t * d);
                let (v, rest) = rest.split_at_mut(t * d);
                let (ds, rest) = rest.split_at_mut(s * t);
                let (dc, rest) = rest.split_at_mut(s * d);
                let (dq, rest) = rest.split_at_mut(s * d);
                let (dk, dv) = rest.split_at_mut(t * d);
                gather_head((q, k, v), qkv, row, head, dims);
                for i in 0..s {
                    dc[i * d..][..d].copy_from_slice(&dctx[(row.start + i) * h + head * d..][..d]);
                }
                let pr = &probs[offsets[r] + head * s * t..][..s * t];
                // dP = dctx · vᵀ, then dS = P ∘ (dP − rowsum(dP ∘ P)).
                gemm_small(ds, (s, t, d), dc, false, v, true, 1.0);
                for (g, pp) in ds.chunks_exact_mut(t).zip(pr.chunks_exact(t)) {
                    let dot: f32 = g.iter().zip(pp).map(|(a, b)| a * b).sum();
                    for (g, &pp) in g.iter_mut().zip(pp) {
                        *g = pp * (*g - dot);
                    }
                }
                // dv = Pᵀ · dctx; dq = dS · k (times the scale the forward
                // applied to the queries); dk = dSᵀ · q (q already scaled).
                gemm_small(dv, (t, d, s), pr, true, dc, false, 1.0);
                gemm_small(dq, (s, d, t), ds, false, k, false, dims.scale);
                gemm_small(dk, (t, d, s), ds, true, q, false, 1.0);
                let (dqkv, dpre) = (dqkv.ptr(), dpre.ptr());
                for i in 0..s {
                    let at = (row.start + i) * 3 * h + head * d;
                    // SAFETY: token start + i < N (rows checked inside the
                    // batch) and 2·hidden + head·d + d ≤ 3·hidden, so the three
                    // writes stay in dqkv's N·3·hidden values; this (row, head)
                    // block is written by no other item (disjoint rows, one item
                    // per head). The sources are scratch.
                    unsafe {
                        std::ptr::copy_nonoverlapping(dq[i * d..].as_ptr(), dqkv.add(at), d);
                        std::ptr::copy_nonoverlapping(
                            dk[(p + i) * d..].as_ptr(),
                            dqkv.add(at + h),
                            d,
                        );
                        std::ptr::copy_nonoverlapping(
                            dv[(p + i) * d..].as_ptr(),
                            dqkv.add(at + 2 * h),
                            d,
                        );
                    }
                }
                for j in 0..p {
                    let at = prefix_at[r] + j * 2 * h + head * d;
                    // SAFETY: row r owns [prefix_at[r], prefix_at[r + 1]) of
                    // dprefix (p rows of 2·hidden; total checked above), and
                    // head·d + d ≤ hidden, so both writes stay inside it; the
                    // head's columns are written by this item only.
                    unsafe {
                        std::ptr::copy_nonoverlapping(dk[j * d..].as_ptr(), dpre.add(at), d);
                        std::ptr::copy_nonoverlapping(dv[j * d..].as_ptr(), dpre.add(at + h), d);
                    }
                }
            });
        });
}

#[cfg(test)]
mod tests {
    //! Each backward against central finite differences of an f64
    //! reference of its forward (so the numeric gradient is exact to ~1e-9
    //! and the check can be tight: 1e-4 of the largest component), and each
    //! saving forward against the same reference.
    use super::*;
    use crate::model::kernels::tests::values;

    fn f64s(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    /// Central differences of `f` along each coordinate of `x`.
    fn numeric_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
        let eps = 1e-6;
        (0..x.len())
            .map(|i| {
                let mut a = x.to_vec();
                a[i] += eps;
                let up = f(&a);
                a[i] -= 2.0 * eps;
                (up - f(&a)) / (2.0 * eps)
            })
            .collect()
    }

    fn dot(a: &[f64], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&a, &b)| a * b as f64).sum()
    }

    fn assert_close(got: &[f32], want: &[f64], rel: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(scale > 1e-6, "{what}: reference is all zero");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= rel * scale,
                "{what}[{i}]: {g} vs reference {w} (largest {scale})"
            );
        }
    }

    fn layer_norm_ref(z: &[f64], gamma: &[f32], beta: &[f32], eps: f64) -> Vec<f64> {
        let h = gamma.len();
        let mut out = Vec::with_capacity(z.len());
        for row in z.chunks_exact(h) {
            let mean = row.iter().sum::<f64>() / h as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / h as f64;
            let inv = 1.0 / (var + eps).sqrt();
            for (j, v) in row.iter().enumerate() {
                out.push((v - mean) * inv * gamma[j] as f64 + beta[j] as f64);
            }
        }
        out
    }

    #[test]
    fn layer_norm_backward_matches_finite_differences() {
        crate::model::kernels::tests::at_every_simd_level(|| {
            let (rows, h) = (3, 40);
            let z = values(rows * h, 1);
            let gamma: Vec<f32> = values(h, 2).iter().map(|v| 1.0 + 0.5 * v).collect();
            let beta = values(h, 3);
            let zero = vec![0f32; h];
            let (dy, extra) = (values(rows * h, 4), values(rows * h, 5));
            let (mut y, mut n, mut rstd) =
                (vec![0f32; z.len()], vec![0f32; z.len()], vec![0f32; rows]);
            let p = NormParams {
                bias: &zero,
                gamma: &gamma,
                beta: &beta,
                eps: 1e-5,
            };
            residual_norm_saving(&mut y, &mut n, &mut rstd, &z, None, p);
            assert_close(
                &y,
                &layer_norm_ref(&f64s(&z), &gamma, &beta, 1e-5),
                1e-5,
                "y",
            );
            // L = Σ (dy + extra) · y, so ∂L/∂z is the backward of dy + extra.
            let g: Vec<f32> = dy.iter().zip(&extra).map(|(a, b)| a + b).collect();
            let want = numeric_grad(&f64s(&z), |z| {
                dot(&layer_norm_ref(z, &gamma, &beta, 1e-5), &g)
            });
            let mut dz = vec![0f32; z.len()];
            norm_backward(&mut dz, &dy, Some(&extra), &n, &rstd, &gamma);
            assert_close(&dz, &want, 1e-4, "dz");
        });
    }

    fn gelu_ref(x: &[f64], bias: &[f32]) -> Vec<f64> {
        x.chunks_exact(bias.len())
            .flat_map(|row| {
                row.iter().zip(bias).map(|(&v, &b)| {
                    let v = v + b as f64;
                    0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2))
                })
            })
            .collect()
    }

    #[test]
    fn gelu_backward_matches_finite_differences() {
        crate::model::kernels::tests::at_every_simd_level(|| {
            let h = 24;
            let x: Vec<f32> = values(2 * h, 7).iter().map(|v| 4.0 * v).collect();
            let bias = values(h, 8);
            let dy = values(2 * h, 9);
            let (mut g, mut pre) = (x.clone(), vec![0f32; x.len()]);
            bias_gelu_saving(&mut g, &mut pre, &bias);
            assert_close(&g, &gelu_ref(&f64s(&x), &bias), 1e-5, "gelu");
            let want = numeric_grad(&f64s(&x), |x| dot(&gelu_ref(x, &bias), &dy));
            let mut d = dy.clone();
            gelu_backward(&mut d, &pre);
            assert_close(&d, &want, 1e-4, "dgelu");
        });
    }

    /// Attention in f64 over packed rows, each with its own deep prompt
    /// (`prefixes[r]`, `[P, width]`), for layer `dims.layer`.
    fn attention_ref(
        qkv: &[f64],
        bias: &[f32],
        prefixes: &[&[f64]],
        lens: &[usize],
        dims: AttnDims,
    ) -> Vec<f64> {
        let (h, heads) = (dims.hidden, dims.heads);
        let d = h / heads;
        let width = dims.layers * 2 * h;
        let n: usize = lens.iter().sum();
        let mut out = vec![0f64; n * h];
        let mut start = 0;
        for (r, &s) in lens.iter().enumerate() {
            let pre = prefixes[r];
            let p = pre.len() / width;
            for hd in 0..heads {
                let key = |j: usize, e: usize| {
                    if j < p {
                        pre[j * width + (2 * dims.layer * heads + hd) * d + e]
                    } else {
                        qkv[(start + j - p) * 3 * h + h + hd * d + e] + bias[h + hd * d + e] as f64
                    }
                };
                let value = |j: usize, e: usize| {
                    if j < p {
                        pre[j * width + ((2 * dims.layer + 1) * heads + hd) * d + e]
                    } else {
                        qkv[(start + j - p) * 3 * h + 2 * h + hd * d + e]
                            + bias[2 * h + hd * d + e] as f64
                    }
                };
                for i in 0..s {
                    let q: Vec<f64> = (0..d)
                        .map(|e| {
                            (qkv[(start + i) * 3 * h + hd * d + e] + bias[hd * d + e] as f64)
                                * dims.scale as f64
                        })
                        .collect();
                    let sc: Vec<f64> = (0..p + s)
                        .map(|j| (0..d).map(|e| q[e] * key(j, e)).sum())
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let ex: Vec<f64> = sc.iter().map(|v| (v - mx).exp()).collect();
                    let sum: f64 = ex.iter().sum();
                    for e in 0..d {
                        out[(start + i) * h + hd * d + e] =
                            (0..p + s).map(|j| ex[j] / sum * value(j, e)).sum();
                    }
                }
            }
            start += s;
        }
        out
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        crate::model::kernels::tests::at_every_simd_level(|| {
            // Two rows, the second with a 3-token deep prompt, 2 layers (this
            // is layer 1), 2 heads of 4.
            let (h, heads, layers) = (8, 2, 2);
            let width = layers * 2 * h;
            let lens = [5usize, 4];
            let n: usize = lens.iter().sum();
            let dims = AttnDims {
                hidden: h,
                heads,
                layers,
                layer: 1,
                scale: 0.5,
            };
            let qkv0 = values(n * 3 * h, 11);
            let bias = values(3 * h, 12);
            let prefix0 = values(3 * width, 13);
            let dout = values(n * h, 14);
            let rows = [
                AttnRow {
                    start: 0,
                    len: lens[0],
                    prefix: &[],
                },
                AttnRow {
                    start: lens[0],
                    len: lens[1],
                    prefix: &prefix0,
                },
            ];
            let mut qkv = qkv0.clone();
            let mut out = vec![0f32; n * h];
            let mut probs = vec![0f32; probs_offsets(&rows, dims)[2]];
            attention_saving(&mut out, &mut probs, &mut qkv, &bias, &rows, dims);
            let (q64, p64) = (f64s(&qkv0), f64s(&prefix0));
            let reference = |q: &[f64], p: &[f64]| attention_ref(q, &bias, &[&[], p], &lens, dims);
            assert_close(&out, &reference(&q64, &p64), 1e-5, "attention");

            let mut dqkv = vec![0f32; n * 3 * h];
            let mut dprefix = vec![0f32; 3 * 2 * h];
            attention_backward(&mut dqkv, &mut dprefix, &dout, &qkv, &probs, &rows, dims);
            let want = numeric_grad(&q64, |q| dot(&reference(q, &p64), &dout));
            assert_close(&dqkv, &want, 1e-4, "dqkv");
            // The deep prompt's layer-1 key and value columns; layer 0's get no
            // gradient from layer 1.
            let num = numeric_grad(&p64, |p| dot(&reference(&q64, p), &dout));
            let mut want = Vec::new();
            for j in 0..3 {
                want.extend_from_slice(&num[j * width + 2 * h..][..2 * h]);
                assert!(num[j * width..][..2 * h].iter().all(|v| v.abs() < 1e-9));
            }
            assert_close(&dprefix, &want, 1e-4, "dprefix");
        });
    }
}
