//! The embed stage as a timely operator. Each worker owns the keys that hash to it, and
//! knows where each owned key's row is stored ([`Stored`]): a deletion or rewrite
//! retracts exactly the row that was added, read back from that embeddings file (the CNN
//! never re-runs on a vanished object, and no embedding stays in memory beyond the two
//! epochs that may not be written yet).

use super::Embedder;
use crate::background::Background;
use crate::metrics::{metrics, timed};
use crate::record::{
    Change, ChangeKind, Epoch, ErrorKind, ErrorRecord, ImageKey, ImageRow, KeyDigest, Label,
};
use crate::sink::OutputStore;
use crate::source::Source;
use crate::state::Location;

use std::collections::{BTreeMap, HashMap, VecDeque};
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
/// `stored` is where each key this worker owns has its committed row.
///
/// Received changes are cut into chunks. A prefetch thread fetches and decodes the
/// next chunk while this worker runs the CNN on the current one, so object-store latency
/// and JPEG decoding stay off the inference thread. Each activation embeds one chunk and
/// then yields: an epoch is seconds of CNN work, and holding the worker for all of it
/// would keep its other operators (the commit, the models hand-off) and its driver loop
/// (which feeds the next epoch) waiting until it ends.
pub fn embed<'s>(
    changes: StreamVec<'s, Epoch, Change>,
    source: Arc<dyn Source>,
    store: Arc<dyn OutputStore>,
    mut embedder: Embedder,
    stored: Stored,
) -> StreamVec<'s, Epoch, Outcome> {
    let peers = changes.scope().peers() as u64;
    let scope = changes.scope();
    let worker = scope.worker();
    let part = scope.index() as u32;
    let mut rows = Rows {
        stored,
        recent: HashMap::new(),
        store,
        source: source.clone(),
        part,
    };
    changes.unary(
        Exchange::new(move |c: &Change| c.key.bucket() % peers),
        "embed",
        move |_, info| {
            let activator = scope.activator_for(info.address.clone());
            let wake = worker.sync_activator_for(info.address.to_vec());
            let preparer = embedder.preparer();
            // Started on the first chunk: workers that never get one spawn nothing.
            let mut prefetcher: Option<Prefetcher> = None;
            let mut setup = Some((source, preparer, wake));
            // Chunks not yet handed to the prefetcher, then those it holds, in order.
            let mut waiting: VecDeque<(Capability<Epoch>, Vec<Change>)> = VecDeque::new();
            let mut prefetching: VecDeque<Capability<Epoch>> = VecDeque::new();
            move |input, output| {
                input.for_each(|cap, data| {
                    let cap = cap.retain_least(0).expect("stamped");
                    for chunk in std::mem::take(data).chunks(FETCH_CHUNK) {
                        waiting.push_back((cap.clone(), chunk.to_vec()));
                    }
                });
                if waiting.is_empty() && prefetching.is_empty() {
                    return;
                }
                let prefetcher = prefetcher.get_or_insert_with(|| {
                    let (source, preparer, wake) = setup.take().expect("one prefetcher");
                    Background::start("prefetch", wake, move |chunk| {
                        prepare(chunk, source.as_ref(), &preparer)
                    })
                });
                top_up(prefetcher, &mut waiting, &mut prefetching);
                // Not ready yet: the prefetcher activates this operator when it is.
                let Some(prepared) = prefetcher.try_next() else {
                    return;
                };
                let cap = prefetching.pop_front().expect("a capability per chunk");
                let epoch = *cap.time();
                let mut session = output.session(&cap);
                embed_prepared(prepared, epoch, &mut embedder, &mut rows, |o| {
                    session.give(o)
                });
                drop(session);
                top_up(prefetcher, &mut waiting, &mut prefetching);
                if prefetcher.has_next() {
                    activator.activate();
                }
            }
        },
    )
}

/// Objects fetched together before embedding: enough to hide S3 latency, few enough to
/// keep memory flat whatever the epoch size (64 decoded 112x112 images are 2.4 MB).
const FETCH_CHUNK: usize = 64;

