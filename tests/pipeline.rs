//! `run --once` end to end on the fixture archive, and its outputs.

use crate::util::*;
use fruits_dataflows::stats::reference::{batch_pca, max_principal_angle};
use fruits_dataflows::stats::PcaConfig;
use std::process::Command;

#[test]
fn once_run_writes_models_status_and_readable_tables() {
    let out = tempfile::tempdir().unwrap();
    // Small epochs so the PCA is published several times and must come out as batch.
    let config = out.path().join("pipeline.toml");
    std::fs::write(&config, "[source]\nepoch_size = 7\n").unwrap();
    let run = run_once(
        &fixtures(),
        out.path(),
        &["--config", config.to_str().unwrap(), "-w", "2"],
    );

    let status = status(out.path());
    // The summary a new user reads, from the committed state.
    let summary = String::from_utf8_lossy(&run.stdout);
    let k_line = format!("PCA k = {}", status["pca"]["k"]);
    assert!(
        summary.contains("Done: 40 images in 4 labels, 0 errors"),
        "{summary}"
    );
    assert!(
        summary.contains(&k_line) && summary.contains("classify --output"),
        "{summary}"
    );
    // Which model, size and engine made the embeddings.
    assert_eq!(status["embedding"]["input_size"], 112);
    assert!(["tract", "onnxruntime"].contains(&status["embedding"]["engine"].as_str().unwrap()));
    assert_eq!(status["images"], 40);
    assert_eq!(status["errors"], 0);
    assert_eq!(status["labels"]["Apple Golden 1"], 10);
    assert_eq!(status["labels"].as_object().unwrap().len(), 4);
    // The 6 epochs were a catch-up (a queue behind each but the last): refits were
    // deferred, and the last epoch's PCA covers every image.
    assert_eq!(status["epoch"], 6);
    assert_eq!(status["models_epoch"]["pca"], 6, "{status}");
    assert_eq!(status["models_epoch"]["changes_since_fit"], 0, "{status}");
    assert_eq!(status["pca"]["n"], 40);
    let k = status["pca"]["k"].as_u64().unwrap() as usize;
    let ratios = status["pca"]["explained_variance_ratio"]
        .as_array()
        .unwrap();
    assert_eq!(ratios.len(), k);
    assert!(ratios.iter().map(|r| r.as_f64().unwrap()).sum::<f64>() >= 0.95 - 1e-9);
    let counts: Vec<i64> = status["kmeans"]["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_i64().unwrap())
        .collect();
    assert_eq!(counts.len(), 10);
    assert_eq!(counts.iter().sum::<i64>(), 40);

    // The PCA published after 6 epochs equals a batch PCA over the stored embeddings.
    let csv = out.path().join("table.csv");
    let parquet = out.path().join("table.parquet");
    let export = bin()
        .args([
            "export",
            "--output",
            out.path().to_str().unwrap(),
            "--csv",
            csv.to_str().unwrap(),
        ])
        .args(["--parquet", parquet.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let rows = read_with_pyarrow(&out.path().join("embeddings"), &parquet, &csv, k);
    let features: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| r.iter().map(|v| *v as f64).collect())
        .collect();
    let batch = batch_pca(&features, &PcaConfig::default());
    let pca = read_json(&out.path().join("models/pca.json"));
    let streamed: Vec<f64> = pca["explained_variance_ratio"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (a, b) in streamed.iter().zip(&batch.explained_variance_ratio).take(k) {
        assert!(
            (a - b).abs() <= 1e-9 * b.abs(),
            "streamed ratio {a} vs batch {b}"
        );
    }
    let components: Vec<Vec<f64>> = pca["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect();
    let angle = max_principal_angle(&components, &batch.components);
    assert!(
        angle < 1e-6,
        "streamed and batch top-{k} subspaces differ by {angle} rad"
    );
}

/// Reads every output table with pyarrow/pandas (real readers), checks their shapes, and
/// returns the stored embeddings in path order.
fn read_with_pyarrow(
    dir: &std::path::Path,
    export: &std::path::Path,
    csv: &std::path::Path,
    k: usize,
) -> Vec<Vec<f32>> {
    let script = r#"
import sys, json, glob, pyarrow.parquet as pq, pandas as pd
emb = pd.concat([pq.read_table(f).to_pandas() for f in sorted(glob.glob(sys.argv[1] + "/*.parquet"))])
exp = pq.read_table(sys.argv[2]).to_pandas()
csv = pd.read_csv(sys.argv[3])
assert list(emb.columns) == ["path", "label", "features"], emb.columns
assert list(exp.columns) == ["path", "label", "features", "pca_features", "cluster"], exp.columns
assert len(csv.columns) == 3 + int(sys.argv[4]) and list(csv.columns[:4]) == ["path", "label", "cluster", "pc1"]
assert len(emb) == len(exp) == len(csv), (len(emb), len(exp), len(csv))
assert all(len(f) == 1280 for f in emb.features)
assert set(exp.label) == set(csv.label)
emb = emb.sort_values("path")
print(json.dumps([list(map(float, f)) for f in emb.features]))
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            script,
            dir.to_str().unwrap(),
            export.to_str().unwrap(),
            csv.to_str().unwrap(),
            &k.to_string(),
        ])
        .output()
        .expect("python3 with pyarrow and pandas (installed by .ci/run)");
    assert!(
        out.status.success(),
        "pyarrow check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn missing_model_names_the_command_that_creates_it() {
    let out = tempfile::tempdir().unwrap();
    let result = bin()
        .args([
            "run",
            "--once",
            "--source",
            fixtures().to_str().unwrap(),
            "--output",
            out.path().to_str().unwrap(),
        ])
        .args(["--model", "/nonexistent/model.onnx"])
        .output()
        .unwrap();
    assert!(!result.status.success());
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(
        err.contains("/nonexistent/model.onnx") && err.contains("export_efficientnet_lite0.py"),
        "{err}"
    );
}

#[test]
fn help_explains_timely_flags() {
    let out = bin().args(["run", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--hostfile") && text.contains("--once") && text.contains("--workers"),
        "{text}"
    );
}

/// `replay` rebuilds the moments and per-label statistics from the stored embeddings
/// bit for bit, skipping rows a later epoch deleted or rewrote, and refits the PCA.
#[test]
fn replay_rebuilds_the_streamed_statistics_from_the_live_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (source, out) = (dir.path().join("archive"), dir.path().join("out"));
    assert_eq!(copy_fixtures(&source, 0..8), 32);
    run_once(&source, &out, &["-w", "2"]);
    // A later epoch deletes one image and rewrites another with a third's bytes: their
    // first rows stay in the first epoch's file but are no longer live.
    let kiwi = source.join("Kiwi 1");
    let mut images: Vec<_> = std::fs::read_dir(&kiwi)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    images.sort();
    std::fs::remove_file(&images[0]).unwrap();
    std::fs::copy(&images[2], &images[1]).unwrap();
    run_once(&source, &out, &["-w", "2"]);
    assert_eq!(status(&out)["images"], 31);

    let replay = bin()
        .args(["replay", "--output", out.to_str().unwrap()])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&replay.stdout);
    assert!(
        replay.status.success(),
        "{printed}\n{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert!(printed.contains("images: 31"), "{printed}");
    assert!(
        printed.contains("moments equal to the streamed state: yes, bit for bit"),
        "{printed}"
    );
    assert!(
        printed.contains("per-label statistics (4 labels) equal to the streamed state: yes"),
        "{printed}"
    );
    assert!(printed.contains("folded in the same pass"), "{printed}");
    let refit = read_json(&out.join("replay/models/pca.json"));
    assert_eq!(refit["k"], status(&out)["pca"]["k"]);

    // The single pass and its batch twin, two passes, rebuild the same models.
    use fruits_dataflows::replay::{replay_in, Passes};
    let store = fruits_dataflows::sink::open(out.to_str().unwrap(), &Default::default()).unwrap();
    let config = fruits_dataflows::PipelineConfig::default();
    let [one, two] = [Passes::Auto, Passes::Two]
        .map(|passes| replay_in(store.as_ref(), &config.pca, &config.kmeans, passes).unwrap());
    assert!(one.single_pass && !two.single_pass);
    assert!(!one.models.kmeans.centroids.is_empty());
    assert_eq!(one.models, two.models);
}
