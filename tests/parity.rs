//! Parity with HF PEFT 0.21 / transformers 4.57: logits and features that
//! `tests/reference/make_fixtures.py` computed with the reference stack.

mod common;

use common::*;
use softprompt::engine::{Engine, Kernels, Pooling, Row};
use softprompt::task::peft;

const TOL: f32 = 1e-4;

/// Both serving forwards: our fused CPU kernels, and candle's ops (what a
/// GPU runs), forced on the CPU.
const KERNELS: [Kernels; 2] = [Kernels::Auto, Kernels::Candle];

/// How a forward is checked against PEFT's logits.
#[derive(Clone, Copy)]
enum Check {
    /// f32: every logit within [`TOL`], on both serving forwards.
    Exact,
    /// `--quantize int8`: every probability within this bound and the
    /// same top label, on the fused forward (the one that serves int8).
    Int8(f32),
}

/// The int8 path's bound on probabilities on the default model (issue 15).
const INT8_PROB_TOL: f32 = 1e-2;
/// ... on the tiny random models (hidden size 32): a dot product of 32
/// terms averages out far less quantization noise than one of 384, and
/// their worst case measured 0.033 (PEFT 0.21 fixtures, 2026-12-01).
const INT8_TINY_PROB_TOL: f32 = 5e-2;

fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().fold(f32::MIN, |a, &b| a.max(b));
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn argmax(x: &[f32]) -> usize {
    (0..x.len()).fold(0, |b, i| if x[i] > x[b] { i } else { b })
}

fn check_cases(file: &str, model_dir: impl Fn(&str) -> std::path::PathBuf, adapters: &str) {
    check_cases_with(file, model_dir, adapters, Check::Exact);
}

fn check_cases_with(
    file: &str,
    model_dir: impl Fn(&str) -> std::path::PathBuf,
    adapters: &str,
    check: Check,
) {
    let exp = expected(file);
    assert!(!exp.cases.is_empty());
    for case in &exp.cases {
        let model = load_model(&model_dir(&case.model));
        let model = match check {
            Check::Exact => model,
            Check::Int8(_) => {
                let mut m = std::sync::Arc::into_inner(model).unwrap();
                m.encoder.pack(softprompt::model::Quantize::Int8).unwrap();
                std::sync::Arc::new(m)
            }
        };
        let task = peft::read_dir(&fixture(&format!("{adapters}/{}", case.adapter)), None)
            .unwrap_or_else(|e| panic!("{}: {e}", case.adapter));
        assert_eq!(task.model.num_labels(), case.num_labels, "{}", case.adapter);
        let encoded: Vec<_> = case.inputs.iter().map(|i| encode(&model, i)).collect();
        for (e, (ids, types)) in encoded
            .iter()
            .zip(case.input_ids.iter().zip(&case.token_type_ids))
        {
            assert_eq!(&e.ids, ids, "{}: token ids", case.adapter);
            assert_eq!(&e.type_ids, types, "{}: token types", case.adapter);
        }
        let rows: Vec<Row> = encoded
            .iter()
            .map(|input| Row {
                input,
                task: &task.model,
            })
            .collect();
        if let Check::Int8(tol) = check {
            let got = Engine::new(model.clone()).classify(&rows).unwrap();
            for (i, (g, w)) in got.iter().zip(&case.logits).enumerate() {
                let (pg, pw) = (softmax(g), softmax(w));
                let diff = pg
                    .iter()
                    .zip(&pw)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(
                    diff <= tol && argmax(g) == argmax(w),
                    "{} ({}) input {i}, int8: max |Δp| {diff} (bound {tol}), top label {} vs PEFT's {}\n got p {pg:?}\n want p {pw:?}",
                    case.adapter,
                    case.peft_type,
                    argmax(g),
                    argmax(w)
                );
            }
            continue;
        }
        // As `serve` runs it (f32 weights packed at load, our kernels), and
        // unpacked through both forwards (gemm).
        let packed = {
            let mut m =
                softprompt::model::Model::load(&model_dir(&case.model), &candle_core::Device::Cpu)
                    .unwrap();
            m.encoder.pack(softprompt::model::Quantize::None).unwrap();
            std::sync::Arc::new(m)
        };
        let runs = [
            ("packed", packed, Kernels::Auto),
            ("unpacked", model.clone(), KERNELS[0]),
            ("unpacked", model.clone(), KERNELS[1]),
        ];
        for (weights, model, kernels) in runs {
            let got = Engine::with_kernels(model, kernels)
                .classify(&rows)
                .unwrap();
            let diff = max_abs_diff(&got, &case.logits);
            assert!(
                diff <= TOL,
                "{} ({}, {kernels:?}, {weights} weights): max |Δlogit| {diff} > {TOL}\n got {got:?}\n want {:?}",
                case.adapter,
                case.peft_type,
                case.logits
            );
        }
    }
}

