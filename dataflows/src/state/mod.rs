//! Durable state, written in proportion to what changed.
//!
//! Each committed epoch writes:
//! - `state/delta-<t>.bin`: the epoch's ledger and error changes, its summary and, while
//!   they are few, the rows (with their labels) its statistics changed by (O(news));
//! - `state/stats-<t>.bin`, only when due: the exact moments and per-label statistics
//!   (fixed size, ~7 MB at d = 1280), rewritten once the rows in the deltas since the
//!   last one outweigh it, after an epoch with many rows, and at each compaction;
//! - `state/pca-<t>.bin`, only when the PCA is refitted;
//! - `state/checkpoint-<t>.bin`: the small rest (KMeans, counts, the names of the files);
//! - then `state/CURRENT`, naming the checkpoint: the commit point.
//!
//! A trickle epoch therefore writes a few hundred KB, not the whole fixed-size state.
//! Resume reads the last stats file and folds in the rows of the deltas after it.
//!
//! Now and then (when the deltas outweigh the base, or there are [`MAX_DELTAS`] of them)
//! the commit compacts: it folds base + deltas into a new `state/base-<t>.bin` and the
//! deltas' summaries into `state/history-<t>.bin`, written once and never again. Resume
//! reads base + deltas. A crash anywhere leaves the previous pointer and every file it
//! names intact, so uncommitted epochs are simply listed and processed again.

use crate::embed::EmbedConfig;
use crate::record::{Embedding, Epoch, ErrorRecord, ImageKey};
use crate::sink::OutputStore;
use crate::stats::moments::SecondMoments;
use crate::stats::{KMeans, LabelStats, Models, Moments, MomentsAccumulator, PcaModel};
use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::BTreeMap;

pub mod operator;

/// 5: moments, per-label statistics and the PCA in files of their own, written when due;
/// the rows that changed them in the deltas.
const FORMAT: u32 = 5;

/// Format 4: the whole fixed-size state in one checkpoint file, rewritten every epoch,
/// and deltas without statistics. Read and migrated, so an output keeps resuming across
/// the upgrade (its first new commit writes the statistics files).
mod v4 {
    use super::*;

    /// Generic over the models' layout: format 3 is the same file with older models.
    #[derive(Serialize, Deserialize)]
    pub struct Checkpoint<M = Models> {
        pub format: u32,
        pub epoch: Epoch,
        pub source: String,
        pub labels: BTreeMap<String, LabelStats>,
        pub errors: usize,
        pub errors_by_kind: BTreeMap<String, usize>,
        pub models: M,
        pub log: Log,
        pub embed: EmbedConfig,
    }

    impl From<Checkpoint> for super::Checkpoint {
        fn from(c: Checkpoint) -> Self {
            super::Checkpoint {
                format: FORMAT,
                epoch: c.epoch,
                source: c.source,
                labels: c.labels,
                errors: c.errors,
                errors_by_kind: c.errors_by_kind,
                models: c.models,
                log: c.log,
                embed: c.embed,
                stats: StatsLog::default(),
            }
        }
    }

    /// A format-4 delta.
    #[derive(Serialize, Deserialize)]
    pub struct Delta {
        pub ledger: BTreeMap<ImageKey, Option<LedgerEntry>>,
        pub errors: BTreeMap<ImageKey, Option<ErrorRecord>>,
        pub summary: Option<EpochSummary>,
    }

    impl From<Delta> for super::Delta {
        fn from(d: Delta) -> Self {
            super::Delta {
                ledger: d.ledger,
                errors: d.errors,
                summary: d.summary,
                ..Default::default()
            }
        }
    }
}

/// Format 3: format 4 before the PCA refit policy (no `changes_since_fit`/`pca_epoch`
/// in the models). Read and migrated.
mod v3 {
    use super::*;

    #[derive(Serialize, Deserialize)]
    pub struct Models {
        pub moments: Moments,
        pub pca: Option<PcaModel>,
        pub kmeans: KMeans,
    }

    /// A format-3 checkpoint: format 4's layout with these models.
    pub type Checkpoint = super::v4::Checkpoint<Models>;

    impl From<Checkpoint> for super::v4::Checkpoint {
        /// The PCA of a format-3 checkpoint was fitted at its epoch (every epoch refitted).
        fn from(c: Checkpoint) -> Self {
            super::v4::Checkpoint {
                format: 4,
                epoch: c.epoch,
                source: c.source,
                labels: c.labels,
                errors: c.errors,
                errors_by_kind: c.errors_by_kind,
                models: super::Models {
                    moments: c.models.moments,
                    pca: c.models.pca,
                    kmeans: c.models.kmeans,
                    changes_since_fit: 0,
                    pca_epoch: c.epoch,
                },
                log: c.log,
                embed: c.embed,
            }
        }
    }
}

/// A format-5 checkpoint file: everything but the statistics kept in their own files.
#[derive(Serialize, Deserialize)]
struct Stored {
    format: u32,
    epoch: Epoch,
    source: String,
    errors: usize,
    errors_by_kind: BTreeMap<String, usize>,
    kmeans: KMeans,
    changes_since_fit: u64,
    pca_epoch: Epoch,
    log: Log,
    stats: StatsLog,
    embed: EmbedConfig,
}

/// `state/stats-<t>.bin`: the exact statistics at epoch t.
#[derive(Serialize, Deserialize)]
struct StatsBase {
    moments: Moments,
    labels: BTreeMap<String, LabelStats>,
}

/// A row as the deltas keep it: its label, fixed-point embedding and diff (+1 added,
/// −1 retracted): enough to replay the moments and the per-label statistics.
pub type StatRow = (String, Embedding, i64);

/// Where the statistics kept beside the checkpoint are.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsLog {
    /// Epoch of the last stats file (0: none yet); the deltas after it carry the rows
    /// since.
    pub base: Epoch,
    /// Its size in bytes.
    pub base_bytes: u64,
    /// Bytes of moment rows in the deltas after it.
    pub row_bytes: u64,
    /// Epoch of the PCA file, the fit at `pca_epoch` (0: never fitted).
    pub pca: Epoch,
    /// The fitted epoch of the PCA in `models/pca.json` (published before the commit
    /// point, only when it differs: a restart does not rewrite an unchanged PCA, 13.6 MB
    /// of text at k = 498).
    pub published_pca: Epoch,
}

/// The most moment rows an epoch's delta carries; an epoch with more (a first ingest)
/// writes the stats file instead (its rows are then already ~1 MB per 200).
pub const DELTA_ROWS: usize = 256;

