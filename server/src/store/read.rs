//! Read handles: an open descriptor on the version current at open (its blob, or its
//! pack with the content's offset), so renames, moves with a parent directory, removal
//! and newer versions never change what a handle reads: blobs are named by version and
//! only unlinked (POSIX keeps an unlinked file readable), pack bytes are never rewritten.

use std::fs::File;
use std::io;

use bytes::Bytes;
use sharefs_protocol::FileInfo;

/// An open read handle on the version current at open: its blob, or its range of a pack.
#[derive(Debug)]
pub struct OpenFile {
    pub(super) file: File,
    /// Where the content starts in `file`.
    pub(super) start: u64,
    pub info: FileInfo,
}

impl OpenFile {
    /// Up to `len` bytes at `offset` of the content (fewer at its end). Blocking.
    pub fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let len = len.min(self.info.size.saturating_sub(offset) as usize);
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            match self.pread_into(&mut buf, len, offset, 0) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Bytes::from(buf))
    }

    /// Like [`OpenFile::read`], but only if the bytes are in the page cache: never waits
    /// for the disk, so it may run on an async worker. `None` means: read it the slow way.
    pub fn read_cached(&self, offset: u64, len: usize) -> Option<Bytes> {
        let len = len.min(self.info.size.saturating_sub(offset) as usize);
        let mut buf = Vec::with_capacity(len);
        // Short reads happen at a page-cache boundary as well as at the end: retry slowly.
        match self.pread_into(&mut buf, len, offset, libc::RWF_NOWAIT) {
            Ok(n) if n == len => Some(Bytes::from(buf)),
            _ => None,
        }
    }

    /// One `preadv2` of the content from `offset + buf.len()` into `buf`'s spare capacity,
    /// up to `len` bytes in `buf` (which must have that capacity): the buffer is not
    /// zeroed first, the kernel writes every byte it counts.
    fn pread_into(
        &self,
        buf: &mut Vec<u8>,
        len: usize,
        offset: u64,
        flags: i32,
    ) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let filled = buf.len();
        let want = len.saturating_sub(filled).min(buf.capacity() - filled);
        if want == 0 {
            return Ok(0);
        }
        let at = i64::try_from(self.start + offset + filled as u64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let spare = buf.spare_capacity_mut();
        let iov = libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: want,
        };
        // SAFETY: one iovec describing `want` bytes of `buf`'s spare capacity, which
        // outlives the call; the fd is owned.
        let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, at, flags) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        // SAFETY: the kernel initialised the first `n <= want` spare bytes.
        unsafe { buf.set_len(filled + n) };
        Ok(n)
    }
}
