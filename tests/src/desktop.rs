//! A private D-Bus session bus (a real `dbus-daemon`) and a test notification service on
//! it: a real `org.freedesktop.Notifications` implementation that records what it is asked
//! to show.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use zbus::OwnedVariant;

use crate::TIMEOUT;

/// A `dbus-daemon` with its own session bus, killed in `Drop`; its socket lives in a
/// temp directory removed with it (not in /tmp, where a killed daemon leaves it).
pub struct TestBus {
    child: Child,
    pub address: String,
    _dir: tempfile::TempDir,
}

impl TestBus {
    pub fn start() -> TestBus {
        let dir = tempfile::tempdir().expect("a temp dir for the bus socket");
        let mut child = Command::new("dbus-daemon")
            .args([
                "--config-file=/usr/share/dbus-1/session.conf",
                "--nofork",
                "--print-address=1",
            ])
            .arg(format!("--address=unix:dir={}", dir.path().display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon (Debian package dbus) is needed for notification tests");
        let stdout = child.stdout.take().unwrap();
        let rx = crate::first_line(stdout);
        let address = rx
            .recv_timeout(TIMEOUT)
            .expect("dbus-daemon printed no address");
        TestBus {
            child,
            address: address.trim().to_string(),
            _dir: dir,
        }
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address of an existing bus.
pub struct BusAddress(pub String);

/// One `Notify` call as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    /// The id the daemon gave the pop-up (from 1).
    pub id: u32,
    pub app_name: String,
    pub app_icon: String,
    pub summary: String,
    pub body: String,
    /// Action keys and labels, alternating.
    pub actions: Vec<String>,
    /// The unique bus name of the connection that asked: one per client connection.
    pub sender: String,
}

/// What the test daemon says it can do, as a minimal daemon does.
pub const PLAIN: &[&str] = &["body"];
/// ...and as a full one does (markup, action buttons), like dunst or GNOME Shell.
pub const FULL: &[&str] = &["body", "body-markup", "actions", "icon-static"];

type OnShow = Box<dyn Fn(&str) + Send + Sync>;

struct Recorder {
    shown: Arc<Mutex<Vec<Shown>>>,
    next_id: u32,
    on_show: Option<OnShow>,
    capabilities: Vec<String>,
}

#[zbus::interface(name = "org.freedesktop.Notifications")]
impl Recorder {
    #[allow(clippy::too_many_arguments)]
    fn notify(
        &mut self,
        #[zbus(header)] header: zbus::message::Header<'_>,
        app_name: String,
        replaces_id: u32,
        app_icon: String,
        summary: String,
        body: String,
        actions: Vec<String>,
        _hints: HashMap<String, OwnedVariant>,
        _expire_timeout: i32,
    ) -> u32 {
        if let Some(f) = &self.on_show {
            f(&summary);
        }
        let sender = header.sender().map(|s| s.to_string()).unwrap_or_default();
        let mut shown = self.shown.lock().unwrap();
        // As a daemon does: a pop-up still shown is replaced in place, keeping its id.
        let id = match shown.iter().position(|s| s.id == replaces_id) {
            Some(i) if replaces_id != 0 => {
                shown.remove(i);
                replaces_id
            }
            _ => {
                self.next_id += 1;
                self.next_id
            }
        };
        shown.push(Shown {
            id,
            app_name,
            app_icon,
            summary,
            body,
            actions,
            sender,
        });
        id
    }

    /// A click on an action button of pop-up `id`.
    #[zbus(signal)]
    async fn action_invoked(
        emitter: &zbus::object_server::SignalEmitter<'_>,
        id: u32,
        action_key: &str,
    ) -> zbus::Result<()>;

    fn get_capabilities(&self) -> Vec<String> {
        self.capabilities.clone()
    }

    fn get_server_information(&self) -> (String, String, String, String) {
        (
            "sharefs-test".into(),
            "sharefs".into(),
            "1".into(),
            "1.2".into(),
        )
    }

    fn close_notification(&self, _id: u32) {}
}

/// A notification daemon on `bus`, recording every notification shown.
pub struct NotificationServer {
    conn: zbus::Connection,
    shown: Arc<Mutex<Vec<Shown>>>,
}

impl NotificationServer {
    pub async fn start(bus: &TestBus) -> NotificationServer {
        Self::serve(&bus.address, None, PLAIN).await
    }

    /// A daemon on `bus` that says it can do `capabilities` ([`PLAIN`], [`FULL`]).
    pub async fn start_with(bus: &TestBus, capabilities: &[&str]) -> NotificationServer {
        Self::serve(&bus.address, None, capabilities).await
    }

    /// Serves on a bus given by address, calling `on_show` with each summary.
    pub async fn start_at(
        bus: &BusAddress,
        on_show: impl Fn(&str) + Send + Sync + 'static,
    ) -> NotificationServer {
        Self::serve(&bus.0, Some(Box::new(on_show)), PLAIN).await
    }

    async fn serve(
        address: &str,
        on_show: Option<OnShow>,
        capabilities: &[&str],
    ) -> NotificationServer {
        let shown = Arc::new(Mutex::new(Vec::new()));
        let recorder = Recorder {
            shown: shown.clone(),
            next_id: 0,
            on_show,
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
        };
        let conn = zbus::connection::Builder::address(address)
            .name("org.freedesktop.Notifications")
            .serve_at("/org/freedesktop/Notifications", recorder)
            .build()
            .await
            .expect("cannot serve org.freedesktop.Notifications on the test bus");
        NotificationServer { conn, shown }
    }

    /// Clicks the action `key` of pop-up `id`, as a user would.
    pub async fn click(&self, id: u32, key: &str) {
        let recorder = self
            .conn
            .object_server()
            .interface::<_, Recorder>("/org/freedesktop/Notifications")
            .await
            .unwrap();
        Recorder::action_invoked(recorder.signal_emitter(), id, key)
            .await
            .unwrap();
    }

    pub fn shown(&self) -> Vec<Shown> {
        self.shown.lock().unwrap().clone()
    }
}
