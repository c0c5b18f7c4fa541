//! A directory of task files: `<id>.safetensors` (native) and `<id>/`
//! (PEFT adapter directories, read-only: uploads are stored native).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{PromptStore, StoreError};
use crate::registry::validate_id;
use crate::task::{Task, native, peft};

/// Tasks in a local directory (default `prompts/`).
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// Opens (and creates, if missing) the directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| io(&root, e))?;
        Ok(DirStore { root })
    }

    fn native_path(&self, id: &str) -> PathBuf {
        self.root.join(format!("{id}.{}", native::EXTENSION))
    }

    fn list_sync(&self) -> Result<Vec<String>, StoreError> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(|e| io(&self.root, e))? {
            let path = entry.map_err(|e| io(&self.root, e))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            let id = if path.is_dir() && path.join(peft::CONFIG_FILE).is_file() {
                name.to_string()
            } else if let Some(stem) = name.strip_suffix(&format!(".{}", native::EXTENSION)) {
                stem.to_string()
            } else {
                continue;
            };
            // Temp files of interrupted writes start with '.', and are not ids.
            if validate_id(&id).is_ok() {
                ids.push(id);
            }
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    fn load_sync(&self, id: &str) -> Result<Task, StoreError> {
        validate_id(id)?;
        let file = self.native_path(id);
        let dir = self.root.join(id);
        let task = |source| StoreError::Task { id: id.to_string(), source };
        if file.is_file() {
            native::read_file(&file).map_err(task)
        } else if dir.join(peft::CONFIG_FILE).is_file() {
            let labels = read_labels(&dir);
            peft::read_dir(&dir, labels).map_err(task)
        } else {
            Err(StoreError::NotFound(id.to_string()))
        }
    }

    fn put_sync(&self, id: &str, task: &Task) -> Result<(), StoreError> {
        validate_id(id)?;
        let bytes = native::to_bytes(task).map_err(|source| StoreError::Task { id: id.to_string(), source })?;
        let target = self.native_path(id);
        write_atomic(&self.root, &target, &bytes)?;
        // A native file now shadows any adapter directory of the same id;
        // remove the directory so the store has one version of the task.
        let dir = self.root.join(id);
        if dir.join(peft::CONFIG_FILE).is_file() {
            std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
        }
        Ok(())
    }

    fn delete_sync(&self, id: &str) -> Result<bool, StoreError> {
        validate_id(id)?;
        let mut found = false;
        let file = self.native_path(id);
        if file.is_file() {
            std::fs::remove_file(&file).map_err(|e| io(&file, e))?;
            found = true;
        }
        let dir = self.root.join(id);
        if dir.join(peft::CONFIG_FILE).is_file() {
            std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
            found = true;
        }
        if found {
            sync_dir(&self.root)?;
        }
        Ok(found)
    }
}

/// Optional `labels.json` (a JSON array) beside a PEFT adapter's files.
fn read_labels(dir: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(dir.join("labels.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn io(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io { location: path.display().to_string(), source }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))
}

/// Temp file in the same directory, fsync, rename over the target, fsync
/// the directory: readers see the old file or the new one, never a part.
pub fn write_atomic(dir: &Path, target: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("task");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, target)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(target, e));
    }
    sync_dir(dir)
}

#[async_trait::async_trait]
impl PromptStore for DirStore {
    async fn list(&self) -> Result<Vec<String>, StoreError> {
        self.list_sync()
    }
    async fn load(&self, id: &str) -> Result<Task, StoreError> {
        self.load_sync(id)
    }
    async fn put(&self, id: &str, task: &Task) -> Result<(), StoreError> {
        self.put_sync(id, task)
    }
    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        self.delete_sync(id)
    }
    fn location(&self) -> String {
        self.root.display().to_string()
    }
}
