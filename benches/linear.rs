//! f32 linear layers: weights packed once at load against gemm packing them
//! per call, at the model's shapes. Prints numbers, asserts nothing.
//!
//! `cargo bench --bench linear`: for rows m ∈ {6, 24, 64, 256, 512, 1024, 2048}
//! (or `LINEAR_ROWS="24 2048"`) and the
//! four matmuls of a MiniLM layer (QKV 1152×384, attention output 384×384,
//! FFN in 1536×384, FFN out 384×1536), the rate of `kernels::matmul_wt`
//! (gemm, what candle runs) and of `kernels::packed::pmatmul_with` on every
//! kernel build this CPU has, in GFLOP/s counted as 2·m·n·k, and the layer's
//! time ratio. Threads: rayon's default (`RAYON_NUM_THREADS`).

use softprompt::model::kernels::packed::{PackedWeight, pmatmul_with};
use softprompt::model::kernels::{Simd, matmul_wt};
use std::time::Instant;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Seconds per call: the fastest of 7 timings of enough calls for ~50 ms.
/// On a shared machine interference only ever slows a timing down, so the
/// fastest is the steadiest estimate of the kernel's own speed (medians
/// moved by 1.5× between runs on a 2-CPU VM).
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-6);
    let reps = ((0.05 / once) as usize).clamp(1, 1000);
    let v: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / reps as f64
        })
        .collect();
    v.into_iter().fold(f64::INFINITY, f64::min)
}

fn main() {
    let shapes = [
        ("qkv", 1152, 384),
        ("attn_out", 384, 384),
        ("ffn_in", 1536, 384),
        ("ffn_out", 384, 1536),
    ];
    let levels: Vec<Simd> = [Simd::Avx512, Simd::Avx2, Simd::Plain]
        .into_iter()
        .filter(|&s| s <= Simd::detected())
        .collect();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "{cpu}; threads {}; packed kernels here: {levels:?} (gemm picks its own)",
        rayon::current_num_threads()
    );
    // LINEAR_ROWS="24 2048" measures only those row counts.
    let rows: Vec<usize> = std::env::var("LINEAR_ROWS")
        .ok()
        .map(|v| {
            v.split_whitespace()
                .filter_map(|r| r.parse().ok())
                .collect()
        })
        .unwrap_or_else(|| vec![6, 24, 64, 256, 512, 1024, 2048]);
    for m in rows {
        let mut total = vec![0f64; levels.len() + 1];
        for (name, n, k) in shapes {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let packed = PackedWeight::pack(&w, k);
            let mut out = vec![0f32; m * n];
            let flop = 2.0 * (m * n * k) as f64;
            let g = time(|| matmul_wt(&mut out, &x, &w, k));
            total[0] += g;
            let mut line = format!("m={m:5} {name:8} gemm {:6.1} GFLOP/s", flop / g / 1e9);
            for (i, &level) in levels.iter().enumerate() {
                let p = time(|| pmatmul_with(level, &mut out, &x, &packed));
                total[i + 1] += p;
                line += &format!(" | packed {level:?} {:6.1} ({:.2}×)", flop / p / 1e9, g / p);
            }
            println!("{line}");
        }
        let mut line = format!("m={m:5} layer    packed / gemm speed:");
        for (i, level) in levels.iter().enumerate() {
            line += &format!(" {level:?} {:.2}×", total[0] / total[i + 1]);
        }
        println!("{line}");
    }
}
