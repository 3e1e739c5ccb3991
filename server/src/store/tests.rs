//! The embedded store end to end, without a network: contents, the tree, crash recovery,
//! maintenance and migration of the flat layout.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sharefs_protocol::{EntryKind, ErrorCode, Event, FileInfo, ROOT_ID};

use super::folder::{PACK_MIN_GARBAGE, SNAPSHOT_MIN_RECORDS};
use super::journal::{journal_name, SNAPSHOT};
use super::pack::{pack_name, JOURNAL_PREALLOC, PACK_PREALLOC};
use super::tree::PackRef;
use super::upload::DIRECT_BLOCK;
use super::*;
use crate::cutoff::Cutoff;

const N: &Cutoff = &Cutoff::NONE;

fn at(parent: u64, name: &str) -> UploadTarget {
    UploadTarget::At {
        parent,
        name: name.to_string(),
    }
}

fn upload_to(store: &Store, target: UploadTarget, data: &[u8]) -> Result<FileInfo> {
    let mut up = store.begin_upload("alice", target, Some(data.len() as u64), None, None)?;
    up.write_chunk(0, data);
    let hash = blake3::hash(data).to_hex();
    Ok(store
        .commit_upload(up, data.len() as u64, hash.as_str(), None, N)?
        .0)
}

fn put(store: &Store, name: &str, data: &[u8]) -> Result<FileInfo> {
    upload_to(store, at(ROOT_ID, name), data)
}

fn put_small(store: &Store, parent: u64, name: &str, data: &[u8]) -> FileInfo {
    let hash = blake3::hash(data).to_hex();
    store
        .put(
            "alice",
            at(parent, name),
            data,
            hash.as_str(),
            None,
            None,
            None,
            N,
        )
        .unwrap()
        .0
}

fn id(store: &Store, path: &str) -> u64 {
    store.resolve("alice", path, Caller::Owner).unwrap().id
}

fn read_id(store: &Store, id: u64) -> Vec<u8> {
    let (f, _) = store.open_read("alice", id, Caller::Owner).unwrap();
    f.read(0, usize::MAX).unwrap().to_vec()
}

fn read(store: &Store, path: &str) -> Vec<u8> {
    read_id(store, id(store, path))
}

fn names(dir: &Path, suffix: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(suffix))
        .collect();
    v.sort();
    v
}

fn listed(store: &Store, dir: u64) -> Vec<String> {
    store
        .list("alice", dir)
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect()
}

fn mkdir(store: &Store, parent: u64, name: &str) -> u64 {
    store.mkdir("alice", parent, name, 0o755, N).unwrap().0.id
}

/// Large uploads go to disk in aligned direct-I/O blocks with a buffered tail: chunks of
/// any size, at block boundaries or across them, land where they belong.
#[test]
fn uploads_in_chunks_of_any_size_are_stored_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    let data: Vec<u8> = (0..3 * DIRECT_BLOCK + 12_345)
        .map(|i| (i * 7 + i / 4099) as u8)
        .collect();
    let block = DIRECT_BLOCK;
    for (name, size, chunks) in [
        ("exact", None, vec![block, block, block, 12_345]),
        (
            "odd",
            None,
            vec![1, 4095, block + 3, 777, 2 * block - 777 - 4099 + 12_345],
        ),
        (
            "small first",
            Some(data.len() as u64),
            vec![10, 3 * block, 12_335],
        ),
    ] {
        let mut up = store
            .begin_upload("alice", at(ROOT_ID, name), size, None, None)
            .unwrap();
        let mut pos = 0;
        for n in chunks {
            up.write_chunk(pos as u64, &data[pos..pos + n]);
            pos += n;
        }
        let hash = blake3::hash(&data).to_hex();
        store
            .commit_upload(up, data.len() as u64, hash.as_str(), None, N)
            .unwrap();
        assert!(read(&store, name) == data, "{name}");
    }
    let store = Store::open(dir.path(), 0).unwrap();
    for name in ["exact", "odd", "small first"] {
        assert!(read(&store, name) == data, "{name}");
    }
}

#[test]
fn versions_replace_rename_remove_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    let first = put(&store, "a.txt", b"one").unwrap();
    let (reader, _) = store.open_read("alice", first.id, Caller::Owner).unwrap();
    let second = put(&store, "a.txt", b"two!").unwrap();
    // Replacing by name keeps the entry, with a new version.
    assert_eq!(second.id, first.id);
    assert_ne!(second.version, first.version);
    // The old handle still reads the old version.
    assert_eq!(&reader.read(0, 100).unwrap()[..], b"one");
    let (moved, _) = store
        .rename("alice", ROOT_ID, "a.txt", ROOT_ID, "b.txt", false, N)
        .unwrap();
    assert_eq!(moved.id, first.id);
    assert_eq!(moved.version, second.version, "a rename is no new content");
    assert_eq!(
        store
            .lookup("alice", ROOT_ID, "a.txt", Caller::Owner)
            .unwrap_err()
            .code(),
        ErrorCode::NotFound
    );
    put(&store, "c.txt", b"c").unwrap();
    store.remove("alice", ROOT_ID, "c.txt", false, N).unwrap();

    let store = Store::open(dir.path(), 0).unwrap();
    assert_eq!(listed(&store, ROOT_ID), ["b.txt"]);
    assert_eq!(read(&store, "b.txt"), b"two!");
    assert_eq!(store.space("alice", None).unwrap().used, 4);
    assert_eq!(names(&dir.path().join("files/alice"), ".blob").len(), 1);
}

