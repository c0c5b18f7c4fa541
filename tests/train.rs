//! Training: gradients reach the prompt, the training forward equals the
//! serving forward, the folded task serves what was trained, the P-Tuning
//! encoders compute what PEFT's do, the loop learns, checkpoints resume, and
//! the data/metrics plumbing.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use softprompt::engine::synthetic::{Kind, random_input, random_task};
use softprompt::engine::{Engine, Pooling, Row, TaskModel};
use softprompt::model::{Encoded, Model, OpsMode};
use softprompt::task::{BaseModelRef, Provenance, Task, TaskMeta, native};
use softprompt::train::{
    self, Method, Metrics, Params, PromptInit, Reparam, Sample, Spec, TrainConfig, data,
};
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;

fn tiny() -> std::sync::Arc<Model> {
    load_model(&fixture("tiny-bert"))
}

fn spec(
    method: Method,
    reparam: Reparam,
    n: usize,
    template: Option<&str>,
    pooling: Pooling,
) -> Spec {
    Spec {
        method,
        num_virtual: n,
        reparam,
        encoder_hidden: 16,
        encoder_layers: 2,
        template: template.map(str::to_string).unwrap_or_else(|| {
            if method == Method::PTuningV2 {
                "{text}".into()
            } else {
                format!("[P:{n}] {{text}}")
            }
        }),
        pooling,
        num_labels: 3,
    }
}

/// Every method × encoder × pooling combination the trainer supports.
fn all_specs() -> Vec<(&'static str, Spec)> {
    vec![
        (
            "prompt-tuning mean",
            spec(Method::PromptTuning, Reparam::None, 4, None, Pooling::Mean),
        ),
        (
            "prompt-tuning pooler",
            spec(
                Method::PromptTuning,
                Reparam::None,
                4,
                None,
                Pooling::Pooler,
            ),
        ),
        (
            "p-tuning mlp template",
            spec(
                Method::PTuning,
                Reparam::Mlp,
                4,
                Some("[P:2] {text} [P:2]"),
                Pooling::Mean,
            ),
        ),
        (
            "p-tuning lstm",
            spec(Method::PTuning, Reparam::Lstm, 3, None, Pooling::Pooler),
        ),
        (
            "p-tuning-v2",
            spec(Method::PTuningV2, Reparam::None, 5, None, Pooling::Mean),
        ),
        (
            "p-tuning-v2 mlp",
            spec(Method::PTuningV2, Reparam::Mlp, 5, None, Pooling::Pooler),
        ),
    ]
}

fn text_inputs(model: &Model) -> Vec<Encoded> {
    [
        "this is every low cl",
        "to do",
        "at every co to this do at this",
    ]
    .iter()
    .map(|t| model.tokenizer.encode(t, None, 40, true).unwrap())
    .collect()
}

#[test]
fn prompt_and_encoder_and_head_receive_finite_nonzero_gradients() {
    let model = tiny();
    let engine = Engine::new(model.clone());
    let inputs = text_inputs(&model);
    let samples: Vec<Sample> = inputs
        .iter()
        .enumerate()
        .map(|(i, e)| Sample {
            input: e.clone(),
            label: i % 3,
        })
        .collect();
    let refs: Vec<&Sample> = samples.iter().collect();
    for (name, s) in all_specs() {
        let p = Params::init(s, &model, &PromptInit::Random, 7).unwrap();
        let loss = train::batch_loss(&engine, &p.task_model().unwrap(), &refs).unwrap();
        let grads = loss.backward().unwrap();
        assert!(
            p.named().iter().any(|(n, _)| n == "prompt.embedding"),
            "{name}"
        );
        for (vname, var) in p.named() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {vname}"));
            let v: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{name}: {vname} gradient not finite"
            );
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(norm > 1e-9, "{name}: {vname} gradient is zero");
        }
        // The frozen base receives nothing: its tensors are not variables.
        assert!(
            grads.get(model.encoder.word_embeddings()).is_none(),
            "{name}"
        );
    }
}

