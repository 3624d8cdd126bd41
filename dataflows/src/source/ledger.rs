//! The ingestion ledger, sharded by key owner: each worker holds the entries of the keys
//! it owns (`key.owner(peers)`), so the listing diff runs at the owners and the ledger
//! spreads over the cluster as processes are added. Diffing a round's listing against a
//! shard yields exactly the new, rewritten and deleted objects, so an object is ingested
//! once per version, also across restarts (the shard is rebuilt from the committed
//! base + delta log). The shard also holds where each committed row is stored, which is
//! all the embed stage needs to retract it: no embedding is held in memory.

use super::ListedObject;
use crate::record::{Change, ChangeKind, ImageKey};
use crate::state::{LedgerEntry, Location};
use std::collections::{HashMap, HashSet};

/// What a shard knows of one owned key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Entry {
    /// The version the last accepted listing showed, as its 64-bit hash (None:
    /// deleted): the shard is the per-image state a worker holds, and the version
    /// strings (size and mtime, or an ETag) were a third of it.
    listed: Option<u64>,
    /// Where its current row is stored (None: no row, or quarantined).
    stored: Option<Location>,
}

/// One worker's part of the ledger.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shard {
    entries: HashMap<ImageKey, Entry>,
}

impl Shard {
    /// The shard of a committed ledger (entries already filtered to this owner).
    pub fn restore<'a>(ledger: impl IntoIterator<Item = (&'a ImageKey, &'a LedgerEntry)>) -> Self {
        let entries = ledger
            .into_iter()
            .map(|(key, e)| {
                let entry = Entry {
                    listed: Some(version_hash(&e.version)),
                    stored: e.embedded.then_some(e.location),
                };
                (key.clone(), entry)
            })
            .collect();
        Shard { entries }
    }

    /// Changes that bring the shard to `listing` (this owner's objects of one complete
    /// listing round), in key order, and records them as listed.
    pub fn diff(&mut self, listing: &[ListedObject]) -> Vec<Change> {
        self.diff_except(listing, &HashSet::new())
    }

    /// [`Self::diff`] for a round that skipped the folders in `unchanged`: their keys stay
    /// as last listed.
    pub fn diff_except(
        &mut self,
        listing: &[ListedObject],
        unchanged: &HashSet<String>,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut listed = HashSet::with_capacity(listing.len());
        for obj in listing {
            listed.insert(&obj.key);
            let entry = self.entries.entry(obj.key.clone()).or_default();
            let version = version_hash(&obj.version);
            if entry.listed != Some(version) {
                entry.listed = Some(version);
                changes.push(Change {
                    key: obj.key.clone(),
                    kind: ChangeKind::Upsert {
                        version: obj.version.clone(),
                    },
                });
            }
        }
        for (key, entry) in self.entries.iter_mut() {
            let skipped = || {
                key.0
                    .split_once('/')
                    .is_some_and(|(folder, _)| unchanged.contains(folder))
            };
            if entry.listed.is_some() && !listed.contains(key) && !skipped() {
                entry.listed = None;
                changes.push(Change {
                    key: key.clone(),
                    kind: ChangeKind::Delete,
                });
            }
        }
        self.entries
            .retain(|_, e| e.listed.is_some() || e.stored.is_some());
        changes.sort();
        changes
    }

    /// Takes where `key`'s current row is stored: the row is about to be retracted.
    pub fn take_stored(&mut self, key: &ImageKey) -> Option<Location> {
        let entry = self.entries.get_mut(key)?;
        let stored = entry.stored.take();
        if entry.listed.is_none() {
            self.entries.remove(key);
        }
        stored
    }

    /// Records where `key`'s new row is stored.
    pub fn set_stored(&mut self, key: &ImageKey, location: Location) {
        self.entries.entry(key.clone()).or_default().stored = Some(location);
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A version's stable hash (xxh3): a rewrite goes unnoticed only if its hash equals the
/// old one's, a 2^-64 chance per rewrite.
fn version_hash(version: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(version.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str, version: &str) -> ListedObject {
        ListedObject {
            key: ImageKey(key.into()),
            version: version.into(),
        }
    }

    #[test]
    fn diff_reports_new_changed_and_deleted_once() {
        let mut shard = Shard::default();
        let first = shard.diff(&[obj("A/1", "v1"), obj("A/2", "v1")]);
        assert_eq!(first.len(), 2);
        assert!(shard.diff(&[obj("A/1", "v1"), obj("A/2", "v1")]).is_empty());
        let next = shard.diff(&[obj("A/1", "v2"), obj("B/3", "v1")]);
        let kinds: Vec<_> = next
            .iter()
            .map(|c| (c.key.0.as_str(), matches!(c.kind, ChangeKind::Delete)))
            .collect();
        assert_eq!(kinds, vec![("A/1", false), ("A/2", true), ("B/3", false)]);
        assert_eq!(shard.len(), 2);
    }

    #[test]
    fn a_deleted_key_keeps_its_location_until_retracted() {
        let key = ImageKey("A/1".into());
        let at = Location { epoch: 3, part: 1 };
        let entry = LedgerEntry {
            version: "v1".into(),
            location: at,
            embedded: true,
        };
        let mut shard = Shard::restore([(&key, &entry)]);
        assert!(shard.diff(&[obj("A/1", "v1")]).is_empty());
        assert_eq!(shard.diff(&[]).len(), 1);
        assert_eq!(shard.len(), 1, "the row is not retracted yet");
        assert_eq!(shard.take_stored(&key), Some(at));
        assert!(shard.is_empty());
        assert_eq!(shard.take_stored(&key), None);
    }
}
