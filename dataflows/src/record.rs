//! What flows on the dataflow's edges: keys, labels, fixed-point embeddings, source
//! changes, and error records. Every type here is plain data (serde), so it can cross
//! process boundaries through timely's serializer.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// A logical time of the dataflow: one batch of source changes.
pub type Epoch = u64;

/// Number of fixed ownership buckets. Fixed forever so ownership survives any change of
/// worker count: the owner of bucket `b` is worker `b % peers`.
pub const BUCKETS: u64 = 1024;

/// Embedding values are stored as `round(x * 2^FIXED_POINT_SHIFT)`. Integer moments are
/// exactly associative, so statistics do not depend on worker count or arrival order.
pub const FIXED_POINT_SHIFT: u32 = 20;
const FIXED_POINT_SCALE: f64 = (1u64 << FIXED_POINT_SHIFT) as f64;
/// `1 / FIXED_POINT_SCALE`: a power of two, so multiplying by it is the exact division,
/// which does not vectorise as well (converting embeddings back was 6 % of a replay).
const FIXED_POINT_STEP: f64 = 1.0 / FIXED_POINT_SCALE;

/// An image's place in the archive, relative to the source root: `<Label>/<name>`.
/// Kept byte-exact (labels contain spaces).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ImageKey(pub String);

/// An [`ImageKey`]'s 128-bit digest ([`ImageKey::digest`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyDigest(pub u128);

impl ImageKey {
    /// The label folder of this key, or why the key is not a `<Label>/<name>` pair.
    pub fn label(&self) -> Result<Label, String> {
        let mut parts = self.0.split('/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(label), Some(name), None) if !label.is_empty() && !name.is_empty() => {
                Ok(Label(label.to_string()))
            }
            (Some(_), None, _) => Err("file is outside any label folder".to_string()),
            _ => Err("file is not directly inside a label folder (<Label>/<name>)".to_string()),
        }
    }

    /// Stable bucket of this key (xxh3 with its fixed default seed).
    pub fn bucket(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(self.0.as_bytes()) % BUCKETS
    }

    /// A stable 64-bit hash of the key (for sampling).
    pub fn bucket_hash(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(self.0.as_bytes())
    }

    /// A 128-bit digest of the key (xxh3-128) that stands for it in per-key maps held
    /// in memory: 16 bytes instead of the string's 24 plus its heap copy. At 128 bits,
    /// two keys of a billion-object archive collide with probability ~1e-21.
    pub fn digest(&self) -> KeyDigest {
        KeyDigest(xxhash_rust::xxh3::xxh3_128(self.0.as_bytes()))
    }

    /// The worker that owns this key among `peers` workers.
    pub fn owner(&self, peers: usize) -> usize {
        (self.bucket() % peers as u64) as usize
    }
}

impl fmt::Display for ImageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A fruit label: the name of the folder an image sits in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Label(pub String);

/// A CNN embedding in fixed point (see [`FIXED_POINT_SHIFT`]).
///
/// The values are shared (`Arc`): a row goes from the embed stage to the moments, the
/// per-label sums, the models (its KMeans point), the Parquet sink and the embed stage's
/// own record of the epochs not yet written, and each of those holds it until its epoch
/// completes. Cloned, that was one 5 KB copy per consumer at d = 1280; shared (with the
/// sink keeping rows, not f32 copies), `run --once -w 2` on 20k images peaked 28 MB lower.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Embedding(pub Arc<[i32]>);

impl From<Vec<i32>> for Embedding {
    fn from(values: Vec<i32>) -> Self {
        Embedding(values.into())
    }
}

