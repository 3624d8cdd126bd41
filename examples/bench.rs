//! The speed benchmark: prints images/s for each part of the pipeline and for the whole,
//! next to onnxruntime on the same ONNX file and images, in one invocation (so the
//! comparison holds on a noisy machine).
//!
//! ```sh
//! cargo build --release --locked && \
//! cargo run --release --locked --example bench -- ../shared/fruits360/Training
//! ```
//! Options after the folder: `--model FILE` (default: the configured default model),
//! `--embed-limit N` images for the embed-alone and onnxruntime parts (default 500),
//! `--skip-ort`, `--skip-w1`, `--backend onnxruntime` (needs a build with
//! `--features onnxruntime` and `ORT_DYLIB_PATH`; the pipeline then runs onnxruntime).
//!
//! Parts: decode+resize alone; the embed stage alone (tract, 1 thread, batch 1);
//! onnxruntime (Python, 1 and 2 threads); `run --once` at -w 1 and -w 2 (wall time and
//! peak RSS of the process); a tailing run over all but 100 images, then the time from
//! the last 100 landing to their published statistics; `replay` from stored embeddings.

// The same allocator as the fruits-flow binary, so figures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use anyhow::Result;
use common::{binary, measure, wait_images};
use fruits_dataflows::decode::DecodeConfig;
use fruits_dataflows::embed::{EmbedConfig, Embedder};
use fruits_dataflows::source::{LocalDir, Source};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn main() -> Result<()> {
    fruits_dataflows::embed::no_transparent_huge_pages();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let images = PathBuf::from(args.first().map_or("../shared/fruits360/Training", |s| s));
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let model = flag("--model")
        .map(PathBuf::from)
        .unwrap_or_else(|| EmbedConfig::default().model);
    let embed_limit: usize = flag("--embed-limit").map_or(Ok(500), |s| s.parse())?;
    let skip = |name: &str| args.iter().any(|a| a == name);
    let bin = binary()?;

    let source = LocalDir::open(images.to_str().unwrap())?;
    let keys: Vec<_> = source.list()?.into_iter().map(|o| o.key).collect();
    println!("images: {} in {}", keys.len(), images.display());
    println!("model: {}", model.display());

    // 1. decode + resize alone, over every image.
    let bytes: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| source.read(k))
        .collect::<Result<_, _>>()?;
    let use_ort = flag("--backend").is_some_and(|b| b == "onnxruntime");
    let config = EmbedConfig {
        model: model.clone(),
        backend: if use_ort {
            fruits_dataflows::embed::Backend::Onnxruntime
        } else {
            fruits_dataflows::embed::Backend::Tract
        },
        ..EmbedConfig::default()
    };
    println!("backend: {:?}", config.backend);
    let mut embedder = Embedder::load(&config, &DecodeConfig::default())?;
    let size = embedder.preprocess().size;
    println!("input size: {size}x{size}");
    let started = Instant::now();
    let tensors = bytes
        .iter()
        .map(|b| embedder.input_tensor(b))
        .collect::<Result<Vec<_>, _>>()?;
    let decode_rate = bytes.len() as f64 / started.elapsed().as_secs_f64();
    println!("decode+resize alone (1 thread): {decode_rate:.0} images/s");

    // 2. the embed stage alone, 1 thread, batch 1.
    let n = embed_limit.min(tensors.len());
    for t in tensors.iter().take(10) {
        embedder.run_tensor(t)?;
    }
    let started = Instant::now();
    for t in &tensors[..n] {
        embedder.run_tensor(t)?;
    }
    let tract_1 = n as f64 / started.elapsed().as_secs_f64();
    println!(
        "embed alone ({:?}, 1 thread, batch 1, {n} images): {tract_1:.1} images/s ({:.2} ms/image)",
        config.backend,
        1000.0 / tract_1
    );
    drop(tensors);

    // 3. onnxruntime on the same file and images.
    let ort = if skip("--skip-ort") {
        None
    } else {
        onnxruntime(&model, &images, n)
    };
    if let Some((one, two)) = ort {
        println!("onnxruntime (Python), 1 thread: {one:.1} images/s; 2 threads: {two:.1} images/s");
        println!("this backend / onnxruntime (Python), 1 thread: {:.2} (per-image time is {:.2}x onnxruntime's)", tract_1 / one, one / tract_1);
    }

    // 4. whole runs.
    let work = tempfile::tempdir()?;
    let settings = work.path().join("settings.toml");
    std::fs::write(
        &settings,
        if use_ort {
            "[embed]\nbackend = \"onnxruntime\"\n"
        } else {
            ""
        },
    )?;
    let settings = settings.as_path();
    let total = keys.len() as f64;
    if !skip("--skip-w1") {
        let (s, rss) = timed_run(&bin, &images, &work.path().join("w1"), &model, 1, settings)?;
        println!(
            "run --once -w 1: {s:.1} s, {:.1} images/s, peak RSS {:.0} MB",
            total / s,
            rss
        );
    }
    let out2 = work.path().join("w2");
    let (s2, rss2) = timed_run(&bin, &images, &out2, &model, 2, settings)?;
    println!(
        "run --once -w 2: {s2:.1} s, {:.1} images/s, peak RSS {:.0} MB",
        total / s2,
        rss2
    );
    println!(
        "  whole pipeline at -w 2 / (2 x single-thread embed alone): {:.2}",
        total / s2 / (2.0 * tract_1)
    );
    if let Some((_, two)) = ort {
        println!(
            "  whole pipeline at -w 2 / onnxruntime 2 threads: {:.2}",
            total / s2 / two
        );
    }

    // 5. adding 100 images to a tailing pipeline over the rest.
    match incremental(&bin, &images, &keys, work.path(), &model, settings) {
        Ok((full, last)) => {
            println!("tailing: first {} images ingested in {full:.1} s; 100 more published {last:.2} s after landing", keys.len() - 100);
            println!(
                "  adding 100 images / full run --once -w 2: {:.1} %",
                100.0 * last / s2
            );
        }
        Err(e) => println!("tailing measurement failed: {e:#}"),
    }

    // 6. replay from stored embeddings.
    let started = Instant::now();
    let replay = Command::new(&bin)
        .args(["replay", "--output", out2.to_str().unwrap()])
        .output()?;
    let replay_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        replay.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&replay.stderr)
    );
    println!(
        "replay (process wall time, incl. start): {replay_s:.2} s, {:.0} images/s",
        total / replay_s
    );
    for line in String::from_utf8_lossy(&replay.stdout).lines() {
        println!("  replay: {line}");
    }
    Ok(())
}

