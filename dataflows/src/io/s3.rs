//! S3 access: URL parsing, client construction from the standard AWS configuration
//! chain plus endpoint/path-style overrides, and a retry loop with capped exponential
//! backoff. Transient failures (connection refused, timeouts, 5xx, throttling) are
//! retried until the server is back; permanent ones (authentication, missing bucket)
//! fail at once with a message that names the object and never the secret.

use anyhow::{anyhow, Result};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Settings of S3 access (`[s3]` in the config; flags and AWS_* variables too).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Endpoint of an S3-compatible server (MinIO, Garage, Ceph); AWS_ENDPOINT_URL also works.
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most self-hosted servers.
    pub path_style: bool,
    /// Region; overrides AWS_REGION and the profile (otherwise those, then us-east-1).
    pub region: Option<String>,
    /// Give up on a transient failure after this many seconds (0: retry forever).
    pub retry_for_s: u64,
}

/// `s3://bucket/prefix` split into its parts (prefix without slashes at either end).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix, possibly empty.
    pub prefix: String,
}

impl S3Location {
    /// Parses `s3://bucket[/prefix]`.
    pub fn parse(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| anyhow!("{url} is not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        anyhow::ensure!(!bucket.is_empty(), "{url} names no bucket");
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        })
    }

    /// The full key of `name` under the prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }

    /// The URL of this location.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-io")
            .enable_all()
            .build()
            .expect("starting the S3 I/O runtime")
    })
}

/// An S3 client plus the runtime that drives it, usable from synchronous code.
#[derive(Clone)]
pub struct S3Client {
    client: aws_sdk_s3::Client,
    retry_for: Option<Duration>,
}

impl S3Client {
    /// Builds a client from the default AWS chain and `config`'s overrides.
    pub fn new(config: &S3Config) -> Result<Arc<Self>> {
        let client = runtime().block_on(async {
            // Retries are ours (see `retry`): they log each failure and outlast outages.
            let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .retry_config(aws_config::retry::RetryConfig::disabled());
            if let Some(endpoint) = &config.endpoint {
                loader = loader.endpoint_url(endpoint);
            }
            let shared = loader.load().await;
            // [s3] region wins, then AWS_REGION / the profile, then us-east-1.
            let region = config
                .region
                .clone()
                .map(aws_config::Region::new)
                .or_else(|| shared.region().cloned())
                .unwrap_or_else(|| aws_config::Region::new("us-east-1"));
            let s3 = aws_sdk_s3::config::Builder::from(&shared)
                .region(region)
                .force_path_style(config.path_style)
                .build();
            aws_sdk_s3::Client::from_conf(s3)
        });
        let retry_for = (config.retry_for_s > 0).then(|| Duration::from_secs(config.retry_for_s));
        Ok(Arc::new(S3Client { client, retry_for }))
    }

    /// The SDK client.
    pub fn sdk(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// Runs a future to completion on the I/O runtime.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        runtime().block_on(f)
    }

