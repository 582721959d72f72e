//! The three ioctls the dma-buf exporters use, and the mmap of a dma-buf: the only `unsafe` of
//! [`crate::dmabuf`]. Opcodes are derived from the kernel's `_IOW` / `_IOWR` rules by rustix's
//! opcode helpers, from the argument structs' sizes — never written out as numbers.

use std::ffi::c_void;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use rustix::io::Errno;
use rustix::ioctl::{Ioctl, IoctlOutput, Opcode, Updater, opcode};

/// `struct udmabuf_create` (include/uapi/linux/udmabuf.h).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct UdmabufCreate {
    pub memfd: u32,
    pub flags: u32,
    pub offset: u64,
    pub size: u64,
}

/// `struct dma_heap_allocation_data` (include/uapi/linux/dma-heap.h).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct DmaHeapAllocationData {
    pub len: u64,
    pub fd: u32,
    pub fd_flags: u32,
    pub heap_flags: u64,
}

/// `struct dma_buf_sync` (include/uapi/linux/dma-buf.h).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct DmaBufSync {
    pub flags: u64,
}

/// `UDMABUF_CREATE = _IOW('u', 0x42, struct udmabuf_create)`.
pub(super) const UDMABUF_CREATE: Opcode = opcode::write::<UdmabufCreate>(b'u', 0x42);
/// `UDMABUF_FLAGS_CLOEXEC`.
pub(super) const UDMABUF_FLAGS_CLOEXEC: u32 = 1;
/// `DMA_HEAP_IOCTL_ALLOC = _IOWR('H', 0, struct dma_heap_allocation_data)`.
pub(super) const DMA_HEAP_IOCTL_ALLOC: Opcode =
    opcode::read_write::<DmaHeapAllocationData>(b'H', 0);
/// `DMA_BUF_IOCTL_SYNC = _IOW('b', 0, struct dma_buf_sync)`.
pub(super) const DMA_BUF_IOCTL_SYNC: Opcode = opcode::write::<DmaBufSync>(b'b', 0);

pub(super) const DMA_BUF_SYNC_READ: u64 = 1;
pub(super) const DMA_BUF_SYNC_WRITE: u64 = 2;
pub(super) const DMA_BUF_SYNC_START: u64 = 0;
pub(super) const DMA_BUF_SYNC_END: u64 = 4;

/// `UDMABUF_CREATE`: its argument is read by the kernel, its result is the new dma-buf's fd.
struct CreateUdmabuf(UdmabufCreate);

// SAFETY: the opcode is `_IOW('u', 0x42, struct udmabuf_create)` and `as_ptr` points at a live
// `#[repr(C)]` copy of exactly that struct, which the kernel only reads (`IS_MUTATING = false`);
// on success the ioctl's return value is a new file descriptor owned by the caller.
unsafe impl Ioctl for CreateUdmabuf {
    type Output = OwnedFd;
    const IS_MUTATING: bool = false;

    fn opcode(&self) -> Opcode {
        UDMABUF_CREATE
    }

    fn as_ptr(&mut self) -> *mut c_void {
        std::ptr::addr_of_mut!(self.0).cast::<c_void>()
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<OwnedFd> {
        if out < 0 {
            return Err(Errno::INVAL);
        }
        // SAFETY: a successful UDMABUF_CREATE returns a file descriptor the kernel has just
        // installed for this process; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(out) })
    }
}

/// Create a dma-buf over `size` bytes of `memfd` (sealed against shrinking) from `/dev/udmabuf`.
pub(super) fn udmabuf_create(
    dev: BorrowedFd<'_>,
    memfd: BorrowedFd<'_>,
    size: u64,
) -> rustix::io::Result<OwnedFd> {
    let memfd = u32::try_from(memfd.as_raw_fd()).map_err(|_| Errno::BADF)?;
    let arg = CreateUdmabuf(UdmabufCreate {
        memfd,
        flags: UDMABUF_FLAGS_CLOEXEC,
        offset: 0,
        size,
    });
    // SAFETY: `dev` is an open `/dev/udmabuf` (the caller opened that path) and `CreateUdmabuf`
    // describes UDMABUF_CREATE exactly (see its `Ioctl` impl).
    unsafe { rustix::ioctl::ioctl(dev, arg) }
}

/// Allocate `len` bytes from a dma-heap; the new dma-buf fd is opened O_RDWR | O_CLOEXEC.
pub(super) fn dma_heap_alloc(heap: BorrowedFd<'_>, len: u64) -> rustix::io::Result<OwnedFd> {
    let fd_flags = (rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC).bits();
    let mut data = DmaHeapAllocationData {
        len,
        fd: 0,
        fd_flags,
        heap_flags: 0,
    };
    {
        // SAFETY: DMA_HEAP_IOCTL_ALLOC is `_IOWR('H', 0, struct dma_heap_allocation_data)` and
        // `data` is a `#[repr(C)]` copy of that struct, borrowed mutably for the call only.
        let ioctl = unsafe { Updater::<DMA_HEAP_IOCTL_ALLOC, _>::new(&mut data) };
        // SAFETY: `heap` is an open dma-heap device (the caller opened it under /dev/dma_heap).
        unsafe { rustix::ioctl::ioctl(heap, ioctl) }?;
    }
    let fd = RawFd::try_from(data.fd).map_err(|_| Errno::BADF)?;
    if fd < 0 {
        return Err(Errno::BADF);
    }
    // SAFETY: the successful ioctl wrote into `data.fd` a descriptor it has just installed for
    // this process; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `DMA_BUF_IOCTL_SYNC` with `flags`, restarted on EINTR / EAGAIN as the kernel asks.
pub(super) fn dma_buf_sync(buf: BorrowedFd<'_>, flags: u64) -> rustix::io::Result<()> {
    loop {
        // SAFETY: DMA_BUF_IOCTL_SYNC is `_IOW('b', 0, struct dma_buf_sync)`; `Setter` passes a
        // pointer to its own `#[repr(C)]` copy of that struct, which the kernel only reads.
        let ioctl = unsafe {
            rustix::ioctl::Setter::<DMA_BUF_IOCTL_SYNC, DmaBufSync>::new(DmaBufSync { flags })
        };
        // SAFETY: `buf` is a dma-buf fd (owned by the caller's `DmaBufMemory`).
        match unsafe { rustix::ioctl::ioctl(buf, ioctl) } {
            Err(Errno::INTR) | Err(Errno::AGAIN) => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's `_IOC(dir, type, nr, size)` rule, spelled out independently of rustix:
    /// dir in bits 30..32 (write 1, read 2), size in 16..30, type in 8..16, nr in 0..8.
    fn ioc(dir: Opcode, ty: u8, nr: u8, size: usize) -> Opcode {
        (dir << 30) | ((size as Opcode) << 16) | ((ty as Opcode) << 8) | nr as Opcode
    }

    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn opcodes_follow_the_ioc_rule() {
        const W: Opcode = 1;
        const R: Opcode = 2;
        assert_eq!(std::mem::size_of::<UdmabufCreate>(), 24);
        assert_eq!(std::mem::size_of::<DmaHeapAllocationData>(), 24);
        assert_eq!(std::mem::size_of::<DmaBufSync>(), 8);
        assert_eq!(UDMABUF_CREATE, ioc(W, b'u', 0x42, 24));
        assert_eq!(DMA_HEAP_IOCTL_ALLOC, ioc(R | W, b'H', 0, 24));
        assert_eq!(DMA_BUF_IOCTL_SYNC, ioc(W, b'b', 0, 8));
    }
}
