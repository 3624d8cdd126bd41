//! The ingest dataflow, on one screen: source → embed → statistics → sinks → commit.
//! Start reading here. Each worker runs [`run_worker`]: every worker lists the folders it
//! owns and diffs the keys it owns against its part of the ledger (a differential
//! arrangement); worker 0 cuts the changes into epochs; every worker embeds the keys it
//! owns; per-label statistics are a differential collection; worker 0 merges the moments
//! and commits each epoch.

use crate::config::PipelineConfig;
use crate::embed::operator::{embed, Outcome};
use crate::embed::{EmbedConfig, Embedder};
use crate::progress::Progress;
use crate::record::{Change, Epoch};
use crate::sink::{operator::parquet, OutputStore};
use crate::source::{KeyRange, Ledger, ListedObject, Source};
use crate::state::operator::{commit, CommitItem};
use crate::state::{discard_uncommitted, Archive, Checkpoint};
use crate::stats::operator::{label_stats, models, moment_partials};
use crate::stats::{Backlog, LabelDiff};
use anyhow::{Context, Result};
use std::cell::{Cell, RefCell};
use std::collections::{HashSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Input;
use timely::dataflow::operators::vec::{Broadcast, Map, Partition};
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
    /// Worker threads in this process (they share its cores).
    pub workers: usize,
    /// The liveness watch over the other processes (multi-process runs).
    pub liveness: Option<Arc<crate::liveness::Watch>>,
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
    let mut embedder = Embedder::load_for_stage(
        &config.embed,
        &config.decode,
        &config.inference,
        options.workers,
    )?;
    let dim = embedder.dim()?;
    if index == 0 {
        tracing::info!(
            stage = "embed",
            engine = ?embedder.backend(),
            model = %embedder.config().model.display(),
            input_size = embedder.preprocess().size,
            batch = embedder.batch(),
            threads = config.inference.threads_per_worker(options.workers),
            shared_session = config.inference.shared_session,
            "Model loaded."
        );
    }
    let checkpoint = resume(
        store.as_ref(),
        source.as_ref(),
        dim,
        embedder.config(),
        index,
    )?;
    // This worker's part of the ledger; worker 0 also keeps the error records.
    let archive = Archive::load(store.as_ref(), &checkpoint, |k| k.owner(peers) == index)
        .context("restoring the ledger")?;
    // Where this worker's committed rows are, for the embed stage.
    let stored: crate::embed::operator::Stored = archive
        .ledger
        .iter()
        .filter(|(_, e)| e.embedded)
        .map(|(k, e)| (k.digest(), e.location))
        .collect();
    // Only worker 0's commit folds error records in.
    let errors = if index == 0 {
        archive.errors
    } else {
        Default::default()
    };
    tracing::debug!(
        stage = "state",
        worker = index,
        keys = archive.ledger.len(),
        rows = stored.len(),
        "Ledger shard restored."
    );

    let mut changes_in = InputHandleVec::<Epoch, Change>::new();
    let mut finish_in = InputHandleVec::<Epoch, ()>::new();
    let mut plans_in = InputHandleVec::<Epoch, Backlog>::new();
    let mut restored_in = InputHandleVec::<Epoch, (String, Epoch, LabelDiff)>::new();
    let committed = ProbeHandle::new();
    let finished = Rc::new(Cell::new(false));

    worker.dataflow::<Epoch, _, _>(|scope| {
        // Change: new, rewritten and deleted objects, cut into epochs by worker 0.
        let changes = scope.input_from(&mut changes_in);
        // Outcome: rows (+1/-1) of the live collection, or error records, at key owners.
        let outcomes = embed(
            changes.clone(),
            source.clone(),
            store.clone(),
            embedder,
            stored,
        );
        // Rows and error records part ways without a copy of every embedding.
        let mut parts = outcomes.partition(2, |o| match o {
            Outcome::Row(_) => (0, o),
            Outcome::Error(_) => (1, o),
        });
        let rejected = parts.pop().expect("two parts");
        // (ImageRow, Epoch, diff): the differential collection of live images.
        let rows = parts.pop().expect("two parts").flat_map(|o| match o {
            Outcome::Row(update) => Some(update),
            Outcome::Error(_) => None,
        });
        // Moments: one exact partial per worker and epoch.
        let partials = moment_partials(rows.clone(), dim);
        // Models: PCA + KMeans after each epoch, on worker 0, refitting the PCA as the
        // epoch's backlog (worker 0's cut) says.
        let models = models(
            partials,
            rows.clone(),
            scope.input_from(&mut plans_in),
            checkpoint.models.clone(),
            config.pca.clone(),
            config.kmeans.clone(),
        );
        // ((label, (n, Σx)), Epoch, ±1): per-label statistics, differential's count_total
        // over the live rows (plus the restored state), at each label's worker.
        let labels = label_stats(rows.clone(), scope.input_from(&mut restored_in));
        // usize: rows appended to this epoch's Parquet file.
        let written = parquet(rows.clone(), store.clone(), source.clone());
        // Epoch: committed epochs, on worker 0 (the commit point).
        // (Epoch, CommitItem): the epoch's outcomes, gathered by the commit. Only the
        // differential output's records carry a time other than their message's.
        let at = |item: CommitItem| (0, item);
        let items = scope.concatenate(vec![
            changes.map(move |c| at(CommitItem::Change(c))),
            rejected.flat_map(move |o| match o {
                Outcome::Error(e) => Some(at(CommitItem::Error(e))),
                Outcome::Row(_) => None,
            }),
            labels.map(|((label, stats), t, diff)| {
                // A retraction's old statistics are not needed to drop them: only
                // the label crosses to the commit (10 KB less per changed label).
                (t, CommitItem::Label(label, (diff > 0).then_some(stats)))
            }),
            models.map(move |m| at(CommitItem::Models(Box::new(m)))),
            written.map(move |w| at(CommitItem::Written(w))),
        ]);
        commit(items, store.clone(), checkpoint.clone(), errors).probe_with(&committed);
        // (): the stop signal, seen by every worker.
        let finished = finished.clone();
        scope
            .input_from(&mut finish_in)
            .broadcast()
            .inspect(move |_| finished.set(true));
    });

    // Listing rounds, three steps each (see `Round`): worker 0 says whether a listing is
    // due; every worker lists the label folders it owns and sends each object to its
    // key's owner, which diffs it against its arranged ledger; the owners send their
    // changes to worker 0, which cuts them into epochs in a stable order (so epochs do not
    // depend on the worker count).
    let heartbeat = options
        .liveness
        .as_ref()
        .map(|watch| crate::liveness::Heartbeat::new(worker, watch));
    let mut rounds = Rounds::new(worker, heartbeat);
    // The versions enter the arranged ledger at the first round.
    rounds
        .ledger
        .restore(archive.ledger.iter().map(|(k, e)| (k, e.version.as_str())));
    drop(archive.ledger);

    let mut epoch = checkpoint.epoch + 1;
    changes_in.advance_to(epoch);
    finish_in.advance_to(epoch);
    plans_in.advance_to(epoch);
    restored_in.advance_to(epoch);
    if index == 0 {
        // The restored per-label statistics enter the differential collection once.
        for (label, stats) in &checkpoint.labels {
            restored_in.send((label.clone(), epoch, stats.to_diff()));
        }
    }
    drop(restored_in);
    // The models operator and the commit hold their own copies: this one's moments, PCA
    // and per-label statistics (~25 MB at d = 1280 and 500 labels) would sit unused for
    // the whole run.
    drop(checkpoint);
    let mut cutter =
        (index == 0).then(|| EpochCutter::new(options.once, config.source.listing_slice));
    let mut progress = (index == 0).then(|| Progress::new(options.single_process));
    let poll = Duration::from_millis(config.source.poll_interval_ms);
    // This worker's folders as last listed, and the listing rounds so far.
    let mut stamps = crate::source::FolderStamps::new();
    let mut listings: u64 = 0;
    loop {
        // 1. Listing rounds, as worker 0 decides (see `EpochCutter::listing`): at start, one
        // slice of key space per round until an epoch's worth is queued; tailing, one
        // round whenever the queue is empty. Stopping: finish what is queued, list nothing
        // new.
        loop {
            let stopping = options.stop.load(Ordering::Relaxed);
            let plan = cutter
                .as_ref()
                .map(|c| c.listing(config.source.epoch_size, stopping));
            let Some(listing) = rounds.broadcast(worker, plan) else {
                break;
            };
            let listed = match listing {
                Listing::Slice(range) => source
                    .list_share_range(index, peers, range)
                    .map(|objects| (objects, Vec::new())),
                Listing::Changed => {
                    // Every worker counts the same rounds, so all agree on which are full.
                    let round = crate::source::ListingRound {
                        number: listings,
                        every: config.source.full_listing_every,
                    };
                    listings += 1;
                    source.list_share_changed(index, peers, &mut stamps, round)
                }
            };
            let listed = match listed {
                Ok(objects) => Some(objects),
                Err(e) => {
                    tracing::error!(stage = "source", error = %format!("{e:#}"), "Listing failed; retrying next round.");
                    stamps.clear();
                    None
                }
            };
            // A round with a failed listing is not diffed anywhere: it would delete.
            let Some((owned, unchanged)) = rounds.to_owners(worker, listed) else {
                break;
            };
            let changes = rounds
                .ledger
                .diff_except(&owned, &unchanged, listing.range());
            drop(owned);
            let gathered = rounds.to_worker_zero(worker, changes);
            if let Some(cutter) = cutter.as_mut() {
                cutter.offer(gathered, listing);
            }
            if listing == Listing::Changed {
                break;
            }
        }
        // 2. Worker 0 cuts the next epoch and says when to stop.
        if let Some(cutter) = cutter.as_mut() {
            let changes = cutter.next_epoch(config.source.epoch_size);
            if let Some(progress) = progress.as_mut() {
                progress.handed(epoch, changes.len(), cutter.listed_at);
            }
            for change in changes {
                changes_in.send(change);
            }
            let done = cutter.done(options);
            plans_in.send(cutter.backlog(done));
            if done {
                finish_in.send(());
            }
        }
        epoch += 1;
        changes_in.advance_to(epoch);
        finish_in.advance_to(epoch);
        plans_in.advance_to(epoch);
        // 3. At most two epochs in flight: the next one embeds while this one commits.
        while committed.less_than(&(epoch - 1)) {
            rounds.step(worker, Duration::from_millis(100));
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
                let wait = until.saturating_duration_since(Instant::now());
                rounds.step(worker, wait.min(Duration::from_millis(100)));
            }
        }
    }
    drop(changes_in);
    drop(finish_in);
    drop(plans_in);
    if let Some(watch) = &options.liveness {
        watch.stop();
    }
    drop(rounds);
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

