//! Worker and process invariance: the same images give the same statistics at -w 1,
//! -w 4 and with 3 processes over loopback.

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
