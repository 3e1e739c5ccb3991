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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Result, ServerError};

#[derive(Debug, Clone, Default)]
pub struct Cutoff {
    deadline: Option<Instant>,
    /// Set when a newer connection of the same client logged in.
    fenced: Option<Arc<AtomicBool>>,
}

impl Cutoff {
    /// No cutoff: the request runs whenever it arrives (local tools, old clients).
    pub const NONE: Cutoff = Cutoff {
        deadline: None,
        fenced: None,
    };

    pub fn new(deadline: Option<Instant>, fenced: Arc<AtomicBool>) -> Cutoff {
        Cutoff {
            deadline,
            fenced: Some(fenced),
        }
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
