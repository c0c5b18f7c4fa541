//! Int8 linear layers (`serve --quantize int8`): weights quantized once at
//! load, per output channel; activations quantized per row as they arrive;
//! integer products on the widest instructions this CPU has.
//!
//! Why our own kernels: candle's quantized matmuls are GGML block formats
//! (q8_0 and kin) that quantize activations per 32-value block and run
//! f32-scaled block dots, which does not use VNNI's 4-way integer dot, and
//! the `gemm` crate has no integer path. ONNX Runtime's dynamic int8
//! (what a user would otherwise run) is a u8 × i8 GEMM with per-tensor or
//! per-channel scales; this is the same arithmetic:
//!
//! `out[r, c] = sₐ[r] · s_w[c] · (Σₖ qₐ[r, k] · q_w[c, k] − zₐ[r] · Σₖ q_w[c, k])`
//!
//! with `qₐ = round(x / sₐ) + zₐ` (asymmetric, u8, the row's range always
//! holding 0) and `q_w = round(w / s_w)` (symmetric, i8 in ±127). The
//! integer sum is exact, so the three kernels agree bit for bit with one
//! another for the same codes:
//! - AVX-512 VNNI (`vpdpbusd`, 64 multiply-adds per instruction),
//!   activations in 0..=255;
//! - AVX2 (`vpmaddubsw` then `vpmaddwd`): `vpmaddubsw` adds two u8 × i8
//!   products into a saturating i16, and 2 · 255 · 127 would overflow it.
//!   So the kernel multiplies `qₐ − 128` (i8) instead, as `|qₐ − 128|`
//!   (u8, ≤ 128) times the weight with the sign of `qₐ − 128` (`vpsignb`):
//!   2 · 128 · 127 < 2¹⁵, exact; the 128 · Σ q_w it leaves out is added
//!   back with the zero point;
//! - portable Rust loops, for every other CPU;
//! - Intel AMX (`tdpbusd` on 16 × 64 tiles, [`amx`]) where the CPU and the
//!   OS allow it, for weights whose inputs are a multiple of 64 (the rest
//!   go to VNNI).
//!
//! Weights are packed once into panels of 16 output channels × 4 inputs
//! (64 bytes, one 512-bit register), the layout `vpdpbusd` consumes, so a
//! forward of a few rows does not repack anything.

use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;

use super::{Fused, Plain, SharedOut, Simd, matmul_blocks, pool_threads};

#[cfg(target_arch = "x86_64")]
mod amx;

/// Output channels per packed panel.
const PANEL: usize = 16;
/// Inputs per 32-bit group of a panel (one `vpdpbusd` lane).
const GROUP: usize = 4;
/// Largest activation code.
const QMAX: u8 = 255;
/// Rows of activation codes one AMX call reads (two 16-row A tiles); the
/// codes are padded for them.
const AMX_ROWS: usize = 32;
/// Inputs per AMX tile step (one 64-byte A-tile row).
const AMX_STEP: usize = 64;
/// Rows of one VNNI tile: 12 rows × 2 panels of 16 channels take 24 of
/// AVX-512's 32 registers; against 6 rows, each 64-byte weight group is
/// read half as often per dot instruction (7–60%, mostly 10–25%, faster
/// at 64 and 256 rows, about even at 1,736, on an AVX-512 Xeon with VNNI;
/// 2 threads, alternated in one process).
const VNNI_ROWS: usize = 12;
/// Rows of a work block quantized activations are reused across (its
/// codes, rows × k bytes, stay in L2 while every panel passes over them).
const ROW_BLOCK: usize = 96;

/// Which integer kernel runs the products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Kernel {
    /// Intel AMX: 32 rows × 32 channels per call, 16 × 16 sums per tile
    /// (with VNNI for weights whose inputs are not a multiple of 64).
    Amx,
    /// AVX-512F/BW + VNNI: 12 rows × 32 channels per tile.
    Vnni512,
    /// AVX2: 4 rows × 16 channels per tile.
    Avx2,
    /// Plain Rust.
    Portable,
}

