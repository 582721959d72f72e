//! One allocation of CUDA device memory and its export: a dma-buf (made lazily, kept) and the
//! device VA, under the core's revoke protocol. The memory is allocated here (`cuMemAlloc`), or
//! lent by the caller ([`CudaAlloc::lend`]: a PyTorch tensor's, a CuPy array's), who gets it
//! back — its keeper dropped — only once every importer quiesced.
//!
//! Free is revoke then release. Release gives the memory back (`cuMemFree`) only when every
//! importer quiesced: NVIDIA's exporter keeps memory alive while an importer holds its dma-buf,
//! and nothing tells that importer about a `cuMemFree`, so memory an importer may still write
//! stays allocated — leaked, with the device's context kept alive too (releasing the last
//! retain of a primary context frees all of its memory).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use dmaplane_core::sync::{lock, read, write};
use std::time::Duration;

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;
use dmaplane_core::revoke::DROP_REVOKE_DEADLINE;
use dmaplane_core::{
    Accept, AddrList, AddrSpace, AttachError, Attachment, DmaBufId, DmaRange, Export, Hints,
    Importer, Offer, RevokeReport, Route,
};

use super::GPU_PAGE;
use super::device::GpuShared;
use super::driver;
use super::ranges::RangeKey;
use crate::backend::{AllocBackend, DmaClient};
use crate::error::{GpuError, Result};

/// `CU_MEM_RANGE_FLAG_DMA_BUF_MAPPING_TYPE_PCIE`: map the dma-buf through BAR1 for PCIe peers
/// (CUDA 12.8 drivers and later; older ones refuse the flag and get flags 0).
const DMABUF_FLAG_PCIE: u64 =
    sys::CUmemRangeFlags::CU_MEM_RANGE_FLAG_DMA_BUF_MAPPING_TYPE_PCIE as u64;

/// The dma-buf behind an allocation.
#[derive(Debug)]
struct DmaBuf {
    fd: OwnedFd,
    id: DmaBufId,
    /// The driver took the PCIe mapping-type flag; otherwise why it refused it.
    pcie: std::result::Result<(), String>,
}

/// Where an allocation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Live,
    /// Given back with `cuMemFree`.
    Freed,
    /// Kept allocated for good: an importer did not quiesce.
    Leaked,
}

/// Who gives the memory back once it is released.
enum Owner {
    /// Allocated here: `cuMemFree` of what `cuMemAlloc` returned.
    Driver { base: u64 },
    /// Lent by the caller: what keeps it allocated (dropped on release; kept for good when an
    /// importer did not quiesce).
    Lender(Mutex<Option<Box<dyn std::any::Any + Send + Sync>>>),
}

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Driver { base } => write!(f, "Driver {{ base: {base:#x} }}"),
            Owner::Lender(_) => f.write_str("Lender"),
        }
    }
}

#[derive(Debug)]
pub(super) struct CudaAlloc {
    name: String,
    /// Bytes asked for (or lent): what the lists cover and reads and writes are checked against.
    len: u64,
    owner: Owner,
    /// Byte 0: the first GPU page at or after `cuMemAlloc`'s pointer, or the lent address.
    dptr: u64,
    /// What a dma-buf covers, `(start, bytes)`: `len` rounded up to whole GPU pages from
    /// `dptr`; for lent memory the host pages around it, when they stay inside its allocation
    /// (else why there can be no dma-buf).
    window: std::result::Result<(u64, u64), String>,
    export: Export,
    /// The allocation's range in the copy engine's table while live.
    range: RangeKey,
    /// Readers: accesses through the driver. Writer: release.
    phase: RwLock<Phase>,
    /// Importers that did not quiesce in some revoke of this allocation.
    unquiesced: Mutex<Vec<String>>,
    // Field order is drop order: the dma-buf closes before the context may be released.
    /// Made on the first offer: the dma-buf, or why there is none.
    dmabuf: OnceLock<std::result::Result<DmaBuf, String>>,
    gpu: Arc<GpuShared>,
}