const POINTER: &str = "state/CURRENT";

/// A compaction is due once this many deltas wait, whatever their size (bounds the
/// files a resume reads).
pub const MAX_DELTAS: usize = 256;
/// ... or once the deltas add up to the base's size (amortised writes stay O(news)),
/// but not before they reach this size (small archives would compact every epoch).
const MIN_COMPACT_BYTES: u64 = 1 << 20;

/// Where an image's embedding is stored: `embeddings/epoch-<epoch>-worker-<part>.parquet`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Location {
    /// Epoch in which this version was processed.
    pub epoch: Epoch,
    /// Worker that wrote the file.
    pub part: u32,
}

impl Location {
    /// The embeddings file holding the row.
    pub fn file(&self) -> String {
        crate::sink::operator::embeddings_file(self.epoch, self.part as usize)
    }
}

/// What the ledger knows of one ingested object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Content version (size+mtime or ETag).
    pub version: String,
    /// Where its row is stored (the epoch that processed this version).
    pub location: Location,
    /// True when it produced an embedding, false when quarantined.
    pub embedded: bool,
}

/// Images and per-label counts after one committed epoch (for "images over time").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochSummary {
    /// The epoch.
    pub epoch: Epoch,
    /// Live images per label after it.
    pub labels: BTreeMap<String, i64>,
    /// Errors recorded after it.
    pub errors: usize,
}

/// One epoch's changes to the ledger and the error records (`None`: removed), and the
/// rows its statistics changed by.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// Ledger changes, by key.
    pub ledger: BTreeMap<ImageKey, Option<LedgerEntry>>,
    /// Error-record changes, by key.
    pub errors: BTreeMap<ImageKey, Option<ErrorRecord>>,
    /// The epoch's summary.
    pub summary: Option<EpochSummary>,
    /// The rows the epoch added to or retracted from the moments and the per-label
    /// statistics, when the epoch wrote no stats file (see [`StatsLog`]).
    pub rows: Vec<StatRow>,
}

/// The per-image durable state: every object handed to the dataflow, and the current
/// error records. Readers that need it load it from base + deltas ([`Archive::load`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Archive {
    /// Every object handed to the dataflow, by key.
    pub ledger: BTreeMap<ImageKey, LedgerEntry>,
    /// Current error records (quarantined objects), by key.
    pub errors: BTreeMap<ImageKey, ErrorRecord>,
}

/// The files that hold a checkpoint's per-image state and history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Log {
    /// Epoch of the base file (0: none yet).
    pub base: Epoch,
    /// Its size in bytes.
    pub base_bytes: u64,
    /// Committed epochs after the base, each with a delta file, in order.
    pub deltas: Vec<Epoch>,
    /// Their total size in bytes.
    pub delta_bytes: u64,
    /// History files (one per compaction), in order.
    pub history: Vec<Epoch>,
}

/// The fixed-size durable state after a committed epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version of this file.
    pub format: u32,
    /// Last committed epoch (0: nothing yet).
    pub epoch: Epoch,
    /// Source location the state was built from.
    pub source: String,
    /// Live images per label, with their embedding sums.
    pub labels: BTreeMap<String, LabelStats>,
    /// Current error records.
    pub errors: usize,
    /// Current error records by kind.
    pub errors_by_kind: BTreeMap<String, usize>,
    /// Moments, PCA and KMeans.
    pub models: Models,
    /// The per-image state's files.
    pub log: Log,
    /// The model and preprocessing that produced the stored embeddings: classify must
    /// embed a new photo the same way.
    pub embed: EmbedConfig,
    /// Where the moments, per-label statistics and PCA are stored.
    pub stats: StatsLog,
}

fn checkpoint_file(epoch: Epoch) -> String {
    format!("state/checkpoint-{epoch:012}.bin")
}
fn base_file(epoch: Epoch) -> String {
    format!("state/base-{epoch:012}.bin")
}
fn delta_file(epoch: Epoch) -> String {
    format!("state/delta-{epoch:012}.bin")
}
fn history_file(epoch: Epoch) -> String {
    format!("state/history-{epoch:012}.bin")
}
fn stats_file(epoch: Epoch) -> String {
    format!("state/stats-{epoch:012}.bin")
}
fn pca_file(epoch: Epoch) -> String {
    format!("state/pca-{epoch:012}.bin")
}

/// Reads one epoch's delta, in the current layout or format 4's.
fn read_delta(store: &dyn OutputStore, epoch: Epoch) -> Result<Delta> {
    let name = delta_file(epoch);
    let bytes = store
        .get(&name)?
        .with_context(|| format!("{} names {name}, which is missing", store.location()))?;
    // An older, shorter layout fails to decode as the current one (bincode runs out of
    // bytes); the current one is tried first.
    bincode::deserialize::<Delta>(&bytes)
        .or_else(|_| bincode::deserialize::<v4::Delta>(&bytes).map(Delta::from))
        .with_context(|| format!("decoding {name}"))
}

fn read<T: DeserializeOwned>(store: &dyn OutputStore, name: &str) -> Result<T> {
    let bytes = store
        .get(name)?
        .with_context(|| format!("{} names {name}, which is missing", store.location()))?;
    bincode::deserialize(&bytes).with_context(|| format!("decoding {name}"))
}

impl Checkpoint {
    /// The state before anything was ingested.
    pub fn empty(source: String, dim: usize, embed: EmbedConfig) -> Self {
        Checkpoint {
            format: FORMAT,
            epoch: 0,
            source,
            labels: BTreeMap::new(),
            errors: 0,
            errors_by_kind: BTreeMap::new(),
            models: Models::new(dim),
            log: Log::default(),
            embed,
            stats: StatsLog::default(),
        }
    }

    /// Live images.
    pub fn images(&self) -> i64 {
        self.models.moments.n
    }

    /// This checkpoint without its statistics (the moments' second-order sums, PCA,
    /// KMeans, per-label sums): what a worker keeps that neither merges models nor commits
    /// (every worker but 0). The image count and the log stay.
    pub fn without_statistics(mut self) -> Self {
        self.models.moments.sum = Vec::new();
        self.models.moments.ss = SecondMoments::Narrow(Vec::new());
        self.models.pca = None;
        self.models.kmeans = KMeans::default();
        self.labels.clear();
        self
    }

