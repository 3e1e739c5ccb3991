//! Protocol 2 against a real server over TCP, spoken by hand: each user's folder is a tree
//! (directories of any depth, renames across directories, symbolic links, modes and
//! times), others see what the modes let them, events and notifications name entries
//! where they are, and the tree outlives restarts. Needs only the server
//! (`cargo test -p sharefs-tests --no-default-features --test tree_server`).

use std::time::Duration;

use bytes::Bytes;
use sharefs_protocol::{EntryKind, ErrorCode, Event, FileInfo, Reply, Request, ROOT_ID};
use sharefs_tests::raw::RawClient;
use sharefs_tests::*;

/// A logged-in raw client with shorthand for the requests of protocol 2.
struct Client {
    raw: RawClient,
    user: String,
}

type Answer<T> = Result<T, ErrorCode>;

impl Client {
    async fn login(server: &TestServer, user: &str) -> Client {
        Client {
            raw: RawClient::login(&server.addr, user).await,
            user: user.to_string(),
        }
    }

    async fn call(&mut self, op: Request, payload: Bytes) -> Answer<(Reply, Bytes)> {
        self.raw.call(op, payload).await.map_err(|e| e.code)
    }

    async fn file(&mut self, op: Request) -> Answer<FileInfo> {
        match self.call(op, Bytes::new()).await? {
            (Reply::File { file }, _) => Ok(file),
            (other, _) => panic!("unexpected reply {other:?}"),
        }
    }

    async fn ok(&mut self, op: Request) -> Answer<()> {
        match self.call(op, Bytes::new()).await? {
            (Reply::Ok, _) => Ok(()),
            (other, _) => panic!("unexpected reply {other:?}"),
        }
    }

    async fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Answer<FileInfo> {
        self.file(Request::Mkdir {
            owner: self.user.clone(),
            parent,
            name: name.into(),
            mode,
        })
        .await
    }

    async fn put(&mut self, parent: u64, name: &str, data: &[u8]) -> Answer<FileInfo> {
        let op = Request::Put {
            owner: self.user.clone(),
            parent,
            name: name.into(),
            replace: None,
            blake3: blake3::hash(data).to_hex().to_string(),
            mode: None,
            mtime_ns: None,
        };
        match self.call(op, Bytes::copy_from_slice(data)).await? {
            (Reply::File { file }, _) => Ok(file),
            (other, _) => panic!("unexpected reply {other:?}"),
        }
    }

    async fn lookup(&mut self, owner: &str, parent: u64, name: &str) -> Answer<FileInfo> {
        self.file(Request::Lookup {
            owner: owner.into(),
            parent,
            name: name.into(),
        })
        .await
    }

    async fn stat(&mut self, owner: &str, id: u64) -> Answer<FileInfo> {
        self.file(Request::Stat {
            owner: owner.into(),
            id,
        })
        .await
    }

    async fn resolve(&mut self, owner: &str, path: &str) -> Answer<FileInfo> {
        self.file(Request::Resolve {
            owner: owner.into(),
            path: path.into(),
        })
        .await
    }

    async fn list(&mut self, owner: &str, dir: u64) -> Answer<Vec<String>> {
        let op = Request::List {
            owner: owner.into(),
            dir,
            after: None,
            limit: None,
        };
        match self.call(op, Bytes::new()).await? {
            (Reply::Files { files, .. }, _) => Ok(files.into_iter().map(|f| f.name).collect()),
            (other, _) => panic!("unexpected reply {other:?}"),
        }
    }

    /// The whole content of `owner`'s file `id`.
    async fn read(&mut self, owner: &str, id: u64) -> Answer<Vec<u8>> {
        let op = Request::Open {
            owner: owner.into(),
            id,
            head: 1 << 20,
        };
        let (handle, file, head) = match self.call(op, Bytes::new()).await? {
            (Reply::Opened { handle, file }, head) => (handle, file, head),
            (other, _) => panic!("unexpected reply {other:?}"),
        };
        let mut data = head.to_vec();
        while (data.len() as u64) < file.size {
            let op = Request::Read {
                handle,
                offset: data.len() as u64,
                len: 1 << 20,
            };
            let (_, chunk) = self.call(op, Bytes::new()).await?;
            assert!(!chunk.is_empty());
            data.extend_from_slice(&chunk);
        }
        if handle != 0 {
            self.ok(Request::Close { handle }).await?;
        }
        Ok(data)
    }

