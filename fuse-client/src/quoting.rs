//! Text from the network, made safe to print on a terminal.
//!
//! A name the server sends (a file name stored before control characters were refused, or
//! sent by a hostile server) could hold escape sequences that retitle the terminal, erase
//! lines or fake output. The command-line client prints every such text through
//! [`shell_escape`]: text without control characters is printed as it is (so scripts see
//! what they always saw); text with one is quoted as GNU `ls` quotes by default
//! ("shell-escape"): printable runs in single quotes, control characters as `$'\ooo'`
//! (or `$'\n'`-style C escapes), so the output stays on one line, shows what is there,
//! and pasted into a shell names the same file.

use std::borrow::Cow;
use std::fmt::Write;

/// `text` as it may be printed: unchanged unless it holds a control character (C0, DEL,
/// C1), otherwise in GNU `ls` shell-escape quoting.
pub fn shell_escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    #[derive(PartialEq)]
    enum Open {
        None,
        Quote,
        Dollar,
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut open = Open::None;
    let mut switch = |out: &mut String, to: Open| {
        if open != to {
            if open != Open::None {
                out.push('\'');
            }
            match to {
                Open::Quote => out.push('\''),
                Open::Dollar => out.push_str("$'"),
                Open::None => {}
            }
            open = to;
        }
    };
    for c in text.chars() {
        if c == '\'' {
            switch(&mut out, Open::None);
            out.push_str("\\'");
        } else if c.is_control() {
            switch(&mut out, Open::Dollar);
            match c {
                '\x07' => out.push_str("\\a"),
                '\x08' => out.push_str("\\b"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\x0b' => out.push_str("\\v"),
                '\x0c' => out.push_str("\\f"),
                '\r' => out.push_str("\\r"),
                c => {
                    let mut utf8 = [0u8; 4];
                    for b in c.encode_utf8(&mut utf8).bytes() {
                        let _ = write!(out, "\\{b:03o}");
                    }
                }
            }
        } else {
            switch(&mut out, Open::Quote);
            out.push(c);
        }
    }
    switch(&mut out, Open::None);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::shell_escape;

    #[test]
    fn plain_text_is_unchanged() {
        for s in ["report.pdf", "a b", "it's", "é ü 日本", ""] {
            assert_eq!(shell_escape(s), s);
        }
    }

    #[test]
    fn control_characters_are_quoted_as_gnu_ls_does() {
        let cases = [
            ("a\x1bb", r"'a'$'\033''b'"),
            ("\x1b]0;pwned\x07", r"$'\033'']0;pwned'$'\a'"),
            ("line\nbreak", r"'line'$'\n''break'"),
            ("it's\t", r"'it'\''s'$'\t'"),
            ("\r\x7f", r"$'\r\177'"),
            ("csi\u{9b}2J", r"'csi'$'\302\233''2J'"),
        ];
        for (text, quoted) in cases {
            assert_eq!(shell_escape(text), quoted, "{text:?}");
        }
    }

    #[test]
    fn nothing_printed_is_a_control_character() {
        for c in (0u32..0x200).filter_map(char::from_u32) {
            let text = format!("x{c}'y{c}");
            let out = shell_escape(&text);
            assert!(!out.chars().any(char::is_control), "{text:?} -> {out:?}");
        }
    }
}
