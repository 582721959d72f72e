//! The TCP backend's RC queue pair: the state machine, the queues, what is on the wire, and
//! flushing.
//!
//! Ordering rule: send completions are made in order, under the QP lock, by `settle` only —
//! from the front of `inflight` (messages started, in order), then, once the QP is in ERR and
//! nothing is in flight, everything still queued as flushed. Whoever learns an outcome (the
//! requester's sender for a local failure, its receiver for the responder's answer) records it
//! on the message and calls [`TcpQp::finish`].
//!
//! `finish` runs the quiesce callbacks (outside the lock) **before** the completions that made
//! the QP quiescent are pushed to the CQ: the quiesce layer's callback moves a stopped QP to
//! ERR, and its recovery starts once every completion is reaped. Were the completions visible
//! first, recovery could bring the QP back to RTS and the callback then flush it for good.
//! Completions wait in an outbox, in order, and are pushed by whoever finishes next — the
//! callback's own modify included — so no completion overtakes another.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::access::MrAccess;
use crate::backend::QpBackend;
use crate::error::{RdmaError, Result};
use crate::qp::{QpAttr, QpCaps, QpState, RemoteQp, check_modify};
use crate::soft_cq::SoftCq;
use crate::sync::lock;
use crate::wc::{Completion, WcOpcode, WcStatus};
use crate::wr::{RecvWr, SendWr, Sge};

use super::NicShared;
use super::mr::TcpMr;

/// A message started on the wire, waiting for its answer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sent {
    pub(crate) wr: SendWr,
    pub(crate) seq: u32,
    /// Its outcome once known: (status, bytes).
    pub(crate) outcome: Option<(WcStatus, u32)>,
    /// READ: response bytes landed so far.
    pub(crate) got: u64,
}

pub(crate) struct QpInner {
    pub(crate) state: QpState,
    pub(crate) access: MrAccess,
    pub(crate) dest: Option<RemoteQp>,
    pub(crate) sq: VecDeque<SendWr>,
    pub(crate) inflight: VecDeque<Sent>,
    pub(crate) rq: VecDeque<RecvWr>,
    /// In SQD: requests posted before the drain that may still start.
    pub(crate) sqd_budget: usize,
    /// In SQD: stop at the next message boundary (start nothing) rather than drain.
    pub(crate) stop: bool,
    /// Bumped by RESET: a requester connection of an older generation ends.
    pub(crate) generation: u64,
    /// A requester connection (dialing or open) serves this generation.
    pub(crate) worker: bool,
    /// `flush` was sent on the current connection.
    pub(crate) flush_sent: bool,
    /// The current connection's receiver has ended: nothing more will be answered on it.
    pub(crate) receiver_done: bool,
    /// The responder connection this QP serves now (a newer proven one replaces it).
    pub(crate) responder: u64,
    /// As a responder: a message was cut in the middle; the next request breaks the connection.
    pub(crate) partial: bool,
    /// As a responder: the receive at the front of `rq` is being filled (a SEND, or a WRITE's
    /// immediate, under way). It stays queued until `complete_recv`; a flush waits for it, so
    /// receives complete in order and none is reported flushed while bytes still land in it.
    pub(crate) receiving: bool,
    pub(crate) quiesce_waiters: Vec<Box<dyn FnOnce() + Send>>,
    /// Completions made and not yet pushed (see the module docs): send CQ, receive CQ.
    pub(crate) outbox: (Vec<Completion>, Vec<Completion>),
    /// Batches of quiesce callbacks running now (the outbox waits for them).
    pub(crate) calling: u32,
    /// The sender waits for the messages before its next one to be answered (the
    /// shared-memory path): `settle` wakes it.
    pub(crate) awaiting_answers: bool,
    /// The sender is copying a message through a view (the shared-memory path): the QP is
    /// not quiescent until it stops, whatever was recorded of the message meanwhile.
    pub(crate) copying: bool,
}

impl std::fmt::Debug for QpInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QpInner")
            .field("state", &self.state)
            .field("sq", &self.sq.len())
            .field("inflight", &self.inflight.len())
            .field("rq", &self.rq.len())
            .finish_non_exhaustive()
    }
}

