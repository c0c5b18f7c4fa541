//! What a forward costs and what the hardware can do, for the benchmarks
//! (`benches/engine.rs`, `examples/workload.rs`): both report throughput
//! as a share of the same matmul rate over the same FLOP count, so the two
//! are defined once, here.

use std::time::Instant;

use candle_core::{Device, Tensor};

use super::ModelConfig;

/// Useful FLOPs of the encoder for one row: every linear layer over the
/// row's real positions (text + virtual tokens), attention over every real
/// (query, key) pair (keys include a deep prefix), except in the last
/// layer, where only keys and values are needed from every position and
/// the rest (query, attention, output projection, FFN) only for the `read`
/// positions the head reads ([`crate::engine::Pooling::positions_read`]);
/// nothing for padding, embeddings, norms or element-wise work.
pub fn encoder_flops(cfg: &ModelConfig, positions: usize, keys: usize, read: usize) -> f64 {
    let h = cfg.hidden_size as f64;
    let i = cfg.intermediate_size as f64;
    let l = cfg.num_hidden_layers as f64;
    let (q, k, r) = (positions as f64, keys as f64, read.min(positions) as f64);
    let layer = |q: f64| q * 2.0 * (4.0 * h * h + 2.0 * h * i) + 4.0 * q * k * h;
    if l < 1.0 {
        return 0.0;
    }
    // The last layer: K and V for every position, the rest as a full
    // layer over the read positions.
    (l - 1.0) * layer(q) + q * 2.0 * 2.0 * h * h + (layer(r) - r * 2.0 * 2.0 * h * h)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// 2·m·k·n for every product the forward needs, listed shape by shape
    /// (not by the closed form above).
    fn by_shapes(cfg: &ModelConfig, q: usize, keys: usize, read: usize) -> f64 {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mm = |m: usize, k: usize, n: usize| 2.0 * (m * k * n) as f64;
        let mut total = 0.0;
        for layer in 0..cfg.num_hidden_layers {
            let last = layer + 1 == cfg.num_hidden_layers;
            let out = if last { read } else { q };
            total += mm(q, h, h) * 2.0; // K, V
            total += mm(out, h, h); // Q
            total += mm(out, h, keys) + mm(out, keys, h); // scores, context (all heads)
            total += mm(out, h, h); // attention output
            total += mm(out, h, i) + mm(out, i, h); // FFN
        }
        total
    }

    #[test]
    fn flops_count_every_product_and_only_the_read_positions_of_the_last_layer() {
        let cfg = ModelConfig::from_json(
            r#"{"model_type":"bert","vocab_size":100,"hidden_size":384,"num_hidden_layers":6,
                "num_attention_heads":12,"intermediate_size":1536,"max_position_embeddings":512}"#,
        )
        .unwrap();
        for (q, keys, read) in [(10, 10, 1), (10, 25, 1), (10, 25, 10), (1, 1, 1), (7, 7, 0)] {
            let ours = encoder_flops(&cfg, q, keys, read);
            let want = by_shapes(&cfg, q, keys, read);
            assert!(
                (ours - want).abs() <= 1e-9 * want,
                "{q} {keys} {read}: {ours} vs {want}"
            );
        }
        assert!(encoder_flops(&cfg, 10, 10, 1) < encoder_flops(&cfg, 10, 10, 10));
    }
}
