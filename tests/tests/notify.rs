//! Notifications end to end: bob copies alice's file through his mount; alice's mount
//! shows exactly one desktop notification on a real (private) D-Bus session bus.

use std::time::Duration;

use sharefs_tests::desktop::{NotificationServer, TestBus};
use sharefs_tests::mount::{fuse_available, TestMount};
use sharefs_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_through_a_mount_shows_one_desktop_notification() {
    if !fuse_available() {
        return;
    }
    let bus = TestBus::start();
    let daemon = NotificationServer::start(&bus).await;
    let server = TestServer::start();
    let env = [("DBUS_SESSION_BUS_ADDRESS", bus.address.as_str())];
    let alice = TestMount::with(&server, "alice", &[], &env);
    std::fs::write(alice.path("alice/report.pdf"), b"%PDF quarterly").unwrap();
    let bob = TestMount::new(&server, "bob");

    let local = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("cp")
        .arg(bob.path("alice/report.pdf"))
        .arg(local.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        std::fs::read(local.path().join("report.pdf")).unwrap(),
        b"%PDF quarterly"
    );

    // Wait (bounded) until alice's mount has shown it and acknowledged it on the server.
    let (client, _) = server.connect("alice").await;
    within("notification shown and acknowledged", async {
        loop {
            let pending = client.notifications(0).await.unwrap().0;
            if !daemon.shown().is_empty() && pending.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let shown = daemon.shown();
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0].app_name, "sharefs");
    assert_eq!(shown[0].summary, "bob downloaded report.pdf");
    assert!(shown[0].body.contains("14 B"), "{}", shown[0].body);
    assert!(
        alice.log_text().contains("bob downloaded report.pdf"),
        "not logged"
    );

    // Alice reading her own file is not a download.
    assert_eq!(
        std::fs::read(alice.path("alice/report.pdf")).unwrap(),
        b"%PDF quarterly"
    );
    assert!(client.notifications(0).await.unwrap().0.is_empty());
    assert_eq!(daemon.shown().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_notification_is_shown_at_next_mount_and_without_a_daemon_still_acked() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    {
        let (alice, _) = server.connect("alice").await;
        upload(&alice, "notes.txt", b"hello").await;
    }
    let bob = TestMount::new(&server, "bob");
    assert_eq!(
        std::fs::read(bob.path("alice/notes.txt")).unwrap(),
        b"hello"
    );

    // No notification daemon on this bus: the mount logs and still acknowledges.
    let bus = TestBus::start();
    let env = [("DBUS_SESSION_BUS_ADDRESS", bus.address.as_str())];
    let alice = TestMount::with(&server, "alice", &[], &env);
    let (client, _) = server.connect("alice").await;
    within("pending notification acknowledged", async {
        while !client.notifications(0).await.unwrap().0.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(alice.log_text().contains("bob downloaded notes.txt"));
    // The mount keeps working.
    assert_eq!(
        std::fs::read(alice.path("alice/notes.txt")).unwrap(),
        b"hello"
    );
}
