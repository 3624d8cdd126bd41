//! The web page: one HTML document (plain JavaScript and canvas, no dependency) with a
//! map of the archive (t-SNE and PC1 x PC2 of a fixed-size stable sample, coloured by
//! label or cluster, with photo thumbnails), the explained-variance curve, the cluster x
//! label table, images per label over the epochs and a try-a-photo box. `serve` answers
//! `GET /` with it and feeds it `GET /api/map`; `report` writes it with the data inlined.
//!
//! Everything here is O(sample): one streaming pass over the live rows keeps at most
//! `max_points` points (the smallest key hashes: the same sample on every run, and a
//! key stays in it as the archive grows unless smaller hashes push it out).

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fruits_dataflows::io::S3Config;
use fruits_dataflows::record::ImageKey;
use fruits_dataflows::sink::OutputStore;
use fruits_dataflows::source::Source;
use fruits_dataflows::state::{
    for_each_live_file, load_committed, load_history, Archive, Checkpoint,
};
use fruits_dataflows::stats::PcaModel;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::Serialize;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tower_http::timeout::TimeoutLayer;

static TEMPLATE: &str = include_str!("../assets/web/index.html");
static STYLE: &str = include_str!("../assets/web/app.css");
static SCRIPT: &str = include_str!("../assets/web/app.js");

/// Points on the map at most (what the page draws and what t-SNE embeds).
pub const MAX_POINTS: usize = 20_000;

/// PCA components t-SNE sees (the usual PCA-then-t-SNE recipe: the first 50).
const TSNE_DIMS: usize = 50;

/// Map coordinates are sent as integers in 0..=QUANT (the page only draws them).
const QUANT: f32 = 9999.0;

/// One sampled live image.
pub struct MapPoint {
    /// Its key in the archive.
    pub key: String,
    /// Its size in bytes, as the ledger recorded it (None when the version does not say).
    pub size: Option<u64>,
    /// Index into the sorted label names.
    pub label: usize,
    /// Its KMeans cluster.
    pub cluster: Option<usize>,
    /// Its first (up to [`TSNE_DIMS`]) PCA coordinates.
    pub features: Vec<f32>,
}

/// What one pass over the live rows yields.
pub struct Sample {
    /// Label names, sorted (the checkpoint's order).
    pub labels: Vec<String>,
    /// At most `max_points` points, in key order.
    pub points: Vec<MapPoint>,
    /// Exact cluster x label counts over every live image.
    pub table: BTreeMap<(usize, usize), usize>,
}

/// The size in a ledger version (`size-mtime` for a directory, `size-ETag` for S3).
fn version_size(version: &str) -> Option<u64> {
    version.split('-').next()?.parse().ok()
}

struct Ranked(u64, MapPoint);
impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0 && self.1.key == other.1.key
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0, &self.1.key).cmp(&(other.0, &other.1.key))
    }
}

/// One streaming pass over the live rows (one embeddings file at a time): the exact
/// cluster x label table, and the `max_points` live images of smallest key hash.
pub fn scan(
    store: &dyn OutputStore,
    checkpoint: &Checkpoint,
    pca: &PcaModel,
    max_points: usize,
) -> Result<Sample> {
    let labels: Vec<String> = checkpoint.labels.keys().cloned().collect();
    let archive = Archive::load(store, checkpoint, |_| true)?;
    let mut heap: BinaryHeap<Ranked> = BinaryHeap::new();
    let mut table: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    let dims = pca.k.min(TSNE_DIMS);
    for_each_live_file(store, checkpoint, &archive, |rows| {
        let raw: Vec<Vec<f64>> = rows.iter().map(|(row, _)| row.embedding.to_f64()).collect();
        let projected = pca.project_many(&raw);
        let clusters = checkpoint.models.kmeans.assign_projected(&projected, pca);
        for (((row, _), p), cluster) in rows.iter().zip(&projected).zip(clusters) {
            let label = labels.binary_search(&row.label.0).unwrap_or(0);
            if let Some(c) = cluster {
                *table.entry((c, label)).or_default() += 1;
            }
            let hash = row.key.bucket_hash();
            if heap.len() >= max_points && heap.peek().is_some_and(|top| top.0 <= hash) {
                continue;
            }
            let size = archive
                .ledger
                .get(&row.key)
                .and_then(|e| version_size(&e.version));
            heap.push(Ranked(
                hash,
                MapPoint {
                    key: row.key.0.clone(),
                    size,
                    label,
                    cluster,
                    features: p[..dims].iter().map(|&v| v as f32).collect(),
                },
            ));
            if heap.len() > max_points {
                heap.pop();
            }
        }
        Ok(())
    })?;
    let mut points: Vec<MapPoint> = heap.into_iter().map(|r| r.1).collect();
    points.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(Sample {
        labels,
        points,
        table,
    })
}

