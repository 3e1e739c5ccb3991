//! A client driven by hand, for attack tests: it sends what it likes when it likes, and reads
//! replies only when told to. Plaintext servers only (`--plaintext`).

use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use sharefs_protocol::{
    ClientMessage, ErrorBody, ErrorCode, Frame, FrameCodec, Reply, Request, ServerMessage,
    DEFAULT_MAX_FRAME, MAGIC, VERSION,
};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use crate::{PASSWORD, TIMEOUT};

pub struct RawClient {
    pub framed: Framed<TcpStream, FrameCodec>,
    next_id: u64,
}

/// A TCP connection from a given loopback source address.
pub async fn connect_from(src: [u8; 4], addr: &str) -> std::io::Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(std::net::SocketAddr::from((src, 0)))?;
    sock.connect(addr.parse().map_err(std::io::Error::other)?)
        .await
}

impl RawClient {
    /// Connects from 127.0.0.1 and logs in as `user` with the test password.
    pub async fn login(addr: &str, user: &str) -> RawClient {
        let stream = TcpStream::connect(addr).await.unwrap();
        Self::login_on(stream, user, PASSWORD).await.unwrap()
    }

    /// Hello and login on `stream`; the server's error if it refuses.
    pub async fn login_on(
        stream: TcpStream,
        user: &str,
        password: &str,
    ) -> Result<RawClient, ErrorBody> {
        let mut raw = Self::hello(stream).await?;
        raw.send_message(&ClientMessage::Login {
            user: user.into(),
            password: password.into(),
            client: None,
        })
        .await;
        match raw.recv().await {
            Some((ServerMessage::LoginOk { .. }, _)) => Ok(raw),
            Some((ServerMessage::Error { error, .. }, _)) => Err(error),
            Some((other, _)) => panic!("unexpected login answer {other:?}"),
            None => Err(closed()),
        }
    }

    /// Connects and says hello, nothing more.
    pub async fn hello(stream: TcpStream) -> Result<RawClient, ErrorBody> {
        Self::hello_as(stream, VERSION).await
    }

    /// Says hello claiming protocol `version`.
    pub async fn hello_as(stream: TcpStream, version: u32) -> Result<RawClient, ErrorBody> {
        let mut raw = RawClient {
            framed: Framed::new(stream, FrameCodec::new(DEFAULT_MAX_FRAME)),
            next_id: 1,
        };
        raw.send_message(&ClientMessage::Hello {
            magic: MAGIC.into(),
            version,
            max_frame: DEFAULT_MAX_FRAME,
        })
        .await;
        match raw.recv().await {
            Some((ServerMessage::Hello { .. }, _)) => Ok(raw),
            Some((ServerMessage::Error { error, .. }, _)) => Err(error),
            Some((other, _)) => panic!("unexpected hello answer {other:?}"),
            None => Err(closed()),
        }
    }

    pub async fn send_message(&mut self, msg: &ClientMessage) {
        let frame = Frame::new(msg, Bytes::new()).unwrap();
        // A connection the server closed shows at the next read.
        let _ = within("send", self.framed.send(frame)).await;
    }

