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

/// Whether more listed changes were queued behind an epoch when worker 0 cut it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backlog {
    /// More changes wait for the next epochs: the archive is being caught up (a first
    /// ingest, a large new folder), and the PCA refits on
    /// [`PcaConfig::catch_up_refit_fraction`].
    Queued,
    /// The epoch takes everything listed so far: the PCA refits on
    /// [`PcaConfig::refit_fraction`].
    Clear,
}

/// Everything the statistics stage knows after an epoch: the published models.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Models {
    /// Exact moments of the live images.
    pub moments: Moments,
    /// The standardized PCA fitted on them (None below two images).
    pub pca: Option<PcaModel>,
    /// The clustering.
    pub kmeans: KMeans,
    /// Images added or retracted since the PCA was last fitted (see
    /// [`PcaConfig::refit_fraction`]).
    #[serde(default)]
    pub changes_since_fit: u64,
    /// The epoch whose statistics the PCA was fitted on (it covers `pca.n` images).
    #[serde(default)]
    pub pca_epoch: u64,
}

impl Models {
    /// Empty models of dimension `dim`.
    pub fn new(dim: usize) -> Self {
        Models {
            moments: Moments::new(dim),
            pca: None,
            kmeans: KMeans::default(),
            changes_since_fit: 0,
            pca_epoch: 0,
        }
    }

    /// Folds epoch `epoch` in: its merged moment partial, then its points (sequential
    /// twin of what the dataflow does on worker 0). The moments are always exact and
    /// current; the PCA (an eigendecomposition, ~0.4 s at d = 1280) is refitted only once
    /// the changes since the last fit reach `refit_fraction` of the live images
    /// (`catch_up_refit_fraction` while a backlog is queued behind the epoch), so neither
    /// a trickle nor a catch-up pays it per epoch. A fitted PCA is always the batch PCA of
    /// the `pca.n` images live at `pca_epoch`. The policy counts changes, not time, and
    /// the backlog is worker 0's cut of the listing, so when a refit happens depends only
    /// on the data: the same for any `-w`/`-n`.
    pub fn apply_epoch(
        &mut self,
        epoch: u64,
        partials: Vec<moments::Partial>,
        points: Vec<kmeans::EpochPoint>,
        backlog: Backlog,
        pca: &PcaConfig,
        kmeans: &KMeansConfig,
    ) {
        // Each partial (up to 13 MB) is dropped once folded, before the refit's
        // eigendecomposition allocates its own d x d matrices.
        for partial in partials {
            self.moments.fold(&partial);
        }
        self.changes_since_fit += points.len() as u64;
        if self.refit_due(pca, backlog) {
            self.pca = pca::fit(&self.moments, pca);
            self.pca_epoch = epoch;
            self.changes_since_fit = 0;
        }
        self.fold_points(points, kmeans);
    }

    fn refit_due(&self, config: &PcaConfig, backlog: Backlog) -> bool {
        let fraction = match backlog {
            Backlog::Queued => config.catch_up_refit_fraction,
            Backlog::Clear => config.refit_fraction,
        };
        match &self.pca {
            None => true,
            Some(_) if self.changes_since_fit == 0 => false,
            Some(_) => self.changes_since_fit as f64 >= fraction * self.moments.n.max(0) as f64,
        }
    }

    /// Folds points into the clustering under the current PCA (kept pending until there
    /// is one).
    pub fn fold_points(&mut self, points: Vec<kmeans::EpochPoint>, kmeans: &KMeansConfig) {
        self.fold_points_with(points, kmeans, faer::Par::Seq)
    }

    /// [`Self::fold_points`] with the projections run as `par` says (same result).
    pub fn fold_points_with(
        &mut self,
        points: Vec<kmeans::EpochPoint>,
        kmeans: &KMeansConfig,
        par: faer::Par,
    ) {
        match &self.pca {
            Some(model) => self.kmeans.update_with(points, model, kmeans, par),
            None => self.kmeans.collect_pending(points),
        }
    }
}