    /// Live images per label.
    pub fn label_counts(&self) -> BTreeMap<String, i64> {
        self.labels.iter().map(|(l, s)| (l.clone(), s.n)).collect()
    }

    /// Loads the last committed checkpoint, if any.
    pub fn load(store: &dyn OutputStore) -> Result<Option<Checkpoint>> {
        Self::load_with(store, true)
    }

    /// [`Self::load`] for a worker that never merges models nor commits: the checkpoint
    /// [`Self::without_statistics`]. Format 5 reads only the count and dimension of the
    /// statistics file (and the deltas' row counts), not the statistics themselves.
    pub fn load_without_statistics(store: &dyn OutputStore) -> Result<Option<Checkpoint>> {
        Ok(Self::load_with(store, false)?.map(Checkpoint::without_statistics))
    }

    fn load_with(store: &dyn OutputStore, statistics: bool) -> Result<Option<Checkpoint>> {
        let Some(pointer) = store.get(POINTER)? else {
            return Ok(None);
        };
        let name = String::from_utf8(pointer).context("state/CURRENT is not UTF-8")?;
        let name = name.trim();
        let bytes = store
            .get(name)?
            .with_context(|| format!("{} names {name}, which is missing", POINTER))?;
        // The format comes first in every version, so an old output gets a clear error
        // instead of a decoding one.
        let format: u32 = bincode::deserialize(&bytes[..bytes.len().min(4)]).unwrap_or(0);
        let decoding = || format!("decoding checkpoint {name}");
        let checkpoint: Checkpoint = match format {
            3 => v4::Checkpoint::from(
                bincode::deserialize::<v3::Checkpoint>(&bytes).with_context(decoding)?,
            )
            .into(),
            4 => bincode::deserialize::<v4::Checkpoint>(&bytes)
                .with_context(decoding)?
                .into(),
            FORMAT => {
                let stored: Stored = bincode::deserialize(&bytes).with_context(decoding)?;
                if statistics {
                    Checkpoint::assemble(store, stored)?
                } else {
                    Checkpoint::summary(store, stored)?
                }
            }
            _ => anyhow::bail!(
                "checkpoint {name} has format {format}, this build reads 3 to {FORMAT}; rebuild \
                 the output with `fruits-flow run` into a new --output"
            ),
        };
        Ok(Some(checkpoint))
    }

    /// A format-5 checkpoint with its statistics: the stats file, the rows of the deltas
    /// after it, and the PCA file.
    fn assemble(store: &dyn OutputStore, stored: Stored) -> Result<Checkpoint> {
        anyhow::ensure!(
            stored.stats.base > 0,
            "checkpoint of epoch {} names no statistics file",
            stored.epoch
        );
        let base: StatsBase = read(store, &stats_file(stored.stats.base))?;
        let (mut moments, mut labels) = (base.moments, base.labels);
        let mut rows = MomentsAccumulator::new(moments.dim);
        for &epoch in stored.log.deltas.iter().filter(|&&e| e > stored.stats.base) {
            let delta = read_delta(store, epoch)?;
            for (label, e, diff) in &delta.rows {
                rows.add(e, *diff);
                labels.entry(label.clone()).or_default().add(e, *diff);
            }
        }
        labels.retain(|_, s| !s.is_zero());
        moments.merge(&rows.finish());
        let pca: Option<PcaModel> = match stored.stats.pca {
            0 => None,
            e => read(store, &pca_file(e))?,
        };
        Ok(Checkpoint {
            format: FORMAT,
            epoch: stored.epoch,
            source: stored.source,
            labels,
            errors: stored.errors,
            errors_by_kind: stored.errors_by_kind,
            models: Models {
                moments,
                pca,
                kmeans: stored.kmeans,
                changes_since_fit: stored.changes_since_fit,
                pca_epoch: stored.pca_epoch,
            },
            log: stored.log,
            embed: stored.embed,
            stats: stored.stats,
        })
    }

    /// A format-5 checkpoint with only the image count and dimension of its statistics.
    fn summary(store: &dyn OutputStore, stored: Stored) -> Result<Checkpoint> {
        // The moments' leading fields: bincode stops after them.
        #[derive(Deserialize)]
        struct Head {
            dim: usize,
            n: i64,
        }
        let head: Head = read(store, &stats_file(stored.stats.base))?;
        // The image count moves with the rows of the deltas after the stats file.
        let mut n = head.n;
        for &epoch in stored.log.deltas.iter().filter(|&&e| e > stored.stats.base) {
            n += read_delta(store, epoch)?
                .rows
                .iter()
                .map(|(_, _, d)| d)
                .sum::<i64>();
        }
        let moments = Moments {
            dim: head.dim,
            n,
            sum: Vec::new(),
            ss: SecondMoments::Narrow(Vec::new()),
        };
        Ok(Checkpoint {
            format: FORMAT,
            epoch: stored.epoch,
            source: stored.source,
            labels: BTreeMap::new(),
            errors: stored.errors,
            errors_by_kind: stored.errors_by_kind,
            models: Models {
                moments,
                pca: None,
                kmeans: KMeans::default(),
                changes_since_fit: stored.changes_since_fit,
                pca_epoch: stored.pca_epoch,
            },
            log: stored.log,
            embed: stored.embed,
            stats: stored.stats,
        })
    }

    /// The format-5 checkpoint file's content.
    fn stored(&self) -> Stored {
        Stored {
            format: FORMAT,
            epoch: self.epoch,
            source: self.source.clone(),
            errors: self.errors,
            errors_by_kind: self.errors_by_kind.clone(),
            kmeans: self.models.kmeans.clone(),
            changes_since_fit: self.models.changes_since_fit,
            pca_epoch: self.models.pca_epoch,
            log: self.log.clone(),
            stats: self.stats.clone(),
            embed: self.embed.clone(),
        }
    }

    /// Every file this checkpoint needs.
    pub fn files(&self) -> Vec<String> {
        let mut files = vec![checkpoint_file(self.epoch)];
        if self.log.base > 0 {
            files.push(base_file(self.log.base));
        }
        files.extend(self.log.deltas.iter().map(|&e| delta_file(e)));
        files.extend(self.log.history.iter().map(|&e| history_file(e)));
        if self.stats.base > 0 {
            files.push(stats_file(self.stats.base));
        }
        if self.stats.pca > 0 {
            files.push(pca_file(self.stats.pca));
        }
        files
    }

