//! `completions` and `man` of both binaries: the bash script is valid bash that completes
//! the subcommands, zsh and fish get theirs, and the man pages render with `man -l` and
//! name every subcommand (CI sets `SHAREFS_REQUIRE_TOOLS`: a missing `man` fails there).

use std::process::Command;

use sharefs_tests::*;

/// The subcommands each binary's pages and completions must know.
const SUBCOMMANDS: [(&str, &[&str]); 2] = [
    (
        "sharefs",
        &[
            "ls",
            "put",
            "get",
            "rm",
            "mkdir",
            "mv",
            "mount",
            "notifications",
            "completions",
            "man",
        ],
    ),
    ("sharefs-server", &["serve", "user", "completions", "man"]),
];

#[test]
fn completion_scripts_are_valid_and_know_the_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    for (name, subcommands) in SUBCOMMANDS {
        let bash = run_ok(Command::new(bin(name)).args(["completions", "bash"]));
        let script = dir.path().join(format!("{name}.bash"));
        std::fs::write(&script, &bash).unwrap();
        run_ok(Command::new("bash").arg("-n").arg(&script));
        // Sourced, it registers a completion for the binary.
        let registered = run_ok(
            Command::new("bash")
                .arg("-c")
                .arg(format!("source {} && complete -p {name}", script.display())),
        );
        assert!(registered.contains(name), "{registered}");
        for sub in subcommands {
            assert!(bash.contains(sub), "{name}: bash completion lacks {sub}");
        }
        for shell in ["zsh", "fish"] {
            let script = run_ok(Command::new(bin(name)).args(["completions", shell]));
            for sub in subcommands {
                assert!(
                    script.contains(sub),
                    "{name}: {shell} completion lacks {sub}"
                );
            }
        }
    }
    let out = output_within(Command::new(bin("sharefs")).args(["completions", "tcsh"]));
    assert!(!out.status.success(), "an unknown shell is refused");
}

#[test]
fn man_pages_render_and_name_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    for (name, subcommands) in SUBCOMMANDS {
        let out = dir.path().join("man1");
        run_ok(Command::new(bin(name)).arg("man").arg(&out));
        let main = std::fs::read_to_string(out.join(format!("{name}.1"))).unwrap();
        assert!(main.contains(".TH"), "not a man page: {main}");
        for sub in subcommands {
            assert!(main.contains(sub), "{name}.1 lacks {sub}");
            let page = out.join(format!("{name}-{sub}.1"));
            assert!(page.is_file(), "no page {}", page.display());
        }
    }
    // Nested subcommands have pages of their own.
    assert!(dir.path().join("man1/sharefs-server-user-add.1").is_file());
    let Some(man) = tool("man", REQUIRE_TOOLS, "apt-get install man-db") else {
        return;
    };
    let rendered = run_ok(
        Command::new(man)
            .args(["-l", "-P", "cat"])
            .arg(dir.path().join("man1/sharefs-server-serve.1"))
            .env("MANWIDTH", "80")
            .env("LC_ALL", "C"),
    );
    // Bold and underline, where the formatter overstrikes, are "x\x08x".
    let mut plain = String::new();
    for c in rendered.chars() {
        if c == '\x08' {
            plain.pop();
        } else {
            plain.push(c);
        }
    }
    let rendered = plain;
    assert!(rendered.contains("--metrics"), "{rendered}");
    assert!(rendered.contains("--listen"), "{rendered}");
}
