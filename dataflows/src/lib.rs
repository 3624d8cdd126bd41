//! fruits-dataflows: the fruits-flow computation, with no CLI or HTTP code.
//!
//! The stages, in pipeline order (start reading at [`ingest`], which wires them):
//! - [`source`]: lists the archive and turns listings into changes (the ledger);
//! - [`decode`]: bytes → validated RGB → model input tensor;
//! - [`embed`]: tract-onnx CNN → fixed-point embeddings; retractions for deletions;
//! - [`stats`]: exact moments → standardized PCA → online KMeans;
//! - [`sink`]: Parquet rows, model JSON, error records, status;
//! - [`state`]: per-epoch checkpoints and the commit point;
//! - [`io`]: S3 access shared by the S3 source and sink;
//! - [`replay`]: rebuilds the statistics from stored embeddings, no model;
//! - [`classify`]: names a fruit from a photo with the live models;
//! - [`metrics`], [`progress`]: what the stages did, for `/metrics` and the progress bar;
//! - [`background`]: the helper thread an operator hands slow work to;
//! - [`startup`], [`liveness`]: linking a cluster's processes, and stopping clearly when
//!   one is missing at startup or lost later.
#![warn(missing_docs)]

pub mod background;
pub mod classify;
pub mod config;
pub mod decode;
pub mod embed;
pub mod ingest;
pub mod io;
pub mod liveness;
pub mod metrics;
pub mod progress;
pub mod record;
pub mod replay;
pub mod sink;
pub mod source;
pub mod startup;
pub mod state;
pub mod stats;

pub use config::PipelineConfig;
pub use ingest::{run_worker, RunOptions};
