//! The parquet sink as a timely operator: each worker appends the rows it added in an
//! epoch as one file, `embeddings/epoch-<t>-worker-<w>.parquet`, once the epoch is
//! complete. Its output (one count per file) lets the commit wait for the write.

use super::parquet::encode_image_rows;
use super::OutputStore;
use crate::embed::operator::RowUpdate;
use crate::metrics::timed;
use crate::record::{Epoch, ImageRow};
use crate::source::Source;
use std::collections::BTreeMap;
use std::sync::Arc;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

/// Name of the embeddings file of `worker` for `epoch`.
pub fn embeddings_file(epoch: Epoch, worker: usize) -> String {
    format!("embeddings/epoch-{epoch:012}-worker-{worker:05}.parquet")
}

/// Parses the epoch out of an embeddings file name.
pub fn epoch_of_file(name: &str) -> Option<Epoch> {
    name.strip_prefix("embeddings/epoch-")?
        .get(..12)?
        .parse()
        .ok()
}

/// Writes each worker's added rows per epoch; emits the number of rows written.
pub fn parquet<'s>(
    rows: StreamVec<'s, Epoch, RowUpdate>,
    store: Arc<dyn OutputStore>,
    source: Arc<dyn Source>,
) -> StreamVec<'s, Epoch, usize> {
    let worker = rows.scope().index();
    rows.unary_frontier(Pipeline, "parquet", move |_, _| {
        // The rows themselves (their embeddings shared with the other stages), each
        // with its path: converted to the file's f32 only as it is written.
        let mut open: BTreeMap<Epoch, (Capability<Epoch>, Vec<(String, ImageRow)>)> =
            BTreeMap::new();
        move |(input, frontier), output| {
            input.for_each(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let entry = open.entry(t).or_insert_with(|| (cap.retain_least(0).expect("stamped"), Vec::new()));
                for (row, _, diff) in data.drain(..).filter(|(_, _, d)| *d > 0) {
                    for _ in 0..diff {
                        entry.1.push((source.path_of(&row.key), row.clone()));
                    }
                }
            });
            while let Some(entry) = open.first_entry() {
                let t = *entry.key();
                if frontier.less_equal(&t) {
                    break;
                }
                let (cap, mut rows) = entry.remove();
                if rows.is_empty() {
                    continue;
                }
                rows.sort_by(|a, b| a.0.cmp(&b.0));
                let name = embeddings_file(t, worker);
                // An output we cannot write is fatal: the epoch must not commit without it.
                timed("parquet", || {
                    let bytes = encode_image_rows(&rows).unwrap_or_else(|e| panic!("encoding {name}: {e:#}"));
                    store.put(&name, &bytes).unwrap_or_else(|e| panic!("writing {name}: {e:#}"));
                });
                tracing::debug!(stage = "parquet", file = %name, rows = rows.len(), "Embeddings written.");
                output.session(&cap).give(rows.len());
            }
        }
    })
}
