//! Overload benchmark: how fast a full server says no. Prints, asserts
//! nothing.
//!
//! `cargo bench --bench overload` starts the real `softprompt serve`
//! binary (tiny fixture model; the refusal path never reaches the model)
//! as its own process, fills its admission bound with one long request
//! held by a slow first batch (`--faults batch-delay-ms`, a test hook),
//! then sends a burst of `OVERLOAD_REQUESTS` (default 3,000) classify
//! requests from this process, at most `OVERLOAD_CONCURRENCY` (default
//! 512) at a time, each on its own connection as a fresh client would.
//! Prints the latency distribution of the 429 answers. Both processes
//! share the machine's cores, as they would on a 2-core replica with its
//! load balancer's retries arriving.

#[path = "../tests/process_support/mod.rs"]
mod process_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use process_support::*;
use serde_json::json;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let requests = env_or("OVERLOAD_REQUESTS", 3000);
    let concurrency = env_or("OVERLOAD_CONCURRENCY", 512);
    let fresh = env_or("OVERLOAD_NEW_CONNECTIONS", 1) == 1;
    let store = tempfile::tempdir().unwrap();
    let adapter = root().join("tests/fixtures/adapters/pt_random_2");
    std::fs::create_dir_all(store.path().join("pt_random_2")).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter.join(f), store.path().join("pt_random_2").join(f)).unwrap();
    }
    let mut cmd = serve_command(store.path());
    cmd.env("SOFTPROMPT_MODEL", root().join("tests/fixtures/tiny-bert"))
        .env("SOFTPROMPT_PROMPTS", store.path())
        .env("SOFTPROMPT_MAX_QUEUED_TOKENS", "64")
        .env("SOFTPROMPT_FAULTS", "batch-delay-ms=120000")
        // Its log would interleave with the results; failures still show.
        .env("RUST_LOG", "info,softprompt::server::error=error");
    let (mut child, base, logs) = spawn(cmd);
    // Keep draining the server's log so it never blocks on a full pipe.
    std::thread::spawn(move || while logs.recv().is_ok() {});
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    wait_ready(&http, &base).await;
    // Fill the bound: one truncated long input costs exactly 64 tokens.
    let long = "the movie was great but far too long for its own good ".repeat(3);
    let filler = {
        let (http, base) = (http.clone(), base.clone());
        tokio::spawn(async move {
            http.post(format!("{base}/v1/tasks/pt_random_2/classify"))
                .json(&json!({"inputs": long, "parameters": {"truncate": true}}))
                .send()
                .await
        })
    };
    loop {
        let metrics = metrics_text(&http, &base).await;
        if metrics
            .lines()
            .any(|l| l == "softprompt_admitted_tokens 64")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let cpu_before = cpu_seconds(child.id());
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency));
    // A pool that keeps no idle connection opens one per request, as a
    // crowd of separate clients would.
    let shared = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(if fresh { 0 } else { usize::MAX })
        .build()
        .unwrap();
    let url = format!("{base}/v1/tasks/pt_random_2/classify");
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(requests);
    for i in 0..requests {
        let (gate, url, shared) = (gate.clone(), url.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            let _turn = gate.acquire_owned().await.unwrap();
            let t = Instant::now();
            let resp = shared
                .post(url)
                .json(&json!({"inputs": format!("request {i} of the burst")}))
                .send()
                .await;
            let status = resp.as_ref().map_or(0, |r| r.status().as_u16());
            let retry = resp
                .as_ref()
                .is_ok_and(|r| r.headers().contains_key("retry-after"));
            (t.elapsed(), status, retry)
        }));
    }
    let mut latencies = Vec::with_capacity(requests);
    let mut other = 0;
    for t in tasks {
        let (latency, status, retry) = t.await.unwrap();
        if status == 429 && retry {
            latencies.push(latency);
        } else {
            other += 1;
        }
    }
    let wall = started.elapsed();
    let server_cpu = cpu_seconds(child.id()) - cpu_before;
    latencies.sort();
    let q = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let metrics = metrics_text(&http, &base).await;
    println!("server-side classify latency histogram (seconds, cumulative):");
    for l in metrics.lines().filter(|l| {
        l.starts_with("softprompt_http_request_duration_seconds_bucket") && l.contains("classify")
    }) {
        println!("  {l}");
    }
    println!(
        "overload: {requests} requests, {concurrency} at a time, {}; {} answered 429 + Retry-After, {other} otherwise; {:.0} refusals/s",
        if fresh {
            "a new connection each"
        } else {
            "one keep-alive pool"
        },
        latencies.len(),
        latencies.len() as f64 / wall.as_secs_f64()
    );
    println!(
        "429 latency: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} CPUs)",
        ms(q(0.5)),
        ms(q(0.9)),
        ms(q(0.99)),
        ms(q(1.0)),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "server CPU for the burst: {:.0} ms ({:.1} µs per refusal; on 2 cores of its own the burst would drain in ~{:.0} ms)",
        server_cpu * 1e3,
        server_cpu * 1e6 / requests as f64,
        server_cpu * 1e3 / 2.0
    );
    let _ = child.kill();
    let _ = child.wait();
    filler.abort();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// User + system CPU seconds of a process so far (/proc/<pid>/stat, in
/// clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line: 0-based 11 and 12 after the ")".
    (ticks(11) + ticks(12)) / 100.0
}

/// The server's Prometheus exposition.
async fn metrics_text(http: &reqwest::Client, base: &str) -> String {
    let resp = http.get(format!("{base}/metrics")).send().await.unwrap();
    resp.text().await.unwrap()
}
