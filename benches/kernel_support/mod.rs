//! What the kernel benchmarks (`linear`, `int8`, `attention`) share: seeded inputs, the
//! timing rule, the row counts to measure and the CPU's name for the
//! printout. A module, not a bench target (Cargo only builds
//! `benches/*.rs` and `benches/*/main.rs` as benches).

use std::time::Instant;

/// `n` values in [-1, 1) from `seed` (a 64-bit LCG: the same inputs on
/// every run and machine).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
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
pub fn time(mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-6);
    let reps = ((0.05 / once) as usize).clamp(1, 1000);
    (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / reps as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// The row counts to measure: those listed in the environment variable
/// `var` (e.g. `"24 2048"`), else `default`.
pub fn rows(var: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(var)
        .ok()
        .map(|v| {
            v.split_whitespace()
                .filter_map(|r| r.parse().ok())
                .collect()
        })
        .unwrap_or_else(|| default.to_vec())
}

/// The CPU's model name from /proc/cpuinfo (empty where there is none).
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default()
}