/// A t-SNE embedding of the points' PCA coordinates (Barnes-Hut, perplexity 30 or less
/// on small samples, 1000 iterations, started from PC1 x PC2 so that the result is
/// reproducible). None below 10 points.
pub fn tsne(points: &[MapPoint]) -> Option<Vec<[f32; 2]>> {
    let n = points.len();
    if n < 10 || points[0].features.len() < 2 {
        return None;
    }
    let samples: Vec<&[f32]> = points.iter().map(|p| p.features.as_slice()).collect();
    // bhtsne needs n - 1 >= 3 * perplexity.
    let perplexity = 30f32.min(((n - 1) / 3) as f32).max(1.0);
    // scikit-learn's PCA initialisation: PC1 x PC2 scaled to a standard deviation of 1e-4.
    let (mean, var) = {
        let m = points.iter().map(|p| p.features[0] as f64).sum::<f64>() / n as f64;
        let v = points
            .iter()
            .map(|p| (p.features[0] as f64 - m).powi(2))
            .sum::<f64>()
            / n as f64;
        (m, v)
    };
    let scale = 1e-4 / var.sqrt().max(1e-12);
    let mean2 = points.iter().map(|p| p.features[1] as f64).sum::<f64>() / n as f64;
    let init: Vec<f32> = points
        .iter()
        .flat_map(|p| {
            [
                ((p.features[0] as f64 - mean) * scale) as f32,
                ((p.features[1] as f64 - mean2) * scale) as f32,
            ]
        })
        .collect();
    let mut t = bhtsne::tSNE::<f32, &[f32], 2>::new(&samples);
    t.perplexity(perplexity)
        .epochs(1000)
        .initial_embedding(init);
    t.barnes_hut(0.5, |a, b| {
        a.iter()
            .zip(b.iter())
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt()
    });
    let y = t.embedding();
    if y.iter().any(|v| !v.is_finite()) {
        return None;
    }
    Some(y.chunks(2).map(|c| [c[0], c[1]]).collect())
}

/// Images per label after each epoch, as the page draws them.
#[derive(Serialize)]
pub struct History {
    /// The committed epochs, in order.
    pub epochs: Vec<u64>,
    /// Per label (the page's label order), its live images after each epoch.
    pub counts: Vec<Vec<i64>>,
}

/// A 2-D projection of the sample, quantised for the wire.
#[derive(Serialize)]
pub struct Projection {
    /// x0, y0, x1, y1, ... in 0..=9999.
    pub xy: Vec<u16>,
    /// The unquantised extent: [xmin, xmax, ymin, ymax].
    pub range: [f32; 4],
}

