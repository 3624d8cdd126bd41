//! The statistics stage as timely and differential operators: per-worker moment
//! partials per epoch, per-label statistics (a differential `count_total`), and the
//! worker-0 operator that merges them with the epoch's points into new models once
//! the epoch is complete everywhere.

use super::moments::{Partial, SPARSE_ROWS};
use super::{
    kmeans::EpochPoint, Backlog, KMeansConfig, LabelDiff, LabelStats, Models, MomentsAccumulator,
    PcaConfig,
};
use crate::background::Background;
use crate::embed::operator::RowUpdate;
use crate::metrics::timed;
use crate::record::Epoch;
use differential_dataflow::operators::CountTotal;
use differential_dataflow::AsCollection;
use std::collections::BTreeMap;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Capability, Concat, InputCapability};
use timely::dataflow::StreamVec;

/// One moment partial per worker and epoch, emitted when the epoch is complete: the
/// O(d²) work per image stays on the worker that embedded it. A worker with only a few
/// rows in the epoch sends the rows themselves ([`Partial::Rows`]).
pub fn moment_partials<'s>(
    rows: StreamVec<'s, Epoch, RowUpdate>,
    dim: usize,
) -> StreamVec<'s, Epoch, Partial> {
    rows.unary_frontier(Pipeline, "moments", move |_, _| {
        let mut open: BTreeMap<Epoch, (Capability<Epoch>, EpochPartial)> = BTreeMap::new();
        move |(input, frontier), output| {
            input.for_each(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let entry = open.entry(t).or_insert_with(|| {
                    (
                        cap.retain_least(0).expect("stamped"),
                        EpochPartial::Rows(Vec::new()),
                    )
                });
                timed("moments", || {
                    for (row, _, diff) in data.iter() {
                        entry.1.add(&row.embedding, *diff, dim);
                    }
                });
            });
            while let Some(entry) = open.first_entry() {
                if frontier.less_equal(entry.key()) {
                    break;
                }
                let (cap, partial) = entry.remove();
                output
                    .session(&cap)
                    .give(timed("moments", || partial.finish()));
            }
        }
    })
}

/// A worker's epoch so far: a few rows, or an accumulator once there are more.
enum EpochPartial {
    Rows(Vec<(crate::record::Embedding, i64)>),
    Dense(MomentsAccumulator),
}

impl EpochPartial {
    fn add(&mut self, e: &crate::record::Embedding, diff: i64, dim: usize) {
        if let EpochPartial::Rows(rows) = self {
            if rows.len() < SPARSE_ROWS {
                rows.push((e.clone(), diff));
                return;
            }
            let mut acc = MomentsAccumulator::new(dim);
            for (e, diff) in rows.drain(..) {
                acc.add(&e, diff);
            }
            *self = EpochPartial::Dense(acc);
        }
        if let EpochPartial::Dense(acc) = self {
            acc.add(e, diff);
        }
    }

    fn finish(self) -> Partial {
        match self {
            EpochPartial::Rows(rows) => Partial::Rows(rows),
            EpochPartial::Dense(acc) => acc.finish_partial(),
        }
    }
}

/// Per-label statistics as a differential collection: each live row contributes
/// `(label, (1, x))` (the pair is an abelian difference, so a deletion subtracts exactly
/// what its addition added), the restored state enters once, and `count_total`
/// accumulates per label at the label's worker, emitting `((label, (n, Σx)), t, ±1)` for
/// every label an epoch changes.
///
/// Each worker first sums its epoch's rows per label ([`label_partials`], a combiner):
/// one 10 KB update per label and worker crosses the exchange instead of one per row,
/// which kept an epoch's worth of them (20 MB at 2048 rows) in flight and in
/// `count_total`'s batcher.
pub fn label_stats<'s>(
    rows: StreamVec<'s, Epoch, RowUpdate>,
    restored: StreamVec<'s, Epoch, (String, Epoch, LabelDiff)>,
) -> StreamVec<'s, Epoch, ((String, LabelDiff), Epoch, isize)> {
    label_partials(rows)
        .as_collection()
        .concat(restored.as_collection())
        .count_total()
        .inner
}

