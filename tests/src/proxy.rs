//! [`StallProxy`]: a TCP proxy in front of a server that can stop forwarding, as a stalled
//! network path does: bytes already sent are held, not lost, and delivered on resume.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::TIMEOUT;

#[derive(Default)]
struct State {
    /// Forward nothing, on any connection.
    all: bool,
    /// Connections numbered below this forward nothing.
    existing_below: u64,
    /// Chunks read and not yet written on.
    held: u64,
    next_conn: u64,
    /// Every socket of both sides, to close on drop.
    sockets: Vec<TcpStream>,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct StallProxy {
    pub addr: String,
    shared: Arc<Shared>,
}

impl StallProxy {
    /// Listens on 127.0.0.1 and forwards every connection to `target`.
    pub fn new(target: &str) -> StallProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let target = target.to_string();
        let s = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if s.lock().closed {
                    return;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let conn = {
                    let mut st = s.lock();
                    st.next_conn += 1;
                    for sock in [&client, &server] {
                        if let Ok(c) = sock.try_clone() {
                            st.sockets.push(c);
                        }
                    }
                    st.next_conn - 1
                };
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let s = s.clone();
                    std::thread::spawn(move || pump(conn, from, to, &s));
                }
            }
        });
        StallProxy { addr, shared }
    }

    /// Stops forwarding on every connection, existing and new.
    pub fn stall_all(&self) {
        self.shared.lock().all = true;
    }

    /// Stops forwarding on the connections that exist now; new ones work.
    pub fn stall_existing(&self) {
        let mut st = self.shared.lock();
        st.existing_below = st.next_conn;
    }

    /// Forwards again and waits until everything held was delivered.
    pub fn resume(&self) {
        let mut st = self.shared.lock();
        st.all = false;
        st.existing_below = 0;
        self.shared.changed.notify_all();
        let (st, waited) = self
            .shared
            .changed
            .wait_timeout_while(st, TIMEOUT, |st| st.held > 0)
            .unwrap_or_else(|p| p.into_inner());
        assert!(!waited.timed_out(), "held bytes not delivered: {}", st.held);
    }
}

/// Copies `from` to `to`, holding each chunk while its connection is stalled.
fn pump(conn: u64, mut from: TcpStream, mut to: TcpStream, s: &Shared) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut st = s.lock();
        st.held += 1;
        while !st.closed && (st.all || conn < st.existing_below) {
            st = s
                .changed
                .wait_timeout(st, Duration::from_secs(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(st);
        let ok = to.write_all(&buf[..n]).is_ok();
        let mut st = s.lock();
        st.held -= 1;
        s.changed.notify_all();
        if !ok {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.closed = true;
        for sock in st.sockets.drain(..) {
            let _ = sock.shutdown(Shutdown::Both);
        }
        self.shared.changed.notify_all();
        drop(st);
        // Wake the accept loop so it sees `closed`.
        let _ = TcpStream::connect(&self.addr);
    }
}
