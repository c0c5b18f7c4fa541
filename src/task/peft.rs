//! HF PEFT adapter directories (`adapter_config.json` +
//! `adapter_model.safetensors`) for PROMPT_TUNING, P_TUNING and
//! PREFIX_TUNING with `task_type: SEQ_CLS`: read as PEFT saves them, and
//! written so that `PeftModel.from_pretrained` (PEFT 0.21) loads them, so a
//! task can leave this server for the Python ecosystem and come back.
//!
//! PEFT saves the *effective* prompt (the P-Tuning encoder's output, the
//! prefix projection's output), so reading needs no reparameterization and
//! every shallow task exports as PROMPT_TUNING, every deep one as
//! PREFIX_TUNING. What PEFT cannot express is refused on export: templates
//! other than a plain prefix, hybrid (shallow + deep) tasks, mean pooling,
//! and head/pooling pairs no `*ForSequenceClassification` computes.
//!
//! Our metadata (label names, provenance, base-model fingerprint) travels
//! in the safetensors header under [`META_KEY`], which PEFT ignores; reading
//! restores it, so export → import gives back the same task and version.

use candle_core::Tensor;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

use super::{
    BaseModelRef, PromptKind, Provenance, Task, TaskError, TaskMeta, check_ranks, default_labels,
    st, template_for,
};
use crate::engine::{Head, Pooling, ShallowPrompt, TaskModel, Template};
use crate::model::Linear;

/// File name of the adapter configuration inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter weights inside an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Header metadata key under which an export keeps our [`TaskMeta`].
pub const META_KEY: &str = "softprompt.meta";

/// The fields of `adapter_config.json` we read.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    /// `PROMPT_TUNING`, `P_TUNING` or `PREFIX_TUNING` (see [`SUPPORTED`]).
    pub peft_type: String,
    /// Must be `SEQ_CLS` when present: we serve classification only.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Rows of `prompt_embeddings`.
    pub num_virtual_tokens: usize,
    /// Hidden size the prompt was made for.
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// Encoder layers (PREFIX_TUNING width = `num_layers*2*token_dim`).
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Attention heads of the base model (informational).
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// 2 for encoder-decoder models, which we do not serve.
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

/// The prompt-learning methods we accept.
pub const SUPPORTED: &str = "PROMPT_TUNING, P_TUNING, PREFIX_TUNING";

/// Reads an adapter directory.
pub fn read_dir(dir: &Path, labels: Option<Vec<String>>) -> Result<Task, TaskError> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).map_err(|e| TaskError::Io {
            path: p.display().to_string(),
            source: e,
        })
    };
    let config = read(CONFIG_FILE)?;
    let weights = read(WEIGHTS_FILE)?;
    from_bytes(&config, &weights, labels)
}

