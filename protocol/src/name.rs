//! Name rules of SPEC section 3, in one place for server and clients.

/// Longest file name, in bytes.
pub const MAX_FILE_NAME: usize = 255;
/// Longest user name, in bytes.
pub const MAX_USER_NAME: usize = 32;
/// Longest path inside a user's tree and longest symbolic link target, in bytes
/// (Linux's `PATH_MAX` counts the terminating NUL).
pub const MAX_PATH: usize = 4095;

/// Checks a symbolic link's target: stored as given (relative or absolute, dangling
/// allowed), but not empty, without NUL and at most [`MAX_PATH`] bytes.
pub fn check_symlink_target(target: &str) -> Result<(), String> {
    if target.is_empty() {
        return Err("empty symbolic link target".into());
    }
    if target.len() > MAX_PATH {
        return Err(format!("symbolic link target longer than {MAX_PATH} bytes"));
    }
    if target.contains('\0') {
        return Err("symbolic link target contains NUL".into());
    }
    Ok(())
}

/// Splits a path inside a user's tree ("a/b/c"; "" or "/" is the folder itself) into its
/// names, each checked as a lookup. Empty components (`a//b`, a trailing `/`) and `.` are
/// skipped; `..` is refused, since a path never leaves the folder it names.
pub fn split_path(path: &str) -> Result<Vec<&str>, String> {
    if path.len() > MAX_PATH {
        return Err(format!("path longer than {MAX_PATH} bytes"));
    }
    let mut names = Vec::new();
    for part in path.split('/') {
        if part.is_empty() || part == "." {
            continue;
        }
        if part == ".." {
            return Err("'..' in a path".into());
        }
        check_file_lookup(part)?;
        names.push(part);
    }
    Ok(names)
}

/// Checks the name of a file being created (uploaded, put, renamed to): the rules of
/// [`check_file_lookup`], and no control character (C0, DEL or C1: a name is shown in
/// terminals, where these move the cursor, erase lines or retitle the window).
pub fn check_file_name(name: &str) -> Result<(), String> {
    check_file_lookup(name)?;
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "file name contains the control character U+{:04X}",
            u32::from(c)
        ));
    }
    Ok(())
}

/// Checks a name that refers to an existing file (stat, open, delete, rename from): not
/// empty, no `/`, no NUL, not `.` or `..`, at most 255 bytes. Control characters are let
/// through so that files stored before they were refused can still be read, renamed to a
/// clean name or deleted.
pub fn check_file_lookup(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty file name".into());
    }
    if name.len() > MAX_FILE_NAME {
        return Err(format!("file name longer than {MAX_FILE_NAME} bytes"));
    }
    if name == "." || name == ".." {
        return Err(format!("'{name}' is not a file name"));
    }
    if name.contains('/') {
        return Err("file name contains '/'".into());
    }
    if name.contains('\0') {
        return Err("file name contains NUL".into());
    }
    Ok(())
}

/// Checks a user name: `[a-z0-9_-]{1,32}`.
pub fn check_user_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_USER_NAME {
        return Err(format!("user name must be 1 to {MAX_USER_NAME} characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "user name '{name}' may only contain a-z, 0-9, '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        for bad in ["", ".", "..", "a/b", "../x", "a\0b", &"x".repeat(256)] {
            assert!(check_file_name(bad).is_err(), "{bad:?} accepted");
            assert!(check_file_lookup(bad).is_err(), "{bad:?} accepted");
        }
        for control in ["a\x1bb", "\n", "tab\t", "del\x7f", "csi\u{9b}", "\x07"] {
            let e = check_file_name(control).unwrap_err();
            assert!(e.contains("control character U+"), "{control:?}: {e}");
            assert!(check_file_lookup(control).is_ok(), "{control:?} refused");
        }
        for good in ["a", "report.txt", "...", ".hidden", "é", &"x".repeat(255)] {
            assert!(check_file_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn paths() {
        assert_eq!(split_path("").unwrap(), Vec::<&str>::new());
        assert_eq!(split_path("/a//b/./c/").unwrap(), vec!["a", "b", "c"]);
        assert!(split_path("a/../b").is_err());
        assert!(split_path(&"a/".repeat(2048)).is_err());
        assert!(check_symlink_target("../x").is_ok());
        assert!(check_symlink_target("").is_err());
        assert!(check_symlink_target("a\0b").is_err());
    }

    #[test]
    fn user_names() {
        for bad in ["", "Alice", "a b", "a/b", "ä", &"a".repeat(33)] {
            assert!(check_user_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["alice", "bob_2", "x-y", &"a".repeat(32)] {
            assert!(check_user_name(good).is_ok(), "{good:?} refused");
        }
    }
}
