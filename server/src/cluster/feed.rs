//! Changes and download notifications made through other nodes, pushed to this node's
//! sessions.
//!
//! Changes: every change's
//! transaction sends `NOTIFY sharefs_changes, '<seq> <owner>'`; each node LISTENs on a
//! connection of its own and, for a tree it has cached, catches up on the changes it
//! missed and hands their events to the sink (the hub, which pushes them to the sessions
//! that may see them, so their clients' caches are invalidated). The notification
//! carries only the ids; the rows carry the data.
//!
//! Catching up anywhere (a read, a change, this feed) reports the events it applies, so
//! whichever comes first, each remote change reaches the sessions once. A tree reloaded
//! whole (this node fell too far behind) reports `Resync`. When the listening connection
//! is lost, the node catches up every cached tree once it is back.
//!
//! Notifications: a node that records one announces `NOTIFY sharefs_notes, '<node> <id>'`
//! and pushes it to its own sessions; the others read the row and hand it to the note
//! sink (the hub, which pushes it to the owner's sessions here). One missed while the
//! listening connection was down is not lost: it stays pending, and the owner's client
//! gets it at its next login.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sharefs_protocol::{Event, Notification};
use tokio_postgres::AsyncMessage;

use super::{catch_up, folder_seq, notes, pg_error, Cluster};
use crate::error::{Result, ServerError};
use crate::store::Published;

/// The channel changes are announced on.
pub const CHANNEL: &str = "sharefs_changes";

/// Where remote changes' events go: `(owner, events)`.
pub type Sink = Arc<dyn Fn(&str, Vec<Published>) + Send + Sync>;

/// Where notifications recorded by other nodes go.
pub type NoteSink = Arc<dyn Fn(Notification) + Send + Sync>;

/// The events that tell sessions to drop everything they cached of a tree.
pub fn resync() -> Published {
    Published {
        owner: Event::Resync,
        others: Some(Event::Resync),
    }
}

impl Cluster {
    /// Hands the events of changes made through other nodes to `sink`, from now on.
    pub fn start_feed(&self, sink: Sink) {
        if let Ok(mut s) = self.inner.sink.lock() {
            *s = Some(sink);
        }
        let cluster = self.clone();
        self.inner.db.spawn(async move {
            loop {
                if let Err(e) = cluster.listen().await {
                    tracing::warn!(error = %e, "change feed lost; reconnecting");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// Hands the notifications recorded by other nodes to `sink`, from now on (the feed
    /// itself runs once [`Cluster::start_feed`] is called).
    pub fn deliver_notes(&self, sink: NoteSink) {
        if let Ok(mut s) = self.inner.note_sink.lock() {
            *s = Some(sink);
        }
    }

    /// Gives `events` of `owner`'s tree to the sink, if any.
    pub(crate) fn announce(&self, owner: &str, events: Vec<Published>) {
        if events.is_empty() {
            return;
        }
        let sink = self.inner.sink.lock().ok().and_then(|s| s.clone());
        if let Some(sink) = sink {
            sink(owner, events);
        }
    }

    /// Listens until the connection is lost.
    async fn listen(&self) -> Result<()> {
        let (client, mut connection) = self
            .inner
            .db
            .config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(pg_error)?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        let message = (n.channel().to_string(), n.payload().to_string());
                        if tx.send(message).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "change feed connection failed");
                        break;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {}", notes::CHANNEL))
            .await
            .map_err(pg_error)?;
        // Whatever was missed while not listening.
        self.catch_up_all().await;
        while let Some((channel, payload)) = rx.recv().await {
            if channel == notes::CHANNEL {
                self.note_announced(&payload).await;
                continue;
            }
            let Some((seq, owner)) = payload.split_once(' ') else {
                continue;
            };
            let Ok(seq) = seq.parse::<i64>() else {
                continue;
            };
            if let Err(e) = self.caught_up_to(owner, seq).await {
                tracing::warn!(owner, error = %e, "cannot catch up on a change");
            }
        }
        driver.abort();
        Err(ServerError::Backend(
            "the change feed's connection ended".into(),
        ))
    }

    /// Pushes the notification an announcement names, unless this node recorded it.
    async fn note_announced(&self, payload: &str) {
        let Some((node, id)) = payload.split_once(' ') else {
            return;
        };
        let (Ok(node), Ok(id)) = (node.parse::<u64>(), id.parse::<i64>()) else {
            return;
        };
        if node == self.inner.db.node {
            return;
        }
        let Some(sink) = self.inner.note_sink.lock().ok().and_then(|s| s.clone()) else {
            return;
        };
        let fetched = async {
            let client = self.inner.db.client().await?;
            notes::fetch(&client, id).await
        }
        .await;
        match fetched {
            Ok(Some(n)) => sink(n),
            // Folded or trimmed meanwhile: its digest or the next login tells.
            Ok(None) => {}
            Err(e) => tracing::warn!(id, error = %e, "cannot read an announced notification"),
        }
    }

    /// Brings the cached tree of `owner`, if any, to at least `seq`, announcing what that
    /// applies.
    async fn caught_up_to(&self, owner: &str, seq: i64) -> Result<()> {
        let Some(folder) = self
            .inner
            .folders
            .lock()
            .ok()
            .and_then(|f| f.get(owner).cloned())
        else {
            return Ok(());
        };
        let mut cached = folder.lock().await;
        if cached.seq < 0 || cached.seq >= seq {
            return Ok(());
        }
        let client = self.inner.db.pool.get().await.map_err(super::pool_error)?;
        let events = catch_up(&client, owner, &mut cached, seq).await?;
        drop(cached);
        self.announce(owner, events);
        Ok(())
    }

    /// Catches up every cached tree (after the feed was down).
    async fn catch_up_all(&self) {
        let owners: Vec<String> = self
            .inner
            .folders
            .lock()
            .map(|f| f.keys().cloned().collect())
            .unwrap_or_default();
        for owner in owners {
            let seq = async {
                let client = self.inner.db.pool.get().await.map_err(super::pool_error)?;
                folder_seq(&client, &owner).await
            }
            .await;
            match seq {
                Ok(Some(seq)) => {
                    if let Err(e) = self.caught_up_to(&owner, seq).await {
                        tracing::warn!(owner, error = %e, "cannot catch up a tree");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(owner, error = %e, "cannot catch up a tree"),
            }
        }
    }
}
