//! Real memory behind fabric windows: the only `unsafe` in the fabric.
//!
//! Host arenas are memfd-backed (so the same pages can later be handed to udmabuf or registered
//! by virtual address); device BARs are anonymous `MAP_NORESERVE` mappings, so a 64 GiB BAR costs
//! only the pages that are touched. A caller's buffer ([`Mapping::from_vec`]) is held as the raw
//! parts of its `Vec` and given back whole by [`Mapping::into_vec`] once nothing else holds the
//! memory: a device can reach it only through the value that owns it.
//!
//! Concurrent DMA to the same bytes is the user's race, exactly as on hardware: the fabric
//! serialises each access against revokes, not against other accesses. Every access to the
//! shared bytes is a byte-wise atomic copy (`atomic_bytes.rs`), never a `&`/`&mut` reference
//! into them, so such a race is a race on values, not undefined behaviour.

use std::ffi::c_void;

use super::{atomic_bytes, pinned};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

/// A memory file's identity: its device and inode, as `/proc/PID/maps` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub major: u32,
    pub minor: u32,
    pub ino: u64,
}

impl FileId {
    /// How many mappings of this file the memory map `maps` (the text of `/proc/PID/maps`)
    /// lists.
    pub fn mappings_in(&self, maps: &str) -> usize {
        let dev = format!("{:02x}:{:02x}", self.major, self.minor);
        let ino = self.ino.to_string();
        maps.lines()
            .filter(|l| {
                let mut f = l.split_whitespace().skip(3);
                f.next() == Some(dev.as_str()) && f.next() == Some(ino.as_str())
            })
            .count()
    }
}

/// A mapping of `len` bytes that lives as long as this value.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    fd: Option<OwnedFd>,
    /// `Some(capacity)`: the bytes are a caller's `Vec<u8>` taken apart, not a mapping.
    heap: Option<usize>,
}

// SAFETY: `Mapping` owns its mapping; the raw pointer is only dereferenced through the
// bounds-checked, byte-wise atomic copy functions below, so accesses from several threads to the
// same bytes are atomic (a race on values, as on hardware), never a data race.
unsafe impl Send for Mapping {}
// SAFETY: as above; no method hands out references into the mapping.
unsafe impl Sync for Mapping {}

#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("size 0 is not a valid {what} size")]
    ZeroSize { what: &'static str },
    #[error("size {size:#x} does not fit this machine's address space")]
    TooLarge { size: u64 },
    #[error("{op} failed for a {size:#x}-byte {what}: {source}")]
    Os {
        op: &'static str,
        what: &'static str,
        size: u64,
        #[source]
        source: std::io::Error,
    },
}

