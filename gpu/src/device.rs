//! The safe API over every backend: a GPU, its allocations (exporters) and the peer memory its
//! copy engine imports, and copies between them.
//!
//! Freeing an allocation is a revoke: [`DeviceMemory::free`] runs the core's protocol (every
//! importer quiesces, then the ack) before the backend may reuse the memory, and a free whose
//! importers do not all answer in time is an error that names them.

use std::fmt;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use dmaplane_core::sync::lock;
use std::time::Duration;

use dmaplane_core::fabric::WindowHandle;
use dmaplane_core::{
    Accept, AttachError, Attachment, Importer, ImporterKind, Offer, RevokeReport, negotiate,
};

use crate::backend::{AllocBackend, CopyRegistration, DmaClient, GpuBackend, GpuInfo};
use crate::error::{GpuError, Result};
use crate::import::CopyImporter;

/// A GPU of any backend. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Gpu {
    backend: Arc<dyn GpuBackend>,
    name: Arc<str>,
}

/// One side of a copy: device memory or imported peer memory, at an offset.
#[derive(Debug, Clone, Copy)]
pub enum Loc<'a> {
    Mem(&'a DeviceMemory, u64),
    Peer(&'a PeerMemory, u64),
}

impl Gpu {
    pub fn new(backend: Arc<dyn GpuBackend>) -> Gpu {
        let name = backend.info().name.into();
        Gpu { backend, name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn info(&self) -> GpuInfo {
        self.backend.info()
    }

    pub fn backend(&self) -> &Arc<dyn GpuBackend> {
        &self.backend
    }

    /// What the copy engine can import.
    pub fn accepts(&self) -> Vec<Accept> {
        self.backend.accepts()
    }

    /// Allocate `size` bytes of device memory. Not yet visible to peers: the first peer
    /// attachment maps it (through BAR1 where the backend has one).
    pub fn alloc(&self, name: &str, size: u64) -> Result<DeviceMemory> {
        if size == 0 {
            return Err(GpuError::invalid(
                "size",
                "0",
                "an allocation needs at least one byte",
            ));
        }
        Ok(DeviceMemory {
            backend: self.backend.alloc(name, size)?,
            gpu: self.name.clone(),
        })
    }

    /// `len` bytes of device memory at `addr` that the caller allocated (a framework's tensor):
    /// registered as it is, no copy, and given back — `keeper` dropped — only once every
    /// importer quiesced after a free. Refused unless it is device memory of this GPU inside
    /// one allocation, or where the backend allocates its own memory only.
    ///
    /// # Safety
    /// The memory must stay allocated while `keeper` lives: whatever frees it must wait for
    /// the keeper's drop (a registration holding a tensor does).
    pub unsafe fn lend(
        &self,
        name: &str,
        addr: u64,
        len: u64,
        keeper: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<DeviceMemory> {
        if len == 0 {
            return Err(GpuError::invalid(
                "len",
                "0",
                "lent memory has at least one byte",
            ));
        }
        Ok(DeviceMemory {
            backend: self.backend.lend(name, addr, len, keeper)?,
            gpu: self.name.clone(),
        })
    }

    /// Import peer memory for the copy engine: `attach` is called with the engine's importer and
    /// its accepts (e.g. `|i, a| host.attach(i, gpu_device, a)`).
    pub fn import<F>(&self, name: &str, kind: ImporterKind, attach: F) -> Result<PeerMemory>
    where
        F: FnOnce(Arc<dyn Importer>, &[Accept]) -> Result<Attachment, AttachError>,
    {
        let importer = Arc::new(CopyImporter::new(format!("{}/{name}", self.name), kind));
        let attachment = attach(importer.clone(), &self.backend.accepts())?;
        let mapping = attachment.map()?;
        let reg = self.backend.register(name, &mapping.list)?;
        Ok(PeerMemory {
            name: name.to_string(),
            importer,
            summary: attachment.negotiated().summary(),
            attachment,
            state: Mutex::new(PeerState { mapping, reg }),
        })
    }

    /// Copy `len` bytes from `src` to `dst` with the copy engine. A side in imported memory must
    /// not be revoked; every byte is checked against the allocation's or the list's bounds.
    pub fn copy(&self, src: Loc<'_>, dst: Loc<'_>, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let s = self.resolve(src, len)?;
        let d = self.resolve(dst, len)?;
        // Walk both sides' pieces together; a piece boundary on either side splits the copy.
        let (mut i, mut j, mut si, mut di) = (0usize, 0usize, 0u64, 0u64);
        while i < s.pieces.len() && j < d.pieces.len() {
            let (sa, sl) = s.pieces[i];
            let (da, dl) = d.pieces[j];
            let n = (sl - si).min(dl - di);
            self.backend.copy(sa + si, da + di, n)?;
            si += n;
            di += n;
            if si == sl {
                i += 1;
                si = 0;
            }
            if di == dl {
                j += 1;
                di = 0;
            }
        }
        Ok(())
    }

    fn resolve<'a>(&self, loc: Loc<'a>, len: u64) -> Result<Resolved<'a>> {
        match loc {
            Loc::Mem(m, off) => {
                if m.gpu != self.name {
                    return Err(GpuError::invalid(
                        "loc",
                        format!("{} on {}", m.name(), m.gpu),
                        format!(
                            "{} copies its own memory; import the other GPU's allocation first",
                            self.name
                        ),
                    ));
                }
                check_bounds(m.name(), off, len, m.len())?;
                Ok(Resolved {
                    pieces: vec![(m.backend.copy_addr() + off, len)],
                    _pass: None,
                })
            }
            Loc::Peer(p, off) => {
                let pass = p.importer.gate.enter().ok_or_else(|| GpuError::Revoked {
                    import: p.name.clone(),
                    why: format!(
                        "export {} invalidated it; copies stopped",
                        p.attachment.export_name()
                    ),
                })?;
                let st = lock(&p.state);
                p.attachment.check(st.mapping.epoch)?;
                check_bounds(&p.name, off, len, st.mapping.list.total_len())?;
                let ranges = st
                    .mapping
                    .list
                    .slice(off, len)
                    .map_err(|e| GpuError::invalid("offset", off.to_string(), e.to_string()))?;
                let pieces = ranges
                    .iter()
                    .map(|r| (st.reg.translate(r.addr), r.len))
                    .collect();
                Ok(Resolved {
                    pieces,
                    _pass: Some(pass),
                })
            }
        }
    }
}

fn check_bounds(what: &str, off: u64, len: u64, size: u64) -> Result<()> {
    if off.checked_add(len).is_none_or(|e| e > size) {
        return Err(GpuError::invalid(
            "offset",
            format!("{off:#x}+{len:#x}"),
            format!("past the end of {what} ({size:#x} bytes)"),
        ));
    }
    Ok(())
}

/// A copy side turned into copy-engine addresses, holding the import's gate open.
struct Resolved<'a> {
    pieces: Vec<(u64, u64)>,
    _pass: Option<dmaplane_core::Pass<'a>>,
}

/// An allocation of device memory. Dropping it frees it (revoking first).
#[derive(Debug)]
pub struct DeviceMemory {
    backend: Arc<dyn AllocBackend>,
    gpu: Arc<str>,
}

impl DeviceMemory {
    pub fn name(&self) -> &str {
        self.backend.name()
    }

    pub fn gpu(&self) -> &str {
        &self.gpu
    }

    pub fn len(&self) -> u64 {
        self.backend.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn epoch(&self) -> u64 {
        self.backend.epoch()
    }

    /// How the allocation is exported and why.
    pub fn export_note(&self) -> String {
        self.backend.export_note()
    }

    /// What the allocation offers `peer`, best first.
    pub fn offers(&self, peer: DmaClient) -> Vec<Offer> {
        self.backend.offers(peer)
    }

    /// What negotiation with `accepts` would pick for `peer`, without attaching: `Ok(summary)`
    /// or the error naming every refusal (the reason a path must be staged).
    pub fn would_negotiate(
        &self,
        peer: DmaClient,
        importer: &str,
        accepts: &[Accept],
    ) -> Result<String> {
        let offers = self.offers(peer);
        let n = negotiate(self.name(), &offers, importer, accepts).map_err(AttachError::from)?;
        Ok(n.summary())
    }

    /// Export to an importer (a NIC's MR, another GPU's copy engine).
    pub fn attach(
        &self,
        importer: Arc<dyn Importer>,
        peer: DmaClient,
        accepts: &[Accept],
    ) -> Result<Attachment, AttachError> {
        self.backend
            .attach(importer, peer, accepts)
            .map_err(|e| match e {
                GpuError::Attach(a) => a,
                other => AttachError::Exporter {
                    export: self.name().to_string(),
                    what: other.to_string(),
                },
            })
    }

    pub fn dmabuf_fd(&self) -> Option<BorrowedFd<'_>> {
        self.backend.dmabuf_fd()
    }

    /// The simulated memory's fabric window (stays readable after a free, for poison checks).
    pub fn fabric_window(&self) -> Option<WindowHandle> {
        self.backend.fabric_window()
    }

    /// Write from the host (tests, fills).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_bounds(self.name(), offset, data.len() as u64, self.len())?;
        self.backend.write(offset, data)
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_bounds(self.name(), offset, buf.len() as u64, self.len())?;
        self.backend.read(offset, buf)
    }

    /// Revoke every importer without giving the memory back yet: the bytes stay readable and
    /// writable from the host (a quarantine, so a check can prove nothing landed after the
    /// ack). [`DeviceMemory::free`] releases it afterwards.
    pub fn revoke(&self, deadline: Duration) -> RevokeReport {
        self.backend.revoke(deadline)
    }

    /// Free the memory: revoke every importer (NIC queue pairs flushed, MRs zapped, remote
    /// leases withdrawn, copy engines stopped), then give the memory back. Returns the revoke's
    /// ack; an error names the importers that did not quiesce within `deadline`.
    pub fn free(self, deadline: Duration) -> Result<RevokeReport> {
        let report = self.backend.revoke(deadline);
        let released = self.backend.release(&report)?;
        if report.is_clean() {
            tracing::debug!(%report, "freed");
            return Ok(report);
        }
        Err(GpuError::FreeTimedOut {
            gpu: self.gpu.to_string(),
            alloc: self.name().to_string(),
            importers: report.timed_out().iter().map(|s| s.to_string()).collect(),
            deadline_us: report.deadline_us,
            released,
            report: Box::new(report),
        })
    }
}

