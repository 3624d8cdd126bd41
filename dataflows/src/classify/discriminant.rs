//! Regularized linear discriminant analysis from sufficient statistics: the global
//! moment matrix Σxxᵀ the pipeline keeps exactly, and each label's count and sum.
//!
//! In the scaler's standardized coordinates `z = D⁻¹(x − m)`, the within-label scatter is
//! `S_w = Σzzᵀ − Σ_c n_c μ_c μ_cᵀ` (exact from the moments and the per-label sums, so it
//! is retracted by deletions and identical for any worker count), the pooled covariance
//! `Σ = S_w / (n − C)`, shrunk towards `(tr Σ / d)·I` (in standardized units every
//! dimension has total variance 1, so one scalar target fits all). A photo's score for
//! label c is the Gaussian log-posterior `zᵀΣ⁻¹μ_c − ½μ_cᵀΣ⁻¹μ_c + log π_c`, and its
//! squared Mahalanobis distance to the label is `(z − μ_c)ᵀΣ⁻¹(z − μ_c)`.
//!
//! The fit (one Cholesky factorization and inverse at d = 1280, well under a second) runs
//! where the classifier is loaded, from the published statistics: storing it would add
//! d x C floats to every epoch's checkpoint (5 MB at 490 labels) for a result that is a
//! fixed function of what is already published. Memory: the d x d precision plus d x C
//! weights, independent of the archive size.

use crate::stats::{dot, LabelStats, Moments, PcaModel};
use faer::linalg::solvers::DenseSolveCore;
use faer::{Mat, Side};
use serde::{Deserialize, Serialize};

/// How much to shrink the pooled covariance towards a multiple of the identity.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Shrinkage {
    /// A fixed weight of the identity target, in [0, 1].
    Fixed(f64),
    /// A rule computed from the statistics.
    Rule(ShrinkageRule),
}

/// Shrinkage weights computed from the covariance itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShrinkageRule {
    /// Oracle approximating shrinkage (Chen, Wiesel, Eldar & Hero, 2010): needs only the
    /// sample covariance, not the individual points, so it fits sufficient statistics.
    Oas,
}

/// A fitted discriminant: O(d² + C·d) memory, whatever the archive size.
pub struct Discriminant {
    /// Global mean and 1/std of each dimension (0 for a constant dimension).
    centre: Vec<f64>,
    inv_std: Vec<f64>,
    /// Σ⁻¹ (d x d; symmetric, so each column is also a row), for the photo's own term
    /// zᵀΣ⁻¹z.
    precision: Mat<f64>,
    /// Row c: Σ⁻¹μ_c.
    weights: Vec<Vec<f64>>,
    /// μ_cᵀΣ⁻¹μ_c.
    centre_norm: Vec<f64>,
    /// log π_c (share of the live images).
    log_prior: Vec<f64>,
    /// The training images' own mean squared distance to their label: the unit of
    /// [`Discriminant::typical_distance`].
    typical: f64,
    /// The shrinkage weight used.
    pub shrinkage: f64,
}

/// One photo scored against every label.
pub struct Scores {
    /// Log-posterior (up to a shared constant) per label.
    pub log_posterior: Vec<f64>,
    /// Squared Mahalanobis distance to each label.
    pub distance: Vec<f64>,
}

