//! Streaming one object to S3: [`S3Upload`] is a `std::io::Write` that buffers one part
//! and sends it with a multipart upload each time it fills, so memory stays one part
//! whatever the object's size; an object smaller than a part goes in one PutObject.
//! The object appears whole at [`S3Upload::finish`] or not at all: a failed request,
//! or dropping the writer unfinished, aborts the upload.
//!
//! Every part carries its CRC32 and CreateMultipartUpload names the algorithm: Garage
//! accepts a multipart upload only with a checksum algorithm on create, and then the
//! parts' checksums on complete. aws-sdk-s3 sends a CRC32 with each part by default but
//! does not hand it back, so the writer computes it (with the SDK's own checksum crate)
//! and lists the same values on CompleteMultipartUpload.

use super::s3::{S3Client, S3Config, S3Error, S3Location};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use std::sync::Arc;

/// The part size: parts are buffered in memory, one at a time.
pub const PART_SIZE: usize = 8 << 20;
/// S3's smallest part (every part but the last); servers reject smaller ones on complete.
pub const MIN_PART_SIZE: usize = 5 << 20;
/// S3's most parts in one upload.
const MAX_PARTS: usize = 10_000;

/// A streaming writer of one S3 object (`s3://bucket/key`); see the module doc.
pub struct S3Upload {
    client: Arc<S3Client>,
    bucket: String,
    key: String,
    part_size: usize,
    buffer: Vec<u8>,
    /// The multipart upload, once the first part filled.
    multipart: Option<Multipart>,
    /// A request failed: the upload was aborted and nothing more is sent.
    failed: bool,
}

struct Multipart {
    id: String,
    parts: Vec<CompletedPart>,
}

impl S3Upload {
    /// A writer of `url` (`s3://bucket/key`) in parts of `part_size` bytes ([`PART_SIZE`];
    /// S3 needs at least [`MIN_PART_SIZE`]). No request is made until a part fills.
    pub fn create(url: &str, config: &S3Config, part_size: usize) -> anyhow::Result<Self> {
        let (bucket, key) = object(url)?;
        anyhow::ensure!(part_size > 0, "the part size must be positive");
        Ok(S3Upload {
            client: S3Client::new(config)?,
            bucket,
            key,
            part_size,
            buffer: Vec::new(),
            multipart: None,
            failed: false,
        })
    }

    /// The destination, `s3://bucket/key`.
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    /// Sends what is buffered and publishes the object (PutObject when it fits in one
    /// part, else the last part and CompleteMultipartUpload). On failure the upload is
    /// aborted: no object appears.
    pub fn finish(mut self) -> Result<(), S3Error> {
        self.guarded(|upload| {
            if upload.multipart.is_none() {
                return upload.put();
            }
            if !upload.buffer.is_empty() {
                upload.send_part()?;
            }
            upload.complete()
        })
    }

    /// Runs `step`; if it fails, aborts the upload so that later writes fail too.
    fn guarded<T>(
        &mut self,
        step: impl FnOnce(&mut Self) -> Result<T, S3Error>,
    ) -> Result<T, S3Error> {
        if self.failed {
            return Err(S3Error::Other(format!(
                "{}: the upload was aborted after an earlier error",
                self.url()
            )));
        }
        let result = step(self);
        if result.is_err() {
            self.failed = true;
            self.abort();
        }
        result
    }

    /// Writes the buffer as the whole object.
    fn put(&mut self) -> Result<(), S3Error> {
        let (client, what) = (&self.client, self.url());
        let body = Bytes::from(std::mem::take(&mut self.buffer));
        // The SDK adds the body's CRC32 to a PutObject by itself.
        client.block_on(client.retry(&what, || {
            client
                .sdk()
                .put_object()
                .bucket(&self.bucket)
                .key(&self.key)
                .body(ByteStream::from(body.clone()))
                .send()
        }))?;
        Ok(())
    }

    /// Starts the multipart upload, naming the checksum algorithm of its parts.
    fn start(&self) -> Result<Multipart, S3Error> {
        let (client, what) = (
            &self.client,
            format!("starting the upload of {}", self.url()),
        );
        let created = client.block_on(client.retry(&what, || {
            client
                .sdk()
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .checksum_algorithm(ChecksumAlgorithm::Crc32)
                .send()
        }))?;
        let id = created
            .upload_id()
            .ok_or_else(|| S3Error::Other(format!("{what}: the server returned no upload id")))?;
        Ok(Multipart {
            id: id.to_string(),
            parts: Vec::new(),
        })
    }

