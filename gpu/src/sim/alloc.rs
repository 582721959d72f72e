//! One allocation of simulated device memory: a window on the fabric exported as a device BAR
//! (offers by route, grants, the revoke protocol), plus the GPU's own grant for its copy engine.

use std::sync::{Arc, Mutex};

use dmaplane_core::sync::lock;
use std::time::Duration;

use dmaplane_core::fabric::{DeviceBar, Grant};
use dmaplane_core::revoke::AccessGrant;
use dmaplane_core::{Accept, Access, Attachment, Exporter, Importer, Offer, RevokeReport};

use super::SimGpuInner;
use crate::backend::{AllocBackend, DmaClient};
use crate::error::{GpuError, Result};

#[derive(Debug)]
pub(super) struct SimAlloc {
    gpu: Arc<SimGpuInner>,
    id: u64,
    name: String,
    len: u64,
    bar: DeviceBar,
    /// The copy engine's access to its own memory; `None` once released.
    own: Mutex<Option<Grant>>,
}

impl SimAlloc {
    pub(super) fn new(gpu: Arc<SimGpuInner>, id: u64, name: &str, len: u64) -> Result<SimAlloc> {
        let bar = DeviceBar::new(&gpu.fabric, gpu.dev, name, len)
            .map_err(|e| GpuError::invalid("size", len.to_string(), e.to_string()))?;
        // Device memory is resident from the allocation on: fault the pages in now, not under
        // the first DMA.
        bar.window().memory().fill(0);
        let own = gpu.fabric.grant(&bar.window(), gpu.dev, Access::READ_WRITE);
        Ok(SimAlloc {
            gpu,
            id,
            name: name.to_string(),
            len,
            bar,
            own: Mutex::new(Some(own)),
        })
    }

    fn freed(&self) -> GpuError {
        GpuError::Freed {
            gpu: self.gpu.name.clone(),
            alloc: self.name.clone(),
        }
    }

    fn live(&self) -> bool {
        lock(&self.own).is_some()
    }
}

impl AllocBackend for SimAlloc {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn copy_addr(&self) -> u64 {
        self.bar.window().base()
    }

    fn offers(&self, peer: DmaClient) -> Vec<Offer> {
        match peer {
            DmaClient::Fabric(dev) => self.bar.offers(dev),
            // Nothing outside the fabric can reach simulated memory.
            DmaClient::External => Vec::new(),
        }
    }

    fn attach(
        &self,
        importer: Arc<dyn Importer>,
        peer: DmaClient,
        accepts: &[Accept],
    ) -> Result<Attachment> {
        let DmaClient::Fabric(dev) = peer else {
            return Err(GpuError::Unsupported {
                op: "export to a device outside the fabric",
                backend: "sim".into(),
                why: format!("{} lives on the simulated fabric", self.name),
            });
        };
        if !self.live() {
            return Err(self.freed());
        }
        // A peer needs the allocation behind BAR1; the GPU itself reaches it directly.
        let mapped_now = dev != self.gpu.dev && self.gpu.map_bar1(self.id, &self.name, self.len)?;
        self.bar.attach(importer, dev, accepts).map_err(|e| {
            if mapped_now {
                self.gpu.unmap_bar1(self.id);
            }
            GpuError::Attach(e)
        })
    }

    fn export_note(&self) -> String {
        "fabric window behind BAR1: PCI bus addresses below a common switch, CPU physical \
         addresses through an allow-listed host bridge, no P2P offer a peer can take otherwise"
            .into()
    }

    fn fabric_window(&self) -> Option<dmaplane_core::fabric::WindowHandle> {
        Some(self.bar.window())
    }

    fn epoch(&self) -> u64 {
        self.bar.epoch()
    }

    fn revoke(&self, deadline: Duration) -> RevokeReport {
        self.bar.revoke(deadline)
    }

    fn release(&self, _report: &RevokeReport) -> Result<bool> {
        // Importers that did not answer were fenced off by the revoke (their grants are gone),
        // so the memory can always go back.
        if let Some(own) = lock(&self.own).take() {
            own.revoke();
            self.gpu.unmap_bar1(self.id);
            let mut st = self.gpu.state();
            st.used = st.used.saturating_sub(self.len);
        }
        Ok(true)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        if !self.live() || !self.bar.write(offset, data) {
            return Err(self.freed());
        }
        Ok(())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if !self.live() || !self.bar.read(offset, buf) {
            return Err(self.freed());
        }
        Ok(())
    }
}

impl Drop for SimAlloc {
    fn drop(&mut self) {
        if self.live() {
            // Dropped without free: revoke first, like every exporter.
            let report = self.bar.revoke(dmaplane_core::revoke::DROP_REVOKE_DEADLINE);
            let _ = self.release(&report);
        }
    }
}
