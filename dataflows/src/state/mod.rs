//! Durable state: one checkpoint per committed epoch (ledger, error records, label
//! counts, moments, PCA and KMeans), published atomically behind a `state/CURRENT`
//! pointer. A run resumes from the last complete checkpoint, so a crash loses nothing
//! and counts nothing twice: uncommitted epochs are simply listed and processed again.

use crate::embed::EmbedConfig;
use crate::record::{Epoch, ErrorRecord, ImageKey};
use crate::sink::OutputStore;
use crate::source::Ledger;
use crate::stats::Models;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub mod operator;

/// 2: the embed settings joined the checkpoint.
const FORMAT: u32 = 2;
const POINTER: &str = "state/CURRENT";

/// What the ledger knows of one ingested object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Content version (size+mtime or ETag).
    pub version: String,
    /// Epoch in which this version was processed (names its embeddings file).
    pub epoch: Epoch,
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

/// The complete durable state after a committed epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version of this file.
    pub format: u32,
    /// Last committed epoch (0: nothing yet).
    pub epoch: Epoch,
    /// Source location the state was built from.
    pub source: String,
    /// Every object handed to the dataflow, by key.
    pub ledger: BTreeMap<ImageKey, LedgerEntry>,
    /// Current error records (quarantined objects), by key.
    pub errors: BTreeMap<ImageKey, ErrorRecord>,
    /// Live images per label.
    pub labels: BTreeMap<String, i64>,
    /// Moments, PCA and KMeans.
    pub models: Models,
    /// One summary per committed epoch.
    pub history: Vec<EpochSummary>,
    /// The model and preprocessing that produced the stored embeddings: classify must
    /// embed a new photo the same way.
    pub embed: EmbedConfig,
}

impl Checkpoint {
    /// The state before anything was ingested.
    pub fn empty(source: String, dim: usize, embed: EmbedConfig) -> Self {
        Checkpoint {
            format: FORMAT,
            epoch: 0,
            source,
            ledger: BTreeMap::new(),
            errors: BTreeMap::new(),
            labels: BTreeMap::new(),
            models: Models::new(dim),
            history: Vec::new(),
            embed,
        }
    }

    /// Live images.
    pub fn images(&self) -> i64 {
        self.models.moments.n
    }

    /// The source ledger (versions only) the lister resumes from.
    pub fn source_ledger(&self) -> Ledger {
        Ledger::from_versions(
            self.ledger
                .iter()
                .map(|(k, e)| (k.clone(), e.version.clone())),
        )
    }

    /// Loads the last committed checkpoint, if any.
    pub fn load(store: &dyn OutputStore) -> Result<Option<Checkpoint>> {
        let Some(pointer) = store.get(POINTER)? else {
            return Ok(None);
        };
        let name = String::from_utf8(pointer).context("state/CURRENT is not UTF-8")?;
        let name = name.trim();
        let bytes = store
            .get(name)?
            .with_context(|| format!("{} names {name}, which is missing", POINTER))?;
        let checkpoint: Checkpoint =
            bincode::deserialize(&bytes).with_context(|| format!("decoding checkpoint {name}"))?;
        anyhow::ensure!(
            checkpoint.format == FORMAT,
            "checkpoint {name} has format {}, expected {FORMAT}",
            checkpoint.format
        );
        Ok(Some(checkpoint))
    }

    /// Writes this checkpoint, then publishes it by replacing the pointer (the commit
    /// point), then drops checkpoints older than the previous one.
    pub fn commit(&self, store: &dyn OutputStore) -> Result<()> {
        let name = format!("state/checkpoint-{:012}.bin", self.epoch);
        store.put(&name, &bincode::serialize(self)?)?;
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
        let all = store.list("state/")?;
        let old: Vec<_> = all
            .iter()
            .filter(|n| n.starts_with("state/checkpoint-") && n.as_str() < name.as_str())
            .collect();
        for stale in old.iter().take(old.len().saturating_sub(1)) {
            store.delete(stale)?;
        }
        Ok(())
    }
}

