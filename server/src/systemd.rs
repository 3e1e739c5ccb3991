//! Tells systemd how the service is doing (`Type=notify`): READY=1 once the listener is
//! bound and the data directory open, STOPPING=1 when shutdown begins, RELOADING=1 never
//! (a reload only re-reads the accounts, at once). Outside systemd (no `NOTIFY_SOCKET`)
//! nothing is sent.

pub use sd_notify::NotifyState;

/// Sends `state` to the service manager, if there is one; a failure is only logged: the
/// server serves on regardless.
pub fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
