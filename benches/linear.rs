//! f32 linear layers: weights packed once at load against gemm packing them
//! per call, at the model's shapes. Prints numbers, asserts nothing.
//!
//! `cargo bench --bench linear`: for rows m ∈ {6, 24, 64, 256, 512, 1024,
//! 2048} (or those in `LINEAR_ROWS="24 2048"`) and the four matmuls of a
//! MiniLM layer (QKV 1152×384, attention output 384×384, FFN in 1536×384,
//! FFN out 384×1536), the rate of `kernels::matmul_wt` (gemm, what candle
//! runs) and of `kernels::packed::pmatmul_with` on every kernel build this
//! CPU has, in GFLOP/s counted as 2·m·n·k, and the layer's time ratio.
//! Threads: rayon's default (`RAYON_NUM_THREADS`).

use softprompt::model::kernels::packed::{PackedWeight, pmatmul_with};
use softprompt::model::kernels::{Simd, matmul_wt};

mod kernel_support;

use kernel_support::{cpu_name, rows, time, values};

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
    let cpu = cpu_name();
    println!(
        "{cpu}; threads {}; packed kernels here: {levels:?} (gemm picks its own)",
        rayon::current_num_threads()
    );
    for m in rows("LINEAR_ROWS", &[6, 24, 64, 256, 512, 1024, 2048]) {
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