impl Int8Kernel {
    /// The best kernel this CPU runs, decided once. The environment
    /// variable `SOFTPROMPT_INT8_KERNEL` (`amx`, `vnni`, `avx2`, `portable`) picks
    /// a slower one instead, for tests and benchmarks; one the CPU lacks is
    /// ignored with a warning.
    pub fn detect() -> Int8Kernel {
        static CHOSEN: OnceLock<Int8Kernel> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = [Int8Kernel::Amx, Int8Kernel::Vnni512, Int8Kernel::Avx2]
                .into_iter()
                .find(|k| k.supported())
                .unwrap_or(Int8Kernel::Portable);
            match std::env::var("SOFTPROMPT_INT8_KERNEL").ok().as_deref() {
                None | Some("") => best,
                Some(name) => match Int8Kernel::from_name(name) {
                    Some(k) if k.supported() => k,
                    _ => {
                        tracing::warn!(
                            requested = name,
                            using = ?best,
                            "SOFTPROMPT_INT8_KERNEL names no kernel this CPU runs"
                        );
                        best
                    }
                },
            }
        })
    }

    fn from_name(name: &str) -> Option<Int8Kernel> {
        match name {
            "amx" => Some(Int8Kernel::Amx),
            "vnni" => Some(Int8Kernel::Vnni512),
            "avx2" => Some(Int8Kernel::Avx2),
            "portable" => Some(Int8Kernel::Portable),
            _ => None,
        }
    }

    /// Whether this CPU has the instructions of the kernel.
    pub fn supported(self) -> bool {
        match self {
            Int8Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Amx => Int8Kernel::Vnni512.supported() && amx::available(),
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Vnni512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// What the kernel subtracts from every activation code before
    /// multiplying (see the module documentation).
    fn code_offset(self) -> i32 {
        match self {
            Int8Kernel::Avx2 => 128,
            Int8Kernel::Amx | Int8Kernel::Vnni512 | Int8Kernel::Portable => 0,
        }
    }
}

/// A `[n, k]` weight (stored `[out, in]`, as in the checkpoint) quantized
/// per output channel and packed for [`qmatmul_wt`].
pub struct QWeight {
    n: usize,
    k: usize,
    /// `k` rounded up to [`GROUP`] (padding inputs have weight 0).
    kq: usize,
    /// `[n/16][kq/4][16][4]` from `start`, `n` rounded up to [`PANEL`]
    /// with zero channels.
    buf: Vec<i8>,
    /// Where the codes start in `buf`: the first 64-byte boundary, so that
    /// every 64-byte group of a panel is one cache line.
    start: usize,
    /// Per channel: `w ≈ scale · q` (0 for padding channels).
    scale: Vec<f32>,
    /// Per channel: `Σₖ q`, for the activations' zero point.
    sum: Vec<i32>,
}

impl QWeight {
    /// Quantizes `w` (`[n, k]` row-major) to ±127 per output channel.
    pub fn quantize(w: &[f32], k: usize) -> QWeight {
        assert!(
            k > 0 && w.len().is_multiple_of(k),
            "QWeight: {} values are not rows of {k}",
            w.len()
        );
        let n = w.len() / k;
        let kq = k.next_multiple_of(GROUP);
        let panels = n.div_ceil(PANEL);
        let len = panels * PANEL * kq;
        // Over-allocated by a line: a Vec<i8> is only byte-aligned.
        let mut buf = vec![0i8; len + 64];
        let start = buf.as_ptr().align_offset(64).min(64);
        let packed = &mut buf[start..start + len];
        let mut scale = vec![0f32; panels * PANEL];
        let mut sum = vec![0i32; panels * PANEL];
        for (c, row) in w.chunks_exact(k).enumerate() {
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            if amax == 0.0 || !amax.is_finite() {
                continue; // all zero (or broken): a zero channel
            }
            let s = amax / 127.0;
            scale[c] = s;
            let (p, j) = (c / PANEL, c % PANEL);
            for (i, &v) in row.iter().enumerate() {
                let q = (v / s).round().clamp(-127.0, 127.0) as i8;
                sum[c] += q as i32;
                let (g, t) = (i / GROUP, i % GROUP);
                packed[((p * (kq / GROUP) + g) * PANEL + j) * GROUP + t] = q;
            }
        }
        QWeight {
            n,
            k,
            kq,
            buf,
            start,
            scale,
            sum,
        }
    }

    /// Output channels.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Bytes held (packed codes, scales and sums).
    pub fn bytes(&self) -> usize {
        self.buf.len() + 8 * self.scale.len()
    }

    /// Bytes of one panel (16 channels, all inputs).
    fn panel_bytes(&self) -> usize {
        PANEL * self.kq
    }
}

/// Activation codes of one call: `[m, kq]` u8 with per-row scale and zero
/// point, reused across calls on each thread.
#[derive(Default)]
struct Codes {
    q: Vec<u8>,
    /// AVX2 only: `|q − 128|` per code, `q` itself then holding `q − 128`
    /// as i8 bits (see [`avx2_operands`]).
    mag: Vec<u8>,
    scale: Vec<f32>,
    zero: Vec<i32>,
}

thread_local! {
    static CODES: RefCell<Codes> = RefCell::new(Codes::default());
}

/// `out[m, n] ← x[m, k] · wᵀ` through int8 codes (see the module
/// documentation), on [`Int8Kernel::detect`]'s kernel. The drop-in for
/// `matmul_wt` when the model is quantized.
pub fn qmatmul_wt(out: &mut [f32], x: &[f32], w: &QWeight) {
    qmatmul_with_kernel(Int8Kernel::detect(), out, x, w);
}

/// [`qmatmul_wt`] on a given kernel (benchmarks compare them). Panics if
/// the CPU lacks it ([`Int8Kernel::supported`]).
pub fn qmatmul_with_kernel(kernel: Int8Kernel, out: &mut [f32], x: &[f32], w: &QWeight) {
    let k = w.k;
    assert!(
        x.len().is_multiple_of(k),
        "qmatmul: input is not rows of {k}"
    );
    let m = x.len() / k;
    assert_eq!(out.len(), m * w.n, "qmatmul: output size");
    if m == 0 || w.n == 0 {
        return;
    }
    assert!(
        kernel.supported(),
        "qmatmul: {kernel:?} on a CPU without it"
    );
    let kernel = match kernel {
        Int8Kernel::Amx if !w.kq.is_multiple_of(AMX_STEP) => Int8Kernel::Vnni512,
        k => k,
    };
    // AMX tiles read 32 rows from any row a block starts at: room for them.
    let rows = if kernel == Int8Kernel::Amx {
        m + AMX_ROWS
    } else {
        m
    };
    // Taken out of the thread's slot for the call and put back after, not
    // borrowed across it: the parallel loops below let this thread run
    // other queued work while it waits, and that work may be another
    // chunk's int8 product (engine/split.rs), which would borrow the same
    // slot again. A nested call finds the slot empty and grows its own.
    let mut codes = CODES.with(|c| c.take());
    {
        let codes = &mut codes;
        codes.q.resize(rows * w.kq, 0);
        codes.scale.resize(m, 0.0);
        codes.zero.resize(m, 0);
        let rows = codes.q[..m * w.kq]
            .par_chunks_mut(w.kq)
            .zip(codes.scale.par_iter_mut())
            .zip(codes.zero.par_iter_mut())
            .zip(x.par_chunks(k));
        if kernel == Int8Kernel::Avx2 {
            codes.mag.resize(m * w.kq, 0);
            rows.zip(codes.mag.par_chunks_mut(w.kq))
                .with_min_len(16)
                .for_each(|((((q, s), z), row), mag)| {
                    quantize_row(row, QMAX, q, s, z);
                    avx2_operands(q, mag);
                });
        } else {
            rows.with_min_len(16)
                .for_each(|(((q, s), z), row)| quantize_row(row, QMAX, q, s, z));
        }
        gemm(kernel, codes, m, w, out);
    }
    CODES.with(|c| c.replace(codes));
}

/// The AVX2 kernel's operands for one row of codes, made as the row is
/// quantized rather than per (row, panel) in the kernel's inner loop:
/// `d = q − 128` (i8, in place of `q`) and `|d|` (u8, ≤ 128) in `mag`. The
/// kernel multiplies `|d|` by the weight with the sign of `d` (see the
/// module documentation); with both at hand its inner loop is two sign
/// flips and the multiplies, 8 vector instructions per row and 32 inputs
/// instead of 10.
fn avx2_operands(q: &mut [u8], mag: &mut [u8]) {
    for (c, m) in q.iter_mut().zip(mag) {
        let d = (*c ^ 0x80) as i8;
        *m = d.unsigned_abs();
        *c = d as u8;
    }
}

/// Asymmetric codes of one row: the range [min(x, 0), max(x, 0)] onto
/// 0..=qmax, so that 0 is exact (padding and zeros stay zero). (A
/// lane-array build of it for AVX-512 measured slower than the intrinsics
/// at the model's shapes; without AVX2 intrinsics, the scalar loops read
/// 1.8 GB/s on a Zen 3, 8–18% of an int8 layer's time.)
fn quantize_row(x: &[f32], qmax: u8, q: &mut [u8], scale: &mut f32, zero: &mut i32) {
    let (lo, hi, done) = range_simd(x);
    let (lo, hi) = x[done..]
        .iter()
        .fold((lo, hi), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let qmax_f = qmax as f32;
    let s = (hi - lo) / qmax_f;
    if !(s > 0.0 && s.is_finite()) {
        // All zero (or not finite: the row's output is garbage either way,
        // as it would be in f32).
        q.fill(0);
        *scale = if s.is_finite() { 0.0 } else { f32::NAN };
        *zero = 0;
        return;
    }
    let inv = 1.0 / s;
    let z = (-lo * inv).round().clamp(0.0, qmax_f);
    // v·inv + z ≥ lo·inv + z ≥ −0.5, so adding 0.5 and truncating rounds
    // to nearest; the clamp only guards the ends. The same operations, in
    // the same order, as the SIMD builds: codes do not depend on the CPU.
    let off = z + 0.5;
    let done = codes_simd(x, inv, off, qmax_f, q);
    for (c, &v) in q[done..x.len()].iter_mut().zip(&x[done..]) {
        *c = (v * inv + off).max(0.0).min(qmax_f) as u8;
    }
    q[x.len()..].fill(z as u8); // padding inputs: code z, i.e. 0.0
    *scale = s;
    *zero = z as i32;
}

/// (min(·, 0), max(·, 0)) of the first multiple of 16 (AVX-512) or 8
/// (AVX2) values of `x` where the CPU has either (NaN skipped, as
/// `f32::min` does), and how many it read (0 elsewhere).
fn range_simd(x: &[f32]) -> (f32, f32, usize) {
    #[cfg(target_arch = "x86_64")]
    match Simd::current() {
        // SAFETY: the CPU has AVX-512F (`current` never exceeds what the
        // CPU has).
        Simd::Avx512 => return unsafe { x86::range_avx512(x) },
        // SAFETY: as above, with AVX.
        Simd::Avx2 => return unsafe { x86::range_avx2(x) },
        Simd::Plain => {}
    }
    let _ = x;
    (0.0, 0.0, 0)
}

/// Codes of the first multiple of 16 (AVX-512) or 32 (AVX2) values of `x`
/// where the CPU has either (the scalar loop's arithmetic, a register at a
/// time); returns how many it wrote (0 elsewhere).
fn codes_simd(x: &[f32], inv: f32, off: f32, qmax: f32, q: &mut [u8]) -> usize {
    #[cfg(target_arch = "x86_64")]
    match Simd::current() {
        // SAFETY: the CPU has AVX-512F (`current` never exceeds what the
        // CPU has).
        Simd::Avx512 => return unsafe { x86::codes_avx512(x, inv, off, qmax, q) },
        // SAFETY: as above, with AVX2.
        Simd::Avx2 => return unsafe { x86::codes_avx2(x, inv, off, qmax, q) },
        Simd::Plain => {}
    }
    let _ = (x, inv, off, qmax, q);
    0
}

/// The integer products and their scaling into `out`, split over threads
/// in (rows × channels) blocks as `matmul_wt` splits f32 products.
fn gemm(kernel: Int8Kernel, codes: &Codes, m: usize, w: &QWeight, out: &mut [f32]) {
    let n = w.n;
    let panels = n.div_ceil(PANEL);
    let threads = pool_threads();
    let (pm, pn) = matmul_blocks(m, n, threads);
    let pn = pn.min(panels);
    let dst = SharedOut(out.as_mut_ptr());
    let run = |item: usize| {
        let (bi, bj) = (item / pn, item % pn);
        let rows = (bi * m / pm)..((bi + 1) * m / pm);
        // Channel blocks on whole pairs of panels where there are enough.
        let pair_at = |j: usize| (j * panels.div_ceil(2) / pn * 2).min(panels);
        let cols = pair_at(bj)..pair_at(bj + 1);
        for r0 in rows.clone().step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(rows.end);
            block(kernel, codes, r0..r1, cols.clone(), w, dst);
        }
    };
    if pm * pn == 1 {
        run(0);
    } else {
        (0..pm * pn).into_par_iter().for_each(run);
    }
}

/// Rows `rows` × panels `panels` of the output: every tile of the block.
fn block(
    kernel: Int8Kernel,
    codes: &Codes,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    w: &QWeight,
    dst: SharedOut,
) {
    let (mr, np) = match kernel {
        Int8Kernel::Amx => (AMX_ROWS, 2),
        Int8Kernel::Vnni512 => (VNNI_ROWS, 2),
        Int8Kernel::Avx2 => (4, 1),
        Int8Kernel::Portable => (4, 1),
    };
    let mut acc = [0i32; AMX_ROWS * 2 * PANEL];
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `Amx` runs only where `supported()` found AMX (asserted in
    // `qmatmul_with`); the configuration is released when `tiles` drops,
    // on this thread, at the end of the block.
    let tiles = (kernel == Int8Kernel::Amx).then(|| unsafe { amx::Tiles::configure() });
    #[cfg(not(target_arch = "x86_64"))]
    let tiles: Option<()> = None;
    let mut p = panels.start;
    while p < panels.end {
        let np_here = np.min(panels.end - p);
        // The next panels of this block, as many, for the first tile to
        // ask for (see `tile`).
        let next = (p + 2 * np_here <= panels.end).then(|| {
            &w.buf[w.start + (p + np_here) * w.panel_bytes()..][..np_here * w.panel_bytes()]
        });
        let mut r = rows.start;
        while r < rows.end {
            let mr_here = mr.min(rows.end - r);
            // AMX reads whole 32-row tiles (rows past m are padding codes
            // whose sums are dropped); the others read what they need.
            let read = if kernel == Int8Kernel::Amx {
                AMX_ROWS
            } else {
                mr_here
            };
            let a = &codes.q[r * w.kq..(r + read) * w.kq];
            let mag = codes.mag.get(r * w.kq..(r + read) * w.kq).unwrap_or(&[]);
            let b = &w.buf[w.start + p * w.panel_bytes()..][..np_here * w.panel_bytes()];
            let acc = &mut acc[..read * np_here * PANEL];
            let ahead = if r == rows.start { next } else { None };
            tile(
                kernel,
                tiles.as_ref(),
                a,
                mag,
                read,
                b,
                ahead,
                np_here,
                w.kq,
                acc,
            );
            let at = TileAt {
                r0: r,
                rows: mr_here,
                p0: p,
                np: np_here,
                offset: kernel.code_offset(),
            };
            scale_out(acc, codes, w, at, dst);
            r += mr_here;
        }
        p += np_here;
    }
}

/// `acc[r][c] = Σₖ (a[r][k] − offset) · b[c][k]` (offset:
/// [`Int8Kernel::code_offset`]) for `rows` rows of codes `a`
/// (`[rows, kq]`) and `np` packed panels `b` (`np · 16` channels). With
/// `ahead` (as many panels as `b`), the VNNI and AVX2 kernels also ask for
/// its lines, into L2, as they read the same lines of `b`: the next
/// panels' weights then come from L2 rather than L3 or memory, as in the
/// f32 kernel (`packed::tile`). A MiniLM forward's 24 products (six
/// layers' weights, cycled; each binary run between two runs of the other,
/// four times per kernel and size) took 11–51% less time in 13 of 16 such
/// pairs at 12 and 40 rows, VNNI and AVX2 alike, and 4–19% more in 3 (an
/// AVX-512 Xeon whose speed swung minute to minute, 2 threads).
#[allow(clippy::too_many_arguments)]
fn tile(
    kernel: Int8Kernel,
    #[cfg(target_arch = "x86_64")] tiles: Option<&amx::Tiles>,
    #[cfg(not(target_arch = "x86_64"))] _tiles: Option<&()>,
    a: &[u8],
    mag: &[u8],
    rows: usize,
    b: &[i8],
    ahead: Option<&[i8]>,
    np: usize,
    kq: usize,
    acc: &mut [i32],
) {
    assert!(
        a.len() == rows * kq
            && b.len() == np * PANEL * kq
            && acc.len() == rows * np * PANEL
            && ahead.is_none_or(|n| n.len() == b.len()),
        "int8 tile: sizes disagree"
    );
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Amx => {
            assert!(
                rows == AMX_ROWS && kq.is_multiple_of(AMX_STEP) && (np == 1 || np == 2),
                "amx tile: {rows} rows, {kq} inputs, {np} panels"
            );
            let tiles = tiles.expect("amx tiles configured by the block");
            // SAFETY: the block configured `tiles` on this thread (AMX
            // present: `supported()`, asserted in `qmatmul_with`); the
            // sizes are checked above and by the assert before it.
            unsafe { amx::tile(tiles, a, b, np, kq, acc) }
        }
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Vnni512 => {
            // SAFETY: `Vnni512` runs only where `supported()` found
            // AVX-512F/BW and VNNI (asserted in `qmatmul_with`); the sizes
            // the kernel reads and writes are checked above.
            unsafe { x86::tile_vnni(a, rows, b, ahead, np, kq, acc) }
        }
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx2 => {
            assert_eq!(mag.len(), a.len(), "avx2 tile: magnitudes");
            // SAFETY: as above, with AVX2; `mag` is as long as `a`.
            unsafe { x86::tile_avx2(a, mag, rows, b, ahead, np, kq, acc) }
        }
        _ => tile_portable(a, rows, b, np, kq, acc),
    }
}

fn tile_portable(a: &[u8], rows: usize, b: &[i8], np: usize, kq: usize, acc: &mut [i32]) {
    acc.fill(0);
    for p in 0..np {
        let panel = &b[p * PANEL * kq..(p + 1) * PANEL * kq];
        for r in 0..rows {
            let a = &a[r * kq..(r + 1) * kq];
            let out = &mut acc[(r * np + p) * PANEL..][..PANEL];
            for (g, quad) in panel.chunks_exact(PANEL * GROUP).enumerate() {
                let av = &a[g * GROUP..(g + 1) * GROUP];
                for (j, w) in quad.chunks_exact(GROUP).enumerate() {
                    out[j] += (0..GROUP).map(|t| av[t] as i32 * w[t] as i32).sum::<i32>();
                }
            }
        }
    }
}

/// Where a tile's sums go: rows `r0..r0 + rows` of the output, channels
/// from panel `p0` on (`np` panels), and the code offset its kernel left
/// in the sums ([`Int8Kernel::code_offset`]).
#[derive(Clone, Copy)]
struct TileAt {
    r0: usize,
    rows: usize,
    p0: usize,
    np: usize,
    offset: i32,
}

/// Scales a tile's integer sums into `out` (see the module documentation).
/// A row's sums for its `np` panels lie side by side in `acc`, so each row
/// is one run of up to 32 channels.
// `dispatch!` names every body with its build's marker type; this one
// needs no arithmetic of its own (no FMA, no exp), so it ignores it.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
fn scale_out_impl<F>(acc: &[i32], codes: &Codes, w: &QWeight, at: TileAt, dst: SharedOut) {
    let n = w.n;
    let c0 = at.p0 * PANEL;
    let width = (at.np * PANEL).min(n - c0);
    let (sums, scales) = (&w.sum[c0..c0 + width], &w.scale[c0..c0 + width]);
    for r in 0..at.rows {
        let row = at.r0 + r;
        let (sa, za) = (codes.scale[row], codes.zero[row] - at.offset);
        let acc = &acc[r * at.np * PANEL..][..width];
        // SAFETY: row r0 + r < m and channels c0..c0 + width ≤ n lie in the
        // (rows × channels) block of the work item calling this, which no
        // other item writes (`gemm`); out holds m·n values.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(row * n + c0), width) };
        for (((o, &a), &ws), &sc) in out.iter_mut().zip(acc).zip(sums).zip(scales) {
            // Wrapping: the same i32 arithmetic as the kernels' exact sums
            // (no overflow: |a|, |za · ws| < 2^26), and it vectorizes.
            *o = a.wrapping_sub(za.wrapping_mul(ws)) as f32 * (sa * sc);
        }
    }
}

dispatch! {
    /// [`scale_out_impl`] on the widest vectors this CPU has: the sums of a
    /// 32-row AMX tile pair are scaled in 16-lane integer multiplies rather
    /// than the baseline build's emulated 4-lane ones (SSE2 has no 32-bit
    /// `pmulld`), which took a quarter of the int8 products' time.
    fn scale_out(acc: &[i32], codes: &Codes, w: &QWeight, at: TileAt, dst: SharedOut) => scale_out_impl;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{GROUP, PANEL};
    use std::arch::x86_64::*;

    /// See [`super::range_avx512`].
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn range_avx512(x: &[f32]) -> (f32, f32, usize) {
        let n = x.len() / 16 * 16;
        let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 ≤ n ≤ x.len().
            let v = unsafe { _mm512_loadu_ps(x.as_ptr().add(i)) };
            // min/max answer their second operand when either is NaN:
            // the accumulator, so NaN is skipped.
            lo = _mm512_min_ps(v, lo);
            hi = _mm512_max_ps(v, hi);
        }
        (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi), n)
    }

    /// See [`super::codes_avx512`].
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn codes_avx512(x: &[f32], inv: f32, off: f32, qmax: f32, q: &mut [u8]) -> usize {
        let n = x.len() / 16 * 16;
        assert!(q.len() >= n, "codes: output too short");
        let (vinv, voff, vmax, zero) = (
            _mm512_set1_ps(inv),
            _mm512_set1_ps(off),
            _mm512_set1_ps(qmax),
            _mm512_setzero_ps(),
        );
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 ≤ n ≤ x.len() and ≤ q.len().
            unsafe {
                let v = _mm512_loadu_ps(x.as_ptr().add(i));
                // mul then add (no FMA): the scalar loop's two roundings.
                let t = _mm512_add_ps(_mm512_mul_ps(v, vinv), voff);
                let t = _mm512_min_ps(_mm512_max_ps(t, zero), vmax);
                let c = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(t));
                _mm_storeu_si128(q.as_mut_ptr().add(i).cast(), c);
            }
        }
        n
    }

    /// See [`super::range_simd`].
    ///
    /// # Safety
    /// The CPU must have AVX.
    #[target_feature(enable = "avx")]
    pub unsafe fn range_avx2(x: &[f32]) -> (f32, f32, usize) {
        let n = x.len() / 8 * 8;
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 ≤ n ≤ x.len().
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            // As in `range_avx512`: NaN answers the accumulator.
            lo = _mm256_min_ps(v, lo);
            hi = _mm256_max_ps(v, hi);
        }
        let (mut l, mut h) = ([0f32; 8], [0f32; 8]);
        // SAFETY: two arrays of 8 floats.
        unsafe {
            _mm256_storeu_ps(l.as_mut_ptr(), lo);
            _mm256_storeu_ps(h.as_mut_ptr(), hi);
        }
        (
            l.iter().fold(0f32, |a, &v| a.min(v)),
            h.iter().fold(0f32, |a, &v| a.max(v)),
            n,
        )
    }

    /// See [`super::codes_simd`].
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn codes_avx2(x: &[f32], inv: f32, off: f32, qmax: f32, q: &mut [u8]) -> usize {
        let n = x.len() / 32 * 32;
        assert!(q.len() >= n, "codes: output too short");
        let (vinv, voff, vmax, zero) = (
            _mm256_set1_ps(inv),
            _mm256_set1_ps(off),
            _mm256_set1_ps(qmax),
            _mm256_setzero_ps(),
        );
        // packus works within 128-bit lanes: this puts the 32 codes back
        // in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let code = |at: usize| {
            // SAFETY: callers pass at + 8 ≤ n ≤ x.len().
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(at)) };
            // mul then add (no FMA): the scalar loop's two roundings.
            let t = _mm256_add_ps(_mm256_mul_ps(v, vinv), voff);
            _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(t, zero), vmax))
        };
        for i in (0..n).step_by(32) {
            // Codes are in 0..=255, so the saturating packs keep them.
            let lo = _mm256_packus_epi32(code(i), code(i + 8));
            let hi = _mm256_packus_epi32(code(i + 16), code(i + 24));
            let c = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(lo, hi), order);
            // SAFETY: i + 32 ≤ n ≤ q.len().
            unsafe { _mm256_storeu_si256(q.as_mut_ptr().add(i).cast(), c) };
        }
        n
    }

    /// [`super::tile`] with `vpdpbusd` on 512-bit registers: per group of 4
    /// inputs, one broadcast of each row's 4 codes and one dot instruction
    /// per (row, panel). At most [`super::VNNI_ROWS`] = 12 rows × 2 panels
    /// (24 of the 32 registers accumulate).
    ///
    /// # Safety
    /// The CPU must have AVX-512F, AVX-512BW and AVX-512 VNNI; the sizes
    /// must be as [`super::tile`] checks them.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_vnni(
        a: &[u8],
        rows: usize,
        b: &[i8],
        ahead: Option<&[i8]>,
        np: usize,
        kq: usize,
        acc: &mut [i32],
    ) {
        let next = ahead.map_or(b.as_ptr(), <[i8]>::as_ptr);
        match (np, ahead.is_some()) {
            (2, true) => tile_vnni_p::<2, true>(a, rows, b, next, kq, acc),
            (2, false) => tile_vnni_p::<2, false>(a, rows, b, next, kq, acc),
            (1, true) => tile_vnni_p::<1, true>(a, rows, b, next, kq, acc),
            (1, false) => tile_vnni_p::<1, false>(a, rows, b, next, kq, acc),
            _ => unreachable!("vnni tile of {np} panels"),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn tile_vnni_p<const P: usize, const PF: bool>(
        a: &[u8],
        rows: usize,
        b: &[i8],
        next: *const i8,
        kq: usize,
        acc: &mut [i32],
    ) {
        match rows {
            12 => tile_vnni_n::<12, P, PF>(a, b, next, kq, acc),
            11 => tile_vnni_n::<11, P, PF>(a, b, next, kq, acc),
            10 => tile_vnni_n::<10, P, PF>(a, b, next, kq, acc),
            9 => tile_vnni_n::<9, P, PF>(a, b, next, kq, acc),
            8 => tile_vnni_n::<8, P, PF>(a, b, next, kq, acc),
            7 => tile_vnni_n::<7, P, PF>(a, b, next, kq, acc),
            6 => tile_vnni_n::<6, P, PF>(a, b, next, kq, acc),
            5 => tile_vnni_n::<5, P, PF>(a, b, next, kq, acc),
            4 => tile_vnni_n::<4, P, PF>(a, b, next, kq, acc),
            3 => tile_vnni_n::<3, P, PF>(a, b, next, kq, acc),
            2 => tile_vnni_n::<2, P, PF>(a, b, next, kq, acc),
            1 => tile_vnni_n::<1, P, PF>(a, b, next, kq, acc),
            _ => unreachable!("vnni tile of {rows} rows"),
        }
    }

    /// Asks for the line at `at` into L2 (`PF`: at all).
    #[inline(always)]
    fn prefetch_line<const PF: bool>(at: *const i8) {
        if PF {
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(at) };
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn tile_vnni_n<const R: usize, const P: usize, const PF: bool>(
        a: &[u8],
        b: &[i8],
        next: *const i8,
        kq: usize,
        acc: &mut [i32],
    ) {
        let mut sums = [[_mm512_setzero_si512(); P]; R];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let panel = PANEL * kq;
        for g in 0..kq / GROUP {
            for p in 0..P {
                prefetch_line::<PF>(next.wrapping_add(p * panel + g * PANEL * GROUP));
            }
            // SAFETY: g·4 + 4 ≤ kq, so each row's read is inside its kq
            // codes (a holds R·kq); panel p's group g is the 64 bytes at
            // p·panel + g·64 < P·panel = b.len().
            unsafe {
                let mut bv = [_mm512_setzero_si512(); P];
                for (p, v) in bv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(bp.add(p * panel + g * PANEL * GROUP).cast());
                }
                for (r, row) in sums.iter_mut().enumerate() {
                    let av = _mm512_set1_epi32(
                        ap.add(r * kq + g * GROUP).cast::<i32>().read_unaligned(),
                    );
                    for (s, &v) in row.iter_mut().zip(&bv) {
                        *s = _mm512_dpbusd_epi32(*s, av, v);
                    }
                }
            }
        }
        for (r, row) in sums.iter().enumerate() {
            for (p, &s) in row.iter().enumerate() {
                // SAFETY: acc holds R·P·16 values.
                unsafe { _mm512_storeu_si512(acc.as_mut_ptr().add((r * P + p) * PANEL).cast(), s) };
            }
        }
    }

    /// [`super::tile`] with AVX2, on `d` = codes − 128 (see the module
    /// documentation and [`super::avx2_operands`]): `vpsignb` gives each
    /// weight the sign of `d`, `vpmaddubsw` multiplies it by `|d|` (≤ 128,
    /// so pairs of products cannot saturate the i16), `vpmaddwd` by ones
    /// adds pairs into i32. One panel is two 256-bit registers; at most 4
    /// rows × 1 panel (8 accumulators).
    ///
    /// # Safety
    /// The CPU must have AVX2; the sizes must be as [`super::tile`] checks
    /// them, `mag` as long as `a`.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_avx2(
        a: &[u8],
        mag: &[u8],
        rows: usize,
        b: &[i8],
        ahead: Option<&[i8]>,
        np: usize,
        kq: usize,
        acc: &mut [i32],
    ) {
        for p in 0..np {
            let b = &b[p * PANEL * kq..(p + 1) * PANEL * kq];
            // The same panel of `ahead`, asked for by the first rows.
            let next = ahead.map(|n| n[p * PANEL * kq..].as_ptr());
            for r0 in (0..rows).step_by(4) {
                let rr = 4.min(rows - r0);
                let (a, mag) = (&a[r0 * kq..(r0 + rr) * kq], &mag[r0 * kq..(r0 + rr) * kq]);
                let mut part = [0i32; 4 * PANEL];
                let part = &mut part;
                match (rr, next.filter(|_| r0 == 0)) {
                    (4, Some(n)) => tile_avx2_n::<4, true>(a, mag, b, n, kq, part),
                    (4, None) => tile_avx2_n::<4, false>(a, mag, b, b.as_ptr(), kq, part),
                    (3, Some(n)) => tile_avx2_n::<3, true>(a, mag, b, n, kq, part),
                    (3, None) => tile_avx2_n::<3, false>(a, mag, b, b.as_ptr(), kq, part),
                    (2, Some(n)) => tile_avx2_n::<2, true>(a, mag, b, n, kq, part),
                    (2, None) => tile_avx2_n::<2, false>(a, mag, b, b.as_ptr(), kq, part),
                    (_, Some(n)) => tile_avx2_n::<1, true>(a, mag, b, n, kq, part),
                    (_, None) => tile_avx2_n::<1, false>(a, mag, b, b.as_ptr(), kq, part),
                }
                for r in 0..rr {
                    acc[((r0 + r) * np + p) * PANEL..][..PANEL]
                        .copy_from_slice(&part[r * PANEL..(r + 1) * PANEL]);
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn tile_avx2_n<const R: usize, const PF: bool>(
        a: &[u8],
        mag: &[u8],
        b: &[i8],
        next: *const i8,
        kq: usize,
        acc: &mut [i32],
    ) {
        assert!(
            a.len() >= R * kq
                && mag.len() >= R * kq
                && b.len() >= PANEL * kq
                && acc.len() >= R * PANEL
        );
        let mut sums = [[_mm256_setzero_si256(); 2]; R];
        let ones = _mm256_set1_epi16(1);
        let (ap, mp, bp) = (a.as_ptr(), mag.as_ptr(), b.as_ptr());
        for g in 0..kq / GROUP {
            prefetch_line::<PF>(next.wrapping_add(g * PANEL * GROUP));
            // SAFETY: as in `tile_vnni_n`: the 64 bytes of group g of the
            // panel, and 4 bytes of each row's `d` and `|d|`, are inside
            // the checked sizes.
            unsafe {
                let b0 = _mm256_loadu_si256(bp.add(g * PANEL * GROUP).cast());
                let b1 = _mm256_loadu_si256(bp.add(g * PANEL * GROUP + 32).cast());
                for (r, row) in sums.iter_mut().enumerate() {
                    let at = r * kq + g * GROUP;
                    let d = _mm256_set1_epi32(ap.add(at).cast::<i32>().read_unaligned());
                    let ad = _mm256_set1_epi32(mp.add(at).cast::<i32>().read_unaligned());
                    let p0 = _mm256_maddubs_epi16(ad, _mm256_sign_epi8(b0, d));
                    let p1 = _mm256_maddubs_epi16(ad, _mm256_sign_epi8(b1, d));
                    let p0 = _mm256_madd_epi16(p0, ones);
                    let p1 = _mm256_madd_epi16(p1, ones);
                    row[0] = _mm256_add_epi32(row[0], p0);
                    row[1] = _mm256_add_epi32(row[1], p1);
                }
            }
        }
        for (r, row) in sums.iter().enumerate() {
            // SAFETY: acc holds at least R·16 values.
            unsafe {
                _mm256_storeu_si256(acc.as_mut_ptr().add(r * PANEL).cast(), row[0]);
                _mm256_storeu_si256(acc.as_mut_ptr().add(r * PANEL + 8).cast(), row[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::tests::values;

    /// The f64 product and, per output, a bound on what quantizing both
    /// sides may change: |Σ x·w − Σ x̂·ŵ| ≤ Σ |x|·δw + |ŵ|·δx with
    /// δw = s_w/2 and δx = sₐ/2 (sₐ from the row's range and `qmax`).
    fn reference(x: &[f32], w: &[f32], k: usize, qmax: f64) -> (Vec<f64>, Vec<f64>) {
        let (m, n) = (x.len() / k, w.len() / k);
        let mut exact = vec![0f64; m * n];
        let mut bound = vec![0f64; m * n];
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            let lo = xr.iter().fold(0f64, |a, &v| a.min(v as f64));
            let hi = xr.iter().fold(0f64, |a, &v| a.max(v as f64));
            let dx = (hi - lo) / qmax / 2.0;
            for c in 0..n {
                let wc = &w[c * k..(c + 1) * k];
                let dw = wc.iter().fold(0f64, |a, &v| a.max(v.abs() as f64)) / 127.0 / 2.0;
                let mut e = 0.0;
                let mut b = 0.0;
                for (&a, &v) in xr.iter().zip(wc) {
                    e += a as f64 * v as f64;
                    b += (a as f64).abs() * dw + ((v as f64).abs() + dw) * dx;
                }
                exact[r * n + c] = e;
                // Plus the f32 rounding of the scaling (relative 1e-6).
                bound[r * n + c] = b * 1.001 + 1e-5 * e.abs() + 1e-6;
            }
        }
        (exact, bound)
    }

    fn kernels() -> Vec<Int8Kernel> {
        let all = [
            Int8Kernel::Amx,
            Int8Kernel::Vnni512,
            Int8Kernel::Avx2,
            Int8Kernel::Portable,
        ];
        let have: Vec<_> = all.into_iter().filter(|k| k.supported()).collect();
        for k in all.iter().filter(|k| !have.contains(k)) {
            eprintln!("int8 {k:?}: not tested, this CPU lacks its instructions");
        }
        have
    }

    /// Every kernel, at shapes with ragged rows, channels and inputs,
    /// is within the quantization bound of the f64 product.
    #[test]
    fn products_are_within_the_quantization_bound_of_f64() {
        for &(m, n, k) in &[
            (1, 16, 4),
            (7, 40, 13),
            (13, 70, 37),
            (100, 96, 384),
            (3, 1152, 384),
        ] {
            let x = values(m * k, m as u64 * 7 + k as u64);
            let w = values(n * k, n as u64 * 3 + 1);
            let qw = QWeight::quantize(&w, k);
            for kernel in kernels() {
                let mut out = vec![0f32; m * n];
                qmatmul_with_kernel(kernel, &mut out, &x, &qw);
                let (exact, bound) = reference(&x, &w, k, QMAX as f64);
                for i in 0..m * n {
                    let err = (out[i] as f64 - exact[i]).abs();
                    assert!(
                        err <= bound[i],
                        "{kernel:?} {m}×{n}×{k} [{i}]: {} vs {} (error {err:.3e} > bound {:.3e})",
                        out[i],
                        exact[i],
                        bound[i]
                    );
                }
            }
        }
    }

    /// The SIMD kernels compute the same integers as the portable loops on
    /// the same codes: their outputs are identical.
    #[test]
    fn simd_kernels_match_the_portable_kernel_exactly() {
        for &(m, n, k) in &[(1, 16, 4), (9, 48, 20), (14, 80, 64), (64, 384, 1536)] {
            // Large values of one sign in adjacent inputs: where a
            // saturating i16 pair would show.
            let mut x = values(m * k, 11 + m as u64);
            x.iter_mut().step_by(3).for_each(|v| *v = v.abs() * 4.0);
            let mut w = values(n * k, 5 + n as u64);
            w.iter_mut().step_by(2).for_each(|v| *v = v.abs());
            let qw = QWeight::quantize(&w, k);
            for kernel in kernels() {
                let mut got = vec![0f32; m * n];
                let mut want = vec![0f32; m * n];
                qmatmul_with_kernel(kernel, &mut got, &x, &qw);
                qmatmul_with_kernel(Int8Kernel::Portable, &mut want, &x, &qw);
                assert_eq!(got, want, "{kernel:?} {m}×{n}×{k}");
            }
        }
    }

    /// The sums are scaled to f32 by the widest build of `scale_out` the
    /// CPU has: every build gives the same bits as the baseline's scalar
    /// loop, for every kernel, including channels that end mid-panel.
    #[test]
    fn scaled_outputs_do_not_depend_on_the_kernel_build() {
        let shapes = [(3, 40, 64), (33, 48, 384), (70, 1536, 384)];
        let runs = std::sync::Mutex::new(Vec::new());
        crate::model::kernels::tests::at_every_simd_level(|| {
            let mut outs = Vec::new();
            for &(m, n, k) in &shapes {
                let x = values(m * k, 3 + m as u64);
                let qw = QWeight::quantize(&values(n * k, 17 + n as u64), k);
                for kernel in kernels() {
                    let mut out = vec![0f32; m * n];
                    qmatmul_with_kernel(kernel, &mut out, &x, &qw);
                    outs.push((format!("{kernel:?} {m}×{n}×{k}"), out));
                }
            }
            runs.lock().unwrap().push((Simd::current(), outs));
        });
        let runs = runs.into_inner().unwrap();
        let (_, plain) = runs.last().expect("the baseline build always runs");
        for (level, outs) in &runs {
            for ((what, got), (_, want)) in outs.iter().zip(plain) {
                assert!(
                    got == want,
                    "{level:?} build differs from the baseline: {what}"
                );
            }
        }
    }

    /// The AVX-512 range and codes (where the CPU has them) give what the
    /// scalar loops give, so codes do not depend on the CPU: checked on
    /// every kernel build this CPU has.
    #[test]
    fn activation_codes_match_the_scalar_arithmetic() {
        crate::model::kernels::tests::at_every_simd_level(activation_codes_at_this_level);
    }

    fn activation_codes_at_this_level() {
        for len in [1usize, 7, 8, 15, 16, 17, 31, 32, 33, 72, 384, 1000, 1536] {
            let mut x = values(len, len as u64);
            x.iter_mut().step_by(7).for_each(|v| *v *= 9.0);
            let mut q = vec![0u8; len.next_multiple_of(GROUP)];
            let (mut s, mut z) = (0f32, 0i32);
            quantize_row(&x, QMAX, &mut q, &mut s, &mut z);
            let (lo, hi) = x
                .iter()
                .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let qmax = QMAX as f32;
            let want_s = (hi - lo) / qmax;
            let inv = 1.0 / want_s;
            let want_z = (-lo * inv).round().clamp(0.0, qmax);
            let want: Vec<u8> = x
                .iter()
                .map(|&v| (v * inv + (want_z + 0.5)).max(0.0).min(qmax) as u8)
                .collect();
            assert_eq!((s, z), (want_s, want_z as i32), "len {len}");
            assert_eq!(&q[..len], &want[..], "len {len}");
            assert!(
                q[len..].iter().all(|&c| c as i32 == z),
                "len {len}: padding"
            );
        }
    }

    /// Products running concurrently on one pool, as the chunks of a split
    /// batch do (engine/split.rs): a thread waiting inside one product's
    /// parallel loop runs another queued product, so the per-thread codes
    /// must not stay borrowed across a call (they did: "RefCell already
    /// borrowed" under `cargo test --test engine`). A race, so not certain
    /// to show: with the borrow back, 5 runs of 6 failed. Every product must
    /// also equal the same product run alone.
    #[test]
    fn nested_products_on_one_thread_neither_panic_nor_mix_codes() {
        // Large enough that every product's own loops run in parallel.
        let (n, k) = (384, 64);
        let qw = QWeight::quantize(&values(n * k, 5), k);
        let inputs: Vec<Vec<f32>> = (0..32)
            .map(|i| values((130 + i % 7) * k, 100 + i as u64))
            .collect();
        let alone: Vec<Vec<f32>> = inputs
            .iter()
            .map(|x| {
                let mut out = vec![0f32; x.len() / k * n];
                qmatmul_wt(&mut out, x, &qw);
                out
            })
            .collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        for _ in 0..200 {
            let together: Vec<Vec<f32>> = pool.install(|| {
                inputs
                    .par_iter()
                    .map(|x| {
                        let mut out = vec![0f32; x.len() / k * n];
                        qmatmul_wt(&mut out, x, &qw);
                        out
                    })
                    .collect()
            });
            assert_eq!(together, alone);
        }
    }

    #[test]
    fn zero_rows_and_zero_channels_give_zero() {
        let k = 8;
        let mut w = values(32 * k, 3);
        w[5 * k..6 * k].fill(0.0);
        let qw = QWeight::quantize(&w, k);
        let mut x = values(3 * k, 9);
        x[k..2 * k].fill(0.0);
        for kernel in kernels() {
            let mut out = vec![1f32; 3 * 32];
            qmatmul_with_kernel(kernel, &mut out, &x, &qw);
            assert!(
                out[32..64].iter().all(|&v| v == 0.0),
                "{kernel:?}: zero row"
            );
            assert!(
                (0..3).all(|r| out[r * 32 + 5] == 0.0),
                "{kernel:?}: zero channel"
            );
        }
    }
}
