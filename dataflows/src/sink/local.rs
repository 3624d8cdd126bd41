//! Output objects as files under a local directory; atomic by write-then-rename.

use super::OutputStore;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;

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

impl OutputStore for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.root.join(name);
        let dir = path.parent().expect("object path has a parent");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)
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
}
