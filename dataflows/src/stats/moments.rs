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
    pub ss: SecondMoments,
}

/// The packed sum of outer products, in i64 while every entry fits and in i128 from the
/// first sum that would not (exact either way: every addition is checked). Lite0
/// embeddings sum to ~2^40 per image on the diagonal, so an archive stays narrow up to
/// millions of images: half the memory of i128 (6.5 MB instead of 13 at d = 1280) in
/// each copy the pipeline holds (the fitter's, the commit's) and in the checkpoint.
#[derive(Clone, Debug)]
pub enum SecondMoments {
    /// Every entry fits in i64.
    Narrow(Vec<i64>),
    /// Some sum did not.
    Wide(Vec<i128>),
}

impl SecondMoments {
    /// `len` zeros.
    pub fn zeros(len: usize) -> Self {
        SecondMoments::Narrow(vec![0; len])
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        match self {
            SecondMoments::Narrow(v) => v.len(),
            SecondMoments::Wide(v) => v.len(),
        }
    }

    /// True without entries (statistics dropped, see `Checkpoint::without_statistics`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entry `at` of the packed triangle.
    pub fn get(&self, at: usize) -> i128 {
        match self {
            SecondMoments::Narrow(v) => v[at] as i128,
            SecondMoments::Wide(v) => v[at],
        }
    }

    /// The entries as i128, switching to that representation.
    fn widen(&mut self) -> &mut Vec<i128> {
        if let SecondMoments::Narrow(v) = self {
            *self = SecondMoments::Wide(v.iter().map(|&x| i128::from(x)).collect());
        }
        match self {
            SecondMoments::Wide(v) => v,
            SecondMoments::Narrow(_) => unreachable!("widened"),
        }
    }

    /// Adds `values` entry by entry, widening at the first sum that leaves i64.
    fn add_narrow(&mut self, values: &[i64]) {
        assert_eq!(self.len(), values.len(), "adding moments of another size");
        let mut from = 0;
        if let SecondMoments::Narrow(v) = self {
            while from < v.len() {
                match v[from].checked_add(values[from]) {
                    Some(sum) => v[from] = sum,
                    None => break,
                }
                from += 1;
            }
            if from == v.len() {
                return;
            }
        }
        let wide = self.widen();
        for (a, &b) in wide[from..].iter_mut().zip(&values[from..]) {
            *a += i128::from(b);
        }
    }

    /// Adds another matrix entry by entry.
    pub fn add(&mut self, other: &SecondMoments) {
        match other {
            SecondMoments::Narrow(values) => self.add_narrow(values),
            SecondMoments::Wide(values) => {
                assert_eq!(self.len(), values.len(), "adding moments of another size");
                let wide = self.widen();
                wide.iter_mut().zip(values).for_each(|(a, b)| *a += b);
            }
        }
    }

    /// Adds `diff` times the packed outer product of `x` (O(d²/2), for a few rows).
    fn add_outer(&mut self, x: &[i32], diff: i64) {
        let d = x.len();
        let mut at = 0;
        for i in 0..d {
            let xi = x[i] as i128 * diff as i128;
            for &xj in &x[i..] {
                let v = xi * xj as i128;
                let narrow = match self {
                    SecondMoments::Narrow(s) => i64::try_from(v)
                        .ok()
                        .and_then(|v| s[at].checked_add(v))
                        .map(|sum| s[at] = sum)
                        .is_some(),
                    SecondMoments::Wide(s) => {
                        s[at] += v;
                        true
                    }
                };
                if !narrow {
                    self.widen()[at] += v;
                }
                at += 1;
            }
        }
    }

    /// The narrow entries, if every entry fits in i64 (whichever representation).
    fn narrowed(&self) -> Option<std::borrow::Cow<'_, [i64]>> {
        match self {
            SecondMoments::Narrow(v) => Some(std::borrow::Cow::Borrowed(v)),
            SecondMoments::Wide(v) => v
                .iter()
                .map(|&x| i64::try_from(x).ok())
                .collect::<Option<Vec<i64>>>()
                .map(std::borrow::Cow::Owned),
        }
    }
}

