//! [`Cutoff`]: the point after which a request must have no effect.
//!
//! A client gives up on a request at its deadline and tells the user it failed; a request
//! still queued somewhere (a stalled network, a stopped server) must then never run. Each
//! request carries its deadline, measured on the server's monotonic clock from the
//! server's `Hello`, which the client received after it was sent, so the server's reading
//! is never behind the client's. And a reconnecting client fences its older connections,
//! so a request it retries on the new one cannot also run from the old one. A mutation
//! checks its cutoff under the folder's lock, right before its change is made durable:
//! past that check it completes; before it, it has no effect.
//!
//! The cutoff also carries whether the client lets the change be answered before it
//! reaches the disk (`lazy`, see the protocol): the change still happens in full or not
//! at all, only its fdatasync is shared with a later one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Result, ServerError};

#[derive(Debug, Clone, Default)]
pub struct Cutoff {
    deadline: Option<Instant>,
    /// Set when a newer connection of the same client logged in.
    fenced: Option<Arc<AtomicBool>>,
    /// The answer need not wait for the disk.
    lazy: bool,
}

impl Cutoff {
    /// No cutoff: the request runs whenever it arrives (local tools, old clients).
    pub const NONE: Cutoff = Cutoff {
        deadline: None,
        fenced: None,
        lazy: false,
    };

    pub fn new(deadline: Option<Instant>, fenced: Arc<AtomicBool>) -> Cutoff {
        Cutoff {
            deadline,
            fenced: Some(fenced),
            lazy: false,
        }
    }

    /// The same cutoff, for a change whose answer need not wait for the disk.
    pub fn lazy(self, lazy: bool) -> Cutoff {
        Cutoff { lazy, ..self }
    }

    /// Whether the change may be answered before it is durable.
    pub fn is_lazy(&self) -> bool {
        self.lazy
    }

    /// Fails with `Expired` once the request must no longer run.
    pub fn check(&self) -> Result<()> {
        if self
            .fenced
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst))
        {
            return Err(ServerError::Expired(
                "its connection was replaced by a newer one of the same client".into(),
            ));
        }
        match self.deadline {
            Some(d) if Instant::now() > d => Err(ServerError::Expired(format!(
                "its deadline passed {} ms ago",
                Instant::now().duration_since(d).as_millis()
            ))),
            _ => Ok(()),
        }
    }
}
