//! The ingestion ledger, a differential arrangement sharded by key owner: each worker
//! arranges `(key, version hash)` for the keys it owns (`key.owner(peers)`), so the
//! listing diff runs at the owners and the ledger spreads over the cluster as processes
//! are added. A round's diff is a merge of the owner's sorted listing against a cursor
//! over the arranged trace: it yields exactly the new, rewritten and deleted objects, and
//! feeds them back into the arrangement as updates (`-1` for the old version, `+1` for
//! the new one) at the round's time, so an object is ingested once per version, also
//! across restarts (the arrangement is rebuilt from the committed base + delta log).
//! The trace's logical compaction follows the rounds, so it holds one entry per live key,
//! not the history of listings.
//!
//! Where each key's row is stored is not in this arrangement: it is written by the embed
//! stage, in the ingest dataflow, at epoch times that the listing rounds do not share;
//! the embed stage keeps it ([`crate::embed::operator`]), so retracting a row needs no
//! embedding in memory.

use super::{KeyRange, ListedObject};
use crate::record::{Change, ChangeKind, ImageKey};
use differential_dataflow::operators::arrange::{arrangement::arrange_core, TraceAgent};
use differential_dataflow::trace::cursor::{cursor_list, CursorList};
use differential_dataflow::trace::implementations::{ValBatcher, ValSpine};
use differential_dataflow::trace::{BatchCursor, Cursor, TraceReader};
use std::collections::HashSet;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::vec::Input;
use timely::dataflow::operators::Probe;
use timely::dataflow::{InputHandleVec, ProbeHandle, Scope};
use timely::progress::Antichain;

/// A round of listing (the time of the ledger's updates).
pub type Round = u64;
/// An update of the arranged ledger: `((key, version hash), round, diff)`.
type Update = ((ImageKey, u64), Round, isize);
/// The arranged ledger's batches.
type Spine = ValSpine<ImageKey, u64, Round, isize>;
/// The arranged ledger of one worker.
type Trace = TraceAgent<Spine>;

/// One worker's part of the ledger: its input and its arrangement.
pub struct Ledger {
    input: InputHandleVec<Round, Update>,
    trace: Trace,
}

impl Ledger {
    /// Arranges this worker's ledger in `scope` (the listing rounds' dataflow); `probe`
    /// sees a round once its updates are in the trace. The updates stay on this worker
    /// (they are made by the key's owner), so the arrangement is local.
    pub fn new(scope: Scope<'_, Round>, probe: &ProbeHandle<Round>) -> Self {
        let mut input = InputHandleVec::new();
        let updates = scope.input_from(&mut input);
        let arranged = arrange_core::<
            _,
            _,
            ValBatcher<ImageKey, u64, Round, isize>,
            ValSpine<_, _, _, _>,
        >(updates, Pipeline, "Ledger", ValBatcher::new);
        arranged.stream.probe_with(probe);
        Ledger {
            input,
            trace: arranged.trace,
        }
    }