/// This worker's rows of each epoch summed per label, emitted as `(label, t, (n, Σx))`
/// once the epoch is complete here (labels whose changes cancel out are left out).
fn label_partials<'s>(
    rows: StreamVec<'s, Epoch, RowUpdate>,
) -> StreamVec<'s, Epoch, (String, Epoch, LabelDiff)> {
    rows.unary_frontier(Pipeline, "label partials", move |_, _| {
        let mut open: BTreeMap<Epoch, (Capability<Epoch>, BTreeMap<String, LabelStats>)> =
            BTreeMap::new();
        move |(input, frontier), output| {
            input.for_each(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let entry = open
                    .entry(t)
                    .or_insert_with(|| (cap.retain_least(0).expect("stamped"), BTreeMap::new()));
                for (row, _, diff) in data.drain(..) {
                    entry
                        .1
                        .entry(row.label.0)
                        .or_default()
                        .add(&row.embedding, diff);
                }
            });
            while let Some(entry) = open.first_entry() {
                let t = *entry.key();
                if frontier.less_equal(&t) {
                    break;
                }
                let (cap, labels) = entry.remove();
                let mut session = output.session(&cap);
                for (label, stats) in labels {
                    if stats.n != 0 || stats.sum.iter().any(|&s| s != 0) {
                        session.give((label, t, (stats.n, stats.sum)));
                    }
                }
            }
        }
    })
}

/// The models after an epoch, and the epoch's moment rows while they are few (the
/// commit stores them in the epoch's delta instead of rewriting the moments).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Fitted {
    /// The models.
    pub models: Models,
    /// The rows the epoch changed the statistics by, with their labels; `None` above
    /// [`crate::state::DELTA_ROWS`].
    pub rows: Option<Vec<crate::state::StatRow>>,
}

/// On worker 0: merges each complete epoch's partials (exactly, in integers) and folds
/// its points into the KMeans, then emits the new models at that epoch.
///
/// The fit (an eigendecomposition at d = 1280 and a KMeans pass, ~0.5 s) runs on its own
/// thread, in epoch order, while the operator holds the epoch's capability: worker 0
/// keeps embedding instead of stalling every worker at each epoch boundary, and the OS
/// shares the cores between the fit and the embedding.
///
/// `plans` carries worker 0's [`Backlog`] of every epoch it cut. An epoch without rows
/// (nothing changed, or only rejected files) is fitted only when a catch-up deferred a
/// refit and this epoch clears the backlog: the run then never ends on a deferred PCA.
pub fn models<'s>(
    partials: StreamVec<'s, Epoch, Partial>,
    rows: StreamVec<'s, Epoch, RowUpdate>,
    plans: StreamVec<'s, Epoch, Backlog>,
    models: Models,
    pca: PcaConfig,
    kmeans: KMeansConfig,
) -> StreamVec<'s, Epoch, Fitted> {
    let points = Exchange::new(|_: &RowUpdate| 0);
    let scope = partials.scope();
    let worker = scope.worker();
    let epochs = partials
        .map(EpochInput::Moments)
        .concat(plans.map(EpochInput::Plan));
    epochs.binary_frontier(
        rows,
        Exchange::new(|_: &EpochInput| 0),
        points,
        "models",
        move |_, info| {
            let activator = worker.sync_activator_for(info.address.to_vec());
            // Started on the first complete epoch: only worker 0 ever gets one.
            let mut fitter = None;
            let mut seed = Some((models, pca, kmeans, activator));
            let mut open: BTreeMap<Epoch, (Capability<Epoch>, OpenEpoch)> = BTreeMap::new();
            let mut fitting: BTreeMap<Epoch, Capability<Epoch>> = BTreeMap::new();
            // A catch-up epoch was fitted since the last epoch that cleared the backlog.
            let mut deferred = false;
            move |(epochs, f1), (rows, f2), output| {
                epochs.for_each(|cap, data| {
                    let Some(entry) = open_epoch(&mut open, &cap) else {
                        return;
                    };
                    for input in data.drain(..) {
                        match input {
                            EpochInput::Moments(partial) => entry.partials.push(partial),
                            EpochInput::Plan(backlog) => entry.backlog = backlog,
                        }
                    }
                });
                rows.for_each(|cap, data| {
                    let Some(entry) = open_epoch(&mut open, &cap) else {
                        return;
                    };
                    entry.points.extend(
                        data.drain(..)
                            .map(|(row, _, diff)| (row.key, row.embedding, diff)),
                    );
                });
                while let Some(entry) = open.first_entry() {
                    let t = *entry.key();
                    if f1.less_equal(&t) || f2.less_equal(&t) {
                        break;
                    }
                    let (cap, epoch) = entry.remove();
                    let changed = !epoch.partials.is_empty() || !epoch.points.is_empty();
                    let owed = deferred && epoch.backlog == Backlog::Clear;
                    if !changed && !owed {
                        continue;
                    }
                    deferred = epoch.backlog == Backlog::Queued;
                    let fitter: &mut Fitter = fitter.get_or_insert_with(|| {
                        let (models, pca, kmeans, activator) = seed.take().expect("one fitter");
                        start_fitter(models, pca, kmeans, activator)
                    });
                    fitter.submit((t, epoch));
                    fitting.insert(t, cap);
                }
                if let Some(fitter) = fitter.as_mut() {
                    while let Some((t, fitted)) = fitter.try_next() {
                        let cap = fitting.remove(&t).expect("a capability per fit");
                        output.session(&cap).give(fitted);
                    }
                }
            }
        },
    )
}

