//! Task files: what a task is on disk (native `.safetensors` or a PEFT
//! adapter directory), how it is read, written and checked against the
//! loaded model.

pub mod cli;
pub mod native;
pub mod peft;
mod st;
pub mod validate;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::{Head, Pooling, Segment, ShallowPrompt, TaskModel, Template};
use crate::model::Linear;

pub use validate::{Limits, validate};

/// Why a task file was refused. Every variant names the field, what was
/// expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The file system refused (the path says which file).
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The bytes are not the format they claim to be.
    #[error("{what}: not a valid file: {reason}")]
    Format { what: String, reason: String },
    /// A value differs from what the format or the model requires.
    #[error("{field}: expected {expected}, found {found}")]
    Mismatch {
        field: String,
        expected: String,
        found: String,
    },
    /// A required field or tensor is absent.
    #[error("{field}: missing (expected {expected})")]
    Missing { field: String, expected: String },
    /// A value outside what we can read, serve or export.
    #[error("{field}: unsupported value {found} (supported: {supported})")]
    Unsupported {
        field: String,
        found: String,
        supported: String,
    },
    /// NaN or ±Inf in a tensor: it would poison every row of its batch
    /// group, so it is refused at load.
    #[error("{field}: expected finite values, found {count} NaN or infinite of {total}")]
    NonFinite {
        field: String,
        count: usize,
        total: usize,
    },
}

impl TaskError {
    /// Shorthand for [`TaskError::Mismatch`], the most common refusal.
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
    /// How the head's input is pooled; must equal `TaskModel::pooling`
    /// (it is stored here because the native file keeps it in the header).
    pub pooling: Pooling,
    /// The model the prompt was trained against (checked at load).
    pub base_model: BaseModelRef,
    /// Where the task came from, for people inspecting it.
    #[serde(default)]
    pub provenance: Provenance,
}

impl TaskMeta {
    /// The metadata of a synthetic task (benchmarks, load tests) for
    /// `model`: no template, provenance "synthetic".
    pub fn synthetic(model: &crate::model::Model, labels: Vec<String>, pooling: Pooling) -> Self {
        TaskMeta {
            labels,
            template: None,
            pooling,
            base_model: BaseModelRef {
                name: model.name.clone(),
                fingerprint: Some(model.fingerprint.clone()),
            },
            provenance: Provenance {
                method: "synthetic".into(),
                ..Default::default()
            },
        }
    }
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
    /// Labels, template, pooling, base model and provenance.
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

