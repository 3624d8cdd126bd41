//! Per-image rows as Parquet (snappy): `path, label, features` for the stored
//! embeddings, plus `pca_features, cluster` for exports. Lists of floats, readable by
//! pandas/pyarrow and Spark.

use anyhow::{Context, Result};
use arrow_array::builder::{Float32Builder, Float64Builder, ListBuilder};
use arrow_array::{Array, ArrayRef, Float32Array, Int32Array, ListArray, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use std::sync::Arc;

/// One stored image row.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRow {
    /// Full path or URL of the image.
    pub path: String,
    /// Its label.
    pub label: String,
    /// Its embedding.
    pub features: Vec<f32>,
}

/// A stored row (`path`, `label`, `features`, as [`for_each_row`] gives them) as the
/// statistics see it, under `key`. Exact: stored f32 values re-quantize to the same
/// integers. The error names the row; the caller's context names the file.
pub fn image_row(
    key: crate::record::ImageKey,
    path: &str,
    label: &str,
    features: &[f32],
) -> Result<crate::record::ImageRow> {
    let embedding = crate::record::Embedding::quantize(features)
        .map_err(|e| anyhow::anyhow!("row {path}: {e}"))?;
    Ok(crate::record::ImageRow {
        key,
        label: crate::record::Label(label.to_string()),
        embedding,
    })
}

/// An exported row: a stored row with its PCA features and cluster.
pub struct ExportRow<'a> {
    /// The stored row.
    pub row: &'a StoredRow,
    /// Standardized PCA features.
    pub pca_features: Vec<f64>,
    /// Nearest cluster, if clustering has started.
    pub cluster: Option<usize>,
}

/// Snappy pages, and dictionary encoding only for the label column. The writer's default
/// dictionary-encodes every column first and falls back to plain once the dictionary
/// outgrows a page: for 1280 floats per row (and unique paths) that only built and
/// dropped a hash table of every value, ~12 MB per file being written (heaptrack).
fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_dictionary_enabled(false)
        .set_column_dictionary_enabled(ColumnPath::from("label"), true)
        .build()
}

/// Rows handed to the Parquet writer per call: its definition and repetition levels
/// (two i16 per float) are built per call, so whole-epoch calls held ~10 MB of them.
const WRITE_SLICE: usize = 256;

/// Encodes `rows` rows as one Parquet file, building and writing the record batch of
/// [`WRITE_SLICE`] rows at a time (`batch(range)`): an epoch's file never exists as one
/// Arrow copy of its rows beside the rows themselves.
fn encode_in_slices(
    rows: usize,
    mut batch: impl FnMut(std::ops::Range<usize>) -> Result<RecordBatch>,
) -> Result<Vec<u8>> {
    let first = batch(0..rows.min(WRITE_SLICE))?;
    let mut writer = ArrowWriter::try_new(Vec::new(), first.schema(), Some(writer_properties()))?;
    writer.write(&first)?;
    drop(first);
    for start in (WRITE_SLICE..rows).step_by(WRITE_SLICE) {
        writer.write(&batch(start..(start + WRITE_SLICE).min(rows))?)?;
    }
    Ok(writer.into_inner()?)
}

fn write_sliced<W: std::io::Write + Send>(
    writer: &mut ArrowWriter<W>,
    batch: &RecordBatch,
) -> Result<()> {
    let rows = batch.num_rows();
    for start in (0..rows).step_by(WRITE_SLICE) {
        writer.write(&batch.slice(start, WRITE_SLICE.min(rows - start)))?;
    }
    Ok(())
}

fn strings<'a>(values: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values))
}

fn f32_lists<I: IntoIterator<Item = f32>>(rows: impl Iterator<Item = I>) -> ArrayRef {
    let mut b = ListBuilder::new(Float32Builder::new()).with_field(Field::new(
        "element",
        DataType::Float32,
        false,
    ));
    let mut values = Vec::new();
    for r in rows {
        values.clear();
        values.extend(r);
        b.values().append_slice(&values);
        b.append(true);
    }
    Arc::new(b.finish())
}