    /// Writes this checkpoint, then publishes it by replacing the pointer (the commit
    /// point), then drops the files neither it nor the previous checkpoint (`previous`:
    /// its [`Checkpoint::files`]) needs.
    pub fn commit(&self, store: &dyn OutputStore, previous: &[String]) -> Result<()> {
        let name = checkpoint_file(self.epoch);
        store.put(&name, &bincode::serialize(&self.stored())?)?;
        // Fault injection for the crash tests: die between the checkpoint and its pointer.
        if std::env::var("FRUITS_FLOW_ABORT_IN_COMMIT")
            .ok()
            .and_then(|e| e.parse().ok())
            == Some(self.epoch)
        {
            tracing::error!(
                stage = "state",
                epoch = self.epoch,
                "Aborting inside the commit (FRUITS_FLOW_ABORT_IN_COMMIT)."
            );
            std::process::abort();
        }
        store.put(POINTER, name.as_bytes())?;
        let mut keep = self.files();
        keep.extend_from_slice(previous);
        for stale in store.list("state/")? {
            if stale != POINTER && !keep.contains(&stale) {
                store.delete(&stale)?;
            }
        }
        Ok(())
    }

    /// Writes the epoch's delta, or compacts base + deltas + this delta into a new base
    /// when due (reading base + deltas back from the store), and records which in the
    /// log; then the statistics files that are due. `rows` are the epoch's moment rows
    /// (`None`: more than [`DELTA_ROWS`]); the checkpoint already holds the epoch's
    /// statistics.
    pub fn write_delta(
        &mut self,
        store: &dyn OutputStore,
        delta: &mut Delta,
        rows: Option<Vec<StatRow>>,
    ) -> Result<()> {
        // Rows go into the delta while the deltas' rows stay below the stats file's size.
        let dim = self.models.moments.dim as u64;
        let row_bytes = rows.as_ref().map(|r| {
            r.iter()
                .map(|(l, ..)| 4 * dim + 24 + l.len() as u64)
                .sum::<u64>()
        });
        let mut stats_due = self.stats.base == 0
            || row_bytes.is_none_or(|b| {
                self.stats.row_bytes + b > self.stats.base_bytes.max(MIN_COMPACT_BYTES)
            });
        if !stats_due {
            delta.rows = rows.unwrap_or_default();
        }
        let bytes = bincode::serialize(&*delta)?;
        let log = &self.log;
        let pending = log.delta_bytes + bytes.len() as u64;
        let due =
            log.deltas.len() + 1 >= MAX_DELTAS || pending >= log.base_bytes.max(MIN_COMPACT_BYTES);
        if !due {
            store.put(&delta_file(self.epoch), &bytes)?;
            self.log.deltas.push(self.epoch);
            self.log.delta_bytes = pending;
        } else {
            self.compact(store, delta)?;
            // The deltas that carried rows are folded away: the statistics restart here.
            stats_due = true;
        }
        if stats_due {
            let base = bincode::serialize(&StatsBase {
                moments: self.models.moments.clone(),
                labels: self.labels.clone(),
            })?;
            store.put(&stats_file(self.epoch), &base)?;
            self.stats.base = self.epoch;
            self.stats.base_bytes = base.len() as u64;
            self.stats.row_bytes = 0;
        } else {
            self.stats.row_bytes += row_bytes.unwrap_or(0);
        }
        // The PCA as fitted, `None` included (a refit after every image left has none).
        if self.stats.pca != self.models.pca_epoch {
            let pca = bincode::serialize(&self.models.pca)?;
            store.put(&pca_file(self.models.pca_epoch), &pca)?;
            self.stats.pca = self.models.pca_epoch;
        }
        Ok(())
    }

    /// Folds base + deltas + `delta` into a new base (O(archive), once per base's worth
    /// of news) and the deltas' summaries into a history file.
    ///
    /// The old base is merged with the deltas entry by entry, in key order, straight into
    /// the new base's bytes: memory is the two files and the deltas, not the ledger as a
    /// map (at 250k images that map was ~50 MB on worker 0, at every compaction).
    fn compact(&mut self, store: &dyn OutputStore, delta: &Delta) -> Result<()> {
        // The ledger and error changes since the base, later epochs over earlier ones, and
        // the epochs' summaries: one read of each delta.
        let mut news = Delta::default();
        let mut history = Vec::new();
        for &epoch in &self.log.deltas {
            let d = read_delta(store, epoch)?;
            news.ledger.extend(d.ledger);
            news.errors.extend(d.errors);
            history.extend(d.summary);
        }
        news.ledger.extend(delta.ledger.clone());
        news.errors.extend(delta.errors.clone());
        history.extend(delta.summary.clone());
        let (name, old) = match self.log.base {
            0 => (
                "the empty base".to_string(),
                bincode::serialize(&Archive::default())?,
            ),
            epoch => {
                let name = base_file(epoch);
                let bytes = store.get(&name)?.with_context(|| {
                    format!("{} names {name}, which is missing", store.location())
                })?;
                (name, bytes)
            }
        };
        let base = merged::merge(&old, &news).with_context(|| format!("compacting {name}"))?;
        drop(old);
        store.put(&base_file(self.epoch), &base)?;
        store.put(&history_file(self.epoch), &bincode::serialize(&history)?)?;
        self.log.base = self.epoch;
        self.log.base_bytes = base.len() as u64;
        self.log.deltas.clear();
        self.log.delta_bytes = 0;
        self.log.history.push(self.epoch);
        tracing::debug!(
            stage = "state",
            epoch = self.epoch,
            base_bytes = base.len(),
            "Ledger compacted."
        );
        Ok(())
    }
}

impl Archive {
    /// Reads a checkpoint's base and deltas, keeping the ledger entries of keys for which
    /// `keep` is true (all error records are kept).
    pub fn load(
        store: &dyn OutputStore,
        checkpoint: &Checkpoint,
        keep: impl Fn(&ImageKey) -> bool,
    ) -> Result<Archive> {
        let mut archive = if checkpoint.log.base > 0 {
            let name = base_file(checkpoint.log.base);
            let bytes = store
                .get(&name)?
                .with_context(|| format!("{} names {name}, which is missing", store.location()))?;
            filtered::decode(&bytes, &keep).with_context(|| format!("decoding {name}"))?
        } else {
            Archive::default()
        };
        for &epoch in &checkpoint.log.deltas {
            let mut delta = read_delta(store, epoch)?;
            delta.ledger.retain(|k, _| keep(k));
            archive.apply(&delta);
        }
        Ok(archive)
    }

