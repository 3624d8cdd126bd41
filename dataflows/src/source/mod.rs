//! The source stage: where images come from. A [`Source`] lists the archive and reads
//! objects; the [`ledger::Ledger`] (a differential arrangement at each key's owner) turns
//! successive listings into [`Change`]s, so the dataflow sees each object once per
//! content version, and deletions as retractions.

pub mod ledger;
pub mod local;
pub mod s3;

use crate::record::ImageKey;
use anyhow::Result;

pub use ledger::Ledger;
pub use local::LocalDir;

/// Per label folder, the change stamp it had when a worker last listed it in full (see
/// [`Source::list_share_changed`]).
pub type FolderStamps = std::collections::HashMap<String, u128>;

/// Where a listing round stands in the cycle of `[source] full_listing_every` rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListingRound {
    /// Rounds listed before this one (every worker counts the same rounds).
    pub number: u64,
    /// Rounds per cycle: the first of each cycle lists every folder.
    pub every: u64,
}

impl ListingRound {
    /// True when this round lists every folder.
    pub fn full(&self) -> bool {
        self.number % self.every == 0
    }

    /// True when this round is `folder`'s turn in the rotation: each folder's turn comes
    /// once per cycle, and a cycle's turns are spread over its rounds (by folder hash).
    pub fn turn_of(&self, folder: &str) -> bool {
        xxhash_rust::xxh3::xxh3_64(folder.as_bytes()) % self.every == self.number % self.every
    }
}

/// A slice of key space: the keys whose [`ImageKey::bucket_hash`] lies in
/// `start..end` (`end` None: through `u64::MAX`). A start-up listing goes through the
/// archive one such slice at a time (see [`crate::ingest`]), so a first listing of
/// millions of objects never sits in memory whole; slices are hash ranges, not folders,
/// so each holds every label, and since epochs are cut in hash order, ascending slices
/// give the same epochs as one whole listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyRange {
    /// First hash in the slice.
    pub start: u64,
    /// First hash past it; None: the slice runs to the end of key space.
    pub end: Option<u64>,
}

impl KeyRange {
    /// All of key space.
    pub const ALL: KeyRange = KeyRange {
        start: 0,
        end: None,
    };

    /// True when `key` lies in this slice.
    pub fn contains(&self, key: &ImageKey) -> bool {
        let hash = key.bucket_hash();
        hash >= self.start && self.end.is_none_or(|end| hash < end)
    }
}

/// One object seen by a listing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ListedObject {
    /// Its key relative to the source root.
    pub key: ImageKey,
    /// Identity of its content: changes when the object is rewritten.
    pub version: String,
}

/// An archive of images in the Fruits-360 layout (`<root>/<Label>/<name>`).
///
/// This is the seam for other stores (S3 in a later stage): the dataflow only lists and
/// reads through it.
pub trait Source: Send + Sync {
    /// A human-readable location (`/data/fruits`, `s3://bucket/prefix`), no secrets.
    fn location(&self) -> String;
    /// The label folders under the root (names, no slashes) and the files lying directly
    /// in the root (which are layout errors). Hidden entries are skipped.
    fn list_top(&self) -> Result<(Vec<String>, Vec<ListedObject>)>;
    /// Every object in one label folder (all pages). Hidden files are skipped.
    fn list_folder(&self, folder: &str) -> Result<Vec<ListedObject>>;
    /// Every object under the root, sorted by key.
    fn list(&self) -> Result<Vec<ListedObject>> {
        self.list_share(0, 1)
    }
    /// This worker's share of a listing: the folders it owns (by stable hash of the folder
    /// name), plus the root's loose files on worker 0. Sorted by key.
    fn list_share(&self, index: usize, peers: usize) -> Result<Vec<ListedObject>> {
        self.list_share_range(index, peers, KeyRange::ALL)
    }
    /// [`Self::list_share`], keeping only the keys in `range` (each folder's listing is
    /// filtered as it comes, so at most one folder's objects outside it are held).
    fn list_share_range(
        &self,
        index: usize,
        peers: usize,
        range: KeyRange,
    ) -> Result<Vec<ListedObject>> {
        let (folders, mut out) = self.list_top()?;
        if index != 0 {
            out.clear();
        }
        out.retain(|o| range.contains(&o.key));
        for folder in folders.iter().filter(|f| folder_owner(f, peers) == index) {
            let mut listed = self.list_folder(folder)?;
            listed.retain(|o| range.contains(&o.key));
            out.extend(listed);
        }
        out.sort();
        Ok(out)
    }
    /// [`Self::list_share`], skipping folders that need no listing this round: returns
    /// the listing and the skipped folders, whose objects stand as last listed. A full
    /// round lists everything. The default lists everything every round.
    fn list_share_changed(
        &self,
        index: usize,
        peers: usize,
        _seen: &mut FolderStamps,
        _round: ListingRound,
    ) -> Result<(Vec<ListedObject>, Vec<String>)> {
        Ok((self.list_share(index, peers)?, Vec::new()))
    }
    /// The bytes of one object.
    fn read(&self, key: &ImageKey) -> Result<Vec<u8>>;
    /// The bytes of several objects, in order (object stores fetch them concurrently).
    fn read_many(&self, keys: &[ImageKey]) -> Vec<Result<Vec<u8>>> {
        keys.iter().map(|k| self.read(k)).collect()
    }
    /// Fails fast with a clear message when the archive is unreachable or refuses the
    /// credentials (a listing while running would only log and retry).
    fn check(&self) -> Result<()> {
        Ok(())
    }
    /// The full path or URL of a key, as written in output rows.
    fn path_of(&self, key: &ImageKey) -> String;
    /// The key of a path written by [`Source::path_of`], if it lies under this source.
    fn key_of(&self, path: &str) -> Option<ImageKey> {
        let root = self.location();
        let rest = path.strip_prefix(root.as_str())?.strip_prefix('/')?;
        Some(ImageKey(rest.to_string()))
    }
}

/// The worker that lists a label folder: listing is spread over workers like fetching.
pub fn folder_owner(folder: &str, peers: usize) -> usize {
    (xxhash_rust::xxh3::xxh3_64(folder.as_bytes()) % peers as u64) as usize
}

/// Opens the source named by `location`: `s3://bucket/prefix` or a local directory.
pub fn open(location: &str, s3: &crate::io::S3Config) -> Result<Box<dyn Source>> {
    if location.starts_with("s3://") {
        return Ok(Box::new(s3::S3Dir::open(location, s3)?));
    }
    Ok(Box::new(LocalDir::open(location)?))
}
