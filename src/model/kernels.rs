//! Fused CPU kernels for the serving forward, on plain `f32` slices.
//!
//! candle runs element-wise ops on one thread, each as its own pass over
//! memory, and its `exp`/`erf` are scalar library calls; on a 2-core CPU the
//! bias adds, GELU, softmax and the head split/merge around attention cost
//! as much as the matmuls they surround. These kernels fuse each chain into
//! one parallel pass, written as branch-free loops over fixed-width lane
//! arrays so that LLVM vectorizes them. Each kernel is compiled three
//! times: for the baseline target, with AVX2+FMA, and with AVX-512, picked
//! at run time ([`Simd`]; the binary still runs on any x86-64 or other
//! architecture). On a Zen 4 (512-bit instructions split in two halves)
//! the AVX-512 builds measured no faster than AVX2 end to end; CPUs with
//! full-width AVX-512 units are where they can gain.
//!
//! Training uses them too, through [`train`]: forward variants that keep
//! what the backward needs, and hand-written backward passes. Other
//! devices use candle's ops.

// The one module of the crate allowed unsafe code (Cargo.toml denies it
// elsewhere): the AVX2 intrinsics and calls into their target-feature
// builds, and the matmul and attention work items that write disjoint
// blocks of one output buffer from several threads through a raw pointer.
#![allow(unsafe_code)]

use rayon::prelude::*;
use std::cell::RefCell;

/// What differs between the two builds of a kernel.
trait Arith {
    /// Multiply-add, fused where the kernel is compiled for FMA. Without the
    /// target feature `f32::mul_add` would be a slow library call, so the
    /// baseline build rounds twice instead.
    fn fma(a: f32, b: f32, c: f32) -> f32;

    /// The attention micro-kernel: `out[r][c] = Σ_e a[r][e] · b[e·stride + c]`
    /// for `MR` rows of `a` (all of one length k) and `LANES` columns of `b`.
    fn block(a: [&[f32]; MR], b: &[f32], stride: usize) -> [[f32; LANES]; MR];
}

/// Kernels compiled with `avx2,fma`. Its `block` uses AVX2 instructions:
/// code generic over [`Arith`] runs with `Fused` only inside the AVX2+FMA
/// wrappers of [`dispatch!`].
// `dispatch!` uses it on x86-64 only.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Fused;
/// Kernels compiled for the baseline target.
struct Plain;

impl Arith for Fused {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }

    #[inline(always)]
    fn block(a: [&[f32]; MR], b: &[f32], stride: usize) -> [[f32; LANES]; MR] {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `Fused` is private to this module and named only in
            // the `wide`/`wide512` functions of `dispatch!`, which run only
            // where `Simd::detected()` found AVX2 and FMA (and more), the
            // one precondition of `avx2::block` (it checks the slice bounds
            // itself).
            unsafe { avx2::block(a, b, stride) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Plain::block(a, b, stride)
        }
    }
}

impl Arith for Plain {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }

    #[inline(always)]
    fn block(a: [&[f32]; MR], b: &[f32], stride: usize) -> [[f32; LANES]; MR] {
        let mut acc = [[0f32; LANES]; MR];
        for e in 0..a[0].len() {
            let row: &[f32; LANES] = b[e * stride..][..LANES].try_into().unwrap();
            for r in 0..MR {
                let x = a[r][e];
                for c in 0..LANES {
                    acc[r][c] += x * row[c];
                }
            }
        }
        acc
    }
}

/// The micro-kernel in AVX2 intrinsics: LLVM does not keep a `[[f32; 16]; 4]`
/// accumulator of generic code in registers (it spilled it and ran scalar
/// FMAs, 3× slower than the matmuls around it).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{LANES, MR};
    use std::arch::x86_64::*;

    /// [`super::Arith::block`] on 2 × 8-lane registers per row.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block(a: [&[f32]; MR], b: &[f32], stride: usize) -> [[f32; LANES]; MR] {
        const { assert!(MR == 4 && LANES == 16) };
        let k = a[0].len();
        assert!(
            a.iter().all(|r| r.len() == k),
            "block: rows of a differ in length"
        );
        assert!(
            k == 0 || (k - 1) * stride + LANES <= b.len(),
            "block: b too short"
        );
        let mut acc = [_mm256_setzero_ps(); 2 * MR];
        let bp = b.as_ptr();
        for e in 0..k {
            // SAFETY: e·stride + 16 ≤ b.len() and e < k = every a[r].len()
            // (both checked above).
            unsafe {
                let b0 = _mm256_loadu_ps(bp.add(e * stride));
                let b1 = _mm256_loadu_ps(bp.add(e * stride + 8));
                for r in 0..MR {
                    let x = _mm256_set1_ps(*a[r].get_unchecked(e));
                    acc[2 * r] = _mm256_fmadd_ps(x, b0, acc[2 * r]);
                    acc[2 * r + 1] = _mm256_fmadd_ps(x, b1, acc[2 * r + 1]);
                }
            }
        }
        let mut out = [[0f32; LANES]; MR];
        for r in 0..MR {
            // SAFETY: out[r] holds 16 values.
            unsafe {
                _mm256_storeu_ps(out[r].as_mut_ptr(), acc[2 * r]);
                _mm256_storeu_ps(out[r].as_mut_ptr().add(8), acc[2 * r + 1]);
            }
        }
        out
    }
}

/// Whether this CPU runs the AVX2+FMA builds (std caches the answer).
// `dispatch!` calls it on x86-64 only.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline]
fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The instruction sets the kernels are built for, widest last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    /// The baseline target.
    Plain = 0,
    /// AVX2 + FMA (256-bit).
    Avx2 = 1,
    /// AVX-512 F/BW/VL + FMA: the same generic code, vectorized by LLVM
    /// over 512-bit registers.
    Avx512 = 2,
}

/// The widest build the kernels may use, below what the CPU has (tests run
/// every build on one machine; `SOFTPROMPT_SIMD=avx2|plain` caps it for
/// benchmarks).
static SIMD_CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