impl CudaAlloc {
    pub(super) fn new(gpu: Arc<GpuShared>, name: &str, size: u64) -> Result<CudaAlloc> {
        let span = size
            .checked_next_multiple_of(GPU_PAGE)
            .filter(|s| *s <= isize::MAX as u64 - GPU_PAGE)
            .ok_or_else(|| {
                GpuError::invalid(
                    "size",
                    size.to_string(),
                    format!(
                        "{name} would not fit this machine's address space once padded to whole \
                     64 KiB GPU pages"
                    ),
                )
            })?;
        let bound = gpu.ctx.bind()?;
        let (base, dptr) = alloc_aligned(&gpu, name, size, span)?;
        if let Err(e) = driver::set_sync_memops(base) {
            // SAFETY: `base` was just returned by cuMemAlloc and nothing else holds it.
            let _ = unsafe { result::free_sync(base) };
            return Err(gpu.ctx.err_with(
                "cuPointerSetAttribute",
                format!("SYNC_MEMOPS on {name}"),
                e,
            ));
        }
        let Some(range) = gpu.ranges.add(dptr, size) else {
            // Unreachable in practice: the driver returned a range that wraps.
            // SAFETY: `base` was just returned by cuMemAlloc and nothing else holds it.
            let _ = unsafe { result::free_sync(base) };
            return Err(GpuError::invalid(
                "size",
                size.to_string(),
                format!("{name} at {dptr:#x} wraps around the address space"),
            ));
        };
        drop(bound);
        tracing::debug!(gpu = %gpu.label(), alloc = name, size, span, dptr = format_args!("{dptr:#x}"), "allocated");
        Ok(CudaAlloc::live(
            gpu,
            name,
            (dptr, size),
            Owner::Driver { base },
            Ok((dptr, span)),
            range,
        ))
    }

    /// A live allocation of `len` bytes at `dptr`, given back by `owner`, its dma-buf
    /// covering `window`, its range admitted to the copy engine.
    fn live(
        gpu: Arc<GpuShared>,
        name: &str,
        (dptr, len): (u64, u64),
        owner: Owner,
        window: std::result::Result<(u64, u64), String>,
        range: RangeKey,
    ) -> CudaAlloc {
        CudaAlloc {
            name: name.to_string(),
            len,
            owner,
            dptr,
            window,
            export: Export::new(name),
            range,
            phase: RwLock::new(Phase::Live),
            unquiesced: Mutex::new(Vec::new()),
            dmabuf: OnceLock::new(),
            gpu,
        }
    }

