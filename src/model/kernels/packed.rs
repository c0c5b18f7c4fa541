//! f32 linear layers with weights packed once at load (`serve` on the CPU).
//!
//! Why our own kernel rather than the `gemm` crate that candle uses: gemm
//! packs both operands on every call. For the weights that is the same
//! work every forward: 43 MB of MiniLM weights rewritten per batch, which a
//! batch of a few dozen rows (one request, a one-task batch) cannot
//! amortize. gemm has no entry point that takes a pre-packed operand, so
//! the packing and the micro-kernel that reads it are here.
//!
//! Layout: panels of [`PANEL`] = 32 output channels (two 512-bit
//! registers), `[n/32][k][32]`, zero channels padding the last panel, the
//! buffer aligned to 64 bytes so that every panel row is two whole cache
//! lines. A tile is up to 12 rows × 32 channels on AVX-512 (24 of its 32
//! registers accumulate) and 6 × 32 elsewhere (AVX2 has 16 registers), over
//! the whole inner dimension, the rows' inputs broadcast straight from the
//! row-major activations (no packing of those: they are read once per panel
//! from L1/L2).
//!
//! Kernels (chosen by [`Simd::current`], so `SOFTPROMPT_SIMD` caps them
//! like the fused kernels): AVX-512F (12 × 32, FMA), AVX2+FMA (6 × 16 twice
//! over the panel's halves) and plain Rust for other CPUs. They sum in the
//! same order over k but differ in rounding (FMA or not), so they agree to
//! f32 accuracy, not bit for bit; the tests hold each to an f64 reference.

use rayon::prelude::*;

use super::{SharedOut, Simd, matmul_blocks, pool_threads};

/// Output channels per packed panel.
const PANEL: usize = 32;
/// Rows per tile, at most (the AVX-512 tile's; see [`tile_rows`]).
const MR: usize = 12;
/// Rows per tile of the AVX2 and plain kernels.
const AVX2_ROWS: usize = 6;
/// Rows of a work block: its activations (rows × k floats) stay in L2 while
/// the block's panels pass over them.
const ROW_BLOCK: usize = 96;
/// Floats per 64-byte cache line (the packed buffer's alignment).
const LINE: usize = 16;

/// A `[n, k]` f32 weight (stored `[out, in]`, as in the checkpoint) packed
/// for [`pmatmul_wt`].
pub struct PackedWeight {
    n: usize,
    k: usize,
    /// `[n/32][k][32]` starting at `start`; `n` rounded up to [`PANEL`]
    /// with zero channels.
    buf: Vec<f32>,
    /// Where the packed values start in `buf`: the first 64-byte boundary.
    start: usize,
}

impl PackedWeight {
    /// Packs `w` (`[n, k]` row-major).
    pub fn pack(w: &[f32], k: usize) -> PackedWeight {
        assert!(
            k > 0 && w.len().is_multiple_of(k),
            "PackedWeight: {} values are not rows of {k}",
            w.len()
        );
        let n = w.len() / k;
        let panels = n.div_ceil(PANEL);
        let len = panels * PANEL * k;
        // A Vec<f32> is only 4-byte aligned: over-allocate one line and start
        // at the first 64-byte boundary inside it.
        let mut buf = vec![0f32; len + LINE];
        let start = buf.as_ptr().align_offset(64).min(LINE);
        let packed = &mut buf[start..start + len];
        for (c, row) in w.chunks_exact(k).enumerate() {
            let (p, j) = (c / PANEL, c % PANEL);
            for (i, &v) in row.iter().enumerate() {
                packed[(p * k + i) * PANEL + j] = v;
            }
        }
        PackedWeight { n, k, buf, start }
    }

    /// Output channels.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Inputs.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * self.buf.len()
    }

    /// Panel `p`: `[k][32]`.
    fn panel(&self, p: usize) -> &[f32] {
        let len = PANEL * self.k;
        &self.buf[self.start + p * len..][..len]
    }
}

