//! Simulated RC queue pair: the state machine, the queues, and flushing.
//!
//! Ordering rule: completions of one queue are pushed in order, always under the QP lock. The
//! engine marks the QP `busy` while it executes a request outside the lock; a flush that finds
//! the QP busy is left to the engine, which flushes right after pushing that request's
//! completion — so a flushed completion never overtakes an earlier request's.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::access::MrAccess;
use crate::backend::QpBackend;
use crate::error::Result;
use crate::qp::{QpAttr, QpCaps, QpState, RemoteQp, check_modify};
use crate::wc::{Completion, WcOpcode, WcStatus};
use crate::wr::{RecvWr, SendWr};

use super::{NicShared, SoftCq, lock};

pub(crate) struct QpInner {
    pub(crate) state: QpState,
    pub(crate) access: MrAccess,
    pub(crate) dest: Option<RemoteQp>,
    pub(crate) peer: Weak<SimQp>,
    pub(crate) sq: VecDeque<SendWr>,
    pub(crate) rq: VecDeque<RecvWr>,
    /// The engine is executing a request taken from `sq`.
    pub(crate) busy: bool,
    /// On the engine's ready list.
    pub(crate) queued: bool,
    /// In SQD: requests posted before the drain that may still start.
    pub(crate) sqd_budget: usize,
    /// Path MTU in bytes (from RTR): WRITEs and READs move in packets of this size.
    pub(crate) mtu: u64,
    /// Called once nothing executes and nothing can start ([`QpBackend::quiesce`]).
    pub(crate) quiesce_waiters: Vec<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for QpInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QpInner")
            .field("state", &self.state)
            .field("sq", &self.sq.len())
            .field("rq", &self.rq.len())
            .field("busy", &self.busy)
            .finish_non_exhaustive()
    }
}

impl QpInner {
    pub(crate) fn quiesced(&self) -> bool {
        !self.busy
            && match self.state {
                QpState::Err | QpState::Reset => true,
                QpState::Sqd => self.sqd_budget == 0,
                _ => false,
            }
    }

    /// The waiters to call (after the lock is released) when the QP is quiescent now.
    pub(crate) fn take_waiters(&mut self) -> Vec<Box<dyn FnOnce() + Send>> {
        if self.quiesced() && !self.quiesce_waiters.is_empty() {
            std::mem::take(&mut self.quiesce_waiters)
        } else {
            Vec::new()
        }
    }
}

#[derive(Debug)]
pub(crate) struct SimQp {
    pub(crate) qpn: u32,
    pub(crate) nic: Arc<NicShared>,
    pub(crate) pd: u32,
    pub(crate) send_cq: Arc<SoftCq>,
    pub(crate) recv_cq: Arc<SoftCq>,
    caps: QpCaps,
    sq_psn: u32,
    state: AtomicU8,
    /// In SQD: stop at the next request boundary (the engine puts back what it took and has not
    /// started) rather than drain what was posted.
    pub(crate) stop: AtomicBool,
    /// As a responder: a message was cut in the middle (its requester flushed between packets).
    /// The next request that arrives breaks the connection (both sides to ERR), as a PSN gap does
    /// on a real NIC: the connection must be re-established (RESET, then connect again).
    pub(crate) partial: AtomicBool,
    pub(crate) inner: Mutex<QpInner>,
}

impl SimQp {
    pub(crate) fn new(
        nic: Arc<NicShared>,
        pd: u32,
        qpn: u32,
        send_cq: Arc<SoftCq>,
        recv_cq: Arc<SoftCq>,
        caps: QpCaps,
    ) -> Result<Arc<SimQp>> {
        caps.check_soft(qpn)?;
        Ok(Arc::new(SimQp {
            qpn,
            pd,
            sq_psn: qpn.wrapping_mul(2_654_435_761) & 0xff_ffff,
            send_cq,
            recv_cq,
            caps,
            state: AtomicU8::new(QpState::Reset.ibv() as u8),
            inner: Mutex::new(QpInner {
                state: QpState::Reset,
                access: MrAccess::NONE,
                dest: None,
                peer: Weak::new(),
                sq: VecDeque::with_capacity(caps.max_send_wr as usize),
                rq: VecDeque::with_capacity(caps.max_recv_wr as usize),
                busy: false,
                queued: false,
                sqd_budget: 0,
                mtu: 4096,
                quiesce_waiters: Vec::new(),
            }),
            stop: AtomicBool::new(false),
            partial: AtomicBool::new(false),
            nic,
        }))
    }

