//! Classify: names the fruit in a new photo from the live state of an output. The photo
//! goes through the same decode → embed path as the archive; the classifier compares it
//! with the labels' statistics (O(labels x d) plus one d x d matrix, no stored point) or,
//! for kNN, with the stored points.
//!
//! Three methods, chosen by measurement (README, "Accuracy"):
//! - `lda` (default): a shrinkage linear discriminant fitted from the exact moments and
//!   per-label sums ([`discriminant`]); scores are its posterior probabilities, softmax of
//!   the log-posteriors divided by a temperature;
//! - `nearest_mean`: distance to each label's mean in PCA space;
//! - `knn`: per label, the mean distance to its `neighbours` nearest stored images in PCA
//!   space (local-mean kNN; `neighbours = 1` is plain 1-NN).
//!
//! For the last two, scores are a softmax over −distance² / τ, with τ the mean squared
//! distance of the live images to their own label mean (exact from the moments).
//!
//! Open set, for every method: a photo whose Mahalanobis distance to the nearest label
//! (under the discriminant's within-label covariance, in units of the archive images' own
//! mean distance) is above `unknown_distance` is answered `unknown`.

pub mod discriminant;

use crate::record::ImageRow;
use crate::state::Checkpoint;
use crate::stats::{LabelStats, PcaModel};
use anyhow::{Context, Result};
use discriminant::{Discriminant, Shrinkage};
use serde::{Deserialize, Serialize};

/// How to turn distances into labels (`[classify]` in the config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifyConfig {
    /// `lda`, `nearest_mean` or `knn`.
    pub method: Method,
    /// Neighbours per label for `knn`.
    pub neighbours: usize,
    /// Labels returned per image.
    pub top: usize,
    /// Shrinkage of the discriminant's covariance: a weight in [0, 1] or `"oas"`.
    pub shrinkage: Shrinkage,
    /// Divides the discriminant's log-posteriors before the softmax (1 = the Gaussian
    /// model's own posterior).
    pub temperature: f64,
    /// Photos farther than this from every label (squared Mahalanobis distance, in units
    /// of the archive images' own mean distance to their label) are `unknown`; `inf`
    /// turns the check off.
    pub unknown_distance: f64,
}

impl Default for ClassifyConfig {
    fn default() -> Self {
        ClassifyConfig {
            // Measured (README, "Accuracy"; examples/accuracy): the shrinkage,
            // temperature and threshold its protocol 1 chooses on half the labels of
            // Training (grouped validation, never Test), rounded. With them LDA is the
            // most accurate method on Test and on perturbed Test photos.
            method: Method::Lda,
            neighbours: 3,
            top: 3,
            shrinkage: Shrinkage::Fixed(0.9),
            temperature: 32.0,
            unknown_distance: 30.0,
        }
    }
}

/// The classification rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Shrinkage linear discriminant from the exact statistics.
    Lda,
    /// Local-mean k nearest neighbours.
    Knn,
    /// Nearest label mean.
    NearestMean,
}

/// The answer for a photo far from every label.
pub const UNKNOWN: &str = "unknown";

/// One label and its score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelScore {
    /// The label (folder name).
    pub label: String,
    /// Softmax score in [0, 1].
    pub score: f64,
}

/// What classify says about one photo.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The best label, or `unknown` when the photo is far from every label.
    pub answer: String,
    /// False when the photo is far from every label (then `answer` is `unknown`).
    pub known: bool,
    /// Squared Mahalanobis distance to the nearest label, in units of the archive
    /// images' own mean distance (None while too few images to fit the discriminant).
    pub distance: Option<f64>,
    /// Best labels first (listed even when unknown).
    pub labels: Vec<LabelScore>,
    /// Nearest KMeans cluster (None before the clustering is seeded).
    pub cluster: Option<usize>,
    /// Epoch of the models used.
    pub model_epoch: u64,
}

