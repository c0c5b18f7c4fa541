//! Persistence of task files behind a small trait, so that a replica keeps
//! its tasks in a local directory ([`DirStore`]) or in a shared object store
//! ([`ObjectPromptStore`], `s3://bucket/prefix`) without the server knowing
//! the difference. Replicas that share a store converge on it by polling
//! [`PromptStore::list`], whose version tokens make "what changed" cheap.

pub mod dir;
pub mod object;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use crate::registry::RegistryError;
use crate::task::{Task, TaskError};

pub use dir::DirStore;
pub use object::ObjectPromptStore;

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {location}: {source}")]
    Io {
        location: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store {location}: {action}: {source}")]
    Remote {
        location: String,
        action: String,
        #[source]
        source: object_store::Error,
    },
    #[error("task {id:?} in the store: {source}")]
    Task {
        id: String,
        #[source]
        source: TaskError,
    },
    #[error("task {0:?} not found in the store")]
    NotFound(String),
    #[error("store configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl StoreError {
    /// True when the store itself could not be read or written (network,
    /// credentials, disk), as opposed to one task's content being bad: the
    /// first kind is retried, the second is remembered until the task
    /// changes again.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Io { .. } | StoreError::Remote { .. })
    }
}

/// One task as listed by the store, with a token that changes whenever the
/// stored task changes (ETag, or mtime and length), so that a poller can
/// tell what to reload without downloading anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreEntry {
    /// Task id.
    pub id: String,
    /// Opaque version token of the stored files; equal tokens mean the same
    /// content (different tokens may still hold the same content).
    pub token: String,
}

/// One record of a store's change journal: a `put` or `delete` of `id`,
/// written before the change itself, so that replicas find what changed
/// without listing every task (see `server::sync`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `<ms since 1970, 13 digits>-<8 hex random>-<p|d>-<id>`: sorts by the
    /// writer's clock; unique.
    pub key: String,
    /// The task changed.
    pub id: String,
    /// True for a delete, false for a put.
    pub deleted: bool,
}

/// Name of the journal folder (not a valid task id, so listings skip it).
pub const JOURNAL_DIR: &str = "_changes";

impl Change {
    /// This machine's clock in ms since 1970: what records are stamped with.
    pub fn now_ms() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    }

    /// A new record for `id`, stamped with this machine's clock.
    pub fn new(id: &str, deleted: bool) -> Change {
        let ms = Self::now_ms();
        let key = format!(
            "{ms:013}-{:08x}-{}-{id}",
            rand::random::<u32>(),
            if deleted { 'd' } else { 'p' }
        );
        Change {
            key,
            id: id.to_string(),
            deleted,
        }
    }

    /// Parses a journal object's name; `None` for anything else.
    pub fn parse(key: &str) -> Option<Change> {
        let mut parts = key.splitn(4, '-');
        let (ms, rand, op, id) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let ok = ms.len() == 13
            && ms.bytes().all(|b| b.is_ascii_digit())
            && rand.len() == 8
            && rand.bytes().all(|b| b.is_ascii_hexdigit())
            && crate::registry::validate_id(id).is_ok();
        let deleted = match op {
            "p" => false,
            "d" => true,
            _ => return None,
        };
        ok.then(|| Change {
            key: key.to_string(),
            id: id.to_string(),
            deleted,
        })
    }

    /// The smallest key stamped at or after `ms`: a cursor for
    /// [`PromptStore::changes_after`].
    pub fn floor(ms: u128) -> String {
        format!("{ms:013}")
    }

    /// The writer's clock of this record, in ms since 1970.
    pub fn millis(&self) -> u128 {
        self.key[..13].parse().unwrap_or(0)
    }
}

