//! Task files: native round trips and versions, PEFT export (and import of
//! the export), validation refusals on the tiny-bert fixture model, and the
//! readers' behaviour on truncated and corrupted bytes.
//!
//! `EXPORT_DIR=/some/dir cargo test --test task_files peft_export_of_every_fixture_adapter`
//! leaves the exported adapters there for `tests/reference/check_export.py`,
//! which loads them with HF PEFT and compares logits with the fixtures.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use proptest::prelude::*;
use softprompt::engine::{Head, Pooling, ShallowPrompt, TaskModel, Template};
use softprompt::model::{Linear, Model};
use softprompt::task::{
    BaseModelRef, Limits, PromptKind, Provenance, Task, TaskMeta, native, peft, validate,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------- helpers

/// Deterministic values in (-1, 1), distinct per seed (no RNG dependency).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn mat(rows: usize, cols: usize, seed: u64) -> Tensor {
    Tensor::from_vec(values(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap()
}

fn vec1(n: usize, seed: u64) -> Tensor {
    Tensor::from_vec(values(n, seed), n, &Device::Cpu).unwrap()
}

fn lin(out: usize, inp: usize, seed: u64) -> Linear {
    Linear {
        weight: mat(out, inp, seed),
        bias: vec1(out, seed + 1),
    }
}

fn tiny() -> std::sync::Arc<Model> {
    load_model(&fixture("tiny-bert"))
}

/// Shape of a task to build for the tiny models (H=32, 2 layers).
#[derive(Clone)]
struct Spec {
    hidden: usize,
    shallow: Option<usize>,
    template: Option<&'static str>,
    deep: Option<usize>,
    deep_width: usize,
    dense2: bool,
    pooling: Option<Pooling>,
    labels: Vec<String>,
    head_out: Option<usize>,
}

impl Spec {
    fn new(labels: &[&str]) -> Self {
        Spec {
            hidden: 32,
            shallow: None,
            template: None,
            deep: None,
            deep_width: 2 * 2 * 32,
            dense2: false,
            pooling: None,
            labels: labels.iter().map(|s| s.to_string()).collect(),
            head_out: None,
        }
    }
    fn shallow(mut self, n: usize) -> Self {
        self.shallow = Some(n);
        self
    }
    fn deep(mut self, n: usize) -> Self {
        self.deep = Some(n);
        self
    }
    fn template(mut self, t: &'static str) -> Self {
        self.template = Some(t);
        self
    }
    fn dense2(mut self) -> Self {
        self.dense2 = true;
        self
    }
    fn pooling(mut self, p: Pooling) -> Self {
        self.pooling = Some(p);
        self
    }

    fn model(&self) -> TaskModel {
        let h = self.hidden;
        let out = self.head_out.unwrap_or(self.labels.len());
        let template = |n| match self.template {
            Some(t) => Template::parse(t).unwrap(),
            None => Template::prefix(n),
        };
        TaskModel {
            shallow: self.shallow.map(|n| ShallowPrompt {
                embeddings: mat(n, h, 1),
                template: template(n),
            }),
            deep: self.deep.map(|n| mat(n, self.deep_width, 2)),
            head: if self.dense2 {
                Head::Dense2 {
                    dense: lin(32, 32, 3),
                    out: lin(out, 32, 5),
                }
            } else {
                Head::Linear(lin(out, 32, 7))
            },
            pooling: self.pool(),
        }
    }

    fn pool(&self) -> Pooling {
        self.pooling.unwrap_or(if self.dense2 {
            Pooling::First
        } else {
            Pooling::Pooler
        })
    }

    fn meta(&self, model: &Model) -> TaskMeta {
        TaskMeta {
            labels: self.labels.clone(),
            template: self.template.map(String::from),
            pooling: self.pool(),
            base_model: BaseModelRef {
                name: model.name.clone(),
                fingerprint: Some(model.fingerprint.clone()),
            },
            provenance: Provenance {
                method: "prompt-tuning".into(),
                data: Some("unit-test".into()),
                metrics: serde_json::json!({"accuracy": 0.875, "loss": 0.3}),
                created: Some("2025-01-02T03:04:05Z".into()),
            },
        }
    }

    fn task(&self, model: &Model) -> Task {
        Task::new(self.meta(model), self.model()).unwrap()
    }
}

/// One task of every shape the native format must keep.
fn shapes(model: &Model) -> Vec<(&'static str, Task)> {
    vec![
        ("shallow", Spec::new(&["neg", "pos"]).shallow(5).task(model)),
        ("deep", Spec::new(&["a", "b", "c"]).deep(4).task(model)),
        (
            "hybrid",
            Spec::new(&["no", "yes"]).shallow(3).deep(2).task(model),
        ),
        (
            "template",
            Spec::new(&["x", "y"])
                .shallow(6)
                .template("[P:2] {text} [P:3] {text_pair} [P:1]")
                .task(model),
        ),
        (
            "dense2",
            Spec::new(&["l0", "l1", "l2"])
                .shallow(5)
                .dense2()
                .task(model),
        ),
        (
            "dense2-deep-hybrid",
            Spec::new(&["l0", "l1"])
                .shallow(2)
                .deep(3)
                .dense2()
                .task(model),
        ),
    ]
}

/// Every tensor of a task with its shape and exact f32 bit patterns.
fn tensor_bits(task: &Task) -> Vec<(&'static str, Vec<usize>, Vec<u32>)> {
    let bits = |name: &'static str, t: &Tensor| {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        (
            name,
            t.dims().to_vec(),
            v.iter().map(|x| x.to_bits()).collect(),
        )
    };
    let m = &task.model;
    let mut out = Vec::new();
    if let Some(s) = &m.shallow {
        out.push(bits("shallow", &s.embeddings));
    }
    if let Some(d) = &m.deep {
        out.push(bits("deep", d));
    }
    match &m.head {
        Head::Linear(l) => {
            out.push(bits("head.weight", &l.weight));
            out.push(bits("head.bias", &l.bias));
        }
        Head::Dense2 { dense, out: o } => {
            out.push(bits("dense.weight", &dense.weight));
            out.push(bits("dense.bias", &dense.bias));
            out.push(bits("out.weight", &o.weight));
            out.push(bits("out.bias", &o.bias));
        }
    }
    out
}

