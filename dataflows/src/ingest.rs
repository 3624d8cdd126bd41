//! The ingest dataflow, on one screen: source → embed → statistics → sinks → commit.
//! Start reading here. Each worker runs [`run_worker`]; worker 0 lists the archive and
//! cuts epochs, every worker embeds the keys it owns, and worker 0 merges statistics and
//! commits a checkpoint per epoch.

use crate::config::PipelineConfig;
use crate::embed::operator::{embed, Outcome, RowUpdate};
use crate::embed::Embedder;
use crate::record::{Change, Epoch, ImageKey};
use crate::sink::{operator::parquet, OutputStore};
use crate::source::{Ledger, Source};
use crate::state::operator::{commit, CommitItem};
use crate::state::{discard_uncommitted, stored_rows, Checkpoint};
use crate::stats::operator::{models, moment_partials};
use anyhow::{Context, Result};
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::dataflow::operators::vec::Input;
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::dataflow::operators::{Concatenate, Inspect, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};
use timely::worker::Worker;

/// What one `run` is asked to do.
#[derive(Clone)]
pub struct RunOptions {
    /// Source location (a directory).
    pub source: String,
    /// Output location (a directory).
    pub output: String,
    /// Ingest what is there, commit, and stop (instead of tailing).
    pub once: bool,
    /// Set by Ctrl-C: finish the current epoch cleanly and stop.
    pub stop: Arc<AtomicBool>,
    /// Stage settings.
    pub pipeline: PipelineConfig,
}

/// Checks, before any worker starts, that the source and output are reachable with the
/// configured credentials and belong together, so misconfiguration fails with one clear
/// message instead of inside every worker.
pub fn preflight(options: &RunOptions) -> Result<()> {
    let source = crate::source::open(&options.source, &options.pipeline.s3)?;
    source.check()?;
    let store = crate::sink::open(&options.output, &options.pipeline.s3)?;
    if let Some(checkpoint) = Checkpoint::load(store.as_ref())? {
        anyhow::ensure!(
            checkpoint.source == source.location(),
            "output {} was built from source {}, not {}; use another --output",
            store.location(),
            checkpoint.source,
            source.location()
        );
    }
    Ok(())
}

/// Builds the dataflow on this worker and drives it until done.
pub fn run_worker(worker: &mut Worker, options: &RunOptions) -> Result<()> {
    let (index, peers) = (worker.index(), worker.peers());
    let config = &options.pipeline;
    let source: Arc<dyn Source> = Arc::from(crate::source::open(&options.source, &config.s3)?);
    let store: Arc<dyn OutputStore> = Arc::from(crate::sink::open(&options.output, &config.s3)?);
    let embedder = Embedder::load(&config.embed, &config.decode)?;
    let dim = embedder.dim()?;
    let checkpoint = resume(store.as_ref(), source.as_ref(), dim, index)?;
    let owned: HashMap<ImageKey, _> =
        restore_owned(store.as_ref(), source.as_ref(), &checkpoint, index, peers)?;

    let mut changes_in = InputHandleVec::<Epoch, Change>::new();
    let mut finish_in = InputHandleVec::<Epoch, ()>::new();
    let committed = ProbeHandle::new();
    let finished = Rc::new(Cell::new(false));

    worker.dataflow::<Epoch, _, _>(|scope| {
        // Change: new, rewritten and deleted objects, cut into epochs by worker 0.
        let changes = scope.input_from(&mut changes_in);
        // Outcome: rows (+1/-1) of the live collection, or error records, at key owners.
        let outcomes = embed(changes.clone(), source.clone(), embedder, owned);
        // (ImageRow, Epoch, diff): the differential collection of live images.
        let rows = outcomes.clone().flat_map(|o| match o {
            Outcome::Row(update) => Some(update),
            Outcome::Error(_) => None,
        });
        // Moments: one exact partial per worker and epoch.
        let partials = moment_partials(rows.clone(), dim);
        // Models: PCA + KMeans after each epoch, on worker 0.
        let models = models(
            partials,
            rows.clone(),
            checkpoint.models.clone(),
            config.pca.clone(),
            config.kmeans.clone(),
        );
        // usize: rows appended to this epoch's Parquet file.
        let written = parquet(rows.clone(), store.clone(), source.clone());
        // Epoch: committed epochs, on worker 0 (the commit point).
        let items = scope.concatenate(vec![
            changes.map(CommitItem::Change),
            outcomes.flat_map(|o| match o {
                Outcome::Error(e) => Some(CommitItem::Error(e)),
                Outcome::Row(_) => None,
            }),
            rows.map(|(row, _, diff): RowUpdate| CommitItem::Label(row.label.0, diff)),
            models.map(|m| CommitItem::Models(Box::new(m))),
            written.map(CommitItem::Written),
        ]);
        commit(items, store.clone(), checkpoint.clone()).probe_with(&committed);
        // (): the stop signal, seen by every worker.
        let finished = finished.clone();
        scope
            .input_from(&mut finish_in)
            .broadcast()
            .inspect(move |_| finished.set(true));
    });

    let mut epoch = checkpoint.epoch + 1;
    changes_in.advance_to(epoch);
    finish_in.advance_to(epoch);
    let mut lister = (index == 0).then(|| Lister::new(checkpoint.source_ledger(), options));
    let poll = Duration::from_millis(config.source.poll_interval_ms);
    loop {
        let mut idle = false;
        if let Some(lister) = lister.as_mut() {
            let batch = lister.next_epoch(source.as_ref(), config.source.epoch_size);
            idle = batch.is_empty();
            for change in batch {
                changes_in.send(change);
            }
            if lister.done(options) {
                finish_in.send(());
            }
        }
        epoch += 1;
        changes_in.advance_to(epoch);
        finish_in.advance_to(epoch);
        // At most two epochs in flight: the next one embeds while this one commits.
        while committed.less_than(&(epoch - 1)) {
            worker.step_or_park(Some(Duration::from_millis(100)));
        }
        if finished.get() {
            break;
        }
        if idle && !options.once {
            let until = Instant::now() + poll;
            while Instant::now() < until && !options.stop.load(Ordering::Relaxed) {
                worker.step_or_park(Some(
                    until
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(100)),
                ));
            }
        }
    }
    drop(changes_in);
    drop(finish_in);
    while worker.step_or_park(Some(Duration::from_millis(100))) {}
    Ok(())
}

