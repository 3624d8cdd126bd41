//! The ingest dataflow, on one screen: source → embed → statistics → sinks → commit.
//! Start reading here. Each worker runs [`run_worker`]; worker 0 lists the archive and
//! cuts epochs, every worker embeds the keys it owns, and worker 0 merges statistics and
//! commits a checkpoint per epoch.

use crate::config::PipelineConfig;
use crate::embed::operator::{embed, Outcome, RowUpdate};
use crate::embed::{EmbedConfig, Embedder};
use crate::progress::Progress;
use crate::record::{Change, Epoch, ImageKey};
use crate::sink::{operator::parquet, OutputStore};
use crate::source::{Ledger, ListedObject, Source};
use crate::state::operator::{commit, CommitItem};
use crate::state::{discard_uncommitted, stored_rows, Checkpoint};
use crate::stats::operator::{models, moment_partials};
use anyhow::{Context, Result};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::dataflow::operators::vec::Input;
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::dataflow::operators::{Concatenate, Exchange, Inspect, Probe};
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
    /// True when the cluster is this one process (progress can count live).
    pub single_process: bool,
}

/// Checks, before any worker starts, that the source and output are reachable with the
/// configured credentials and belong together, so misconfiguration fails with one clear
/// message instead of inside every worker.
pub fn preflight(options: &RunOptions) -> Result<()> {
    let source = crate::source::open(&options.source, &options.pipeline.s3)?;
    source.check()?;
    let store = crate::sink::open(&options.output, &options.pipeline.s3)?;
    match Checkpoint::load(store.as_ref())? {
        Some(checkpoint) => same_source(&checkpoint, source.as_ref(), store.as_ref()),
        None => Ok(()),
    }
}

/// An output belongs to the source it was built from.
fn same_source(
    checkpoint: &Checkpoint,
    source: &dyn Source,
    store: &dyn OutputStore,
) -> Result<()> {
    anyhow::ensure!(
        checkpoint.source == source.location(),
        "output {} was built from source {}, not {}; use another --output",
        store.location(),
        checkpoint.source,
        source.location()
    );
    Ok(())
}

