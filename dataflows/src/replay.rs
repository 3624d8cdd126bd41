//! Replay: rebuilds every statistic from the stored embeddings of an output, without
//! running the model: exact moments (bit-identical to the streamed ones, which it
//! checks), the PCA, and a KMeans folded in over the live images file by file. Use it to verify
//! an output, or to refit with other `[pca]`/`[kmeans]` settings.

use crate::sink::OutputStore;
use crate::state::{for_each_live_file, load_committed, Archive, Checkpoint};
use crate::stats::{KMeansConfig, Models, MomentsAccumulator, PcaConfig};
use anyhow::Result;
use std::time::Instant;

/// What a replay rebuilt, and how long each part took.
pub struct Replay {
    /// The committed state replayed.
    pub checkpoint: Checkpoint,
    /// The rebuilt models.
    pub models: Models,
    /// Live images read back.
    pub images: usize,
    /// Seconds reading and decoding the Parquet files.
    pub read_s: f64,
    /// Seconds accumulating the exact moments.
    pub moments_s: f64,
    /// Seconds fitting the PCA (an eigendecomposition, independent of the image count).
    pub pca_s: f64,
    /// Seconds fitting the KMeans.
    pub kmeans_s: f64,
    /// True when the rebuilt moments equal the streamed ones bit for bit.
    pub moments_identical: bool,
}

/// Rebuilds the statistics of `store`'s committed state in two streaming passes over the
/// stored embeddings (memory: the ledger and one file): exact moments, then, under the
/// refitted PCA, the KMeans folded in file by file as the pipeline folds epochs.
pub fn replay(store: &dyn OutputStore, pca: &PcaConfig, kmeans: &KMeansConfig) -> Result<Replay> {
    let checkpoint = load_committed(store)?;
    let archive = Archive::load(store, &checkpoint, |_| true)?;
    let dim = checkpoint.models.moments.dim;
    // Nothing else runs during a replay: let the matrix products use every core.
    let mut acc = MomentsAccumulator::with_parallelism(dim, faer::Par::rayon(0));
    let (mut read_s, mut moments_s, mut images) = (0.0, 0.0, 0);
    let mut started = Instant::now();
    for_each_live_file(store, &checkpoint, &archive, |rows| {
        read_s += started.elapsed().as_secs_f64();
        let t = Instant::now();
        for (row, _) in &rows {
            acc.add(&row.embedding, 1);
        }
        images += rows.len();
        moments_s += t.elapsed().as_secs_f64();
        started = Instant::now();
        Ok(())
    })?;
    let moments = acc.finish();
    let moments_identical = moments == checkpoint.models.moments;

    let started = Instant::now();
    let mut models = Models::new(dim);
    models.moments = moments;
    models.pca = crate::stats::pca::fit(&models.moments, pca);
    let pca_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    for_each_live_file(store, &checkpoint, &archive, |rows| {
        let points = rows
            .into_iter()
            .map(|(r, _)| (r.key, r.embedding, 1))
            .collect();
        models.fold_points(points, kmeans);
        Ok(())
    })?;
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
    })
}