    /// Applies one epoch's changes.
    pub fn apply(&mut self, delta: &Delta) {
        for (key, entry) in &delta.ledger {
            match entry {
                Some(e) => self.ledger.insert(key.clone(), e.clone()),
                None => self.ledger.remove(key),
            };
        }
        for (key, record) in &delta.errors {
            match record {
                Some(r) => self.errors.insert(key.clone(), r.clone()),
                None => self.errors.remove(key),
            };
        }
    }

    /// True when `key`'s live row is in the file of `epoch`.
    pub fn is_live_in(&self, key: &ImageKey, epoch: Epoch) -> bool {
        self.ledger
            .get(key)
            .is_some_and(|e| e.embedded && e.location.epoch == epoch)
    }
}

/// Compacting a base with the news since, without decoding it into a map: the old base's
/// ledger entries are read in key order and written straight out, merged with the
/// changes (which are few), in `bincode::serialize`'s layout of an [`Archive`].
mod merged {
    use super::{Delta, LedgerEntry};
    use crate::record::{ErrorRecord, ImageKey};
    use bincode::Options;
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::cell::RefCell;
    use std::collections::btree_map::Iter;
    use std::collections::BTreeMap;
    use std::iter::Peekable;

    /// The new base of `old` (an encoded [`Archive`]) with `news` applied.
    pub fn merge(old: &[u8], news: &Delta) -> bincode::Result<Vec<u8>> {
        let options = bincode::DefaultOptions::new()
            .with_fixint_encoding()
            .allow_trailing_bytes();
        let mut de = bincode::Deserializer::from_slice(old, options);
        let writer = Writer::new(news, old.len());
        let errors = BaseSeed(&writer).deserialize(&mut de)?;
        writer.finish(errors, news)
    }

    /// The new ledger's bytes as they are written: a length placeholder, then entries.
    struct Writer<'a> {
        out: RefCell<Vec<u8>>,
        written: RefCell<u64>,
        changes: RefCell<Peekable<Iter<'a, ImageKey, Option<LedgerEntry>>>>,
    }

    impl<'a> Writer<'a> {
        fn new(news: &'a Delta, capacity: usize) -> Self {
            let mut out = Vec::with_capacity(capacity + capacity / 8);
            out.extend_from_slice(&0u64.to_le_bytes());
            Writer {
                out: RefCell::new(out),
                written: RefCell::new(0),
                changes: RefCell::new(news.ledger.iter().peekable()),
            }
        }

        fn put(&self, key: &ImageKey, entry: &LedgerEntry) -> bincode::Result<()> {
            let mut out = self.out.borrow_mut();
            bincode::serialize_into(&mut *out, key)?;
            bincode::serialize_into(&mut *out, entry)?;
            *self.written.borrow_mut() += 1;
            Ok(())
        }

        /// Writes the changes of keys before `key` (`None`: all left); returns `key`'s
        /// own change, if any.
        fn changes_before(
            &self,
            key: Option<&ImageKey>,
        ) -> bincode::Result<Option<Option<LedgerEntry>>> {
            let mut changes = self.changes.borrow_mut();
            while let Some(&(k, change)) = changes.peek() {
                match key.map(|key| k.cmp(key)) {
                    Some(std::cmp::Ordering::Greater) => break,
                    Some(std::cmp::Ordering::Equal) => {
                        changes.next();
                        return Ok(Some(change.clone()));
                    }
                    _ => {
                        if let Some(entry) = change {
                            self.put(k, entry)?;
                        }
                        changes.next();
                    }
                }
            }
            Ok(None)
        }

        /// One entry of the old base, as the news leave it.
        fn base_entry(&self, key: ImageKey, entry: LedgerEntry) -> bincode::Result<()> {
            match self.changes_before(Some(&key))? {
                Some(Some(changed)) => self.put(&key, &changed),
                Some(None) => Ok(()),
                None => self.put(&key, &entry),
            }
        }

        /// The rest of the changes, the length, then the error records.
        fn finish(
            self,
            mut errors: BTreeMap<ImageKey, ErrorRecord>,
            news: &Delta,
        ) -> bincode::Result<Vec<u8>> {
            self.changes_before(None)?;
            let mut out = self.out.into_inner();
            out[..8].copy_from_slice(&self.written.into_inner().to_le_bytes());
            for (key, record) in &news.errors {
                match record {
                    Some(r) => errors.insert(key.clone(), r.clone()),
                    None => errors.remove(key),
                };
            }
            bincode::serialize_into(&mut out, &errors)?;
            Ok(out)
        }
    }

    /// The old base: its ledger streams through the writer; its error records come back.
    struct BaseSeed<'w, 'a>(&'w Writer<'a>);
    struct LedgerSeed<'w, 'a>(&'w Writer<'a>);

    impl<'de> DeserializeSeed<'de> for BaseSeed<'_, '_> {
        type Value = BTreeMap<ImageKey, ErrorRecord>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_struct("Archive", &["ledger", "errors"], self)
        }
    }

    impl<'de> Visitor<'de> for BaseSeed<'_, '_> {
        type Value = BTreeMap<ImageKey, ErrorRecord>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a ledger base")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            use serde::de::Error;
            seq.next_element_seed(LedgerSeed(self.0))?
                .ok_or_else(|| A::Error::invalid_length(0, &self))?;
            seq.next_element()?
                .ok_or_else(|| A::Error::invalid_length(1, &self))
        }
    }

    impl<'de> DeserializeSeed<'de> for LedgerSeed<'_, '_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for LedgerSeed<'_, '_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a ledger")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            use serde::de::Error;
            while let Some((key, entry)) = map.next_entry::<ImageKey, LedgerEntry>()? {
                self.0.base_entry(key, entry).map_err(A::Error::custom)?;
            }
            Ok(())
        }
    }
}

/// Decoding a base keeping only some ledger entries, entry by entry: a worker never
/// holds the whole cluster's ledger, only its own shard.
mod filtered {
    use super::{Archive, LedgerEntry};
    use crate::record::{ErrorRecord, ImageKey};
    use bincode::Options;
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::collections::BTreeMap;

    /// Decodes an [`Archive`] written by `bincode::serialize`, keeping the ledger
    /// entries of keys for which `keep` is true.
    pub fn decode(bytes: &[u8], keep: &dyn Fn(&ImageKey) -> bool) -> bincode::Result<Archive> {
        // The options of `bincode::serialize`/`deserialize`.
        let options = bincode::DefaultOptions::new()
            .with_fixint_encoding()
            .allow_trailing_bytes();
        let mut de = bincode::Deserializer::from_slice(bytes, options);
        ArchiveSeed(keep).deserialize(&mut de)
    }

