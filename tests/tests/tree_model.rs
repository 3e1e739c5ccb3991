//! A model-based test of the tree on real mounts: seeded random operations (mkdir, write,
//! append, truncate, symlink, chmod, utimes, rename of files and directories, remove)
//! are made through alice's mount and applied to a model of her tree. After each one
//! her mount must show the model at once, and two observers must show it within a
//! second: a second mount of alice's (everything) and bob's mount (what the modes let
//! others see: directories entered only with o+x and listed only with o+r, file contents
//! only with o+r, no write bits).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sharefs_tests::mount::{fuse_available, TestMount};
use sharefs_tests::*;

const FILE_MODES: [u32; 4] = [0o644, 0o640, 0o600, 0o755];
const DIR_MODES: [u32; 4] = [0o755, 0o750, 0o700, 0o711];
const NAMES: [&str; 6] = ["a", "b", "c", "dir", "notes.txt", "x y"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File { data: Vec<u8> },
    Link { target: String },
}

#[derive(Debug, Clone)]
struct Entry {
    kind: Kind,
    mode: u32,
    /// Set by utimes and kept until the content changes.
    mtime: Option<i64>,
}

/// Alice's tree below the test's folder: entries by path ("d/e/f").
#[derive(Debug, Default)]
struct Model {
    entries: BTreeMap<String, Entry>,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn inside(path: &str, dir: &str) -> bool {
    path == dir || path.starts_with(&format!("{dir}/"))
}

impl Model {
    fn dirs(&self) -> Vec<String> {
        let mut dirs = vec![String::new()];
        dirs.extend(
            self.entries
                .iter()
                .filter(|(_, e)| e.kind == Kind::Dir)
                .map(|(p, _)| p.clone()),
        );
        dirs
    }

    fn paths(&self, pred: impl Fn(&Entry) -> bool) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(_, e)| pred(e))
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn is_empty_dir(&self, path: &str) -> bool {
        !self
            .entries
            .keys()
            .any(|p| p.starts_with(&format!("{path}/")))
    }

    fn remove_tree(&mut self, path: &str) {
        self.entries.retain(|p, _| !inside(p, path));
    }

    fn rename(&mut self, from: &str, to: &str) {
        self.remove_tree(to);
        let moved: Vec<(String, Entry)> = self
            .entries
            .iter()
            .filter(|(p, _)| inside(p, from))
            .map(|(p, e)| (format!("{to}{}", &p[from.len()..]), e.clone()))
            .collect();
        self.remove_tree(from);
        self.entries.extend(moved);
    }

    /// What a mount of `viewer` must show: owner sees all; others what the modes allow.
    fn expected(&self, owner: bool) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (path, e) in &self.entries {
            let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
            // Others see an entry only if every directory above it can be listed and
            // entered.
            if !owner {
                let mut dir = parent;
                let mut open = true;
                while !dir.is_empty() {
                    if self.entries[dir].mode & 0o005 != 0o005 {
                        open = false;
                    }
                    dir = dir.rsplit_once('/').map_or("", |(p, _)| p);
                }
                if !open {
                    continue;
                }
            }
            let mode = if owner { e.mode } else { e.mode & !0o222 };
            out.insert(path.clone(), describe(&e.kind, mode, e.mtime, owner));
        }
        out
    }
}

fn describe(kind: &Kind, mode: u32, mtime: Option<i64>, owner: bool) -> String {
    match kind {
        Kind::Dir => format!("dir {mode:o}"),
        Kind::Link { target } => format!("link -> {target}"),
        Kind::File { data } => {
            let content = if owner || mode & 0o004 != 0 {
                sha256(data)
            } else {
                "unreadable".into()
            };
            let mtime = mtime.map(|t| format!(" mtime {t}")).unwrap_or_default();
            format!("file {mode:o} size {} {content}{mtime}", data.len())
        }
    }
}

/// What a mount shows below `root`, described as [`Model::expected`] does; `mtimes`
/// says which files' mtimes to show (those the model knows). Errors are reported, not
/// panicked on: an observer may be in the middle of catching up.
fn view(
    root: &Path,
    owner: bool,
    mtimes: &BTreeMap<String, i64>,
) -> Result<BTreeMap<String, String>, String> {
    fn walk(
        root: &Path,
        dir: &Path,
        owner: bool,
        mtimes: &BTreeMap<String, i64>,
        out: &mut BTreeMap<String, String>,
    ) -> Result<(), String> {
        let err = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
        for e in fs::read_dir(dir).map_err(|e| err(dir, e))? {
            let path = e.map_err(|e| err(dir, e))?.path();
            let rel = path
                .strip_prefix(root)
                .map_err(|e| e.to_string())?
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&path).map_err(|e| err(&path, e))?;
            let mode = meta.mode() & 0o7777;
            let kind = if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).map_err(|e| err(&path, e))?;
                Kind::Link {
                    target: target.to_string_lossy().into_owned(),
                }
            } else if meta.is_dir() {
                if owner || mode & 0o005 == 0o005 {
                    walk(root, &path, owner, mtimes, out)?;
                }
                Kind::Dir
            } else if owner || mode & 0o004 != 0 {
                let data = fs::read(&path).map_err(|e| err(&path, e))?;
                if data.len() as u64 != meta.len() {
                    return Err(format!(
                        "{rel}: stat says {} bytes, read {}",
                        meta.len(),
                        data.len()
                    ));
                }
                Kind::File { data }
            } else {
                // Not readable by others: the server refuses the open.
                match File::open(&path) {
                    Err(e) if e.raw_os_error() == Some(libc::EACCES) => {}
                    other => return Err(format!("{rel}: open by others gave {other:?}")),
                }
                Kind::File {
                    data: vec![0; meta.len() as usize],
                }
            };
            let mtime = mtimes.get(&rel).map(|_| meta.mtime());
            out.insert(rel, describe(&kind, mode, mtime, owner));
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(root, root, owner, mtimes, &mut out)?;
    Ok(out)
}

