//! Checks a task against the loaded model before it can be served.

use super::{Task, TaskError, check_ranks};
use crate::engine::{Head, Pooling};
use crate::model::Model;

/// Size caps and overrides for validation.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most virtual tokens (shallow + deep) a task may have.
    pub max_virtual_tokens: usize,
    /// Text tokens a task must leave room for, specials included.
    pub min_text_tokens: usize,
    /// Most labels.
    pub max_labels: usize,
    /// Accept a task whose base-model fingerprint differs from the loaded
    /// model's (the shapes are still checked).
    pub allow_fingerprint_mismatch: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_virtual_tokens: 256,
            min_text_tokens: 8,
            max_labels: 1024,
            allow_fingerprint_mismatch: false,
        }
    }
}

/// NaN/±Inf count and element count of a host tensor, read in chunks so
/// that validating a large upload does not copy it whole.
fn count_non_finite(t: &candle_core::Tensor) -> (usize, usize) {
    let mut bad = 0;
    let counted = super::for_each_chunk(t, |v| bad += v.iter().filter(|x| !x.is_finite()).count());
    match counted {
        Ok(()) => (bad, t.elem_count()),
        Err(_) => (t.elem_count(), t.elem_count()),
    }
}

/// Every check the server makes before serving a task. The first failure is
/// returned, naming the field, the expected and the found value.
pub fn validate(task: &Task, model: &Model, limits: &Limits) -> Result<(), TaskError> {
    let c = model.config();
    let h = c.hidden_size;
    let m = &task.model;
    if let Some(fp) = &task.meta.base_model.fingerprint
        && *fp != model.fingerprint
        && !limits.allow_fingerprint_mismatch
    {
        return Err(TaskError::mismatch(
            "base_model.fingerprint",
            format!("{} ({})", model.fingerprint, model.name),
            format!("{fp} ({})", task.meta.base_model.name),
        ));
    }
    // Tasks also come from the trainer, not only from the readers: re-check
    // what the readers guarantee before indexing any dimension.
    check_ranks(m)?;
    task.check_consistent()?;
    if let Some(s) = &m.shallow {
        let d = s.embeddings.dims();
        if d[1] != h {
            return Err(TaskError::mismatch(
                "prompt.shallow.shape",
                format!("[n, {h}] (hidden_size)"),
                format!("{d:?}"),
            ));
        }
        if s.template.num_virtual() != d[0] {
            return Err(TaskError::mismatch(
                "template",
                format!("{} virtual tokens", d[0]),
                s.template.to_string(),
            ));
        }
    }
    if let Some(deep) = &m.deep {
        let d = deep.dims();
        let w = c.num_hidden_layers * 2 * h;
        if d[1] != w {
            return Err(TaskError::mismatch(
                "prompt.deep.shape",
                format!(
                    "[n, {w}] (num_layers {} × 2 × heads {} × head_dim {})",
                    c.num_hidden_layers,
                    c.num_attention_heads,
                    c.head_dim()
                ),
                format!("{d:?}"),
            ));
        }
    }
    let virt = m.shallow_len() + m.deep_len();
    if virt > limits.max_virtual_tokens {
        return Err(TaskError::mismatch(
            "num_virtual_tokens",
            format!("at most {} (max_virtual_tokens)", limits.max_virtual_tokens),
            virt,
        ));
    }
    let room = m.text_budget(c);
    if room < limits.min_text_tokens {
        return Err(TaskError::mismatch(
            "num_virtual_tokens",
            format!(
                "at most {} so that {} text tokens fit in {} positions",
                c.max_sequence().saturating_sub(limits.min_text_tokens),
                limits.min_text_tokens,
                c.max_sequence()
            ),
            virt,
        ));
    }
    let check_lin =
        |name: &str, l: &crate::model::Linear, inp: usize| -> Result<usize, TaskError> {
            let w = l.weight.dims();
            if w[1] != inp {
                return Err(TaskError::mismatch(
                    &format!("{name}.weight.shape"),
                    format!("[out, {inp}]"),
                    format!("{w:?}"),
                ));
            }
            if l.bias.dims() != [w[0]] {
                return Err(TaskError::mismatch(
                    &format!("{name}.bias.shape"),
                    format!("[{}]", w[0]),
                    format!("{:?}", l.bias.dims()),
                ));
            }
            Ok(w[0])
        };
    let labels = match &m.head {
        Head::Linear(l) => check_lin("head", l, h)?,
        Head::Dense2 { dense, out } => {
            // RoBERTa's classifier.dense is [hidden, hidden]; holding it to
            // that also caps the head's size.
            let mid = check_lin("head.dense", dense, h)?;
            if mid != h {
                return Err(TaskError::mismatch(
                    "head.dense.weight.shape",
                    format!("[{h}, {h}] (hidden_size)"),
                    format!("{:?}", dense.weight.dims()),
                ));
            }
            check_lin("head.out_proj", out, mid)?
        }
    };
    if labels != task.meta.labels.len() {
        return Err(TaskError::mismatch(
            "labels",
            format!("{labels} names (the head's output size)"),
            format!("{} names", task.meta.labels.len()),
        ));
    }
    if labels == 0 || labels > limits.max_labels {
        return Err(TaskError::mismatch(
            "labels",
            format!("1..={} labels (max_labels)", limits.max_labels),
            labels,
        ));
    }
    let mut seen = std::collections::HashMap::new();
    for (i, l) in task.meta.labels.iter().enumerate() {
        if l.is_empty() {
            return Err(TaskError::mismatch(
                &format!("labels[{i}]"),
                "a non-empty name",
                "\"\"",
            ));
        }
        if let Some(first) = seen.insert(l, i) {
            return Err(TaskError::mismatch(
                &format!("labels[{i}]"),
                format!("a name distinct from labels[{first}] {l:?}"),
                format!("{l:?}"),
            ));
        }
    }
    if m.pooling == Pooling::Pooler && !model.encoder.has_pooler() {
        return Err(TaskError::mismatch(
            "pooling",
            "\"mean\" or \"first\" (the model has no pooler)",
            "\"pooler\"",
        ));
    }
    for (name, t) in super::named_tensors(m) {
        let (bad, total) = count_non_finite(t);
        if bad > 0 {
            return Err(TaskError::NonFinite {
                field: name.into(),
                count: bad,
                total,
            });
        }
    }
    Ok(())
}
