//! Classification accuracy, calibration and open-set rejection, measured honestly.
//!
//! The models and labelled embeddings come from an output built on one folder (Training),
//! the photos from another (Test), and the non-fruit photos from a third
//! (`scripts/nonfruit_photos.py` builds one). Because clean Fruits-360 photos are easy (a
//! white background, the same fruit turning), every set is also scored *perturbed* the
//! way a phone photo differs: a random crop of 55-90 %, a quarter turn, brightness and
//! contrast changes, blur and JPEG recompression (seeded, so runs repeat). Calibration
//! is only measurable where there are errors, so the temperature is fitted on perturbed
//! validation photos. Two protocols:
//!
//! 1. **Model choice on Training only.** The labels are split in two halves by a stable
//!    hash, and each label's images into fit (4/5) and validation (1/5). On half A the
//!    shrinkage is chosen by validation errors (then log-loss), the temperature by
//!    validation log-loss, and the unknown threshold from the validation images'
//!    distances. Half B, whose labels took no part in any choice, then shows how the
//!    choice carries over: accuracy and acceptance with the same settings.
//! 2. **Test.** Every method fitted on all of Training, with the settings of 1, scored on
//!    Test: top-1 and top-3, the reliability of the default's probabilities, per-label
//!    confusion, the share of Test photos accepted and of non-fruit photos answered
//!    `unknown`.
//!
//! ```sh
//! fruits-flow run --once -w 2 --source ../shared/fruits360/Training --output /tmp/train
//! python3 scripts/nonfruit_photos.py /tmp/nonfruit
//! cargo run --release --example accuracy -- /tmp/train ../shared/fruits360/Training \
//!     ../shared/fruits360/Test /tmp/nonfruit
//! ```

// The same allocator as the fruits-flow binary, so figures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use fruits_dataflows::classify::discriminant::{posterior, Shrinkage, ShrinkageRule};
use fruits_dataflows::classify::{Classifier, ClassifyConfig, Method};
use fruits_dataflows::embed::Embedder;
use fruits_dataflows::record::ImageRow;
use fruits_dataflows::source::{LocalDir, Source};
use fruits_dataflows::state::{live_rows, load_committed, Checkpoint};
use fruits_dataflows::stats::{moments::moments_of, pca, LabelStats, PcaConfig};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Acceptance the unknown threshold is set for, on validation images of known labels.
const ACCEPT: f64 = 0.995;

/// A labelled photo's raw embedding.
struct Photo {
    label: String,
    x: Vec<f64>,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 3,
        "usage: accuracy TRAINED_OUTPUT TRAIN_DIR TEST_DIR [NONFRUIT_DIR]"
    );
    let store = fruits_dataflows::sink::open(&args[0], &Default::default())?;
    let checkpoint = load_committed(store.as_ref())?;
    let rows: Vec<ImageRow> = live_rows(store.as_ref(), &checkpoint)?
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    let mut embedder = Embedder::load(&checkpoint.embed, &Default::default())?;
    let started = Instant::now();
    let train_dir = LocalDir::open(&args[1])?;
    let (tests, tests_perturbed) = embed_dir(&mut embedder, Path::new(&args[2]), true)?;
    let nonfruit = match args.get(3) {
        Some(dir) => embed_dir(&mut embedder, Path::new(dir), false)?.0,
        None => Vec::new(),
    };
    println!(
        "train: {} images, {} labels ({} at {}x{}); test: {} images; non-fruit: {}; embedded in {:.1} s; PCA k = {}",
        rows.len(),
        checkpoint.labels.len(),
        checkpoint.embed.model.display(),
        checkpoint.embed.input_size,
        checkpoint.embed.input_size,
        tests.len(),
        nonfruit.len(),
        started.elapsed().as_secs_f64(),
        checkpoint.models.pca.as_ref().map_or(0, |p| p.k)
    );

    let chosen = choose_on_training(&checkpoint, &rows, &train_dir, &mut embedder)?;
    let default = ClassifyConfig::default();
    println!(
        "\nchosen on Training: shrinkage {:?}, temperature {:.3}, unknown_distance {:.3}; the default config: shrinkage {:?}, temperature {}, unknown_distance {}",
        chosen.shrinkage, chosen.temperature, chosen.unknown_distance,
        default.shrinkage, default.temperature, default.unknown_distance
    );
    test_protocol(
        &checkpoint,
        &rows,
        &tests,
        &tests_perturbed,
        &nonfruit,
        &chosen,
    )?;
    let n = SCORED.load(std::sync::atomic::Ordering::Relaxed).max(1);
    println!(
        "\ndiscriminant: {:.3} ms per photo scored ({n} photos)",
        SCORE_NS.load(std::sync::atomic::Ordering::Relaxed) as f64 / n as f64 / 1e6
    );
    Ok(())
}