/// The stored rows of the live images (those the checkpoint's ledger says were embedded
/// in the epoch of the file they sit in), keeping only keys for which `keep` is true.
/// `key_of` maps a stored path back to its key.
pub fn stored_rows(
    store: &dyn OutputStore,
    checkpoint: &Checkpoint,
    key_of: impl Fn(&str) -> Option<crate::record::ImageKey>,
    keep: impl Fn(&crate::record::ImageKey) -> bool,
) -> Result<Vec<(crate::record::ImageRow, crate::sink::parquet::StoredRow)>> {
    stored_rows_cached(store, checkpoint, key_of, keep, &mut StoredFiles::default())
}

/// Decoded embeddings files of committed epochs, by name. Such files never change (a
/// crashed run's files are those of uncommitted epochs), so a reader that follows a live
/// output (`serve`) reads each one once instead of the whole archive per epoch.
#[derive(Default)]
pub struct StoredFiles(std::collections::HashMap<String, Vec<crate::sink::parquet::StoredRow>>);

/// [`stored_rows`], reading only the files `cache` does not hold yet.
pub fn stored_rows_cached(
    store: &dyn OutputStore,
    checkpoint: &Checkpoint,
    key_of: impl Fn(&str) -> Option<crate::record::ImageKey>,
    keep: impl Fn(&crate::record::ImageKey) -> bool,
    cache: &mut StoredFiles,
) -> Result<Vec<(crate::record::ImageRow, crate::sink::parquet::StoredRow)>> {
    use crate::record::{Embedding, ImageRow, Label};
    use crate::sink::operator::epoch_of_file;
    let mut out = Vec::new();
    let names = store.list("embeddings/")?;
    cache.0.retain(|name, _| names.contains(name));
    for name in names {
        let Some(epoch) = epoch_of_file(&name) else {
            continue;
        };
        if epoch > checkpoint.epoch {
            continue;
        }
        if !cache.0.contains_key(&name) {
            let bytes = store
                .get(&name)?
                .with_context(|| format!("{name} vanished"))?;
            let rows = crate::sink::parquet::decode_rows(bytes)
                .with_context(|| format!("reading {name}"))?;
            cache.0.insert(name.clone(), rows);
        }
        for stored in cache.0[&name].iter().cloned() {
            let Some(key) = key_of(&stored.path) else {
                continue;
            };
            let live = checkpoint
                .ledger
                .get(&key)
                .is_some_and(|e| e.embedded && e.epoch == epoch);
            if live && keep(&key) {
                let embedding = Embedding::quantize(&stored.features)
                    .map_err(|e| anyhow::anyhow!("{name}: row {}: {e}", stored.path))?;
                let row = ImageRow {
                    key,
                    label: Label(stored.label.clone()),
                    embedding,
                };
                out.push((row, stored));
            }
        }
    }
    out.sort_by(|a, b| a.0.key.cmp(&b.0.key));
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

/// Every live image of a committed state, read back from the stored embeddings (keys
/// are the stored paths relative to the checkpoint's source), in key order.
pub fn live_rows(
    store: &dyn OutputStore,
    checkpoint: &Checkpoint,
) -> Result<Vec<(crate::record::ImageRow, crate::sink::parquet::StoredRow)>> {
    live_rows_cached(store, checkpoint, &mut StoredFiles::default())
}

/// [`live_rows`] through a cache of decoded files.
pub fn live_rows_cached(
    store: &dyn OutputStore,
    checkpoint: &Checkpoint,
    cache: &mut StoredFiles,
) -> Result<Vec<(crate::record::ImageRow, crate::sink::parquet::StoredRow)>> {
    let root = format!("{}/", checkpoint.source);
    stored_rows_cached(
        store,
        checkpoint,
        |p| p.strip_prefix(&root).map(|k| ImageKey(k.into())),
        |_| true,
        cache,
    )
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