/// What reaches the models operator per epoch besides the rows.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
enum EpochInput {
    /// A worker's moment partial.
    Moments(Partial),
    /// Worker 0's backlog when it cut the epoch.
    Plan(Backlog),
}

/// One epoch as the models operator gathers it.
struct OpenEpoch {
    partials: Vec<Partial>,
    points: Vec<EpochPoint>,
    backlog: Backlog,
}

impl Default for OpenEpoch {
    /// An epoch with no plan (the operator tests feed none) clears the backlog.
    fn default() -> Self {
        OpenEpoch {
            partials: Vec::new(),
            points: Vec::new(),
            backlog: Backlog::Clear,
        }
    }
}

/// The epoch a message under `cap` belongs to, opened (holding its capability) by its
/// first message from either input.
fn open_epoch<'a>(
    open: &'a mut BTreeMap<Epoch, (Capability<Epoch>, OpenEpoch)>,
    cap: &InputCapability<Epoch>,
) -> Option<&'a mut OpenEpoch> {
    let &t = cap.least()?;
    let (_, epoch) = open
        .entry(t)
        .or_insert_with(|| (cap.retain_least(0).expect("stamped"), OpenEpoch::default()));
    Some(epoch)
}

/// One epoch's moment partials, points and backlog, to fold into the models.
type FitJob = (Epoch, OpenEpoch);

/// The thread that owns the models and folds epochs in, one after another.
type Fitter = Background<FitJob, (Epoch, Fitted)>;

fn start_fitter(
    mut models: Models,
    pca: PcaConfig,
    kmeans: KMeansConfig,
    wake: timely::scheduling::SyncActivator,
) -> Fitter {
    Background::start("models", wake, move |(t, epoch): FitJob| {
        let OpenEpoch {
            partials,
            points,
            backlog,
        } = epoch;
        let started = std::time::Instant::now();
        let rows = (points.len() <= crate::state::DELTA_ROWS).then(|| {
            points
                .iter()
                .map(|(key, e, diff)| {
                    let label = key.label().map(|l| l.0).unwrap_or_default();
                    (label, e.clone(), *diff)
                })
                .collect()
        });
        timed("models", || {
            models.apply_epoch(t, partials, points, backlog, &pca, &kmeans)
        });
        tracing::debug!(
            stage = "stats",
            epoch = t,
            n = models.moments.n,
            seconds = started.elapsed().as_secs_f64(),
            "Models updated."
        );
        let models = models.clone();
        (t, Fitted { models, rows })
    })
}

#[cfg(test)]
mod tests {
    //! Incremental equals batch: stream synthetic embeddings through the real operators
    //! on 1 and 4 workers, in shuffled orders and epoch splits, and compare the published
    //! PCA with the batch twin.
    use super::*;
    use crate::record::{Embedding, ImageKey, ImageRow, Label};
    use crate::stats::reference::{batch_pca, max_principal_angle};
    use std::sync::{Arc, Mutex};
    use timely::dataflow::operators::vec::Input;
    use timely::dataflow::operators::{Inspect, Probe};
    use timely::dataflow::{InputHandleVec, ProbeHandle};

