//! A directory of task files: `<id>.safetensors` (native) and `<id>/`
//! (PEFT adapter directories, read-only: uploads are stored native).
//!
//! File system calls block, so every trait method runs its work on the
//! blocking pool: a slow disk (or a network mount shared by replicas) never
//! stalls the async workers that answer requests.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use super::{PromptStore, StoreEntry, StoreError};
use crate::fsutil;
use crate::registry::validate_id;
use crate::task::{Task, TaskError, native, peft};

/// Optional label names beside a PEFT adapter's two files.
pub const LABELS_FILE: &str = "labels.json";

/// Tasks in a local directory (default `prompts/`).
#[derive(Clone)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// Opens (and creates, if missing) the directory, and removes the temp
    /// files of writers that died mid-write (never a live writer's, in any
    /// process or container: see [`crate::fsutil`]).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| io(&root, e))?;
        match fsutil::clean_stale_temps(&root) {
            Ok(0) => {}
            Ok(removed) => tracing::info!(
                store = %root.display(),
                removed,
                "removed temp files of interrupted writes"
            ),
            // Leftovers are never listed; the store works without the clean.
            Err(e) => tracing::warn!(
                store = %root.display(),
                error = %e,
                "cannot clean temp files of interrupted writes"
            ),
        }
        Ok(DirStore { root })
    }

    fn native_path(&self, id: &str) -> PathBuf {
        self.root.join(format!("{id}.{}", native::EXTENSION))
    }

    /// Runs blocking file work off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&DirStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || work(&this))
            .await
            .map_err(|e| {
                io(
                    &self.root,
                    std::io::Error::other(format!("store worker: {e}")),
                )
            })?
    }

    fn list_sync(&self) -> Result<Vec<StoreEntry>, StoreError> {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(|e| io(&self.root, e))? {
            let path = entry.map_err(|e| io(&self.root, e))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let id = if path.is_dir() && path.join(peft::CONFIG_FILE).is_file() {
                name.to_string()
            } else if let Some(stem) = name.strip_suffix(&format!(".{}", native::EXTENSION)) {
                stem.to_string()
            } else {
                continue;
            };
            // Temp files of interrupted writes start with '.', and are not ids.
            if validate_id(&id).is_err() {
                continue;
            }
            // A file removed between read_dir and here is simply not listed.
            if let Some(token) = self.token(&id)? {
                entries.push(StoreEntry { id, token });
            }
        }
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        entries.dedup_by(|a, b| a.id == b.id);
        Ok(entries)
    }

    /// Version token of `id` as `load` would read it (the native file
    /// shadows an adapter directory): modification time and length of each
    /// file. `None` when the task is not there.
    fn token(&self, id: &str) -> Result<Option<String>, StoreError> {
        let file = self.native_path(id);
        if let Some(t) = file_token(&file)? {
            return Ok(Some(format!("n:{t}")));
        }
        let dir = self.root.join(id);
        let Some(config) = file_token(&dir.join(peft::CONFIG_FILE))? else {
            return Ok(None);
        };
        let weights = file_token(&dir.join(peft::WEIGHTS_FILE))?.unwrap_or_else(|| "-".into());
        let labels = file_token(&dir.join(LABELS_FILE))?.unwrap_or_else(|| "-".into());
        Ok(Some(format!("p:{config},{weights},{labels}")))
    }

    fn load_sync(&self, id: &str) -> Result<Task, StoreError> {
        validate_id(id)?;
        let file = self.native_path(id);
        let dir = self.root.join(id);
        let task = |source| StoreError::Task {
            id: id.to_string(),
            source,
        };
        if file.is_file() {
            native::read_file(&file).map_err(task)
        } else if dir.join(peft::CONFIG_FILE).is_file() {
            let labels = read_labels(&dir).map_err(task)?;
            peft::read_dir(&dir, labels).map_err(task)
        } else {
            Err(StoreError::NotFound(id.to_string()))
        }
    }

    /// Appends a journal record (an empty file named by its key), durably,
    /// before the change it announces.
    fn journal_sync(&self, change: &super::Change) -> Result<(), StoreError> {
        let dir = self.root.join(super::JOURNAL_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let path = dir.join(&change.key);
        std::fs::File::create(&path).map_err(|e| io(&path, e))?;
        sync_dir(&dir)
    }

    fn changes_after_sync(&self, after: &str) -> Result<Vec<super::Change>, StoreError> {
        let dir = self.root.join(super::JOURNAL_DIR);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let name = entry.map_err(|e| io(&dir, e))?.file_name();
            if let Some(c) = name.to_str().and_then(super::Change::parse)
                && c.key.as_str() > after
            {
                out.push(c);
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn prune_changes_sync(&self, before: &str) -> Result<(), StoreError> {
        let dir = self.root.join(super::JOURNAL_DIR);
        for c in self.changes_after_sync("")? {
            if c.key.as_str() >= before {
                break;
            }
            let path = dir.join(&c.key);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path, e)),
            }
        }
        Ok(())
    }

    fn put_sync(&self, id: &str, task: &Task) -> Result<String, StoreError> {
        validate_id(id)?;
        self.journal_sync(&super::Change::new(id, false))?;
        let bytes = native::to_bytes(task).map_err(|source| StoreError::Task {
            id: id.to_string(),
            source,
        })?;
        let target = self.native_path(id);
        // The token of the file this call wrote, not a stat of the target
        // afterwards: another replica may replace it right after our rename,
        // and remembering its token with our version served would hide its
        // version from our polls for good.
        let meta = fsutil::write_atomic_meta(&target, &bytes).map_err(|e| io(&target, e))?;
        // A native file now shadows any adapter directory of the same id;
        // remove the directory so the store has one version of the task.
        let dir = self.root.join(id);
        if dir.join(peft::CONFIG_FILE).is_file() {
            std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
        }
        Ok(format!("n:{}", meta_token(&meta)))
    }

    fn delete_sync(&self, id: &str) -> Result<bool, StoreError> {
        validate_id(id)?;
        self.journal_sync(&super::Change::new(id, true))?;
        let mut found = false;
        // The adapter directory first: while the native file exists it
        // shadows the directory, so no reader ever sees the directory alone.
        let dir = self.root.join(id);
        if dir.join(peft::CONFIG_FILE).is_file() {
            std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
            found = true;
        }
        let file = self.native_path(id);
        if file.is_file() {
            std::fs::remove_file(&file).map_err(|e| io(&file, e))?;
            found = true;
        }
        if found {
            sync_dir(&self.root)?;
        }
        Ok(found)
    }
}

