//! Real dma-buf exporters: host memory handed to the kernel as a dma-buf.
//!
//! - [`UdmaBuf`]: a sealed memfd turned into a dma-buf by `/dev/udmabuf` (`UDMABUF_CREATE`).
//! - [`DmaHeapBuf`]: a buffer from the system dma-heap, `/dev/dma_heap/system`.
//!
//! Both are a [`DmaBufMemory`]: an owned dma-buf fd, a shared read-write mapping of it (the CPU's
//! view, bracketed by [`DmaBufMemory::sync_start`] / [`DmaBufMemory::sync_end`]), and the
//! [`Export`] that runs the revoke protocol for it. Offers, best first: the dma-buf itself
//! (`AddrSpace::DmaBuf`, offsets `[0, len)`, for `ibv_reg_dmabuf_mr`-style kernel importers) and
//! its mapping in this process (`AddrSpace::ProcessVa`, for importers that register by address —
//! the fallback where the kernel importer has no dma-buf support, as Soft-RoCE). A udmabuf's
//! mapping is of its memfd (the same pages, and pinnable); a dma-heap buffer's is of the dma-buf.
//!
//! Revoke is the core protocol: importers are invalidated and must quiesce (stop DMA, deregister)
//! before the ack. The kernel has no dma-buf revoke ioctl yet, so a kernel importer that still
//! holds the fd keeps the pages alive after the ack; the protocol, not the kernel, is what stops
//! its DMA. Dropping the exporter revokes before it unmaps.
//!
//! Where the devices are missing (no udmabuf module, no dma-heaps, a container without the
//! nodes) constructors and [`UdmaBuf::probe`] / [`DmaHeapBuf::probe`] return a distinct
//! [`DmaBufError::NotPresent`] that says what to load or enable.

mod heap;
mod ioctl;
mod udmabuf;

pub use heap::DmaHeapBuf;
pub use udmabuf::UdmaBuf;

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use rustix::io::Errno;

use crate::addr::{AddrList, AddrSpace, DmaBufId, DmaRange};
use crate::fabric::Mapping;
use crate::hints::Hints;
use crate::negotiate::{Accept, Offer};
use crate::revoke::{AttachError, Attachment, Export, Exporter, Importer, RevokeReport};

/// The udmabuf device.
pub const UDMABUF_PATH: &str = "/dev/udmabuf";
/// The system dma-heap.
pub const DMA_HEAP_SYSTEM_PATH: &str = "/dev/dma_heap/system";
/// The directory of dma-heaps.
pub const DMA_HEAP_DIR: &str = "/dev/dma_heap";
/// Granule of every dma-buf list, and the unit buffer sizes must be a multiple of: 4 KiB.
pub const DMABUF_GRANULE: u64 = 4096;

/// Which kernel exporter made a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DmaBufKind {
    /// `/dev/udmabuf` over a memfd.
    Udmabuf,
    /// `/dev/dma_heap/system`.
    SystemHeap,
    /// A dma-buf fd from elsewhere ([`DmaBufMemory::import`]): another driver's export, or a
    /// process's over a socket.
    Imported,
}

impl fmt::Display for DmaBufKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DmaBufKind::Udmabuf => "udmabuf",
            DmaBufKind::SystemHeap => "dma-heap system",
            DmaBufKind::Imported => "imported",
        })
    }
}

/// The CPU access a [`DmaBufMemory::sync_start`] / [`DmaBufMemory::sync_end`] pair brackets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncAccess {
    Read,
    Write,
    ReadWrite,
}

impl SyncAccess {
    fn flags(self) -> u64 {
        match self {
            SyncAccess::Read => ioctl::DMA_BUF_SYNC_READ,
            SyncAccess::Write => ioctl::DMA_BUF_SYNC_WRITE,
            SyncAccess::ReadWrite => ioctl::DMA_BUF_SYNC_READ | ioctl::DMA_BUF_SYNC_WRITE,
        }
    }
}

