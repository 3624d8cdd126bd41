//! A helper thread serving one timely operator: jobs go in, in order; results come back
//! in the same order, and each one wakes the operator through timely's `SyncActivator`.
//! The worker thread neither blocks on the job nor spins waiting for its result. Used by
//! the embed stage (fetch and decode ahead of the CNN) and the statistics stage (the PCA
//! and KMeans fit off worker 0's thread).

use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use timely::scheduling::SyncActivator;

/// The operator's end of a helper thread taking `J` jobs and giving `R` results.
pub struct Background<J, R> {
    name: &'static str,
    jobs: Sender<J>,
    done: Receiver<R>,
    /// A result taken off the channel by [`Background::has_next`], not yet consumed.
    peeked: Option<R>,
}

impl<J: Send + 'static, R: Send + 'static> Background<J, R> {
    /// Starts the thread; `work` runs on it for each job, in submission order. The
    /// thread ends when this handle is dropped (with the operator).
    pub fn start(
        name: &'static str,
        wake: SyncActivator,
        mut work: impl FnMut(J) -> R + Send + 'static,
    ) -> Self {
        let (jobs, inbox) = channel::<J>();
        let (outbox, done) = channel();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // Wakes the operator however the thread ends, a panic included, so the
                // operator sees the closed channel instead of waiting forever. Locals drop
                // in reverse order: `outbox` closes first, then the guard wakes.
                let _wake = WakeOnExit(&wake);
                let outbox = outbox;
                for job in inbox {
                    if outbox.send(work(job)).is_err() || wake.activate().is_err() {
                        break;
                    }
                }
            })
            .unwrap_or_else(|e| panic!("spawning the {name} thread: {e}"));
        Background {
            name,
            jobs,
            done,
            peeked: None,
        }
    }

    /// Queues a job. If the thread has died, the next [`Background::try_next`] says so.
    pub fn submit(&self, job: J) {
        let _ = self.jobs.send(job);
    }

    /// The next result, if it is ready.
    pub fn try_next(&mut self) -> Option<R> {
        self.peeked.take().or_else(|| self.receive())
    }

    /// Whether the next result is ready.
    pub fn has_next(&mut self) -> bool {
        if self.peeked.is_none() {
            self.peeked = self.receive();
        }
        self.peeked.is_some()
    }

    fn receive(&self) -> Option<R> {
        match self.done.try_recv() {
            Ok(result) => Some(result),
            Err(TryRecvError::Empty) => None,
            // Only a panic ends the thread while its handle lives: fail loudly rather than
            // hold the operator's capabilities forever.
            Err(TryRecvError::Disconnected) => {
                panic!("the {} thread stopped (see its panic above)", self.name)
            }
        }
    }
}

/// Activates the operator when dropped.
struct WakeOnExit<'a>(&'a SyncActivator);

impl Drop for WakeOnExit<'_> {
    fn drop(&mut self) {
        let _ = self.0.activate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    /// Waits (briefly yielding) for the next result.
    fn next<J: Send + 'static, R: Send + 'static>(bg: &mut Background<J, R>) -> R {
        loop {
            if let Some(r) = bg.try_next() {
                return r;
            }
            std::thread::yield_now();
        }
    }

    #[test]
    fn results_come_back_in_order_and_a_dead_thread_is_reported() {
        timely::execute_directly(|worker| {
            let wake = worker.sync_activator_for(vec![0]);
            let mut bg = Background::start("doubling", wake, |x: u64| {
                assert_ne!(x, 99, "job 99 fails");
                x * 2
            });
            for x in 0..50 {
                bg.submit(x);
            }
            let mut got = vec![next(&mut bg)];
            while !bg.has_next() {
                std::thread::yield_now();
            }
            got.extend((1..50).map(|_| next(&mut bg)));
            assert_eq!(got, (0..50).map(|x| x * 2).collect::<Vec<_>>());

            // A job that panics kills the thread; the operator's next look says so
            // instead of waiting forever.
            bg.submit(99);
            let outcome = catch_unwind(AssertUnwindSafe(|| next(&mut bg)));
            let payload = outcome.expect_err("a dead helper thread is an error");
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_default();
            assert!(message.contains("doubling thread stopped"), "{message}");
        });
    }
}
