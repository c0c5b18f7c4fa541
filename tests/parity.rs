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

fn check_cases(file: &str, model_dir: impl Fn(&str) -> std::path::PathBuf, adapters: &str) {
    let exp = expected(file);
    assert!(!exp.cases.is_empty());
    for case in &exp.cases {
        let model = load_model(&model_dir(&case.model));
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
        for kernels in KERNELS {
            let got = Engine::with_kernels(model.clone(), kernels)
                .classify(&rows)
                .unwrap();
            let diff = max_abs_diff(&got, &case.logits);
            assert!(
                diff <= TOL,
                "{} ({}, {kernels:?}): max |Δlogit| {diff} > {TOL}\n got {got:?}\n want {:?}",
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
