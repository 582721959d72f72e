//! Host memory exporter: a memfd-backed arena in a fabric window.
//!
//! Offers, best first: the arena's fabric bus address (`CpuPhys`, plain DMA) and its address in
//! this process (`ProcessVa`, for `ibv_reg_mr`-style importers).

use std::sync::Arc;
use std::time::Duration;

use crate::addr::AddrSpace;
use crate::hints::Hints;
use crate::negotiate::{Accept, Offer};
use crate::revoke::{AttachError, Attachment, Exporter, Importer, RevokeReport};

use super::export::WindowExport;
use super::{DeviceId, Fabric, FabricError, WindowHandle};

#[derive(Debug)]
pub struct HostMemory {
    inner: WindowExport,
}

impl HostMemory {
    /// `size` bytes of host memory owned by `owner` (a host-memory device of the fabric).
    pub fn new(
        fabric: &Fabric,
        owner: DeviceId,
        name: &str,
        size: u64,
    ) -> Result<HostMemory, FabricError> {
        Ok(HostMemory {
            inner: WindowExport::new(fabric, owner, name, size, true)?,
        })
    }

    pub fn window(&self) -> WindowHandle {
        self.inner.window()
    }

    pub fn len(&self) -> u64 {
        self.window().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The CPU's view: write bytes at `offset`. False when out of bounds or revoked.
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        self.inner.fabric.cpu_write(&self.window(), offset, data)
    }

    /// The CPU's view: read bytes at `offset`. False when out of bounds or revoked.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.inner.fabric.cpu_read(&self.window(), offset, buf)
    }

    pub fn offers(&self) -> Vec<Offer> {
        vec![
            Offer {
                space: AddrSpace::CpuPhys,
                hints: Hints::HOST_MEMORY,
            },
            Offer {
                space: AddrSpace::ProcessVa,
                hints: Hints::HOST_MEMORY,
            },
        ]
    }

    /// Negotiate with an importer whose DMA comes from `device`, grant it access, attach it.
    pub fn attach(
        &self,
        importer: Arc<dyn Importer>,
        device: DeviceId,
        accepts: &[Accept],
    ) -> Result<Attachment, AttachError> {
        self.inner.attach(importer, device, &self.offers(), accepts)
    }

    /// Move the arena to new memory (new bus address): dynamic importers map again, pinned die.
    pub fn relocate(&self, deadline: Duration) -> Result<RevokeReport, AttachError> {
        self.inner.relocate(deadline)
    }

    pub fn epoch(&self) -> u64 {
        self.inner.export.epoch()
    }
}

impl Exporter for HostMemory {
    fn name(&self) -> &str {
        self.inner.export.name()
    }

    fn revoke(&self, deadline: Duration) -> RevokeReport {
        self.inner.revoke(deadline)
    }
}