fn diff(want: &BTreeMap<String, String>, got: &BTreeMap<String, String>) -> String {
    let mut lines = Vec::new();
    for (p, w) in want {
        match got.get(p) {
            Some(g) if g == w => {}
            Some(g) => lines.push(format!("  {p}: want {w}, got {g}")),
            None => lines.push(format!("  {p}: want {w}, missing")),
        }
    }
    for (p, g) in got {
        if !want.contains_key(p) {
            lines.push(format!("  {p}: unexpected {g}"));
        }
    }
    lines.join("\n")
}

/// One random operation made through `root` (alice's mount) and applied to the model;
/// returns its description.
fn step(rng: &mut StdRng, model: &mut Model, root: &Path, n: u64) -> Option<String> {
    let dirs = model.dirs();
    let parent = dirs.choose(rng)?.clone();
    let name = if rng.gen_bool(0.7) {
        NAMES.choose(rng)?.to_string()
    } else {
        format!("n{n}")
    };
    let new = join(&parent, &name);
    let p = |rel: &str| root.join(rel);
    match rng.gen_range(0..12) {
        0 | 1 => {
            if model.entries.contains_key(&new) {
                return None;
            }
            let mode = *DIR_MODES.choose(rng)?;
            fs::create_dir(p(&new)).unwrap();
            fs::set_permissions(p(&new), fs::Permissions::from_mode(mode)).unwrap();
            model.entries.insert(
                new.clone(),
                Entry {
                    kind: Kind::Dir,
                    mode,
                    mtime: None,
                },
            );
            Some(format!("mkdir {new} {mode:o}"))
        }
        2..=4 => {
            let mode = match model.entries.get(&new) {
                None => 0o644,
                Some(Entry {
                    kind: Kind::File { .. },
                    mode,
                    ..
                }) => *mode,
                Some(_) => return None,
            };
            let len = *[0usize, 1, 100, 4096, 70_000].choose(rng)?;
            let data = content(n, len);
            fs::write(p(&new), &data).unwrap();
            fs::set_permissions(p(&new), fs::Permissions::from_mode(mode)).unwrap();
            model.entries.insert(
                new.clone(),
                Entry {
                    kind: Kind::File { data },
                    mode,
                    mtime: None,
                },
            );
            Some(format!("write {new} ({len} bytes)"))
        }
        5 => {
            let file = model.paths(|e| matches!(e.kind, Kind::File { .. }));
            let file = file.choose(rng)?;
            let more = content(n, rng.gen_range(1..5000));
            let mut f = OpenOptions::new().append(true).open(p(file)).unwrap();
            f.write_all(&more).unwrap();
            drop(f);
            let e = model.entries.get_mut(file)?;
            if let Kind::File { data } = &mut e.kind {
                data.extend_from_slice(&more);
            }
            e.mtime = None;
            Some(format!("append {file} ({} bytes)", more.len()))
        }
        6 => {
            let file = model.paths(|e| matches!(e.kind, Kind::File { .. }));
            let file = file.choose(rng)?;
            let e = model.entries.get_mut(file)?;
            let Kind::File { data } = &mut e.kind else {
                return None;
            };
            let len = rng.gen_range(0..=data.len() + 10);
            data.resize(len, 0);
            e.mtime = None;
            OpenOptions::new()
                .write(true)
                .open(p(file))
                .unwrap()
                .set_len(len as u64)
                .unwrap();
            Some(format!("truncate {file} to {len}"))
        }
        7 => {
            if model.entries.contains_key(&new) {
                return None;
            }
            let target = match rng.gen_range(0..3) {
                0 => "../dangling".to_string(),
                1 => "/etc/hostname".to_string(),
                _ => model.entries.keys().next().cloned().unwrap_or("x".into()),
            };
            std::os::unix::fs::symlink(&target, p(&new)).unwrap();
            model.entries.insert(
                new.clone(),
                Entry {
                    kind: Kind::Link {
                        target: target.clone(),
                    },
                    mode: 0o777,
                    mtime: None,
                },
            );
            Some(format!("symlink {new} -> {target}"))
        }
        8 => {
            let some = model.paths(|e| !matches!(e.kind, Kind::Link { .. }));
            let path = some.choose(rng)?;
            let e = model.entries.get_mut(path)?;
            e.mode = if e.kind == Kind::Dir {
                *DIR_MODES.choose(rng)?
            } else {
                *FILE_MODES.choose(rng)?
            };
            fs::set_permissions(p(path), fs::Permissions::from_mode(e.mode)).unwrap();
            Some(format!("chmod {:o} {path}", e.mode))
        }
        9 => {
            let file = model.paths(|e| matches!(e.kind, Kind::File { .. }));
            let file = file.choose(rng)?;
            let t = 1_600_000_000 + rng.gen_range(0..100_000_000i64);
            File::open(p(file))
                .unwrap()
                .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(t as u64))
                .unwrap();
            model.entries.get_mut(file)?.mtime = Some(t);
            Some(format!("utimes {file} {t}"))
        }
        10 => {
            let all: Vec<String> = model.entries.keys().cloned().collect();
            let from = all.choose(rng)?.clone();
            if inside(&parent, &from) || new == from {
                return None;
            }
            let src_dir = model.entries[&from].kind == Kind::Dir;
            let replaces = match model.entries.get(&new).map(|e| &e.kind) {
                None => false,
                Some(Kind::Dir) if src_dir && model.is_empty_dir(&new) => true,
                Some(Kind::File { .. } | Kind::Link { .. }) if !src_dir => true,
                Some(_) => return None,
            };
            fs::rename(p(&from), p(&new)).unwrap();
            model.rename(&from, &new);
            Some(format!(
                "rename {from} -> {new}{}",
                if replaces { " (replacing)" } else { "" }
            ))
        }
        _ => {
            let all: Vec<String> = model.entries.keys().cloned().collect();
            let path = all.choose(rng)?.clone();
            if model.entries[&path].kind == Kind::Dir {
                if !model.is_empty_dir(&path) {
                    let e = fs::remove_dir(p(&path)).unwrap_err();
                    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY), "rmdir {path}: {e}");
                }
                fs::remove_dir_all(p(&path)).unwrap();
            } else {
                fs::remove_file(p(&path)).unwrap();
            }
            model.remove_tree(&path);
            Some(format!("remove {path}"))
        }
    }
}

