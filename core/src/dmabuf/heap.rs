//! [`DmaHeapBuf`]: a buffer from the system dma-heap, `/dev/dma_heap/system`.

use std::ops::Deref;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{
    DMA_HEAP_DIR, DMA_HEAP_SYSTEM_PATH, DmaBufError, DmaBufKind, DmaBufMemory, checked_len, ioctl,
    open_device,
};
use crate::revoke::{Exporter, RevokeReport};

const NO_HEAPS: &str = "the kernel lacks CONFIG_DMABUF_HEAPS (dma-heaps need Linux 5.6 or \
     later); in a container, pass /dev/dma_heap through";
const NO_SYSTEM_HEAP: &str = "the kernel lacks CONFIG_DMABUF_HEAPS_SYSTEM (there is a \
     /dev/dma_heap, but no system heap in it)";
const PERMISSION: &str = "allocating from a dma-heap needs access to its device node: run as \
     root or give this user access (a udev rule, or membership of the group that owns it)";

/// Host memory from the system dma-heap (`DMA_HEAP_IOCTL_ALLOC`, fd flags `O_RDWR|O_CLOEXEC`),
/// mapped shared read-write. Derefs to [`DmaBufMemory`] for everything else.
#[derive(Debug)]
pub struct DmaHeapBuf {
    mem: DmaBufMemory,
}

fn not_present_hint() -> &'static str {
    if Path::new(DMA_HEAP_DIR).is_dir() {
        NO_SYSTEM_HEAP
    } else {
        NO_HEAPS
    }
}

fn open_heap() -> Result<std::os::fd::OwnedFd, DmaBufError> {
    open_device(DMA_HEAP_SYSTEM_PATH, false, not_present_hint(), PERMISSION)
}

impl DmaHeapBuf {
    /// `size` bytes (a non-zero multiple of 4096) from the system heap, named
    /// `dma-heap-system-<n>` in revoke reports.
    pub fn new(size: u64) -> Result<DmaHeapBuf, DmaBufError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        DmaHeapBuf::with_name(&format!("dma-heap-system-{n}"), size)
    }

    /// As [`new`](Self::new), with the export's name.
    pub fn with_name(name: &str, size: u64) -> Result<DmaHeapBuf, DmaBufError> {
        let len = checked_len(size, "dma-heap buffer")?;
        let heap = open_heap()?;
        let fd = ioctl::dma_heap_alloc(heap.as_fd(), size)
            .map_err(|e| DmaBufError::os("DMA_HEAP_IOCTL_ALLOC", DMA_HEAP_SYSTEM_PATH, e, None))?;
        let mem = DmaBufMemory::from_fd(name, DmaBufKind::SystemHeap, fd, len)?;
        Ok(DmaHeapBuf { mem })
    }

    /// Cheap availability check: `Ok` when `/dev/dma_heap/system` can be opened, else why not.
    pub fn probe() -> Result<(), DmaBufError> {
        open_heap().map(drop)
    }

    /// The common dma-buf type, e.g. to keep heap and udmabuf buffers together.
    pub fn into_memory(self) -> DmaBufMemory {
        self.mem
    }
}

impl Deref for DmaHeapBuf {
    type Target = DmaBufMemory;
    fn deref(&self) -> &DmaBufMemory {
        &self.mem
    }
}

impl AsRef<DmaBufMemory> for DmaHeapBuf {
    fn as_ref(&self) -> &DmaBufMemory {
        &self.mem
    }
}

impl Exporter for DmaHeapBuf {
    fn name(&self) -> &str {
        self.mem.name()
    }

    fn revoke(&self, deadline: Duration) -> RevokeReport {
        self.mem.revoke(deadline)
    }
}