/// `out[m, n] ← x[m, k] · wᵀ`, the product [`super::matmul_wt`] computes
/// with the unpacked weight, split over threads in (rows × channels) blocks
/// the same way.
pub fn pmatmul_wt(out: &mut [f32], x: &[f32], w: &PackedWeight) {
    pmatmul_with(Simd::current(), out, x, w);
}

/// [`pmatmul_wt`] with a given kernel (tests and benchmarks; one the CPU
/// lacks falls back to the best it has).
pub fn pmatmul_with(simd: Simd, out: &mut [f32], x: &[f32], w: &PackedWeight) {
    let (n, k) = (w.n, w.k);
    assert!(
        x.len().is_multiple_of(k) && out.len() == x.len() / k * n,
        "pmatmul: {} inputs of {k} and {} outputs of {n} disagree",
        x.len(),
        out.len()
    );
    let simd = simd.min(Simd::detected());
    let m = x.len() / k;
    if m == 0 || n == 0 {
        return;
    }
    let panels = n.div_ceil(PANEL);
    let threads = pool_threads();
    let (pm, pn) = matmul_blocks(m, n, threads);
    let pn = pn.min(panels);
    let dst = SharedOut(out.as_mut_ptr());
    let tr = tile_rows(simd);
    let run = |item: usize| {
        let (bi, bj) = (item / pn, item % pn);
        let rows = (bi * m / pm)..((bi + 1) * m / pm);
        let cols = (bj * panels / pn)..((bj + 1) * panels / pn);
        for r0 in rows.clone().step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(rows.end);
            for p in cols.clone() {
                let mut r = r0;
                // The first tile of each panel fetches the next one (see
                // `tile`).
                let next = (p + 1 < cols.end).then(|| w.panel(p + 1));
                while r < r1 {
                    let mr = tr.min(r1 - r);
                    if simd == Simd::Avx512 {
                        prefetch_out(dst, (r..r + mr).map(|i| i * n + p * PANEL));
                    }
                    let mut acc = [0f32; MR * PANEL];
                    let ahead = if r == r0 { next } else { None };
                    tile(
                        simd,
                        &x[r * k..(r + mr) * k],
                        mr,
                        w.panel(p),
                        ahead,
                        k,
                        &mut acc,
                    );
                    let (c0, width) = (p * PANEL, PANEL.min(n - p * PANEL));
                    for (i, row) in acc.chunks_exact(PANEL).take(mr).enumerate() {
                        // SAFETY: row r + i < m and channels c0..c0 + width
                        // ≤ n lie in this work item's (rows × channels)
                        // block, which no other item writes; out holds m·n
                        // values (checked above).
                        let o = unsafe {
                            std::slice::from_raw_parts_mut(dst.ptr().add((r + i) * n + c0), width)
                        };
                        o.copy_from_slice(&row[..width]);
                    }
                    r += mr;
                }
            }
        }
    };
    if pm * pn == 1 {
        run(0);
    } else {
        (0..pm * pn).into_par_iter().for_each(run);
    }
}

/// Rows one tile of `simd`'s kernel covers. AVX-512 has 32 registers: 12
/// rows × 2 registers of accumulators, the panel row's two registers and a
/// broadcast. Twelve rather than six halves how often each panel row (128
/// bytes, from L2 for most shapes) is read per FMA: 10–20% faster for
/// most shapes at 64, 256 and 1,736 rows on an AVX-512 Xeon (2 threads,
/// the two alternated in one process; bench/README.md). AVX2 (16
/// registers) fits [`AVX2_ROWS`] = 6 rows × 2 × 256 bits.
fn tile_rows(simd: Simd) -> usize {
    match simd {
        Simd::Avx512 => MR,
        _ => AVX2_ROWS,
    }
}

