//! The optional onnxruntime backend (cargo feature `onnxruntime`, `[embed] backend =
//! "onnxruntime"`), through the `ort` crate with `libonnxruntime.so` loaded at run time:
//! `[embed] onnxruntime_library` or `ORT_DYLIB_PATH` (the PyPI `onnxruntime` wheel ships
//! one under `onnxruntime/capi/`). One single-threaded session per worker, as tract.

use anyhow::{Context, Result};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::Tensor;
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
    shape: [usize; 4],
}

impl OrtEngine {
    /// Loads `model` with one intra-op thread and the named outputs.
    pub fn load(model: &Path, library: &Path, size: usize, outputs: &[&str]) -> Result<Self> {
        let env = environment(library)?;
        let session = Session::builder(&env)
            .and_then(|b| {
                b.with_optimization_level(GraphOptimizationLevel::All)
                    .map_err(Into::into)
            })
            .and_then(|b| b.with_intra_threads(1).map_err(Into::into))
            .and_then(|b| b.with_inter_threads(1).map_err(Into::into))
            // Workers already use every core: spinning threads would only steal them.
            .and_then(|b| b.with_intra_op_spinning(false).map_err(Into::into))
            .and_then(|mut b| b.commit_from_file(model))
            .with_context(|| format!("onnxruntime: loading {}", model.display()))?;
        let input = session
            .inputs()
            .first()
            .context("the model has no input")?
            .name()
            .to_string();
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
            shape: [1, 3, size, size],
        })
    }

    /// Runs one NCHW tensor; returns the loaded outputs, flattened.
    pub fn run(&self, tensor: &[f32]) -> Result<Vec<Vec<f32>>> {
        let input = Tensor::from_array((self.shape, tensor.to_vec().into_boxed_slice()))?;
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
