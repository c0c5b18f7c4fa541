//! Latency of one request after the engine has been idle, in process (no
//! HTTP, no queue). Prints numbers, asserts nothing.
//!
//! `cargo bench --bench idle` (model from `SOFTPROMPT_MODEL`, default
//! `models/all-MiniLM-L6-v2`; `IDLE_QUANTIZE=int8` for the int8 path;
//! threads: `RAYON_NUM_THREADS`). One row of 30 text tokens for a shallow
//! task of 10 virtual tokens, as `serve` runs it (weights packed): the p50
//! and p90 of 100 forwards run back to back, then of 40 forwards each after
//! a gap of 10, 100 and 500 ms doing nothing.
//!
//! Why: bench/online.sh saw single requests arriving at 10 req/s take
//! 1.5–1.7× as long as requests sent back to back. This separates what the
//! engine's forward does after an idle gap from the server around it.

use candle_core::Device;
use softprompt::engine::synthetic::{Kind, random_input, random_task};
use softprompt::engine::{Engine, Kernels, Row, load_serving_model};
use softprompt::model::{Quantize, ServeDtype};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Sleeps, or with `IDLE_SPIN=1` spins on this thread (the CPU stays busy
/// without touching memory: what an idle gap costs through the CPU's power
/// state rather than through the caches).
fn wait(gap: Duration) {
    let spin = || {
        let t = Instant::now();
        while t.elapsed() < gap {
            std::hint::spin_loop();
        }
    };
    match std::env::var("IDLE_SPIN").as_deref() {
        Ok("1") => spin(),
        // Every thread of the pool.
        Ok("all") => {
            rayon::broadcast(|_| spin());
        }
        _ => std::thread::sleep(gap),
    }
}

fn main() -> anyhow::Result<()> {
    let dir =
        std::env::var("SOFTPROMPT_MODEL").unwrap_or_else(|_| "models/all-MiniLM-L6-v2".into());
    let quantize = match std::env::var("IDLE_QUANTIZE").as_deref() {
        Ok("int8") => Quantize::Int8,
        _ => Quantize::None,
    };
    let device = Device::Cpu;
    let model = load_serving_model(
        std::path::Path::new(&dir),
        &device,
        Kernels::Auto,
        ServeDtype::F32,
        quantize,
    )?;
    let cfg = model.config().clone();
    let engine = Engine::new(Arc::new(model));
    let input = random_input(&cfg, 30, 1);
    let task = random_task(&cfg, &device, Kind::Shallow, 10, 2, 2)?;
    let rows = [Row {
        input: &input,
        task: &task,
    }];
    let forward = || -> anyhow::Result<f64> {
        let t = Instant::now();
        engine.classify(&rows)?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    println!(
        "model {dir}; {quantize:?}; threads {}; one row, 30 text + 10 virtual tokens",
        rayon::current_num_threads()
    );
    for _ in 0..20 {
        forward()?;
    }
    // SOFTPROMPT_PROFILE=1: where each phase's time went.
    softprompt::profile::take();
    let mut b2b: Vec<f64> = (0..100).map(|_| forward()).collect::<Result<_, _>>()?;
    softprompt::profile::print();
    println!(
        "back to back      p50 {:6.2} ms  p90 {:6.2} ms",
        percentile(&mut b2b, 0.5),
        percentile(&mut b2b, 0.9)
    );
    for gap in [10u64, 100, 500] {
        let mut v = Vec::new();
        for _ in 0..40 {
            wait(Duration::from_millis(gap));
            v.push(forward()?);
        }
        softprompt::profile::print();
        println!(
            "after {gap:3} ms idle p50 {:6.2} ms  p90 {:6.2} ms",
            percentile(&mut v, 0.5),
            percentile(&mut v, 0.9)
        );
    }
    Ok(())
}
