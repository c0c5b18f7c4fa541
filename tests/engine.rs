//! Engine behaviour that does not need a reference run: batch invariance,
//! template placement, loader fallbacks and error messages. (Numerical
//! parity with PEFT is in tests/parity.rs.)

mod common;

use candle_core::{Device, IndexOp, Tensor};
use common::*;
use softprompt::engine::{Engine, Kernels, Pooling, Row, ShallowPrompt, TaskModel, Template};
use softprompt::model::{Encoded, Model, OpsMode};
use softprompt::task::peft;

/// Every row of a mixed batch (shallow, deep, both model kinds' adapters,
/// singles and pairs, different lengths) equals the same row run alone.
fn assert_batch_invariant(model_name: &str, adapters: &[&str]) {
    for kernels in [Kernels::Auto, Kernels::Candle, Kernels::Device] {
        assert_batch_invariant_with(model_name, adapters, kernels);
    }
}

fn assert_batch_invariant_with(model_name: &str, adapters: &[&str], kernels: Kernels) {
    let model = load_model(&fixture(model_name));
    let engine = Engine::with_kernels(model.clone(), kernels);
    let tasks: Vec<_> = adapters
        .iter()
        .map(|a| {
            peft::read_dir(&fixture(&format!("adapters/{a}")), None)
                .unwrap()
                .model
        })
        .collect();
    let exp = expected("expected.json");
    let inputs: Vec<Encoded> = exp.cases[0]
        .inputs
        .iter()
        .map(|i| encode(&model, i))
        .collect();
    let mut rows = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        for (t, task) in tasks.iter().enumerate() {
            if (i + t) % 2 == 0 || t == 0 {
                rows.push(Row { input, task });
            }
        }
    }
    let mixed = engine.classify(&rows).unwrap();
    for (r, row) in rows.iter().enumerate() {
        let alone = engine.classify(std::slice::from_ref(row)).unwrap();
        let d = max_abs_diff(&alone, &mixed[r..r + 1]);
        assert!(
            d <= 1e-5,
            "{model_name} ({kernels:?}) row {r}: |Δlogit| {d} alone vs mixed"
        );
    }
}

#[test]
fn the_candle_switch_serves_through_candle_ops_not_the_fused_kernels() {
    let model = load_model(&fixture("tiny-bert"));
    let auto = Engine::with_kernels(model.clone(), Kernels::Auto);
    let candle = Engine::with_kernels(model.clone(), Kernels::Candle);
    assert!(model.encoder.fused(auto.serve_mode()));
    assert_eq!(candle.serve_mode(), OpsMode::ServeOps);
    assert!(!model.encoder.fused(candle.serve_mode()));
    let device = Engine::with_kernels(model.clone(), Kernels::Device);
    assert_eq!(device.serve_mode(), OpsMode::ServeDevice);
    assert!(!model.encoder.fused(device.serve_mode()));
}

#[test]
fn rows_do_not_depend_on_what_else_is_in_the_batch_bert() {
    assert_batch_invariant(
        "tiny-bert",
        &[
            "pt_random_2",
            "prefix_2",
            "ptune_lstm_3",
            "prefix_proj_3",
            "pt_text_3",
            "ptune_mlp_2",
        ],
    );
}

#[test]
fn rows_do_not_depend_on_what_else_is_in_the_batch_roberta() {
    assert_batch_invariant("tiny-roberta", &["roberta_pt_2", "roberta_prefix_3"]);
}

/// `count` random tasks for `cfg`, shallow and deep in turn, task i with
/// `prompt(i)` virtual tokens and 2–4 labels (seeds from `seed`).
fn synthetic_tasks(
    cfg: &softprompt::model::ModelConfig,
    count: usize,
    prompt: fn(usize) -> usize,
    seed: u64,
) -> Vec<TaskModel> {
    use softprompt::engine::synthetic::{Kind, random_task};
    (0..count)
        .map(|i| {
            let kind = [Kind::Shallow, Kind::Deep][i % 2];
            random_task(
                cfg,
                &Device::Cpu,
                kind,
                prompt(i),
                2 + i % 3,
                seed + i as u64,
            )
            .unwrap()
        })
        .collect()
}

/// `count` random inputs, input i of `len(i)` tokens (seeds from `seed`).
fn synthetic_inputs(
    cfg: &softprompt::model::ModelConfig,
    count: usize,
    len: fn(usize) -> usize,
    seed: u64,
) -> Vec<Encoded> {
    use softprompt::engine::synthetic::random_input;
    (0..count)
        .map(|i| random_input(cfg, len(i), seed + i as u64))
        .collect()
}

