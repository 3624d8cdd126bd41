//! Exact moments of the live embeddings: count, sum and the packed upper triangle of the
//! sum of outer products, all integers over fixed-point values. Integer addition is
//! associative, so merging per-worker partials gives bit-identical state for any worker
//! count, arrival order, or mix of additions and retractions.

use crate::record::Embedding;
use serde::{Deserialize, Serialize};

/// Count, sum and sum of outer products of fixed-point embeddings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moments {
    /// Dimension of the embeddings.
    pub dim: usize,
    /// Number of live images (additions minus retractions).
    pub n: i64,
    /// Per-dimension sums.
    pub sum: Vec<i64>,
    /// Packed upper triangle (row-major, i <= j) of sum of x xᵀ.
    pub ss: Vec<i128>,
}

impl Moments {
    /// Empty moments of dimension `dim`.
    pub fn new(dim: usize) -> Self {
        Moments {
            dim,
            n: 0,
            sum: vec![0; dim],
            ss: vec![0; dim * (dim + 1) / 2],
        }
    }

    /// Adds another partial (exact).
    pub fn merge(&mut self, other: &Moments) {
        assert_eq!(
            self.dim, other.dim,
            "merging moments of different dimension"
        );
        self.n += other.n;
        self.sum
            .iter_mut()
            .zip(&other.sum)
            .for_each(|(a, b)| *a += b);
        self.ss.iter_mut().zip(&other.ss).for_each(|(a, b)| *a += b);
    }

    /// Index of (i, j), i <= j, in the packed upper triangle.
    pub fn packed(&self, i: usize, j: usize) -> usize {
        debug_assert!(i <= j);
        i * self.dim - i * (i + 1) / 2 + j
    }
}

/// Accumulates a worker's images into [`Moments`], doing the O(d²) outer products in
/// i64 and flushing into the i128 totals before any i64 could overflow. Exact, and
/// several times faster than accumulating in i128 directly.
pub struct MomentsAccumulator {
    total: Moments,
    fast: Vec<i64>,
    /// Upper bound of |entry| in `fast`.
    bound: u128,
}

impl MomentsAccumulator {
    /// An empty accumulator of dimension `dim`.
    pub fn new(dim: usize) -> Self {
        let total = Moments::new(dim);
        let fast = vec![0; total.ss.len()];
        MomentsAccumulator {
            total,
            fast,
            bound: 0,
        }
    }

    /// Adds `diff` copies of `e` (negative `diff` retracts).
    pub fn add(&mut self, e: &Embedding, diff: i64) {
        let x = &e.0;
        let d = self.total.dim;
        assert_eq!(
            x.len(),
            d,
            "embedding of dimension {} in moments of dimension {d}",
            x.len()
        );
        let max = x
            .iter()
            .map(|v| v.unsigned_abs() as u128)
            .max()
            .unwrap_or(0);
        let step = max * max * diff.unsigned_abs() as u128;
        if self.bound + step > i64::MAX as u128 {
            self.flush();
        }
        if step > i64::MAX as u128 {
            // A single huge product: go straight to i128.
            let mut at = 0;
            for i in 0..d {
                let xi = x[i] as i128 * diff as i128;
                for j in i..d {
                    self.total.ss[at] += xi * x[j] as i128;
                    at += 1;
                }
            }
        } else {
            self.bound += step;
            let mut at = 0;
            for i in 0..d {
                let xi = x[i] as i64 * diff;
                let row = &mut self.fast[at..at + (d - i)];
                for (acc, &xj) in row.iter_mut().zip(&x[i..]) {
                    *acc += xi * xj as i64;
                }
                at += d - i;
            }
        }
        self.total.n += diff;
        for (s, &v) in self.total.sum.iter_mut().zip(x) {
            *s += v as i64 * diff;
        }
    }

    fn flush(&mut self) {
        for (t, f) in self.total.ss.iter_mut().zip(self.fast.iter_mut()) {
            *t += *f as i128;
            *f = 0;
        }
        self.bound = 0;
    }

    /// The exact moments of everything added.
    pub fn finish(mut self) -> Moments {
        self.flush();
        self.total
    }
}

/// Moments of a set of embeddings, the straightforward way (for tests and replay).
pub fn moments_of<'a>(
    dim: usize,
    items: impl IntoIterator<Item = (&'a Embedding, i64)>,
) -> Moments {
    let mut acc = MomentsAccumulator::new(dim);
    for (e, diff) in items {
        acc.add(e, diff);
    }
    acc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_index_walks_the_upper_triangle_in_order() {
        let m = Moments::new(4);
        let mut expect = 0;
        for i in 0..4 {
            for j in i..4 {
                assert_eq!(m.packed(i, j), expect);
                expect += 1;
            }
        }
    }

    #[test]
    fn retraction_cancels_exactly_and_merge_is_order_free() {
        let a = Embedding(vec![3, -7, 1 << 22]);
        let b = Embedding(vec![i32::MAX, 5, -2]);
        let both = moments_of(3, [(&a, 1), (&b, 1)]);
        let mut split = moments_of(3, [(&b, 1)]);
        split.merge(&moments_of(3, [(&a, 1)]));
        assert_eq!(both, split);
        let cancelled = moments_of(3, [(&a, 1), (&b, 1), (&a, -1), (&b, -1)]);
        assert_eq!(cancelled, Moments::new(3));
        assert_eq!(both.ss[both.packed(0, 1)], 3 * -7 + i32::MAX as i128 * 5);
    }
}