    /// `len` bytes of device memory at `dptr` that the caller allocated and keeps allocated
    /// while `keeper` lives: registered here as it is (no copy), `keeper` dropped once the
    /// memory is released after every importer quiesced. Refused unless `[dptr, dptr + len)`
    /// is device memory of this GPU inside one allocation.
    pub(super) fn lend(
        gpu: Arc<GpuShared>,
        name: &str,
        dptr: u64,
        len: u64,
        keeper: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<CudaAlloc> {
        let bound = gpu.ctx.bind()?;
        let refuse = |field: &'static str, value: String, why: String| {
            GpuError::invalid(field, value, format!("{name}: {why}"))
        };
        match driver::pointer_device(dptr) {
            Ok(Some(o)) if u32::try_from(o) == Ok(gpu.ctx.ordinal) => {}
            Ok(Some(o)) => {
                return Err(refuse(
                    "address",
                    format!("{dptr:#x}"),
                    format!("device memory of cuda:{o}, not of {}", gpu.label()),
                ));
            }
            Ok(None) => {
                return Err(refuse(
                    "address",
                    format!("{dptr:#x}"),
                    "not device memory (host or managed memory goes through the host path)".into(),
                ));
            }
            Err(e) => {
                return Err(refuse(
                    "address",
                    format!("{dptr:#x}"),
                    format!("the driver does not know it: {}", driver::describe(e)),
                ));
            }
        }
        let (abase, asize) = driver::address_range(dptr).map_err(|e| {
            gpu.ctx
                .err_with("cuMemGetAddressRange", name.to_string(), e)
        })?;
        let aend = abase.saturating_add(asize as u64);
        match dptr.checked_add(len) {
            Some(end) if len > 0 && end <= aend => {}
            _ => {
                return Err(refuse(
                    "len",
                    len.to_string(),
                    format!(
                        "[{dptr:#x}, +{len:#x}) must be inside its allocation                          [{abase:#x}, {aend:#x})"
                    ),
                ));
            }
        }
        driver::set_sync_memops(dptr).map_err(|e| {
            gpu.ctx
                .err_with("cuPointerSetAttribute", format!("SYNC_MEMOPS on {name}"), e)
        })?;
        let range = gpu.ranges.add(dptr, len).ok_or_else(|| {
            refuse(
                "len",
                len.to_string(),
                "wraps around the address space".into(),
            )
        })?;
        // The dma-buf covers whole host pages, which must stay inside the allocation.
        let page = rustix::param::page_size() as u64;
        let start = dptr - dptr % page;
        let end = (dptr + len).next_multiple_of(page);
        let window = if start >= abase && end <= aend {
            Ok((start, end - start))
        } else {
            Err(format!(
                "its host pages [{start:#x}, {end:#x}) leave its allocation                  [{abase:#x}, {aend:#x}): NICs take it by device VA or through host memory"
            ))
        };
        drop(bound);
        tracing::debug!(gpu = %gpu.label(), alloc = name, len, dptr = format_args!("{dptr:#x}"), "lent");
        Ok(CudaAlloc::live(
            gpu,
            name,
            (dptr, len),
            Owner::Lender(Mutex::new(Some(keeper))),
            window,
            range,
        ))
    }

    /// Bytes the dma-buf covers (0 without one).
    fn span(&self) -> u64 {
        self.window.as_ref().map_or(0, |w| w.1)
    }