/// Label means (and, for kNN, labelled points) in PCA space, and the models that put
/// them there.
pub struct Classifier {
    pca: PcaModel,
    epoch: u64,
    labels: Vec<String>,
    /// Stored points, for `knn` only.
    points: Option<Points>,
    /// Label means in PCA space.
    means: Vec<Vec<f64>>,
    tau: f64,
    /// The discriminant (None while there are no more images than labels).
    discriminant: Option<Discriminant>,
    /// KMeans centroids in PCA space (projected once, not per photo).
    centroids: Vec<Vec<f64>>,
    config: ClassifyConfig,
}

/// Labelled points in PCA space (what kNN compares against: O(images x k) memory).
struct Points {
    /// Label index of each stored point.
    label: Vec<u32>,
    /// Row-major, `pca.k` values each.
    values: Vec<f32>,
}

impl Classifier {
    /// The classifier of a checkpoint, built from the per-label sums and the moments
    /// alone (O(labels x d + d²), no stored point read); kNN needs [`Self::with_points`].
    pub fn new(checkpoint: &Checkpoint, config: ClassifyConfig) -> Result<Self> {
        let pca = checkpoint
            .models
            .pca
            .clone()
            .context("no PCA model yet: the output holds fewer than two images")?;
        anyhow::ensure!(
            config.neighbours > 0,
            "[classify] neighbours must be positive"
        );
        let dim = checkpoint.models.moments.dim;
        let live: Vec<(&String, &LabelStats)> =
            checkpoint.labels.iter().filter(|(_, s)| s.n > 0).collect();
        let labels: Vec<String> = live.iter().map(|(l, _)| (*l).clone()).collect();
        let raw_means: Vec<Vec<f64>> = live.iter().map(|(_, s)| s.mean(dim)).collect();
        let means = pca.project_many(&raw_means);
        let stats: Vec<&LabelStats> = live.iter().map(|(_, s)| *s).collect();
        anyhow::ensure!(
            config.temperature > 0.0,
            "[classify] temperature must be positive"
        );
        let discriminant =
            Discriminant::fit(&checkpoint.models.moments, &stats, &pca, config.shrinkage);
        // τ scores the distance-based rankings only: `lda` needs it only as the fallback
        // while its discriminant cannot be fitted (a d x d product, so not paid for nothing).
        let tau = if config.method == Method::Lda && discriminant.is_some() {
            1.0
        } else {
            within_label_spread(&checkpoint.models.moments, &stats, &pca).max(f64::MIN_POSITIVE)
        };
        Ok(Classifier {
            discriminant,
            centroids: checkpoint.models.kmeans.projected_centroids(&pca),
            epoch: checkpoint.epoch,
            pca,
            labels,
            points: None,
            means,
            tau,
            config,
        })
    }

    /// The classifier with the stored points kNN needs (`rows`: the live rows).
    pub fn with_points(
        checkpoint: &Checkpoint,
        rows: &[ImageRow],
        config: ClassifyConfig,
    ) -> Result<Self> {
        let mut classifier = Self::new(checkpoint, config)?;
        let k = classifier.pca.k;
        let mut values = Vec::with_capacity(rows.len() * k);
        let mut label = Vec::with_capacity(rows.len());
        for block in rows.chunks(4096) {
            let raw: Vec<Vec<f64>> = block.iter().map(|r| r.embedding.to_f64()).collect();
            for (row, p) in block.iter().zip(classifier.pca.project_many(&raw)) {
                let l = classifier
                    .labels
                    .binary_search(&row.label.0)
                    .map_err(|_| anyhow::anyhow!("{} has no label statistics", row.key))?;
                values.extend(p.iter().map(|&v| v as f32));
                label.push(l as u32);
            }
        }
        classifier.points = Some(Points { label, values });
        Ok(classifier)
    }

    /// Labels known to the classifier.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Epoch of the models in use.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Stored images the classifier holds (0 unless kNN).
    pub fn points(&self) -> usize {
        self.points.as_ref().map_or(0, |p| p.label.len())
    }