/// Why a dma-buf could not be made or used. Every variant names the device (or file) and, for
/// system call failures, the errno.
#[derive(Debug, thiserror::Error)]
pub enum DmaBufError {
    /// The device node is missing or has no driver behind it.
    #[error("{path} not present: {hint}")]
    NotPresent {
        path: &'static str,
        hint: &'static str,
    },
    /// The device exists but this process may not open it.
    #[error("permission denied opening {path} (errno {errno}): {hint}")]
    PermissionDenied {
        path: &'static str,
        errno: i32,
        hint: &'static str,
    },
    /// The requested size cannot be a dma-buf.
    #[error("size {size:#x} is not a valid {what} size: {why}")]
    BadSize {
        what: &'static str,
        size: u64,
        why: &'static str,
    },
    /// A CPU access outside the buffer.
    #[error("[{offset:#x}, +{len:#x}) is outside the {size:#x}-byte dma-buf {name}")]
    OutOfBounds {
        name: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// An fd handed to [`DmaBufMemory::import`] that is not a dma-buf.
    #[error("fd {fd} is not a dma-buf: {why}")]
    NotADmaBuf { fd: i32, why: String },
    /// A system call failed.
    #[error("{op} on {path} failed: {source} (errno {errno}){}", suffix(.hint))]
    Os {
        op: &'static str,
        path: String,
        errno: i32,
        hint: Option<&'static str>,
        #[source]
        source: std::io::Error,
    },
}

fn suffix(hint: &Option<&'static str>) -> String {
    hint.map(|h| format!(": {h}")).unwrap_or_default()
}

impl DmaBufError {
    /// True when the device is unavailable on this machine (missing, or not permitted), as
    /// opposed to a failure of a device that is there.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            DmaBufError::NotPresent { .. } | DmaBufError::PermissionDenied { .. }
        )
    }

    pub(crate) fn os(
        op: &'static str,
        path: impl Into<String>,
        e: Errno,
        hint: Option<&'static str>,
    ) -> DmaBufError {
        DmaBufError::Os {
            op,
            path: path.into(),
            errno: e.raw_os_error(),
            hint,
            source: e.into(),
        }
    }
}

/// Classify a failed `open` of a device node.
pub(crate) fn open_error(
    path: &'static str,
    e: Errno,
    not_present: &'static str,
    permission: &'static str,
) -> DmaBufError {
    match e {
        Errno::NOENT | Errno::NODEV | Errno::NXIO => DmaBufError::NotPresent {
            path,
            hint: not_present,
        },
        Errno::ACCESS | Errno::PERM => DmaBufError::PermissionDenied {
            path,
            errno: e.raw_os_error(),
            hint: permission,
        },
        _ => DmaBufError::os("open", path, e, None),
    }
}

/// Open a device node close-on-exec, read-write or read-only.
pub(crate) fn open_device(
    path: &'static str,
    write: bool,
    not_present: &'static str,
    permission: &'static str,
) -> Result<OwnedFd, DmaBufError> {
    let access = if write {
        rustix::fs::OFlags::RDWR
    } else {
        rustix::fs::OFlags::RDONLY
    };
    rustix::fs::open(
        path,
        access | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| open_error(path, e, not_present, permission))
}

/// `size` as a mapping length: non-zero, a multiple of [`DMABUF_GRANULE`], addressable.
pub(crate) fn checked_len(size: u64, what: &'static str) -> Result<usize, DmaBufError> {
    let bad = |why| DmaBufError::BadSize { what, size, why };
    if size == 0 {
        return Err(bad("a dma-buf cannot be empty"));
    }
    if !size.is_multiple_of(DMABUF_GRANULE) {
        return Err(bad("it must be a multiple of 4096 bytes"));
    }
    usize::try_from(size)
        .ok()
        .filter(|l| *l <= isize::MAX as usize)
        .ok_or(bad("it does not fit this machine's address space"))
}

/// A kernel dma-buf this process exports: the fd, its CPU mapping, and its revoke protocol.
#[derive(Debug)]
pub struct DmaBufMemory {
    export: Export,
    kind: DmaBufKind,
    id: DmaBufId,
    len: u64,
    // Field order is drop order: unmap, then close the dma-buf.
    /// A shared read-write mapping of the whole buffer (the fabric's memory type).
    map: Mapping,
    fd: OwnedFd,
}

impl DmaBufMemory {
    /// Wrap a fresh dma-buf fd of `len` bytes: identify it and map it.
    pub(crate) fn from_fd(
        name: &str,
        kind: DmaBufKind,
        fd: OwnedFd,
        len: usize,
    ) -> Result<DmaBufMemory, DmaBufError> {
        Self::from_fd_mapping(name, kind, fd, None, len)
    }

    /// As [`from_fd`](Self::from_fd), with the CPU view mapped from `map_from` (a file sharing
    /// the dma-buf's pages) instead of the dma-buf itself.
    pub(crate) fn from_fd_mapping(
        name: &str,
        kind: DmaBufKind,
        fd: OwnedFd,
        map_from: Option<BorrowedFd<'_>>,
        len: usize,
    ) -> Result<DmaBufMemory, DmaBufError> {
        let what = format!("{kind} dma-buf {name}");
        let st = rustix::fs::fstat(&fd).map_err(|e| DmaBufError::os("fstat", &what, e, None))?;
        let id = DmaBufId {
            dev: st.st_dev,
            ino: st.st_ino,
        };
        let map = Mapping::map_shared(map_from.unwrap_or(fd.as_fd()), len)
            .map_err(|e| DmaBufError::os("mmap", &what, e, None))?;
        tracing::debug!(name, %kind, len, dev = id.dev, ino = id.ino, "dma-buf exported");
        Ok(DmaBufMemory {
            export: Export::new(name),
            kind,
            id,
            len: len as u64,
            map,
            fd,
        })
    }