/// What a listing round lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Listing {
    /// Every folder, keeping the keys in one slice of key space: the start-up listing,
    /// slice by slice.
    Slice(KeyRange),
    /// Everything, except folders that need no listing this round (tailing).
    Changed,
}

impl Listing {
    /// The slice of key space the round covers.
    fn range(&self) -> KeyRange {
        match self {
            Listing::Slice(range) => *range,
            Listing::Changed => KeyRange::ALL,
        }
    }
}

/// What crosses workers in a listing round.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
enum Round {
    /// Worker 0 to all: what this round lists, if anything.
    Due(Option<Listing>),
    /// A lister to the key's owner: an object in a folder the lister owns.
    Object(ListedObject),
    /// A lister to all: its listing failed, so nobody diffs this round.
    Failed,
    /// A lister to all: a folder it skipped as unchanged (its keys stand as listed).
    Unchanged(String),
    /// An owner to worker 0: a change its diff found.
    Change(Change),
}

/// The small dataflow that carries listing rounds: one timely round per step, each
/// waited for on a probe, with messages routed to all workers, to key owners, or to
/// worker 0.
///
/// Messages carry their round: a faster worker may already send the next round's
/// messages while this one still waits for the current round to complete.
struct Rounds {
    to_all: InputHandleVec<u64, (u64, Round)>,
    to_owner: InputHandleVec<u64, (u64, Round)>,
    to_zero: InputHandleVec<u64, (u64, Round)>,
    probe: ProbeHandle<u64>,
    received: Rc<RefCell<Vec<(u64, Round)>>>,
    round: u64,
    heartbeat: Option<crate::liveness::Heartbeat>,
    /// This worker's part of the ledger, arranged in this dataflow (its updates are at
    /// the round that diffed them).
    ledger: Ledger,
}

