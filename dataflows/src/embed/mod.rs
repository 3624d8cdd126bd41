//! The embed stage: decoded pixels → a CNN embedding, through onnxruntime (when its
//! library is found) or tract. tract runs one optimised batch-1 plan per worker, loaded
//! once (a symbolic batch runs ~6x slower in tract and batch 8 is slower per image than
//! batch 1, measured here); onnxruntime runs batches of `[inference] batch` images with
//! the intra-op threads the process's cores leave each worker.

pub mod depthwise;
#[cfg(feature = "onnxruntime")]
pub mod onnxruntime;
pub mod operator;

use crate::decode::{self, DecodeConfig, DecodeError, Preprocess};
use crate::metrics::timed;
use crate::record::{Embedding, ErrorKind};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// The command that creates the default model file; named in the missing-model error.
pub const EXPORT_COMMAND: &str = "python3 models/export_efficientnet_lite0.py";

/// The default model: EfficientNet-Lite0 exported for 112x112 input (README, "Input
/// resolution": Fruits-360 photos are 100x100, and 112 keeps the accuracy of 224 at
/// a fraction of the work).
pub const DEFAULT_MODEL: &str = "models/efficientnet_lite0_112.onnx";
/// Input side of [`DEFAULT_MODEL`].
pub const DEFAULT_INPUT_SIZE: u32 = 112;

/// Settings of the embed stage (`[embed]` in the config): which ONNX model and how to
/// feed it. Any image model with an NCHW float input works.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedConfig {
    /// Path of the ONNX file.
    pub model: PathBuf,
    /// Square input side, for models whose input does not fix one. A model that
    /// declares its size (the exporter bakes one per file) is fed at that size.
    pub input_size: u32,
    /// Per-channel mean subtracted from 0..255 RGB values.
    pub mean: [f32; 3],
    /// Per-channel std dividing the centred values.
    pub std: [f32; 3],
    /// Name of the output holding the embedding ([1, d]).
    pub output: String,
    /// tract model transforms applied before optimisation (e.g. "conv_nhwc").
    pub transforms: Vec<String>,
    /// Inference engine: `auto` (default: onnxruntime when its library is found, else
    /// tract), `tract` (pure Rust) or `onnxruntime` (outputs equal to tract's within
    /// 1e-4). The checkpoint records the engine that ran.
    pub backend: Backend,
    /// libonnxruntime.so for the onnxruntime backend (default: `ORT_DYLIB_PATH`, then
    /// the onnxruntime Python wheel's copy, then the system's).
    pub onnxruntime_library: Option<PathBuf>,
}

/// The inference engine behind the embed stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// tract-onnx: pure Rust, always available.
    Tract,
    /// onnxruntime through the `ort` crate, loaded at run time.
    Onnxruntime,
    /// onnxruntime when its library is found (and the build has the feature), else
    /// tract. Last: checkpoints encode the variant's index, so the earlier ones keep
    /// theirs.
    #[default]
    Auto,
}

/// A loaded inference engine; clones share the model, each tract clone has its own state.
#[derive(Clone)]
enum Engine {
    Tract(TypedSimpleState),
    #[cfg(feature = "onnxruntime")]
    Onnxruntime(onnxruntime::OrtEngine),
}

impl Default for EmbedConfig {
    fn default() -> Self {
        EmbedConfig {
            model: PathBuf::from(DEFAULT_MODEL),
            input_size: DEFAULT_INPUT_SIZE,
            mean: [127.0; 3],
            std: [128.0; 3],
            output: "embedding".into(),
            // Channel-last convolutions: 1.3x (224) to 2x (112) faster in tract here.
            transforms: vec!["conv_nhwc".into()],
            backend: Backend::Auto,
            onnxruntime_library: None,
        }
    }
}

impl EmbedConfig {
    /// These settings (an output's: model, input size, normalisation) with this
    /// machine's engine, `auto`: engines agree to 1e-4, and the library path recorded
    /// where the output was made may not exist here.
    pub fn on_this_machine(&self) -> EmbedConfig {
        EmbedConfig {
            backend: Backend::Auto,
            onnxruntime_library: None,
            ..self.clone()
        }
    }

    /// The preprocessing this model expects.
    pub fn preprocess(&self) -> Preprocess {
        Preprocess {
            size: self.input_size,
            mean: self.mean,
            std: self.std,
        }
    }
}

