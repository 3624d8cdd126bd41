//! A local directory in the Fruits-360 layout. The version of a file is its size and
//! modification time, so a rewritten file is ingested again.

use super::{ListedObject, Source};
use crate::record::ImageKey;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// How long a folder's mtime must be in the past before it is trusted as a stamp.
const SETTLED: std::time::Duration = std::time::Duration::from_secs(2);

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

    /// A label folder's entries change its directory's mtime (a file added, removed or
    /// renamed over), so a folder whose mtime is what it was at its last full listing is
    /// skipped. Not seen that way: a file rewritten in place (same name, no rename) and
    /// changes in nested folders; `full` rounds (every `[source] full_listing_every`)
    /// catch the first, and folders with subfolders are always listed. A stamp is kept
    /// only once the folder has been still for [`SETTLED`] (file times are coarse: a file
    /// added in the same tick as the listing would not move the mtime).
    fn list_share_changed(
        &self,
        index: usize,
        peers: usize,
        seen: &mut super::FolderStamps,
        round: super::ListingRound,
    ) -> Result<(Vec<ListedObject>, Vec<String>)> {
        let full = round.full();
        let (folders, files) = self.list_top()?;
        let mut out = if index == 0 { files } else { Vec::new() };
        let mut skipped = Vec::new();
        let mine: Vec<&String> = folders
            .iter()
            .filter(|f| super::folder_owner(f, peers) == index)
            .collect();
        seen.retain(|f, _| mine.iter().any(|m| *m == f));
        let now = std::time::SystemTime::now();
        for folder in mine {
            let modified = std::fs::metadata(self.root.join(folder)).and_then(|m| m.modified());
            let stamp = modified
                .ok()
                .and_then(|t| Some((t, t.duration_since(UNIX_EPOCH).ok()?.as_nanos())));
            if let (false, Some((_, ns))) = (full, stamp) {
                if seen.get(folder) == Some(&ns) {
                    skipped.push(folder.clone());
                    continue;
                }
            }
            let listed = self.list_folder(folder)?;
            let flat = listed.iter().all(|o| o.key.0.matches('/').count() == 1);
            let settled =
                stamp.filter(|(t, _)| now.duration_since(*t).is_ok_and(|age| age >= SETTLED));
            match settled {
                Some((_, ns)) if flat => seen.insert(folder.clone(), ns),
                _ => seen.remove(folder),
            };
            out.extend(listed);
        }
        out.sort();
        Ok((out, skipped))
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

    /// A settled folder whose mtime has not moved is skipped (its keys stand, so the
    /// ledger diff deletes nothing); adding a file moves the mtime and it is listed again;
    /// a full round lists everything.
    #[test]
    fn unchanged_folders_are_skipped_until_they_change_or_a_full_round() {
        use crate::source::ledger::tests::Harness;
        use crate::source::FolderStamps;
        let dir = tempfile::tempdir().unwrap();
        for label in ["A", "B"] {
            std::fs::create_dir_all(dir.path().join(label)).unwrap();
            std::fs::write(dir.path().join(label).join("1.jpg"), b"x").unwrap();
        }
        let src = LocalDir::open(dir.path()).unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        let settle = |label: &str| {
            let f = std::fs::File::open(dir.path().join(label)).unwrap();
            f.set_modified(old).unwrap();
        };
        settle("A");
        settle("B");
        let root = dir.path().to_path_buf();
        timely::execute_directly(move |worker| {
            let mut ledger = Harness::new(worker);
            let mut seen = FolderStamps::new();
            let partial = crate::source::ListingRound {
                number: 1,
                every: 30,
            };
            let full = crate::source::ListingRound {
                number: 30,
                every: 30,
            };
            let (all, skipped) = src.list_share_changed(0, 1, &mut seen, partial).unwrap();
            assert_eq!((all.len(), skipped.len()), (2, 0));
            assert_eq!(ledger.diff(&all).len(), 2);
            // Nothing moved: both skipped, nothing deleted.
            let (none, skipped) = src.list_share_changed(0, 1, &mut seen, partial).unwrap();
            assert!(none.is_empty());
            assert_eq!(skipped, ["A", "B"]);
            let unchanged = skipped.into_iter().collect();
            assert!(ledger.diff_except(&none, &unchanged).is_empty());
            // A file lands in B: B is listed again (its mtime moved), A still skipped.
            std::fs::write(root.join("B").join("2.jpg"), b"y").unwrap();
            let (listed, skipped) = src.list_share_changed(0, 1, &mut seen, partial).unwrap();
            assert_eq!(skipped, ["A"]);
            let keys: Vec<_> = listed.iter().map(|o| o.key.0.as_str()).collect();
            assert_eq!(keys, ["B/1.jpg", "B/2.jpg"]);
            let changes = ledger.diff_except(&listed, &skipped.into_iter().collect());
            assert_eq!(changes.len(), 1, "{changes:?}");
            // B is not settled yet (just modified): listed every round until it is.
            let (listed, _) = src.list_share_changed(0, 1, &mut seen, partial).unwrap();
            assert_eq!(listed.len(), 2);
            // A full round lists A too.
            let (listed, skipped) = src.list_share_changed(0, 1, &mut seen, full).unwrap();
            assert_eq!((listed.len(), skipped.len()), (3, 0));
            assert!(ledger.diff(&listed).is_empty());
        });
    }
}
