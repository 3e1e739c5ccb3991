//! Changes made through other nodes, pushed to this node's sessions: every change's
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

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sharefs_protocol::Event;
use tokio_postgres::AsyncMessage;

use super::{catch_up, folder_seq, pg_error, Cluster};
use crate::error::{Result, ServerError};
use crate::store::Published;

/// The channel changes are announced on.
pub const CHANNEL: &str = "sharefs_changes";

/// Where remote changes' events go: `(owner, events)`.
pub type Sink = Arc<dyn Fn(&str, Vec<Published>) + Send + Sync>;

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
        let Some(runtime) = self.inner.runtime.as_ref() else {
            return;
        };
        let cluster = self.clone();
        runtime.spawn(async move {
            loop {
                if let Err(e) = cluster.listen().await {
                    tracing::warn!(error = %e, "change feed lost; reconnecting");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
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
            .pg_config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(pg_error)?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().to_string()).is_err() {
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
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(pg_error)?;
        // Whatever was missed while not listening.
        self.catch_up_all().await;
        while let Some(payload) = rx.recv().await {
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
        let client = self.inner.pool.get().await.map_err(super::pool_error)?;
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
                let client = self.inner.pool.get().await.map_err(super::pool_error)?;
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