    /// Enters the committed ledger's keys (already filtered to this owner) with their
    /// versions, at the current round.
    pub fn restore<'a>(&mut self, ledger: impl IntoIterator<Item = (&'a ImageKey, &'a str)>) {
        for (key, version) in ledger {
            self.input
                .send(((key.clone(), version_hash(version)), 0, 1));
        }
    }

    /// Moves to `round`: later updates are at it, and the trace may forget the
    /// distinctions between earlier rounds (it is only read as of the latest).
    pub fn advance_to(&mut self, round: Round) {
        self.input.advance_to(round);
        let frontier = Antichain::from_elem(round.saturating_sub(1));
        self.trace.set_logical_compaction(frontier.borrow());
        self.trace.set_physical_compaction(frontier.borrow());
    }

    /// A cursor over everything the trace holds, with the batches it reads.
    fn cursor(
        &mut self,
    ) -> (
        CursorList<BatchCursor<Spine>>,
        Vec<<Spine as TraceReader>::Batch>,
    ) {
        let mut upper = Antichain::new();
        self.trace.read_upper(&mut upper);
        let batches = self
            .trace
            .batches_through(upper.borrow())
            .expect("the ledger trace is readable through its upper");
        cursor_list(batches)
    }

    /// Changes that bring the arranged keys in `range` to `listing` (this owner's objects
    /// of that slice of key space in one complete round, sorted by key), in key order,
    /// except in the folders in `unchanged` (skipped this round: their keys stay as last
    /// listed, and the cursor jumps over them); records them as this round's updates.
    /// Keys outside `range` stand as last listed. The trace must hold every earlier round
    /// (the caller waits on the probe).
    pub fn diff_except(
        &mut self,
        listing: &[ListedObject],
        unchanged: &HashSet<String>,
        range: KeyRange,
    ) -> Vec<Change> {
        debug_assert!(listing.windows(2).all(|w| w[0].key < w[1].key));
        debug_assert!(listing.iter().all(|o| range.contains(&o.key)));
        let everything = range == KeyRange::ALL;
        let round = *self.input.time();
        let (mut cursor, storage) = self.cursor();
        let mut changes = Vec::new();
        let mut updates: Vec<Update> = Vec::new();
        let mut listed = listing.iter().peekable();
        loop {
            let arranged = cursor.get_key(&storage);
            let next = listed.peek();
            let order = match (arranged, next) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(key), Some(obj)) => key.cmp(&obj.key),
            };
            match order {
                // Arranged but not listed: deleted, unless its folder was skipped.
                std::cmp::Ordering::Less => {
                    let key = arranged.expect("a key").clone();
                    if let Some(folder) = skipped_folder(&key, unchanged) {
                        // Past every key of the folder: '0' is the byte after '/'.
                        cursor.seek_key(&storage, &ImageKey(format!("{folder}0")));
                        continue;
                    }
                    if !everything && !range.contains(&key) {
                        cursor.step_key(&storage);
                        continue;
                    }
                    if let Some(old) = current(&mut cursor, &storage) {
                        updates.push(((key.clone(), old), round, -1));
                        changes.push(Change {
                            key,
                            kind: ChangeKind::Delete,
                        });
                    }
                    cursor.step_key(&storage);
                }
                // Listed and arranged: a change if its version moved.
                std::cmp::Ordering::Equal => {
                    let obj = listed.next().expect("an object");
                    let version = version_hash(&obj.version);
                    let old = current(&mut cursor, &storage);
                    if old != Some(version) {
                        if let Some(old) = old {
                            updates.push(((obj.key.clone(), old), round, -1));
                        }
                        updates.push(((obj.key.clone(), version), round, 1));
                        changes.push(upsert(obj));
                    }
                    cursor.step_key(&storage);
                }
                // Listed, not arranged: new.
                std::cmp::Ordering::Greater => {
                    let obj = listed.next().expect("an object");
                    updates.push(((obj.key.clone(), version_hash(&obj.version)), round, 1));
                    changes.push(upsert(obj));
                }
            }
        }
        drop((cursor, storage));
        self.input.send_batch(&mut updates);
        changes
    }
}

/// The version a key's updates add up to (at most one value has a positive count).
fn current<C>(cursor: &mut C, storage: &C::Storage) -> Option<u64>
where
    C: for<'a> Cursor<Key<'a> = &'a ImageKey, Val<'a> = &'a u64, DiffGat<'a> = &'a isize>,
{
    let mut found = None;
    while let Some(val) = cursor.get_val(storage) {
        let mut count = 0isize;
        cursor.map_times(storage, |_, diff| count += *diff);
        if count > 0 {
            found = Some(*val);
        }
        cursor.step_val(storage);
    }
    cursor.rewind_vals(storage);
    found
}