impl QpInner {
    /// Nothing executes and nothing can start: every message started has been answered (or
    /// its connection ended, which the responder does only once it takes no more frames). A
    /// sender still writing the tail of a message that was answered already (failed) writes
    /// into a connection that is shut: nothing of it lands.
    pub(crate) fn quiesced(&self) -> bool {
        self.inflight.is_empty()
            && !self.copying
            && match self.state {
                QpState::Err | QpState::Reset => true,
                QpState::Sqd => self.stop || self.sqd_budget == 0,
                _ => false,
            }
    }

    /// Whether the sender may start the next queued message now.
    pub(crate) fn may_start(&self) -> bool {
        !self.sq.is_empty()
            && match self.state {
                QpState::Rts => true,
                QpState::Sqd => !self.stop && self.sqd_budget > 0,
                _ => false,
            }
    }
}

#[derive(Debug)]
pub(crate) struct TcpQp {
    pub(crate) qpn: u32,
    pub(crate) nic: Arc<NicShared>,
    pub(crate) pd: u32,
    pub(crate) send_cq: Arc<SoftCq>,
    pub(crate) recv_cq: Arc<SoftCq>,
    caps: QpCaps,
    sq_psn: u32,
    /// What a requester proves it holds (see the module docs of `tcp`).
    pub(crate) token: [u8; 16],
    state: AtomicU8,
    pub(crate) inner: Mutex<QpInner>,
    /// The sender waits here for work or a state change.
    pub(crate) cv: Condvar,
}

impl TcpQp {
    pub(crate) fn new(
        nic: Arc<NicShared>,
        pd: u32,
        qpn: u32,
        send_cq: Arc<SoftCq>,
        recv_cq: Arc<SoftCq>,
        caps: QpCaps,
    ) -> Result<Arc<TcpQp>> {
        caps.check_soft(qpn)?;
        let token = super::random::<16>().ok_or_else(|| RdmaError::Backend {
            device: nic.name.clone(),
            op: "create_qp",
            why: "no random bytes for the queue pair's connection token".into(),
        })?;
        Ok(Arc::new(TcpQp {
            qpn,
            pd,
            sq_psn: qpn.wrapping_mul(2_654_435_761) & 0xff_ffff,
            token,
            send_cq,
            recv_cq,
            caps,
            state: AtomicU8::new(QpState::Reset.ibv() as u8),
            inner: Mutex::new(QpInner {
                state: QpState::Reset,
                access: MrAccess::NONE,
                dest: None,
                sq: VecDeque::new(),
                inflight: VecDeque::new(),
                rq: VecDeque::new(),
                sqd_budget: 0,
                stop: false,
                generation: 0,
                worker: false,
                flush_sent: false,
                receiver_done: false,
                responder: 0,
                partial: false,
                receiving: false,
                quiesce_waiters: Vec::new(),
                outbox: (Vec::new(), Vec::new()),
                calling: 0,
                awaiting_answers: false,
                copying: false,
            }),
            cv: Condvar::new(),
            nic,
        }))
    }

    /// The state without the lock.
    pub(crate) fn fast_state(&self) -> QpState {
        QpState::from_ibv(u32::from(self.state.load(Ordering::Acquire))).unwrap_or(QpState::Err)
    }

