//! Online KMeans over PCA features, deterministic by construction. Centroids are kept in
//! raw embedding space as weighted means: the PCA map is affine, so projecting a raw mean
//! equals the mean of the projections, and a new PCA basis needs no centroid rotation.
//! Each epoch's points are assigned with the previous centroids under the current PCA,
//! then folded in per cluster in index order (mini-batch update, with Spark
//! StreamingKMeans-style decay). The result depends only on the epoch's contents, never
//! on worker count or arrival order within it.

use super::dot;
use super::pca::PcaModel;
use crate::record::{Embedding, ImageKey};
use serde::{Deserialize, Serialize};

/// Settings of the clustering (`[kmeans]` in the config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KMeansConfig {
    /// Number of clusters.
    pub k: usize,
    /// Weight kept by old points per epoch (1.0 = remember everything), as Spark's
    /// decayFactor with timeUnit "batches".
    pub decay: f64,
    /// Half-life in epochs; overrides `decay` with `0.5^(1/half_life)`.
    pub half_life: Option<f64>,
    /// Seed of the k-means++ initialisation.
    pub seed: u64,
    /// Lloyd iterations run on the seeding batch.
    pub init_iterations: usize,
}

impl Default for KMeansConfig {
    fn default() -> Self {
        KMeansConfig {
            k: 10,
            decay: 1.0,
            half_life: None,
            seed: 42,
            init_iterations: 20,
        }
    }
}

impl KMeansConfig {
    /// The effective per-epoch decay factor.
    pub fn decay_factor(&self) -> f64 {
        match self.half_life {
            Some(h) if h > 0.0 => 0.5f64.powf(1.0 / h),
            _ => self.decay,
        }
    }
}

/// Clustering state: raw-space centroids with their weights.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KMeans {
    /// Centroids in raw embedding space (empty until seeded).
    pub centroids: Vec<Vec<f64>>,
    /// Weight (decayed point count) of each centroid.
    pub weights: Vec<f64>,
    /// Points seen before seeding was possible (fewer than k so far), in key order.
    pub pending: Vec<(ImageKey, Vec<f64>)>,
}

/// One point of an epoch: its key (for a deterministic order), raw values and diff.
pub type EpochPoint = (ImageKey, Embedding, i64);

impl KMeans {
    /// Folds one epoch's points (any order) into the clustering, using `pca` for distances.
    pub fn update(&mut self, points: Vec<EpochPoint>, pca: &PcaModel, config: &KMeansConfig) {
        self.update_with(points, pca, config, faer::Par::Seq)
    }

    /// [`Self::update`] with the projections' matrix products run as `par` says.
    pub fn update_with(
        &mut self,
        mut points: Vec<EpochPoint>,
        pca: &PcaModel,
        config: &KMeansConfig,
        par: faer::Par,
    ) {
        points.sort();
        if self.centroids.is_empty() {
            self.collect_pending(points);
            if self.pending.len() >= config.k.max(1) && pca.n >= 2 {
                self.seed(pca, config);
            }
            return;
        }
        let scores = Scores::new(&self.centroids, pca);
        let d = self.centroids[0].len();
        let k = self.centroids.len();
        let (mut counts, mut sums) = (vec![0.0f64; k], vec![vec![0.0f64; d]; k]);
        // A block at a time, so an epoch's points are never all held in f64 at once.
        for block in points.chunks(256) {
            let xs: Vec<Vec<f64>> = block.iter().map(|(_, e, _)| e.to_f64()).collect();
            let nearest = scores.nearest_many(&xs, par);
            for (((_, _, diff), x), c) in block.iter().zip(&xs).zip(nearest) {
                counts[c] += *diff as f64;
                sums[c]
                    .iter_mut()
                    .zip(x)
                    .for_each(|(s, v)| *s += *diff as f64 * v);
            }
        }
        let a = config.decay_factor();
        for c in 0..k {
            let kept = a * self.weights[c];
            let w = kept + counts[c];
            if w > 0.0 && counts[c] != 0.0 {
                for (m, s) in self.centroids[c].iter_mut().zip(&sums[c]) {
                    *m = (kept * *m + s) / w;
                }
            }
            self.weights[c] = w.max(0.0);
        }
    }

    /// Keeps points until there are enough to seed (before the first PCA, or fewer than k).
    pub fn collect_pending(&mut self, points: Vec<EpochPoint>) {
        for (key, e, diff) in points {
            if diff > 0 {
                self.pending.push((key, e.to_f64()));
            } else if let Some(i) = self.pending.iter().position(|(k, _)| *k == key) {
                self.pending.remove(i);
            }
        }
        self.pending.sort_by(|a, b| a.0.cmp(&b.0));
    }

