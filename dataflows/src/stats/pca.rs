//! Standardized PCA from exact moments: StandardScaler (mean, n-1 std) followed by PCA,
//! as the Spark pipeline did, which is the eigendecomposition of the correlation matrix.
//! The correlation is formed exactly in integers (`M = n·SS − s sᵀ`) and rounded once to
//! f64; faer's self-adjoint eigensolver does the rest (~0.6 s at d = 1280 here against
//! ~4 s for nalgebra's SymmetricEigen, on the path from new image to published model).

use super::moments::Moments;
use crate::record::FIXED_POINT_SHIFT;
use faer::Mat;
use serde::{Deserialize, Serialize};

/// How many components to keep (`[stats]` in the config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PcaConfig {
    /// Keep the fewest components whose explained variance reaches this fraction.
    pub variance: f64,
    /// Keep exactly this many components instead (overrides `variance`).
    pub k: Option<usize>,
    /// Refit once the images added or retracted since the last fit reach this fraction of
    /// the live images (0 = every epoch with a change). At 0.01 a first ingest refits at
    /// every epoch, and a trickle of one image per poll into 5,000 refits every ~50.
    pub refit_fraction: f64,
    /// The same threshold for an epoch cut while more listed changes wait behind it (a
    /// first ingest, a large new folder): the archive is being caught up, and every
    /// model published before the last of those epochs is superseded within minutes.
    /// At 0.75 a catch-up refits when the live images have quadrupled since the last fit
    /// (after the first epoch, at 4x, 16x, ... its size); the epoch that clears the
    /// backlog is judged by `refit_fraction`, which the deferred changes exceed. A
    /// 69,300-image first ingest refits 4 times instead of 34.
    pub catch_up_refit_fraction: f64,
}

impl Default for PcaConfig {
    fn default() -> Self {
        PcaConfig {
            variance: 0.95,
            k: None,
            refit_fraction: 0.01,
            catch_up_refit_fraction: 0.75,
        }
    }
}

/// StandardScaler state: per-dimension mean and sample std (std 0 maps features to 0,
/// as Spark does).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scaler {
    /// Per-dimension mean.
    pub mean: Vec<f64>,
    /// Per-dimension sample standard deviation (n-1).
    pub std: Vec<f64>,
}

/// A fitted standardized PCA.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PcaModel {
    /// Images the model was fitted on.
    pub n: i64,
    /// Components kept.
    pub k: usize,
    /// The scaler applied before projection.
    pub scaler: Scaler,
    /// Principal axes, `k` rows of dimension d, sign-fixed (largest |v_i| positive).
    pub components: Vec<Vec<f64>>,
    /// Eigenvalues of the correlation matrix, descending (all d of them).
    pub eigenvalues: Vec<f64>,
    /// Explained variance ratio of every component, descending (all d of them).
    pub explained_variance_ratio: Vec<f64>,
}

impl PcaModel {
    /// `V_kᵀ D⁻¹ (x − μ)`: the standardized projection of one embedding.
    /// One dot product per component: for a single photo this is ~50x faster than
    /// [`Self::project_many`], which first lays out the d x k matrix for a product.
    pub fn project(&self, x: &[f64]) -> Vec<f64> {
        let (mean, std) = (&self.scaler.mean, &self.scaler.std);
        let z: Vec<f64> = (0..mean.len())
            .map(|j| {
                if std[j] > 0.0 {
                    (x[j] - mean[j]) / std[j]
                } else {
                    0.0
                }
            })
            .collect();
        self.components[..self.k]
            .iter()
            .map(|v| v.iter().zip(&z).map(|(a, b)| a * b).sum())
            .collect()
    }

    /// The projections of many embeddings, as one matrix product (the KMeans update
    /// projects every point of an epoch: ~10x faster than one dot product at a time).
    pub fn project_many<X: AsRef<[f64]>>(&self, xs: &[X]) -> Vec<Vec<f64>> {
        self.project_many_with(xs, faer::Par::Seq)
    }

    /// [`Self::project_many`] with the matrix products run as `par` says (replay, where
    /// nothing else competes for the cores, uses them all). The same numbers either way.
    pub fn project_many_with<X: AsRef<[f64]>>(&self, xs: &[X], par: faer::Par) -> Vec<Vec<f64>> {
        // In blocks of rows: the standardized copy of a block stays small (an epoch of
        // 4096 points would otherwise need 42 MB for it), and each row's product is the
        // same whatever the block.
        const BLOCK: usize = 256;
        let (d, k) = (self.scaler.mean.len(), self.k);
        let flat = self.kept_components();
        let v = faer::MatRef::from_row_major_slice(&flat, k, d).transpose();
        let mut projected = Vec::with_capacity(xs.len());
        for block in xs.chunks(BLOCK) {
            let n = block.len();
            let (mean, std) = (&self.scaler.mean, &self.scaler.std);
            let z = Mat::<f64>::from_fn(n, d, |i, j| {
                if std[j] > 0.0 {
                    (block[i].as_ref()[j] - mean[j]) / std[j]
                } else {
                    0.0
                }
            });
            let mut out = Mat::<f64>::zeros(n, k);
            faer::linalg::matmul::matmul(
                out.as_mut(),
                faer::Accum::Replace,
                z.as_ref(),
                v,
                1.0,
                par,
            );
            projected.extend((0..n).map(|i| (0..k).map(|c| out[(i, c)]).collect::<Vec<f64>>()));
        }
        projected
    }

