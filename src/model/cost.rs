//! What a forward costs and what the hardware can do, for the benchmarks
//! (`benches/engine.rs`, `examples/workload.rs`): both report throughput
//! as a share of the same matmul rate over the same FLOP count, so the two
//! are defined once, here.

use std::time::Instant;

use candle_core::{Device, Tensor};

use super::ModelConfig;

/// Useful FLOPs of the encoder for one row: every linear layer over the
/// row's real positions (text + virtual tokens), attention over every real
/// (query, key) pair (keys include a deep prefix); nothing for padding,
/// embeddings, norms or element-wise work.
pub fn encoder_flops(cfg: &ModelConfig, positions: usize, keys: usize) -> f64 {
    let h = cfg.hidden_size as f64;
    let i = cfg.intermediate_size as f64;
    let l = cfg.num_hidden_layers as f64;
    let (q, k) = (positions as f64, keys as f64);
    l * (q * 2.0 * (4.0 * h * h + 2.0 * h * i) + 4.0 * q * k * h)
}

/// f32 matmul rate (GFLOP/s) through candle's `matmul` at the encoder's four
/// linear shapes with `rows` rows: `[n, h]·[h, 3h]` (fused QKV),
/// `[n, h]·[h, h]`, `[n, h]·[h, i]`, `[n, i]·[i, h]`, weights stored
/// `[out, in]` and transposed as the engine's `Linear` does; one warm-up
/// call, then `iters` timed calls per shape.
pub fn matmul_rate(
    cfg: &ModelConfig,
    device: &Device,
    rows: usize,
    iters: usize,
) -> candle_core::Result<f64> {
    let h = cfg.hidden_size;
    let i = cfg.intermediate_size;
    let mut flops = 0.0;
    let mut secs = 0.0;
    for (k, m) in [(h, 3 * h), (h, h), (h, i), (i, h)] {
        let x = Tensor::randn(0f32, 1.0, (rows, k), device)?;
        let w = Tensor::randn(0f32, 1.0, (m, k), device)?;
        x.matmul(&w.t()?)?;
        let t = Instant::now();
        for _ in 0..iters {
            x.matmul(&w.t()?)?;
        }
        secs += t.elapsed().as_secs_f64();
        flops += 2.0 * (rows * k * m) as f64 * iters as f64;
    }
    Ok(flops / secs / 1e9)
}
