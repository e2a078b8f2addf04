//! File plumbing below the domain modules: replacing a file all at once (a temporary file with a
//! name unique to the process and the call, fsync, rename, fsync of the directory), so that a
//! kill, a full disk or a second writer never leaves half a file under the real name; and the
//! lock that keeps one training run per checkpoint directory.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};

/// The lock file inside a checkpoint directory; it holds the pid of the run that has it.
pub const LOCK_FILE: &str = ".lock";

/// Marks the temporary files of `write_atomic_with`: `.NAME.PID-N.tmp[.EXT]`.
const TMP_MARK: &str = ".tmp";

/// Replaces `path` with `bytes` all at once.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))
    })
}

/// Replaces `path` with the file `write` creates at the temporary path it is given, which keeps
/// `path`'s extension (tch picks the weights format by it). The file is synced before the
/// rename and the directory after it, so a crash leaves the old file or the new one, never a
/// torn one; on any error the temporary file is removed and `path` is untouched.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = tmp_path(path);
    let result = write(&tmp).and_then(|()| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        sync_parent(path)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("saving {}", path.display()))
}

/// `d/model.safetensors` -> `d/.model.<pid>-<n>.tmp.safetensors`: hidden, unique to this process
/// and call (so two writers never share a temporary file), with the extension kept.
fn tmp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("file");
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map_or_else(String::new, |e| format!(".{e}"));
    path.with_file_name(format!(".{stem}.{}-{n}{TMP_MARK}{ext}", std::process::id()))
}

/// Whether `name` is one of `tmp_path`'s names.
fn is_tmp_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    let Some((before, _)) = rest.rsplit_once(TMP_MARK) else {
        return false;
    };
    let Some((_, id)) = before.rsplit_once('.') else {
        return false;
    };
    id.split_once('-').is_some_and(|(pid, n)| {
        !pid.is_empty()
            && !n.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && n.bytes().all(|b| b.is_ascii_digit())
    })
}

/// Removes the temporary files a killed writer left in `dir`; call it only while holding the
/// directory's lock, when no other writer can be using one. Returns how many were removed.
pub fn remove_stale_temps(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        if entry.file_name().to_str().is_some_and(is_tmp_name) {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Makes a rename in `path`'s directory durable.
fn sync_parent(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing directory {}", parent.display()))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// A fingerprint of a file's contents — its length and CRC-32 — enough to tell whether a corpus
/// changed between a run and its resumption.
pub fn digest(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok(format!("{len} bytes, crc32 {:08x}", hasher.finalize()))
}

/// An exclusive lock on a checkpoint directory, held until it is dropped. It is an OS file lock,
/// so it goes with the process: a crashed or killed run never leaves it stuck.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock of `dir` (which must exist), or fails naming the run that holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let by = if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (process {holder})")
                };
                bail!(
                    "{} is in use by another training run{by}: wait for it to finish, or train into another --out",
                    dir.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| write!(file, "{}", std::process::id()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_keep_the_extension_and_are_unique() {
        let a = tmp_path(Path::new("d/model.safetensors"));
        let b = tmp_path(Path::new("d/model.safetensors"));
        assert_ne!(a, b);
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with(".model.") && name.ends_with(".tmp.safetensors"),
            "{name}"
        );
        assert!(is_tmp_name(name));
        let latest = tmp_path(Path::new("LATEST"));
        assert!(is_tmp_name(latest.to_str().unwrap()), "{latest:?}");
        for other in [
            "model.safetensors",
            ".lock",
            ".model.tmp.safetensors",
            ".model.12-x.tmp",
            "notes.1-2.tmp",
        ] {
            assert!(!is_tmp_name(other), "{other}");
        }
    }

    #[test]
    fn write_atomic_replaces_whole_files_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A writer that fails leaves the old file and no temporary behind.
        let err = write_atomic_with(&p, |tmp| {
            std::fs::write(tmp, b"half")?;
            bail!("disk full")
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_temporaries_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for name in [".model.77-3.tmp.safetensors", "model.safetensors", ".lock"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(remove_stale_temps(dir.path()).unwrap(), 1);
        assert!(dir.path().join("model.safetensors").exists());
        assert!(dir.path().join(".lock").exists());
    }

    #[test]
    fn digest_tells_contents_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"the cat sat\n").unwrap();
        std::fs::write(&b, b"the cat sat\n").unwrap();
        assert_eq!(digest(&a).unwrap(), digest(&b).unwrap());
        std::fs::write(&b, b"the cat sa.\n").unwrap();
        assert_ne!(digest(&a).unwrap(), digest(&b).unwrap());
        assert!(digest(&dir.path().join("none")).is_err());
    }

    #[test]
    fn a_second_lock_on_a_directory_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        let err = DirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains("in use by another training run"), "{err}");
        assert!(err.contains(&std::process::id().to_string()), "{err}");
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }
}