/// `inode:mtime-in-ns:length` of a file, `None` when it does not exist.
/// The inode matters: file times tick only every few milliseconds, so two
/// replaces of one length in one tick would share mtime and length; but
/// every write here is a new file renamed into place, with a new inode.
fn file_token(path: &Path) -> Result<Option<String>, StoreError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m,
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path, e)),
    };
    Ok(Some(meta_token(&meta)))
}

/// The token of [`file_token`] from a file's metadata.
fn meta_token(meta: &std::fs::Metadata) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(meta);
    #[cfg(not(unix))]
    let inode = 0u64;
    format!("{inode}:{mtime}:{}", meta.len())
}

/// Optional `labels.json` (a JSON array of strings) beside a PEFT adapter's
/// files. A file that is there but unreadable is an error, not a silent
/// fallback to `LABEL_i` names.
fn read_labels(dir: &Path) -> Result<Option<Vec<String>>, TaskError> {
    let path = dir.join(LABELS_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => parse_labels(&bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TaskError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Parses a `labels.json`: a JSON array of label names in head order.
pub fn parse_labels(bytes: &[u8]) -> Result<Vec<String>, TaskError> {
    serde_json::from_slice(bytes).map_err(|e| TaskError::Format {
        what: LABELS_FILE.into(),
        reason: format!("expected a JSON array of label names: {e}"),
    })
}

fn io(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        location: path.display().to_string(),
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fsutil::sync_dir(dir).map_err(|e| io(dir, e))
}

#[async_trait::async_trait]
impl PromptStore for DirStore {
    async fn list(&self) -> Result<Vec<StoreEntry>, StoreError> {
        self.blocking(|s| s.list_sync()).await
    }
    async fn load(&self, id: &str) -> Result<Task, StoreError> {
        let id = id.to_string();
        self.blocking(move |s| s.load_sync(&id)).await
    }
    async fn put(&self, id: &str, task: &Task) -> Result<String, StoreError> {
        let (id, task) = (id.to_string(), task.clone());
        self.blocking(move |s| s.put_sync(&id, &task)).await
    }
    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.blocking(move |s| s.delete_sync(&id)).await
    }
    async fn changes_after(&self, after: &str) -> Result<Option<Vec<super::Change>>, StoreError> {
        let after = after.to_string();
        self.blocking(move |s| s.changes_after_sync(&after).map(Some))
            .await
    }
    async fn prune_changes(&self, before: &str) -> Result<(), StoreError> {
        let before = before.to_string();
        self.blocking(move |s| s.prune_changes_sync(&before)).await
    }
    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Task {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/adapters")
            .join(name);
        peft::read_dir(&dir, None).unwrap()
    }

    #[tokio::test]
    async fn tokens_follow_every_write_and_put_returns_the_listed_one() {
        let root = tempfile::tempdir().unwrap();
        let store = DirStore::open(root.path()).unwrap();
        let a = fixture("pt_random_2");
        let t1 = store.put("x", &a).await.unwrap();
        let listed = store.list().await.unwrap();
        assert_eq!(
            listed,
            [StoreEntry {
                id: "x".into(),
                token: t1.clone()
            }]
        );
        // The same bytes again: a new file, so a new token (a poller then
        // compares content hashes and changes nothing).
        let t2 = store.put("x", &a).await.unwrap();
        assert_ne!(t1, t2);
        assert_eq!(store.list().await.unwrap()[0].token, t2);
        assert_eq!(store.load("x").await.unwrap().version, a.version);

        // An adapter directory: its token covers labels.json too.
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adapters/prefix_2");
        let dst = root.path().join("ad");
        std::fs::create_dir(&dst).unwrap();
        for f in [peft::CONFIG_FILE, peft::WEIGHTS_FILE] {
            std::fs::copy(src.join(f), dst.join(f)).unwrap();
        }
        let before = store.list().await.unwrap();
        assert_eq!(before.len(), 2);
        std::fs::write(dst.join(LABELS_FILE), r#"["a","b"]"#).unwrap();
        let after = store.list().await.unwrap();
        assert_ne!(before[0].token, after[0].token);
        assert_eq!(store.load("ad").await.unwrap().meta.labels, ["a", "b"]);
        std::fs::write(dst.join(LABELS_FILE), "not json").unwrap();
        let err = store
            .load("ad")
            .await
            .err()
            .expect("bad labels.json refused");
        assert!(err.to_string().contains(LABELS_FILE), "{err}");

        assert!(store.delete("ad").await.unwrap());
        assert!(store.delete("x").await.unwrap());
        assert!(store.list().await.unwrap().is_empty());
    }
}