    /// The kept components as one contiguous k x d matrix, row by row (a copy of
    /// contiguous rows: a column-by-column gather of d x k was most of a trickle epoch's
    /// KMeans fold).
    fn kept_components(&self) -> Vec<f64> {
        let d = self.scaler.mean.len();
        let mut flat = Vec::with_capacity(self.k * d);
        for c in &self.components[..self.k] {
            flat.extend_from_slice(&c[..d]);
        }
        flat
    }

    /// `V_k q` for each `q` of k coordinates: the points of the standardized space the
    /// PCA coordinates name, as one matrix product (the KMeans scores back-project every
    /// centroid at every fold; one component at a time, that read the k x d components
    /// once per centroid, a sixth of a replay's KMeans fold).
    pub fn back_project_many(&self, qs: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let (d, k) = (self.scaler.mean.len(), self.k);
        let flat = self.kept_components();
        let v = faer::MatRef::from_row_major_slice(&flat, k, d);
        let q = Mat::<f64>::from_fn(qs.len(), k, |i, c| qs[i][c]);
        let mut out = Mat::<f64>::zeros(qs.len(), d);
        faer::linalg::matmul::matmul(
            out.as_mut(),
            faer::Accum::Replace,
            q.as_ref(),
            v,
            1.0,
            faer::Par::Seq,
        );
        (0..qs.len())
            .map(|i| (0..d).map(|j| out[(i, j)]).collect())
            .collect()
    }

    /// Cumulative explained variance of the kept components.
    pub fn explained_variance(&self) -> f64 {
        self.explained_variance_ratio[..self.k].iter().sum()
    }
}

/// Fits the model from exact moments; `None` below two images (no variance yet).
pub fn fit(moments: &Moments, config: &PcaConfig) -> Option<PcaModel> {
    let (d, n) = (moments.dim, moments.n);
    if n < 2 {
        return None;
    }
    let scale = (1u64 << FIXED_POINT_SHIFT) as f64;
    // M_ij = n·SS_ij − s_i s_j = n(n−1)·cov_ij·2^40, exact in i128.
    let centred = |i: usize, j: usize| -> i128 {
        n as i128 * moments.second(i, j) - moments.sum[i] as i128 * moments.sum[j] as i128
    };
    let diag: Vec<f64> = (0..d).map(|i| centred(i, i) as f64).collect();
    let nn1 = n as f64 * (n - 1) as f64;
    let scaler = Scaler {
        mean: moments
            .sum
            .iter()
            .map(|&s| s as f64 / n as f64 / scale)
            .collect(),
        std: diag.iter().map(|&m| (m / nn1).sqrt() / scale).collect(),
    };
    let mut corr = Mat::<f64>::zeros(d, d);
    for i in 0..d {
        for j in i..d {
            let r = if diag[i] > 0.0 && diag[j] > 0.0 {
                centred(i, j) as f64 / (diag[i] * diag[j]).sqrt()
            } else {
                0.0
            };
            corr[(i, j)] = r;
            corr[(j, i)] = r;
        }
    }
    let (u, s) = symmetric_eigen(corr)?;
    // faer sorts ascending; PCA wants descending.
    let order: Vec<usize> = (0..d).rev().collect();
    let eigenvalues: Vec<f64> = order.iter().map(|&c| s[c].max(0.0)).collect();
    let total: f64 = eigenvalues.iter().sum();
    if total <= 0.0 {
        return None;
    }
    let ratios: Vec<f64> = eigenvalues.iter().map(|l| l / total).collect();
    let k = choose_k(&ratios, config);
    let components = order[..k]
        .iter()
        .map(|&c| {
            let mut v: Vec<f64> = (0..d).map(|r| u[(r, c)]).collect();
            fix_sign(&mut v);
            v
        })
        .collect();
    Some(PcaModel {
        n,
        k,
        scaler,
        components,
        eigenvalues,
        explained_variance_ratio: ratios,
    })
}

