//! The embed stage: decoded pixels → a CNN embedding, through tract. One optimised
//! batch-1 plan per worker, loaded once (a symbolic batch runs ~6x slower in tract and
//! batch 8 is slower per image than batch 1, measured here).

pub mod operator;

use crate::decode::{self, DecodeConfig, DecodeError, Preprocess};
use crate::record::{Embedding, ErrorKind};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use tract_onnx::prelude::*;

/// The command that creates the default model file; named in the missing-model error.
pub const EXPORT_COMMAND: &str = "python3 models/export_efficientnet_lite0.py";

/// Settings of the embed stage (`[embed]` in the config): which ONNX model and how to
/// feed it. Any image model with an NCHW float input works.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedConfig {
    /// Path of the ONNX file.
    pub model: PathBuf,
    /// Square input side the model was exported for.
    pub input_size: u32,
    /// Per-channel mean subtracted from 0..255 RGB values.
    pub mean: [f32; 3],
    /// Per-channel std dividing the centred values.
    pub std: [f32; 3],
    /// Name of the output holding the embedding ([1, d]).
    pub output: String,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        EmbedConfig {
            model: PathBuf::from("models/efficientnet_lite0.onnx"),
            input_size: 224,
            mean: [127.0; 3],
            std: [128.0; 3],
            output: "embedding".into(),
        }
    }
}

impl EmbedConfig {
    /// The preprocessing this model expects.
    pub fn preprocess(&self) -> Preprocess {
        Preprocess {
            size: self.input_size,
            mean: self.mean,
            std: self.std,
        }
    }
}

type Plan = Arc<TypedRunnableModel>;

/// A loaded, optimised model that maps images to embeddings (and optionally to further
/// outputs, e.g. ImageNet logits for checks).
pub struct Embedder {
    plan: Plan,
    preprocess: Preprocess,
    decode: DecodeConfig,
    tensor: Vec<f32>,
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

impl Embedder {
    /// Loads the model with a fixed [1,3,S,S] input and the configured output.
    pub fn load(config: &EmbedConfig, decode: &DecodeConfig) -> Result<Self> {
        Self::load_outputs(config, decode, &[config.output.as_str()])
    }

    /// Loads the model keeping the named outputs, in order.
    pub fn load_outputs(
        config: &EmbedConfig,
        decode: &DecodeConfig,
        outputs: &[&str],
    ) -> Result<Self> {
        if !config.model.exists() {
            anyhow::bail!(
                "model file {} does not exist; create it with `{EXPORT_COMMAND}` (see README, setup)",
                config.model.display()
            );
        }
        let s = config.input_size as usize;
        let plan = tract_onnx::onnx()
            .model_for_path(&config.model)
            .with_context(|| format!("loading ONNX model {}", config.model.display()))?
            .with_input_fact(0, f32::fact([1, 3, s, s]).into())?
            .with_outputs_by_name(outputs.iter().copied())
            .with_context(|| {
                format!(
                    "model {} lacks output(s) {outputs:?}",
                    config.model.display()
                )
            })?
            .into_optimized()
            .with_context(|| format!("optimising {}", config.model.display()))?
            .into_runnable()?;
        Ok(Embedder {
            plan,
            preprocess: config.preprocess(),
            decode: decode.clone(),
            tensor: Vec::new(),
        })
    }

    /// Dimension of the first output, found by running the model once on zeros.
    pub fn dim(&self) -> Result<usize> {
        let zeros = vec![0.0f32; self.preprocess.tensor_len()];
        Ok(self.run_tensor(&zeros)?[0].len())
    }

    /// The preprocessing in use.
    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    /// Runs the model on one NCHW tensor; returns every loaded output, flattened.
    pub fn run_tensor(&self, tensor: &[f32]) -> Result<Vec<Vec<f32>>> {
        let s = self.preprocess.size as usize;
        let input = Tensor::from_shape(&[1, 3, s, s], tensor)?;
        let outputs = self.plan.run(tvec!(input.into()))?;
        outputs
            .iter()
            .map(|o| Ok(o.to_plain_array_view::<f32>()?.iter().copied().collect()))
            .collect()
    }

    /// Decodes, preprocesses and embeds one image file's bytes.
    pub fn embed_bytes(&mut self, bytes: &[u8]) -> Result<Embedding, EmbedError> {
        let image = decode::decode(bytes, &self.decode)?;
        let mut tensor = std::mem::take(&mut self.tensor);
        self.preprocess.tensor_into(&image, &mut tensor);
        let result = self.run_tensor(&tensor);
        self.tensor = tensor;
        let model_err = |reason: String| EmbedError {
            kind: ErrorKind::Model,
            reason,
        };
        let outputs = result.map_err(|e| model_err(format!("model failed: {e:#}")))?;
        Embedding::quantize(&outputs[0]).map_err(model_err)
    }
}
