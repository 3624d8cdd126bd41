//! Over a real S3 server (s3s-fs, a separate process speaking S3 with SigV4 auth, on
//! loopback): replay, tailing new images and a new fruit folder, deletion, restart
//! exactly once, an outage, a wrong secret, three processes, and `export` to S3 objects
//! (one PutObject or a multipart upload, equal to a local export; failures leave none).

use crate::util::*;
use fruits_dataflows::io::{upload::MIN_PART_SIZE, S3Client, S3Config, S3Upload};
use fruits_dataflows::sink::{s3::S3Store, OutputStore};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

const ACCESS_KEY: &str = "fruitsflowtest";
const SECRET_KEY: &str = "s3cr3t-do-not-log-me";
const BUCKET: &str = "fruit";

/// An s3s-fs server on a free loopback port, serving a temp directory (one folder per
/// bucket). Killed on drop.
pub struct Server {
    child: Option<Child>,
    pub root: tempfile::TempDir,
    pub port: u16,
}

/// The s3s-fs binary: in cargo's bin directory (where `cargo install` puts it) or on PATH.
fn s3s_fs() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    std::iter::once(cargo_home.join("bin"))
        .chain(on_path)
        .map(|dir| dir.join("s3s-fs"))
        .find(|p| p.is_file())
        .expect("s3s-fs is not installed: `cargo install s3s-fs --version 0.14.1 --features binary --locked` (scripts/setup does this)")
}

fn credentials() {
    static ONCE: Once = Once::new();
    // The in-test client reads the standard AWS variables, as the binary does.
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::remove_var("AWS_ENDPOINT_URL");
        std::env::remove_var("AWS_PROFILE");
    });
}

impl Server {
    pub fn start() -> Server {
        credentials();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Server {
            child: None,
            root,
            port,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new(s3s_fs())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn config(&self) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint()),
            path_style: true,
            ..Default::default()
        }
    }

    /// A store over `s3://fruit/<prefix>`, used to upload and delete test objects.
    pub fn store(&self, prefix: &str) -> S3Store {
        S3Store::open(&format!("s3://{BUCKET}/{prefix}"), &self.config()).unwrap()
    }

    /// Uploads the fixture images `range` of every label under `prefix`.
    pub fn upload_fixtures(&self, prefix: &str, range: std::ops::Range<usize>) -> usize {
        let staging = tempfile::tempdir().unwrap();
        let n = copy_fixtures(staging.path(), range);
        let store = self.store(prefix);
        for label in std::fs::read_dir(staging.path()).unwrap() {
            let label = label.unwrap();
            for f in std::fs::read_dir(label.path()).unwrap() {
                let f = f.unwrap();
                let name = format!(
                    "{}/{}",
                    label.file_name().to_string_lossy(),
                    f.file_name().to_string_lossy()
                );
                store.put(&name, &std::fs::read(f.path()).unwrap()).unwrap();
            }
        }
        n
    }

    /// Points a `fruits-flow` command at this server, with the test credentials.
    pub fn with_s3(&self, mut c: Command) -> Command {
        c.args(["--s3-endpoint", &self.endpoint(), "--s3-path-style"]);
        c.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1");
        c
    }

    /// `fruits-flow <args>` pointed at this server.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = bin();
        c.args(args);
        self.with_s3(c)
    }

    /// `fruits-flow run` over S3 (`--once` if asked).
    pub fn run(&self, source: &str, output: &str, once: bool) -> Command {
        self.with_s3(run_command(source, output, once))
    }

    pub fn run_once(&self, source: &str, output: &str, extra: &[&str]) -> String {
        let out = self.run(source, output, true).args(extra).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "run failed: {stderr}");
        stderr
    }

    pub fn status(&self, output: &str) -> serde_json::Value {
        status_of(&mut self.command(&["status", "--json", "--output", output]))
    }

    /// The stored bytes of `key` in the bucket, read from the server's directory.
    pub fn object(&self, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.root.path().join(BUCKET).join(key)).ok()
    }

    /// The ETag of `key` (a multipart object's ends in `-<parts>`).
    pub fn etag(&self, key: &str) -> String {
        let client = S3Client::new(&self.config()).unwrap();
        let head = client
            .block_on(client.sdk().head_object().bucket(BUCKET).key(key).send())
            .unwrap();
        head.e_tag().unwrap().trim_matches('"').to_string()
    }

    /// The files s3s-fs keeps for multipart uploads in progress (their info and parts).
    pub fn pending_uploads(&self) -> Vec<String> {
        std::fs::read_dir(self.root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(".upload"))
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_status(
    server: &Server,
    output: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) {
    let store = S3Store::open(output, &server.config()).unwrap();
    let read = || {
        store
            .get("status.json")
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok())
    };
    wait_until(what, read, done);
}