/// Row i pairs input i with task i mod the task count.
fn round_robin<'a>(inputs: &'a [Encoded], tasks: &'a [TaskModel]) -> Vec<Row<'a>> {
    inputs
        .iter()
        .enumerate()
        .map(|(i, input)| Row {
            input,
            task: &tasks[i % tasks.len()],
        })
        .collect()
}

#[test]
fn default_model_rows_are_batch_invariant_across_64_tasks() {
    let model = load_model(&default_model_dir());
    let cfg = model.config().clone();
    let engine = Engine::new(model);
    let tasks = synthetic_tasks(&cfg, 8, |i| 5 + 3 * i, 0);
    let inputs = synthetic_inputs(&cfg, 16, |i| 4 + 5 * i, 0);
    let rows = round_robin(&inputs, &tasks);
    let mixed = engine.classify(&rows).unwrap();
    for (r, row) in rows.iter().enumerate() {
        let alone = engine.classify(std::slice::from_ref(row)).unwrap();
        let d = max_abs_diff(&alone, &mixed[r..r + 1]);
        assert!(d <= 1e-5, "row {r}: |Δlogit| {d}");
    }
}

/// A large batch on several threads runs as chunks of rows, one whole
/// forward each (engine/split.rs); its logits must be the ones the same
/// batch gets as one forward on one thread, for f32 and int8 weights alike.
#[test]
fn batches_split_between_threads_give_the_logits_of_one_forward() {
    use softprompt::engine::split;
    use softprompt::model::Quantize;
    for quantize in [Quantize::None, Quantize::Int8] {
        let mut model = Model::load(&default_model_dir(), &Device::Cpu).unwrap();
        model.encoder.pack(quantize).unwrap();
        let cfg = model.config().clone();
        let engine = Engine::new(std::sync::Arc::new(model));
        let tasks = synthetic_tasks(&cfg, 6, |i| 4 + 5 * i, 50);
        let inputs = synthetic_inputs(&cfg, 40, |i| 6 + (i * 13) % 50, 300);
        let rows = round_robin(&inputs, &tasks);
        let positions: Vec<usize> = rows.iter().map(Row::positions).collect();
        let parts = split::chunks(&positions, 4, split::SERVE);
        assert!(parts.len() >= 4, "the batch splits: {parts:?}");
        let pool = |n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
        };
        let whole = pool(1).install(|| engine.classify(&rows)).unwrap();
        let split = pool(4).install(|| engine.classify(&rows)).unwrap();
        let d = max_abs_diff(&whole, &split);
        assert!(d <= 1e-5, "{quantize:?}: |Δlogit| {d} split vs one forward");
    }
}

/// The fused forward finishes the last layer only for the tokens the heads
/// read (a row's first position for CLS and pooler heads, every position
/// for mean pooling). A batch mixing the three poolings, shallow and deep
/// prompts, must give every row what candle's forward gives (every token
/// through every layer), on packed and unpacked weights, and batches of
/// one pooling alone must too.
#[test]
fn the_last_layer_skips_only_tokens_no_head_reads() {
    use softprompt::engine::synthetic::{Kind, random_input, random_task};
    let unpacked = load_model(&default_model_dir());
    let mut packed = Model::load(&default_model_dir(), &Device::Cpu).unwrap();
    packed
        .encoder
        .pack(softprompt::model::Quantize::None)
        .unwrap();
    let packed = std::sync::Arc::new(packed);
    let cfg = unpacked.config().clone();
    let poolings = [Pooling::Mean, Pooling::First, Pooling::Pooler];
    let tasks: Vec<TaskModel> = (0..6)
        .map(|i| {
            let kind = if i % 2 == 0 {
                Kind::Shallow
            } else {
                Kind::Deep
            };
            let mut t =
                random_task(&cfg, &Device::Cpu, kind, 4 + i, 2 + i % 2, 40 + i as u64).unwrap();
            t.pooling = poolings[i % 3];
            t
        })
        .collect();
    let inputs: Vec<Encoded> = (0..12)
        .map(|i| random_input(&cfg, 3 + 4 * i, 100 + i as u64))
        .collect();
    let reference = Engine::with_kernels(unpacked.clone(), Kernels::Candle);
    for only in [
        None,
        Some(Pooling::Mean),
        Some(Pooling::First),
        Some(Pooling::Pooler),
    ] {
        let rows: Vec<Row> = inputs
            .iter()
            .enumerate()
            .map(|(i, input)| Row {
                input,
                task: &tasks[i % 6],
            })
            .filter(|r| only.is_none_or(|p| r.task.pooling == p))
            .collect();
        let want = reference.classify(&rows).unwrap();
        for (model, kernels) in [
            (&packed, Kernels::Auto),
            (&unpacked, Kernels::Auto),
            (&unpacked, Kernels::Device),
        ] {
            let got = Engine::with_kernels(model.clone(), kernels)
                .classify(&rows)
                .unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(
                d <= 1e-4,
                "{only:?} ({kernels:?}, packed: {}): |Δlogit| {d} against every token through every layer",
                model.encoder.quantization() == softprompt::model::Quantize::None
                    && model.encoder.packed_bytes() > 0
            );
        }
    }
}