    pub(crate) fn set_state(&self, inner: &mut QpInner, s: QpState) {
        inner.state = s;
        self.state.store(s.ibv() as u8, Ordering::Release);
        self.cv.notify_all();
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

    /// The local regions of `sges`, checked for `need` (`None`: a local protection error).
    pub(crate) fn local_mrs(&self, sges: &[Sge], need: MrAccess) -> Option<Vec<Arc<TcpMr>>> {
        sges.iter()
            .map(|sge| {
                let mr = self.nic.mr(sge.lkey).filter(|m| m.pd == self.pd)?;
                mr.check(sge.addr, u64::from(sge.length), need).ok()?;
                Some(mr)
            })
            .collect()
    }

    /// Record `outcome` for message `seq` of the current connection (a failure moves the QP to
    /// ERR); [`TcpQp::finish`] then completes it. Unknown sequence numbers are ignored: the
    /// message was settled already.
    pub(crate) fn resolve(&self, inner: &mut QpInner, seq: u32, outcome: (WcStatus, u32)) {
        if let Some(s) = inner.inflight.iter_mut().find(|s| s.seq == seq)
            && s.outcome.is_none()
        {
            s.outcome = Some(outcome);
        }
        if !outcome.0.is_ok() && inner.state != QpState::Err {
            tracing::debug!(nic = %self.nic.name, qpn = self.qpn, seq, status = %outcome.0, "request failed: QP to ERR");
            self.set_state(inner, QpState::Err);
        }
    }

    /// The connection ended: the first message still unanswered gets `status`, those after it
    /// are flushed (the QP is in ERR from the first failure on); [`TcpQp::finish`] completes
    /// them.
    pub(crate) fn resolve_all(&self, inner: &mut QpInner, status: WcStatus) {
        let mut failed = false;
        for s in inner.inflight.iter_mut().filter(|s| s.outcome.is_none()) {
            let st = if failed { WcStatus::WrFlushErr } else { status };
            s.outcome = Some((st, 0));
            failed = true;
        }
        if failed && inner.state != QpState::Err {
            self.set_state(inner, QpState::Err);
        }
    }

    /// Make the completions that are due, in order, into the outbox (see the module docs);
    /// returns the quiesce callbacks due.
    fn settle(&self, inner: &mut QpInner) -> Vec<Box<dyn FnOnce() + Send>> {
        while let Some(s) = inner.inflight.front() {
            let Some((status, n)) = s.outcome else { break };
            if s.wr.signaled || !status.is_ok() {
                let wc = self.wc(s.wr.wr_id, status, s.wr.op.wc_opcode(), n, None);
                inner.outbox.0.push(wc);
            }
            inner.inflight.pop_front();
            // A sender waiting for the messages before its own to be answered looks again.
            if inner.awaiting_answers {
                self.cv.notify_all();
            }
        }
        if inner.state == QpState::Err && inner.inflight.is_empty() {
            let flushed = inner
                .sq
                .drain(..)
                .map(|wr| self.wc(wr.wr_id, WcStatus::WrFlushErr, wr.op.wc_opcode(), 0, None))
                .collect::<Vec<_>>();
            inner.outbox.0.extend(flushed);
            if !inner.receiving {
                let flushed = inner
                    .rq
                    .drain(..)
                    .map(|wr| self.wc(wr.wr_id, WcStatus::WrFlushErr, WcOpcode::Recv, 0, None))
                    .collect::<Vec<_>>();
                inner.outbox.1.extend(flushed);
            }
        }
        if !inner.quiesced() || inner.quiesce_waiters.is_empty() {
            return Vec::new();
        }
        if inner.state == QpState::Sqd {
            self.nic
                .event("SQ_DRAINED", Some(self.qpn), "send queue drained".into());
        }
        std::mem::take(&mut inner.quiesce_waiters)
    }

    /// Settle (under `inner`, which it releases), run the quiesce callbacks due, then push the
    /// outbox's completions, in order.
    pub(crate) fn finish<'a>(&'a self, mut inner: std::sync::MutexGuard<'a, QpInner>) {
        let waiters = self.settle(&mut inner);
        if !waiters.is_empty() {
            // Until every callback of the batch has run, nothing is pushed — not even by a
            // callback's own modify, or by another thread: a completion made visible would let
            // recovery start while a later callback still moves the QP to ERR.
            inner.calling += 1;
            drop(inner);
            waiters.into_iter().for_each(|f| f());
            inner = lock(&self.inner);
            inner.calling -= 1;
        }
        if inner.calling > 0 {
            return;
        }
        let (send, recv) = std::mem::take(&mut inner.outbox);
        self.send_cq.push(&send);
        self.recv_cq.push(&recv);
        drop(inner);
    }

    /// As a responder: take the receive at the front of the queue for the message under way
    /// (see `receiving`); `None` when none is posted.
    pub(crate) fn begin_recv(&self) -> Option<RecvWr> {
        let mut inner = lock(&self.inner);
        let r = inner.rq.front().copied();
        inner.receiving = r.is_some();
        r
    }

    /// As a responder: the receive `begin_recv` took is done, with `wc` (behind any completion
    /// still in the outbox); a flush that waited for it goes on. Nothing when a RESET discarded
    /// it meanwhile.
    pub(crate) fn complete_recv(&self, wc: Completion) {
        let mut inner = lock(&self.inner);
        if inner.receiving {
            inner.rq.pop_front();
            inner.receiving = false;
            inner.outbox.1.push(wc);
        }
        self.finish(inner);
    }

    /// As a responder: move to ERR because a peer's request broke a rule (the requester is told
    /// with a `nak`).
    pub(crate) fn responder_error(&self, kind: &str, detail: String) {
        self.nic.event(kind, Some(self.qpn), detail);
        let mut inner = lock(&self.inner);
        if inner.state != QpState::Err {
            self.set_state(&mut inner, QpState::Err);
        }
        self.finish(inner);
    }

