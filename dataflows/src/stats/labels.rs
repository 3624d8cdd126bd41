//! Per-label sufficient statistics: the live count and the exact integer sum of the
//! embeddings of each label. They are the difference type of a differential collection
//! (`explode` + `count_total` in the ingest dataflow), so additions and deletions are
//! folded by differential itself, at the label's worker, whatever the arrival order.
//! O(labels x d): what nearest-mean classification and per-label plots need, with no
//! stored points.

use crate::record::Embedding;
use serde::{Deserialize, Serialize};

/// Count and embedding sum of one label's live images, in the fixed point of
/// [`Embedding`] (exact: |x| < 2^23 per value, so 2^40 images fit an i64 sum).
///
/// As a differential difference it is the pair `(n, sum)` (both abelian), so the
/// update for one image is `(±1, ±x)`.
pub type LabelDiff = (i64, Vec<i64>);

/// A label's statistics as the checkpoint keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelStats {
    /// Live images.
    pub n: i64,
    /// Per-dimension sum of the fixed-point embeddings.
    pub sum: Vec<i64>,
}

impl LabelStats {
    /// The differential update one image makes (`diff` = +1 added, −1 retracted).
    pub fn update_of(embedding: &Embedding) -> LabelDiff {
        (1, embedding.0.iter().map(|&v| v as i64).collect())
    }

    /// Adds `diff` copies of one image (what its update adds to the collection).
    pub fn add(&mut self, embedding: &Embedding, diff: i64) {
        self.n += diff;
        if self.sum.len() < embedding.0.len() {
            self.sum.resize(embedding.0.len(), 0);
        }
        for (s, &v) in self.sum.iter_mut().zip(embedding.0.iter()) {
            *s += v as i64 * diff;
        }
    }

    /// Adds another part's statistics of the same label (exact).
    pub fn merge(&mut self, other: &LabelStats) {
        self.n += other.n;
        if self.sum.len() < other.sum.len() {
            self.sum.resize(other.sum.len(), 0);
        }
        for (s, &v) in self.sum.iter_mut().zip(&other.sum) {
            *s += v;
        }
    }

    /// True when nothing is left (differential drops such a record from the collection).
    pub fn is_zero(&self) -> bool {
        self.n == 0 && self.sum.iter().all(|&s| s == 0)
    }

    /// The statistics an accumulated difference stands for.
    pub fn from_diff((n, sum): LabelDiff) -> Self {
        LabelStats { n, sum }
    }

    /// The same statistics as a difference (to re-enter a restored state).
    pub fn to_diff(&self) -> LabelDiff {
        (self.n, self.sum.clone())
    }

    /// The label mean in embedding units (f64; `dim` zeros while empty).
    pub fn mean(&self, dim: usize) -> Vec<f64> {
        let scale = (1u64 << crate::record::FIXED_POINT_SHIFT) as f64 * self.n.max(1) as f64;
        let mut mean = vec![0.0; dim];
        for (m, &s) in mean.iter_mut().zip(&self.sum) {
            *m = s as f64 / scale;
        }
        mean
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use differential_dataflow::difference::{Abelian, Semigroup};

    #[test]
    fn differences_add_and_retract_exactly() {
        let a = Embedding::quantize(&[1.0, 2.0]).unwrap();
        let b = Embedding::quantize(&[3.0, 0.5]).unwrap();
        let mut acc = LabelStats::update_of(&a);
        acc.plus_equals(&LabelStats::update_of(&b));
        let mut minus_a = LabelStats::update_of(&a);
        minus_a.negate();
        acc.plus_equals(&minus_a);
        let stats = LabelStats::from_diff(acc);
        assert_eq!(stats.n, 1);
        assert_eq!(stats.mean(2), vec![3.0, 0.5]);
    }
}