/// The folder of `key` when the round skipped it.
fn skipped_folder<'k>(key: &'k ImageKey, unchanged: &HashSet<String>) -> Option<&'k str> {
    let (folder, _) = key.0.split_once('/')?;
    unchanged.contains(folder).then_some(folder)
}

fn upsert(obj: &ListedObject) -> Change {
    Change {
        key: obj.key.clone(),
        kind: ChangeKind::Upsert {
            version: obj.version.clone(),
        },
    }
}

/// A version's stable hash (xxh3): a rewrite goes unnoticed only if its hash equals the
/// old one's, a 2^-64 chance per rewrite.
fn version_hash(version: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(version.as_bytes())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn obj(key: &str, version: &str) -> ListedObject {
        ListedObject {
            key: ImageKey(key.into()),
            version: version.into(),
        }
    }

    /// A ledger in its own single-worker dataflow, one round per diff.
    pub(crate) struct Harness<'w> {
        worker: &'w mut timely::worker::Worker,
        ledger: Ledger,
        probe: ProbeHandle<Round>,
        round: Round,
    }

    impl<'w> Harness<'w> {
        pub(crate) fn new(worker: &'w mut timely::worker::Worker) -> Self {
            let probe = ProbeHandle::new();
            let ledger = worker.dataflow::<Round, _, _>(|scope| Ledger::new(scope, &probe));
            Harness {
                worker,
                ledger,
                probe,
                round: 0,
            }
        }

        pub(crate) fn restore(&mut self, entries: &[(&str, &str)]) {
            let keys: Vec<(ImageKey, &str)> = entries
                .iter()
                .map(|(k, v)| (ImageKey(k.to_string()), *v))
                .collect();
            self.ledger.restore(keys.iter().map(|(k, v)| (k, *v)));
            self.next_round();
        }

        fn next_round(&mut self) {
            self.round += 1;
            self.ledger.advance_to(self.round);
            while self.probe.less_than(&self.round) {
                self.worker.step();
            }
        }

        /// One round: the diff, then the round completes (its updates are arranged).
        pub(crate) fn diff_except(
            &mut self,
            listing: &[ListedObject],
            unchanged: &HashSet<String>,
        ) -> Vec<Change> {
            self.diff_range(listing, unchanged, KeyRange::ALL)
        }

        pub(crate) fn diff_range(
            &mut self,
            listing: &[ListedObject],
            unchanged: &HashSet<String>,
            range: KeyRange,
        ) -> Vec<Change> {
            let changes = self.ledger.diff_except(listing, unchanged, range);
            self.next_round();
            changes
        }

        pub(crate) fn diff(&mut self, listing: &[ListedObject]) -> Vec<Change> {
            self.diff_except(listing, &HashSet::new())
        }

        /// Live keys in the trace (walks all of it).
        pub(crate) fn len(&mut self) -> usize {
            let (mut cursor, storage) = self.ledger.cursor();
            let mut n = 0;
            while cursor.key_valid(&storage) {
                n += usize::from(current(&mut cursor, &storage).is_some());
                cursor.step_key(&storage);
            }
            n
        }
    }

    #[test]
    fn diff_reports_new_changed_and_deleted_once() {
        timely::execute_directly(|worker| {
            let mut ledger = Harness::new(worker);
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
            // The deleted key comes back as new; a rewrite back to v1 is a change.
            let again = ledger.diff(&[obj("A/1", "v1"), obj("A/2", "v1"), obj("B/3", "v1")]);
            let keys: Vec<_> = again.iter().map(|c| c.key.0.as_str()).collect();
            assert_eq!(keys, ["A/1", "A/2"]);
            assert!(ledger.diff(&[]).len() == 3 && ledger.len() == 0);
        });
    }

    #[test]
    fn a_restored_ledger_diffs_like_the_one_it_was_saved_from() {
        timely::execute_directly(|worker| {
            let mut ledger = Harness::new(worker);
            ledger.restore(&[("A/1", "v1"), ("B/2", "v1")]);
            assert_eq!(ledger.len(), 2);
            assert!(ledger
                .diff(&[obj("A/1", "v1"), obj("B/2", "v1")])
                .is_empty());
            let changes = ledger.diff(&[obj("B/2", "v2")]);
            let kinds: Vec<_> = changes
                .iter()
                .map(|c| (c.key.0.as_str(), matches!(c.kind, ChangeKind::Delete)))
                .collect();
            assert_eq!(kinds, vec![("A/1", true), ("B/2", false)]);
        });
    }

    /// Skipped folders keep their keys; the others are diffed; many rounds leave the
    /// compacted trace with one entry per live key.
    #[test]
    fn skipped_folders_keep_their_keys_over_many_rounds() {
        timely::execute_directly(|worker| {
            let mut ledger = Harness::new(worker);
            let all: Vec<_> = ["A/1", "A/2", "A0/1", "B/1", "C/1"]
                .iter()
                .map(|k| obj(k, "v1"))
                .collect();
            assert_eq!(ledger.diff(&all).len(), 5);
            let skip: HashSet<String> = ["A".to_string(), "C".to_string()].into();
            // Only B and A0 listed: A's and C's keys stand, A0's and B's are diffed.
            assert!(ledger.diff_except(&all[2..4], &skip).is_empty());
            let gone = ledger.diff_except(&all[3..4], &skip);
            assert_eq!(gone.len(), 1);
            assert_eq!(gone[0].key.0, "A0/1");
            for round in 0..50 {
                let version = format!("v{}", round % 2);
                let changes = ledger.diff_except(&[obj("B/1", &version)], &skip);
                assert_eq!(changes.len(), 1);
            }
            assert_eq!(ledger.len(), 4);
            assert_eq!(ledger.diff(&[]).len(), 4, "a full round deletes them");
        });
    }

    /// Diffing an archive one slice of key space at a time gives the changes of one
    /// whole diff, and keys outside a slice stand (also where the slice is empty).
    #[test]
    fn slices_of_key_space_diff_like_one_whole_round() {
        timely::execute_directly(|worker| {
            let before: Vec<_> = (0..200)
                .map(|i| obj(&format!("L{}/{i}", i % 7), "v1"))
                .collect();
            // After: every third rewritten, every fifth deleted, 50 new.
            let after: Vec<_> = (0..250)
                .filter(|i| i % 5 != 0 || *i >= 200)
                .map(|i| {
                    obj(
                        &format!("L{}/{i}", i % 7),
                        if i % 3 == 0 { "v2" } else { "v1" },
                    )
                })
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let sorted = |v: &[ListedObject]| -> Vec<ListedObject> {
                let mut v = v.to_vec();
                v.sort();
                v
            };
            let (before, after) = (sorted(&before), sorted(&after));
            let mut whole = Harness::new(worker);
            whole.diff(&before);
            let expected = whole.diff(&after);
            let mut sliced = Harness::new(worker);
            sliced.diff(&before);
            let cuts = [0u64, 1 << 60, 1 << 62, 1 << 62, u64::MAX / 3 * 2];
            let mut got = Vec::new();
            for (i, &start) in cuts.iter().enumerate() {
                let range = KeyRange {
                    start,
                    end: cuts.get(i + 1).copied(),
                };
                let part: Vec<_> = after
                    .iter()
                    .filter(|o| range.contains(&o.key))
                    .cloned()
                    .collect();
                got.extend(sliced.diff_range(&part, &HashSet::new(), range));
                assert_eq!(sliced.len(), {
                    // Keys below the slice's end are as after, the rest as before.
                    let pending =
                        |o: &&ListedObject| range.end.is_some_and(|e| o.key.bucket_hash() >= e);
                    after.iter().filter(|o| !pending(o)).count()
                        + before.iter().filter(pending).count()
                });
            }
            got.sort();
            let mut expected = expected;
            expected.sort();
            assert_eq!(got, expected);
            assert!(sliced.diff(&after).is_empty());
        });
    }
}
