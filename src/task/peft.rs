//! HF PEFT adapter directories (`adapter_config.json` +
//! `adapter_model.safetensors`) for PROMPT_TUNING, P_TUNING and
//! PREFIX_TUNING with `task_type: SEQ_CLS`, read as they are and written back.

use candle_core::{Device, Tensor};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

use super::{BaseModelRef, Provenance, Task, TaskError, TaskMeta, default_labels, to_f32};
use crate::engine::{Head, Pooling, ShallowPrompt, TaskModel, Template};
use crate::model::Linear;

/// File names inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The fields of `adapter_config.json` we read.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub num_virtual_tokens: usize,
    #[serde(default)]
    pub token_dim: Option<usize>,
    #[serde(default)]
    pub num_layers: Option<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
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
    if let Some(t) = &cfg.task_type {
        if t != "SEQ_CLS" {
            return Err(TaskError::Unsupported {
                field: "adapter_config.task_type".into(),
                found: t.clone(),
                supported: "SEQ_CLS".into(),
            });
        }
    }
    if cfg.num_transformer_submodules.unwrap_or(1) != 1 {
        return Err(TaskError::mismatch(
            "adapter_config.num_transformer_submodules",
            1,
            cfg.num_transformer_submodules.unwrap_or(1),
        ));
    }
    let tensors = load_safetensors(weights, WEIGHTS_FILE)?;
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
    let prompt = to_f32("prompt_embeddings", prompt)?;
    let pd = prompt.dims().to_vec();
    if pd.len() != 2 || pd[0] != cfg.num_virtual_tokens {
        return Err(TaskError::mismatch(
            "prompt_embeddings.shape",
            format!("[{}, …] (num_virtual_tokens)", cfg.num_virtual_tokens),
            format!("{pd:?}"),
        ));
    }

    let lin = |w: &str, b: &str| -> Result<Linear, TaskError> {
        Ok(Linear {
            weight: to_f32(w, need(w, "classifier weights saved via modules_to_save")?)?,
            bias: to_f32(b, need(b, "classifier bias saved via modules_to_save")?)?,
        })
    };
    let (head, pooling) = if get("classifier.out_proj.weight").is_some() {
        (
            Head::Dense2 {
                dense: lin("classifier.dense.weight", "classifier.dense.bias")?,
                out: lin("classifier.out_proj.weight", "classifier.out_proj.bias")?,
            },
            Pooling::First,
        )
    } else if get("classifier.weight").is_some() {
        (Head::Linear(lin("classifier.weight", "classifier.bias")?), Pooling::Pooler)
    } else {
        return Err(TaskError::Missing {
            field: format!("{WEIGHTS_FILE}: tensor \"classifier.weight\""),
            expected: "a SEQ_CLS classifier (classifier.weight/bias, or classifier.dense.* + classifier.out_proj.* for RoBERTa)".into(),
        });
    };
    let n = cfg.num_virtual_tokens;
    let (shallow, deep) = match cfg.peft_type.as_str() {
        "PROMPT_TUNING" | "P_TUNING" => (
            Some(ShallowPrompt {
                embeddings: prompt,
                template: Template::prefix(n),
            }),
            None,
        ),
        "PREFIX_TUNING" => (None, Some(prompt)),
        other => {
            return Err(TaskError::Unsupported {
                field: "adapter_config.peft_type".into(),
                found: other.into(),
                supported: SUPPORTED.into(),
            });
        }
    };
    let num_labels = head.num_labels();
    let labels = match labels {
        Some(l) => l,
        None => default_labels(num_labels),
    };
    let meta = TaskMeta {
        labels,
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
    };
    let model = TaskModel {
        shallow,
        deep,
        head,
        pooling,
    };
    let task = Task::new(meta, model)?;
    check_peft_dims(&cfg, &task)?;
    Ok(task)
}

/// The adapter config's own dimensions must agree with its tensors.
fn check_peft_dims(cfg: &AdapterConfig, task: &Task) -> Result<(), TaskError> {
    if let (Some(dim), Some(s)) = (cfg.token_dim, &task.model.shallow) {
        let found = s.embeddings.dims()[1];
        if found != dim {
            return Err(TaskError::mismatch("prompt_embeddings.shape[1]", format!("{dim} (token_dim)"), found));
        }
    }
    if let (Some(dim), Some(layers), Some(d)) = (cfg.token_dim, cfg.num_layers, &task.model.deep) {
        let found = d.dims()[1];
        if found != layers * 2 * dim {
            return Err(TaskError::mismatch(
                "prompt_embeddings.shape[1]",
                format!("{} (num_layers*2*token_dim)", layers * 2 * dim),
                found,
            ));
        }
    }
    Ok(())
}

/// Parses safetensors bytes into host tensors; never panics on bad bytes.
pub(crate) fn load_safetensors(bytes: &[u8], what: &str) -> Result<HashMap<String, Tensor>, TaskError> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| TaskError::Format {
        what: what.into(),
        reason: e.to_string(),
    })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu).map_err(|e| {
            TaskError::Format {
                what: format!("{what}: tensor {name:?}"),
                reason: e.to_string(),
            }
        })?;
        out.insert(name, t);
    }
    Ok(out)
}
