//! Classify latency over loopback: starts `fruits-flow serve` on an output, POSTs a
//! 100x100 JPEG N times (one at a time, a real HTTP client), prints p50/p95/max.
//!
//! ```sh
//! cargo run --release --example classify_latency -- OUT [IMAGE.jpg] [N]
//! ```

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let output = args.first().map_or("out", |s| s.as_str()).to_string();
    let image = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "tests/fixtures/fruits/Kiwi 1/0_100.jpg".into());
    let n: usize = args.get(2).map_or(Ok(200), |s| s.parse())?;
    let bin = common::binary()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut server = Command::new(bin)
        .args([
            "serve",
            "--output",
            &output,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stderr(Stdio::null())
        .spawn()?;
    let body = std::fs::read(&image)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("http://127.0.0.1:{port}/classify");
    // Wait for the models to load.
    common::wait_for_classify(&agent, &url, &body, Duration::from_secs(120))?;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let mut response = agent
            .post(&url)
            .header("Content-Type", "image/jpeg")
            .send(&body[..])?;
        let _ = response.body_mut().read_to_string()?;
        anyhow::ensure!(response.status() == 200, "status {}", response.status());
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = server.kill();
    let _ = server.wait();
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    println!(
        "classify over loopback ({} requests, {}): p50 {:.2} ms, p95 {:.2} ms, max {:.2} ms",
        n,
        image,
        at(0.5),
        at(0.95),
        times[times.len() - 1]
    );
    Ok(())
}