#[test]
fn an_upload_replacing_by_id_follows_its_file_and_fails_once_it_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    let d = mkdir(&store, ROOT_ID, "d");
    let f = put_small(&store, ROOT_ID, "f", b"old");
    let mut up = store
        .begin_upload(
            "alice",
            UploadTarget::Replace(f.id),
            None,
            Some(0o600),
            None,
        )
        .unwrap();
    up.write_chunk(0, b"new content");
    store
        .rename("alice", ROOT_ID, "f", d, "g", false, N)
        .unwrap();
    let hash = blake3::hash(b"new content").to_hex();
    let (info, _) = store
        .commit_upload(up, 11, hash.as_str(), Some(42), N)
        .unwrap();
    assert_eq!((info.id, info.parent, info.name.as_str()), (f.id, d, "g"));
    assert_eq!((info.mode, info.mtime_ns), (0o600, 42));
    assert_eq!(read(&store, "d/g"), b"new content");
    // Gone meanwhile: not found, nothing created.
    let mut up = store
        .begin_upload("alice", UploadTarget::Replace(f.id), None, None, None)
        .unwrap();
    up.write_chunk(0, b"x");
    store.remove("alice", d, "g", false, N).unwrap();
    let hash = blake3::hash(b"x").to_hex();
    let err = store
        .commit_upload(up, 1, hash.as_str(), None, N)
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound);
    assert!(listed(&store, d).is_empty());
    // A directory is not a file to write.
    let err = put(&store, "d", b"x").unwrap_err();
    assert_eq!(err.code(), ErrorCode::IsADirectory);
}

#[test]
fn a_tree_survives_reload_and_snapshot_and_handles_outlive_moves() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    let mut parent = ROOT_ID;
    for depth in 0..40 {
        parent = mkdir(&store, parent, &format!("d{depth}"));
    }
    let deep = put_small(&store, parent, "deep.txt", b"deep");
    let path = store.path_of("alice", deep.id).unwrap();
    assert_eq!(path.split('/').count(), 41);
    let (handle, _) = store.open_read("alice", deep.id, Caller::Owner).unwrap();
    let x = mkdir(&store, ROOT_ID, "x");
    store
        .rename("alice", ROOT_ID, "d0", x, "moved", false, N)
        .unwrap();
    assert!(store
        .path_of("alice", deep.id)
        .unwrap()
        .starts_with("x/moved/d1/"));
    store.symlink("alice", x, "link", "moved/d1", N).unwrap();
    assert_eq!(&handle.read(0, 10).unwrap()[..], b"deep");

    let reloaded = Store::open(dir.path(), 0).unwrap();
    assert_eq!(read_id(&reloaded, deep.id), b"deep");
    let link = reloaded.lookup("alice", x, "link", Caller::Owner).unwrap();
    assert_eq!(link.kind, EntryKind::Symlink);
    assert_eq!(link.target.as_deref(), Some("moved/d1"));
    assert_eq!(link.size, 8);
    // Enough changes for a snapshot; the tree reads back the same from it.
    for i in 0..SNAPSHOT_MIN_RECORDS {
        reloaded
            .set_attr("alice", x, None, Some(i as i64), None, N)
            .unwrap();
    }
    assert!(dir.path().join("files/alice").join(SNAPSHOT).exists());
    let again = Store::open(dir.path(), 0).unwrap();
    assert_eq!(
        again.path_of("alice", deep.id).unwrap(),
        reloaded.path_of("alice", deep.id).unwrap()
    );
    assert_eq!(
        again.stat("alice", x, Caller::Owner).unwrap().atime_ns,
        (SNAPSHOT_MIN_RECORDS - 1) as i64
    );
    // Removal of a directory's last file, then of the directory, and ids never reused.
    again.remove("alice", parent, "deep.txt", false, N).unwrap();
    let next = mkdir(&again, ROOT_ID, "fresh");
    assert!(next > deep.id);
    assert_eq!(&handle.read(0, 10).unwrap()[..], b"deep");
}

#[test]
fn times_modes_and_directory_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    let d = store.mkdir("alice", ROOT_ID, "d", 0o750, N).unwrap().0;
    assert_eq!((d.kind, d.mode), (EntryKind::Dir, 0o750));
    std::thread::sleep(std::time::Duration::from_millis(2));
    let f = put_small(&store, d.id, "f", b"x");
    assert_eq!(f.mode, 0o644);
    let d2 = store.stat("alice", d.id, Caller::Owner).unwrap();
    assert!(d2.mtime_ns > d.mtime_ns && d2.ctime_ns > d.ctime_ns);
    let (f2, _) = store
        .set_attr("alice", f.id, Some(0o100600), Some(7), Some(9), N)
        .unwrap();
    assert_eq!((f2.mode, f2.atime_ns, f2.mtime_ns), (0o600, 7, 9));
    assert!(f2.ctime_ns >= f.ctime_ns);
    assert_eq!(f2.version, f.version, "attributes are no new content");
    // A put with a time sets it, and by name keeps the mode.
    let hash = blake3::hash(b"y").to_hex();
    let (f3, _) = store
        .put(
            "alice",
            at(d.id, "f"),
            b"y",
            hash.as_str(),
            None,
            Some(5),
            None,
            N,
        )
        .unwrap();
    assert_eq!((f3.id, f3.mode, f3.mtime_ns), (f.id, 0o600, 5));
    assert_ne!(f3.version, f.version);
}

#[test]
fn quota_counts_the_whole_tree() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    let d = mkdir(&store, ROOT_ID, "d");
    let e = mkdir(&store, d, "e");
    put_small(&store, e, "f", &[1; 6]);
    let hash = blake3::hash(&[2; 5]).to_hex();
    let err = store
        .put(
            "alice",
            at(ROOT_ID, "g"),
            &[2; 5],
            hash.as_str(),
            None,
            None,
            Some(10),
            N,
        )
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::QuotaExceeded);
    assert!(matches!(
        store.begin_upload("alice", at(ROOT_ID, "g"), Some(5), None, Some(10)),
        Err(ServerError::QuotaExceeded(_))
    ));
    let space = store.space("alice", Some(10)).unwrap();
    assert_eq!((space.used, space.files, space.available), (6, 3, 4));
}

