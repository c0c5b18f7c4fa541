//! Tasks in an object store (S3 and S3-compatible services: MinIO,
//! SeaweedFS, moto), shared by every replica behind a load balancer.
//!
//! Layout under the prefix, mirroring [`super::DirStore`]:
//! - `<prefix>/<id>.safetensors`: a native task file (what uploads write);
//! - `<prefix>/<id>/adapter_config.json` + `adapter_model.safetensors`
//!   [+ `labels.json`]: a PEFT adapter as saved, read-only.
//!
//! A PUT of one object is atomic in S3 (readers see the old object or the
//! new one), so uploads need no temp object. The version token of a task
//! is the ETag (else last-modified) and size of its objects, as the listing
//! returns them: one LIST request tells a poller what changed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientConfigKey, ObjectMeta, ObjectStore, ObjectStoreExt, RetryConfig,
};

use super::dir::{LABELS_FILE, parse_labels};
use super::{PromptStore, StoreEntry, StoreError};
use crate::registry::validate_id;
use crate::task::{Task, TaskError, native, peft};

/// Tasks under a prefix of an [`ObjectStore`].
pub struct ObjectPromptStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    location: String,
}

/// The objects seen under one id while listing.
#[derive(Default)]
struct Seen {
    native: Option<String>,
    config: Option<String>,
    weights: Option<String>,
    labels: Option<String>,
}

impl ObjectPromptStore {
    /// Tasks under `prefix` of `store`; `location` names it in logs and
    /// errors. Any [`ObjectStore`] works (tests use the in-memory one).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, location: impl Into<String>) -> Self {
        ObjectPromptStore {
            store,
            prefix: Path::from(prefix),
            location: location.into(),
        }
    }

    /// `s3://bucket/prefix` configured by the usual environment variables:
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (or the instance's
    /// role), `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`/
    /// `AWS_ENDPOINT` for S3-compatible services (path-style requests) and
    /// `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint.
    pub fn s3_from_env(bucket: &str, prefix: &str) -> Result<Self, StoreError> {
        Self::s3(AmazonS3Builder::from_env(), bucket, prefix)
    }

    /// `s3://bucket/prefix` with the client settings of `builder` (the
    /// environment's, or a test's), plus retries short enough that a poll
    /// of a store that is down fails in seconds.
    pub fn s3(builder: AmazonS3Builder, bucket: &str, prefix: &str) -> Result<Self, StoreError> {
        let location = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        let s3 = s3_client(builder, bucket, &location)?;
        Ok(Self::new(s3, prefix, location))
    }

    fn native_key(&self, id: &str) -> Path {
        self.prefix
            .clone()
            .join(format!("{id}.{}", native::EXTENSION))
    }

    fn adapter_dir(&self, id: &str) -> Path {
        self.prefix.clone().join(id)
    }

    fn remote(&self, action: impl Into<String>, source: object_store::Error) -> StoreError {
        StoreError::Remote {
            location: self.location.clone(),
            action: action.into(),
            source,
        }
    }

    /// Every object under `prefix` (`None`: the whole bucket).
    async fn list_objects(&self, prefix: &Path) -> Result<Vec<ObjectMeta>, StoreError> {
        let prefix = (!prefix.as_ref().is_empty()).then_some(prefix);
        self.store
            .list(prefix)
            .try_collect()
            .await
            .map_err(|e| self.remote(format!("list {}", prefix.map_or("/", |p| p.as_ref())), e))
    }

    /// The object's bytes, `None` when it does not exist.
    async fn get(&self, key: &Path) -> Result<Option<Vec<u8>>, StoreError> {
        let read = async { self.store.get(key).await?.bytes().await };
        match read.await {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.remote(format!("get {key}"), e)),
        }
    }

    async fn delete_key(&self, key: &Path) -> Result<(), StoreError> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.remote(format!("delete {key}"), e)),
        }
    }

    /// Removes every object of the adapter directory of `id`; true when
    /// there was one.
    async fn delete_adapter_dir(&self, id: &str) -> Result<bool, StoreError> {
        let objects = self.list_objects(&self.adapter_dir(id)).await?;
        for o in &objects {
            self.delete_key(&o.location).await?;
        }
        Ok(!objects.is_empty())
    }
}