    /// Queues a request without flushing; returns its id.
    pub async fn feed(&mut self, op: Request, payload: Bytes) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let msg = ClientMessage::Request {
            id,
            deadline_ms: None,
            lazy: false,
            op,
        };
        let frame = Frame::new(&msg, payload).unwrap();
        // A connection the server closed shows at the next read.
        let _ = self.framed.feed(frame).await;
        id
    }

    pub async fn flush(&mut self) {
        let _ = within("flush", self.framed.flush()).await;
    }

    /// Flushes for at most `limit`: a server that stopped reading may never take it all.
    pub async fn flush_for(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.framed.flush()).await;
    }

    /// The next message from the server; `None` when the connection is closed.
    pub async fn recv(&mut self) -> Option<(ServerMessage, Bytes)> {
        match within("a message", self.framed.next()).await {
            Some(Ok(frame)) => Some((frame.message().unwrap(), frame.payload)),
            Some(Err(_)) | None => None,
        }
    }

    /// Sends `ops` pipelined (500 at a time) and returns their answers in order.
    pub async fn pipeline(&mut self, ops: Vec<(Request, Bytes)>) -> Vec<Result<Reply, ErrorBody>> {
        let mut answers = Vec::with_capacity(ops.len());
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() {
            let mut ids = std::collections::HashMap::new();
            for (op, payload) in ops.by_ref().take(500) {
                let id = self.feed(op, payload).await;
                ids.insert(id, answers.len());
                answers.push(None);
            }
            self.flush().await;
            while !ids.is_empty() {
                let (id, answer) = match self.recv().await {
                    Some((ServerMessage::Response { id, reply }, _)) => (id, Ok(reply)),
                    Some((
                        ServerMessage::Error {
                            id: Some(id),
                            error,
                        },
                        _,
                    )) => (id, Err(error)),
                    Some(_) => continue,
                    None => panic!("connection closed with {} requests unanswered", ids.len()),
                };
                if let Some(i) = ids.remove(&id) {
                    answers[i] = Some(answer);
                }
            }
        }
        answers.into_iter().flatten().collect()
    }

    /// Sends one request and waits for its answer (skipping events and other replies).
    pub async fn call(&mut self, op: Request, payload: Bytes) -> Result<(Reply, Bytes), ErrorBody> {
        let id = self.feed(op, payload).await;
        self.flush().await;
        loop {
            match self.recv().await {
                Some((ServerMessage::Response { id: got, reply }, payload)) if got == id => {
                    return Ok((reply, payload))
                }
                Some((
                    ServerMessage::Error {
                        id: Some(got),
                        error,
                    },
                    _,
                )) if got == id => return Err(error),
                Some(_) => {}
                None => return Err(closed()),
            }
        }
    }
}

impl RawClient {
    /// The id of `owner`'s entry at `path`, or 0 (which names no entry) if it cannot be
    /// resolved.
    pub async fn id_of(&mut self, owner: &str, path: &str) -> u64 {
        let op = Request::Resolve {
            owner: owner.into(),
            path: path.into(),
        };
        match self.call(op, Bytes::new()).await {
            Ok((sharefs_protocol::Reply::File { file }, _)) => file.id,
            _ => 0,
        }
    }

    /// Pipelines `n` opens of `owner`'s file `id` (no head: each keeps a handle) and
    /// counts the successes and the `too_many_open` refusals.
    pub async fn open_many(&mut self, owner: &str, id: u64, n: usize) -> (usize, usize) {
        for _ in 0..n {
            let op = Request::Open {
                owner: owner.into(),
                id,
                head: 0,
            };
            self.feed(op, Bytes::new()).await;
        }
        self.flush().await;
        let (mut opened, mut refused) = (0, 0);
        while opened + refused < n {
            match self.recv().await {
                Some((ServerMessage::Response { reply, .. }, _)) => {
                    assert!(matches!(reply, Reply::Opened { handle, .. } if handle != 0));
                    opened += 1;
                }
                Some((ServerMessage::Error { id: Some(_), error }, _)) => {
                    assert_eq!(error.code, ErrorCode::TooManyOpen, "{error:?}");
                    refused += 1;
                }
                Some(_) => {}
                None => panic!("connection closed while opening"),
            }
        }
        (opened, refused)
    }

    /// The next pushed event within `limit`, skipping other messages; `None` if none came.
    pub async fn event_within(&mut self, limit: Duration) -> Option<sharefs_protocol::Event> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let next = tokio::time::timeout_at(deadline, self.framed.next()).await;
            match next {
                Ok(Some(Ok(frame))) => {
                    if let Ok(ServerMessage::Event { event }) = frame.message() {
                        return Some(event);
                    }
                }
                Ok(_) | Err(_) => return None,
            }
        }
    }
}

/// What [`RawClient::call`] and the handshake return when the server closed the
/// connection instead of answering.
fn closed() -> ErrorBody {
    ErrorBody::new(ErrorCode::ProtocolError, "connection closed")
}

async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(TIMEOUT.min(Duration::from_secs(60)), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}