/// Dot product with eight independent sums, so the compiler can keep them in vector
/// registers (a single running sum is a serial dependency chain); the
/// order is fixed, so results stay deterministic.
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Embedding, ImageKey};

    fn point(i: usize) -> kmeans::EpochPoint {
        let x: Vec<f32> = (0..4)
            .map(|j| ((i * 7 + j * 3) % 11) as f32 * 0.1 + j as f32 * 0.05)
            .collect();
        (
            ImageKey(format!("L/{i}.jpg")),
            Embedding::quantize(&x).unwrap(),
            1,
        )
    }

    /// The PCA is refitted only once enough has changed, and whenever it is, it is the
    /// batch PCA of the images live at its epoch.
    #[test]
    fn pca_refits_on_the_change_policy_and_equals_the_batch_fit_when_it_does() {
        let config = PcaConfig {
            refit_fraction: 0.25,
            ..Default::default()
        };
        let kmeans = KMeansConfig::default();
        let mut models = Models::new(4);
        let mut fitted_at = Vec::new();
        let mut all: Vec<kmeans::EpochPoint> = Vec::new();
        // Epoch 1: 20 images; then one image per epoch.
        for epoch in 1..=12u64 {
            let new: Vec<kmeans::EpochPoint> = if epoch == 1 {
                (0..20).map(point).collect()
            } else {
                vec![point(100 + epoch as usize)]
            };
            all.extend(new.iter().cloned());
            // Dense partials for the first epoch, rows after (as the operator sends them).
            let partial = if epoch == 1 {
                moments::Partial::Dense(moments::moments_of(4, new.iter().map(|(_, e, d)| (e, *d))))
            } else {
                moments::Partial::Rows(new.iter().map(|(_, e, d)| (e.clone(), *d)).collect())
            };
            models.apply_epoch(epoch, vec![partial], new, Backlog::Clear, &config, &kmeans);
            let pca = models.pca.as_ref().unwrap();
            if models.pca_epoch == epoch {
                fitted_at.push(epoch);
                let batch = moments::moments_of(4, all.iter().map(|(_, e, d)| (e, *d)));
                assert_eq!(
                    Some(pca),
                    pca::fit(&batch, &config).as_ref(),
                    "epoch {epoch}"
                );
            }
            assert_eq!(
                models.moments.n as usize,
                all.len(),
                "moments are always current"
            );
        }
        // Fitted at the first epoch, then only every few single-image epochs.
        assert_eq!(fitted_at[0], 1);
        assert!(
            fitted_at.len() >= 2 && fitted_at.len() < 12,
            "{fitted_at:?}"
        );
        let every = PcaConfig::default();
        let mut m = Models::new(4);
        let new: Vec<_> = (0..20).map(point).collect();
        let partial = moments::moments_of(4, new.iter().map(|(_, e, d)| (e, *d)));
        m.apply_epoch(
            1,
            vec![moments::Partial::Dense(partial)],
            new,
            Backlog::Clear,
            &every,
            &kmeans,
        );
        let one = vec![point(500)];
        let partial = moments::moments_of(4, one.iter().map(|(_, e, d)| (e, *d)));
        m.apply_epoch(
            2,
            vec![moments::Partial::Dense(partial)],
            one,
            Backlog::Clear,
            &every,
            &kmeans,
        );
        assert_eq!(m.pca_epoch, 2, "1 change in 21 is over the default 1 %");
    }

    /// While a backlog is queued the PCA refits only when the live images have grown
    /// enough (quadrupled at the default 0.75); the epoch that clears the backlog refits,
    /// and every fit is the batch PCA of the images live at its epoch.
    #[test]
    fn a_catch_up_refits_on_growth_and_at_the_epoch_that_clears_the_backlog() {
        let config = PcaConfig::default();
        let kmeans = KMeansConfig::default();
        let mut models = Models::new(4);
        let mut all: Vec<kmeans::EpochPoint> = Vec::new();
        let mut fitted_at = Vec::new();
        // 10 epochs of 8 images; the last one clears the backlog.
        for epoch in 1..=10u64 {
            let new: Vec<_> = (0..8).map(|i| point(epoch as usize * 8 + i)).collect();
            all.extend(new.iter().cloned());
            let partial =
                moments::Partial::Rows(new.iter().map(|(_, e, d)| (e.clone(), *d)).collect());
            let backlog = if epoch < 10 {
                Backlog::Queued
            } else {
                Backlog::Clear
            };
            models.apply_epoch(epoch, vec![partial], new, backlog, &config, &kmeans);
            if models.pca_epoch == epoch {
                fitted_at.push(epoch);
                let batch = moments::moments_of(4, all.iter().map(|(_, e, d)| (e, *d)));
                assert_eq!(models.pca, pca::fit(&batch, &config), "epoch {epoch}");
            }
            assert_eq!(models.moments.n as usize, all.len());
        }
        // 8 images at the first fit; 32 (4x) at epoch 4; none at 128 within 80; the end.
        assert_eq!(fitted_at, vec![1, 4, 10]);
        assert_eq!(models.pca.as_ref().unwrap().n, 80);
        // Without a backlog the same epochs refit every time (8 of 8k+8 is over 1 %).
        let mut every = Models::new(4);
        for epoch in 1..=3u64 {
            let new: Vec<_> = (0..8).map(|i| point(epoch as usize * 8 + i)).collect();
            let partial =
                moments::Partial::Rows(new.iter().map(|(_, e, d)| (e.clone(), *d)).collect());
            every.apply_epoch(epoch, vec![partial], new, Backlog::Clear, &config, &kmeans);
            assert_eq!(every.pca_epoch, epoch);
        }
    }
}
