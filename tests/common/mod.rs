//! Shared helpers for integration tests: fixture paths, reference cases.
// Each test binary that includes this module uses only part of it (no item
// is unused by all of them).
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use serde::Deserialize;
use softprompt::engine::{Head, Pooling, TaskModel};
use softprompt::model::{Encoded, Linear, Model};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// The default model, fetched by scripts/fetch_model.sh (CI runs it first).
pub fn default_model_dir() -> PathBuf {
    let d = root().join("models/all-MiniLM-L6-v2");
    assert!(
        d.join("config.json").is_file(),
        "default model missing at {}: run scripts/fetch_model.sh",
        d.display()
    );
    d
}

pub fn load_model(dir: &Path) -> Arc<Model> {
    Arc::new(Model::load(dir, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", dir.display())))
}

#[derive(Deserialize, Clone)]
pub struct Input {
    pub text: String,
    pub text_pair: Option<String>,
}

#[derive(Deserialize, Clone)]
pub struct Case {
    pub adapter: String,
    pub model: String,
    pub peft_type: String,
    pub num_labels: usize,
    pub inputs: Vec<Input>,
    pub input_ids: Vec<Vec<u32>>,
    pub token_type_ids: Vec<Vec<u32>>,
    pub logits: Vec<Vec<f32>>,
}

#[derive(Deserialize, Clone)]
pub struct Base {
    pub model: String,
    pub inputs: Vec<Input>,
    pub input_ids: Vec<Vec<u32>>,
    pub pooler_output: Option<Vec<Vec<f32>>>,
    pub cls_hidden: Vec<Vec<f32>>,
    pub mean_pooled: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
pub struct Expected {
    pub cases: Vec<Case>,
    pub base: Vec<Base>,
}

pub fn expected(file: &str) -> Expected {
    let text = std::fs::read_to_string(fixture(file)).expect("expected.json");
    serde_json::from_str(&text).expect("parse expected.json")
}

/// Tokenizes with our tokenizer (no truncation needed for fixtures).
pub fn encode(model: &Model, input: &Input) -> Encoded {
    model
        .tokenizer
        .encode(&input.text, input.text_pair.as_deref(), 10_000, false)
        .expect("tokenize")
}

/// A task whose "logits" are the pooled features themselves (identity
/// head), for comparing encoder outputs.
pub fn identity_task(model: &Model, pooling: Pooling) -> TaskModel {
    let h = model.config().hidden_size;
    TaskModel {
        shallow: None,
        deep: None,
        head: Head::Linear(Linear {
            weight: Tensor::eye(h, candle_core::DType::F32, &Device::Cpu).unwrap(),
            bias: Tensor::zeros(h, candle_core::DType::F32, &Device::Cpu).unwrap(),
        }),
        pooling,
    }
}

pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row count");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "row width");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}