/// How the engine runs (`[inference]` in the config). These settings change speed, never
/// the embeddings (a batch's rows are bit-identical to one-image runs, tested), so
/// checkpoints do not record them and they may differ between runs of one output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Images per model run (onnxruntime; tract runs one at a time, its fastest); 0 (the
    /// default): [`InferenceConfig::batch_for`] picks it from the session's threads.
    pub batch: usize,
    /// Intra-op threads per worker (onnxruntime); 0: the process's cores divided among
    /// its workers, at least 1, so the workers do not oversubscribe the cores. With
    /// `shared_session`, the threads of the one session (0: all the process's cores).
    pub threads: usize,
    /// One onnxruntime session per process, its runs taking turns among the workers,
    /// instead of one per worker: each session holds the model's weights and its own
    /// working memory, so at `-w 2` this is 35-50 MB less peak RSS per process, for
    /// 20-30 % less throughput on 2 cores (docs/benchmarks.md, "Scale"). Off by default.
    pub shared_session: bool,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            batch: 0,
            threads: 0,
            shared_session: false,
        }
    }
}

/// How an embed stage's onnxruntime session is made: its intra-op threads, and whether
/// the process's workers share one.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "onnxruntime"), allow(dead_code))]
struct Session {
    threads: usize,
    shared: bool,
}

/// Images per onnxruntime run by default for a session of several intra-op threads: the
/// best of 1/4/8/16 at 2 threads in the bench's batch table (docs/benchmarks.md, "Speed").
pub const DEFAULT_BATCH: usize = 8;

/// Images per run by default for a one-thread session (`-w 2` on 2 cores). 8 runs 0-9 %
/// faster there over the 5,107 shared images (six alternating runs, 2026-12-07), but a
/// 250k-image first ingest peaked at 399 MB with 8 against 348 MB with 4, for 391 against
/// 394 s: 4 keeps the memory target's margin (docs/benchmarks.md, "Speed", 2026-12-07
/// second session).
pub const ONE_THREAD_BATCH: usize = 4;

impl InferenceConfig {
    /// Images per run for a session of `threads` intra-op threads: `batch`, or by
    /// default [`ONE_THREAD_BATCH`] on one thread and [`DEFAULT_BATCH`] on more (a batch
    /// gains only when several threads share it).
    pub fn batch_for(&self, threads: usize) -> usize {
        match self.batch {
            0 if threads <= 1 => ONE_THREAD_BATCH,
            0 => DEFAULT_BATCH,
            batch => batch,
        }
    }

    /// The intra-op threads of each session among `workers` workers of this process
    /// (one session per worker, or one for them all with `shared_session`).
    pub fn threads_per_worker(&self, workers: usize) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let sessions = if self.shared_session { 1 } else { workers };
        (cores / sessions.max(1)).max(1)
    }
}

/// A loaded, optimised model that maps images to embeddings (and optionally to further
/// outputs, e.g. ImageNet logits for checks). Cloning is cheap (the plan is shared);
/// each clone keeps its own run state and input buffer, reused from image to image.
#[derive(Clone)]
pub struct Embedder {
    config: EmbedConfig,
    engine: Engine,
    preprocess: Preprocess,
    decode: DecodeConfig,
    tensor: Vec<f32>,
    /// Images per run in [`Embedder::embed_batch`].
    batch: usize,
}

/// Why an image produced no embedding.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct EmbedError {
    /// The class of failure.
    pub kind: ErrorKind,
    /// What exactly was wrong.
    pub reason: String,
}

impl From<DecodeError> for EmbedError {
    fn from(e: DecodeError) -> Self {
        EmbedError {
            kind: e.kind,
            reason: e.reason,
        }
    }
}

