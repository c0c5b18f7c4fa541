//! The safetensors layer shared by both task formats: bytes in, host f32
//! tensors out, and back. Written here (not through candle's loader) so that
//! every refusal names the file and the tensor, half-precision files are
//! widened on the way in, and no byte pattern can reach an `unsafe` cast.

use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;

use super::TaskError;

/// What a safetensors file holds once parsed.
pub(crate) struct Loaded {
    /// Every tensor, converted to f32 on the host.
    pub tensors: HashMap<String, Tensor>,
    /// The `__metadata__` string map of the header (empty when absent).
    pub metadata: HashMap<String, String>,
}

/// dtypes a task file may use; everything is widened to f32.
pub(crate) const SUPPORTED_DTYPES: &str = "F32, F16, BF16, F64";

fn widen(name: &str, what: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>, TaskError> {
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(TaskError::Unsupported {
                field: format!("{what}: tensor {name:?} dtype"),
                found: format!("{other:?}"),
                supported: SUPPORTED_DTYPES.into(),
            });
        }
    })
}

/// Parses safetensors bytes. Never panics on arbitrary input: the
/// safetensors crate checks the header, offsets and sizes (with overflow
/// checks), and the conversion above only reads whole chunks.
pub(crate) fn read(bytes: &[u8], what: &str) -> Result<Loaded, TaskError> {
    let format = |e: safetensors::SafeTensorError| TaskError::Format {
        what: what.into(),
        reason: e.to_string(),
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(format)?;
    let st = SafeTensors::deserialize(bytes).map_err(format)?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let values = widen(&name, what, view.dtype(), view.data())?;
        let t = Tensor::from_vec(values, view.shape(), &Device::Cpu).map_err(|e| {
            TaskError::Format {
                what: format!("{what}: tensor {name:?}"),
                reason: e.to_string(),
            }
        })?;
        tensors.insert(name, t);
    }
    Ok(Loaded {
        tensors,
        metadata: header.metadata().clone().unwrap_or_default(),
    })
}

/// Host f32 values of a tensor, as little-endian bytes.
pub(crate) fn f32_bytes(name: &str, t: &Tensor) -> Result<Vec<u8>, TaskError> {
    let v: Vec<f32> = t
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(|e| TaskError::Format {
            what: name.into(),
            reason: e.to_string(),
        })?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

/// Serializes named tensors as f32 with a header metadata map. The
/// safetensors crate writes its metadata map in hash order, so the same
/// task would give different bytes from run to run; this writer emits the
/// same layout (8-byte header size, space-padded JSON header, tensors back
/// to back) with keys and tensors in sorted order, so equal tasks give
/// byte-identical files.
pub(crate) fn write(
    tensors: &[(String, &Tensor)],
    metadata: HashMap<String, String>,
    what: &str,
) -> Result<Vec<u8>, TaskError> {
    let mut sorted: Vec<&(String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut meta: Vec<(String, String)> = metadata.into_iter().collect();
    meta.sort();
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::Value::Object(meta.into_iter().map(|(k, v)| (k, v.into())).collect()),
    );
    let mut data = Vec::new();
    for (name, t) in sorted {
        if name == "__metadata__" || header.contains_key(name) {
            return Err(TaskError::Format {
                what: what.into(),
                reason: format!("tensor name {name:?} used twice or reserved"),
            });
        }
        let bytes = f32_bytes(name, t)?;
        let start = data.len();
        data.extend_from_slice(&bytes);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.dims(), "data_offsets": [start, data.len()]}),
        );
    }
    let mut json =
        serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| TaskError::Format {
            what: what.into(),
            reason: e.to_string(),
        })?;
    // safetensors pads the header with spaces to a multiple of 8 bytes.
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len() + data.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&data);
    Ok(out)
}

/// Writes `bytes` to `path` so that readers see the old file or the new
/// one, never a part: [`crate::fsutil::write_atomic`], its error as a
/// [`TaskError::Io`].
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<(), TaskError> {
    crate::fsutil::write_atomic(path, bytes).map_err(|source| TaskError::Io {
        path: path.display().to_string(),
        source,
    })
}
