//! Parity with HF PEFT 0.21 / transformers 4.57: logits and features that
//! `tests/reference/make_fixtures.py` computed with the reference stack.

mod common;

use common::*;
use softprompt::engine::{Engine, Kernels, Pooling, Row};
use softprompt::task::peft;

const TOL: f32 = 1e-4;

/// Every serving forward: our fused CPU kernels, the device backend (what
/// a GPU runs, here through its attention kernel's host build) and
/// candle's ops over a padded grid, the last two forced on the CPU.
const KERNELS: [Kernels; 3] = [Kernels::Auto, Kernels::Device, Kernels::Candle];

/// How a forward is checked against PEFT's logits.
#[derive(Clone, Copy, Debug)]
enum Check {
    /// f32: every logit within [`TOL`], on both serving forwards.
    Exact,
    /// `--quantize int8`: every probability within this bound and the
    /// same top label, on the fused forward (the one that serves int8).
    Int8(f32),
    /// `--dtype f16|bf16` through the device backend: every probability
    /// within this bound and the same top label.
    Half(candle_core::DType, f32),
}

/// The 16-bit bound on probabilities (issue 12: 1e-2, and the same top label).
const HALF_PROB_TOL: f32 = 1e-2;

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
            Check::Half(dtype, _) => {
                let mut m = std::sync::Arc::into_inner(model).unwrap();
                m.encoder.cast(dtype).unwrap();
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
        let bounded = match check {
            Check::Int8(tol) => Some((Kernels::Auto, tol)),
            Check::Half(_, tol) => Some((Kernels::Device, tol)),
            Check::Exact => None,
        };
        if let Some((kernels, tol)) = bounded {
            let mut worst = 0f32;
            // Tasks are placed on the device as the registry places them:
            // prompts in the encoder's dtype.
            let task = task
                .to_device(model.encoder.device(), model.encoder.dtype())
                .unwrap();
            let rows: Vec<Row> = rows
                .iter()
                .map(|r| Row {
                    input: r.input,
                    task: &task,
                })
                .collect();
            let got = Engine::with_kernels(model.clone(), kernels)
                .classify(&rows)
                .unwrap();
            for (i, (g, w)) in got.iter().zip(&case.logits).enumerate() {
                let (pg, pw) = (softmax(g), softmax(w));
                let diff = pg
                    .iter()
                    .zip(&pw)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                worst = worst.max(diff);
                assert!(
                    diff <= tol && argmax(g) == argmax(w),
                    "{} ({}) input {i}, {check:?}: max |Δp| {diff} (bound {tol}), top label {} vs PEFT's {}\n got p {pg:?}\n want p {pw:?}",
                    case.adapter,
                    case.peft_type,
                    argmax(g),
                    argmax(w)
                );
            }
            eprintln!(
                "{} ({}), {check:?}: worst |Δp| {worst}",
                case.adapter, case.peft_type
            );
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
            ("unpacked", model.clone(), KERNELS[2]),
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

/// The held-out adapters on the default model, resident in f16 and in
/// bf16 and served by the device backend (what a GPU serves with by
/// default): PEFT's probabilities within 1e-2 and the same top label.
#[test]
fn default_model_in_16_bits_stays_close_to_peft() {
    let dir = default_model_dir();
    for dtype in [candle_core::DType::F16, candle_core::DType::BF16] {
        check_cases_with(
            "minilm-expected.json",
            |_| dir.clone(),
            "minilm-adapters",
            Check::Half(dtype, HALF_PROB_TOL),
        );
    }
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