/// Reads an adapter from the bytes of its two files (uploads arrive so).
/// `labels` overrides the label names (else those of an export's header,
/// else `LABEL_i`). Never panics on arbitrary input.
pub fn from_bytes(
    config_json: &[u8],
    weights: &[u8],
    labels: Option<Vec<String>>,
) -> Result<Task, TaskError> {
    let cfg: AdapterConfig =
        serde_json::from_slice(config_json).map_err(|e| TaskError::Format {
            what: CONFIG_FILE.into(),
            reason: e.to_string(),
        })?;
    let deep = match cfg.peft_type.as_str() {
        "PROMPT_TUNING" | "P_TUNING" => false,
        "PREFIX_TUNING" => true,
        other => {
            return Err(TaskError::Unsupported {
                field: "adapter_config.peft_type".into(),
                found: format!("{other:?}"),
                supported: SUPPORTED.into(),
            });
        }
    };
    if let Some(t) = &cfg.task_type
        && t != "SEQ_CLS"
    {
        return Err(TaskError::Unsupported {
            field: "adapter_config.task_type".into(),
            found: format!("{t:?}"),
            supported: "SEQ_CLS".into(),
        });
    }
    if cfg.num_transformer_submodules.unwrap_or(1) != 1 {
        return Err(TaskError::mismatch(
            "adapter_config.num_transformer_submodules",
            "1 (an encoder-only model)",
            cfg.num_transformer_submodules.unwrap_or(1),
        ));
    }
    let st::Loaded { tensors, metadata } = st::read(weights, WEIGHTS_FILE)?;
    let get = |name: &str| -> Option<Tensor> {
        // PEFT versions differ in the wrapper prefix of saved modules.
        ["", "base_model.", "base_model.model."]
            .iter()
            .find_map(|p| tensors.get(&format!("{p}{name}")).cloned())
    };
    let need = |name: &str, expected: &str| {
        get(name).ok_or_else(|| TaskError::Missing {
            field: format!("{WEIGHTS_FILE}: tensor {name:?}"),
            expected: expected.into(),
        })
    };
    let prompt = need("prompt_embeddings", "the prompt, [num_virtual_tokens, dim]")?;
    let pd = prompt.dims().to_vec();
    if pd.len() != 2 || pd[0] != cfg.num_virtual_tokens || pd[0] == 0 {
        return Err(TaskError::mismatch(
            "prompt_embeddings.shape",
            format!("[{}, dim] (num_virtual_tokens ≥ 1)", cfg.num_virtual_tokens),
            format!("{pd:?}"),
        ));
    }

    let lin = |w: &str, b: &str| -> Result<Linear, TaskError> {
        Ok(Linear {
            weight: need(w, "classifier weights saved via modules_to_save")?,
            bias: need(b, "classifier bias saved via modules_to_save")?,
        })
    };
    let (head, pooling) = if get("classifier.out_proj.weight").is_some() {
        let dense = lin("classifier.dense.weight", "classifier.dense.bias")?;
        let out = lin("classifier.out_proj.weight", "classifier.out_proj.bias")?;
        (Head::Dense2 { dense, out }, Pooling::First)
    } else if get("classifier.weight").is_some() {
        (
            Head::Linear(lin("classifier.weight", "classifier.bias")?),
            Pooling::Pooler,
        )
    } else {
        return Err(TaskError::Missing {
            field: format!("{WEIGHTS_FILE}: tensor \"classifier.weight\""),
            expected: "a SEQ_CLS classifier (classifier.weight/bias, or classifier.dense.* + classifier.out_proj.* for RoBERTa)".into(),
        });
    };
    let n = cfg.num_virtual_tokens;
    let model = TaskModel {
        shallow: (!deep).then(|| ShallowPrompt {
            embeddings: prompt.clone(),
            template: Template::prefix(n),
        }),
        deep: deep.then_some(prompt),
        head,
        pooling,
    };
    check_ranks(&model)?;

    let meta = match metadata.get(META_KEY) {
        Some(json) => {
            let meta: TaskMeta = serde_json::from_str(json).map_err(|e| TaskError::Format {
                what: format!("{WEIGHTS_FILE}: header {META_KEY}"),
                reason: e.to_string(),
            })?;
            // Our own export wrote it; it must describe these tensors.
            if meta.pooling != pooling {
                return Err(TaskError::mismatch(
                    &format!("{WEIGHTS_FILE}: header {META_KEY}.pooling"),
                    format!("{:?} (implied by the classifier)", pooling.as_str()),
                    format!("{:?}", meta.pooling.as_str()),
                ));
            }
            match (deep, &meta.template) {
                (false, t) if template_for(t.as_deref(), n)? == Template::prefix(n) => {}
                (true, None) => {}
                (_, t) => {
                    return Err(TaskError::mismatch(
                        &format!("{WEIGHTS_FILE}: header {META_KEY}.template"),
                        format!("{:?} (PEFT's placement)", Template::prefix(n).to_string()),
                        format!("{t:?}"),
                    ));
                }
            }
            meta
        }
        None => TaskMeta {
            labels: Vec::new(),
            template: None,
            pooling,
            base_model: BaseModelRef {
                name: cfg.base_model_name_or_path.clone().unwrap_or_default(),
                fingerprint: None,
            },
            provenance: Provenance {
                method: format!("peft:{}", cfg.peft_type),
                ..Default::default()
            },
        },
    };
    let labels = match labels {
        Some(l) => l,
        None if metadata.contains_key(META_KEY) => meta.labels.clone(),
        None => default_labels(model.num_labels()),
    };
    let task = Task::new(TaskMeta { labels, ..meta }, model)?;
    check_peft_dims(&cfg, &task)?;
    Ok(task)
}

