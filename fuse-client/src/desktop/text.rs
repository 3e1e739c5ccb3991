//! The words of a pop-up: one download ("bob downloaded report.pdf") or a burst folded
//! into one digest ("bob downloaded 20 files"), sizes in binary units, times in the
//! local time zone as a clock shows them ("17:37"). Body text is escaped when the
//! notification daemon reads it as markup, so a file named `a<b>&c` shows as named.

use sharefs_protocol::Notification;

/// Files named in a digest's body; the rest are counted.
const NAMED_IN_DIGEST: usize = 5;

/// What one pop-up says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Popup {
    pub summary: String,
    pub body: String,
}

pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `text` with the three characters the notification markup gives a meaning escaped.
pub fn escape_markup(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// A time (milliseconds since the epoch) as a clock in the local time zone shows it:
/// "17:37" today, "29 Nov 17:37" on another day.
pub fn local_time(ms: i64, now_ms: i64) -> String {
    let tz = jiff::tz::TimeZone::system();
    let at = |ms: i64| {
        jiff::Timestamp::from_millisecond(ms)
            .ok()
            .map(|t| t.to_zoned(tz.clone()))
    };
    let (Some(t), Some(now)) = (at(ms), at(now_ms)) else {
        return String::from("?");
    };
    if t.date() == now.date() {
        return t.strftime("%H:%M").to_string();
    }
    format!("{} {}", t.day(), t.strftime("%b %H:%M"))
}

/// Files a notification stands for: a server-side digest folds several.
fn files_in(n: &Notification) -> u64 {
    u64::from(n.folded.max(1))
}

/// The pop-up for `batch` (one notification or a burst, oldest first; never empty),
/// its body escaped if `markup`.
pub fn popup(batch: &[Notification], now_ms: i64, markup: bool) -> Popup {
    let esc = |s: &str| {
        if markup {
            escape_markup(s)
        } else {
            s.to_string()
        }
    };
    let last_ms = batch.iter().map(|n| n.last_ms).max().unwrap_or(now_ms);
    let when = local_time(last_ms, now_ms);
    if let [n] = batch {
        if n.folded == 0 {
            let summary = format!("{} downloaded {}", n.downloader, n.file);
            let mut body = format!("{}, {when}", human_size(n.size));
            if n.count > 1 {
                body.push_str(&format!(" ({} times)", n.count));
            }
            return Popup {
                summary,
                body: esc(&body),
            };
        }
    }
    let mut who: Vec<&str> = Vec::new();
    for n in batch {
        if !who.contains(&n.downloader.as_str()) {
            who.push(&n.downloader);
        }
    }
    let who = match who.as_slice() {
        [one] => one.to_string(),
        [a, b] => format!("{a} and {b}"),
        [a, b, rest @ ..] => format!("{a}, {b} and {} others", rest.len()),
        [] => String::from("someone"),
    };
    let files: u64 = batch.iter().map(files_in).sum();
    let size: u64 = batch.iter().map(|n| n.size).sum();
    let summary = format!("{who} downloaded {files} files");
    let named: Vec<&str> = batch
        .iter()
        .filter(|n| n.folded == 0)
        .take(NAMED_IN_DIGEST)
        .map(|n| n.file.as_str())
        .collect();
    let mut list = named.join(", ");
    let unnamed = files.saturating_sub(named.len() as u64);
    if unnamed > 0 {
        if list.is_empty() {
            list = format!("{unnamed} files");
        } else {
            list.push_str(&format!(" and {unnamed} more"));
        }
    }
    let body = format!("{list}\n{} in all, {when}", human_size(size));
    Popup {
        summary,
        body: esc(&body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(id: u64, who: &str, file: &str, size: u64) -> Notification {
        Notification {
            id,
            downloader: who.into(),
            owner: "alice".into(),
            file: file.into(),
            size,
            first_ms: 1_700_000_000_000,
            last_ms: 1_700_000_000_000,
            count: 1,
            folded: 0,
        }
    }

    #[test]
    fn one_download() {
        let p = popup(&[note(1, "bob", "report.pdf", 14)], 1_700_000_000_000, true);
        assert_eq!(p.summary, "bob downloaded report.pdf");
        assert!(p.body.starts_with("14 B, "), "{}", p.body);
    }

    #[test]
    fn a_burst_is_one_digest() {
        let batch: Vec<_> = (0..20)
            .map(|i| note(i, "bob", &format!("f{i:02}.pdf"), 1024))
            .collect();
        let p = popup(&batch, 1_700_000_000_000, false);
        assert_eq!(p.summary, "bob downloaded 20 files");
        assert!(
            p.body.starts_with(
                "f00.pdf, f01.pdf, f02.pdf, f03.pdf, f04.pdf and 15 more\n20.0 KiB in all, "
            ),
            "{}",
            p.body
        );
        let mixed = [note(1, "bob", "a", 1), note(2, "carol", "b", 1)];
        assert_eq!(
            popup(&mixed, 0, false).summary,
            "bob and carol downloaded 2 files"
        );
    }

    #[test]
    fn markup_is_escaped_only_for_markup_daemons() {
        let n = [note(1, "bob", "a<b>&c.pdf", 1), note(2, "bob", "x", 1)];
        let p = popup(&n, 0, true);
        assert!(p.body.starts_with("a&lt;b&gt;&amp;c.pdf, x"), "{}", p.body);
        let p = popup(&n, 0, false);
        assert!(p.body.starts_with("a<b>&c.pdf, x"), "{}", p.body);
    }

    #[test]
    fn times_are_a_clock() {
        let t = local_time(1_700_000_000_000, 1_700_000_000_000);
        assert_eq!(t.len(), 5, "{t}");
        assert_eq!(&t[2..3], ":");
        // Another day also says which.
        let t = local_time(1_700_000_000_000, 1_700_000_000_000 + 3 * 86_400_000);
        assert!(t.ends_with(&local_time(1_700_000_000_000, 1_700_000_000_000)));
        assert!(t.contains("Nov"), "{t}");
    }
}
