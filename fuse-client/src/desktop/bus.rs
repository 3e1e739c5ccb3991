//! The desktop's notification daemon (`org.freedesktop.Notifications`) over one D-Bus
//! session connection, opened at the first pop-up and kept: a burst of pop-ups costs no
//! connection each. What the daemon can do (markup, action buttons) is asked once per
//! connection. Where it shows actions, a pop-up offers "Open folder", and a click opens
//! the folder with `xdg-open`.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use zbus::Variant;

use super::text::Popup;

/// The application name and icon every pop-up carries.
pub const APP_NAME: &str = "sharefs";
pub const APP_ICON: &str = "folder-remote";
/// The action key of "Open folder".
pub const OPEN_FOLDER: &str = "open-folder";
/// Pop-ups whose folder a click may still open; older ones are forgotten.
const REMEMBERED: usize = 64;

#[zbus::proxy(
    interface = "org.freedesktop.Notifications",
    default_service = "org.freedesktop.Notifications",
    default_path = "/org/freedesktop/Notifications"
)]
trait Notifications {
    #[allow(clippy::too_many_arguments)]
    fn notify(
        &self,
        app_name: &str,
        replaces_id: u32,
        app_icon: &str,
        summary: &str,
        body: &str,
        actions: &[&str],
        hints: HashMap<&str, Variant<'_>>,
        expire_timeout: i32,
    ) -> zbus::Result<u32>;

    fn get_capabilities(&self) -> zbus::Result<Vec<String>>;

    #[zbus(signal)]
    fn action_invoked(&self, id: u32, action_key: String) -> zbus::Result<()>;
}

/// Folders of recent pop-ups, by notification id, for their "Open folder" action.
type Folders = Arc<Mutex<VecDeque<(u32, PathBuf)>>>;

/// The connection to the daemon, once opened.
struct Open {
    proxy: NotificationsProxy<'static>,
    capabilities: Vec<String>,
    /// Opens folders on "Open folder" clicks; ends with the connection.
    actions: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(a) = self.actions.take() {
            a.abort();
        }
    }
}

/// The notification daemon of the session bus (`DBUS_SESSION_BUS_ADDRESS`).
#[derive(Default)]
pub struct DesktopBus {
    open: Option<Open>,
    folders: Folders,
}

impl DesktopBus {
    /// Connects if not connected; what the daemon can do.
    async fn connected(&mut self) -> zbus::Result<&Open> {
        if self.open.is_none() {
            let conn = zbus::Connection::session().await?;
            let proxy = NotificationsProxy::new(&conn).await?;
            let capabilities = proxy.get_capabilities().await?;
            tracing::debug!(?capabilities, "notification daemon found");
            let actions = if capabilities.iter().any(|c| c == "actions") {
                let clicks = proxy.receive_action_invoked().await?;
                Some(tokio::spawn(open_folders(clicks, self.folders.clone())))
            } else {
                None
            };
            self.open = Some(Open {
                proxy,
                capabilities,
                actions,
            });
        }
        self.open
            .as_ref()
            .ok_or_else(|| zbus::Error::Failure("not connected".into()))
    }

    /// Whether the daemon reads body text as markup (connecting if need be).
    pub async fn markup(&mut self) -> zbus::Result<bool> {
        Ok(self
            .connected()
            .await?
            .capabilities
            .iter()
            .any(|c| c == "body-markup"))
    }

    /// Shows `popup` (in place of pop-up `replaces`, if not 0), with an "Open folder"
    /// action for `folder` where the daemon has actions; returns the pop-up's id. A
    /// failed call drops the connection: the next pop-up opens a new one.
    pub async fn show(
        &mut self,
        popup: &Popup,
        folder: Option<PathBuf>,
        replaces: u32,
    ) -> zbus::Result<u32> {
        let open = self.connected().await?;
        let with_actions = folder.is_some() && open.actions.is_some();
        let actions: &[&str] = if with_actions {
            &[OPEN_FOLDER, "Open folder"]
        } else {
            &[]
        };
        let mut hints = HashMap::new();
        hints.insert("category", Variant::from("transfer.complete"));
        // Low urgency: a download of one's file is news, not an alarm.
        hints.insert("urgency", Variant::from(0u8));
        let shown = open
            .proxy
            .notify(
                APP_NAME,
                replaces,
                APP_ICON,
                &popup.summary,
                &popup.body,
                actions,
                hints,
                -1,
            )
            .await;
        match shown {
            Ok(id) => {
                if let (true, Some(folder)) = (with_actions, folder) {
                    if let Ok(mut f) = self.folders.lock() {
                        // A pop-up replaced in place opens the folder of what it shows now.
                        f.retain(|(shown, _)| *shown != id);
                        if f.len() >= REMEMBERED {
                            f.pop_front();
                        }
                        f.push_back((id, folder));
                    }
                }
                Ok(id)
            }
            Err(e) => {
                self.open = None;
                Err(e)
            }
        }
    }
}

/// Opens the folder of each pop-up whose "Open folder" is clicked.
async fn open_folders(mut clicks: ActionInvokedStream, folders: Folders) {
    while let Some(click) = clicks.next().await {
        let Ok(args) = click.args() else {
            continue;
        };
        if args.action_key != OPEN_FOLDER {
            continue;
        }
        let folder = folders.lock().ok().and_then(|f| {
            f.iter()
                .find(|(id, _)| *id == args.id)
                .map(|(_, p)| p.clone())
        });
        let Some(folder) = folder else {
            continue;
        };
        match tokio::process::Command::new("xdg-open")
            .arg(&folder)
            .stdin(std::process::Stdio::null())
            .spawn()
        {
            // Reaped in the background; xdg-open returns once the file manager started.
            Ok(mut child) => {
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
            }
            Err(e) => {
                tracing::warn!(folder = %folder.display(), error = %e, "cannot open the folder")
            }
        }
    }
}
