//! What a backend provides: raw verbs objects, nothing more.
//!
//! The revoke/quiesce logic, key checks against revoked regions, leases and completion
//! bookkeeping live above this layer ([`crate::device`], [`crate::quiesce`]) and run unchanged on
//! every backend. A backend only has to behave like verbs: keys, bounds and access enforced by
//! the "hardware", the RC state machine ([`crate::qp::check_modify`]), completions in order per
//! queue, and `ERR` flushing every outstanding request with [`WcStatus::WrFlushErr`].
//!
//! [`WcStatus::WrFlushErr`]: crate::wc::WcStatus::WrFlushErr

use std::fmt;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use dmaplane_core::{Accept, AddrList};
use serde::Serialize;

use crate::access::MrAccess;
use crate::error::Result;
use crate::qp::{QpAttr, QpCaps, QpState, RemoteQp};
use crate::wc::Completion;
use crate::wr::{RecvWr, SendWr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    Sim,
    Verbs,
    /// A software RC NIC over TCP ([`crate::tcp`]).
    Tcp,
}

/// Whether the provider registers dma-buf MRs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "support", rename_all = "kebab-case")]
pub enum DmaBufMr {
    Supported,
    /// The provider answered EOPNOTSUPP (Soft-RoCE does) or something else; why.
    Unsupported {
        why: String,
    },
    /// Not probed yet.
    Unknown,
}

/// What a device tells about itself (for `doctor`, negotiation and page-size selection).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    pub name: String,
    pub kind: BackendKind,
    /// Firmware / provider / node GUID text, as available.
    pub description: String,
    pub port: u8,
    /// `ACTIVE`, `DOWN`, ...
    pub port_state: String,
    pub gid: [u8; 16],
    pub lid: u16,
    pub max_mr_size: u64,
    /// Supported MR page sizes (bit n = 2^n bytes).
    pub page_size_cap: u64,
    pub max_qp_wr: u32,
    pub max_sge: u32,
    pub dmabuf_mr: DmaBufMr,
}

/// A registration request: the list to map at `iova`, and the dma-buf it lives in when the
/// list's space is [`dmaplane_core::AddrSpace::DmaBuf`].
#[derive(Debug, Clone, Copy)]
pub struct MrRequest<'a> {
    pub list: &'a AddrList,
    pub iova: u64,
    pub access: MrAccess,
    pub dmabuf_fd: Option<BorrowedFd<'a>>,
}

/// How the MR's translation is laid out (the `ib_umem_find_best_pgsz` choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Translation {
    pub page_size: u64,
    pub entries: u64,
}

/// An asynchronous event (`ibv_get_async_event`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AsyncEvent {
    /// `IBV_EVENT_*` name, e.g. `QP_FATAL`, `QP_ACCESS_ERR`, `SQ_DRAINED`, `PORT_ERR`.
    pub kind: String,
    /// The QP number for QP events.
    pub qpn: Option<u32>,
    pub detail: String,
}

pub trait DeviceBackend: Send + Sync + fmt::Debug {
    fn info(&self) -> DeviceInfo;
    /// What registrations this device can consume, best first.
    fn accepts(&self) -> Vec<Accept>;
    fn alloc_pd(&self) -> Result<Arc<dyn PdBackend>>;
    fn create_cq(&self, depth: u32) -> Result<Arc<dyn CqBackend>>;
    /// Next pending asynchronous event, without blocking.
    fn poll_async_event(&self) -> Option<AsyncEvent>;
    /// Whether driver calls (QP modifies, MR zaps) may block the calling thread: system calls
    /// into a driver whose firmware commands take up to milliseconds. The quiesce layer then
    /// makes them from its worker thread, never from `invalidate`.
    fn calls_block(&self) -> bool {
        false
    }
    /// The fabric device this NIC issues DMA as (simulator only).
    fn fabric_device(&self) -> Option<dmaplane_core::fabric::DeviceId> {
        None
    }
}

pub trait PdBackend: Send + Sync + fmt::Debug {
    fn reg_mr(&self, req: &MrRequest<'_>) -> Result<Arc<dyn MrBackend>>;
    fn create_qp(
        &self,
        send_cq: &Arc<dyn CqBackend>,
        recv_cq: &Arc<dyn CqBackend>,
        caps: QpCaps,
    ) -> Result<Arc<dyn QpBackend>>;
}

/// What a registration is known by: its keys, where it starts in the NIC's view, how long it
/// is and what it allows. Fixed for the registration's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MrKeys {
    pub lkey: u32,
    pub rkey: u32,
    pub iova: u64,
    pub len: u64,
    pub access: MrAccess,
}