impl Simd {
    /// The widest build this CPU runs (std caches the feature tests).
    pub fn detected() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has_avx2_fma() && has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
                return Simd::Avx512;
            }
            if has_avx2_fma() {
                return Simd::Avx2;
            }
        }
        Simd::Plain
    }

    /// The build the kernels run now: [`Simd::detected`], capped by
    /// `SOFTPROMPT_SIMD` (read once) and [`Simd::cap`].
    pub fn current() -> Simd {
        static ENV: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        let env = *ENV.get_or_init(|| match std::env::var("SOFTPROMPT_SIMD").as_deref() {
            Ok("plain") => Simd::Plain,
            Ok("avx2") => Simd::Avx2,
            _ => Simd::Avx512,
        });
        let cap = match SIMD_CAP.load(std::sync::atomic::Ordering::Relaxed) {
            0 => Simd::Plain,
            1 => Simd::Avx2,
            _ => Simd::Avx512,
        };
        Simd::detected().min(env).min(cap)
    }

    /// Caps the build every kernel uses from now on, in every thread (tests
    /// and benchmarks compare builds); `Simd::Avx512` lifts the cap.
    pub fn cap(level: Simd) {
        SIMD_CAP.store(level as u8, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Declares `fn $name(args)` that runs `$imp::<Fused>` compiled with
/// AVX-512 or AVX2+FMA, whichever [`Simd::current`] says, else
/// `$imp::<Plain>`. The body is `#[inline(always)]` generic code, so it is
/// compiled once per target feature set inside the wrapper.
macro_rules! dispatch {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) => $imp:ident;) => {
        $(#[$doc])*
        $vis fn $name($($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                fn wide512($($a: $t),*) {
                    $imp::<Fused>($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn wide($($a: $t),*) {
                    $imp::<Fused>($($a),*)
                }
                match Simd::current() {
                    // SAFETY: `current` never exceeds `detected`, so the
                    // CPU has the features `wide512` is compiled for.
                    Simd::Avx512 => return unsafe { wide512($($a),*) },
                    // SAFETY: likewise for `wide`.
                    Simd::Avx2 => return unsafe { wide($($a),*) },
                    Simd::Plain => {}
                }
            }
            $imp::<Plain>($($a),*)
        }
    };
}

/// Lanes of the accumulators in reductions and micro-kernels: two AVX2
/// registers, enough independent chains to hide FMA latency.
const LANES: usize = 16;

/// `e^x` in f32, branch-free so that loops over it vectorize.
///
/// x = n·ln2 + r with |r| ≤ ln2/2 (n by the round-to-nearest "magic number"
/// trick, ln 2 split in two so n·ln2_hi is exact), e^r by its Taylor series
/// to degree 7 (truncation < 1e-8 relative), 2^n put into the exponent bits.
/// Relative error is a couple of ulp. Inputs below ln(2^-126) give 0 (also
/// -inf and the `f32::MIN` masks); inputs above 88.37 saturate at ≈2.4e38
/// instead of overflowing: softmax and erf only feed it x ≤ 0.
#[inline(always)]
fn exp<F: Arith>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5·2^23: adding it leaves round(y) in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const LN2_HI: f32 = 355.0 / 512.0; // 9 bits, so n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
    // Just under 127.5·ln 2, so that n = round(x·log2 e) ≤ 127.
    const HI: f32 = 88.37;
    const LO: f32 = -87.336_55;
    let xc = if x > HI { HI } else { x };
    let xc = if xc < LO { LO } else { xc };
    let t = F::fma(xc, LOG2E, MAGIC);
    let n = t - MAGIC;
    let r = F::fma(n, -LN2_HI, xc);
    let r = F::fma(n, -LN2_LO, r);
    let mut p = 1.0 / 5040.0;
    p = F::fma(p, r, 1.0 / 720.0);
    p = F::fma(p, r, 1.0 / 120.0);
    p = F::fma(p, r, 1.0 / 24.0);
    p = F::fma(p, r, 1.0 / 6.0);
    p = F::fma(p, r, 0.5);
    p = F::fma(p, r, 1.0);
    p = F::fma(p, r, 1.0);
    // n ∈ [-126, 127] after the clamp: a normal power of two.
    let ni = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let scale = f32::from_bits(((ni + 127) << 23) as u32);
    let v = p * scale;
    if x < LO { 0.0 } else { v }
}

/// erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7 in exact arithmetic,
/// < 6e-7 evaluated in f32; PyTorch's vectorized erf uses the same
/// formula), branch-free. candle's scalar erf is several times slower and
/// this error is far below the f32 noise of the surrounding matmuls.
#[inline(always)]
fn erf<F: Arith>(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / F::fma(0.327_591_1, a, 1.0);
    let mut p = 1.061_405_4;
    p = F::fma(p, t, -1.453_152_1);
    p = F::fma(p, t, 1.421_413_7);
    p = F::fma(p, t, -0.284_496_74);
    p = F::fma(p, t, 0.254_829_6);
    p *= t;
    F::fma(-p, exp::<F>(-a * a), 1.0).copysign(x)
}

/// Exact (erf-based) GELU.
#[inline(always)]
fn gelu<F: Arith>(v: f32) -> f32 {
    0.5 * v * (1.0 + erf::<F>(v * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn exp_slice_impl<F: Arith>(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = exp::<F>(*v);
    }
}

dispatch! {
    /// `x ← e^x` element-wise (the kernels' exp, exposed for tests).
    pub fn exp_in_place(x: &mut [f32]) => exp_slice_impl;
}

#[inline(always)]
fn erf_slice_impl<F: Arith>(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = erf::<F>(*v);
    }
}

dispatch! {
    /// `x ← erf(x)` element-wise (the kernels' erf, exposed for tests).
    pub fn erf_in_place(x: &mut [f32]) => erf_slice_impl;
}

/// Folds `LANES` partial results pairwise (lanes i and i + w for w = 8, 4,
/// 2, 1), which LLVM turns into four vector halvings. Why: `iter().sum()`
/// over the lanes is a chain of 16 dependent scalar adds (64+ cycles of
/// latency), and the softmax of every attention row paid it twice (max and
/// sum): `perf` put 12% of the AVX-512 attention item on that chain.
#[inline(always)]
fn fold_lanes(mut a: [f32; LANES], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            a[i] = op(a[i], a[i + w]);
        }
    }
    a[0]
}

/// Sum with `LANES` independent partial sums (a sequential float sum does
/// not vectorize: reassociating it changes the result).
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    fold_lanes(acc, |a, b| a + b) + tail.iter().sum::<f32>()
}

/// `softmax` of one row in place. The row holds only keys the query may
/// see, so there is no mask to add.
#[inline(always)]
fn softmax_row<F: Arith>(x: &mut [f32]) {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in mx.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let max = fold_lanes(mx, |a, b| if b > a { b } else { a }).max(max);
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = exp::<F>(*v - max);
            *a += *v;
        }
    }
    let mut sum = fold_lanes(acc, |a, b| a + b);
    for v in chunks.into_remainder() {
        *v = exp::<F>(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Rows per parallel work item of the row-wise kernels: enough to amortize
/// scheduling.
const CHUNK_ROWS: usize = 16;

#[inline(always)]
fn bias_gelu_impl<F: Arith>(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v = gelu::<F>(*v + b);
        }
    }
}

dispatch! {
    fn bias_gelu_rows(x: &mut [f32], bias: &[f32]) => bias_gelu_impl;
}

/// `x ← gelu_erf(x + bias)` over the rows of `x` `[N, bias.len()]`.
pub fn bias_gelu(x: &mut [f32], bias: &[f32]) {
    let n = bias.len();
    assert!(
        n > 0 && x.len().is_multiple_of(n),
        "bias-gelu: {} values are not rows of {n}",
        x.len()
    );
    x.par_chunks_mut(n * CHUNK_ROWS)
        .for_each(|c| bias_gelu_rows(c, bias));
}