    /// Uploads the buffer as the next part (starting the upload at the first).
    fn send_part(&mut self) -> Result<(), S3Error> {
        if self.multipart.is_none() {
            self.multipart = Some(self.start()?);
        }
        let url = self.url();
        let upload = self.multipart.as_mut().expect("started");
        let number = upload.parts.len() + 1;
        if number > MAX_PARTS {
            return Err(S3Error::Other(format!(
                "{url}: over {MAX_PARTS} parts of {} bytes, S3's limit",
                self.part_size
            )));
        }
        let body = Bytes::from(std::mem::take(&mut self.buffer));
        let checksum = crc32(&body);
        let (client, what) = (&self.client, format!("part {number} of {url}"));
        let sent = client.block_on(client.retry(&what, || {
            client
                .sdk()
                .upload_part()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&upload.id)
                .part_number(number as i32)
                .checksum_algorithm(ChecksumAlgorithm::Crc32)
                .checksum_crc32(&checksum)
                .body(ByteStream::from(body.clone()))
                .send()
        }))?;
        upload.parts.push(
            CompletedPart::builder()
                .part_number(number as i32)
                .set_e_tag(sent.e_tag().map(String::from))
                .checksum_crc32(checksum)
                .build(),
        );
        tracing::debug!(stage = "s3", object = %url, part = number, bytes = body.len(), "Part uploaded.");
        Ok(())
    }

    /// Publishes the uploaded parts as the object.
    fn complete(&mut self) -> Result<(), S3Error> {
        let url = self.url();
        let upload = self.multipart.as_ref().expect("started");
        let parts = CompletedMultipartUpload::builder()
            .set_parts(Some(upload.parts.clone()))
            .build();
        let (client, what) = (&self.client, format!("completing the upload of {url}"));
        client.block_on(client.retry(&what, || {
            client
                .sdk()
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&upload.id)
                .multipart_upload(parts.clone())
                .send()
        }))?;
        self.multipart = None;
        Ok(())
    }

    /// Aborts the multipart upload, if one was started, so that its parts are dropped.
    fn abort(&mut self) {
        let Some(upload) = self.multipart.take() else {
            return;
        };
        let url = self.url();
        let (client, what) = (&self.client, format!("aborting the upload of {url}"));
        let aborted = client.block_on(client.retry(&what, || {
            client
                .sdk()
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&upload.id)
                .send()
        }));
        match aborted {
            Ok(_) => {
                tracing::debug!(stage = "s3", object = %url, "Upload aborted; no object written.")
            }
            Err(e) => tracing::warn!(stage = "s3", object = %url, error = %e,
                "Could not abort the upload: no object was written, but its parts stay until the bucket's lifecycle rule removes them."),
        }
    }
}

impl std::io::Write for S3Upload {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.failed {
            return Err(std::io::Error::other(format!(
                "{}: the upload was aborted after an earlier error",
                self.url()
            )));
        }
        if self.buffer.capacity() == 0 {
            self.buffer.reserve_exact(self.part_size);
        }
        let n = bytes.len().min(self.part_size - self.buffer.len());
        self.buffer.extend_from_slice(&bytes[..n]);
        if self.buffer.len() == self.part_size {
            self.guarded(Self::send_part)
                .map_err(std::io::Error::other)?;
        }
        Ok(n)
    }

    /// Parts go when full and the rest at [`S3Upload::finish`]: nothing to do here.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for S3Upload {
    /// An upload dropped unfinished (the writer's caller failed) is aborted.
    fn drop(&mut self) {
        self.abort();
    }
}

/// The bucket and key of `s3://bucket/key`.
fn object(url: &str) -> anyhow::Result<(String, String)> {
    let location = S3Location::parse(url)?;
    anyhow::ensure!(
        !location.prefix.is_empty() && !url.ends_with('/'),
        "{url} names no object: write to s3://bucket/key"
    );
    Ok((location.bucket, location.prefix))
}

/// The base64 CRC32 of `bytes`, as the `x-amz-checksum-crc32` header carries it.
fn crc32(bytes: &[u8]) -> String {
    let mut checksum = aws_smithy_checksums::ChecksumAlgorithm::Crc32.into_impl();
    checksum.update(bytes);
    checksum
        .header_value()
        .to_str()
        .expect("base64 is ASCII")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_the_header_value() {
        // CRC32 of "123456789" is 0xCBF43926.
        assert_eq!(crc32(b"123456789"), "y/Q5Jg==");
    }

    #[test]
    fn a_destination_names_an_object() {
        assert!(object("s3://bucket").is_err());
        assert!(object("s3://bucket/dir/").is_err());
        assert!(object("/local/t.csv").is_err());
        let (bucket, key) = object("s3://bucket/dir/t.csv").unwrap();
        assert_eq!((bucket.as_str(), key.as_str()), ("bucket", "dir/t.csv"));
    }
}
