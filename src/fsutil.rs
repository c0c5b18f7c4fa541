//! Atomic file replacement, the one copy the crate uses: the directory
//! store ([`crate::store::DirStore`]), the task writer
//! ([`crate::task::native::write_file`], [`crate::task::peft::write_dir`])
//! and the trainer (checkpoints, output task file).
//!
//! # `write_atomic`
//!
//! Readers see the old file or the new one, never a part, and a write that
//! answered `Ok` survives a crash:
//!
//! 1. a temp file in the target's directory (a rename is atomic only
//!    within one file system), named `.<target name>.<pid>-<random>-<n>.tmp`,
//!    **created exclusively** (`O_EXCL`, so it is never someone else's);
//! 2. an exclusive advisory lock on it (see below), then the bytes, then
//!    `fsync` of the file;
//! 3. `rename` over the target, then `fsync` of the directory (the rename
//!    is durable only once the directory entry is on disk);
//! 4. on any error the temp file is removed.
//!
//! The name is unique per **write**, not per process. Replicas in containers
//! all run as pid 1, so a pid-only name (what the store used before) made
//! two replicas writing the same task on a shared directory truncate and
//! rename each other's temp file: uploads failed with 500 and acknowledged
//! uploads were lost (measured: 23 of 60 uploads failed, 16 acknowledged
//! ones lost in 30 rounds). A 64-bit random value drawn per write tells
//! processes (and pid namespaces, and hosts) apart; a process-wide counter
//! tells the writes of one process apart; `create_new` turns any remaining
//! collision into a retry with a new name instead of a shared file.
//!
//! The name starts with `.` and ends in `.tmp`: never a task id, so store
//! listings skip it.
//!
//! # `clean_stale_temps`: temp files of dead writers
//!
//! A writer killed between create and rename (SIGKILL, OOM, power loss)
//! leaves its temp file. A pid check cannot tell whether its writer is
//! alive: replicas in different containers share pid 1, and a pid is
//! meaningless across hosts. Instead the writer holds an exclusive
//! advisory lock (`File::lock`, `flock(2)` on Linux) on its temp file from
//! creation until after the rename. The kernel releases that lock when the
//! writer's file is closed, which includes any death of the process. The
//! cleaner removes a temp file only if it can take the lock *without
//! blocking*; a live writer still holds it, so its file is kept. Locks
//! taken with `flock` belong to the open file description, so they also
//! conflict between two opens within one process, and across pid
//! namespaces on one kernel. (On NFS, Linux emulates `flock` with POSIX
//! byte-range locks, which the server arbitrates between hosts.) If a lock
//! cannot be taken at all (a file system without locks), the cleaner keeps
//! the file: a leftover temp file costs only disk space and is never listed.
//!
//! One window remains: the cleaner can take the lock between the writer's
//! create and its lock. So the writer, once it holds the lock, checks that
//! its path still names its file (same device and inode); if the cleaner
//! removed it, the writer starts again under a new name. Either way a race
//! with the cleaner can never make a write answer `Ok` without its bytes
//! in place: at worst the rename fails and the write reports an error.
//!
//! Only names in this module's exact format are touched; an older format
//! (`.<name>.<pid>.tmp`, written without a lock) is left alone, since its
//! writer cannot be told alive or dead.
//!
//! # Why not `object_store`'s `LocalFileSystem`
//!
//! The store already speaks `object_store` for S3, and its `LocalFileSystem`
//! also stages a file and renames it (staged names `<name>#<n>`, created
//! with `O_EXCL`, so it is safe between replicas). But it would not save
//! code here: it sits behind the crate's `fs` feature (Cargo.toml has only
//! `aws`, and `fs` adds `walkdir` and `nix`); it fsyncs the file and the
//! directory only when built `with_fsync(true)` (off by default); it never
//! removes staged files left by a dead writer (they stay forever and are
//! skipped by its listing by their `#<digits>` suffix); it wants absolute,
//! percent-encoded paths; and it would not serve the PEFT adapter
//! directories (read with `std::fs`) nor the task writer and the trainer,
//! which write plain files outside any store. So this module gives the
//! same guarantees (plus durability by default and the cleanup) in one
//! place, for all three users.

