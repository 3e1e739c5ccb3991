//! Atomic replacement seen through a second mount: while one user keeps replacing a file
//! through her mount, another user reading it through his own mount gets one whole
//! version each time, never a mix of two (new size with old bytes, a cut or zero-padded
//! version, or an empty file that no writer closed).

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sharefs_tests::mount::{fuse_available, TestMount};
use sharefs_tests::*;

/// How long the writer keeps replacing the file.
const RUN: Duration = Duration::from_secs(9);

/// What one read through the second mount returned.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    Long,
    Short,
    /// Neither version: its length and, per run of equal bytes, the byte and run length.
    Torn(usize, Vec<(u8, usize)>),
    Error(String),
}

fn classify(got: std::io::Result<Vec<u8>>, long: &[u8], short: &[u8]) -> Seen {
    match got {
        Ok(d) if d == long => Seen::Long,
        Ok(d) if d == short => Seen::Short,
        Ok(d) => {
            let mut runs: Vec<(u8, usize)> = Vec::new();
            for b in &d {
                match runs.last_mut() {
                    Some((v, n)) if v == b => *n += 1,
                    _ => runs.push((*b, 1)),
                }
            }
            runs.truncate(4);
            Seen::Torn(d.len(), runs)
        }
        Err(e) => Seen::Error(e.to_string()),
    }
}

/// Reads a file 64 KiB at a time until end of file, without `stat`ing it first.
fn read_in_chunks(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let mut f = fs::File::open(path)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match f.read(&mut buf)? {
            0 => return Ok(out),
            n => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn readers_in_another_mount_see_whole_versions_while_a_file_is_replaced() {
    if !fuse_available() {
        return;
    }
    let server = TestServer::start();
    let alice = TestMount::new(&server, "alice");
    let bob = TestMount::new(&server, "bob");
    let long = vec![b'a'; 300_000];
    let short = vec![b'b'; 100_000];
    let in_alice = alice.path("alice/swap.bin");
    let in_bob = bob.path("alice/swap.bin");

    fs::write(&in_alice, &long).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::read(&in_bob).ok().as_deref() != Some(&long[..]) {
        assert!(
            Instant::now() < deadline,
            "first version not visible to bob"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = done.clone();
        let (long, short) = (long.clone(), short.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut writes = 0u64;
            let mut failures = Vec::new();
            let mut last = &long;
            while start.elapsed() < RUN {
                last = if last == &long { &short } else { &long };
                if let Err(e) = fs::write(&in_alice, last) {
                    failures.push(e.to_string());
                }
                writes += 1;
            }
            done.store(true, Ordering::SeqCst);
            (writes, failures, last.clone())
        })
    };

    let mut seen: BTreeMap<Seen, u64> = BTreeMap::new();
    let mut reads = 0u64;
    while !done.load(Ordering::SeqCst) {
        // Every other read asks for no size first: it reads until the kernel says EOF.
        let got = if reads.is_multiple_of(2) {
            fs::read(&in_bob)
        } else {
            read_in_chunks(&in_bob)
        };
        *seen.entry(classify(got, &long, &short)).or_default() += 1;
        reads += 1;
    }
    let (writes, failures, last) = writer.join().unwrap();
    assert!(failures.is_empty(), "writes failed: {failures:?}");

    // The last version written is what a fresh open sees (close-to-open).
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::read(&in_bob).ok() != Some(last.clone()) {
        assert!(Instant::now() < deadline, "last version not visible to bob");
        std::thread::sleep(Duration::from_millis(10));
    }

    let torn: u64 = seen
        .iter()
        .filter(|(s, _)| !matches!(s, Seen::Long | Seen::Short))
        .map(|(_, n)| n)
        .sum();
    let report = format!("{writes} writes, {reads} reads: {seen:?}");
    eprintln!("{report}");
    assert_eq!(torn, 0, "reads that were not one whole version: {report}");
    assert!(
        seen.contains_key(&Seen::Long) && seen.contains_key(&Seen::Short),
        "the reader did not see both versions: {report}"
    );
}