    /// The fitted discriminant, if any.
    pub fn discriminant(&self) -> Option<&Discriminant> {
        self.discriminant.as_ref()
    }

    /// Classifies one raw embedding (as `Embedding::to_f64` gives it).
    pub fn predict(&self, embedding: &[f64]) -> Prediction {
        let p = self.pca.project(embedding);
        let scores = self.discriminant.as_ref().map(|d| d.score(embedding));
        let labels = match (self.config.method, &scores) {
            (Method::Lda, Some(s)) => self.rank_posterior(&s.log_posterior),
            (Method::Knn, _) if self.points.is_some() => {
                let points = self.points.as_ref().expect("checked");
                self.rank(&self.local_mean_distances(points, &p))
            }
            // nearest_mean, and the fallbacks while the discriminant cannot be fitted
            // or kNN has no points.
            _ => self.rank(&self.means.iter().map(|m| dist2(&p, m)).collect::<Vec<_>>()),
        };
        let distance = scores
            .as_ref()
            .zip(self.discriminant.as_ref())
            .map(|(s, d)| {
                d.typical_distance(s.distance.iter().copied().fold(f64::INFINITY, f64::min))
            });
        let known = distance.is_none_or(|d| d <= self.config.unknown_distance);
        // The nearest centroid, by the KMeans stage's own rule (ties to the lower index).
        let cluster = (!self.centroids.is_empty())
            .then(|| crate::stats::kmeans::nearest(&self.centroids, &p));
        Prediction {
            answer: if known {
                labels[0].label.clone()
            } else {
                UNKNOWN.into()
            },
            known,
            distance,
            labels,
            cluster,
            model_epoch: self.epoch,
        }
    }

    /// Labels by posterior: softmax of the log-posteriors over the temperature.
    fn rank_posterior(&self, log_posterior: &[f64]) -> Vec<LabelScore> {
        let weights = discriminant::posterior(log_posterior, self.config.temperature);
        // Highest log-posterior first: the order of −log-posterior ascending.
        let cost: Vec<f64> = log_posterior.iter().map(|l| -l).collect();
        self.top_labels(&cost, &weights)
    }

    /// Per label, the mean squared distance to its `neighbours` nearest stored points.
    fn local_mean_distances(&self, points: &Points, p: &[f64]) -> Vec<f64> {
        let (k, m) = (self.pca.k, self.config.neighbours);
        // Per label, the m smallest distances so far, ascending.
        let mut best: Vec<Vec<f64>> = vec![Vec::with_capacity(m + 1); self.labels.len()];
        for (i, &l) in points.label.iter().enumerate() {
            let d = dist2_f32(&points.values[i * k..(i + 1) * k], p);
            let list = &mut best[l as usize];
            if list.len() < m || d < *list.last().expect("non-empty") {
                let at = list.partition_point(|&x| x <= d);
                list.insert(at, d);
                list.truncate(m);
            }
        }
        best.iter()
            .map(|l| l.iter().sum::<f64>() / l.len().max(1) as f64)
            .collect()
    }

    fn rank(&self, distances: &[f64]) -> Vec<LabelScore> {
        let min = distances.iter().copied().fold(f64::INFINITY, f64::min);
        let weights: Vec<f64> = distances
            .iter()
            .map(|d| (-(d - min) / self.tau).exp())
            .collect();
        self.top_labels(distances, &weights)
    }

    /// The `top` labels of lowest `cost`, scored by their share of `weights`. Ties go to
    /// the label that sorts first, so answers are reproducible.
    fn top_labels(&self, cost: &[f64], weights: &[f64]) -> Vec<LabelScore> {
        let total: f64 = weights.iter().sum();
        let mut order: Vec<usize> = (0..cost.len()).collect();
        order.sort_by(|&a, &b| cost[a].total_cmp(&cost[b]).then(a.cmp(&b)));
        order
            .into_iter()
            .take(self.config.top.max(1))
            .map(|i| LabelScore {
                label: self.labels[i].clone(),
                score: weights[i] / total,
            })
            .collect()
    }
}

