//! Object-store I/O shared by the source and the sinks: S3 (and S3-compatible servers)
//! through aws-sdk-s3 on a small tokio runtime, with retries that outlast an outage, and
//! the streaming multipart upload of one large object (exported tables).

pub mod s3;
pub mod upload;

pub use s3::{S3Client, S3Config, S3Location, S3Prefix};
pub use upload::S3Upload;
