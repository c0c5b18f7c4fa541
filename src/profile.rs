//! Per-op wall-clock timers for the forward pass, switched on with
//! `SOFTPROMPT_PROFILE=1`. Off, a timer costs one relaxed atomic load.
//! On the CPU every candle op is synchronous, so wall time per op is its cost.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static INIT: OnceLock<()> = OnceLock::new();
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

fn enabled() -> bool {
    INIT.get_or_init(|| {
        if std::env::var("SOFTPROMPT_PROFILE").is_ok_and(|v| v != "0" && !v.is_empty()) {
            ENABLED.store(true, Ordering::Relaxed);
        }
    });
    ENABLED.load(Ordering::Relaxed)
}

/// Times the closure under `name` when profiling is on.
#[inline]
pub fn time<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let d = start.elapsed();
    let mut t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let e = t.entry(name).or_default();
    e.0 += d;
    e.1 += 1;
    out
}

/// Accumulated (name, total, calls), largest first; empties the table.
pub fn take() -> Vec<(&'static str, Duration, u64)> {
    let mut t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = std::mem::take(&mut *t)
        .into_iter()
        .map(|(k, (d, n))| (k, d, n))
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}

/// Prints the table to stdout (benchmarks) and empties it.
pub fn print() {
    print_table(&take());
}

/// Whether `SOFTPROMPT_PROFILE` is on.
pub fn on() -> bool {
    enabled()
}

/// Prints (name, total, calls) rows with each one's share of the total.
pub fn print_table(v: &[(&'static str, Duration, u64)]) {
    let total: Duration = v.iter().map(|x| x.1).sum();
    if v.is_empty() {
        return;
    }
    println!("{:<22} {:>10} {:>7} {:>8}", "op", "ms", "%", "calls");
    for &(name, d, n) in v {
        println!(
            "{name:<22} {:>10.1} {:>6.1}% {n:>8}",
            d.as_secs_f64() * 1e3,
            100.0 * d.as_secs_f64() / total.as_secs_f64().max(1e-12)
        );
    }
}

/// Adds `more` (as from [`take`]) into `into`, largest total first.
pub fn merge(
    into: &mut Vec<(&'static str, Duration, u64)>,
    more: Vec<(&'static str, Duration, u64)>,
) {
    for (name, d, n) in more {
        match into.iter_mut().find(|e| e.0 == name) {
            Some(e) => {
                e.1 += d;
                e.2 += n;
            }
            None => into.push((name, d, n)),
        }
    }
    into.sort_by_key(|e| std::cmp::Reverse(e.1));
}