/// Loads the last checkpoint (or starts empty) and checks it belongs to this source and
/// model. Worker 0 also discards a crashed run's uncommitted files.
fn resume(
    store: &dyn OutputStore,
    source: &dyn Source,
    dim: usize,
    index: usize,
) -> Result<Checkpoint> {
    let Some(checkpoint) = Checkpoint::load(store)? else {
        return Ok(Checkpoint::empty(source.location(), dim));
    };
    anyhow::ensure!(
        checkpoint.source == source.location(),
        "output {} was built from source {}, not {}; use another --output",
        store.location(),
        checkpoint.source,
        source.location()
    );
    anyhow::ensure!(
        checkpoint.models.moments.dim == dim,
        "output {} holds {}-dimensional embeddings but the model gives {dim}",
        store.location(),
        checkpoint.models.moments.dim
    );
    if index == 0 {
        let removed = discard_uncommitted(store, checkpoint.epoch)?;
        tracing::info!(
            stage = "state",
            epoch = checkpoint.epoch,
            images = checkpoint.images(),
            discarded_files = removed,
            "Resuming from checkpoint."
        );
    }
    Ok(checkpoint)
}

/// The rows this worker owns, restored from stored embeddings (no model runs), so later
/// deletions retract exactly what was added.
fn restore_owned(
    store: &dyn OutputStore,
    source: &dyn Source,
    checkpoint: &Checkpoint,
    index: usize,
    peers: usize,
) -> Result<HashMap<ImageKey, crate::record::ImageRow>> {
    if checkpoint.epoch == 0 {
        return Ok(HashMap::new());
    }
    let rows = stored_rows(
        store,
        checkpoint,
        |p| source.key_of(p),
        |k| k.owner(peers) == index,
    )
    .context("restoring stored embeddings")?;
    Ok(rows
        .into_iter()
        .map(|(row, _)| (row.key.clone(), row))
        .collect())
}

/// Worker 0's view of the archive: lists it, diffs against the ledger, and hands out
/// the changes an epoch at a time. In `--once` mode it lists once; tailing, it lists
/// again whenever its queue is empty.
struct Lister {
    ledger: Ledger,
    queue: VecDeque<Change>,
    once: bool,
    listed: bool,
}

impl Lister {
    fn new(ledger: Ledger, options: &RunOptions) -> Self {
        Lister {
            ledger,
            queue: VecDeque::new(),
            once: options.once,
            listed: false,
        }
    }

    fn next_epoch(&mut self, source: &dyn Source, epoch_size: usize) -> Vec<Change> {
        if self.queue.is_empty() && !(self.once && self.listed) {
            match source.list() {
                Ok(listing) => {
                    let changes = self.ledger.diff(&listing);
                    if !changes.is_empty() {
                        tracing::info!(
                            stage = "source",
                            changes = changes.len(),
                            objects = listing.len(),
                            "Archive listed."
                        );
                    }
                    self.queue.extend(changes);
                    self.listed = true;
                }
                // A failed listing is retried at the next poll; nothing is lost.
                Err(e) => {
                    tracing::error!(stage = "source", error = %format!("{e:#}"), "Listing failed; retrying.")
                }
            }
        }
        let n = epoch_size.min(self.queue.len());
        self.queue.drain(..n).collect()
    }

    fn done(&self, options: &RunOptions) -> bool {
        options.stop.load(Ordering::Relaxed) || (self.once && self.listed && self.queue.is_empty())
    }
}
