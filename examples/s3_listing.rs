//! LIST requests per poll when tailing an S3 archive: serves a Fruits-360 directory through
//! s3s-fs (the S3 server the tests use, on loopback), ingests it with `run` tailing the
//! bucket, then counts the LIST requests (`fruits_list_requests` in `/metrics`) over idle
//! polls, next to what relisting every object every poll would send.
//!
//! ```sh
//! cargo build --release --locked --workspace --all-targets
//! target/release/examples/s3_listing /tmp/fruits-scale/source-5000 --polls 60
//! ```
//! The directory is hard-linked into the server's root (nothing is copied); `--polls N`
//! idle polls of 1 s are counted (default 60: two cycles of `full_listing_every = 30`).

mod common;

use anyhow::{Context, Result};
use common::{binary, wait_images};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "fruitsflowbench";
const SECRET: &str = "bench-secret-not-logged";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let source = PathBuf::from(args.first().context("usage: s3_listing DIR [--polls N]")?);
    let polls: u64 = args
        .iter()
        .position(|a| a == "--polls")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(60), |s| s.parse())?;
    let bin = binary()?;
    let work = tempfile::tempdir()?;
    let root = work.path().join("root");
    std::fs::create_dir_all(&root)?;
    // The bucket is the directory, hard-linked.
    let status = Command::new("cp")
        .arg("-al")
        .arg(&source)
        .arg(root.join("fruit"))
        .status()?;
    anyhow::ensure!(status.success(), "cp -al {} failed", source.display());
    let (objects, folders) = count(&root.join("fruit"))?;
    println!("archive: {objects} objects in {folders} label folders");

    let port = free_port()?;
    let mut server = KillOnDrop(
        Command::new(s3s_fs()?)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", KEY, "--secret-key", SECRET])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_port(port)?;
    let config = work.path().join("poll.toml");
    std::fs::write(&config, "[source]\npoll_interval_ms = 1000\n")?;
    let out = work.path().join("out");
    let metrics_port = free_port()?;
    let mut run = KillOnDrop(
        Command::new(&bin)
            .args(["run", "-w", "2", "--source", "s3://fruit", "--output"])
            .arg(&out)
            .arg("--config")
            .arg(&config)
            .args(["--s3-endpoint", &format!("http://127.0.0.1:{port}")])
            .arg("--s3-path-style")
            .args(["--serve", &format!("127.0.0.1:{metrics_port}")])
            .env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_REGION", "us-east-1")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    let started = Instant::now();
    wait_images(&out, objects)?;
    println!(
        "ingested over S3 in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let before = list_requests(&url)?;
    std::thread::sleep(Duration::from_secs(polls));
    let after = list_requests(&url)?;
    let per_poll = (after - before) as f64 / polls as f64;
    // Relisting everything: the top level plus every folder's pages.
    let everything = 1.0 + folders as f64 + (objects as f64 / 1000.0).floor();
    println!(
        "LIST requests per idle poll: {per_poll:.1} over {polls} polls \
         (relisting every object every poll: at least {everything:.0})"
    );
    println!(
        "per day at a 2 s poll: {:.0} (relisting everything: {:.0})",
        per_poll * 43_200.0,
        everything * 43_200.0
    );
    let _ = run.0.kill();
    let _ = server.0.kill();
    Ok(())
}

/// Objects and label folders under `dir`.
fn count(dir: &Path) -> Result<(usize, usize)> {
    let (mut objects, mut folders) = (0, 0);
    for folder in std::fs::read_dir(dir)? {
        let folder = folder?;
        if folder.file_type()?.is_dir() {
            folders += 1;
            objects += std::fs::read_dir(folder.path())?.count();
        }
    }
    Ok((objects, folders))
}

/// The `fruits_list_requests` counter at `url`.
fn list_requests(url: &str) -> Result<u64> {
    let text = ureq::get(url).call()?.body_mut().read_to_string()?;
    text.lines()
        .find(|l| l.starts_with("fruits_list_requests"))
        .and_then(|l| l.split_whitespace().last())
        .context("no fruits_list_requests in /metrics")?
        .parse()
        .context("parsing fruits_list_requests")
}

/// s3s-fs, where `scripts/setup` installs it, or on PATH.
fn s3s_fs() -> Result<PathBuf> {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    let installed = home.join("bin/s3s-fs");
    Ok(if installed.exists() {
        installed
    } else {
        PathBuf::from("s3s-fs")
    })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "s3s-fs did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