    /// k-means++ with a fixed seed over the pending points (key order), then Lloyd.
    fn seed(&mut self, pca: &PcaModel, config: &KMeansConfig) {
        let pending = std::mem::take(&mut self.pending);
        let raw: Vec<&[f64]> = pending.iter().map(|(_, x)| x.as_slice()).collect();
        let projected = pca.project_many(&raw);
        let mut rng = SplitMix64(config.seed);
        let mut chosen = vec![(rng.next() % projected.len() as u64) as usize];
        // Squared distance of every point to its nearest chosen centre, updated with each
        // new centre only (a min over the same values, so exactly what a full recount gives).
        let mut d2 = vec![f64::INFINITY; projected.len()];
        while chosen.len() < config.k {
            let newest = &projected[*chosen.last().expect("one chosen")];
            for (d, p) in d2.iter_mut().zip(&projected) {
                *d = d.min(dist2(p, newest));
            }
            let total: f64 = d2.iter().sum();
            if total <= 0.0 {
                break; // fewer distinct points than k
            }
            let mut target = rng.next_f64() * total;
            let mut pick = d2.len() - 1;
            for (i, w) in d2.iter().enumerate() {
                if target < *w {
                    pick = i;
                    break;
                }
                target -= w;
            }
            chosen.push(pick);
        }
        let mut centres: Vec<Vec<f64>> = chosen.iter().map(|&i| projected[i].clone()).collect();
        let mut assignment = vec![0usize; projected.len()];
        for _ in 0..config.init_iterations.max(1) {
            let next = assign_all(&centres, &projected);
            let stable = next == assignment;
            assignment = next;
            let (counts, sums) = cluster_sums(
                projected.iter().map(Vec::as_slice),
                &assignment,
                centres.len(),
                centres[0].len(),
            );
            for ((centre, n), sum) in centres.iter_mut().zip(counts).zip(sums) {
                if n > 0 {
                    *centre = sum.iter().map(|s| s / n as f64).collect();
                }
            }
            if stable {
                break;
            }
        }
        // The centroids live in raw space: each cluster's mean of its raw points.
        let (counts, sums) = cluster_sums(
            raw.iter().copied(),
            &assignment,
            centres.len(),
            pending[0].1.len(),
        );
        self.centroids = sums
            .into_iter()
            .zip(&counts)
            .map(|(sum, &n)| sum.iter().map(|s| s / n.max(1) as f64).collect())
            .collect();
        self.weights = counts.iter().map(|&n| n as f64).collect();
        // A centre that lost all members keeps its seed point in raw space.
        for (c, &i) in chosen.iter().enumerate() {
            if self.weights[c] == 0.0 {
                self.centroids[c] = pending[i].1.clone();
            }
        }
    }

    /// Index of the cluster nearest to raw embedding `x` under `pca`.
    pub fn assign(&self, x: &[f64], pca: &PcaModel) -> Option<usize> {
        self.assign_projected(&[pca.project(x)], pca).remove(0)
    }

    /// The nearest cluster of each point already projected by `pca` (None before
    /// seeding): one projection of the centroids for all of them.
    pub fn assign_projected(&self, points: &[Vec<f64>], pca: &PcaModel) -> Vec<Option<usize>> {
        if self.centroids.is_empty() {
            return vec![None; points.len()];
        }
        let centroids = pca.project_many(&self.centroids);
        points
            .iter()
            .map(|p| Some(nearest(&centroids, p)))
            .collect()
    }

    /// Centroids in PCA space, for reports.
    pub fn projected_centroids(&self, pca: &PcaModel) -> Vec<Vec<f64>> {
        pca.project_many(&self.centroids)
    }
}

/// The nearest centroid under a PCA without projecting the point.
///
/// With `z = D⁻¹(x − μ)` the standardized point, `V` the kept components and `q_c` a
/// centroid's projection, `‖Vᵀz − q_c‖² = ‖Vᵀz‖² − 2 x·w_c + (‖q_c‖² + 2 μ·w_c)` where
/// `w_c = D⁻¹ V q_c`. The first term is the same for every centroid, so the nearest one
/// minimises `b_c − 2 x·w_c`: k dot products of length d per point instead of a k_pca x
/// d projection (at d = 1280 and ~500 components, ~40x less work; most of a replay's
/// second pass and of every epoch's KMeans fold was that projection).
struct Scores {
    /// `w_c`, one row of length d per centroid.
    w: Vec<Vec<f64>>,
    /// `b_c`.
    b: Vec<f64>,
}

impl Scores {
    fn new(centroids: &[Vec<f64>], pca: &PcaModel) -> Self {
        let (mean, std) = (&pca.scaler.mean, &pca.scaler.std);
        let projected = pca.project_many(centroids);
        let w: Vec<Vec<f64>> = pca
            .back_project_many(&projected)
            .into_iter()
            .map(|mut w| {
                w.iter_mut().zip(std).for_each(|(w, s)| {
                    *w = if *s > 0.0 { *w / s } else { 0.0 };
                });
                w
            })
            .collect();
        let b = projected
            .iter()
            .zip(&w)
            .map(|(q, w)| q.iter().map(|v| v * v).sum::<f64>() + 2.0 * dot(mean, w))
            .collect();
        Scores { w, b }
    }