impl Projection {
    fn new(points: impl Iterator<Item = [f32; 2]> + Clone) -> Self {
        let mut range = [
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        for [x, y] in points.clone() {
            range = [
                range[0].min(x),
                range[1].max(x),
                range[2].min(y),
                range[3].max(y),
            ];
        }
        let q = |v: f32, lo: f32, hi: f32| {
            let span = (hi - lo).max(1e-12);
            (((v - lo) / span) * QUANT).round().clamp(0.0, QUANT) as u16
        };
        let xy = points
            .flat_map(|[x, y]| [q(x, range[0], range[1]), q(y, range[2], range[3])])
            .collect();
        if !range[0].is_finite() {
            range = [0.0; 4];
        }
        Projection { xy, range }
    }
}

/// Everything the page shows, as one JSON object (`GET /api/map`, or inlined by `report`).
#[derive(Serialize)]
pub struct MapData {
    /// Committed epoch the data comes from.
    pub epoch: u64,
    /// The archive.
    pub source: String,
    /// Live images, quarantined objects.
    pub images: i64,
    pub errors: usize,
    /// Label names (sorted) and their live images.
    pub labels: Vec<String>,
    pub label_counts: Vec<i64>,
    /// KMeans clusters.
    pub clusters: usize,
    /// Embedding dimension, kept components, their explained variance, the target.
    pub dim: usize,
    pub k: usize,
    pub explained: f64,
    pub target: f64,
    /// Explained variance ratio of the first components (k x 3, at least 10).
    pub variance: Vec<f64>,
    /// The sample: keys, label indices, clusters (-1: none).
    pub keys: Vec<String>,
    pub label: Vec<u32>,
    pub cluster: Vec<i32>,
    /// PC1 x PC2 of the sample.
    pub pc: Projection,
    /// t-SNE of the sample, once computed.
    pub tsne: Option<Projection>,
    /// True while t-SNE is being computed (the page asks again later).
    pub tsne_pending: bool,
    /// Seconds the t-SNE took.
    pub tsne_seconds: Option<f64>,
    /// Exact cluster x label counts: [cluster, label, images].
    pub table: Vec<[usize; 3]>,
    pub history: History,
    /// True when the page comes with the report's PNG files beside it.
    pub pngs: bool,
}

impl MapData {
    /// The page's data for a sample (t-SNE pending until [`MapData::set_tsne`]).
    pub fn new(
        store: &dyn OutputStore,
        checkpoint: &Checkpoint,
        pca: &PcaModel,
        sample: &Sample,
        target: f64,
    ) -> Result<Self> {
        let history = load_history(store, checkpoint)?;
        let labels = sample.labels.clone();
        let shown = (pca.k * 3).clamp(10, pca.explained_variance_ratio.len());
        let pc = Projection::new(
            sample
                .points
                .iter()
                .map(|p| [p.features[0], p.features.get(1).copied().unwrap_or(0.0)]),
        );
        Ok(MapData {
            epoch: checkpoint.epoch,
            source: checkpoint.source.clone(),
            images: checkpoint.images(),
            errors: checkpoint.errors,
            label_counts: labels
                .iter()
                .map(|l| checkpoint.labels.get(l).map_or(0, |s| s.n))
                .collect(),
            clusters: checkpoint.models.kmeans.centroids.len(),
            dim: checkpoint.models.moments.dim,
            k: pca.k,
            explained: pca.explained_variance(),
            target,
            variance: pca.explained_variance_ratio[..shown].to_vec(),
            keys: sample.points.iter().map(|p| p.key.clone()).collect(),
            label: sample.points.iter().map(|p| p.label as u32).collect(),
            cluster: sample
                .points
                .iter()
                .map(|p| p.cluster.map_or(-1, |c| c as i32))
                .collect(),
            pc,
            tsne: None,
            tsne_pending: sample.points.len() >= 10,
            tsne_seconds: None,
            table: sample.table.iter().map(|(&(c, l), &n)| [c, l, n]).collect(),
            history: History {
                epochs: history.iter().map(|h| h.epoch).collect(),
                counts: labels
                    .iter()
                    .map(|l| {
                        history
                            .iter()
                            .map(|h| *h.labels.get(l).unwrap_or(&0))
                            .collect()
                    })
                    .collect(),
            },
            labels,
            pngs: false,
        })
    }

