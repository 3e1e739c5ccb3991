//! The configuration file's profiles and stored logins, as a user runs them: `sharefs`
//! with no server, user or password in flags or environment.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use sharefs_tests::keyring::{keyring_available, TestKeyring};
use sharefs_tests::*;

/// `sharefs ARGS` with only the configuration directory `config` (and `extra` env) set:
/// none of the SHAREFS_* variables, no session bus.
fn bare(config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("sharefs"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SHAREFS_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("XDG_CONFIG_HOME", config)
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env_remove("XDG_RUNTIME_DIR")
        .args(args);
    cmd
}

fn run(cmd: &mut Command) -> Output {
    output_within(cmd)
}

fn ok(mut cmd: Command) -> String {
    let out = run(&mut cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(mut cmd: Command) -> String {
    let out = run(&mut cmd);
    assert!(!out.status.success(), "{cmd:?} unexpectedly succeeded");
    String::from_utf8(out.stderr).unwrap()
}

/// `sharefs login ARGS` with `password` on its standard input.
fn login(mut cmd: Command, password: &str) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{password}").unwrap();
    drop(stdin);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(TIMEOUT)
        .expect("sharefs login did not finish")
        .unwrap()
}

/// A configuration with a wrong `[default]` server and a `test` profile for `server`.
fn write_config(dir: &Path, server: &TestServer) {
    let fp = server.fingerprint.clone().expect("a TLS server");
    std::fs::create_dir_all(dir.join("sharefs")).unwrap();
    std::fs::write(
        dir.join("sharefs/config.toml"),
        format!(
            r#"
[default]
server = "127.0.0.1:1"
user = "bob"
connect_timeout = 5

[profiles.test]
server = "{addr}"
server_fingerprint = "{fp}"

[profiles.test.mount]
timeout = 7
"#,
            addr = server.addr
        ),
    )
    .unwrap();
}

#[test]
fn profiles_give_server_user_and_trust_and_flags_override_them() {
    let server = TestServer::start();
    let config = tempfile::tempdir().unwrap();
    write_config(config.path(), &server);
    let pw = config.path().join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();

    // `test` inherits user bob from [default]; the password from a file named here.
    let mut ls = bare(config.path(), &["--profile", "test", "--password-file"]);
    ls.arg(&pw).args(["ls"]);
    assert_eq!(ok(ls), "alice\nbob\ncarol\n");
    // SHAREFS_PROFILE does the same; a flag overrides the profile's user.
    let mut ls = bare(config.path(), &["--user", "carol", "--password-file"]);
    ls.arg(&pw).arg("mkdir").arg("made-by-carol");
    ls.env("SHAREFS_PROFILE", "test");
    ok(ls);
    let mut ls = bare(config.path(), &["--profile", "test", "--password-file"]);
    ls.arg(&pw).args(["ls", "carol"]);
    assert_eq!(ok(ls), "made-by-carol\n");
    // Without the profile, [default]'s unreachable server is used.
    let mut ls = bare(config.path(), &["--password-file"]);
    ls.arg(&pw).arg("ls");
    assert!(fails(ls).contains("127.0.0.1:1"));
    // An unknown profile and a misspelt key are errors that say so.
    let err = fails(bare(config.path(), &["--profile", "nope", "ls"]));
    assert!(err.contains("no profile \"nope\""), "{err}");
    std::fs::write(
        config.path().join("sharefs/config.toml"),
        "[default]\nsever = \"x\"\n",
    )
    .unwrap();
    let err = fails(bare(config.path(), &["ls"]));
    assert!(
        err.contains("config.toml") && err.contains("sever"),
        "{err}"
    );
}

#[test]
fn login_without_a_secret_service_uses_a_private_file() {
    let server = TestServer::start();
    let config = tempfile::tempdir().unwrap();
    write_config(config.path(), &server);
    let stored = config.path().join("sharefs/credentials.json");

    // A wrong password is refused by the server and not stored.
    let out = login(bare(config.path(), &["login", "test"]), "wrong");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong password"));
    assert!(!stored.exists());

    let out = login(bare(config.path(), &["login", "test"]), PASSWORD);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("credentials.json"), "{said}");
    let mode = std::fs::metadata(&stored).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // Every command now logs in with it: no password anywhere else.
    assert_eq!(
        ok(bare(config.path(), &["--profile", "test", "ls"])),
        "alice\nbob\ncarol\n"
    );
    let out = login(bare(config.path(), &["logout", "test"]), "");
    assert!(out.status.success());
    assert!(!std::fs::read_to_string(&stored).unwrap().contains(PASSWORD));
    let err = fails(bare(config.path(), &["--profile", "test", "ls"]));
    assert!(
        err.contains("no password") && err.contains("sharefs login"),
        "{err}"
    );
}

#[test]
fn login_goes_to_the_secret_service_when_one_runs() {
    if !keyring_available() {
        return;
    }
    let server = TestServer::start();
    let keyring = TestKeyring::start();
    let config = tempfile::tempdir().unwrap();
    write_config(config.path(), &server);
    let stored = config.path().join("sharefs/credentials.json");
    let on_bus = |args: &[&str]| {
        let mut cmd = bare(config.path(), args);
        cmd.env("DBUS_SESSION_BUS_ADDRESS", &keyring.bus.address);
        cmd
    };

    let out = login(on_bus(&["login", "test"]), PASSWORD);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("Secret Service"), "{said}");
    assert!(!stored.exists(), "the password went to a file as well");
    assert!(
        std::fs::read_dir(keyring.data_dir().join("keyrings"))
            .unwrap()
            .count()
            > 0
    );

    assert_eq!(
        ok(on_bus(&["--profile", "test", "ls"])),
        "alice\nbob\ncarol\n"
    );
    // Off the bus the password is not found: it really is in the keyring.
    let err = fails(bare(config.path(), &["--profile", "test", "ls"]));
    assert!(err.contains("no password"), "{err}");

    let out = login(on_bus(&["logout", "test"]), "");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("removed") && said.contains("Secret Service"),
        "{said}"
    );
    let err = fails(on_bus(&["--profile", "test", "ls"]));
    assert!(err.contains("no password"), "{err}");
    let _ = keyring.home();
}
