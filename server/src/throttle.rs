//! Login throttling, per address and per (address, user name): the first few failures cost
//! nothing, then each answer is delayed more (doubling up to a cap), and after enough
//! failures the key is refused outright for a while.
//!
//! An attempt counts from the moment it starts ([`LoginThrottle::attempt`]), before its
//! password is checked: while the failures and the attempts still being checked would
//! reach the lockout, a new attempt waits for its turn ([`Refusal::Wait`]) instead of
//! being checked, so guesses sent in parallel are throttled like guesses sent one after
//! another, while parallel logins with the right password (a client opening several
//! connections) just take turns. A success clears only the (address, user) record:
//! logging into one's own account does not reset what an address has failed on others. No record is kept per user name alone, so failures from other
//! addresses never lock a user out of an address that has not failed.
//!
//! The table holds a fixed number of records (user names are validated, at most 32 bytes,
//! before they get here); when it is full, expired records go first, then the oldest.
//! IPv6 addresses are counted per /64, the block one host usually has to itself.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

#[derive(Debug, Clone)]
pub struct LoginPolicy {
    /// Failures answered without delay.
    pub free_failures: u32,
    /// Delay after the first non-free failure; doubles with each further one.
    pub delay_base: Duration,
    pub delay_max: Duration,
    /// Failures after which the key is refused for `lockout`.
    pub lockout_after: u32,
    pub lockout: Duration,
    /// Records kept at most (each well under 100 bytes).
    pub capacity: usize,
}

impl Default for LoginPolicy {
    fn default() -> Self {
        LoginPolicy {
            free_failures: 3,
            delay_base: Duration::from_millis(250),
            delay_max: Duration::from_secs(4),
            lockout_after: 10,
            lockout: Duration::from_secs(60),
            capacity: 65_536,
        }
    }
}

/// An address as counted: IPv4 whole, IPv6 by its /64 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Addr(u128);

