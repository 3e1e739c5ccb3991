//! Notifications end to end: bob copies alice's file through his mount; alice's mount
//! shows exactly one desktop notification on a real (private) D-Bus session bus. A burst
//! of downloads is one digest pop-up, over the one connection the mount keeps to the bus.

use std::time::Duration;

use sharefs_tests::desktop::{self, NotificationServer, TestBus};
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
    assert_eq!(shown[0].app_icon, "folder-remote");
    // This daemon has no action buttons: none are offered.
    assert!(shown[0].actions.is_empty(), "{shown:?}");
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

/// Waits (bounded) until `daemon` has shown `popups` pop-ups and the server has nothing
/// pending for alice (all acknowledged).
async fn shown_and_acknowledged(
    server: &TestServer,
    daemon: &NotificationServer,
    popups: usize,
) -> Vec<sharefs_tests::desktop::Shown> {
    let (client, _) = server.connect("alice").await;
    within("notifications shown and acknowledged", async {
        loop {
            let pending = client.notifications(0).await.unwrap().0;
            if daemon.shown().len() >= popups && pending.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    daemon.shown()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_downloads_is_one_digest_with_local_time_over_one_connection() {
    if !fuse_available() {
        return;
    }
    let bus = TestBus::start();
    let daemon = NotificationServer::start_with(&bus, desktop::FULL).await;
    let server = TestServer::start();
    // Five hours east of UTC (POSIX spells it UTC-5): the pop-up shows that clock.
    let env = [
        ("DBUS_SESSION_BUS_ADDRESS", bus.address.as_str()),
        ("TZ", "UTC-5"),
    ];
    // "Open folder" runs xdg-open: this one writes down what it was asked to open.
    let bin_dir = tempfile::tempdir().unwrap();
    let opened = bin_dir.path().join("opened");
    let xdg_open = bin_dir.path().join("xdg-open");
    std::fs::write(
        &xdg_open,
        format!("#!/bin/sh\necho \"$1\" >> '{}'\n", opened.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        &xdg_open,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let env = [env[0], env[1], ("PATH", path.as_str())];
    let alice_mount = TestMount::with(&server, "alice", &[], &env);
    let (alice, _) = server.connect("alice").await;
    let odd = "a<b>&c.pdf";
    upload(&alice, odd, b"markup").await;
    for i in 1..20 {
        upload(&alice, &format!("f{i:02}.pdf"), b"%PDF").await;
    }

    // Bob downloads all twenty at once (the odd name first, so the digest names it).
    let (bob, _) = server.connect("bob").await;
    download(&bob, "alice", odd).await.unwrap();
    let rest = (1..20).map(|i| {
        let bob = bob.clone();
        async move { download(&bob, "alice", &format!("f{i:02}.pdf")).await }
    });
    for got in futures::future::join_all(rest).await {
        assert_eq!(got.unwrap(), b"%PDF");
    }
    let shown = shown_and_acknowledged(&server, &daemon, 1).await;
    assert_eq!(shown.len(), 1, "one pop-up for the burst: {shown:#?}");
    let digest = &shown[0];
    assert_eq!(digest.summary, "bob downloaded 20 files");
    assert_eq!(digest.app_name, "sharefs");
    assert_eq!(digest.app_icon, "folder-remote");
    assert_eq!(digest.actions, ["open-folder", "Open folder"]);
    // The daemon reads markup: the odd name is escaped, not markup.
    assert!(
        digest.body.starts_with("a&lt;b&gt;&amp;c.pdf, "),
        "{}",
        digest.body
    );
    assert!(digest.body.contains(" and 15 more"), "{}", digest.body);
    // The clock of the latest download, in the mount's time zone.
    let recent = alice.notifications(50).await.unwrap().1;
    assert_eq!(recent.len(), 20);
    let last_s = recent.iter().map(|n| n.last_ms).max().unwrap() / 1000 + 5 * 3600;
    let clock = format!("{:02}:{:02}", (last_s / 3600) % 24, (last_s / 60) % 60);
    assert!(digest.body.ends_with(&clock), "{} vs {clock}", digest.body);
    assert!(
        alice_mount.log_text().contains("bob downloaded f19.pdf"),
        "each download is logged"
    );

    // A later download is a pop-up of its own, over the same connection.
    upload(&alice, "late.pdf", b"late").await;
    download(&bob, "alice", "late.pdf").await.unwrap();
    let shown = shown_and_acknowledged(&server, &daemon, 2).await;
    assert_eq!(shown.len(), 2, "{shown:#?}");
    assert_eq!(shown[1].summary, "bob downloaded late.pdf");
    assert!(shown[1].body.starts_with("4 B, "), "{}", shown[1].body);
    assert_eq!(shown[0].sender, shown[1].sender, "a new D-Bus connection");
    assert!(!shown[0].sender.is_empty());

    // Clicking "Open folder" opens alice's folder in the mount.
    daemon.click(shown[1].id, "open-folder").await;
    let folder = std::fs::canonicalize(alice_mount.path(""))
        .unwrap()
        .join("alice");
    eventually(TIMEOUT, "xdg-open run", || {
        std::fs::read_to_string(&opened).is_ok_and(|s| s.ends_with('\n'))
    });
    assert_eq!(
        std::fs::read_to_string(&opened).unwrap().trim(),
        folder.to_str().unwrap()
    );
}