    struct ArchiveSeed<'a>(&'a dyn Fn(&ImageKey) -> bool);
    struct LedgerSeed<'a>(&'a dyn Fn(&ImageKey) -> bool);

    impl<'de> DeserializeSeed<'de> for ArchiveSeed<'_> {
        type Value = Archive;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Archive, D::Error> {
            d.deserialize_struct("Archive", &["ledger", "errors"], self)
        }
    }

    impl<'de> Visitor<'de> for ArchiveSeed<'_> {
        type Value = Archive;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a ledger base")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Archive, A::Error> {
            use serde::de::Error;
            let ledger = seq
                .next_element_seed(LedgerSeed(self.0))?
                .ok_or_else(|| A::Error::invalid_length(0, &self))?;
            let errors: BTreeMap<ImageKey, ErrorRecord> = seq
                .next_element()?
                .ok_or_else(|| A::Error::invalid_length(1, &self))?;
            Ok(Archive { ledger, errors })
        }
    }

    impl<'de> DeserializeSeed<'de> for LedgerSeed<'_> {
        type Value = BTreeMap<ImageKey, LedgerEntry>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for LedgerSeed<'_> {
        type Value = BTreeMap<ImageKey, LedgerEntry>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a ledger")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((key, entry)) = map.next_entry::<ImageKey, LedgerEntry>()? {
                if (self.0)(&key) {
                    out.insert(key, entry);
                }
            }
            Ok(out)
        }
    }
}

fn load_delta_summaries(
    store: &dyn OutputStore,
    checkpoint: &Checkpoint,
) -> Result<Vec<EpochSummary>> {
    let mut out = Vec::new();
    for &epoch in &checkpoint.log.deltas {
        out.extend(read_delta(store, epoch)?.summary);
    }
    Ok(out)
}

/// One summary per committed epoch, oldest first (history files, then the deltas).
pub fn load_history(store: &dyn OutputStore, checkpoint: &Checkpoint) -> Result<Vec<EpochSummary>> {
    let mut out = Vec::new();
    for &epoch in &checkpoint.log.history {
        let chunk: Vec<EpochSummary> = read(store, &history_file(epoch))?;
        out.extend(chunk);
    }
    out.extend(load_delta_summaries(store, checkpoint)?);
    Ok(out)
}

/// The last committed checkpoint, or a clear error naming the output when there is none.
pub fn load_committed(store: &dyn OutputStore) -> Result<Checkpoint> {
    Checkpoint::load(store)?.with_context(|| {
        format!(
            "{} holds no committed state; run `fruits-flow run --output {}` first",
            store.location(),
            store.location()
        )
    })
}

/// Streams the live rows of a committed state one embeddings file at a time (memory:
/// the ledger plus one file), calling `each` with the file's live rows in key order.
/// Keys are the stored paths relative to the checkpoint's source.
pub fn for_each_live_file(
    store: &dyn OutputStore,
    checkpoint: &Checkpoint,
    archive: &Archive,
    mut each: impl FnMut(Vec<(crate::record::ImageRow, crate::sink::parquet::StoredRow)>) -> Result<()>,
) -> Result<()> {
    for (name, epoch) in live_files(store, checkpoint)? {
        each(read_live_file(store, checkpoint, archive, &name, epoch)?)?;
    }
    Ok(())
}

/// The committed embeddings files (name, epoch), in the store's listing order.
pub fn live_files(
    store: &dyn OutputStore,
    checkpoint: &Checkpoint,
) -> Result<Vec<(String, Epoch)>> {
    use crate::sink::operator::epoch_of_file;
    Ok(store
        .list("embeddings/")?
        .into_iter()
        .filter_map(|name| {
            let epoch = epoch_of_file(&name)?;
            (epoch <= checkpoint.epoch).then_some((name, epoch))
        })
        .collect())
}

/// The live rows of one embeddings file, in key order.
pub fn read_live_file(
    store: &dyn OutputStore,
    checkpoint: &Checkpoint,
    archive: &Archive,
    name: &str,
    epoch: Epoch,
) -> Result<Vec<(crate::record::ImageRow, crate::sink::parquet::StoredRow)>> {
    let mut live = Vec::new();
    for_each_live_row(
        store,
        checkpoint,
        archive,
        name,
        epoch,
        |row, path, features| {
            let stored = crate::sink::parquet::StoredRow {
                path: path.to_string(),
                label: row.label.0.clone(),
                features: features.to_vec(),
            };
            live.push((row, stored));
        },
    )?;
    live.sort_by(|a, b| a.0.key.cmp(&b.0.key));
    Ok(live)
}

/// The live rows of one embeddings file as the statistics see them (key, label,
/// quantized embedding), in key order: [`read_live_file`] without the stored float copy
/// of every embedding, for readers that fold rows into statistics (replay).
pub fn read_live_image_rows(
    store: &dyn OutputStore,
    checkpoint: &Checkpoint,
    archive: &Archive,
    name: &str,
    epoch: Epoch,
) -> Result<Vec<crate::record::ImageRow>> {
    let mut live = Vec::new();
    for_each_live_row(store, checkpoint, archive, name, epoch, |row, _, _| {
        live.push(row)
    })?;
    live.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(live)
}

/// Calls `each(row, path, features)` for every row of one embeddings file that is live
/// in it (keys are the stored paths relative to the checkpoint's source), in file order.
fn for_each_live_row(
    store: &dyn OutputStore,
    checkpoint: &Checkpoint,
    archive: &Archive,
    name: &str,
    epoch: Epoch,
    mut each: impl FnMut(crate::record::ImageRow, &str, &[f32]),
) -> Result<()> {
    let root = format!("{}/", checkpoint.source);
    let bytes = store
        .get(name)?
        .with_context(|| format!("{name} vanished"))?;
    crate::sink::parquet::for_each_row(bytes, |path, label, features| {
        let Some(key) = path.strip_prefix(&root).map(|k| ImageKey(k.into())) else {
            return Ok(());
        };
        if archive.is_live_in(&key, epoch) {
            let row = crate::sink::parquet::image_row(key, path, label, features)?;
            each(row, path, features);
        }
        Ok(())
    })
    .with_context(|| format!("reading {name}"))
}