/// Builds the dataflow on this worker and drives it until done.
pub fn run_worker(worker: &mut Worker, options: &RunOptions) -> Result<()> {
    let (index, peers) = (worker.index(), worker.peers());
    let config = &options.pipeline;
    let source: Arc<dyn Source> = Arc::from(crate::source::open(&options.source, &config.s3)?);
    let store: Arc<dyn OutputStore> = Arc::from(crate::sink::open(&options.output, &config.s3)?);
    let mut embedder = Embedder::load(&config.embed, &config.decode)?;
    let dim = embedder.dim()?;
    let checkpoint = resume(
        store.as_ref(),
        source.as_ref(),
        dim,
        embedder.config(),
        index,
    )?;
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

    // Listing rounds: every worker lists the label folders it owns; the listings meet at
    // worker 0, which diffs them against the ledger and cuts the epochs (so epochs do not
    // depend on the worker count).
    let mut listed_in = InputHandleVec::<u64, Listed>::new();
    let listed = ProbeHandle::new();
    let gathered = Rc::new(RefCell::new(Vec::new()));
    worker.dataflow::<u64, _, _>(|scope| {
        let sink = gathered.clone();
        scope
            .input_from(&mut listed_in)
            .exchange(|_| 0)
            .inspect(move |l: &Listed| sink.borrow_mut().push(l.clone()))
            .probe_with(&listed);
    });

    let mut epoch = checkpoint.epoch + 1;
    changes_in.advance_to(epoch);
    finish_in.advance_to(epoch);
    let mut lister = (index == 0).then(|| Lister::new(checkpoint.source_ledger(), options));
    let mut progress = (index == 0).then(|| Progress::new(options.single_process));
    let poll = Duration::from_millis(config.source.poll_interval_ms);
    let mut round = 0u64;
    loop {
        // 1. A listing round (every round when tailing, the first only with --once).
        let due = !options.once || round == 0;
        if due {
            match source.list_share(index, peers) {
                Ok(objects) => objects
                    .into_iter()
                    .for_each(|o| listed_in.send(Listed::Object(o))),
                Err(e) => {
                    tracing::error!(stage = "source", error = %format!("{e:#}"), "Listing failed; retrying next round.");
                    listed_in.send(Listed::Failed);
                }
            }
        }
        round += 1;
        listed_in.advance_to(round);
        while listed.less_than(&round) {
            worker.step_or_park(Some(Duration::from_millis(100)));
        }
        let listing = gathered.borrow_mut().drain(..).collect::<Vec<_>>();
        // 2. Worker 0 cuts the next epoch and says when to stop.
        if let Some(lister) = lister.as_mut() {
            if due {
                lister.offer(listing);
            }
            let changes = lister.next_epoch(config.source.epoch_size);
            if let Some(progress) = progress.as_mut() {
                progress.handed(epoch, changes.len(), lister.listed_at);
            }
            for change in changes {
                changes_in.send(change);
            }
            if lister.done(options) {
                finish_in.send(());
            }
        }
        epoch += 1;
        changes_in.advance_to(epoch);
        finish_in.advance_to(epoch);
        // 3. At most two epochs in flight: the next one embeds while this one commits.
        while committed.less_than(&(epoch - 1)) {
            worker.step_or_park(Some(Duration::from_millis(100)));
            if let Some(progress) = progress.as_ref() {
                progress.tick();
            }
        }
        if let Some(progress) = progress.as_mut() {
            progress.committed_below(committed_frontier(&committed));
        }
        if finished.get() || committed.done() {
            break;
        }
        // 4. Tailing: wait for the next poll, still working on what is in flight.
        if !options.once {
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
    drop(listed_in);
    while worker.step_or_park(Some(Duration::from_millis(100))) {}
    if let Some(progress) = progress.as_mut() {
        progress.committed_below(Epoch::MAX);
        progress.finish();
        let timings: Vec<String> = crate::metrics::metrics()
            .stage_summary()
            .iter()
            .map(|(stage, s)| format!("{stage} {s:.2}"))
            .collect();
        tracing::info!(stage = "progress", seconds_per_stage = %timings.join(", "), "Done (stage times summed over this process's workers).");
    }
    Ok(())
}

/// The first epoch not yet committed everywhere (MAX once the dataflow is done).
fn committed_frontier(committed: &ProbeHandle<Epoch>) -> Epoch {
    committed.with_frontier(|f| f.iter().min().copied().unwrap_or(Epoch::MAX))
}

/// One worker's contribution to a listing round.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
enum Listed {
    /// An object in a folder this worker owns.
    Object(ListedObject),
    /// This worker's listing failed: the round must not be diffed (it would delete).
    Failed,
}

/// Loads the last checkpoint (or starts empty) and checks it belongs to this source and
/// model. Worker 0 also discards a crashed run's uncommitted files.
fn resume(
    store: &dyn OutputStore,
    source: &dyn Source,
    dim: usize,
    embed: &EmbedConfig,
    index: usize,
) -> Result<Checkpoint> {
    let Some(checkpoint) = Checkpoint::load(store)? else {
        return Ok(Checkpoint::empty(source.location(), dim, embed.clone()));
    };
    let was = &checkpoint.embed;
    anyhow::ensure!(
        was.input_size == embed.input_size && was.mean == embed.mean && was.std == embed.std,
        "output {} holds embeddings made at input size {} (mean {:?}, std {:?}), but [embed] now \
         says {} (mean {:?}, std {:?}); use another --output or the same [embed] settings",
        store.location(),
        was.input_size,
        was.mean,
        was.std,
        embed.input_size,
        embed.mean,
        embed.std
    );
    same_source(&checkpoint, source, store)?;
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

/// Worker 0's view of the archive: diffs complete listings against the ledger and hands
/// out the changes an epoch at a time. With `--once` it takes one listing; tailing, it
/// takes a new one whenever its queue is empty.
struct Lister {
    ledger: Ledger,
    /// When the listing that produced the queued changes was taken.
    listed_at: Instant,
    queue: VecDeque<Change>,
    once: bool,
    listed: bool,
}

impl Lister {
    fn new(ledger: Ledger, options: &RunOptions) -> Self {
        Lister {
            ledger,
            listed_at: Instant::now(),
            queue: VecDeque::new(),
            once: options.once,
            listed: false,
        }
    }

    /// Takes a round's listings, unless one failed or the queue still holds work.
    fn offer(&mut self, round: Vec<Listed>) {
        if !self.queue.is_empty() || (self.once && self.listed) {
            return;
        }
        let mut listing = Vec::with_capacity(round.len());
        for item in round {
            match item {
                Listed::Object(o) => listing.push(o),
                Listed::Failed => return,
            }
        }
        listing.sort();
        self.listed_at = Instant::now();
        let mut changes = self.ledger.diff(&listing);
        // Epochs are cut in hash order, not key order: key order would put whole label
        // folders in one epoch, so the first epochs (where KMeans seeds) would see only
        // the first labels. A stable hash keeps epochs the same for any -w/-n.
        changes.sort_by_cached_key(|c| {
            (
                xxhash_rust::xxh3::xxh3_64(c.key.0.as_bytes()),
                c.key.clone(),
            )
        });
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

    fn next_epoch(&mut self, epoch_size: usize) -> Vec<Change> {
        let n = epoch_size.min(self.queue.len());
        self.queue.drain(..n).collect()
    }

    fn done(&self, options: &RunOptions) -> bool {
        options.stop.load(Ordering::Relaxed) || (self.once && self.listed && self.queue.is_empty())
    }
}