impl Discriminant {
    /// Fits the discriminant, or None when there are too few images to estimate a
    /// covariance (no more images than labels).
    pub fn fit(
        moments: &Moments,
        labels: &[&LabelStats],
        pca: &PcaModel,
        shrinkage: Shrinkage,
    ) -> Option<Discriminant> {
        let d = moments.dim;
        let n = moments.n;
        let classes = labels.len();
        if classes == 0 || n <= classes as i64 {
            return None;
        }
        let scale = (1u64 << crate::record::FIXED_POINT_SHIFT) as f64;
        let centre = pca.scaler.mean.clone();
        let inv_std: Vec<f64> = pca
            .scaler
            .std
            .iter()
            .map(|&s| if s > 0.0 { 1.0 / s } else { 0.0 })
            .collect();
        // Label means in standardized units.
        let means: Vec<Vec<f64>> = labels
            .iter()
            .map(|s| {
                (0..d)
                    .map(|j| (s.sum[j] as f64 / scale / s.n as f64 - centre[j]) * inv_std[j])
                    .collect()
            })
            .collect();
        // S_w = D⁻¹ (Σxxᵀ − Σ_c s_c s_cᵀ / n_c) D⁻¹ (the global centre cancels).
        let mut scatter = Mat::<f64>::from_fn(d, d, |i, j| {
            let (a, b) = (i.min(j), i.max(j));
            moments.second(a, b) as f64 / (scale * scale)
        });
        let sums = Mat::<f64>::from_fn(classes, d, |c, j| {
            labels[c].sum[j] as f64 / scale / (labels[c].n as f64).sqrt()
        });
        faer::linalg::matmul::matmul(
            scatter.as_mut(),
            faer::Accum::Add,
            sums.transpose(),
            sums.as_ref(),
            -1.0,
            faer::Par::rayon(0),
        );
        for i in 0..d {
            for j in 0..d {
                scatter[(i, j)] *= inv_std[i] * inv_std[j];
            }
        }
        // Σ = S_w / dof, never materialised: the shrunk matrix is built straight from
        // S_w, and each d x d temporary is dropped as soon as the next exists (peak three
        // of them, 39 MB at d = 1280).
        let dof = (n - classes as i64) as f64;
        let trace: f64 = (0..d).map(|i| scatter[(i, i)]).sum::<f64>() / dof;
        let target = (trace / d as f64).max(f64::MIN_POSITIVE);
        let alpha = match shrinkage {
            Shrinkage::Fixed(a) => a.clamp(0.0, 1.0),
            Shrinkage::Rule(ShrinkageRule::Oas) => oas(&scatter, dof),
        };
        let mut shrunk = Mat::<f64>::from_fn(d, d, |i, j| (1.0 - alpha) * scatter[(i, j)] / dof);
        for i in 0..d {
            // A constant dimension carries nothing: keep it out of the factorization.
            shrunk[(i, i)] += if inv_std[i] > 0.0 {
                alpha * target
            } else {
                1.0
            };
        }
        let llt = shrunk.llt(Side::Lower).ok()?;
        drop(shrunk);
        let precision = llt.inverse();
        drop(llt);
        let weights: Vec<Vec<f64>> = means
            .iter()
            .map(|m| {
                let m = faer::ColRef::from_slice(m);
                let w = &precision * m;
                (0..d).map(|i| w[i]).collect()
            })
            .collect();
        let centre_norm = weights.iter().zip(&means).map(|(w, m)| dot(w, m)).collect();
        let log_prior = labels
            .iter()
            .map(|s| (s.n as f64 / n as f64).ln())
            .collect();
        // tr(Σ⁻¹ S_w) / n: both symmetric, so the sum of their elementwise product.
        let mut trace_ps = 0.0;
        for j in 0..d {
            for i in 0..d {
                trace_ps += precision[(i, j)] * scatter[(i, j)];
            }
        }
        drop(scatter);
        Some(Discriminant {
            centre,
            inv_std,
            precision,
            weights,
            centre_norm,
            log_prior,
            typical: (trace_ps / n as f64).max(f64::MIN_POSITIVE),
            shrinkage: alpha,
        })
    }

    /// Scores one raw embedding against every label.
    pub fn score(&self, x: &[f64]) -> Scores {
        let z: Vec<f64> = x
            .iter()
            .zip(&self.centre)
            .zip(&self.inv_std)
            .map(|((x, m), s)| (x - m) * s)
            .collect();
        // Plain loops: a d x d matrix-vector product (1.6M multiply-adds at d = 1280)
        // vectorises well and needs no thread pool per request.
        let own: f64 = (0..z.len())
            .map(|j| z[j] * dot(self.precision.col_as_slice(j), &z))
            .sum();
        let mut log_posterior = Vec::with_capacity(self.weights.len());
        let mut distance = Vec::with_capacity(self.weights.len());
        for c in 0..self.weights.len() {
            let cross = dot(&self.weights[c], &z);
            log_posterior.push(cross - 0.5 * self.centre_norm[c] + self.log_prior[c]);
            distance.push((own - 2.0 * cross + self.centre_norm[c]).max(0.0));
        }
        Scores {
            log_posterior,
            distance,
        }
    }

    /// A squared distance in units of the training images' own mean squared distance to
    /// their label (1 = as typical as the archive's images; scale-free, so one threshold
    /// serves archives of any size and dimension).
    pub fn typical_distance(&self, distance: f64) -> f64 {
        distance / self.typical
    }
}

