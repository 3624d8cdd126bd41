//! The commit operator (worker 0): once every stage has finished an epoch, fold the
//! epoch's changes, errors and label counts into the checkpoint, publish the models and
//! commit. Its output is the committed epoch; a probe on it is the commit point.

use super::{Checkpoint, EpochSummary, LedgerEntry};
use crate::metrics::timed;
use crate::record::{Change, ChangeKind, Epoch, ErrorRecord};
use crate::sink::{models::publish, OutputStore};
use crate::stats::Models;
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
    /// A live-count change of a label.
    Label(String, i64),
    /// The models after the epoch.
    Models(Box<Models>),
    /// Rows written by a parquet sink.
    Written(usize),
}

/// Commits each complete epoch on worker 0; emits the committed epoch number.
pub fn commit<'s>(
    items: StreamVec<'s, Epoch, CommitItem>,
    store: Arc<dyn OutputStore>,
    mut checkpoint: Checkpoint,
) -> StreamVec<'s, Epoch, Epoch> {
    items.unary_frontier(Exchange::new(|_: &CommitItem| 0), "commit", move |_, _| {
        let mut open: BTreeMap<Epoch, (Capability<Epoch>, Vec<CommitItem>)> = BTreeMap::new();
        let started = Instant::now();
        let start_images = checkpoint.images();
        move |(input, frontier), output| {
            input.for_each(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let entry = open
                    .entry(t)
                    .or_insert_with(|| (cap.retain_least(0).expect("stamped"), Vec::new()));
                entry.1.append(data);
            });
            while let Some(entry) = open.first_entry() {
                let t = *entry.key();
                if frontier.less_equal(&t) {
                    break;
                }
                let (cap, items) = entry.remove();
                timed("commit", || {
                    apply(&mut checkpoint, t, items);
                    publish(store.as_ref(), &checkpoint)
                        .unwrap_or_else(|e| panic!("publishing models: {e:#}"));
                    checkpoint
                        .commit(store.as_ref())
                        .unwrap_or_else(|e| panic!("committing epoch {t}: {e:#}"));
                });
                crate::metrics::metrics().epoch.set(t as i64);
                let rate = (checkpoint.images() - start_images) as f64
                    / started.elapsed().as_secs_f64().max(1e-9);
                tracing::info!(
                    stage = "commit",
                    epoch = t,
                    images = checkpoint.images(),
                    errors = checkpoint.errors.len(),
                    k = checkpoint.models.pca.as_ref().map_or(0, |p| p.k),
                    images_per_s = format!("{rate:.1}"),
                    "Epoch committed."
                );
                output.session(&cap).give(t);
            }
        }
    })
}

/// Folds one epoch's items into the checkpoint (sequential, deterministic).
pub fn apply(checkpoint: &mut Checkpoint, epoch: Epoch, mut items: Vec<CommitItem>) {
    // Changes before errors: an error marks the ledger entry its change created.
    items.sort_by_key(|i| match i {
        CommitItem::Change(_) => 0,
        _ => 1,
    });
    for item in items {
        match item {
            CommitItem::Change(change) => {
                checkpoint.errors.remove(&change.key);
                match change.kind {
                    ChangeKind::Upsert { version } => {
                        checkpoint.ledger.insert(
                            change.key,
                            LedgerEntry {
                                version,
                                epoch,
                                embedded: true,
                            },
                        );
                    }
                    ChangeKind::Delete => {
                        checkpoint.ledger.remove(&change.key);
                    }
                }
            }
            CommitItem::Error(record) => {
                if let Some(entry) = checkpoint.ledger.get_mut(&record.key) {
                    entry.embedded = false;
                }
                checkpoint.errors.insert(record.key.clone(), record);
            }
            CommitItem::Label(label, diff) => {
                let count = checkpoint.labels.entry(label.clone()).or_default();
                *count += diff;
                if *count == 0 {
                    checkpoint.labels.remove(&label);
                }
            }
            CommitItem::Models(models) => checkpoint.models = *models,
            CommitItem::Written(_) => {}
        }
    }
    checkpoint.epoch = epoch;
    checkpoint.history.push(EpochSummary {
        epoch,
        labels: checkpoint.labels.clone(),
        errors: checkpoint.errors.len(),
    });
}