    /// A dma-buf fd this process was given (another driver's export, a dma-heap or udmabuf
    /// buffer from elsewhere, one sent over a socket): its size is the file's, and it must be
    /// mappable — the CPU view is the dma-buf's own mapping (an exporter without `mmap`, as a
    /// GPU driver's often is, is refused saying so). Importers register it as the dma-buf
    /// first; its mapping is offered as process VAs too, which a kernel importer may refuse to
    /// pin (udmabuf and the system heap map `VM_PFNMAP`: `ibv_reg_mr` gives EFAULT).
    pub fn import(name: &str, fd: OwnedFd) -> Result<DmaBufMemory, DmaBufError> {
        use std::os::fd::AsRawFd;
        let raw = fd.as_raw_fd();
        let not = |why: String| DmaBufError::NotADmaBuf { fd: raw, why };
        // The kernel lists a dma-buf's exporter in its fdinfo; without /proc the fstat and
        // the mapping below still check the fd.
        if let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")) {
            match info.lines().find_map(|l| l.strip_prefix("exp_name:")) {
                Some(exp) => tracing::debug!(name, exporter = exp.trim(), "importing a dma-buf"),
                None => {
                    return Err(not(
                        "its fdinfo names no exporter (`exp_name`): it is some other file".into(),
                    ));
                }
            }
        }
        let st = rustix::fs::fstat(&fd).map_err(|e| not(format!("fstat: {e}")))?;
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let len = checked_len(size, "imported dma-buf")?;
        Self::from_fd(name, DmaBufKind::Imported, fd, len).map_err(|e| match e {
            DmaBufError::Os {
                op: "mmap", errno, ..
            } => not(format!(
                "its exporter does not let the CPU map it (mmap: errno {errno}); register it \
                 through the driver that made it"
            )),
            other => other,
        })
    }

    /// The export's name (in revoke reports and errors).
    pub fn name(&self) -> &str {
        self.export.name()
    }

    pub fn kind(&self) -> DmaBufKind {
        self.kind
    }

    /// The dma-buf fd, to hand to a kernel importer (`ibv_reg_dmabuf_mr`, another process).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: empty dma-bufs are refused at construction.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The dma-buf's identity (device and inode of its file), the same through every dup'd fd.
    pub fn id(&self) -> DmaBufId {
        self.id
    }

    /// The address of the CPU mapping in this process (page aligned): what the `ProcessVa` offer
    /// lists. For a udmabuf it is a mapping of the memfd (the same pages), because the kernel
    /// maps a udmabuf itself `VM_PFNMAP` (since 6.11), which `pin_user_pages` — and so
    /// `ibv_reg_mr` — refuses with EFAULT.
    pub fn process_va(&self) -> u64 {
        self.map.process_va()
    }

    fn out_of_bounds(&self, offset: u64, len: usize) -> DmaBufError {
        DmaBufError::OutOfBounds {
            name: self.name().to_string(),
            offset,
            len: len as u64,
            size: self.len,
        }
    }

    /// Copy `data` into the buffer at `offset` through the CPU mapping. Bracket with
    /// [`sync_start`](Self::sync_start)`(Write)` / [`sync_end`](Self::sync_end) when a device
    /// reads the buffer.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaBufError> {
        if self.map.write(offset, data) {
            Ok(())
        } else {
            Err(self.out_of_bounds(offset, data.len()))
        }
    }

    /// Copy bytes out of the buffer at `offset` through the CPU mapping.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaBufError> {
        if self.map.read(offset, buf) {
            Ok(())
        } else {
            Err(self.out_of_bounds(offset, buf.len()))
        }
    }

    fn sync(&self, flags: u64, op: &'static str) -> Result<(), DmaBufError> {
        ioctl::dma_buf_sync(self.fd.as_fd(), flags).map_err(|e| {
            DmaBufError::os(
                op,
                format!("{} dma-buf {}", self.kind, self.name()),
                e,
                None,
            )
        })
    }

    /// Begin CPU access (`DMA_BUF_IOCTL_SYNC` START): caches are made coherent for the CPU.
    pub fn sync_start(&self, access: SyncAccess) -> Result<(), DmaBufError> {
        self.sync(
            ioctl::DMA_BUF_SYNC_START | access.flags(),
            "DMA_BUF_IOCTL_SYNC(start)",
        )
    }

    /// End CPU access (`DMA_BUF_IOCTL_SYNC` END): CPU writes are made visible to devices.
    pub fn sync_end(&self, access: SyncAccess) -> Result<(), DmaBufError> {
        self.sync(
            ioctl::DMA_BUF_SYNC_END | access.flags(),
            "DMA_BUF_IOCTL_SYNC(end)",
        )
    }

    /// What this buffer can be attached as, best first: the dma-buf, then its process mapping.
    pub fn offers(&self) -> Vec<Offer> {
        vec![
            Offer {
                space: AddrSpace::DmaBuf { id: self.id },
                hints: Hints::HOST_MEMORY,
            },
            Offer {
                space: AddrSpace::ProcessVa,
                hints: Hints::HOST_MEMORY,
            },
        ]
    }

    /// The list for one of [`offers`](Self::offers): `DmaBuf` — one range `[0, len)` of offsets
    /// into the buffer; `ProcessVa` — `[process_va, len)`. Other spaces are refused.
    pub fn addr_list(&self, offer: &Offer) -> Result<AddrList, AttachError> {
        let start = match offer.space {
            AddrSpace::DmaBuf { id } if id == self.id => 0,
            AddrSpace::ProcessVa => self.process_va(),
            other => {
                return Err(AttachError::Exporter {
                    export: self.name().to_string(),
                    what: format!("{other} is not offered by this {} dma-buf", self.kind),
                });
            }
        };
        AddrList::single(
            offer.space,
            offer.hints,
            DMABUF_GRANULE,
            DmaRange::new(start, self.len),
        )
        .map_err(|e| AttachError::Exporter {
            export: self.name().to_string(),
            what: e.to_string(),
        })
    }

    /// Negotiate with `importer` over [`offers`](Self::offers) and record the attachment. No
    /// access grant: the kernel (or the importer's own registration) enforces access; revoke
    /// relies on the importer quiescing.
    pub fn attach(
        &self,
        importer: Arc<dyn Importer>,
        accepts: &[Accept],
    ) -> Result<Attachment, AttachError> {
        self.export.attach(importer, &self.offers(), accepts, |n| {
            Ok((self.addr_list(&n.offer)?, None))
        })
    }

    /// Revoke every attachment, waiting for the importers up to `deadline`.
    pub fn revoke(&self, deadline: Duration) -> RevokeReport {
        self.export.revoke(deadline)
    }

    /// The current epoch (moves on every revoke).
    pub fn epoch(&self) -> u64 {
        self.export.epoch()
    }

    /// Number of live attachments.
    pub fn attachments(&self) -> usize {
        self.export.attachments()
    }

    pub fn is_revoked(&self) -> bool {
        self.export.is_revoked()
    }
}

