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
