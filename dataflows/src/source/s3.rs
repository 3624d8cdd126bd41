//! An archive under an S3 prefix. Label folders are the common prefixes of a delimited
//! listing; each folder is listed (all pages) by the worker that owns it. The version of
//! an object is its size and ETag, so a rewritten object is ingested again.
//!
//! Object stores have no folder change stamp, and relisting an archive of a million
//! objects every poll is a thousand LIST requests a poll. So a tailing round lists the
//! label folders (one request per thousand folders), lists new folders at once, and
//! relists each known folder once per `[source] full_listing_every` rounds, spread over
//! the cycle: LIST requests per poll are about `folders / 1000 + objects / (1000 *
//! full_listing_every)`, plus a full relist at the start of each cycle. A new fruit
//! folder is found at the next poll; an image added to, rewritten in or deleted from a
//! known folder within one cycle.

use super::{FolderStamps, ListedObject, ListingRound, Source};
use crate::io::s3::{S3Config, S3Prefix};
use crate::record::ImageKey;
use anyhow::Result;
use futures::stream::{self, StreamExt};

/// Concurrent GETs: one-at-a-time fetches cost ~30 ms each on the servers measured.
const FETCH_CONCURRENCY: usize = 16;

/// An S3 archive rooted at `s3://bucket/prefix`.
pub struct S3Dir {
    prefix: S3Prefix,
}

impl S3Dir {
    /// Connects to the archive (no request is made yet).
    pub fn open(url: &str, config: &S3Config) -> Result<Self> {
        Ok(S3Dir {
            prefix: S3Prefix::open(url, config)?,
        })
    }

    /// The full key prefix of the archive, with its trailing slash (empty at the bucket root).
    fn root(&self) -> String {
        self.prefix.location().key("")
    }

    /// Objects under the full key prefix `prefix`, as archive objects, plus common prefixes.
    fn list_objects(
        &self,
        prefix: &str,
        delimiter: bool,
    ) -> Result<(Vec<ListedObject>, Vec<String>)> {
        let root = self.root();
        let (objects, prefixes) = self.prefix.block_on(self.prefix.list(prefix, delimiter))?;
        let listed = objects
            .iter()
            .filter_map(|o| {
                let key = o.key()?;
                let name = key.rsplit('/').next().unwrap_or(key);
                // Hidden objects are droppings (.DS_Store) or in-flight uploads; folder
                // markers are not images.
                if name.starts_with('.') || key.ends_with('/') {
                    return None;
                }
                let version = format!(
                    "{}-{}",
                    o.size().unwrap_or(0),
                    o.e_tag().unwrap_or("").trim_matches('"')
                );
                Some(ListedObject {
                    key: ImageKey(key.strip_prefix(root.as_str())?.to_string()),
                    version,
                })
            })
            .collect();
        Ok((listed, prefixes))
    }
}

impl Source for S3Dir {
    fn location(&self) -> String {
        self.prefix.location().url()
    }

    fn list_top(&self) -> Result<(Vec<String>, Vec<ListedObject>)> {
        let root = self.root();
        let (files, prefixes) = self.list_objects(&root, true)?;
        let folders = prefixes
            .iter()
            .filter_map(|p| {
                p.strip_prefix(root.as_str())?
                    .strip_suffix('/')
                    .map(String::from)
            })
            .filter(|f| !f.is_empty() && !f.starts_with('.'))
            .collect();
        Ok((folders, files))
    }

    fn list_share_changed(
        &self,
        index: usize,
        peers: usize,
        seen: &mut FolderStamps,
        round: ListingRound,
    ) -> Result<(Vec<ListedObject>, Vec<String>)> {
        let (folders, files) = self.list_top()?;
        let mut out = if index == 0 { files } else { Vec::new() };
        let mine: std::collections::HashSet<String> = folders
            .into_iter()
            .filter(|f| super::folder_owner(f, peers) == index)
            .collect();
        seen.retain(|f, _| mine.contains(f));
        let mut skipped = Vec::new();
        for folder in mine {
            if !round.full() && seen.contains_key(&folder) && !round.turn_of(&folder) {
                skipped.push(folder);
                continue;
            }
            out.extend(self.list_folder(&folder)?);
            seen.insert(folder, 0);
        }
        out.sort();
        skipped.sort();
        Ok((out, skipped))
    }

    fn list_folder(&self, folder: &str) -> Result<Vec<ListedObject>> {
        Ok(self
            .list_objects(&format!("{}{folder}/", self.root()), false)?
            .0)
    }

    fn check(&self) -> Result<()> {
        Ok(self.prefix.block_on(self.prefix.probe())?)
    }

    fn read(&self, key: &ImageKey) -> Result<Vec<u8>> {
        Ok(self.prefix.block_on(self.prefix.get(&key.0))?)
    }

    fn read_many(&self, keys: &[ImageKey]) -> Vec<Result<Vec<u8>>> {
        self.prefix.block_on(
            stream::iter(keys)
                .map(|key| async move { Ok(self.prefix.get(&key.0).await?) })
                .buffered(FETCH_CONCURRENCY)
                .collect(),
        )
    }

    fn path_of(&self, key: &ImageKey) -> String {
        format!("{}/{}", self.location(), key.0)
    }
}