#[test]
fn listing_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    let d = mkdir(&store, ROOT_ID, "d");
    for i in 0..7 {
        put_small(&store, d, &format!("f{i}"), b"x");
    }
    let list = |after: Option<&str>| {
        store
            .list_page("alice", d, after, 3, usize::MAX, Caller::Owner)
            .unwrap()
    };
    let (p1, more) = list(None);
    assert!(more);
    let (p2, _) = list(Some(&p1[2].name));
    let (p3, more) = list(Some(&p2[2].name));
    assert!(!more);
    let all: Vec<_> = p1
        .iter()
        .chain(&p2)
        .chain(&p3)
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(all, ["f0", "f1", "f2", "f3", "f4", "f5", "f6"]);
    assert_eq!(listed(&store, ROOT_ID), ["d"]);
}

#[test]
fn names_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    for bad in ["../x", "a/b", ".", "..", "a\0b", "esc\x1b"] {
        assert_eq!(
            put(&store, bad, b"x").unwrap_err().code(),
            ErrorCode::InvalidName
        );
        let err = store.mkdir("alice", ROOT_ID, bad, 0o755, N).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidName, "{bad:?}");
    }
    let long = "x".repeat(256);
    assert_eq!(
        put(&store, &long, b"x").unwrap_err().code(),
        ErrorCode::NameTooLong
    );
    let err = store
        .symlink("alice", ROOT_ID, "l", &"t".repeat(5000), N)
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::NameTooLong);
    assert_eq!(
        store
            .resolve("alice", &"a/".repeat(3000), Caller::Owner)
            .unwrap_err()
            .code(),
        ErrorCode::NameTooLong
    );
    assert!(store.mkdir("../etc", ROOT_ID, "x", 0o755, N).is_err());
}

#[test]
fn others_see_what_the_modes_let_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    let open = mkdir(&store, ROOT_ID, "open");
    let secret = put_small(&store, open, "secret", b"s");
    store
        .set_attr("alice", secret.id, Some(0o600), None, None, N)
        .unwrap();
    let o = Caller::Other;
    let code = |e: ServerError| e.code();
    assert_eq!(
        code(store.open_read("alice", secret.id, o).unwrap_err()),
        ErrorCode::PermissionDenied
    );
    assert!(store.stat("alice", secret.id, o).is_ok());
    let search_only = store.mkdir("alice", ROOT_ID, "so", 0o711, N).unwrap().0.id;
    let inside = put_small(&store, search_only, "inside", b"i");
    assert_eq!(
        code(
            store
                .list_page("alice", search_only, None, 10, usize::MAX, o)
                .unwrap_err()
        ),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        store.lookup("alice", search_only, "inside", o).unwrap().id,
        inside.id
    );
    let (f, _) = store.open_read("alice", inside.id, o).unwrap();
    assert_eq!(&f.read(0, 10).unwrap()[..], b"i");
    let closed = store
        .mkdir("alice", ROOT_ID, "closed", 0o700, N)
        .unwrap()
        .0
        .id;
    let hidden = put_small(&store, closed, "hidden", b"h");
    for err in [
        store.lookup("alice", closed, "hidden", o).unwrap_err(),
        store.lookup("alice", closed, "nothing", o).unwrap_err(),
        store.stat("alice", hidden.id, o).unwrap_err(),
        store.open_read("alice", hidden.id, o).unwrap_err(),
        store.resolve("alice", "closed/hidden", o).unwrap_err(),
        // Not even the kind of a hidden entry is told.
        store.lookup("alice", hidden.id, "x", o).unwrap_err(),
        store
            .list_page("alice", hidden.id, None, 1, usize::MAX, o)
            .unwrap_err(),
    ] {
        assert_eq!(err.code(), ErrorCode::PermissionDenied, "{err}");
        assert!(!err.to_string().contains("hidden"), "{err}");
    }
    assert_eq!(read_id(&store, hidden.id), b"h", "the owner reads anything");
}

