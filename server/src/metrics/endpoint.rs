//! `GET /metrics` over HTTP/1, answered and closed: all a Prometheus scraper needs, so no
//! HTTP framework. Like any listener it is bounded: a few scrapes at once (more are
//! closed at once), a request head of at most [`MAX_HEAD`] bytes read within
//! [`HEAD_TIMEOUT`], the answer written within [`WRITE_TIMEOUT`].

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::shared::Shared;

/// Scrapes answered at once.
pub const MAX_SCRAPES: usize = 4;
/// Largest request head read; a longer one is refused.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a scraper has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a scraper has to take the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers scrapes on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, shared: Shared, mut stop: watch::Receiver<bool>) {
    let busy = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    if crate::ratelog::CONNECTIONS.allow() {
                        tracing::warn!(error = %e, "metrics: accept failed; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = busy.clone().try_acquire_owned() else {
            // Dropping the stream closes it: the scraper retries at its next interval.
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &shared).await {
                tracing::debug!(%peer, error = %e, "metrics scrape failed");
            }
            drop(permit);
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Metrics { head_only: bool },
    NotFound,
    BadMethod,
    Bad,
}

fn parse(head: &[u8]) -> Asked {
    let Some(line) = head.split(|&b| b == b'\n').next() else {
        return Asked::Bad;
    };
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Asked::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Asked::Bad;
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => Asked::Metrics { head_only: false },
        ("HEAD", "/metrics") => Asked::Metrics { head_only: true },
        ("GET" | "HEAD", _) => Asked::NotFound,
        _ => Asked::BadMethod,
    }
}

/// Reads the request head, up to its blank line, within the bounds.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if head.len() >= MAX_HEAD {
                return Ok(false);
            }
            let room = (MAX_HEAD - head.len()).min(buf.len());
            let n = stream.read(&mut buf[..room]).await?;
            if n == 0 {
                return Ok(false);
            }
            head.extend_from_slice(&buf[..n]);
        }
    };
    match tokio::time::timeout(HEAD_TIMEOUT, read).await {
        Ok(Ok(true)) => Ok(Some(head)),
        Ok(Ok(false)) | Err(_) => Ok(None),
        Ok(Err(e)) => Err(e),
    }
}

async fn answer(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let Some(head) = read_head(&mut stream).await? else {
        return respond(
            &mut stream,
            "400 Bad Request",
            "text/plain",
            b"bad request\n",
        )
        .await;
    };
    match parse(&head) {
        Asked::Metrics { head_only } => {
            let scraping = shared.clone();
            let text = tokio::task::spawn_blocking(move || scraping.metrics.scrape(&scraping))
                .await
                .map_err(std::io::Error::other)?;
            let body = if head_only { &[][..] } else { text.as_bytes() };
            let length = text.len();
            respond_with_length(&mut stream, "200 OK", CONTENT_TYPE, body, length).await
        }
        Asked::NotFound => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                b"try /metrics\n",
            )
            .await
        }
        Asked::BadMethod => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                b"GET only\n",
            )
            .await
        }
        Asked::Bad => {
            respond(
                &mut stream,
                "400 Bad Request",
                "text/plain",
                b"bad request\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    respond_with_length(stream, status, content_type, body, body.len()).await
}

async fn respond_with_length(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    length: usize,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Asked::Metrics { head_only: false }
        );
        assert_eq!(
            parse(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Asked::Metrics { head_only: false }
        );
        assert_eq!(
            parse(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Asked::Metrics { head_only: true }
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(parse(b"POST /metrics HTTP/1.1\r\n\r\n"), Asked::BadMethod);
        assert_eq!(parse(b"GET /metrics\r\n\r\n"), Asked::Bad);
        assert_eq!(parse(b"\x16\x03\x01 garbage"), Asked::Bad);
    }
}
