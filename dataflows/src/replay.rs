//! Replay: rebuilds every statistic from the stored embeddings of an output, without
//! running the model: exact moments and per-label statistics (bit-identical to the
//! streamed ones, which it checks), the PCA, and a KMeans folded in over the live images
//! file by file. Use it to verify an output, or to refit with other `[pca]`/`[kmeans]`
//! settings.

use crate::record::ImageRow;
use crate::sink::OutputStore;
use crate::state::{live_files, load_committed, read_live_image_rows, Archive, Checkpoint};
use crate::stats::{pca, KMeansConfig, LabelStats, Models, Moments, MomentsAccumulator, PcaConfig};
use anyhow::Result;
use std::collections::BTreeMap;
use std::time::Instant;

/// What a replay rebuilt, and how long each part took.
pub struct Replay {
    /// The committed state replayed.
    pub checkpoint: Checkpoint,
    /// The rebuilt models.
    pub models: Models,
    /// Live images read back.
    pub images: usize,
    /// Seconds reading and decoding the Parquet files (summed over threads).
    pub read_s: f64,
    /// Seconds accumulating the exact moments (summed over threads).
    pub moments_s: f64,
    /// Seconds fitting the PCA (an eigendecomposition, independent of the image count;
    /// two of them when the KMeans took a second pass).
    pub pca_s: f64,
    /// Seconds folding the KMeans (on its own thread, beside the decoding, in a single
    /// pass; with its decoding when it took a second pass).
    pub kmeans_s: f64,
    /// True when the KMeans was folded in the moments' pass (see [`replay_in`]).
    pub single_pass: bool,
    /// True when the rebuilt moments equal the streamed ones bit for bit.
    pub moments_identical: bool,
    /// The rebuilt per-label statistics (count and exact sum).
    pub labels: BTreeMap<String, LabelStats>,
    /// True when they equal the streamed ones.
    pub labels_identical: bool,
}

/// How many passes over the stored embeddings a replay may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Passes {
    /// One when the rebuilt moments equal the streamed ones (else the output is damaged,
    /// which replay reports), two otherwise.
    Auto,
    /// Always two: moments first, then the KMeans under the refitted PCA (the batch twin
    /// the tests compare the single pass with).
    Two,
}

/// Rebuilds the statistics of `store`'s committed state by streaming the stored
/// embeddings (memory: the ledger and a file per core): exact moments and, under the
/// refitted PCA, the KMeans folded in file by file as the pipeline folds epochs.
pub fn replay(store: &dyn OutputStore, pca: &PcaConfig, kmeans: &KMeansConfig) -> Result<Replay> {
    replay_in(store, pca, kmeans, Passes::Auto)
}

