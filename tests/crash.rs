//! kill -9 at random points during ingestion (and once inside a checkpoint write),
//! restart with the same command each time, and check that the final statistics equal
//! an uninterrupted run: every image counted exactly once.

use crate::util::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn command(
    source: &std::path::Path,
    output: &std::path::Path,
    config: &std::path::Path,
) -> Command {
    let mut c = run_command(source.to_str().unwrap(), output.to_str().unwrap(), true);
    c.args(["--config", config.to_str().unwrap(), "-w", "2"])
        .stderr(Stdio::null());
    c
}

#[test]
fn kill_minus_nine_anywhere_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (crashed, clean) = (dir.path().join("crashed"), dir.path().join("clean"));
    let config = dir.path().join("p.toml");
    // Small epochs: many commits to interrupt.
    std::fs::write(&config, "[source]\nepoch_size = 3\n").unwrap();
    let source = fixtures();

    let mut seed = 0x2545_f491_4f6c_dd1du64 ^ std::process::id() as u64;
    let mut runs = 0;
    let mut kills;
    loop {
        // Each attempt: a crash inside the commit of epoch 2 (checkpoint written, pointer
        // not), then kill -9 at pseudo-random points until a run completes.
        let _ = std::fs::remove_dir_all(&crashed);
        kills = 0;
        let status = command(&source, &crashed, &config)
            .env("FRUITS_FLOW_ABORT_IN_COMMIT", "2")
            .status()
            .unwrap();
        assert!(!status.success(), "the injected abort did not happen");
        runs += 1;
        loop {
            runs += 1;
            let mut child = command(&source, &crashed, &config).spawn().unwrap();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let after = Duration::from_millis(250 + seed % 900);
            let started = Instant::now();
            let finished = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(status.success(), "run failed: {status:?}");
                    break true;
                }
                if started.elapsed() >= after {
                    child.kill().unwrap(); // SIGKILL
                    child.wait().unwrap();
                    kills += 1;
                    break false;
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            if finished {
                break;
            }
        }
        if kills >= 3 {
            break;
        }
        assert!(
            runs < 80,
            "could not interrupt a run 3 times in {runs} runs"
        );
    }
    eprintln!("crash test: {runs} runs, {kills} kills");
    run_once(&source, &clean, &["--config", config.to_str().unwrap()]);
    // Same epochs were cut (the ledger resumes in key order), so even KMeans must agree.
    assert_same_statistics(&crashed, &clean);
    assert_eq!(status(&crashed)["images"], 40);
    let crashed_ckpt = std::fs::read_to_string(crashed.join("state/CURRENT")).unwrap();
    assert!(crashed_ckpt.starts_with("state/checkpoint-"));
}
