//! Process-wide pipeline metrics, in Prometheus form: what each stage did in this
//! process since it started. The stages update them; `serve` (alone or inside `run`)
//! exposes them at `GET /metrics`. They are counters of work done, not state: the
//! durable state (images, epoch, errors) is the checkpoint's.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;
use std::time::Instant;

/// The timed stages, in pipeline order.
pub const STAGES: [&str; 7] = [
    "fetch", "decode", "embed", "moments", "models", "parquet", "commit",
];

/// Label set of per-stage and per-kind families.
pub type Labels = Vec<(String, String)>;

/// The pipeline's metrics (cheap to clone: every metric is shared).
#[derive(Clone, Default)]
pub struct Metrics {
    /// Rows added by the embed stage of this process.
    pub images_ingested: Counter,
    /// Rows retracted (deleted or rewritten objects) by this process.
    pub images_retracted: Counter,
    /// Rejected objects, by error kind.
    pub errors: Family<Labels, Counter>,
    /// Changes (new, rewritten, deleted objects) handed to the dataflow by the lister.
    pub discovered: Counter,
    /// LIST requests (pages) sent to object stores.
    pub list_requests: Counter,
    /// Changes whose epoch has committed.
    pub processed: Counter,
    /// Discovered but not yet committed changes: the backlog.
    pub pending: Gauge,
    /// Seconds from the listing that found an epoch's changes to that epoch's commit.
    pub lag_seconds: Gauge<f64, AtomicU64>,
    /// Last committed epoch.
    pub epoch: Gauge,
    /// Wall-clock seconds spent in each stage, summed over this process's workers.
    pub stage_seconds: Family<Labels, Counter<f64, AtomicU64>>,
    /// All rejected objects (the sum of `errors`, for progress).
    rejected: Counter,
}

/// The metrics of this process.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

impl Metrics {
    /// Registers every metric (shared, not copied) in `registry`, prefixed `fruits_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("fruits");
        r.register(
            "images_ingested",
            "Images embedded and added by this process",
            self.images_ingested.clone(),
        );
        r.register(
            "images_retracted",
            "Rows retracted by this process (deleted or rewritten objects)",
            self.images_retracted.clone(),
        );
        r.register("errors", "Rejected objects by kind", self.errors.clone());
        r.register(
            "changes_discovered",
            "Changes found by listing the source",
            self.discovered.clone(),
        );
        r.register(
            "list_requests",
            "LIST requests (pages) sent to object stores by this process",
            self.list_requests.clone(),
        );
        r.register(
            "changes_processed",
            "Changes whose epoch committed",
            self.processed.clone(),
        );
        r.register(
            "changes_pending",
            "Changes discovered but not yet committed (lag, in images)",
            self.pending.clone(),
        );
        r.register(
            "lag_seconds",
            "Seconds from listing to commit of the last committed epoch",
            self.lag_seconds.clone(),
        );
        r.register(
            "epoch_committed",
            "Last committed epoch",
            self.epoch.clone(),
        );
        r.register(
            "stage_seconds",
            "Seconds spent per stage, summed over workers",
            self.stage_seconds.clone(),
        );
    }

    /// Rejected objects of every kind.
    pub fn errors_total(&self) -> u64 {
        self.rejected.get()
    }

    /// Counts one rejected object of `kind`.
    pub fn error(&self, kind: &str) {
        self.rejected.inc();
        self.errors
            .get_or_create(&vec![("kind".to_string(), kind.to_string())])
            .inc();
    }

    /// Seconds spent so far in each of the pipeline's stages, in pipeline order.
    pub fn stage_summary(&self) -> Vec<(&'static str, f64)> {
        STAGES
            .iter()
            .map(|&s| (s, self.stage_seconds.get_or_create(&stage(s)).get()))
            .collect()
    }

    /// Adds `seconds` to `stage`.
    pub fn add_stage_time(&self, stage: &str, seconds: f64) {
        self.stage_seconds
            .get_or_create(&self::stage(stage))
            .inc_by(seconds);
    }
}

fn stage(name: &str) -> Labels {
    vec![("stage".to_string(), name.to_string())]
}

/// Runs `f`, charging its wall-clock time to `stage`.
pub fn timed<R>(stage: &str, f: impl FnOnce() -> R) -> R {
    let started = Instant::now();
    let result = f();
    metrics().add_stage_time(stage, started.elapsed().as_secs_f64());
    result
}
