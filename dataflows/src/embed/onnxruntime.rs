//! The optional onnxruntime backend (cargo feature `onnxruntime`, `[embed] backend =
//! "onnxruntime"`), through the `ort` crate with `libonnxruntime.so` loaded at run time:
//! `[embed] onnxruntime_library` or `ORT_DYLIB_PATH` (the PyPI `onnxruntime` wheel ships
//! one under `onnxruntime/capi/`). One session per worker, with the intra-op threads
//! the `[inference]` settings give it (by default the process's cores shared among its
//! workers), running batches of images.

use anyhow::{Context, Result};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

/// One process-wide environment: the library can be loaded only once.
fn environment(library: &Path) -> Result<ort::environment::Environment> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let builder = ort::init_from(library)
            .map_err(|e| format!("loading onnxruntime from {}: {e}", library.display()))?;
        builder
            .build()
            .map_err(|e| format!("starting onnxruntime: {e}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// A loaded onnxruntime session. Clones share it (runs take turns).
#[derive(Clone)]
pub struct OrtEngine {
    session: Arc<Mutex<Session>>,
    input: String,
    outputs: Vec<String>,
    size: usize,
}

impl OrtEngine {
    /// Loads `model` with `threads` intra-op threads and the named outputs. It runs at
    /// the square input size the model declares, else at `size`.
    pub fn load(
        model: &Path,
        library: &Path,
        size: usize,
        outputs: &[&str],
        threads: usize,
    ) -> Result<Self> {
        let env = environment(library)?;
        let session = Session::builder(&env)
            .and_then(|b| {
                b.with_optimization_level(GraphOptimizationLevel::All)
                    .map_err(Into::into)
            })
            .and_then(|b| b.with_intra_threads(threads.max(1)).map_err(Into::into))
            .and_then(|b| b.with_inter_threads(1).map_err(Into::into))
            // The threads are sized to the cores left to each worker: spinning between
            // runs would only steal them from the other stages.
            .and_then(|b| b.with_intra_op_spinning(false).map_err(Into::into))
            .and_then(|mut b| b.commit_from_file(model))
            .with_context(|| format!("onnxruntime: loading {}", model.display()))?;
        let first = session.inputs().first().context("the model has no input")?;
        let input = first.name().to_string();
        // The size is read from the session, not by parsing the model a second time
        // (with tract, that held another copy of the weights in every worker).
        let size = match first.dtype().tensor_shape().map(|s| &s[..]) {
            Some(&[_, _, h, w]) if h == w && h > 0 => h as usize,
            _ => size,
        };
        for name in outputs {
            anyhow::ensure!(
                session.outputs().iter().any(|o| o.name() == *name),
                "model {} lacks output {name:?}",
                model.display()
            );
        }
        Ok(OrtEngine {
            session: Arc::new(Mutex::new(session)),
            input,
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            size,
        })
    }

    /// The input size it runs at.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Runs a batch of NCHW tensors laid end to end (the model's batch axis is
    /// symbolic); returns the loaded outputs, each flattened over the batch.
    pub fn run(&self, tensor: &[f32]) -> Result<Vec<Vec<f32>>> {
        let image = 3 * self.size * self.size;
        anyhow::ensure!(
            !tensor.is_empty() && tensor.len() % image == 0,
            "input of {} values is not a batch of 3x{}x{} images",
            tensor.len(),
            self.size,
            self.size
        );
        let shape = [tensor.len() / image, 3, self.size, self.size];
        // A view of the caller's buffer: an owned copy cost a fresh, page-faulted
        // 600 KB allocation per batch of 4 (16 % of a run's page faults).
        let input = TensorRef::from_array_view((shape, tensor))?;
        let mut session = self.session.lock().expect("onnxruntime session lock");
        let outputs = session.run(ort::inputs![self.input.as_str() => input])?;
        self.outputs
            .iter()
            .map(|name| {
                let (_, data) = outputs[name.as_str()].try_extract_tensor::<f32>()?;
                Ok(data.to_vec())
            })
            .collect()
    }
}
