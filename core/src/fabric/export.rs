//! What every fabric exporter shares: memory in a window, the [`Export`] that runs the revoke
//! protocol over it, and the grants that let importers' devices reach the window.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::addr::{AddrList, AddrSpace, DmaRange};
use crate::negotiate::{Accept, Offer};
use crate::revoke::{
    AccessGrant, AttachError, Attachment, AttachmentId, Export, Importer, RevokeReport,
};
use crate::sync::{Mutex, lock};

use super::{DeviceId, Fabric, FabricError, WindowHandle};

/// Granule of every fabric list: one 4 KiB page.
pub const FABRIC_GRANULE: u64 = 4096;

#[derive(Debug)]
pub(crate) struct WindowExport {
    pub(crate) export: Export,
    pub(crate) fabric: Fabric,
    pub(crate) owner: DeviceId,
    host: bool,
    window: Mutex<WindowHandle>,
    /// Which device each attachment's grant is for, to re-grant after a move.
    devices: Mutex<HashMap<AttachmentId, DeviceId>>,
    /// Held by a relocate from start to end and by an attach from its list to its record in
    /// `devices`: a move can neither change the window under an attach's list and grant nor
    /// find an attachment whose device is not recorded yet.
    moving: Mutex<()>,
}

impl WindowExport {
    pub(crate) fn new(
        fabric: &Fabric,
        owner: DeviceId,
        name: &str,
        size: u64,
        host: bool,
    ) -> Result<WindowExport, FabricError> {
        let window = fabric.map_new(owner, size, host)?;
        Ok(WindowExport {
            export: Export::new(name),
            fabric: fabric.clone(),
            owner,
            host,
            window: Mutex::new(window),
            devices: Mutex::new(HashMap::new()),
            moving: Mutex::new(()),
        })
    }

    /// A window over `mem` (a caller's buffer) instead of fresh memory.
    pub(crate) fn over(
        fabric: &Fabric,
        owner: DeviceId,
        name: &str,
        mem: super::Memory,
    ) -> Result<WindowExport, FabricError> {
        let window = fabric.map(owner, mem)?;
        Ok(WindowExport {
            export: Export::new(name),
            fabric: fabric.clone(),
            owner,
            host: true,
            window: Mutex::new(window),
            devices: Mutex::new(HashMap::new()),
            moving: Mutex::new(()),
        })
    }

    pub(crate) fn window(&self) -> WindowHandle {
        lock(&self.window).clone()
    }

    /// The memory back, after everything this export gave out is revoked (by the drop, when
    /// the caller did not) and its window unmapped. `Err(n)`: `n` other holders still reached
    /// it at `deadline`.
    pub(crate) fn into_memory(self, deadline: Duration) -> Result<super::Memory, usize> {
        let w = self.window();
        drop(self);
        w.into_memory(deadline)
    }

    /// The list for `offer`'s space over window `w`.
    fn list(&self, w: &WindowHandle, offer: &Offer) -> Result<AddrList, AttachError> {
        let start = match offer.space {
            AddrSpace::CpuPhys | AddrSpace::PciBus { .. } | AddrSpace::Iova { .. } => w.base(),
            AddrSpace::ProcessVa => w.memory().process_va(),
            AddrSpace::DeviceVa { .. } | AddrSpace::DmaBuf { .. } => 0,
        };
        AddrList::single(
            offer.space,
            offer.hints,
            FABRIC_GRANULE,
            DmaRange::new(start, w.len()),
        )
        .map_err(|e| AttachError::Exporter {
            export: self.export.name().to_string(),
            what: e.to_string(),
        })
    }

    pub(crate) fn attach(
        &self,
        importer: Arc<dyn Importer>,
        device: DeviceId,
        offers: &[Offer],
        accepts: &[Accept],
    ) -> Result<Attachment, AttachError> {
        let _moving = lock(&self.moving);
        let window = self.window();
        let att = self.export.attach(importer, offers, accepts, |n| {
            let list = self.list(&window, &n.offer)?;
            let access = n.offer.hints.access & accepts[n.accept_index].access;
            let grant: Box<dyn AccessGrant> = Box::new(self.fabric.grant(&window, device, access));
            Ok((list, Some(grant)))
        })?;
        lock(&self.devices).insert(att.id(), device);
        Ok(att)
    }

    pub(crate) fn revoke(&self, deadline: Duration) -> RevokeReport {
        let report = self.observed(|| self.export.revoke(deadline));
        lock(&self.devices).clear();
        report
    }

    /// Run one revoke or move of the current window with its start and its ack in the oracle's
    /// log — and, when the fabric injects it, reuse the memory before the ack.
    fn observed(&self, invalidate: impl FnOnce() -> RevokeReport) -> RevokeReport {
        let w = self.window();
        self.fabric.revoke_begins(&w);
        if self.fabric.reuses_before_ack() {
            tracing::warn!(export = %self.export.name(), "injected: memory reused before the ack");
            let junk = vec![0xee; usize::try_from(w.len().min(1 << 20)).unwrap_or(4096)];
            self.fabric.cpu_write(&w, 0, &junk);
        }
        let report = invalidate();
        self.fabric.acked(&w);
        report
    }

    /// Move the memory to a new window: invalidate everyone, copy the bytes, unmap the old
    /// window, and give dynamic importers new lists (epoch + 1).
    pub(crate) fn relocate(&self, deadline: Duration) -> Result<RevokeReport, AttachError> {
        let _moving = lock(&self.moving);
        let old = self.window();
        let report = self.observed(|| self.export.begin_move(deadline));
        let exporter_err = |what: String| AttachError::Exporter {
            export: self.export.name().to_string(),
            what,
        };
        // Past the first half every failure ends the export: its importers were invalidated
        // and the memory stays where it is, unusable (never wedged "being moved").
        let fail = |what: String| {
            self.export.abort_move();
            exporter_err(format!("{what}: the export is revoked"))
        };
        let new = self
            .fabric
            .map_new(self.owner, old.len(), self.host)
            .map_err(|e| fail(e.to_string()))?;
        let len = usize::try_from(old.len()).map_err(|e| fail(e.to_string()))?;
        if !new.memory().copy_from(0, old.memory(), 0, len) {
            self.fabric.unmap(&new);
            return Err(fail(format!(
                "copying {len} bytes to the new window failed"
            )));
        }
        self.fabric.unmap(&old);
        *lock(&self.window) = new.clone();
        let devices = lock(&self.devices).clone();
        self.export.finish_move(|id, old_list| {
            let offer = Offer {
                space: old_list.space(),
                hints: old_list.hints(),
            };
            let list = self.list(&new, &offer)?;
            let grant: Option<Box<dyn AccessGrant>> = devices.get(&id).map(|d| {
                Box::new(self.fabric.grant(&new, *d, offer.hints.access)) as Box<dyn AccessGrant>
            });
            Ok((list, grant))
        })?;
        Ok(report)
    }
}

impl Drop for WindowExport {
    /// Revoke before the memory goes: no importer may touch it after this.
    fn drop(&mut self) {
        if !self.export.is_revoked() && self.export.attachments() > 0 {
            let report = self.observed(|| self.export.revoke(crate::revoke::DROP_REVOKE_DEADLINE));
            tracing::info!(%report, "exporter dropped: revoked first");
        }
        self.fabric.unmap(&self.window());
    }
}