/// Layer-norm parameters with the bias of the linear layer before it, as the
/// fused residual kernel takes them.
#[derive(Clone, Copy)]
pub struct NormParams<'a> {
    pub bias: &'a [f32],
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub eps: f32,
}

/// Mean and 1/σ of one row (two-pass variance, as candle and PyTorch
/// compute it).
#[inline(always)]
fn mean_inv_std<F: Arith>(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len();
    let mean = lane_sum(x) / n as f32;
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let d = v - mean;
            *a = F::fma(d, d, *a);
        }
    }
    let mut var = fold_lanes(acc, |a, b| a + b);
    for &v in chunks.remainder() {
        var += (v - mean) * (v - mean);
    }
    (mean, 1.0 / (var / n as f32 + eps).sqrt())
}

/// Layer norm of one row in place.
#[inline(always)]
fn layer_norm_row<F: Arith>(o: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let (mean, inv) = mean_inv_std::<F>(o, eps);
    for ((o, &g), &b) in o.iter_mut().zip(gamma).zip(beta) {
        *o = F::fma((*o - mean) * inv, g, b);
    }
}

#[inline(always)]
fn residual_norm_impl<F: Arith>(out: &mut [f32], x: &[f32], r: &[f32], p: NormParams<'_>) {
    let n = p.bias.len();
    for ((o, x), r) in out
        .chunks_exact_mut(n)
        .zip(x.chunks_exact(n))
        .zip(r.chunks_exact(n))
    {
        for (((o, &x), &b), &r) in o.iter_mut().zip(x).zip(p.bias).zip(r) {
            *o = x + b + r;
        }
        layer_norm_row::<F>(o, p.gamma, p.beta, p.eps);
    }
}

dispatch! {
    fn residual_norm_rows(out: &mut [f32], x: &[f32], r: &[f32], p: NormParams<'_>) => residual_norm_impl;
}

/// `out ← layer_norm(x + bias + residual)` over rows of `p.bias.len()`.
pub fn residual_norm(out: &mut [f32], x: &[f32], residual: &[f32], p: NormParams<'_>) {
    let n = p.bias.len();
    assert!(
        n > 0
            && x.len().is_multiple_of(n)
            && x.len() == out.len()
            && x.len() == residual.len()
            && p.gamma.len() == n
            && p.beta.len() == n,
        "residual-norm: shapes disagree"
    );
    out.par_chunks_mut(n * CHUNK_ROWS)
        .zip(
            x.par_chunks(n * CHUNK_ROWS)
                .zip(residual.par_chunks(n * CHUNK_ROWS)),
        )
        .for_each(|(o, (x, r))| residual_norm_rows(o, x, r, p));
}

/// The embedding layer's inputs for one token: its word or virtual-token
/// vector, its token-type and position vectors.
#[derive(Clone, Copy)]
pub struct EmbedToken<'a> {
    pub input: &'a [f32],
    pub token_type: &'a [f32],
    pub position: &'a [f32],
}