    /// Computes the t-SNE of the sample into the data (blocking: seconds to minutes).
    pub fn compute_tsne(&mut self, sample: &Sample) {
        let started = Instant::now();
        let embedding = tsne(&sample.points);
        self.tsne_seconds = Some(started.elapsed().as_secs_f64());
        self.tsne = embedding.map(|e| Projection::new(e.into_iter()));
        self.tsne_pending = false;
    }
}

/// The page. `data`: the inlined JSON of a self-contained page (`report`), or None for
/// the served page, which fetches `/api/map` and follows `/status`.
pub fn page(data: Option<&MapData>) -> String {
    let inlined = match data {
        // `</` never appears raw inside the script element.
        Some(d) => serde_json::to_string(d)
            .expect("map data serialises")
            .replace("</", "<\\/"),
        None => "null".into(),
    };
    TEMPLATE
        .replace("/*STYLE*/", STYLE)
        .replace("/*SCRIPT*/", SCRIPT)
        .replace("/*DATA*/null", &inlined)
}

// ---- serving: the map worker, the page, the map data and thumbnails ----

/// Settings of the served map.
#[derive(Clone, Debug)]
pub struct MapOptions {
    /// Recompute at most this often (each recompute reads every live row once), and
    /// never sooner than 4 times the last recompute's duration after it (so the map
    /// takes at most a fifth of a CPU's time from a pipeline it runs beside).
    pub every: Duration,
    /// Points on the map at most.
    pub points: usize,
    /// The `[pca] variance` target the page marks.
    pub variance_target: f64,
    /// S3 settings for an s3:// archive (thumbnails).
    pub s3: S3Config,
}

impl MapOptions {
    /// The defaults: at most one recompute every 30 s, [`MAX_POINTS`] points.
    pub fn new(variance_target: f64, s3: S3Config) -> Self {
        MapOptions {
            every: Duration::from_secs(30),
            points: MAX_POINTS,
            variance_target,
            s3,
        }
    }
}

/// Largest archive object a thumbnail request reads (checked against the ledger's
/// size before reading, and against the bytes after).
pub const THUMB_MAX_BYTES: u64 = 4 << 20;
/// Archive reads for thumbnails at once; others wait up to [`THUMB_WAIT`], then get 503.
const THUMB_READS: usize = 4;
const THUMB_WAIT: Duration = Duration::from_secs(10);

/// One published map: its JSON, and the only keys `/thumb` serves.
struct Published {
    json: Bytes,
    /// Sampled key -> its size per the ledger.
    keys: Arc<HashMap<String, Option<u64>>>,
    /// The archive the keys are read from (None: it could not be opened).
    source: Option<Arc<dyn Source>>,
}

/// The served side of the page.
pub struct Site {
    map: RwLock<Option<Arc<Published>>>,
    /// Why there is no map yet (before the first one).
    waiting: RwLock<String>,
    reads: Arc<Semaphore>,
    /// Archive objects read for thumbnails.
    thumbnails_read: Counter,
    /// Thumbnail requests refused (unknown key, malformed query, too large).
    thumbnails_refused: Counter,
}

impl Site {
    /// A site with no map yet; its counters go into `registry`.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let site = Site {
            map: RwLock::new(None),
            waiting: RwLock::new("the map is being computed".into()),
            reads: Arc::new(Semaphore::new(THUMB_READS)),
            thumbnails_read: Counter::default(),
            thumbnails_refused: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("fruits");
        r.register(
            "thumbnails_read",
            "Archive objects read for thumbnails",
            site.thumbnails_read.clone(),
        );
        r.register(
            "thumbnails_refused",
            "Thumbnail requests refused before any read (unknown key, malformed, too large)",
            site.thumbnails_refused.clone(),
        );
        Arc::new(site)
    }

    fn current(&self) -> Option<Arc<Published>> {
        self.map.read().expect("lock").clone()
    }

    fn publish(
        &self,
        data: &MapData,
        keys: &Arc<HashMap<String, Option<u64>>>,
        source: Option<Arc<dyn Source>>,
    ) {
        let json = Bytes::from(serde_json::to_vec(data).expect("map data serialises"));
        *self.map.write().expect("lock") = Some(Arc::new(Published {
            json,
            keys: keys.clone(),
            source,
        }));
    }

