//! A local directory in the Fruits-360 layout. The version of a file is its size and
//! modification time, so a rewritten file is ingested again.

use super::{ListedObject, Source};
use crate::record::ImageKey;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// A local archive rooted at a directory.
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    /// Opens `root`, which must be an existing directory.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let meta = std::fs::metadata(root)
            .with_context(|| format!("source directory {} is not readable", root.display()))?;
        anyhow::ensure!(
            meta.is_dir(),
            "source {} is not a directory",
            root.display()
        );
        let root = root
            .canonicalize()
            .with_context(|| format!("resolving {}", root.display()))?;
        Ok(LocalDir { root })
    }

    fn walk(&self, dir: &Path, prefix: &str, out: &mut Vec<ListedObject>) -> Result<()> {
        let mut level = Vec::new();
        self.walk_level(dir, prefix, &mut level)?;
        for (entry, is_dir) in level {
            if is_dir {
                self.walk(&self.root.join(&entry.key.0), &entry.key.0, out)?;
            } else {
                out.push(entry);
            }
        }
        Ok(())
    }

    /// The entries of one directory, each flagged as folder or file.
    fn walk_level(
        &self,
        dir: &Path,
        prefix: &str,
        out: &mut Vec<(ListedObject, bool)>,
    ) -> Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            // A folder deleted while we list it is simply gone.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Hidden files are editor/OS droppings (.DS_Store) and in-flight temp files.
            if name.starts_with('.') {
                continue;
            }
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                // Deleted between the directory read and the stat: simply gone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                // Anything else fails the listing: a skipped entry would look like a
                // deletion of everything under it.
                Err(e) => {
                    return Err(e).with_context(|| format!("reading {}", entry.path().display()))
                }
            };
            let key = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            if meta.is_dir() {
                out.push((
                    ListedObject {
                        key: ImageKey(key),
                        version: String::new(),
                    },
                    true,
                ));
            } else if meta.is_file() {
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                let version = format!("{}-{}", meta.len(), mtime);
                out.push((
                    ListedObject {
                        key: ImageKey(key),
                        version,
                    },
                    false,
                ));
            }
        }
        Ok(())
    }
}

impl Source for LocalDir {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn list_top(&self) -> Result<(Vec<String>, Vec<ListedObject>)> {
        let mut all = Vec::new();
        self.walk_level(&self.root, "", &mut all)?;
        let (mut folders, mut files) = (Vec::new(), Vec::new());
        for (entry, is_dir) in all {
            if is_dir {
                folders.push(entry.key.0);
            } else {
                files.push(entry);
            }
        }
        folders.sort();
        files.sort();
        Ok((folders, files))
    }

    fn list_folder(&self, folder: &str) -> Result<Vec<ListedObject>> {
        let mut out = Vec::new();
        self.walk(&self.root.join(folder), folder, &mut out)?;
        out.sort();
        Ok(out)
    }

    fn read(&self, key: &ImageKey) -> Result<Vec<u8>> {
        let path = self.root.join(&key.0);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }

    fn path_of(&self, key: &ImageKey) -> String {
        self.root.join(&key.0).display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_nested_keys_with_spaces_and_skips_hidden() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("Apple Golden 1")).unwrap();
        std::fs::write(dir.path().join("Apple Golden 1/a b.jpg"), b"x").unwrap();
        std::fs::write(dir.path().join("Apple Golden 1/.DS_Store"), b"x").unwrap();
        std::fs::write(dir.path().join("loose.jpg"), b"xy").unwrap();
        let src = LocalDir::open(dir.path()).unwrap();
        let keys: Vec<_> = src.list().unwrap().into_iter().map(|o| o.key.0).collect();
        assert_eq!(keys, vec!["Apple Golden 1/a b.jpg", "loose.jpg"]);
        assert_eq!(src.read(&ImageKey("loose.jpg".into())).unwrap(), b"xy");
    }

    #[test]
    fn listing_shares_partition_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        for label in ["A 1", "B 2", "C 3", "D 4", "E 5"] {
            std::fs::create_dir_all(dir.path().join(label)).unwrap();
            std::fs::write(dir.path().join(label).join("x.jpg"), b"x").unwrap();
        }
        std::fs::write(dir.path().join("loose.jpg"), b"x").unwrap();
        let src = LocalDir::open(dir.path()).unwrap();
        let full = src.list().unwrap();
        assert_eq!(full.len(), 6);
        for peers in [2, 3] {
            let mut union: Vec<_> = (0..peers)
                .flat_map(|i| src.list_share(i, peers).unwrap())
                .collect();
            union.sort();
            assert_eq!(union, full, "shares of {peers} workers are not a partition");
        }
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let err = LocalDir::open("/definitely/not/here").err().unwrap();
        assert!(format!("{err:#}").contains("/definitely/not/here"));
    }
}
