//! What the engine needs of one task, resident on the device: its prompt
//! (shallow, deep or both), how it pools, and its classification head.

use candle_core::Tensor;

use super::template::Template;
use crate::model::{Linear, ModelConfig};

/// How a task turns the encoder's output into one vector per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// BERT pooler (`tanh(W h₀ + b)`) over sequence position 0: what
    /// `BertForSequenceClassification`, and so PEFT, uses. With a shallow
    /// prefix, position 0 is the first virtual token.
    Pooler,
    /// The raw vector at position 0 (RoBERTa's head does its own dense+tanh).
    First,
    /// Mean over the text tokens (specials included, virtual tokens and
    /// padding excluded): what sentence-transformers models were trained for.
    Mean,
}

impl Pooling {
    /// How many of a row's `positions` the head reads from the last layer:
    /// all of them for mean pooling, else the first. The fused forward
    /// finishes only those in its last layer, and the benchmarks' FLOP
    /// count ([`crate::model::cost::encoder_flops`]) counts only them.
    pub fn positions_read(self, positions: usize) -> usize {
        match self {
            Pooling::Mean => positions,
            Pooling::Pooler | Pooling::First => positions.min(1),
        }
    }

    /// Name as written in task files.
    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::Pooler => "pooler",
            Pooling::First => "first",
            Pooling::Mean => "mean",
        }
    }
}

/// A task's classifier.
#[derive(Clone)]
pub enum Head {
    /// One linear layer (BERT's `classifier`).
    Linear(Linear),
    /// RoBERTa's `classifier.dense` → tanh → `classifier.out_proj`.
    Dense2 { dense: Linear, out: Linear },
}

impl Head {
    /// Number of labels the head scores.
    pub fn num_labels(&self) -> usize {
        let w = match self {
            Head::Linear(l) => &l.weight,
            Head::Dense2 { out, .. } => &out.weight,
        };
        w.dims()[0]
    }

    /// Logits `[N, labels]` from pooled features `[N, hidden]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Head::Linear(l) => l.forward(x),
            Head::Dense2 { dense, out } => out.forward(&dense.forward(x)?.tanh()?),
        }
    }
}

/// Shallow prompt: virtual-token embeddings placed by a template.
#[derive(Clone)]
pub struct ShallowPrompt {
    /// `[n_virtual, hidden]`, already through any P-Tuning encoder.
    pub embeddings: Tensor,
    pub template: Template,
}

/// One task as the engine runs it.
#[derive(Clone)]
pub struct TaskModel {
    pub shallow: Option<ShallowPrompt>,
    /// Deep prompt in PEFT's layout `[n, layers*2*hidden]`: element
    /// `[t, ((2*l + kv)*heads + h)*head_dim + d]` is layer l, key (kv=0) or
    /// value (kv=1), head h.
    pub deep: Option<Tensor>,
    pub head: Head,
    pub pooling: Pooling,
}

impl TaskModel {
    /// Virtual tokens placed in the input sequence.
    pub fn shallow_len(&self) -> usize {
        self.shallow
            .as_ref()
            .map_or(0, |s| s.template.num_virtual())
    }

    /// Key/value prefix length in every layer.
    pub fn deep_len(&self) -> usize {
        self.deep.as_ref().map_or(0, |d| d.dims()[0])
    }

    /// Most text tokens (specials included) a row of this task may carry.
    pub fn text_budget(&self, config: &ModelConfig) -> usize {
        config
            .max_sequence()
            .saturating_sub(self.shallow_len() + self.deep_len())
    }

    /// Number of labels.
    pub fn num_labels(&self) -> usize {
        self.head.num_labels()
    }
}