#[test]
fn events_name_moves_and_removals_and_hide_closed_places() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    let a = mkdir(&store, ROOT_ID, "a");
    let closed = store
        .mkdir("alice", ROOT_ID, "closed", 0o700, N)
        .unwrap()
        .0
        .id;
    let f = put_small(&store, a, "f", b"f");
    put_small(&store, ROOT_ID, "target", b"t");
    // Moved over an existing file: the target is removed, the file changed with `from`,
    // and both parents changed.
    let (_, events) = store
        .rename("alice", a, "f", ROOT_ID, "target", false, N)
        .unwrap();
    assert!(matches!(&events[0].owner, Event::Removed { name, .. } if name == "target"));
    match &events[1].owner {
        Event::Changed {
            file,
            from: Some(from),
            ..
        } => {
            assert_eq!((file.id, from.parent, from.name.as_str()), (f.id, a, "f"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(events.len(), 4);
    assert!(events.iter().all(|e| e.others.as_ref() == Some(&e.owner)));
    // Into a closed directory: others learn only that it left where they could see it.
    let (_, events) = store
        .rename("alice", ROOT_ID, "target", closed, "f", false, N)
        .unwrap();
    assert!(matches!(
        &events[0].owner,
        Event::Changed { from: Some(_), .. }
    ));
    assert!(matches!(&events[0].others, Some(Event::Removed { id, .. }) if *id == f.id));
    let (_, events) = store.mkdir("alice", closed, "sub", 0o755, N).unwrap();
    assert!(
        events[0].others.is_none(),
        "a change inside is not theirs to see"
    );
    assert!(
        events[1].others.is_some(),
        "the closed directory itself is visible"
    );
}

/// A lazy change is answered before its fdatasync; the next durable change, a `sync` or
/// the flusher (within `LAZY_SYNC_MS`) makes it durable. Content is never lazy.
#[test]
fn lazy_changes_are_made_durable_by_the_next_durable_one_a_sync_or_the_flusher() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    let lazy = &Cutoff::NONE.lazy(true);
    let unsynced = |store: &Store| lock(&store.folder("alice").unwrap()).unwrap().unsynced();
    let d = store
        .mkdir("alice", ROOT_ID, "d", 0o755, lazy)
        .unwrap()
        .0
        .id;
    assert!(
        unsynced(&store),
        "a lazy mkdir is answered before its fdatasync"
    );
    put_small(&store, d, "f", b"content");
    assert!(!unsynced(&store), "a durable change syncs what came before");
    store
        .set_attr("alice", d, Some(0o700), None, Some(5), lazy)
        .unwrap();
    assert!(unsynced(&store));
    store.sync("alice").unwrap();
    assert!(!unsynced(&store));
    // Removals and renames are durable before their answer, whatever the client allows.
    store.mkdir("alice", d, "gone", 0o755, N).unwrap();
    store.remove("alice", d, "gone", true, lazy).unwrap();
    assert!(!unsynced(&store));
    store.mkdir("alice", d, "moved", 0o755, N).unwrap();
    store
        .rename("alice", d, "moved", ROOT_ID, "moved", false, lazy)
        .unwrap();
    assert!(!unsynced(&store));
    let hash = blake3::hash(b"x").to_hex();
    let g = at(d, "g");
    store
        .put("alice", g, b"x", hash.as_str(), None, None, None, lazy)
        .unwrap();
    assert!(!unsynced(&store), "content waits for the disk");
    let empty = blake3::hash(b"").to_hex();
    store
        .put(
            "alice",
            at(d, "e"),
            b"",
            empty.as_str(),
            None,
            None,
            None,
            lazy,
        )
        .unwrap();
    assert!(unsynced(&store));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while unsynced(&store) {
        assert!(
            std::time::Instant::now() < deadline,
            "the flusher did not sync a lazy change"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    drop(store);
    let store = Store::open(dir.path(), 0).unwrap();
    assert_eq!(listed(&store, d), ["e", "f", "g"]);
    // (Its mtime moved on with the entries made in it after.)
    assert_eq!(store.stat("alice", d, Caller::Owner).unwrap().mode, 0o700);
}

#[test]
fn small_files_live_in_the_pack_and_survive_reload() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("files/alice");
    let store = Store::open(dir.path(), 0).unwrap();
    let a = put_small(&store, ROOT_ID, "a", b"first");
    let (reader, _) = store.open_read("alice", a.id, Caller::Owner).unwrap();
    put_small(&store, ROOT_ID, "a", b"second");
    put_small(&store, ROOT_ID, "b", b"");
    put_small(&store, ROOT_ID, "c", b"doomed");
    store.remove("alice", ROOT_ID, "c", false, N).unwrap();
    store
        .rename("alice", ROOT_ID, "a", ROOT_ID, "d", false, N)
        .unwrap();
    assert_eq!(&reader.read(0, 100).unwrap()[..], b"first");
    assert!(names(&folder, ".blob").is_empty());
    assert_eq!(names(&folder, ".dat"), ["pack-1.dat"]);
    assert!(matches!(
        store.put("alice", at(ROOT_ID, "d"), b"x", "00", None, None, None, N),
        Err(ServerError::ChecksumMismatch)
    ));
    let store = Store::open(dir.path(), 0).unwrap();
    assert_eq!(listed(&store, ROOT_ID), ["b", "d"]);
    assert_eq!(read(&store, "d"), b"second");
    assert_eq!(store.space("alice", None).unwrap().used, 6);
}

#[test]
fn a_torn_journal_tail_is_cut_and_unnamed_contents_removed() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("files/alice");
    let store = Store::open(dir.path(), 0).unwrap();
    put_small(&store, ROOT_ID, "kept", b"kept");
    put(&store, "big", &vec![5u8; 100_000]).unwrap();
    drop(store);
    // A crash mid-append: half a record, an unreferenced blob and pack.
    let journal = folder.join(journal_name(0));
    let bytes = fs::read(&journal).unwrap();
    let end = bytes.iter().rposition(|b| *b == b'\n').unwrap() + 1;
    let j = OpenOptions::new().write(true).open(&journal).unwrap();
    j.write_all_at(br#"{"ops":[{"put":{"id":99,"na"#, end as u64)
        .unwrap();
    fs::write(folder.join(blob_name(1)), b"orphan").unwrap();
    fs::write(folder.join(pack_name(9)), b"orphan").unwrap();

    let store = Store::open(dir.path(), 0).unwrap();
    assert_eq!(listed(&store, ROOT_ID), ["big", "kept"]);
    assert_eq!(read(&store, "kept"), b"kept");
    assert_eq!(names(&folder, ".blob").len(), 1);
    assert_eq!(names(&folder, ".dat"), ["pack-1.dat"]);
    put_small(&store, ROOT_ID, "after", b"after");
    let store = Store::open(dir.path(), 0).unwrap();
    assert_eq!(read(&store, "after"), b"after");
}

#[test]
fn preallocated_journal_and_pack_are_written_over_and_reloaded_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("files/alice");
    let store = Store::open(dir.path(), 0).unwrap();
    put_small(&store, ROOT_ID, "a", b"first");
    put_small(&store, ROOT_ID, "b", &[7u8; 5000]);
    let journal = fs::read(folder.join(journal_name(0))).unwrap();
    let used = journal.iter().rposition(|b| *b == b'\n').unwrap() + 1;
    assert!(journal.len() as u64 >= used as u64 + JOURNAL_PREALLOC / 2);
    assert!(journal[used..].iter().all(|b| *b == 0));
    let pack_path = folder.join(pack_name(1));
    assert!(fs::metadata(&pack_path).unwrap().len() >= PACK_PREALLOC);
    let store = Store::open(dir.path(), 0).unwrap();
    let pack_size = fs::metadata(&pack_path).unwrap().len();
    put_small(&store, ROOT_ID, "d", b"after");
    assert_eq!(fs::metadata(&pack_path).unwrap().len(), pack_size);
    let store = Store::open(dir.path(), 0).unwrap();
    assert_eq!(read(&store, "d"), b"after");
    assert_eq!(read(&store, "b"), vec![7u8; 5000]);
}

#[test]
fn a_last_record_whose_content_never_reached_the_disk_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("files/alice");
    let store = Store::open(dir.path(), 0).unwrap();
    let v1 = put_small(&store, ROOT_ID, "x", b"first version");
    put_small(&store, ROOT_ID, "x", b"second version");
    drop(store);
    let pack = OpenOptions::new()
        .write(true)
        .open(folder.join(pack_name(1)))
        .unwrap();
    pack.write_all_at(&[0u8; 14], 13).unwrap();
    drop(pack);
    let store = Store::open(dir.path(), 0).unwrap();
    assert_eq!(read(&store, "x"), b"first version");
    assert_eq!(
        store.stat("alice", v1.id, Caller::Owner).unwrap().version,
        v1.version
    );
    put_small(&store, ROOT_ID, "y", b"later");
    let store = Store::open(dir.path(), 0).unwrap();
    assert_eq!(read(&store, "y"), b"later");
    assert_eq!(read(&store, "x"), b"first version");
}

#[test]
fn journal_is_snapshotted_and_pack_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("files/alice");
    let store = Store::open(dir.path(), 0).unwrap();
    let big = vec![1u8; PACK_MAX as usize];
    let rounds = (PACK_MIN_GARBAGE / PACK_MAX) * 2 + 8;
    for i in 0..rounds {
        let mut data = big.clone();
        data[0] = i as u8;
        put_small(&store, ROOT_ID, "hot", &data);
    }
    put_small(&store, ROOT_ID, "cold", b"cold");
    for i in 0..SNAPSHOT_MIN_RECORDS {
        put_small(&store, ROOT_ID, "tiny", &i.to_le_bytes());
    }
    let journals = names(&folder, ".jsonl");
    assert_eq!(journals.len(), 1, "{journals:?}");
    assert_ne!(journals[0], journal_name(0), "journal never switched");
    let packs = names(&folder, ".dat");
    assert_eq!(packs.len(), 1);
    assert_ne!(packs[0], "pack-1.dat", "pack never compacted");

    let store = Store::open(dir.path(), 0).unwrap();
    let mut want = big.clone();
    want[0] = (rounds - 1) as u8;
    assert_eq!(read(&store, "hot"), want);
    assert_eq!(read(&store, "cold"), b"cold");
    assert_eq!(
        read(&store, "tiny"),
        (SNAPSHOT_MIN_RECORDS - 1).to_le_bytes()
    );
}

