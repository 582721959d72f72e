//! [`UdmaBuf`]: a memfd sealed against shrinking, turned into a dma-buf by `/dev/udmabuf`.

use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::io::Errno;

use super::{DmaBufError, DmaBufKind, DmaBufMemory, UDMABUF_PATH, checked_len, ioctl, open_device};
use crate::revoke::{Exporter, RevokeReport};

const NOT_PRESENT: &str = "load the udmabuf module (modprobe udmabuf), or the kernel lacks \
     CONFIG_UDMABUF; in a container, pass the device node through";
const PERMISSION: &str = "udmabuf needs read-write access to the device node: run as root or \
     give this user access (a udev rule, or membership of the group that owns it)";
const CREATE_HINT: &str = "the size must be a multiple of the page size and at most the \
     module's size_limit_mb (default 64 MiB; /sys/module/udmabuf/parameters/size_limit_mb)";

/// Host memory as a dma-buf through `/dev/udmabuf`: the pages of a memfd (`MFD_ALLOW_SEALING`,
/// sealed with `F_SEAL_SHRINK`), exported by `UDMABUF_CREATE` with `UDMABUF_FLAGS_CLOEXEC`; the
/// memfd is mapped shared read-write as its CPU view. Derefs to [`DmaBufMemory`] for everything else.
#[derive(Debug)]
pub struct UdmaBuf {
    // Dropped first: revoke, unmap, close the dma-buf; then the memfd.
    mem: DmaBufMemory,
    memfd: OwnedFd,
}

impl UdmaBuf {
    /// `size` bytes (a non-zero multiple of 4096) of memfd-backed memory exported as a dma-buf.
    /// `name` names the memfd (`dmaplane:<name>`, visible in /proc) and the export.
    pub fn new(name: &str, size: u64) -> Result<UdmaBuf, DmaBufError> {
        let len = checked_len(size, "udmabuf")?;
        let dev = open_device(UDMABUF_PATH, true, NOT_PRESENT, PERMISSION)?;
        let memfd_name = format!("dmaplane:{name}");
        let on_memfd = |op, e: Errno| DmaBufError::os(op, format!("memfd {memfd_name}"), e, None);
        let memfd =
            rustix::fs::memfd_create(&memfd_name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
                .map_err(|e| on_memfd("memfd_create", e))?;
        rustix::fs::ftruncate(&memfd, size).map_err(|e| on_memfd("ftruncate", e))?;
        rustix::fs::fcntl_add_seals(&memfd, SealFlags::SHRINK)
            .map_err(|e| on_memfd("F_ADD_SEALS(F_SEAL_SHRINK)", e))?;
        let fd = ioctl::udmabuf_create(dev.as_fd(), memfd.as_fd(), size).map_err(|e| {
            let hint = matches!(e, Errno::INVAL | Errno::TOOBIG).then_some(CREATE_HINT);
            DmaBufError::os("UDMABUF_CREATE", UDMABUF_PATH, e, hint)
        })?;
        // The CPU view maps the memfd: the same pages, and pinnable (see `process_va`).
        let mem =
            DmaBufMemory::from_fd_mapping(name, DmaBufKind::Udmabuf, fd, Some(memfd.as_fd()), len)?;
        Ok(UdmaBuf { mem, memfd })
    }

    /// Cheap availability check: `Ok` when `/dev/udmabuf` can be opened, else why not.
    pub fn probe() -> Result<(), DmaBufError> {
        open_device(UDMABUF_PATH, true, NOT_PRESENT, PERMISSION).map(drop)
    }

    /// The memfd whose pages back the dma-buf: writes through it are visible in the dma-buf.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// The common dma-buf type, e.g. to keep heap and udmabuf buffers together. The memfd is
    /// closed; the dma-buf keeps its pages.
    pub fn into_memory(self) -> DmaBufMemory {
        self.mem
    }
}

impl Deref for UdmaBuf {
    type Target = DmaBufMemory;
    fn deref(&self) -> &DmaBufMemory {
        &self.mem
    }
}

impl AsRef<DmaBufMemory> for UdmaBuf {
    fn as_ref(&self) -> &DmaBufMemory {
        &self.mem
    }
}

impl Exporter for UdmaBuf {
    fn name(&self) -> &str {
        self.mem.name()
    }

    fn revoke(&self, deadline: Duration) -> RevokeReport {
        self.mem.revoke(deadline)
    }
}
