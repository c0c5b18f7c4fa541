//! Helpers for the server tests: start a real server on 127.0.0.1:0 with
//! the tiny fixture model, a store in a temp dir, and expected scores from
//! the engine run on single rows (itself checked against PEFT in
//! tests/parity.rs).
// Each test binary that includes this module uses only part of it (no item
// is unused by all of them).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use clap::Parser;
use serde_json::{Value, json};
use softprompt::engine::{Engine, Row};
use softprompt::model::Model;
use softprompt::server::{ServeArgs, Server};
use softprompt::task::{Task, peft};

pub const TOKEN: &str = "test-admin-token";
/// Tolerance on scores: batching pads rows, which moves logits by float
/// rounding only.
pub const TOL: f32 = 1e-4;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn tiny_model_dir() -> PathBuf {
    root().join("tests/fixtures/tiny-bert")
}

pub fn adapter_dir(name: &str) -> PathBuf {
    root().join("tests/fixtures/adapters").join(name)
}

/// Shallow fixture adapters (prompt tuning, p-tuning).
pub const SHALLOW: &[&str] = &["pt_random_2", "pt_text_3", "ptune_mlp_2", "ptune_lstm_3"];
/// Deep fixture adapters (prefix tuning).
pub const DEEP: &[&str] = &["prefix_2", "prefix_proj_3"];

/// A temp store holding copies of the named fixture adapters (id = name).
pub fn store_with(adapters: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for a in adapters {
        let dst = dir.path().join(a);
        std::fs::create_dir_all(&dst).unwrap();
        for f in [peft::CONFIG_FILE, peft::WEIGHTS_FILE] {
            std::fs::copy(adapter_dir(a).join(f), dst.join(f)).unwrap();
        }
    }
    dir
}