    fn phase(&self) -> std::sync::RwLockReadGuard<'_, Phase> {
        read(&self.phase)
    }

    fn freed(&self) -> GpuError {
        GpuError::Freed {
            gpu: self.gpu.label().to_string(),
            alloc: self.name.clone(),
        }
    }

    /// The dma-buf, made on first use.
    fn dmabuf(&self) -> std::result::Result<&DmaBuf, &str> {
        self.dmabuf
            .get_or_init(|| self.export_dmabuf())
            .as_ref()
            .map_err(|s| s.as_str())
    }

    /// `cuMemGetHandleForAddressRange` over the allocation's GPU pages: with the PCIe
    /// mapping-type flag first (a NIC reaches the memory through BAR1 even where the platform
    /// would map it otherwise, as over C2C), then with flags 0 for drivers that do not know it.
    fn export_dmabuf(&self) -> std::result::Result<DmaBuf, String> {
        self.gpu
            .dmabuf_supported()
            .map_err(|why| format!("{} does not export dma-bufs: {why}", self.gpu.label()))?;
        // Held until the dma-buf exists: release cannot free the memory under the export.
        let phase = self.phase();
        if *phase != Phase::Live {
            return Err("the allocation is freed".into());
        }
        let (start, span) = self.window.clone()?;
        let _bound = self.gpu.ctx.bind().map_err(|e| e.to_string())?;
        let span = usize::try_from(span).map_err(|e| e.to_string())?;
        let failed = |e: DriverError| {
            format!(
                "cuMemGetHandleForAddressRange failed: {}",
                driver::describe(e)
            )
        };
        let (fd, pcie) = match driver::dmabuf_fd(start, span, DMABUF_FLAG_PCIE) {
            Ok(fd) => (fd, Ok(())),
            Err(e) => {
                let refused = failed(e);
                let fd = driver::dmabuf_fd(start, span, 0)
                    .map_err(|e| format!("{}; with the PCIe mapping flag: {refused}", failed(e)))?;
                (fd, Err(refused))
            }
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| format!("fstat of the dma-buf: {e}"))?;
        let id = DmaBufId {
            dev: st.st_dev,
            ino: st.st_ino,
        };
        self.gpu
            .bar1_mapped
            .fetch_add(self.span(), Ordering::Relaxed);
        tracing::debug!(gpu = %self.gpu.label(), alloc = %self.name, fd = fd.as_raw_fd(), dev = id.dev, ino = id.ino, pcie = pcie.is_ok(), "dma-buf exported");
        drop(phase);
        Ok(DmaBuf { fd, id, pcie })
    }

    fn dmabuf_offer(&self, id: DmaBufId) -> Offer {
        Offer {
            space: AddrSpace::DmaBuf { id },
            hints: Hints::device_bar(Route::BusAddr),
        }
    }

    fn device_va_offer(&self) -> Offer {
        Offer {
            space: AddrSpace::DeviceVa {
                device: self.gpu.ctx.ordinal,
            },
            hints: Hints::device_bar(Route::BusAddr),
        }
    }

    /// The list for a negotiated offer: offsets `[0, len)` of the dma-buf, or the device VAs.
    fn list(&self, offer: &Offer) -> std::result::Result<AddrList, AttachError> {
        let start = match offer.space {
            AddrSpace::DmaBuf { id } if self.dmabuf().is_ok_and(|d| d.id == id) => {
                self.dptr - self.window.as_ref().map_or(self.dptr, |w| w.0)
            }
            AddrSpace::DeviceVa { device } if device == self.gpu.ctx.ordinal => self.dptr,
            other => {
                return Err(AttachError::Exporter {
                    export: self.name.clone(),
                    what: format!("{other} is not offered by this CUDA allocation"),
                });
            }
        };
        AddrList::single(
            offer.space,
            offer.hints,
            super::granule(start, self.len),
            DmaRange::new(start, self.len),
        )
        .map_err(|e| AttachError::Exporter {
            export: self.name.clone(),
            what: e.to_string(),
        })
    }

    /// Bounds of a host access, as a length the driver takes.
    fn check(&self, offset: u64, len: usize) -> Result<u64> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(self.dptr + offset),
            _ => Err(GpuError::invalid(
                "offset",
                format!("{offset:#x}+{len:#x}"),
                format!("past the end of {} ({:#x} bytes)", self.name, self.len),
            )),
        }
    }
}

/// `cuMemAlloc` of `span` bytes starting on a GPU page: the driver's pointer when it is aligned
/// (allocations of whole pages usually are), else a second allocation one page larger, aligned
/// inside. Returns `(base, aligned)`.
fn alloc_aligned(gpu: &GpuShared, name: &str, size: u64, span: u64) -> Result<(u64, u64)> {
    let fail = |bytes: u64, e: DriverError| -> GpuError {
        if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY
            && let Ok((free, total)) = result::mem_get_info()
        {
            return GpuError::OutOfMemory {
                gpu: gpu.label().to_string(),
                requested: size,
                used: total.saturating_sub(free) as u64,
                total: total as u64,
            };
        }
        gpu.ctx.err_with(
            "cuMemAlloc",
            format!("allocating {name} ({size} bytes, {bytes} with padding)"),
            e,
        )
    };
    // `span` (and one more page) fit in isize, checked by the caller.
    // SAFETY: a fresh device allocation in the current context; it is only touched through the
    // driver, and freed once (by the caller, or below).
    let base = unsafe { result::malloc_sync(span as usize) }.map_err(|e| fail(span, e))?;
    if base.is_multiple_of(GPU_PAGE) {
        return Ok((base, base));
    }
    // SAFETY: `base` was just returned by cuMemAlloc and nothing else holds it.
    if let Err(e) = unsafe { result::free_sync(base) } {
        tracing::warn!(gpu = %gpu.label(), error = %driver::describe(e), "cuMemFree of a misaligned allocation failed");
    }
    let padded = span + GPU_PAGE;
    // SAFETY: as above.
    let base = unsafe { result::malloc_sync(padded as usize) }.map_err(|e| fail(padded, e))?;
    Ok((base, base.next_multiple_of(GPU_PAGE)))
}