#[inline(always)]
fn embed_impl<F: Arith>(
    out: &mut [f32],
    tokens: &[EmbedToken<'_>],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    let n = gamma.len();
    for (o, t) in out.chunks_exact_mut(n).zip(tokens) {
        for (((o, &x), &ty), &p) in o.iter_mut().zip(t.input).zip(t.token_type).zip(t.position) {
            *o = x + ty + p;
        }
        layer_norm_row::<F>(o, gamma, beta, eps);
    }
}

dispatch! {
    fn embed_rows(out: &mut [f32], tokens: &[EmbedToken<'_>], gamma: &[f32], beta: &[f32], eps: f32) => embed_impl;
}

/// The embedding layer over packed tokens: `out[k] ← layer_norm(input +
/// token_type + position)`, one parallel pass instead of candle's gathers,
/// adds and norm.
pub fn embed(out: &mut [f32], tokens: &[EmbedToken<'_>], gamma: &[f32], beta: &[f32], eps: f32) {
    let n = gamma.len();
    assert!(
        n > 0
            && beta.len() == n
            && out.len() == tokens.len() * n
            && tokens
                .iter()
                .all(|t| t.input.len() == n && t.token_type.len() == n && t.position.len() == n),
        "embed: shapes disagree"
    );
    out.par_chunks_mut(n * CHUNK_ROWS)
        .zip(tokens.par_chunks(CHUNK_ROWS))
        .for_each(|(o, t)| embed_rows(o, t, gamma, beta, eps));
}

/// An output buffer shared by parallel work items that write disjoint parts.
/// Made only in [`matmul_wt`] and [`attention`] from a `&mut [f32]` that
/// stays borrowed (and unused) until every work item has returned.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: every work item accesses the output through the pointer only
// within its own block: (rows × columns) blocks of a matmul, which partition
// the output, and (row tokens × head columns) blocks in attention, whose
// rows are checked to be disjoint and whose head groups partition the
// columns. So sending the pointer to another thread creates no data race.
unsafe impl Send for SharedOut {}
// SAFETY: as for `Send`: threads sharing a `&SharedOut` only copy the
// pointer out and write disjoint blocks through it.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// A method, so that closures capture the whole (Send) wrapper.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `out[m, n] ← x[m, k] · w[n, k]ᵀ` for a weight stored `[out, in]` as in
/// the checkpoint, into a buffer the caller reuses across layers.
///
/// The work is split into independent single-threaded gemm calls over
/// (rows × columns) blocks of the output, one per thread, rather than left
/// to gemm's own threading as candle's `matmul` does. Measured on a quiet
/// machine (AVX-512 gemm): on two pinned cores as fast or a little faster at
/// the model's shapes with thousands of rows, and up to 2× faster with the
/// tens to hundreds of rows of small batches, where gemm's own threading
/// barely helps (56 → 75 GFLOP/s at 64 × 1536 × 384, 30 → 41 at 24 rows);
/// with 16 threads 1.2–3× faster up to 512 rows. Only for large products
/// on more than two threads, where gemm's threading did as well, does gemm
/// split the work itself.
pub fn matmul_wt(out: &mut [f32], x: &[f32], w: &[f32], k: usize) {
    matmul(out, x, w, k, true);
}

/// `out[m, n] ← g[m, k] · w[k, n]` for a weight stored `[out, in]` (k =
/// out, n = in): the backward of [`matmul_wt`] with respect to its input
/// (training), split over threads the same way.
pub fn matmul_w(out: &mut [f32], g: &[f32], w: &[f32], k: usize) {
    matmul(out, g, w, k, false);
}

/// `out[m, n] ← x[m, k] · B` with `B[k, n]` = `w[n, k]ᵀ` (`transposed`) or
/// `w[k, n]`.
fn matmul(out: &mut [f32], x: &[f32], w: &[f32], k: usize, transposed: bool) {
    assert!(
        k > 0 && x.len().is_multiple_of(k) && w.len().is_multiple_of(k),
        "matmul: inner dimensions disagree"
    );
    let (m, n) = (x.len() / k, w.len() / k);
    assert_eq!(out.len(), m * n, "matmul: output size");
    if m == 0 || n == 0 {
        return;
    }
    let threads = pool_threads();
    let own_threads = threads > 2 && m >= 256 * threads;
    let (pm, pn) = if own_threads {
        (1, 1)
    } else {
        matmul_blocks(m, n, threads)
    };
    let par = if own_threads {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // Block j of `len` split in `parts`, boundaries on multiples of `align`.
    let block = |len: usize, parts: usize, j: usize, align: usize| {
        let at = |j: usize| {
            if j == parts {
                len
            } else {
                (j * len / parts) / align * align
            }
        };
        at(j)..at(j + 1)
    };
    // Strides of B and where column j of B starts in w.
    let (b_cs, b_rs, col_at) = if transposed {
        (k as isize, 1, k)
    } else {
        (1, n as isize, 1)
    };
    let dst = SharedOut(out.as_mut_ptr());
    let run = |item: usize| {
        let rows = block(m, pm, item / pn, 1);
        let cols = block(n, pn, item % pn, 32);
        if rows.is_empty() || cols.is_empty() {
            return;
        }
        // SAFETY: x holds m·k values, w n·k and out m·n (checked above); this call reads rows `rows` of x and columns
        // `cols` of B (inside w for either layout) and writes only the
        // (rows × cols) block of out, which no other item writes.
        unsafe {
            gemm::gemm(
                rows.len(),
                cols.len(),
                k,
                dst.ptr().add(rows.start * n + cols.start),
                1,
                n as isize,
                false,
                x.as_ptr().add(rows.start * k),
                1,
                k as isize,
                w.as_ptr().add(cols.start * col_at),
                b_cs,
                b_rs,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
    };
    if pn * pm == 1 {
        run(0);
    } else {
        (0..pn * pm).into_par_iter().for_each(run);
    }
}

/// The threads a kernel splits its work over: those of the rayon pool it
/// runs in (the batch worker's compute pool when serving, sized by
/// `candle_core::utils::get_num_threads` once at start).
///
/// Not `get_num_threads` per call: without `RAYON_NUM_THREADS` set, it asks
/// `num_cpus::get_physical`, which reads and parses /proc/cpuinfo every time
/// (16 µs on a 2-CPU VM): 24 matmuls made that ~0.4 ms of every forward, a
/// fifth of a one-row int8 forward, and it showed in `perf` of the server.
pub(crate) fn pool_threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// How [`matmul_wt`] splits an `m × n` output over `threads`: `(row
/// blocks, column blocks)`. As many blocks as threads where the blocks stay
/// at least 64 rows × 96 columns (several micro-kernel tiles), and among
/// those splits the most square blocks: each block reads its rows of `x`
/// and its columns of `w`, so m/pm + n/pn is the memory traffic per thread.
fn matmul_blocks(m: usize, n: usize, threads: usize) -> (usize, usize) {
    const MIN_ROWS: usize = 64;
    const MIN_COLS: usize = 96;
    let mut best = (1, 1);
    let mut key = (1, usize::MAX);
    for pn in 1..=threads.min(n / MIN_COLS).max(1) {
        let pm = (threads / pn).min(m / MIN_ROWS).max(1);
        let k = (pm * pn, m.div_ceil(pm) + n.div_ceil(pn));
        if k.0 > key.0 || (k.0 == key.0 && k.1 < key.1) {
            best = (pm, pn);
            key = k;
        }
    }
    best
}

/// One row of a batch as attention sees it.
#[derive(Clone, Copy)]
pub struct AttnRow<'a> {
    /// First packed token of the row.
    pub start: usize,
    /// Positions of the row (virtual and text tokens).
    pub len: usize,
    /// The row's deep prompt, `[n, layers·2·hidden]` in PEFT's layout
    /// (empty when it has none): its key and value rows go before the row's
    /// own keys and values in every layer.
    pub prefix: &'a [f32],
}

/// Sizes of one attention call.
#[derive(Clone, Copy)]
pub struct AttnDims {
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    /// The layer being computed (selects its slice of deep prompts).
    pub layer: usize,
    /// Query scale, 1/√head_dim.
    pub scale: f32,
}

/// Rows of the attention micro-kernels.
const MR: usize = 4;

thread_local! {
    /// Per-thread scratch of the attention work items (queries, transposed
    /// keys, scores, values), reused across items, layers and batches.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Self-attention of packed rows, each query attending to its own row's
/// deep prefix and positions only.
///
/// * `out`: `[N, hidden]`, receives the merged heads' context (before the
///   output projection);
/// * `qkv`: `[N, 3·hidden]` = `x · Wqkvᵀ` without its bias, which is added
///   here (queries are also scaled here);
/// * `bias`: `[3·hidden]`.
///
/// One work item per (row, group of heads): it copies its slice of the
/// row's `qkv` (contiguous in the packed layout, so the copy streams) into
/// thread-local scratch as per-head queries, transposed keys and values,
/// then per head computes scores, softmax and the context there and writes
/// the context into its columns of `out`. No padded `[B, heads, S, P+S]`
/// tensor, no mask, no scatter to a padded grid or merge back: short rows
/// stay in L1/L2 and padding costs nothing. Heads are split into groups
/// only when there are too few rows to keep every thread busy.
///
/// `rows` must be sorted by `start` and disjoint (`rows[i].start ≥
/// rows[i-1].start + rows[i-1].len`; gaps are allowed and left unwritten):
/// the work items of different rows write into `out` from several threads
/// at once. Panics otherwise, and when a row reaches past the batch.
pub fn attention(out: &mut [f32], qkv: &[f32], bias: &[f32], rows: &[AttnRow<'_>], dims: AttnDims) {
    let h = dims.hidden;
    assert!(
        dims.heads > 0 && h.is_multiple_of(dims.heads),
        "attention: heads must divide hidden"
    );
    assert_eq!(bias.len(), 3 * h, "attention: qkv bias");
    let n = out.len() / h;
    assert!(
        out.len() == n * h && qkv.len() == n * 3 * h,
        "attention: buffer sizes"
    );
    let width = dims.layers * 2 * h;
    // End of the previous row: rows must start at or after it.
    let mut end = 0;
    for (i, r) in rows.iter().enumerate() {
        assert!(
            r.start.checked_add(r.len).is_some_and(|e| e <= n),
            "attention: row outside the batch"
        );
        assert!(
            r.start >= end,
            "attention: rows must be sorted by start and disjoint \
             (row {i} starts at token {}, before the previous row ends at {end})",
            r.start
        );
        end = r.start + r.len;
        assert!(
            r.prefix.len() % width.max(1) == 0 && dims.layer < dims.layers,
            "attention: deep prompt shape"
        );
    }
    if rows.is_empty() {
        return;
    }
    let out = SharedOut(out.as_mut_ptr());
    // Heads a multiple of 16 wide (MiniLM's 32, BERT-base's 64) run on the
    // register-blocked AVX-512 or AVX2 item (`attend_wide`).
    #[cfg(target_arch = "x86_64")]
    let wide = Some(Simd::current()).filter(|_| (h / dims.heads).is_multiple_of(16));
    // Enough items for about 4 per thread, but whole rows when there are.
    let groups = (4 * rayon::current_num_threads())
        .div_ceil(rows.len())
        .clamp(1, dims.heads);
    (0..rows.len() * groups).into_par_iter().for_each(|item| {
        let (r, g) = (item / groups, item % groups);
        let heads = g * dims.heads / groups..(g + 1) * dims.heads / groups;
        let item = Item {
            out,
            qkv,
            bias,
            row: &rows[r],
            heads,
            dims,
        };
        SCRATCH.with(|s| {
            let s = &mut s.borrow_mut();
            #[cfg(target_arch = "x86_64")]
            match wide {
                Some(Simd::Avx512) => {
                    // SAFETY: `wide` is `Simd::current()`, which never
                    // exceeds what the CPU has (here AVX-512, the features
                    // `attend512` is compiled for); the head width is a
                    // multiple of 16 and `out`'s blocks of this row and
                    // heads are this item's (checked above).
                    return unsafe { attend_wide::attend512(s, item) };
                }
                Some(Simd::Avx2) => {
                    // SAFETY: as above, with AVX2 and FMA for `attend256`.
                    return unsafe { attend_wide::attend256(s, item) };
                }
                _ => {}
            }
            attend(s, item);
        });
    });
}

dispatch! {
    fn attend(scratch: &mut Vec<f32>, item: Item<'_>) => attend_impl;
}

/// One work item of [`attention`]: heads `heads` of one row, what they read
/// and where they write. Carried whole through the item's entry points (the
/// generic and wide builds, [`fill`]) so that they share one parameter list.
struct Item<'a> {
    out: SharedOut,
    qkv: &'a [f32],
    bias: &'a [f32],
    row: &'a AttnRow<'a>,
    heads: std::ops::Range<usize>,
    dims: AttnDims,
}

/// Where one (row, heads) item of [`attention`] keeps its operands in its
/// thread's scratch, per head of the group: queries `[S↑mr, d]`, keys
/// transposed `[d, T↑LANES]`, values `[T, d↑LANES]` (T = prefix + S keys);
/// then one scores buffer `[S↑mr, T↑LANES]` reused by every head. The
/// padding lets the micro-kernels run without tails.
#[derive(Clone, Copy)]
struct Layout {
    /// Head width.
    d: usize,
    /// Positions of the row; deep prompt positions; keys (`p + s`).
    s: usize,
    p: usize,
    t: usize,
    /// `s`, `t` and `d` rounded up for the micro-kernels.
    sp: usize,
    tp: usize,
    dp: usize,
    /// Floats of the queries and of the transposed keys of one head, and of
    /// all three.
    qn: usize,
    kn: usize,
    per_head: usize,
}

impl Layout {
    /// `None` when the item has nothing to compute. `mr`: the query rows of
    /// the micro-kernel.
    #[inline(always)]
    fn new(row: &AttnRow<'_>, dims: AttnDims, heads: usize, mr: usize) -> Option<Layout> {
        let d = dims.hidden / dims.heads;
        let s = row.len;
        if s == 0 || heads == 0 {
            return None;
        }
        let p = row.prefix.len() / (dims.layers * 2 * dims.hidden);
        let t = p + s;
        let (sp, tp, dp) = (
            s.next_multiple_of(mr),
            t.next_multiple_of(LANES),
            d.next_multiple_of(LANES),
        );
        let (qn, kn) = (sp * d, d * tp);
        Some(Layout {
            d,
            s,
            p,
            t,
            sp,
            tp,
            dp,
            qn,
            kn,
            per_head: qn + kn + t * dp,
        })
    }
}

/// Fills an item's scratch as [`Layout`] describes (queries with their bias
/// and scale, keys and values with theirs, the deep prompt's keys and values
/// before the row's own, padding zeroed) for `mr` query rows per
/// micro-kernel step, and returns the layout, the per-head buffers and the
/// scores buffer (`None`: the item has nothing to compute). `K` writes the
/// keys transposed.
///
/// # Safety
/// The CPU has the instructions `K` uses.
#[inline(always)]
unsafe fn fill<'s, K: Keys>(
    scratch: &'s mut Vec<f32>,
    item: &Item<'_>,
    mr: usize,
) -> Option<(Layout, &'s mut [f32], &'s mut [f32])> {
    let Item {
        qkv,
        bias,
        row,
        ref heads,
        dims,
        ..
    } = *item;
    let lay = Layout::new(row, dims, heads.len(), mr)?;
    let h = dims.hidden;
    let w3 = 3 * h;
    let width = dims.layers * 2 * h;
    let Layout {
        d,
        s,
        p,
        t,
        tp,
        dp,
        qn,
        kn,
        per_head,
        sp,
    } = lay;
    let g = heads.len();
    // No clearing: every value read is written below first, padding included.
    scratch.resize(g * per_head + sp * tp, 0.0);
    let (bufs, sc) = scratch.split_at_mut(g * per_head);
    let (col0, cols) = (heads.start * d, g * d);

    // Clear the padding: query rows S.., key columns T.., value columns d...
    for hb in bufs.chunks_exact_mut(per_head) {
        let (q, rest) = hb.split_at_mut(qn);
        let (kt, v) = rest.split_at_mut(kn);
        q[s * d..].fill(0.0);
        for e in 0..d {
            kt[e * tp + t..(e + 1) * tp].fill(0.0);
        }
        if dp > d {
            for j in 0..t {
                v[j * dp + d..(j + 1) * dp].fill(0.0);
            }
        }
    }
    // The row's own tokens: one pass over its contiguous qkv rows, the
    // group's columns of q, k and v, bias added, queries scaled.
    let (qb, kb, vb) = (
        &bias[col0..][..cols],
        &bias[h + col0..][..cols],
        &bias[2 * h + col0..][..cols],
    );
    for i in 0..s {
        let src = &qkv[(row.start + i) * w3..][..w3];
        let (sq, sv) = (&src[col0..][..cols], &src[2 * h + col0..][..cols]);
        for (k, hb) in bufs.chunks_exact_mut(per_head).enumerate() {
            let (q, rest) = hb.split_at_mut(qn);
            let v = &mut rest[kn..];
            let c = k * d..(k + 1) * d;
            for ((o, &x), &b) in q[i * d..][..d]
                .iter_mut()
                .zip(&sq[c.clone()])
                .zip(&qb[c.clone()])
            {
                *o = (x + b) * dims.scale;
            }
            for ((o, &x), &b) in v[(p + i) * dp..][..d]
                .iter_mut()
                .zip(&sv[c.clone()])
                .zip(&vb[c])
            {
                *o = x + b;
            }
        }
    }
    // Keys, transposed, per head: the deep prompt's (element [j, ((2l +
    // kv)·heads + head)·d + e], used as is) at 0..p, the row's (bias added)
    // at p..t.
    for (k, hb) in bufs.chunks_exact_mut(per_head).enumerate() {
        let head = heads.start + k;
        let (kt, v) = hb[qn..].split_at_mut(kn);
        let c = col0 + k * d;
        let rows = KeyRows {
            src: &qkv[row.start * w3 + h + c..],
            stride: w3,
            n: s,
            d,
            bias: Some(&kb[k * d..][..d]),
        };
        // SAFETY: the CPU has K's instructions (the caller's contract).
        unsafe { K::put(kt, tp, p, rows) };
        if p > 0 {
            let kcol = (2 * dims.layer * dims.heads + head) * d;
            let vcol = ((2 * dims.layer + 1) * dims.heads + head) * d;
            let rows = KeyRows {
                src: &row.prefix[kcol..],
                stride: width,
                n: p,
                d,
                bias: None,
            };
            // SAFETY: as above.
            unsafe { K::put(kt, tp, 0, rows) };
            for j in 0..p {
                v[j * dp..][..d].copy_from_slice(&row.prefix[j * width + vcol..][..d]);
            }
        }
    }
    Some((lay, bufs, sc))
}

/// `n` keys of one head as they come: key `i`'s `d` elements at
/// `src[i·stride..]`, plus `bias` (`None`: nothing added).
#[derive(Clone, Copy)]
struct KeyRows<'a> {
    src: &'a [f32],
    stride: usize,
    n: usize,
    d: usize,
    bias: Option<&'a [f32]>,
}

/// How [`fill`] writes one head's keys transposed:
/// `kt[e·tp + j0 + i] = src[i·stride + e] + bias[e]` for `i < n`, `e < d`.
trait Keys {
    /// # Safety
    /// The CPU has the implementation's instructions. (Bounds are checked.)
    unsafe fn put(kt: &mut [f32], tp: usize, j0: usize, rows: KeyRows<'_>);
}

/// [`Keys`] one float at a time: any CPU, any head width.
struct ScalarKeys;

impl Keys for ScalarKeys {
    #[inline(always)]
    unsafe fn put(kt: &mut [f32], tp: usize, j0: usize, rows: KeyRows<'_>) {
        for i in 0..rows.n {
            let x = &rows.src[i * rows.stride..][..rows.d];
            for (e, &x) in x.iter().enumerate() {
                kt[e * tp + j0 + i] = x + rows.bias.map_or(0.0, |b| b[e]);
            }
        }
    }
}

/// One (row, heads) item of [`attention`] on the `MR × LANES` micro-kernel
/// ([`Arith::block`]), scratch as in [`Layout`].
#[inline(always)]
fn attend_impl<F: Arith>(scratch: &mut Vec<f32>, item: Item<'_>) {
    let Item {
        out,
        row,
        ref heads,
        dims,
        ..
    } = item;
    let h = dims.hidden;
    // SAFETY: `ScalarKeys` uses no particular instructions.
    let filled = unsafe { fill::<ScalarKeys>(scratch, &item, MR) };
    let Some((lay, bufs, sc)) = filled else {
        return;
    };
    let Layout {
        d,
        s,
        t,
        sp,
        tp,
        dp,
        qn,
        kn,
        per_head,
        ..
    } = lay;
    let out = out.ptr();
    for (k, hb) in bufs.chunks_exact(per_head).enumerate() {
        let (q, rest) = hb.split_at(qn);
        let (kt, v) = rest.split_at(kn);
        // scores = q · kᵀ, MR rows × LANES keys per step.
        for i0 in (0..sp).step_by(MR) {
            let qr: [&[f32]; MR] = std::array::from_fn(|r| &q[(i0 + r) * d..][..d]);
            for j0 in (0..tp).step_by(LANES) {
                let acc = F::block(qr, &kt[j0..], tp);
                for (r, a) in acc.iter().enumerate() {
                    sc[(i0 + r) * tp + j0..][..LANES].copy_from_slice(a);
                }
            }
        }
        for i in 0..s {
            softmax_row::<F>(&mut sc[i * tp..][..t]);
        }
        // context = probs · v, MR rows × LANES columns per step; only the
        // real rows and head columns are written out. Padding query rows
        // have all-zero scores left unnormalized: they are never written.
        let col = (heads.start + k) * d;
        for i0 in (0..sp).step_by(MR) {
            let pr: [&[f32]; MR] = std::array::from_fn(|r| &sc[(i0 + r) * tp..][..t]);
            for c0 in (0..dp).step_by(LANES) {
                let acc = F::block(pr, &v[c0..], dp);
                let w = LANES.min(d - c0);
                for (r, a) in acc.iter().enumerate().take(s.saturating_sub(i0)) {
                    let at = (row.start + i0 + r) * h + col + c0;
                    // SAFETY: i0 + r < s and col + c0 + w ≤ col + d ≤
                    // hidden, so `at + w` ≤ (start + s)·hidden ≤ N·hidden =
                    // out's length (checked in `attention`); `a` is a local
                    // array, not part of out. This (row, head) block is
                    // written by no other work item: rows are disjoint
                    // (checked in `attention`) and the head groups of one
                    // row partition its heads.
                    unsafe { std::ptr::copy_nonoverlapping(a.as_ptr(), out.add(at), w) };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod attend_wide;
pub mod int8;
pub mod packed;
pub mod train;
pub mod varlen;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{D, Device, Tensor};

    /// Deterministic values in [-1, 1) (a small LCG), for the kernel tests.
    pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn vec(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Runs `f` once per kernel build this CPU has (AVX-512, AVX2+FMA, the
    /// baseline), each with every kernel capped to it; tests that do so
    /// take turns (the cap is process-wide: other tests meanwhile run
    /// on some build, each correct). A build the CPU lacks is reported.
    pub(crate) fn at_every_simd_level(f: impl Fn()) {
        static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let detected = Simd::detected();
        for level in [Simd::Avx512, Simd::Avx2, Simd::Plain] {
            if level > detected {
                eprintln!("kernel build {level:?}: not tested, this CPU lacks it");
                continue;
            }
            Simd::cap(level);
            assert_eq!(Simd::current(), level);
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&f));
            Simd::cap(Simd::Avx512);
            if let Err(e) = ok {
                eprintln!("failed on kernel build {level:?}");
                std::panic::resume_unwind(e);
            }
        }
    }

    /// Runs `f` on both builds of the kernels (where this CPU has AVX2+FMA).
    fn both(x: &[f32], f: fn(&mut [f32]), plain: fn(&mut [f32])) -> [Vec<f32>; 2] {
        let mut a = x.to_vec();
        f(&mut a);
        let mut b = x.to_vec();
        plain(&mut b);
        [a, b]
    }

    fn exp_plain(x: &mut [f32]) {
        exp_slice_impl::<Plain>(x)
    }

    fn erf_plain(x: &mut [f32]) {
        erf_slice_impl::<Plain>(x)
    }

    fn softmax_plain(x: &mut [f32]) {
        softmax_row::<Plain>(x)
    }

    dispatch! {
        fn softmax_in_place(x: &mut [f32]) => softmax_row;
    }

    /// erf in f64 by Simpson's rule on 2/√π·e^(−t²): error ~1e-13, far below
    /// what the f32 kernel is tested to.
    fn erf_f64(x: f64) -> f64 {
        let n = 20_000;
        let hs = x / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(0.0) + f(x);
        for i in 1..n {
            s += f(i as f64 * hs) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * hs / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn exp_matches_f64_to_a_few_ulp() {
        at_every_simd_level(|| {
            // Dense over the range where e^x is a normal f32, plus the edges.
            let mut x: Vec<f32> = (0..200_001)
                .map(|i| -87.3 + i as f32 * (88.3 + 87.3) / 200_000.0)
                .collect();
            x.extend([
                0.0,
                -0.0,
                1e-30,
                -1e-30,
                0.5,
                -0.5,
                0.346_573_6,
                -0.346_573_6,
                88.3,
                -87.3,
            ]);
            for out in both(&x, exp_in_place, exp_plain) {
                let mut worst = 0f64;
                for (&x, &y) in x.iter().zip(&out) {
                    let want = (x as f64).exp();
                    worst = worst.max(((y as f64 - want) / want).abs());
                }
                assert!(worst < 2.5e-7, "exp: max relative error {worst:e}");
                assert_eq!(out[200_001], 1.0, "exp(0) is exactly 1");
            }
            // Masks and underflow give exactly 0, never NaN; overflow saturates.
            let edge = [f32::MIN, f32::NEG_INFINITY, -1e30, -88.0, -100.0, -87.4];
            for out in both(&edge, exp_in_place, exp_plain) {
                assert!(out.iter().all(|&v| v == 0.0), "{out:?}");
            }
            for out in both(&[f32::MAX, f32::INFINITY, 100.0], exp_in_place, exp_plain) {
                assert!(out.iter().all(|&v| v.is_finite() && v > 2e38), "{out:?}");
            }
        });
    }

    #[test]
    fn erf_and_gelu_match_f64() {
        at_every_simd_level(|| {
            let x: Vec<f32> = (0..4_001)
                .map(|i| -8.0 + i as f32 * 16.0 / 4_000.0)
                .collect();
            // Absolute error: A&S 7.1.26 is 1 − (…)·e^(−x²), which cancels near 0
            // (relative error there is large, but GELU adds 1 to erf anyway).
            for out in both(&x, erf_in_place, erf_plain) {
                let worst = x
                    .iter()
                    .zip(&out)
                    .map(|(&x, &y)| (y as f64 - erf_f64(x as f64)).abs())
                    .fold(0.0, f64::max);
                assert!(worst < 6e-7, "erf: max |error| {worst:e}");
            }
            // GELU through the fused kernel, with a bias, against f64.
            let bias = [0.25f32, -0.5, 0.0, 1.0];
            let mut g: Vec<f32> = x.iter().take(4_000).copied().collect();
            bias_gelu(&mut g, &bias);
            for (i, (&x, &y)) in x.iter().zip(&g).enumerate() {
                let v = (x + bias[i % 4]) as f64;
                let want = 0.5 * v * (1.0 + erf_f64(v / std::f64::consts::SQRT_2));
                assert!(
                    (y as f64 - want).abs() < 1e-6 * (1.0 + v.abs()),
                    "gelu({v}) = {y}, want {want}"
                );
            }
            let mut huge = vec![f32::MAX, f32::MIN, 1e20, -1e20];
            erf_in_place(&mut huge);
            assert_eq!(huge, [1.0, -1.0, 1.0, -1.0]);
        });
    }

    #[test]
    fn softmax_matches_f64() {
        at_every_simd_level(|| {
            let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 30.0).collect();
            let want: Vec<f64> = {
                let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
                let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.iter().map(|v| v / s).collect()
            };
            for f in [softmax_in_place, softmax_plain] {
                let mut r = row.clone();
                f(&mut r);
                for (a, b) in r.iter().zip(&want) {
                    assert!((*a as f64 - b).abs() < 1e-6 * b + 1e-12, "{a} vs {b}");
                }
            }
            row.truncate(1);
            softmax_row::<Plain>(&mut row);
            assert_eq!(row, [1.0]);
        });
    }

    #[test]
    fn bias_gelu_and_residual_norm_match_candle_ops() {
        at_every_simd_level(|| {
            let dev = Device::Cpu;
            let x = Tensor::randn(0f32, 3.0, (37, 24), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, 24, &dev).unwrap();
            let want = x.broadcast_add(&b).unwrap().gelu_erf().unwrap();
            let mut got = vec(&x);
            bias_gelu(&mut got, &vec(&b));
            assert!(max_diff(&got, &vec(&want)) <= 1e-6);

            let r = Tensor::randn(0f32, 1.0, (37, 24), &dev).unwrap();
            let g = Tensor::randn(1f32, 0.2, 24, &dev).unwrap();
            let beta = Tensor::randn(0f32, 0.2, 24, &dev).unwrap();
            let sum = x.broadcast_add(&b).unwrap().add(&r).unwrap();
            let want = candle_nn::ops::layer_norm(&sum, &g, &beta, 1e-12).unwrap();
            let mut got = vec![0f32; 37 * 24];
            let (bv, gv, betav) = (vec(&b), vec(&g), vec(&beta));
            residual_norm(
                &mut got,
                &vec(&x),
                &vec(&r),
                NormParams {
                    bias: &bv,
                    gamma: &gv,
                    beta: &betav,
                    eps: 1e-12,
                },
            );
            assert!(max_diff(&got, &vec(&want)) <= 1e-5);

            // embed: the sum of three gathered rows, then layer norm.
            let (xv, rv) = (vec(&x), vec(&r));
            let tokens: Vec<EmbedToken> = (0..37)
                .map(|k| EmbedToken {
                    input: &xv[k * 24..][..24],
                    token_type: &rv[k * 24..][..24],
                    position: &bv,
                })
                .collect();
            let mut got = vec![0f32; 37 * 24];
            embed(&mut got, &tokens, &gv, &betav, 1e-12);
            let want = candle_nn::ops::layer_norm(
                &(x.add(&r).unwrap().broadcast_add(&b).unwrap()),
                &g,
                &beta,
                1e-12,
            )
            .unwrap();
            assert!(max_diff(&got, &vec(&want)) <= 1e-5);

            // Splits: columns for few rows, rows for many, never below 64 × 96.
            assert_eq!(matmul_blocks(64, 1536, 2), (1, 2));
            assert_eq!(matmul_blocks(2688, 1152, 2), (2, 1));
            assert_eq!(matmul_blocks(24, 40, 2), (1, 1));
            assert_eq!(matmul_blocks(2688, 1536, 16), (4, 4));
            // matmul_wt is candle's x · wᵀ, also when split over threads.
            for (m, n, k) in [(37, 40, 24), (300, 1000, 64), (130, 200, 33)] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
                let want = x.matmul(&w.t().unwrap()).unwrap();
                let mut got = vec![f32::NAN; m * n];
                matmul_wt(&mut got, &vec(&x), &vec(&w), k);
                assert!(max_diff(&got, &vec(&want)) <= 1e-4, "{m}x{n}x{k}");
            }
        });
    }

    /// Attention over packed rows of different lengths, one with a deep
    /// prefix, against the padded, masked candle formulation.
    #[test]
    fn attention_matches_padded_masked_candle_ops() {
        // Head widths: 24 (not a multiple of the lanes: the generic item on
        // every build), 32 and 48 (`attend_wide`'s AVX-512 and AVX2 items,
        // one and two column blocks); 2 layers.
        at_every_simd_level(|| {
            for (heads, d) in [(3, 24), (2, 32), (2, 48)] {
                let dev = Device::Cpu;
                let layers = 2;
                let h = heads * d;
                let lens = [5usize, 1, 19, 37, 2, 3, 4, 5, 6];
                let prefix_lens = [0usize, 3, 0, 17, 0, 1, 0, 2, 0];
                let n: usize = lens.iter().sum();
                let qkv = vec(&Tensor::randn(0f32, 1.0, (n, 3 * h), &dev).unwrap());
                let bias = vec(&Tensor::randn(0f32, 1.0, 3 * h, &dev).unwrap());
                let prefixes: Vec<Vec<f32>> = prefix_lens
                    .iter()
                    .map(|&p| {
                        vec(&Tensor::randn(0f32, 1.0, (p.max(1), layers * 2 * h), &dev).unwrap())
                            [..p * layers * 2 * h]
                            .to_vec()
                    })
                    .collect();
                let mut rows = Vec::new();
                let mut start = 0;
                for (i, &len) in lens.iter().enumerate() {
                    rows.push(AttnRow {
                        start,
                        len,
                        prefix: &prefixes[i],
                    });
                    start += len;
                }
                let scale = 1.0 / (d as f32).sqrt();
                for layer in 0..layers {
                    let dims = AttnDims {
                        hidden: h,
                        heads,
                        layers,
                        layer,
                        scale,
                    };
                    let mut got = vec![f32::NAN; n * h];
                    attention(&mut got, &qkv, &bias, &rows, dims);
                    // Reference: per row, candle ops over [heads, S, d] with the prefix concatenated.
                    let qkv_t = Tensor::from_vec(qkv.clone(), (n, 3 * h), &dev).unwrap();
                    let bias_t = Tensor::from_vec(bias.clone(), 3 * h, &dev).unwrap();
                    let full = qkv_t.broadcast_add(&bias_t).unwrap();
                    for (i, r) in rows.iter().enumerate() {
                        let x = full.narrow(0, r.start, r.len).unwrap();
                        let split = |k: usize| {
                            x.narrow(1, k * h, h)
                                .unwrap()
                                .reshape((r.len, heads, d))
                                .unwrap()
                                .transpose(0, 1)
                                .unwrap()
                        };
                        let q = (split(0) * scale as f64).unwrap();
                        let (mut k, mut v) = (split(1), split(2));
                        let p = prefix_lens[i];
                        if p > 0 {
                            let pre = Tensor::from_vec(
                                prefixes[i].clone(),
                                (p, layers * 2, heads, d),
                                &dev,
                            )
                            .unwrap();
                            let pk = pre
                                .get_on_dim(1, 2 * layer)
                                .unwrap()
                                .transpose(0, 1)
                                .unwrap();
                            let pv = pre
                                .get_on_dim(1, 2 * layer + 1)
                                .unwrap()
                                .transpose(0, 1)
                                .unwrap();
                            k = Tensor::cat(&[&pk, &k], 1).unwrap();
                            v = Tensor::cat(&[&pv, &v], 1).unwrap();
                        }
                        let scores = q
                            .contiguous()
                            .unwrap()
                            .matmul(&k.t().unwrap().contiguous().unwrap())
                            .unwrap();
                        let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
                        let ctx = probs.matmul(&v.contiguous().unwrap()).unwrap();
                        let want = vec(&ctx.transpose(0, 1).unwrap().reshape((r.len, h)).unwrap());
                        let got = &got[r.start * h..(r.start + r.len) * h];
                        let diff = max_diff(got, &want);
                        assert!(diff <= 2e-6, "d {d} row {i} layer {layer}: max |Δ| {diff}");
                    }
                    // A row alone (its heads split over work items) gives the same bits.
                    let mut alone = vec![f32::NAN; n * h];
                    let one = [rows[3]];
                    attention(&mut alone, &qkv, &bias, &one, dims);
                    let span = rows[3].start * h..(rows[3].start + rows[3].len) * h;
                    assert_eq!(alone[span.clone()], got[span]);
                }
            }
        });
    }

    /// Runs attention over a batch of `n` tokens (2 heads of 4) with rows
    /// `(start, len)` and no deep prompts: for the row checks below.
    fn attention_over(n: usize, spans: &[(usize, usize)]) {
        let (heads, d) = (2, 4);
        let h = heads * d;
        let mut out = vec![0f32; n * h];
        let qkv = vec![0.5f32; n * 3 * h];
        let bias = vec![0f32; 3 * h];
        let rows: Vec<AttnRow> = spans
            .iter()
            .map(|&(start, len)| AttnRow {
                start,
                len,
                prefix: &[],
            })
            .collect();
        let dims = AttnDims {
            hidden: h,
            heads,
            layers: 1,
            layer: 0,
            scale: 0.5,
        };
        attention(&mut out, &qkv, &bias, &rows, dims);
    }

    /// Rows that overlap would be written by two threads at once: refused.
    #[test]
    #[should_panic(expected = "attention: rows must be sorted by start and disjoint")]
    fn attention_refuses_overlapping_rows() {
        attention_over(6, &[(0, 4), (3, 3)]);
    }

    /// Rows out of order are refused too (the check compares neighbours).
    #[test]
    #[should_panic(expected = "attention: rows must be sorted by start and disjoint")]
    fn attention_refuses_unsorted_rows() {
        attention_over(6, &[(3, 3), (0, 3)]);
    }

    /// A row whose end overflows `usize` is outside the batch, not a wrap
    /// around to its start.
    #[test]
    #[should_panic(expected = "attention: row outside the batch")]
    fn attention_refuses_rows_past_the_batch() {
        attention_over(2, &[(usize::MAX, 2)]);
    }
}
