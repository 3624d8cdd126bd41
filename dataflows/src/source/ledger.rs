//! The ingestion ledger: which object versions the dataflow has been handed. Diffing a
//! fresh listing against it yields exactly the new, rewritten and deleted objects, so an
//! object is ingested once per version, also across restarts (the ledger is part of
//! every checkpoint).

use super::ListedObject;
use crate::record::{Change, ChangeKind, ImageKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Object versions handed to the dataflow, by key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    versions: BTreeMap<ImageKey, String>,
}

impl Ledger {
    /// Changes that bring the ledger to `listing`, in key order, and records them.
    pub fn diff(&mut self, listing: &[ListedObject]) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut listed = std::collections::BTreeSet::new();
        for obj in listing {
            listed.insert(&obj.key);
            if self.versions.get(&obj.key) != Some(&obj.version) {
                changes.push(Change {
                    key: obj.key.clone(),
                    kind: ChangeKind::Upsert {
                        version: obj.version.clone(),
                    },
                });
            }
        }
        for key in self.versions.keys() {
            if !listed.contains(key) {
                changes.push(Change {
                    key: key.clone(),
                    kind: ChangeKind::Delete,
                });
            }
        }
        changes.sort();
        for change in &changes {
            self.apply(change);
        }
        changes
    }

    /// Records one change.
    pub fn apply(&mut self, change: &Change) {
        match &change.kind {
            ChangeKind::Upsert { version } => {
                self.versions.insert(change.key.clone(), version.clone());
            }
            ChangeKind::Delete => {
                self.versions.remove(&change.key);
            }
        }
    }

    /// Number of objects recorded.
    pub fn len(&self) -> usize {
        self.versions.len()
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.versions.is_empty()
    }
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
        let mut ledger = Ledger::default();
        let first = ledger.diff(&[obj("A/1", "v1"), obj("A/2", "v1")]);
        assert_eq!(first.len(), 2);
        assert!(ledger
            .diff(&[obj("A/1", "v1"), obj("A/2", "v1")])
            .is_empty());
        let next = ledger.diff(&[obj("A/1", "v2"), obj("B/3", "v1")]);
        let kinds: Vec<_> = next
            .iter()
            .map(|c| (c.key.0.as_str(), matches!(c.kind, ChangeKind::Delete)))
            .collect();
        assert_eq!(kinds, vec![("A/1", false), ("A/2", true), ("B/3", false)]);
        assert_eq!(ledger.len(), 2);
    }
}

impl Ledger {
    /// A ledger holding the given versions.
    pub fn from_versions(versions: impl IntoIterator<Item = (ImageKey, String)>) -> Self {
        Ledger {
            versions: versions.into_iter().collect(),
        }
    }
}