/// Asks for the cache lines of the tile's output (two per row, at the given
/// offsets into `dst`) with intent to write, before the tile runs. At a
/// thousand rows and more the output (~8 MB for the QKV layer) is not in
/// cache, and without this each tile ended in 24 stores that missed at
/// once; with k = 384 inputs (a tile of ~1.5 µs) that cost 2–15% at 1,736
/// rows on an AVX-512 Xeon (the two alternated in one process; not
/// measured on an AVX2-only CPU, so only the AVX-512 path asks).
fn prefetch_out(dst: SharedOut, at: impl Iterator<Item = usize>) {
    #[cfg(target_arch = "x86_64")]
    for o in at {
        use std::arch::x86_64::{_MM_HINT_ET0, _mm_prefetch};
        // SAFETY: a prefetch is a hint that never faults, whatever the
        // address; `wrapping_add` computes it without claiming it is in
        // bounds (the first line is the tile's own output; the second may
        // run past a narrow last panel, harmlessly).
        unsafe {
            let p = dst.ptr().wrapping_add(o) as *const i8;
            _mm_prefetch::<_MM_HINT_ET0>(p);
            _mm_prefetch::<_MM_HINT_ET0>(p.wrapping_add(64));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (dst, at);
}

/// `acc[r][c] = Σₖ a[r][k] · panel[k][c]` for `rows` ≤ [`tile_rows`] rows
/// of `a` (`[rows, k]`) and one panel (`[k, 32]`); with `ahead` (a panel
/// of the same size), the SIMD kernels also ask for its lines, into L2, as
/// they read the same lines of `panel`.
///
/// Why: a forward reads every weight once per batch (43 MB for MiniLM),
/// from L3 or memory, and at a few dozen rows a panel serves only a few
/// tiles, so the first tile of each panel waited on those loads; the
/// hardware prefetcher does not run far enough ahead on its own. With the
/// next panel asked for during the first tile of this one, a MiniLM
/// forward's 24 products (six layers' weights, cycled; each binary run
/// between two runs of the other, six times) took 8–31% less time at 12
/// rows, 1–23% at 40 and −5 to +10% at 256 on the AVX-512 kernel, and
/// 16–25%, 10–15% and 2–15% on the AVX2 kernel (the same AVX-512 Xeon, 2
/// threads; not measured on an AVX2-only CPU). That first tile runs its
/// loop without the four-fold unroll: with the prefetches inside the
/// unrolled loop LLVM spilled the 12-row tile's accumulators, which cost
/// more than the prefetch gained when the host was fast.
fn tile(
    simd: Simd,
    a: &[f32],
    rows: usize,
    panel: &[f32],
    ahead: Option<&[f32]>,
    k: usize,
    acc: &mut [f32; MR * PANEL],
) {
    assert!(
        (1..=tile_rows(simd)).contains(&rows) && a.len() == rows * k && panel.len() == PANEL * k,
        "packed tile: sizes disagree"
    );
    match simd {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => {
            // SAFETY: `pmatmul_with` caps `simd` at what the CPU has, so it
            // has AVX-512F; the sizes the kernel reads are checked above.
            unsafe { x86::tile_avx512(a, rows, panel, ahead, k, acc) }
        }
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => {
            // SAFETY: as above, with AVX2 and FMA.
            unsafe { x86::tile_avx2(a, rows, panel, ahead, k, acc) }
        }
        _ => tile_plain(a, rows, panel, k, acc),
    }
}

fn tile_plain(a: &[f32], rows: usize, panel: &[f32], k: usize, acc: &mut [f32; MR * PANEL]) {
    acc.fill(0.0);
    for (r, out) in acc.chunks_exact_mut(PANEL).take(rows).enumerate() {
        for (&v, b) in a[r * k..(r + 1) * k].iter().zip(panel.chunks_exact(PANEL)) {
            for (o, &b) in out.iter_mut().zip(b) {
                *o += v * b;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, PANEL};
    use std::arch::x86_64::*;

    /// `step(i)` for every input `i < k`, four per turn of the loop, as
    /// MLAS's kernels are unrolled: the loop's own counter, compare and
    /// address arithmetic otherwise share the front end with the tile's
    /// FMAs and loads. LLVM does not unroll the tiles' loops by itself.
    /// Measured, each loop against its plain form alternated in one
    /// process: the AVX2 tile 10–25% faster (Zen 3, 1 and 2 threads, 64 and
    /// 1,736 rows), the 12-row AVX-512 tile 3–8% (Xeon, 2 threads, 64 and
    /// 1,736 rows; mixed at 256); bench/README.md.
    #[inline(always)]
    fn by_fours(k: usize, mut step: impl FnMut(usize)) {
        let mut i = 0;
        while i + 4 <= k {
            step(i);
            step(i + 1);
            step(i + 2);
            step(i + 3);
            i += 4;
        }
        while i < k {
            step(i);
            i += 1;
        }
    }

    /// [`super::tile`] on 512-bit registers: per input, two loads of the
    /// panel row, one broadcast per row, two FMAs per row; up to 12 rows.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; the sizes must be as [`super::tile`]
    /// checks them.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512(
        a: &[f32],
        rows: usize,
        panel: &[f32],
        ahead: Option<&[f32]>,
        k: usize,
        acc: &mut [f32; MR * PANEL],
    ) {
        match ahead {
            Some(next) => {
                assert_eq!(next.len(), panel.len(), "packed tile: next panel");
                // SAFETY: as this function's caller promised.
                unsafe { tile_avx512_rows::<true>(a, rows, panel, next.as_ptr(), k, acc) }
            }
            // SAFETY: as this function's caller promised.
            None => unsafe { tile_avx512_rows::<false>(a, rows, panel, panel.as_ptr(), k, acc) },
        }
    }

    /// Asks for the two lines of row `i` of the panel at `next` (`PF`:
    /// at all), into L2.
    #[inline(always)]
    fn prefetch_row<const PF: bool>(next: *const f32, i: usize) {
        if PF {
            // SAFETY: a prefetch never faults; `wrapping_add` claims no
            // bounds (the callers pass i < k, inside the next panel).
            unsafe {
                let q = next.wrapping_add(i * PANEL) as *const i8;
                _mm_prefetch::<_MM_HINT_T1>(q);
                _mm_prefetch::<_MM_HINT_T1>(q.wrapping_add(64));
            }
        }
    }

    /// [`tile_avx512`] for a given `PF` (whether to ask for `next`).
    ///
    /// # Safety
    /// As [`tile_avx512`].
    #[inline(always)]
    unsafe fn tile_avx512_rows<const PF: bool>(
        a: &[f32],
        rows: usize,
        panel: &[f32],
        next: *const f32,
        k: usize,
        acc: &mut [f32; MR * PANEL],
    ) {
        // SAFETY: (every arm) as this function's caller promised.
        unsafe {
            match rows {
                12 => tile_avx512_n::<12, PF>(a, panel, next, k, acc),
                11 => tile_avx512_n::<11, PF>(a, panel, next, k, acc),
                10 => tile_avx512_n::<10, PF>(a, panel, next, k, acc),
                9 => tile_avx512_n::<9, PF>(a, panel, next, k, acc),
                8 => tile_avx512_n::<8, PF>(a, panel, next, k, acc),
                7 => tile_avx512_n::<7, PF>(a, panel, next, k, acc),
                6 => tile_avx512_n::<6, PF>(a, panel, next, k, acc),
                5 => tile_avx512_n::<5, PF>(a, panel, next, k, acc),
                4 => tile_avx512_n::<4, PF>(a, panel, next, k, acc),
                3 => tile_avx512_n::<3, PF>(a, panel, next, k, acc),
                2 => tile_avx512_n::<2, PF>(a, panel, next, k, acc),
                1 => tile_avx512_n::<1, PF>(a, panel, next, k, acc),
                _ => unreachable!("packed tile of {rows} rows"),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn tile_avx512_n<const R: usize, const PF: bool>(
        a: &[f32],
        panel: &[f32],
        next: *const f32,
        k: usize,
        acc: &mut [f32; MR * PANEL],
    ) {
        let mut s = [[_mm512_setzero_ps(); 2]; R];
        let (ap, bp) = (a.as_ptr(), panel.as_ptr());
        let step = |s: &mut [[__m512; 2]; R], i: usize| {
            debug_assert!(i < k);
            // SAFETY: the loops below pass only i < k, so i·32 + 32 ≤
            // panel.len() = 32·k and each row's r·k + i < R·k = a.len().
            unsafe {
                let b0 = _mm512_loadu_ps(bp.add(i * PANEL));
                let b1 = _mm512_loadu_ps(bp.add(i * PANEL + 16));
                prefetch_row::<PF>(next, i);
                for (r, s) in s.iter_mut().enumerate() {
                    let v = _mm512_set1_ps(*ap.add(r * k + i));
                    s[0] = _mm512_fmadd_ps(v, b0, s[0]);
                    s[1] = _mm512_fmadd_ps(v, b1, s[1]);
                }
            }
        };
        // Fragile: a variant that loaded the accumulators from memory
        // instead of zeroing them made LLVM hoist the unrolled inputs'
        // broadcasts above the FMAs and spill them to the stack (~45%
        // slower); check the disassembly for zmm spills when changing it.
        if PF {
            // Not unrolled: with the prefetches in the unrolled loop LLVM
            // spilled the 12-row tile's accumulators to the stack (see
            // `super::tile`).
            for i in 0..k {
                step(&mut s, i);
            }
        } else {
            by_fours(k, |i| step(&mut s, i));
        }
        for (r, s) in s.iter().enumerate() {
            // SAFETY: r < R ≤ 12, so r·32 + 32 ≤ acc.len().
            unsafe {
                _mm512_storeu_ps(acc.as_mut_ptr().add(r * PANEL), s[0]);
                _mm512_storeu_ps(acc.as_mut_ptr().add(r * PANEL + 16), s[1]);
            }
        }
    }

    /// [`super::tile`] on 256-bit registers: the panel's two halves of 16
    /// channels in turn, 6 × 16 each (12 accumulators, two loads and one
    /// broadcast per row per input).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; the sizes must be as [`super::tile`]
    /// checks them.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2(
        a: &[f32],
        rows: usize,
        panel: &[f32],
        ahead: Option<&[f32]>,
        k: usize,
        acc: &mut [f32; MR * PANEL],
    ) {
        // The next panel is asked for during the first half only.
        // SAFETY: (both halves) as this function's caller promised.
        unsafe {
            match ahead {
                Some(next) => {
                    assert_eq!(next.len(), panel.len(), "packed tile: next panel");
                    tile_avx2_rows::<true>(a, rows, panel, next.as_ptr(), k, 0, acc)
                }
                None => tile_avx2_rows::<false>(a, rows, panel, panel.as_ptr(), k, 0, acc),
            }
            tile_avx2_rows::<false>(a, rows, panel, panel.as_ptr(), k, 16, acc)
        }
    }

    /// One half of [`tile_avx2`] for a given `PF` (whether to ask for
    /// `next`).
    ///
    /// # Safety
    /// As [`tile_avx2`].
    #[inline(always)]
    unsafe fn tile_avx2_rows<const PF: bool>(
        a: &[f32],
        rows: usize,
        panel: &[f32],
        next: *const f32,
        k: usize,
        half: usize,
        acc: &mut [f32; MR * PANEL],
    ) {
        // SAFETY: (every arm) as this function's caller promised.
        unsafe {
            match rows {
                6 => tile_avx2_n::<6, PF>(a, panel, next, k, half, acc),
                5 => tile_avx2_n::<5, PF>(a, panel, next, k, half, acc),
                4 => tile_avx2_n::<4, PF>(a, panel, next, k, half, acc),
                3 => tile_avx2_n::<3, PF>(a, panel, next, k, half, acc),
                2 => tile_avx2_n::<2, PF>(a, panel, next, k, half, acc),
                1 => tile_avx2_n::<1, PF>(a, panel, next, k, half, acc),
                _ => unreachable!("packed tile of {rows} rows"),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn tile_avx2_n<const R: usize, const PF: bool>(
        a: &[f32],
        panel: &[f32],
        next: *const f32,
        k: usize,
        half: usize,
        acc: &mut [f32; MR * PANEL],
    ) {
        let mut s = [[_mm256_setzero_ps(); 2]; R];
        let (ap, bp) = (a.as_ptr(), panel.as_ptr());
        // One input: two loads of the panel row's half, then per row one
        // broadcast and two FMAs.
        let step = |s: &mut [[__m256; 2]; R], i: usize| {
            debug_assert!(i < k);
            // SAFETY: the loops below pass only i < k, and half + 16 ≤ 32, so
            // the loads end within panel (32·k); each row's r·k + i < R·k =
            // a.len().
            unsafe {
                let b0 = _mm256_loadu_ps(bp.add(i * PANEL + half));
                let b1 = _mm256_loadu_ps(bp.add(i * PANEL + half + 8));
                prefetch_row::<PF>(next, i);
                for (r, s) in s.iter_mut().enumerate() {
                    let v = _mm256_broadcast_ss(&*ap.add(r * k + i));
                    s[0] = _mm256_fmadd_ps(v, b0, s[0]);
                    s[1] = _mm256_fmadd_ps(v, b1, s[1]);
                }
            }
        };
        if PF {
            // Not unrolled: with the prefetches in the unrolled loop LLVM
            // spilled the 12-row tile's accumulators to the stack (see
            // `super::tile`).
            for i in 0..k {
                step(&mut s, i);
            }
        } else {
            by_fours(k, |i| step(&mut s, i));
        }
        for (r, s) in s.iter().enumerate() {
            // SAFETY: r < R ≤ 6 and half + 16 ≤ 32: inside acc.
            unsafe {
                _mm256_storeu_ps(acc.as_mut_ptr().add(r * PANEL + half), s[0]);
                _mm256_storeu_ps(acc.as_mut_ptr().add(r * PANEL + half + 8), s[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::tests::{at_every_simd_level, values};

    /// Every (rows, channels, inputs) edge: rows not a multiple of 6 or of
    /// the row block, channels not a multiple of the panel, one input.
    #[test]
    fn matches_an_f64_reference_at_every_simd_level() {
        at_every_simd_level(|| {
            for (m, n, k) in [
                (1, 1, 1),
                (7, 33, 5),
                (13, 64, 384),
                (97, 40, 17),
                (200, 100, 64),
                (5, 1152, 384),
            ] {
                let x = values(m * k, 1);
                let w = values(n * k, 2);
                let packed = PackedWeight::pack(&w, k);
                let mut got = vec![f32::NAN; m * n];
                pmatmul_wt(&mut got, &x, &packed);
                for r in 0..m {
                    for c in 0..n {
                        let dot: f64 = (0..k)
                            .map(|i| x[r * k + i] as f64 * w[c * k + i] as f64)
                            .sum();
                        let abs: f64 = (0..k)
                            .map(|i| (x[r * k + i] as f64 * w[c * k + i] as f64).abs())
                            .sum();
                        let err = (got[r * n + c] as f64 - dot).abs();
                        // f32 summation of k products: k·ε relative to Σ|products|.
                        assert!(
                            err <= 1e-6 + k as f64 * f32::EPSILON as f64 * abs,
                            "{m}x{n}x{k} at ({r}, {c}): {} vs {dot} ({:?})",
                            got[r * n + c],
                            Simd::current()
                        );
                    }
                }
            }
        });
    }

    #[test]
    fn packing_aligns_panels_to_cache_lines() {
        let w = PackedWeight::pack(&values(40 * 3, 5), 3);
        assert_eq!(w.panel(0).as_ptr().align_offset(64), 0);
        assert_eq!(w.panel(1).as_ptr().align_offset(64), 0);
        assert_eq!((w.rows(), w.cols()), (40, 3));
        // Channel 33 (panel 1, slot 1) input 2.
        assert_eq!(w.panel(1)[2 * PANEL + 1], values(40 * 3, 5)[33 * 3 + 2]);
        // Padding channels are zero.
        assert!(
            w.panel(1)[..]
                .chunks_exact(PANEL)
                .all(|row| row[8..].iter().all(|&v| v == 0.0))
        );
    }

    #[test]
    fn no_rows_write_nothing() {
        let w = PackedWeight::pack(&values(8, 1), 4);
        let mut out: Vec<f32> = vec![];
        pmatmul_wt(&mut out, &[], &w);
    }
}
