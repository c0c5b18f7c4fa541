//! The fused attention kernel at the shapes the benchmark workload gives
//! it. Prints numbers, asserts nothing.
//!
//! `cargo bench --bench attention`: one MiniLM layer's attention (hidden
//! 384, 12 heads) over batches of 1, 8 and 64 rows (or those in
//! `ATTN_ROWS="64"`) whose lengths spread like the sentiment test set's
//! (8–79 tokens, mean ≈ 27, as `bench/run.sh` sends them), without and
//! with a deep prompt of 20 positions per row; in µs per call and GFLOP/s
//! counted as 4·S·T·hidden per row (scores and context: the kernel's
//! useful work). Threads: rayon's default (`RAYON_NUM_THREADS`).

use softprompt::model::kernels::{AttnDims, AttnRow, attention};

mod kernel_support;

use kernel_support::{cpu_name, rows, time, values};

fn main() {
    let (hidden, heads, layers) = (384, 12, 6);
    println!("{}; threads {}", cpu_name(), rayon::current_num_threads());
    for batch in rows("ATTN_ROWS", &[1, 8, 64]) {
        // Lengths spread like the test set's: 8 tokens plus an exponential
        // tail of mean 19, capped at 79, at fixed quantiles.
        let lens: Vec<usize> = (0..batch as u64)
            .map(|i| {
                let u = ((i * 2_654_435_761 + 500) % 1000) as f64 / 1000.0;
                (8.0 + (-(1.0 - u).ln()) * 19.0).min(79.0) as usize
            })
            .collect();
        let n: usize = lens.iter().sum();
        let qkv = values(n * 3 * hidden, 1);
        let bias = values(3 * hidden, 2);
        let mut out = vec![0f32; n * hidden];
        for prefix_len in [0usize, 20] {
            let prefix = values(prefix_len * layers * 2 * hidden, 3);
            let mut start = 0;
            let attn_rows: Vec<AttnRow> = lens
                .iter()
                .map(|&len| {
                    let r = AttnRow {
                        start,
                        len,
                        prefix: &prefix,
                    };
                    start += len;
                    r
                })
                .collect();
            let dims = AttnDims {
                hidden,
                heads,
                layers,
                layer: 2,
                scale: 1.0 / ((hidden / heads) as f32).sqrt(),
            };
            let flop: f64 = lens
                .iter()
                .map(|&s| 4.0 * (s * (s + prefix_len) * hidden) as f64)
                .sum();
            let t = time(|| attention(&mut out, &qkv, &bias, &attn_rows, dims));
            println!(
                "rows {batch:3} ({n:5} tokens, mean {:4.1}), deep prefix {prefix_len:2}: \
                 {:8.1} µs per layer, {:5.1} GFLOP/s",
                n as f64 / batch as f64,
                t * 1e6,
                flop / t / 1e9
            );
        }
    }
}
