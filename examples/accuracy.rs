//! Classification accuracy, measured honestly: the models and labelled embeddings come
//! from an output built on one folder (e.g. Training), the photos from another (Test).
//! Prints top-1 and top-3 accuracy of each classifier variant, and the per-label
//! confusion of the configured default.
//!
//! ```sh
//! fruits-flow run --once -w 2 --source ../shared/fruits360/Training --output /tmp/train
//! cargo run --release --example accuracy -- /tmp/train ../shared/fruits360/Test
//! ```

// The same allocator as the fruits-flow binary, so figures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use fruits_dataflows::classify::{Classifier, ClassifyConfig, Method};
use fruits_dataflows::embed::Embedder;
use fruits_dataflows::record::ImageRow;
use fruits_dataflows::source::{LocalDir, Source};
use fruits_dataflows::state::{live_rows, load_committed};
use std::collections::BTreeMap;
use std::time::Instant;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() >= 2, "usage: accuracy TRAINED_OUTPUT TEST_DIR");
    let store = fruits_dataflows::sink::open(&args[0], &Default::default())?;
    let checkpoint = load_committed(store.as_ref())?;
    let rows: Vec<ImageRow> = live_rows(store.as_ref(), &checkpoint)?
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    let mut embedder = Embedder::load(&checkpoint.embed, &Default::default())?;
    let test = LocalDir::open(&args[1])?;
    let started = Instant::now();
    let mut tests: Vec<(String, Vec<f64>)> = Vec::new();
    for object in test.list()? {
        let label = object.key.label().map_err(anyhow::Error::msg)?.0;
        let e = embedder.embed_bytes(&test.read(&object.key)?)?;
        tests.push((label, e.to_f64()));
    }
    println!(
        "train: {} images ({} at {}x{}); test: {} images, embedded in {:.1} s; PCA k = {}",
        rows.len(),
        checkpoint.embed.model.display(),
        checkpoint.embed.input_size,
        checkpoint.embed.input_size,
        tests.len(),
        started.elapsed().as_secs_f64(),
        checkpoint.models.pca.as_ref().map_or(0, |p| p.k)
    );
    // The default settings themselves (nearest mean), so the per-label table below is the
    // default classifier's.
    let mut variants = vec![("nearest_mean".to_string(), ClassifyConfig::default())];
    for m in [1, 3, 5, 10] {
        variants.push((
            format!("knn, {m} per label"),
            ClassifyConfig {
                method: Method::Knn,
                neighbours: m,
                top: 3,
            },
        ));
    }
    println!("| classifier | top-1 | top-3 | ms/query |");
    println!("|---|---|---|---|");
    let default = ClassifyConfig::default();
    let mut confusion: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (name, config) in variants {
        let is_default = config == default;
        let classifier = Classifier::with_points(&checkpoint, &rows, config)?;
        let (mut top1, mut top3) = (0, 0);
        let started = Instant::now();
        for (label, x) in &tests {
            let p = classifier.predict(x);
            top1 += (p.labels[0].label == *label) as usize;
            top3 += p.labels.iter().take(3).any(|l| l.label == *label) as usize;
            if is_default {
                *confusion
                    .entry((label.clone(), p.labels[0].label.clone()))
                    .or_default() += 1;
            }
        }
        let n = tests.len() as f64;
        println!(
            "| {name}{} | {:.4} | {:.4} | {:.2} |",
            if is_default { " (default)" } else { "" },
            top1 as f64 / n,
            top3 as f64 / n,
            started.elapsed().as_secs_f64() * 1000.0 / n
        );
    }
    println!("\nPer-label results of the default (true label: correct/total, then the labels it was mistaken for):");
    let mut per_label: BTreeMap<String, (usize, usize, Vec<(String, usize)>)> = BTreeMap::new();
    for ((truth, predicted), n) in confusion {
        let entry = per_label.entry(truth.clone()).or_default();
        entry.1 += n;
        if truth == predicted {
            entry.0 += n;
        } else {
            entry.2.push((predicted, n));
        }
    }
    for (label, (ok, total, wrong)) in per_label {
        let wrong: Vec<String> = wrong.iter().map(|(l, n)| format!("{l} x{n}")).collect();
        println!("- {label}: {ok}/{total} {}", wrong.join(", "));
    }
    Ok(())
}