    /// The nearest centroid of one raw point; ties go to the lowest index.
    fn nearest(&self, x: &[f64]) -> usize {
        let mut best = (f64::INFINITY, 0);
        for (c, (w, b)) in self.w.iter().zip(&self.b).enumerate() {
            let score = b - 2.0 * dot(x, w);
            if score < best.0 {
                best = (score, c);
            }
        }
        best.1
    }

    /// [`Self::nearest`] of every point, in parallel when `par` says so (each point on
    /// its own, so the result does not depend on it).
    fn nearest_many(&self, xs: &[Vec<f64>], par: faer::Par) -> Vec<usize> {
        use rayon::prelude::*;
        match par {
            faer::Par::Seq => xs.iter().map(|x| self.nearest(x)).collect(),
            _ => xs.par_iter().map(|x| self.nearest(x)).collect(),
        }
    }
}

/// Squared distance, summed in four lanes so the compiler can vectorise it (a strict
/// left-to-right sum cannot be); the order is fixed, so results stay deterministic.
fn dist2(a: &[f64], b: &[f64]) -> f64 {
    let mut lanes = [0.0f64; 4];
    let (a4, b4) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = a4
        .remainder()
        .iter()
        .zip(b4.remainder())
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    for (x, y) in a4.zip(b4) {
        for l in 0..4 {
            lanes[l] += (x[l] - y[l]) * (x[l] - y[l]);
        }
    }
    (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + tail
}

/// The nearest centre of every point, computed in parallel (each point independently, so
/// the result does not depend on the thread count).
fn assign_all(centres: &[Vec<f64>], points: &[Vec<f64>]) -> Vec<usize> {
    use rayon::prelude::*;
    points.par_iter().map(|p| nearest(centres, p)).collect()
}

/// Per-cluster member counts and coordinate sums, in one pass over the points.
fn cluster_sums<'a>(
    points: impl IntoIterator<Item = &'a [f64]>,
    assignment: &[usize],
    k: usize,
    d: usize,
) -> (Vec<usize>, Vec<Vec<f64>>) {
    let (mut counts, mut sums) = (vec![0usize; k], vec![vec![0.0f64; d]; k]);
    for (p, &a) in points.into_iter().zip(assignment) {
        counts[a] += 1;
        sums[a].iter_mut().zip(p).for_each(|(s, v)| *s += v);
    }
    (counts, sums)
}

/// Nearest centre; ties go to the lowest index.
pub fn nearest(centres: &[Vec<f64>], p: &[f64]) -> usize {
    let mut best = (f64::INFINITY, 0);
    for (i, c) in centres.iter().enumerate() {
        let d = dist2(c, p);
        if d < best.0 {
            best = (d, i);
        }
    }
    best.1
}

/// A tiny fixed-seed generator (SplitMix64): the seeding must be reproducible across
/// platforms and crate versions, which a general-purpose RNG does not promise.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn next_f64(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::moments::moments_of;
    use crate::stats::pca::{fit, PcaConfig};

    /// The scores pick the same centroid as the distances between projections, and
    /// differ from them by the point's own norm only.
    #[test]
    fn scores_pick_the_centroid_nearest_in_pca_space() {
        let mut s = 11u64;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % 1000) as f32 / 250.0
        };
        let dim = 24;
        // Correlated features, one of them constant (std 0 maps it to 0).
        let points: Vec<Embedding> = (0..400)
            .map(|_| {
                let base = next();
                let x: Vec<f32> = (0..dim)
                    .map(|j| {
                        if j == 5 {
                            1.5
                        } else {
                            base * (j % 3) as f32 + next()
                        }
                    })
                    .collect();
                Embedding::quantize(&x).unwrap()
            })
            .collect();
        let moments = moments_of(dim, points.iter().map(|e| (e, 1)));
        let pca = fit(&moments, &PcaConfig::default()).unwrap();
        assert!(pca.k < dim, "a projection that drops components");
        let centroids: Vec<Vec<f64>> = points[..7].iter().map(Embedding::to_f64).collect();
        let projected = pca.project_many(&centroids);
        let scores = Scores::new(&centroids, &pca);
        let xs: Vec<Vec<f64>> = points.iter().map(Embedding::to_f64).collect();
        for (x, by_scores) in xs.iter().zip(scores.nearest_many(&xs, faer::Par::rayon(2))) {
            let p = pca.project(x);
            assert_eq!(by_scores, nearest(&projected, &p));
            let norm = dot(&p, &p);
            for (c, q) in projected.iter().enumerate() {
                let score = scores.b[c] - 2.0 * dot(x, &scores.w[c]);
                assert!((score + norm - dist2(q, &p)).abs() < 1e-9 * (1.0 + norm));
            }
        }
    }
}