/// A chunk of changes with each wanted object fetched and decoded to model-sized pixels
/// (or the reason it could not be).
struct Prepared {
    changes: Vec<Change>,
    pixels: HashMap<ImageKey, Result<Vec<u8>, (ErrorKind, String)>>,
}

/// Hands waiting chunks to the prefetcher until it holds two: the one the CNN takes next
/// and the one after, so fetching and decoding stay a chunk ahead.
fn top_up(
    prefetcher: &Prefetcher,
    waiting: &mut VecDeque<(Capability<Epoch>, Vec<Change>)>,
    prefetching: &mut VecDeque<Capability<Epoch>>,
) {
    while prefetching.len() < 2 {
        let Some((cap, chunk)) = waiting.pop_front() else {
            break;
        };
        prefetcher.submit(chunk);
        prefetching.push_back(cap);
    }
}

/// A worker's fetch-and-decode thread: takes chunks in order and hands them back
/// prepared, in the same order.
type Prefetcher = Background<Vec<Change>, Prepared>;

/// Fetches a chunk's objects at once (concurrently on object stores) and decodes them.
fn prepare(changes: Vec<Change>, source: &dyn Source, preparer: &super::Preparer) -> Prepared {
    let wanted: Vec<ImageKey> = changes
        .iter()
        .filter(|c| matches!(c.kind, ChangeKind::Upsert { .. }) && c.key.label().is_ok())
        .map(|c| c.key.clone())
        .collect();
    let fetched = timed("fetch", || source.read_many(&wanted));
    let pixels = wanted
        .into_iter()
        .zip(fetched)
        .map(|(key, bytes)| {
            let pixels = bytes
                .map_err(|e| (ErrorKind::Read, format!("{e:#}")))
                .and_then(|bytes| preparer.prepare(&bytes).map_err(|e| (e.kind, e.reason)));
            (key, pixels)
        })
        .collect();
    Prepared { changes, pixels }
}

/// Where the rows of the keys a worker owns are stored (the file of the epoch that
/// embedded each one's current version). Keyed state, but not a differential
/// arrangement: it is read and written by this operator alone, in epoch order, while it
/// embeds, and an arrangement would show an epoch's locations only once the epoch is
/// complete, too late for a key rewritten in the next epoch.
///
/// Keyed by the key's 128-bit digest, not its string: 32 bytes per entry instead of
/// ~90 (the string, its heap copy and the location), about 15 MB less per 250k keys.
/// The row read back is still matched by its full path ([`Rows::read_back`]).
pub type Stored = HashMap<KeyDigest, Location>;

/// Where this worker's rows are: [`Stored`] for committed epochs, plus the rows of the
/// two epochs that may not be written yet (the driver keeps at most two in flight), so a
/// key changed twice in quick succession still retracts what was added.
struct Rows {
    stored: Stored,
    recent: HashMap<ImageKey, (Epoch, ImageRow)>,
    store: Arc<dyn OutputStore>,
    source: Arc<dyn Source>,
    part: u32,
}

impl Rows {
    /// The rows the chunk's changes retract (each key's previous version, if any), read
    /// back from their embeddings files, one read per file.
    fn retractions(&mut self, changes: &[Change], epoch: Epoch) -> Vec<ImageRow> {
        // Rows two epochs old are written (their epoch committed before this one began).
        self.recent.retain(|_, (e, _)| *e + 1 >= epoch);
        let mut out = Vec::new();
        let mut by_file: BTreeMap<Location, Vec<ImageKey>> = BTreeMap::new();
        for change in changes {
            let stored = self.stored.remove(&change.key.digest());
            if let Some((_, row)) = self.recent.remove(&change.key) {
                out.push(row);
            } else if let Some(location) = stored {
                by_file
                    .entry(location)
                    .or_default()
                    .push(change.key.clone());
            }
        }
        for (location, keys) in by_file {
            out.extend(timed("retract", || self.read_back(location, &keys)));
        }
        out
    }

