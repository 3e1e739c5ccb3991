//! Account changes reach live sessions. `sharefs-server user remove|passwd` edit
//! `users.json` beside the running server; a session logged in before must not outlive
//! the account or the password it logged in with. The accounts are polled (`users.json`:
//! a `stat`, parsed again only when it changed; a cluster's: its table, read whole) and
//! every live session is compared with them on each poll,
//! not only after a change: a login that checked the old file just before the change and
//! registered just after is caught by the next poll all the same.
//!
//! Quota changes need nothing here: every upload reads the owner's quota when it begins.
//!
//! A reload (SIGHUP, `systemctl reload`) re-reads the file at once, whatever its stamp,
//! logs how many accounts it has and runs the comparison without waiting for the poll.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::hub::Hub;
use crate::users::Users;

/// How often `users.json` is looked at: a removed account's sessions end within this
/// (plus the time to tell them).
pub const POLL: Duration = Duration::from_millis(250);

/// Why a session ends when its account changed (told to the client).
pub const REMOVED: &str = "your account was removed";
pub const PASSWORD_CHANGED: &str = "your password was changed; log in again";

/// Ends the sessions of removed accounts and of accounts whose password changed, every
/// `every`, until dropped (the server aborts it at shutdown).
pub async fn watch(users: Users, hub: Hub, every: Duration, reload: Arc<Notify>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last failure reported, so a broken file is logged once, not four times a second.
    let mut failing: Option<String> = None;
    loop {
        let reloading = tokio::select! {
            _ = tick.tick() => false,
            _ = reload.notified() => true,
        };
        let db = users.clone();
        let accounts = match tokio::task::spawn_blocking(move || {
            if reloading {
                match db.reload() {
                    Ok(n) => tracing::info!(accounts = n, "reloaded the accounts"),
                    Err(e) => tracing::error!(error = %e, "cannot reload the accounts"),
                }
            }
            db.accounts()
        })
        .await
        {
            Ok(Ok(accounts)) => accounts,
            Ok(Err(e)) => {
                // Nobody is logged out on a file that cannot be read: it may be fixed.
                let e = e.to_string();
                if failing.as_ref() != Some(&e) {
                    tracing::error!(error = %e, "cannot read the accounts; sessions left as they are");
                    failing = Some(e);
                }
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "account check failed");
                continue;
            }
        };
        failing = None;
        hub.end_sessions(|sink| match accounts.password_hash(&sink.user) {
            None => Some(REMOVED),
            Some(hash) if hash != sink.password_hash => Some(PASSWORD_CHANGED),
            Some(_) => None,
        });
    }
}