fn assert_same_task(want: &Task, got: &Task, what: &str) {
    assert_eq!(tensor_bits(want), tensor_bits(got), "{what}: tensors");
    assert_eq!(want.meta, got.meta, "{what}: metadata");
    assert_eq!(want.version, got.version, "{what}: version");
    assert_eq!(want.kind(), got.kind(), "{what}: kind");
    assert_eq!(want.model.pooling, got.model.pooling, "{what}: pooling");
    assert_eq!(
        want.model.shallow.as_ref().map(|s| s.template.clone()),
        got.model.shallow.as_ref().map(|s| s.template.clone()),
        "{what}: template"
    );
    assert_eq!(
        std::mem::discriminant(&want.model.head),
        std::mem::discriminant(&got.model.head),
        "{what}: head kind"
    );
}

/// Asserts a refusal's message names the field and both values.
#[track_caller]
fn assert_refusal(err: impl std::fmt::Display, parts: &[&str]) {
    let msg = err.to_string();
    for p in parts {
        assert!(
            msg.contains(p),
            "error message {msg:?} does not contain {p:?}"
        );
    }
}

#[track_caller]
fn refused(task: &Task, model: &Model, limits: &Limits, parts: &[&str]) {
    match validate(task, model, limits) {
        Ok(()) => panic!("accepted; expected a refusal naming {parts:?}"),
        Err(e) => assert_refusal(e, parts),
    }
}

