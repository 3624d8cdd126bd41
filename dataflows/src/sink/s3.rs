//! Output objects under an S3 prefix. A PUT is atomic in S3 (readers see the old object
//! or the new one, never half), and the commit publishes `state/CURRENT` last, so a
//! reader following the pointer always sees a complete epoch.

use super::OutputStore;
use crate::io::s3::{S3Config, S3Error, S3Prefix};
use anyhow::Result;

/// An S3 output location.
pub struct S3Store {
    prefix: S3Prefix,
}

impl S3Store {
    /// Connects to `s3://bucket/prefix`.
    pub fn open(url: &str, config: &S3Config) -> Result<Self> {
        Ok(S3Store {
            prefix: S3Prefix::open(url, config)?,
        })
    }
}

impl OutputStore for S3Store {
    fn location(&self) -> String {
        self.prefix.location().url()
    }

    fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        Ok(self.prefix.block_on(self.prefix.put(name, bytes))?)
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match self.prefix.block_on(self.prefix.get(name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(S3Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        // `key("")` is the prefix with its trailing slash (or nothing at the bucket root).
        let (root, full) = (
            self.prefix.location().key(""),
            self.prefix.location().key(prefix),
        );
        let (objects, _) = self.prefix.block_on(self.prefix.list(&full, false))?;
        let mut names: Vec<String> = objects
            .iter()
            .filter_map(|o| o.key()?.strip_prefix(root.as_str()).map(String::from))
            .collect();
        names.sort();
        Ok(names)
    }

    fn delete(&self, name: &str) -> Result<()> {
        Ok(self.prefix.block_on(self.prefix.delete(name))?)
    }
}