fn tail(server: &Server, source: &str, output: &str, log: &Path) -> Child {
    let config = tail_config(&log.with_extension("toml"), 300, 16)
        .to_str()
        .unwrap()
        .to_string();
    server
        .run(source, output, false)
        .args(["--config", &config, "-w", "2"])
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn interrupt(child: &mut Child) {
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "run did not stop cleanly: {status:?}");
}

#[test]
fn replay_tail_new_folder_deletion_and_restart_over_s3() {
    let server = Server::start();
    let logs = tempfile::tempdir().unwrap();
    let (source, output) = ("s3://fruit/archive", "s3://fruit/out");
    assert_eq!(server.upload_fixtures("archive", 0..3), 12);
    // Replay of the archive as it is.
    server.run_once(source, output, &[]);
    assert_eq!(server.status(output)["images"], 12);

    let log = logs.path().join("tail.log");
    let mut run = tail(&server, source, output, &log);
    // New images in existing folders.
    server.upload_fixtures("archive", 3..5);
    wait_status(&server, output, "20 images", |s| s["images"] == 20);
    // A new folder of a new fruit.
    let store = server.store("archive");
    let bytes = std::fs::read(fixtures().join("Kiwi 1/0_100.jpg")).unwrap();
    for i in 0..3 {
        store
            .put(&format!("Kiwi Gold 9/new_{i}.jpg"), &bytes)
            .unwrap();
    }
    wait_status(&server, output, "the new folder", |s| {
        s["labels"]["Kiwi Gold 9"] == 3
    });
    // Deletion retracts.
    store.delete("Kiwi Gold 9/new_0.jpg").unwrap();
    store.delete("Banana 1/0_100.jpg").unwrap();
    wait_status(&server, output, "deletions", |s| {
        s["images"] == 21 && s["labels"]["Kiwi Gold 9"] == 2
    });
    interrupt(&mut run);

    // Restart: nothing repeated, nothing missed; then compare with a fresh batch run.
    server.upload_fixtures("archive", 5..6);
    server.run_once(source, output, &[]);
    let s = server.status(output);
    assert_eq!(s["images"], 25);
    server.run_once(source, "s3://fruit/batch", &[]);
    let b = server.status("s3://fruit/batch");
    assert_eq!(s["labels"], b["labels"]);
    assert_eq!(
        s["pca"], b["pca"],
        "PCA after streaming differs from a batch run"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains(SECRET_KEY),
        "the secret key appears in the log"
    );
}

#[test]
fn wrong_secret_key_is_a_clear_authentication_error() {
    let server = Server::start();
    server.upload_fixtures("archive", 0..1);
    let out = server
        .run("s3://fruit/archive", "s3://fruit/out", true)
        .env("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123")
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("refused the credentials"), "{text}");
    assert!(
        !text.contains("wrong-secret-value-123"),
        "secret leaked: {text}"
    );
}

