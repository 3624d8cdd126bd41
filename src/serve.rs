//! `serve` (alone, or inside `run --serve`): an HTTP endpoint over an output's live
//! state. `POST /classify` names the fruit in a photo (JPEG, PNG or WebP; `unknown`
//! when it is far from every label), `GET /status` is `status --json`,
//! `GET /metrics` is Prometheus text. A watcher re-reads the committed state whenever
//! `state/CURRENT` moves, so a new label folder becomes answerable without a restart.
//!
//! Safe on a private network: bodies above `max_body` get 413, non-image content 415,
//! undecodable images 422 (with the reason), at most `concurrency` classifications run
//! at once (others queue), and every request has a deadline (408).

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fruits_dataflows::classify::{self, Classifier, ClassifyConfig};
use fruits_dataflows::decode::{photo_type, PHOTO_TYPES};
use fruits_dataflows::embed::Embedder;
use fruits_dataflows::io::S3Config;
use fruits_dataflows::metrics::{metrics, Labels};
use fruits_dataflows::sink::{self, models::status, OutputStore};
use fruits_dataflows::state::Checkpoint;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tower::limit::ConcurrencyLimitLayer;
use tower_http::timeout::TimeoutLayer;

/// Settings of the endpoint.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Output to serve (directory or s3://).
    pub output: String,
    /// S3 settings for an s3:// output.
    pub s3: S3Config,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Classifier settings.
    pub classify: ClassifyConfig,
    /// Model file to use instead of the one recorded in the output.
    pub model: Option<PathBuf>,
    /// Largest accepted request body, in bytes.
    pub max_body: usize,
    /// Classifications running at once.
    pub concurrency: usize,
    /// Deadline of a request.
    pub timeout: Duration,
    /// How often to look for a new committed state.
    pub reload_every: Duration,
    /// The page's map (`GET /`, `GET /api/map`, `GET /thumb`).
    pub map: crate::web::MapOptions,
}

/// What a request needs: the current models and the embedder that matches them.
struct Live {
    classifier: Classifier,
    checkpoint: Checkpoint,
    /// Idle embedders (each holds its own run state), and one to clone more from.
    idle: Mutex<Vec<Embedder>>,
    template: Mutex<Embedder>,
}

impl Live {
    fn new(classifier: Classifier, checkpoint: Checkpoint, embedder: Embedder) -> Self {
        Live {
            classifier,
            checkpoint,
            idle: Mutex::new(Vec::new()),
            template: Mutex::new(embedder),
        }
    }

    /// An embedder for one request; give it back with [`Live::release`].
    fn acquire(&self) -> Embedder {
        let idle = self.idle.lock().expect("lock").pop();
        idle.unwrap_or_else(|| self.template.lock().expect("lock").clone())
    }

    fn release(&self, embedder: Embedder) {
        self.idle.lock().expect("lock").push(embedder);
    }
}

struct App {
    live: RwLock<Option<Arc<Live>>>,
    registry: Registry,
    requests: Family<Labels, Counter>,
    latency: Histogram,
    /// The committed state the served models come from.
    state_images: Gauge,
    state_epoch: Gauge,
    state_errors: Family<Labels, Gauge>,
}

/// Serves until `stop` is set. Blocks the calling thread.
pub fn serve(options: ServeOptions, stop: Arc<AtomicBool>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    runtime.block_on(serve_async(options, stop))
}

async fn serve_async(options: ServeOptions, stop: Arc<AtomicBool>) -> Result<()> {
    let store: Arc<dyn OutputStore> = Arc::from(sink::open(&options.output, &options.s3)?);
    let mut app = App::new();
    let site = crate::web::Site::new(&mut app.registry);
    let app = Arc::new(app);
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("binding {}", options.listen))?;
    tracing::info!(stage = "serve", listen = %options.listen, output = %options.output, "Serving.");
    site.start(store.clone(), options.map.clone(), stop.clone())?;
    tokio::spawn(watch(app.clone(), store, options.clone()));
    let router = Router::new()
        .route(
            "/classify",
            post(classify_handler).layer(ConcurrencyLimitLayer::new(options.concurrency.max(1))),
        )
        .route("/status", get(status_handler))
        .route("/metrics", get(metrics_handler))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such endpoint: use GET / (the page), POST /classify, GET /status or GET /metrics",
            )
        })
        .layer(DefaultBodyLimit::max(options.max_body))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            options.timeout,
        ))
        .with_state(app)
        .merge(site.routes(options.timeout));
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await
        .context("serving HTTP")
}

impl App {
    fn new() -> Self {
        let mut registry = Registry::default();
        metrics().register(&mut registry);
        let requests = Family::<Labels, Counter>::default();
        let latency = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let r = registry.sub_registry_with_prefix("fruits");
        r.register(
            "http_requests",
            "HTTP requests by endpoint and status",
            requests.clone(),
        );
        r.register(
            "classify_seconds",
            "Time to classify one image",
            latency.clone(),
        );
        let (state_images, state_epoch) = (Gauge::default(), Gauge::default());
        let state_errors = Family::<Labels, Gauge>::default();
        r.register(
            "state_images",
            "Live images in the served committed state",
            state_images.clone(),
        );
        r.register(
            "state_epoch",
            "Committed epoch of the served models",
            state_epoch.clone(),
        );
        r.register(
            "state_errors",
            "Quarantined objects in the served committed state, by kind",
            state_errors.clone(),
        );
        App {
            live: RwLock::new(None),
            registry,
            requests,
            latency,
            state_images,
            state_epoch,
            state_errors,
        }
    }