impl Embedding {
    /// Quantizes model output. Fails on NaN/inf or values too large for the fixed point
    /// range (|x| >= 2^11), which would silently corrupt the moments otherwise.
    pub fn quantize(values: &[f32]) -> Result<Self, String> {
        let limit = (i32::MAX as f64) / FIXED_POINT_SCALE;
        // One branch-free check of every value (NaN fails the comparison too), then a
        // plain conversion: both loops vectorise, a per-value `Result` does not.
        let in_range = values
            .iter()
            .fold(true, |ok, &x| ok & ((x as f64).abs() < limit));
        if !in_range {
            let x = values
                .iter()
                .map(|&x| x as f64)
                .find(|x| !(x.abs() < limit))
                .expect("a value out of range");
            return Err(format!(
                "embedding value {x} is outside the fixed-point range ±{limit}"
            ));
        }
        // Written in place into the shared slice: collecting an iterator into `Arc<[i32]>`
        // goes through a per-element loop that does not vectorise.
        let mut shared = Arc::<[i32]>::new_uninit_slice(values.len());
        let slots = Arc::get_mut(&mut shared).expect("a new Arc is unique");
        for (slot, &x) in slots.iter_mut().zip(values) {
            // SAFETY: every value passed the range check above.
            slot.write(unsafe { fixed_point_unchecked(x) });
        }
        // SAFETY: the loop wrote every one of the `values.len()` slots.
        Ok(Embedding(unsafe { shared.assume_init() }))
    }

    /// The values as f32. Exact for |x| < 8 (the quantized value needs at most 24 bits),
    /// which holds for ReLU6 networks, so a stored f32 re-quantizes to the same integers.
    pub fn to_f32(&self) -> Vec<f32> {
        self.f32_values().collect()
    }

    /// The values as f32, one at a time (see [`Self::to_f32`]).
    pub fn f32_values(&self) -> impl Iterator<Item = f32> + '_ {
        self.0.iter().map(|&q| (q as f64 * FIXED_POINT_STEP) as f32)
    }

    /// The values as f64 (exact).
    pub fn to_f64(&self) -> Vec<f64> {
        self.0
            .iter()
            .map(|&q| q as f64 * FIXED_POINT_STEP)
            .collect()
    }

    /// Number of dimensions.
    pub fn dim(&self) -> usize {
        self.0.len()
    }
}

/// One image as the statistics see it: the data of the differential collection of live
/// images (an addition has diff +1, a deletion -1).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ImageRow {
    /// Where the image is in the archive.
    pub key: ImageKey,
    /// Its label folder.
    pub label: Label,
    /// Its embedding.
    pub embedding: Embedding,
}

/// A change to the archive found by the source's listing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Change {
    /// The object that changed.
    pub key: ImageKey,
    /// What happened to it.
    pub kind: ChangeKind,
}

/// What happened to an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ChangeKind {
    /// New, or its content changed; `version` identifies the content (size and mtime, or
    /// an ETag).
    Upsert {
        /// Identity of the object's content.
        version: String,
    },
    /// It is gone from the archive.
    Delete,
}

/// Why an image could not be ingested. The string forms are stable: they appear in the
/// error records and in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The file could not be read.
    Read,
    /// Zero bytes.
    Empty,
    /// Not an image at all.
    NotAnImage,
    /// An image, but not a JPEG.
    UnsupportedFormat,
    /// A JPEG that does not decode (truncated or corrupt).
    Corrupt,
    /// Not a 3-channel RGB image (grayscale, CMYK, ...).
    ColorSpace,
    /// Larger than the configured maximum dimension.
    TooLarge,
    /// Not in the `<Label>/<name>` layout.
    Layout,
    /// The model failed on this input.
    Model,
}

impl ErrorKind {
    /// Stable name used in records and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Read => "read",
            ErrorKind::Empty => "empty",
            ErrorKind::NotAnImage => "not_an_image",
            ErrorKind::UnsupportedFormat => "unsupported_format",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::ColorSpace => "color_space",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Layout => "layout",
            ErrorKind::Model => "model",
        }
    }
}

/// A quarantined input: which object, why, and in which epoch it was seen.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ErrorRecord {
    /// The object that failed.
    pub key: ImageKey,
    /// The class of failure.
    pub kind: ErrorKind,
    /// A human-readable reason.
    pub reason: String,
    /// The epoch in which it was seen.
    pub epoch: Epoch,
}