impl AllocBackend for CudaAlloc {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn copy_addr(&self) -> u64 {
        self.dptr
    }

    fn offers(&self, peer: DmaClient) -> Vec<Offer> {
        if peer != DmaClient::External || *self.phase() != Phase::Live {
            // Nothing on the simulated fabric can reach real device memory.
            return Vec::new();
        }
        match self.dmabuf() {
            Ok(d) => vec![self.dmabuf_offer(d.id), self.device_va_offer()],
            Err(_) => vec![self.device_va_offer()],
        }
    }

    fn attach(
        &self,
        importer: Arc<dyn Importer>,
        peer: DmaClient,
        accepts: &[Accept],
    ) -> Result<Attachment> {
        if let DmaClient::Fabric(dev) = peer {
            return Err(GpuError::Unsupported {
                op: "export to a device on the simulated fabric",
                backend: "cuda".into(),
                why: format!(
                    "{} is device memory of {}; fabric device {dev} cannot reach it",
                    self.name,
                    self.gpu.label()
                ),
            });
        }
        if *self.phase() != Phase::Live {
            return Err(self.freed());
        }
        let offers = self.offers(peer);
        self.export
            .attach(importer, &offers, accepts, |n| {
                Ok((self.list(&n.offer)?, None))
            })
            .map_err(GpuError::Attach)
    }

