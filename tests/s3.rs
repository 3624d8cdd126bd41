//! Over a real S3 server (s3s-fs, a separate process speaking S3 with SigV4 auth, on
//! loopback): replay, tailing new images and a new fruit folder, deletion, restart
//! exactly once, an outage, a wrong secret, and three processes.

use crate::util::*;
use fruits_dataflows::io::S3Config;
use fruits_dataflows::sink::{s3::S3Store, OutputStore};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