/// Every live image of a committed state, in key order. Holds every row in memory: for
/// readers that need all points at once (kNN, the batch twins in tests and examples).
pub fn live_rows(
    store: &dyn OutputStore,
    checkpoint: &Checkpoint,
) -> Result<Vec<(crate::record::ImageRow, crate::sink::parquet::StoredRow)>> {
    let archive = Archive::load(store, checkpoint, |_| true)?;
    let mut out = Vec::new();
    for_each_live_file(store, checkpoint, &archive, |rows| {
        out.extend(rows);
        Ok(())
    })?;
    out.sort_by(|a, b| a.0.key.cmp(&b.0.key));
    Ok(out)
}

/// True when `state/` holds a file of an epoch after `committed`: a commit was cut short
/// after it began writing (each commit writes its delta or base first, then publishes the
/// models, then its checkpoint and the pointer), so `models/` may hold what the
/// committed state does not.
pub fn interrupted_commit(store: &dyn OutputStore, committed: Epoch) -> bool {
    store.list("state/").map_or(true, |names| {
        names.iter().any(|name| {
            name.rsplit_once('-')
                .and_then(|(_, tail)| tail.strip_suffix(".bin"))
                .and_then(|e| e.parse::<Epoch>().ok())
                .is_some_and(|e| e > committed)
        })
    })
}