#[derive(Debug)]
struct PeerState {
    mapping: dmaplane_core::revoke::Mapping,
    reg: Box<dyn CopyRegistration>,
}

/// Peer memory imported by a GPU's copy engine.
#[derive(Debug)]
pub struct PeerMemory {
    name: String,
    importer: Arc<CopyImporter>,
    summary: String,
    attachment: Attachment,
    state: Mutex<PeerState>,
}

impl PeerMemory {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What was negotiated and why the other offers were refused.
    pub fn negotiation(&self) -> &str {
        &self.summary
    }

    pub fn len(&self) -> u64 {
        lock(&self.state).mapping.list.total_len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once the exporter invalidated it (copies are refused).
    pub fn is_revoked(&self) -> bool {
        self.importer.gate.is_closed()
    }

    /// Invalidations this import has seen.
    pub fn invalidations(&self) -> u64 {
        self.importer
            .invalidations
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A dynamic import follows a move: map the new list, register it, admit copies again.
    pub fn refresh(&self, gpu: &Gpu) -> Result<u64> {
        let mapping = self.attachment.map()?;
        let reg = gpu.backend.register(&self.name, &mapping.list)?;
        let epoch = mapping.epoch;
        *lock(&self.state) = PeerState { mapping, reg };
        self.importer.gate.reopen();
        Ok(epoch)
    }
}

impl fmt::Display for Loc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Loc::Mem(m, off) => write!(f, "{}+{off:#x}", m.name()),
            Loc::Peer(p, off) => write!(f, "{}+{off:#x}", p.name()),
        }
    }
}
