//! Exported memory imported as an MR: negotiation of what to register, the importer the
//! exporter invalidates ([`RdmaImporter`], which hands the revoke to [`crate::quiesce`]),
//! deregistration and, for dynamic imports, registration again after a move.

use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use dmaplane_core::{
    AddrList, AddrSpace, AttachError, Attachment, Importer, ImporterKind, Invalidation, SpaceKind,
};

use crate::backend::MrRequest;
use crate::device::{Mr, Pd};
use crate::error::{RdmaError, Result};
use crate::policy::{ImportInfo, ImportOptions};
use crate::sync::{lock, read, write};
use crate::tracker::{MrShared, Tracker};

/// The part of `list` an import registers: all of it, or `range`.
fn import_list(
    list: &AddrList,
    range: Option<(u64, u64)>,
) -> Result<std::borrow::Cow<'_, AddrList>> {
    let Some((offset, len)) = range else {
        return Ok(std::borrow::Cow::Borrowed(list));
    };
    let bad = |why: String| RdmaError::InvalidRegistration {
        field: "range",
        value: format!("[{offset:#x}, +{len:#x})"),
        why,
    };
    let g = list.granule();
    if offset % g != 0 || len % g != 0 {
        return Err(bad(format!(
            "offset and length must be multiples of the export's granule {g}"
        )));
    }
    let ranges = list.slice(offset, len).map_err(|e| bad(e.to_string()))?;
    AddrList::new(list.space(), list.hints(), g, ranges)
        .map(std::borrow::Cow::Owned)
        .map_err(|e| bad(e.to_string()))
}

/// The core [`Importer`] for one imported MR.
pub struct RdmaImporter {
    name: String,
    opts: ImportOptions,
    tracker: Weak<Tracker>,
    mr: Mutex<Weak<MrShared>>,
}

impl std::fmt::Debug for RdmaImporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaImporter")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Importer for RdmaImporter {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> ImporterKind {
        self.opts.kind
    }
    fn invalidate(&self, inv: Invalidation) {
        let mr = lock(&self.mr).upgrade();
        match (self.tracker.upgrade(), mr) {
            (Some(t), Some(mr)) => t.quiesce_mr(&mr, &inv, self.opts),
            // Nothing registered (yet, or any more): nothing can touch the memory.
            _ => inv.fence.signal(),
        }
    }
}

