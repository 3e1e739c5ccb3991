//! Login throttling, per peer address and per user name (known or not, so it reveals
//! nothing): the first few failures cost nothing, then each answer is delayed more (doubling
//! up to a cap), and after enough failures the key is refused outright for a while. A
//! success clears the user's and the address's record. Records expire after the lockout
//! window, and the table is capped, so an attacker spraying names cannot grow it forever.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
}

impl Default for LoginPolicy {
    fn default() -> Self {
        LoginPolicy {
            free_failures: 3,
            delay_base: Duration::from_millis(250),
            delay_max: Duration::from_secs(4),
            lockout_after: 10,
            lockout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    last: Instant,
}

const MAX_RECORDS: usize = 100_000;

#[derive(Debug)]
pub struct LoginThrottle {
    policy: LoginPolicy,
    /// std `Mutex`: map updates only.
    records: Mutex<HashMap<String, Record>>,
}

fn keys(ip: IpAddr, user: &str) -> [String; 2] {
    [format!("ip {ip}"), format!("user {user}")]
}

impl LoginThrottle {
    pub fn new(policy: LoginPolicy) -> Self {
        LoginThrottle {
            policy,
            records: Mutex::new(HashMap::new()),
        }
    }

    fn live(&self, r: &Record, now: Instant) -> bool {
        now.duration_since(r.last) < self.policy.lockout
    }

    /// `Err(remaining)` if the address or the user is locked out now.
    pub fn check(&self, ip: IpAddr, user: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let Ok(records) = self.records.lock() else {
            return Ok(());
        };
        for key in keys(ip, user) {
            if let Some(r) = records.get(&key) {
                if r.failures >= self.policy.lockout_after && self.live(r, now) {
                    return Err(self.policy.lockout - now.duration_since(r.last));
                }
            }
        }
        Ok(())
    }

    /// Records a failure; returns how long to wait before answering it.
    pub fn failed(&self, ip: IpAddr, user: &str) -> Duration {
        let now = Instant::now();
        let Ok(mut records) = self.records.lock() else {
            return self.policy.delay_max;
        };
        if records.len() >= MAX_RECORDS {
            let lockout = self.policy.lockout;
            records.retain(|_, r| now.duration_since(r.last) < lockout);
            if records.len() >= MAX_RECORDS {
                records.clear();
            }
        }
        let mut worst = 0;
        for key in keys(ip, user) {
            let r = records.entry(key).or_insert(Record {
                failures: 0,
                last: now,
            });
            if !self.live(r, now) {
                r.failures = 0;
            }
            r.failures += 1;
            r.last = now;
            worst = worst.max(r.failures);
        }
        if worst <= self.policy.free_failures {
            return Duration::ZERO;
        }
        let doublings = (worst - self.policy.free_failures - 1).min(16);
        (self.policy.delay_base * 2u32.pow(doublings)).min(self.policy.delay_max)
    }

    pub fn succeeded(&self, ip: IpAddr, user: &str) {
        if let Ok(mut records) = self.records.lock() {
            for key in keys(ip, user) {
                records.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_then_lock_out_then_success_clears() {
        let t = LoginThrottle::new(LoginPolicy {
            lockout: Duration::from_secs(3600),
            ..LoginPolicy::default()
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let delays: Vec<Duration> = (0..9).map(|_| t.failed(ip, "alice")).collect();
        assert_eq!(delays[0], Duration::ZERO);
        assert_eq!(delays[3], Duration::from_millis(250));
        assert_eq!(delays[4], Duration::from_millis(500));
        assert_eq!(delays[8], Duration::from_secs(4));
        assert!(t.check(ip, "alice").is_ok());
        t.failed(ip, "alice");
        assert!(
            t.check(ip, "alice").is_err(),
            "not locked after 10 failures"
        );
        // Another address trying the same user is locked out too; the same address
        // trying another user as well.
        assert!(t.check("10.0.0.2".parse().unwrap(), "alice").is_err());
        assert!(t.check(ip, "bob").is_err());
        t.succeeded(ip, "alice");
        assert!(t.check(ip, "alice").is_ok());
    }
}