/// A photo as a phone might take it: a random crop, a quarter turn, brightness and
/// contrast, blur, JPEG at quality 75. Deterministic in `seed`.
fn perturb(bytes: &[u8], seed: u64) -> Result<Vec<u8>> {
    use image::imageops::{self, FilterType};
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut uniform = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let img = image::load_from_memory(bytes)?.into_rgb8();
    let (w, h) = img.dimensions();
    let side = ((w.min(h) as f64) * (0.55 + 0.35 * uniform())) as u32;
    let x = ((w - side) as f64 * uniform()) as u32;
    let y = ((h - side) as f64 * uniform()) as u32;
    let mut out = imageops::crop_imm(&img, x, y, side, side).to_image();
    out = imageops::resize(&out, w, h, FilterType::Triangle);
    out = match (uniform() * 4.0) as u32 {
        1 => imageops::rotate90(&out),
        2 => imageops::rotate180(&out),
        3 => imageops::rotate270(&out),
        _ => out,
    };
    let (contrast, brightness) = (0.7 + 0.6 * uniform(), -30.0 + 60.0 * uniform());
    for p in out.pixels_mut() {
        for c in 0..3 {
            let v = (p[c] as f64 - 128.0) * contrast + 128.0 + brightness;
            p[c] = v.clamp(0.0, 255.0) as u8;
        }
    }
    let sigma = 1.5 * uniform() as f32;
    if sigma > 0.3 {
        out = imageops::blur(&out, sigma);
    }
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 75).encode(
        out.as_raw(),
        out.width(),
        out.height(),
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(jpeg)
}

fn seed_of(key: &str) -> u64 {
    fruits_dataflows::record::ImageKey(key.into()).bucket_hash()
}

/// Embeds every image under `dir` (`<Label>/<file>` when `labelled`, else any file):
/// the photos as they are, and (labelled only) perturbed.
fn embed_dir(
    embedder: &mut Embedder,
    dir: &Path,
    labelled: bool,
) -> Result<(Vec<Photo>, Vec<Photo>)> {
    let (mut clean, mut perturbed) = (Vec::new(), Vec::new());
    if labelled {
        let source = LocalDir::open(dir)?;
        for object in source.list()? {
            let label = object.key.label().map_err(anyhow::Error::msg)?.0;
            let bytes = source.read(&object.key)?;
            let e = embedder.embed_bytes(&bytes)?;
            clean.push(Photo {
                label: label.clone(),
                x: e.to_f64(),
            });
            let p = embedder.embed_photo(&perturb(&bytes, seed_of(&object.key.0))?)?;
            perturbed.push(Photo {
                label,
                x: p.to_f64(),
            });
        }
    } else {
        let mut paths: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        paths.sort();
        for path in paths {
            match embedder.embed_photo(&std::fs::read(&path)?) {
                Ok(e) => clean.push(Photo {
                    label: String::new(),
                    x: e.to_f64(),
                }),
                Err(e) => eprintln!("skipping {}: {}", path.display(), e.reason),
            }
        }
    }
    Ok((clean, perturbed))
}

/// A checkpoint holding exactly the statistics of `rows` (what the pipeline would have
/// published had the archive held only them).
fn checkpoint_of(template: &Checkpoint, rows: &[&ImageRow]) -> Checkpoint {
    let dim = template.models.moments.dim;
    let mut c = Checkpoint::empty(template.source.clone(), dim, template.embed.clone());
    c.models.moments = moments_of(dim, rows.iter().map(|r| (&r.embedding, 1)));
    c.models.pca = pca::fit(&c.models.moments, &PcaConfig::default());
    for row in rows {
        let stats: &mut LabelStats = c.labels.entry(row.label.0.clone()).or_default();
        let (n, sum) = LabelStats::update_of(&row.embedding);
        stats.n += n;
        stats.sum.resize(sum.len(), 0);
        stats.sum.iter_mut().zip(sum).for_each(|(a, b)| *a += b);
    }
    c
}