    /// Start the requester connection for this generation unless one runs.
    fn kick(self: &Arc<Self>, inner: &mut QpInner) {
        if inner.may_start() && !inner.worker {
            inner.worker = true;
            inner.flush_sent = false;
            inner.receiver_done = false;
            (self.nic.start_requester)(self.clone(), inner.generation);
        }
        self.cv.notify_all();
    }

    fn modify_locked(self: &Arc<Self>, inner: &mut QpInner, attr: &QpAttr) -> Result<()> {
        let from = inner.state;
        let to = check_modify(self.qpn, from, attr)?;
        if let Some(a) = attr.access {
            inner.access = a;
        }
        if let Some(dest) = attr.dest {
            inner.dest = Some(dest);
        }
        if to != QpState::Sqd {
            inner.stop = false;
        }
        match to {
            QpState::Reset => {
                // What an ERR still owed is completed; then RESET discards the queues without
                // completions, as verbs does, and ends the connections.
                let owed = self.settle(inner);
                inner.quiesce_waiters.extend(owed);
                inner.sq.clear();
                inner.rq.clear();
                inner.inflight.clear();
                inner.dest = None;
                inner.generation += 1;
                inner.worker = false;
                inner.responder += 1;
                inner.partial = false;
                inner.receiving = false;
                self.set_state(inner, to);
            }
            QpState::Sqd => {
                if from != QpState::Sqd {
                    inner.sqd_budget = inner.sq.len();
                }
                self.set_state(inner, to);
            }
            _ => self.set_state(inner, to),
        }
        tracing::trace!(nic = %self.nic.name, qpn = self.qpn, %from, %to, "modify");
        self.kick(inner);
        Ok(())
    }
}

impl QpBackend for Arc<TcpQp> {
    fn qpn(&self) -> u32 {
        self.qpn
    }

    fn state(&self) -> QpState {
        lock(&self.inner).state
    }

    fn endpoint(&self) -> RemoteQp {
        RemoteQp {
            port: self.nic.port,
            token: self.token,
            ..RemoteQp::verbs(self.qpn, self.nic.gid, 0, self.sq_psn)
        }
    }

    fn modify(&self, attr: &QpAttr) -> Result<()> {
        let mut inner = lock(&self.inner);
        let r = self.modify_locked(&mut inner, attr);
        self.finish(inner);
        r
    }

    fn post_send(&self, wrs: &[SendWr]) -> (usize, Result<()>) {
        let mut inner = lock(&self.inner);
        let (taken, r) = crate::wr::take_prefix(wrs, |wr| {
            self.caps.check_send(
                self.qpn,
                inner.state,
                inner.sq.len() + inner.inflight.len(),
                wr,
            )?;
            inner.sq.push_back(*wr);
            Ok(())
        });
        if taken > 0 {
            self.kick(&mut inner);
        }
        self.finish(inner);
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
        self.finish(inner);
        (taken, r)
    }

    fn quiesce(&self, to: Option<QpState>, f: Box<dyn FnOnce() + Send>) -> (Result<()>, bool) {
        let mut inner = lock(&self.inner);
        let r = to.map_or(Ok(()), |s| self.modify_locked(&mut inner, &QpAttr::to(s)));
        inner.quiesce_waiters.push(f);
        self.finish(inner);
        (r, true)
    }

    fn flush_stopped(&self) -> Result<bool> {
        let mut inner = lock(&self.inner);
        if inner.state != QpState::Sqd {
            return Ok(false);
        }
        let r = self.modify_locked(&mut inner, &QpAttr::to(QpState::Err));
        self.finish(inner);
        r.map(|()| true)
    }

    fn stop_at_boundary(&self, f: Box<dyn FnOnce() + Send>) -> (Result<()>, bool) {
        let mut inner = lock(&self.inner);
        let r = if inner.state == QpState::Rts {
            // SQD with nothing left to start: the message under way is sent whole and
            // answered; the rest stays queued.
            let r = self.modify_locked(&mut inner, &QpAttr::to(QpState::Sqd));
            inner.stop = true;
            inner.sqd_budget = 0;
            r
        } else {
            Ok(())
        };
        inner.quiesce_waiters.push(f);
        self.finish(inner);
        (r, true)
    }

    fn sq_draining(&self) -> Option<bool> {
        let inner = lock(&self.inner);
        Some(inner.state == QpState::Sqd && !inner.quiesced())
    }
}