/// `(x as f64 * FIXED_POINT_SCALE).round() as i32` (half away from zero), in operations
/// that vectorise on baseline x86-64: `f64::round` is a libm call there and a checked
/// float-to-int cast is not a plain conversion, and quantizing is a large part of reading
/// stored embeddings back (replay). `y = x * 2^20` is exact with at most 24 significant
/// bits, so `|y| + 0.5` is exact too (a |y| under 2^-29 may round, to a sum that still
/// truncates to 0), and truncating it, which floors a positive value, rounds `|y|` half
/// up.
///
/// # Safety
/// `|x as f64| * FIXED_POINT_SCALE` must be below `i32::MAX` (and `x` finite), as
/// [`Embedding::quantize`] checks first.
#[inline(always)]
unsafe fn fixed_point_unchecked(x: f32) -> i32 {
    let y = x as f64 * FIXED_POINT_SCALE;
    // SAFETY: |y| + 0.5 < i32::MAX + 0.5 by the caller's bound, so it truncates into i32.
    let magnitude = unsafe { (y.abs() + 0.5).to_int_unchecked::<i32>() };
    if y < 0.0 {
        -magnitude
    } else {
        magnitude
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_keep_spaces_and_reject_bad_layouts() {
        assert_eq!(
            ImageKey("Apple Golden 1/r_1.jpg".into()).label().unwrap().0,
            "Apple Golden 1"
        );
        assert!(ImageKey("loose.jpg".into())
            .label()
            .unwrap_err()
            .contains("outside any label"));
        assert!(ImageKey("a/b/c.jpg".into()).label().is_err());
    }

    #[test]
    fn quantization_round_trips_through_f32() {
        let values = [0.0f32, 1.5, 5.999_999, 3.141_592_7, 1e-7];
        let e = Embedding::quantize(&values).unwrap();
        assert_eq!(Embedding::quantize(&e.to_f32()).unwrap(), e);
        assert!(Embedding::quantize(&[f32::NAN]).is_err());
        assert!(Embedding::quantize(&[5000.0]).is_err());
    }

    #[test]
    fn inline_rounding_equals_round() {
        let scale = FIXED_POINT_SCALE as f32;
        // Halves of the fixed point, either side of them, tiny and subnormal values, the
        // largest in range.
        let mut values = vec![
            0.5 / scale,
            -0.5 / scale,
            1.5 / scale,
            -2.5 / scale,
            f32::from_bits((0.5f32 / scale).to_bits() - 1),
            f32::from_bits((0.5f32 / scale).to_bits() + 1),
            1e-30,
            -1e-40,
            0.0,
            -0.0,
            2047.9999,
            -2047.9999,
        ];
        let mut s = 3u64;
        for _ in 0..100_000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let f = f32::from_bits((s >> 32) as u32);
            if f.is_finite() && (f as f64).abs() < 2048.0 {
                values.push(f);
                values.push(
                    (((s >> 40) as f64 / 2.0 - (1u64 << 22) as f64) / FIXED_POINT_SCALE) as f32,
                );
            }
        }
        let rounded: Vec<i32> = values
            .iter()
            .map(|&x| (x as f64 * FIXED_POINT_SCALE).round() as i32)
            .collect();
        assert_eq!(
            &*Embedding::quantize(&values).unwrap().0,
            rounded.as_slice()
        );
        for (&x, &r) in values.iter().zip(&rounded) {
            // SAFETY: every value is below 2048 in magnitude, within range.
            assert_eq!(unsafe { fixed_point_unchecked(x) }, r, "{x:e}");
        }
    }

    #[test]
    fn ownership_is_stable_and_total() {
        let key = ImageKey("Banana 1/0_100.jpg".into());
        assert!(key.bucket() < BUCKETS);
        for peers in 1..9 {
            assert_eq!(key.owner(peers), (key.bucket() % peers as u64) as usize);
        }
    }
}