/// Virtual tokens whose vectors are real word embeddings must behave exactly
/// like those words placed as text at the template's slots (token type 0):
/// this pins where each template slot lands, against the base model, whose
/// forward is checked against transformers in tests/parity.rs.
#[test]
fn template_slots_land_where_the_template_says() {
    let model = load_model(&fixture("tiny-bert"));
    let engine = Engine::new(model.clone());
    let words: Vec<u32> = vec![57, 109, 254]; // three ordinary vocabulary ids
    let emb = model.encoder.word_embeddings().clone();
    let vectors = |ids: &[u32]| {
        let idx = Tensor::new(ids, &Device::Cpu).unwrap();
        emb.index_select(&idx, 0).unwrap()
    };
    let head = identity_task(&model, Pooling::Mean).head;
    let plain = TaskModel {
        shallow: None,
        deep: None,
        head: head.clone(),
        pooling: Pooling::First,
    };
    let pair = Input {
        text: "the cat sat".into(),
        text_pair: Some("a dog".into()),
    };
    let enc = encode(&model, &pair);
    let split = enc.pair_start.unwrap();
    // The first segment is `[CLS] text [SEP]`; the pair starts right after.
    assert_eq!(
        (
            enc.ids[split - 1],
            enc.type_ids[split - 1],
            enc.type_ids[split]
        ),
        (3, 0, 1)
    );

    // (template, prompt ids, the equivalent plain token sequence)
    type Case = (&'static str, Vec<u32>, Vec<(u32, u32)>);
    let mut cases: Vec<Case> = Vec::new();
    let text: Vec<(u32, u32)> = enc
        .ids
        .iter()
        .copied()
        .zip(enc.type_ids.iter().copied())
        .collect();
    let w = |ids: &[u32]| ids.iter().map(|&i| (i, 0)).collect::<Vec<_>>();
    cases.push((
        "[P:2] {text}",
        words[..2].to_vec(),
        [w(&words[..2]), text.clone()].concat(),
    ));
    cases.push((
        "{text} [P:3]",
        words.clone(),
        [text.clone(), w(&words)].concat(),
    ));
    cases.push((
        "[P:1] {text} [P:2] {text_pair}",
        words.clone(),
        [
            w(&words[..1]),
            text[..split].to_vec(),
            w(&words[1..]),
            text[split..].to_vec(),
        ]
        .concat(),
    ));
    cases.push((
        "{text} [P:1] {text_pair} [P:2]",
        words.clone(),
        [
            text[..split].to_vec(),
            w(&words[..1]),
            text[split..].to_vec(),
            w(&words[1..]),
        ]
        .concat(),
    ));
    for (template, prompt_ids, equivalent) in cases {
        let task = TaskModel {
            shallow: Some(ShallowPrompt {
                embeddings: vectors(&prompt_ids),
                template: Template::parse(template).unwrap(),
            }),
            deep: None,
            head: head.clone(),
            pooling: Pooling::First,
        };
        let got = engine
            .classify(&[Row {
                input: &enc,
                task: &task,
            }])
            .unwrap();
        let eq_input = Encoded {
            ids: equivalent.iter().map(|p| p.0).collect(),
            type_ids: equivalent.iter().map(|p| p.1).collect(),
            pair_start: None,
        };
        let want = engine
            .classify(&[Row {
                input: &eq_input,
                task: &plain,
            }])
            .unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d <= 1e-5, "{template}: |Δ| {d}");
    }
}