/// Where tasks live durably. Writes are all-or-nothing: after `put`
/// returns, the task survives a crash; a crash during `put` leaves the old
/// version (or nothing), never a file that loads half.
#[async_trait::async_trait]
pub trait PromptStore: Send + Sync + 'static {
    /// Every task in the store (native files and PEFT adapter directories
    /// alike), sorted by id, each with its version token.
    async fn list(&self) -> Result<Vec<StoreEntry>, StoreError>;
    /// Reads one task.
    async fn load(&self, id: &str) -> Result<Task, StoreError>;
    /// Writes (creates or replaces) a task durably, as a native file;
    /// returns the version token [`PromptStore::list`] will show for it, so
    /// the writer can recognise its own write when it next polls.
    async fn put(&self, id: &str, task: &Task) -> Result<String, StoreError>;
    /// Removes a task; `false` when it was not there.
    async fn delete(&self, id: &str) -> Result<bool, StoreError>;
    /// Journal records whose key sorts after `after`, oldest first;
    /// `None` when this store keeps no journal (then replicas list it).
    /// `put` and `delete` append a record before they change anything.
    async fn changes_after(&self, _after: &str) -> Result<Option<Vec<Change>>, StoreError> {
        Ok(None)
    }
    /// Removes journal records whose key sorts before `before`.
    async fn prune_changes(&self, _before: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// Human-readable location for logs and errors.
    fn location(&self) -> String;
}

/// The `--prompts` value: a local directory or an S3 bucket and prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A local (or mounted) directory.
    Dir(PathBuf),
    /// `s3://bucket/prefix`: S3 or an S3-compatible service, configured by
    /// the usual `AWS_*` environment variables.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix without leading or trailing `/` (may be empty).
        prefix: String,
    },
}

impl FromStr for StoreLocation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!(
                    "{s:?}: the bucket is missing; expected s3://bucket/prefix"
                ));
            }
            let prefix = prefix.trim_matches('/');
            if !prefix.is_empty()
                && prefix
                    .split('/')
                    .any(|p| p.is_empty() || p == "." || p == "..")
            {
                return Err(format!(
                    "{s:?}: the prefix has an empty, '.' or '..' segment"
                ));
            }
            return Ok(StoreLocation::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            });
        }
        // Anything else that looks like a URL is a mistake, not a directory
        // named "gs:".
        if let Some((scheme, _)) = s.split_once("://")
            && !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'.' || b == b'-')
        {
            return Err(format!(
                "{s:?}: unsupported store scheme {scheme:?}; expected a directory or s3://bucket/prefix"
            ));
        }
        if s.is_empty() {
            return Err("the prompt store location is empty".into());
        }
        Ok(StoreLocation::Dir(PathBuf::from(s)))
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Dir(p) => write!(f, "{}", p.display()),
            StoreLocation::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// Opens the store at `location`: creates a missing directory, or builds an
/// S3 client from the environment. Does not touch the network, so an
/// unreachable bucket is reported by the first `list`, not here.
pub fn open(location: &StoreLocation) -> Result<Arc<dyn PromptStore>, StoreError> {
    Ok(match location {
        StoreLocation::Dir(path) => Arc::new(DirStore::open(path)?),
        StoreLocation::S3 { bucket, prefix } => {
            Arc::new(ObjectPromptStore::s3_from_env(bucket, prefix)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        let s3 = |b: &str, p: &str| StoreLocation::S3 {
            bucket: b.into(),
            prefix: p.into(),
        };
        assert_eq!(
            "s3://b/p/q/".parse::<StoreLocation>().unwrap(),
            s3("b", "p/q")
        );
        assert_eq!("s3://b".parse::<StoreLocation>().unwrap(), s3("b", ""));
        assert_eq!("s3://b/".parse::<StoreLocation>().unwrap(), s3("b", ""));
        assert_eq!(
            "prompts".parse::<StoreLocation>().unwrap(),
            StoreLocation::Dir("prompts".into())
        );
        assert_eq!(
            "./a:b".parse::<StoreLocation>().unwrap(),
            StoreLocation::Dir("./a:b".into())
        );
        for bad in [
            "s3://",
            "s3:///p",
            "gs://b/p",
            "http://x/b",
            "s3://b/a//c",
            "s3://b/../x",
            "",
        ] {
            let err = bad.parse::<StoreLocation>().unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
        assert_eq!(s3("b", "p/q").to_string(), "s3://b/p/q");
        assert_eq!(s3("b", "").to_string(), "s3://b");
    }
}
