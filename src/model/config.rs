//! The subset of a Hugging Face `config.json` the encoder needs.
//!
//! Parsed by hand (serde) instead of through candle-transformers so that one
//! loader serves BERT and RoBERTa and every refusal can name the field.

use serde::Deserialize;
use std::path::Path;

use super::ModelError;

/// Which encoder family the checkpoint belongs to; decides position ids and
/// the classification head shape PEFT uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// BERT: positions from 0, head on the pooler output.
    Bert,
    /// RoBERTa: positions start at `pad_token_id + 1`, two-layer head on `<s>`.
    Roberta,
}

impl Architecture {
    /// The tensor-name prefix a `*ForSequenceClassification` checkpoint uses.
    pub fn prefix(self) -> &'static str {
        match self {
            Architecture::Bert => "bert.",
            Architecture::Roberta => "roberta.",
        }
    }
}

/// Model hyper-parameters, validated at load time.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: usize,
    /// Raw `config.json` text, kept for the model fingerprint.
    #[serde(skip)]
    pub raw: String,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    pad_token_id: Option<usize>,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    position_embedding_type: Option<String>,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::Config(msg) => ModelError::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses a `config.json` body.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| ModelError::Config(e.to_string()))?;
        let model_type = raw
            .model_type
            .clone()
            .or_else(|| {
                raw.architectures
                    .as_ref()
                    .and_then(|a| a.first())
                    .map(|a| a.to_lowercase())
            })
            .unwrap_or_default();
        let architecture = match model_type.as_str() {
            "bert" => Architecture::Bert,
            "roberta" => Architecture::Roberta,
            t if t.starts_with("bert") => Architecture::Bert,
            t if t.starts_with("roberta") => Architecture::Roberta,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "architecture: expected model_type \"bert\" or \"roberta\", found {other:?}"
                )));
            }
        };
        if raw.hidden_act != "gelu" {
            return Err(ModelError::Unsupported(format!(
                "hidden_act: expected \"gelu\", found {:?}",
                raw.hidden_act
            )));
        }
        if let Some(p) = &raw.position_embedding_type
            && p != "absolute"
        {
            return Err(ModelError::Unsupported(format!(
                "position_embedding_type: expected \"absolute\", found {p:?}"
            )));
        }
        if raw.num_attention_heads == 0 || !raw.hidden_size.is_multiple_of(raw.num_attention_heads)
        {
            return Err(ModelError::Config(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                raw.hidden_size, raw.num_attention_heads
            )));
        }
        let pad_token_id = raw.pad_token_id.unwrap_or(match architecture {
            Architecture::Bert => 0,
            Architecture::Roberta => 1,
        });
        Ok(ModelConfig {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            intermediate_size: raw.intermediate_size,
            max_position_embeddings: raw.max_position_embeddings,
            type_vocab_size: raw.type_vocab_size,
            layer_norm_eps: raw.layer_norm_eps,
            pad_token_id,
            raw: text.to_string(),
        })
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// First position id used by a sequence (RoBERTa reserves `0..=pad`).
    pub fn position_offset(&self) -> usize {
        match self.architecture {
            Architecture::Bert => 0,
            Architecture::Roberta => self.pad_token_id + 1,
        }
    }

    /// How many tokens (virtual + text + prefix) one row may hold in total.
    pub fn max_sequence(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset())
    }
}