use std::fs::{File, Metadata, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Suffix of every temp file; with the leading `.` it keeps temp files out
/// of store listings.
pub const TEMP_SUFFIX: &str = ".tmp";

/// Process-wide count of temp names handed out.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// How many times a write starts again under a new name (a name taken, or
/// the temp file removed by a cleaner before the writer locked it).
const ATTEMPTS: usize = 8;

/// A fresh temp file name for a target called `name`:
/// `.<name>.<pid>-<16 hex digits, random>-<counter>.tmp`.
fn temp_name(name: &str) -> String {
    format!(
        ".{name}.{}-{:016x}-{}{TEMP_SUFFIX}",
        std::process::id(),
        rand::random::<u64>(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether `file_name` is a temp file name of [`temp_name`]'s format.
fn is_temp_name(file_name: &str) -> bool {
    let Some(inner) = file_name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(TEMP_SUFFIX))
    else {
        return false;
    };
    let Some((target, tag)) = inner.rsplit_once('.') else {
        return false;
    };
    let mut parts = tag.split('-');
    let (Some(pid), Some(random), Some(n), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    !target.is_empty()
        && digits(pid)
        && random.len() == 16
        && random.bytes().all(|b| b.is_ascii_hexdigit())
        && digits(n)
}

/// The directory a target lives in (`.` for a bare file name).
fn parent_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether `path` still names the file open as `file`.
#[cfg(unix)]
fn still_named(file: &File, path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let open = file.metadata()?;
    match std::fs::symlink_metadata(path) {
        Ok(named) => Ok(named.dev() == open.dev() && named.ino() == open.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(not(unix))]
fn still_named(_file: &File, path: &Path) -> io::Result<bool> {
    Ok(path.exists())
}

/// Creates and locks a fresh temp file beside the target; returns it open
/// for writing, with its path.
fn create_locked_temp(dir: &Path, name: &str) -> io::Result<(File, PathBuf)> {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let tmp = dir.join(temp_name(name));
        let file = match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        // A file system without locks: write anyway; the cleaner cannot
        // lock such a file either, so it keeps it.
        let locked = file.lock().is_ok();
        if locked && !still_named(&file, &tmp)? {
            // A cleaner took it for a dead writer's between create and lock.
            last = Some(io::Error::other("temp file removed before it was locked"));
            continue;
        }
        return Ok((file, tmp));
    }
    Err(last.unwrap_or_else(|| io::Error::other("no temp file name left")))
}

/// Replaces `target` with `bytes` atomically and durably: see the module
/// documentation. Readers see the old file or the new one, never a part;
/// concurrent writers (threads, processes, replicas on a shared directory)
/// each succeed, and the target ends up as one of them wrote it.
pub fn write_atomic(target: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_meta(target, bytes).map(drop)
}

/// [`write_atomic`], returning the metadata of the file this call wrote
/// (inode, length, modification time: a rename keeps them). A concurrent
/// writer may replace the target right after the rename, so a `stat` of
/// the target afterwards could describe someone else's file; this cannot.
pub fn write_atomic_meta(target: &Path, bytes: &[u8]) -> io::Result<Metadata> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a file path", target.display()),
            )
        })?;
    let dir = parent_dir(target);
    let (mut file, tmp) = create_locked_temp(&dir, &name)?;
    // The lock is held (the file stays open) until after the rename.
    let result = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| file.metadata())
        .and_then(|meta| std::fs::rename(&tmp, target).map(|()| meta));
    drop(file);
    match result {
        Ok(meta) => {
            sync_dir(&dir)?;
            Ok(meta)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// `fsync` of a directory, so that renames and removals in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

/// Removes the temp files in `dir` (not recursively) whose writers are
/// gone, and returns how many it removed. A temp file is a dead writer's
/// when nobody holds its lock: see the module documentation. Files of
/// live writers, files that cannot be locked and every other name are
/// kept. Per-file failures are logged and skipped.
pub fn clean_stale_temps(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !is_temp_name(&name) || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = entry.path();
        let file = match File::open(&path) {
            Ok(f) => f,
            // Renamed or removed by its writer meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open a temp file to check it");
                continue;
            }
        };
        match file.try_lock() {
            Ok(()) => {}
            // A live writer holds it.
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(e)) => {
                tracing::debug!(path = %path.display(), error = %e, "cannot lock a temp file; kept");
                continue;
            }
        }
        // Locked by us: its writer is dead, or has not locked it yet (it
        // then sees its file gone and starts again under a new name).
        match std::fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale temp file")
            }
        }
        drop(file);
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    fn temps_in(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(TEMP_SUFFIX))
            .collect()
    }

    #[test]
    fn temp_names_are_recognised_and_nothing_else() {
        let name = temp_name("x.safetensors");
        assert!(
            name.starts_with(".x.safetensors.") && name.ends_with(".tmp"),
            "{name}"
        );
        assert!(is_temp_name(&name), "{name}");
        assert_ne!(temp_name("x"), temp_name("x"));
        for other in [
            "x.safetensors",
            ".x.safetensors.123.tmp",
            ".x.safetensors.123.4.tmp",
            ".hidden",
            "x.1-0123456789abcdef-2.tmp",
            "..1-0123456789abcdef-2.tmp",
            ".x.1-0123456789abcdeg-2.tmp",
            ".x.1-0123456789abcdef-2-3.tmp",
            ".x.1-0123456789abcdef-.tmp",
        ] {
            assert!(!is_temp_name(other), "{other}");
        }
    }

    /// Many threads of one process (one pid) replace one target at once:
    /// every write succeeds, the target is exactly one of the contents,
    /// and no temp file is left. With a pid-only temp name the threads
    /// share one temp file, and writes fail or are lost.
    #[test]
    fn concurrent_writers_of_one_process_all_succeed_and_one_wins_whole() {
        const THREADS: usize = 16;
        const ROUNDS: usize = 20;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t.safetensors");
        let content = |t: usize, r: usize| -> Vec<u8> {
            // Different lengths and bytes per write, large enough that the
            // writes overlap.
            let len = 64 * 1024 + t * 1031 + r * 7;
            (0..len)
                .map(|i| (i as u8) ^ (t as u8) ^ ((r as u8) << 4))
                .collect()
        };
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (target, barrier) = (target.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut errors = Vec::new();
                    for r in 0..ROUNDS {
                        barrier.wait();
                        if let Err(e) = write_atomic(&target, &content(t, r)) {
                            errors.push(format!("thread {t} round {r}: {e}"));
                        }
                    }
                    errors
                })
            })
            .collect();
        let errors: Vec<String> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert!(
            errors.is_empty(),
            "{} failed writes: {errors:?}",
            errors.len()
        );
        let got = std::fs::read(&target).unwrap();
        let last = ROUNDS - 1;
        assert!(
            (0..THREADS).any(|t| got == content(t, last)),
            "the target is none of the last round's contents ({} bytes)",
            got.len()
        );
        assert!(
            temps_in(dir.path()).is_empty(),
            "{:?}",
            temps_in(dir.path())
        );
    }

    #[test]
    fn stale_temps_are_removed_live_ones_and_other_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        // A dead writer's temp file: nobody holds its lock.
        let dead = temp_name("a.safetensors");
        std::fs::write(p(&dead), b"half a task").unwrap();
        // A live writer's: locked (by another open of it, as another
        // process would).
        let live = temp_name("b.safetensors");
        let holder = File::create(p(&live)).unwrap();
        holder.lock().unwrap();
        // Everything else stays.
        let others = [
            "a.safetensors",
            ".hidden",
            ".a.safetensors.1.tmp",
            "notes.tmp",
        ];
        for o in others {
            std::fs::write(p(o), b"keep").unwrap();
        }
        std::fs::create_dir(p("adapter")).unwrap();

        assert_eq!(clean_stale_temps(dir.path()).unwrap(), 1);
        assert!(!p(&dead).exists(), "the dead writer's temp file is removed");
        assert!(p(&live).exists(), "the live writer's temp file is kept");
        for o in others {
            assert!(p(o).exists(), "{o} kept");
        }
        assert!(p("adapter").is_dir());

        // Once its writer is gone, the next clean removes it too.
        drop(holder);
        assert_eq!(clean_stale_temps(dir.path()).unwrap(), 1);
        assert!(!p(&live).exists());
        assert_eq!(clean_stale_temps(dir.path()).unwrap(), 0);
    }

    /// A cleaner running while writers write (another replica starting):
    /// it may hit a temp file between its creation and its lock, and the
    /// writer then starts again; no write answers Ok without its bytes in
    /// place, and none fails.
    #[test]
    fn writes_racing_a_cleaner_all_land_whole() {
        const THREADS: usize = 4;
        const WRITES: usize = 100;
        let dir = tempfile::tempdir().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cleaner = {
            let (dir, stop) = (dir.path().to_path_buf(), stop.clone());
            std::thread::spawn(move || {
                let mut removed = 0;
                while !stop.load(Ordering::Relaxed) {
                    removed += clean_stale_temps(&dir).unwrap();
                }
                removed
            })
        };
        let writers: Vec<_> = (0..THREADS)
            .map(|t| {
                let target = dir.path().join(format!("t{t}"));
                std::thread::spawn(move || {
                    for w in 0..WRITES {
                        let bytes = format!("thread {t} write {w}").repeat(100 + w);
                        write_atomic(&target, bytes.as_bytes()).unwrap();
                        assert_eq!(std::fs::read(&target).unwrap(), bytes.as_bytes());
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        cleaner.join().unwrap();
        assert!(
            temps_in(dir.path()).is_empty(),
            "{:?}",
            temps_in(dir.path())
        );
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a directory fails after the temp file exists.
        let target = dir.path().join("d");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("inside"), b"x").unwrap();
        assert!(write_atomic(&target, b"bytes").is_err());
        assert!(
            temps_in(dir.path()).is_empty(),
            "{:?}",
            temps_in(dir.path())
        );
        assert!(write_atomic(Path::new("/"), b"x").is_err());
    }
}