/// The flat layout as protocol 1's store wrote it: a snapshot with `files`, a journal of
/// `put`/`delete`/`rename` records, a pack and a blob.
fn write_flat_folder(folder: &Path) {
    fs::create_dir_all(folder).unwrap();
    let packed = b"packed content";
    let blob = vec![9u8; 70_000];
    let mut pack = packed.to_vec();
    pack.extend_from_slice(b"second");
    fs::write(folder.join("pack-1.dat"), &pack).unwrap();
    fs::write(folder.join(blob_name(0x20)), &blob).unwrap();
    fs::write(
        folder.join(blob_name(0x30)),
        b"orphan of an unfinished upload",
    )
    .unwrap();
    let h = |b: &[u8]| blake3::hash(b).to_hex().to_string();
    let snapshot = format!(
        r#"{{"journal":3,"files":[{{"name":"small.txt","size":14,"mtime_ns":1000,"version":10,"blake3":"{}","pack":{{"pack":1,"offset":0}}}},{{"name":"gone.txt","size":6,"mtime_ns":1001,"version":11,"blake3":"{}","pack":{{"pack":1,"offset":14}}}}]}}"#,
        h(packed),
        h(b"second")
    );
    fs::write(folder.join("snapshot.json"), snapshot).unwrap();
    let journal = format!(
        "{}\n{}\n{}\n{}",
        format_args!(
            r#"{{"put":{{"name":"big.bin","size":70000,"mtime_ns":2000,"version":32,"blake3":"{}"}}}}"#,
            h(&blob)
        ),
        r#"{"rename":{"from":"big.bin","file":{"name":"renamed.bin","size":70000,"mtime_ns":2000,"version":33,"blake3":"x","blob":32}}}"#,
        r#"{"delete":{"name":"gone.txt"}}"#,
        r#"{"put":{"name":"torn"#
    );
    fs::write(folder.join("journal-3.jsonl"), journal).unwrap();
    // A journal of an older snapshot, left by a crash while switching.
    fs::write(folder.join("journal-2.jsonl"), "").unwrap();
}

