//! The attention work item of [`super::attention`] on AVX-512 micro-kernels,
//! for heads a multiple of 16 wide (MiniLM's 32, BERT-base's 64).
//!
//! Why a second item: the generic one ([`super::attend_impl`]) multiplies
//! 4 query rows by 16 keys per step on two 8-lane registers, reading 6
//! operands per 8 multiply-adds, copies each 4 × 16 block of scores
//! through the stack, and runs the softmax of a row's last, partial 16
//! keys one scalar `exp` at a time (9 of 25 keys for a typical sentence).
//! On an AVX-512 Xeon that put attention at 13–16% of the plain encoder's
//! forward and 31% of the int8 one's. Here:
//! - scores: 8 query rows × 32 keys per step in 16 zmm accumulators, one
//!   load and 8 broadcasts per 16 multiply-adds, stored straight into the
//!   scores buffer with the padding keys set to −∞;
//! - softmax over the whole padded row in 16-lane chunks (−∞ gives 0), so
//!   no scalar tail;
//! - context: 8 rows × 32 value columns per step, written straight into
//!   the output.
//!
//! The scratch layout and its filling are the generic item's
//! ([`super::Layout`], [`fill`]), with query rows padded to 8.

use std::arch::x86_64::*;

use super::{AttnDims, AttnRow, Fused, LANES, SharedOut, fill, softmax_row};

/// Query rows per micro-kernel step.
const ROWS: usize = 8;

/// [`super::attention`]'s work item: `heads` of one row.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL, AVX2 and FMA. `out` must be
/// `[N, hidden]` with the row inside it, written by no other item in the
/// same columns (as [`super::attention`] guarantees).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(super) unsafe fn attend(
    scratch: &mut Vec<f32>,
    out: SharedOut,
    qkv: &[f32],
    bias: &[f32],
    row: &AttnRow<'_>,
    heads: std::ops::Range<usize>,
    dims: AttnDims,
) {
    let h = dims.hidden;
    let Some((lay, bufs, sc)) = fill(scratch, qkv, bias, row, heads.clone(), dims, ROWS) else {
        return;
    };
    let (d, s, t, sp, tp) = (lay.d, lay.s, lay.t, lay.sp, lay.tp);
    debug_assert!(d.is_multiple_of(LANES) && lay.dp == d);
    let out = out.ptr();
    for (k, hb) in bufs.chunks_exact(lay.per_head).enumerate() {
        let (q, rest) = hb.split_at(lay.qn);
        let (kt, v) = rest.split_at(lay.kn);
        scores(q, kt, sc, d, t, tp);
        for i in 0..s {
            softmax_row::<Fused>(&mut sc[i * tp..][..tp]);
        }
        // SAFETY: rows start..start + s of `out` exist and columns col..col
        // + d of them belong to this item (the caller's contract); `context`
        // writes only those.
        unsafe {
            let at = out.add(row.start * h + (heads.start + k) * d);
            context(&sc[..sp * tp], v, at, h, d, t, tp, s);
        }
    }
}

/// `sc[i][j] = Σₑ q[i][e] · kt[e][j]` for every padded query row i and key
/// column j; columns j ≥ `t` (padding keys) get −∞.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn scores(q: &[f32], kt: &[f32], sc: &mut [f32], d: usize, t: usize, tp: usize) {
    let sp = q.len() / d;
    assert!(
        sp.is_multiple_of(ROWS)
            && tp.is_multiple_of(LANES)
            && t <= tp
            && kt.len() >= d * tp
            && sc.len() >= sp * tp,
        "attend512::scores: operand sizes"
    );
    let (qp, kp, sp_ptr) = (q.as_ptr(), kt.as_ptr(), sc.as_mut_ptr());
    for i0 in (0..sp).step_by(ROWS) {
        let mut j0 = 0;
        while j0 < tp {
            // SAFETY: rows i0..i0 + 8 ≤ sp of q (d each) and of sc (tp
            // each), columns j0..j0 + 16·N ≤ tp of kt's d rows and of sc's
            // rows: all inside the slices (sizes asserted above).
            unsafe {
                let (q0, k0, s0) = (qp.add(i0 * d), kp.add(j0), sp_ptr.add(i0 * tp + j0));
                if tp - j0 >= 2 * LANES {
                    scores_block::<2>(q0, d, k0, tp, t - t.min(j0), s0);
                    j0 += 2 * LANES;
                } else {
                    scores_block::<1>(q0, d, k0, tp, t - t.min(j0), s0);
                    j0 += LANES;
                }
            }
        }
    }
}