/// Probabilities from log-posteriors: their softmax after dividing by `temperature`.
pub fn posterior(log_posterior: &[f64], temperature: f64) -> Vec<f64> {
    let max = log_posterior
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = log_posterior
        .iter()
        .map(|l| ((l - max) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    weights.iter().map(|w| w / total).collect()
}

/// The OAS shrinkage weight of the covariance `scatter / n`, estimated with `n`
/// degrees of freedom.
fn oas(scatter: &Mat<f64>, n: f64) -> f64 {
    let p = scatter.nrows() as f64;
    let trace: f64 = (0..scatter.nrows()).map(|i| scatter[(i, i)]).sum::<f64>() / n;
    let mut trace_sq = 0.0;
    for j in 0..scatter.ncols() {
        for i in 0..scatter.nrows() {
            trace_sq += (scatter[(i, j)] / n) * (scatter[(i, j)] / n);
        }
    }
    let num = (1.0 - 2.0 / p) * trace_sq + trace * trace;
    let den = (n + 1.0 - 2.0 / p) * (trace_sq - trace * trace / p);
    if den <= 0.0 {
        1.0
    } else {
        (num / den).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Embedding;
    use crate::stats::{moments::moments_of, pca, PcaConfig};
    use nalgebra::{DMatrix, DVector};

    /// Three labels in 5-d, deterministic, with correlated within-label noise.
    fn points() -> Vec<(usize, Embedding)> {
        let mut out = Vec::new();
        let mut state = 7u64;
        let mut noise = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        for c in 0..3 {
            for _ in 0..12 + 3 * c {
                let (a, b) = (noise(), noise());
                let x = [
                    c as f64 + a,
                    2.0 * a + 0.3 * b,
                    -(c as f64) + b,
                    0.5 + 0.1 * noise(),
                    a - b + 0.2 * noise(),
                ];
                let x: Vec<f32> = x.iter().map(|&v| v as f32).collect();
                out.push((c, Embedding::quantize(&x).unwrap()));
            }
        }
        out
    }

    /// Batch twin: the discriminant from the statistics equals one computed from the
    /// points themselves (standardize, pool the residuals, shrink, invert with nalgebra).
    #[test]
    fn fit_from_statistics_equals_fit_from_points() {
        let points = points();
        let d = 5;
        let moments = moments_of(d, points.iter().map(|(_, e)| (e, 1)));
        let pca = pca::fit(&moments, &PcaConfig::default()).unwrap();
        let mut stats = vec![LabelStats::default(); 3];
        for (c, e) in &points {
            let (n, sum) = LabelStats::update_of(e);
            stats[*c].n += n;
            stats[*c].sum.resize(d, 0);
            stats[*c].sum.iter_mut().zip(sum).for_each(|(a, b)| *a += b);
        }
        let refs: Vec<&LabelStats> = stats.iter().collect();
        let alpha = 0.2;
        let fit = Discriminant::fit(&moments, &refs, &pca, Shrinkage::Fixed(alpha)).unwrap();

        let z = |x: &[f64]| -> DVector<f64> {
            DVector::from_iterator(
                d,
                (0..d).map(|j| (x[j] - pca.scaler.mean[j]) / pca.scaler.std[j]),
            )
        };
        let zs: Vec<(usize, DVector<f64>)> =
            points.iter().map(|(c, e)| (*c, z(&e.to_f64()))).collect();
        let mut means = vec![DVector::<f64>::zeros(d); 3];
        let mut counts = [0.0; 3];
        for (c, v) in &zs {
            means[*c] += v;
            counts[*c] += 1.0;
        }
        for c in 0..3 {
            means[c] /= counts[c];
        }
        let mut scatter = DMatrix::<f64>::zeros(d, d);
        for (c, v) in &zs {
            let r = v - &means[*c];
            scatter += &r * r.transpose();
        }
        let n = zs.len() as f64;
        let cov = &scatter / (n - 3.0);
        let target = cov.trace() / d as f64;
        let shrunk = cov * (1.0 - alpha) + DMatrix::<f64>::identity(d, d) * (alpha * target);
        let precision = shrunk.try_inverse().unwrap();

        let probe = [0.7, 1.1, -0.4, 0.52, 0.3];
        let scores = fit.score(&probe);
        let zp = z(&probe);
        for c in 0..3 {
            let r = &zp - &means[c];
            let dist = (r.transpose() * &precision * &r)[(0, 0)];
            assert!(
                (scores.distance[c] - dist).abs() < 1e-8 * dist.max(1.0),
                "{c}: {} vs {dist}",
                scores.distance[c]
            );
            let lp = (zp.transpose() * &precision * &means[c])[(0, 0)]
                - 0.5 * (means[c].transpose() * &precision * &means[c])[(0, 0)]
                + (counts[c] / n).ln();
            assert!((scores.log_posterior[c] - lp).abs() < 1e-8 * lp.abs().max(1.0));
        }
        // The unit of typical_distance: the points' own mean distance to their label.
        let own: f64 = zs
            .iter()
            .map(|(c, v)| {
                let r = v - &means[*c];
                (r.transpose() * &precision * &r)[(0, 0)]
            })
            .sum::<f64>()
            / n;
        assert!((fit.typical_distance(own) - 1.0).abs() < 1e-8);
    }

    #[test]
    fn oas_shrinks_less_with_more_data() {
        let s = Mat::<f64>::from_fn(4, 4, |i, j| if i == j { 1.0 + i as f64 } else { 0.3 });
        let few = oas(&(&s * faer::Scale(10.0)), 10.0);
        let many = oas(&(&s * faer::Scale(10_000.0)), 10_000.0);
        assert!(few > many && many >= 0.0 && few <= 1.0, "{few} {many}");
    }

    #[test]
    fn too_few_images_fit_nothing() {
        let points = &points()[..2];
        let moments = moments_of(5, points.iter().map(|(_, e)| (e, 1)));
        let pca = pca::fit(&moments, &PcaConfig::default()).unwrap();
        let (n, sum) = LabelStats::update_of(&points[0].1);
        let mut s = LabelStats { n, sum };
        let (n2, sum2) = LabelStats::update_of(&points[1].1);
        s.n += n2;
        s.sum.iter_mut().zip(sum2).for_each(|(a, b)| *a += b);
        let two = [&s, &s];
        assert!(Discriminant::fit(&moments, &two, &pca, Shrinkage::Fixed(0.1)).is_none());
    }
}