    /// The stored rows of `keys` in the file at `location`. A row that cannot be read
    /// would leave the statistics wrong forever, so this is fatal.
    fn read_back(&self, location: Location, keys: &[ImageKey]) -> Vec<ImageRow> {
        let name = location.file();
        let bytes = self
            .store
            .get(&name)
            .and_then(|b| b.ok_or_else(|| anyhow::anyhow!("missing")))
            .unwrap_or_else(|e| panic!("reading {name} to retract {} rows: {e:#}", keys.len()));
        let wanted: HashMap<String, &ImageKey> =
            keys.iter().map(|k| (self.source.path_of(k), k)).collect();
        // Only the wanted rows are quantized; the rest of the file is not copied out.
        let mut rows: Vec<ImageRow> = Vec::with_capacity(keys.len());
        crate::sink::parquet::for_each_row(bytes, |path, label, features| {
            if let Some(&key) = wanted.get(path) {
                rows.push(crate::sink::parquet::image_row(
                    key.clone(),
                    path,
                    label,
                    features,
                )?);
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("decoding {name}: {e:#}"));
        assert_eq!(
            rows.len(),
            keys.len(),
            "{name} lacks rows the ledger places there"
        );
        rows
    }

    /// Records a row added in `epoch`.
    fn added(&mut self, row: &ImageRow, epoch: Epoch) {
        let location = Location {
            epoch,
            part: self.part,
        };
        self.stored.insert(row.key.digest(), location);
        self.recent.insert(row.key.clone(), (epoch, row.clone()));
    }
}

/// Embeds a prepared chunk, emitting each change's outcomes: first the rows its
/// changes retract (whatever the change, the previous version leaves), then the new ones,
/// in change order. The chunk's decoded images go through the model together, in
/// batches ([`Embedder::embed_batch`]).
fn embed_prepared(
    mut prepared: Prepared,
    epoch: Epoch,
    embedder: &mut Embedder,
    rows: &mut Rows,
    mut give: impl FnMut(Outcome),
) {
    for old in rows.retractions(&prepared.changes, epoch) {
        metrics().images_retracted.inc();
        give(Outcome::Row((old, epoch, -1)));
    }
    // Each upsert's label and pixels, or why it has none.
    let inputs: Vec<(&ImageKey, Result<(Label, Vec<u8>), (ErrorKind, String)>)> = prepared
        .changes
        .iter()
        .filter(|c| matches!(c.kind, ChangeKind::Upsert { .. }))
        .map(|c| (&c.key, inputs_of(&c.key, prepared.pixels.remove(&c.key))))
        .collect();
    let pixels: Vec<&[u8]> = inputs
        .iter()
        .filter_map(|(_, input)| input.as_ref().ok().map(|(_, p)| p.as_slice()))
        .collect();
    let mut embedded = embedder.embed_batch(&pixels).into_iter();
    for (key, input) in inputs {
        let outcome = input.and_then(|(label, _)| {
            let embedding = embedded.next().expect("one embedding per image");
            let embedding = embedding.map_err(|e| (e.kind, e.reason))?;
            Ok(ImageRow {
                key: key.clone(),
                label,
                embedding,
            })
        });
        match outcome {
            Ok(row) => {
                metrics().images_ingested.inc();
                rows.added(&row, epoch);
                give(Outcome::Row((row, epoch, 1)));
            }
            Err((kind, reason)) => {
                metrics().error(kind.as_str());
                tracing::warn!(stage = "embed", key = %key, kind = kind.as_str(), %reason, "Image rejected.");
                give(Outcome::Error(ErrorRecord {
                    key: key.clone(),
                    kind,
                    reason,
                    epoch,
                }));
            }
        }
    }
}

/// An upsert's label (from its folder) and decoded pixels, or why it has none.
fn inputs_of(
    key: &ImageKey,
    pixels: Option<Result<Vec<u8>, (ErrorKind, String)>>,
) -> Result<(Label, Vec<u8>), (ErrorKind, String)> {
    let label = key.label().map_err(|reason| (ErrorKind::Layout, reason))?;
    let pixels = pixels.unwrap_or_else(|| Err((ErrorKind::Read, "not fetched".into())))?;
    Ok((label, pixels))
}
