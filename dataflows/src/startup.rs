//! Cluster startup: connects this process to every other one, then starts timely on those
//! sockets (through `initialize_networking_from_sockets`, timely's entry for connections
//! made by its caller). A process whose peers are not all reached within
//! `[cluster] connect_timeout_s` prints one line naming them and exits with
//! [`crate::liveness::EXIT_PEER_LOST`]; until then it logs whom it waits for every few
//! seconds.
//!
//! Timely's own setup cannot say who is missing: process i connects to processes 0..i
//! one after another, retrying each second forever, and waits for i+1..n to connect, so
//! a process that never starts leaves the others blocked with nothing but timely's
//! per-second stdout chatter. Here every link is tried at once (a missing process 0 does
//! not hide a missing process 1), each side of a link names itself in a hello (magic,
//! process count, workers per process, index; u64 big-endian both ways) before the socket
//! goes to timely, and mismatched `-n`/`-w` or host lists fail at once with what differs.
//! Once every link is up the watch is over: a peer lost later is the [`crate::liveness`]
//! panic hook's and heartbeat's.

use crate::liveness::Cluster;
use anyhow::{Context, Result};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
use timely::communication::allocator::ProcessBuilder;
use timely::communication::{AllocatorBuilder, Hooks, WorkerGuards};
use timely::worker::Worker;

/// Starts timely's workers for this process of `cluster` once every link is up: `threads`
/// workers per process, the same in every process. `timeout` is how long to wait for
/// the other processes (None: forever); `report` logs every link made.
pub fn execute<T, F>(
    cluster: &Cluster,
    threads: usize,
    timeout: Option<Duration>,
    report: bool,
    worker: timely::WorkerConfig,
    func: F,
) -> Result<WorkerGuards<T>>
where
    T: Send + 'static,
    F: Fn(&mut Worker) -> T + Send + Sync + 'static,
{
    let sockets = connect(cluster, threads, timeout, report)?;
    // What timely's `Config::Cluster { zerocopy: false, .. }` builds around its own sockets.
    let hooks = Hooks::default();
    let local =
        ProcessBuilder::new_typed_vector(threads, hooks.refill.clone(), hooks.spill.clone());
    let (builders, guard) =
        initialize_networking_from_sockets(local, sockets, cluster.process, threads, hooks)
            .context("starting timely's network threads")?;
    let builders = builders.into_iter().map(AllocatorBuilder::Tcp).collect();
    timely::execute::execute_from(builders, Box::new(guard), worker, func)
        .map_err(|e| anyhow::anyhow!("starting timely: {e}"))
}

/// How often an unreachable peer is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How long one TCP connect may take (a host that is down drops the SYN).
const CONNECT_WITHIN: Duration = Duration::from_secs(2);
/// How long a peer may take to answer the hello once connected.
const HELLO_WITHIN: Duration = Duration::from_secs(5);
/// How often the progress line is logged.
const LOG_EVERY: Duration = Duration::from_secs(5);
/// How often the listener checks for new connections (and for the end of startup).
const ACCEPT_POLL: Duration = Duration::from_millis(50);
/// Starts every hello: "fruits" and the version of this handshake.
const MAGIC: u64 = 0x6672_7569_7473_0001;

/// What a side of a link says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hello {
    processes: u64,
    workers: u64,
    index: u64,
}

impl Hello {
    fn write(&self, stream: &mut impl Write) -> io::Result<()> {
        let mut bytes = [0u8; 32];
        for (chunk, value) in
            bytes
                .chunks_mut(8)
                .zip([MAGIC, self.processes, self.workers, self.index])
        {
            chunk.copy_from_slice(&value.to_be_bytes());
        }
        stream.write_all(&bytes)?;
        stream.flush()
    }

    /// Reads exactly a hello (timely's bytes may follow it on the same socket).
    fn read(stream: &mut impl Read) -> io::Result<Hello> {
        let mut bytes = [0u8; 32];
        stream.read_exact(&mut bytes)?;
        let word = |i: usize| u64::from_be_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        if word(0) != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a fruits-flow cluster process (wrong hello)",
            ));
        }
        Ok(Hello {
            processes: word(1),
            workers: word(2),
            index: word(3),
        })
    }

    /// Why `peer` cannot be in the same cluster as `self`, if so; `expected` is the index
    /// it must have (a connect) or None (an accept: any higher index).
    fn mismatch(&self, peer: &Hello, expected: Option<u64>, at: &str) -> Option<String> {
        if peer.processes != self.processes {
            return Some(format!(
                "the process at {at} runs with -n {}, this one with -n {}; every process \
                 needs the same -n",
                peer.processes, self.processes
            ));
        }
        if peer.workers != self.workers {
            return Some(format!(
                "the process at {at} runs {} workers, this one {}; every process needs the \
                 same -w",
                peer.workers, self.workers
            ));
        }
        let wrong = match expected {
            Some(index) => peer.index != index,
            None => peer.index <= self.index || peer.index >= self.processes,
        };
        wrong.then(|| {
            format!(
                "the process at {at} is cluster process {}, which this process's host list \
                 does not put there; every process needs the same hosts",
                peer.index
            )
        })
    }
}