/// The adapter config's own dimensions must agree with its tensors.
fn check_peft_dims(cfg: &AdapterConfig, task: &Task) -> Result<(), TaskError> {
    if let (Some(dim), Some(s)) = (cfg.token_dim, &task.model.shallow) {
        let found = s.embeddings.dims()[1];
        if found != dim {
            return Err(TaskError::mismatch(
                "prompt_embeddings.shape[1]",
                format!("{dim} (token_dim)"),
                found,
            ));
        }
    }
    if let (Some(dim), Some(layers), Some(d)) = (cfg.token_dim, cfg.num_layers, &task.model.deep) {
        let found = d.dims()[1];
        let want = layers.checked_mul(2).and_then(|x| x.checked_mul(dim));
        if want != Some(found) {
            return Err(TaskError::mismatch(
                "prompt_embeddings.shape[1]",
                format!(
                    "{} (num_layers {layers} × 2 × token_dim {dim})",
                    want.map_or("overflow".into(), |w| w.to_string())
                ),
                found,
            ));
        }
    }
    Ok(())
}

/// The two files of an exported adapter.
pub struct Exported {
    /// `adapter_config.json` contents.
    pub config_json: Vec<u8>,
    /// `adapter_model.safetensors` contents.
    pub weights: Vec<u8>,
}

fn unsupported(field: &str, found: impl ToString, supported: &str) -> TaskError {
    TaskError::Unsupported {
        field: field.into(),
        found: found.to_string(),
        supported: supported.into(),
    }
}

