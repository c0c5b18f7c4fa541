//! The frozen base model: configuration, weights, tokenizer and the encoder
//! forward. One [`Model`] is loaded per process and shared by every task.

pub mod config;
pub mod cost;
pub mod device;
pub mod encoder;
pub mod kernels;
pub mod tokenizer;
pub mod weights;

use candle_core::Device;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub use config::{Architecture, ModelConfig};
pub use device::{DeviceError, DeviceSpec};
pub use encoder::{Encoder, Linear, OpsMode, Quantize, ServeDtype};
pub use tokenizer::{Encoded, TextTokenizer, TokenizeError};

/// Why a model directory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Config(String),
    #[error("unsupported {0}")]
    Unsupported(String),
    #[error("missing {0}")]
    Missing(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Default location of the default model, filled by `scripts/fetch_model.sh`.
pub const DEFAULT_MODEL_DIR: &str = "models/all-MiniLM-L6-v2";

/// The resident base model plus what identifies it.
pub struct Model {
    pub encoder: Encoder,
    pub tokenizer: TextTokenizer,
    /// Readable name (the directory name).
    pub name: String,
    /// `sha256:` over the config's shape fields and the word-embedding
    /// matrix: two checkpoints that agree here accept the same prompts.
    pub fingerprint: String,
}

impl Model {
    /// Loads a Hugging Face model directory (config.json, tokenizer.json or
    /// vocab.txt, model.safetensors or pytorch_model.bin).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::Missing(format!(
                "model directory {}: not found (run scripts/fetch_model.sh for the default model)",
                dir.display()
            )));
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let weights = weights::Weights::from_dir(dir, device, config.architecture.prefix())?;
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let encoder = Encoder::new(config, &weights, device)?;
        let fingerprint = fingerprint(&encoder)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Model {
            encoder,
            tokenizer,
            name,
            fingerprint,
        })
    }

    /// Shortcut to the configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.encoder.config
    }
}

fn fingerprint(encoder: &Encoder) -> Result<String, ModelError> {
    let c = &encoder.config;
    let mut h = Sha256::new();
    h.update(
        format!(
            "{:?}|{}|{}|{}|{}|{}|{}|{}",
            c.architecture,
            c.vocab_size,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size,
            c.max_position_embeddings,
            c.type_vocab_size
        )
        .as_bytes(),
    );
    let emb: Vec<f32> = encoder.word_embeddings().flatten_all()?.to_vec1()?;
    let bytes: Vec<u8> = emb.iter().flat_map(|v| v.to_le_bytes()).collect();
    h.update(&bytes);
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}