/// Loads an output's committed state and builds its classifier: from the per-label
/// statistics alone for `nearest_mean`, reading the stored points only for `knn`.
pub fn load(
    store: &dyn crate::sink::OutputStore,
    config: &ClassifyConfig,
) -> Result<(Checkpoint, Classifier)> {
    let checkpoint = crate::state::load_committed(store)?;
    let classifier = match config.method {
        Method::Lda | Method::NearestMean => Classifier::new(&checkpoint, config.clone())?,
        Method::Knn => {
            let rows: Vec<ImageRow> = crate::state::live_rows(store, &checkpoint)?
                .into_iter()
                .map(|(row, _)| row)
                .collect();
            Classifier::with_points(&checkpoint, &rows, config.clone())?
        }
    };
    Ok((checkpoint, classifier))
}

/// The mean squared distance of the live images to their label mean in PCA space,
/// exactly from the moments and the per-label sums (no point read):
/// `(1/n) tr(A S_w Aᵀ)` with `A = Vᵀ D⁻¹` the projection and
/// `S_w = Σxxᵀ − Σ_c s_c s_cᵀ / n_c` the within-label scatter.
pub fn within_label_spread(
    moments: &crate::stats::Moments,
    labels: &[&LabelStats],
    pca: &PcaModel,
) -> f64 {
    use faer::Mat;
    let (d, k) = (moments.dim, pca.k);
    if moments.n <= 0 || k == 0 {
        return 0.0;
    }
    let scale = (1u64 << crate::record::FIXED_POINT_SHIFT) as f64;
    // B = D⁻¹ V (d x k): the projection's rows, unstandardized.
    let std = &pca.scaler.std;
    let b = Mat::<f64>::from_fn(d, k, |r, c| {
        if std[r] > 0.0 {
            pca.components[c][r] / std[r]
        } else {
            0.0
        }
    });
    let ss = Mat::<f64>::from_fn(d, d, |i, j| {
        let (i, j) = (i.min(j), i.max(j));
        moments.second(i, j) as f64 / (scale * scale)
    });
    let mut ssb = Mat::<f64>::zeros(d, k);
    faer::linalg::matmul::matmul(
        ssb.as_mut(),
        faer::Accum::Replace,
        ss.as_ref(),
        b.as_ref(),
        1.0,
        faer::Par::rayon(0),
    );
    let mut total = 0.0;
    for c in 0..k {
        total += (0..d).map(|r| b[(r, c)] * ssb[(r, c)]).sum::<f64>();
    }
    for stats in labels.iter().filter(|s| s.n > 0) {
        for c in 0..k {
            let dot: f64 = (0..d)
                .map(|r| b[(r, c)] * stats.sum[r] as f64 / scale)
                .sum();
            total -= dot * dot / stats.n as f64;
        }
    }
    (total / moments.n as f64).max(0.0)
}

fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