#[test]
fn an_outage_is_retried_and_nothing_is_lost() {
    let mut server = Server::start();
    let logs = tempfile::tempdir().unwrap();
    let (source, output) = ("s3://fruit/archive", "s3://fruit/out");
    server.upload_fixtures("archive", 0..2);
    let log = logs.path().join("tail.log");
    let mut run = tail(&server, source, output, &log);
    wait_status(&server, output, "8 images", |s| s["images"] == 8);
    server.stop();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        run.try_wait().unwrap().is_none(),
        "the run died during the outage"
    );
    server.restart();
    server.upload_fixtures("archive", 2..4);
    wait_status(&server, output, "16 images", |s| s["images"] == 16);
    interrupt(&mut run);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("S3 unavailable; retrying"),
        "no retry logged:\n{text}"
    );
}

#[test]
fn three_processes_over_s3_equal_one() {
    let server = Server::start();
    server.upload_fixtures("archive", 0..5);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(&config, "[source]\nepoch_size = 7\n").unwrap();
    let cfg = config.to_str().unwrap();
    server.run_once("s3://fruit/archive", "s3://fruit/one", &["--config", cfg]);
    let hosts = dir.path().join("hosts");
    let ports: Vec<u16> = (0..3)
        .map(|_| {
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    std::fs::write(
        &hosts,
        ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let children: Vec<_> = (0..3)
        .map(|p| {
            server
                .run("s3://fruit/archive", "s3://fruit/three", true)
                .args(["--config", cfg, "-w", "2", "-n", "3"])
                .args(["-p", &p.to_string(), "-h", hosts.to_str().unwrap()])
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (one, three) = (
        server.status("s3://fruit/one"),
        server.status("s3://fruit/three"),
    );
    assert_eq!(one["images"], 20);
    assert_eq!(one["labels"], three["labels"]);
    assert_eq!(one["pca"], three["pca"]);
    assert_eq!(one["kmeans"], three["kmeans"]);
}

/// The arguments of `fruits-flow export` of `output` to `csv` and `parquet`.
fn export_args<'a>(output: &'a Path, csv: &'a str, parquet: &'a str) -> [&'a str; 7] {
    let output = output.to_str().unwrap();
    [
        "export",
        "--output",
        output,
        "--csv",
        csv,
        "--parquet",
        parquet,
    ]
}

fn assert_exported(out: &Output) {
    assert!(
        out.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An archive of `variants` distinct images per fixture image (flips, rotations and
/// brightness shifts, under new names), so an export spans several upload parts.
fn variant_archive(dest: &Path, variants: usize) -> usize {
    let mut written = 0;
    for label in std::fs::read_dir(fixtures()).unwrap() {
        let label = label.unwrap().path();
        let target = dest.join(label.file_name().unwrap());
        std::fs::create_dir_all(&target).unwrap();
        for f in std::fs::read_dir(&label).unwrap() {
            let f = f.unwrap().path();
            let img = image::open(&f).unwrap();
            let stem = f.file_stem().unwrap().to_string_lossy().into_owned();
            for v in 0..variants {
                let turned = match v % 8 {
                    0 => img.clone(),
                    1 => img.rotate90(),
                    2 => img.rotate180(),
                    3 => img.rotate270(),
                    4 => img.fliph(),
                    5 => img.flipv(),
                    6 => img.rotate90().fliph(),
                    _ => img.rotate90().flipv(),
                };
                let shifted = turned.brighten(6 * (v / 8) as i32);
                shifted
                    .save(target.join(format!("{stem}_v{v}.jpg")))
                    .unwrap();
                written += 1;
            }
        }
    }
    written
}

#[test]
fn export_to_s3_equals_a_local_export_in_one_object_or_several_parts() {
    let server = Server::start();
    let (archive, out, local) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    // ~1,600 rows of 1280 float32 features: a Parquet table of about 8 MB.
    assert_eq!(variant_archive(archive.path(), 40), 1600);
    run_once(archive.path(), out.path(), &["-w", "2"]);
    let (csv, parquet) = (local.path().join("t.csv"), local.path().join("t.parquet"));
    let local_args = export_args(out.path(), csv.to_str().unwrap(), parquet.to_str().unwrap());
    assert_exported(&bin().args(local_args).output().unwrap());
    let (csv, parquet) = (std::fs::read(csv).unwrap(), std::fs::read(parquet).unwrap());
    assert!(
        parquet.len() > MIN_PART_SIZE,
        "the Parquet table ({} bytes) is too small to need several parts",
        parquet.len()
    );

    // Default part size: each table in one PutObject (or parts of 8 MiB).
    let to_s3 = |prefix: &str| {
        let (csv, parquet) = (
            format!("s3://fruit/{prefix}/t.csv"),
            format!("s3://fruit/{prefix}/t.parquet"),
        );
        server.command(&export_args(out.path(), &csv, &parquet))
    };
    assert_exported(&to_s3("tables").output().unwrap());
    // The smallest parts S3 allows: the Parquet table goes in several parts.
    let mut parts = to_s3("parts");
    parts.env("FRUITS_FLOW_EXPORT_PART_SIZE", MIN_PART_SIZE.to_string());
    assert_exported(&parts.output().unwrap());
    for prefix in ["tables", "parts"] {
        let object = |name: &str| server.object(&format!("{prefix}/{name}"));
        assert!(
            object("t.csv") == Some(csv.clone()),
            "{prefix}/t.csv differs"
        );
        assert!(
            object("t.parquet") == Some(parquet.clone()),
            "{prefix}/t.parquet differs from the local export"
        );
    }
    // A multipart object's ETag ends in -<parts>; a table under one part is one PutObject.
    for (key, len) in [
        ("parts/t.parquet", parquet.len()),
        ("parts/t.csv", csv.len()),
    ] {
        let (etag, parts) = (server.etag(key), len.div_ceil(MIN_PART_SIZE));
        let single = parts == 1 && !etag.contains('-');
        assert!(
            single || etag.ends_with(&format!("-{parts}")),
            "{key} ({len} bytes): ETag {etag}"
        );
    }
    assert_eq!(server.pending_uploads(), Vec::<String>::new());
}

#[test]
fn an_upload_streams_parts_and_appears_whole_or_not_at_all() {
    let server = Server::start();
    let bytes: Vec<u8> = (0..(3 * MIN_PART_SIZE + 123))
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let upload = |key: &str, len: usize, part: usize| {
        let mut writer =
            S3Upload::create(&format!("s3://fruit/{key}"), &server.config(), part).unwrap();
        // Odd-sized writes, as the CSV and Parquet writers make.
        for chunk in bytes[..len].chunks(7919) {
            writer.write_all(chunk).unwrap();
        }
        writer
    };
    // Several parts and a short last one; an exact multiple sends no empty part.
    for (key, len, parts) in [("four", bytes.len(), 4), ("two", 2 * MIN_PART_SIZE, 2)] {
        upload(key, len, MIN_PART_SIZE).finish().unwrap();
        assert!(
            server.object(key).as_deref() == Some(&bytes[..len]),
            "{key} differs"
        );
        assert!(
            server.etag(key).ends_with(&format!("-{parts}")),
            "{key}: {}",
            server.etag(key)
        );
    }
    // Under one part: one PutObject.
    upload("small", 1000, MIN_PART_SIZE).finish().unwrap();
    assert_eq!(server.object("small").as_deref(), Some(&bytes[..1000]));
    assert_eq!(server.pending_uploads(), Vec::<String>::new());

    // Dropped unfinished after a part went (the export failed): aborted, no object.
    drop(upload("dropped", MIN_PART_SIZE + 10, MIN_PART_SIZE));
    assert_eq!(server.object("dropped"), None);
    assert_eq!(server.pending_uploads(), Vec::<String>::new());

    // Refused on complete (parts under S3's minimum): the error names the object, and
    // none appears.
    let err = upload("refused", 3 << 20, 1 << 20)
        .finish()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("s3://fruit/refused") && err.contains("EntityTooSmall"),
        "{err}"
    );
    assert_eq!(server.object("refused"), None);
}

#[test]
fn export_to_a_denied_or_unreachable_destination_fails_clearly() {
    let server = Server::start();
    let (archive, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    copy_fixtures(archive.path(), 0..1);
    run_once(archive.path(), out.path(), &[]);
    let failed = |out: Output, url: &str, reason: &str| {
        assert!(!out.status.success(), "export to {url} succeeded");
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(text.contains(url) && text.contains(reason), "{text}");
        assert!(
            !text.contains(SECRET_KEY) && !text.contains("wrong-secret-value-123"),
            "secret leaked: {text}"
        );
    };

    let (csv, parquet) = ("s3://fruit/denied/t.csv", "s3://fruit/denied/t.parquet");
    let mut denied = server.command(&export_args(out.path(), csv, parquet));
    denied.env("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123");
    failed(denied.output().unwrap(), csv, "refused the credentials");
    assert!(server.object("denied/t.csv").is_none() && server.object("denied/t.parquet").is_none());

    // Nothing listens there; [s3] retry_for_s bounds the retries.
    let config = out.path().join("retry.toml");
    std::fs::write(&config, "[s3]\nretry_for_s = 1\n").unwrap();
    let csv = "s3://fruit/unreachable/t.csv";
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let mut unreachable = bin();
    unreachable
        .args(export_args(
            out.path(),
            csv,
            "s3://fruit/unreachable/t.parquet",
        ))
        .args(["--s3-endpoint", &endpoint, "--s3-path-style"])
        .args(["--config", config.to_str().unwrap()])
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1");
    failed(unreachable.output().unwrap(), csv, "dispatch failure");
}

/// Tailing an object store lists new folders at once and each known folder once per
/// cycle of `full_listing_every` rounds (the first round of a cycle lists everything),
/// so LIST requests per poll do not grow with the archive; a skipped folder's objects
/// stand as listed.
#[test]
fn tailing_rounds_relist_each_known_folder_once_per_cycle() {
    use fruits_dataflows::source::{s3::S3Dir, FolderStamps, ListingRound, Source};
    let server = Server::start();
    server.upload_fixtures("archive", 0..1);
    let source = S3Dir::open("s3://fruit/archive", &server.config()).unwrap();
    let (folders, _) = source.list_top().unwrap();
    assert!(folders.len() >= 3, "{folders:?}");
    let every = 4;
    let round = |number| ListingRound { number, every };
    let mut seen = FolderStamps::new();
    let (all, skipped) = source
        .list_share_changed(0, 1, &mut seen, round(0))
        .unwrap();
    assert!(skipped.is_empty());
    assert_eq!(all.len(), folders.len());
    // Over the rest of the cycle each folder is listed exactly once.
    let mut listed_in_cycle: Vec<String> = Vec::new();
    for number in 1..every {
        let (listed, skipped) = source
            .list_share_changed(0, 1, &mut seen, round(number))
            .unwrap();
        let mut here: Vec<String> = listed
            .iter()
            .map(|o| o.key.0.split('/').next().unwrap().to_string())
            .collect();
        here.dedup();
        assert_eq!(here.len() + skipped.len(), folders.len());
        listed_in_cycle.extend(here);
    }
    // Round `every` starts a new cycle (listed in full), so the turns are rounds 1..every
    // for folders whose hash is not 0 mod every; the rest wait for the full round.
    let mut expected: Vec<String> = folders
        .iter()
        .filter(|f| !round(0).turn_of(f))
        .cloned()
        .collect();
    listed_in_cycle.sort();
    expected.sort();
    assert_eq!(listed_in_cycle, expected);
    // A new folder is listed in the next round, whatever its turn.
    let bytes = std::fs::read(fixtures().join("Kiwi 1/0_100.jpg")).unwrap();
    server
        .store("archive")
        .put("Brand New 1/a.jpg", &bytes)
        .unwrap();
    let (listed, _) = source
        .list_share_changed(0, 1, &mut seen, round(every + 1))
        .unwrap();
    assert!(
        listed.iter().any(|o| o.key.0 == "Brand New 1/a.jpg"),
        "{listed:?}"
    );
}