impl Pd {
    /// Import exported memory as an MR. `attach` attaches the given importer to the exporter
    /// with these accepts (e.g. `|i, a| host.attach(i, nic_device, a)`). When the provider
    /// refuses the negotiated space (EOPNOTSUPP for dma-buf MRs), that space is dropped from the
    /// accepts and the next offer is negotiated; [`Mr::negotiation`] says what happened.
    pub fn import<F>(
        &self,
        name: &str,
        opts: ImportOptions,
        dmabuf_fd: Option<BorrowedFd<'_>>,
        mut attach: F,
    ) -> Result<Mr>
    where
        F: FnMut(Arc<dyn Importer>, &[dmaplane_core::Accept]) -> Result<Attachment, AttachError>,
    {
        let need = opts.access.needs();
        let mut accepts: Vec<_> = self
            .dev
            .backend
            .accepts()
            .into_iter()
            .map(|mut a| {
                a.access = need;
                a
            })
            .collect();
        let mut notes: Vec<String> = Vec::new();
        loop {
            let importer = Arc::new(RdmaImporter {
                name: format!("{}/{name}", self.dev.name()),
                opts,
                tracker: Arc::downgrade(&self.dev.tracker),
                mr: Mutex::new(Weak::new()),
            });
            let att = attach(importer.clone(), &accepts)?;
            let map = att.map()?;
            let list = import_list(&map.list, opts.range)?;
            let space = list.space();
            let iova = list.ranges().first().map_or(0, |r| r.addr);
            let fd = match space {
                AddrSpace::DmaBuf { .. } => dmabuf_fd,
                _ => None,
            };
            let req = MrRequest {
                list: &list,
                iova,
                access: opts.access,
                dmabuf_fd: fd,
            };
            match self.backend.reg_mr(&req) {
                Ok(b) => {
                    let mut summary = att.negotiated().summary();
                    for n in &notes {
                        summary.push_str("; ");
                        summary.push_str(n);
                    }
                    let mr =
                        Mr::from_backend(self, b, opts.access, Some(ImportInfo { summary, opts }));
                    *lock(&importer.mr) = Arc::downgrade(&mr.shared);
                    // A revoke that raced with the registration found no MR to quiesce.
                    if let Err(e) = att.check(map.epoch) {
                        let _ = read(&mr.shared.backend).zap();
                        return Err(e.into());
                    }
                    *lock(&mr.shared.attachment) = Some(att);
                    return Ok(mr);
                }
                Err(RdmaError::Unsupported { op, why, .. }) if accepts.len() > 1 => {
                    let kind: SpaceKind = space.kind();
                    notes.push(format!("{op} refused ({why}): fell back from {kind:?}"));
                    tracing::info!(device = %self.dev.name(), ?kind, %why, "registration refused: renegotiating");
                    accepts.retain(|a| a.space != kind);
                    drop(att);
                }
                // The refusals that led here belong in the error too.
                Err(e) if !notes.is_empty() => {
                    return Err(RdmaError::FellBack {
                        tried: notes.join("; "),
                        source: Box::new(e),
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Mr {
    /// Deregister an imported region while queue pairs may still use it, without waiting for
    /// its exporter: the quiesce a revoke runs (posts naming it fail at once with
    /// [`RdmaError::Revoked`], holders of leases on it are told to stop and ack, local queue
    /// pairs with requests on it are stopped by its policy, its translation is zapped), then it
    /// detaches from the export. Returns once no DMA to it can happen any more, or an error
    /// naming it when that took longer than `deadline` (the detach happens anyway: its
    /// translation is gone by then or the fence would not be late). Idempotent.
    pub fn deregister(&self, pd: &Pd, deadline: Duration) -> Result<()> {
        let att = lock(&self.shared.attachment).take();
        let Some(att) = att else {
            return Ok(());
        };
        if self.shared.revoked.load(Ordering::SeqCst) != 0 {
            // Revoked already (the exporter's quiesce ran): detaching is all that is left.
            return Ok(());
        }
        let epoch = att.map().map_or(0, |m| m.epoch);
        let fence = dmaplane_core::Fence::new(Instant::now() + deadline);
        let inv = Invalidation {
            export: Arc::from(att.export_name()),
            attachment: att.id(),
            epoch,
            reason: dmaplane_core::revoke::InvalidateReason::Revoke,
            fence: fence.clone(),
        };
        let opts = self.shared.import_opts();
        pd.dev.tracker.quiesce_mr(&self.shared, &inv, opts);
        let quiet = fence.wait();
        drop(att);
        if quiet {
            Ok(())
        } else {
            Err(RdmaError::Timeout {
                what: format!(
                    "deregistration of MR {:#x} on {} (its queue pairs and lease holders)",
                    self.lkey(),
                    pd.dev.name()
                ),
                ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
            })
        }
    }

    /// After a move: a dynamic importer maps the new list and registers it (new keys, leases
    /// must be handed out again). Returns the new epoch; fails if the export is revoked.
    pub fn refresh(&self, pd: &Pd) -> Result<u64> {
        let att_guard = lock(&self.shared.attachment);
        let Some(att) = att_guard.as_ref() else {
            return Err(RdmaError::InvalidRegistration {
                field: "mr",
                value: format!("{:#x}", self.lkey()),
                why: "not an imported region".into(),
            });
        };
        // The mark as this refresh found it: a move that invalidates the region while it
        // re-registers changes it, and then the refresh must not clear it (it would revive the
        // region on memory that moved again).
        let seen = self.shared.revoked.load(Ordering::SeqCst);
        let map = att.map()?;
        let opts = self.shared.import_opts();
        let list = import_list(&map.list, opts.range)?;
        let iova = list.ranges().first().map_or(0, |r| r.addr);
        let b = pd.backend.reg_mr(&MrRequest {
            list: &list,
            iova,
            access: opts.access,
            dmabuf_fd: None,
        })?;
        let old_key = self.shared.lkey.load(Ordering::Acquire) as u32;
        let new_key = b.lkey();
        pd.dev.tracker.add_mr(new_key, &self.shared);
        *write(&self.shared.backend) = b;
        lock(&self.shared.holders).clear();
        // The key changes before the mark clears: a post checked against the old key fails
        // its re-check under the QP lock (the key no longer matches), never slips through.
        self.shared.lkey.store(u64::from(new_key), Ordering::SeqCst);
        write(&pd.dev.tracker.mrs).remove(&old_key);
        if let Err(now) =
            self.shared
                .revoked
                .compare_exchange(seen, 0, Ordering::SeqCst, Ordering::SeqCst)
        {
            // Invalidated again while registering: the new registration maps memory that is
            // moving or gone. Zap it; the caller refreshes again after the move.
            if let Err(e) = read(&self.shared.backend).zap() {
                tracing::error!(error = %e, "zap of an overtaken refresh failed");
            }
            return Err(RdmaError::Revoked {
                what: format!("refresh of MR {new_key:#x}"),
                epoch: now.saturating_sub(1),
                why: "the memory moved again while the region was re-registered: refresh again \
                      once the move completes"
                    .into(),
            });
        }
        Ok(map.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::MrAccess;
    use crate::lease::RemoteMr;
    use crate::sim::SimNetwork;
    use crate::wr::SendWr;
    use crate::{Device, QpCaps};
    use dmaplane_core::fabric::{Fabric, HostMemory};
    use dmaplane_core::revoke::{AttachmentId, InvalidateReason};
    use dmaplane_core::topology::builtin;

    /// Two simulated NICs, one RC QP each, connected; a's region with one outstanding WRITE
    /// into b's (its completion is never reaped); the invalidation of a's region.
    struct Rig {
        _fabric: Fabric,
        nic_a: Arc<crate::sim::SimNic>,
        a: Device,
        _b: Device,
        qa: crate::Qp,
        ra: Mr,
        _keep: (HostMemory, HostMemory, Mr, Arc<RemoteMr>, crate::Qp),
        fence: dmaplane_core::Fence,
        inv: Invalidation,
    }

    impl Rig {
        /// Invalidate a's region: the call must return at once, before the fence is
        /// signalled (what is left runs elsewhere). Returns when it started.
        fn invalidate_at_once(&self) -> Instant {
            let start = Instant::now();
            self.a
                .tracker
                .quiesce_mr(&self.ra.shared, &self.inv, ImportOptions::default());
            let took = start.elapsed();
            assert!(
                took < Duration::from_millis(100),
                "invalidate blocked {took:?}"
            );
            assert!(
                !self.fence.is_signalled(),
                "fence before the quiesce was done"
            );
            start
        }
    }

    fn rig() -> Rig {
        let fabric = Fabric::with_topology(builtin::testbed());
        let net = SimNetwork::new(&fabric);
        let (na, nb) = (net.nic("nic0").unwrap(), net.nic("nic1").unwrap());
        let (id_a, id_b) = (na.device_id(), nb.device_id());
        let (a, b) = (Device::new(na.clone()), Device::new(nb));
        let (pa, pb) = (a.alloc_pd().unwrap(), b.alloc_pd().unwrap());
        let (ca, cb) = (a.create_cq(64).unwrap(), b.create_cq(64).unwrap());
        let qa = pa.create_qp(&ca, &ca, QpCaps::default()).unwrap();
        let qb = pb.create_qp(&cb, &cb, QpCaps::default()).unwrap();
        qa.connect(qb.endpoint(), MrAccess::ALL).unwrap();
        qb.connect(qa.endpoint(), MrAccess::ALL).unwrap();
        let host = |n| fabric.device(n).unwrap();
        let ma = HostMemory::new(&fabric, host("mem0"), "a", 1 << 16).unwrap();
        let mb = HostMemory::new(&fabric, host("mem1"), "b", 1 << 16).unwrap();
        let ra = pa
            .import("a", ImportOptions::default(), None, |i, acc| {
                ma.attach(i, id_a, acc)
            })
            .unwrap();
        let rb = pb
            .import("b", ImportOptions::default(), None, |i, acc| {
                mb.attach(i, id_b, acc)
            })
            .unwrap();
        let remote = b.lease(&rb, &a);
        qa.post_send(&[SendWr::write(1, ra.sge(0, 64), remote.at(0))])
            .unwrap();
        let fence = dmaplane_core::Fence::new(Instant::now() + Duration::from_secs(5));
        let inv = Invalidation {
            export: Arc::from("a"),
            attachment: AttachmentId(0),
            epoch: 0,
            reason: InvalidateReason::Revoke,
            fence: fence.clone(),
        };
        Rig {
            _fabric: fabric,
            nic_a: na,
            a,
            _b: b,
            qa,
            ra,
            _keep: (ma, mb, rb, remote, qb),
            fence,
            inv,
        }
    }

    /// `invalidate` must not block: a QP whose track lock the data path holds is quiesced from
    /// the timer thread once the lock is free, and the fence waits for it.
    #[test]
    fn invalidate_does_not_wait_for_a_busy_queue_pair() {
        let r = rig();
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let shared = r.qa.shared.clone();
        let data_path = std::thread::spawn(move || {
            let _t = lock(&shared.track);
            held_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
        held_rx.recv().unwrap();
        let start = r.invalidate_at_once();
        data_path.join().unwrap();
        assert!(r.fence.wait(), "the deferred quiesce never signalled");
        assert!(start.elapsed() >= Duration::from_millis(250));
        assert_eq!(r.a.stats().qps_flushed + r.a.stats().qps_stopped, 1);
    }

    /// `invalidate` must not block on driver calls either: where a QP modify and a zap take
    /// time (a real NIC's firmware commands, modelled here at 300 ms each), both are made on the
    /// worker thread, and the fence waits for them.
    #[test]
    fn invalidate_leaves_slow_driver_calls_to_the_worker() {
        let r = rig();
        r.nic_a.set_call_latency(Duration::from_millis(300));
        let start = r.invalidate_at_once();
        assert!(r.fence.wait(), "the worker never signalled");
        // The flush, then the zap: each call took its 300 ms on the worker.
        assert!(
            start.elapsed() >= Duration::from_millis(550),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(r.a.stats().qps_flushed, 1);
    }
}