/// 8 query rows × N·16 keys of [`scores`]; `valid`: real keys from the
/// block's first column on (the rest are padding, stored as −∞).
///
/// # Safety
/// `q` must hold 8 rows of `d`, `kt` `d` rows of stride `tp` with N·16
/// columns from it, `sc` 8 rows of stride `tp` with N·16 columns.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn scores_block<const N: usize>(
    q: *const f32,
    d: usize,
    kt: *const f32,
    tp: usize,
    valid: usize,
    sc: *mut f32,
) {
    let mut acc = [[_mm512_setzero_ps(); N]; ROWS];
    for e in 0..d {
        // SAFETY: e < d rows of kt, N·16 columns; r < 8 rows of q (the
        // function's contract).
        unsafe {
            let kv: [__m512; N] =
                std::array::from_fn(|n| _mm512_loadu_ps(kt.add(e * tp + n * LANES)));
            for (r, a) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*q.add(r * d + e));
                for n in 0..N {
                    a[n] = _mm512_fmadd_ps(x, kv[n], a[n]);
                }
            }
        }
    }
    let neg = _mm512_set1_ps(f32::NEG_INFINITY);
    let masks: [__mmask16; N] = std::array::from_fn(|n| {
        let real = valid.saturating_sub(n * LANES).min(LANES);
        ((1u32 << real) - 1) as __mmask16
    });
    for (r, a) in acc.iter().enumerate() {
        for n in 0..N {
            // SAFETY: row r < 8 of sc, columns n·16.. + 16 (the contract).
            unsafe {
                _mm512_storeu_ps(
                    sc.add(r * tp + n * LANES),
                    _mm512_mask_blend_ps(masks[n], neg, a[n]),
                )
            };
        }
    }
}

/// `out[i][c] = Σ_{e < t} p[i][e] · v[e][c]` for the `s` real query rows,
/// `p` the softmaxed scores (`[sp, tp]`), `v` `[t, d]`; `out` points at the
/// row's first position and the head's first column, rows `h` apart.
///
/// # Safety
/// `out` must be writable for `s` rows of `d` columns, `h` apart.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn context(
    p: &[f32],
    v: &[f32],
    out: *mut f32,
    h: usize,
    d: usize,
    t: usize,
    tp: usize,
    s: usize,
) {
    let sp = p.len() / tp;
    assert!(
        sp.is_multiple_of(ROWS)
            && s <= sp
            && t <= tp
            && v.len() >= t * d
            && d.is_multiple_of(LANES),
        "attend512::context: operand sizes"
    );
    for i0 in (0..sp).step_by(ROWS) {
        let rows = ROWS.min(s.saturating_sub(i0));
        if rows == 0 {
            break;
        }
        let mut c0 = 0;
        while c0 < d {
            // SAFETY: rows i0..i0 + 8 ≤ sp of p (tp each, t read), value
            // columns c0..c0 + 16·N ≤ d of v's t rows; out rows i0.. + rows
            // ≤ s, columns c0.. + 16·N ≤ d (the caller's contract).
            unsafe {
                let (p0, v0, o0) = (
                    p.as_ptr().add(i0 * tp),
                    v.as_ptr().add(c0),
                    out.add(i0 * h + c0),
                );
                if d - c0 >= 2 * LANES {
                    context_block::<2>(p0, tp, v0, d, t, o0, h, rows);
                    c0 += 2 * LANES;
                } else {
                    context_block::<1>(p0, tp, v0, d, t, o0, h, rows);
                    c0 += LANES;
                }
            }
        }
    }
}

/// 8 rows of probabilities × N·16 value columns of [`context`], the first
/// `rows` of them stored.
///
/// # Safety
/// `p`: 8 rows of stride `tp` with `t` values; `v`: `t` rows of stride `dv`
/// with N·16 columns; `out`: `rows` rows of stride `h` with N·16 columns.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn context_block<const N: usize>(
    p: *const f32,
    tp: usize,
    v: *const f32,
    dv: usize,
    t: usize,
    out: *mut f32,
    h: usize,
    rows: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); N]; ROWS];
    for e in 0..t {
        // SAFETY: e < t rows of v and columns of p (the contract).
        unsafe {
            let vv: [__m512; N] =
                std::array::from_fn(|n| _mm512_loadu_ps(v.add(e * dv + n * LANES)));
            for (r, a) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*p.add(r * tp + e));
                for n in 0..N {
                    a[n] = _mm512_fmadd_ps(x, vv[n], a[n]);
                }
            }
        }
    }
    for (r, a) in acc.iter().enumerate().take(rows) {
        for (n, &x) in a.iter().enumerate() {
            // SAFETY: row r < rows, columns n·16.. + 16 of out (the contract).
            unsafe { _mm512_storeu_ps(out.add(r * h + n * LANES), x) };
        }
    }
}