    /// The routes: `GET /` (the page), `GET /api/map`, `GET /thumb?key=K`.
    pub fn routes(self: &Arc<Self>, timeout: Duration) -> Router {
        Router::new()
            .route("/", get(page_handler))
            .route("/api/map", get(map_handler))
            .route("/thumb", get(thumb_handler))
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                timeout,
            ))
            .with_state(self.clone())
    }

    /// Starts the thread that recomputes the map when the committed epoch changes (at
    /// most every `options.every`): PC1 x PC2 first, t-SNE when done. Ends with `stop`.
    pub fn start(
        self: &Arc<Self>,
        store: Arc<dyn OutputStore>,
        options: MapOptions,
        stop: Arc<AtomicBool>,
    ) -> Result<()> {
        let site = self.clone();
        std::thread::Builder::new()
            .name("map".into())
            .spawn(move || site.follow(store.as_ref(), &options, &stop))
            .context("starting the map thread")?;
        Ok(())
    }

    fn follow(&self, store: &dyn OutputStore, options: &MapOptions, stop: &AtomicBool) {
        let mut seen: Option<Vec<u8>> = None;
        // When the last recompute started, and how long it took.
        let mut last: Option<(Instant, Duration)> = None;
        let mut source: Option<(String, Option<Arc<dyn Source>>)> = None;
        while !stop.load(Ordering::Relaxed) {
            let pointer = store.get("state/CURRENT");
            let due = last.is_none_or(|(at, took)| at.elapsed() >= options.every.max(took * 5));
            match pointer {
                Ok(Some(p)) if seen.as_ref() != Some(&p) && due => {
                    let started = Instant::now();
                    let built = self.build(store, options, &mut source);
                    last = Some((started, started.elapsed()));
                    match built {
                        Ok(()) => seen = Some(p),
                        Err(e) => {
                            let e = format!("{e:#}");
                            tracing::warn!(stage = "serve", error = %e, "Map not computed; retrying.");
                            *self.waiting.write().expect("lock") = e;
                        }
                    }
                }
                Ok(None) => {
                    *self.waiting.write().expect("lock") =
                        "no committed state yet: the map follows the first epoch".into();
                }
                Err(e) => {
                    tracing::warn!(stage = "serve", error = %format!("{e:#}"), "Reading the output failed; retrying.")
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn build(
        &self,
        store: &dyn OutputStore,
        options: &MapOptions,
        source: &mut Option<(String, Option<Arc<dyn Source>>)>,
    ) -> Result<()> {
        let started = Instant::now();
        let checkpoint = load_committed(store)?;
        let pca = checkpoint
            .models
            .pca
            .as_ref()
            .context("no PCA model yet: the output holds fewer than two images")?;
        let sample = scan(store, &checkpoint, pca, options.points.max(1))?;
        let mut data = MapData::new(store, &checkpoint, pca, &sample, options.variance_target)?;
        if source
            .as_ref()
            .is_none_or(|(at, _)| *at != checkpoint.source)
        {
            let opened = fruits_dataflows::source::open(&checkpoint.source, &options.s3)
                .map(Arc::from)
                .map_err(|e| {
                    tracing::warn!(stage = "serve", source = %checkpoint.source, error = %format!("{e:#}"), "The archive cannot be opened: no thumbnails.")
                })
                .ok();
            *source = Some((checkpoint.source.clone(), opened));
        }
        let archive = source.as_ref().and_then(|(_, s)| s.clone());
        let keys: Arc<HashMap<String, Option<u64>>> = Arc::new(
            sample
                .points
                .iter()
                .map(|p| (p.key.clone(), p.size))
                .collect(),
        );
        self.publish(&data, &keys, archive.clone());
        tracing::info!(
            stage = "serve",
            epoch = checkpoint.epoch,
            points = sample.points.len(),
            seconds = started.elapsed().as_secs_f64(),
            "Map published; t-SNE next."
        );
        data.compute_tsne(&sample);
        self.publish(&data, &keys, archive);
        tracing::info!(
            stage = "serve",
            epoch = checkpoint.epoch,
            points = sample.points.len(),
            tsne_seconds = data.tsne_seconds.unwrap_or(0.0),
            "t-SNE published."
        );
        Ok(())
    }
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

async fn page_handler() -> Response {
    static PAGE: OnceLock<String> = OnceLock::new();
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        PAGE.get_or_init(|| page(None)).as_str(),
    )
        .into_response()
}

async fn map_handler(State(site): State<Arc<Site>>) -> Response {
    match site.current() {
        Some(m) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            m.json.clone(),
        )
            .into_response(),
        // 200, so the page's polling leaves no network error in the console.
        None => Json(serde_json::json!({
            "pending": true,
            "reason": site.waiting.read().expect("lock").clone(),
        }))
        .into_response(),
    }
}

/// Strict percent-decoding of one query value (`+` is a space, as in forms); None when
/// malformed or not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The one `key` parameter of a query string.
fn query_key(query: Option<&str>) -> std::result::Result<String, &'static str> {
    let mut found = None;
    for pair in query.unwrap_or("").split('&') {
        if let Some(v) = pair.strip_prefix("key=") {
            if found.is_some() {
                return Err("give one key");
            }
            found = Some(percent_decode(v).ok_or("the key is not valid percent-encoded UTF-8")?);
        }
    }
    found.ok_or("missing ?key=")
}

/// The image type of some bytes, by signature.
fn image_type(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else if bytes.starts_with(b"GIF8") {
        Some("image/gif")
    } else {
        None
    }
}

/// `GET /thumb?key=K`: the archive object K, read through the archive's own source,
/// only when K is exactly one of the map's sampled keys. Nothing else of the request
/// ever reaches a path or an S3 key.
async fn thumb_handler(State(site): State<Arc<Site>>, RawQuery(query): RawQuery) -> Response {
    let refuse = |status: StatusCode, message: String| {
        site.thumbnails_refused.inc();
        json_error(status, message)
    };
    let key = match query_key(query.as_deref()) {
        Ok(k) => k,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.into()),
    };
    let Some(map) = site.current() else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "no map yet".into());
    };
    let Some(size) = map.keys.get(&key).copied() else {
        return refuse(
            StatusCode::NOT_FOUND,
            "not a key of the map's sample".into(),
        );
    };
    if size.is_some_and(|s| s > THUMB_MAX_BYTES) {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the object is larger than {THUMB_MAX_BYTES} bytes"),
        );
    }
    let Some(source) = map.source.clone() else {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the archive cannot be opened",
        );
    };
    let permit = match tokio::time::timeout(THUMB_WAIT, site.reads.clone().acquire_owned()).await {
        Ok(Ok(p)) => p,
        _ => {
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many thumbnails at once",
            )
        }
    };
    site.thumbnails_read.inc();
    // The key is the ledger's own (cloned from the sample), never the request's text.
    let image_key = ImageKey(
        map.keys
            .get_key_value(&key)
            .map(|(k, _)| k.clone())
            .expect("checked above"),
    );
    let read = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        source.read(&image_key)
    })
    .await;
    let bytes = match read {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            tracing::warn!(stage = "serve", key = %key, error = %format!("{e:#}"), "Thumbnail not read.");
            return json_error(
                StatusCode::NOT_FOUND,
                "the object cannot be read from the archive",
            );
        }
        Err(_) => return json_error(StatusCode::INTERNAL_SERVER_ERROR, "reading failed"),
    };
    if bytes.len() as u64 > THUMB_MAX_BYTES {
        return json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the object is larger than {THUMB_MAX_BYTES} bytes"),
        );
    }
    let Some(content_type) = image_type(&bytes) else {
        return json_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the object is not an image",
        );
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "private, max-age=300"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        bytes,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbnail_queries_decode_strictly() {
        assert_eq!(
            query_key(Some("key=Kiwi%201%2F0_100.jpg")).unwrap(),
            "Kiwi 1/0_100.jpg"
        );
        assert_eq!(query_key(Some("key=a+b")).unwrap(), "a b");
        assert_eq!(query_key(Some("key=%252F")).unwrap(), "%2F");
        assert!(query_key(Some("key=%2")).is_err());
        assert!(query_key(Some("key=%zz")).is_err());
        assert!(query_key(Some("key=%FF")).is_err());
        assert!(query_key(Some("key=a&key=b")).is_err());
        assert!(query_key(Some("other=1")).is_err());
        assert!(query_key(None).is_err());
        assert_eq!(image_type(b"\xFF\xD8\xFF\xE0"), Some("image/jpeg"));
        assert_eq!(image_type(b"<html>"), None);
    }

    #[test]
    fn sizes_come_from_ledger_versions() {
        assert_eq!(version_size("5123-1712345678000000000"), Some(5123));
        assert_eq!(version_size("77-\"abc-1\""), Some(77));
        assert_eq!(version_size(""), None);
    }

    #[test]
    fn projections_are_quantised_over_their_extent() {
        let p = Projection::new([[0.0, 5.0], [2.0, 5.0], [1.0, 6.0]].into_iter());
        assert_eq!(p.xy, vec![0, 0, 9999, 0, 5000, 9999]);
        assert_eq!(p.range, [0.0, 2.0, 5.0, 6.0]);
    }

    #[test]
    fn the_page_inlines_data_without_closing_its_script() {
        let page = page(None);
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.contains("window.__DATA = null"));
        assert!(!page.contains("/*SCRIPT*/"));
    }
}