    /// The state without taking the lock (for the responder's readiness check).
    pub(crate) fn fast_state(&self) -> QpState {
        QpState::from_ibv(u32::from(self.state.load(Ordering::Acquire))).unwrap_or(QpState::Err)
    }

    pub(crate) fn set_state(&self, inner: &mut QpInner, s: QpState) {
        inner.state = s;
        self.state.store(s.ibv() as u8, Ordering::Release);
    }

    /// Move to ERR (under the lock) and flush unless the engine is mid-request.
    pub(crate) fn to_error(&self, inner: &mut QpInner) {
        self.set_state(inner, QpState::Err);
        if !inner.busy {
            self.flush(inner);
        }
    }

    pub(crate) fn flush(&self, inner: &mut QpInner) {
        if !inner.sq.is_empty() {
            let wcs: Vec<Completion> = inner
                .sq
                .drain(..)
                .map(|wr| self.wc(wr.wr_id, WcStatus::WrFlushErr, wr.op.wc_opcode(), 0, None))
                .collect();
            self.send_cq.push(&wcs);
        }
        if !inner.rq.is_empty() {
            let wcs: Vec<Completion> = inner
                .rq
                .drain(..)
                .map(|wr| self.wc(wr.wr_id, WcStatus::WrFlushErr, WcOpcode::Recv, 0, None))
                .collect();
            self.recv_cq.push(&wcs);
        }
    }

    pub(crate) fn wc(
        &self,
        wr_id: u64,
        status: WcStatus,
        opcode: WcOpcode,
        byte_len: u32,
        imm: Option<u32>,
    ) -> Completion {
        Completion::new(self.qpn, wr_id, status, opcode, byte_len, imm)
    }

    fn doorbell(self: &Arc<Self>, inner: &mut QpInner) {
        let runnable = match inner.state {
            QpState::Rts => true,
            QpState::Sqd => inner.sqd_budget > 0,
            _ => false,
        };
        if runnable && !inner.queued && !inner.busy && !inner.sq.is_empty() {
            inner.queued = true;
            self.nic.engine.ring(self.clone());
        }
    }

    /// Have the engine flush the queues (state ERR) unless it is on them already.
    fn ring_flush(self: &Arc<Self>, inner: &mut QpInner) {
        let idle = inner.sq.is_empty() && inner.rq.is_empty();
        if !(inner.queued || inner.busy || idle) {
            inner.queued = true;
            self.nic.engine.ring(self.clone());
        }
    }

    /// `modify` with the QP lock held (`inner`); the caller runs the quiesce waiters after
    /// releasing it.
    fn modify_locked(self: &Arc<Self>, inner: &mut QpInner, attr: &QpAttr) -> Result<()> {
        let from = inner.state;
        let to = check_modify(self.qpn, from, attr)?;
        if let Some(a) = attr.access {
            inner.access = a;
        }
        if let Some(dest) = attr.dest {
            inner.peer = self.resolve_peer(&dest);
            inner.dest = Some(dest);
        }
        if let Some(m) = attr.path_mtu {
            inner.mtu = u64::from(m.bytes());
        }
        if to != QpState::Sqd {
            self.stop.store(false, Ordering::SeqCst);
        }
        match to {
            QpState::Reset => {
                // What an ERR the engine has not got to yet flushed is still owed its completions.
                if from == QpState::Err && !inner.busy {
                    self.flush(inner);
                }
                // RESET discards the queues without completions, as verbs does.
                inner.sq.clear();
                inner.rq.clear();
                inner.dest = None;
                inner.peer = Weak::new();
                self.partial.store(false, Ordering::SeqCst);
                self.set_state(inner, to);
            }
            QpState::Err => {
                // Nothing can start from here on; the engine completes what is queued as flushed
                // on its next turn, after this returns — as a NIC flushes asynchronously. The
                // caller (a revoke quiescing many QPs) does not pay for the completions.
                self.set_state(inner, QpState::Err);
                self.ring_flush(inner);
            }
            QpState::Sqd => {
                if from != QpState::Sqd {
                    inner.sqd_budget = inner.sq.len();
                }
                self.set_state(inner, to);
                if inner.sqd_budget == 0 && !inner.busy {
                    self.nic
                        .event("SQ_DRAINED", Some(self.qpn), "nothing in flight".into());
                }
            }
            _ => self.set_state(inner, to),
        }
        tracing::trace!(nic = %self.nic.name, qpn = self.qpn, %from, %to, "modify");
        self.doorbell(inner);
        Ok(())
    }