fn assert_train_equals_serve(
    model: &std::sync::Arc<Model>,
    tasks: &[TaskModel],
    inputs: &[Encoded],
) {
    let engine = Engine::new(model.clone());
    let rows: Vec<Row> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| Row {
            input,
            task: &tasks[i % tasks.len()],
        })
        .collect();
    let collect = |mode| {
        let mut out = vec![Vec::new(); rows.len()];
        for g in engine.forward(&rows, mode).unwrap() {
            for (r, v) in g.rows.iter().zip(g.logits.to_vec2::<f32>().unwrap()) {
                out[*r as usize] = v;
            }
        }
        out
    };
    // The five forwards: fused CPU kernels (serving on the CPU), the device
    // backend (serving on a CUDA GPU; its attention kernel's host build
    // here), candle's ops over a padded grid, the fused training op
    // (training on the CPU), composed ops with a backward (training
    // elsewhere).
    let (serve, dev, ops, tr, tr_ops) = (
        collect(OpsMode::Serve),
        collect(OpsMode::ServeDevice),
        collect(OpsMode::ServeOps),
        collect(OpsMode::Train),
        collect(OpsMode::TrainOps),
    );
    let d = max_abs_diff(&dev, &tr);
    assert!(
        d <= 1e-5,
        "train vs device-backend serve forward: max |Δ| {d}"
    );
    let d = max_abs_diff(&serve, &dev);
    assert!(
        d <= 1e-5,
        "fused vs device-backend serve forward: max |Δ| {d}"
    );
    let d = max_abs_diff(&tr_ops, &tr);
    assert!(d <= 1e-5, "fused training op vs composed ops: max |Δ| {d}");
    let d = max_abs_diff(&serve, &tr);
    assert!(d <= 1e-5, "train vs fused serve forward: max |Δ| {d}");
    let d = max_abs_diff(&ops, &tr);
    assert!(d <= 1e-5, "train vs candle-ops serve forward: max |Δ| {d}");
    let d = max_abs_diff(&serve, &ops);
    assert!(d <= 1e-5, "fused vs candle-ops serve forward: max |Δ| {d}");
    assert!(
        serve.iter().flatten().any(|v| v.abs() > 1e-3),
        "logits are not trivially zero"
    );
}

/// The fused training op's backward (hand-written) against candle's
/// autograd over the composed-op graph: every parameter's gradient, for
/// every method, on a batch of rows of different lengths.
fn assert_fused_gradients_match_composed(model: &std::sync::Arc<Model>, specs: Vec<(&str, Spec)>) {
    let engine = Engine::new(model.clone());
    let texts = [
        "this is every low cl",
        "to do",
        "at every co to this do at this and every other one",
        "do",
    ];
    let samples: Vec<Sample> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| Sample {
            input: model.tokenizer.encode(t, None, 40, true).unwrap(),
            label: i % 3,
        })
        .collect();
    let refs: Vec<&Sample> = samples.iter().collect();
    for (name, s) in specs {
        let p = Params::init(s, model, &PromptInit::Random, 9).unwrap();
        // A head with some weight, so that gradients reach the prompt.
        let mut values = p.values().unwrap();
        let hw = values["head.weight"].dims().to_vec();
        values.insert(
            "head.weight".into(),
            Tensor::randn(0f32, 1.0, hw, &Device::Cpu).unwrap(),
        );
        p.set_values(&values).unwrap();
        let grads = |mode| {
            let loss =
                train::batch_loss_in(&engine, &p.task_model().unwrap(), &refs, mode).unwrap();
            (loss.to_scalar::<f32>().unwrap(), loss.backward().unwrap())
        };
        let (l_fused, g_fused) = grads(OpsMode::Train);
        let (l_ops, g_ops) = grads(OpsMode::TrainOps);
        // Relative: the head is random (candle's CPU RNG takes no seed), so
        // the loss varies run to run (~4.5 on the default model, where two
        // f32 summation orders have differed by 1.1e-5).
        assert!(
            (l_fused - l_ops).abs() <= 1e-5 * l_ops.abs().max(1.0),
            "{name}: loss {l_fused} vs {l_ops}"
        );
        for (vname, var) in p.named() {
            let get = |g: &candle_core::backprop::GradStore| -> Vec<f32> {
                g.get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient for {vname}"))
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let (a, b) = (get(&g_fused), get(&g_ops));
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 1e-8, "{name}: {vname}: zero reference gradient");
            let worst = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                worst <= 1e-4 * scale,
                "{name}: {vname}: fused vs composed gradient max |Δ| {worst} (largest {scale})"
            );
        }
    }
}

#[test]
fn fused_training_gradients_equal_the_composed_op_graph() {
    assert_fused_gradients_match_composed(&tiny(), all_specs());
}

#[test]
fn fused_training_gradients_equal_the_composed_op_graph_on_the_default_model() {
    let model = load_model(&default_model_dir());
    let specs = vec![
        (
            "prompt-tuning",
            spec(Method::PromptTuning, Reparam::None, 10, None, Pooling::Mean),
        ),
        (
            "p-tuning mlp",
            spec(Method::PTuning, Reparam::Mlp, 10, None, Pooling::Mean),
        ),
        (
            "p-tuning-v2 mlp",
            spec(Method::PTuningV2, Reparam::Mlp, 10, None, Pooling::Mean),
        ),
    ];
    assert_fused_gradients_match_composed(&model, specs);
}