impl Mapping {
    /// Host memory: a memfd of `size` bytes, sealed against shrinking, mapped shared.
    pub fn memfd(name: &str, size: u64) -> Result<Mapping, MappingError> {
        let what = "host arena";
        let len = checked_len(size, what)?;
        let os = |op, e: rustix::io::Errno| MappingError::Os {
            op,
            what,
            size,
            source: e.into(),
        };
        let fd = rustix::fs::memfd_create(
            format!("dmaplane:{name}"),
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| os("memfd_create", e))?;
        rustix::fs::ftruncate(&fd, size).map_err(|e| os("ftruncate", e))?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK).map_err(|e| os("F_ADD_SEALS", e))?;
        let mut mem = Mapping::map_shared(fd.as_fd(), len).map_err(|e| os("mmap", e))?;
        // The registry keeps a descriptor of its own, so a pinned range can name its file (a
        // peer on this host maps the same pages); without one, the memory is reached by copies.
        match fd.try_clone() {
            Ok(dup) => pinned::set_file(mem.start(), dup),
            Err(e) => tracing::debug!(error = %e, "no second descriptor for a memfd arena"),
        }
        mem.fd = Some(fd);
        Ok(mem)
    }

    /// A shared mapping of `len` bytes of a file this value does not own (a dma-buf): the
    /// caller keeps `fd` open as long as it needs to; the mapping lives as long as this value.
    /// Errors are the raw errno, for callers that report them in their own terms.
    /// A `len` past the end of the file is refused (`EINVAL`): touching the pages beyond it
    /// would be SIGBUS, not an error.
    pub fn map_shared(fd: BorrowedFd<'_>, len: usize) -> rustix::io::Result<Mapping> {
        let size = rustix::fs::fstat(fd)?.st_size;
        if u64::try_from(size).map_or(true, |s| (len as u64) > s) {
            return Err(rustix::io::Errno::INVAL);
        }
        // SAFETY: a fresh shared mapping of an open file, at an address the kernel picks (no
        // MAP_FIXED), so it aliases no Rust object.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }?;
        Ok(Mapping::entered(nonnull(ptr), len, None))
    }

    /// Device memory behind a BAR: anonymous, not reserved up front.
    pub fn anonymous(size: u64) -> Result<Mapping, MappingError> {
        let what = "BAR";
        let len = checked_len(size, what)?;
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(|e| MappingError::Os {
            op: "mmap",
            what,
            size,
            source: e.into(),
        })?;
        Ok(Mapping::entered(nonnull(ptr), len, None))
    }

    /// A caller's buffer, zero-copy: its allocation becomes this memory (no bytes move), and
    /// [`into_vec`](Self::into_vec) gives the same allocation back. An empty buffer is refused.
    pub fn from_vec(buf: Vec<u8>) -> Result<Mapping, MappingError> {
        checked_len(buf.len() as u64, "caller's buffer")?;
        let mut buf = std::mem::ManuallyDrop::new(buf);
        Ok(Mapping::entered(
            nonnull(buf.as_mut_ptr().cast::<c_void>()),
            buf.len(),
            Some(buf.capacity()),
        ))
    }

    /// Made memory, entered where software engines may pin it ([`super::pinned`]).
    fn entered(ptr: NonNull<u8>, len: usize, heap: Option<usize>) -> Mapping {
        pinned::enter(ptr.as_ptr().expose_provenance(), len);
        Mapping {
            ptr,
            len,
            fd: None,
            heap,
        }
    }

    /// The caller's buffer back (`Err(self)` for memory that is not one, or that a software
    /// engine still has pinned: see [`super::Pinned`]).
    pub fn into_vec(self) -> Result<Vec<u8>, Mapping> {
        let Some(cap) = self.heap else {
            return Err(self);
        };
        if pinned::is_pinned(self.start()) || !pinned::leave(self.start()) {
            return Err(self);
        }
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: `ptr`, `len` and `cap` are the parts of the `Vec<u8>` taken apart in
        // `from_vec`, never freed (`me` is not dropped); `self` was the only owner, and it is
        // consumed, so no access through it can follow. (`fd` is `None` for heap memory: nothing
        // is leaked by not dropping it.)
        Ok(unsafe { Vec::from_raw_parts(me.ptr.as_ptr(), me.len, cap) })
    }

    /// Its start, as entered in the pin registry.
    fn start(&self) -> usize {
        self.ptr.as_ptr().expose_provenance()
    }

    /// Whether this is a caller's buffer ([`from_vec`](Self::from_vec)).
    pub fn is_heap(&self) -> bool {
        self.heap.is_some()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapping's address in this process (what `ibv_reg_mr` or `cuMemHostRegister` take).
    pub fn process_va(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The memfd behind a host arena.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    /// The identity of the memfd behind a host arena: how another process's memory map names
    /// a mapping of the same pages (`/proc/PID/maps`).
    pub fn file_id(&self) -> Option<FileId> {
        let st = rustix::fs::fstat(self.fd()?).ok()?;
        Some(FileId {
            major: rustix::fs::major(st.st_dev),
            minor: rustix::fs::minor(st.st_dev),
            ino: st.st_ino,
        })
    }

    fn check(&self, off: u64, len: usize) -> Option<usize> {
        let off = usize::try_from(off).ok()?;
        (off.checked_add(len)? <= self.len).then_some(off)
    }

    /// Copy `src` into the memory at `off`; false when out of bounds (nothing written).
    pub fn write(&self, off: u64, src: &[u8]) -> bool {
        let Some(off) = self.check(off, src.len()) else {
            return false;
        };
        // SAFETY: `off + src.len() <= self.len` was checked, the mapping is live for `self`'s
        // lifetime, it is only accessed atomically, and `src` cannot alias it (no references
        // into it exist).
        unsafe { atomic_bytes::store(self.ptr.as_ptr().add(off), src) };
        true
    }

    /// Copy from the memory at `off` into `dst`; false when out of bounds (nothing read).
    pub fn read(&self, off: u64, dst: &mut [u8]) -> bool {
        let Some(off) = self.check(off, dst.len()) else {
            return false;
        };
        // SAFETY: bounds checked as in `write`; `dst` is a unique borrow outside the mapping.
        unsafe { atomic_bytes::load(self.ptr.as_ptr().add(off), dst) };
        true
    }

    /// Set every byte to `byte`.
    pub fn fill(&self, byte: u8) {
        // SAFETY: exactly the live mapping of `self.len` bytes; no references into it exist.
        unsafe { atomic_bytes::fill(self.ptr.as_ptr(), byte, self.len) };
    }

    /// Copy `len` bytes from `src` at `src_off` to `self` at `dst_off` (the two may be the same
    /// memory, and the ranges may overlap); false when either side is out of bounds.
    pub fn copy_from(&self, dst_off: u64, src: &Mapping, src_off: u64, len: usize) -> bool {
        let (Some(d), Some(s)) = (self.check(dst_off, len), src.check(src_off, len)) else {
            return false;
        };
        // SAFETY: both ranges are in bounds of live mappings; `atomic_bytes::copy` tolerates
        // overlap.
        unsafe { atomic_bytes::copy(self.ptr.as_ptr().add(d), src.ptr.as_ptr().add(s), len) };
        true
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if !pinned::leave(self.start()) {
            tracing::error!(
                va = format_args!("{:#x}", self.process_va()),
                len = self.len,
                "memory dropped while a software engine has it pinned: leaked, not freed"
            );
            return;
        }
        if let Some(cap) = self.heap {
            // SAFETY: the parts of the caller's `Vec<u8>` (see `into_vec`); this is the last
            // owner, and no pointer into the buffer outlives it.
            drop(unsafe { Vec::from_raw_parts(self.ptr.as_ptr(), self.len, cap) });
            return;
        }
        // SAFETY: `ptr`/`len` are exactly the mapping created in the constructor, and no pointer
        // into it outlives `self` (the fabric holds windows by `Arc<Mapping>`).
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast::<c_void>(), self.len) }
        {
            tracing::error!(error = %e, "munmap of fabric memory failed");
        }
    }
}

fn checked_len(size: u64, what: &'static str) -> Result<usize, MappingError> {
    if size == 0 {
        return Err(MappingError::ZeroSize { what });
    }
    usize::try_from(size)
        .ok()
        .filter(|l| *l <= isize::MAX as usize)
        .ok_or(MappingError::TooLarge { size })
}

fn nonnull(p: *mut c_void) -> NonNull<u8> {
    // mmap never returns null on success (MAP_FIXED is not used); dangling is unreachable.
    NonNull::new(p.cast::<u8>()).unwrap_or(NonNull::dangling())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_shared_mapping_past_the_end_of_its_file_is_refused() {
        let m = Mapping::memfd("t", 8192).unwrap();
        let fd = m.fd().unwrap();
        assert!(Mapping::map_shared(fd, 8192).is_ok());
        assert_eq!(
            Mapping::map_shared(fd, 8193).unwrap_err(),
            rustix::io::Errno::INVAL
        );
    }
}
