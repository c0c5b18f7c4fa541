//! The attention work item of [`super::attention`] on register-blocked
//! micro-kernels, for heads a multiple of 16 wide (MiniLM's 32, BERT-base's
//! 64): AVX-512 ([`attend512`]) and AVX2 ([`attend256`]) builds of one
//! generic item.
//!
//! Why a second item: the generic one ([`super::attend_impl`]) multiplies
//! 4 query rows by 16 keys per step on two 8-lane registers, reading 6
//! operands per 8 multiply-adds, copies each 4 × 16 block of scores
//! through the stack, and runs the softmax of a row's last, partial 16
//! keys one scalar `exp` at a time (9 of 25 keys for a typical sentence).
//! On an AVX-512 Xeon that put attention at 13–16% of the plain encoder's
//! forward and 31% of the int8 one's. Here:
//! - scores: `R` query rows × `N`·16 keys per step (AVX-512: 8 × 32 in 16
//!   zmm accumulators, one load and 8 broadcasts per 16 multiply-adds;
//!   AVX2: 6 × 16 in 12 ymm), stored straight into the scores buffer;
//! - on AVX-512 the padding keys are then set to −∞ and the softmax runs
//!   whole 16-lane chunks, no scalar tail ([`Wide::PAD_SOFTMAX`]);
//! - context: `R` rows × `N`·16 value columns per step, written straight
//!   into the output.
//!
//! Measured (`cargo bench --bench attention`, 2 threads, an AVX-512 Xeon,
//! old and new alternated): AVX-512 1.6–2.0× the generic item at 8 and 64
//! rows; AVX2 (`SOFTPROMPT_SIMD=avx2`) about 1.1×.
//!
//! The scratch layout and its filling are the generic item's
//! ([`super::Layout`], [`fill`]), with query rows padded to `R`; the keys
//! are transposed 8 × 8 in registers ([`Keys8`]) rather than one float at
//! a time.

use std::arch::x86_64::*;

use super::{Fused, Item, KeyRows, Keys, LANES, fill, softmax_row};

/// 16 f32 lanes as one instruction set holds them. Every method is
/// `#[inline(always)]` and runs inside a function compiled for that set.
trait Wide: Copy {
    /// Most 16-lane groups per micro-kernel step (the register budget).
    const MAX_N: usize;
    /// Whether the softmax runs over the whole padded row, padding keys
    /// −∞: with AVX-512's masks the vectorized `exp` takes them in stride;
    /// in the AVX2 build the −∞ select cost a fifth of the item (`perf`)
    /// and made it 12–25% slower than the generic item, so there a row's
    /// last, partial 16 keys stay scalar.
    const PAD_SOFTMAX: bool;
    /// # Safety (every method)
    /// The CPU has the instruction set; pointers are valid for 16 f32.
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn splat(x: f32) -> Self;
    /// `a · b + c`, fused.
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
    unsafe fn store(self, p: *mut f32);
}

/// One zmm register.
#[derive(Clone, Copy)]
struct Z(__m512);