#[test]
fn tiny_models_match_peft_for_every_adapter_kind() {
    check_cases("expected.json", fixture, "adapters");
}

#[test]
fn default_model_matches_peft() {
    let dir = default_model_dir();
    check_cases("minilm-expected.json", |_| dir.clone(), "minilm-adapters");
}

/// The held-out adapters on the default model, served int8: PEFT's
/// probabilities within 1e-2 and the same top label.
#[test]
fn default_model_int8_stays_close_to_peft() {
    let dir = default_model_dir();
    check_cases_with(
        "minilm-expected.json",
        |_| dir.clone(),
        "minilm-adapters",
        Check::Int8(INT8_PROB_TOL),
    );
}

/// The same on the tiny models of every adapter kind (a looser bound:
/// [`INT8_TINY_PROB_TOL`]).
#[test]
fn tiny_models_int8_stay_close_to_peft() {
    check_cases_with(
        "expected.json",
        fixture,
        "adapters",
        Check::Int8(INT8_TINY_PROB_TOL),
    );
}

fn check_base(file: &str, model_dir: impl Fn(&str) -> std::path::PathBuf) {
    for base in expected(file).base {
        let model = load_model(&model_dir(&base.model));
        let encoded: Vec<_> = base.inputs.iter().map(|i| encode(&model, i)).collect();
        for (e, ids) in encoded.iter().zip(&base.input_ids) {
            assert_eq!(&e.ids, ids, "{}: token ids", base.model);
        }
        let mut checks = vec![
            (Pooling::First, base.cls_hidden.clone()),
            (Pooling::Mean, base.mean_pooled.clone()),
        ];
        if let Some(p) = &base.pooler_output {
            checks.push((Pooling::Pooler, p.clone()));
        }
        for (pooling, want) in checks {
            let task = identity_task(&model, pooling);
            let rows: Vec<Row> = encoded
                .iter()
                .map(|input| Row { input, task: &task })
                .collect();
            for kernels in KERNELS {
                let got = Engine::with_kernels(model.clone(), kernels)
                    .classify(&rows)
                    .unwrap();
                let diff = max_abs_diff(&got, &want);
                assert!(
                    diff <= TOL,
                    "{} {pooling:?} {kernels:?}: max |Δ| {diff}",
                    base.model
                );
            }
        }
    }
}

#[test]
fn base_encoder_features_match_transformers() {
    check_base("expected.json", fixture);
}

#[test]
fn sentence_transformers_naming_without_bert_prefix_loads_the_same_model() {
    // tiny-bert-st holds the same weights with the `bert.` prefix stripped.
    check_base("expected.json", |m| {
        if m == "tiny-bert" {
            fixture("tiny-bert-st")
        } else {
            fixture(m)
        }
    });
}

#[test]
fn default_model_features_match_transformers() {
    let dir = default_model_dir();
    check_base("minilm-expected.json", |_| dir.clone());
}
