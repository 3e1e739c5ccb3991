//! Session threads: every connection lives on one thread, with a single-threaded runtime
//! of its own, from accept to goodbye.
//!
//! A request is a chain of small steps (decrypt, decode, look up, read, encode, encrypt)
//! handed between tasks of its connection. On a work-stealing runtime those hand-offs wake
//! idle workers and bounce a connection between cores, which on this kind of machine costs
//! more than the steps themselves (a 4 KiB read answered from the page cache: ~15 us of a
//! ~90 us round trip). Pinning a connection to one thread keeps its hand-offs on that
//! thread; spreading connections over one thread per core keeps all cores busy when many
//! clients are. Disk work still goes to each runtime's blocking pool.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::error::{Result, ServerError};

/// Threads each session thread's runtime may start for disk work. Blocking work beyond it
/// waits its turn, so the server's threads do not grow with its connections.
const BLOCKING_THREADS: usize = 32;

/// How long shutdown waits for a thread's blocking tasks (disk writes) before leaving them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

struct Worker {
    handle: Handle,
    /// Connections placed here and not yet finished.
    load: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A fixed set of session threads; dropping it stops them (after their tasks are gone).
pub struct SessionThreads {
    workers: Vec<Worker>,
}

/// A connection's place on a session thread: frees it when dropped.
pub struct Placement {
    load: Arc<AtomicUsize>,
}

impl Drop for Placement {
    fn drop(&mut self) {
        self.load.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SessionThreads {
    /// Starts `n` threads; `0` means one per core.
    pub fn start(n: usize) -> Result<SessionThreads> {
        let n = match n {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(BLOCKING_THREADS)
                .thread_name(format!("sharefs-disk-{i}"))
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("sharefs-session-{i}"))
                .spawn(move || {
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    runtime.shutdown_timeout(SHUTDOWN_GRACE);
                })
                .map_err(|e| ServerError::Io(std::io::Error::other(e)))?;
            workers.push(Worker {
                handle,
                load: Arc::default(),
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(SessionThreads { workers })
    }

    /// The least loaded thread for a new connection.
    pub fn place(&self) -> (Handle, Placement) {
        // `start` made at least one: 0 means one per core.
        let first = &self.workers[0];
        let worker = self.workers[1..].iter().fold(first, |best, w| {
            if w.load.load(Ordering::Relaxed) < best.load.load(Ordering::Relaxed) {
                w
            } else {
                best
            }
        });
        worker.load.fetch_add(1, Ordering::Relaxed);
        let placement = Placement {
            load: worker.load.clone(),
        };
        (worker.handle.clone(), placement)
    }
}

impl Drop for SessionThreads {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_the_least_loaded_thread_and_leave_it() {
        let threads = SessionThreads::start(2).unwrap();
        let (_, a) = threads.place();
        let (_, b) = threads.place();
        let loads: Vec<_> = threads
            .workers
            .iter()
            .map(|w| w.load.load(Ordering::Relaxed))
            .collect();
        assert_eq!(loads, vec![1, 1]);
        drop(a);
        let (handle, _c) = threads.place();
        assert_eq!(threads.workers[0].load.load(Ordering::Relaxed), 1);
        assert_eq!(threads.workers[1].load.load(Ordering::Relaxed), 1);
        drop(b);
        // A task placed on a thread runs there.
        let (tx, rx) = std::sync::mpsc::channel();
        handle.spawn(async move {
            let _ = tx.send(std::thread::current().name().map(str::to_string));
        });
        let name = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(name.as_deref(), Some("sharefs-session-0"));
    }
}
