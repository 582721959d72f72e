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
    /// Attachments that took the window's process VAs: their DMA is the kernel's (io_uring,
    /// `ibv_reg_mr`), which no fabric grant stops.
    by_va: Mutex<std::collections::HashSet<AttachmentId>>,
    /// One of those missed a revoke's deadline: it may still write, so the memory is never
    /// freed, pooled or handed back (it is leaked with the window).
    unacked_kernel: std::sync::atomic::AtomicBool,
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
            by_va: Mutex::new(std::collections::HashSet::new()),
            unacked_kernel: std::sync::atomic::AtomicBool::new(false),
            moving: Mutex::new(()),
        })
    }

    /// A window over `mem` (a caller's buffer) instead of fresh memory.
    pub(crate) fn over(
        fabric: &Fabric,
        owner: DeviceId,
        name: &str,
        mem: super::Mapping,
    ) -> Result<WindowExport, FabricError> {
        let window = fabric.map(owner, mem)?;
        Ok(WindowExport {
            export: Export::new(name),
            fabric: fabric.clone(),
            owner,
            host: true,
            window: Mutex::new(window),
            devices: Mutex::new(HashMap::new()),
            by_va: Mutex::new(std::collections::HashSet::new()),
            unacked_kernel: std::sync::atomic::AtomicBool::new(false),
            moving: Mutex::new(()),
        })
    }

    pub(crate) fn window(&self) -> WindowHandle {
        lock(&self.window).clone()
    }

    /// The memory back, after everything this export gave out is revoked (by the drop, when
    /// the caller did not) and its window unmapped. `Err(Some(n))`: `n` other holders still
    /// reached it at `deadline`; `Err(None)`: a kernel importer (process VAs) missed a revoke's
    /// deadline, so the memory is kept for good.
    pub(crate) fn into_memory(self, deadline: Duration) -> Result<super::Mapping, Option<usize>> {
        let w = self.window();
        drop(self);
        if w.is_kept() {
            return Err(None);
        }
        w.into_memory(deadline).map_err(Some)
    }

    /// Record a revoke's outcome: a timed-out importer that took process VAs keeps the memory.
    fn judge(&self, report: &RevokeReport) {
        let by_va = lock(&self.by_va);
        let kernel_late = report.importers.iter().any(|i| {
            i.outcome == crate::revoke::Outcome::TimedOut && by_va.contains(&i.attachment)
        });
        if kernel_late
            && !self
                .unacked_kernel
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tracing::error!(
                export = %self.export.name(),
                "an importer that DMAs by process VA (the kernel's) missed the revoke deadline: \
                 the memory is leaked, never freed or reused"
            );
            self.window().keep();
        }
    }

    /// The list for `offer`'s space over window `w`.
    fn list(&self, w: &WindowHandle, offer: &Offer) -> Result<AddrList, AttachError> {
        let start = match offer.space {
            AddrSpace::CpuPhys | AddrSpace::PciBus { .. } | AddrSpace::Iova { .. } => w.base(),
            AddrSpace::ProcessVa => w.memory().process_va(),
            AddrSpace::DeviceVa { .. } | AddrSpace::DmaBuf { .. } => 0,
        };
        // A caller's buffer need not be whole pages, nor start on one: its list is then byte
        // granular.
        let granule =
            if start.is_multiple_of(FABRIC_GRANULE) && w.len().is_multiple_of(FABRIC_GRANULE) {
                FABRIC_GRANULE
            } else {
                1
            };
        AddrList::single(
            offer.space,
            offer.hints,
            granule,
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
        let mut va = false;
        let att = self.export.attach(importer, offers, accepts, |n| {
            va = n.offer.space == AddrSpace::ProcessVa;
            let list = self.list(&window, &n.offer)?;
            let access = n.offer.hints.access & accepts[n.accept_index].access;
            let grant: Box<dyn AccessGrant> = Box::new(self.fabric.grant(&window, device, access));
            Ok((list, Some(grant)))
        })?;
        lock(&self.devices).insert(att.id(), device);
        if va {
            lock(&self.by_va).insert(att.id());
        }
        Ok(att)
    }

    pub(crate) fn revoke(&self, deadline: Duration) -> RevokeReport {
        let report = self.observed(|| self.export.revoke(deadline));
        self.judge(&report);
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
        self.judge(&report);
        if self
            .unacked_kernel
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            self.export.abort_move();
            return Err(AttachError::Exporter {
                export: self.export.name().to_string(),
                what: "an importer that DMAs by process VA missed the deadline: the memory \
                       stays where it is, leaked, and the export is revoked"
                    .into(),
            });
        }
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
            self.judge(&report);
            tracing::info!(%report, "exporter dropped: revoked first");
        }
        self.fabric.unmap(&self.window());
    }
}
