//! HTTP load benchmark: prints, asserts nothing.
//!
//! `cargo bench --bench http_load` (model from `SOFTPROMPT_MODEL`, default
//! `models/all-MiniLM-L6-v2`; `scripts/fetch_model.sh` fetches it).
//! Optional: `HTTP_LOAD_CLIENTS` (default 32), `HTTP_LOAD_SECONDS` per
//! scenario (default 10).
//!
//! Starts the real server on 127.0.0.1:0 in this process, uploads 64
//! synthetic tasks through the admin API (shallow, 20 virtual tokens, so
//! every task costs the same), then runs C closed-loop clients, each
//! sending one input of 8–40 words per request, for three scenarios: all
//! requests to one task; spread over the 64 tasks; spread over 64 tasks of
//! mixed kinds (32 shallow, 32 deep), each twice in ABBA order. Prints
//! requests/s, p50/p99 latency, mean batch size and tasks per batch (from
//! /metrics), and the ratio of spread to single-task throughput.
//!
//! Then a saturation comparison over one fixed list of requests
//! (`HTTP_LOAD_SAT_REQUESTS`, default 1,024, over the mixed task set): the
//! server's text tokens/s with enough closed-loop clients to fill every
//! batch (`HTTP_LOAD_SAT_CLIENTS`, default twice the batch row cap), against
//! the engine alone on the same requests in the same process, batched in
//! windows of the row cap. Order engine, server, server, engine; the ratio
//! server / engine is what the HTTP layer, the queue and the batcher cost
//! at full load. `HTTP_LOAD_SATURATION_ONLY=1` skips the ABBA scenarios.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::Device;
use clap::Parser;
use softprompt::engine::synthetic::{Kind, random_task};
use softprompt::engine::{Engine, Pooling, Row, TaskModel};
use softprompt::model::{Encoded, Model};
use softprompt::server::{ServeArgs, Server};
use softprompt::task::{Task, TaskMeta, native};

const TASKS: usize = 64;
const TOKEN: &str = "bench";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn task_model(model: &Model, kind: Kind, prompt: usize, seed: u64) -> TaskModel {
    let mut m = random_task(model.config(), &Device::Cpu, kind, prompt, 3, seed).unwrap();
    m.pooling = Pooling::Mean;
    m
}

fn task_bytes(m: TaskModel, model: &Model) -> Vec<u8> {
    let meta = TaskMeta::synthetic(
        model,
        vec!["a".into(), "b".into(), "c".into()],
        Pooling::Mean,
    );
    native::to_bytes(&Task::new(meta, m).unwrap()).unwrap()
}

const WORDS: &[&str] = &[
    "the",
    "service",
    "was",
    "slow",
    "but",
    "food",
    "arrived",
    "warm",
    "and",
    "tasty",
    "I",
    "would",
    "not",
    "recommend",
    "this",
    "place",
    "to",
    "anyone",
    "who",
    "values",
    "their",
    "time",
    "great",
    "movie",
    "plot",
    "acting",
    "terrible",
    "ending",
    "loved",
    "it",
    "price",
    "fair",
];

