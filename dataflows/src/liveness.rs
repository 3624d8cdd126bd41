//! Cluster liveness: when a process dies or stalls, the others stop with one clear line
//! naming the lost peer and the command that restarts the cluster, and exit non-zero so
//! a supervisor restarts them (the restart resumes from the last committed epoch).
//!
//! Timely has no per-process recovery: a dead peer makes its TCP threads panic, and a
//! stopped one (SIGSTOP, a hung host) leaves everyone waiting forever. Two parts cover
//! both: a panic hook that turns timely's connection panics into that line, and a
//! heartbeat (every worker broadcasts a tick each second on a dataflow of its own) read
//! by a watchdog thread that gives up on a process silent for the configured timeout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};
use timely::dataflow::operators::vec::{Broadcast, Input};
use timely::dataflow::operators::Inspect;
use timely::dataflow::InputHandleVec;
use timely::worker::Worker;

/// Exit status when the cluster lost a process.
pub const EXIT_PEER_LOST: i32 = 3;

/// What this process knows of the cluster, for the messages.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// `host:port` of every process, in process order.
    pub hosts: Vec<String>,
    /// This process's index.
    pub process: usize,
    /// The command line to restart with (this process's own).
    pub command: String,
}

impl Cluster {
    /// "cluster process i (host:port)".
    pub(crate) fn describe(&self, process: usize) -> String {
        match self.hosts.get(process) {
            Some(host) => format!("cluster process {process} ({host})"),
            None => format!("cluster process {process}"),
        }
    }

    /// Prints the one line and exits.
    pub(crate) fn give_up(&self, what: &str) -> ! {
        eprintln!(
            "error: {what}; this process ({}) stops. Restart every process with the same \
             command (`{}`, with its own -p); they resume from the last committed epoch.",
            self.process, self.command
        );
        std::process::exit(EXIT_PEER_LOST);
    }
}

/// Replaces timely's connection panics (a peer closed its socket or reset it) with the
/// one line and [`EXIT_PEER_LOST`]; any other panic keeps the default report.
pub fn install_panic_hook(cluster: Cluster) {
    let default = std::panic::take_hook();
    let once = Once::new();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("");
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        let peer = name
            .strip_prefix("timely:recv-")
            .or_else(|| name.strip_prefix("timely:send-"))
            .and_then(|i| i.parse::<usize>().ok());
        let lost = if let Some(peer) = peer {
            Some(format!(
                "lost the connection to {} ({message})",
                cluster.describe(peer)
            ))
        } else if message.contains("MergeQueue poisoned") {
            Some("lost the connection to a cluster process".to_string())
        } else {
            None
        };
        match lost {
            Some(what) => once.call_once(|| cluster.give_up(&what)),
            None => default(info),
        }
    }));
}

/// The watchdog's view: when each process was last heard from.
pub struct Watch {
    cluster: Cluster,
    timeout: Duration,
    heard: Mutex<Vec<Instant>>,
    started: Once,
    stopped: AtomicBool,
}

impl Watch {
    /// A watch over `cluster`, giving up on a process silent for `timeout`.
    pub fn new(cluster: Cluster, timeout: Duration) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Watch {
            heard: Mutex::new(vec![now; cluster.hosts.len().max(1)]),
            cluster,
            timeout,
            started: Once::new(),
            stopped: AtomicBool::new(false),
        })
    }

    fn heard(&self, process: usize) {
        if let Some(t) = self.heard.lock().expect("lock").get_mut(process) {
            *t = Instant::now();
        }
    }

    /// Starts the watchdog thread (once per process).
    fn start(self: &Arc<Self>) {
        let watch = self.clone();
        self.started.call_once(move || {
            {
                let now = Instant::now();
                watch.heard.lock().expect("lock").fill(now);
            }
            std::thread::Builder::new()
                .name("liveness".into())
                .spawn(move || watch.run())
                .expect("starting the liveness thread");
        });
    }

    fn run(&self) {
        loop {
            std::thread::sleep(Duration::from_millis(500));
            if self.stopped.load(Ordering::Relaxed) {
                return;
            }
            let silent = {
                let heard = self.heard.lock().expect("lock");
                (0..heard.len())
                    .filter(|&p| p != self.cluster.process)
                    .find(|&p| heard[p].elapsed() > self.timeout)
            };
            if let Some(p) = silent {
                self.cluster.give_up(&format!(
                    "{} sent nothing for {} s (stopped, hung or unreachable)",
                    self.cluster.describe(p),
                    self.timeout.as_secs()
                ));
            }
        }
    }

    /// The run is ending: peers finishing first is not a failure.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
}

/// One worker's heartbeat: sends a tick each second, records the ticks it receives.
pub struct Heartbeat {
    input: InputHandleVec<u64, usize>,
    last: Instant,
}

/// How often a worker ticks.
const EVERY: Duration = Duration::from_secs(1);

impl Heartbeat {
    /// Builds the heartbeat dataflow on this worker and starts the process's watchdog.
    pub fn new(worker: &mut Worker, watch: &Arc<Watch>) -> Self {
        let mut input = InputHandleVec::new();
        let per_process = (worker.peers() / watch.cluster.hosts.len().max(1)).max(1);
        let sink = watch.clone();
        worker.dataflow::<u64, _, _>(|scope| {
            scope
                .input_from(&mut input)
                .broadcast()
                .inspect(move |w: &usize| sink.heard(w / per_process));
        });
        watch.start();
        Heartbeat {
            input,
            last: Instant::now() - EVERY,
        }
    }

    /// Ticks if a second has passed (call from every wait loop).
    pub fn beat(&mut self, worker: &Worker) {
        if self.last.elapsed() >= EVERY {
            self.input.send(worker.index());
            self.input.flush();
            self.last = Instant::now();
        }
    }
}
