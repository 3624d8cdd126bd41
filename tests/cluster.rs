//! Worker and process invariance: the same images give the same statistics at -w 1,
//! -w 4 and with 3 processes over loopback; and the cluster's liveness: a process lost
//! while running, or missing (or late) at startup.

use crate::util::*;
use std::process::Stdio;

#[test]
fn workers_and_processes_give_the_same_statistics() {
    let one = tempfile::tempdir().unwrap();
    let four = tempfile::tempdir().unwrap();
    let three = tempfile::tempdir().unwrap();
    let config = one.path().join("p.toml");
    std::fs::write(&config, "[source]\nepoch_size = 9\n").unwrap();
    let cfg = config.to_str().unwrap();
    run_once(&fixtures(), one.path(), &["-w", "1", "--config", cfg]);
    run_once(&fixtures(), four.path(), &["-w", "4", "--config", cfg]);

    // Three processes with two workers each, on loopback ports chosen for this test.
    let hosts = one.path().join("hosts.txt");
    let base = 23000 + (std::process::id() % 2000) as u16 * 3;
    std::fs::write(
        &hosts,
        (0..3)
            .map(|i| format!("127.0.0.1:{}\n", base + i))
            .collect::<String>(),
    )
    .unwrap();
    let children: Vec<_> = (0..3)
        .map(|p| {
            bin()
                .arg("run")
                .args([
                    "--source",
                    fixtures().to_str().unwrap(),
                    "--output",
                    three.path().to_str().unwrap(),
                    "--once",
                ])
                .args(["--model", model().to_str().unwrap(), "--config", cfg])
                .args([
                    "-w",
                    "2",
                    "-n",
                    "3",
                    "-p",
                    &p.to_string(),
                    "-h",
                    hosts.to_str().unwrap(),
                ])
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "process failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_same_statistics(one.path(), four.path());
    assert_same_statistics(one.path(), three.path());
    assert_eq!(status(three.path())["images"], 40);

    // The start-up listing in slices of key space of ~3 objects gives the same epochs
    // (KMeans, which depends on them, agrees) as one whole listing.
    let sliced = tempfile::tempdir().unwrap();
    let config = sliced.path().join("p.toml");
    std::fs::write(&config, "[source]\nepoch_size = 9\nlisting_slice = 3\n").unwrap();
    let out = run_command(
        fixtures().to_str().unwrap(),
        sliced.path().to_str().unwrap(),
        true,
    )
    .args(["-w", "2", "--config", config.to_str().unwrap()])
    .env("RUST_LOG", "info")
    .env("NO_COLOR", "1")
    .output()
    .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let slices: usize = log
        .lines()
        .find(|l| l.contains("Archive listed.") && l.contains("changes=40"))
        .and_then(|l| l.split("slices=").nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no 'Archive listed. changes=40 slices=N' line in {log}"));
    assert!(slices > 3, "{slices} slices");
    assert_same_statistics(one.path(), sliced.path());
    assert_eq!(status(one.path())["epoch"], status(sliced.path())["epoch"]);
}

/// Starts 3 tailing processes (one worker each) on fresh loopback ports, with
/// `[cluster] liveness_timeout_s = timeout_s`, and returns them once the cluster has
/// committed the fixtures. `slot` keeps the ports of tests that run at the same time
/// apart.
fn committed_cluster(dir: &std::path::Path, timeout_s: u64, slot: u16) -> Vec<std::process::Child> {
    let config = dir.join("p.toml");
    std::fs::write(
        &config,
        format!("[cluster]\nliveness_timeout_s = {timeout_s}\n"),
    )
    .unwrap();
    let hosts = dir.join("hosts.txt");
    let base = 30000 + (std::process::id() % 1000) as u16 * 6 + slot * 3;
    std::fs::write(
        &hosts,
        (0..3)
            .map(|i| format!("127.0.0.1:{}\n", base + i))
            .collect::<String>(),
    )
    .unwrap();
    let out = dir.join("out");
    let children = (0..3)
        .map(|p| {
            bin()
                .arg("run")
                .args(["--source", fixtures().to_str().unwrap()])
                .args(["--output", out.to_str().unwrap()])
                .args(["--model", model().to_str().unwrap()])
                .arg("--config")
                .arg(&config)
                .args([
                    "-n",
                    "3",
                    "-p",
                    &p.to_string(),
                    "-h",
                    hosts.to_str().unwrap(),
                ])
                .env("RUST_LOG", "warn")
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_committed(&out);
    children
}

/// Waits for a child's exit (at most `within`); returns its status and stderr.
fn exit_of(
    child: std::process::Child,
    within: std::time::Duration,
) -> (std::process::ExitStatus, String) {
    let id = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(within);
        // Still running: kill it so the test fails instead of hanging.
        let _ = std::process::Command::new("kill")
            .args(["-9", &id.to_string()])
            .status();
    });
    let out = child.wait_with_output().unwrap();
    drop(watchdog);
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn wait_committed(out: &std::path::Path) {
    wait_until(
        "the cluster's first commit",
        || {
            std::fs::read(out.join("status.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
        },
        |s| s["images"] == 40,
    );
}

#[test]
fn a_killed_process_stops_the_others_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut children = committed_cluster(dir.path(), 60, 0);
    let mut victim = children.remove(2);
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    for child in children {
        let (status, stderr) = exit_of(child, std::time::Duration::from_secs(30));
        assert_eq!(status.code(), Some(3), "{stderr}");
        assert!(
            stderr.contains("cluster process 2") && stderr.contains("Restart every process"),
            "{stderr}"
        );
        assert!(
            !stderr.contains("RUST_BACKTRACE"),
            "a panic report: {stderr}"
        );
    }
}

#[test]
fn a_stopped_process_is_given_up_on_after_the_liveness_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut children = committed_cluster(dir.path(), 3, 1);
    let mut frozen = children.remove(1);
    let pid = frozen.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let mut named = false;
    for child in children {
        let (status, stderr) = exit_of(child, std::time::Duration::from_secs(30));
        assert_eq!(status.code(), Some(3), "{stderr}");
        assert!(stderr.contains("Restart every process"), "{stderr}");
        // The first to notice names the stopped process; the other may instead see that
        // one leave.
        named |= stderr.contains("cluster process 1") && stderr.contains("sent nothing for 3 s");
    }
    assert!(named, "no process named the stopped one");
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    let _ = frozen.kill();
    let _ = frozen.wait();
}

/// Two loopback addresses no process listens on (yet).
fn two_free_addresses() -> [String; 2] {
    // Held together so that the two ports differ, released for the processes to bind.
    let held = [0, 1].map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    held.map(|l| l.local_addr().unwrap().to_string())
}

/// Starts process `process` of a 2-process cluster on `hosts`, `--once` over the
/// fixtures into `out`, with `config`.
fn start_process(
    process: usize,
    hosts: &[String; 2],
    config: &std::path::Path,
    out: &std::path::Path,
) -> std::process::Child {
    let hostfile = out.parent().unwrap().join(format!("hosts-{process}.txt"));
    std::fs::write(&hostfile, hosts.join("\n")).unwrap();
    bin()
        .arg("run")
        .args(["--source", fixtures().to_str().unwrap()])
        .args(["--output", out.to_str().unwrap(), "--once"])
        .args(["--model", model().to_str().unwrap()])
        .arg("--config")
        .arg(config)
        .args(["-n", "2", "-p", &process.to_string()])
        .arg("-h")
        .arg(&hostfile)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A cluster process that never starts is named, with its address and the restart
/// command, by the one that did, which exits with status 3 after `[cluster]
/// connect_timeout_s`: both when the missing one is to connect to it (process 0 alone)
/// and when it is the one to connect to (process 1 alone, refused).
#[test]
fn a_process_that_never_starts_is_named_after_the_connect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(&config, "[cluster]\nconnect_timeout_s = 3\n").unwrap();
    let started = std::time::Instant::now();
    // Two clusters, each with one process missing.
    let alone = [0, 1].map(|process| {
        let hosts = two_free_addresses();
        let out = dir.path().join(format!("out-{process}"));
        (
            process,
            start_process(process, &hosts, &config, &out),
            hosts,
        )
    });
    for (process, child, hosts) in alone {
        let (status, stderr) = exit_of(child, std::time::Duration::from_secs(30));
        let missing = 1 - process;
        assert_eq!(status.code(), Some(3), "process {process}: {stderr}");
        assert!(
            started.elapsed() >= std::time::Duration::from_secs(3),
            "gave up before the timeout: {stderr}"
        );
        let line = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("no error line: {stderr}"));
        assert!(
            line.contains(&format!(
                "could not reach cluster process {missing} ({}",
                hosts[missing]
            )) && line.contains("within 3 s")
                && line.contains(&format!("this process ({process}) stops"))
                && line.contains("Restart every process with the same command"),
            "{line}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
            "a panic report: {stderr}"
        );
    }
}

/// A process started late is waited for: the one started first keeps trying, and the
/// cluster then runs as usual.
#[test]
fn a_process_started_late_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(&config, "[cluster]\nconnect_timeout_s = 60\n").unwrap();
    let hosts = two_free_addresses();
    let out = dir.path().join("out");
    // Process 1 connects to process 0, which is not there yet: refused, retried.
    let first = start_process(1, &hosts, &config, &out);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let second = start_process(0, &hosts, &config, &out);
    for child in [first, second] {
        let (status, stderr) = exit_of(child, std::time::Duration::from_secs(120));
        assert!(status.success(), "{stderr}");
    }
    assert_eq!(status(&out)["images"], 40);
}