impl Addr {
    fn of(ip: IpAddr) -> Addr {
        match ip {
            IpAddr::V4(v4) => Addr(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Addr(u128::from(u32::from(v4))),
                None => Addr(u128::from(v6) & !((1u128 << 64) - 1) | (1 << 32)),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Addr(Addr),
    AddrUser(Addr, String),
}

fn keys(ip: IpAddr, user: &str) -> [Key; 2] {
    let addr = Addr::of(ip);
    [Key::Addr(addr), Key::AddrUser(addr, user.to_string())]
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    /// Attempts started and not yet decided.
    pending: u32,
    last: Instant,
    /// Which entry of `Table::order` is this record's.
    seq: u64,
}

/// Records and their order of creation, for evicting the oldest.
#[derive(Debug, Default)]
struct Table {
    records: HashMap<Key, Record>,
    /// Keys in order of creation, with the `seq` they were created under; an entry whose
    /// record was removed or re-created since is stale and skipped.
    order: VecDeque<(Key, u64)>,
    next_seq: u64,
}

impl Table {
    fn make_room(&mut self, capacity: usize, lockout: Duration, now: Instant) {
        if self.records.len() < capacity {
            return;
        }
        self.records
            .retain(|_, r| now.duration_since(r.last) < lockout);
        while self.records.len() >= capacity {
            let Some((key, seq)) = self.order.pop_front() else {
                break;
            };
            if self.records.get(&key).is_some_and(|r| r.seq == seq) {
                self.records.remove(&key);
            }
        }
        self.compact_order();
    }

    /// Drops stale entries of `order` once they outnumber the records, so it stays within
    /// twice the table's size.
    fn compact_order(&mut self) {
        if self.order.len() > 2 * self.records.len() + 64 {
            let records = &self.records;
            self.order
                .retain(|(k, seq)| records.get(k).is_some_and(|r| r.seq == *seq));
        }
    }

    fn entry(&mut self, key: Key, now: Instant) -> &mut Record {
        let seq = self.next_seq;
        let order = &mut self.order;
        let record = self.records.entry(key).or_insert_with_key(|key| {
            order.push_back((key.clone(), seq));
            Record {
                failures: 0,
                pending: 0,
                last: now,
                seq,
            }
        });
        if record.seq == seq {
            self.next_seq += 1;
        }
        record
    }
}

#[derive(Debug)]
pub struct LoginThrottle {
    policy: LoginPolicy,
    /// std `Mutex`: map updates only, never held across an await.
    table: Mutex<Table>,
    /// Woken whenever an attempt is decided, for attempts waiting for their turn.
    turn: Notify,
}

/// Why an attempt may not start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Locked out for this long.
    Locked(Duration),
    /// Attempts being checked might reach the lockout: wait for one to be decided
    /// ([`LoginThrottle::turn`]) and try again.
    Wait,
}

impl LoginThrottle {
    pub fn new(policy: LoginPolicy) -> Self {
        LoginThrottle {
            policy,
            table: Mutex::new(Table::default()),
            turn: Notify::new(),
        }
    }

    /// Completes when an attempt has been decided since it was enabled: create and
    /// enable it before [`LoginThrottle::attempt`], await it after a [`Refusal::Wait`].
    pub fn turn(&self) -> tokio::sync::futures::Notified<'_> {
        self.turn.notified()
    }

    fn live(&self, r: &Record, now: Instant) -> bool {
        now.duration_since(r.last) < self.policy.lockout
    }

    /// Starts a login attempt: refused if the address, or this user from this address, is
    /// locked out now, or must wait while the attempts being checked might lock it out;
    /// otherwise counted until it is decided ([`LoginThrottle::failed`],
    /// [`LoginThrottle::succeeded`], [`LoginThrottle::withdraw`]).
    pub fn attempt(&self, ip: IpAddr, user: &str) -> Result<(), Refusal> {
        let now = Instant::now();
        let Ok(mut table) = self.table.lock() else {
            return Err(Refusal::Locked(self.policy.lockout));
        };
        let keys = keys(ip, user);
        let mut wait = false;
        for key in &keys {
            if let Some(r) = table.records.get(key) {
                let failures = if self.live(r, now) { r.failures } else { 0 };
                if failures >= self.policy.lockout_after {
                    return Err(Refusal::Locked(
                        self.policy
                            .lockout
                            .saturating_sub(now.duration_since(r.last)),
                    ));
                }
                wait |= failures + r.pending >= self.policy.lockout_after;
            }
        }
        if wait {
            return Err(Refusal::Wait);
        }
        table.make_room(
            self.policy.capacity.saturating_sub(1),
            self.policy.lockout,
            now,
        );
        for key in keys {
            let lockout = self.policy.lockout;
            let r = table.entry(key, now);
            if now.duration_since(r.last) >= lockout {
                r.failures = 0;
            }
            r.pending += 1;
            r.last = now;
        }
        Ok(())
    }

    /// The attempt failed: how long to wait before answering it.
    pub fn failed(&self, ip: IpAddr, user: &str) -> Duration {
        let now = Instant::now();
        let worst = {
            let Ok(mut table) = self.table.lock() else {
                return self.policy.delay_max;
            };
            let mut worst = 0;
            for key in keys(ip, user) {
                let r = table.entry(key, now);
                r.pending = r.pending.saturating_sub(1);
                r.failures += 1;
                r.last = now;
                worst = worst.max(r.failures);
            }
            worst
        };
        self.turn.notify_waiters();
        if worst <= self.policy.free_failures {
            return Duration::ZERO;
        }
        let doublings = (worst - self.policy.free_failures - 1).min(16);
        (self.policy.delay_base * 2u32.pow(doublings)).min(self.policy.delay_max)
    }

    /// The attempt succeeded: this user's record from this address is cleared, and the
    /// attempt is no longer pending on the address's.
    pub fn succeeded(&self, ip: IpAddr, user: &str) {
        if let Ok(mut table) = self.table.lock() {
            let [addr, addr_user] = keys(ip, user);
            table.records.remove(&addr_user);
            if let Some(r) = table.records.get_mut(&addr) {
                r.pending = r.pending.saturating_sub(1);
            }
            table.compact_order();
        }
        self.turn.notify_waiters();
    }

    /// The attempt was not decided (the server failed): it is taken back.
    pub fn withdraw(&self, ip: IpAddr, user: &str) {
        if let Ok(mut table) = self.table.lock() {
            for key in keys(ip, user) {
                if let Some(r) = table.records.get_mut(&key) {
                    r.pending = r.pending.saturating_sub(1);
                }
            }
        }
        self.turn.notify_waiters();
    }

    /// Records held now.
    pub fn len(&self) -> usize {
        self.table.lock().map_or(0, |t| t.records.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A failed attempt: its delay, or `None` if it was refused.
    fn fail(t: &LoginThrottle, ip: IpAddr, user: &str) -> Option<Duration> {
        t.attempt(ip, user).ok()?;
        Some(t.failed(ip, user))
    }

    #[test]
    fn delays_grow_then_lock_out_only_that_address() {
        let t = LoginThrottle::new(LoginPolicy {
            lockout: Duration::from_secs(3600),
            ..LoginPolicy::default()
        });
        let a = ip("10.0.0.1");
        let delays: Vec<Duration> = (0..9).map(|_| fail(&t, a, "alice").unwrap()).collect();
        assert_eq!(delays[0], Duration::ZERO);
        assert_eq!(delays[3], Duration::from_millis(250));
        assert_eq!(delays[4], Duration::from_millis(500));
        assert_eq!(delays[8], Duration::from_secs(4));
        assert!(fail(&t, a, "alice").is_some());
        assert!(
            t.attempt(a, "alice").is_err(),
            "not locked after 10 failures"
        );
        // The address is locked out for every user...
        assert!(t.attempt(a, "bob").is_err());
        // ...but alice is not, from an address that has not failed.
        assert!(t.attempt(ip("10.0.0.2"), "alice").is_ok());
        t.succeeded(ip("10.0.0.2"), "alice");
    }

    #[test]
    fn a_success_clears_only_its_own_record() {
        let t = LoginThrottle::new(LoginPolicy::default());
        let a = ip("10.0.0.1");
        for round in 0..3 {
            for _ in 0..3 {
                fail(&t, a, &format!("victim{round}")).unwrap();
            }
            t.attempt(a, "mallory").unwrap();
            t.succeeded(a, "mallory");
        }
        // Nine failures stand for the address: one more and it is locked.
        fail(&t, a, "victim9").unwrap();
        assert!(t.attempt(a, "mallory").is_err());
    }

    #[test]
    fn parallel_attempts_are_counted_before_they_are_checked() {
        let t = LoginThrottle::new(LoginPolicy::default());
        let a = ip("10.0.0.1");
        let started = (0..64).filter(|_| t.attempt(a, "alice").is_ok()).count();
        assert_eq!(started, 10);
        assert_eq!(t.attempt(a, "alice"), Err(Refusal::Wait));
        // Right passwords take turns: each success lets one more start.
        t.succeeded(a, "alice");
        assert!(t.attempt(a, "bob").is_ok());
        // Failures lock the address out once they reach the limit.
        for _ in 0..10 {
            t.failed(a, "alice");
        }
        assert!(matches!(t.attempt(a, "carol"), Err(Refusal::Locked(_))));
    }

    #[test]
    fn the_table_is_bounded_and_evicts_the_oldest() {
        let t = LoginThrottle::new(LoginPolicy {
            capacity: 100,
            ..LoginPolicy::default()
        });
        let first = ip("10.1.0.0");
        fail(&t, first, "u").unwrap();
        for i in 0..10_000u32 {
            let addr = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            fail(&t, addr, &format!("user{i}")).unwrap();
            assert!(t.len() <= 100);
        }
        let Ok(table) = t.table.lock() else { panic!() };
        assert!(table.order.len() <= 2 * 100 + 64, "{}", table.order.len());
        assert!(!table.records.contains_key(&Key::Addr(Addr::of(first))));
        let last = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + 9_999));
        assert!(table.records.contains_key(&Key::Addr(Addr::of(last))));
    }

    #[test]
    fn ipv6_addresses_count_per_64() {
        assert_eq!(
            Addr::of(ip("2001:db8::1")),
            Addr::of(ip("2001:db8::ffff:2"))
        );
        assert_ne!(Addr::of(ip("2001:db8::1")), Addr::of(ip("2001:db8:0:1::1")));
        assert_eq!(Addr::of(ip("::ffff:10.0.0.1")), Addr::of(ip("10.0.0.1")));
        assert_ne!(Addr::of(ip("::a00:1")), Addr::of(ip("10.0.0.1")));
    }
}
