//! Quota held by uploads in progress. An upload reserves its declared size against its
//! owner's quota when it begins (and more as its chunks pass what it declared), so parallel
//! uploads add up instead of each seeing the same free quota and all passing. Bytes are
//! counted as reserved until the upload commits (they then count as used), aborts, or its
//! connection ends; the check at commit, under the owner's folder lock, stays the final
//! word on what the folder may hold.
//!
//! This is the quota's counterpart of [`crate::space`], which does the same for the disk
//! reserve.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Result, ServerError};

/// Bytes reserved per user by uploads in progress. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Reservations {
    /// User -> bytes reserved. A std `Mutex`: held for one map update.
    table: Arc<Mutex<HashMap<String, u64>>>,
}

/// Bytes of one upload's owner's quota that it holds; returned on drop.
#[derive(Debug)]
pub struct Reservation {
    table: Arc<Mutex<HashMap<String, u64>>>,
    owner: String,
    bytes: u64,
}

impl Reservations {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, u64>>> {
        lock(&self.table)
    }

    /// Bytes of `owner`'s quota that uploads in progress hold.
    pub fn reserved(&self, owner: &str) -> Result<u64> {
        Ok(self.lock()?.get(owner).copied().unwrap_or(0))
    }

    /// Reserves `bytes` of `owner`'s quota, if they fit in `room` (what the quota leaves
    /// above the owner's used bytes) together with every other reservation of the owner.
    pub fn reserve(&self, owner: &str, bytes: u64, room: u64) -> Result<Reservation> {
        let mut reservation = Reservation {
            table: self.table.clone(),
            owner: owner.to_string(),
            bytes: 0,
        };
        reservation.grow(bytes, room)?;
        Ok(reservation)
    }
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Holds `more` bytes in addition, if the owner's reservations then still fit in
    /// `room`; fails with `QuotaExceeded` (keeping what is held) otherwise.
    pub fn grow(&mut self, more: u64, room: u64) -> Result<()> {
        if more == 0 {
            return Ok(());
        }
        let mut table = lock(&self.table)?;
        let held = table.entry(self.owner.clone()).or_insert(0);
        if held.saturating_add(more) > room {
            let others = *held - self.bytes;
            if *held == 0 {
                table.remove(&self.owner);
            }
            return Err(ServerError::QuotaExceeded(format!(
                "{more} bytes more do not fit: {room} bytes left under the quota, \
                 {others} of them held by other uploads in progress"
            )));
        }
        *held += more;
        self.bytes += more;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        if let Ok(mut table) = lock(&self.table) {
            if let Some(held) = table.get_mut(&self.owner) {
                *held = held.saturating_sub(self.bytes);
                if *held == 0 {
                    table.remove(&self.owner);
                }
            }
        }
    }
}

fn lock(
    table: &Mutex<HashMap<String, u64>>,
) -> Result<std::sync::MutexGuard<'_, HashMap<String, u64>>> {
    table
        .lock()
        .map_err(|_| ServerError::Internal("the quota reservation lock was poisoned".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_add_up_per_user_and_are_returned() {
        let r = Reservations::default();
        let a = r.reserve("alice", 600, 1000).expect("fits");
        assert!(matches!(
            r.reserve("alice", 600, 1000),
            Err(ServerError::QuotaExceeded(_))
        ));
        let bob = r.reserve("bob", 600, 1000).expect("another user's quota");
        assert_eq!(r.reserved("alice").expect("reserved"), 600);
        drop(a);
        let mut b = r.reserve("alice", 600, 1000).expect("returned on drop");
        assert!(b.grow(500, 1000).is_err());
        assert_eq!(b.bytes(), 600, "a failed grow keeps what was held");
        b.grow(400, 1000).expect("fits exactly");
        drop((b, bob));
        assert_eq!(r.reserved("alice").expect("reserved"), 0);
        assert!(r.lock().expect("lock").is_empty());
    }
}