fn timed_run(
    bin: &Path,
    images: &Path,
    out: &Path,
    model: &Path,
    workers: usize,
    settings: &Path,
) -> Result<(f64, f64)> {
    measure(
        Command::new(bin)
            .args(["run", "--once", "-w", &workers.to_string(), "--source"])
            .arg(images)
            .arg("--output")
            .arg(out)
            .arg("--model")
            .arg(model)
            .arg("--config")
            .arg(settings)
            .env("RUST_LOG", "warn"),
    )
}

/// Tails a copy of all but the last 100 images at -w 2, then lands the last 100 and
/// times how long until the published status counts them.
fn incremental(
    bin: &Path,
    images: &Path,
    keys: &[fruits_dataflows::record::ImageKey],
    work: &Path,
    model: &Path,
    settings: &Path,
) -> Result<(f64, f64)> {
    let source = work.join("tail-source");
    let out = work.join("tail-out");
    let config = work.join("tail.toml");
    let base = std::fs::read_to_string(settings)?;
    std::fs::write(&config, format!("{base}[source]\npoll_interval_ms = 250\n"))?;
    // Every 51st image is held back, so the late ones spread over the labels.
    let late: Vec<_> = keys
        .iter()
        .step_by((keys.len() / 100).max(1))
        .take(100)
        .collect();
    for key in keys {
        let to = source.join(&key.0);
        std::fs::create_dir_all(to.parent().unwrap())?;
        if !late.contains(&key) {
            std::fs::copy(images.join(&key.0), &to)?;
        }
    }
    let mut child = Command::new(bin)
        .args(["run", "-w", "2", "--source"])
        .arg(&source)
        .arg("--output")
        .arg(&out)
        .arg("--model")
        .arg(model)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| {
        let started = Instant::now();
        wait_images(&out, keys.len() - late.len())?;
        let full = started.elapsed().as_secs_f64();
        // Land them together: into a staging dir, then one rename per file.
        let landed = Instant::now();
        for key in &late {
            let staged = work.join("staged.jpg");
            std::fs::copy(images.join(&key.0), &staged)?;
            std::fs::rename(&staged, source.join(&key.0))?;
        }
        wait_images(&out, keys.len())?;
        Ok((full, landed.elapsed().as_secs_f64()))
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// onnxruntime's (1-thread, 2-thread) images/s from models/ort_bench.py.
fn onnxruntime(model: &Path, images: &Path, n: usize) -> Option<(f64, f64)> {
    let out = Command::new("python3")
        .arg("models/ort_bench.py")
        .arg("--model")
        .arg(model)
        .arg("--images")
        .arg(images)
        .args(["--limit", &n.to_string(), "--threads", "1,2"])
        .stderr(Stdio::inherit())
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        _ => {
            println!("onnxruntime: not run (pip install onnxruntime pillow numpy)");
            return None;
        }
    };
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()?
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&last).ok()?;
    Some((v["threads"]["1"].as_f64()?, v["threads"]["2"].as_f64()?))
}