/// Turns transparent huge pages off for this process; call it first thing in `main`.
/// The allocator returns idle memory to the OS a few milliseconds after it is freed, and
/// with huge pages each later touch of that memory faults in and zeroes a whole 2 MiB
/// page: that cost 7 % of the embed stage in a perf profile (`clear_page_erms`) and
/// 50-100 MB of peak RSS at `-w 2` (docs/benchmarks.md, "Speed"). Best effort: where the call is not
/// supported nothing changes.
pub fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_THP_DISABLE) takes plain integers and touches no memory.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Makes glibc's malloc (which onnxruntime allocates with; Rust code uses mimalloc)
/// give freed memory back: by default its mmap threshold rises with each large free,
/// so the model parse and graph optimisation of every onnxruntime session stay in the
/// heap as free, resident pages. Fixing the thresholds cut `run --once -w 2` on 5,107
/// images from ~420 MB to ~380 MB peak at no measurable cost in time. Call before
/// loading a model; `MALLOC_TRIM_THRESHOLD_` / `MALLOC_MMAP_THRESHOLD_` in the
/// environment win.
pub fn return_freed_native_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (option, var, value) in [
        (libc::M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", 1 << 20),
        (libc::M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", 128 << 10),
    ] {
        if std::env::var_os(var).is_none() {
            // SAFETY: mallopt takes plain integers; glibc applies them to later frees.
            unsafe { libc::mallopt(option, value) };
        }
    }
}

fn parse(model: &std::path::Path) -> Result<InferenceModel> {
    tract_onnx::onnx()
        .model_for_path(model)
        .with_context(|| format!("loading ONNX model {}", model.display()))
}

/// The optimised tract plan of `config` and the input size it runs at (the model's
/// declared size, else `[embed] input_size`). Workers of one process share one plan:
/// the model is parsed, optimised and its weights packed once; each worker spawns its
/// own run state from it.
fn tract_plan(config: &EmbedConfig, outputs: &[&str]) -> Result<(Arc<TypedRunnableModel>, u32)> {
    type Plans = Mutex<HashMap<String, (Arc<TypedRunnableModel>, u32)>>;
    static PLANS: OnceLock<Plans> = OnceLock::new();
    let id = format!(
        "{}|{}|{:?}|{outputs:?}",
        config.model.display(),
        config.input_size,
        config.transforms
    );
    // Held while optimising, so a second worker waits and reuses the plan.
    let mut plans = PLANS
        .get_or_init(Default::default)
        .lock()
        .expect("plan cache lock");
    if let Some(found) = plans.get(&id) {
        return Ok(found.clone());
    }
    let model = parse(&config.model)?;
    let size = declared_size(&model)?.unwrap_or(config.input_size);
    let s = size as usize;
    let mut plan = model
        .with_input_fact(0, f32::fact([1, 3, s, s]).into())?
        .with_outputs_by_name(outputs.iter().copied())
        .with_context(|| {
            format!(
                "model {} lacks output(s) {outputs:?}",
                config.model.display()
            )
        })?
        .into_typed()?
        .into_decluttered()?;
    for name in &config.transforms {
        let transform = tract_onnx::tract_core::transform::get_transform(name)?
            .with_context(|| format!("[embed] transforms: tract has no transform {name:?}"))?;
        transform.transform(&mut plan)?;
    }
    let plan = plan
        .into_optimized()
        .with_context(|| format!("optimising {}", config.model.display()))?
        .into_runnable()?;
    tracing::debug!(
        stage = "embed",
        depthwise = depthwise::active_kernel().unwrap_or("tract's generic loop"),
        "tract plan ready"
    );
    plans.insert(id, (plan.clone(), size));
    Ok((plan, size))
}

/// The spatial size an NCHW model input declares, if it is concrete and square.
fn declared_size(model: &InferenceModel) -> Result<Option<u32>> {
    let fact = model.input_fact(0)?;
    let dims: Vec<Option<i64>> = fact
        .shape
        .dims()
        .map(|d| d.concretize().and_then(|d| d.to_i64().ok()))
        .collect();
    Ok(match dims.as_slice() {
        [_, _, Some(h), Some(w)] if h == w && *h > 0 => Some(*h as u32),
        _ => None,
    })
}

impl Embedder {
    /// Loads the model with a fixed [1,3,S,S] input and the configured output.
    pub fn load(config: &EmbedConfig, decode: &DecodeConfig) -> Result<Self> {
        Self::load_outputs(config, decode, &[config.output.as_str()])
    }

    /// Loads the model keeping the named outputs, in order (one thread, batch 1).
    pub fn load_outputs(
        config: &EmbedConfig,
        decode: &DecodeConfig,
        outputs: &[&str],
    ) -> Result<Self> {
        Self::load_engine(
            config,
            decode,
            outputs,
            Session {
                threads: 1,
                shared: false,
            },
            1,
        )
    }

    /// Loads the model for one of `workers` embed-stage workers of this process, run as
    /// `inference` says.
    pub fn load_for_stage(
        config: &EmbedConfig,
        decode: &DecodeConfig,
        inference: &InferenceConfig,
        workers: usize,
    ) -> Result<Self> {
        let threads = inference.threads_per_worker(workers);
        Self::load_engine(
            config,
            decode,
            &[config.output.as_str()],
            Session {
                threads,
                shared: inference.shared_session,
            },
            inference.batch_for(threads),
        )
    }

    fn load_engine(
        config: &EmbedConfig,
        decode: &DecodeConfig,
        outputs: &[&str],
        session: Session,
        batch: usize,
    ) -> Result<Self> {
        if !config.model.exists() {
            anyhow::bail!(
                "model file {} does not exist; create it with `{EXPORT_COMMAND}` (see README, setup)",
                config.model.display()
            );
        }
        let mut config = config.clone();
        let auto = config.backend == Backend::Auto;
        if auto {
            config.backend = auto_backend(&mut config);
        }
        let engine = match config.backend {
            Backend::Tract | Backend::Auto => tract_engine(&mut config, outputs)?,
            Backend::Onnxruntime => {
                match Self::onnxruntime_engine(&mut config, outputs, session) {
                    Ok(engine) => engine,
                    // `auto` found a library that does not load: tract, said once.
                    Err(e) if auto => {
                        static ONCE: std::sync::Once = std::sync::Once::new();
                        ONCE.call_once(|| {
                            tracing::warn!(stage = "embed", error = %format!("{e:#}"), "onnxruntime found but not usable: embedding with tract.")
                        });
                        config.onnxruntime_library = None;
                        tract_engine(&mut config, outputs)?
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        Ok(Embedder {
            engine,
            preprocess: config.preprocess(),
            config,
            decode: decode.clone(),
            tensor: Vec::new(),
            batch,
        })
    }

    /// Dimension of the first output, found by running the model once on zeros.
    pub fn dim(&mut self) -> Result<usize> {
        let zeros = vec![0.0f32; self.preprocess.tensor_len()];
        Ok(self.run_tensor(&zeros)?[0].len())
    }

    #[cfg(feature = "onnxruntime")]
    /// An onnxruntime engine for `config` (whose input size becomes the one the model
    /// declares).
    fn onnxruntime_engine(
        config: &mut EmbedConfig,
        outputs: &[&str],
        session: Session,
    ) -> Result<Engine> {
        let library = config
            .onnxruntime_library
            .clone()
            .or_else(find_onnxruntime)
            .context("[embed] backend = \"onnxruntime\" needs [embed] onnxruntime_library or ORT_DYLIB_PATH (e.g. the libonnxruntime.so.* in the PyPI wheel's onnxruntime/capi/)")?;
        let load = || {
            onnxruntime::OrtEngine::load(
                &config.model,
                &library,
                config.input_size as usize,
                outputs,
                session.threads,
            )
        };
        let engine = if session.shared {
            // The first worker loads it; the others get clones (one session).
            type Key = (PathBuf, PathBuf, u32, Vec<String>, usize);
            static SHARED: Mutex<Vec<(Key, onnxruntime::OrtEngine)>> = Mutex::new(Vec::new());
            let key: Key = (
                config.model.clone(),
                library.clone(),
                config.input_size,
                outputs.iter().map(|o| o.to_string()).collect(),
                session.threads,
            );
            let mut shared = SHARED.lock().expect("shared sessions lock");
            match shared.iter().find(|(k, _)| *k == key) {
                Some((_, engine)) => engine.clone(),
                None => {
                    let engine = load()?;
                    shared.push((key, engine.clone()));
                    engine
                }
            }
        } else {
            load()?
        };
        config.input_size = engine.size() as u32;
        Ok(Engine::Onnxruntime(engine))
    }

    #[cfg(not(feature = "onnxruntime"))]
    fn onnxruntime_engine(_: &mut EmbedConfig, _: &[&str], _: Session) -> Result<Engine> {
        anyhow::bail!(
            "[embed] backend = \"onnxruntime\" needs a build with the onnxruntime feature: \
             cargo build --release --features onnxruntime"
        )
    }

    /// Images per model run in [`Embedder::embed_batch`] (1 on tract).
    pub fn batch(&self) -> usize {
        if self.runs_batches() {
            self.batch
        } else {
            1
        }
    }

    /// The engine running the model (never `auto`).
    pub fn backend(&self) -> Backend {
        self.config.backend
    }

    /// The settings in use, with the input size the model declares.
    pub fn config(&self) -> &EmbedConfig {
        &self.config
    }

    /// The preprocessing in use.
    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    /// Runs the model on one NCHW tensor; returns every loaded output, flattened.
    pub fn run_tensor(&mut self, tensor: &[f32]) -> Result<Vec<Vec<f32>>> {
        let s = self.preprocess.size as usize;
        let state = match &mut self.engine {
            Engine::Tract(state) => state,
            #[cfg(feature = "onnxruntime")]
            Engine::Onnxruntime(engine) => return engine.run(tensor),
        };
        let input = Tensor::from_shape(&[1, 3, s, s], tensor)?;
        let outputs = state.run(tvec!(input.into()))?;
        outputs
            .iter()
            .map(|o| Ok(o.to_plain_array_view::<f32>()?.iter().copied().collect()))
            .collect()
    }

    /// Decodes, preprocesses and embeds one image file's bytes.
    pub fn embed_bytes(&mut self, bytes: &[u8]) -> Result<Embedding, EmbedError> {
        let pixels = self.preparer().prepare(bytes)?;
        self.embed_pixels(&pixels)
    }

    /// Embeds a photo a person sends: JPEG (EXIF orientation applied), PNG or WebP,
    /// any colour type ([`decode::decode_photo`]); archive images use [`Self::embed_bytes`].
    pub fn embed_photo(&mut self, bytes: &[u8]) -> Result<Embedding, EmbedError> {
        let pixels = self.preparer().prepare_photo(bytes)?;
        self.embed_pixels(&pixels)
    }

    /// The model input tensor for one image file's bytes, built as the embed stage
    /// builds it (decode, resize, normalise).
    pub fn input_tensor(&self, bytes: &[u8]) -> Result<Vec<f32>, EmbedError> {
        let mut tensor = Vec::new();
        self.preprocess
            .normalize_into(&self.preparer().prepare(bytes)?, &mut tensor);
        Ok(tensor)
    }

    /// What turns file bytes into model-sized pixels; it can run on another thread.
    pub fn preparer(&self) -> Preparer {
        Preparer {
            decode: self.decode.clone(),
            preprocess: self.preprocess.clone(),
        }
    }

    /// Embeds `size`x`size` RGB pixels from [`Preparer::prepare`]. The input tensor is
    /// this embedder's own, reused from image to image.
    pub fn embed_pixels(&mut self, pixels: &[u8]) -> Result<Embedding, EmbedError> {
        match self.run_batch(&[pixels]) {
            Ok(mut one) => one.swap_remove(0),
            Err(e) => Err(EmbedError {
                kind: ErrorKind::Model,
                reason: format!("model failed: {e:#}"),
            }),
        }
    }

    /// Embeds several images' pixels, `[inference] batch` per model run on onnxruntime
    /// (one at a time on tract); one result per image, in order. When a batch fails,
    /// its images are run one by one so the failure is recorded against the right one.
    pub fn embed_batch(&mut self, pixels: &[&[u8]]) -> Vec<Result<Embedding, EmbedError>> {
        if !self.runs_batches() {
            return pixels.iter().map(|p| self.embed_pixels(p)).collect();
        }
        let mut out = Vec::with_capacity(pixels.len());
        for batch in pixels.chunks(self.batch) {
            match self.run_batch(batch) {
                Ok(rows) => out.extend(rows),
                Err(_) => out.extend(batch.iter().map(|p| self.embed_pixels(p))),
            }
        }
        out
    }

    /// True when images go through the model several at a time.
    fn runs_batches(&self) -> bool {
        match self.engine {
            #[cfg(feature = "onnxruntime")]
            Engine::Onnxruntime(_) => self.batch > 1,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// One model run over `pixels` (one image, or a batch on onnxruntime): the quantized
    /// first output of each image. The input tensor is this embedder's own, reused.
    fn run_batch(&mut self, pixels: &[&[u8]]) -> Result<Vec<Result<Embedding, EmbedError>>> {
        let mut tensor = std::mem::take(&mut self.tensor);
        tensor.clear();
        for p in pixels {
            self.preprocess.normalize_append(p, &mut tensor);
        }
        let result = timed("embed", || self.run_tensor(&tensor));
        self.tensor = tensor;
        let first = result?.swap_remove(0);
        anyhow::ensure!(
            first.len() % pixels.len() == 0,
            "the model's output does not split over the batch"
        );
        let d = first.len() / pixels.len();
        Ok(first
            .chunks_exact(d)
            .map(|row| {
                Embedding::quantize(row).map_err(|reason| EmbedError {
                    kind: ErrorKind::Model,
                    reason,
                })
            })
            .collect())
    }
}

/// The decode half of the embed stage: validated JPEG bytes → pixels at the model's
/// input size. Cheap to clone and `Send`, so decoding can run off the inference thread.
#[derive(Clone, Debug)]
pub struct Preparer {
    decode: DecodeConfig,
    preprocess: Preprocess,
}

/// A tract engine for `config`, which then records tract and the input size the plan
/// was built for.
fn tract_engine(config: &mut EmbedConfig, outputs: &[&str]) -> Result<Engine> {
    config.backend = Backend::Tract;
    let (plan, size) = tract_plan(config, outputs)?;
    config.input_size = size;
    Ok(Engine::Tract(plan.spawn()?))
}

/// What `auto` resolves to: onnxruntime when the build has it and its library is found
/// and loads (the library path is then recorded in `config`), else tract. Decided once
/// per process, so every worker runs the same engine.
fn auto_backend(config: &mut EmbedConfig) -> Backend {
    if !cfg!(feature = "onnxruntime") {
        return Backend::Tract;
    }
    match config.onnxruntime_library.clone().or_else(find_onnxruntime) {
        Some(library) => {
            config.onnxruntime_library = Some(library);
            Backend::Onnxruntime
        }
        None => {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                tracing::info!(
                    stage = "embed",
                    "libonnxruntime not found (ORT_DYLIB_PATH, the onnxruntime Python wheel, \
                     the system's library paths): embedding with tract."
                )
            });
            Backend::Tract
        }
    }
}

/// Where libonnxruntime is: `ORT_DYLIB_PATH`, the onnxruntime Python wheel (what
/// `scripts/setup` installs), then the usual system directories. Searched once.
pub fn find_onnxruntime() -> Option<PathBuf> {
    static FOUND: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
                return Some(PathBuf::from(path));
            }
            let mut dirs: Vec<PathBuf> = Vec::new();
            // The wheel's directory, as its own Python sees it (no output if absent).
            // find_spec locates the package without importing it: importing onnxruntime
            // took 0.4-1 s of every run's, classify's and serve's start.
            if let Ok(out) = std::process::Command::new("python3")
                .args([
                    "-c",
                    "import importlib.util as u, os; s = u.find_spec('onnxruntime'); \
                     print(os.path.join(s.submodule_search_locations[0], 'capi') if s else '')",
                ])
                .stderr(std::process::Stdio::null())
                .output()
            {
                let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if out.status.success() && !dir.is_empty() {
                    dirs.push(PathBuf::from(dir));
                }
            }
            for dir in [
                "/usr/local/lib",
                "/usr/lib/x86_64-linux-gnu",
                "/usr/lib/aarch64-linux-gnu",
                "/usr/lib",
            ] {
                dirs.push(PathBuf::from(dir));
            }
            dirs.iter().find_map(|dir| library_in(dir))
        })
        .clone()
}

/// `libonnxruntime.so` or its highest versioned file in `dir`.
fn library_in(dir: &std::path::Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == "libonnxruntime.so" || n.starts_with("libonnxruntime.so."))
        })
        .collect();
    found.sort();
    found.pop()
}

impl Preparer {
    /// Decodes and resizes one image file's bytes.
    pub fn prepare(&self, bytes: &[u8]) -> Result<Vec<u8>, EmbedError> {
        timed("decode", || {
            let image = decode::decode(bytes, &self.decode)?;
            Ok(self.preprocess.resized(&image))
        })
    }

    /// Decodes and resizes one photo (the app's formats, see [`decode::decode_photo`]).
    pub fn prepare_photo(&self, bytes: &[u8]) -> Result<Vec<u8>, EmbedError> {
        timed("decode", || {
            let image = decode::decode_photo(bytes, &self.decode)?;
            Ok(self.preprocess.resized(&image))
        })
    }
}
