//! The commit operator (worker 0): once every stage has finished an epoch, fold the
//! epoch's changes, errors and per-label statistics into a delta and the fixed-size
//! checkpoint, publish the models and commit. Its output is the committed epoch; a probe on it is the commit point.

use super::{Checkpoint, Delta, EpochSummary, LedgerEntry, Location};
use crate::metrics::timed;
use crate::record::{Change, ChangeKind, Epoch, ErrorRecord, ImageKey};
use crate::sink::{models::publish, OutputStore};
use crate::stats::operator::Fitted;
use crate::stats::{LabelDiff, LabelStats};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

/// Everything an epoch's commit needs, gathered from the stages.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum CommitItem {
    /// A source change (ledger).
    Change(Change),
    /// A quarantined object.
    Error(ErrorRecord),
    /// A label's new statistics entering the per-label collection, or `None`: its old
    /// ones leaving (the +1 and −1 of differential's `count_total`).
    Label(String, Option<LabelDiff>),
    /// The models after the epoch (and its moment rows, when few).
    Models(Box<Fitted>),
    /// Rows written by a parquet sink.
    Written(usize),
}

/// Commits each complete epoch on worker 0; emits the committed epoch number. Items
/// come with their epoch (differential batches are stamped with their first).
/// `archive` holds the current error records (the ledger lives at the key owners);
/// `peers` is the worker count, whose key owners wrote the epoch's embeddings files.
pub fn commit<'s>(
    items: StreamVec<'s, Epoch, (Epoch, CommitItem)>,
    store: Arc<dyn OutputStore>,
    mut checkpoint: Checkpoint,
    mut errors: BTreeMap<ImageKey, ErrorRecord>,
) -> StreamVec<'s, Epoch, Epoch> {
    let peers = items.scope().peers();
    items.unary_frontier(
        Exchange::new(|_: &(Epoch, CommitItem)| 0),
        "commit",
        move |_, _| {
            let mut open: BTreeMap<Epoch, (Capability<Epoch>, Vec<CommitItem>)> = BTreeMap::new();
            // The last committed checkpoint's files: kept by the next commit, so a crash
            // mid-commit still finds everything the pointer names.
            let mut previous = checkpoint.files();
            let mut first = true;
            // A commit cut short after publishing may have left a PCA in models/ that the
            // committed state does not know: republish it at the first commit.
            if super::interrupted_commit(store.as_ref(), checkpoint.epoch) {
                checkpoint.stats.published_pca = 0;
            }
            let started = Instant::now();
            let start_images = checkpoint.images();
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    let Some(&least) = cap.least() else { return };
                    for (t, item) in data.drain(..) {
                        // A differential batch may span epochs: each item goes to its own.
                        let t = t.max(least);
                        let entry = open
                            .entry(t)
                            .or_insert_with(|| (cap.delayed(&t, 0), Vec::new()));
                        entry.1.push(item);
                    }
                });
                while let Some(entry) = open.first_entry() {
                    let t = *entry.key();
                    if frontier.less_equal(&t) {
                        break;
                    }
                    let (cap, items) = entry.remove();
                    timed("commit", || {
                        let (mut delta, rows) =
                            apply(&mut checkpoint, &mut errors, t, items, peers);
                        checkpoint
                            .write_delta(store.as_ref(), &mut delta, rows)
                            .unwrap_or_else(|e| panic!("writing the state of epoch {t}: {e:#}"));
                        publish(
                            store.as_ref(),
                            &checkpoint,
                            &errors,
                            !delta.errors.is_empty() || first,
                            checkpoint.stats.published_pca != checkpoint.models.pca_epoch,
                        )
                        .unwrap_or_else(|e| panic!("publishing models: {e:#}"));
                        checkpoint.stats.published_pca = checkpoint.models.pca_epoch;
                        checkpoint
                            .commit(store.as_ref(), &previous)
                            .unwrap_or_else(|e| panic!("committing epoch {t}: {e:#}"));
                        previous = checkpoint.files();
                        first = false;
                    });
                    crate::metrics::metrics().epoch.set(t as i64);
                    let rate = (checkpoint.images() - start_images) as f64
                        / started.elapsed().as_secs_f64().max(1e-9);
                    tracing::info!(
                        stage = "commit",
                        epoch = t,
                        images = checkpoint.images(),
                        errors = checkpoint.errors,
                        k = checkpoint.models.pca.as_ref().map_or(0, |p| p.k),
                        images_per_s = format!("{rate:.1}"),
                        "Epoch committed."
                    );
                    output.session(&cap).give(t);
                }
            }
        },
    )
}

/// Folds one epoch's items into the checkpoint and the error records (sequential,
/// deterministic) and returns the epoch's delta and its moment rows (when few).
pub fn apply(
    checkpoint: &mut Checkpoint,
    errors: &mut BTreeMap<ImageKey, ErrorRecord>,
    epoch: Epoch,
    mut items: Vec<CommitItem>,
    peers: usize,
) -> (Delta, Option<Vec<super::StatRow>>) {
    // Changes before errors: an error marks the ledger entry its change created. Label
    // retractions before additions: a changed label leaves with its old statistics and
    // enters with its new ones in the same epoch.
    items.sort_by_key(|i| match i {
        CommitItem::Change(_) => 0,
        CommitItem::Label(_, None) => 1,
        _ => 2,
    });
    let mut delta = Delta::default();
    // An epoch without models (nothing embedded, only errors) left the moments as they were.
    let mut rows = Some(Vec::new());
    for item in items {
        match item {
            CommitItem::Change(change) => {
                if errors.remove(&change.key).is_some() {
                    delta.errors.insert(change.key.clone(), None);
                }
                let entry = match change.kind {
                    ChangeKind::Upsert { version } => Some(LedgerEntry {
                        version,
                        location: Location {
                            epoch,
                            part: change.key.owner(peers) as u32,
                        },
                        embedded: true,
                    }),
                    ChangeKind::Delete => None,
                };
                delta.ledger.insert(change.key, entry);
            }
            CommitItem::Error(record) => {
                if let Some(Some(entry)) = delta.ledger.get_mut(&record.key) {
                    entry.embedded = false;
                }
                delta
                    .errors
                    .insert(record.key.clone(), Some(record.clone()));
                errors.insert(record.key.clone(), record);
            }
            CommitItem::Label(label, None) => {
                checkpoint.labels.remove(&label);
            }
            CommitItem::Label(label, Some(stats)) => {
                checkpoint
                    .labels
                    .insert(label, LabelStats::from_diff(stats));
            }
            CommitItem::Models(fitted) => {
                checkpoint.models = fitted.models;
                rows = fitted.rows;
            }
            CommitItem::Written(_) => {}
        }
    }
    checkpoint.epoch = epoch;
    checkpoint.errors = errors.len();
    checkpoint.errors_by_kind = BTreeMap::new();
    for e in errors.values() {
        *checkpoint
            .errors_by_kind
            .entry(e.kind.as_str().to_string())
            .or_default() += 1;
    }
    delta.summary = Some(EpochSummary {
        epoch,
        labels: checkpoint.label_counts(),
        errors: errors.len(),
    });
    (delta, rows)
}
