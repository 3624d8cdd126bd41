//! The batch twin of the incremental statistics: StandardScaler + PCA computed directly
//! over a set of embeddings in f64, with nalgebra's eigensolver (independent of faer).
//! Tests compare the streamed models against it.

use super::pca::{choose_k, fix_sign, PcaConfig};
use nalgebra::{DMatrix, SymmetricEigen};

/// What the batch computation yields, for comparison with [`super::pca::PcaModel`].
pub struct BatchPca {
    /// Per-dimension mean.
    pub mean: Vec<f64>,
    /// Per-dimension sample std.
    pub std: Vec<f64>,
    /// Explained variance ratios, descending.
    pub explained_variance_ratio: Vec<f64>,
    /// Kept components, sign-fixed.
    pub components: Vec<Vec<f64>>,
}

/// Standardizes `rows` (n x d) and eigendecomposes their sample covariance.
pub fn batch_pca(rows: &[Vec<f64>], config: &PcaConfig) -> BatchPca {
    let n = rows.len();
    let d = rows[0].len();
    let mean: Vec<f64> = (0..d)
        .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n as f64)
        .collect();
    let std: Vec<f64> = (0..d)
        .map(|j| {
            (rows.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        })
        .collect();
    let z = DMatrix::from_fn(n, d, |i, j| {
        if std[j] > 0.0 {
            (rows[i][j] - mean[j]) / std[j]
        } else {
            0.0
        }
    });
    let cov = (z.transpose() * &z) / (n - 1) as f64;
    let eig = SymmetricEigen::new(cov);
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let values: Vec<f64> = order.iter().map(|&i| eig.eigenvalues[i].max(0.0)).collect();
    let total: f64 = values.iter().sum();
    let ratios: Vec<f64> = values.iter().map(|v| v / total).collect();
    let k = choose_k(&ratios, config);
    let components = order[..k]
        .iter()
        .map(|&c| {
            let mut v: Vec<f64> = eig.eigenvectors.column(c).iter().copied().collect();
            fix_sign(&mut v);
            v
        })
        .collect();
    BatchPca {
        mean,
        std,
        explained_variance_ratio: ratios,
        components,
    }
}

/// Largest principal angle (radians) between the spans of two sets of orthonormal rows.
pub fn max_principal_angle(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len(), "subspaces of different dimension");
    let k = a.len();
    let m = DMatrix::from_fn(k, k, |i, j| {
        a[i].iter().zip(&b[j]).map(|(x, y)| x * y).sum::<f64>()
    });
    let smallest = m
        .svd(false, false)
        .singular_values
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min);
    smallest.clamp(-1.0, 1.0).acos()
}