fn check_migrated(dir: &Path) {
    let folder = dir.join("files/alice");
    let store = Store::open(dir, 0).unwrap();
    let files = store.list("alice", ROOT_ID).unwrap();
    let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["renamed.bin", "small.txt"]);
    for f in &files {
        assert_eq!(
            (f.kind, f.mode, f.parent),
            (EntryKind::File, 0o644, ROOT_ID)
        );
        assert!(f.id > ROOT_ID);
    }
    assert_eq!(files[1].mtime_ns, 1000);
    assert_eq!(files[1].version, 10);
    assert_eq!(read(&store, "small.txt"), b"packed content");
    assert_eq!(read(&store, "renamed.bin"), vec![9u8; 70_000]);
    assert_eq!(store.space("alice", None).unwrap().used, 70_014);
    // The flat metadata is gone; contents stay where they were.
    let snap = fs::read_to_string(folder.join(SNAPSHOT)).unwrap();
    assert!(snap.contains(r#""format":2"#), "{snap}");
    assert_eq!(names_in(&folder, ".jsonl").len(), 1);
    assert!(names_in(&folder, ".meta").is_empty());
    assert_eq!(names_in(&folder, ".blob"), [blob_name(0x20)]);
    // And it goes on as a tree.
    let d = mkdir(&store, ROOT_ID, "new dir");
    put_small(&store, d, "inside", b"inside");
    let store = Store::open(dir, 0).unwrap();
    assert_eq!(read(&store, "new dir/inside"), b"inside");
    assert_eq!(read(&store, "small.txt"), b"packed content");
}

fn names_in(dir: &Path, suffix: &str) -> Vec<String> {
    names(dir, suffix)
}

#[test]
fn a_flat_folder_is_migrated_to_a_tree() {
    let dir = tempfile::tempdir().unwrap();
    write_flat_folder(&dir.path().join("files/alice"));
    check_migrated(dir.path());
}

#[test]
fn a_migration_killed_at_any_step_is_finished_by_the_next_start() {
    // Killed after the new journal was made, before the snapshot was renamed into place:
    // the flat folder is still what is read, with a stray journal and a temp file.
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("files/alice");
    write_flat_folder(&folder);
    fs::write(folder.join("journal-4.jsonl"), "").unwrap();
    fs::create_dir_all(dir.path().join("tmp")).unwrap();
    fs::write(dir.path().join("tmp/meta.1.1.tmp"), b"{\"format\":2,\"ent").unwrap();
    check_migrated(dir.path());

    // Killed after the rename, before the flat journals were removed.
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("files/alice");
    write_flat_folder(&folder);
    drop(
        Store::open(dir.path(), 0)
            .unwrap()
            .list("alice", ROOT_ID)
            .unwrap(),
    );
    fs::write(
        folder.join("journal-3.jsonl"),
        "{\"delete\":{\"name\":\"small.txt\"}}\n",
    )
    .unwrap();
    fs::write(folder.join("0123456789abcdef.meta"), "{}").unwrap();
    check_migrated(dir.path());
}

#[test]
fn folders_of_the_per_file_metadata_layout_are_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("files/alice");
    fs::create_dir_all(&folder).unwrap();
    fs::write(folder.join(blob_name(7)), b"legacy").unwrap();
    let meta = format!(
        r#"{{"name":"old.txt","size":6,"mtime_ns":1,"version":7,"blake3":"{}"}}"#,
        blake3::hash(b"legacy").to_hex()
    );
    fs::write(folder.join("0123456789abcdef0123456789abcdef.meta"), meta).unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    assert_eq!(read(&store, "old.txt"), b"legacy");
    assert!(names(&folder, ".meta").is_empty());
    put_small(&store, ROOT_ID, "new.txt", b"new");
    let store = Store::open(dir.path(), 0).unwrap();
    assert_eq!(read(&store, "old.txt"), b"legacy");
    assert_eq!(read(&store, "new.txt"), b"new");
}

#[test]
fn loading_a_hundred_thousand_entries_stays_fast() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("files/alice");
    fs::create_dir_all(&folder).unwrap();
    // A snapshot of 100,000 entries in 100 directories, written directly.
    let mut entries = vec![Node::new(ROOT_ID, 0, "", EntryKind::Dir, 0o755, 0)];
    let mut id = 2;
    for d in 0..100 {
        let dir_id = id;
        entries.push(Node::new(
            dir_id,
            ROOT_ID,
            &format!("d{d}"),
            EntryKind::Dir,
            0o755,
            0,
        ));
        id += 1;
        for f in 0..999 {
            let mut n = Node::new(id, dir_id, &format!("f{f}"), EntryKind::Symlink, 0o777, 0);
            n.target = Some("t".into());
            entries.push(n);
            id += 1;
        }
    }
    journal::write_snapshot(&folder, &folder, 0, id, entries.iter()).unwrap();
    let started = std::time::Instant::now();
    let store = Store::open(dir.path(), 0).unwrap();
    assert_eq!(store.space("alice", None).unwrap().files, 100_000);
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(20), "{took:?}");
    assert_eq!(store.path_of("alice", id - 1).unwrap(), "d99/f998");
}

/// A flat folder of 100,000 files migrates whole and loads as a tree; the times of the
/// flat layout's parse and of the tree's load are printed (`--nocapture`) for comparison.
#[test]
fn a_flat_folder_of_a_hundred_thousand_files_migrates_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("files/alice");
    fs::create_dir_all(&folder).unwrap();
    let mut files = String::from(r#"{"journal":0,"files":["#);
    for i in 0..100_000u64 {
        if i > 0 {
            files.push(',');
        }
        files.push_str(&format!(
            r#"{{"name":"file-{i:06}.txt","size":4096,"mtime_ns":1700000000000000000,"version":{},"blake3":"{}","pack":{{"pack":1,"offset":{}}}}}"#,
            1_700_000_000_000_000_000u64 + i,
            blake3::hash(&i.to_le_bytes()).to_hex(),
            i * 4096
        ));
    }
    files.push_str("]}");
    fs::write(folder.join("snapshot.json"), &files).unwrap();
    fs::write(folder.join("pack-1.dat"), b"").unwrap();
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Flat {
        name: String,
        size: u64,
        mtime_ns: i64,
        version: u64,
        blake3: String,
        pack: Option<PackRef>,
    }
    #[derive(serde::Deserialize)]
    struct FlatSnap {
        files: Vec<Flat>,
    }
    let started = std::time::Instant::now();
    let bytes = fs::read(folder.join("snapshot.json")).unwrap();
    let snap: FlatSnap = serde_json::from_slice(&bytes).unwrap();
    let map: std::collections::BTreeMap<String, Flat> = snap
        .files
        .into_iter()
        .map(|f| (f.name.clone(), f))
        .collect();
    let flat = started.elapsed();
    assert_eq!(map.len(), 100_000);
    // Migrated once, then loaded as a tree.
    drop(Store::open(dir.path(), 0).unwrap().list("alice", ROOT_ID));
    let started = std::time::Instant::now();
    let store = Store::open(dir.path(), 0).unwrap();
    let space = store.space("alice", None).unwrap();
    let tree = started.elapsed();
    assert_eq!(space.files, 100_000);
    println!(
        "100,000 files: flat parse {flat:?} ({} ns/file), tree load {tree:?} ({} ns/entry)",
        flat.as_nanos() / 100_000,
        tree.as_nanos() / 100_000
    );
}