/// What the connecting and accepting threads report.
enum Event {
    /// A link to `peer` is up; of two links to one peer, the one accepted last wins (the
    /// peer restarted, or gave up on a slow hello and tried again). Connects carry 0.
    Linked(usize, TcpStream, u64),
    /// Why the latest attempt to reach `peer` failed.
    Failed(usize, String),
    /// A cluster no retry can fix (mismatched -n, -w or hosts).
    Fatal(String),
}

/// Makes a link to every other process of `cluster`: sockets in process order, None at
/// this process's index. Exits the process (see the module doc) after `timeout`.
fn connect(
    cluster: &Cluster,
    workers: usize,
    timeout: Option<Duration>,
    report: bool,
) -> Result<Vec<Option<TcpStream>>> {
    let (me, n) = (cluster.process, cluster.hosts.len());
    let hello = Hello {
        processes: n as u64,
        workers: workers as u64,
        index: me as u64,
    };
    let own = &cluster.hosts[me];
    let listener = TcpListener::bind(own.as_str()).with_context(|| {
        format!("listening on {own}, the address of this process (cluster process {me})")
    })?;
    let done = Arc::new(AtomicBool::new(false));
    let received = spawn_linkers(cluster, hello, listener, &done)?;
    let mut links = Links::new(cluster, report);
    let started = Instant::now();
    let mut next_log = started + LOG_EVERY;
    let result = loop {
        let missing = links.missing();
        if missing.is_empty() {
            break Ok(links.into_sockets());
        }
        let now = Instant::now();
        if let Some(limit) = timeout.filter(|&t| now >= started + t) {
            give_up(cluster, &links.describe(&missing), limit);
        }
        if now >= next_log {
            tracing::info!(
                stage = "cluster",
                "Waiting for {} ({} s so far{}).",
                links.describe(&missing),
                started.elapsed().as_secs(),
                timeout.map_or(String::new(), |t| format!(
                    "; giving up at {} s",
                    t.as_secs()
                ))
            );
            next_log = now + LOG_EVERY;
        }
        let wake = timeout.map_or(next_log, |t| next_log.min(started + t));
        match received.recv_timeout(wake.saturating_duration_since(now)) {
            Ok(event) => {
                if let Err(e) = links.take(event) {
                    break Err(e);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                break Err(anyhow::anyhow!(
                    "the cluster connect threads stopped before every link was up"
                ))
            }
        }
    };
    // Stops the connect threads still retrying and closes the listener.
    done.store(true, Ordering::Relaxed);
    result
}

/// Starts a connect thread per lower-indexed process and, if there are higher-indexed
/// ones, the accept thread; returns what they report.
fn spawn_linkers(
    cluster: &Cluster,
    hello: Hello,
    listener: TcpListener,
    done: &Arc<AtomicBool>,
) -> Result<Receiver<Event>> {
    let (events, received) = channel();
    for peer in 0..cluster.process {
        let (address, events, done) = (cluster.hosts[peer].clone(), events.clone(), done.clone());
        std::thread::Builder::new()
            .name(format!("cluster-connect-{peer}"))
            .spawn(move || connect_to(peer, &address, hello, &events, &done))
            .context("starting a cluster connect thread")?;
    }
    if cluster.process + 1 < cluster.hosts.len() {
        let done = done.clone();
        std::thread::Builder::new()
            .name("cluster-accept".into())
            .spawn(move || accept_from_higher(listener, hello, &events, &done))
            .context("starting the cluster accept thread")?;
    }
    Ok(received)
}

/// The links made so far, and why the missing ones are missing.
struct Links<'a> {
    cluster: &'a Cluster,
    report: bool,
    sockets: Vec<Option<TcpStream>>,
    /// Per peer, the accept order of its link (0 for connects).
    accepted: Vec<u64>,
    /// Per lower-indexed peer, the latest connect error.
    why: Vec<Option<String>>,
}