    const D: usize = 24;

    /// Points with a clear spectrum: 5 strong latent directions plus small noise, all
    /// within the ReLU6 range.
    fn points(n: usize, seed: u64) -> Vec<ImageRow> {
        let mut s = seed;
        let mut rnd = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let basis: Vec<Vec<f64>> = (0..5).map(|_| (0..D).map(|_| rnd()).collect()).collect();
        (0..n)
            .map(|i| {
                let z: Vec<f64> = (0..5).map(|j| rnd() * (5.0 - j as f64)).collect();
                let x: Vec<f32> = (0..D)
                    .map(|d| {
                        (3.0 + (0..5).map(|j| z[j] * basis[j][d]).sum::<f64>() * 0.4 + rnd() * 0.05)
                            as f32
                    })
                    .collect();
                ImageRow {
                    key: ImageKey(format!("L{}/{i:04}.jpg", i % 3)),
                    label: Label(format!("L{}", i % 3)),
                    embedding: Embedding::quantize(&x).unwrap(),
                }
            })
            .collect()
    }

    /// Streams `epochs` (each a list of updates) through moments → models on `workers`
    /// workers; returns the models published after the last epoch.
    fn stream(workers: usize, epochs: Vec<Vec<(ImageRow, i64)>>) -> Models {
        let clear = vec![Backlog::Clear; epochs.len()];
        stream_planned(workers, epochs, clear)
            .pop()
            .expect("models published")
            .1
    }

    /// [`stream`] with worker 0 sending each epoch's backlog, as the cutter does; returns
    /// every (epoch, models) published.
    fn stream_planned(
        workers: usize,
        epochs: Vec<Vec<(ImageRow, i64)>>,
        backlogs: Vec<Backlog>,
    ) -> Vec<(Epoch, Models)> {
        let result = Arc::new(Mutex::new(Vec::new()));
        let sink = result.clone();
        timely::execute(timely::Config::process(workers), move |worker| {
            let (index, peers) = (worker.index(), worker.peers());
            let mut input = InputHandleVec::<Epoch, RowUpdate>::new();
            let mut plans = InputHandleVec::<Epoch, Backlog>::new();
            let probe = ProbeHandle::new();
            let sink = sink.clone();
            worker.dataflow::<Epoch, _, _>(|scope| {
                let rows = scope.input_from(&mut input);
                let partials = moment_partials(rows.clone(), D);
                models(
                    partials,
                    rows,
                    scope.input_from(&mut plans),
                    Models::new(D),
                    PcaConfig::default(),
                    crate::stats::KMeansConfig {
                        k: 3,
                        ..Default::default()
                    },
                )
                .inspect_core(move |event| {
                    if let Ok((stamp, fitted)) = event {
                        let t = *stamp.least().expect("stamped");
                        let mut sink = sink.lock().unwrap();
                        sink.extend(fitted.iter().map(|m| (t, m.models.clone())));
                    }
                })
                .probe_with(&probe);
            });
            for (t, epoch) in epochs.iter().enumerate() {
                // Every worker feeds a different slice: arrival is spread as in a cluster.
                for (i, (row, diff)) in epoch.iter().enumerate() {
                    if i % peers == index {
                        input.send((row.clone(), t as Epoch, *diff));
                    }
                }
                if index == 0 {
                    plans.send(backlogs[t]);
                }
                input.advance_to(t as Epoch + 1);
                plans.advance_to(t as Epoch + 1);
                while probe.less_than(input.time()) {
                    worker.step();
                }
            }
        })
        .unwrap();
        let published = std::mem::take(&mut *result.lock().unwrap());
        published
    }

