//! Replay: rebuilds every statistic from the stored embeddings of an output, without
//! running the model: exact moments and per-label statistics (bit-identical to the
//! streamed ones, which it checks), the PCA, and a KMeans folded in over the live images file by file. Use it to verify
//! an output, or to refit with other `[pca]`/`[kmeans]` settings.

use crate::record::ImageRow;
use crate::sink::OutputStore;
use crate::state::{live_files, load_committed, read_live_image_rows, Archive, Checkpoint};
use crate::stats::{KMeansConfig, LabelStats, Models, Moments, MomentsAccumulator, PcaConfig};
use anyhow::Result;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Seconds fitting the PCA (an eigendecomposition, independent of the image count).
    pub pca_s: f64,
    /// Seconds fitting the KMeans.
    pub kmeans_s: f64,
    /// True when the rebuilt moments equal the streamed ones bit for bit.
    pub moments_identical: bool,
    /// The rebuilt per-label statistics (count and exact sum).
    pub labels: BTreeMap<String, LabelStats>,
    /// True when they equal the streamed ones.
    pub labels_identical: bool,
}

/// Rebuilds the statistics of `store`'s committed state in two streaming passes over the
/// stored embeddings (memory: the ledger and a file per core): exact moments, then, under
/// the refitted PCA, the KMeans folded in file by file as the pipeline folds epochs.
pub fn replay(store: &dyn OutputStore, pca: &PcaConfig, kmeans: &KMeansConfig) -> Result<Replay> {
    let checkpoint = load_committed(store)?;
    let archive = Archive::load(store, &checkpoint, |_| true)?;
    let dim = checkpoint.models.moments.dim;
    let files = live_files(store, &checkpoint)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    // Pass 1: every core takes the next file, decodes it and adds its rows to its own
    // accumulator; integer sums merge exactly in any order.
    let next = AtomicUsize::new(0);
    let parts: Vec<Result<Part>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.min(files.len()).max(1))
            .map(|_| {
                scope.spawn(|| -> Result<Part> {
                    let mut part = Part {
                        acc: MomentsAccumulator::new(dim),
                        labels: BTreeMap::new(),
                        images: 0,
                        read_s: 0.0,
                        moments_s: 0.0,
                    };
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((name, epoch)) = files.get(i) else {
                            return Ok(part);
                        };
                        let t = Instant::now();
                        let rows =
                            read_live_image_rows(store, &checkpoint, &archive, name, *epoch)?;
                        part.read_s += t.elapsed().as_secs_f64();
                        let t = Instant::now();
                        for row in &rows {
                            part.acc.add(&row.embedding, 1);
                            if let Some(stats) = part.labels.get_mut(&row.label.0) {
                                stats.add(&row.embedding, 1);
                            } else {
                                let mut stats = LabelStats::default();
                                stats.add(&row.embedding, 1);
                                part.labels.insert(row.label.0.clone(), stats);
                            }
                        }
                        part.images += rows.len();
                        part.moments_s += t.elapsed().as_secs_f64();
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("replay thread panicked"))
            .collect()
    });
    let mut moments = Moments::new(dim);
    let mut labels: BTreeMap<String, LabelStats> = BTreeMap::new();
    let (mut read_s, mut moments_s, mut images) = (0.0, 0.0, 0);
    for part in parts {
        let part = part?;
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

    let started = Instant::now();
    let mut models = Models::new(dim);
    models.moments = moments;
    models.pca = crate::stats::pca::fit(&models.moments, pca);
    let pca_s = started.elapsed().as_secs_f64();

    // Pass 2: the KMeans folds files in order. Every core decodes one file of the next
    // window while nothing else runs (decoding is most of this pass: the fold is k dot
    // products per point), then the window is folded in file order; memory: a window.
    // (Folding one window while decoding the next measured no faster: the fold's own
    // parallel part then competes with the decoding.)
    let started = Instant::now();
    for window in files.chunks(threads.max(1)) {
        use rayon::prelude::*;
        let decoded: Vec<Result<Vec<ImageRow>>> = window
            .par_iter()
            .map(|(name, epoch)| read_live_image_rows(store, &checkpoint, &archive, name, *epoch))
            .collect();
        for rows in decoded {
            let points = rows?.into_iter().map(|r| (r.key, r.embedding, 1)).collect();
            models.fold_points_with(points, kmeans, faer::Par::rayon(0));
        }
    }
    let kmeans_s = started.elapsed().as_secs_f64();
    Ok(Replay {
        images,
        checkpoint,
        models,
        read_s,
        moments_s,
        pca_s,
        kmeans_s,
        moments_identical,
        labels,
        labels_identical,
    })
}

/// One pass-1 thread's share.
struct Part {
    acc: MomentsAccumulator,
    labels: BTreeMap<String, LabelStats>,
    images: usize,
    read_s: f64,
    moments_s: f64,
}
