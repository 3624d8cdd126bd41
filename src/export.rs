//! `export` and `status`: read a run's output (checkpoint + stored embeddings) and write
//! tables (to local files or S3 objects) or a summary. No model runs here.

use anyhow::{Context, Result};
use fruits_dataflows::io::{upload, S3Config, S3Upload};
use fruits_dataflows::sink::parquet::{ExportRow, ExportWriter};
use fruits_dataflows::sink::{self, models::status, OutputStore};
use fruits_dataflows::state::{for_each_live_file, load_committed, Archive, Checkpoint};
use std::io::Write;

fn load(output: &str, s3: &S3Config) -> Result<(Box<dyn OutputStore>, Checkpoint)> {
    let store = sink::open(output, s3)?;
    let checkpoint = load_committed(store.as_ref())?;
    Ok((store, checkpoint))
}

/// The status object of an output.
pub fn status_json(output: &str, s3: &S3Config) -> Result<serde_json::Value> {
    Ok(status(&load(output, s3)?.1))
}

/// Overrides the multipart part size (bytes): tests use it to get objects of several
/// parts from a small archive.
const PART_SIZE_VAR: &str = "FRUITS_FLOW_EXPORT_PART_SIZE";

/// Where a table goes: a local file, or an S3 object streamed in parts.
enum Table {
    File(std::io::BufWriter<std::fs::File>),
    S3(S3Upload),
}

impl Table {
    /// Opens `dest`: `s3://bucket/key` or a local path (created or truncated).
    fn create(dest: &str, s3: &S3Config) -> Result<Self> {
        if dest.starts_with("s3://") {
            return Ok(Table::S3(S3Upload::create(dest, s3, part_size()?)?));
        }
        let file = std::fs::File::create(dest).with_context(|| format!("creating {dest}"))?;
        Ok(Table::File(std::io::BufWriter::new(file)))
    }

    /// Publishes what was written: flushes the file or completes the upload.
    fn finish(self) -> Result<()> {
        match self {
            Table::File(mut file) => file.flush()?,
            Table::S3(upload) => upload.finish()?,
        }
        Ok(())
    }
}

impl Write for Table {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match self {
            Table::File(file) => file.write(bytes),
            Table::S3(upload) => upload.write(bytes),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Table::File(file) => file.flush(),
            Table::S3(upload) => upload.flush(),
        }
    }
}

/// The upload part size: [`upload::PART_SIZE`] unless [`PART_SIZE_VAR`] sets one.
fn part_size() -> Result<usize> {
    match std::env::var(PART_SIZE_VAR) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{PART_SIZE_VAR}={v} is not a number of bytes")),
        Err(_) => Ok(upload::PART_SIZE),
    }
}

/// Writes the CSV (and optional Parquet) table of every live image to local files or
/// `s3://bucket/key` objects, one stored embeddings file at a time (memory: the ledger,
/// one file's rows, and per table one row group and one upload part).
pub fn export(
    output: &str,
    s3: &S3Config,
    csv_dest: &str,
    parquet_dest: Option<&str>,
) -> Result<usize> {
    let (store, checkpoint) = load(output, s3)?;
    let models = &checkpoint.models;
    let pca = models
        .pca
        .as_ref()
        .context("no PCA model yet: fewer than two images were ingested")?;
    let archive = Archive::load(store.as_ref(), &checkpoint, |_| true)?;
    let mut csv = csv::Writer::from_writer(Table::create(csv_dest, s3)?);
    let mut header = vec![
        "path".to_string(),
        "label".to_string(),
        "cluster".to_string(),
    ];
    header.extend((1..=pca.k).map(|i| format!("pc{i}")));
    csv.write_record(&header)
        .with_context(|| format!("writing {csv_dest}"))?;
    let mut parquet = match parquet_dest {
        Some(dest) => Some(ExportWriter::new(Table::create(dest, s3)?)),
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
            csv.write_record(&record)
                .with_context(|| format!("writing {csv_dest}"))?;
        }
        if let (Some(parquet), Some(dest)) = (parquet.as_mut(), parquet_dest) {
            parquet
                .write(&exported)
                .with_context(|| format!("writing {dest}"))?;
        }
        written += exported.len();
        Ok(())
    })?;
    // Published only now: on any error above the tables are dropped, and an S3 upload
    // dropped unfinished is aborted, so no partial object appears.
    let table = csv
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {csv_dest}"))?;
    table
        .finish()
        .with_context(|| format!("writing {csv_dest}"))?;
    if let (Some(parquet), Some(dest)) = (parquet, parquet_dest) {
        parquet
            .finish()
            .and_then(Table::finish)
            .with_context(|| format!("writing {dest}"))?;
    }
    Ok(written)
}
