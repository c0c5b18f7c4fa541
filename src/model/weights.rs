//! A checkpoint's tensors, looked up by name with the naming variants real
//! checkpoints use (`bert.` prefix or none) and with errors that say what was
//! expected and what the file holds.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::ModelError;

/// All tensors of one checkpoint file, converted to f32 on the target device.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Prefix detected for encoder tensors (`"bert."`, `"roberta."` or `""`).
    prefix: String,
    source: PathBuf,
}

impl Weights {
    /// Loads `model.safetensors`, or `pytorch_model.bin` when that is all the
    /// directory has.
    pub fn from_dir(dir: &Path, device: &Device, arch_prefix: &str) -> Result<Self, ModelError> {
        let st = dir.join("model.safetensors");
        let bin = dir.join("pytorch_model.bin");
        let (path, tensors) = if st.is_file() {
            let t = candle_core::safetensors::load(&st, &Device::Cpu)
                .map_err(|e| ModelError::Weights(format!("{}: {e}", st.display())))?;
            (st, t)
        } else if bin.is_file() {
            let t = candle_core::pickle::read_all(&bin)
                .map_err(|e| ModelError::Weights(format!("{}: {e}", bin.display())))?;
            (bin, t.into_iter().collect())
        } else {
            return Err(ModelError::Missing(format!(
                "weights: expected {} or {}, found neither",
                st.display(),
                bin.display()
            )));
        };
        let mut out = HashMap::with_capacity(tensors.len());
        for (name, t) in tensors {
            let t = match t.dtype() {
                DType::F32 => t,
                DType::F16 | DType::BF16 | DType::F64 => t
                    .to_dtype(DType::F32)
                    .map_err(|e| ModelError::Weights(format!("{name}: {e}")))?,
                // Integer buffers (e.g. `position_ids`) are not weights.
                _ => continue,
            };
            let t = t
                .to_device(device)
                .map_err(|e| ModelError::Weights(format!("{name}: {e}")))?;
            out.insert(name, t);
        }
        let probe = "embeddings.word_embeddings.weight";
        let prefix = if out.contains_key(&format!("{arch_prefix}{probe}")) {
            arch_prefix.to_string()
        } else {
            String::new()
        };
        Ok(Weights {
            tensors: out,
            prefix,
            source: path,
        })
    }

    /// An encoder tensor (`embeddings.*`, `encoder.*`, `pooler.*`), checked
    /// against the shape the config implies.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let full = format!("{}{name}", self.prefix);
        let t = self.tensors.get(&full).ok_or_else(|| {
            let mut sample: Vec<&String> = self.tensors.keys().collect();
            sample.sort();
            sample.truncate(4);
            ModelError::Missing(format!(
                "tensor {full:?} (shape {shape:?}) not found in {}; it holds {} tensors, e.g. {sample:?}",
                self.source.display(),
                self.tensors.len()
            ))
        })?;
        if t.dims() != shape {
            return Err(ModelError::Weights(format!(
                "tensor {full:?}: expected shape {shape:?}, found {:?}",
                t.dims()
            )));
        }
        Ok(t.clone())
    }

    /// Like [`Weights::get`] but `None` when absent (optional parts such as
    /// the pooler of a sentence-transformers export).
    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>, ModelError> {
        if self.tensors.contains_key(&format!("{}{name}", self.prefix)) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}
