//! Replay: rebuilds every statistic from the stored embeddings of an output, without
//! running the model: exact moments (bit-identical to the streamed ones, which it
//! checks), the PCA, and a KMeans fitted over all live images at once. Use it to verify
//! an output, or to refit with other `[pca]`/`[kmeans]` settings.

use crate::record::ImageRow;
use crate::sink::OutputStore;
use crate::state::{live_rows, load_committed, Checkpoint};
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

/// Rebuilds the statistics of `store`'s committed state.
pub fn replay(store: &dyn OutputStore, pca: &PcaConfig, kmeans: &KMeansConfig) -> Result<Replay> {
    let checkpoint = load_committed(store)?;
    let started = Instant::now();
    let rows: Vec<ImageRow> = live_rows(store, &checkpoint)?
        .into_iter()
        .map(|(row, _)| row)
        .collect();
    let read_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let dim = checkpoint.models.moments.dim;
    // Nothing else runs during a replay: let the matrix products use every core.
    let mut acc = MomentsAccumulator::with_parallelism(dim, faer::Par::rayon(0));
    for row in &rows {
        acc.add(&row.embedding, 1);
    }
    let moments = acc.finish();
    let moments_s = started.elapsed().as_secs_f64();
    let moments_identical = moments == checkpoint.models.moments;

    let started = Instant::now();
    let mut models = Models::new(dim);
    models.moments = moments;
    models.pca = crate::stats::pca::fit(&models.moments, pca);
    let pca_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let points = rows
        .iter()
        .map(|r| (r.key.clone(), r.embedding.clone(), 1))
        .collect();
    models.fold_points(points, kmeans);
    let kmeans_s = started.elapsed().as_secs_f64();
    Ok(Replay {
        images: rows.len(),
        checkpoint,
        models,
        read_s,
        moments_s,
        pca_s,
        kmeans_s,
        moments_identical,
    })
}