/// Flags of a test server on a free loopback port, with the admin token.
pub fn flags(store: &Path) -> Vec<String> {
    [
        "--model",
        tiny_model_dir().to_str().unwrap(),
        "--prompts",
        store.to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
        "--admin-token",
        TOKEN,
        "--batch-wait-ms",
        "1",
        "--shutdown-timeout-ms",
        "20000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn args(flags: &[String]) -> ServeArgs {
    let mut argv = vec!["serve".to_string()];
    argv.extend(flags.iter().cloned());
    ServeArgs::try_parse_from(argv).expect("test flags parse")
}

/// A started server plus an HTTP client for it.
pub struct Running {
    pub server: Server,
    pub base: String,
    pub http: reqwest::Client,
}

pub async fn start(flags: &[String]) -> Running {
    let server = Server::start(args(flags)).await.expect("server starts");
    let base = format!("http://{}", server.addr());
    Running {
        server,
        base,
        http: client(),
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn classify(&self, task: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/v1/tasks/{task}/classify")))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    pub async fn put_native(&self, id: &str, bytes: Vec<u8>) -> reqwest::Response {
        self.http
            .put(self.url(&format!("/admin/tasks/{id}")))
            .bearer_auth(TOKEN)
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .send()
            .await
            .unwrap()
    }

    pub async fn put_adapter(
        &self,
        id: &str,
        adapter: &str,
        labels: Option<&[&str]>,
    ) -> reqwest::Response {
        let dir = adapter_dir(adapter);
        let mut form = reqwest::multipart::Form::new()
            .part(
                peft::CONFIG_FILE,
                reqwest::multipart::Part::bytes(
                    std::fs::read(dir.join(peft::CONFIG_FILE)).unwrap(),
                ),
            )
            .part(
                peft::WEIGHTS_FILE,
                reqwest::multipart::Part::bytes(
                    std::fs::read(dir.join(peft::WEIGHTS_FILE)).unwrap(),
                ),
            );
        if let Some(l) = labels {
            form = form.text("labels", serde_json::to_string(l).unwrap());
        }
        self.http
            .put(self.url(&format!("/admin/tasks/{id}")))
            .bearer_auth(TOKEN)
            .multipart(form)
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, id: &str) -> reqwest::Response {
        self.http
            .delete(self.url(&format!("/admin/tasks/{id}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
    }

    /// The served version of `id` (from the public listing).
    pub async fn version(&self, id: &str) -> String {
        let v: Value = self
            .get(&format!("/v1/tasks/{id}"))
            .await
            .json()
            .await
            .unwrap();
        v["version"].as_str().unwrap().to_string()
    }

    /// Polls `cond` on the server until it holds; panics after a generous
    /// deadline (a hang guard, not a timing assertion).
    pub async fn until(&self, what: &str, cond: impl Fn(&Server) -> bool) {
        until(what, || cond(&self.server)).await
    }
}

pub async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..6000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("gave up waiting for: {what}");
}

/// The status and JSON error body of a refused request, checking the
/// error shape every error answer must have.
pub async fn error_of(resp: reqwest::Response) -> (u16, String, reqwest::header::HeaderMap) {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body: Value = resp.json().await.expect("error body is JSON");
    let error = body["error"].as_str().expect("error: string");
    assert!(!error.is_empty());
    let error_type = body["error_type"]
        .as_str()
        .expect("error_type: string")
        .to_string();
    assert_eq!(
        body.as_object().unwrap().len(),
        2,
        "error body has exactly error and error_type: {body}"
    );
    (status, error_type, headers)
}

/// One input as the API takes it.
#[derive(Clone, Debug)]
pub struct In {
    pub text: String,
    pub pair: Option<String>,
}

impl In {
    pub fn text(t: &str) -> Self {
        In {
            text: t.into(),
            pair: None,
        }
    }
    pub fn pair(t: &str, p: &str) -> Self {
        In {
            text: t.into(),
            pair: Some(p.into()),
        }
    }
    pub fn json(&self) -> Value {
        match &self.pair {
            None => json!(self.text),
            Some(p) => json!({"text": self.text, "text_pair": p}),
        }
    }
}

pub fn sample_inputs() -> Vec<In> {
    vec![
        In::text("the movie was great"),
        In::text("I did not like the food at all, it was cold and bland."),
        In::pair("The cat sat on the mat.", "A dog slept by the door."),
        In::pair("Is the service good?", "yes"),
        In::text("ok"),
        In::text("what a long and winding road this review has taken us down today"),
    ]
}

/// Expected scores from the engine, one row at a time.
pub struct Reference {
    pub model: Arc<Model>,
    engine: Engine,
}

impl Reference {
    pub fn new() -> Self {
        let model = Arc::new(Model::load(&tiny_model_dir(), &Device::Cpu).unwrap());
        let engine = Engine::new(model.clone());
        Reference { model, engine }
    }

    /// Logits of one input, run alone.
    pub fn logits(&self, task: &Task, input: &In, truncate: bool) -> Vec<f32> {
        let budget = task.model.text_budget(self.model.config());
        let enc = self
            .model
            .tokenizer
            .encode(&input.text, input.pair.as_deref(), budget, truncate)
            .unwrap();
        self.engine
            .classify(&[Row {
                input: &enc,
                task: &task.model,
            }])
            .unwrap()
            .remove(0)
    }

    /// Checks one answer entry: every label once, sorted by score
    /// descending, scores = softmax(engine logits) (or the raw logits).
    pub fn check(&self, task: &Task, input: &In, got: &Value, softmax: bool) {
        let logits = self.logits(task, input, false);
        let want = if softmax { softmax_of(&logits) } else { logits };
        let entries = got.as_array().expect("entry is a list");
        assert_eq!(entries.len(), task.meta.labels.len(), "all labels: {got}");
        let by_label: HashMap<&str, f32> = task
            .meta
            .labels
            .iter()
            .map(String::as_str)
            .zip(want.iter().copied())
            .collect();
        let mut prev = f32::INFINITY;
        for e in entries {
            let label = e["label"].as_str().unwrap();
            let score = e["score"].as_f64().unwrap() as f32;
            let w = by_label[label];
            assert!(
                (score - w).abs() <= TOL,
                "{input:?} {label}: got {score}, want {w}"
            );
            assert!(score <= prev, "sorted descending: {got}");
            prev = score;
        }
    }
}

pub fn softmax_of(x: &[f32]) -> Vec<f32> {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// A fixture adapter read the way the store reads it.
pub fn fixture_task(adapter: &str) -> Task {
    peft::read_dir(&adapter_dir(adapter), None).unwrap()
}

/// Every file under `dir` with its bytes (to prove a store unchanged).
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}