/// One record batch of stored rows (path, label, features).
fn stored_batch(paths: ArrayRef, labels: ArrayRef, features: ArrayRef) -> Result<RecordBatch> {
    let schema = Schema::new(vec![
        Field::new("path", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, false),
        Field::new("features", features.data_type().clone(), false),
    ]);
    Ok(RecordBatch::try_new(
        Arc::new(schema),
        vec![paths, labels, features],
    )?)
}

/// Encodes image rows, each with its path, as a Parquet file of stored rows (what
/// [`for_each_row`] reads): the embed stage's rows go in as they are, the features
/// converted to f32 one write slice at a time.
pub fn encode_image_rows(rows: &[(String, crate::record::ImageRow)]) -> Result<Vec<u8>> {
    encode_in_slices(rows.len(), |range| {
        let rows = &rows[range];
        stored_batch(
            strings(rows.iter().map(|(path, _)| path.as_str())),
            strings(rows.iter().map(|(_, r)| r.label.0.as_str())),
            f32_lists(rows.iter().map(|(_, r)| r.embedding.f32_values())),
        )
    })
}

/// One record batch of exported rows (path, label, features, pca_features, cluster).
fn export_batch(rows: &[ExportRow<'_>]) -> Result<RecordBatch> {
    let features = f32_lists(rows.iter().map(|r| r.row.features.iter().copied()));
    let mut pca = ListBuilder::new(Float64Builder::new()).with_field(Field::new(
        "element",
        DataType::Float64,
        false,
    ));
    for r in rows {
        pca.values().append_slice(&r.pca_features);
        pca.append(true);
    }
    let pca: ArrayRef = Arc::new(pca.finish());
    let cluster: ArrayRef = Arc::new(Int32Array::from_iter(
        rows.iter().map(|r| r.cluster.map(|c| c as i32)),
    ));
    let schema = Schema::new(vec![
        Field::new("path", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, false),
        Field::new("features", features.data_type().clone(), false),
        Field::new("pca_features", pca.data_type().clone(), false),
        Field::new("cluster", DataType::Int32, true),
    ]);
    Ok(RecordBatch::try_new(
        Arc::new(schema),
        vec![
            strings(rows.iter().map(|r| r.row.path.as_str())),
            strings(rows.iter().map(|r| r.row.label.as_str())),
            features,
            pca,
            cluster,
        ],
    )?)
}

/// Writes exported rows as one Parquet file, a row group per [`ExportWriter::write`]:
/// memory stays one batch whatever the table's size.
pub struct ExportWriter<W: std::io::Write + Send> {
    out: Option<W>,
    writer: Option<ArrowWriter<W>>,
}

impl<W: std::io::Write + Send> ExportWriter<W> {
    /// A writer into `out`.
    pub fn new(out: W) -> Self {
        ExportWriter {
            out: Some(out),
            writer: None,
        }
    }

    /// Appends rows as a row group.
    pub fn write(&mut self, rows: &[ExportRow<'_>]) -> Result<()> {
        let batch = export_batch(rows)?;
        if self.writer.is_none() {
            let out = self.out.take().expect("one writer");
            self.writer = Some(ArrowWriter::try_new(
                out,
                batch.schema(),
                Some(writer_properties()),
            )?);
        }
        let writer = self.writer.as_mut().expect("created");
        write_sliced(writer, &batch)?;
        writer.flush()?;
        Ok(())
    }

    /// Finishes the file (an empty table when nothing was written) and hands back the
    /// output, for the caller to publish (flush a file, complete an upload).
    pub fn finish(mut self) -> Result<W> {
        if self.writer.is_none() {
            self.write(&[])?;
        }
        Ok(self.writer.take().expect("created").into_inner()?)
    }
}

/// Rows decoded at a time: a batch's float buffer (5 KB a row at d = 1280) grows by
/// doubling as pages are read, so the reader's default 1,024 rows copied and page-faulted
/// ~10 MB per file; at 128 rows the buffers are small enough for the allocator to reuse.
const READ_BATCH: usize = 128;

/// Calls `each(path, label, features)` for every stored row, borrowing from the decoded
/// batch: readers that keep only part of a row (replay keeps the quantized embedding)
/// copy nothing else. The features are sliced from the list's flat values by its
/// offsets, not taken out as one array per row.
pub fn for_each_row(
    bytes: Vec<u8>,
    mut each: impl FnMut(&str, &str, &[f32]) -> Result<()>,
) -> Result<()> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))?
        .with_batch_size(READ_BATCH)
        .build()?;
    for batch in reader {
        let batch = batch?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .with_context(|| format!("column {name} missing"))
        };
        let paths = column("path")?
            .as_any()
            .downcast_ref::<StringArray>()
            .context("path is not a string")?;
        let labels = column("label")?
            .as_any()
            .downcast_ref::<StringArray>()
            .context("label is not a string")?;
        let features = column("features")?
            .as_any()
            .downcast_ref::<ListArray>()
            .context("features is not a list")?;
        let values = features
            .values()
            .as_any()
            .downcast_ref::<Float32Array>()
            .context("features are not float32")?
            .values();
        let offsets = features.value_offsets();
        for i in 0..batch.num_rows() {
            let (from, to) = (offsets[i] as usize, offsets[i + 1] as usize);
            each(paths.value(i), labels.value(i), &values[from..to])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a file written by [`encode_image_rows`] into whole rows.
    fn decode_rows(bytes: Vec<u8>) -> Result<Vec<StoredRow>> {
        let mut rows = Vec::new();
        for_each_row(bytes, |path, label, features| {
            rows.push(StoredRow {
                path: path.to_string(),
                label: label.to_string(),
                features: features.to_vec(),
            });
            Ok(())
        })?;
        Ok(rows)
    }

    #[test]
    fn rows_round_trip() {
        use crate::record::{Embedding, ImageKey, ImageRow, Label};
        let rows: Vec<(String, ImageRow)> = [
            ("/a/Apple Golden 1/x.jpg", "Apple Golden 1", [1.0, 2.5]),
            ("/a/Kiwi 1/y.jpg", "Kiwi 1", [0.0, -3.0]),
        ]
        .into_iter()
        .map(|(path, label, features)| {
            let row = ImageRow {
                key: ImageKey(path.trim_start_matches("/a/").into()),
                label: Label(label.into()),
                embedding: Embedding::quantize(&features).unwrap(),
            };
            (path.to_string(), row)
        })
        .collect();
        let expected: Vec<StoredRow> = rows
            .iter()
            .map(|(path, row)| StoredRow {
                path: path.clone(),
                label: row.label.0.clone(),
                features: row.embedding.to_f32(),
            })
            .collect();
        assert_eq!(expected[1].features, vec![0.0, -3.0]);
        assert_eq!(
            decode_rows(encode_image_rows(&rows).unwrap()).unwrap(),
            expected
        );
    }

    /// A file of several write slices (and a short last one) holds every row, in order.
    #[test]
    fn rows_round_trip_across_write_slices() {
        use crate::record::{Embedding, ImageKey, ImageRow, Label};
        let n = 2 * WRITE_SLICE + 7;
        let rows: Vec<(String, ImageRow)> = (0..n)
            .map(|i| {
                let row = ImageRow {
                    key: ImageKey(format!("L/{i:05}.jpg")),
                    label: Label("L".into()),
                    embedding: Embedding::quantize(&[i as f32 / 64.0, 1.0]).unwrap(),
                };
                (format!("/a/L/{i:05}.jpg"), row)
            })
            .collect();
        let decoded = decode_rows(encode_image_rows(&rows).unwrap()).unwrap();
        assert_eq!(decoded.len(), n);
        for ((path, row), stored) in rows.iter().zip(&decoded) {
            assert_eq!(&stored.path, path);
            assert_eq!(stored.features, row.embedding.to_f32());
        }
    }
}
