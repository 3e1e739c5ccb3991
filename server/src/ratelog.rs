//! A bound on the log lines one kind of event may write: at most so many per second, the
//! rest counted and reported in one summary line when the next second's first line is
//! written. Whatever a client provokes (failed logins, bad frames), the log grows by a
//! bounded number of lines per second, and the count of what was left out is not lost.

use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// The budget of the lines about connections that clients provoke: timed out, broken
/// frames, stalled readers.
pub static CONNECTIONS: LazyLock<RateLog> =
    LazyLock::new(|| RateLog::new("lines about broken connections", 20));

/// The budget of the lines about connections refused for the per-address limit.
pub static REFUSALS: LazyLock<RateLog> =
    LazyLock::new(|| RateLog::new("lines about refused connections", 10));

/// The budget of the lines about connections refused for the server-wide limit: a budget
/// of its own, so that many refusals per address never hide that the server is full.
pub static LIMIT: LazyLock<RateLog> =
    LazyLock::new(|| RateLog::new("lines about the connection limit", 10));

/// The log-line budget of one kind of event.
#[derive(Debug)]
pub struct RateLog {
    /// What the lines are about, plural, for the summary: "login failures".
    what: &'static str,
    per_second: u32,
    /// std `Mutex`: a few integer updates, never held across an await.
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    written: u32,
    /// Lines left out since the last summary.
    suppressed: u64,
}

impl RateLog {
    pub fn new(what: &'static str, per_second: u32) -> RateLog {
        RateLog {
            what,
            per_second,
            state: Mutex::new(Window {
                start: Instant::now(),
                written: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether the caller may write its line now. The first line allowed after some were
    /// left out is preceded by a summary line counting them.
    pub fn allow(&self) -> bool {
        let Ok(mut w) = self.state.lock() else {
            return false;
        };
        let now = Instant::now();
        if now.duration_since(w.start) >= Duration::from_secs(1) {
            w.start = now;
            w.written = 0;
        }
        if w.written >= self.per_second {
            w.suppressed += 1;
            return false;
        }
        w.written += 1;
        let suppressed = std::mem::take(&mut w.suppressed);
        drop(w);
        if suppressed > 0 {
            tracing::warn!(
                suppressed,
                "{suppressed} more {} suppressed (at most {} lines a second)",
                self.what,
                self.per_second
            );
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_the_budget_per_second_then_a_count() {
        let log = RateLog::new("test events", 5);
        let allowed = (0..1000).filter(|_| log.allow()).count();
        assert_eq!(allowed, 5);
        assert_eq!(log.state.lock().unwrap().suppressed, 995);
        // A second later the budget is back, and the count is reported (and reset).
        log.state.lock().unwrap().start -= Duration::from_secs(1);
        assert!(log.allow());
        assert_eq!(log.state.lock().unwrap().suppressed, 0);
    }
}
