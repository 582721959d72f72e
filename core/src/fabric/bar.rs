//! A generic device BAR exporter: device memory behind a BAR in a fabric window.
//!
//! What it offers depends on the PCIe route to the importer, as the kernel's p2pdma decides:
//! itself → its own device addresses; a common switch → PCI bus addresses; across root ports of
//! an allow-listed host bridge → CPU physical addresses; otherwise an offer marked
//! `not-supported`, which every P2P importer refuses with that reason (the caller bounces).

use std::sync::Arc;
use std::time::Duration;

use crate::addr::AddrSpace;
use crate::hints::{Hints, Route};
use crate::negotiate::{Accept, Offer};
use crate::revoke::{AttachError, Attachment, Exporter, Importer, RevokeReport};

use super::export::WindowExport;
use super::{DeviceId, Fabric, FabricError, WindowHandle};

#[derive(Debug)]
pub struct DeviceBar {
    inner: WindowExport,
}

impl DeviceBar {
    /// A BAR of `size` bytes on `owner`.
    pub fn new(
        fabric: &Fabric,
        owner: DeviceId,
        name: &str,
        size: u64,
    ) -> Result<DeviceBar, FabricError> {
        Ok(DeviceBar {
            inner: WindowExport::new(fabric, owner, name, size, false)?,
        })
    }

    pub fn window(&self) -> WindowHandle {
        self.inner.window()
    }

    pub fn owner(&self) -> DeviceId {
        self.inner.owner
    }

    /// The device's own view of its memory (no grants needed: it is the owner).
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        self.inner.fabric.cpu_write(&self.window(), offset, data)
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.inner.fabric.cpu_read(&self.window(), offset, buf)
    }

    /// Offers for an importer on `device`, best first.
    pub fn offers(&self, device: DeviceId) -> Vec<Offer> {
        let owner = self.inner.owner;
        if device == owner {
            return vec![Offer {
                space: AddrSpace::DeviceVa { device: owner.0 },
                hints: Hints::device_bar(Route::Local),
            }];
        }
        let route = self.inner.fabric.route(owner, device);
        let space = match route {
            Route::BusAddr => AddrSpace::PciBus {
                root: owner.0,
                bus_offset: 0,
            },
            Route::Local | Route::ThruHostBridge | Route::NotSupported => AddrSpace::CpuPhys,
        };
        vec![Offer {
            space,
            hints: Hints::device_bar(route),
        }]
    }

    pub fn attach(
        &self,
        importer: Arc<dyn Importer>,
        device: DeviceId,
        accepts: &[Accept],
    ) -> Result<Attachment, AttachError> {
        self.inner
            .attach(importer, device, &self.offers(device), accepts)
    }

    pub fn relocate(&self, deadline: Duration) -> Result<RevokeReport, AttachError> {
        self.inner.relocate(deadline)
    }

    pub fn epoch(&self) -> u64 {
        self.inner.export.epoch()
    }
}

impl Exporter for DeviceBar {
    fn name(&self) -> &str {
        self.inner.export.name()
    }

    fn revoke(&self, deadline: Duration) -> RevokeReport {
        self.inner.revoke(deadline)
    }
}
