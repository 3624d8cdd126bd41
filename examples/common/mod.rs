//! What the benchmark examples share: the binary beside them, timing a child with its
//! own peak memory, and waiting for an endpoint's first answer.
#![allow(dead_code)] // each example uses a part

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The fruits-flow binary built beside the running example.
pub fn binary() -> Result<PathBuf> {
    let bin = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("fruits-flow"))
        .context("locating target dir")?;
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run `cargo build --release` first",
        bin.display()
    );
    Ok(bin)
}

/// A `/proc/<pid>/status` field of a running child, in MB.
pub fn proc_status_mb(child: &Child, field: &str) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .context("field missing")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

/// Runs `command` to completion; returns (seconds, peak RSS in MB) of the child.
pub fn measure(command: &mut Command) -> Result<(f64, f64)> {
    let m = measure_run(command.stderr(Stdio::null()))?;
    Ok((m.seconds, m.peak_mb))
}

/// What [`measure_run`] saw of a child.
pub struct Measured {
    /// Wall seconds from spawn to exit.
    pub seconds: f64,
    /// Peak RSS (VmHWM), MB.
    pub peak_mb: f64,
    /// User + system CPU seconds (the last sample before exit, polled every 20 ms).
    pub cpu_s: f64,
}

/// Runs `command` to completion (stdout discarded, stderr as the caller set it).
///
/// The peak is the child's VmHWM, polled until it exits: it belongs to the child's own
/// address space (getrusage's ru_maxrss would also count this process's memory, which
/// the child inherits at fork, before its exec).
pub fn measure_run(command: &mut Command) -> Result<Measured> {
    let started = Instant::now();
    let mut child = command.stdout(Stdio::null()).spawn()?;
    let (mut peak, mut cpu) = (0.0f64, 0.0f64);
    let status = loop {
        if let Ok(mb) = proc_status_mb(&child, "VmHWM:") {
            peak = peak.max(mb);
        }
        if let Ok(s) = cpu_seconds(&child) {
            cpu = cpu.max(s);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    anyhow::ensure!(status.success(), "command failed: {command:?}");
    Ok(Measured {
        seconds: started.elapsed().as_secs_f64(),
        peak_mb: peak,
        cpu_s: cpu,
    })
}

/// User + system CPU seconds of a running child.
pub fn cpu_seconds(child: &Child) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{}/stat", child.id()))?;
    let after = &text[text.rfind(')').context("stat")? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// POSTs `body` (a JPEG) to `url` until it is answered 200, or fails after `within`.
pub fn wait_for_classify(
    agent: &ureq::Agent,
    url: &str,
    body: &[u8],
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let ok = agent
            .post(url)
            .header("Content-Type", "image/jpeg")
            .send(body)
            .map(|r| r.status() == 200)
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the endpoint never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the output's published status counts `n` images (at most 15 minutes).
pub fn wait_images(out: &Path, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        if let Ok(bytes) = std::fs::read(out.join("status.json")) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                if v["images"].as_u64() == Some(n as u64) {
                    return Ok(());
                }
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out waiting for {n} images"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