#[test]
fn pytorch_bin_and_vocab_txt_fallbacks_load_the_same_model() {
    let a = load_model(&fixture("tiny-bert"));
    let b = load_model(&fixture("tiny-bert-bin"));
    assert_eq!(a.fingerprint, b.fingerprint);
    let input = Input {
        text: "The cat sat on the mat, unbelievably!".into(),
        text_pair: Some("good".into()),
    };
    assert_eq!(encode(&a, &input), encode(&b, &input));
    let ta = identity_task(&a, Pooling::Pooler);
    let tb = identity_task(&b, Pooling::Pooler);
    let ea = encode(&a, &input);
    let fa = Engine::new(a.clone())
        .classify(&[Row {
            input: &ea,
            task: &ta,
        }])
        .unwrap();
    let fb = Engine::new(b.clone())
        .classify(&[Row {
            input: &ea,
            task: &tb,
        }])
        .unwrap();
    assert_eq!(fa, fb);
}

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn load_err(dir: &std::path::Path) -> String {
    match Model::load(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_architecture_names_expected_and_found() {
    let dir = copy_fixture("tiny-bert");
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let cfg = cfg.replace("\"model_type\": \"bert\"", "\"model_type\": \"gpt2\"");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("\"bert\" or \"roberta\"") && e.contains("gpt2"),
        "{e}"
    );
}

#[test]
fn missing_tensor_names_the_tensor_and_what_the_file_holds() {
    let dir = copy_fixture("tiny-bert");
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors
        .remove("bert.encoder.layer.1.output.dense.weight")
        .unwrap();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("bert.encoder.layer.1.output.dense.weight") && e.contains("holds"),
        "{e}"
    );
}

#[test]
fn wrong_tensor_shape_names_expected_and_found() {
    let dir = copy_fixture("tiny-bert");
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let t = tensors["bert.pooler.dense.weight"]
        .i((..16, ..))
        .unwrap()
        .contiguous()
        .unwrap();
    tensors.insert("bert.pooler.dense.weight".into(), t);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("[32, 32]") && e.contains("[16, 32]"), "{e}");
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny-bert/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    std::fs::copy(fixture("tiny-bert/vocab.txt"), dir.path().join("vocab.txt")).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("pytorch_model.bin"),
        "{e}"
    );
    let e = load_err(&dir.path().join("nope"));
    assert!(e.contains("fetch_model.sh"), "{e}");
}

#[test]
fn rows_longer_than_the_position_table_are_refused() {
    let model = load_model(&fixture("tiny-bert"));
    let task = peft::read_dir(&fixture("adapters/prefix_2"), None)
        .unwrap()
        .model;
    let budget = task.text_budget(model.config());
    assert_eq!(budget, 64 - 7);
    let long = "word ".repeat(200);
    let err = model
        .tokenizer
        .encode(&long, None, budget, false)
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!("at most {budget}")),
        "{err}"
    );
    let cut = model
        .tokenizer
        .encode(&long, Some("a dog slept by the door"), budget, true)
        .unwrap();
    assert_eq!(cut.len(), budget);
    let engine = Engine::new(model.clone());
    engine
        .classify(&[Row {
            input: &cut,
            task: &task,
        }])
        .unwrap();
    let too_long = Encoded {
        ids: vec![5; budget + 1],
        type_ids: vec![0; budget + 1],
        pair_start: None,
    };
    let err = engine
        .classify(&[Row {
            input: &too_long,
            task: &task,
        }])
        .err()
        .unwrap();
    assert!(err.to_string().contains("64"), "{err}");
    // In a batch large enough to run as chunks (engine/split.rs), the error
    // still names the row by its place in the whole batch.
    let mut rows = vec![
        Row {
            input: &cut,
            task: &task,
        };
        12
    ];
    rows[10].input = &too_long;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    let err = pool.install(|| engine.classify(&rows)).err().unwrap();
    assert!(err.to_string().starts_with("row 10:"), "{err}");
}

#[test]
fn pair_segment_starts_after_the_first_texts_separator() {
    let pair = Input {
        text: "the cat sat on the mat".into(),
        text_pair: Some("a dog".into()),
    };
    // BERT: [CLS] A [SEP] | B [SEP]
    let bert = load_model(&fixture("tiny-bert"));
    let e = encode(&bert, &pair);
    let split = e.pair_start.unwrap();
    assert_eq!(e.ids.iter().filter(|&&i| i == 3).count(), 2);
    assert_eq!(e.ids[split - 1], 3);
    assert!(e.ids[..split - 1].iter().all(|&i| i != 3));
    assert!(
        e.type_ids[..split].iter().all(|&t| t == 0) && e.type_ids[split..].iter().all(|&t| t == 1)
    );
    // RoBERTa: <s> A </s> | </s> B </s>
    let roberta = load_model(&fixture("tiny-roberta"));
    let e = encode(&roberta, &pair);
    let split = e.pair_start.unwrap();
    assert_eq!((e.ids[split - 1], e.ids[split]), (2, 2));
    assert!(e.ids[..split - 1].iter().all(|&i| i != 2));
    // Same answer whether the tokenizer comes from tokenizer.json or vocab.txt.
    let bin = load_model(&fixture("tiny-bert-bin"));
    assert_eq!(encode(&bin, &pair), encode(&bert, &pair));
}
