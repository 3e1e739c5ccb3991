//! A real Secret Service for the login tests: `gnome-keyring-daemon` on a private
//! [`TestBus`], its keyrings in a temp directory, the default collection unlocked. Killed
//! with its bus in `Drop`.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::desktop::TestBus;
use crate::TIMEOUT;

/// Whether gnome-keyring-daemon is installed. Without it, Secret Service tests skip
/// loudly, unless `SHAREFS_REQUIRE_KEYRING` is set (CI), where they fail.
pub fn keyring_available() -> bool {
    crate::present_or_skip(
        crate::runs("gnome-keyring-daemon"),
        "SHAREFS_REQUIRE_KEYRING",
        "gnome-keyring-daemon",
    )
}

pub struct TestKeyring {
    daemon: Child,
    /// Declared after the daemon: the bus outlives it.
    pub bus: TestBus,
    _home: tempfile::TempDir,
}

impl TestKeyring {
    pub fn start() -> TestKeyring {
        let bus = TestBus::start();
        let home = tempfile::tempdir().unwrap();
        let mut daemon = Command::new("gnome-keyring-daemon")
            .args(["--foreground", "--unlock", "--components=secrets"])
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
            .env("HOME", home.path())
            .env("XDG_DATA_HOME", home.path().join("data"))
            .env("XDG_RUNTIME_DIR", home.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting gnome-keyring-daemon");
        {
            use std::io::Write;
            // The login keyring's password, which creates it unlocked.
            let mut stdin = daemon.stdin.take().unwrap();
            stdin.write_all(b"test-keyring").unwrap();
        }
        let keyring = TestKeyring {
            daemon,
            bus,
            _home: home,
        };
        keyring.wait_for_service();
        keyring
    }

    /// Waits for the daemon to own `org.freedesktop.secrets` on the bus: the owner change
    /// is awaited as a signal, subscribed to before the first check.
    fn wait_for_service(&self) {
        crate::rt().block_on(async {
            let conn = zbus::connection::Builder::address(self.bus.address.as_str())
                .build()
                .await
                .unwrap();
            let dbus = zbus::fdo::DBusProxy::new(&conn).await.unwrap();
            let mut changes = dbus
                .receive_name_owner_changed_with_args(&[(0, "org.freedesktop.secrets")])
                .await
                .unwrap();
            let name = zbus::names::BusName::try_from("org.freedesktop.secrets").unwrap();
            use futures::StreamExt;
            if !dbus.name_has_owner(name).await.unwrap() {
                tokio::time::timeout(TIMEOUT, changes.next())
                    .await
                    .expect("gnome-keyring-daemon did not take org.freedesktop.secrets")
                    .expect("bus closed");
            }
            // The login keyring (the default collection) may be made after the name is
            // taken: wait for it too, or a first store would ask to create one.
            let service = zbus::Proxy::new(
                &conn,
                "org.freedesktop.secrets",
                "/org/freedesktop/secrets",
                "org.freedesktop.Secret.Service",
            )
            .await
            .unwrap();
            let mut created = service.receive_signal("CollectionCreated").await.unwrap();
            let alias: zbus::OwnedObjectPath =
                service.call("ReadAlias", &("default",)).await.unwrap();
            if alias.as_str() == "/" {
                tokio::time::timeout(TIMEOUT, created.next())
                    .await
                    .expect("gnome-keyring-daemon made no login keyring")
                    .expect("bus closed");
            }
        });
    }

    /// The keyring files (to show that a secret went there, not to a file of ours).
    pub fn data_dir(&self) -> std::path::PathBuf {
        self._home.path().join("data")
    }

    pub fn home(&self) -> &Path {
        self._home.path()
    }
}

impl Drop for TestKeyring {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}
