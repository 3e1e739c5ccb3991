//! Download notifications on the desktop: each one pushed by the server becomes a
//! freedesktop notification (notify-rust over D-Bus), is logged, and is acknowledged once
//! shown. With no D-Bus or no notification daemon it is logged and still acknowledged, so
//! the server stops re-sending it; the mount works on regardless.

use std::collections::HashSet;
use std::time::{Duration, UNIX_EPOCH};

use sharefs_protocol::Notification;

use crate::connection::Connection;

/// Longest we wait for the notification daemon before giving up on showing one.
const SHOW_TIMEOUT: Duration = Duration::from_secs(5);

fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Summary and body of the desktop notification.
pub fn texts(n: &Notification) -> (String, String) {
    let summary = format!("{} downloaded {}", n.downloader, n.file);
    let when = humantime::format_rfc3339_seconds(
        UNIX_EPOCH + Duration::from_millis(n.last_ms.max(0) as u64),
    );
    let mut body = format!("{}, {}", human_size(n.size), when);
    if n.count > 1 {
        body.push_str(&format!(" ({} times)", n.count));
    }
    (summary, body)
}

/// Shows notifications and acknowledges them, each id once.
#[derive(Default)]
pub struct Notifier {
    shown: HashSet<u64>,
}

impl Notifier {
    pub async fn handle(&mut self, conn: &Connection, n: Notification) {
        if self.shown.insert(n.id) {
            let (summary, body) = texts(&n);
            tracing::info!(id = n.id, "{summary} ({body})");
            let show = tokio::task::spawn_blocking(move || {
                notify_rust::Notification::new()
                    .appname("sharefs")
                    .summary(&summary)
                    .body(&body)
                    .icon("folder-remote")
                    .show()
                    .map(|_| ())
            });
            match tokio::time::timeout(SHOW_TIMEOUT, show).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::warn!(error = %e, "no desktop notification shown (logged only)")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "notification task failed"),
                Err(_) => tracing::warn!("notification daemon did not answer; logged only"),
            }
        }
        if let Err(e) = conn.ack(vec![n.id]).await {
            tracing::warn!(id = n.id, error = %e, "cannot acknowledge notification; it will come again");
            self.shown.remove(&n.id);
        }
    }
}