/// The S3 client of `bucket` configured by the usual `AWS_*` environment
/// variables, as the prompt store's (also what the trainer reads
/// `s3://` data files with); `location` names it in errors.
pub fn s3_client_from_env(
    bucket: &str,
    location: &str,
) -> Result<Arc<dyn ObjectStore>, StoreError> {
    s3_client(AmazonS3Builder::from_env(), bucket, location)
}

/// The S3 client of `bucket` with the settings of `builder`, plus retries
/// short enough that a store that is down fails in seconds; refuses a
/// plain-HTTP endpoint without `AWS_ALLOW_HTTP=true`.
pub fn s3_client(
    builder: AmazonS3Builder,
    bucket: &str,
    location: &str,
) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let builder = builder
        .with_bucket_name(bucket)
        // A store that is down must fail a poll in seconds, not in the
        // default three minutes of retries: the next poll retries anyway.
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: Duration::from_secs(10),
        })
        // Task files run to tens of MiB: more than the 30 s default.
        .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), "120s");
    let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
    let allow_http =
        builder.get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp));
    if let Some(endpoint) = &endpoint
        && endpoint.starts_with("http://")
        && allow_http.as_deref() != Some("true")
    {
        return Err(StoreError::Config(format!(
            "{location}: the endpoint {endpoint} is plain HTTP; set AWS_ALLOW_HTTP=true to allow it"
        )));
    }
    let s3 = builder.build().map_err(|source| StoreError::Remote {
        location: location.to_string(),
        action: "configure the S3 client from AWS_* variables".into(),
        source,
    })?;
    Ok(Arc::new(s3))
}

/// Token of one object: its ETag (quotes stripped: listings and PUT answers
/// of some services differ there), else its modification time, and size.
fn object_token(meta: &ObjectMeta) -> String {
    match &meta.e_tag {
        Some(tag) => format!("{}:{}", tag.trim_matches('"'), meta.size),
        None => format!(
            "{}:{}",
            meta.last_modified.timestamp_nanos_opt().unwrap_or(0),
            meta.size
        ),
    }
}

/// Runs CPU work on a task (parsing, serializing: tensors can be large) on
/// the blocking pool.
async fn off_thread<T, F>(id: &str, work: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, TaskError> + Send + 'static,
{
    let task = |source| StoreError::Task {
        id: id.to_string(),
        source,
    };
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| {
            task(TaskError::Format {
                what: "task".into(),
                reason: format!("worker stopped: {e}"),
            })
        })?
        .map_err(task)
}

