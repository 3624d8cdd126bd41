//! The sinks: where results go. An [`OutputStore`] is the output location (a local
//! directory now; the seam for S3 later): every object is written whole and published
//! atomically, so a reader never sees half a file. On top of it, [`parquet`] writes the
//! per-image rows and [`models`] the published models, errors and status.

pub mod local;
pub mod models;
pub mod operator;
pub mod parquet;
pub mod s3;

use anyhow::Result;

pub use local::LocalStore;

/// A place to keep output objects under `/`-separated names.
pub trait OutputStore: Send + Sync {
    /// Human-readable location, no secrets.
    fn location(&self) -> String;
    /// Writes `bytes` under `name`, replacing any previous object atomically.
    fn put(&self, name: &str, bytes: &[u8]) -> Result<()>;
    /// Reads `name`, or None when it does not exist.
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Names of the objects under `prefix` (a folder such as `embeddings/`), sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Removes `name` if present.
    fn delete(&self, name: &str) -> Result<()>;
    /// Removes what killed writers left behind that is not an object (a local
    /// directory's temp files); returns how many. Only while nothing writes.
    fn remove_stale_temp_files(&self) -> Result<usize> {
        Ok(0)
    }
}

/// Opens the output location: `s3://bucket/prefix`, or a local directory (created).
pub fn open(location: &str, s3: &crate::io::S3Config) -> Result<Box<dyn OutputStore>> {
    if location.starts_with("s3://") {
        return Ok(Box::new(s3::S3Store::open(location, s3)?));
    }
    Ok(Box::new(LocalStore::open(location)?))
}