#[test]
fn training_forward_equals_serving_forward_on_a_mixed_batch() {
    let model = tiny();
    let c = model.config().clone();
    let dev = Device::Cpu;
    let mut tasks = Vec::new();
    for (i, pooling) in [Pooling::Mean, Pooling::Pooler, Pooling::First]
        .into_iter()
        .enumerate()
    {
        for kind in [Kind::Shallow, Kind::Deep] {
            let mut t =
                random_task(&c, &dev, kind, 3 + i, 2 + i, 11 * i as u64 + kind as u64).unwrap();
            t.pooling = pooling;
            tasks.push(t);
        }
    }
    // A trained-form task with a free-form template and a text pair.
    let p = Params::init(
        spec(
            Method::PTuning,
            Reparam::Lstm,
            4,
            Some("[P:1] {text} [P:2] {text_pair} [P:1]"),
            Pooling::Mean,
        ),
        &model,
        &PromptInit::Random,
        3,
    )
    .unwrap();
    tasks.push(p.fold().unwrap());
    let mut inputs: Vec<Encoded> = (0..9)
        .map(|i| random_input(&c, 3 + 4 * i, i as u64))
        .collect();
    inputs.push(
        model
            .tokenizer
            .encode("this is every", Some("to do at"), 40, true)
            .unwrap(),
    );
    inputs.extend(text_inputs(&model));
    assert_train_equals_serve(&model, &tasks, &inputs);
}

#[test]
fn training_forward_equals_serving_forward_on_the_default_model() {
    let model = load_model(&default_model_dir());
    let c = model.config().clone();
    let mut tasks = Vec::new();
    for kind in [Kind::Shallow, Kind::Deep] {
        let mut t = random_task(&c, &Device::Cpu, kind, 8, 2, kind as u64).unwrap();
        t.pooling = Pooling::Mean;
        tasks.push(t);
    }
    let inputs: Vec<Encoded> = [
        "a gorgeous, witty film",
        "the plot is a mess and the acting is worse",
        "fine",
    ]
    .iter()
    .map(|t| model.tokenizer.encode(t, None, 64, true).unwrap())
    .collect();
    assert_train_equals_serve(&model, &tasks, &inputs);
}

#[test]
fn folded_task_file_holds_only_what_serving_needs_and_serves_the_trained_logits() {
    let model = tiny();
    let engine = Engine::new(model.clone());
    let inputs = text_inputs(&model);
    for (name, s) in all_specs() {
        let is_deep = s.method == Method::PTuningV2;
        let template = s.template.clone();
        let p = Params::init(s, &model, &PromptInit::Random, 5).unwrap();
        let meta = TaskMeta {
            labels: vec!["a".into(), "b".into(), "c".into()],
            template: (!is_deep).then_some(template),
            pooling: p.spec.pooling,
            base_model: BaseModelRef {
                name: model.name.clone(),
                fingerprint: Some(model.fingerprint.clone()),
            },
            provenance: Provenance {
                method: p.spec.method.as_str().into(),
                ..Default::default()
            },
        };
        let bytes = native::to_bytes(&Task::new(meta, p.fold().unwrap()).unwrap()).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let mut names: Vec<String> = header.tensors().into_keys().collect();
        names.sort();
        let want: Vec<&str> = if is_deep {
            vec!["head.bias", "head.weight", "prompt.deep"]
        } else {
            vec!["head.bias", "head.weight", "prompt.shallow"]
        };
        assert_eq!(names, want, "{name}");
        let served = native::from_bytes(&bytes).unwrap();
        let rows: Vec<Row> = inputs
            .iter()
            .map(|input| Row {
                input,
                task: &served.model,
            })
            .collect();
        let got = engine.classify(&rows).unwrap();
        let live = p.task_model().unwrap();
        let rows: Vec<Row> = inputs
            .iter()
            .map(|input| Row { input, task: &live })
            .collect();
        let trained = engine
            .forward(&rows, OpsMode::Train)
            .unwrap()
            .remove(0)
            .logits
            .to_vec2::<f32>()
            .unwrap();
        let d = max_abs_diff(&got, &trained);
        assert!(d <= 1e-5, "{name}: served vs trained logits {d}");
    }
}

/// PEFT's P-Tuning (LSTM, MLP) and prefix-projection encoders, with their
/// weights and outputs, saved by `tests/reference/train_peft.py --fixtures`.
#[test]
fn prompt_encoders_compute_what_peft_computes() {
    let path = fixture("train/peft_encoders.safetensors");
    let all = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let model = tiny();
    let h = model.config().hidden_size;
    let cases = [
        ("lstm", Method::PTuning, Reparam::Lstm, 3),
        ("mlp", Method::PTuning, Reparam::Mlp, 4),
        ("prefix", Method::PTuningV2, Reparam::Mlp, 2),
    ];
    for (case, method, reparam, n) in cases {
        let mut s = spec(method, reparam, n, None, Pooling::Mean);
        s.num_labels = 2;
        let p = Params::init(s, &model, &PromptInit::Random, 1).unwrap();
        let prefix = format!("{case}/");
        let mut values: HashMap<String, Tensor> = all
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k.to_string(), v.clone())))
            .collect();
        let expected = values.remove("output").expect("output");
        values.insert(
            "head.weight".into(),
            Tensor::zeros((2, h), DType::F32, &Device::Cpu).unwrap(),
        );
        values.insert(
            "head.bias".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        p.set_values(&values).unwrap();
        let got = p.effective_prompt().unwrap().to_vec2::<f32>().unwrap();
        let d = max_abs_diff(&got, &expected.to_vec2::<f32>().unwrap());
        assert!(
            d <= 1e-5,
            "{case}: encoder output differs from PEFT's by {d}"
        );
    }
}