    /// Runs `op` until it succeeds or fails permanently; transient failures are retried
    /// with capped exponential backoff and logged. `what` names the object (no secrets).
    pub async fn retry<T, E, Fut>(
        &self,
        what: &str,
        mut op: impl FnMut() -> Fut,
    ) -> Result<T, S3Error>
    where
        Fut: Future<Output = Result<T, SdkError<E, aws_sdk_s3::config::http::HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let started = std::time::Instant::now();
        let mut delay = Duration::from_millis(200);
        let mut attempt = 0u32;
        loop {
            match op().await {
                Ok(v) => {
                    if attempt > 0 {
                        tracing::info!(
                            stage = "s3",
                            object = what,
                            attempts = attempt + 1,
                            "S3 reachable again."
                        );
                    }
                    return Ok(v);
                }
                Err(e) => {
                    let error = classify(&e, what);
                    let expired = self
                        .retry_for
                        .is_some_and(|limit| started.elapsed() > limit);
                    if !matches!(error, S3Error::Transient(_)) || expired {
                        return Err(error);
                    }
                    attempt += 1;
                    tracing::warn!(stage = "s3", object = what, attempt, retry_in_ms = delay.as_millis() as u64, error = %error, "S3 unavailable; retrying.");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

/// A bucket and key prefix with the operations the source and the sinks share: paged
/// listing, whole-object GET/PUT/DELETE, all through the retry loop.
pub struct S3Prefix {
    client: Arc<S3Client>,
    location: S3Location,
}

impl S3Prefix {
    /// Connects to `s3://bucket/prefix` (no request yet).
    pub fn open(url: &str, config: &S3Config) -> Result<Self> {
        Ok(S3Prefix {
            client: S3Client::new(config)?,
            location: S3Location::parse(url)?,
        })
    }

    /// The location.
    pub fn location(&self) -> &S3Location {
        &self.location
    }

    /// Runs a future on the I/O runtime.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.client.block_on(f)
    }

    /// The URL of `name` under the prefix (for messages).
    pub fn what(&self, name: &str) -> String {
        format!("s3://{}/{}", self.location.bucket, self.location.key(name))
    }

    /// Every object under the full key prefix `prefix` (all pages) and, with a
    /// delimiter, the common prefixes.
    pub async fn list(
        &self,
        prefix: &str,
        delimiter: bool,
    ) -> Result<(Vec<aws_sdk_s3::types::Object>, Vec<String>), S3Error> {
        let (mut objects, mut prefixes, mut token) = (Vec::new(), Vec::new(), None::<String>);
        let what = format!("listing s3://{}/{prefix}", self.location.bucket);
        loop {
            let page = self
                .client
                .retry(&what, || {
                    let mut req = self
                        .client
                        .sdk()
                        .list_objects_v2()
                        .bucket(&self.location.bucket)
                        .prefix(prefix);
                    if delimiter {
                        req = req.delimiter("/");
                    }
                    if let Some(t) = &token {
                        req = req.continuation_token(t);
                    }
                    req.send()
                })
                .await?;
            crate::metrics::metrics().list_requests.inc();
            objects.extend(page.contents().iter().cloned());
            prefixes.extend(
                page.common_prefixes()
                    .iter()
                    .filter_map(|p| p.prefix().map(String::from)),
            );
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok((objects, prefixes))
    }

    /// Whether the prefix can be listed with these credentials (one key at most).
    pub async fn probe(&self) -> Result<(), S3Error> {
        let what = format!("listing {}", self.location.url());
        let prefix = self.location.key("");
        self.client
            .retry(&what, || {
                self.client
                    .sdk()
                    .list_objects_v2()
                    .bucket(&self.location.bucket)
                    .prefix(&prefix)
                    .max_keys(1)
                    .send()
            })
            .await
            .map(|_| ())
    }

    /// The bytes of `name`.
    pub async fn get(&self, name: &str) -> Result<Vec<u8>, S3Error> {
        let (key, what) = (self.location.key(name), self.what(name));
        let object = self
            .client
            .retry(&what, || {
                self.client
                    .sdk()
                    .get_object()
                    .bucket(&self.location.bucket)
                    .key(&key)
                    .send()
            })
            .await?;
        let bytes = object
            .body
            .collect()
            .await
            .map_err(|e| S3Error::Transient(format!("reading {what}: {e}")))?;
        Ok(bytes.into_bytes().to_vec())
    }

    /// Writes `name` whole.
    pub async fn put(&self, name: &str, bytes: &[u8]) -> Result<(), S3Error> {
        let (key, what) = (self.location.key(name), self.what(name));
        self.client
            .retry(&what, || {
                let body = aws_sdk_s3::primitives::ByteStream::from(bytes.to_vec());
                self.client
                    .sdk()
                    .put_object()
                    .bucket(&self.location.bucket)
                    .key(&key)
                    .body(body)
                    .send()
            })
            .await
            .map(|_| ())
    }

    /// Removes `name` (absent is fine).
    pub async fn delete(&self, name: &str) -> Result<(), S3Error> {
        let (key, what) = (self.location.key(name), self.what(name));
        match self
            .client
            .retry(&what, || {
                self.client
                    .sdk()
                    .delete_object()
                    .bucket(&self.location.bucket)
                    .key(&key)
                    .send()
            })
            .await
        {
            Ok(_) | Err(S3Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A failed S3 call, classified.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The object or bucket does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Credentials were refused.
    #[error("{0}")]
    Auth(String),
    /// Worth retrying: the server is unreachable, overloaded or failing.
    #[error("{0}")]
    Transient(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

fn classify<E>(e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>, what: &str) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e
        .as_service_error()
        .and_then(|s| s.code())
        .unwrap_or("")
        .to_string();
    // The error context names codes and request ids; credentials never appear in it.
    let detail = format!("{what}: {}", DisplayErrorContext(e));
    match (&code[..], status) {
        ("NoSuchKey" | "NoSuchBucket" | "NotFound", _) | (_, Some(404)) => S3Error::NotFound(detail),
        ("InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AccessDenied" | "InvalidToken" | "ExpiredToken", _)
        | (_, Some(401 | 403)) => S3Error::Auth(format!(
            "S3 refused the credentials for {what} ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile"
        )),
        ("SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable", _) | (_, Some(500..=599)) => {
            S3Error::Transient(detail)
        }
        _ if matches!(e, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_)) => {
            S3Error::Transient(detail)
        }
        _ => S3Error::Other(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let l = S3Location::parse("s3://fruit/archive/Training/").unwrap();
        assert_eq!(
            (l.bucket.as_str(), l.prefix.as_str()),
            ("fruit", "archive/Training")
        );
        assert_eq!(l.key("Banana 1/x.jpg"), "archive/Training/Banana 1/x.jpg");
        assert_eq!(S3Location::parse("s3://b").unwrap().key("k"), "k");
        assert!(S3Location::parse("s3:///x").is_err());
        assert!(S3Location::parse("/local").is_err());
    }
}
