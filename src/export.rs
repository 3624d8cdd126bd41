//! `export` and `status`: read a run's output (checkpoint + stored embeddings) and write
//! tables or a summary. No model runs here.

use anyhow::{Context, Result};
use fruits_dataflows::io::S3Config;
use fruits_dataflows::sink::parquet::{encode_export, ExportRow};
use fruits_dataflows::sink::{self, models::status, OutputStore};
use fruits_dataflows::state::{live_rows, load_committed, Checkpoint};
use std::path::Path;

fn load(output: &str, s3: &S3Config) -> Result<(Box<dyn OutputStore>, Checkpoint)> {
    let store = sink::open(output, s3)?;
    let checkpoint = load_committed(store.as_ref())?;
    Ok((store, checkpoint))
}

/// The status object of an output.
pub fn status_json(output: &str, s3: &S3Config) -> Result<serde_json::Value> {
    Ok(status(&load(output, s3)?.1))
}

/// Writes the CSV (and optional Parquet) table of every live image.
pub fn export(
    output: &str,
    s3: &S3Config,
    csv_path: &Path,
    parquet_path: Option<&Path>,
) -> Result<usize> {
    let (store, checkpoint) = load(output, s3)?;
    let rows = live_rows(store.as_ref(), &checkpoint)?;
    let models = &checkpoint.models;
    let pca = models
        .pca
        .as_ref()
        .context("no PCA model yet: fewer than two images were ingested")?;
    let raw: Vec<Vec<f64>> = rows.iter().map(|(row, _)| row.embedding.to_f64()).collect();
    let projected = pca.project_many(&raw);
    let clusters = models.kmeans.assign_projected(&projected, pca);
    let exported: Vec<ExportRow> = rows
        .iter()
        .zip(projected)
        .zip(clusters)
        .map(|(((_, stored), p), cluster)| ExportRow {
            row: stored,
            cluster,
            pca_features: p,
        })
        .collect();
    let mut csv = csv::Writer::from_path(csv_path)
        .with_context(|| format!("creating {}", csv_path.display()))?;
    let mut header = vec![
        "path".to_string(),
        "label".to_string(),
        "cluster".to_string(),
    ];
    header.extend((1..=pca.k).map(|i| format!("pc{i}")));
    csv.write_record(&header)?;
    for r in &exported {
        let mut record = vec![
            r.row.path.clone(),
            r.row.label.clone(),
            r.cluster.map_or(String::new(), |c| c.to_string()),
        ];
        record.extend(r.pca_features.iter().map(|v| v.to_string()));
        csv.write_record(&record)?;
    }
    csv.flush()?;
    if let Some(path) = parquet_path {
        std::fs::write(path, encode_export(&exported)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(exported.len())
}
