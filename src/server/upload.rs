//! The body of `PUT /admin/tasks/{task}` → a [`Task`]: a native task file
//! (`application/octet-stream`) or a PEFT adapter (`multipart/form-data`
//! with `adapter_config.json`, `adapter_model.safetensors`, optional
//! `labels`). Parsing only; validation against the model is the registry's.

use axum::body::Bytes;
use axum::extract::Multipart;

use crate::task::{Task, TaskError, native, peft};

/// Why an upload body could not be read as a task.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(
        "unsupported content type {0:?}: send application/octet-stream (a native task file) or multipart/form-data (a PEFT adapter)"
    )]
    MediaType(String),
    #[error("upload larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("malformed upload body: {0}")]
    Malformed(String),
    #[error("the upload body did not arrive within {0} ms")]
    BodyTimeout(u64),
    #[error("multipart part {0:?} is missing")]
    MissingPart(&'static str),
    #[error(
        "multipart part {0:?} is not expected (expected adapter_config.json, adapter_model.safetensors, labels)"
    )]
    UnknownPart(String),
    #[error("multipart part {0:?} appears twice")]
    DuplicatePart(String),
    #[error("part labels: expected a JSON array of strings: {0}")]
    Labels(String),
    #[error(transparent)]
    Task(#[from] TaskError),
}

/// Name of the optional labels part.
pub const LABELS_PART: &str = "labels";

/// The parts of a PEFT adapter upload, read but not yet parsed.
#[derive(Default)]
pub struct AdapterParts {
    pub config: Option<Bytes>,
    pub weights: Option<Bytes>,
    pub labels: Option<Bytes>,
}

impl AdapterParts {
    /// Reads every part of a multipart body (form field name, or file name
    /// when the field has none).
    pub async fn read(mut multipart: Multipart, limit: usize) -> Result<Self, UploadError> {
        let mut parts = AdapterParts::default();
        let fail = |e: axum::extract::multipart::MultipartError| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                UploadError::TooLarge(limit)
            } else if let Some(ms) = super::timeouts::body_deadline(&e) {
                UploadError::BodyTimeout(ms)
            } else {
                UploadError::Malformed(e.body_text())
            }
        };
        while let Some(field) = multipart.next_field().await.map_err(fail)? {
            let name = field
                .name()
                .filter(|n| !n.is_empty())
                .or(field.file_name())
                .unwrap_or_default()
                .to_string();
            let slot = match name.as_str() {
                peft::CONFIG_FILE => &mut parts.config,
                peft::WEIGHTS_FILE => &mut parts.weights,
                LABELS_PART => &mut parts.labels,
                _ => return Err(UploadError::UnknownPart(name)),
            };
            if slot.is_some() {
                return Err(UploadError::DuplicatePart(name));
            }
            // Kept as received: a copy would double the upload's memory.
            *slot = Some(field.bytes().await.map_err(fail)?);
        }
        Ok(parts)
    }

    /// Parses the adapter (CPU work: run off the async workers).
    pub fn into_task(self) -> Result<Task, UploadError> {
        let config = self
            .config
            .ok_or(UploadError::MissingPart(peft::CONFIG_FILE))?;
        let weights = self
            .weights
            .ok_or(UploadError::MissingPart(peft::WEIGHTS_FILE))?;
        let labels = self
            .labels
            .map(|b| {
                serde_json::from_slice::<Vec<String>>(&b)
                    .map_err(|e| UploadError::Labels(e.to_string()))
            })
            .transpose()?;
        Ok(peft::from_bytes(&config, &weights, labels)?)
    }
}

/// Parses a native task file.
pub fn native_task(bytes: &[u8]) -> Result<Task, UploadError> {
    Ok(native::from_bytes(bytes)?)
}
