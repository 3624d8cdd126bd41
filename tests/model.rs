//! The exported EfficientNet-Lite0: ImageNet top-1 on fruit photos, and its embedding
//! against the independent float64 numpy reference (models/reference.py).

use crate::util::*;
use fruits_dataflows::decode::{decode, DecodeConfig};
use fruits_dataflows::embed::{EmbedConfig, Embedder};
use std::path::Path;

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

fn images(dir: &Path, n: usize) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.truncate(n);
    files
}

#[test]
fn imagenet_top1_names_the_fruit() {
    let config = EmbedConfig {
        model: model_224(),
        ..EmbedConfig::default()
    };
    let mut embedder =
        Embedder::load_outputs(&config, &DecodeConfig::default(), &["embedding", "logits"])
            .unwrap();
    let (base, per_label) = match shared() {
        Some(s) => (s.join("Test"), 30),
        None => (root().join("tests/fixtures/imagenet"), 6),
    };
    let expected = [
        ("Banana 1", 954),
        ("Orange 1", 950),
        ("Lemon 1", 951),
        ("Pineapple 1", 953),
        ("Strawberry 1", 949),
    ];
    let mut tensor = Vec::new();
    for (label, class) in expected {
        let files = images(&base.join(label), per_label);
        let hits = files
            .iter()
            .filter(|f| {
                let img = decode(&std::fs::read(f).unwrap(), &DecodeConfig::default()).unwrap();
                embedder.preprocess().tensor_into(&img, &mut tensor);
                argmax(&embedder.run_tensor(&tensor).unwrap()[1]) == class
            })
            .count();
        eprintln!("{label}: {hits}/{} top-1 = {class}", files.len());
        assert!(
            hits * 5 >= files.len() * 3,
            "{label}: only {hits}/{} predicted as class {class}",
            files.len()
        );
    }
}

#[test]
fn embedding_matches_the_float64_reference() {
    // The original 224x224 export and the default 112x112 one (its own TF SAME padding).
    matches_reference(model_224(), 224);
    matches_reference(model(), 112);
}