/// Entries are written as arrays of their fields; snapshots and journal records written
/// with field names (as the first tree format did) still load.
#[test]
fn entries_load_from_arrays_and_from_named_fields() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("files/alice");
    fs::create_dir_all(&folder).unwrap();
    fs::write(folder.join("pack-1.dat"), b"packed").unwrap();
    let h = blake3::hash(b"packed").to_hex().to_string();
    let snapshot = format!(
        r#"{{"format":2,"journal":0,"next_id":5,"entries":[
            {{"id":1,"parent":0,"name":"","kind":"dir","mode":493,"mtime_ns":1,"atime_ns":1,"ctime_ns":1}},
            {{"id":2,"parent":1,"name":"d","kind":"dir","mode":448,"mtime_ns":2,"atime_ns":2,"ctime_ns":2}},
            {{"id":3,"parent":2,"name":"f","kind":"file","mode":420,"size":6,"mtime_ns":3,"atime_ns":3,"ctime_ns":3,"version":7,"blake3":"{h}","content":{{"pack":{{"pack":1,"offset":0}}}}}}]}}"#
    );
    fs::write(folder.join(SNAPSHOT), snapshot).unwrap();
    fs::write(
        folder.join(journal_name(0)),
        r#"{"ops":[{"put":{"id":4,"parent":2,"name":"l","kind":"symlink","mode":511,"size":1,"mtime_ns":4,"atime_ns":4,"ctime_ns":4,"target":"f"}}]}"#.to_string() + "\n",
    )
    .unwrap();
    let check = |store: &Store| {
        assert_eq!(read(store, "d/f"), b"packed");
        let f = store
            .stat("alice", id(store, "d/f"), Caller::Owner)
            .unwrap();
        assert_eq!((f.mode, f.mtime_ns, f.version), (0o644, 3, 7));
        let d = store.stat("alice", id(store, "d"), Caller::Owner).unwrap();
        assert_eq!((d.kind, d.mode), (EntryKind::Dir, 0o700));
        let l = store
            .stat("alice", id(store, "d/l"), Caller::Owner)
            .unwrap();
        assert_eq!(l.target.as_deref(), Some("f"));
    };
    let store = Store::open(dir.path(), 0).unwrap();
    check(&store);
    // A new journal record, then a snapshot: both in the compact form, read back.
    put_small(&store, ROOT_ID, "new", b"new");
    let journal = fs::read_to_string(folder.join(journal_name(0))).unwrap();
    let last = journal.lines().find(|l| l.contains("new")).unwrap();
    assert!(last.contains(r#",1,"new","file",420,3,"#), "{last}");
    drop(store);
    let store = Store::open(dir.path(), 0).unwrap();
    check(&store);
    assert_eq!(read(&store, "new"), b"new");
    // A snapshot writes the same form: every entry survives the round trip.
    let mut nodes = vec![Node::new(2, 1, "d", EntryKind::Dir, 0o700, 2)];
    let mut f = Node::new(3, 2, "f", EntryKind::File, 0o644, 3);
    (f.size, f.version, f.blake3) = (6, 7, super::digest::Digest::from_hex(&h).unwrap());
    f.content = Some(super::tree::Content::Pack(PackRef { pack: 1, offset: 0 }));
    nodes.push(f);
    let mut l = Node::new(4, 2, "l", EntryKind::Symlink, 0o777, 4);
    l.target = Some("f".into());
    nodes.push(l);
    let text = serde_json::to_string(&nodes).unwrap();
    assert!(
        text.starts_with(r#"[[2,1,"d","dir",448,0,2,2,2],"#),
        "{text}"
    );
    assert!(text.contains(r#"{"pack":[1,0]}"#), "{text}");
    assert_eq!(serde_json::from_str::<Vec<Node>>(&text).unwrap(), nodes);
}

/// An upload outlives its session and the server: detached when dropped, resumed from
/// what its part holds (after a restart, rehashed from disk, its unaligned tail gathered
/// again for direct writes), committed with the whole content's hash; aborted, failed or
/// expired uploads leave nothing behind, and nobody else can resume one.
#[test]
fn uploads_resume_after_a_lost_session_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..3 * DIRECT_BLOCK + 12_345)
        .map(|i| (i * 31 + i / 7919) as u8)
        .collect();
    let hash = blake3::hash(&data).to_hex();
    let tmp_entries = |dir: &Path| fs::read_dir(dir.join("tmp")).unwrap().count();
    let id = {
        let store = Store::open(dir.path(), 0).unwrap();
        let mut up = store
            .begin_upload("alice", at(ROOT_ID, "big"), None, None, None)
            .unwrap();
        let cut = DIRECT_BLOCK + 5000;
        up.write_chunk(0, &data[..cut]);
        assert_eq!(up.sync().unwrap(), cut as u64);
        assert_eq!(
            up.read(DIRECT_BLOCK as u64 - 10, 20).unwrap(),
            &data[DIRECT_BLOCK - 10..DIRECT_BLOCK + 10]
        );
        let id = up.id();
        // The session goes: kept for a resume, by its owner only.
        drop(up);
        assert_eq!(store.detached_uploads(), 1);
        assert_eq!(
            store.resume_upload("bob", id, None).unwrap_err().code(),
            ErrorCode::NotFound
        );
        let mut up = store.resume_upload("alice", id, None).unwrap();
        assert_eq!(up.written(), cut as u64);
        // Attached: a second resume waits for it.
        assert_eq!(
            store.resume_upload("alice", id, None).unwrap_err().code(),
            ErrorCode::Busy
        );
        let more = 2 * DIRECT_BLOCK + 100;
        up.write_chunk(cut as u64, &data[cut..more]);
        assert_eq!(up.sync().unwrap(), more as u64);
        id
        // The server stops with the upload attached.
    };
    let store = Store::open(dir.path(), 0).unwrap();
    assert_eq!(store.detached_uploads(), 1);
    let mut up = store.resume_upload("alice", id, None).unwrap();
    let at_ = up.written() as usize;
    assert_eq!(at_, 2 * DIRECT_BLOCK + 100);
    up.write_chunk(at_ as u64, &data[at_..]);
    let wrong = blake3::hash(b"other").to_hex();
    let info = store
        .commit_upload(up, data.len() as u64, hash.as_str(), None, N)
        .unwrap()
        .0;
    assert!(read(&store, "big") == data);
    assert_eq!(
        store.content_hash("alice", info.id).unwrap(),
        (info.version, data.len() as u64, hash.to_string())
    );
    assert_eq!(
        store.resume_upload("alice", id, None).unwrap_err().code(),
        ErrorCode::NotFound
    );
    assert_eq!(tmp_entries(dir.path()), 0);

    // A commit that did not run (its connection was replaced) leaves the upload for a
    // resume; it commits then.
    let mut up = store
        .begin_upload("alice", at(ROOT_ID, "fenced"), None, None, None)
        .unwrap();
    up.write_chunk(0, b"fenced");
    let fenced_id = up.id();
    let fenced = Cutoff::new(
        None,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
    );
    let fenced_hash = blake3::hash(b"fenced").to_hex();
    assert_eq!(
        store
            .commit_upload(up, 6, fenced_hash.as_str(), None, &fenced)
            .unwrap_err()
            .code(),
        ErrorCode::Expired
    );
    assert!(store.resolve("alice", "fenced", Caller::Owner).is_err());
    let up = store.resume_upload("alice", fenced_id, None).unwrap();
    assert_eq!(up.written(), 6);
    store
        .commit_upload(up, 6, fenced_hash.as_str(), None, N)
        .unwrap();
    assert_eq!(read(&store, "fenced"), b"fenced");

    // A failed commit ends the upload; an abort too; a detached one expires.
    let mut up = store
        .begin_upload("alice", at(ROOT_ID, "bad"), None, None, None)
        .unwrap();
    up.write_chunk(0, b"abc");
    let failed = up.id();
    assert_eq!(
        store
            .commit_upload(up, 3, wrong.as_str(), None, N)
            .unwrap_err()
            .code(),
        ErrorCode::ChecksumMismatch
    );
    assert_eq!(
        store
            .resume_upload("alice", failed, None)
            .unwrap_err()
            .code(),
        ErrorCode::NotFound
    );
    let mut up = store
        .begin_upload("alice", at(ROOT_ID, "gone"), None, None, None)
        .unwrap();
    up.abort();
    drop(up);
    let kept = store
        .begin_upload("alice", at(ROOT_ID, "later"), None, None, None)
        .unwrap();
    drop(kept);
    assert_eq!(store.detached_uploads(), 1);
    assert_eq!(tmp_entries(dir.path()), 2);
    assert_eq!(store.expire_uploads(std::time::Duration::ZERO), 1);
    assert_eq!(tmp_entries(dir.path()), 0);
    assert!(store.resolve("alice", "bad", Caller::Owner).is_err());
}

/// A server killed in the middle of a commit: before the commit reached the journal, the
/// upload is resumed whole (and the blob it was being linked to goes); after it, the
/// upload is found committed when its owner's folder loads and its part goes, so a
/// resume cannot commit it twice.
#[test]
fn a_commit_cut_by_a_crash_is_resumed_or_found_done() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("files/alice");
    let part = |id: u64| dir.path().join(format!("tmp/part-{id}"));
    let listing = |d: &Path| -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let data = vec![7u8; DIRECT_BLOCK + 999];
    let hash = blake3::hash(&data).to_hex();

    // Cut after the link to its blob, before the journal.
    let (id, stray) = {
        let store = Store::open(dir.path(), 0).unwrap();
        put_small(&store, ROOT_ID, "other", b"x");
        let mut up = store
            .begin_upload("alice", at(ROOT_ID, "cut"), None, None, None)
            .unwrap();
        up.write_chunk(0, &data);
        // As a commit writes out and syncs the part before it links it.
        up.sync().unwrap();
        let stray = folder.join(blob_name(999_999));
        fs::hard_link(part(up.id()), &stray).unwrap();
        (up.id(), stray)
    };
    let store = Store::open(dir.path(), 0).unwrap();
    let up = store.resume_upload("alice", id, None).unwrap();
    assert!(
        !stray.exists(),
        "the blob of a commit that did not happen stays"
    );
    assert_eq!(up.written(), data.len() as u64);
    store
        .commit_upload(up, data.len() as u64, hash.as_str(), None, N)
        .unwrap();
    assert!(read(&store, "cut") == data);
    drop(store);

    // Cut after the journal, before the part's own name went.
    let (id, meta) = {
        let store = Store::open(dir.path(), 0).unwrap();
        let mut up = store
            .begin_upload("alice", at(ROOT_ID, "done"), None, None, None)
            .unwrap();
        up.write_chunk(0, &data);
        up.sync().unwrap();
        let id = up.id();
        let meta = fs::read(dir.path().join(format!("tmp/part-{id}.json"))).unwrap();
        let before = listing(&folder);
        store
            .commit_upload(up, data.len() as u64, hash.as_str(), None, N)
            .unwrap();
        let blob: Vec<String> = listing(&folder)
            .into_iter()
            .filter(|n| !before.contains(n))
            .collect();
        assert_eq!(blob.len(), 1, "{blob:?}");
        fs::hard_link(folder.join(&blob[0]), part(id)).unwrap();
        (id, meta)
    };
    fs::write(dir.path().join(format!("tmp/part-{id}.json")), meta).unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    assert_eq!(store.detached_uploads(), 1);
    assert!(read(&store, "done") == data);
    // Settled when the folder loaded: the file deleted next is not brought back.
    assert_eq!(store.detached_uploads(), 0);
    assert!(listing(&dir.path().join("tmp")).is_empty());
    store.remove("alice", ROOT_ID, "done", false, N).unwrap();
    assert_eq!(
        store.resume_upload("alice", id, None).unwrap_err().code(),
        ErrorCode::NotFound
    );
    assert!(store.resolve("alice", "done", Caller::Owner).is_err());
    assert!(read(&store, "cut") == data);
}