    /// A copy of the engine-side model on `device`, its prompts (shallow
    /// and deep) in `prompt_dtype`, the encoder's serving dtype, so that no
    /// batch converts them; heads stay f32.
    pub fn to_device(
        &self,
        device: &Device,
        prompt_dtype: candle_core::DType,
    ) -> candle_core::Result<TaskModel> {
        let mv = |t: &Tensor| t.to_device(device);
        let prompt = |t: &Tensor| t.to_device(device)?.to_dtype(prompt_dtype);
        let lin = |l: &Linear| -> candle_core::Result<Linear> {
            Ok(Linear {
                weight: mv(&l.weight)?,
                bias: mv(&l.bias)?,
            })
        };
        Ok(TaskModel {
            shallow: match &self.model.shallow {
                Some(s) => Some(ShallowPrompt {
                    embeddings: prompt(&s.embeddings)?,
                    template: s.template.clone(),
                }),
                None => None,
            },
            deep: self.model.deep.as_ref().map(prompt).transpose()?,
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

    /// The metadata and the model must say the same thing (pooling,
    /// template), since a file stores only one of the two: a task whose
    /// halves disagree would change behaviour on a write/read cycle.
    pub fn check_consistent(&self) -> Result<(), TaskError> {
        if self.meta.pooling != self.model.pooling {
            return Err(TaskError::mismatch(
                "meta.pooling",
                format!("{:?} (the model's pooling)", self.model.pooling.as_str()),
                format!("{:?}", self.meta.pooling.as_str()),
            ));
        }
        match &self.model.shallow {
            Some(s) => {
                let n = s.embeddings.dims().first().copied().unwrap_or(0);
                let declared = template_for(self.meta.template.as_deref(), n)?;
                if declared != s.template {
                    return Err(TaskError::mismatch(
                        "meta.template",
                        format!("{:?} (the model's template)", s.template.to_string()),
                        format!("{:?}", declared.to_string()),
                    ));
                }
            }
            None => {
                if let Some(t) = &self.meta.template {
                    return Err(TaskError::mismatch(
                        "meta.template",
                        "none (the task has no shallow prompt)",
                        format!("{t:?}"),
                    ));
                }
            }
        }
        Ok(())
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
        let mut bytes = Vec::new();
        for_each_chunk(t, |v| {
            bytes.clear();
            bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            h.update(&bytes);
        })
        .map_err(|e| TaskError::Format {
            what: name.into(),
            reason: e.to_string(),
        })?;
    }
    Ok(format!("sha256:{}", &hex::encode(h.finalize())[..16]))
}

/// Calls `f` on consecutive pieces of a host tensor's f32 values, in order,
/// each at most [`CHUNK`] long: hashing and checking a task then needs a
/// few hundred KB beside it, not a copy of it (uploads run several at once).
pub(crate) fn for_each_chunk(t: &Tensor, mut f: impl FnMut(&[f32])) -> candle_core::Result<()> {
    /// Values per piece (256 KB of f32).
    const CHUNK: usize = 1 << 16;
    let flat = t.flatten_all()?;
    let n = flat.elem_count();
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        f(&flat.narrow(0, start, len)?.to_vec1::<f32>()?);
        start += len;
    }
    Ok(())
}

/// Checks tensor ranks (prompts `[n ≥ 1, width]`, weights `[out, in]`,
/// biases `[out]`) so that later code may index dimensions without
/// panicking. Shapes against the model are [`validate`]'s job.
pub(crate) fn check_ranks(m: &TaskModel) -> Result<(), TaskError> {
    let prompt = |name: &str, t: &Tensor, layout: &str| -> Result<(), TaskError> {
        let d = t.dims();
        if d.len() != 2 || d[0] == 0 {
            return Err(TaskError::mismatch(
                &format!("{name}.shape"),
                format!("[n ≥ 1, {layout}]"),
                format!("{d:?}"),
            ));
        }
        Ok(())
    };
    if let Some(s) = &m.shallow {
        prompt(native::SHALLOW, &s.embeddings, "hidden")?;
    }
    if let Some(d) = &m.deep {
        prompt(native::DEEP, d, "layers*2*hidden")?;
    }
    let lin = |name: &str, l: &Linear| -> Result<(), TaskError> {
        let (w, b) = (l.weight.dims(), l.bias.dims());
        if w.len() != 2 || b.len() != 1 {
            return Err(TaskError::mismatch(
                &format!("{name}.shape"),
                "weight [out, in], bias [out]",
                format!("weight {w:?}, bias {b:?}"),
            ));
        }
        Ok(())
    };
    match &m.head {
        Head::Linear(l) => lin("head", l),
        Head::Dense2 { dense, out } => {
            lin("head.dense", dense)?;
            lin("head.out_proj", out)
        }
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
            // Summed with overflow checks: `Template::num_virtual` adds
            // plainly, and a file could make the sum wrap around to `n`.
            let total = t.segments().iter().try_fold(0usize, |acc, seg| match seg {
                Segment::Virtual(k) => acc.checked_add(*k),
                _ => Some(acc),
            });
            if total != Some(n) {
                return Err(TaskError::mismatch(
                    "template",
                    format!("{n} virtual tokens (the prompt's rows)"),
                    format!(
                        "{} in {s:?}",
                        total.map_or("more than usize::MAX".into(), |k| k.to_string())
                    ),
                ));
            }
            Ok(t)
        }
    }
}