/// Per photo: (log-posteriors, index of the true label, distance in typical units).
struct Scored {
    log_posterior: Vec<f64>,
    truth: Option<usize>,
    distance: f64,
}

fn score_all(classifier: &Classifier, photos: &[&Photo]) -> Vec<Scored> {
    let d = classifier
        .discriminant()
        .expect("enough images to fit the discriminant");
    let started = Instant::now();
    let out = photos
        .iter()
        .map(|p| {
            let s = d.score(&p.x);
            let nearest = s.distance.iter().copied().fold(f64::INFINITY, f64::min);
            Scored {
                log_posterior: s.log_posterior,
                truth: classifier.labels().iter().position(|l| *l == p.label),
                distance: d.typical_distance(nearest),
            }
        })
        .collect();
    SCORE_NS.fetch_add(
        started.elapsed().as_nanos() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    SCORED.fetch_add(photos.len() as u64, std::sync::atomic::Ordering::Relaxed);
    out
}

static SCORE_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static SCORED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn argmax(v: &[f64]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

/// Errors and mean log-loss at temperature `t`.
fn errors_and_loss(scored: &[Scored], t: f64) -> (usize, f64) {
    let mut errors = 0;
    let mut loss = 0.0;
    for s in scored {
        let truth = s.truth.expect("a known label");
        errors += (argmax(&s.log_posterior) != truth) as usize;
        loss -= posterior(&s.log_posterior, t)[truth].max(1e-300).ln();
    }
    (errors, loss / scored.len().max(1) as f64)
}

/// The temperature minimising log-loss (log-spaced grid, 0.02 to 1000); 1 (the model's
/// own posterior) when there are no errors to calibrate on, since then any sharper
/// temperature "wins" without evidence.
fn best_temperature(scored: &[Scored]) -> f64 {
    if errors_and_loss(scored, 1.0).0 == 0 {
        return 1.0;
    }
    let grid: Vec<f64> = (0..=120)
        .map(|i| 0.02 * (50_000f64).powf(i as f64 / 120.0))
        .collect();
    grid.into_iter()
        .min_by(|&a, &b| {
            errors_and_loss(scored, a)
                .1
                .total_cmp(&errors_and_loss(scored, b).1)
        })
        .expect("non-empty grid")
}

fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return f64::NAN;
    }
    values[((values.len() - 1) as f64 * q).round() as usize]
}

/// Each key's position among its label's keys, in natural order (numbers as numbers,
/// so `9_100.jpg` comes before `10_100.jpg`).
fn frame_order(rows: &[ImageRow]) -> std::collections::HashMap<String, usize> {
    let natural = |key: &str| -> (Vec<u64>, String) {
        let name = key.rsplit('/').next().unwrap_or(key);
        let numbers = name
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse().ok())
            .collect();
        (numbers, name.to_string())
    };
    let mut by_label: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in rows {
        by_label.entry(&r.label.0).or_default().push(&r.key.0);
    }
    let mut order = std::collections::HashMap::new();
    for keys in by_label.values_mut() {
        keys.sort_by_key(|k| natural(k));
        for (i, k) in keys.iter().enumerate() {
            order.insert(k.to_string(), i);
        }
    }
    order
}

/// Distance quantiles, for the tables: (median, 0.99, 0.995, max).
fn spread(scored: &[Scored]) -> String {
    let mut d: Vec<f64> = scored.iter().map(|s| s.distance).collect();
    format!(
        "{:.2} / {:.2} / {:.2} / {:.2}",
        quantile(&mut d, 0.5),
        quantile(&mut d, 0.99),
        quantile(&mut d, ACCEPT),
        quantile(&mut d, 1.0)
    )
}