pub trait MrBackend: Send + Sync + fmt::Debug {
    fn keys(&self) -> MrKeys;
    fn lkey(&self) -> u32 {
        self.keys().lkey
    }
    fn rkey(&self) -> u32 {
        self.keys().rkey
    }
    fn iova(&self) -> u64 {
        self.keys().iova
    }
    fn len(&self) -> u64 {
        self.keys().len
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn access(&self) -> MrAccess {
        self.keys().access
    }
    fn translation(&self) -> Translation;
    /// Kill the translation: from return on, every local or remote access through this MR's
    /// keys fails (remote ones with a remote-access error). Waits for accesses under way.
    /// The keys are not reused until the MR is dropped. Idempotent.
    fn zap(&self) -> Result<()>;
}

pub trait QpBackend: Send + Sync + fmt::Debug {
    fn qpn(&self) -> u32;
    fn state(&self) -> QpState;
    /// This end as a peer needs it for `INIT → RTR` (our QPN, GID, LID and first send PSN).
    fn endpoint(&self) -> RemoteQp;
    /// `ibv_modify_qp`; must apply [`crate::qp::check_modify`].
    fn modify(&self, attr: &QpAttr) -> Result<()>;
    /// `ibv_post_send`. A provider may take a prefix of the batch: it stops at the first request
    /// it refuses (as mlx5 and rxe do for a bad request in the middle of a chain) and reports
    /// that one. Returns how many it took — every one of them will complete — and the error
    /// for the first it refused.
    fn post_send(&self, wrs: &[SendWr]) -> (usize, Result<()>);
    /// `ibv_post_recv`, with the same prefix rule as [`QpBackend::post_send`].
    fn post_recv(&self, wrs: &[RecvWr]) -> (usize, Result<()>);
    /// The PSNs this QP would use next, read from the device: (send, expected receive). A QP
    /// brought back from ERR resumes them, because the peer's responder kept its expected PSN:
    /// starting over at the first PSN would make the peer drop what follows as duplicates
    /// (acked, never written). `Ok(None)` where the backend has no PSNs to keep (the
    /// simulator); an error when they could not be read — then the QP must not be recovered.
    fn next_psns(&self) -> Result<Option<(u32, u32)>> {
        Ok(None)
    }
    /// Move to `to` (ERR to flush, SQD to drain; `None` keeps the state) and call `f` once no
    /// request of this QP is executing and none can start (the QP is in ERR, or in SQD with the
    /// drain done): at once if that holds now, else from whatever sees it happen, never under a
    /// QP lock. One call, so a backend can do both under one lock of its own: a revoke does this
    /// for every affected QP in turn. Returns the modify's result and whether `f` was taken;
    /// false when the backend cannot tell (`f` is dropped uncalled, and the caller waits for
    /// every outstanding completion instead, which is always safe).
    fn quiesce(&self, to: Option<QpState>, f: Box<dyn FnOnce() + Send>) -> (Result<()>, bool) {
        drop(f);
        (to.map_or(Ok(()), |s| self.modify(&QpAttr::to(s))), false)
    }

    /// Stop at the next message boundary: the request under way completes (every packet of it),
    /// none that has not started starts; they stay queued. Call `f` once nothing executes, as
    /// [`QpBackend::quiesce`] does; false when the backend cannot tell (then `f` is dropped).
    /// SQD means exactly this on an IB/RoCE NIC (the default moves there).
    fn stop_at_boundary(&self, f: Box<dyn FnOnce() + Send>) -> (Result<()>, bool) {
        self.quiesce(Some(QpState::Sqd), f)
    }

    /// Flush a QP stopped at a boundary ([`QpBackend::stop_at_boundary`]): SQD → ERR, only
    /// while it is still in SQD — checked and moved under one lock where the backend has one.
    /// A QP that left SQD meanwhile (brought back to RTS once everything it had completed) has
    /// nothing queued to flush: it is left as it is and `Ok(false)` says so. Flushing it there
    /// anyway would leave a QP in ERR that nobody recovers. The default checks, then moves.
    fn flush_stopped(&self) -> Result<bool> {
        if self.state() != QpState::Sqd {
            return Ok(false);
        }
        self.modify(&QpAttr::to(QpState::Err)).map(|()| true)
    }

    /// Whether the send queue is still draining: `Some(true)` while a QP in SQD still has a
    /// message under way (started before the stop, not yet acknowledged), `Some(false)` once
    /// none is (or the QP is not in SQD), `None` when the backend cannot tell. A backend whose
    /// [`QpBackend::stop_at_boundary`] cannot call back but which answers this is watched by
    /// polling it (`ibv_query_qp`'s `sq_draining`, which rxe and mlx5 report).
    fn sq_draining(&self) -> Option<bool> {
        None
    }
}

pub trait CqBackend: std::any::Any + Send + Sync + fmt::Debug {
    /// Append up to `max` completions to `out`; returns how many.
    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize>;
    /// Block until a completion is available or `timeout` passes; true when one is.
    fn wait(&self, timeout: Duration) -> Result<bool>;
}
