//! classify and serve end to end: the CLI names fixture fruits; the HTTP endpoint,
//! driven by a real HTTP client over loopback, answers good images, refuses malformed
//! ones with clear 4xx errors and never falls over; inside a tailing `run`, a new label
//! folder becomes answerable without a restart.

use crate::util::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// POSTs `body` to /classify; returns (status, JSON body).
fn post(port: u16, content_type: &str, body: &[u8]) -> (u16, Value) {
    let mut response = agent()
        .post(format!("http://127.0.0.1:{port}/classify"))
        .header("Content-Type", content_type)
        .send(body)
        .unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json)
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut response = agent()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .call()
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.body_mut().read_to_string().ok()?))
}

fn wait_ready(port: u16) {
    wait_until(
        "the endpoint to load models",
        || {
            get(port, "/status")
                .filter(|(s, _)| *s == 200)
                .map(|(_, b)| serde_json::from_str(&b).unwrap())
        },
        |_| true,
    );
}

fn serve(output: &Path, port: u16) -> Guard {
    Guard(
        bin()
            .args(["serve", "--output", output.to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--model"])
            .arg(model())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn fixture(label: &str, n: usize) -> std::path::PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(fixtures().join(label))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files[n].clone()
}

/// The in-repo photos that are not fruit (tests/fixtures/nonfruit).
fn nonfruit() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nonfruit");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 4,
        "tests/fixtures/nonfruit holds the non-fruit photos"
    );
    files
}

#[test]
fn classify_command_names_fixture_fruits_and_reports_bad_files() {
    let out = tempfile::tempdir().unwrap();
    run_once(&fixtures(), out.path(), &[]);
    let bad = out.path().join("not-a-photo.jpg");
    std::fs::write(&bad, b"hello").unwrap();
    let images = [fixture("Banana 1", 3), fixture("Kiwi 1", 8)];
    let result = bin()
        .args([
            "classify",
            "--json",
            "--output",
            out.path().to_str().unwrap(),
            "--model",
        ])
        .arg(model())
        .args(&images)
        .arg(&bad)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}\n{stderr}");
    for (line, label) in lines.iter().zip(["Banana 1", "Kiwi 1"]) {
        assert_eq!(line["labels"][0]["label"], label, "{line}");
        assert_eq!(line["answer"], label, "{line}");
        assert_eq!(line["known"], true, "{line}");
        assert_eq!(line["labels"].as_array().unwrap().len(), 3);
        assert!(line["cluster"].as_u64().unwrap() < 10);
        assert_eq!(line["model_epoch"], status(out.path())["epoch"]);
    }
    assert!(
        !result.status.success(),
        "a bad image must fail the command"
    );
    assert!(stderr.contains("not-a-photo.jpg"), "{stderr}");
}

