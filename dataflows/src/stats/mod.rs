//! The statistics stage: exact integer moments per worker and epoch, merged on worker 0
//! into the standardized PCA and the online KMeans published at each epoch boundary.
//! The models are plain functions of (moments, epoch points); the timely operators live
//! in [`operator`].

pub mod kmeans;
pub mod labels;
pub mod moments;
pub mod operator;
pub mod pca;
pub mod reference;

pub use kmeans::{KMeans, KMeansConfig};
pub use labels::{LabelDiff, LabelStats};
pub use moments::{Moments, MomentsAccumulator};
pub use pca::{PcaConfig, PcaModel};

use serde::{Deserialize, Serialize};

/// Everything the statistics stage knows after an epoch: the published models.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Models {
    /// Exact moments of the live images.
    pub moments: Moments,
    /// The standardized PCA fitted on them (None below two images).
    pub pca: Option<PcaModel>,
    /// The clustering.
    pub kmeans: KMeans,
}

impl Models {
    /// Empty models of dimension `dim`.
    pub fn new(dim: usize) -> Self {
        Models {
            moments: Moments::new(dim),
            pca: None,
            kmeans: KMeans::default(),
        }
    }

    /// Folds one epoch in: its merged moment partial, then its points (sequential twin of
    /// what the dataflow does on worker 0).
    pub fn apply_epoch(
        &mut self,
        partial: &Moments,
        points: Vec<kmeans::EpochPoint>,
        pca: &PcaConfig,
        kmeans: &KMeansConfig,
    ) {
        self.moments.merge(partial);
        self.pca = pca::fit(&self.moments, pca);
        self.fold_points(points, kmeans);
    }

    /// Folds points into the clustering under the current PCA (kept pending until there
    /// is one).
    pub fn fold_points(&mut self, points: Vec<kmeans::EpochPoint>, kmeans: &KMeansConfig) {
        match &self.pca {
            Some(model) => self.kmeans.update(points, model, kmeans),
            None => self.kmeans.collect_pending(points),
        }
    }
}
