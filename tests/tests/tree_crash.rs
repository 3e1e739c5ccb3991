//! Crash safety of the tree: `kill -9` of the server at random moments while a client
//! moves a whole directory back and forth and writes beside it. After each restart the
//! directory is in exactly one place (where the last confirmed move put it, or where the
//! move in flight took it), its subtree is whole, and every confirmed write reads back.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use sharefs_client::remote::Move;
use sharefs_client::RemoteClient;
use sharefs_protocol::{EntryKind, ROOT_ID};
use sharefs_tests::*;

const FILES: usize = 40;

/// Where the moving directory may be: `(parent path, name)`.
const PLACES: [(&str, &str); 2] = [("", "proj"), ("archive/2026", "q3")];

async fn place_of(client: &RemoteClient) -> Vec<usize> {
    let mut found = Vec::new();
    for (i, (dir, name)) in PLACES.iter().enumerate() {
        let path = if dir.is_empty() {
            name.to_string()
        } else {
            format!("{dir}/{name}")
        };
        if let Ok(e) = client.resolve("alice", &path).await {
            assert_eq!(e.kind, EntryKind::Dir, "{path}");
            found.push(i);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_moved_during_kill_9_is_in_one_place_and_whole() {
    let mut server = TestServer::start();
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    {
        let (alice, _) = server.connect("alice").await;
        sharefs_client::paths::mkdir_p(&alice, "proj/src/deep")
            .await
            .unwrap();
        sharefs_client::paths::mkdir_p(&alice, "archive/2026")
            .await
            .unwrap();
        for i in 0..FILES {
            upload(
                &alice,
                &format!("proj/src/deep/f{i}"),
                &content(i as u64, 700 + i),
            )
            .await;
        }
    }
    let mut at = 0usize;
    let mut written: Vec<(String, u64)> = Vec::new();
    for round in 0..12u64 {
        let (alice, _) = server.connect("alice").await;
        let kill_after = Duration::from_millis(rng.gen_range(5..120));
        let mover = {
            let alice = alice.clone();
            let start = at;
            tokio::spawn(async move {
                // (confirmed place, place of a move whose answer never came)
                let mut confirmed = start;
                loop {
                    let (from_dir, from_name) = PLACES[confirmed];
                    let (to_dir, to_name) = PLACES[1 - confirmed];
                    let from_parent = match alice.resolve("alice", from_dir).await {
                        Ok(e) => e.id,
                        Err(_) => return (confirmed, Some(1 - confirmed)),
                    };
                    let to_parent = match alice.resolve("alice", to_dir).await {
                        Ok(e) => e.id,
                        Err(_) => return (confirmed, Some(1 - confirmed)),
                    };
                    let mv = Move {
                        parent: from_parent,
                        name: from_name.into(),
                        new_parent: to_parent,
                        new_name: to_name.into(),
                        noreplace: true,
                    };
                    match alice.rename(&mv).await {
                        Ok(_) => confirmed = 1 - confirmed,
                        Err(_) => return (confirmed, Some(1 - confirmed)),
                    }
                }
            })
        };
        let writer = {
            let alice = alice.clone();
            tokio::spawn(async move {
                let mut done = Vec::new();
                for i in 0.. {
                    let name = format!("w{round}-{i}");
                    let data = content(1000 * round + i, 300 + i as usize);
                    let target = sharefs_client::remote::UploadTarget::at(ROOT_ID, &name);
                    match sharefs_client::transfer::upload(&alice, &target, &data[..], None, |_| {})
                        .await
                    {
                        Ok(_) => done.push((name, 1000 * round + i)),
                        Err(_) => return done,
                    }
                }
                done
            })
        };
        tokio::time::sleep(kill_after).await;
        server.kill9();
        let (confirmed, maybe) = within("mover stops", mover).await.unwrap();
        let done = within("writer stops", writer).await.unwrap();
        written.extend(done);
        drop(alice);
        server.restart();

        let (alice, _) = server.connect("alice").await;
        let found = place_of(&alice).await;
        assert_eq!(
            found.len(),
            1,
            "round {round}: the directory is at {found:?}"
        );
        assert!(
            found[0] == confirmed || Some(found[0]) == maybe,
            "round {round}: at {} but confirmed {confirmed}",
            found[0]
        );
        at = found[0];
        let (dir, name) = PLACES[at];
        let base = if dir.is_empty() {
            name.to_string()
        } else {
            format!("{dir}/{name}")
        };
        let deep = alice
            .resolve("alice", &format!("{base}/src/deep"))
            .await
            .unwrap();
        assert_eq!(alice.list("alice", deep.id).await.unwrap().len(), FILES);
        for i in [0, FILES / 2, FILES - 1] {
            let got = download(&alice, "alice", &format!("{base}/src/deep/f{i}"))
                .await
                .unwrap();
            assert_eq!(got, content(i as u64, 700 + i), "round {round}: f{i}");
        }
    }
    let (alice, _) = server.connect("alice").await;
    for (name, seed) in &written {
        let got = download(&alice, "alice", name).await.unwrap();
        assert_eq!(
            sha256(&got),
            sha256(&content(*seed, 300 + (*seed % 1000) as usize)),
            "{name}"
        );
    }
    assert!(
        !written.is_empty(),
        "no write was confirmed before the kills"
    );
}