/// Rows whose only content token decides the label: 3 classes.
fn separable(n: usize) -> Vec<Sample> {
    (0..n)
        .map(|i| {
            let label = i % 3;
            let word = [150u32, 160, 170][label];
            let filler = 120 + (i as u32 * 7) % 20;
            Sample {
                input: Encoded {
                    ids: vec![2, filler, word, filler + 1, 3],
                    type_ids: vec![0; 5],
                    pair_start: None,
                },
                label,
            }
        })
        .collect()
}

#[test]
fn training_learns_a_separable_task_and_keeps_the_best_validation_state() {
    let model = tiny();
    let engine = Engine::new(model.clone());
    let data = separable(48);
    let (tr, val) = data.split_at(36);
    let p = Params::init(
        spec(Method::PromptTuning, Reparam::None, 4, None, Pooling::Mean),
        &model,
        &PromptInit::Vocab,
        3,
    )
    .unwrap();
    let before = train::accuracy(&engine, &p.fold().unwrap(), val, 16).unwrap();
    let cfg = TrainConfig {
        batch_size: 6,
        lr: 0.05,
        epochs: 12,
        eval_every: 6,
        progress: false,
        ..Default::default()
    };
    let out = train::train(&engine, &p, tr, val, &cfg, &AtomicBool::new(false)).unwrap();
    assert_eq!(out.steps, 72);
    let after = train::accuracy(&engine, &p.fold().unwrap(), val, 16).unwrap();
    assert!(
        before < 0.7,
        "untrained accuracy {before} (task too easy to prove anything)"
    );
    assert_eq!(
        after, 1.0,
        "validation accuracy after training: {after}; evals {:?}",
        out.evals
    );
    assert_eq!(Some(after), out.best_val_accuracy);
    let first = out.evals.first().unwrap().train_loss;
    let last = out.evals.last().unwrap().train_loss;
    assert!(last < first * 0.5, "loss {first} -> {last}");
}

