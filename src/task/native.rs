//! The native task file: one `.safetensors` holding the prompt tensors and
//! the head, with the task's metadata as JSON in the safetensors header, so
//! that one file is the whole task (no side files to lose or mismatch).
//!
//! Header metadata keys: `format` = `softprompt.task`, `format_version` =
//! `1`, `meta` = [`TaskMeta`] as JSON. Tensors (f32 when written; F16, BF16
//! and F64 are accepted and widened on read): `prompt.shallow` `[n, hidden]`,
//! `prompt.deep` `[n, layers*2*hidden]` (PEFT's prefix layout),
//! `head.weight`/`head.bias` or `head.dense.*` + `head.out_proj.*`.

use std::collections::HashMap;
use std::path::Path;

use super::{Task, TaskError, TaskMeta, check_ranks, named_tensors, st, template_for};
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

const WHAT: &str = "task file";
const KNOWN: &str = "prompt.shallow, prompt.deep, head.weight, head.bias, head.dense.{weight,bias}, head.out_proj.{weight,bias}";

/// Serializes a task to native file bytes. Refuses a task whose metadata
/// and model disagree (see [`Task::check_consistent`]), since the file
/// keeps pooling and template only once.
pub fn to_bytes(task: &Task) -> Result<Vec<u8>, TaskError> {
    task.check_consistent()?;
    let tensors: Vec<(String, &candle_core::Tensor)> = named_tensors(&task.model)
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    let meta_json = serde_json::to_string(&task.meta).map_err(|e| TaskError::Format {
        what: "meta".into(),
        reason: e.to_string(),
    })?;
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
        ("meta".to_string(), meta_json),
    ]);
    st::write(&tensors, metadata, WHAT)
}

/// Parses native file bytes. Never panics on arbitrary input; every
/// refusal names the field, the expected and the found value.
pub fn from_bytes(bytes: &[u8]) -> Result<Task, TaskError> {
    let st::Loaded {
        mut tensors,
        metadata,
    } = st::read(bytes, WHAT)?;
    match metadata.get("format").map(String::as_str) {
        Some(FORMAT) => {}
        found => {
            return Err(TaskError::mismatch(
                "header.format",
                format!("{FORMAT:?} (a softprompt task file)"),
                found.map_or("none".to_string(), |f| format!("{f:?}")),
            ));
        }
    }
    let raw_version = metadata.get("format_version").map(String::as_str);
    match raw_version.and_then(|v| v.parse::<u32>().ok()) {
        Some(v) if (1..=FORMAT_VERSION).contains(&v) => {}
        _ => {
            return Err(TaskError::mismatch(
                "header.format_version",
                format!("an integer in 1..={FORMAT_VERSION}"),
                raw_version.map_or("none".to_string(), |v| format!("{v:?}")),
            ));
        }
    }
    let meta_json = metadata.get("meta").ok_or_else(|| TaskError::Missing {
        field: "header.meta".into(),
        expected: "the task metadata as JSON".into(),
    })?;
    let meta: TaskMeta = serde_json::from_str(meta_json).map_err(|e| TaskError::Format {
        what: "header.meta".into(),
        reason: e.to_string(),
    })?;

    let mut take = |name: &str| tensors.remove(name);
    let shallow = take(SHALLOW);
    let deep = take(DEEP);
    let missing = |name: &str| TaskError::Missing {
        field: format!("tensor {name:?}"),
        expected:
            "the classification head (head.weight + head.bias, or head.dense.* + head.out_proj.*)"
                .into(),
    };
    let mut need = |name: &str| take(name).ok_or_else(|| missing(name));
    let head = if let Ok(weight) = need("head.weight") {
        Head::Linear(Linear {
            weight,
            bias: need("head.bias")?,
        })
    } else if let Ok(weight) = need("head.dense.weight") {
        let dense = Linear {
            weight,
            bias: need("head.dense.bias")?,
        };
        let out = Linear {
            weight: need("head.out_proj.weight")?,
            bias: need("head.out_proj.bias")?,
        };
        Head::Dense2 { dense, out }
    } else {
        return Err(missing("head.weight"));
    };
    if let Some(extra) = {
        let mut left: Vec<&String> = tensors.keys().collect();
        left.sort();
        left.first().map(|s| s.to_string())
    } {
        return Err(TaskError::Unsupported {
            field: format!("tensor {extra:?}"),
            found: "an unknown tensor (or the other head layout's)".into(),
            supported: KNOWN.into(),
        });
    }
    let pooling = meta.pooling;
    let mut model = TaskModel {
        shallow: shallow.map(|embeddings| ShallowPrompt {
            embeddings,
            // replaced below, once the shape is known to be [n, hidden]
            template: crate::engine::Template::prefix(0),
        }),
        deep,
        head,
        pooling,
    };
    check_ranks(&model)?;
    match &mut model.shallow {
        Some(s) => s.template = template_for(meta.template.as_deref(), s.embeddings.dims()[0])?,
        None if meta.template.is_some() => {
            return Err(TaskError::Missing {
                field: format!("tensor {SHALLOW:?}"),
                expected: format!(
                    "a shallow prompt, since the template is {:?}",
                    meta.template.as_deref().unwrap_or("")
                ),
            });
        }
        None => {}
    }
    Task::new(meta, model)
}

/// Reads a native task file from disk.
pub fn read_file(path: &Path) -> Result<Task, TaskError> {
    let bytes = std::fs::read(path).map_err(|e| TaskError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    from_bytes(&bytes)
}

/// Writes a native task file atomically: a reader (or a crash) sees the
/// previous file or the complete new one, never a torn write. The store
/// uses it for uploads and replaces.
pub fn write_file(path: &Path, task: &Task) -> Result<(), TaskError> {
    let bytes = to_bytes(task)?;
    st::write_atomic(path, &bytes)
}
