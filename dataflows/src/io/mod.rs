//! Object-store I/O shared by the source and the sinks: S3 (and S3-compatible servers)
//! through aws-sdk-s3 on a small tokio runtime, with retries that outlast an outage.

pub mod s3;

pub use s3::{S3Client, S3Config, S3Location, S3Prefix};