/// [`replay`] with a choice of [`Passes`].
///
/// Decoding the Parquet files is about half of a replay, so the KMeans is folded in the
/// same pass as the moments are rebuilt, under the PCA fitted on the streamed moments.
/// That is the refitted PCA exactly when the rebuilt moments equal the streamed ones (the
/// same fit of the same integers), which the pass checks; otherwise a second pass folds
/// under the PCA of the rebuilt moments.
pub fn replay_in(
    store: &dyn OutputStore,
    pca: &PcaConfig,
    kmeans: &KMeansConfig,
    passes: Passes,
) -> Result<Replay> {
    let checkpoint = load_committed(store)?;
    let archive = Archive::load(store, &checkpoint, |_| true)?;
    let dim = checkpoint.models.moments.dim;
    let files = live_files(store, &checkpoint)?;
    // Files decoded at once: one per core.
    let window = std::thread::available_parallelism().map_or(1, |n| n.get());
    let read = |(name, epoch): &(String, u64)| {
        read_live_image_rows(store, &checkpoint, &archive, name, *epoch)
    };

    // The PCA of the streamed moments, so that the KMeans can be folded in the same pass
    // as the moments are rebuilt; it is the refitted PCA exactly when they come out equal.
    let started = Instant::now();
    let guess = match passes {
        Passes::Auto => pca::fit(&checkpoint.models.moments, pca),
        Passes::Two => None,
    };
    let mut pca_s = started.elapsed().as_secs_f64();
    let early = guess.map(|fitted| Models {
        pca: Some(fitted),
        ..Models::new(dim)
    });

    // One pass: a window of a file per core is decoded and added to that core's own
    // accumulator in parallel (integer sums merge exactly in any order), while the files
    // already decoded are folded into the KMeans in file order on a thread of their own:
    // the fold is sequential by definition, and run between windows it left a core idle
    // for a quarter of the replay. At most one window waits to be folded.
    let mut parts: Vec<Part> = (0..window).map(|_| Part::new(dim)).collect();
    let (early, kmeans_s) = std::thread::scope(|scope| -> Result<_> {
        let (to_fold, folding) = std::sync::mpsc::sync_channel::<Vec<ImageRow>>(window);
        let folder = early.map(|mut models| {
            scope.spawn(move || {
                let mut busy = 0.0;
                for rows in folding {
                    let started = Instant::now();
                    fold(&mut models, rows, kmeans, faer::Par::Seq);
                    busy += started.elapsed().as_secs_f64();
                }
                (models, busy)
            })
        });
        for files in files.chunks(window) {
            use rayon::prelude::*;
            let decoded: Vec<Result<Vec<ImageRow>>> = files
                .par_iter()
                .zip(parts.par_iter_mut())
                .map(|(file, part)| part.add_file(|| read(file)))
                .collect();
            for rows in decoded {
                let rows = rows?;
                if folder.is_some() {
                    to_fold
                        .send(rows)
                        .expect("the KMeans fold outlives the pass");
                }
            }
        }
        drop(to_fold);
        Ok(match folder {
            Some(folder) => {
                let (models, busy) = folder.join().expect("the KMeans fold panicked");
                (Some(models), busy)
            }
            None => (None, 0.0),
        })
    })?;
    let mut moments = Moments::new(dim);
    let mut labels: BTreeMap<String, LabelStats> = BTreeMap::new();
    let (mut read_s, mut moments_s, mut images) = (0.0, 0.0, 0);
    for part in parts {
        read_s += part.read_s;
        moments_s += part.moments_s;
        images += part.images;
        moments.merge(&part.acc.finish());
        for (label, stats) in part.labels {
            labels.entry(label).or_default().merge(&stats);
        }
    }
    let moments_identical = moments == checkpoint.models.moments;
    let labels_identical = labels == checkpoint.labels;

    let single_pass = early.is_some() && moments_identical;
    let (mut models, kmeans_s) = match early.filter(|_| single_pass) {
        Some(models) => (models, kmeans_s),
        None => {
            let started = Instant::now();
            let refit = pca::fit(&moments, pca);
            pca_s += started.elapsed().as_secs_f64();
            let started = Instant::now();
            let mut models = Models {
                pca: refit,
                ..Models::new(dim)
            };
            for files in files.chunks(window) {
                use rayon::prelude::*;
                let decoded: Vec<Result<Vec<ImageRow>>> = files.par_iter().map(read).collect();
                for rows in decoded {
                    fold(&mut models, rows?, kmeans, faer::Par::rayon(0));
                }
            }
            (models, started.elapsed().as_secs_f64())
        }
    };
    models.moments = moments;
    Ok(Replay {
        images,
        checkpoint,
        models,
        read_s,
        moments_s,
        pca_s,
        kmeans_s,
        single_pass,
        moments_identical,
        labels,
        labels_identical,
    })
}

/// Folds a file's rows into the KMeans, as the pipeline folds an epoch's points (the
/// nearest centroids found on the cores `par` gives; the result does not depend on it).
fn fold(models: &mut Models, rows: Vec<ImageRow>, kmeans: &KMeansConfig, par: faer::Par) {
    let points = rows.into_iter().map(|r| (r.key, r.embedding, 1)).collect();
    models.fold_points_with(points, kmeans, par);
}

/// One core's share of the moments and per-label sums.
struct Part {
    acc: MomentsAccumulator,
    labels: BTreeMap<String, LabelStats>,
    images: usize,
    read_s: f64,
    moments_s: f64,
}

impl Part {
    fn new(dim: usize) -> Self {
        Part {
            acc: MomentsAccumulator::new(dim),
            labels: BTreeMap::new(),
            images: 0,
            read_s: 0.0,
            moments_s: 0.0,
        }
    }

    /// Reads a file with `read` and adds its rows; returns them for the KMeans fold.
    fn add_file(&mut self, read: impl FnOnce() -> Result<Vec<ImageRow>>) -> Result<Vec<ImageRow>> {
        let t = Instant::now();
        let rows = read()?;
        self.read_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for row in &rows {
            self.acc.add(&row.embedding, 1);
            if let Some(stats) = self.labels.get_mut(&row.label.0) {
                stats.add(&row.embedding, 1);
            } else {
                let mut stats = LabelStats::default();
                stats.add(&row.embedding, 1);
                self.labels.insert(row.label.0.clone(), stats);
            }
        }
        self.images += rows.len();
        self.moments_s += t.elapsed().as_secs_f64();
        Ok(rows)
    }
}
