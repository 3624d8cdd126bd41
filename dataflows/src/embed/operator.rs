//! The embed stage as a timely operator. Each worker owns the keys that hash to it and
//! keeps the rows it produced, so a deletion or rewrite retracts exactly the row that was
//! added (the CNN never re-runs on a vanished object).

use super::Embedder;
use crate::metrics::{metrics, timed};
use crate::record::{Change, ChangeKind, Epoch, ErrorKind, ErrorRecord, ImageKey, ImageRow};
use crate::source::Source;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

/// A differential update of the live-image collection: (row, time, diff).
pub type RowUpdate = (ImageRow, Epoch, i64);

/// What the embed stage produces for one change.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    /// A row entering (+1) or leaving (-1) the live collection.
    Row(RowUpdate),
    /// An object that could not be embedded.
    Error(ErrorRecord),
}

/// Routes each change to its owner, embeds additions and retracts what deletions remove.
/// `owned` holds rows restored from a checkpoint for the keys this worker owns.
///
/// Received changes queue up, and each activation embeds one fetch chunk and reschedules
/// itself: an epoch is seconds of CNN work, and holding the worker for all of it would
/// keep the worker's other operators (the commit, the models hand-off) and its driver
/// loop (which feeds the next epoch) waiting until it ends.
pub fn embed<'s>(
    changes: StreamVec<'s, Epoch, Change>,
    source: Arc<dyn Source>,
    mut embedder: Embedder,
    mut owned: HashMap<ImageKey, ImageRow>,
) -> StreamVec<'s, Epoch, Outcome> {
    let peers = changes.scope().peers() as u64;
    let scope = changes.scope();
    changes.unary(
        Exchange::new(move |c: &Change| c.key.bucket() % peers),
        "embed",
        move |_, info| {
            let activator = scope.activator_for(info.address.clone());
            let mut queue: VecDeque<(Capability<Epoch>, VecDeque<Change>)> = VecDeque::new();
            move |input, output| {
                input.for_each(|cap, data| {
                    let cap = cap.retain_least(0).expect("stamped");
                    queue.push_back((cap, std::mem::take(data).into_iter().collect()));
                });
                let Some((cap, pending)) = queue.front_mut() else {
                    return;
                };
                let epoch = *cap.time();
                let chunk: Vec<Change> = pending
                    .drain(..FETCH_CHUNK.min(pending.len()))
                    .collect();
                let mut session = output.session(cap);
                embed_chunk(
                    &chunk,
                    epoch,
                    source.as_ref(),
                    &mut embedder,
                    &mut owned,
                    |o| session.give(o),
                );
                drop(session);
                if pending.is_empty() {
                    queue.pop_front();
                }
                if !queue.is_empty() {
                    activator.activate();
                }
            }
        },
    )
}

/// Fetches a chunk of objects at once (concurrently on object stores), then embeds them
/// in order, emitting each change's outcomes.
fn embed_chunk(
    chunk: &[Change],
    epoch: Epoch,
    source: &dyn Source,
    embedder: &mut Embedder,
    owned: &mut HashMap<ImageKey, ImageRow>,
    mut give: impl FnMut(Outcome),
) {
    let wanted: Vec<ImageKey> = chunk
        .iter()
        .filter(|c| matches!(c.kind, ChangeKind::Upsert { .. }) && c.key.label().is_ok())
        .map(|c| c.key.clone())
        .collect();
    let mut fetched: HashMap<ImageKey, anyhow::Result<Vec<u8>>> = timed("fetch", || {
        wanted.iter().cloned().zip(source.read_many(&wanted)).collect()
    });
    for change in chunk {
        // Whatever the change, the previous version (if any) leaves.
        if let Some(old) = owned.remove(&change.key) {
            metrics().images_retracted.inc();
            give(Outcome::Row((old, epoch, -1)));
        }
        if let ChangeKind::Upsert { .. } = change.kind {
            match embed_one(&change.key, fetched.remove(&change.key), embedder) {
                Ok(row) => {
                    metrics().images_ingested.inc();
                    owned.insert(row.key.clone(), row.clone());
                    give(Outcome::Row((row, epoch, 1)));
                }
                Err((kind, reason)) => {
                    metrics().error(kind.as_str());
                    tracing::warn!(stage = "embed", key = %change.key, kind = kind.as_str(), %reason, "Image rejected.");
                    let key = change.key.clone();
                    give(Outcome::Error(ErrorRecord { key, kind, reason, epoch }));
                }
            }
        }
    }
}

/// Objects fetched together before embedding: enough to hide S3 latency, few enough to
/// keep memory flat whatever the epoch size.
const FETCH_CHUNK: usize = 64;

fn embed_one(
    key: &ImageKey,
    bytes: Option<anyhow::Result<Vec<u8>>>,
    embedder: &mut Embedder,
) -> Result<ImageRow, (ErrorKind, String)> {
    let label = key.label().map_err(|reason| (ErrorKind::Layout, reason))?;
    let bytes = bytes
        .unwrap_or_else(|| Err(anyhow::anyhow!("not fetched")))
        .map_err(|e| (ErrorKind::Read, format!("{e:#}")))?;
    let embedding = embedder
        .embed_bytes(&bytes)
        .map_err(|e| (e.kind, e.reason))?;
    Ok(ImageRow {
        key: key.clone(),
        label,
        embedding,
    })
}
