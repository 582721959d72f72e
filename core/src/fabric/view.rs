//! A view: this process's mapping of another process's host memory, made from the memory file
//! that process passed over a Unix socket (the TCP backend's shared-memory path on one host).
//!
//! The contract:
//!
//! - **Made** only of a file that cannot shrink (a memfd sealed with `F_SEAL_SHRINK`, as every
//!   host arena is: [`super::Mapping::memfd`]) and only for a range inside it: a mapping past
//!   the end of its file faults with `SIGBUS` when touched, and a file its owner could shrink
//!   would let that owner crash this process. Anything else is refused with [`ViewError`].
//! - **Touched** only through [`View::write_from`] and [`View::read_into`]: bounds-checked,
//!   byte-wise atomic copies between the view and a [`Pinned`] range of this process's own
//!   memory — one copy, straight from source to target. A view made read-only refuses writes.
//! - **Dropped** means unmapped: once the value is gone this process has no way to the pages.
//!   A revoke drops every view of the revoked memory before it is acknowledged. A view is not
//!   entered in the pin registry: it is not memory this process may register.

use std::ffi::c_void;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use rustix::fs::SealFlags;
use rustix::mm::{MapFlags, ProtFlags};

use super::Pinned;
use super::atomic_bytes;

/// Views up to this size are populated when made (their page-table entries filled at once,
/// not one fault per page on first touch); larger ones fault a chunk at a time as they are
/// copied through, so making one never stalls its engine for long (populating 1 GiB takes
/// most of a second).
const POPULATE_MAX: u64 = 64 << 20;

/// Why a view could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("a view of {len:#x} bytes at offset {offset:#x}: {why}")]
    Range { offset: u64, len: u64, why: String },
    #[error(
        "the file is not sealed against shrinking (seals {seals:#x}): its owner could make \
         the view fault"
    )]
    NotSealed { seals: u32 },
    #[error("{op} of the memory file failed: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A mapping of `len` bytes of another process's memory file (see the module docs).
#[derive(Debug)]
pub struct View {
    /// The mapping's start (page-aligned) and length.
    map: NonNull<u8>,
    map_len: usize,
    /// Where the view's first byte is in the mapping.
    delta: usize,
    len: usize,
    writable: bool,
}

// SAFETY: `View` owns its mapping; the pointer is only dereferenced through the bounds-checked,
// byte-wise atomic copies below, so accesses from several threads are races on values, never
// data races.
unsafe impl Send for View {}
// SAFETY: as above; no method hands out references into the mapping.
unsafe impl Sync for View {}