#[test]
fn endpoint_classifies_refuses_malformed_input_and_survives() {
    let out = tempfile::tempdir().unwrap();
    run_once(&fixtures(), out.path(), &[]);
    let port = free_port();
    let _server = serve(out.path(), port);
    wait_ready(port);

    // A real photo of each label is named correctly.
    for label in ["Apple Golden 1", "Banana 1", "Kiwi 1", "Strawberry 1"] {
        let (status, body) = post(
            port,
            "image/jpeg",
            &std::fs::read(fixture(label, 5)).unwrap(),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["labels"][0]["label"], label, "{body}");
        let score = body["labels"][0]["score"].as_f64().unwrap();
        assert!(score > 0.0 && score <= 1.0);
        assert!(body["cluster"].is_u64());
        assert_eq!(body["model_epoch"], status_epoch(out.path()));
    }

    // Malformed requests get clear 4xx answers.
    let jpeg = std::fs::read(fixture("Kiwi 1", 0)).unwrap();
    let png = {
        let mut bytes = Vec::new();
        image::RgbImage::new(8, 8)
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
        bytes
    };
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        ("empty body", "image/jpeg", Vec::new(), 400),
        (
            "text body",
            "image/jpeg",
            b"this is not a photo".to_vec(),
            415,
        ),
        ("PNG body", "image/jpeg", png, 415),
        (
            "wrong content type",
            "application/json",
            b"{}".to_vec(),
            415,
        ),
        (
            "truncated JPEG",
            "image/jpeg",
            jpeg[..jpeg.len() / 3].to_vec(),
            422,
        ),
        (
            "JPEG signature then garbage",
            "image/jpeg",
            [&[0xFF, 0xD8, 0xFF][..], &[7u8; 500]].concat(),
            422,
        ),
    ];
    for (what, content_type, body, expected) in cases {
        let (status, answer) = post(port, content_type, &body);
        assert_eq!(status, expected, "{what}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {answer}"
        );
    }
    let (status, _) = get(port, "/nowhere").unwrap();
    assert_eq!(status, 404);

    // The formats phones send: the same photo as PNG and as WebP names the same fruit;
    // a GIF is refused with 415 naming the formats accepted.
    let photo = image::load_from_memory(&std::fs::read(fixture("Banana 1", 4)).unwrap()).unwrap();
    for (format, mime) in [
        (image::ImageFormat::Png, "image/png"),
        (image::ImageFormat::WebP, "image/webp"),
    ] {
        let mut bytes = Vec::new();
        photo
            .write_to(&mut std::io::Cursor::new(&mut bytes), format)
            .unwrap();
        for content_type in [mime, "application/octet-stream"] {
            let (status, body) = post(port, content_type, &bytes);
            assert_eq!(status, 200, "{mime} as {content_type}: {body}");
            assert_eq!(body["labels"][0]["label"], "Banana 1", "{mime}: {body}");
            assert_eq!(body["known"], true, "{mime}: {body}");
        }
    }
    let (status, body) = post(port, "image/gif", b"GIF89a\x01\0\x01\0\0\0\0;");
    assert_eq!(status, 415, "{body}");
    let (status, body) = post(
        port,
        "application/octet-stream",
        b"GIF89a\x01\0\x01\0\0\0\0;",
    );
    assert_eq!(status, 415, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("JPEG, PNG or WebP"),
        "{body}"
    );

    // Photos that are not fruit are answered `unknown`, with the labels still listed.
    for path in nonfruit() {
        let (status, body) = post(port, "image/jpeg", &std::fs::read(&path).unwrap());
        assert_eq!(status, 200, "{}: {body}", path.display());
        assert_eq!(body["known"], false, "{}: {body}", path.display());
        assert_eq!(body["answer"], "unknown", "{}: {body}", path.display());
        assert_eq!(body["labels"].as_array().unwrap().len(), 3, "{body}");
    }
    // An 11 MB body: refused with 413 (the server may stop reading early, so the body
    // is written from another thread and write errors are expected).
    let reply = raw_exchange(port, &[&jpeg[..], &vec![0u8; 11 << 20][..]].concat());
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");

    // Garbage of every shape never gets a 5xx, and the endpoint still answers after it.
    let mut seed = 12345u64;
    for i in 0..150 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = (seed >> 40) as usize % 3000;
        let mut body: Vec<u8> = (0..len)
            .map(|j| ((seed >> (j % 56)) as u8) ^ j as u8)
            .collect();
        if i % 2 == 0 {
            // Keep real JPEG headers and corrupt what follows.
            body = [&jpeg[..jpeg.len().min(200 + len)], &body[..]].concat();
        }
        let (status, answer) = post(port, "image/jpeg", &body);
        assert!((200..500).contains(&status), "body {i}: {status} {answer}");
    }
    // Raw protocol abuse: a lying Content-Length and a broken request line.
    for raw in [
        &b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 999999\r\n\r\nshort"[..],
        &b"GARBAGE\r\n\r\n"[..],
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(raw).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
    }
    let (status, body) = post(port, "image/jpeg", &jpeg);
    assert_eq!(
        (status, body["labels"][0]["label"].as_str()),
        (200, Some("Kiwi 1"))
    );

    // Status and metrics.
    let (status, body) = get(port, "/status").unwrap();
    assert_eq!(status, 200);
    let status_json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status_json["images"], 40);
    let (status, metrics) = get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("fruits_state_images 40"), "{metrics}");
    assert!(
        metrics.contains("fruits_http_requests_total{endpoint=\"classify\",status=\"415\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fruits_classify_seconds_count"),
        "{metrics}"
    );
}

/// Sends a JPEG POST over a raw socket, writing the body from another thread; returns
/// what the server answered.
fn raw_exchange(port: u16, body: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut writer = s.try_clone().unwrap();
    let body = [head.as_bytes(), body].concat();
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&body);
    });
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = sender.join();
    String::from_utf8_lossy(&reply).into_owned()
}

fn status_epoch(output: &Path) -> Value {
    status(output)["epoch"].clone()
}

#[test]
fn a_new_label_folder_becomes_answerable_inside_a_running_pipeline() {
    let source = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    copy_fixtures(source.path(), 0..10);
    // Hold one label back: it arrives while the pipeline runs.
    let held = tempfile::tempdir().unwrap();
    std::fs::rename(
        source.path().join("Strawberry 1"),
        held.path().join("Strawberry 1"),
    )
    .unwrap();
    let settings = tempfile::tempdir().unwrap();
    let config = tail_config(&settings.path().join("tail.toml"), 300, 64).to_path_buf();
    let port = free_port();
    let _run = Guard(
        run_command(
            source.path().to_str().unwrap(),
            out.path().to_str().unwrap(),
            false,
        )
        .args([
            "--config",
            config.to_str().unwrap(),
            "--serve",
            &format!("127.0.0.1:{port}"),
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    wait_ready(port);
    let strawberry = std::fs::read(
        held.path().join("Strawberry 1").join(
            std::fs::read_dir(held.path().join("Strawberry 1"))
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .file_name(),
        ),
    )
    .unwrap();
    let (status, before) = post(port, "image/jpeg", &strawberry);
    assert_eq!(status, 200);
    assert_ne!(before["labels"][0]["label"], "Strawberry 1");

    // The folder lands; without any restart the endpoint learns the label.
    std::fs::rename(
        held.path().join("Strawberry 1"),
        source.path().join("Strawberry 1"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, answer) = post(port, "image/jpeg", &strawberry);
        if status == 200 && answer["labels"][0]["label"] == "Strawberry 1" {
            assert!(
                answer["model_epoch"].as_u64().unwrap() > before["model_epoch"].as_u64().unwrap()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new label never became answerable: {answer}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let (_, metrics) = get(port, "/metrics").unwrap();
    assert!(
        metrics.contains("fruits_images_ingested_total 40"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fruits_stage_seconds_total{stage=\"embed\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("fruits_changes_pending 0"), "{metrics}");
}