#[async_trait::async_trait]
impl PromptStore for ObjectPromptStore {
    async fn list(&self) -> Result<Vec<StoreEntry>, StoreError> {
        let objects = self.list_objects(&self.prefix).await?;
        let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
        for meta in &objects {
            let Some(parts) = meta.location.prefix_match(&self.prefix) else {
                continue;
            };
            let parts: Vec<String> = parts.map(|p| p.as_ref().to_string()).collect();
            let token = object_token(meta);
            match parts.as_slice() {
                [name] => {
                    if let Some(id) = name.strip_suffix(&format!(".{}", native::EXTENSION)) {
                        seen.entry(id.to_string()).or_default().native = Some(token);
                    }
                }
                [id, file] => {
                    let s = seen.entry(id.clone()).or_default();
                    match file.as_str() {
                        peft::CONFIG_FILE => s.config = Some(token),
                        peft::WEIGHTS_FILE => s.weights = Some(token),
                        LABELS_FILE => s.labels = Some(token),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        let dash = || "-".to_string();
        Ok(seen
            .into_iter()
            .filter(|(id, _)| validate_id(id).is_ok())
            .filter_map(|(id, s)| {
                // The native file shadows an adapter directory, as in `load`.
                let token = match (s.native, s.config) {
                    (Some(n), _) => format!("n:{n}"),
                    (None, Some(c)) => format!(
                        "p:{c},{},{}",
                        s.weights.unwrap_or_else(dash),
                        s.labels.unwrap_or_else(dash)
                    ),
                    (None, None) => return None,
                };
                Some(StoreEntry { id, token })
            })
            .collect())
    }

    async fn load(&self, id: &str) -> Result<Task, StoreError> {
        validate_id(id)?;
        if let Some(bytes) = self.get(&self.native_key(id)).await? {
            return off_thread(id, move || native::from_bytes(&bytes)).await;
        }
        let dir = self.adapter_dir(id);
        let Some(config) = self.get(&dir.clone().join(peft::CONFIG_FILE)).await? else {
            return Err(StoreError::NotFound(id.to_string()));
        };
        let weights_key = dir.clone().join(peft::WEIGHTS_FILE);
        let Some(weights) = self.get(&weights_key).await? else {
            return Err(StoreError::Task {
                id: id.to_string(),
                source: TaskError::Format {
                    what: weights_key.to_string(),
                    reason: format!(
                        "missing: an adapter needs {} and {}",
                        peft::CONFIG_FILE,
                        peft::WEIGHTS_FILE
                    ),
                },
            });
        };
        let labels = self.get(&dir.clone().join(LABELS_FILE)).await?;
        off_thread(id, move || {
            let labels = labels.as_deref().map(parse_labels).transpose()?;
            peft::from_bytes(&config, &weights, labels)
        })
        .await
    }

    async fn put(&self, id: &str, task: &Task) -> Result<String, StoreError> {
        validate_id(id)?;
        self.journal(&super::Change::new(id, false)).await?;
        let bytes = {
            let task = task.clone();
            off_thread(id, move || native::to_bytes(&task)).await?
        };
        let size = bytes.len() as u64;
        let key = self.native_key(id);
        let put = self
            .store
            .put(&key, bytes.into())
            .await
            .map_err(|e| self.remote(format!("put {key}"), e))?;
        let token = match put.e_tag {
            Some(tag) => format!("n:{}:{size}", tag.trim_matches('"')),
            None => {
                let meta = self
                    .store
                    .head(&key)
                    .await
                    .map_err(|e| self.remote(format!("head {key}"), e))?;
                format!("n:{}", object_token(&meta))
            }
        };
        // The native object now shadows any adapter directory of the same
        // id; remove it so the store holds one version of the task.
        self.delete_adapter_dir(id).await?;
        Ok(token)
    }

    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        validate_id(id)?;
        self.journal(&super::Change::new(id, true)).await?;
        let key = self.native_key(id);
        let native = match self.store.head(&key).await {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => return Err(self.remote(format!("head {key}"), e)),
        };
        // The adapter directory first: while the native object exists it
        // shadows the directory, so no reader ever sees the directory alone.
        let adapter = self.delete_adapter_dir(id).await?;
        if native {
            self.delete_key(&key).await?;
        }
        Ok(native || adapter)
    }

    async fn changes_after(&self, after: &str) -> Result<Option<Vec<super::Change>>, StoreError> {
        let dir = self.journal_dir();
        // S3's StartAfter: one request per 1,000 records, none for the rest
        // of the store.
        let offset = dir.clone().join(after);
        let objects: Vec<ObjectMeta> = self
            .store
            .list_with_offset(Some(&dir), &offset)
            .try_collect()
            .await
            .map_err(|e| self.remote(format!("list {dir} after {after}"), e))?;
        let mut out: Vec<super::Change> = objects
            .iter()
            .filter_map(|m| m.location.filename().and_then(super::Change::parse))
            .filter(|c| c.key.as_str() > after)
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Some(out))
    }

    async fn prune_changes(&self, before: &str) -> Result<(), StoreError> {
        let dir = self.journal_dir();
        for c in self.changes_after("").await?.unwrap_or_default() {
            if c.key.as_str() >= before {
                break;
            }
            self.delete_key(&dir.clone().join(c.key.as_str())).await?;
        }
        Ok(())
    }

    fn location(&self) -> String {
        self.location.clone()
    }
}

impl ObjectPromptStore {
    fn journal_dir(&self) -> Path {
        self.prefix.clone().join(super::JOURNAL_DIR)
    }

    /// Appends a journal record (an empty object named by its key) before
    /// the change it announces.
    async fn journal(&self, change: &super::Change) -> Result<(), StoreError> {
        let key = self.journal_dir().join(change.key.as_str());
        self.store
            .put(&key, Vec::new().into())
            .await
            .map_err(|e| self.remote(format!("put {key}"), e))?;
        Ok(())
    }
}