impl View {
    /// Map `[offset, offset + len)` of `file`, for reading (and writing, when `writable`).
    pub fn map(
        file: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        writable: bool,
    ) -> Result<View, ViewError> {
        let range = |why: String| ViewError::Range { offset, len, why };
        let os = |op, e: rustix::io::Errno| ViewError::Os {
            op,
            source: e.into(),
        };
        if len == 0 {
            return Err(range("an empty view maps nothing".into()));
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| range("the end overflows".into()))?;
        let seals = rustix::fs::fcntl_get_seals(file).map_err(|e| os("F_GET_SEALS", e))?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(ViewError::NotSealed {
                seals: seals.bits(),
            });
        }
        let size = rustix::fs::fstat(file).map_err(|e| os("fstat", e))?.st_size;
        if u64::try_from(size).map_or(true, |s| end > s) {
            return Err(range(format!("the file holds {size:#x} bytes")));
        }
        let page = rustix::param::page_size() as u64;
        let start = offset / page * page;
        let delta = usize::try_from(offset - start).map_err(|_| range("too large".into()))?;
        let map_len = usize::try_from(end - start)
            .ok()
            .filter(|l| *l <= isize::MAX as usize)
            .ok_or_else(|| range("larger than this address space".into()))?;
        let mut prot = ProtFlags::READ;
        if writable {
            prot |= ProtFlags::WRITE;
        }
        let mut flags = MapFlags::SHARED;
        if len <= POPULATE_MAX {
            flags |= MapFlags::POPULATE;
        }
        // SAFETY: a fresh shared mapping of an open file at an address the kernel picks (no
        // MAP_FIXED), so it aliases no Rust object; the range lies inside a file that cannot
        // shrink (checked above), so touching it cannot fault.
        let p =
            unsafe { rustix::mm::mmap(std::ptr::null_mut(), map_len, prot, flags, file, start) }
                .map_err(|e| os("mmap", e))?;
        let map = NonNull::new(p.cast::<u8>()).ok_or_else(|| range("mmap gave null".into()))?;
        Ok(View {
            map,
            map_len,
            delta,
            len: usize::try_from(len).map_err(|_| range("too large".into()))?,
            writable,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// A pointer to `off` for `n` bytes of the view, or `None` out of bounds.
    fn at(&self, off: u64, n: usize) -> Option<*mut u8> {
        let off = usize::try_from(off).ok()?;
        (off.checked_add(n)? <= self.len).then(|| {
            // SAFETY: `delta + off + n <= map_len`: in bounds of the mapping.
            unsafe { self.map.as_ptr().add(self.delta + off) }
        })
    }

    /// Copy `n` bytes of `src` at `src_off` into the view at `off`; false (nothing copied) when
    /// either side is out of bounds or the view is read-only.
    pub fn write_from(&self, off: u64, src: &Pinned, src_off: u64, n: usize) -> bool {
        if !self.writable {
            return false;
        }
        let (Some(d), Some(s)) = (self.at(off, n), src.at(src_off, n)) else {
            return false;
        };
        // SAFETY: both ranges are in bounds of live mappings (the view's own, and one the pin
        // keeps live); both are only accessed atomically or by other processes and devices;
        // `copy` tolerates overlap.
        unsafe { atomic_bytes::copy(d, s, n) };
        true
    }

    /// Copy `n` bytes of the view at `off` into `dst` at `dst_off`; false (nothing copied) when
    /// either side is out of bounds.
    pub fn read_into(&self, off: u64, dst: &Pinned, dst_off: u64, n: usize) -> bool {
        let (Some(s), Some(d)) = (self.at(off, n), dst.at(dst_off, n)) else {
            return false;
        };
        // SAFETY: as in `write_from`.
        unsafe { atomic_bytes::copy(d, s, n) };
        true
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map`; no pointer into it outlives `self` (the
        // copies borrow `self`).
        let r = unsafe { rustix::mm::munmap(self.map.as_ptr().cast::<c_void>(), self.map_len) };
        if let Err(e) = r {
            tracing::error!(error = %e, "munmap of a view failed");
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::super::Mapping;
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_view_reaches_the_same_pages_and_only_its_range() {
        let m = Mapping::memfd("view", 3 * 4096).unwrap();
        let pin = Pinned::new(m.process_va(), 4096).unwrap();
        let (file, at) = pin.file().expect("a memfd arena names its file");
        assert_eq!(at, 0);
        let v = View::map(file.as_fd(), 4096 + 100, 4096, true).unwrap();
        assert!(pin.write(0, b"through the view"));
        assert!(v.write_from(0, &pin, 0, 16));
        let mut got = [0u8; 16];
        assert!(m.read(4096 + 100, &mut got));
        assert_eq!(&got, b"through the view");
        assert!(v.read_into(0, &pin, 100, 16));
        assert!(pin.read(100, &mut got));
        assert_eq!(&got, b"through the view");
        assert!(!v.write_from(4090, &pin, 0, 16), "past the view's end");
        assert!(!v.read_into(0, &pin, 4090, 16), "past the pin's end");
        let ro = View::map(file.as_fd(), 0, 4096, false).unwrap();
        assert!(
            !ro.write_from(0, &pin, 0, 16),
            "a read-only view refuses writes"
        );
        assert!(matches!(
            View::map(file.as_fd(), 2 * 4096, 4097, true),
            Err(ViewError::Range { .. })
        ));
        assert!(matches!(
            View::map(file.as_fd(), 0, 0, true),
            Err(ViewError::Range { .. })
        ));
    }

    #[test]
    fn a_file_that_could_shrink_is_refused() {
        let fd = rustix::fs::memfd_create("unsealed", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        assert!(matches!(
            View::map(fd.as_fd(), 0, 4096, true),
            Err(ViewError::NotSealed { .. })
        ));
    }

    #[test]
    fn other_memory_names_no_file() {
        let m = Mapping::from_vec(vec![0u8; 4096]).unwrap();
        let pin = Pinned::new(m.process_va(), 4096).unwrap();
        assert!(pin.file().is_none());
    }
}