impl<'a> Links<'a> {
    fn new(cluster: &'a Cluster, report: bool) -> Self {
        let n = cluster.hosts.len();
        Links {
            cluster,
            report,
            sockets: (0..n).map(|_| None).collect(),
            accepted: vec![0; n],
            why: vec![None; n],
        }
    }

    fn missing(&self) -> Vec<usize> {
        (0..self.sockets.len())
            .filter(|&p| p != self.cluster.process && self.sockets[p].is_none())
            .collect()
    }

    fn into_sockets(self) -> Vec<Option<TcpStream>> {
        self.sockets
    }

    /// Records one report; Err for a cluster that cannot work.
    fn take(&mut self, event: Event) -> Result<()> {
        match event {
            Event::Linked(peer, socket, accepted) => {
                let again = self.sockets[peer].is_some();
                if again && accepted <= self.accepted[peer] {
                    return Ok(()); // An older link that finished its hello late.
                }
                if again || self.report {
                    tracing::info!(
                        stage = "cluster",
                        "Linked with {}{}.",
                        self.cluster.describe(peer),
                        if again {
                            " again (the newer connection replaces the first)"
                        } else {
                            ""
                        }
                    );
                }
                self.sockets[peer] = Some(socket);
                self.accepted[peer] = accepted;
            }
            Event::Failed(peer, error) => self.why[peer] = Some(error),
            Event::Fatal(error) => anyhow::bail!(
                "cluster process {} cannot join the cluster: {error}",
                self.cluster.process
            ),
        }
        Ok(())
    }