/// A fresh directory under the system temp dir, unique per test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "softprompt-task-files-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture_adapters() -> Vec<(String, PathBuf)> {
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(fixture("adapters"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join(peft::CONFIG_FILE).is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p))
        .collect();
    v.sort();
    assert_eq!(v.len(), 8, "fixture adapters");
    v
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// safetensors bytes with the given dtype, converting f32 values.
fn safetensors_bytes(
    tensors: &[(&str, &Tensor)],
    dtype: safetensors::Dtype,
    meta: HashMap<String, String>,
) -> Vec<u8> {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let bytes: Vec<u8> = match dtype {
                safetensors::Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                safetensors::Dtype::F16 => v
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
                safetensors::Dtype::BF16 => v
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
                safetensors::Dtype::I32 => {
                    v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect()
                }
                other => panic!("{other:?}"),
            };
            (n.to_string(), t.dims().to_vec(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, Some(meta)).unwrap()
}

fn native_header(meta: &TaskMeta) -> HashMap<String, String> {
    HashMap::from([
        ("format".to_string(), native::FORMAT.to_string()),
        (
            "format_version".to_string(),
            native::FORMAT_VERSION.to_string(),
        ),
        ("meta".to_string(), serde_json::to_string(meta).unwrap()),
    ])
}

// ------------------------------------------------------- native format

#[test]
fn native_round_trip_keeps_tensors_metadata_and_version_for_every_shape() {
    let model = tiny();
    let dir = scratch("native-round-trip");
    for (name, task) in shapes(&model) {
        validate(&task, &model, &Limits::default())
            .unwrap_or_else(|e| panic!("{name} should be valid: {e}"));
        let bytes = native::to_bytes(&task).unwrap();
        let back = native::from_bytes(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_same_task(&task, &back, name);
        // And through the file system.
        let path = dir.join(format!("{name}.safetensors"));
        native::write_file(&path, &task).unwrap();
        assert_same_task(&task, &native::read_file(&path).unwrap(), name);
        // Writing is deterministic: the same task gives the same bytes.
        assert!(
            bytes == native::to_bytes(&back).unwrap(),
            "{name}: bytes differ after a round trip"
        );
        assert!(
            bytes == native::to_bytes(&task).unwrap(),
            "{name}: bytes differ between two writes"
        );
    }
    let kinds: Vec<PromptKind> = shapes(&model).iter().map(|(_, t)| t.kind()).collect();
    assert!(
        kinds.contains(&PromptKind::Shallow)
            && kinds.contains(&PromptKind::Deep)
            && kinds.contains(&PromptKind::Hybrid)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn version_changes_when_any_tensor_or_label_changes() {
    let model = tiny();
    let spec = Spec::new(&["l0", "l1"]).shallow(2).deep(3).dense2();
    let base = spec.task(&model);
    assert!(base.version.starts_with("sha256:"), "{}", base.version);
    assert_eq!(
        base.version,
        spec.task(&model).version,
        "same content, same version"
    );

    // Change one element of each tensor in turn (the smallest possible change: one ulp).
    let n_tensors = tensor_bits(&base).len();
    assert_eq!(n_tensors, 6);
    let bump = |t: &Tensor, at: usize| -> Tensor {
        let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v[at] = f32::from_bits(v[at].to_bits() + 1);
        Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
    };
    let mut versions = vec![base.version.clone()];
    for which in 0..n_tensors {
        for at in [0usize, 1] {
            let mut m = spec.model();
            let Head::Dense2 { dense, out } = &mut m.head else {
                unreachable!()
            };
            match which {
                0 => {
                    m.shallow.as_mut().unwrap().embeddings =
                        bump(&m.shallow.as_ref().unwrap().embeddings, at)
                }
                1 => m.deep = Some(bump(m.deep.as_ref().unwrap(), at)),
                2 => dense.weight = bump(&dense.weight, at),
                3 => dense.bias = bump(&dense.bias, at),
                4 => out.weight = bump(&out.weight, at),
                _ => out.bias = bump(&out.bias, at),
            }
            let t = Task::new(spec.meta(&model), m).unwrap();
            assert!(
                !versions.contains(&t.version),
                "tensor {which} element {at}: version {} not new",
                t.version
            );
            versions.push(t.version);
        }
    }
    // Labels: renamed, reordered.
    for labels in [vec!["l0", "l2"], vec!["l1", "l0"]] {
        let mut meta = spec.meta(&model);
        meta.labels = labels.iter().map(|s| s.to_string()).collect();
        let t = Task::new(meta, spec.model()).unwrap();
        assert!(
            !versions.contains(&t.version),
            "labels {labels:?}: version not new"
        );
        versions.push(t.version);
    }
    // A changed version survives the file format.
    let mut meta = spec.meta(&model);
    meta.labels[0] = "renamed".into();
    let t = Task::new(meta, spec.model()).unwrap();
    assert_eq!(
        native::from_bytes(&native::to_bytes(&t).unwrap())
            .unwrap()
            .version,
        t.version
    );
}

#[test]
fn write_file_replaces_atomically_and_leaves_no_temp_files() {
    let model = tiny();
    let dir = scratch("atomic");
    let path = dir.join("t.safetensors");
    let first = Spec::new(&["a", "b"]).shallow(4).task(&model);
    let second = Spec::new(&["a", "b", "c"]).deep(2).task(&model);
    native::write_file(&path, &first).unwrap();
    native::write_file(&path, &second).unwrap();
    assert_same_task(&second, &native::read_file(&path).unwrap(), "replaced file");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec!["t.safetensors".to_string()],
        "temp files left behind"
    );

    // A failed write (the target is a directory) keeps nothing of itself.
    let blocked = dir.join("blocked.safetensors");
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("keep"), b"x").unwrap();
    let err = native::write_file(&blocked, &first).unwrap_err();
    assert_refusal(err, &["blocked.safetensors"]);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "blocked.safetensors".to_string(),
            "t.safetensors".to_string()
        ]
    );
    // A missing directory is an I/O error naming the path.
    let err = native::write_file(&dir.join("no/such/dir/t.safetensors"), &first).unwrap_err();
    assert_refusal(err, &["no/such/dir"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn native_writer_refuses_metadata_that_disagrees_with_the_model() {
    let model = tiny();
    let spec = Spec::new(&["a", "b"]).shallow(5);
    let mut t = spec.task(&model);
    t.meta.pooling = Pooling::Mean;
    assert_refusal(
        native::to_bytes(&t).unwrap_err(),
        &["meta.pooling", "\"pooler\"", "\"mean\""],
    );

    let mut t = spec.clone().template("[P:2] {text} [P:3]").task(&model);
    t.meta.template = None;
    assert_refusal(
        native::to_bytes(&t).unwrap_err(),
        &["meta.template", "[P:2] {text} [P:3]", "[P:5] {text}"],
    );
}

#[test]
fn native_reader_refusals_name_field_and_values() {
    let model = tiny();
    let task = Spec::new(&["a", "b"]).shallow(3).task(&model);
    let m = &task.model;
    let s = &m.shallow.as_ref().unwrap().embeddings;
    let Head::Linear(head) = &m.head else {
        unreachable!()
    };
    let base: Vec<(&str, &Tensor)> = vec![
        ("prompt.shallow", s),
        ("head.weight", &head.weight),
        ("head.bias", &head.bias),
    ];
    let mut with_extra = base.clone();
    with_extra.push(("prompt.extra", s));
    let f32 = safetensors::Dtype::F32;

    // A PEFT weights file is not a native task file.
    let peft_weights = read(&fixture("adapters/pt_random_2/adapter_model.safetensors"));
    assert_refusal(
        native::from_bytes(&peft_weights).err().unwrap(),
        &["header.format", "softprompt.task", "\"pt\""],
    );
    // Newer format version.
    let mut h = native_header(&task.meta);
    h.insert("format_version".into(), "2".into());
    let bytes = safetensors_bytes(&base, f32, h);
    assert_refusal(
        native::from_bytes(&bytes).err().unwrap(),
        &["header.format_version", "1..=1", "\"2\""],
    );
    // Unknown tensor.
    let bytes = safetensors_bytes(&with_extra, f32, native_header(&task.meta));
    assert_refusal(
        native::from_bytes(&bytes).err().unwrap(),
        &["\"prompt.extra\"", "unknown tensor", "prompt.shallow"],
    );
    // No head.
    let bytes = safetensors_bytes(&[("prompt.shallow", s)], f32, native_header(&task.meta));
    assert_refusal(
        native::from_bytes(&bytes).err().unwrap(),
        &["head.weight", "missing", "classification head"],
    );
    // Template with a different number of virtual tokens than the prompt has rows.
    let mut meta = task.meta.clone();
    meta.template = Some("[P:2] {text} [P:2]".into());
    let bytes = safetensors_bytes(&base, f32, native_header(&meta));
    assert_refusal(
        native::from_bytes(&bytes).err().unwrap(),
        &["template", "3 virtual tokens", "4 in"],
    );
    // Virtual-token counts whose sum would wrap around to the row count:
    // the template parser caps each slot, so the sum cannot overflow.
    let mut meta = task.meta.clone();
    meta.template = Some(format!("[P:{}] {{text}} [P:4]", usize::MAX));
    let bytes = safetensors_bytes(&base, f32, native_header(&meta));
    assert_refusal(
        native::from_bytes(&bytes).err().unwrap(),
        &["template", &format!("[P:{}]", usize::MAX), "65536"],
    );
    // A prompt without rows.
    let empty = Tensor::zeros((0, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let bytes = safetensors_bytes(
        &[
            ("prompt.shallow", &empty),
            ("head.weight", &head.weight),
            ("head.bias", &head.bias),
        ],
        f32,
        native_header(&task.meta),
    );
    assert_refusal(
        native::from_bytes(&bytes).err().unwrap(),
        &["prompt.shallow.shape", "[n ≥ 1, hidden]", "[0, 32]"],
    );
    // A head of the wrong rank.
    let bytes = safetensors_bytes(
        &[
            ("prompt.shallow", s),
            ("head.weight", &head.bias),
            ("head.bias", &head.bias),
        ],
        f32,
        native_header(&task.meta),
    );
    assert_refusal(
        native::from_bytes(&bytes).err().unwrap(),
        &[
            "head.shape",
            "weight [out, in], bias [out]",
            "weight [2], bias [2]",
        ],
    );
}

// ---------------------------------------------------------- PEFT export

#[test]
fn peft_export_of_every_fixture_adapter_reimports_bit_exactly() {
    let out = match std::env::var_os("EXPORT_DIR") {
        Some(d) => PathBuf::from(d),
        None => scratch("export"),
    };
    for (name, src) in fixture_adapters() {
        let imported = peft::read_dir(&src, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Through the native format first: what the server stores is what it exports.
        let stored = native::from_bytes(&native::to_bytes(&imported).unwrap()).unwrap();
        assert_same_task(&imported, &stored, &name);
        let dir = out.join(&name);
        peft::write_dir(&stored, &dir).unwrap_or_else(|e| panic!("{name}: export: {e}"));
        let back = peft::read_dir(&dir, None).unwrap_or_else(|e| panic!("{name}: re-import: {e}"));
        assert_same_task(&stored, &back, &format!("{name} export → import"));

        // The files name what PEFT itself wrote for this adapter.
        let theirs: serde_json::Value =
            serde_json::from_slice(&read(&src.join(peft::CONFIG_FILE))).unwrap();
        let ours: serde_json::Value =
            serde_json::from_slice(&read(&dir.join(peft::CONFIG_FILE))).unwrap();
        let want_type = if theirs["peft_type"] == "PREFIX_TUNING" {
            "PREFIX_TUNING"
        } else {
            "PROMPT_TUNING"
        };
        assert_eq!(ours["peft_type"], want_type, "{name}");
        for key in [
            "task_type",
            "num_virtual_tokens",
            "token_dim",
            "num_transformer_submodules",
            "base_model_name_or_path",
            "inference_mode",
        ] {
            assert_eq!(ours[key], theirs[key], "{name}: adapter_config.{key}");
        }
        if want_type == "PREFIX_TUNING" {
            assert_eq!(
                ours["num_layers"], theirs["num_layers"],
                "{name}: num_layers"
            );
            assert_eq!(
                ours["prefix_projection"], false,
                "{name}: the saved prefix is already projected"
            );
        }
        let keys = |p: &Path| -> Vec<String> {
            let b = read(p);
            let mut k: Vec<String> = safetensors::SafeTensors::deserialize(&b)
                .unwrap()
                .names()
                .into_iter()
                .map(|s| s.to_string())
                .collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(&dir.join(peft::WEIGHTS_FILE)),
            keys(&src.join(peft::WEIGHTS_FILE)),
            "{name}: tensor names"
        );
    }
    if std::env::var_os("EXPORT_DIR").is_none() {
        std::fs::remove_dir_all(out).unwrap();
    }
}

#[test]
fn peft_export_keeps_our_metadata_for_the_way_back() {
    let model = tiny();
    for (name, task) in [
        (
            "shallow",
            Spec::new(&["neg", "pos"]).shallow(5).task(&model),
        ),
        ("deep", Spec::new(&["a", "b", "c"]).deep(4).task(&model)),
        (
            "dense2",
            Spec::new(&["l0", "l1", "l2"])
                .shallow(5)
                .dense2()
                .task(&model),
        ),
        (
            "explicit prefix template",
            Spec::new(&["a", "b"])
                .shallow(4)
                .template("[P:4] {text}")
                .task(&model),
        ),
    ] {
        let files = peft::to_files(&task).unwrap();
        let back = peft::from_bytes(&files.config_json, &files.weights, None).unwrap();
        assert_same_task(&task, &back, name);
        validate(&back, &model, &Limits::default()).unwrap();
        // Explicit labels override the header's.
        let relabelled = peft::from_bytes(
            &files.config_json,
            &files.weights,
            Some(task.meta.labels.iter().rev().cloned().collect()),
        )
        .unwrap();
        assert_ne!(relabelled.meta.labels, task.meta.labels);
        assert_ne!(relabelled.version, task.version);
    }
}

#[test]
fn peft_export_refuses_what_peft_cannot_express() {
    let model = tiny();
    let dir = scratch("export-refusals");
    let cases: Vec<(&str, Task, Vec<&str>)> = vec![
        (
            "template",
            Spec::new(&["a", "b"])
                .shallow(5)
                .template("[P:2] {text} [P:3]")
                .task(&model),
            vec!["template", "\"[P:2] {text} [P:3]\"", "[P:n] {text}"],
        ),
        (
            "hybrid",
            Spec::new(&["a", "b"]).shallow(2).deep(2).task(&model),
            vec![
                "prompt",
                "hybrid (shallow + deep)",
                "PROMPT_TUNING",
                "PREFIX_TUNING",
            ],
        ),
        (
            "no prompt",
            Spec::new(&["a", "b"]).task(&model),
            vec!["prompt", "none", "PROMPT_TUNING"],
        ),
        (
            "mean pooling",
            Spec::new(&["a", "b"])
                .shallow(3)
                .pooling(Pooling::Mean)
                .task(&model),
            vec![
                "pooling",
                "\"mean\" with a linear head",
                "\"pooler\" with a linear head",
            ],
        ),
        (
            "linear head on position 0",
            Spec::new(&["a", "b"])
                .shallow(3)
                .pooling(Pooling::First)
                .task(&model),
            vec![
                "pooling",
                "\"first\" with a linear head",
                "\"pooler\" with a linear head",
            ],
        ),
        (
            "roberta head on the pooler",
            Spec::new(&["a", "b"])
                .deep(3)
                .dense2()
                .pooling(Pooling::Pooler)
                .task(&model),
            vec![
                "pooling",
                "\"pooler\" with a dense+out_proj head",
                "\"first\" with a dense+out_proj head",
            ],
        ),
    ];
    for (name, task, parts) in cases {
        let target = dir.join(name.replace(' ', "_"));
        let err = peft::write_dir(&task, &target)
            .err()
            .unwrap_or_else(|| panic!("{name}: exported"));
        assert_refusal(err, &parts);
        assert!(!target.exists(), "{name}: a refused export wrote files");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

// ---------------------------------------------------------- validation

#[test]
fn well_formed_tasks_pass_validation() {
    let model = tiny();
    for (name, task) in shapes(&model) {
        validate(&task, &model, &Limits::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, dir) in fixture_adapters() {
        if name.starts_with("roberta") {
            continue;
        }
        let task = peft::read_dir(&dir, None).unwrap();
        validate(&task, &model, &Limits::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// The refusal of a fixture PEFT adapter whose `adapter_config.json` has
/// one integer field changed (so it disagrees with the tensors).
fn peft_refusal_with_config(adapter: &str, field: &str, value: u64) -> impl std::fmt::Display {
    let dir = fixture(adapter);
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&read(&dir.join(peft::CONFIG_FILE))).unwrap();
    cfg[field] = value.into();
    peft::from_bytes(
        cfg.to_string().as_bytes(),
        &read(&dir.join(peft::WEIGHTS_FILE)),
        None,
    )
    .err()
    .unwrap()
}

#[test]
fn refuses_a_prompt_of_another_hidden_size() {
    let model = tiny();
    let mut spec = Spec::new(&["a", "b"]).shallow(5);
    spec.hidden = 16;
    refused(
        &spec.task(&model),
        &model,
        &Limits::default(),
        &["prompt.shallow.shape", "[n, 32] (hidden_size)", "[5, 16]"],
    );
    // The same task from a PEFT adapter whose config disagrees with its tensor.
    let err = peft_refusal_with_config("adapters/pt_random_2", "token_dim", 16);
    assert_refusal(err, &["prompt_embeddings.shape[1]", "16 (token_dim)", "32"]);
}

#[test]
fn refuses_a_deep_prompt_of_another_layer_count_or_width() {
    let model = tiny();
    let mut three_layers = Spec::new(&["a", "b"]).deep(4);
    three_layers.deep_width = 3 * 2 * 32;
    refused(
        &three_layers.task(&model),
        &model,
        &Limits::default(),
        &["prompt.deep.shape", "[n, 128]", "num_layers 2", "[4, 192]"],
    );
    let mut narrow = Spec::new(&["a", "b"]).deep(4);
    narrow.deep_width = 2 * 2 * 16;
    refused(
        &narrow.task(&model),
        &model,
        &Limits::default(),
        &["prompt.deep.shape", "[n, 128]", "[4, 64]"],
    );
    // PEFT config claiming another layer count than its tensor holds.
    let err = peft_refusal_with_config("adapters/prefix_2", "num_layers", 3);
    assert_refusal(
        err,
        &["prompt_embeddings.shape[1]", "192 (num_layers 3", "128"],
    );
    // And a virtual-token count that disagrees with the rows.
    let err = peft_refusal_with_config("adapters/prefix_2", "num_virtual_tokens", 9);
    assert_refusal(err, &["prompt_embeddings.shape", "[9, dim]", "[7, 128]"]);
}

#[test]
fn refuses_a_head_that_does_not_fit_the_labels_or_the_model() {
    let model = tiny();
    let l = Limits::default();
    let mut more_rows = Spec::new(&["a", "b"]).shallow(3);
    more_rows.head_out = Some(3);
    refused(
        &more_rows.task(&model),
        &model,
        &l,
        &[
            "labels",
            "3 names (the head's output size)",
            "found 2 names",
        ],
    );

    let spec = Spec::new(&["a", "b"]).shallow(3);
    let mut m = spec.model();
    m.head = Head::Linear(lin(2, 16, 9));
    refused(
        &Task::new(spec.meta(&model), m).unwrap(),
        &model,
        &l,
        &["head.weight.shape", "[out, 32]", "[2, 16]"],
    );
    let mut m = spec.model();
    m.head = Head::Linear(Linear {
        weight: mat(2, 32, 9),
        bias: vec1(3, 9),
    });
    refused(
        &Task::new(spec.meta(&model), m).unwrap(),
        &model,
        &l,
        &["head.bias.shape", "[2]", "[3]"],
    );

    let spec = Spec::new(&["a", "b"]).shallow(3).dense2();
    let mut m = spec.model();
    m.head = Head::Dense2 {
        dense: lin(64, 32, 3),
        out: lin(2, 64, 5),
    };
    refused(
        &Task::new(spec.meta(&model), m).unwrap(),
        &model,
        &l,
        &["head.dense.weight.shape", "[32, 32]", "[64, 32]"],
    );
    let mut m = spec.model();
    m.head = Head::Dense2 {
        dense: lin(32, 32, 3),
        out: lin(2, 16, 5),
    };
    refused(
        &Task::new(spec.meta(&model), m).unwrap(),
        &model,
        &l,
        &["head.out_proj.weight.shape", "[out, 32]", "[2, 16]"],
    );
}

#[test]
fn refuses_duplicate_and_empty_labels() {
    let model = tiny();
    let l = Limits::default();
    refused(
        &Spec::new(&["pos", "neg", "pos"]).shallow(3).task(&model),
        &model,
        &l,
        &[
            "labels[2]",
            "distinct from labels[0] \"pos\"",
            "found \"pos\"",
        ],
    );
    refused(
        &Spec::new(&["pos", ""]).shallow(3).task(&model),
        &model,
        &l,
        &["labels[1]", "a non-empty name", "found \"\""],
    );
    let mut none = Spec::new(&[]).shallow(3);
    none.head_out = Some(0);
    refused(
        &none.task(&model),
        &model,
        &l,
        &["labels", "1..=1024", "found 0"],
    );
}

#[test]
fn refuses_prompts_that_leave_no_room_for_text() {
    // tiny-bert: 64 positions, min_text_tokens 8 → at most 56 virtual tokens.
    let model = tiny();
    let l = Limits::default();
    assert_eq!((model.config().max_sequence(), l.min_text_tokens), (64, 8));
    validate(&Spec::new(&["a", "b"]).shallow(56).task(&model), &model, &l).unwrap();
    let want = [
        "num_virtual_tokens",
        "at most 56 so that 8 text tokens fit in 64 positions",
        "found 57",
    ];
    refused(
        &Spec::new(&["a", "b"]).shallow(57).task(&model),
        &model,
        &l,
        &want,
    );
    refused(
        &Spec::new(&["a", "b"]).deep(57).task(&model),
        &model,
        &l,
        &want,
    );
    refused(
        &Spec::new(&["a", "b"]).shallow(30).deep(27).task(&model),
        &model,
        &l,
        &want,
    );
    validate(
        &Spec::new(&["a", "b"]).shallow(30).deep(26).task(&model),
        &model,
        &l,
    )
    .unwrap();
}

#[test]
fn refuses_nan_and_inf_in_every_tensor() {
    let model = tiny();
    let spec = Spec::new(&["a", "b"]).shallow(2).deep(3).dense2();
    let poison = |t: &Tensor, x: f32| {
        let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let last = v.len() - 1;
        v[last] = x;
        Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
    };
    for (which, field, total, x) in [
        (0, "prompt.shallow", 64, f32::NAN),
        (1, "prompt.deep", 384, f32::INFINITY),
        (2, "head.dense.weight", 1024, f32::NEG_INFINITY),
        (3, "head.dense.bias", 32, f32::NAN),
        (4, "head.out_proj.weight", 64, f32::INFINITY),
        (5, "head.out_proj.bias", 2, f32::NAN),
    ] {
        let mut m = spec.model();
        let Head::Dense2 { dense, out } = &mut m.head else {
            unreachable!()
        };
        match which {
            0 => {
                m.shallow.as_mut().unwrap().embeddings =
                    poison(&m.shallow.as_ref().unwrap().embeddings, x)
            }
            1 => m.deep = Some(poison(m.deep.as_ref().unwrap(), x)),
            2 => dense.weight = poison(&dense.weight, x),
            3 => dense.bias = poison(&dense.bias, x),
            4 => out.weight = poison(&out.weight, x),
            _ => out.bias = poison(&out.bias, x),
        }
        let t = Task::new(spec.meta(&model), m).unwrap();
        let found = format!("found 1 NaN or infinite of {total}");
        refused(
            &t,
            &model,
            &Limits::default(),
            &[field, "expected finite values", &found],
        );
    }
}

#[test]
fn size_caps_refuse_too_many_virtual_tokens_and_labels() {
    let model = tiny();
    let l = Limits {
        max_virtual_tokens: 10,
        max_labels: 2,
        ..Limits::default()
    };
    validate(
        &Spec::new(&["a", "b"]).shallow(6).deep(4).task(&model),
        &model,
        &l,
    )
    .unwrap();
    refused(
        &Spec::new(&["a", "b"]).shallow(6).deep(5).task(&model),
        &model,
        &l,
        &[
            "num_virtual_tokens",
            "at most 10 (max_virtual_tokens)",
            "found 11",
        ],
    );
    refused(
        &Spec::new(&["a", "b", "c"]).shallow(6).task(&model),
        &model,
        &l,
        &["labels", "1..=2 labels (max_labels)", "found 3"],
    );
}

#[test]
fn fingerprint_mismatch_is_refused_unless_allowed() {
    let model = tiny();
    let spec = Spec::new(&["a", "b"]).shallow(4);
    let mut meta = spec.meta(&model);
    meta.base_model = BaseModelRef {
        name: "other-model".into(),
        fingerprint: Some("sha256:0123abcd".into()),
    };
    let task = Task::new(meta.clone(), spec.model()).unwrap();
    let expected = format!("{} (tiny-bert)", model.fingerprint);
    refused(
        &task,
        &model,
        &Limits::default(),
        &[
            "base_model.fingerprint",
            &expected,
            "sha256:0123abcd (other-model)",
        ],
    );
    let allow = Limits {
        allow_fingerprint_mismatch: true,
        ..Limits::default()
    };
    validate(&task, &model, &allow).unwrap();
    // Allowing a mismatch does not skip the shape checks.
    let mut narrow = spec.clone();
    narrow.hidden = 16;
    let task = Task::new(meta, narrow.model()).unwrap();
    refused(
        &task,
        &model,
        &allow,
        &["prompt.shallow.shape", "[n, 32]", "[4, 16]"],
    );
    // PEFT adapters carry no fingerprint and are checked on shapes alone.
    let task = peft::read_dir(&fixture("adapters/pt_random_2"), None).unwrap();
    assert_eq!(task.meta.base_model.fingerprint, None);
    validate(&task, &model, &Limits::default()).unwrap();
}

#[test]
fn refuses_pooler_pooling_on_a_model_without_pooler() {
    let roberta = load_model(&fixture("tiny-roberta"));
    let task = Spec::new(&["a", "b"]).shallow(3).task(&roberta);
    refused(
        &task,
        &roberta,
        &Limits::default(),
        &[
            "pooling",
            "\"mean\" or \"first\" (the model has no pooler)",
            "\"pooler\"",
        ],
    );
    validate(
        &Spec::new(&["a", "b"]).shallow(3).dense2().task(&roberta),
        &roberta,
        &Limits::default(),
    )
    .unwrap();
}

#[test]
fn refuses_unsupported_peft_type_and_task_type() {
    let dir = fixture("adapters/pt_random_2");
    let weights = read(&dir.join(peft::WEIGHTS_FILE));
    let cfg: serde_json::Value =
        serde_json::from_slice(&read(&dir.join(peft::CONFIG_FILE))).unwrap();
    peft::from_bytes(cfg.to_string().as_bytes(), &weights, None).unwrap();
    for (key, value, parts) in [
        (
            "peft_type",
            "LORA",
            vec![
                "adapter_config.peft_type",
                "\"LORA\"",
                "PROMPT_TUNING, P_TUNING, PREFIX_TUNING",
            ],
        ),
        (
            "peft_type",
            "ADAPTION_PROMPT",
            vec![
                "adapter_config.peft_type",
                "\"ADAPTION_PROMPT\"",
                "PREFIX_TUNING",
            ],
        ),
        (
            "task_type",
            "CAUSAL_LM",
            vec!["adapter_config.task_type", "\"CAUSAL_LM\"", "SEQ_CLS"],
        ),
        (
            "task_type",
            "TOKEN_CLS",
            vec!["adapter_config.task_type", "\"TOKEN_CLS\"", "SEQ_CLS"],
        ),
    ] {
        let mut c = cfg.clone();
        c[key] = value.into();
        let err = peft::from_bytes(c.to_string().as_bytes(), &weights, None)
            .err()
            .unwrap();
        assert_refusal(err, &parts);
    }
    let mut c = cfg.clone();
    c["num_transformer_submodules"] = 2.into();
    let err = peft::from_bytes(c.to_string().as_bytes(), &weights, None)
        .err()
        .unwrap();
    assert_refusal(
        err,
        &[
            "adapter_config.num_transformer_submodules",
            "expected 1",
            "found 2",
        ],
    );
}

#[test]
fn f16_and_bf16_tensors_are_accepted_and_widened() {
    let model = tiny();
    let dir = fixture("adapters/pt_random_2");
    let cfg = read(&dir.join(peft::CONFIG_FILE));
    let f32_task = peft::read_dir(&dir, None).unwrap();
    let s = f32_task.model.shallow.as_ref().unwrap().embeddings.clone();
    let Head::Linear(h) = &f32_task.model.head else {
        unreachable!()
    };
    let peft_tensors = [
        ("prompt_embeddings", &s),
        ("base_model.classifier.weight", &h.weight),
        ("base_model.classifier.bias", &h.bias),
    ];
    let native_task = Spec::new(&["a", "b", "c"])
        .shallow(4)
        .deep(2)
        .dense2()
        .task(&model);
    let nm = &native_task.model;
    let Head::Dense2 { dense, out } = &nm.head else {
        unreachable!()
    };
    let native_tensors = [
        ("prompt.shallow", &nm.shallow.as_ref().unwrap().embeddings),
        ("prompt.deep", nm.deep.as_ref().unwrap()),
        ("head.dense.weight", &dense.weight),
        ("head.dense.bias", &dense.bias),
        ("head.out_proj.weight", &out.weight),
        ("head.out_proj.bias", &out.bias),
    ];
    for (dtype, round) in [
        (
            safetensors::Dtype::F16,
            (|x: f32| half::f16::from_f32(x).to_f32()) as fn(f32) -> f32,
        ),
        (safetensors::Dtype::BF16, |x: f32| {
            half::bf16::from_f32(x).to_f32()
        }),
    ] {
        let expect = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| round(*x).to_bits())
                .collect()
        };
        // PEFT adapter saved in half precision.
        let weights = safetensors_bytes(
            &peft_tensors,
            dtype,
            HashMap::from([("format".into(), "pt".into())]),
        );
        let t = peft::from_bytes(&cfg, &weights, None).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
        let got = tensor_bits(&t);
        assert_eq!(got[0].2, expect(&s), "{dtype:?}: prompt");
        assert_eq!(got[1].2, expect(&h.weight), "{dtype:?}: head.weight");
        assert_eq!(got[2].2, expect(&h.bias), "{dtype:?}: head.bias");
        assert!(
            got.iter()
                .zip(tensor_bits(&f32_task))
                .any(|(a, b)| a.2 != b.2),
            "{dtype:?}: rounding must show"
        );
        validate(&t, &model, &Limits::default()).unwrap();
        // Native file in half precision.
        let bytes = safetensors_bytes(&native_tensors, dtype, native_header(&native_task.meta));
        let t = native::from_bytes(&bytes).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
        for ((name, _, got), (_, want)) in tensor_bits(&t).iter().zip(&native_tensors) {
            assert_eq!(got, &expect(want), "{dtype:?}: native {name}");
        }
        validate(&t, &model, &Limits::default()).unwrap();
    }
    // Integer tensors are not a prompt.
    let weights = safetensors_bytes(&peft_tensors, safetensors::Dtype::I32, HashMap::new());
    let err = peft::from_bytes(&cfg, &weights, None).err().unwrap();
    assert_refusal(err, &["dtype", "I32", "F32, F16, BF16"]);
}

// ---------------------------------------------------------- robustness

fn valid_native_file() -> Vec<u8> {
    let model = tiny();
    native::to_bytes(
        &Spec::new(&["a", "b"])
            .shallow(2)
            .deep(1)
            .dense2()
            .task(&model),
    )
    .unwrap()
}

#[test]
fn every_truncation_of_a_native_file_is_refused() {
    let bytes = valid_native_file();
    native::from_bytes(&bytes).unwrap();
    for k in 0..bytes.len() {
        assert!(
            native::from_bytes(&bytes[..k]).is_err(),
            "prefix of {k}/{} bytes accepted",
            bytes.len()
        );
    }
}

#[test]
fn every_truncation_of_an_adapter_is_refused() {
    for name in ["pt_random_2", "roberta_prefix_3"] {
        let dir = fixture(&format!("adapters/{name}"));
        let cfg = read(&dir.join(peft::CONFIG_FILE));
        let weights = read(&dir.join(peft::WEIGHTS_FILE));
        peft::from_bytes(&cfg, &weights, None).unwrap();
        for k in 0..weights.len() {
            assert!(
                peft::from_bytes(&cfg, &weights[..k], None).is_err(),
                "{name}: weights prefix {k}/{} accepted",
                weights.len()
            );
        }
        // JSON: every prefix that stops before the closing brace.
        let end = cfg.iter().rposition(|&b| b == b'}').unwrap();
        for k in 0..end {
            assert!(
                peft::from_bytes(&cfg[..k], &weights, None).is_err(),
                "{name}: config prefix {k} accepted"
            );
        }
    }
}

/// Length of the safetensors header (8-byte size + JSON).
fn header_len(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn corrupted_native_files_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8)) {
        let valid = valid_native_file();
        let original = native::from_bytes(&valid).unwrap().version;
        let header = header_len(&valid);
        let mut bytes = valid.clone();
        let n = bytes.len();
        for (at, x) in &flips {
            bytes[at.index(n)] ^= x;
        }
        let result = native::from_bytes(&bytes);
        if bytes[..header] == valid[..header] && bytes != valid {
            // Only tensor bytes changed: still a file, but a new version.
            let t = result.map_err(|e| TestCaseError::fail(format!("data-only corruption refused: {e}")))?;
            prop_assert_ne!(t.version, original);
        }
    }

    #[test]
    fn corrupted_adapters_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
        in_config in any::<bool>(),
    ) {
        let dir = fixture("adapters/prefix_2");
        let mut cfg = read(&dir.join(peft::CONFIG_FILE));
        let mut weights = read(&dir.join(peft::WEIGHTS_FILE));
        let target = if in_config { &mut cfg } else { &mut weights };
        let n = target.len();
        for (at, x) in &flips {
            target[at.index(n)] ^= x;
        }
        let _ = peft::from_bytes(&cfg, &weights, None);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), len in any::<u64>()) {
        prop_assert!(native::from_bytes(&bytes).is_err() || bytes.len() >= 8);
        // A plausible header size in front makes the parser reach the JSON.
        let mut framed = (len % 600).to_le_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        let _ = native::from_bytes(&framed);
        let _ = peft::from_bytes(&bytes, &framed, None);
    }
}
