//! Output objects as files under a local directory; atomic by write-then-rename.
//!
//! Each write goes through a temp file next to its object (named [`TEMP_PREFIX`] plus
//! random characters), renamed over the object once synced. A process killed mid-write
//! leaves its temp file behind; [`LocalStore::remove_stale_temp_files`] removes those
//! when a run resumes, before anything writes again.

use super::OutputStore;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// How the names of this store's temp files start. [`list`](OutputStore::list) hides
/// every name starting with `.tmp`, which covers these and the legacy ones.
pub const TEMP_PREFIX: &str = ".tmp-fruits-flow-";

/// A local output directory.
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Opens (creating) the directory `root`.
    pub fn open(root: &str) -> Result<Self> {
        let root = PathBuf::from(root);
        std::fs::create_dir_all(&root)
            .with_context(|| format!("creating output directory {}", root.display()))?;
        Ok(LocalStore { root })
    }
}

/// Whether `name` is one of this store's temp files: [`TEMP_PREFIX`] names, and the
/// `.tmp` + 6 letters or digits of tempfile's default that earlier versions used (and
/// left behind in existing outputs).
fn is_temp_file(name: &str) -> bool {
    if name.starts_with(TEMP_PREFIX) {
        return true;
    }
    name.strip_prefix(".tmp")
        .is_some_and(|rest| rest.len() == 6 && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Removes this store's temp files under `dir` and its subdirectories (not following
/// links); returns how many.
fn remove_temp_files_under(dir: &Path) -> Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .with_context(|| format!("reading the type of {}", path.display()))?;
        if kind.is_dir() {
            removed += remove_temp_files_under(&path)?;
        } else if kind.is_file() && is_temp_file(&entry.file_name().to_string_lossy()) {
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        }
    }
    Ok(removed)
}

impl OutputStore for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.root.join(name);
        let dir = path.parent().expect("object path has a parent");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)
            .with_context(|| format!("temp file in {}", dir.display()))?;
        tmp.write_all(bytes)
            .with_context(|| format!("writing {}", path.display()))?;
        tmp.as_file()
            .sync_all()
            .with_context(|| format!("syncing {}", path.display()))?;
        tmp.persist(&path)
            .with_context(|| format!("publishing {}", path.display()))?;
        Ok(())
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.root.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let dir = self.root.join(prefix);
        let mut names = Vec::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let name = entry?.file_name().to_string_lossy().into_owned();
                    // Temp files of in-flight writes are not objects yet.
                    if !name.starts_with(".tmp") {
                        names.push(format!("{prefix}{name}"));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        }
        names.sort();
        Ok(names)
    }

    /// Only safe while nothing writes to the store: a run calls it when it resumes, before
    /// its first epoch (a reader opening the store must not, a live run's writes would
    /// lose their temp files).
    fn remove_stale_temp_files(&self) -> Result<usize> {
        remove_temp_files_under(&self.root)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let path = self.root.join(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().to_str().unwrap()).unwrap();
        store.put("a/x.bin", b"1").unwrap();
        store.put("a/x.bin", b"22").unwrap();
        store.put("a/y.bin", b"3").unwrap();
        assert_eq!(store.get("a/x.bin").unwrap().unwrap(), b"22");
        assert_eq!(store.list("a/").unwrap(), vec!["a/x.bin", "a/y.bin"]);
        store.delete("a/x.bin").unwrap();
        assert!(store.get("a/x.bin").unwrap().is_none());
        assert!(store.list("missing/").unwrap().is_empty());
    }

    /// A killed write's temp files (this version's and the legacy tempfile names) go at
    /// resume, in any folder; objects and user files that merely look similar stay.
    #[test]
    fn stale_temp_files_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().to_str().unwrap()).unwrap();
        store.put("embeddings/part-1.parquet", b"1").unwrap();
        store.put("status.json", b"{}").unwrap();
        let stale = [
            "embeddings/.tmp-fruits-flow-Ab12Cd",
            "state/.tmpX9aZ0q",
            ".tmp-fruits-flow-zzzzzz",
        ];
        let kept = [
            "notes/.tmp",
            "notes/.tmpfile.txt",
            "notes/.tmp-12345",
            "notes/tmpAbCdEf",
            "notes/.tmpAbCdEfG",
        ];
        for name in stale.iter().chain(&kept) {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"half").unwrap();
        }
        assert_eq!(store.remove_stale_temp_files().unwrap(), stale.len());
        for name in stale {
            assert!(!dir.path().join(name).exists(), "{name} is still there");
        }
        for name in kept {
            assert!(dir.path().join(name).exists(), "{name} was removed");
        }
        assert_eq!(
            store.get("embeddings/part-1.parquet").unwrap().unwrap(),
            b"1"
        );
        assert_eq!(store.get("status.json").unwrap().unwrap(), b"{}");
        // The store's own writes leave no temp file behind.
        assert_eq!(store.remove_stale_temp_files().unwrap(), 0);
    }
}