    /// `peers`, their addresses and why each is not linked yet.
    fn describe(&self, peers: &[usize]) -> String {
        let me = self.cluster.process;
        peers
            .iter()
            .map(|&peer| {
                let state = if peer < me {
                    match &self.why[peer] {
                        Some(error) => format!("connecting: {error}"),
                        None => "connecting".to_string(),
                    }
                } else {
                    format!(
                        "which has not connected to this process at {}",
                        self.cluster.hosts[me]
                    )
                };
                format!(
                    "cluster process {peer} ({}, {state})",
                    self.cluster.hosts[peer]
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The one line, and [`crate::liveness::EXIT_PEER_LOST`].
fn give_up(cluster: &Cluster, missing: &str, limit: Duration) -> ! {
    cluster.give_up(&format!(
        "could not reach {missing} within {} s ([cluster] connect_timeout_s; is it started, \
         at that host:port?)",
        limit.as_secs()
    ))
}

/// Connects to the lower-indexed `peer` at `address` until a link is up or startup is over.
fn connect_to(peer: usize, address: &str, hello: Hello, events: &Sender<Event>, done: &AtomicBool) {
    while !done.load(Ordering::Relaxed) {
        match try_connect(address, hello, peer) {
            Ok(Ok(stream)) => {
                let _ = events.send(Event::Linked(peer, stream, 0));
                return;
            }
            Ok(Err(fatal)) => {
                let _ = events.send(Event::Fatal(fatal));
                return;
            }
            Err(e) => {
                if events.send(Event::Failed(peer, format!("{e:#}"))).is_err() {
                    return;
                }
                std::thread::sleep(RETRY_EVERY);
            }
        }
    }
}

/// One attempt: a connected, greeted socket; Ok(Err) for a peer that can never fit; Err
/// for one that may answer later.
fn try_connect(address: &str, hello: Hello, peer: usize) -> Result<Result<TcpStream, String>> {
    let addresses: Vec<SocketAddr> = address
        .to_socket_addrs()
        .with_context(|| format!("resolving {address}"))?
        .collect();
    let mut last = None;
    let mut stream = None;
    for a in &addresses {
        match TcpStream::connect_timeout(a, CONNECT_WITHIN) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let Some(mut stream) = stream else {
        return Err(match last {
            Some(e) => anyhow::Error::new(e),
            None => anyhow::anyhow!("{address} resolves to no address"),
        });
    };
    stream.set_read_timeout(Some(HELLO_WITHIN))?;
    hello.write(&mut stream).context("sending the hello")?;
    let theirs = Hello::read(&mut stream).context("reading the hello")?;
    if let Some(why) = hello.mismatch(&theirs, Some(peer as u64), address) {
        return Ok(Err(why));
    }
    ready_for_timely(&stream)?;
    Ok(Ok(stream))
}

/// Accepts the higher-indexed processes' links until startup is over.
fn accept_from_higher(
    listener: TcpListener,
    hello: Hello,
    events: &Sender<Event>,
    done: &AtomicBool,
) {
    if let Err(e) = listener.set_nonblocking(true) {
        let _ = events.send(Event::Fatal(format!("setting up the listener: {e}")));
        return;
    }
    let mut accepted = 0;
    while !done.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, from)) => {
                accepted += 1;
                // Greet on a thread of its own: a silent client must not hold up the rest.
                let events = events.clone();
                let _ = std::thread::Builder::new()
                    .name("cluster-hello".into())
                    .spawn(move || greet_incoming(stream, from, hello, accepted, &events));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                tracing::warn!(stage = "cluster", error = %e, "Accepting a cluster connection failed.");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

/// The accepting side of the hello: reads the peer's, answers with this process's (so
/// that a mismatch is seen at both ends), then hands the link over.
fn greet_incoming(
    mut stream: TcpStream,
    from: SocketAddr,
    hello: Hello,
    accepted: u64,
    events: &Sender<Event>,
) {
    let exchanged = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(HELLO_WITHIN)))
        .and_then(|()| Hello::read(&mut stream))
        .and_then(|theirs| hello.write(&mut stream).map(|()| theirs));
    let theirs = match exchanged {
        Ok(theirs) => theirs,
        Err(e) => {
            tracing::warn!(stage = "cluster", %from, error = %e, "Ignored a connection without the cluster hello.");
            return;
        }
    };
    let event = match hello.mismatch(&theirs, None, &from.to_string()) {
        Some(why) => Event::Fatal(why),
        None => match ready_for_timely(&stream) {
            Ok(()) => Event::Linked(theirs.index as usize, stream, accepted),
            Err(e) => Event::Failed(theirs.index as usize, e.to_string()),
        },
    };
    let _ = events.send(event);
}

/// What timely's network threads expect of a socket: blocking, no timeouts, no Nagle.
fn ready_for_timely(stream: &TcpStream) -> io::Result<()> {
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    stream.set_nodelay(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(index: u64) -> Hello {
        Hello {
            processes: 3,
            workers: 2,
            index,
        }
    }

    #[test]
    fn a_hello_reads_back_and_leaves_what_follows() {
        let mut bytes = Vec::new();
        hello(2).write(&mut bytes).unwrap();
        bytes.extend_from_slice(b"timely");
        let mut reader = &bytes[..];
        assert_eq!(Hello::read(&mut reader).unwrap(), hello(2));
        assert_eq!(reader, b"timely");
        let mut wrong = [0u8; 32];
        assert!(Hello::read(&mut &wrong[..]).is_err());
        wrong[..8].copy_from_slice(&MAGIC.to_be_bytes());
        assert!(Hello::read(&mut &wrong[..24]).is_err(), "a short hello");
    }

    #[test]
    fn mismatched_clusters_are_named() {
        let me = hello(1);
        assert_eq!(me.mismatch(&hello(0), Some(0), "a:1"), None);
        assert_eq!(me.mismatch(&hello(2), None, "a:1"), None);
        let n = Hello {
            processes: 2,
            ..hello(0)
        };
        assert!(me.mismatch(&n, Some(0), "a:1").unwrap().contains("-n 2"));
        let w = Hello {
            workers: 4,
            ..hello(0)
        };
        assert!(me
            .mismatch(&w, Some(0), "a:1")
            .unwrap()
            .contains("4 workers"));
        assert!(me
            .mismatch(&hello(2), Some(0), "a:1")
            .unwrap()
            .contains("same hosts"));
        assert!(
            me.mismatch(&hello(0), None, "a:1").is_some(),
            "a lower one accepted"
        );
        assert!(
            me.mismatch(&hello(3), None, "a:1").is_some(),
            "out of range"
        );
    }

    /// Two processes of one cluster on loopback link up, whichever starts first, and the
    /// bytes after the hello reach the other side intact.
    #[test]
    fn two_processes_link_up_on_loopback() {
        // Two free ports: bound by the system, released for the processes to bind.
        let hosts: Vec<String> = [0, 1]
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let cluster = |process| Cluster {
            hosts: hosts.clone(),
            process,
            command: "test".into(),
        };
        // Process 1 first: it retries until process 0 listens.
        let one = {
            let c = cluster(1);
            std::thread::spawn(move || connect(&c, 2, Some(Duration::from_secs(20)), false))
        };
        std::thread::sleep(Duration::from_millis(300));
        let zero = connect(&cluster(0), 2, Some(Duration::from_secs(20)), false).unwrap();
        let one = one.join().unwrap().unwrap();
        assert!(zero[0].is_none() && one[1].is_none());
        zero[1].as_ref().unwrap().write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        one[0].as_ref().unwrap().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    }
}
