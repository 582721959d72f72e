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

/// Memory another owner allocated and lends for as long as this value lives: a Python
/// object's buffer held by its buffer export, a tensor held by its DLPack capsule.
///
/// # Safety
///
/// An implementor promises that, from the moment it is made until it is dropped:
/// - `[ptr(), ptr() + len())` is one allocation of this process, valid for reads and — unless
///   [`Lent::read_only`] — for writes, and it is neither freed nor moved;
/// - `ptr()` and `len()` return the same values every time;
/// - it is sound to drop on any thread.
///
/// The fabric then touches the bytes only through its bounds-checked, byte-wise atomic copies
/// (and writes them only if they are not read-only), as it does its own memory. The owner's
/// code may race with DMA on the values, as it may on hardware, never a data race in Rust.
pub unsafe trait Lent: Send + Sync + 'static {
    /// The first byte.
    fn ptr(&self) -> NonNull<u8>;
    /// How many bytes.
    fn len(&self) -> usize;
    /// Whether it lends no bytes (lent memory is refused when empty).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether the owner forbids writes (an immutable `bytes`, a read-only array).
    fn read_only(&self) -> bool;
}

/// Who owns the bytes of a [`Mapping`] beside the mapping itself.
enum Owner {
    /// Mapped here (`mmap`): unmapped on drop; with the memfd behind a host arena.
    Mapped(Option<OwnedFd>),
    /// A caller's `Vec<u8>` taken apart: its capacity.
    Heap(usize),
    /// Another owner's memory, lent while this lives.
    Lent(Box<dyn Lent>),
}

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Mapped(fd) => write!(f, "Mapped({fd:?})"),
            Owner::Heap(cap) => write!(f, "Heap({cap})"),
            Owner::Lent(l) => write!(f, "Lent(read_only: {})", l.read_only()),
        }
    }
}

/// A mapping of `len` bytes that lives as long as this value.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    owner: Owner,
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
        mem.owner = Owner::Mapped(Some(fd));
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
        Ok(Mapping::entered(nonnull(ptr), len, Owner::Mapped(None)))
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
        Ok(Mapping::entered(nonnull(ptr), len, Owner::Mapped(None)))
    }

    /// A caller's buffer, zero-copy: its allocation becomes this memory (no bytes move), and
    /// [`into_vec`](Self::into_vec) gives the same allocation back. An empty buffer is refused.
    pub fn from_vec(buf: Vec<u8>) -> Result<Mapping, MappingError> {
        checked_len(buf.len() as u64, "caller's buffer")?;
        let mut buf = std::mem::ManuallyDrop::new(buf);
        let cap = buf.capacity();
        Ok(Mapping::entered(
            nonnull(buf.as_mut_ptr().cast::<c_void>()),
            buf.len(),
            Owner::Heap(cap),
        ))
    }

    /// Another owner's memory, zero-copy, for as long as this mapping lives (`lent` is dropped
    /// with it). An empty one is refused.
    pub fn lent(lent: Box<dyn Lent>) -> Result<Mapping, MappingError> {
        let len = checked_len(lent.len() as u64, "lent buffer")?;
        Ok(Mapping::entered(lent.ptr(), len, Owner::Lent(lent)))
    }

    /// Made memory, entered where software engines may pin it ([`super::pinned`]).
    fn entered(ptr: NonNull<u8>, len: usize, owner: Owner) -> Mapping {
        pinned::enter(ptr.as_ptr().expose_provenance(), len);
        Mapping { ptr, len, owner }
    }

    /// Whether its owner forbids writes ([`Lent::read_only`]).
    pub fn is_read_only(&self) -> bool {
        matches!(&self.owner, Owner::Lent(l) if l.read_only())
    }

    /// The caller's buffer back (`Err(self)` for memory that is not one, or that a software
    /// engine still has pinned: see [`super::Pinned`]).
    pub fn into_vec(self) -> Result<Vec<u8>, Mapping> {
        let Owner::Heap(cap) = self.owner else {
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
        matches!(self.owner, Owner::Heap(_))
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
        match &self.owner {
            Owner::Mapped(fd) => fd.as_ref().map(|f| f.as_fd()),
            _ => None,
        }
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

    /// Copy `src` into the memory at `off`; false when out of bounds or read-only (nothing
    /// written).
    pub fn write(&self, off: u64, src: &[u8]) -> bool {
        let Some(off) = self.check(off, src.len()) else {
            return false;
        };
        if self.is_read_only() {
            return false;
        }
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

    /// Set every byte to `byte` (not in read-only lent memory: nothing written).
    pub fn fill(&self, byte: u8) {
        if self.is_read_only() {
            return;
        }
        // SAFETY: exactly the live mapping of `self.len` bytes; no references into it exist.
        unsafe { atomic_bytes::fill(self.ptr.as_ptr(), byte, self.len) };
    }

    /// Copy `len` bytes from `src` at `src_off` to `self` at `dst_off` (the two may be the same
    /// memory, and the ranges may overlap); false when either side is out of bounds.
    pub fn copy_from(&self, dst_off: u64, src: &Mapping, src_off: u64, len: usize) -> bool {
        let (Some(d), Some(s)) = (self.check(dst_off, len), src.check(src_off, len)) else {
            return false;
        };
        if self.is_read_only() {
            return false;
        }
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
        match self.owner {
            Owner::Heap(cap) => {
                // SAFETY: the parts of the caller's `Vec<u8>` (see `into_vec`); this is the
                // last owner, and no pointer into the buffer outlives it.
                drop(unsafe { Vec::from_raw_parts(self.ptr.as_ptr(), self.len, cap) });
                return;
            }
            // The lender's own drop gives its memory back (the field drops after this).
            Owner::Lent(_) => return,
            Owner::Mapped(_) => {}
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
