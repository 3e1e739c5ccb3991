//! How the command line shows entries: `ls -l` lines with the mode string, the size in
//! bytes or (with `-h`) in powers of 1024 like GNU `ls -h`, and the time in the local time
//! zone (the system's, or `TZ`), since a listing is read by a person at this machine.

use std::time::{Duration, UNIX_EPOCH};

use sharefs_protocol::{EntryKind, FileInfo};

use crate::quoting::shell_escape;

/// `ls -l`-like permission bits of an entry.
pub fn mode_string(f: &FileInfo) -> String {
    let kind = match f.kind {
        EntryKind::Dir => 'd',
        EntryKind::File => '-',
        EntryKind::Symlink => 'l',
    };
    let mut s = String::from(kind);
    for shift in [6, 3, 0] {
        let bits = (f.mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// A size the way `ls -h` shows it: bytes below 1 KiB, else one decimal below 10 units
/// (`1.5K`) and whole units above (`23M`), always rounded up.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["K", "M", "G", "T", "P", "E"];
    if bytes < 1024 {
        return bytes.to_string();
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 {
        let tenths = (value * 10.0).ceil() / 10.0;
        if tenths < 10.0 {
            return format!("{tenths:.1}{}", UNITS[unit]);
        }
    }
    format!("{}{}", value.ceil() as u64, UNITS[unit])
}

/// `2026-11-30 17:37` in the local time zone (UTC if the system has none).
pub fn local_time(t: std::time::SystemTime) -> String {
    match jiff::Timestamp::try_from(t) {
        Ok(ts) => ts
            .to_zoned(jiff::tz::TimeZone::system())
            .strftime("%Y-%m-%d %H:%M")
            .to_string(),
        Err(_) => "?".to_string(),
    }
}

/// [`local_time`] of nanoseconds since the epoch (before the epoch counts as the epoch).
pub fn local_time_ns(ns: i64) -> String {
    local_time(UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64))
}

/// One `ls -l` line: mode, size (human with `human`), local time, name, and `/` for a
/// directory or `-> target` for a link.
pub fn long_line(f: &FileInfo, human: bool) -> String {
    let suffix = match (&f.kind, &f.target) {
        (EntryKind::Dir, _) => "/".to_string(),
        (EntryKind::Symlink, Some(t)) => format!(" -> {}", shell_escape(t)),
        _ => String::new(),
    };
    let size = if human {
        human_size(f.size)
    } else {
        f.size.to_string()
    };
    format!(
        "{}  {:>12}  {}  {}{}",
        mode_string(f),
        size,
        local_time_ns(f.mtime_ns),
        shell_escape(&f.name),
        suffix
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_ls_h() {
        assert_eq!(human_size(0), "0");
        assert_eq!(human_size(1023), "1023");
        assert_eq!(human_size(1024), "1.0K");
        assert_eq!(human_size(1536), "1.5K");
        assert_eq!(human_size(1025), "1.1K");
        assert_eq!(human_size(10 * 1024), "10K");
        assert_eq!(human_size(10 * 1024 - 1), "10K");
        assert_eq!(human_size(3 << 20), "3.0M");
        assert_eq!(human_size(150 << 20), "150M");
        assert_eq!(human_size(5 << 30), "5.0G");
    }

    #[test]
    fn times_are_minutes_in_the_local_zone() {
        let t = local_time_ns(0);
        assert_eq!(t.len(), "1970-01-01 00:00".len(), "{t}");
        assert!(
            t.starts_with("1970-01-01") || t.starts_with("1969-12-31"),
            "{t}"
        );
    }
}