    pub(crate) fn resolve_peer(&self, dest: &RemoteQp) -> Weak<SimQp> {
        self.nic
            .network
            .find(&dest.gid)
            .and_then(|nic| super::read(&nic.qps).get(&dest.qpn).cloned())
            .unwrap_or_default()
    }
}

/// Wrapper so `post_send` can ring the doorbell with an `Arc<SimQp>`.
impl QpBackend for Arc<SimQp> {
    fn qpn(&self) -> u32 {
        self.qpn
    }

    fn state(&self) -> QpState {
        lock(&self.inner).state
    }

    fn endpoint(&self) -> RemoteQp {
        RemoteQp::verbs(self.qpn, self.nic.gid, 0, self.sq_psn)
    }

    fn modify(&self, attr: &QpAttr) -> Result<()> {
        NicShared::driver_call(&self.nic.call_latency);
        let mut inner = lock(&self.inner);
        let r = self.modify_locked(&mut inner, attr);
        let waiters = inner.take_waiters();
        drop(inner);
        waiters.into_iter().for_each(|f| f());
        r
    }

    /// Like a hardware provider, the simulator checks each request as it takes it: the first
    /// bad one (too many elements, too long, no room) stops the batch, and what came before it
    /// is posted.
    fn post_send(&self, wrs: &[SendWr]) -> (usize, Result<()>) {
        let mut inner = lock(&self.inner);
        let (taken, r) = crate::wr::take_prefix(wrs, |wr| {
            self.caps
                .check_send(self.qpn, inner.state, inner.sq.len(), wr)?;
            inner.sq.push_back(*wr);
            Ok(())
        });
        if taken > 0 {
            if inner.state == QpState::Err {
                if !inner.busy {
                    self.flush(&mut inner);
                }
            } else {
                self.doorbell(&mut inner);
            }
        }
        (taken, r)
    }

    fn post_recv(&self, wrs: &[RecvWr]) -> (usize, Result<()>) {
        let mut inner = lock(&self.inner);
        let (taken, r) = crate::wr::take_prefix(wrs, |wr| {
            self.caps
                .check_recv(self.qpn, inner.state, inner.rq.len(), wr)?;
            inner.rq.push_back(*wr);
            Ok(())
        });
        if taken > 0 && inner.state == QpState::Err && !inner.busy {
            self.flush(&mut inner);
        }
        (taken, r)
    }

    fn quiesce(&self, to: Option<QpState>, f: Box<dyn FnOnce() + Send>) -> (Result<()>, bool) {
        NicShared::driver_call(&self.nic.call_latency);
        let mut inner = lock(&self.inner);
        let r = to.map_or(Ok(()), |s| self.modify_locked(&mut inner, &QpAttr::to(s)));
        inner.quiesce_waiters.push(f);
        let waiters = inner.take_waiters();
        drop(inner);
        waiters.into_iter().for_each(|f| f());
        (r, true)
    }

    fn flush_stopped(&self) -> Result<bool> {
        NicShared::driver_call(&self.nic.call_latency);
        let mut inner = lock(&self.inner);
        if inner.state != QpState::Sqd {
            return Ok(false);
        }
        let r = self.modify_locked(&mut inner, &QpAttr::to(QpState::Err));
        let waiters = inner.take_waiters();
        drop(inner);
        waiters.into_iter().for_each(|f| f());
        r.map(|()| true)
    }

    fn stop_at_boundary(&self, f: Box<dyn FnOnce() + Send>) -> (Result<()>, bool) {
        NicShared::driver_call(&self.nic.call_latency);
        let mut inner = lock(&self.inner);
        let r = if inner.state == QpState::Rts {
            // SQD with nothing left to start: the engine finishes the request under way and
            // puts back the rest of its turn.
            self.stop.store(true, Ordering::SeqCst);
            let r = self.modify_locked(&mut inner, &QpAttr::to(QpState::Sqd));
            inner.sqd_budget = 0;
            r
        } else {
            // Already stopping, draining or in ERR: quiescent as far as it goes.
            Ok(())
        };
        inner.quiesce_waiters.push(f);
        let waiters = inner.take_waiters();
        drop(inner);
        waiters.into_iter().for_each(|f| f());
        (r, true)
    }
}