fn dist2_f32(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, y)| {
            let d = x as f64 - y;
            d * d
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::EmbedConfig;
    use crate::record::{Embedding, ImageKey, Label};
    use crate::stats::{moments::moments_of, pca, PcaConfig};

    /// Two well-separated labels in 4-d: every method must name each training point's
    /// label, and scores must be ordered and sum to at most 1.
    fn two_blobs() -> (Checkpoint, Vec<ImageRow>) {
        let mut rows = Vec::new();
        for i in 0..20 {
            for (label, centre) in [("Apple", 1.0f32), ("Kiwi", 4.0f32)] {
                let j = i as f32 * 0.01;
                let x = [centre + j, centre - j, 2.0 + j * 0.5, centre * 0.5 + j];
                rows.push(ImageRow {
                    key: ImageKey(format!("{label}/{i}.jpg")),
                    label: Label(label.into()),
                    embedding: Embedding::quantize(&x).unwrap(),
                });
            }
        }
        let mut checkpoint = Checkpoint::empty("src".into(), 4, EmbedConfig::default());
        checkpoint.models.moments = moments_of(4, rows.iter().map(|r| (&r.embedding, 1)));
        checkpoint.models.pca = pca::fit(&checkpoint.models.moments, &PcaConfig::default());
        for row in &rows {
            let stats = checkpoint.labels.entry(row.label.0.clone()).or_default();
            let (n, sum) = LabelStats::update_of(&row.embedding);
            stats.n += n;
            stats.sum.resize(sum.len(), 0);
            stats.sum.iter_mut().zip(sum).for_each(|(a, b)| *a += b);
        }
        (checkpoint, rows)
    }

    /// Batch twin of the exact spread: the mean squared distance of the projected
    /// points to their projected label means.
    #[test]
    fn spread_from_moments_equals_spread_of_the_points() {
        let (checkpoint, rows) = two_blobs();
        let pca = checkpoint.models.pca.as_ref().unwrap();
        let stats: Vec<&LabelStats> = checkpoint.labels.values().collect();
        let exact = within_label_spread(&checkpoint.models.moments, &stats, pca);
        let mut total = 0.0;
        for (label, s) in &checkpoint.labels {
            let mean = pca.project(&s.mean(4));
            for row in rows.iter().filter(|r| &r.label.0 == label) {
                total += dist2(&pca.project(&row.embedding.to_f64()), &mean);
            }
        }
        let batch = total / rows.len() as f64;
        assert!(batch > 0.0);
        assert!((exact - batch).abs() <= 1e-9 * batch, "{exact} vs {batch}");
    }

    #[test]
    fn both_methods_name_well_separated_labels() {
        let (checkpoint, rows) = two_blobs();
        for method in [Method::Lda, Method::Knn, Method::NearestMean] {
            let config = ClassifyConfig {
                method,
                top: 2,
                ..Default::default()
            };
            let c = match method {
                Method::Knn => Classifier::with_points(&checkpoint, &rows, config).unwrap(),
                Method::Lda | Method::NearestMean => Classifier::new(&checkpoint, config).unwrap(),
            };
            let held = if method == Method::Knn { rows.len() } else { 0 };
            assert_eq!(c.points(), held, "nearest mean holds no point");
            assert_eq!(c.labels(), ["Apple", "Kiwi"]);
            for row in &rows {
                let p = c.predict(&row.embedding.to_f64());
                assert_eq!(p.labels[0].label, row.label.0, "{method:?}");
                assert!(p.labels[0].score >= p.labels[1].score);
                let total: f64 = p.labels.iter().map(|l| l.score).sum();
                assert!((total - 1.0).abs() < 1e-9, "{total}");
                assert_eq!(p.cluster, None, "no KMeans seeded in this checkpoint");
                assert!(
                    p.known,
                    "{method:?}: a training point is known: {:?}",
                    p.distance
                );
                assert_eq!(p.answer, p.labels[0].label);
            }
        }
    }

    /// A point far from both blobs is unknown, whatever the method, with its labels
    /// still ranked.
    #[test]
    fn far_points_are_unknown() {
        let (checkpoint, _) = two_blobs();
        let c = Classifier::new(&checkpoint, ClassifyConfig::default()).unwrap();
        let p = c.predict(&[40.0, -30.0, 9.0, 25.0]);
        assert!(!p.known, "{:?}", p.distance);
        assert_eq!(p.answer, UNKNOWN);
        assert_eq!(p.labels.len(), 2);
        let off = ClassifyConfig {
            unknown_distance: f64::INFINITY,
            ..Default::default()
        };
        let p = Classifier::new(&checkpoint, off)
            .unwrap()
            .predict(&[40.0, -30.0, 9.0, 25.0]);
        assert!(p.known, "the check can be turned off");
    }

    #[test]
    fn refuses_state_without_pca() {
        let checkpoint = Checkpoint::empty("src".into(), 4, EmbedConfig::default());
        let err = Classifier::new(&checkpoint, ClassifyConfig::default())
            .err()
            .expect("no PCA");
        assert!(format!("{err:#}").contains("no PCA model"));
    }
}
