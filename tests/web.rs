//! The web page: `serve` answers `GET /`, `GET /api/map` and `GET /thumb`; the page is
//! driven in a real browser (Debian's headless Chromium, through playwright-core:
//! tests/browser/page.mjs); `/thumb` reads only keys of the map's sample, whatever the
//! request says.

use crate::util::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn serve(output: &Path, port: u16) -> Guard {
    Guard(
        bin()
            .args(["serve", "--output", output.to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--map-every", "0"])
            .arg("--model")
            .arg(model())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// One raw HTTP/1.1 GET, the target sent exactly as given (no client normalises it):
/// (status, content type, body).
fn raw_get(port: u16, target: &str) -> (u16, String, Vec<u8>) {
    try_get(port, target).unwrap_or_else(|| panic!("no HTTP answer to {target}"))
}

fn try_get(port: u16, target: &str) -> Option<(u16, String, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let split = reply.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&reply[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line for {target}: {head}"));
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let mut body = reply[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Some((status, content_type, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..line]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[line + 2..line + 2 + size]);
        b = &b[line + 2 + size + 2..];
    }
}

fn get_json(port: u16, target: &str) -> Option<Value> {
    let (status, _, body) = try_get(port, target)?;
    (status == 200).then(|| serde_json::from_slice(&body).ok())?
}

/// Waits for the map (and its t-SNE) of `points` points.
fn wait_map(port: u16, points: usize) -> Value {
    wait_until(
        "the map",
        || get_json(port, "/api/map"),
        |m| m["keys"].as_array().is_some_and(|k| k.len() == points) && !m["tsne"].is_null(),
    );
    get_json(port, "/api/map").unwrap()
}

fn metric(port: u16, name: &str) -> f64 {
    let (_, _, body) = raw_get(port, "/metrics");
    let text = String::from_utf8(body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn first_fixture(label: &str) -> PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(fixtures().join(label))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files[0].clone()
}

#[test]
fn the_page_map_and_thumbnails_are_served_and_thumbnails_read_only_sampled_keys() {
    let out = tempfile::tempdir().unwrap();
    run_once(&fixtures(), out.path(), &[]);
    let port = free_port();
    let _server = serve(out.path(), port);
    let map = wait_map(port, 40);

    // The page: one HTML document, nothing from elsewhere.
    let (status, content_type, page) = raw_get(port, "/");
    let page = String::from_utf8(page).unwrap();
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(page.starts_with("<!DOCTYPE html>") && page.contains("window.__DATA = null"));
    // Nothing loads from elsewhere (the one URL is SVG's namespace name).
    let rest = page.replace("http://www.w3.org/2000/svg", "");
    assert!(!rest.contains("http://") && !rest.contains("https://"));

    // The map: every live image (40 < the sample size), labels, table, both projections.
    assert_eq!(map["images"], 40);
    assert_eq!(map["labels"].as_array().unwrap().len(), 4);
    assert_eq!(map["pc"]["xy"].as_array().unwrap().len(), 80);
    assert_eq!(map["tsne"]["xy"].as_array().unwrap().len(), 80);
    let table: u64 = map["table"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[2].as_u64().unwrap())
        .sum();
    assert_eq!(table, 40);
    assert_eq!(map["epoch"], crate::util::status(out.path())["epoch"]);

    // A sampled key: its bytes, as an image.
    let key = map["keys"][0].as_str().unwrap().to_string();
    let (status, content_type, body) = raw_get(port, &format!("/thumb?key={}", encode(&key)));
    assert_eq!((status, content_type.as_str()), (200, "image/jpeg"));
    assert_eq!(body, std::fs::read(fixtures().join(&key)).unwrap());
    assert_eq!(metric(port, "fruits_thumbnails_read_total"), 1.0);

    // Everything else: 4xx, and not one more read of anything.
    let absolute = fixtures().join(&key).display().to_string();
    let (label, name) = key.split_once('/').unwrap();
    let refused: Vec<(String, u16)> = vec![
        ("/thumb".into(), 400),
        ("/thumb?key=".into(), 404),
        ("/thumb?path=x".into(), 400),
        ("/thumb?key=../../Cargo.toml".into(), 404),
        ("/thumb?key=..%2F..%2FCargo.toml".into(), 404),
        ("/thumb?key=%2E%2E%2F%2E%2E%2FCargo.toml".into(), 404),
        ("/thumb?key=/etc/passwd".into(), 404),
        ("/thumb?key=%2Fetc%2Fpasswd".into(), 404),
        (format!("/thumb?key={}", encode(&absolute)), 404),
        (
            format!(
                "/thumb?key={}",
                encode(&format!("{label}/../../../Cargo.toml"))
            ),
            404,
        ),
        (
            format!(
                "/thumb?key={}",
                encode(&format!("{label}\\..\\..\\Cargo.toml"))
            ),
            404,
        ),
        // Double-encoded: decodes once, to text with a literal %2F: not a key.
        (
            format!("/thumb?key={}%252F{}", encode(label), encode(name)),
            404,
        ),
        (format!("/thumb?key={}%00", encode(&key)), 404),
        (format!("/thumb?key={}/", encode(&key)), 404),
        (format!("/thumb?key=./{}", encode(&key)), 404),
        ("/thumb?key=%zz".into(), 400),
        ("/thumb?key=%C0%AF".into(), 400),
        (format!("/thumb?key={0}&key={0}", encode(&key)), 400),
        ("/thumb/..%2F..%2FCargo.toml".into(), 404),
        ("/thumb/../../Cargo.toml".into(), 404),
        (format!("/thumb/{}", encode(&key)), 404),
    ];
    for (target, expected) in &refused {
        let (status, _, body) = raw_get(port, target);
        assert_eq!(
            status,
            *expected,
            "{target}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    assert_eq!(
        metric(port, "fruits_thumbnails_read_total"),
        1.0,
        "a refused request read the archive"
    );
    assert!(metric(port, "fruits_thumbnails_refused_total") >= 15.0);
}

/// What the browser test needs, or a clear message naming the setup step.
fn browser_tools() -> (PathBuf, PathBuf) {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        chromium.exists(),
        "{} is missing: the browser test needs Debian's chromium (scripts/setup installs it: apt-get install chromium)",
        chromium.display()
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "node is missing: the browser test needs Node.js and npm (scripts/setup installs them)"
    );
    let script = root().join("tests/browser/page.mjs");
    assert!(
        root()
            .join("tests/browser/node_modules/playwright-core")
            .exists(),
        "tests/browser/node_modules is missing: run scripts/setup (npm ci in tests/browser)"
    );
    (chromium, script)
}

#[test]
fn the_page_works_in_a_real_browser_and_follows_new_epochs() {
    let (chromium, script) = browser_tools();
    let source = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    copy_fixtures(source.path(), 0..8);
    run_once(source.path(), out.path(), &[]);
    // The report's offline copy of the page, of the same state.
    let site = tempfile::tempdir().unwrap();
    let html = site.path().join("index.html");
    let report = bin()
        .args(["report", "--output", out.path().to_str().unwrap(), "--html"])
        .arg(&html)
        .output()
        .unwrap();
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let port = free_port();
    let _server = serve(out.path(), port);
    wait_map(port, 32);

    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-page.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut node = Command::new("node")
        .arg(&script)
        .args([
            "--url",
            &format!("http://127.0.0.1:{port}/"),
            "--points",
            "32",
        ])
        .arg("--drop")
        .arg(first_fixture("Banana 1"))
        .args(["--drop-label", "Banana 1", "--pick"])
        .arg(first_fixture("Strawberry 1"))
        .args(["--pick-label", "Strawberry 1", "--screenshot"])
        .arg(&screenshot)
        .args(["--then-points", "40", "--report"])
        .arg(format!("file://{}", html.display()))
        .args(["--report-points", "32"])
        .env("CHROMIUM", &chromium)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = node.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut s);
        s
    });
    let mut log = String::new();
    for line in BufReader::new(node.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line == "WAITING_FOR_EPOCH" {
            // A new epoch lands while the page is open: 8 more images.
            copy_fixtures(source.path(), 8..10);
            run_once(source.path(), out.path(), &[]);
        }
    }
    let status = node.wait().unwrap();
    let errors = errors.join().unwrap();
    assert!(
        status.success(),
        "the browser test failed:\n{log}\n{errors}"
    );
    for needle in [
        "ok - served page: 32 points",
        "hovering point",
        "a dropped photo shows its label: Banana 1",
        "a chosen file shows its label: Strawberry 1",
        "the page followed the pipeline",
        "ok - the report page (offline): 32 points",
        "ok - no console errors",
    ] {
        assert!(log.contains(needle), "{needle} missing from:\n{log}");
    }
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    eprintln!("screenshot: {}", screenshot.display());
}