/// Equal values are equal moments, whichever representation holds them (retractions
/// can bring a widened matrix back into i64's range).
impl PartialEq for SecondMoments {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (SecondMoments::Narrow(a), SecondMoments::Narrow(b)) => a == b,
            _ => self.len() == other.len() && (0..self.len()).all(|i| self.get(i) == other.get(i)),
        }
    }
}

impl Eq for SecondMoments {}

/// Stored as i64 whenever every entry fits, whatever the representation in memory: the
/// same moments give the same bytes.
#[derive(Serialize, Deserialize)]
enum Packed<'a> {
    Narrow(std::borrow::Cow<'a, [i64]>),
    Wide(std::borrow::Cow<'a, [i128]>),
}

impl Serialize for SecondMoments {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match (self.narrowed(), self) {
            (Some(v), _) => Packed::Narrow(v).serialize(s),
            (None, SecondMoments::Wide(v)) => {
                Packed::Wide(std::borrow::Cow::Borrowed(v)).serialize(s)
            }
            (None, SecondMoments::Narrow(_)) => unreachable!("narrow entries fit"),
        }
    }
}

impl<'de> Deserialize<'de> for SecondMoments {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Packed::deserialize(d)? {
            Packed::Narrow(v) => SecondMoments::Narrow(v.into_owned()),
            Packed::Wide(v) => SecondMoments::Wide(v.into_owned()),
        })
    }
}

impl Moments {
    /// Empty moments of dimension `dim`.
    pub fn new(dim: usize) -> Self {
        Moments {
            dim,
            n: 0,
            sum: vec![0; dim],
            ss: SecondMoments::zeros(dim * (dim + 1) / 2),
        }
    }

    /// Entry (i, j), i <= j, of the sum of outer products.
    pub fn second(&self, i: usize, j: usize) -> i128 {
        self.ss.get(self.packed(i, j))
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
        self.ss.add(&other.ss);
    }

    /// Adds `diff` copies of one embedding, straight into the totals: O(d²/2) per row,
    /// so for a few rows cheaper than an accumulator's O(d²) setup and hand-off.
    pub fn add_row(&mut self, e: &Embedding, diff: i64) {
        let x: &[i32] = &e.0;
        assert_eq!(x.len(), self.dim, "row of another dimension");
        self.n += diff;
        for (s, &v) in self.sum.iter_mut().zip(x) {
            *s += v as i64 * diff;
        }
        self.ss.add_outer(x, diff);
    }

    /// Adds a worker's partial of an epoch (exact).
    pub fn fold(&mut self, partial: &Partial) {
        match partial {
            Partial::Rows(rows) => rows.iter().for_each(|(e, diff)| self.add_row(e, *diff)),
            Partial::Dense(m) => self.merge(m),
        }
    }

    /// Index of (i, j), i <= j, in the packed upper triangle.
    pub fn packed(&self, i: usize, j: usize) -> usize {
        debug_assert!(i <= j);
        i * self.dim - i * (i + 1) / 2 + j
    }
}

/// One worker's contribution to an epoch's moments: its rows while they are few (a
/// trickle epoch then costs O(rows·d²/2) where it is folded, instead of a d²
/// accumulator per worker, its conversion and hand-off), else their dense sums.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Partial {
    /// The rows and their diffs.
    Rows(Vec<(Embedding, i64)>),
    /// Their moments (the matrix in i64 unless an epoch's sums overflow it: 6.5 MB per
    /// worker and epoch at d = 1280, held on worker 0 until the epoch is folded).
    Dense(Moments),
}

/// Rows a worker keeps as such before summing them densely (a dense partial costs
/// about as much as folding this many rows).
pub const SPARSE_ROWS: usize = 8;

/// Largest integer below which every f64 sum of integers is exact.
const F64_EXACT: u128 = 1 << 53;

/// Rows gathered before one GEMM: enough to amortise the flush (d²/2 conversions), few
/// enough that a batch of Lite0 rows (|x| < 6·2^20) stays below `F64_EXACT`.
const MAX_BATCH: usize = 256;

/// Columns of the batch product computed at a time (1.3 MB of f64 at d = 1280).
const PRODUCT_COLUMNS: usize = 128;

