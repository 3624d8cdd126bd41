//! `export` and `status`: read a run's output (checkpoint + stored embeddings) and write
//! tables or a summary. No model runs here.

use anyhow::{Context, Result};
use fruits_dataflows::io::S3Config;
use fruits_dataflows::sink::parquet::{ExportRow, ExportWriter};
use fruits_dataflows::sink::{self, models::status, OutputStore};
use fruits_dataflows::state::{for_each_live_file, load_committed, Archive, Checkpoint};
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

/// Writes the CSV (and optional Parquet) table of every live image, one stored
/// embeddings file at a time (memory: the ledger and one file's rows).
pub fn export(
    output: &str,
    s3: &S3Config,
    csv_path: &Path,
    parquet_path: Option<&Path>,
) -> Result<usize> {
    let (store, checkpoint) = load(output, s3)?;
    let models = &checkpoint.models;
    let pca = models
        .pca
        .as_ref()
        .context("no PCA model yet: fewer than two images were ingested")?;
    let archive = Archive::load(store.as_ref(), &checkpoint, |_| true)?;
    let mut csv = csv::Writer::from_path(csv_path)
        .with_context(|| format!("creating {}", csv_path.display()))?;
    let mut header = vec![
        "path".to_string(),
        "label".to_string(),
        "cluster".to_string(),
    ];
    header.extend((1..=pca.k).map(|i| format!("pc{i}")));
    csv.write_record(&header)?;
    let mut parquet = match parquet_path {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            Some(ExportWriter::new(std::io::BufWriter::new(file)))
        }
        None => None,
    };
    let mut written = 0;
    for_each_live_file(store.as_ref(), &checkpoint, &archive, |rows| {
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
        for r in &exported {
            let mut record = vec![
                r.row.path.clone(),
                r.row.label.clone(),
                r.cluster.map_or(String::new(), |c| c.to_string()),
            ];
            record.extend(r.pca_features.iter().map(|v| v.to_string()));
            csv.write_record(&record)?;
        }
        if let Some(parquet) = parquet.as_mut() {
            parquet.write(&exported)?;
        }
        written += exported.len();
        Ok(())
    })?;
    csv.flush()?;
    if let Some(parquet) = parquet {
        parquet
            .finish()
            .with_context(|| format!("writing {}", parquet_path.expect("given").display()))?;
    }
    Ok(written)
}
