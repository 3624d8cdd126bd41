//! The pipeline's typed configuration: one section per stage, named after the stage.
//! Parsed from the `[source] [decode] [embed] [inference] [pca] [kmeans]` tables of
//! cluster.toml.

use crate::decode::DecodeConfig;
use crate::embed::EmbedConfig;
use crate::stats::{KMeansConfig, PcaConfig};
use serde::{Deserialize, Serialize};

/// Settings of the source stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// How often to re-list the archive when tailing, in milliseconds.
    pub poll_interval_ms: u64,
    /// Most changes per epoch; statistics are published at every epoch boundary.
    pub epoch_size: usize,
    /// Every this many listing rounds, list every folder (local sources skip folders
    /// whose directory mtime has not moved; a file rewritten in place is seen at the next
    /// full round). 1: every round is full.
    pub full_listing_every: u64,
    /// At start, the archive is listed and diffed one slice of key space at a time,
    /// aiming at this many objects per slice, so a first listing of millions of objects is
    /// never held whole (about 150 B per object, three times over). 0: one whole listing.
    pub listing_slice: usize,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            poll_interval_ms: 2000,
            epoch_size: 2048,
            full_listing_every: 30,
            listing_slice: 16384,
        }
    }
}

/// The whole pipeline's settings.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// `[source]`: listing and epochs.
    pub source: SourceConfig,
    /// `[decode]`: input validation.
    pub decode: DecodeConfig,
    /// `[embed]`: the model.
    pub embed: EmbedConfig,
    /// `[inference]`: how the model runs (batch, threads); speed only.
    pub inference: crate::embed::InferenceConfig,
    /// `[pca]`: components kept, and how often to refit.
    pub pca: PcaConfig,
    /// `[kmeans]`: clustering.
    pub kmeans: KMeansConfig,
    /// `[s3]`: endpoint and addressing for s3:// sources and outputs.
    pub s3: crate::io::S3Config,
    /// `[classify]`: how `classify` and `serve` name a fruit.
    pub classify: crate::classify::ClassifyConfig,
}

impl PipelineConfig {
    /// Checks values a typo could make meaningless.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.source.epoch_size > 0,
            "[source] epoch_size must be positive"
        );
        anyhow::ensure!(
            self.source.full_listing_every > 0,
            "[source] full_listing_every must be positive"
        );
        anyhow::ensure!(
            self.pca.variance > 0.0 && self.pca.variance <= 1.0,
            "[pca] variance must be in (0, 1]"
        );
        anyhow::ensure!(self.pca.k != Some(0), "[pca] k must be positive");
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.pca.refit_fraction),
            "[pca] refit_fraction must be in [0, 1]"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.pca.catch_up_refit_fraction),
            "[pca] catch_up_refit_fraction must be in [0, 1]"
        );
        anyhow::ensure!(self.kmeans.k > 0, "[kmeans] k must be positive");
        anyhow::ensure!(
            self.kmeans.decay > 0.0 && self.kmeans.decay <= 1.0,
            "[kmeans] decay must be in (0, 1]"
        );
        anyhow::ensure!(
            self.embed.input_size > 0,
            "[embed] input_size must be positive"
        );
        Ok(())
    }
}
