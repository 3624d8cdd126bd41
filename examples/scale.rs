//! The scale benchmark: how the cost of state grows with the archive. For each size N it
//! builds a synthetic Fruits-360 archive from `../shared/fruits360` (the shared images,
//! their 7 other dihedral variants, flipped and rotated, under new label folders
//! `<Label> v<j>`, then hard links of those under further folders; nothing committed)
//! and prints, at `-w 2`:
//! `run --once` time and peak RSS; time and peak RSS of a restart that adds 100 images,
//! and the bytes two such restarts write (one may be a compaction of the delta log); a restart with nothing new; a tailing process's idle RSS and CPU per
//! poll, and the time from 100 images landing to their publication; `serve` RSS and
//! first-answer time; `classify` time and peak RSS; `export` peak RSS; `replay` time.
//!
//! ```sh
//! cargo build --release --locked --workspace --all-targets
//! cargo run --release --locked --example scale -- --sizes 5000,50000,250000
//! ```
//! Options: `--shared DIR` (default `../shared/fruits360/Training`), `--work DIR`
//! (default `/tmp/fruits-scale`; archives are kept there between runs), `--sizes`.

mod common;

use anyhow::{Context, Result};
use common::{binary, cpu_seconds, measure, proc_status_mb, wait_for_classify, wait_images};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let shared = PathBuf::from(flag("--shared").unwrap_or("../shared/fruits360/Training".into()));
    let work = PathBuf::from(flag("--work").unwrap_or("/tmp/fruits-scale".into()));
    let sizes: Vec<usize> = flag("--sizes")
        .unwrap_or("5000,50000,250000".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(
        shared.is_dir(),
        "{} is missing: the benchmark builds its archives from the shared images",
        shared.display()
    );
    let bin = binary()?;
    let images = originals(&shared)?;
    println!("shared images: {} in {}", images.len(), shared.display());
    let mut table = Vec::new();
    for &n in &sizes {
        println!("\n== N = {n} ==");
        let row = measure_size(&bin, &images, &work, n)?;
        table.push((n, row));
    }
    println!(
        "\n| what | {} |",
        sizes
            .iter()
            .map(|n| format!("{n} images"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---|".repeat(sizes.len()));
    let names: Vec<String> = table[0].1.iter().map(|(k, _)| k.clone()).collect();
    for (i, name) in names.iter().enumerate() {
        let cells: Vec<&str> = table.iter().map(|(_, r)| r[i].1.as_str()).collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    Ok(())
}

/// The shared images as (label, path), sorted.
fn originals(shared: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for label in std::fs::read_dir(shared)? {
        let label = label?.path();
        if !label.is_dir() {
            continue;
        }
        let name = label.file_name().unwrap().to_string_lossy().to_string();
        for image in std::fs::read_dir(&label)? {
            let image = image?.path();
            if image.extension().is_some_and(|e| e == "jpg") {
                out.push((name.clone(), image));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes the `variant`-th copy of `image` to `to`: variants 0-7 are the dihedral
/// transforms (0 the original bytes), later ones hard links of variant `v % 8`.
fn write_variant(image: &Path, variant: usize, to: &Path, first_copy: &Path) -> Result<()> {
    if variant >= 8 {
        std::fs::hard_link(first_copy, to)?;
        return Ok(());
    }
    if variant == 0 {
        std::fs::copy(image, to)?;
        return Ok(());
    }
    let img = image::open(image)?.to_rgb8();
    let t = match variant {
        1 => image::imageops::flip_horizontal(&img),
        2 => image::imageops::flip_vertical(&img),
        3 => image::imageops::rotate90(&img),
        4 => image::imageops::rotate180(&img),
        5 => image::imageops::rotate270(&img),
        6 => image::imageops::flip_horizontal(&image::imageops::rotate90(&img)),
        _ => image::imageops::flip_vertical(&image::imageops::rotate90(&img)),
    };
    t.save_with_format(to, image::ImageFormat::Jpeg)?;
    Ok(())
}

/// The synthetic archive of `n` images under `root` (built once, reused), returning
/// the keys of every image, in the order they were made.
fn archive(images: &[(String, PathBuf)], root: &Path, n: usize) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::with_capacity(n);
    // The stamp holds the size it was completed at: a larger request makes the rest.
    let stamp = root.join(".complete");
    let complete = std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == n.to_string());
    for i in 0..n {
        let variant = i / images.len();
        let (label, image) = &images[i % images.len()];
        let name = image.file_name().unwrap();
        let dir = root.join(format!("{label} v{variant}"));
        let to = dir.join(name);
        if !complete {
            std::fs::create_dir_all(&dir)?;
            let first = root.join(format!("{label} v{}", variant % 8)).join(name);
            if !to.exists() {
                write_variant(image, variant, &to, &first)
                    .with_context(|| format!("making {}", to.display()))?;
            }
        }
        paths.push(to);
    }
    std::fs::write(&stamp, n.to_string())?;
    Ok(paths)
}

type Row = Vec<(String, String)>;

fn measure_size(bin: &Path, images: &[(String, PathBuf)], work: &Path, n: usize) -> Result<Row> {
    let mut row: Row = Vec::new();
    let put = |row: &mut Row, k: &str, v: String| {
        println!("{k}: {v}");
        row.push((k.to_string(), v));
    };
    let made = Instant::now();
    let all = archive(images, &work.join(format!("all-{n}")), n + 300)?;
    println!(
        "archive of {} images ready in {:.1} s",
        all.len(),
        made.elapsed().as_secs_f64()
    );
    // The run's source: all but the last 300 (landed 100 at a time below), as links.
    let source = work.join(format!("source-{n}"));
    let out = work.join(format!("out-{n}"));
    let _ = std::fs::remove_dir_all(&source);
    let _ = std::fs::remove_dir_all(&out);
    let link = |p: &Path| -> Result<()> {
        let rel = p.strip_prefix(work.join(format!("all-{n}")))?;
        let to = source.join(rel);
        std::fs::create_dir_all(to.parent().unwrap())?;
        std::fs::hard_link(p, &to)?;
        Ok(())
    };
    for p in &all[..n] {
        link(p)?;
    }
    let run = |extra: &[&str]| {
        let mut c = Command::new(bin);
        c.args(["run", "--once", "-w", "2", "--source"])
            .arg(&source)
            .arg("--output")
            .arg(&out)
            .args(extra)
            .env("RUST_LOG", "warn");
        c
    };
    let (s, rss) = measure(&mut run(&[]))?;
    put(
        &mut row,
        "`run --once -w 2`: time, peak RSS",
        format!("{s:.1} s ({:.0} images/s), {rss:.0} MB", n as f64 / s),
    );

    // +100 images by a restart, twice: bytes written, time, RSS. Two epochs, because one
    // may be where the delta log compacts (its base and statistics files rewritten: O(archive),
    // amortised over the epochs since the last compaction), which the files written say.
    let mut epochs = Vec::new();
    let mut restart = String::new();
    for batch in [n..n + 100, n + 100..n + 200] {
        for p in &all[batch] {
            link(p)?;
        }
        std::thread::sleep(Duration::from_millis(20));
        let since = std::time::SystemTime::now();
        let (s, rss) = measure(&mut run(&[]))?;
        let (total, state, compacted) = written_since(&out, since)?;
        if restart.is_empty() {
            restart = format!("{s:.2} s, {rss:.0} MB");
        }
        epochs.push(format!(
            "{:.2} MB ({:.2} MB{})",
            total as f64 / 1e6,
            state as f64 / 1e6,
            if compacted { ", a compaction" } else { "" }
        ));
    }
    put(&mut row, "restart + 100 images: time, peak RSS", restart);
    put(
        &mut row,
        "bytes written for a 100-image epoch, two in a row (of which state/)",
        epochs.join("; "),
    );
    let (s, rss) = measure(&mut run(&[]))?;
    put(
        &mut row,
        "restart with nothing new (resume + list)",
        format!("{s:.2} s, {rss:.0} MB"),
    );

    // A tailing process: idle RSS and CPU per poll, then 100 images landing.
    let mut tail = Command::new(bin)
        .args(["run", "-w", "2", "--source"])
        .arg(&source)
        .arg("--output")
        .arg(&out)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> Result<()> {
        std::thread::sleep(Duration::from_secs(4));
        let cpu0 = cpu_seconds(&tail)?;
        let idle = Duration::from_secs(10);
        std::thread::sleep(idle);
        let cpu = cpu_seconds(&tail)? - cpu0;
        let polls = idle.as_secs_f64() / 2.0;
        put(
            &mut row,
            "tailing, idle: RSS, CPU per 2 s poll",
            format!(
                "{:.0} MB, {:.3} CPU-s ({:.1} % of a core)",
                rss_mb(&tail)?,
                cpu / polls,
                cpu / idle.as_secs_f64() * 100.0
            ),
        );
        let landed = Instant::now();
        for p in &all[n + 200..n + 300] {
            link(p)?;
        }
        wait_images(&out, n + 300)?;
        put(
            &mut row,
            "tailing: 100 images landed -> published",
            format!("{:.2} s", landed.elapsed().as_secs_f64()),
        );
        put(
            &mut row,
            "tailing: peak RSS",
            format!("{:.0} MB", hwm_mb(&tail)?),
        );
        Ok(())
    })();
    let _ = tail.kill();
    let _ = tail.wait();
    result?;

    let (rss, first) = serve(bin, &out, &all[0])?;
    put(
        &mut row,
        "`serve`: RSS, time to first answer",
        format!("{rss:.0} MB, {first:.2} s"),
    );
    let (s, rss) = measure(
        Command::new(bin)
            .args(["classify", "--output"])
            .arg(&out)
            .arg(&all[0]),
    )?;
    put(
        &mut row,
        "`classify` one photo: time, peak RSS",
        format!("{s:.2} s, {rss:.0} MB"),
    );
    let csv = work.join(format!("export-{n}.csv"));
    let parquet = work.join(format!("export-{n}.parquet"));
    let (s, rss) = measure(
        Command::new(bin)
            .args(["export", "--output"])
            .arg(&out)
            .arg("--csv")
            .arg(&csv)
            .arg("--parquet")
            .arg(&parquet),
    )?;
    put(
        &mut row,
        "`export --csv --parquet`: time, peak RSS",
        format!("{s:.1} s, {rss:.0} MB"),
    );
    let _ = std::fs::remove_file(&csv);
    let _ = std::fs::remove_file(&parquet);
    let (s, rss) = measure(Command::new(bin).args(["replay", "--output"]).arg(&out))?;
    put(
        &mut row,
        "`replay`: time, peak RSS",
        format!(
            "{s:.1} s ({:.0} images/s), {rss:.0} MB",
            (n + 300) as f64 / s
        ),
    );
    let state: u64 = dir_bytes(&out.join("state"))?;
    put(
        &mut row,
        "state/ on disk",
        format!("{:.1} MB", state as f64 / 1e6),
    );
    Ok(row)
}

/// Bytes of files under `dir` modified at or after `since` (all, and under state/).
/// Bytes of the files under `dir` written since `since`, of those under `state/`, and
/// whether a compaction (a new ledger base) was among them.
fn written_since(dir: &Path, since: std::time::SystemTime) -> Result<(u64, u64, bool)> {
    let (mut total, mut state, mut compacted) = (0, 0, false);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let meta = e.metadata()?;
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.modified()? >= since {
                total += meta.len();
                if e.path().starts_with(dir.join("state")) {
                    state += meta.len();
                    compacted |= e.file_name().to_string_lossy().starts_with("base-");
                }
            }
        }
    }
    Ok((total, state, compacted))
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        total += e?.metadata()?.len();
    }
    Ok(total)
}

/// Starts `serve`, POSTs `image` until it answers; returns (RSS MB, seconds to it).
fn serve(bin: &Path, out: &Path, image: &Path) -> Result<(f64, f64)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let started = Instant::now();
    let mut server = Command::new(bin)
        .args(["serve", "--output"])
        .arg(out)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::null())
        .spawn()?;
    let body = std::fs::read(image)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("http://127.0.0.1:{port}/classify");
    let result = (|| {
        wait_for_classify(&agent, &url, &body, Duration::from_secs(300))?;
        let first = started.elapsed().as_secs_f64();
        Ok((rss_mb(&server)?, first))
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}

fn rss_mb(child: &Child) -> Result<f64> {
    proc_status_mb(child, "VmRSS:")
}

fn hwm_mb(child: &Child) -> Result<f64> {
    proc_status_mb(child, "VmHWM:")
}