/// Accumulates a worker's images into [`Moments`] exactly, fast.
///
/// Rows are buffered and their outer products summed as one f64 matrix product
/// (`AᵀA`, lower triangle, faer), which is exact because every partial sum is an integer
/// below 2^53: a batch is flushed before the sum of its rows' max|x|² could pass it. The
/// products then go into i64 totals, flushed into the i128 moments before any i64 could
/// overflow. The result is bit-identical to summing in i128 one image at a time (the
/// tests check it), at a fraction of the cost.
pub struct MomentsAccumulator {
    /// Count and sums; its `ss` stays empty (see `wide`).
    total: Moments,
    /// The i128 totals, allocated only if `fast` ever fills (over ~200k Lite0 images):
    /// an epoch's partial usually lives in `fast` alone, half the memory.
    wide: Vec<i128>,
    fast: Vec<i64>,
    /// Upper bound of |entry| in `fast`.
    bound: u128,
    /// Buffered rows added (+1) and retracted (−1), each with its f64 bound.
    plus: Batch,
    minus: Batch,
    /// A block of columns of the batch product (see `flush_batch`), kept between flushes.
    product: Vec<f64>,
    par: faer::Par,
}

#[derive(Default)]
struct Batch {
    rows: Vec<f64>,
    len: usize,
    bound: u128,
}

/// `acc[i] += sign * values[i]` for f64 values that are exact integers below 2^53.
/// Baseline x86-64 has no vector f64-to-i64 conversion, so this loop ran one value at a
/// time (4 % of a replay's samples); where AVX-512DQ is present it runs as the same loop
/// compiled for it (`vcvttpd2qq`), with the same results.
fn add_exact_integers(acc: &mut [i64], values: &[f64], sign: i64) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512dq") {
        // SAFETY: the features the function is compiled for are present.
        return unsafe { add_exact_integers_avx512(acc, values, sign) };
    }
    add_exact_integers_portable(acc, values, sign)
}