    async fn rename(
        &mut self,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        noreplace: bool,
    ) -> Answer<FileInfo> {
        self.file(Request::Rename {
            owner: self.user.clone(),
            parent,
            name: name.into(),
            new_parent,
            new_name: new_name.into(),
            noreplace,
        })
        .await
    }

    async fn remove(&mut self, parent: u64, name: &str, dir: bool) -> Answer<()> {
        self.ok(Request::Remove {
            owner: self.user.clone(),
            parent,
            name: name.into(),
            dir,
        })
        .await
    }

    async fn chmod(&mut self, id: u64, mode: u32) -> Answer<FileInfo> {
        self.file(Request::SetAttr {
            owner: self.user.clone(),
            id,
            mode: Some(mode),
            atime_ns: None,
            mtime_ns: None,
        })
        .await
    }

    /// Pushed events until none comes for a moment.
    async fn events(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(e) = self.raw.event_within(Duration::from_millis(500)).await {
            events.push(e);
        }
        events
    }
}

fn server() -> TestServer {
    TestServer::start_with(&["--plaintext"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directories_nest_forty_deep_and_outlive_a_restart() {
    let mut server = server();
    let mut alice = Client::login(&server, "alice").await;
    let mut parent = ROOT_ID;
    let mut path = Vec::new();
    for depth in 0..40 {
        let name = format!("level{depth}");
        parent = alice.mkdir(parent, &name, 0o755).await.unwrap().id;
        path.push(name);
    }
    let file = alice
        .put(parent, "deep.txt", b"at the bottom")
        .await
        .unwrap();
    path.push("deep.txt".into());
    let path = path.join("/");
    assert_eq!(alice.resolve("alice", &path).await.unwrap().id, file.id);
    let mut bob = Client::login(&server, "bob").await;
    assert_eq!(bob.read("alice", file.id).await.unwrap(), b"at the bottom");

    // kill -9: the journal is replayed.
    server.restart();
    let mut alice = Client::login(&server, "alice").await;
    let found = alice.resolve("alice", &path).await.unwrap();
    assert_eq!((found.id, found.parent), (file.id, parent));
    assert_eq!(
        alice.read("alice", file.id).await.unwrap(),
        b"at the bottom"
    );
    assert_eq!(
        alice.resolve("alice", "level0/nothing").await.unwrap_err(),
        ErrorCode::NotFound
    );
    assert_eq!(
        alice
            .resolve("alice", &format!("{path}/below"))
            .await
            .unwrap_err(),
        ErrorCode::NotADirectory
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_renamed_across_directories_takes_its_subtree() {
    let server = server();
    let mut alice = Client::login(&server, "alice").await;
    let a = alice.mkdir(ROOT_ID, "a", 0o755).await.unwrap();
    let b = alice.mkdir(a.id, "b", 0o755).await.unwrap();
    let c = alice.put(b.id, "c.pdf", b"report").await.unwrap();
    let x = alice.mkdir(ROOT_ID, "x", 0o755).await.unwrap();
    let moved = alice.rename(ROOT_ID, "a", x.id, "y", false).await.unwrap();
    assert_eq!(
        (moved.id, moved.parent, moved.name.as_str()),
        (a.id, x.id, "y")
    );
    let found = alice.resolve("alice", "x/y/b/c.pdf").await.unwrap();
    assert_eq!((found.id, found.version), (c.id, c.version));
    assert_eq!(alice.read("alice", c.id).await.unwrap(), b"report");
    assert_eq!(
        alice.resolve("alice", "a/b/c.pdf").await.unwrap_err(),
        ErrorCode::NotFound
    );
    assert_eq!(alice.list("alice", ROOT_ID).await.unwrap(), ["x"]);
    assert_eq!(alice.stat("alice", b.id).await.unwrap().parent, a.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renames_fail_as_rename_2_does() {
    let server = server();
    let mut alice = Client::login(&server, "alice").await;
    let d = alice.mkdir(ROOT_ID, "d", 0o755).await.unwrap();
    let sub = alice.mkdir(d.id, "sub", 0o755).await.unwrap();
    alice.put(d.id, "inside", b"i").await.unwrap();
    alice.mkdir(ROOT_ID, "empty", 0o755).await.unwrap();
    alice.put(ROOT_ID, "f", b"f").await.unwrap();
    alice.put(ROOT_ID, "g", b"g").await.unwrap();
    let cases = [
        (
            ROOT_ID,
            "d",
            sub.id,
            "loop",
            false,
            ErrorCode::InvalidArgument,
        ),
        (
            ROOT_ID,
            "d",
            d.id,
            "self",
            false,
            ErrorCode::InvalidArgument,
        ),
        (ROOT_ID, "empty", ROOT_ID, "d", false, ErrorCode::NotEmpty),
        (
            ROOT_ID,
            "f",
            ROOT_ID,
            "empty",
            false,
            ErrorCode::IsADirectory,
        ),
        (
            ROOT_ID,
            "empty",
            ROOT_ID,
            "f",
            false,
            ErrorCode::NotADirectory,
        ),
        (ROOT_ID, "f", ROOT_ID, "g", true, ErrorCode::Exists),
        (ROOT_ID, "nothing", ROOT_ID, "h", false, ErrorCode::NotFound),
        (ROOT_ID, "f", 999_999, "h", false, ErrorCode::NotFound),
        (
            ROOT_ID,
            "f",
            ROOT_ID,
            "bad/name",
            false,
            ErrorCode::InvalidName,
        ),
    ];
    for (parent, name, new_parent, new_name, noreplace, code) in cases {
        let got = alice
            .rename(parent, name, new_parent, new_name, noreplace)
            .await
            .unwrap_err();
        assert_eq!(got, code, "{name} -> {new_name}");
    }
    // To itself: nothing happens, successfully.
    let f = alice.lookup("alice", ROOT_ID, "f").await.unwrap();
    assert_eq!(
        alice
            .rename(ROOT_ID, "f", ROOT_ID, "f", false)
            .await
            .unwrap(),
        f
    );
    // A file replaces a file; a directory replaces an empty directory.
    alice
        .rename(ROOT_ID, "f", ROOT_ID, "g", false)
        .await
        .unwrap();
    assert_eq!(alice.read("alice", f.id).await.unwrap(), b"f");
    alice.remove(d.id, "inside", false).await.unwrap();
    alice
        .rename(ROOT_ID, "empty", d.id, "sub", false)
        .await
        .unwrap();
    assert_eq!(alice.list("alice", ROOT_ID).await.unwrap(), ["d", "g"]);
    assert_eq!(
        alice.stat("alice", sub.id).await.unwrap_err(),
        ErrorCode::NotFound
    );
    // Nobody renames in someone else's tree.
    let mut bob = Client::login(&server, "bob").await;
    let err = bob
        .file(Request::Rename {
            owner: "alice".into(),
            parent: ROOT_ID,
            name: "g".into(),
            new_parent: ROOT_ID,
            new_name: "mine".into(),
            noreplace: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err, ErrorCode::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_and_rmdir() {
    let server = server();
    let mut alice = Client::login(&server, "alice").await;
    let d = alice.mkdir(ROOT_ID, "d", 0o755).await.unwrap();
    alice.put(d.id, "f", b"f").await.unwrap();
    assert_eq!(
        alice.remove(ROOT_ID, "d", false).await,
        Err(ErrorCode::IsADirectory)
    );
    assert_eq!(
        alice.remove(ROOT_ID, "d", true).await,
        Err(ErrorCode::NotEmpty)
    );
    assert_eq!(
        alice.remove(d.id, "f", true).await,
        Err(ErrorCode::NotADirectory)
    );
    assert_eq!(
        alice.remove(d.id, "nope", false).await,
        Err(ErrorCode::NotFound)
    );
    alice.remove(d.id, "f", false).await.unwrap();
    alice.remove(ROOT_ID, "d", true).await.unwrap();
    assert!(alice.list("alice", ROOT_ID).await.unwrap().is_empty());
    assert_eq!(
        alice.mkdir(d.id, "orphan", 0o755).await.unwrap_err(),
        ErrorCode::NotFound
    );
    alice.mkdir(ROOT_ID, "again", 0o755).await.unwrap();
    assert_eq!(
        alice.mkdir(ROOT_ID, "again", 0o755).await.unwrap_err(),
        ErrorCode::Exists
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symbolic_links_keep_their_target_as_given() {
    let server = server();
    let mut alice = Client::login(&server, "alice").await;
    let link = alice
        .file(Request::Symlink {
            owner: "alice".into(),
            parent: ROOT_ID,
            name: "link".into(),
            target: "../../elsewhere/x".into(),
        })
        .await
        .unwrap();
    assert_eq!(link.kind, EntryKind::Symlink);
    assert_eq!(link.target.as_deref(), Some("../../elsewhere/x"));
    assert_eq!((link.size, link.mode), (17, 0o777));
    let mut bob = Client::login(&server, "bob").await;
    assert_eq!(bob.lookup("alice", ROOT_ID, "link").await.unwrap(), link);
    assert_eq!(
        bob.read("alice", link.id).await.unwrap_err(),
        ErrorCode::InvalidArgument
    );
    let again = Request::Symlink {
        owner: "alice".into(),
        parent: ROOT_ID,
        name: "link".into(),
        target: "t".into(),
    };
    assert_eq!(alice.file(again).await.unwrap_err(), ErrorCode::Exists);
    let empty = Request::Symlink {
        owner: "alice".into(),
        parent: ROOT_ID,
        name: "empty".into(),
        target: String::new(),
    };
    assert_eq!(
        alice.file(empty).await.unwrap_err(),
        ErrorCode::InvalidArgument
    );
    // A file stored by name replaces a link of that name.
    let file = alice.put(ROOT_ID, "link", b"now a file").await.unwrap();
    assert_ne!(file.id, link.id);
    assert_eq!(file.kind, EntryKind::File);
    alice.remove(ROOT_ID, "link", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn others_read_what_the_other_bits_allow() {
    let server = server();
    let mut alice = Client::login(&server, "alice").await;
    let mut bob = Client::login(&server, "bob").await;
    let secret = alice.put(ROOT_ID, "secret", b"s").await.unwrap();
    assert_eq!(secret.mode, 0o644);
    alice.chmod(secret.id, 0o600).await.unwrap();
    assert_eq!(
        bob.read("alice", secret.id).await.unwrap_err(),
        ErrorCode::PermissionDenied
    );
    assert_eq!(bob.stat("alice", secret.id).await.unwrap().mode, 0o600);

    let so = alice.mkdir(ROOT_ID, "search-only", 0o711).await.unwrap();
    let inside = alice.put(so.id, "inside", b"in").await.unwrap();
    assert_eq!(
        bob.list("alice", so.id).await.unwrap_err(),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        bob.lookup("alice", so.id, "inside").await.unwrap().id,
        inside.id
    );
    assert_eq!(bob.read("alice", inside.id).await.unwrap(), b"in");

    let closed = alice.mkdir(ROOT_ID, "closed", 0o700).await.unwrap();
    let hidden = alice.put(closed.id, "hidden", b"h").await.unwrap();
    assert_eq!(
        bob.lookup("alice", closed.id, "hidden").await.unwrap_err(),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        bob.stat("alice", hidden.id).await.unwrap_err(),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        bob.read("alice", hidden.id).await.unwrap_err(),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        bob.resolve("alice", "closed/hidden").await.unwrap_err(),
        ErrorCode::PermissionDenied
    );
    // The owner reads all of it; a chmod opens it to others.
    assert_eq!(alice.read("alice", hidden.id).await.unwrap(), b"h");
    alice.chmod(closed.id, 0o755).await.unwrap();
    assert_eq!(bob.read("alice", hidden.id).await.unwrap(), b"h");
    // Nobody but the owner writes.
    let err = bob
        .file(Request::Mkdir {
            owner: "alice".into(),
            parent: ROOT_ID,
            name: "intruder".into(),
            mode: 0o777,
        })
        .await
        .unwrap_err();
    assert_eq!(err, ErrorCode::PermissionDenied);
    let err = bob
        .file(Request::SetAttr {
            owner: "alice".into(),
            id: secret.id,
            mode: Some(0o644),
            atime_ns: None,
            mtime_ns: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err, ErrorCode::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_are_settable_and_directories_change_with_their_entries() {
    let server = server();
    let mut alice = Client::login(&server, "alice").await;
    let d = alice.mkdir(ROOT_ID, "d", 0o755).await.unwrap();
    let f = alice.put(d.id, "f", b"one").await.unwrap();
    let set = alice
        .file(Request::SetAttr {
            owner: "alice".into(),
            id: f.id,
            mode: None,
            atime_ns: Some(1_000_000_000),
            mtime_ns: Some(2_000_000_000),
        })
        .await
        .unwrap();
    assert_eq!((set.atime_ns, set.mtime_ns), (1_000_000_000, 2_000_000_000));
    assert!(set.ctime_ns >= f.ctime_ns);
    assert_eq!(set.version, f.version);
    let d1 = alice.stat("alice", d.id).await.unwrap();
    assert!(d1.mtime_ns >= f.ctime_ns, "adding f changed d");
    tokio::time::sleep(Duration::from_millis(5)).await;
    alice.rename(d.id, "f", d.id, "g", false).await.unwrap();
    let d2 = alice.stat("alice", d.id).await.unwrap();
    assert!(d2.mtime_ns > d1.mtime_ns && d2.ctime_ns > d1.ctime_ns);
    let g = alice.stat("alice", f.id).await.unwrap();
    assert!(g.ctime_ns > set.ctime_ns, "a rename changes the ctime");
    assert_eq!(g.mtime_ns, 2_000_000_000, "but not the mtime");
    // New content: new version, mtime as given.
    let op = Request::Put {
        owner: "alice".into(),
        parent: d.id,
        name: "g".into(),
        replace: None,
        blake3: blake3::hash(b"two").to_hex().to_string(),
        mode: None,
        mtime_ns: Some(3),
    };
    let (reply, _) = alice.call(op, Bytes::from_static(b"two")).await.unwrap();
    let Reply::File { file: g2 } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!((g2.id, g2.mtime_ns), (f.id, 3));
    assert_ne!(g2.version, f.version);
    tokio::time::sleep(Duration::from_millis(5)).await;
    alice.remove(d.id, "g", false).await.unwrap();
    let d3 = alice.stat("alice", d.id).await.unwrap();
    assert!(d3.mtime_ns > d2.mtime_ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_notifies_with_the_path_from_the_root() {
    let server = server();
    let mut alice = Client::login(&server, "alice").await;
    let a = alice.mkdir(ROOT_ID, "a", 0o755).await.unwrap();
    let b = alice.mkdir(a.id, "b", 0o755).await.unwrap();
    let c = alice.put(b.id, "c.pdf", b"pdf").await.unwrap();
    let mut bob = Client::login(&server, "bob").await;
    assert_eq!(bob.read("alice", c.id).await.unwrap(), b"pdf");
    let events = alice.events().await;
    let notified: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Notification { notification } => Some(notification),
            _ => None,
        })
        .collect();
    assert_eq!(notified.len(), 1, "{events:?}");
    assert_eq!(notified[0].file, "a/b/c.pdf");
    assert_eq!(notified[0].downloader, "bob");
    // The owner reading is no download.
    alice.read("alice", c.id).await.unwrap();
    assert!(alice
        .events()
        .await
        .iter()
        .all(|e| !matches!(e, Event::Notification { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quota_counts_the_whole_tree() {
    let server = server();
    server.user(&["quota", "alice", "100"], None);
    let mut alice = Client::login(&server, "alice").await;
    let d = alice.mkdir(ROOT_ID, "d", 0o755).await.unwrap();
    let e = alice.mkdir(d.id, "e", 0o755).await.unwrap();
    alice.put(e.id, "sixty", &[1; 60]).await.unwrap();
    assert_eq!(
        alice.put(ROOT_ID, "fifty", &[2; 50]).await.unwrap_err(),
        ErrorCode::QuotaExceeded
    );
    alice.put(d.id, "forty", &[3; 40]).await.unwrap();
    let (reply, _) = alice.call(Request::StatFs, Bytes::new()).await.unwrap();
    let Reply::Space(space) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!((space.total, space.used, space.available), (100, 100, 0));
    assert_eq!(space.files, 4);
    alice.remove(e.id, "sixty", false).await.unwrap();
    alice.put(ROOT_ID, "fifty", &[2; 50]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_changes_and_keep_private_places_private() {
    let server = server();
    let mut alice = Client::login(&server, "alice").await;
    let mut alice2 = Client::login(&server, "alice").await;
    let mut carol = Client::login(&server, "carol").await;
    let a = alice.mkdir(ROOT_ID, "a", 0o755).await.unwrap();
    let f = alice.put(a.id, "f", b"f").await.unwrap();
    let x = alice.mkdir(ROOT_ID, "x", 0o755).await.unwrap();
    for c in [&mut alice2, &mut carol] {
        let events = c.events().await;
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Changed { file, from: None, .. } if file.id == f.id)),
            "{events:?}"
        );
    }
    assert!(
        alice.events().await.is_empty(),
        "no echo to the session that made it"
    );

    alice.rename(a.id, "f", x.id, "g", false).await.unwrap();
    for c in [&mut alice2, &mut carol] {
        let events = c.events().await;
        let moved = events.iter().find_map(|e| match e {
            Event::Changed {
                owner,
                file,
                from: Some(from),
            } if file.id == f.id => Some((owner.clone(), file.clone(), from.clone())),
            _ => None,
        });
        let (owner, file, from) = moved.unwrap_or_else(|| panic!("{events:?}"));
        assert_eq!(owner, "alice");
        assert_eq!((file.parent, file.name.as_str()), (x.id, "g"));
        assert_eq!((from.parent, from.name.as_str()), (a.id, "f"));
        // Both parents, with their new times.
        for dir in [a.id, x.id] {
            assert!(events
                .iter()
                .any(|e| matches!(e, Event::Changed { file, .. } if file.id == dir)));
        }
    }
    alice.remove(x.id, "g", false).await.unwrap();
    for c in [&mut alice2, &mut carol] {
        let events = c.events().await;
        assert!(events.iter().any(|e| matches!(
            e,
            Event::Removed { id, parent, name, .. } if *id == f.id && *parent == x.id && name == "g"
        )));
    }

    // In a closed directory: the owner's other sessions hear of it, others do not.
    let closed = alice.mkdir(ROOT_ID, "closed", 0o700).await.unwrap();
    alice2.events().await;
    carol.events().await;
    let secret = alice.put(closed.id, "secret.txt", b"s").await.unwrap();
    let seen = |events: &[Event]| {
        events.iter().any(|e| match e {
            Event::Changed { file, .. } => file.id == secret.id,
            Event::Removed { id, .. } => *id == secret.id,
            _ => false,
        })
    };
    assert!(seen(&alice2.events().await));
    let carols = carol.events().await;
    assert!(!seen(&carols), "{carols:?}");
    // Moved out into the open, it appears to others (without where it came from).
    alice
        .rename(closed.id, "secret.txt", ROOT_ID, "public.txt", false)
        .await
        .unwrap();
    let carols = carol.events().await;
    assert!(
        carols.iter().any(|e| matches!(
            e,
            Event::Changed { file, from: None, .. } if file.id == secret.id
        )),
        "{carols:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_1_client_is_told_to_upgrade() {
    let server = server();
    let stream = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let err = match RawClient::hello_as(stream, 1).await {
        Ok(_) => panic!("a version 1 hello was accepted"),
        Err(e) => e,
    };
    assert_eq!(err.code, ErrorCode::VersionMismatch);
    assert_eq!(
        err.message,
        "this server speaks sharefs protocol 3 and the client 1: upgrade the client (sharefs --version)"
    );
    let stream = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let err = RawClient::hello_as(stream, 4).await.err().unwrap();
    assert!(
        err.message.contains("upgrade the server"),
        "{}",
        err.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tree_survives_restarts_from_journal_and_snapshot() {
    let mut server = server();
    let mut alice = Client::login(&server, "alice").await;
    let docs = alice.mkdir(ROOT_ID, "docs", 0o750).await.unwrap();
    let f = alice.put(docs.id, "a.txt", b"a").await.unwrap();
    alice
        .file(Request::Symlink {
            owner: "alice".into(),
            parent: docs.id,
            name: "l".into(),
            target: "a.txt".into(),
        })
        .await
        .unwrap();
    // Enough changes for the journal to be folded into a snapshot.
    let ops = (0..1500)
        .map(|i| {
            let op = Request::SetAttr {
                owner: "alice".into(),
                id: f.id,
                mode: None,
                atime_ns: Some(i),
                mtime_ns: None,
            };
            (op, Bytes::new())
        })
        .collect();
    for answer in alice.raw.pipeline(ops).await {
        answer.unwrap();
    }
    let renamed = alice
        .rename(docs.id, "a.txt", ROOT_ID, "b.txt", false)
        .await
        .unwrap();
    let before = (
        alice.stat("alice", docs.id).await.unwrap(),
        alice.stat("alice", f.id).await.unwrap(),
    );
    assert_eq!(renamed.id, f.id);
    server.restart();
    let mut alice = Client::login(&server, "alice").await;
    let after = (
        alice.stat("alice", docs.id).await.unwrap(),
        alice.stat("alice", f.id).await.unwrap(),
    );
    assert_eq!(before, after);
    // Pipelined requests run in any order: one of them is the last.
    assert!((0..1500).contains(&after.1.atime_ns));
    assert_eq!(alice.list("alice", docs.id).await.unwrap(), ["l"]);
    assert_eq!(alice.read("alice", f.id).await.unwrap(), b"a");
    let snapshot = std::fs::read_to_string(server.data.join("files/alice/snapshot.json")).unwrap();
    assert!(snapshot.contains("\"docs\""), "the snapshot holds the tree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_handle_reads_its_version_after_moves_and_removal() {
    let server = server();
    let mut alice = Client::login(&server, "alice").await;
    let d = alice.mkdir(ROOT_ID, "d", 0o755).await.unwrap();
    let data = content(7, 300_000);
    let f = alice.put(d.id, "big", &data).await.unwrap();
    let open = Request::Open {
        owner: "alice".into(),
        id: f.id,
        head: 0,
    };
    let (Reply::Opened { handle, .. }, _) = alice.call(open, Bytes::new()).await.unwrap() else {
        panic!()
    };
    let x = alice.mkdir(ROOT_ID, "x", 0o755).await.unwrap();
    alice.rename(ROOT_ID, "d", x.id, "d", false).await.unwrap();
    alice.remove(d.id, "big", false).await.unwrap();
    let read = Request::Read {
        handle,
        offset: 1000,
        len: 5000,
    };
    let (_, got) = alice.call(read, Bytes::new()).await.unwrap();
    assert_eq!(&got[..], &data[1000..6000]);
}

/// Entries whose JSON is as fat as it gets: names that escape to twice their length and
/// link targets of 4,095 control characters (six bytes each as JSON). A page of a
/// directory of them stays within its byte budget, a reply carrying one fits its room, and
/// the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fat_entries_come_in_bounded_pages_and_replies() {
    let server = server();
    let mut carol = Client::login(&server, "carol").await;
    let d = carol.mkdir(ROOT_ID, "fat", 0o755).await.unwrap();
    let target = "\u{1}".repeat(4095);
    let ops = (0..600)
        .map(|i| {
            let op = Request::Symlink {
                owner: "carol".into(),
                parent: d.id,
                name: format!("{}{i:04}", "\\".repeat(251)),
                target: target.clone(),
            };
            (op, Bytes::new())
        })
        .collect();
    for answer in carol.raw.pipeline(ops).await {
        answer.unwrap();
    }
    let mut bob = Client::login(&server, "bob").await;
    let one = bob
        .lookup("carol", d.id, &format!("{}0007", "\\".repeat(251)))
        .await
        .unwrap();
    assert_eq!(one.target.as_deref(), Some(target.as_str()));
    let mut after = None;
    let mut pages = 0;
    let mut seen = 0;
    loop {
        let op = Request::List {
            owner: "carol".into(),
            dir: d.id,
            after: after.clone(),
            limit: None,
        };
        let (reply, _) = bob.call(op, Bytes::new()).await.unwrap();
        let Reply::Files { files, more } = reply else {
            panic!("{reply:?}")
        };
        // Bounds the JSON (the protocol crate checks the bound against the encoding).
        let json: usize = files.iter().map(|f| f.json_size_bound() + 1).sum();
        assert!(json <= sharefs_protocol::LIST_PAGE_BYTES, "{json} bytes");
        seen += files.len();
        pages += 1;
        after = files.last().map(|f| f.name.clone());
        if !more {
            break;
        }
    }
    assert_eq!(seen, 600);
    assert!(pages > 1);
    assert_eq!(bob.read("carol", 0).await.unwrap_err(), ErrorCode::NotFound);
}

/// A data directory as the protocol 1 server left it (a snapshot with `files`, a journal,
/// a pack and a blob) is served as a tree from the first start, and stays one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flat_data_directory_is_served_as_a_tree() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let folder = data.join("files/alice");
    std::fs::create_dir_all(&folder).unwrap();
    let small = b"small and packed";
    let big = content(11, 200_000);
    std::fs::write(folder.join("pack-1.dat"), small).unwrap();
    std::fs::write(folder.join(format!("{:016x}.blob", 77)), &big).unwrap();
    let h = |b: &[u8]| blake3::hash(b).to_hex().to_string();
    std::fs::write(
        folder.join("snapshot.json"),
        format!(
            r#"{{"journal":0,"files":[{{"name":"notes.txt","size":{},"mtime_ns":5,"version":70,"blake3":"{}","pack":{{"pack":1,"offset":0}}}}]}}"#,
            small.len(),
            h(small)
        ),
    )
    .unwrap();
    std::fs::write(
        folder.join("journal-0.jsonl"),
        format!(
            "{}\n",
            format_args!(
                r#"{{"put":{{"name":"big.bin","size":{},"mtime_ns":6,"version":77,"blake3":"{}"}}}}"#,
                big.len(),
                h(&big)
            )
        ),
    )
    .unwrap();
    let mut server = TestServer::start_in(Some(&data), &["--plaintext"]);
    let mut bob = Client::login(&server, "bob").await;
    assert_eq!(
        bob.list("alice", ROOT_ID).await.unwrap(),
        ["big.bin", "notes.txt"]
    );
    let notes = bob.lookup("alice", ROOT_ID, "notes.txt").await.unwrap();
    assert_eq!(
        (notes.mode, notes.mtime_ns, notes.kind),
        (0o644, 5, EntryKind::File)
    );
    assert_eq!(bob.read("alice", notes.id).await.unwrap(), small);
    let big_id = bob.resolve("alice", "big.bin").await.unwrap().id;
    assert_eq!(bob.read("alice", big_id).await.unwrap(), big);
    let mut alice = Client::login(&server, "alice").await;
    let d = alice.mkdir(ROOT_ID, "dir", 0o755).await.unwrap();
    alice
        .rename(ROOT_ID, "notes.txt", d.id, "notes.txt", false)
        .await
        .unwrap();
    server.restart();
    let mut bob = Client::login(&server, "bob").await;
    let moved = bob.resolve("alice", "dir/notes.txt").await.unwrap();
    assert_eq!(moved.id, notes.id);
    assert_eq!(bob.read("alice", moved.id).await.unwrap(), small);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_handles_of_entries_are_limited_per_connection_and_per_user() {
    let server = TestServer::start_with(&[
        "--plaintext",
        "--max-open-per-connection",
        "60",
        "--max-open-per-user",
        "90",
    ]);
    let mut alice = Client::login(&server, "alice").await;
    let d = alice.mkdir(ROOT_ID, "d", 0o755).await.unwrap();
    let big = alice
        .put(d.id, "big", &content(2, 300 * 1024))
        .await
        .unwrap();
    let mut carol = RawClient::login(&server.addr, "carol").await;
    assert_eq!(carol.open_many("alice", big.id, 200).await, (60, 140));
    let mut carol2 = RawClient::login(&server.addr, "carol").await;
    assert_eq!(carol2.open_many("alice", big.id, 200).await, (30, 170));
    // Others still open; handles go with their connection.
    let mut bob = Client::login(&server, "bob").await;
    assert_eq!(bob.read("alice", big.id).await.unwrap().len(), 300 * 1024);
    drop(carol);
    eventually(
        Duration::from_secs(10),
        "carol's handles are given back",
        || server.log_text().matches("disconnected").count() >= 1,
    );
    let mut carol3 = RawClient::login(&server.addr, "carol").await;
    assert_eq!(carol3.open_many("alice", big.id, 100).await, (60, 40));
}