fn matches_reference(model: std::path::PathBuf, size: u32) {
    let config = EmbedConfig {
        model,
        ..EmbedConfig::default()
    };
    let mut embedder = Embedder::load(&config, &DecodeConfig::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = [
        fixtures().join("Banana 1/0_100.jpg"),
        fixtures().join("Kiwi 1/0_100.jpg"),
    ];
    let mut inputs = Vec::new();
    let mut ours = Vec::new();
    let mut tensor = Vec::new();
    for f in &files {
        let img = decode(&std::fs::read(f).unwrap(), &DecodeConfig::default()).unwrap();
        embedder.preprocess().tensor_into(&img, &mut tensor);
        inputs.extend(tensor.iter().flat_map(|v| v.to_le_bytes()));
        ours.extend(embedder.run_tensor(&tensor).unwrap().remove(0));
    }
    let (input, output) = (dir.path().join("in.f32"), dir.path().join("out.f64"));
    std::fs::write(&input, inputs).unwrap();
    let status = std::process::Command::new("python3")
        .arg(root().join("models/reference.py"))
        .args([
            "--input",
            input.to_str().unwrap(),
            "--out",
            output.to_str().unwrap(),
            "--size",
            &size.to_string(),
        ])
        .current_dir(root())
        .status()
        .unwrap();
    assert!(status.success(), "reference.py failed");
    let reference: Vec<f64> = std::fs::read(&output)
        .unwrap()
        .chunks(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(reference.len(), ours.len());
    let max = ours
        .iter()
        .zip(&reference)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert_eq!(
        embedder.preprocess().size,
        size,
        "the model declares its input size"
    );
    eprintln!("{size}x{size}: max |tract - reference| = {max:e}");
    assert!(
        max < 1e-4,
        "tract embedding differs from the float64 reference by {max}"
    );
}

/// The onnxruntime backend (cargo feature `onnxruntime`) gives tract's embeddings to
/// 1e-4 on every fixture image, at both exported sizes.
#[cfg(feature = "onnxruntime")]
#[test]
fn onnxruntime_backend_matches_tract() {
    use fruits_dataflows::embed::Backend;
    let library = onnxruntime_library();
    for model in [model(), model_224()] {
        let tract = EmbedConfig {
            model,
            ..EmbedConfig::default()
        };
        let ort = EmbedConfig {
            backend: Backend::Onnxruntime,
            onnxruntime_library: Some(library.clone()),
            ..tract.clone()
        };
        let mut a = Embedder::load(&tract, &DecodeConfig::default()).unwrap();
        let mut b = Embedder::load(&ort, &DecodeConfig::default()).unwrap();
        let mut max = 0.0f64;
        let mut tensor = Vec::new();
        for label in std::fs::read_dir(fixtures()).unwrap() {
            for f in images(&label.unwrap().path(), 10) {
                let img = decode(&std::fs::read(&f).unwrap(), &DecodeConfig::default()).unwrap();
                a.preprocess().tensor_into(&img, &mut tensor);
                let (x, y) = (
                    a.run_tensor(&tensor).unwrap(),
                    b.run_tensor(&tensor).unwrap(),
                );
                assert_eq!(x[0].len(), y[0].len());
                for (p, q) in x[0].iter().zip(&y[0]) {
                    max = max.max((p - q).abs() as f64);
                }
            }
        }
        eprintln!(
            "{}: max |tract - onnxruntime| = {max:e}",
            tract.model.display()
        );
        assert!(max < 1e-4, "backends differ by {max}");
    }
}

/// libonnxruntime.so: ORT_DYLIB_PATH, or the one in the PyPI wheel scripts/setup installs.
#[cfg(feature = "onnxruntime")]
fn onnxruntime_library() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return p.into();
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi', 'libonnxruntime.so*')))[0])",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "onnxruntime is not installed for python3 (scripts/setup installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().into()
}

/// Batching is speed only: onnxruntime's embeddings of images run 8 (and a ragged 3) at
/// a time, on 2 threads, are bit-identical to one-image runs on 1 thread, so the
/// statistics cannot depend on how the embed stage groups images or sizes its threads
/// (which both follow the worker count), nor on whether the workers share one session.
#[cfg(feature = "onnxruntime")]
#[test]
fn onnxruntime_batches_and_threads_give_bit_identical_embeddings() {
    use fruits_dataflows::embed::{Backend, InferenceConfig};
    let config = EmbedConfig {
        model: model(),
        backend: Backend::Onnxruntime,
        onnxruntime_library: Some(onnxruntime_library()),
        ..EmbedConfig::default()
    };
    let decode = DecodeConfig::default();
    let mut one = Embedder::load(&config, &decode).unwrap();
    let batched = InferenceConfig {
        batch: 8,
        threads: 2,
        shared_session: false,
    };
    let mut many = Embedder::load_for_stage(&config, &decode, &batched, 1).unwrap();
    assert_eq!(many.batch(), 8);
    // The default batch follows the session's threads: 4 on one, 8 on more.
    for (threads, expected) in [(1, 4), (2, 8)] {
        let default = InferenceConfig {
            threads,
            ..InferenceConfig::default()
        };
        let embedder = Embedder::load_for_stage(&config, &decode, &default, 1).unwrap();
        assert_eq!(embedder.batch(), expected, "{threads} threads");
    }
    // Two workers' embedders on one shared session, as `shared_session = true` makes them.
    let shared = InferenceConfig {
        shared_session: true,
        ..batched.clone()
    };
    let mut first = Embedder::load_for_stage(&config, &decode, &shared, 2).unwrap();
    let mut second = Embedder::load_for_stage(&config, &decode, &shared, 2).unwrap();
    let preparer = one.preparer();
    let mut pixels = Vec::new();
    for label in std::fs::read_dir(fixtures()).unwrap() {
        for f in images(&label.unwrap().path(), 6) {
            pixels.push(preparer.prepare(&std::fs::read(&f).unwrap()).unwrap());
        }
    }
    // A count that is not a multiple of the batch: the last run is short.
    pixels.truncate(8 * (pixels.len() / 8) - 5);
    assert!(pixels.len() > 8, "{} fixture images", pixels.len());
    let refs: Vec<&[u8]> = pixels.iter().map(|p| p.as_slice()).collect();
    let together = many.embed_batch(&refs);
    assert_eq!(together.len(), refs.len());
    let halves = refs.split_at(refs.len() / 2);
    let shared_runs: Vec<_> = std::thread::scope(|s| {
        let a = s.spawn(|| first.embed_batch(halves.0));
        let b = s.spawn(|| second.embed_batch(halves.1));
        let mut all = a.join().unwrap();
        all.extend(b.join().unwrap());
        all
    });
    for ((p, e), s) in refs.iter().zip(together).zip(shared_runs) {
        let alone = one.embed_pixels(p).unwrap();
        assert_eq!(e.unwrap(), alone);
        assert_eq!(s.unwrap(), alone, "a shared session's embedding differs");
    }
}