impl Wide for Z {
    const MAX_N: usize = 2;
    const PAD_SOFTMAX: bool = true;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the trait's contract (AVX-512F present).
        Z(unsafe { _mm512_setzero_ps() })
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the trait's contract (16 readable f32).
        Z(unsafe { _mm512_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        // SAFETY: the trait's contract.
        Z(unsafe { _mm512_set1_ps(x) })
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: the trait's contract.
        Z(unsafe { _mm512_fmadd_ps(a.0, b.0, c.0) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the trait's contract (16 writable f32).
        unsafe { _mm512_storeu_ps(p, self.0) }
    }
}

/// Two ymm registers.
#[derive(Clone, Copy)]
struct Y(__m256, __m256);

impl Wide for Y {
    const MAX_N: usize = 1;
    const PAD_SOFTMAX: bool = false;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the trait's contract (AVX present).
        unsafe { Y(_mm256_setzero_ps(), _mm256_setzero_ps()) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the trait's contract (16 readable f32).
        unsafe { Y(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        // SAFETY: the trait's contract.
        unsafe {
            let v = _mm256_set1_ps(x);
            Y(v, v)
        }
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: the trait's contract (FMA present).
        unsafe {
            Y(
                _mm256_fmadd_ps(a.0, b.0, c.0),
                _mm256_fmadd_ps(a.1, b.1, c.1),
            )
        }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the trait's contract (16 writable f32).
        unsafe {
            _mm256_storeu_ps(p, self.0);
            _mm256_storeu_ps(p.add(8), self.1);
        }
    }
}

/// [`super::attention`]'s work item (`heads` of one row) on AVX-512: 8
/// rows × up to 32 keys or value columns per step.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL, AVX2 and FMA. `out` must be
/// `[N, hidden]` with the row inside it, written by no other item in the
/// same columns (as [`super::attention`] guarantees); the head width a
/// multiple of 16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(super) unsafe fn attend512(scratch: &mut Vec<f32>, item: Item<'_>) {
    // SAFETY: the caller's contract, which is `attend`'s.
    unsafe { attend::<Z, 8>(scratch, item) }
}

/// [`attend512`] on AVX2: 6 rows × 16 keys or value columns per step
/// (12 of the 16 ymm registers accumulate).
///
/// # Safety
/// The CPU must have AVX2 and FMA; the rest as for [`attend512`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn attend256(scratch: &mut Vec<f32>, item: Item<'_>) {
    // SAFETY: the caller's contract, which is `attend`'s.
    unsafe { attend::<Y, 6>(scratch, item) }
}

/// The item on `V` registers, `R` query rows per step.
///
/// # Safety
/// The CPU has `V`'s instruction set; `out` as for [`attend512`].
#[inline(always)]
unsafe fn attend<V: Wide, const R: usize>(scratch: &mut Vec<f32>, item: Item<'_>) {
    let Item {
        out,
        row,
        ref heads,
        dims,
        ..
    } = item;
    let h = dims.hidden;
    // SAFETY: `V`'s instruction sets all include AVX2, which `Keys8` uses
    // (the caller's contract).
    let filled = unsafe { fill::<Keys8>(scratch, &item, R) };
    let Some((lay, bufs, sc)) = filled else {
        return;
    };
    let (d, s, t, sp, tp) = (lay.d, lay.s, lay.t, lay.sp, lay.tp);
    assert!(
        d.is_multiple_of(LANES) && lay.dp == d,
        "attend_wide: head width not a multiple of 16"
    );
    let out = out.ptr();
    for (k, hb) in bufs.chunks_exact(lay.per_head).enumerate() {
        let (q, rest) = hb.split_at(lay.qn);
        let (kt, v) = rest.split_at(lay.kn);
        // SAFETY: the CPU has V's instructions (the caller's contract).
        unsafe { scores::<V, R>(q, kt, sc, d, t, tp) };
        let width = if V::PAD_SOFTMAX { tp } else { t };
        for i in 0..s {
            softmax_row::<Fused>(&mut sc[i * tp..][..width]);
        }
        // SAFETY: rows start..start + s of `out` exist and columns col..col
        // + d of them belong to this item (the caller's contract); `context`
        // writes only those.
        unsafe {
            let at = out.add(row.start * h + (heads.start + k) * d);
            context::<V, R>(&sc[..sp * tp], v, at, h, d, t, tp, s);
        }
    }
}

/// `sc[i][j] = Σₑ q[i][e] · kt[e][j]` for every padded query row i and key
/// column j; with [`Wide::PAD_SOFTMAX`] columns j ≥ `t` (padding keys) then
/// get −∞.
///
/// # Safety
/// The CPU has `V`'s instructions.
#[inline(always)]
unsafe fn scores<V: Wide, const R: usize>(
    q: &[f32],
    kt: &[f32],
    sc: &mut [f32],
    d: usize,
    t: usize,
    tp: usize,
) {
    let sp = q.len() / d;
    assert!(
        sp.is_multiple_of(R)
            && tp.is_multiple_of(LANES)
            && t <= tp
            && kt.len() >= d * tp
            && sc.len() >= sp * tp,
        "attend_wide::scores: operand sizes"
    );
    let (qp, kp, sp_ptr) = (q.as_ptr(), kt.as_ptr(), sc.as_mut_ptr());
    for i0 in (0..sp).step_by(R) {
        let mut j0 = 0;
        while j0 < tp {
            // SAFETY: rows i0..i0 + R ≤ sp of q (d each) and of sc (tp
            // each), columns j0..j0 + 16·N ≤ tp of kt's d rows and of sc's
            // rows: all inside the slices (sizes asserted above); the CPU
            // has V's instructions (the contract).
            unsafe {
                let (q0, k0, s0) = (qp.add(i0 * d), kp.add(j0), sp_ptr.add(i0 * tp + j0));
                if V::MAX_N >= 2 && tp - j0 >= 2 * LANES {
                    scores_block::<V, R, 2>(q0, d, k0, tp, s0);
                    j0 += 2 * LANES;
                } else {
                    scores_block::<V, R, 1>(q0, d, k0, tp, s0);
                    j0 += LANES;
                }
            }
        }
    }
    if V::PAD_SOFTMAX {
        for row in sc[..sp * tp].chunks_exact_mut(tp) {
            row[t..].fill(f32::NEG_INFINITY);
        }
    }
}

/// `R` query rows × N·16 keys of [`scores`].
///
/// # Safety
/// `q` must hold `R` rows of `d`, `kt` `d` rows of stride `tp` with N·16
/// columns from it, `sc` `R` rows of stride `tp` with N·16 columns; the CPU
/// has `V`'s instructions.
#[inline(always)]
unsafe fn scores_block<V: Wide, const R: usize, const N: usize>(
    q: *const f32,
    d: usize,
    kt: *const f32,
    tp: usize,
    sc: *mut f32,
) {
    // SAFETY: the function's contract covers every pointer read and
    // written below and the instruction set.
    unsafe {
        let mut acc = [[V::zero(); N]; R];
        for e in 0..d {
            let kv: [V; N] = std::array::from_fn(|n| V::load(kt.add(e * tp + n * LANES)));
            for (r, a) in acc.iter_mut().enumerate() {
                let x = V::splat(*q.add(r * d + e));
                for (a, &k) in a.iter_mut().zip(&kv) {
                    *a = V::fmadd(x, k, *a);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (n, &x) in a.iter().enumerate() {
                x.store(sc.add(r * tp + n * LANES));
            }
        }
    }
}

/// `out[i][c] = Σ_{e < t} p[i][e] · v[e][c]` for the `s` real query rows,
/// `p` the softmaxed scores (`[sp, tp]`), `v` `[t, d]`; `out` points at the
/// row's first position and the head's first column, rows `h` apart.
///
/// # Safety
/// `out` must be writable for `s` rows of `d` columns, `h` apart; the CPU
/// has `V`'s instructions.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn context<V: Wide, const R: usize>(
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
        sp.is_multiple_of(R) && s <= sp && t <= tp && v.len() >= t * d && d.is_multiple_of(LANES),
        "attend_wide::context: operand sizes"
    );
    for i0 in (0..sp).step_by(R) {
        let rows = R.min(s.saturating_sub(i0));
        if rows == 0 {
            break;
        }
        let mut c0 = 0;
        while c0 < d {
            // SAFETY: rows i0..i0 + R ≤ sp of p (tp each, t read), value
            // columns c0..c0 + 16·N ≤ d of v's t rows; out rows i0.. + rows
            // ≤ s, columns c0.. + 16·N ≤ d (the caller's contract).
            unsafe {
                let (p0, v0, o0) = (
                    p.as_ptr().add(i0 * tp),
                    v.as_ptr().add(c0),
                    out.add(i0 * h + c0),
                );
                if V::MAX_N >= 2 && d - c0 >= 2 * LANES {
                    context_block::<V, R, 2>(p0, tp, v0, d, t, o0, h, rows);
                    c0 += 2 * LANES;
                } else {
                    context_block::<V, R, 1>(p0, tp, v0, d, t, o0, h, rows);
                    c0 += LANES;
                }
            }
        }
    }
}

/// `R` rows of probabilities × N·16 value columns of [`context`], the
/// first `rows` of them stored.
///
/// # Safety
/// `p`: `R` rows of stride `tp` with `t` values; `v`: `t` rows of stride
/// `dv` with N·16 columns; `out`: `rows` rows of stride `h` with N·16
/// columns; the CPU has `V`'s instructions.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn context_block<V: Wide, const R: usize, const N: usize>(
    p: *const f32,
    tp: usize,
    v: *const f32,
    dv: usize,
    t: usize,
    out: *mut f32,
    h: usize,
    rows: usize,
) {
    // SAFETY: the function's contract covers every pointer read and
    // written below and the instruction set.
    unsafe {
        let mut acc = [[V::zero(); N]; R];
        for e in 0..t {
            let vv: [V; N] = std::array::from_fn(|n| V::load(v.add(e * dv + n * LANES)));
            for (r, a) in acc.iter_mut().enumerate() {
                let x = V::splat(*p.add(r * tp + e));
                for (a, &w) in a.iter_mut().zip(&vv) {
                    *a = V::fmadd(x, w, *a);
                }
            }
        }
        for (r, a) in acc.iter().enumerate().take(rows) {
            for (n, &x) in a.iter().enumerate() {
                x.store(out.add(r * h + n * LANES));
            }
        }
    }
}

/// [`Keys`] in 8 × 8 blocks: 8 tokens' rows of 8 head columns loaded, bias
/// added, transposed in registers and stored as 8 rows of 8 keys. Why: the
/// scalar transpose (one load, add and strided store per float) took about
/// a quarter of the item at the workload's shapes (64 rows, no prompt: 1.03
/// against 0.77 ms per layer with the keys left unwritten, an AVX-512 Xeon).
/// AVX2 suffices for both builds; its 256-bit shuffles are cheap on both.
struct Keys8;

impl Keys for Keys8 {
    /// # Safety
    /// The CPU has AVX2.
    #[inline(always)]
    unsafe fn put(kt: &mut [f32], tp: usize, j0: usize, rows: KeyRows<'_>) {
        let KeyRows {
            src,
            stride,
            n,
            d,
            bias,
        } = rows;
        if n == 0 {
            return;
        }
        assert!(
            d > 0
                && d.is_multiple_of(8)
                && bias.is_none_or(|b| b.len() >= d)
                && src.len() >= (n - 1) * stride + d
                && j0 + n <= tp
                && kt.len() >= (d - 1) * tp + j0 + n,
            "attend_wide::Keys8: operand sizes"
        );
        let (sp, kp) = (src.as_ptr(), kt.as_mut_ptr());
        for i0 in (0..n).step_by(8) {
            let m = (n - i0).min(8);
            // SAFETY: token rows i0..i0 + m < n of `src` and their columns
            // e0..e0 + 8 ≤ d, `bias`'s columns e0..e0 + 8, and in `kt` row e0 +
            // e < d the columns j0 + i0 .. j0 + i0 + m ≤ j0 + n ≤ tp (lanes
            // m.. are masked off): all inside the slices (asserted above);
            // AVX2 present (the contract).
            unsafe {
                let mask = _mm256_cmpgt_epi32(
                    _mm256_set1_epi32(m as i32),
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                );
                for e0 in (0..d).step_by(8) {
                    let bv =
                        bias.map_or(_mm256_setzero_ps(), |b| _mm256_loadu_ps(b.as_ptr().add(e0)));
                    let mut r = [_mm256_setzero_ps(); 8];
                    for (i, x) in r.iter_mut().enumerate().take(m) {
                        *x = _mm256_add_ps(_mm256_loadu_ps(sp.add((i0 + i) * stride + e0)), bv);
                    }
                    for (e, c) in transpose8(r).into_iter().enumerate() {
                        let at = kp.add((e0 + e) * tp + j0 + i0);
                        if m == 8 {
                            _mm256_storeu_ps(at, c);
                        } else {
                            _mm256_maskstore_ps(at, mask, c);
                        }
                    }
                }
            }
        }
    }
}

/// The 8 × 8 transpose of `r` (row i of the result holds lane i of each
/// input): unpack pairs, shuffle quads, swap 128-bit halves.
///
/// # Safety
/// The CPU has AVX.
#[inline(always)]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // SAFETY: register-only AVX instructions (the contract).
    unsafe {
        // t0 = a0 b0 a1 b1 | a4 b4 a5 b5, t1 = a2 b2 a3 b3 | a6 b6 a7 b7, ...
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (x, y) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_ps(x, y)
            } else {
                _mm256_unpackhi_ps(x, y)
            }
        });
        // u0 = a0 b0 c0 d0 | a4 b4 c4 d4, u1 = a1.. | a5.., u2 = a2.., u3 = a3..;
        // u4..u7 the same for e..h.
        let quad = |x: __m256, y: __m256, hi: bool| {
            if hi {
                _mm256_shuffle_ps::<0xEE>(x, y)
            } else {
                _mm256_shuffle_ps::<0x44>(x, y)
            }
        };
        let u = [
            quad(t[0], t[2], false),
            quad(t[0], t[2], true),
            quad(t[1], t[3], false),
            quad(t[1], t[3], true),
            quad(t[4], t[6], false),
            quad(t[4], t[6], true),
            quad(t[5], t[7], false),
            quad(t[5], t[7], true),
        ];
        std::array::from_fn(|e| {
            if e < 4 {
                _mm256_permute2f128_ps::<0x20>(u[e], u[e + 4])
            } else {
                _mm256_permute2f128_ps::<0x31>(u[e - 4], u[e])
            }
        })
    }
}
