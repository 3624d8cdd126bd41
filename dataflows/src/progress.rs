//! Progress of the ingestion as seen by worker 0 (which hands out the epochs): a bar
//! with images/s and an ETA on a terminal, one log line per committed epoch otherwise.
//! It also keeps the backlog metrics (discovered, processed, pending, lag).

use crate::metrics::metrics;
use crate::record::Epoch;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Worker 0's view of handed-out and committed work.
pub struct Progress {
    /// Epochs handed out and not yet committed: (changes, when they were listed).
    open: BTreeMap<Epoch, (u64, Instant)>,
    bar: Option<ProgressBar>,
    /// In a single process the embed counters see every image, so the bar can move
    /// between commits; across processes only commits are visible here.
    live_counts: bool,
    total: u64,
    done: u64,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    /// A progress display; a bar only when stderr is a terminal.
    pub fn new(single_process: bool) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} images {per_sec} ETA {eta}",
                )
                .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            open: BTreeMap::new(),
            bar,
            live_counts: single_process,
            total: 0,
            done: 0,
            started: Instant::now(),
            last_line: Instant::now(),
        }
    }

    /// `changes` were handed out as `epoch`, from a listing made at `listed_at`.
    pub fn handed(&mut self, epoch: Epoch, changes: usize, listed_at: Instant) {
        if changes == 0 {
            return;
        }
        let n = changes as u64;
        self.open.insert(epoch, (n, listed_at));
        self.total += n;
        metrics().discovered.inc_by(n);
        metrics().pending.inc_by(n as i64);
        if let Some(bar) = &self.bar {
            bar.set_length(self.total);
        }
    }

    /// Every epoch below `frontier` has committed.
    pub fn committed_below(&mut self, frontier: Epoch) {
        let mut advanced = false;
        while let Some(entry) = self.open.first_entry() {
            if *entry.key() >= frontier {
                break;
            }
            let (n, listed_at) = entry.remove();
            self.done += n;
            metrics().processed.inc_by(n);
            metrics().pending.dec_by(n as i64);
            metrics().lag_seconds.set(listed_at.elapsed().as_secs_f64());
            advanced = true;
        }
        if advanced {
            self.report();
        }
    }

    /// Moves the bar between commits (single process only).
    pub fn tick(&self) {
        if let (Some(bar), true) = (&self.bar, self.live_counts) {
            let m = metrics();
            let seen = m.images_ingested.get() + m.images_retracted.get() + m.errors_total();
            bar.set_position(seen.clamp(self.done, self.total));
        }
    }

    fn report(&mut self) {
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
            return;
        }
        // Plain lines: at most one every 2 s, and always the last one.
        if self.done < self.total && self.last_line.elapsed() < Duration::from_secs(2) {
            return;
        }
        self.last_line = Instant::now();
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = self.done as f64 / elapsed;
        let left = self.total - self.done;
        let eta = if rate > 0.0 { left as f64 / rate } else { 0.0 };
        tracing::info!(
            stage = "progress",
            done = self.done,
            total = self.total,
            images_per_s = format!("{rate:.1}"),
            eta_s = format!("{eta:.0}"),
            "Progress."
        );
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