#[test]
fn random_operations_match_the_model_on_the_writer_and_two_observers() {
    if !fuse_available() {
        return;
    }
    let seeds: Vec<u64> = std::env::var("SHAREFS_MODEL_SEEDS")
        .unwrap_or_else(|_| "1,2,3".into())
        .split(',')
        .map(|s| s.trim().parse().expect("SHAREFS_MODEL_SEEDS: numbers"))
        .collect();
    let steps: u64 = std::env::var("SHAREFS_MODEL_STEPS")
        .map(|s| s.parse().expect("SHAREFS_MODEL_STEPS: a number"))
        .unwrap_or(150);
    let server = TestServer::start();
    let alice = TestMount::new(&server, "alice");
    let second = TestMount::new(&server, "alice");
    let bob = TestMount::new(&server, "bob");
    for seed in seeds {
        let top = format!("alice/model-{seed}");
        fs::create_dir(alice.path(&top)).unwrap();
        let root = alice.path(&top);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut model = Model::default();
        let mut history = Vec::new();
        let mut n = 0;
        while (history.len() as u64) < steps {
            n += 1;
            let Some(done) = step(&mut rng, &mut model, &root, n) else {
                continue;
            };
            history.push(done);
            let context = || {
                format!(
                    "seed {seed}, after:\n  {}\n\nmount log (writer):\n{}",
                    history.join("\n  "),
                    alice.log_text()
                )
            };
            let mtimes: BTreeMap<String, i64> = model
                .entries
                .iter()
                .filter_map(|(p, e)| e.mtime.map(|t| (p.clone(), t)))
                .collect();
            // The writer sees its own change at once.
            let want = model.expected(true);
            let got = view(&root, true, &mtimes).unwrap_or_else(|e| panic!("{e}\n{}", context()));
            assert!(want == got, "writer:\n{}\n{}", diff(&want, &got), context());
            // The observers within a second.
            for (who, mount, owner) in [
                ("alice's second mount", &second, true),
                ("bob", &bob, false),
            ] {
                let want = model.expected(owner);
                let deadline = std::time::Instant::now() + Duration::from_secs(1);
                loop {
                    let last = view(&mount.path(&top), owner, &mtimes);
                    if last.as_ref().is_ok_and(|got| *got == want) {
                        break;
                    }
                    if std::time::Instant::now() > deadline {
                        let shown = match &last {
                            Ok(got) => diff(&want, got),
                            Err(e) => e.clone(),
                        };
                        panic!(
                            "{who} does not show the model within 1 s:\n{shown}\n{}\n\nobserver log:\n{}",
                            context(),
                            mount.log_text()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        eprintln!("seed {seed}: {} operations matched", history.len());
    }
}
