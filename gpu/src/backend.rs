//! The traits every GPU backend implements, and the plain facts a device reports. The safe API in
//! [`crate::device`] is written once over these; the revoke protocol is the core's.

use std::fmt;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use dmaplane_core::fabric::{DeviceId, WindowHandle};
use dmaplane_core::{Accept, AddrList, Attachment, Importer, Offer, RevokeReport};
use serde::Serialize;

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// Device memory behind a BAR on the simulated fabric.
    Sim,
    /// A real GPU through the CUDA driver API.
    Cuda,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Sim => "sim",
            BackendKind::Cuda => "cuda",
        })
    }
}

/// Whether the device can export its memory as a dma-buf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "support", rename_all = "kebab-case")]
pub enum DmaBufSupport {
    Supported,
    Unsupported { why: String },
}

/// What a GPU reports about itself.
#[derive(Debug, Clone, Serialize)]
pub struct GpuInfo {
    pub name: String,
    pub backend: BackendKind,
    /// Model or fabric description.
    pub description: String,
    /// PCI address, where known.
    pub pci: Option<String>,
    pub memory_bytes: u64,
    /// Size of the BAR1 aperture through which peers reach device memory, where known.
    pub bar1_bytes: Option<u64>,
    /// Bytes of BAR1 mapped for peer-visible allocations now (where the backend tracks it).
    pub bar1_mapped: u64,
    pub dmabuf: DmaBufSupport,
}

/// The BAR that maps device memory for peers (NVIDIA's BAR1), on every backend.
pub const BAR1_INDEX: u8 = 1;

/// The device that will DMA to or from an allocation (the kernel P2P code's "client"): what its
/// offers are computed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaClient {
    /// A device on the simulated fabric: the route comes from the topology.
    Fabric(DeviceId),
    /// A real device the backend cannot place (a verbs NIC): it gets the portable offers
    /// (dma-buf first), and the kernel's exporter decides the route.
    External,
}

/// One GPU.
pub trait GpuBackend: Send + Sync + fmt::Debug {
    fn info(&self) -> GpuInfo;
    /// What the copy engine can DMA to and from, best first.
    fn accepts(&self) -> Vec<Accept>;
    fn alloc(&self, name: &str, size: u64) -> Result<Arc<dyn AllocBackend>>;
    /// Device memory at `addr` that the caller allocated, lent while `keeper` lives (see
    /// [`Gpu::lend`](crate::Gpu::lend)). Backends that cannot take memory they did not
    /// allocate refuse.
    fn lend(
        &self,
        name: &str,
        addr: u64,
        len: u64,
        keeper: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<Arc<dyn AllocBackend>> {
        drop(keeper);
        Err(crate::GpuError::Unsupported {
            op: "lending device memory allocated elsewhere",
            backend: self.info().backend.to_string(),
            why: format!(
                "{name} at {addr:#x}+{len:#x}: this backend allocates its own memory only"
            ),
        })
    }
    /// Make a negotiated peer list reachable by the copy engine (the sim checks the address
    /// space; CUDA registers host memory with `cuMemHostRegister`). Undone on drop.
    fn register(&self, name: &str, list: &AddrList) -> Result<Box<dyn CopyRegistration>>;
    /// Copy `len` bytes between two addresses of the copy engine's address space.
    fn copy(&self, src: u64, dst: u64, len: u64) -> Result<()>;
    /// The GPU's device on the simulated fabric.
    fn fabric_device(&self) -> Option<DeviceId> {
        None
    }
}

/// One allocation of device memory and its export.
pub trait AllocBackend: Send + Sync + fmt::Debug {
    fn name(&self) -> &str;
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Where the copy engine finds byte 0.
    fn copy_addr(&self) -> u64;
    /// What the allocation offers `peer`, best first.
    fn offers(&self, peer: DmaClient) -> Vec<Offer>;
    /// Attach an importer; a peer's first attachment makes the allocation peer-visible.
    fn attach(
        &self,
        importer: Arc<dyn Importer>,
        peer: DmaClient,
        accepts: &[Accept],
    ) -> Result<Attachment>;
    /// The dma-buf behind a `DmaBuf` offer, for importers that register by fd.
    fn dmabuf_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// How the allocation is exported and why (dma-buf, peer-memory style, a BAR window).
    fn export_note(&self) -> String;
    fn epoch(&self) -> u64;
    /// The simulated memory's fabric window.
    fn fabric_window(&self) -> Option<WindowHandle> {
        None
    }
    /// The first half of free: every importer quiesces (or is fenced off where the backend can).
    fn revoke(&self, deadline: Duration) -> RevokeReport;
    /// The second half: give the memory back. Returns false where it must stay allocated
    /// because an importer that did not quiesce cannot be fenced off.
    fn release(&self, report: &RevokeReport) -> Result<bool>;
    /// The host's view (the owner's CPU access or a driver copy).
    fn write(&self, offset: u64, data: &[u8]) -> Result<()>;
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// A peer list made reachable by the copy engine.
pub trait CopyRegistration: Send + Sync + fmt::Debug {
    /// The copy-engine address of `addr` in the list's space.
    fn translate(&self, addr: u64) -> u64;
}