/// Builds the two adapter files PEFT 0.21 loads with
/// `PeftModel.from_pretrained(AutoModelForSequenceClassification…, dir)`:
/// shallow prefix tasks as PROMPT_TUNING, deep tasks as PREFIX_TUNING.
/// `num_attention_heads` (and, for PROMPT_TUNING, `num_layers`) are left
/// `null`: a task does not record them, and PEFT fills them from the base
/// model's config on load.
pub fn to_files(task: &Task) -> Result<Exported, TaskError> {
    task.check_consistent()?;
    let m = &task.model;
    check_ranks(m)?;
    const KINDS: &str =
        "a shallow prompt (exported as PROMPT_TUNING) or a deep prompt (PREFIX_TUNING), not both";
    let kind = task.kind();
    match kind {
        PromptKind::Shallow | PromptKind::Deep => {}
        PromptKind::Hybrid => return Err(unsupported("prompt", "hybrid (shallow + deep)", KINDS)),
        PromptKind::None => {
            return Err(unsupported(
                "prompt",
                "none (a head without a prompt)",
                KINDS,
            ));
        }
    }
    if let Some(s) = &m.shallow
        && !s.template.is_prefix()
    {
        return Err(unsupported(
            "template",
            format!("{:?}", s.template.to_string()),
            "\"[P:n] {text}\" (PEFT places every virtual token before the text)",
        ));
    }
    const HEADS: &str = "\"pooler\" with a linear head (BertForSequenceClassification) or \"first\" with a dense+out_proj head (RobertaForSequenceClassification)";
    let hidden = match (&m.head, m.pooling) {
        (Head::Linear(l), Pooling::Pooler) => l.weight.dims()[1],
        (Head::Dense2 { dense, .. }, Pooling::First) => dense.weight.dims()[1],
        (Head::Linear(_), p) => {
            return Err(unsupported(
                "pooling",
                format!("{:?} with a linear head", p.as_str()),
                HEADS,
            ));
        }
        (Head::Dense2 { .. }, p) => {
            return Err(unsupported(
                "pooling",
                format!("{:?} with a dense+out_proj head", p.as_str()),
                HEADS,
            ));
        }
    };
    if let Head::Dense2 { dense, out } = &m.head {
        // RobertaClassificationHead: dense [hidden, hidden], out_proj [labels, hidden].
        if dense.weight.dims()[0] != hidden || out.weight.dims()[1] != hidden {
            return Err(TaskError::mismatch(
                "head.dense.weight.shape",
                format!("[{hidden}, {hidden}] (RoBERTa's classifier.dense)"),
                format!("{:?}", dense.weight.dims()),
            ));
        }
    }

    let base_model =
        (!task.meta.base_model.name.is_empty()).then(|| task.meta.base_model.name.clone());
    let common = serde_json::json!({
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_model,
        "revision": null,
        "inference_mode": true,
        "modules_to_save": ["classifier", "score"],
        "num_transformer_submodules": 1,
        "num_attention_heads": null,
        "token_dim": hidden,
        "auto_mapping": null,
    });
    let mut config = common.as_object().cloned().unwrap_or_default();
    let prompt = match (&m.shallow, &m.deep) {
        (Some(s), None) => {
            let d = s.embeddings.dims();
            if d[1] != hidden {
                return Err(TaskError::mismatch(
                    "prompt.shallow.shape",
                    format!("[n, {hidden}] (the head's input size)"),
                    format!("{d:?}"),
                ));
            }
            config.extend([
                ("peft_type".to_string(), "PROMPT_TUNING".into()),
                ("num_virtual_tokens".to_string(), d[0].into()),
                ("num_layers".to_string(), serde_json::Value::Null),
                ("prompt_tuning_init".to_string(), "RANDOM".into()),
                (
                    "prompt_tuning_init_text".to_string(),
                    serde_json::Value::Null,
                ),
                (
                    "tokenizer_name_or_path".to_string(),
                    serde_json::Value::Null,
                ),
                ("tokenizer_kwargs".to_string(), serde_json::Value::Null),
            ]);
            &s.embeddings
        }
        (None, Some(deep)) => {
            let d = deep.dims();
            let per_layer = hidden
                .checked_mul(2)
                .filter(|&w| w > 0 && d[1] > 0 && d[1] % w == 0);
            let Some(per_layer) = per_layer else {
                return Err(TaskError::mismatch(
                    "prompt.deep.shape",
                    format!("[n, layers × 2 × {hidden}] (the head's input size)"),
                    format!("{d:?}"),
                ));
            };
            config.extend([
                ("peft_type".to_string(), "PREFIX_TUNING".into()),
                ("num_virtual_tokens".to_string(), d[0].into()),
                ("num_layers".to_string(), (d[1] / per_layer).into()),
                ("encoder_hidden_size".to_string(), hidden.into()),
                ("prefix_projection".to_string(), false.into()),
            ]);
            deep
        }
        _ => unreachable!("kind checked above"),
    };
    let mut tensors: Vec<(String, &Tensor)> = vec![("prompt_embeddings".into(), prompt)];
    match &m.head {
        Head::Linear(l) => {
            tensors.push(("base_model.classifier.weight".into(), &l.weight));
            tensors.push(("base_model.classifier.bias".into(), &l.bias));
        }
        Head::Dense2 { dense, out } => {
            tensors.push(("base_model.classifier.dense.weight".into(), &dense.weight));
            tensors.push(("base_model.classifier.dense.bias".into(), &dense.bias));
            tensors.push(("base_model.classifier.out_proj.weight".into(), &out.weight));
            tensors.push(("base_model.classifier.out_proj.bias".into(), &out.bias));
        }
    }
    let meta_json = serde_json::to_string(&task.meta).map_err(|e| TaskError::Format {
        what: "meta".into(),
        reason: e.to_string(),
    })?;
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (META_KEY.to_string(), meta_json),
    ]);
    let weights = st::write(&tensors, metadata, WEIGHTS_FILE)?;
    let config_json =
        serde_json::to_vec_pretty(&serde_json::Value::Object(config)).map_err(|e| {
            TaskError::Format {
                what: CONFIG_FILE.into(),
                reason: e.to_string(),
            }
        })?;
    Ok(Exported {
        config_json,
        weights,
    })
}

/// Writes an adapter directory (created if missing) for HF PEFT; each file
/// is replaced atomically. Refuses what PEFT cannot express (see
/// [`to_files`]) before touching the disk.
pub fn write_dir(task: &Task, dir: &Path) -> Result<(), TaskError> {
    let files = to_files(task)?;
    std::fs::create_dir_all(dir).map_err(|e| TaskError::Io {
        path: dir.display().to_string(),
        source: e,
    })?;
    st::write_atomic(&dir.join(WEIGHTS_FILE), &files.weights)?;
    st::write_atomic(&dir.join(CONFIG_FILE), &files.config_json)
}