/// Removes embeddings files of epochs after the checkpoint: a crashed run's uncommitted
/// work, which the resumed run redoes.
pub fn discard_uncommitted(store: &dyn OutputStore, checkpoint_epoch: Epoch) -> Result<usize> {
    let mut removed = 0;
    for name in store.list("embeddings/")? {
        if crate::sink::operator::epoch_of_file(&name).is_some_and(|e| e > checkpoint_epoch) {
            store.delete(&name)?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    /// A format-3 checkpoint (before the refit policy) loads, migrated: same statistics,
    /// its PCA dated at its epoch.
    #[test]
    fn format_3_checkpoints_load_migrated() {
        use crate::sink::OutputStore;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::sink::LocalStore::open(dir.path().to_str().unwrap()).unwrap();
        let mut now = super::Checkpoint::empty("src".into(), 2, Default::default());
        now.epoch = 7;
        now.models.moments.n = 3;
        let old = super::v3::Checkpoint {
            format: 3,
            epoch: now.epoch,
            source: now.source.clone(),
            labels: now.labels.clone(),
            errors: 0,
            errors_by_kind: Default::default(),
            models: super::v3::Models {
                moments: now.models.moments.clone(),
                pca: None,
                kmeans: now.models.kmeans.clone(),
            },
            log: now.log.clone(),
            embed: now.embed.clone(),
        };
        store
            .put(
                "state/checkpoint-000000000007.bin",
                &bincode::serialize(&old).unwrap(),
            )
            .unwrap();
        store
            .put(super::POINTER, b"state/checkpoint-000000000007.bin")
            .unwrap();
        let loaded = super::Checkpoint::load(&store).unwrap().unwrap();
        now.models.pca_epoch = 7;
        assert_eq!(loaded, now);
    }

    /// A format-4 checkpoint and its format-4 deltas load, migrated; the next commit
    /// writes the statistics files and the output loads as format 5 after it.
    #[test]
    fn format_4_outputs_load_and_keep_committing() {
        use crate::sink::OutputStore;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::sink::LocalStore::open(dir.path().to_str().unwrap()).unwrap();
        let mut now = super::Checkpoint::empty("src".into(), 2, Default::default());
        now.epoch = 3;
        now.models.moments.add_row(&Embedding::from(vec![5, 6]), 1);
        now.labels.insert(
            "L".into(),
            LabelStats {
                n: 1,
                sum: vec![5, 6],
            },
        );
        now.log.deltas = vec![3];
        let key = ImageKey("L/a.jpg".into());
        let old_delta = super::v4::Delta {
            ledger: [(key.clone(), entry(3))].into(),
            errors: BTreeMap::new(),
            summary: None,
        };
        store
            .put(&delta_file(3), &bincode::serialize(&old_delta).unwrap())
            .unwrap();
        let old = super::v4::Checkpoint {
            format: 4,
            epoch: now.epoch,
            source: now.source.clone(),
            labels: now.labels.clone(),
            errors: 0,
            errors_by_kind: Default::default(),
            models: now.models.clone(),
            log: now.log.clone(),
            embed: now.embed.clone(),
        };
        store
            .put(&checkpoint_file(3), &bincode::serialize(&old).unwrap())
            .unwrap();
        store
            .put(super::POINTER, checkpoint_file(3).as_bytes())
            .unwrap();
        let mut loaded = super::Checkpoint::load(&store).unwrap().unwrap();
        assert_eq!(loaded, now);
        let archive = Archive::load(&store, &loaded, |_| true).unwrap();
        assert_eq!(archive.ledger.len(), 1);
        // One more epoch, committed in format 5.
        let previous = loaded.files();
        loaded.epoch = 4;
        loaded
            .models
            .moments
            .add_row(&Embedding::from(vec![1, 2]), 1);
        loaded
            .labels
            .get_mut("L")
            .unwrap()
            .add(&Embedding::from(vec![1, 2]), 1);
        let mut delta = Delta::default();
        loaded
            .write_delta(
                &store,
                &mut delta,
                Some(vec![("L".into(), Embedding::from(vec![1, 2]), 1)]),
            )
            .unwrap();
        loaded.commit(&store, &previous).unwrap();
        let again = super::Checkpoint::load(&store).unwrap().unwrap();
        assert_eq!(again, loaded);
        assert_eq!(again.models.moments.n, 2);
        assert_eq!(Archive::load(&store, &again, |_| true).unwrap(), archive);
        // A commit cut short leaves a file of a later epoch behind.
        assert!(!interrupted_commit(&store, 4));
        store.put(&delta_file(5), b"partial").unwrap();
        assert!(interrupted_commit(&store, 4));
    }

    use super::*;
    use crate::sink::LocalStore;

    fn entry(epoch: Epoch) -> Option<LedgerEntry> {
        Some(LedgerEntry {
            version: format!("v{epoch}"),
            location: Location { epoch, part: 0 },
            embedded: true,
        })
    }

    /// Compaction streams the old base through the news: the bytes equal encoding the
    /// base with the news applied (inserts before, between and after the old keys, a
    /// deletion, a rewrite, an untouched key, error records added and removed).
    #[test]
    fn a_streamed_compaction_equals_applying_the_news() {
        let key = |k: &str| ImageKey(k.to_string());
        let record = |k: &str| crate::record::ErrorRecord {
            key: key(k),
            kind: crate::record::ErrorKind::NotAnImage,
            reason: "broken".into(),
            epoch: 1,
        };
        let mut base = Archive::default();
        for (k, e) in [("B/1", 1), ("D/1", 2), ("F/1", 3)] {
            base.ledger.insert(key(k), entry(e).unwrap());
        }
        base.errors.insert(key("X/1"), record("X/1"));
        let mut news = Delta::default();
        for (k, e) in [
            ("A/1", Some(4)),
            ("C/1", Some(5)),
            ("D/1", None),
            ("F/1", Some(6)),
            ("G/1", Some(7)),
        ] {
            news.ledger.insert(key(k), e.and_then(entry));
        }
        news.errors.insert(key("X/1"), None);
        news.errors.insert(key("Y/1"), Some(record("Y/1")));
        let streamed = merged::merge(&bincode::serialize(&base).unwrap(), &news).unwrap();
        let mut expected = base.clone();
        expected.apply(&news);
        assert_eq!(streamed, bincode::serialize(&expected).unwrap());
        // The first compaction merges into an empty base: the news alone.
        let empty =
            merged::merge(&bincode::serialize(&Archive::default()).unwrap(), &news).unwrap();
        let mut alone = Archive::default();
        alone.apply(&news);
        assert_eq!(empty, bincode::serialize(&alone).unwrap());
    }

    /// Base + deltas give the same per-image state as applying every epoch in memory,
    /// through compactions, and a commit keeps only the files the last two checkpoints
    /// name.
    #[test]
    fn base_plus_deltas_equal_the_in_memory_state_through_compactions() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().to_str().unwrap()).unwrap();
        let mut checkpoint = Checkpoint::empty("src".into(), 2, EmbedConfig::default());
        let mut expected = Archive::default();
        let mut previous = checkpoint.files();
        let mut compactions = 0;
        for epoch in 1..=300u64 {
            let mut delta = Delta::default();
            // Big keys so a compaction is due every few dozen epochs.
            for i in 0..40 {
                let key = ImageKey(format!("L{}/{:0>1000}", i % 3, epoch * 100 + i));
                delta.ledger.insert(key, entry(epoch));
            }
            if epoch > 1 {
                let gone = ImageKey(format!("L{}/{:0>1000}", 0, (epoch - 1) * 100 + 3));
                delta.ledger.insert(gone, None);
            }
            delta.summary = Some(EpochSummary {
                epoch,
                labels: BTreeMap::new(),
                errors: 0,
            });
            // The statistics move as the commit moves them: rows into the moments and
            // their labels' statistics (a label whose rows all leave is dropped), now and
            // then a refitted PCA; every 37th epoch has too many rows for its delta.
            let mut rows: Vec<StatRow> = (0..3)
                .map(|i| {
                    let e = Embedding::from(vec![epoch as i32 * 1000 + i, 7 - i]);
                    (format!("L{i}"), e, 1)
                })
                .chain((epoch > 1).then(|| {
                    let e = Embedding::from(vec![(epoch as i32 - 1) * 1000, 7]);
                    ("L0".to_string(), e, -1)
                }))
                .collect();
            if epoch % 29 == 0 {
                rows.push(("Gone".into(), Embedding::from(vec![1, 1]), 1));
            }
            if epoch % 29 == 1 && epoch > 1 {
                rows.push(("Gone".into(), Embedding::from(vec![1, 1]), -1));
            }
            for (label, e, diff) in &rows {
                checkpoint.models.moments.add_row(e, *diff);
                checkpoint
                    .labels
                    .entry(label.clone())
                    .or_default()
                    .add(e, *diff);
            }
            checkpoint.labels.retain(|_, s| !s.is_zero());
            if epoch % 23 == 1 {
                checkpoint.models.pca = crate::stats::pca::fit(
                    &checkpoint.models.moments,
                    &crate::stats::PcaConfig::default(),
                );
                checkpoint.models.pca_epoch = epoch;
            }
            // A refit that found too few images leaves no PCA, and that persists too.
            if epoch == 290 {
                checkpoint.models.pca = None;
                checkpoint.models.pca_epoch = epoch;
            }
            checkpoint.epoch = epoch;
            let before = checkpoint.log.history.len();
            let rows = (epoch % 37 != 0).then_some(rows);
            checkpoint.write_delta(&store, &mut delta, rows).unwrap();
            compactions += checkpoint.log.history.len() - before;
            expected.apply(&delta);
            checkpoint.commit(&store, &previous).unwrap();
            previous = checkpoint.files();
            if epoch % 50 == 0 || epoch == 290 {
                assert_eq!(Checkpoint::load(&store).unwrap().unwrap(), checkpoint);
            }
        }
        assert!(compactions >= 3, "{compactions} compactions");
        let loaded = Checkpoint::load(&store).unwrap().unwrap();
        // The statistics came back from a stats file and the rows after it.
        assert_eq!(loaded, checkpoint);
        assert!(loaded.stats.base < loaded.epoch, "{:?}", loaded.stats);
        assert_eq!(Archive::load(&store, &loaded, |_| true).unwrap(), expected);
        // A worker's share: the filtered decode of the base keeps exactly its keys.
        assert!(loaded.log.base > 0);
        let mine = |k: &ImageKey| k.owner(3) == 1;
        let mut share = expected.clone();
        share.ledger.retain(|k, _| mine(k));
        assert!(!share.ledger.is_empty() && share.ledger.len() < expected.ledger.len());
        assert_eq!(Archive::load(&store, &loaded, mine).unwrap(), share);
        // A worker other than 0 loads the same checkpoint without its statistics, and
        // restores the same share of the ledger from it.
        let light = Checkpoint::load_without_statistics(&store)
            .unwrap()
            .unwrap();
        assert_eq!(light, loaded.clone().without_statistics());
        assert_eq!(light.models.moments.dim, 2);
        assert!(light.models.moments.ss.is_empty() && light.labels.is_empty());
        assert_eq!(Archive::load(&store, &light, mine).unwrap(), share);
        let history = load_history(&store, &loaded).unwrap();
        assert_eq!(
            history.iter().map(|h| h.epoch).collect::<Vec<_>>(),
            (1..=300).collect::<Vec<_>>()
        );
        let files = store.list("state/").unwrap().len();
        assert!(files <= loaded.files().len() * 2 + 1, "{files} files kept");
    }
}
