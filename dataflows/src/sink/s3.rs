//! Output objects under an S3 prefix. A PUT is atomic in S3 (readers see the old object
//! or the new one, never half), and the commit publishes `state/CURRENT` last, so a
//! reader following the pointer always sees a complete epoch.

use super::OutputStore;
use crate::io::s3::{S3Client, S3Config, S3Error, S3Location};
use anyhow::Result;
use aws_sdk_s3::primitives::ByteStream;
use std::sync::Arc;

/// An S3 output location.
pub struct S3Store {
    client: Arc<S3Client>,
    location: S3Location,
}

impl S3Store {
    /// Connects to `s3://bucket/prefix`.
    pub fn open(url: &str, config: &S3Config) -> Result<Self> {
        Ok(S3Store {
            client: S3Client::new(config)?,
            location: S3Location::parse(url)?,
        })
    }

    fn what(&self, name: &str) -> String {
        format!("s3://{}/{}", self.location.bucket, self.location.key(name))
    }
}

impl OutputStore for S3Store {
    fn location(&self) -> String {
        self.location.url()
    }

    fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let (key, what) = (self.location.key(name), self.what(name));
        self.client.block_on(self.client.retry(&what, || {
            self.client
                .sdk()
                .put_object()
                .bucket(&self.location.bucket)
                .key(&key)
                .body(ByteStream::from(bytes.to_vec()))
                .send()
        }))?;
        Ok(())
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let (key, what) = (self.location.key(name), self.what(name));
        self.client.block_on(async {
            let got = self
                .client
                .retry(&what, || {
                    self.client
                        .sdk()
                        .get_object()
                        .bucket(&self.location.bucket)
                        .key(&key)
                        .send()
                })
                .await;
            match got {
                Ok(object) => {
                    let bytes = object
                        .body
                        .collect()
                        .await
                        .map_err(|e| anyhow::anyhow!("reading {what}: {e}"))?;
                    Ok(Some(bytes.into_bytes().to_vec()))
                }
                Err(S3Error::NotFound(_)) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let full = self.location.key(prefix);
        let root = self.location.key("");
        let what = format!("listing {}", self.what(prefix));
        self.client.block_on(async {
            let (mut names, mut token) = (Vec::new(), None::<String>);
            loop {
                let page = self
                    .client
                    .retry(&what, || {
                        let mut req = self
                            .client
                            .sdk()
                            .list_objects_v2()
                            .bucket(&self.location.bucket)
                            .prefix(&full);
                        if let Some(t) = &token {
                            req = req.continuation_token(t);
                        }
                        req.send()
                    })
                    .await?;
                names.extend(
                    page.contents()
                        .iter()
                        .filter_map(|o| o.key()?.strip_prefix(root.as_str()).map(String::from)),
                );
                match page.next_continuation_token() {
                    Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                    _ => break,
                }
            }
            names.sort();
            Ok(names)
        })
    }

    fn delete(&self, name: &str) -> Result<()> {
        let (key, what) = (self.location.key(name), self.what(name));
        match self.client.block_on(self.client.retry(&what, || {
            self.client
                .sdk()
                .delete_object()
                .bucket(&self.location.bucket)
                .key(&key)
                .send()
        })) {
            Ok(_) | Err(S3Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