#[inline(always)]
fn add_exact_integers_portable(acc: &mut [i64], values: &[f64], sign: i64) {
    for (a, &v) in acc.iter_mut().zip(values) {
        *a += sign * v as i64;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn add_exact_integers_avx512(acc: &mut [i64], values: &[f64], sign: i64) {
    add_exact_integers_portable(acc, values, sign)
}

impl MomentsAccumulator {
    /// An empty accumulator of dimension `dim`, single-threaded.
    pub fn new(dim: usize) -> Self {
        Self::with_parallelism(dim, faer::Par::Seq)
    }

    /// An empty accumulator whose matrix products use `par` (e.g. `Par::rayon(0)`
    /// for replay, where nothing else competes for the cores).
    pub fn with_parallelism(dim: usize, par: faer::Par) -> Self {
        let len = dim * (dim + 1) / 2;
        let total = Moments {
            dim,
            n: 0,
            sum: vec![0; dim],
            ss: SecondMoments::Narrow(Vec::new()),
        };
        MomentsAccumulator {
            total,
            wide: Vec::new(),
            fast: vec![0; len],
            bound: 0,
            plus: Batch::default(),
            minus: Batch::default(),
            product: Vec::new(),
            par,
        }
    }

    /// Adds `diff` copies of `e` (negative `diff` retracts).
    pub fn add(&mut self, e: &Embedding, diff: i64) {
        let x: &[i32] = &e.0;
        let d = self.total.dim;
        assert_eq!(
            x.len(),
            d,
            "embedding of dimension {} in moments of dimension {d}",
            x.len()
        );
        self.total.n += diff;
        for (s, &v) in self.total.sum.iter_mut().zip(x) {
            *s += v as i64 * diff;
        }
        // The maximum in u32 (a u128 maximum does not vectorise), widened once.
        let max = x.iter().map(|v| v.unsigned_abs()).max().unwrap_or(0) as u128;
        let square = max * max;
        if diff.abs() != 1 || square > F64_EXACT / 2 {
            self.add_scalar(x, diff, square * diff.unsigned_abs() as u128);
            return;
        }
        let negative = diff < 0;
        let batch = self.batch(negative);
        if batch.bound + square > F64_EXACT || batch.len == MAX_BATCH {
            self.flush_batch(negative);
        }
        let batch = self.batch(negative);
        batch.rows.extend(x.iter().map(|&v| v as f64));
        batch.len += 1;
        batch.bound += square;
    }

    /// One row straight into the integer totals (huge values or |diff| > 1).
    fn add_scalar(&mut self, x: &[i32], diff: i64, step: u128) {
        let d = self.total.dim;
        if self.bound + step > i64::MAX as u128 {
            self.flush_fast();
        }
        if step > i64::MAX as u128 {
            self.widen();
            let mut at = 0;
            for i in 0..d {
                let xi = x[i] as i128 * diff as i128;
                for j in i..d {
                    self.wide[at] += xi * x[j] as i128;
                    at += 1;
                }
            }
            return;
        }
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

    /// The buffer of retracted (`negative`) or added rows.
    fn batch(&mut self, negative: bool) -> &mut Batch {
        if negative {
            &mut self.minus
        } else {
            &mut self.plus
        }
    }

    /// Sums a batch's outer products with one matrix product and moves them into `fast`.
    fn flush_batch(&mut self, negative: bool) {
        let batch = std::mem::take(self.batch(negative));
        if batch.len == 0 {
            return;
        }
        if self.bound + batch.bound > i64::MAX as u128 {
            self.flush_fast();
        }
        self.bound += batch.bound;
        let d = self.total.dim;
        let a = faer::MatRef::from_row_major_slice(&batch.rows, batch.len, d);
        let sign = if negative { -1 } else { 1 };
        // The lower triangle of AᵀA a block of columns at a time: a d x d product buffer
        // would be 13 MB at d = 1280, zeroed and page-faulted at every flush. Each entry
        // is the same exact integer whatever the blocking.
        let mut from = 0;
        while from < d {
            let to = (from + PRODUCT_COLUMNS).min(d);
            let rows = d - from;
            self.product.resize(rows * (to - from), 0.0);
            let c = faer::MatMut::from_column_major_slice_mut(
                &mut self.product[..rows * (to - from)],
                rows,
                to - from,
            );
            faer::linalg::matmul::matmul(
                c,
                faer::Accum::Replace,
                a.subcols(from, rows).transpose(),
                a.subcols(from, to - from),
                1.0,
                self.par,
            );
            // Column i of the lower triangle (rows i..d) is row i of the packed upper one.
            for i in from..to {
                let column = &self.product[(i - from) * rows..(i - from + 1) * rows];
                let at = self.total.packed(i, i);
                add_exact_integers(&mut self.fast[at..at + (d - i)], &column[i - from..], sign);
            }
            from = to;
        }
        // Keep the allocation for the next batch.
        let slot = self.batch(negative);
        slot.rows = batch.rows;
        slot.rows.clear();
    }

    fn widen(&mut self) {
        if self.wide.is_empty() {
            self.wide = vec![0; self.fast.len()];
        }
    }

    fn flush_fast(&mut self) {
        self.widen();
        for (t, f) in self.wide.iter_mut().zip(self.fast.iter_mut()) {
            *t += *f as i128;
            *f = 0;
        }
        self.bound = 0;
    }

    /// The sums as a partial to merge elsewhere (see [`Self::finish`]: the i64 matrix
    /// itself while it never overflowed, no conversion, no copy).
    pub fn finish_partial(self) -> Partial {
        Partial::Dense(self.finish())
    }

    /// The exact moments of everything added.
    pub fn finish(mut self) -> Moments {
        self.flush_batch(false);
        self.flush_batch(true);
        let fast = std::mem::take(&mut self.fast);
        self.total.ss = if self.wide.is_empty() {
            SecondMoments::Narrow(fast)
        } else {
            let mut wide = std::mem::take(&mut self.wide);
            wide.iter_mut().zip(fast).for_each(|(w, f)| *w += f as i128);
            SecondMoments::Wide(wide)
        };
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
        let a = Embedding::from(vec![3, -7, 1 << 22]);
        let b = Embedding::from(vec![i32::MAX, 5, -2]);
        let both = moments_of(3, [(&a, 1), (&b, 1)]);
        let mut split = moments_of(3, [(&b, 1)]);
        split.merge(&moments_of(3, [(&a, 1)]));
        assert_eq!(both, split);
        let cancelled = moments_of(3, [(&a, 1), (&b, 1), (&a, -1), (&b, -1)]);
        assert_eq!(cancelled, Moments::new(3));
        assert_eq!(both.second(0, 1), 3 * -7 + i32::MAX as i128 * 5);
    }

    #[test]
    fn second_moments_widen_exactly_where_i64_would_overflow() {
        // (2^31 − 1)² is just under 2^62: two such rows fit in i64, three do not.
        let big = Embedding::from(vec![i32::MAX, -3]);
        let square = i32::MAX as i128 * i32::MAX as i128;
        let partial = |diff: i64| {
            let mut acc = MomentsAccumulator::new(2);
            (0..2).for_each(|_| acc.add(&big, diff));
            let partial = acc.finish_partial();
            assert!(
                matches!(&partial, Partial::Dense(m) if matches!(m.ss, SecondMoments::Narrow(_))),
                "two rows fit"
            );
            partial
        };
        let mut two = Moments::new(2);
        (0..2).for_each(|_| two.add_row(&big, 1));
        assert!(matches!(two.ss, SecondMoments::Narrow(_)));
        let narrow_bytes = bincode::serialize(&two).unwrap();

        let mut m = two.clone();
        m.fold(&partial(1));
        m.add_row(&big, 1);
        assert!(
            matches!(m.ss, SecondMoments::Wide(_)),
            "five rows do not fit"
        );
        assert_eq!(m.second(0, 0), 5 * square);
        assert_eq!(m.second(0, 1), 5 * i32::MAX as i128 * -3);
        assert_eq!(m.second(1, 1), 5 * 9);
        // Retracted back into range: equal to, and stored as, the narrow moments.
        m.fold(&partial(-1));
        m.add_row(&big, -1);
        assert_eq!(m, two);
        assert_eq!(bincode::serialize(&m).unwrap(), narrow_bytes);
        let restored: Moments = bincode::deserialize(&narrow_bytes).unwrap();
        assert_eq!(restored, two);
    }

    /// The straightforward i128 sum, one image at a time.
    fn scalar(dim: usize, items: &[(Embedding, i64)]) -> Moments {
        let mut m = Moments::new(dim);
        let mut ss = vec![0i128; dim * (dim + 1) / 2];
        for (e, diff) in items {
            m.n += diff;
            let mut at = 0;
            for i in 0..dim {
                m.sum[i] += e.0[i] as i64 * diff;
                for j in i..dim {
                    ss[at] += e.0[i] as i128 * e.0[j] as i128 * *diff as i128;
                    at += 1;
                }
            }
        }
        m.ss = SecondMoments::Wide(ss);
        m
    }

    #[test]
    fn batched_products_equal_the_i128_sum_bit_for_bit() {
        let mut s = 7u64;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s >> 33
        };
        let dim = 37;
        // Lite0-range values (many batches), some retractions, a few huge rows and |diff| > 1.
        let mut items = Vec::new();
        for n in 0..1500 {
            let huge = n % 500 == 7;
            let e = Embedding(
                (0..dim)
                    .map(|_| {
                        if huge {
                            (next() as i64 - (1 << 30)) as i32
                        } else {
                            (next() % (6 << 20)) as i32
                        }
                    })
                    .collect(),
            );
            let diff = match n % 11 {
                3 => -1,
                5 => 2,
                _ => 1,
            };
            items.push((e, diff));
        }
        let fast = moments_of(dim, items.iter().map(|(e, d)| (e, *d)));
        assert_eq!(fast, scalar(dim, &items));
        let mut par = MomentsAccumulator::with_parallelism(dim, faer::Par::rayon(2));
        items.iter().rev().for_each(|(e, d)| par.add(e, *d));
        assert_eq!(par.finish(), fast);
        // Partials of either kind fold to the same moments.
        let (head, tail) = items.split_at(1490);
        let mut folded = Moments::new(dim);
        folded.fold(&Partial::Rows(tail.to_vec()));
        folded.fold(&Partial::Dense(moments_of(
            dim,
            head.iter().map(|(e, d)| (e, *d)),
        )));
        assert_eq!(folded, fast);
        let mut narrow = Moments::new(dim);
        let mut acc = MomentsAccumulator::new(dim);
        head.iter().for_each(|(e, d)| acc.add(e, *d));
        let partial = acc.finish_partial();
        assert!(matches!(&partial, Partial::Dense(m) if matches!(m.ss, SecondMoments::Narrow(_))));
        narrow.fold(&partial);
        narrow.fold(&Partial::Rows(tail.to_vec()));
        assert_eq!(narrow, fast);
    }
}