/// Eigenvalues (ascending) and eigenvectors (columns) of the symmetric `a`, which it
/// overwrites. This is faer's `self_adjoint_evd`, step for step, except that `a` is
/// tridiagonalised in place: faer copies the input into a d x d workspace first, and at
/// d = 1280 that copy is 13 MB more on every refit's peak, while the statistics stage
/// is also holding the epoch in flight.
fn symmetric_eigen(mut a: Mat<f64>) -> Option<(Mat<f64>, Vec<f64>)> {
    use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
    use faer::linalg::{evd, householder, temp_mat_scratch};
    let n = a.nrows();
    if n < 2 {
        return Some((
            Mat::from_fn(n, n, |_, _| 1.0),
            (0..n).map(|i| a[(i, i)]).collect(),
        ));
    }
    let par = faer::get_global_parallelism();
    let bs = faer::linalg::qr::no_pivoting::factor::recommended_block_size::<f64>(n, n);
    let scratch = StackReq::any_of(&[
        evd::tridiag::tridiag_in_place_scratch::<f64>(n, par, Default::default()),
        // The tridiagonal solver: its copies of the diagonals, then divide and conquer
        // (faer's `divide_and_conquer_scratch`, which is not public).
        StackReq::all_of(&[
            temp_mat_scratch::<f64>(n, 1).array(8),
            StackReq::new::<usize>(n).array(4),
            temp_mat_scratch::<f64>(n, n).array(2),
        ]),
        householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<f64>(
            n - 1,
            bs,
            n,
        ),
    ]);
    let mut buffer = MemBuffer::new(scratch);
    let stack = MemStack::new(&mut buffer);
    let mut reflectors = Mat::<f64>::zeros(bs, n - 1);
    evd::tridiag::tridiag_in_place(
        a.as_mut(),
        reflectors.as_mut(),
        par,
        stack,
        Default::default(),
    );
    let diag: Vec<f64> = (0..n).map(|i| a[(i, i)]).collect();
    let subdiag: Vec<f64> = (0..n - 1).map(|i| a[(i + 1, i)]).collect();
    let mut values = faer::diag::Diag::<f64>::zeros(n);
    let mut u = Mat::<f64>::zeros(n, n);
    evd::tridiagonal_self_adjoint_evd(
        faer::ColRef::from_slice(&diag).as_diagonal(),
        faer::ColRef::from_slice(&subdiag).as_diagonal(),
        values.as_mut(),
        Some(u.as_mut()),
        par,
        stack,
        Default::default(),
    )
    .ok()?;
    householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
        a.as_ref().submatrix(1, 0, n - 1, n - 1),
        reflectors.as_ref(),
        faer::Conj::No,
        u.as_mut().subrows_mut(1, n - 1),
        par,
        stack,
    );
    let values = (0..n).map(|i| values[i]).collect();
    Some((u, values))
}

/// The fixed k, or the fewest components reaching the target variance; at least 1.
pub fn choose_k(ratios: &[f64], config: &PcaConfig) -> usize {
    let positive = ratios.iter().filter(|&&r| r > 0.0).count().max(1);
    if let Some(k) = config.k {
        return k.clamp(1, positive);
    }
    let mut cumulative = 0.0;
    for (i, r) in ratios.iter().enumerate() {
        cumulative += r;
        // The tolerance keeps a target met exactly (e.g. 1.0) from being missed by rounding.
        if cumulative >= config.variance - 1e-12 {
            return (i + 1).min(positive);
        }
    }
    positive
}

/// Makes the entry of largest magnitude positive (sklearn's svd_flip), so signs are
/// reproducible across solvers and runs.
pub fn fix_sign(v: &mut [f64]) {
    let (mut best, mut at) = (0.0f64, 0);
    for (i, x) in v.iter().enumerate() {
        if x.abs() > best {
            best = x.abs();
            at = i;
        }
    }
    if v.get(at).is_some_and(|x| *x < 0.0) {
        v.iter_mut().for_each(|x| *x = -*x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place eigendecomposition gives faer's `self_adjoint_eigen`, bit for bit,
    /// above and below faer's divide-and-conquer threshold.
    #[test]
    fn in_place_eigen_equals_faers_self_adjoint_eigen() {
        for n in [1, 2, 40, 300] {
            let mut seed = 7u64 + n as u64;
            let mut next = || {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            };
            let x = Mat::<f64>::from_fn(2 * n, n, |_, _| next());
            let a = x.transpose() * &x;
            let expected = a.self_adjoint_eigen(faer::Side::Lower).unwrap();
            let (u, values) = symmetric_eigen(a.clone()).unwrap();
            let s = expected.S().column_vector();
            assert_eq!(values, (0..n).map(|i| s[i]).collect::<Vec<_>>(), "n = {n}");
            assert_eq!(u, expected.U().to_owned(), "n = {n}");
        }
    }
}
