//! The native task file: one `.safetensors` holding the prompt tensors and
//! the head, with the task's metadata as JSON in the safetensors header.
//!
//! Header metadata keys: `format` = `softprompt.task`, `format_version` =
//! `1`, `meta` = [`TaskMeta`] as JSON. Tensors: `prompt.shallow`
//! `[n, hidden]`, `prompt.deep` `[n, layers*2*hidden]` (PEFT's prefix
//! layout), `head.weight`/`head.bias` or `head.dense.*` + `head.out_proj.*`.

use std::collections::HashMap;

use super::peft::load_safetensors;
use super::{Task, TaskError, TaskMeta, named_tensors, template_for, to_f32};
use crate::engine::{Head, ShallowPrompt, TaskModel};
use crate::model::Linear;

/// Tensor name of the shallow prompt.
pub const SHALLOW: &str = "prompt.shallow";
/// Tensor name of the deep prompt.
pub const DEEP: &str = "prompt.deep";
/// Value of the `format` header key.
pub const FORMAT: &str = "softprompt.task";
/// Current format version; readers refuse newer ones.
pub const FORMAT_VERSION: u32 = 1;
/// File extension of native task files.
pub const EXTENSION: &str = "safetensors";

/// Serializes a task to native file bytes.
pub fn to_bytes(task: &Task) -> Result<Vec<u8>, TaskError> {
    let mut views = Vec::new();
    for (name, t) in named_tensors(&task.model) {
        let data: Vec<f32> = t
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(|e| TaskError::Format { what: name.into(), reason: e.to_string() })?;
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        views.push((name.to_string(), t.dims().to_vec(), bytes));
    }
    let tensors: Vec<(String, safetensors::tensor::TensorView)> = views
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| TaskError::Format { what: n.clone(), reason: e.to_string() })
        })
        .collect::<Result<_, _>>()?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("format_version".to_string(), FORMAT_VERSION.to_string());
    meta.insert(
        "meta".to_string(),
        serde_json::to_string(&task.meta).expect("metadata serializes"),
    );
    safetensors::serialize(tensors, Some(meta))
        .map_err(|e| TaskError::Format { what: "task file".into(), reason: e.to_string() })
}

/// Parses native file bytes. Never panics on arbitrary input.
pub fn from_bytes(bytes: &[u8]) -> Result<Task, TaskError> {
    let fmt = |reason: String| TaskError::Format { what: "task file".into(), reason };
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| fmt(e.to_string()))?;
    let meta_map = header.metadata().clone().unwrap_or_default();
    match meta_map.get("format").map(String::as_str) {
        Some(FORMAT) => {}
        found => {
            return Err(TaskError::mismatch(
                "header.format",
                format!("{FORMAT:?} (a softprompt task file)"),
                format!("{found:?}"),
            ));
        }
    }
    let version: u32 = meta_map
        .get("format_version")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| TaskError::Missing { field: "header.format_version".into(), expected: "an integer".into() })?;
    if version == 0 || version > FORMAT_VERSION {
        return Err(TaskError::mismatch("header.format_version", format!("1..={FORMAT_VERSION}"), version));
    }
    let meta: TaskMeta = serde_json::from_str(meta_map.get("meta").map(String::as_str).unwrap_or(""))
        .map_err(|e| TaskError::Format { what: "header.meta".into(), reason: e.to_string() })?;
    let mut tensors = load_safetensors(bytes, "task file")?;
    let mut take = |name: &str| -> Result<Option<candle_core::Tensor>, TaskError> {
        tensors.remove(name).map(|t| to_f32(name, t)).transpose()
    };
    let shallow = take(SHALLOW)?;
    let deep = take(DEEP)?;
    let need = |t: Option<candle_core::Tensor>, name: &str| {
        t.ok_or_else(|| TaskError::Missing { field: format!("tensor {name:?}"), expected: "the classification head".into() })
    };
    let head = if let Some(w) = take("head.weight")? {
        Head::Linear(Linear { weight: w, bias: need(take("head.bias")?, "head.bias")? })
    } else {
        let dense = Linear {
            weight: need(take("head.dense.weight")?, "head.weight")?,
            bias: need(take("head.dense.bias")?, "head.dense.bias")?,
        };
        let out = Linear {
            weight: need(take("head.out_proj.weight")?, "head.out_proj.weight")?,
            bias: need(take("head.out_proj.bias")?, "head.out_proj.bias")?,
        };
        Head::Dense2 { dense, out }
    };
    if let Some(extra) = tensors.keys().next() {
        return Err(TaskError::Unsupported {
            field: format!("tensor {extra:?}"),
            found: "an unknown tensor".into(),
            supported: "prompt.shallow, prompt.deep, head.*".into(),
        });
    }
    let shallow = match shallow {
        Some(e) => {
            let d = e.dims().to_vec();
            if d.len() != 2 {
                return Err(TaskError::mismatch("prompt.shallow.shape", "[n, hidden]", format!("{d:?}")));
            }
            let template = template_for(meta.template.as_deref(), d[0])?;
            Some(ShallowPrompt { embeddings: e, template })
        }
        None if meta.template.is_some() => {
            return Err(TaskError::Missing { field: "tensor \"prompt.shallow\"".into(), expected: "a shallow prompt, since a template is set".into() });
        }
        None => None,
    };
    if let Some(d) = &deep {
        if d.dims().len() != 2 {
            return Err(TaskError::mismatch("prompt.deep.shape", "[n, layers*2*hidden]", format!("{:?}", d.dims())));
        }
    }
    for (name, l) in match &head {
        Head::Linear(l) => vec![("head", l)],
        Head::Dense2 { dense, out } => vec![("head.dense", dense), ("head.out_proj", out)],
    } {
        if l.weight.dims().len() != 2 || l.bias.dims().len() != 1 {
            return Err(TaskError::mismatch(
                &format!("{name}.shape"),
                "weight [out, in], bias [out]",
                format!("{:?}, {:?}", l.weight.dims(), l.bias.dims()),
            ));
        }
    }
    let pooling = meta.pooling;
    Task::new(meta, TaskModel { shallow, deep, head, pooling })
}

/// Reads a native task file from disk.
pub fn read_file(path: &std::path::Path) -> Result<Task, TaskError> {
    let bytes = std::fs::read(path).map_err(|e| TaskError::Io { path: path.display().to_string(), source: e })?;
    from_bytes(&bytes)
}
