//! Exactly once across restarts, tailing, and deletions retracting.

use crate::util::*;
use std::process::{Child, Stdio};

fn tail(source: &std::path::Path, output: &std::path::Path) -> Child {
    let config = tail_config(&output.with_extension("toml"), 200, 16)
        .to_str()
        .unwrap()
        .to_string();
    run_command(source.to_str().unwrap(), output.to_str().unwrap(), false)
        .args(["--config", &config, "-w", "2"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until the published status satisfies `done`.
fn wait_for(output: &std::path::Path, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let read = || {
        std::fs::read(output.join("status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    };
    wait_until(what, read, done);
}

fn wait_for_images(output: &std::path::Path, n: i64) {
    wait_for(output, &format!("{n} images"), |s| {
        s["images"].as_i64() == Some(n)
    });
}

fn stop(mut child: Child) {
    // SIGINT: finish the current epoch cleanly.
    unsafe_kill(child.id(), "-INT");
    let status = child.wait().unwrap();
    assert!(status.success(), "run did not stop cleanly: {status:?}");
}

fn unsafe_kill(pid: u32, signal: &str) {
    std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
}

#[test]
fn restart_counts_every_image_exactly_once() {
    let source = tempfile::tempdir().unwrap();
    let output = tempfile::tempdir().unwrap();
    let out = output.path().join("out");
    assert_eq!(copy_fixtures(source.path(), 0..3), 12);
    let run = tail(source.path(), &out);
    wait_for_images(&out, 12);
    // New images in existing folders, found while tailing.
    copy_fixtures(source.path(), 3..5);
    wait_for_images(&out, 20);
    stop(run);

    // Added while stopped, then a restart on the same output.
    copy_fixtures(source.path(), 5..8);
    let run = tail(source.path(), &out);
    wait_for_images(&out, 32);
    // A whole new label folder appears while running.
    let kiwi = source.path().join("Kiwi 1");
    std::fs::rename(&kiwi, source.path().join("Kiwi 2")).unwrap();
    // Renaming is a deletion of 8 + an addition of 8 under a new label.
    wait_for(&out, "the Kiwi 2 folder", |s| {
        s["labels"]["Kiwi 2"] == 8 && s["labels"].get("Kiwi 1").is_none()
    });
    stop(run);

    let s = status(&out);
    assert_eq!(s["images"], 32);
    assert_eq!(s["labels"]["Kiwi 2"], 8);
    assert!(s["labels"].get("Kiwi 1").is_none(), "{s}");
    // A batch run over the final archive gives the same statistics.
    let batch = output.path().join("batch");
    run_once(source.path(), &batch, &[]);
    assert_same_statistics_except_kmeans(&out, &batch);
}

#[test]
fn deleting_images_gives_the_statistics_without_them() {
    let source = tempfile::tempdir().unwrap();
    let output = tempfile::tempdir().unwrap();
    let (full, reduced) = (output.path().join("full"), output.path().join("reduced"));
    copy_fixtures(source.path(), 0..6);
    run_once(source.path(), &full, &[]);
    assert_eq!(status(&full)["images"], 24);
    // Delete 2 images of each label, then resume on the same output.
    for label in std::fs::read_dir(source.path()).unwrap() {
        let label = label.unwrap().path();
        let mut files: Vec<_> = std::fs::read_dir(&label)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in &files[..2] {
            std::fs::remove_file(f).unwrap();
        }
    }
    run_once(source.path(), &full, &[]);
    run_once(source.path(), &reduced, &[]);
    assert_eq!(status(&full)["images"], 16);
    assert_same_statistics_except_kmeans(&full, &reduced);
}

/// PCA and counts must match a batch run exactly; KMeans is online, so its state
/// legitimately depends on the epochs it saw.
fn assert_same_statistics_except_kmeans(a: &std::path::Path, b: &std::path::Path) {
    let (sa, sb) = (status(a), status(b));
    assert_eq!(sa["images"], sb["images"]);
    assert_eq!(sa["labels"], sb["labels"]);
    assert_eq!(sa["pca"], sb["pca"], "PCA differs from the batch run");
    let (pa, pb) = (
        read_json(&a.join("models/pca.json")),
        read_json(&b.join("models/pca.json")),
    );
    assert_eq!(pa["components"], pb["components"]);
}
