//! Task files: what a task is on disk (native `.safetensors` or a PEFT
//! adapter directory), how it is read, written and checked against the
//! loaded model.

pub mod cli;
pub mod native;
pub mod peft;
pub mod validate;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::{Head, Pooling, ShallowPrompt, TaskModel, Template};
use crate::model::Linear;

pub use validate::{Limits, validate};

/// Why a task file was refused. Every variant names the field, what was
/// expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: not a valid file: {reason}")]
    Format { what: String, reason: String },
    #[error("{field}: expected {expected}, found {found}")]
    Mismatch {
        field: String,
        expected: String,
        found: String,
    },
    #[error("{field}: missing (expected {expected})")]
    Missing { field: String, expected: String },
    #[error("{field}: unsupported value {found} (supported: {supported})")]
    Unsupported {
        field: String,
        found: String,
        supported: String,
    },
    #[error("{field}: {count} values are NaN or infinite")]
    NonFinite { field: String, count: usize },
}

impl TaskError {
    pub(crate) fn mismatch(field: &str, expected: impl ToString, found: impl ToString) -> Self {
        TaskError::Mismatch {
            field: field.into(),
            expected: expected.to_string(),
            found: found.to_string(),
        }
    }
}

/// The model a task was made for.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BaseModelRef {
    /// Readable name, e.g. `all-MiniLM-L6-v2`.
    #[serde(default)]
    pub name: String,
    /// `sha256:…` from [`crate::model::Model::fingerprint`]; `None` for a PEFT
    /// adapter, which does not carry one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// Where a task came from, when known.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Provenance {
    /// `prompt-tuning`, `p-tuning`, `p-tuning-v2`, or `peft:<PEFT_TYPE>`.
    #[serde(default)]
    pub method: String,
    /// The data it was trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Free-form metrics (accuracy, loss, …).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub metrics: serde_json::Value,
    /// RFC 3339 creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

/// Everything about a task that is not a tensor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskMeta {
    /// Label names in head-row order.
    pub labels: Vec<String>,
    /// Placement of the shallow prompt (`[P:n] {text}` for a plain prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    pub pooling: Pooling,
    pub base_model: BaseModelRef,
    #[serde(default)]
    pub provenance: Provenance,
}

/// What kind of prompt a task carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptKind {
    /// Virtual tokens at the input (Prompt Tuning, P-Tuning v1).
    Shallow,
    /// Key/value prefixes in every layer (P-Tuning v2, prefix tuning).
    Deep,
    /// Both.
    Hybrid,
    /// Neither (a head on the frozen model).
    None,
}

/// A task as read from a file, on the host, before it is placed on the
/// engine's device.
#[derive(Clone)]
pub struct Task {
    pub meta: TaskMeta,
    /// Host copy of what the engine runs (tensors on the CPU, f32).
    pub model: TaskModel,
    /// `sha256:` of the tensors and metadata: the task's version.
    pub version: String,
}

impl Task {
    /// Builds a task from its parts, computing the version.
    pub fn new(meta: TaskMeta, model: TaskModel) -> Result<Self, TaskError> {
        let version = content_hash(&meta, &model)?;
        Ok(Task {
            meta,
            model,
            version,
        })
    }

    /// Shallow, deep, both or neither.
    pub fn kind(&self) -> PromptKind {
        match (self.model.shallow.is_some(), self.model.deep.is_some()) {
            (true, false) => PromptKind::Shallow,
            (false, true) => PromptKind::Deep,
            (true, true) => PromptKind::Hybrid,
            (false, false) => PromptKind::None,
        }
    }

    /// A copy of the engine-side model on `device`.
    pub fn to_device(&self, device: &Device) -> candle_core::Result<TaskModel> {
        let mv = |t: &Tensor| t.to_device(device);
        let lin = |l: &Linear| -> candle_core::Result<Linear> {
            Ok(Linear {
                weight: mv(&l.weight)?,
                bias: mv(&l.bias)?,
            })
        };
        Ok(TaskModel {
            shallow: match &self.model.shallow {
                Some(s) => Some(ShallowPrompt {
                    embeddings: mv(&s.embeddings)?,
                    template: s.template.clone(),
                }),
                None => None,
            },
            deep: self.model.deep.as_ref().map(mv).transpose()?,
            head: match &self.model.head {
                Head::Linear(l) => Head::Linear(lin(l)?),
                Head::Dense2 { dense, out } => Head::Dense2 {
                    dense: lin(dense)?,
                    out: lin(out)?,
                },
            },
            pooling: self.model.pooling,
        })
    }

    /// Bytes of tensor data the task holds.
    pub fn tensor_bytes(&self) -> usize {
        named_tensors(&self.model)
            .iter()
            .map(|(_, t)| t.elem_count() * 4)
            .sum()
    }
}

/// The task's tensors under their native-file names, in a fixed order.
pub(crate) fn named_tensors(m: &TaskModel) -> Vec<(&'static str, &Tensor)> {
    let mut v: Vec<(&'static str, &Tensor)> = Vec::new();
    if let Some(s) = &m.shallow {
        v.push((native::SHALLOW, &s.embeddings));
    }
    if let Some(d) = &m.deep {
        v.push((native::DEEP, d));
    }
    match &m.head {
        Head::Linear(l) => {
            v.push(("head.weight", &l.weight));
            v.push(("head.bias", &l.bias));
        }
        Head::Dense2 { dense, out } => {
            v.push(("head.dense.weight", &dense.weight));
            v.push(("head.dense.bias", &dense.bias));
            v.push(("head.out_proj.weight", &out.weight));
            v.push(("head.out_proj.bias", &out.bias));
        }
    }
    v
}

fn content_hash(meta: &TaskMeta, model: &TaskModel) -> Result<String, TaskError> {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(meta).unwrap_or_default());
    for (name, t) in named_tensors(model) {
        h.update(name.as_bytes());
        h.update(format!("{:?}", t.dims()).as_bytes());
        let v: Vec<f32> = t
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(|e| TaskError::Format {
                what: name.into(),
                reason: e.to_string(),
            })?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        h.update(&bytes);
    }
    Ok(format!("sha256:{}", &hex::encode(h.finalize())[..16]))
}

/// Converts any float tensor to host f32; refuses other dtypes by name.
pub(crate) fn to_f32(name: &str, t: Tensor) -> Result<Tensor, TaskError> {
    match t.dtype() {
        DType::F32 => Ok(t),
        DType::F16 | DType::BF16 | DType::F64 => {
            t.to_dtype(DType::F32).map_err(|e| TaskError::Format {
                what: name.into(),
                reason: e.to_string(),
            })
        }
        other => Err(TaskError::Unsupported {
            field: format!("{name}.dtype"),
            found: format!("{other:?}"),
            supported: "F32, F16, BF16".into(),
        }),
    }
}

/// Default label names, the transformers convention.
pub fn default_labels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("LABEL_{i}")).collect()
}

/// Parses a template string, or the plain prefix when absent.
pub(crate) fn template_for(meta_template: Option<&str>, n: usize) -> Result<Template, TaskError> {
    match meta_template {
        None => Ok(Template::prefix(n)),
        Some(s) => {
            let t = Template::parse(s).map_err(|reason| TaskError::Format {
                what: "template".into(),
                reason,
            })?;
            if t.num_virtual() != n {
                return Err(TaskError::mismatch(
                    "template",
                    format!("{n} virtual tokens (the prompt's rows)"),
                    format!("{} in {s:?}", t.num_virtual()),
                ));
            }
            Ok(t)
        }
    }
}