#[test]
fn interrupted_run_leaves_a_checkpoint_that_resumes() {
    let model = tiny();
    let engine = Engine::new(model.clone());
    let data = separable(24);
    let dir = std::env::temp_dir().join(format!("softprompt-train-{}", std::process::id()));
    let ckpt = dir.join("run.ckpt");
    let _ = std::fs::remove_dir_all(&dir);
    let s = spec(Method::PTuning, Reparam::Mlp, 2, None, Pooling::Mean);
    let cfg = TrainConfig {
        batch_size: 8,
        max_steps: Some(4),
        progress: false,
        checkpoint: Some(ckpt.clone()),
        resume: true,
        ..Default::default()
    };

    let p1 = Params::init(s.clone(), &model, &PromptInit::Random, 1).unwrap();
    let out = train::train(&engine, &p1, &data, &[], &cfg, &AtomicBool::new(false)).unwrap();
    assert_eq!((out.steps, train::checkpoint_step(&ckpt).unwrap()), (4, 4));
    let trained = p1.values().unwrap();

    // A fresh run that is stopped at once: it loads the checkpoint, writes it
    // back unchanged, and reports the interruption.
    let p2 = Params::init(s.clone(), &model, &PromptInit::Random, 2).unwrap();
    let cfg8 = TrainConfig {
        max_steps: Some(8),
        ..cfg.clone()
    };
    let out = train::train(&engine, &p2, &data, &[], &cfg8, &AtomicBool::new(true)).unwrap();
    assert!(out.interrupted);
    assert_eq!((out.steps, train::checkpoint_step(&ckpt).unwrap()), (4, 4));
    for (name, t) in p2.values().unwrap() {
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = trained[&name].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{name} restored from the checkpoint");
    }
    // Resumed without interruption it runs the remaining steps only.
    let out = train::train(&engine, &p2, &data, &[], &cfg8, &AtomicBool::new(false)).unwrap();
    assert_eq!((out.steps, train::checkpoint_step(&ckpt).unwrap()), (8, 8));
    // A checkpoint of another spec is refused.
    let other = Params::init(
        spec(Method::PTuning, Reparam::Lstm, 2, None, Pooling::Mean),
        &model,
        &PromptInit::Random,
        1,
    )
    .unwrap();
    let err =
        train::train(&engine, &other, &data, &[], &cfg8, &AtomicBool::new(false)).unwrap_err();
    assert!(err.to_string().contains("checkpoint was made for"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resumed_run_ends_where_an_uninterrupted_run_ends() {
    // The optimizer's moments travel in the checkpoint: 4 steps, a resume,
    // and 4 more steps give the parameters of 8 steps in one go. (With the
    // moments restarted from zero on resume they differ by ~4e-2.)
    let model = tiny();
    let engine = Engine::new(model.clone());
    let data = separable(24);
    let dir = tempfile::tempdir().unwrap();
    let s = spec(Method::PTuning, Reparam::Mlp, 2, None, Pooling::Mean);
    let base = TrainConfig {
        batch_size: 8,
        progress: false,
        lr: 0.05,
        head_lr: 0.05,
        warmup: 0.0,
        ..Default::default()
    };

    let straight = Params::init(s.clone(), &model, &PromptInit::Random, 7).unwrap();
    let cfg = TrainConfig {
        max_steps: Some(8),
        ..base.clone()
    };
    train::train(
        &engine,
        &straight,
        &data,
        &[],
        &cfg,
        &AtomicBool::new(false),
    )
    .unwrap();

    let ckpt = dir.path().join("run.ckpt");
    let resumed = Params::init(s.clone(), &model, &PromptInit::Random, 7).unwrap();
    let first = TrainConfig {
        max_steps: Some(8),
        checkpoint: Some(ckpt.clone()),
        resume: true,
        ..base.clone()
    };
    let half = TrainConfig {
        pause_at: Some(4),
        ..first.clone()
    };
    let out = train::train(
        &engine,
        &resumed,
        &data,
        &[],
        &half,
        &AtomicBool::new(false),
    )
    .unwrap();
    assert!(out.interrupted);
    assert_eq!((out.steps, train::checkpoint_step(&ckpt).unwrap()), (4, 4));
    let fresh = Params::init(s, &model, &PromptInit::Random, 99).unwrap();
    let out = train::train(&engine, &fresh, &data, &[], &first, &AtomicBool::new(false)).unwrap();
    assert_eq!(out.steps, 8);

    let want = straight.values().unwrap();
    for (name, t) in fresh.values().unwrap() {
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = want[&name].flatten_all().unwrap().to_vec1().unwrap();
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= 1e-6,
            "{name}: resumed differs from uninterrupted by {diff}"
        );
    }
}

#[test]
fn specs_that_make_no_sense_are_refused_with_the_reason() {
    let model = tiny();
    for (s, needle) in [
        (
            spec(Method::PTuning, Reparam::None, 3, None, Pooling::Mean),
            "needs a prompt encoder",
        ),
        (
            spec(Method::PromptTuning, Reparam::Mlp, 3, None, Pooling::Mean),
            "trains the prompt directly",
        ),
        (
            spec(Method::PTuningV2, Reparam::Lstm, 3, None, Pooling::Mean),
            "none or mlp",
        ),
        (
            spec(
                Method::PromptTuning,
                Reparam::None,
                3,
                Some("[P:2] {text}"),
                Pooling::Mean,
            ),
            "expected 3 virtual tokens",
        ),
        (
            spec(
                Method::PTuningV2,
                Reparam::None,
                3,
                Some("[P:3] {text}"),
                Pooling::Mean,
            ),
            "deep prompts have no placement",
        ),
    ] {
        let err = Params::init(s, &model, &PromptInit::Random, 1)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn text_init_uses_the_word_embeddings_of_the_text_repeated() {
    let model = tiny();
    let p = Params::init(
        spec(Method::PromptTuning, Reparam::None, 5, None, Pooling::Mean),
        &model,
        &PromptInit::Text("this".into()),
        1,
    )
    .unwrap();
    // "this" → [CLS] this [SEP] = ids 2, 111, 3 (tests/fixtures/tiny-bert/vocab.txt), cycled to 5.
    let ids = Tensor::new(&[2u32, 111, 3, 2, 111], &Device::Cpu).unwrap();
    let want = model
        .encoder
        .word_embeddings()
        .index_select(&ids, 0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let got = p.effective_prompt().unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(got, want);
}

#[test]
fn jsonl_and_csv_parse_with_pairs_and_errors_name_the_line() {
    let ex = data::parse_jsonl(
        "{\"text\":\"a\",\"label\":1}\n\n{\"text\":\"b\",\"text_pair\":\"c\",\"label\":\"pos\"}\n",
        "f",
    )
    .unwrap();
    assert_eq!(
        ex[0],
        data::Example {
            text: "a".into(),
            text_pair: None,
            label: "1".into(),
            line: 1,
        }
    );
    assert_eq!(ex[1].text_pair.as_deref(), Some("c"));
    let err = data::parse_jsonl("{\"text\":\"a\",\"label\":1}\n{\"label\":2}\n", "f.jsonl")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("f.jsonl:2") && err.contains("\"text\": missing"),
        "{err}"
    );
    let ex = data::parse_csv(
        "label,text,text_pair\npos,\"hello, world\",\nneg,bye,x\n",
        "f.csv",
    )
    .unwrap();
    assert_eq!(
        ex[0],
        data::Example {
            text: "hello, world".into(),
            text_pair: None,
            label: "pos".into(),
            line: 2,
        }
    );
    assert_eq!(ex[1].text_pair.as_deref(), Some("x"));
    let err = data::parse_csv("sentence,label\nx,1\n", "f.csv")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("expected columns \"text\" and \"label\"")
            && err.contains("no \"text\" column"),
        "{err}"
    );
    let labels = data::label_set(&data::parse_jsonl("{\"text\":\"a\",\"label\":10}\n{\"text\":\"a\",\"label\":9}\n{\"text\":\"a\",\"label\":9}\n", "f").unwrap());
    assert_eq!(labels, vec!["9", "10"]);
}

#[test]
fn split_is_seeded_disjoint_and_complete() {
    let ex: Vec<data::Example> = (0..100)
        .map(|i| data::Example {
            text: format!("t{i}"),
            text_pair: None,
            label: "x".into(),
            line: i + 1,
        })
        .collect();
    let (a, b) = data::split(&ex, 0.2, 9);
    let (a2, b2) = data::split(&ex, 0.2, 9);
    let (_, b3) = data::split(&ex, 0.2, 10);
    assert_eq!((a.len(), b.len()), (80, 20));
    assert_eq!((&a, &b), (&a2, &b2));
    assert_ne!(b, b3);
    let mut all: Vec<String> = a.iter().chain(&b).map(|e| e.text.clone()).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 100);
}

#[test]
fn metrics_match_hand_computed_values() {
    // gold 0 0 1 1 2 2, predicted 0 1 1 1 2 0. By hand (and sklearn's
    // f1_score(average="macro")): F1 per label 1/2, 4/5, 2/3 → 0.655556.
    let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let m = Metrics::compute(&[0, 0, 1, 1, 2, 2], &[0, 1, 1, 1, 2, 0], &labels);
    assert_eq!(
        m.confusion,
        vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 1]]
    );
    assert!((m.accuracy - 4.0 / 6.0).abs() < 1e-12);
    assert!((m.macro_f1 - (0.5 + 0.8 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
    assert!((m.per_label[1].precision - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(m.per_label[2].support, 2);
    let r = m.report();
    assert!(
        r.contains("accuracy   0.6667") && r.contains("macro-F1   0.6556"),
        "{r}"
    );
}

#[test]
fn train_and_eval_commands_write_and_score_a_task_file() {
    let dir = std::env::temp_dir().join(format!("softprompt-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let words = ["this", "to", "do"];
    let mut lines = String::new();
    for i in 0..60 {
        let l = i % 3;
        lines += &format!(
            "{{\"text\": \"at {} every\", \"label\": \"{}\"}}\n",
            words[l],
            ["x", "y", "z"][l]
        );
    }
    std::fs::write(dir.join("d.jsonl"), &lines).unwrap();
    let bin = env!("CARGO_BIN_EXE_softprompt");
    let out = dir.join("t.safetensors");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(bin).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let model = fixture("tiny-bert");
    let (m, d, o) = (
        model.to_str().unwrap(),
        dir.join("d.jsonl"),
        out.to_str().unwrap(),
    );
    let d = d.to_str().unwrap();
    run(&[
        "train",
        "--model",
        m,
        "--train",
        d,
        "--output",
        o,
        "--method",
        "p-tuning",
        "--reparam",
        "lstm",
        "--encoder-hidden",
        "8",
        "--virtual-tokens",
        "3",
        "--steps",
        "40",
        "--batch-size",
        "6",
        "--lr",
        "0.05",
        "--quiet",
        "--test",
        d,
    ]);
    let task = native::read_file(&out).unwrap();
    assert_eq!(task.meta.labels, vec!["x", "y", "z"]);
    assert_eq!(task.meta.pooling, Pooling::Mean);
    assert_eq!(task.meta.provenance.method, "p-tuning");
    assert!(
        task.meta.provenance.metrics["test_accuracy"]
            .as_f64()
            .unwrap()
            > 0.9,
        "{}",
        task.meta.provenance.metrics
    );
    let report = run(&["eval", "--model", m, o, d]);
    assert!(
        report.contains("accuracy") && report.contains("confusion"),
        "{report}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&run(&["eval", "--model", m, o, d, "--json"])).unwrap();
    assert_eq!(json["examples"], 60);
    assert_eq!(
        json["accuracy"].as_f64(),
        task.meta.provenance.metrics["test_accuracy"].as_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The backward (including the frozen-weight shortcut in `Linear::forward`)
/// agrees with central finite differences of the loss, for a shallow and a
/// deep prompt on tiny-bert.
#[test]
fn prompt_gradient_matches_finite_differences() {
    let model = tiny();
    let engine = Engine::new(model.clone());
    let inputs = text_inputs(&model);
    let samples: Vec<Sample> = inputs
        .iter()
        .enumerate()
        .map(|(i, e)| Sample {
            input: e.clone(),
            label: i % 3,
        })
        .collect();
    let refs: Vec<&Sample> = samples.iter().collect();
    for s in [
        spec(Method::PromptTuning, Reparam::None, 3, None, Pooling::Mean),
        spec(Method::PTuningV2, Reparam::None, 2, None, Pooling::Pooler),
    ] {
        let p = Params::init(s.clone(), &model, &PromptInit::Random, 4).unwrap();
        // A head with some weight, so the prompt's gradient is not tiny.
        let mut values = p.values().unwrap();
        let hw = values["head.weight"].dims().to_vec();
        values.insert(
            "head.weight".into(),
            Tensor::randn(0f32, 1.0, hw, &Device::Cpu).unwrap(),
        );
        p.set_values(&values).unwrap();
        let loss_at = |emb: &Tensor| -> f64 {
            let mut v = values.clone();
            v.insert("prompt.embedding".into(), emb.clone());
            p.set_values(&v).unwrap();
            let l = train::batch_loss(&engine, &p.task_model().unwrap(), &refs)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            p.set_values(&values).unwrap();
            l
        };
        let loss = train::batch_loss(&engine, &p.task_model().unwrap(), &refs).unwrap();
        let emb_var = p
            .named()
            .iter()
            .find(|(n, _)| n == "prompt.embedding")
            .unwrap()
            .1
            .clone();
        let grad: Vec<f32> = loss
            .backward()
            .unwrap()
            .get(emb_var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let emb: Vec<f32> = values["prompt.embedding"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let shape = values["prompt.embedding"].dims().to_vec();
        // The five largest components.
        let mut order: Vec<usize> = (0..grad.len()).collect();
        order.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
        for &k in &order[..5] {
            let eps = 1e-2f32;
            let bump = |d: f32| {
                let mut e = emb.clone();
                e[k] += d;
                Tensor::from_vec(e, shape.clone(), &Device::Cpu).unwrap()
            };
            let numeric = (loss_at(&bump(eps)) - loss_at(&bump(-eps))) / (2.0 * eps as f64);
            let analytic = grad[k] as f64;
            assert!(
                (numeric - analytic).abs() <= 2e-2 * analytic.abs().max(1e-3),
                "{:?} component {k}: backward {analytic}, finite difference {numeric}",
                s.method
            );
        }
    }
}

#[test]
fn peft_dir_holds_the_same_task_and_is_refused_for_mean_pooling() {
    let dir = std::env::temp_dir().join(format!("softprompt-peftdir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let lines: String = (0..12)
        .map(|i| {
            format!(
                "{{\"text\": \"at {} every\", \"label\": {}}}\n",
                ["this", "to"][i % 2],
                i % 2
            )
        })
        .collect();
    let data = dir.join("d.jsonl");
    std::fs::write(&data, lines).unwrap();
    let bin = env!("CARGO_BIN_EXE_softprompt");
    let model = fixture("tiny-bert");
    let out = dir.join("t.safetensors");
    let peft_dir = dir.join("adapter");
    let run = |pooling: &str| {
        std::process::Command::new(bin)
            .args([
                "train",
                "--model",
                model.to_str().unwrap(),
                "--train",
                data.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ])
            .args([
                "--method",
                "p-tuning-v2",
                "--virtual-tokens",
                "3",
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--quiet",
                "--pooling",
                pooling,
            ])
            .args(["--peft-dir", peft_dir.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let refused = run("mean");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--pooling pooler"));
    assert!(!out.exists(), "refused before training");
    let ok = run("pooler");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let native_task = native::read_file(&out).unwrap();
    let peft_task = softprompt::task::peft::read_dir(&peft_dir, None).unwrap();
    let m = load_model(&model);
    let engine = Engine::new(m.clone());
    let inputs = text_inputs(&m);
    let logits = |t: &TaskModel| {
        engine
            .classify(
                &inputs
                    .iter()
                    .map(|input| Row { input, task: t })
                    .collect::<Vec<_>>(),
            )
            .unwrap()
    };
    let d = max_abs_diff(&logits(&native_task.model), &logits(&peft_task.model));
    assert!(d <= 1e-6, "native vs PEFT adapter logits differ by {d}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `softprompt train` on the tiny model with data files written from
/// `files` (name, content) into a fresh directory; `args` name them by file
/// name. Expects a failure before training (no checkpoint, no output) and
/// returns its stderr.
fn train_refuses(files: &[(&str, &str)], args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    let out = dir.path().join("t.safetensors");
    let model = fixture("tiny-bert");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_softprompt"))
        .current_dir(dir.path())
        .args(["train", "--model", model.to_str().unwrap()])
        .args(["--output", out.to_str().unwrap()])
        .args(["--virtual-tokens", "2", "--steps", "2", "--batch-size", "4"])
        .arg("--quiet")
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{args:?} was accepted: {err}");
    assert!(!out.exists(), "{args:?}: wrote the task");
    assert!(
        !dir.path().join("t.safetensors.ckpt").exists(),
        "{args:?}: training started before the data was refused: {err}"
    );
    err
}

const TWO_CLASSES: &str = "{\"text\": \"at this\", \"label\": \"a\"}\n{\"text\": \"to do\", \"label\": \"b\"}\n{\"text\": \"at do\", \"label\": \"a\"}\n{\"text\": \"to this\", \"label\": \"b\"}\n";

#[test]
fn unknown_label_in_validation_or_test_data_is_refused_with_its_line() {
    let val =
        "{\"text\": \"at this\", \"label\": \"a\"}\n\n{\"text\": \"to do\", \"label\": \"c\"}\n";
    for flag in ["--val", "--test"] {
        let err = train_refuses(
            &[("train.jsonl", TWO_CLASSES), ("other.jsonl", val)],
            &["--train", "train.jsonl", flag, "other.jsonl"],
        );
        assert!(
            err.contains("other.jsonl:3")
                && err.contains("unknown label \"c\"")
                && err.contains("training labels [\"a\", \"b\"]"),
            "{flag}: {err}"
        );
    }
    // A CSV names the line of the record.
    let err = train_refuses(
        &[
            ("train.jsonl", TWO_CLASSES),
            ("val.csv", "text,label\nat this,a\nto do,zz\n"),
        ],
        &["--train", "train.jsonl", "--val", "val.csv"],
    );
    assert!(
        err.contains("val.csv:3") && err.contains("unknown label \"zz\""),
        "{err}"
    );
    // With --labels, a training label outside them is refused as well.
    let err = train_refuses(
        &[("train.jsonl", TWO_CLASSES)],
        &["--train", "train.jsonl", "--labels", "a,x"],
    );
    assert!(
        err.contains("train.jsonl:2")
            && err.contains("unknown label \"b\"")
            && err.contains("--labels"),
        "{err}"
    );
}

#[test]
fn empty_text_is_refused_with_its_file_and_line() {
    let jsonl = format!("{TWO_CLASSES}{{\"text\": \"  \\t \", \"label\": \"a\"}}\n");
    let err = train_refuses(&[("train.jsonl", &jsonl)], &["--train", "train.jsonl"]);
    assert!(err.contains("train.jsonl:5: empty text"), "{err}");
    let err = train_refuses(
        &[("train.csv", "text,label\nat this,a\n\"\",b\nto do,b\n")],
        &["--train", "train.csv"],
    );
    assert!(err.contains("train.csv:3: empty text"), "{err}");
    // In test data too, before training.
    let err = train_refuses(
        &[
            ("train.jsonl", TWO_CLASSES),
            ("test.jsonl", "{\"text\": \"\", \"label\": \"a\"}\n"),
        ],
        &["--train", "train.jsonl", "--test", "test.jsonl"],
    );
    assert!(err.contains("test.jsonl:1: empty text"), "{err}");
}

#[test]
fn csv_without_a_label_column_is_refused() {
    let err = train_refuses(
        &[("train.csv", "text,category\nat this,a\nto do,b\n")],
        &["--train", "train.csv"],
    );
    assert!(
        err.contains("train.csv:1: header: no \"label\" column")
            && err.contains("found [\"text\", \"category\"]"),
        "{err}"
    );
}

#[test]
fn training_data_with_one_class_is_refused() {
    let one =
        "{\"text\": \"at this\", \"label\": \"a\"}\n{\"text\": \"to do\", \"label\": \"a\"}\n";
    let err = train_refuses(&[("train.jsonl", one)], &["--train", "train.jsonl"]);
    assert!(
        err.contains("train.jsonl: only one class")
            && err.contains("2 examples has the label \"a\""),
        "{err}"
    );
    // Naming two labels does not make the data have two classes.
    let err = train_refuses(
        &[("train.jsonl", one)],
        &["--train", "train.jsonl", "--labels", "a,b"],
    );
    assert!(err.contains("only one class"), "{err}");
}
