//! Int8 against f32 linear layers at the model's shapes. Prints numbers,
//! asserts nothing.
//!
//! `cargo bench --bench int8`: for rows m ∈ {24, 256, 2048} (or those in
//! `INT8_ROWS="24 2048"`) and the four matmuls of a MiniLM layer (QKV
//! 1152×384, attention output 384×384, FFN in 1536×384, FFN out 384×1536),
//! the rate of the f32 kernel `serve` runs (`kernels::packed`, weights
//! packed at load) and of `kernels::int8::qmatmul_wt` (activation
//! quantization included) on every int8 kernel this CPU runs, in GFLOP/s
//! counted as 2·m·n·k, and int8 / f32. Threads: rayon's default
//! (`RAYON_NUM_THREADS`).

use softprompt::model::kernels::int8::{Int8Kernel, QWeight, qmatmul_with_kernel};
use softprompt::model::kernels::packed::{PackedWeight, pmatmul_wt};

mod kernel_support;

use kernel_support::{cpu_name, rows, time, values};

fn main() {
    let shapes = [
        ("qkv", 1152, 384),
        ("attn_out", 384, 384),
        ("ffn_in", 1536, 384),
        ("ffn_out", 384, 1536),
    ];
    let kernels: Vec<Int8Kernel> = [
        Int8Kernel::Amx,
        Int8Kernel::Vnni512,
        Int8Kernel::Avx2,
        Int8Kernel::Portable,
    ]
    .into_iter()
    .filter(|k| k.supported())
    .collect();
    let cpu = cpu_name();
    println!(
        "{cpu}; threads {}; int8 kernels here: {kernels:?}",
        rayon::current_num_threads()
    );
    // Quantizing the activations alone: a product with one 16-channel
    // panel costs little else.
    for k in [384usize, 1536] {
        let m = 2048;
        let x = values(m * k, 3);
        let qw = QWeight::quantize(&values(16 * k, 4), k);
        let mut out = vec![0f32; m * 16];
        let kern = Int8Kernel::detect();
        let t = time(|| qmatmul_with_kernel(kern, &mut out, &x, &qw));
        println!(
            "m={m} k={k}: quantize + one panel {:.2} ms ({:.1} GB/s of activations read)",
            t * 1e3,
            (m * k * 4) as f64 / t / 1e9
        );
    }
    for m in rows("INT8_ROWS", &[24, 256, 2048]) {
        let mut total = vec![0f64; kernels.len() + 1];
        for (name, n, k) in shapes {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let qw = QWeight::quantize(&w, k);
            let packed = PackedWeight::pack(&w, k);
            let mut out = vec![0f32; m * n];
            let flop = 2.0 * (m * n * k) as f64;
            let f = time(|| pmatmul_wt(&mut out, &x, &packed));
            total[0] += f;
            let mut line = format!("m={m:5} {name:8} f32 {:6.1} GFLOP/s", flop / f / 1e9);
            for (i, &kern) in kernels.iter().enumerate() {
                let q = time(|| qmatmul_with_kernel(kern, &mut out, &x, &qw));
                total[i + 1] += q;
                line += &format!(" | int8 {kern:?} {:6.1} ({:.2}×)", flop / q / 1e9, f / q);
            }
            println!("{line}");
        }
        let mut line = format!("m={m:5} layer    int8 / f32 time ratio:");
        for (i, kern) in kernels.iter().enumerate() {
            line += &format!(" {kern:?} {:.2}×", total[0] / total[i + 1]);
        }
        println!("{line}");
    }
}