    /// Serves `live` from now on.
    fn install(&self, live: Live) {
        let c = &live.checkpoint;
        self.state_images.set(c.images());
        self.state_epoch.set(c.epoch as i64);
        self.state_errors.clear();
        for (kind, count) in &c.errors_by_kind {
            self.state_errors
                .get_or_create(&vec![("kind".into(), kind.clone())])
                .inc_by(*count as i64);
        }
        *self.live.write().expect("lock") = Some(Arc::new(live));
    }

    fn current(&self) -> Option<Arc<Live>> {
        self.live.read().expect("lock").clone()
    }

    fn count(&self, endpoint: &str, status: StatusCode) {
        self.requests
            .get_or_create(&vec![
                ("endpoint".into(), endpoint.into()),
                ("status".into(), status.as_u16().to_string()),
            ])
            .inc();
    }
}

/// Reloads the models whenever the committed state changes.
async fn watch(app: Arc<App>, store: Arc<dyn OutputStore>, options: ServeOptions) {
    let mut seen: Option<Vec<u8>> = None;
    let mut embedder: Option<Embedder> = None;
    loop {
        let store2 = store.clone();
        let pointer = tokio::task::spawn_blocking(move || store2.get("state/CURRENT")).await;
        match pointer {
            Ok(Ok(Some(p))) if seen.as_ref() != Some(&p) => {
                let (store2, options2, previous) =
                    (store.clone(), options.clone(), embedder.clone());
                // O(models): the default classifier needs no stored point.
                let loaded = tokio::task::spawn_blocking(move || {
                    load_live(store2.as_ref(), &options2, previous)
                })
                .await;
                match loaded {
                    Ok(Ok(live)) => {
                        tracing::info!(
                            stage = "serve",
                            epoch = live.checkpoint.epoch,
                            images = live.checkpoint.images(),
                            points_held = live.classifier.points(),
                            labels = live.classifier.labels().len(),
                            "Models loaded."
                        );
                        embedder = Some(live.acquire());
                        app.install(live);
                        seen = Some(p);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(stage = "serve", error = %format!("{e:#}"), "Models not loaded; retrying.")
                    }
                    Err(e) => {
                        tracing::error!(stage = "serve", error = %e, "Model loader panicked; retrying.")
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(stage = "serve", error = %format!("{e:#}"), "Reading the output failed; retrying.")
            }
            _ => {}
        }
        tokio::time::sleep(options.reload_every).await;
    }
}

fn load_live(
    store: &dyn OutputStore,
    options: &ServeOptions,
    embedder: Option<Embedder>,
) -> Result<Live> {
    let (checkpoint, classifier) = classify::load(store, &options.classify)?;
    let embedder = match embedder {
        Some(e) => e,
        None => {
            let mut config = checkpoint.embed.on_this_machine();
            if let Some(model) = &options.model {
                config.model = model.clone();
            }
            Embedder::load(&config, &Default::default())?
        }
    };
    Ok(Live::new(classifier, checkpoint, embedder))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn classify_handler(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let response = classify_request(&app, &headers, body).await;
    app.count("classify", response.status());
    if response.status().is_success() {
        app.latency.observe(started.elapsed().as_secs_f64());
    }
    response
}

async fn classify_request(app: &App, headers: &HeaderMap, body: Bytes) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let declared = match mime.as_str() {
        "image/jpg" => "image/jpeg",
        m => m,
    };
    if !PHOTO_TYPES.contains(&declared) && declared != "application/octet-stream" {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Content-Type must be one of {} (got {content_type:?})",
                PHOTO_TYPES.join(", ")
            ),
        );
    }
    if body.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "empty body: send the photo's bytes",
        );
    }
    // What the bytes are, whatever the header says: refused before any decoding.
    let sniffed = match photo_type(&body) {
        Ok(t) => t,
        Err(reason) => return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, reason),
    };
    if declared != "application/octet-stream" && declared != sniffed {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type says {declared} but the body is {sniffed}"),
        );
    }
    let Some(live) = app.current() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no models yet: the output has no committed state",
        );
    };
    let result = tokio::task::spawn_blocking(move || {
        let mut embedder = live.acquire();
        let result = embedder
            .embed_photo(&body)
            .map(|e| live.classifier.predict(&e.to_f64()));
        live.release(embedder);
        result
    })
    .await;
    match result {
        Ok(Ok(prediction)) => (StatusCode::OK, Json(prediction)).into_response(),
        Ok(Err(e)) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{} image: {}", e.kind.as_str(), e.reason),
        ),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "classification failed"),
    }
}

async fn status_handler(State(app): State<Arc<App>>) -> Response {
    let response = match app.current() {
        Some(live) => (StatusCode::OK, Json(status(&live.checkpoint))).into_response(),
        None => error(StatusCode::SERVICE_UNAVAILABLE, "no committed state yet"),
    };
    app.count("status", response.status());
    response
}

async fn metrics_handler(State(app): State<Arc<App>>) -> Response {
    app.count("metrics", StatusCode::OK);
    let mut text = String::new();
    if let Err(e) = encode(&mut text, &app.registry) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}"),
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