fn share(scored: &[Scored], keep: impl Fn(&Scored) -> bool) -> f64 {
    scored.iter().filter(|s| keep(s)).count() as f64 / scored.len().max(1) as f64
}

/// Protocol 1: shrinkage, temperature and threshold chosen on half the labels of
/// Training, then checked on the other half.
fn choose_on_training(
    checkpoint: &Checkpoint,
    rows: &[ImageRow],
    train_dir: &LocalDir,
    embedder: &mut Embedder,
) -> Result<ClassifyConfig> {
    let half =
        |label: &str| fruits_dataflows::record::ImageKey(label.into()).bucket_hash() % 2 == 0;
    // Validation takes whole runs of 25 consecutive files of a label (in frame order),
    // one run in five, not scattered files: a scattered file has near-duplicate
    // neighbours (the next video frame) in the fit, which makes validation look closer
    // than a new photo is (grouped validation, as GroupKFold does for sessions).
    let order = frame_order(rows);
    let held_out = |r: &ImageRow| (order[&r.key.0] / 25) % 5 == 0;
    let mut split = |a: bool| -> Result<(Vec<&ImageRow>, Vec<Photo>, Vec<Photo>)> {
        let fit: Vec<&ImageRow> = rows
            .iter()
            .filter(|r| half(&r.label.0) == a && !held_out(r))
            .collect();
        let (mut clean, mut perturbed) = (Vec::new(), Vec::new());
        for r in rows.iter().filter(|r| half(&r.label.0) == a && held_out(r)) {
            clean.push(Photo {
                label: r.label.0.clone(),
                x: r.embedding.to_f64(),
            });
            let bytes = perturb(&train_dir.read(&r.key)?, seed_of(&r.key.0))?;
            let e = embedder.embed_photo(&bytes)?;
            perturbed.push(Photo {
                label: r.label.0.clone(),
                x: e.to_f64(),
            });
        }
        Ok((fit, clean, perturbed))
    };
    let (fit_a, val_a, pval_a) = split(true)?;
    let (fit_b, val_b, pval_b) = split(false)?;
    let labels_of = |fit: &[&ImageRow]| {
        let mut l: Vec<&str> = fit.iter().map(|r| r.label.0.as_str()).collect();
        l.sort();
        l.dedup();
        l.join(", ")
    };
    println!("\n## Protocol 1: choices on Training only");
    println!(
        "half A (choices): {} fit / {} validation images of {}",
        fit_a.len(),
        val_a.len(),
        labels_of(&fit_a)
    );
    println!(
        "half B (check): {} fit / {} validation images of {}",
        fit_b.len(),
        val_b.len(),
        labels_of(&fit_b)
    );
    let ckpt_a = checkpoint_of(checkpoint, &fit_a);
    let val_a_refs: Vec<&Photo> = val_a.iter().collect();
    let pval_a_refs: Vec<&Photo> = pval_a.iter().collect();
    let novel_refs: Vec<&Photo> = val_b.iter().collect();
    println!("\nhalf A validation, by shrinkage (distances in typical units: median / 0.99 / 0.995 / max; novel = half B's photos, labels never seen):");
    println!("| shrinkage | errors clean | errors perturbed | log-loss perturbed (T = 1) | distance clean | distance perturbed | novel fruit rejected at the clean 0.995 | fit s |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut grid: Vec<Shrinkage> = [0.001, 0.01, 0.03, 0.1, 0.3, 0.6, 0.8, 0.9]
        .iter()
        .map(|&a| Shrinkage::Fixed(a))
        .collect();
    grid.push(Shrinkage::Rule(ShrinkageRule::Oas));
    let mut best: Option<((usize, usize, f64), Shrinkage, Classifier)> = None;
    for shrinkage in grid {
        let t0 = Instant::now();
        let classifier = Classifier::new(
            &ckpt_a,
            ClassifyConfig {
                shrinkage,
                ..Default::default()
            },
        )?;
        let fit_s = t0.elapsed().as_secs_f64();
        let clean = score_all(&classifier, &val_a_refs);
        let perturbed = score_all(&classifier, &pval_a_refs);
        let (errors, _) = errors_and_loss(&clean, 1.0);
        let (perrors, ploss) = errors_and_loss(&perturbed, 1.0);
        let mut d: Vec<f64> = clean.iter().map(|s| s.distance).collect();
        let threshold = quantile(&mut d, ACCEPT);
        let novel = score_all(&classifier, &novel_refs);
        let alpha = classifier.discriminant().map_or(f64::NAN, |d| d.shrinkage);
        println!(
            "| {shrinkage:?} (α = {alpha:.4}) | {errors} | {perrors} | {ploss:.4} | {} | {} | {:.4} | {fit_s:.2} |",
            spread(&clean),
            spread(&perturbed),
            share(&novel, |s| s.distance > threshold)
        );
        let key = (errors, perrors, ploss);
        if best.as_ref().is_none_or(|b| key < b.0) {
            best = Some((key, shrinkage, classifier));
        }
    }
    let (_, shrinkage, classifier) = best.expect("non-empty grid");
    let perturbed = score_all(&classifier, &pval_a_refs);
    let temperature = best_temperature(&perturbed);
    // Accept ACCEPT of the clean validation photos. Perturbed photos are not used here:
    // a heavy crop of a fruit on white is as far from the archive as a non-fruit is, so
    // accepting them would accept nearly everything.
    let mut d: Vec<f64> = score_all(&classifier, &val_a_refs)
        .iter()
        .map(|s| s.distance)
        .collect();
    let unknown_distance = quantile(&mut d, ACCEPT);
    let chosen = ClassifyConfig {
        shrinkage,
        temperature,
        unknown_distance,
        ..Default::default()
    };

    // Half B: labels that took no part in the choices.
    let classifier = Classifier::new(&checkpoint_of(checkpoint, &fit_b), chosen.clone())?;
    for (name, photos) in [("clean", &val_b), ("perturbed", &pval_b)] {
        let refs: Vec<&Photo> = photos.iter().collect();
        let scored = score_all(&classifier, &refs);
        let (errors, loss) = errors_and_loss(&scored, temperature);
        println!(
            "half B {name} validation with the chosen settings: {errors} / {} errors, log-loss {loss:.4}, accepted {:.4}",
            scored.len(),
            share(&scored, |s| s.distance <= unknown_distance)
        );
    }
    let novel = score_all(&Classifier::new(&ckpt_a, chosen.clone())?, &novel_refs);
    println!(
        "half B photos against half A's labels (fruit never seen): {:.4} answered unknown",
        share(&novel, |s| s.distance > unknown_distance)
    );
    Ok(chosen)
}

/// Protocol 2: every method fitted on all of Training, scored on Test.
fn test_protocol(
    checkpoint: &Checkpoint,
    rows: &[ImageRow],
    tests: &[Photo],
    perturbed: &[Photo],
    nonfruit: &[Photo],
    chosen: &ClassifyConfig,
) -> Result<()> {
    println!("\n## Protocol 2: Training → Test");
    let mut variants = vec![
        ("lda (chosen settings)".to_string(), chosen.clone()),
        ("lda (defaults)".to_string(), ClassifyConfig::default()),
        (
            "nearest_mean".to_string(),
            ClassifyConfig {
                method: Method::NearestMean,
                ..chosen.clone()
            },
        ),
    ];
    for m in [1, 3, 10] {
        variants.push((
            format!("knn, {m} per label"),
            ClassifyConfig {
                method: Method::Knn,
                neighbours: m,
                ..chosen.clone()
            },
        ));
    }
    println!("| classifier | top-1 | top-3 | top-1 perturbed | top-3 perturbed | ms/query |");
    println!("|---|---|---|---|---|---|");
    let mut confusion: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (i, (name, config)) in variants.into_iter().enumerate() {
        let classifier = if config.method == Method::Knn {
            Classifier::with_points(checkpoint, rows, config)?
        } else {
            Classifier::new(checkpoint, config)?
        };
        let mut hits = [0usize; 4];
        let started = Instant::now();
        for photo in tests {
            let p = classifier.predict(&photo.x);
            hits[0] += (p.labels[0].label == photo.label) as usize;
            hits[1] += p.labels.iter().take(3).any(|l| l.label == photo.label) as usize;
            if i == 0 {
                *confusion
                    .entry((photo.label.clone(), p.labels[0].label.clone()))
                    .or_default() += 1;
            }
        }
        let ms = started.elapsed().as_secs_f64() * 1000.0 / tests.len() as f64;
        for photo in perturbed {
            let p = classifier.predict(&photo.x);
            hits[2] += (p.labels[0].label == photo.label) as usize;
            hits[3] += p.labels.iter().take(3).any(|l| l.label == photo.label) as usize;
        }
        let (n, np) = (tests.len() as f64, perturbed.len().max(1) as f64);
        println!(
            "| {name} | {:.4} | {:.4} | {:.4} | {:.4} | {ms:.2} |",
            hits[0] as f64 / n,
            hits[1] as f64 / n,
            hits[2] as f64 / np,
            hits[3] as f64 / np,
        );
    }

    let classifier = Classifier::new(checkpoint, chosen.clone())?;
    let test_refs: Vec<&Photo> = tests.iter().collect();
    let perturbed_refs: Vec<&Photo> = perturbed.iter().collect();
    let scored = score_all(&classifier, &test_refs);
    let scored_p = score_all(&classifier, &perturbed_refs);
    for (name, s) in [("Test", &scored), ("perturbed Test", &scored_p)] {
        reliability(name, s, chosen.temperature);
        let (errors, loss) = errors_and_loss(s, chosen.temperature);
        let (_, loss_1) = errors_and_loss(s, 1.0);
        println!(
            "{name}: log-loss {loss:.4} at the chosen temperature, {loss_1:.4} at T = 1 ({errors} errors)"
        );
    }
    println!(
        "\nopen set at unknown_distance {:.3} (distances: median / 0.99 / 0.995 / max):",
        chosen.unknown_distance
    );
    let accept = |s: &Scored| s.distance <= chosen.unknown_distance;
    println!(
        "- Test photos accepted {:.4} ({})",
        share(&scored, accept),
        spread(&scored)
    );
    println!(
        "- perturbed Test photos accepted {:.4} ({})",
        share(&scored_p, accept),
        spread(&scored_p)
    );
    if !nonfruit.is_empty() {
        let refs: Vec<&Photo> = nonfruit.iter().collect();
        let far = score_all(&classifier, &refs);
        let mut d: Vec<f64> = far.iter().map(|s| s.distance).collect();
        println!(
            "- non-fruit photos answered unknown {:.4} of {} (distance min {:.2}, 0.05 {:.2}, median {:.2})",
            share(&far, |s| !accept(s)),
            far.len(),
            quantile(&mut d, 0.0),
            quantile(&mut d, 0.05),
            quantile(&mut d, 0.5)
        );
    }

    println!("\nPer-label results of lda (true label: correct/total, then the labels it was mistaken for):");
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

/// Predicted probability of the top label against how often it is right, in bins.
fn reliability(name: &str, scored: &[Scored], t: f64) {
    let edges = [0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0 + 1e-12];
    let mut bins = vec![(0usize, 0.0f64, 0usize); edges.len() - 1];
    for s in scored {
        let p = posterior(&s.log_posterior, t);
        let top = argmax(&p);
        let b = (0..bins.len())
            .find(|&b| p[top] >= edges[b] && p[top] < edges[b + 1])
            .unwrap_or(bins.len() - 1);
        bins[b].0 += 1;
        bins[b].1 += p[top];
        bins[b].2 += (Some(top) == s.truth) as usize;
    }
    println!("\nReliability of lda's top probability on {name} (temperature {t:.3}):");
    println!("| predicted | photos | mean predicted | observed right |");
    println!("|---|---|---|---|");
    let mut ece = 0.0;
    for (b, (count, sum, right)) in bins.iter().enumerate() {
        if *count == 0 {
            continue;
        }
        let (mean, observed) = (sum / *count as f64, *right as f64 / *count as f64);
        ece += (mean - observed).abs() * *count as f64 / scored.len() as f64;
        println!(
            "| [{:.3}, {:.3}) | {count} | {mean:.4} | {observed:.4} |",
            edges[b],
            edges[b + 1].min(1.0)
        );
    }
    println!("expected calibration error {ece:.4}");
}