    /// A catch-up defers refits to when the images have grown enough; an epoch that
    /// clears the backlog refits even when it brings no rows (only rejected files), so
    /// a run never ends on a deferred PCA.
    #[test]
    fn a_deferred_refit_happens_at_the_epoch_that_clears_the_backlog_even_without_rows() {
        let rows = points(120, 5);
        // Epochs 0-5 of 20 rows behind a backlog, then an epoch with no rows.
        let mut epochs: Vec<Vec<(ImageRow, i64)>> = rows
            .chunks(20)
            .map(|c| c.iter().map(|r| (r.clone(), 1)).collect())
            .collect();
        epochs.push(Vec::new());
        let mut backlogs = vec![Backlog::Queued; 6];
        backlogs.push(Backlog::Clear);
        for workers in [1, 3] {
            let published = stream_planned(workers, epochs.clone(), backlogs.clone());
            let epochs_out: Vec<Epoch> = published.iter().map(|(t, _)| *t).collect();
            assert_eq!(epochs_out, vec![0, 1, 2, 3, 4, 5, 6], "{workers} workers");
            let fitted: Vec<(Epoch, i64)> = published
                .iter()
                .filter(|(t, m)| m.pca_epoch == *t)
                .map(|(t, m)| (*t, m.pca.as_ref().unwrap().n))
                .collect();
            // 20 images at the first fit, 80 (4x) at epoch 3, then all 120 at epoch 6.
            assert_eq!(
                fitted,
                vec![(0, 20), (3, 80), (6, 120)],
                "{workers} workers"
            );
            assert_matches_batch(&published.last().unwrap().1, &rows);
        }
        // Epochs without rows and without a deferred refit publish nothing.
        let mut idle = epochs[..2].to_vec();
        idle.push(Vec::new());
        let published = stream_planned(1, idle, vec![Backlog::Clear; 3]);
        assert_eq!(
            published.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            vec![0, 1]
        );
    }

    fn shuffled(mut rows: Vec<ImageRow>, seed: u64) -> Vec<ImageRow> {
        let mut s = seed;
        for i in (1..rows.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            rows.swap(i, (s >> 33) as usize % (i + 1));
        }
        rows
    }

    fn assert_matches_batch(models: &Models, rows: &[ImageRow]) {
        let pca = models.pca.as_ref().unwrap();
        let data: Vec<Vec<f64>> = rows.iter().map(|r| r.embedding.to_f64()).collect();
        let batch = batch_pca(&data, &PcaConfig::default());
        assert_eq!(pca.k, batch.components.len());
        for (a, b) in pca
            .explained_variance_ratio
            .iter()
            .zip(&batch.explained_variance_ratio)
            .take(pca.k)
        {
            assert!((a - b).abs() <= 1e-9 * b.abs(), "ratio {a} vs batch {b}");
        }
        for (a, b) in pca.scaler.std.iter().zip(&batch.std) {
            assert!((a - b).abs() <= 1e-9 * b.abs(), "std {a} vs {b}");
        }
        let angle = max_principal_angle(&pca.components, &batch.components);
        assert!(angle < 1e-6, "top-{} subspace off by {angle} rad", pca.k);
    }

    #[test]
    fn incremental_pca_equals_batch_for_any_order_split_and_workers() {
        let rows = points(300, 7);
        let mut reference = None;
        for (seed, workers, epoch_size) in [(1, 1, 300), (2, 1, 37), (3, 4, 50), (4, 4, 11)] {
            let order = shuffled(rows.clone(), seed);
            let epochs = order
                .chunks(epoch_size)
                .map(|c| c.iter().map(|r| (r.clone(), 1)).collect())
                .collect();
            let models = stream(workers, epochs);
            assert_matches_batch(&models, &rows);
            // Integer moments: bit-identical state whatever the order, split or workers.
            match &reference {
                None => reference = Some(models.moments.clone()),
                Some(m) => assert_eq!(&models.moments, m),
            }
        }
    }

    #[test]
    fn retractions_give_the_statistics_without_the_retracted() {
        let rows = points(200, 11);
        let mut epochs: Vec<Vec<(ImageRow, i64)>> =
            vec![rows.iter().map(|r| (r.clone(), 1)).collect()];
        epochs.push(rows[..60].iter().map(|r| (r.clone(), -1)).collect());
        let models = stream(2, epochs);
        assert_eq!(models.moments.n, 140);
        assert_matches_batch(&models, &rows[60..]);
    }

