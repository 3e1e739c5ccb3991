//! The pack: small contents appended one after another to one file per folder, so a
//! small file costs an append and no inode. Pack bytes are never rewritten in place (a
//! reader of an old version keeps reading it); compaction copies the live ones into a new
//! pack. The file is kept ahead of its content with zeros ([`preallocate`]), so an append
//! overwrites allocated space and its flush updates no inode.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::space::DiskSpace;

use crate::fsutil::open_rw;

/// Bytes of zeros a journal is extended by when a record would not fit.
pub const JOURNAL_PREALLOC: u64 = 1 << 20;
/// Bytes of zeros a pack is extended by when a content would not fit.
pub const PACK_PREALLOC: u64 = 4 << 20;

pub fn pack_name(id: u64) -> String {
    format!("pack-{id}.dat")
}

/// The pack new small files are appended to.
#[derive(Debug)]
pub struct Pack {
    pub id: u64,
    pub file: File,
    /// Where the next content goes.
    pub len: u64,
    /// Size of the file: zeros from `len` on (see [`preallocate`]).
    pub alloc: u64,
    /// How much of the file is known to be allocated on disk (its size made durable).
    pub durable_alloc: u64,
}

impl Pack {
    /// Opens (creating if needed) pack `id` of the folder `dir`, to append at `len`.
    pub fn open(dir: &Path, id: u64, len: u64) -> io::Result<Pack> {
        let file = open_rw(&dir.join(pack_name(id)), false)?;
        file.sync_all()?;
        let alloc = file.metadata()?.len();
        Ok(Pack {
            id,
            file,
            len: len.min(alloc),
            alloc,
            durable_alloc: alloc,
        })
    }

    /// Writes a content at the end. Over space already allocated on disk only the data
    /// has to reach the device: its write is started here and returned as the range that
    /// [`super::journal::Journal::append`] waits for before the journal's fdatasync, whose device cache
    /// flush then covers both (a flush covers every write completed before it). A write
    /// that extends the file is made durable here with an fdatasync (its size and blocks
    /// are metadata), and nothing is left to wait for.
    pub fn write(&mut self, data: &[u8], space: &DiskSpace) -> io::Result<Option<(u64, u64)>> {
        let at = self.len;
        let end = at + data.len() as u64;
        preallocate(&self.file, &mut self.alloc, end, PACK_PREALLOC, space);
        let written = self.file.write_all_at(data, at).and_then(|()| {
            if end <= self.durable_alloc {
                sync_range(&self.file, at, data.len() as u64, false)?;
                Ok(Some((at, data.len() as u64)))
            } else {
                self.file.sync_data()?;
                self.durable_alloc = self.alloc;
                Ok(None)
            }
        });
        match written {
            Ok(pending) => {
                self.len = end;
                // Without zeros ahead (no room for them) the write itself grew the file.
                self.alloc = self.alloc.max(end);
                self.durable_alloc = self.durable_alloc.max(end);
                Ok(pending)
            }
            Err(e) => {
                let _ = self.file.set_len(at);
                self.alloc = at;
                self.durable_alloc = self.durable_alloc.min(at);
                Err(e)
            }
        }
    }
}

/// Starts writing the dirty pages of `len` bytes at `offset` of `file` to the device, and
/// with `wait` waits until they are written: no metadata, no device cache flush.
pub fn sync_range(file: &File, offset: u64, len: u64, wait: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    // SAFETY: plain system call on an owned descriptor.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes sure `file` extends to at least `end` by writing zeros from `*alloc` (its size,
/// which every write past it must raise) to `end + step`, unsynced: the next fdatasync
/// makes them durable with the bytes written over them. Appends that only overwrite such
/// zeros change no metadata, so their fdatasync is a data write and a cache flush, no
/// inode update. Best effort: zeros are written only where the disk reserve leaves room
/// for them, and if they cannot be written after all (a full disk), the file is cut back
/// to `*alloc` — never below it, so no content is touched — and plain appends go on.
pub fn preallocate(file: &File, alloc: &mut u64, end: u64, step: u64, space: &DiskSpace) {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    if end <= *alloc {
        return;
    }
    let target = end + step;
    // The bytes up to `end` are the caller's, claimed already.
    let Ok(_room) = space.claim(target - end.max(*alloc)) else {
        return;
    };
    let mut at = *alloc;
    while at < target {
        let n = (target - at).min(ZEROS.len() as u64) as usize;
        if file.write_all_at(&ZEROS[..n], at).is_err() {
            let _ = file.set_len(*alloc);
            return;
        }
        at += n as u64;
    }
    *alloc = target;
}