impl Exporter for DmaBufMemory {
    fn name(&self) -> &str {
        self.export.name()
    }

    fn revoke(&self, deadline: Duration) -> RevokeReport {
        self.export.revoke(deadline)
    }
}

impl Drop for DmaBufMemory {
    /// Revoke before unmapping: no importer may touch the memory after this.
    fn drop(&mut self) {
        if !self.export.is_revoked() && self.export.attachments() > 0 {
            let report = self.export.revoke(crate::revoke::DROP_REVOKE_DEADLINE);
            tracing::info!(%report, "dma-buf exporter dropped: revoked first");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_errors_are_classified() {
        let e = open_error(UDMABUF_PATH, Errno::NOENT, "load it", "ask root");
        assert!(e.is_unavailable());
        assert_eq!(e.to_string(), "/dev/udmabuf not present: load it");
        let e = open_error(UDMABUF_PATH, Errno::ACCESS, "load it", "ask root");
        assert!(matches!(e, DmaBufError::PermissionDenied { errno: 13, .. }));
        assert_eq!(
            e.to_string(),
            "permission denied opening /dev/udmabuf (errno 13): ask root"
        );
        let e = open_error(DMA_HEAP_SYSTEM_PATH, Errno::IO, "x", "y");
        assert!(!e.is_unavailable());
        let s = e.to_string();
        assert!(
            s.starts_with("open on /dev/dma_heap/system failed: "),
            "{s}"
        );
        assert!(s.ends_with("(errno 5)"), "{s}");
    }

    #[test]
    fn os_errors_carry_their_hint() {
        let e = DmaBufError::os(
            "UDMABUF_CREATE",
            UDMABUF_PATH,
            Errno::INVAL,
            Some("too big"),
        );
        let s = e.to_string();
        assert!(
            s.starts_with("UDMABUF_CREATE on /dev/udmabuf failed: "),
            "{s}"
        );
        assert!(s.ends_with("(errno 22): too big"), "{s}");
    }

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(
            checked_len(0, "udmabuf"),
            Err(DmaBufError::BadSize { size: 0, .. })
        ));
        let e = checked_len(4097, "udmabuf").err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("size 0x1001 is not a valid udmabuf size: it must be a multiple of 4096 bytes")
        );
        assert_eq!(checked_len(8192, "udmabuf").ok(), Some(8192));
    }
}