fn sentence(seed: usize) -> String {
    let n = 8 + (seed * 7919) % 33;
    (0..n)
        .map(|i| WORDS[(seed * 31 + i * 17) % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sum and count of a histogram in the exposition.
fn histogram(text: &str, name: &str) -> (f64, f64) {
    let value = |suffix: &str| {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{suffix}")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    (value("_sum"), value("_count"))
}

struct Outcome {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
    mean_batch: f64,
    mean_tasks: f64,
}

async fn scenario(base: &str, tasks: &[String], clients: usize, seconds: u64) -> Outcome {
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(clients)
        .build()
        .unwrap();
    let metrics = |http: reqwest::Client| async move {
        http.get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let run = |measure: Duration| {
        let stop = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (http, stop, tasks) = (http.clone(), stop.clone(), tasks.to_vec());
                let base = base.to_string();
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut errors = 0;
                    let mut r = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let task = &tasks[(c * 13 + r * 7) % tasks.len()];
                        let body = serde_json::json!({"inputs": sentence(c * 1000 + r)});
                        let t = Instant::now();
                        let resp = http
                            .post(format!("{base}/v1/tasks/{task}/classify"))
                            .json(&body)
                            .send()
                            .await;
                        match resp {
                            Ok(resp) if resp.status().is_success() => {
                                let _ = resp.bytes().await;
                                lat.push(t.elapsed());
                            }
                            _ => errors += 1,
                        }
                        r += 1;
                    }
                    (lat, errors)
                })
            })
            .collect();
        async move {
            tokio::time::sleep(measure).await;
            stop.store(true, Ordering::Relaxed);
            let mut lat = Vec::new();
            let mut errors = 0;
            for h in handles {
                let (l, e) = h.await.unwrap();
                lat.extend(l);
                errors += e;
            }
            (lat, errors)
        }
    };
    run(Duration::from_secs(2)).await; // warm-up
    let before = metrics(http.clone()).await;
    let started = Instant::now();
    let (mut lat, errors) = run(Duration::from_secs(seconds)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let after = metrics(http.clone()).await;
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e3;
    let delta = |name: &str| {
        let (s0, c0) = histogram(&before, name);
        let (s1, c1) = histogram(&after, name);
        (s1 - s0) / (c1 - c0).max(1.0)
    };
    Outcome {
        rps: lat.len() as f64 / elapsed,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        errors,
        mean_batch: delta("softprompt_batch_rows"),
        mean_tasks: delta("softprompt_batch_tasks"),
    }
}

/// Mean of runs of one scenario (percentiles: mean of the runs' values).
fn merge(runs: Vec<Outcome>) -> Outcome {
    let n = runs.len() as f64;
    let mean = |f: fn(&Outcome) -> f64| runs.iter().map(f).sum::<f64>() / n;
    Outcome {
        rps: mean(|o| o.rps),
        p50_ms: mean(|o| o.p50_ms),
        p99_ms: mean(|o| o.p99_ms),
        errors: runs.iter().map(|o| o.errors).sum(),
        mean_batch: mean(|o| o.mean_batch),
        mean_tasks: mean(|o| o.mean_tasks),
    }
}

fn print(name: &str, o: &Outcome) {
    println!(
        "{name:<36} {:>8.1} req/s  p50 {:>7.1} ms  p99 {:>7.1} ms  batch {:>5.1} rows / {:>4.1} tasks  errors {}",
        o.rps, o.p50_ms, o.p99_ms, o.mean_batch, o.mean_tasks, o.errors
    );
}

/// One request of the saturation list: its text for the server, its
/// tokens (the server's own tokenizer and budget) for the engine and for
/// counting.
struct SatRequest {
    text: String,
    task: usize,
    input: Encoded,
}

/// Engine alone: the list in windows of `rows` consecutive requests, one
/// mixed batch each; text tokens/s after a warm-up window.
fn engine_rate(engine: &Engine, tasks: &[TaskModel], list: &[SatRequest], rows: usize) -> f64 {
    let run = |reqs: &[SatRequest]| {
        for w in reqs.chunks(rows) {
            let batch: Vec<Row> = w
                .iter()
                .map(|r| Row {
                    input: &r.input,
                    task: &tasks[r.task],
                })
                .collect();
            engine.classify(&batch).unwrap();
        }
    };
    run(&list[..rows.min(list.len())]);
    let t = Instant::now();
    run(list);
    list.iter().map(|r| r.input.len()).sum::<usize>() as f64 / t.elapsed().as_secs_f64()
}

/// Server at saturation: `clients` closed-loop clients take the list's
/// requests in order (wrapping around); text tokens/s of the requests
/// answered within `seconds` after a 2 s warm-up, and the mean batch size
/// from /metrics.
async fn saturate(
    base: &str,
    ids: &[String],
    list: &[SatRequest],
    clients: usize,
    seconds: u64,
) -> (f64, f64) {
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(clients)
        .build()
        .unwrap();
    let bodies: Arc<Vec<(String, String, usize)>> = Arc::new(
        list.iter()
            .map(|r| {
                let url = format!("{base}/v1/tasks/{}/classify", ids[r.task]);
                (
                    url,
                    serde_json::json!({"inputs": r.text}).to_string(),
                    r.input.len(),
                )
            })
            .collect(),
    );
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let run = |measure: Duration| {
        let stop = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let (http, stop, bodies, next) =
                    (http.clone(), stop.clone(), bodies.clone(), next.clone());
                tokio::spawn(async move {
                    let mut tokens = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let (url, body, n) =
                            &bodies[next.fetch_add(1, Ordering::Relaxed) % bodies.len()];
                        let resp = http
                            .post(url)
                            .header("content-type", "application/json")
                            .body(body.clone())
                            .send()
                            .await;
                        match resp {
                            Ok(resp) if resp.status().is_success() => {
                                let _ = resp.bytes().await;
                                // Counted only if answered inside the window.
                                if !stop.load(Ordering::Relaxed) {
                                    tokens += n;
                                }
                            }
                            Ok(resp) => panic!("saturation request failed: {}", resp.status()),
                            Err(e) => panic!("saturation request failed: {e}"),
                        }
                    }
                    tokens
                })
            })
            .collect();
        async move {
            let started = Instant::now();
            tokio::time::sleep(measure).await;
            stop.store(true, Ordering::Relaxed);
            let elapsed = started.elapsed().as_secs_f64();
            let mut tokens = 0;
            for h in handles {
                tokens += h.await.unwrap();
            }
            tokens as f64 / elapsed
        }
    };
    let metrics = || async {
        http.get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    run(Duration::from_secs(2)).await; // warm-up
    let before = metrics().await;
    let rate = run(Duration::from_secs(seconds)).await;
    let after = metrics().await;
    let (s0, c0) = histogram(&before, "softprompt_batch_rows");
    let (s1, c1) = histogram(&after, "softprompt_batch_rows");
    (rate, (s1 - s0) / (c1 - c0).max(1.0))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let model_dir =
        std::env::var("SOFTPROMPT_MODEL").unwrap_or_else(|_| "models/all-MiniLM-L6-v2".into());
    let clients = env_or("HTTP_LOAD_CLIENTS", 32) as usize;
    let seconds = env_or("HTTP_LOAD_SECONDS", 10);
    let store = std::env::temp_dir().join(format!("softprompt-http-load-{}", std::process::id()));
    let args = ServeArgs::try_parse_from([
        "serve",
        "--model",
        &model_dir,
        "--prompts",
        store.to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
        "--admin-token",
        TOKEN,
        "--max-queued-tokens",
        "262144",
    ])
    .unwrap();
    println!(
        "model {model_dir}; {clients} clients; {seconds} s per scenario; batching: {} tokens, {} rows, wait {} ms",
        args.max_batch_tokens, args.max_batch_size, args.batch_wait_ms
    );
    let args_rows = args.max_batch_size;
    let server = Server::start(args).await.expect("server starts");
    let base = format!("http://{}", server.addr());
    let model = Model::load(std::path::Path::new(&model_dir), &Device::Cpu).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let upload = |id: String, bytes: Vec<u8>| {
        let http = http.clone();
        let url = format!("{base}/admin/tasks/{id}");
        async move {
            let r = http
                .put(url)
                .bearer_auth(TOKEN)
                .header("content-type", "application/octet-stream")
                .body(bytes)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "upload {id}: {}", r.status());
        }
    };
    let mut shallow = Vec::new();
    let mut mixed = Vec::new();
    // The mixed set's task models, kept for the engine-only measurement.
    let mut mixed_models = Vec::new();
    for i in 0..TASKS {
        let id = format!("s{i:02}");
        let m = task_model(&model, Kind::Shallow, 20, i as u64);
        upload(id.clone(), task_bytes(m.clone(), &model)).await;
        shallow.push(id.clone());
        if i % 2 == 0 {
            mixed.push(id);
            mixed_models.push(m);
        } else {
            let id = format!("d{i:02}");
            let m = task_model(&model, Kind::Deep, 20, 1000 + i as u64);
            upload(id.clone(), task_bytes(m.clone(), &model)).await;
            mixed.push(id);
            mixed_models.push(m);
        }
    }
    // ABBA order (1, 64, mixed, mixed, 64, 1): on a shared machine the
    // background load drifts, and each scenario then sees the same drift.
    let scenarios: [(&str, &[String]); 3] = [
        ("1 task", &shallow[..1]),
        ("64 tasks (shallow)", &shallow),
        ("64 tasks (32 shallow, 32 deep)", &mixed),
    ];
    if std::env::var("HTTP_LOAD_SATURATION_ONLY").is_err() {
        let mut results: Vec<Vec<Outcome>> = vec![Vec::new(), Vec::new(), Vec::new()];
        for i in [0, 1, 2, 2, 1, 0] {
            let (name, tasks) = scenarios[i];
            let o = scenario(&base, tasks, clients, seconds).await;
            print(&format!("  run: {name}"), &o);
            results[i].push(o);
        }
        let merged: Vec<Outcome> = results.into_iter().map(merge).collect();
        for ((name, _), o) in scenarios.iter().zip(&merged) {
            print(name, o);
        }
        println!(
            "throughput ratio {TASKS} tasks / 1 task: {:.2}",
            merged[1].rps / merged[0].rps
        );
        println!(
            "throughput ratio {TASKS} mixed / 1 task: {:.2}",
            merged[2].rps / merged[0].rps
        );
    }

    let sat_clients = env_or("HTTP_LOAD_SAT_CLIENTS", 2 * args_rows as u64) as usize;
    let sat_requests = env_or("HTTP_LOAD_SAT_REQUESTS", 1024) as usize;
    let list: Vec<SatRequest> = (0..sat_requests)
        .map(|i| {
            // A fixed task sequence that is not the clients' round robin.
            let t = (i * 37 + i / 7) % mixed.len();
            let text = sentence(500_000 + i);
            let input = model
                .tokenizer
                .encode(
                    &text,
                    None,
                    mixed_models[t].text_budget(model.config()),
                    false,
                )
                .unwrap();
            SatRequest {
                text,
                task: t,
                input,
            }
        })
        .collect();
    let tokens: usize = list.iter().map(|r| r.input.len()).sum();
    println!(
        "saturation: {sat_requests} requests ({tokens} text tokens) over the mixed set; {sat_clients} clients; engine in windows of {args_rows}"
    );
    let engine = Engine::new(Arc::new(model));
    let mut engine_rates = Vec::new();
    let mut server_rates = Vec::new();
    for step in ["engine", "server", "server", "engine"] {
        if step == "engine" {
            let r = tokio::task::block_in_place(|| {
                engine_rate(&engine, &mixed_models, &list, args_rows)
            });
            println!("  run: engine alone          {r:>8.0} text tokens/s");
            engine_rates.push(r);
        } else {
            let (r, batch) = saturate(&base, &mixed, &list, sat_clients, seconds).await;
            println!(
                "  run: server at saturation  {r:>8.0} text tokens/s  ({batch:.1} rows / batch)"
            );
            server_rates.push(r);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (e, s) = (mean(&engine_rates), mean(&server_rates));
    println!(
        "saturation: server {s:.0} text tokens/s, engine {e:.0} text tokens/s; server / engine {:.2}",
        s / e
    );
    server.shutdown();
    server.wait().await.unwrap();
    std::fs::remove_dir_all(&store).ok();
}
