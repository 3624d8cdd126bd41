//! Shared test helpers: run the real binary, build archives from fixtures, read outputs.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The default model (112x112 input), as `run` uses it.
pub fn model() -> PathBuf {
    exported(fruits_dataflows::embed::DEFAULT_MODEL, "--size 112")
}

/// The model at its original 224x224 input (ImageNet checks, reference comparison).
pub fn model_224() -> PathBuf {
    exported("models/efficientnet_lite0.onnx", "")
}

fn exported(name: &str, flags: &str) -> PathBuf {
    let path = root().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `python3 models/export_efficientnet_lite0.py {flags}` first (README, setup)",
        path.display()
    );
    path
}

pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures/fruits")
}

/// The shared Fruits-360 slice, if present beside the project.
pub fn shared() -> Option<PathBuf> {
    let p = root().join("../shared/fruits360");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping the shared-data part: ../shared/fruits360 is absent");
        None
    }
}

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fruits-flow"));
    c.current_dir(root()).env("RUST_LOG", "warn");
    c
}

/// `fruits-flow run` over `source` into `output` with the test model (`--once` if asked).
pub fn run_command(source: &str, output: &str, once: bool) -> Command {
    let mut c = bin();
    c.arg("run").args([
        "--source",
        source,
        "--output",
        output,
        "--model",
        model().to_str().unwrap(),
    ]);
    if once {
        c.arg("--once");
    }
    c
}

/// Runs `fruits-flow run --once` and asserts success.
pub fn run_once(source: &Path, output: &Path, extra: &[&str]) -> Output {
    let out = run_command(source.to_str().unwrap(), output.to_str().unwrap(), true)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn status(output: &Path) -> Value {
    status_of(bin().args(["status", "--json", "--output", output.to_str().unwrap()]))
}

/// Runs a `status --json` command and parses what it prints.
pub fn status_of(command: &mut Command) -> Value {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Copies the first `n` images of each fixture label into `dest` (same layout).
pub fn copy_fixtures(dest: &Path, range: std::ops::Range<usize>) -> usize {
    let mut copied = 0;
    for label in std::fs::read_dir(fixtures()).unwrap() {
        let label = label.unwrap().path();
        let mut files: Vec<_> = std::fs::read_dir(&label)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let target = dest.join(label.file_name().unwrap());
        std::fs::create_dir_all(&target).unwrap();
        for f in files.get(range.clone()).unwrap_or(&[]) {
            std::fs::copy(f, target.join(f.file_name().unwrap())).unwrap();
            copied += 1;
        }
    }
    copied
}

/// Polls `read` until the status it returns satisfies `done` (two minutes at most).
pub fn wait_until(what: &str, read: impl Fn() -> Option<Value>, done: impl Fn(&Value) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let current = read();
        if current.as_ref().is_some_and(&done) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what} (status: {current:?})"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Writes a settings file for a tailing run.
pub fn tail_config(path: &Path, poll_ms: u64, epoch_size: usize) -> &Path {
    std::fs::write(
        path,
        format!("[source]\npoll_interval_ms = {poll_ms}\nepoch_size = {epoch_size}\n"),
    )
    .unwrap();
    path
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// Asserts two runs published the same statistics: counts equal, explained variance
/// ratios to 1e-9 relative, and the same top-k subspace (principal angles < 1e-6 rad).
pub fn assert_same_statistics(a: &Path, b: &Path) {
    let (sa, sb) = (status(a), status(b));
    assert_eq!(sa["images"], sb["images"]);
    assert_eq!(sa["labels"], sb["labels"]);
    assert_eq!(sa["errors"], sb["errors"]);
    assert_eq!(sa["pca"]["k"], sb["pca"]["k"]);
    let (pa, pb) = (
        read_json(&a.join("models/pca.json")),
        read_json(&b.join("models/pca.json")),
    );
    let ra = pa["explained_variance_ratio"].as_array().unwrap();
    let rb = pb["explained_variance_ratio"].as_array().unwrap();
    for (x, y) in ra.iter().zip(rb) {
        let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
        assert!(
            (x - y).abs() <= 1e-9 * x.abs().max(1e-12),
            "ratios differ: {x} vs {y}"
        );
    }
    let comps = |p: &Value| -> Vec<Vec<f64>> {
        p["components"]
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
            .collect()
    };
    let angle = fruits_dataflows::stats::reference::max_principal_angle(&comps(&pa), &comps(&pb));
    assert!(angle < 1e-6, "top-k subspaces differ by {angle} rad");
    let (ka, kb) = (
        read_json(&a.join("models/kmeans.json")),
        read_json(&b.join("models/kmeans.json")),
    );
    assert_eq!(ka["counts"], kb["counts"], "KMeans counts differ");
}

/// A free loopback port (bound and released: good enough for a test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the child process when dropped, so a failed assertion leaves no server behind.
pub struct Guard(pub std::process::Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