    fn dmabuf_fd(&self) -> Option<BorrowedFd<'_>> {
        if *self.phase() != Phase::Live {
            return None;
        }
        self.dmabuf().ok().map(|d| d.fd.as_fd())
    }

    fn export_note(&self) -> String {
        match *self.phase() {
            Phase::Freed => return "freed".into(),
            Phase::Leaked => {
                return "leaked: an importer did not quiesce, so the memory stays allocated".into();
            }
            Phase::Live => {}
        }
        let peer_memory = format!(
            "peer-memory style device VA {:#x}+{:#x} on {} (what nvidia-peermem resolves)",
            self.dptr,
            self.len,
            self.gpu.label()
        );
        match self.dmabuf() {
            Ok(d) => {
                let mapping = match &d.pcie {
                    Ok(()) => "PCIe mapping through BAR1".to_string(),
                    Err(why) => {
                        format!("default mapping; the PCIe mapping flag was refused: {why}")
                    }
                };
                format!(
                    "dma-buf fd {} ({mapping}) for kernel importers, then {peer_memory}",
                    d.fd.as_raw_fd()
                )
            }
            Err(why) => format!("{peer_memory}: no dma-buf: {why}"),
        }
    }

    fn epoch(&self) -> u64 {
        self.export.epoch()
    }

    fn revoke(&self, deadline: Duration) -> RevokeReport {
        let report = self.export.revoke(deadline);
        let late = report.timed_out();
        if !late.is_empty() {
            // Sticky: a later revoke reports "already revoked" with nobody late, and must not
            // make the memory look safe to free.
            let mut all = lock(&self.unquiesced);
            all.extend(late.into_iter().map(str::to_string));
        }
        report
    }

    fn release(&self, report: &RevokeReport) -> Result<bool> {
        let mut phase = write(&self.phase);
        match *phase {
            Phase::Freed => return Ok(true),
            Phase::Leaked => return Ok(false),
            Phase::Live => {}
        }
        if !self.export.is_revoked() {
            return Err(GpuError::invalid(
                "report",
                report.to_string(),
                format!(
                    "{} is not revoked: release is the second half of free, after the revoke",
                    self.name
                ),
            ));
        }
        // No copy may start on the allocation from here on (and none is under way once this
        // returns).
        self.gpu.ranges.remove(self.range);
        let mut late: Vec<String> = lock(&self.unquiesced).clone();
        for name in report.timed_out() {
            if !late.iter().any(|l| l == name) {
                late.push(name.to_string());
            }
        }
        if !late.is_empty() {
            tracing::error!(
                gpu = %self.gpu.label(),
                alloc = %self.name,
                importers = %late.join(", "),
                bytes = self.len,
                "importers did not quiesce: the memory stays allocated (leaked) so that they can \
                 never write into a reuse"
            );
            *phase = Phase::Leaked;
            if let Owner::Lender(k) = &self.owner {
                // The lender's memory stays allocated for good too.
                std::mem::forget(lock(k).take());
            }
            // Releasing the last retain of the primary context would free every allocation in
            // it, this one included: keep the context for the life of the process.
            std::mem::forget(self.gpu.clone());
            return Ok(false);
        }
        let _bound = self.gpu.ctx.bind()?;
        *phase = Phase::Freed;
        if self.dmabuf.get().is_some_and(|d| d.is_ok()) {
            self.gpu
                .bar1_mapped
                .fetch_sub(self.span(), Ordering::Relaxed);
        }
        let base = match &self.owner {
            Owner::Driver { base } => *base,
            Owner::Lender(k) => {
                // Given back: nothing of this allocation executes or can start any more.
                drop(lock(k).take());
                tracing::debug!(gpu = %self.gpu.label(), alloc = %self.name, %report, "given back to its lender");
                return Ok(true);
            }
        };
        // SAFETY: `base` came from cuMemAlloc and is freed once (the phase moved off Live under
        // the write lock); host accesses hold the read lock and copies left with the range, and
        // every importer quiesced. The dma-buf fd, if any, stays open until this value drops
        // (a `BorrowedFd` handed out may outlive this call); the driver keeps the pages until then.
        unsafe { result::free_sync(base) }.map_err(|e| {
            self.gpu
                .ctx
                .err_with("cuMemFree", format!("freeing {}", self.name), e)
        })?;
        tracing::debug!(gpu = %self.gpu.label(), alloc = %self.name, %report, "freed");
        Ok(true)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let dst = self.check(offset, data.len())?;
        let phase = self.phase();
        if *phase != Phase::Live {
            return Err(self.freed());
        }
        if data.is_empty() {
            return Ok(());
        }
        let _bound = self.gpu.ctx.bind()?;
        // SAFETY: `[dst, dst + data.len())` lies in this live allocation (bounds checked, and the
        // read lock keeps release out until the copy has finished); `data` is a valid slice.
        unsafe { result::memcpy_htod_sync(dst, data) }
            .and_then(|()| driver::sync())
            .map_err(|e| {
                self.gpu
                    .ctx
                    .err_with("cuMemcpyHtoD", format!("{}+{offset:#x}", self.name), e)
            })
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let src = self.check(offset, buf.len())?;
        let phase = self.phase();
        if *phase != Phase::Live {
            return Err(self.freed());
        }
        if buf.is_empty() {
            return Ok(());
        }
        let _bound = self.gpu.ctx.bind()?;
        // SAFETY: as in `write`; `buf` is a unique borrow the driver fills.
        unsafe { result::memcpy_dtoh_sync(buf, src) }.map_err(|e| {
            self.gpu
                .ctx
                .err_with("cuMemcpyDtoH", format!("{}+{offset:#x}", self.name), e)
        })
    }
}

impl Drop for CudaAlloc {
    fn drop(&mut self) {
        if *self.phase() == Phase::Live {
            // Dropped without free: revoke first, like every exporter.
            let report = AllocBackend::revoke(self, DROP_REVOKE_DEADLINE);
            if let Err(e) = self.release(&report) {
                tracing::error!(alloc = %self.name, error = %e, "release on drop failed");
            }
        }
    }
}
