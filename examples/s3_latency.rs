//! Measures the time from a new image landing in S3 to its statistics being published,
//! against a `fruits-flow run` that is tailing the source. Prints p50/p95.
//!
//! `cargo run --release --example s3_latency -- ENDPOINT s3://bucket/archive s3://bucket/out IMAGE [SAMPLES]`
//! (credentials from the usual AWS_* variables).

use fruits_dataflows::io::S3Config;
use fruits_dataflows::sink::{s3::S3Store, OutputStore};
use std::time::{Duration, Instant};

fn images(store: &S3Store) -> i64 {
    store
        .get("status.json")
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|s| s["images"].as_i64())
        .unwrap_or(-1)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 5,
        "usage: s3_latency ENDPOINT SOURCE_URL OUTPUT_URL IMAGE [SAMPLES]"
    );
    let config = S3Config {
        endpoint: Some(args[1].clone()),
        path_style: true,
        ..Default::default()
    };
    let (source, output) = (
        S3Store::open(&args[2], &config)?,
        S3Store::open(&args[3], &config)?,
    );
    let bytes = std::fs::read(&args[4])?;
    let samples: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(20);
    let mut latencies = Vec::new();
    for i in 0..samples {
        let before = images(&output);
        let landed = Instant::now();
        source.put(
            &format!("Latency 1/probe_{i}_{}.jpg", std::process::id()),
            &bytes,
        )?;
        while images(&output) <= before {
            anyhow::ensure!(
                landed.elapsed() < Duration::from_secs(120),
                "no publication within 120 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        latencies.push(landed.elapsed().as_secs_f64());
        // Land the next image at a random phase of the poll cycle.
        std::thread::sleep(Duration::from_millis(100 + (i as u64 * 737) % 1900));
    }
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    println!("samples: {}", latencies.len());
    println!(
        "landing -> published: p50 {:.2} s, p95 {:.2} s, max {:.2} s",
        pick(0.5),
        pick(0.95),
        pick(1.0)
    );
    Ok(())
}