    #[test]
    fn kmeans_is_identical_across_worker_counts() {
        let rows = points(240, 5);
        let epochs = || {
            rows.chunks(40)
                .map(|c| c.iter().map(|r| (r.clone(), 1)).collect())
                .collect::<Vec<_>>()
        };
        let (a, b) = (stream(1, epochs()), stream(4, epochs()));
        assert_eq!(a.kmeans, b.kmeans);
        assert_eq!(a.kmeans.weights.iter().sum::<f64>(), 240.0);
    }

    /// Streams updates through `label_stats` on `workers` workers, with `restored`
    /// entering at the first epoch; returns the per-label state after the last epoch.
    fn stream_labels(
        workers: usize,
        restored: Vec<(String, LabelDiff)>,
        epochs: Vec<Vec<(ImageRow, i64)>>,
    ) -> std::collections::BTreeMap<String, LabelDiff> {
        let result = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
        let sink = result.clone();
        timely::execute(timely::Config::process(workers), move |worker| {
            let (index, peers) = (worker.index(), worker.peers());
            let mut rows_in = InputHandleVec::<Epoch, RowUpdate>::new();
            let mut restored_in = InputHandleVec::<Epoch, (String, Epoch, LabelDiff)>::new();
            let probe = ProbeHandle::new();
            let sink = sink.clone();
            worker.dataflow::<Epoch, _, _>(|scope| {
                let rows = scope.input_from(&mut rows_in);
                label_stats(rows, scope.input_from(&mut restored_in))
                    .inspect(move |((label, stats), _, diff)| {
                        let mut state = sink.lock().unwrap();
                        if *diff > 0 {
                            state.insert(label.clone(), stats.clone());
                        } else if state.get(label) == Some(stats) {
                            state.remove(label);
                        }
                    })
                    .probe_with(&probe);
            });
            if index == 0 {
                for (label, stats) in &restored {
                    restored_in.send((label.clone(), 0, stats.clone()));
                }
            }
            drop(restored_in);
            for (t, epoch) in epochs.iter().enumerate() {
                for (i, (row, diff)) in epoch.iter().enumerate() {
                    if i % peers == index {
                        rows_in.send((row.clone(), t as Epoch, *diff));
                    }
                }
                rows_in.advance_to(t as Epoch + 1);
                while probe.less_than(rows_in.time()) {
                    worker.step();
                }
            }
        })
        .unwrap();
        let state = result.lock().unwrap().clone();
        state
    }

    /// Batch twin: per-label counts and sums summed directly.
    fn batch_labels(rows: &[ImageRow]) -> std::collections::BTreeMap<String, LabelDiff> {
        let mut out = std::collections::BTreeMap::<String, LabelDiff>::new();
        for row in rows {
            let (n, sum) = LabelStats::update_of(&row.embedding);
            let entry = out
                .entry(row.label.0.clone())
                .or_insert((0, vec![0; sum.len()]));
            entry.0 += n;
            entry.1.iter_mut().zip(sum).for_each(|(a, b)| *a += b);
        }
        out
    }

    #[test]
    fn label_statistics_equal_the_batch_sums_through_retractions_and_a_restart() {
        let rows = points(240, 9);
        let (kept, dropped) = rows.split_at(180);
        let mut epochs: Vec<Vec<(ImageRow, i64)>> = rows
            .chunks(50)
            .map(|c| c.iter().map(|r| (r.clone(), 1)).collect())
            .collect();
        epochs.push(dropped.iter().map(|r| (r.clone(), -1)).collect());
        let expected = batch_labels(kept);
        for workers in [1, 3] {
            assert_eq!(stream_labels(workers, vec![], epochs.clone()), expected);
        }
        // A restart: the first 100 rows' statistics restored, the rest streamed.
        let restored: Vec<_> = batch_labels(&rows[..100]).into_iter().collect();
        let mut rest: Vec<Vec<(ImageRow, i64)>> =
            vec![rows[100..].iter().map(|r| (r.clone(), 1)).collect()];
        rest.push(dropped.iter().map(|r| (r.clone(), -1)).collect());
        assert_eq!(stream_labels(2, restored, rest), expected);
    }
}