impl Rounds {
    fn new(worker: &mut Worker, heartbeat: Option<crate::liveness::Heartbeat>) -> Self {
        let (mut to_all, mut to_owner, mut to_zero) = (
            InputHandleVec::new(),
            InputHandleVec::new(),
            InputHandleVec::new(),
        );
        let probe = ProbeHandle::new();
        let received = Rc::new(RefCell::new(Vec::new()));
        let peers = worker.peers() as u64;
        let ledger = worker.dataflow::<u64, _, _>(|scope| {
            let sink = received.clone();
            let all = scope.input_from(&mut to_all).broadcast();
            let owners = scope
                .input_from(&mut to_owner)
                .exchange(move |(_, r): &(u64, Round)| match r {
                    Round::Object(o) => o.key.bucket() % peers,
                    _ => 0,
                });
            let zero = scope.input_from(&mut to_zero).exchange(|_| 0);
            // Received messages are moved out, not cloned (a first listing is the whole
            // archive); the probe sees a round once they are all taken.
            scope
                .concatenate(vec![all, owners, zero])
                .unary::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
                    Pipeline,
                    "Received",
                    move |_, _| {
                        move |input, _| {
                            input.for_each(|_, data| sink.borrow_mut().append(data));
                        }
                    },
                )
                .probe_with(&probe);
            Ledger::new(scope, &probe)
        });
        Rounds {
            to_all,
            to_owner,
            to_zero,
            probe,
            received,
            round: 0,
            heartbeat,
            ledger,
        }
    }

    /// One step of this worker (the heartbeat ticks on the way).
    fn step(&mut self, worker: &mut Worker, wait: Duration) {
        if let Some(heartbeat) = self.heartbeat.as_mut() {
            heartbeat.beat(worker);
        }
        worker.step_or_park(Some(wait));
    }

    /// Ends a round and returns what this worker received in it.
    fn finish(&mut self, worker: &mut Worker) -> Vec<Round> {
        self.round += 1;
        for input in [&mut self.to_all, &mut self.to_owner, &mut self.to_zero] {
            input.advance_to(self.round);
        }
        self.ledger.advance_to(self.round);
        while self.probe.less_than(&self.round) {
            self.step(worker, Duration::from_millis(100));
        }
        let done = self.round - 1;
        let (now, later) = std::mem::take(&mut *self.received.borrow_mut())
            .into_iter()
            .partition(|(r, _)| *r == done);
        *self.received.borrow_mut() = later;
        now.into_iter().map(|(_, r)| r).collect()
    }

    /// Worker 0's decision (`Some` on worker 0 only), seen by every worker.
    fn broadcast(
        &mut self,
        worker: &mut Worker,
        decision: Option<Option<Listing>>,
    ) -> Option<Listing> {
        if let Some(due) = decision {
            self.to_all.send((self.round, Round::Due(due)));
        }
        self.finish(worker).iter().find_map(|r| match r {
            Round::Due(listing) => *listing,
            _ => None,
        })
    }

    /// Sends this worker's listing (None: it failed) to the key owners; returns the
    /// objects this worker owns, or None when any worker's listing failed.
    fn to_owners(
        &mut self,
        worker: &mut Worker,
        listing: Option<(Vec<ListedObject>, Vec<String>)>,
    ) -> Option<(Vec<ListedObject>, HashSet<String>)> {
        match listing {
            Some((objects, unchanged)) => {
                objects
                    .into_iter()
                    .for_each(|o| self.to_owner.send((self.round, Round::Object(o))));
                unchanged
                    .into_iter()
                    .for_each(|f| self.to_all.send((self.round, Round::Unchanged(f))));
            }
            None => self.to_all.send((self.round, Round::Failed)),
        }
        let (mut owned, mut unchanged) = (Vec::new(), HashSet::new());
        for r in self.finish(worker) {
            match r {
                Round::Object(o) => owned.push(o),
                Round::Unchanged(f) => {
                    unchanged.insert(f);
                }
                Round::Failed => return None,
                _ => {}
            }
        }
        owned.sort();
        Some((owned, unchanged))
    }

    /// Sends this worker's changes to worker 0; returns what worker 0 gathered (empty
    /// elsewhere).
    fn to_worker_zero(&mut self, worker: &mut Worker, changes: Vec<Change>) -> Vec<Change> {
        changes
            .into_iter()
            .for_each(|c| self.to_zero.send((self.round, Round::Change(c))));
        self.finish(worker)
            .into_iter()
            .filter_map(|r| match r {
                Round::Change(c) => Some(c),
                _ => None,
            })
            .collect()
    }
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
    if index == 0 {
        // Nothing in the cluster writes before worker 0 cuts the first epoch, so temp
        // files now are a killed run's half-written objects.
        let removed = store
            .remove_stale_temp_files()
            .with_context(|| format!("removing stale temp files in {}", store.location()))?;
        if removed > 0 {
            tracing::info!(
                stage = "state",
                removed,
                "Removed a killed run's temp files."
            );
        }
    }
    // Only worker 0 merges models and commits: elsewhere the fixed-size statistics (the
    // moments alone are 13 MB at d = 1280, held twice: the models seed and the commit's
    // checkpoint) would sit unused.
    let loaded = if index == 0 {
        Checkpoint::load(store)?
    } else {
        Checkpoint::load_without_statistics(store)?
    };
    let Some(checkpoint) = loaded else {
        let empty = Checkpoint::empty(source.location(), dim, embed.clone());
        return Ok(if index == 0 {
            empty
        } else {
            empty.without_statistics()
        });
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

/// Worker 0's queue of changes: takes each accepted round's changes and hands them out
/// an epoch at a time, and says when to list.
///
/// At start it lists the archive one slice of key space per round (a hash range), the
/// next slice whenever less than an epoch is queued, so a first listing of a large archive
/// is never held whole (the listing, the diff's changes and this queue each held about
/// 150 B per object: 100 MB at 250k images). Slices ascend and epochs are cut in hash
/// order, so the epochs are those of one whole listing. With `--once` that is the only
/// listing; tailing, it then lists (with the source's skipping of unchanged folders)
/// whenever its queue is empty.
struct EpochCutter {
    /// When the listing that produced the queued changes was taken.
    listed_at: Instant,
    queue: VecDeque<Change>,
    once: bool,
    /// The start-up listing's next slice; None once it has covered key space.
    catch_up: Option<CatchUp>,
    /// Changes the start-up listing found so far, and its rounds.
    found: (usize, usize),
}

/// Where the start-up listing stands.
#[derive(Clone, Copy, Debug)]
struct CatchUp {
    /// The next slice's first hash.
    start: u64,
    /// The next slice's width in hash space (adapted to `target` after each slice).
    width: u64,
    /// Objects a slice should hold (`[source] listing_slice`; 0: one slice).
    target: usize,
}

impl CatchUp {
    fn new(target: usize) -> Self {
        // A sixteenth of key space first; later slices are sized by what it found.
        let width = if target == 0 { u64::MAX } else { 1 << 60 };
        CatchUp {
            start: 0,
            width,
            target,
        }
    }

    fn range(&self) -> KeyRange {
        KeyRange {
            start: self.start,
            end: self
                .start
                .checked_add(self.width)
                .filter(|_| self.width < u64::MAX),
        }
    }

    /// The next slice after `range` held `found` changes; None when it was the last.
    fn after(self, range: KeyRange, found: usize) -> Option<CatchUp> {
        let start = range.end?;
        // Aim the next slice at `target` changes, growing at most 16x a round (a restart
        // with nothing new finds none, and finishes in two rounds).
        let width = self.width as u128;
        let aimed = width * self.target as u128 / found.max(1) as u128;
        let width = aimed.clamp(1, width * 16).min(u64::MAX as u128) as u64;
        Some(CatchUp {
            start,
            width,
            ..self
        })
    }
}

impl EpochCutter {
    fn new(once: bool, listing_slice: usize) -> Self {
        EpochCutter {
            listed_at: Instant::now(),
            queue: VecDeque::new(),
            once,
            catch_up: Some(CatchUp::new(listing_slice)),
            found: (0, 0),
        }
    }

    /// What the next round should list, if anything.
    fn listing(&self, epoch_size: usize, stopping: bool) -> Option<Listing> {
        if stopping {
            return None;
        }
        match self.catch_up {
            Some(c) => (self.queue.len() < epoch_size).then(|| Listing::Slice(c.range())),
            None => (!self.once && self.queue.is_empty()).then_some(Listing::Changed),
        }
    }

    /// Takes a complete round's changes.
    fn offer(&mut self, mut changes: Vec<Change>, listing: Listing) {
        self.listed_at = Instant::now();
        // Epochs are cut in hash order, not key order: key order would put whole label
        // folders in one epoch, so the first epochs (where KMeans seeds) would see only
        // the first labels. A stable hash keeps epochs the same for any -w/-n.
        changes.sort_by(|a, b| (a.key.bucket_hash(), &a.key).cmp(&(b.key.bucket_hash(), &b.key)));
        match (listing, self.catch_up) {
            (Listing::Slice(range), Some(catch_up)) => {
                self.found.0 += changes.len();
                self.found.1 += 1;
                tracing::debug!(stage = "source", changes = changes.len(), start = range.start, end = ?range.end, "Archive slice listed.");
                self.catch_up = catch_up.after(range, changes.len());
                if self.catch_up.is_none() {
                    tracing::info!(
                        stage = "source",
                        changes = self.found.0,
                        slices = self.found.1,
                        "Archive listed."
                    );
                }
            }
            _ if !changes.is_empty() => {
                tracing::info!(stage = "source", changes = changes.len(), "Archive listed.");
            }
            _ => {}
        }
        self.queue.extend(changes);
    }

    fn next_epoch(&mut self, epoch_size: usize) -> Vec<Change> {
        let n = epoch_size.min(self.queue.len());
        self.queue.drain(..n).collect()
    }

    /// The backlog behind the epoch just cut: changes still queued, or start-up slices
    /// still to list (so a sliced listing gives the same backlogs as a whole one). The
    /// run's last epoch clears it by definition; an epoch that clears it with no rows
    /// still gets a deferred refit (see [`crate::stats::operator::models`]).
    fn backlog(&self, done: bool) -> Backlog {
        if !done && (!self.queue.is_empty() || self.catch_up.is_some()) {
            Backlog::Queued
        } else {
            Backlog::Clear
        }
    }

    fn done(&self, options: &RunOptions) -> bool {
        options.stop.load(Ordering::Relaxed)
            || (self.once && self.catch_up.is_none() && self.queue.is_empty())
    }
}
