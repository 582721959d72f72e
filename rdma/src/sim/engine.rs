//! The NIC's engine: one thread per simulated NIC that takes work requests from queue pairs whose
//! doorbell rang, checks them as hardware does, and moves the bytes with fabric DMA.
//!
//! The requester's engine also plays the responder (the wire is instant): it checks the remote
//! key, bounds, rights and QP state on the peer NIC and issues the peer-side DMA as the peer
//! NIC's fabric device, so each side is held to its own grants.
//!
//! A WRITE or READ moves in packets of the path MTU, copied in bursts of whole packets (at
//! most [`BURST`] bytes and at most a quarter of the message; one packet at the least). Between
//! two bursts the engine lets go of the regions' translations and the fabric windows whenever a
//! zap or a revoke waits for them, so it waits for one burst, never for a whole message — and
//! meets a message half landed. (Per-packet memcpy would cost a fifth of the bandwidth on this
//! kind of machine; bursts of 64 KiB copy faster than one big memcpy.) Between bursts the engine
//! also looks at the QP: once it is in ERR the rest of the message is not sent, the request completes flushed with its region partly written, and (for a WRITE) the
//! responder is left mid-message: the next request it gets breaks the connection, as the PSN
//! gap does on a ConnectX NIC. Only RESET and a new connection repair it. Stopping at a message
//! boundary (SQD, [`crate::quiesce::QuiescePolicy::Boundary`]) never cuts a message.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use dmaplane_core::fabric::{DeviceId, DmaFault};

use crate::access::MrAccess;
use crate::qp::QpState;
use crate::wc::{Completion, WcOpcode, WcStatus};
use crate::wr::{SendOp, SendWr, Sge};

use super::mr::{MrFault, SimMr};
use super::qp::{QpInner, SimQp};
use super::{NicShared, lock};

/// The most bytes copied between two looks at the QP and at who waits for the memory.
pub(crate) const BURST: u64 = 64 << 10;

/// The burst for a message of `total` bytes: whole packets, at most [`BURST`] and at most a
/// quarter of the message, so every message of more than one packet can be met half landed.
fn burst(total: u64, mtu: u64) -> u64 {
    let mtu = mtu.max(1);
    (total / 4).next_multiple_of(mtu).clamp(mtu, BURST.max(mtu))
}

/// Requests one QP may run before the engine moves on to the next (fairness).
const QP_BUDGET: usize = 32;
/// Payload bytes after which a turn ends early.
const TURN_BYTES: u64 = 64 << 10;
/// Idle spins before the engine parks.
const SPINS: u32 = 2000;

#[derive(Debug, Default)]
pub(crate) struct NicEngine {
    ready: Mutex<VecDeque<Arc<SimQp>>>,
    cv: Condvar,
    parked: AtomicBool,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl NicEngine {
    pub(crate) fn ring(&self, qp: Arc<SimQp>) {
        lock(&self.ready).push_back(qp);
        if self.parked.load(Ordering::SeqCst) {
            self.cv.notify_one();
        }
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cv.notify_all();
        if let Some(t) = lock(&self.thread).take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

pub(crate) fn start(nic: &Arc<NicShared>) {
    let weak = Arc::downgrade(nic);
    let name = format!("sim-nic-{}", nic.name);
    let cpus = nic.engine_cpus.clone();
    let nic_name = nic.name.clone();
    let handle = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            if !cpus.is_empty()
                && let Err(e) = dmaplane_core::cpu::pin_current(&cpus)
            {
                tracing::warn!(nic = %nic_name, error = %e, "engine left unpinned");
            }
            run(weak)
        })
        .ok();
    if handle.is_none() {
        tracing::error!(nic = %nic.name, "could not start the NIC engine thread");
    }
    *lock(&nic.engine.thread) = handle;
}

fn run(weak: Weak<NicShared>) {
    let mut scratch = Scratch::default();
    let mut idle = 0u32;
    loop {
        let Some(nic) = weak.upgrade() else { return };
        let e = &nic.engine;
        if e.stop.load(Ordering::SeqCst) {
            return;
        }
        let next = lock(&e.ready).pop_front();
        match next {
            Some(qp) => {
                idle = 0;
                if process(&qp, &mut scratch) {
                    e.ring(qp);
                }
            }
            None if idle < SPINS => {
                idle += 1;
                std::hint::spin_loop();
                if idle.is_multiple_of(64) {
                    std::thread::yield_now();
                }
            }
            None => {
                let mut ready = lock(&e.ready);
                e.parked.store(true, Ordering::SeqCst);
                while ready.is_empty() && !e.stop.load(Ordering::SeqCst) {
                    ready = crate::sync::wait_timeout(&e.cv, ready, Duration::from_millis(50)).0;
                }
                e.parked.store(false, Ordering::SeqCst);
                idle = 0;
            }
        }
    }
}

#[derive(Debug, Default)]
struct Scratch {
    src: Vec<(u64, u64)>,
    dst: Vec<(u64, u64)>,
    /// The requests taken in one turn, and the completions they produce.
    wrs: Vec<SendWr>,
    wcs: Vec<Completion>,
}

/// Run up to [`QP_BUDGET`] requests of `qp` in one turn. True when it should go back on the
/// ready list.
///
/// The turn's requests are taken under one lock and their completions pushed under one lock,
/// so the data path pays the QP and CQ locks once per turn, not once per request. Between two
/// requests the engine looks at the QP state: once it is in ERR, nothing more starts — the rest
/// of the turn completes as flushed — so a flush waits for at most the one request under way.
fn process(qp: &Arc<SimQp>, s: &mut Scratch) -> bool {
    let peer = {
        let mut inner = lock(&qp.inner);
        s.wrs.clear();
        take(qp, &mut inner, &mut s.wrs);
        if s.wrs.is_empty() {
            inner.queued = false;
            return false;
        }
        inner.busy = true;
        (inner.peer.clone(), inner.mtu)
    };
    let (peer, mtu) = peer;
    s.wcs.clear();
    let mut ran = 0;
    let mut failed = false;
    for i in 0..s.wrs.len() {
        match qp.fast_state() {
            QpState::Rts => {}
            // Stopping at a boundary: what this turn took and did not start goes back.
            QpState::Sqd if qp.stop.load(Ordering::SeqCst) => break,
            QpState::Sqd => {}
            _ => break,
        }
        let wr = s.wrs[i];
        let (status, byte_len) = execute(qp, &wr, &peer, mtu, &mut s.src, &mut s.dst);
        ran = i + 1;
        if wr.signaled || !status.is_ok() {
            s.wcs
                .push(qp.wc(wr.wr_id, status, wr.op.wc_opcode(), byte_len, None));
        }
        if !status.is_ok() {
            tracing::debug!(nic = %qp.nic.name, qpn = qp.qpn, wr_id = wr.wr_id, %status, "request failed: QP to ERR");
            failed = true;
            break;
        }
    }
    let mut inner = lock(&qp.inner);
    inner.busy = false;
    if failed && inner.state != QpState::Err {
        qp.set_state(&mut inner, QpState::Err);
    }
    if inner.state == QpState::Err {
        // Taken but not started: flushed, in order, before anything still queued.
        for wr in &s.wrs[ran..] {
            s.wcs
                .push(qp.wc(wr.wr_id, WcStatus::WrFlushErr, wr.op.wc_opcode(), 0, None));
        }
    } else if inner.state == QpState::Sqd && ran < s.wrs.len() {
        // Stopped at a boundary: not started, so back to the head of the queue, in order.
        for wr in s.wrs[ran..].iter().rev() {
            inner.sq.push_front(*wr);
        }
    }
    // (In RESET the rest is discarded without completions, as verbs does.)
    qp.send_cq.push(&s.wcs);
    if inner.state == QpState::Err {
        qp.flush(&mut inner);
    }
    if inner.state == QpState::Sqd && inner.sqd_budget == 0 {
        qp.nic
            .event("SQ_DRAINED", Some(qp.qpn), "send queue drained".into());
    }
    let waiters = inner.take_waiters();
    let more = !inner.sq.is_empty()
        && match inner.state {
            QpState::Rts => true,
            QpState::Sqd => inner.sqd_budget > 0,
            _ => false,
        };
    inner.queued = more;
    drop(inner);
    waiters.into_iter().for_each(|f| f());
    more
}

/// Take the requests that may start this turn (all queued ones in RTS up to the budget; in SQD
/// only those posted before the drain).
fn take(qp: &SimQp, inner: &mut QpInner, out: &mut Vec<SendWr>) {
    let n = match inner.state {
        QpState::Rts => QP_BUDGET,
        QpState::Sqd => {
            let n = inner.sqd_budget.min(QP_BUDGET);
            inner.sqd_budget -= n;
            n
        }
        QpState::Err => {
            qp.flush(inner);
            return;
        }
        _ => return,
    };
    // Completions are pushed at the end of a turn: bound its bytes too, so a turn of large
    // requests does not hold back the first one's completion.
    let mut bytes = 0u64;
    let mut k = 0;
    for wr in inner.sq.iter().take(n) {
        k += 1;
        bytes += wr.sg.total();
        if bytes >= TURN_BYTES {
            break;
        }
    }
    if inner.state == QpState::Sqd {
        inner.sqd_budget += n - k;
    }
    out.extend(inner.sq.drain(..k));
    if !out.is_empty()
        && inner.peer.strong_count() == 0
        && let Some(dest) = inner.dest
    {
        inner.peer = qp.resolve_peer(&dest);
    }
}

type Outcome = (WcStatus, u32);

fn local_mr(qp: &SimQp, sge: &Sge) -> Result<Arc<SimMr>, WcStatus> {
    match qp.nic.mr(sge.lkey) {
        Some(mr) if mr.pd == qp.pd => Ok(mr),
        _ => Err(WcStatus::LocProtErr),
    }
}

/// Responder-side key check; a violation also moves the responder QP to ERR, as on hardware.
fn remote_mr(
    peer: &SimQp,
    rkey: u32,
    addr: u64,
    len: u64,
    need: MrAccess,
) -> Result<Arc<SimMr>, WcStatus> {
    let qp_allows = lock(&peer.inner).access.contains(need);
    let fault = match peer.nic.mr(rkey) {
        None => Some(MrFault::Key),
        Some(mr) if mr.pd != peer.pd => Some(MrFault::Pd),
        Some(_) if !qp_allows => Some(MrFault::Access),
        Some(mr) => match mr.check(addr, len, need) {
            Ok(()) => return Ok(mr),
            Err(f) => Some(f),
        },
    };
    if let Some(f) = fault {
        peer.nic.event(
            "QP_ACCESS_ERR",
            Some(peer.qpn),
            format!("rkey {rkey:#x} [{addr:#x}, +{len:#x}) refused: {f:?}"),
        );
        let mut inner = lock(&peer.inner);
        if inner.state != QpState::Err {
            peer.to_error(&mut inner);
        }
    }
    Err(WcStatus::RemAccessErr)
}

fn peer_ready(peer: &Weak<SimQp>) -> Result<Arc<SimQp>, WcStatus> {
    let p = peer.upgrade().ok_or(WcStatus::RetryExcErr)?;
    match p.fast_state() {
        QpState::Rtr | QpState::Rts | QpState::Sqd => Ok(p),
        _ => Err(WcStatus::RetryExcErr),
    }
}

fn execute(
    qp: &SimQp,
    wr: &SendWr,
    peer: &Weak<SimQp>,
    mtu: u64,
    src: &mut Vec<(u64, u64)>,
    dst: &mut Vec<(u64, u64)>,
) -> Outcome {
    match run_wr(qp, wr, peer, mtu, &mut Segs { src, dst }) {
        Ok(n) => (WcStatus::Success, n),
        Err(st) => (st, 0),
    }
}

/// Segment lists reused between requests.
struct Segs<'a> {
    src: &'a mut Vec<(u64, u64)>,
    dst: &'a mut Vec<(u64, u64)>,
}

fn run_wr(
    qp: &SimQp,
    wr: &SendWr,
    peer: &Weak<SimQp>,
    mtu: u64,
    s: &mut Segs<'_>,
) -> Result<u32, WcStatus> {
    let total = wr.sg.total();
    let total32 = u32::try_from(total).map_err(|_| WcStatus::LocLenErr)?;
    let local_need = if wr.op.writes_local() {
        MrAccess::LOCAL_WRITE
    } else {
        MrAccess::NONE
    };
    let peer = peer_ready(peer)?;
    if peer.partial.load(Ordering::SeqCst) {
        // The responder still waits for the rest of a message that was cut: this request's
        // first packet is out of sequence. The connection is broken on both sides.
        peer.nic.event(
            "QP_FATAL",
            Some(peer.qpn),
            "request after a message cut in the middle: connection broken".into(),
        );
        let mut pin = lock(&peer.inner);
        if pin.state != QpState::Err {
            peer.to_error(&mut pin);
        }
        return Err(WcStatus::RetryExcErr);
    }
    match wr.op {
        SendOp::RdmaWrite | SendOp::RdmaWriteWithImm(_) | SendOp::RdmaRead => {
            let read = matches!(wr.op, SendOp::RdmaRead);
            let need = if read {
                MrAccess::REMOTE_READ
            } else {
                MrAccess::REMOTE_WRITE
            };
            let rmr = remote_mr(&peer, wr.remote.rkey, wr.remote.addr, total, need)?;
            if let SendOp::RdmaWriteWithImm(_) = wr.op
                && lock(&peer.inner).rq.is_empty()
            {
                return Err(WcStatus::RnrRetryExcErr);
            }
            let mut raddr = wr.remote.addr;
            let mut sent = 0u64;
            for sge in wr.sg.as_slice() {
                let lmr = local_mr(qp, sge)?;
                let len = u64::from(sge.length);
                let mut off = 0;
                while off < len {
                    // Between two packets: flushed (cut the message) or a zap waits (let go of
                    // the translations; taking them again finds the region zapped).
                    let stop = std::cell::Cell::new(None);
                    let mut go_on = || {
                        let why = if qp.fast_state() == QpState::Err {
                            Some(Stop::Flushed)
                        } else if lmr.zapping() || rmr.zapping() {
                            Some(Stop::Zap)
                        } else {
                            None
                        };
                        stop.set(why);
                        why.is_none()
                    };
                    if sent > 0 && !go_on() && stop.get() == Some(Stop::Flushed) {
                        return Err(cut(qp, &peer, read, sent, total));
                    }
                    let n = len - off;
                    s.src.clear();
                    s.dst.clear();
                    let l = lmr.with_segments(sge.addr + off, n, local_need, |it| {
                        s.src.extend(it);
                        rmr.with_segments(raddr + off, n, need, |rit| {
                            s.dst.extend(rit);
                            let (from, to, devs) = if read {
                                (&*s.dst, &*s.src, (peer.nic.dev, qp.nic.dev))
                            } else {
                                (&*s.src, &*s.dst, (qp.nic.dev, peer.nic.dev))
                            };
                            copy(qp, devs, from, to, burst(total, mtu), &mut go_on)
                        })
                    });
                    let moved = match l {
                        Err(_) => return Err(WcStatus::LocProtErr),
                        Ok(Err(_)) => return Err(WcStatus::RemAccessErr),
                        Ok(Ok(r)) => r?,
                    };
                    off += moved;
                    sent += moved;
                    if off < len && stop.get() == Some(Stop::Flushed) {
                        return Err(cut(qp, &peer, read, sent, total));
                    }
                }
                raddr += len;
            }
            if let SendOp::RdmaWriteWithImm(imm) = wr.op {
                let mut pin = lock(&peer.inner);
                if let Some(rwr) = pin.rq.pop_front() {
                    let wc = peer.wc(
                        rwr.wr_id,
                        WcStatus::Success,
                        WcOpcode::RecvRdmaWithImm,
                        total32,
                        Some(imm),
                    );
                    peer.recv_cq.push(&[wc]);
                }
            }
            Ok(total32)
        }
        SendOp::Send | SendOp::SendWithImm(_) => {
            let imm = match wr.op {
                SendOp::SendWithImm(i) => Some(i),
                _ => None,
            };
            // The source first: a local fault must not consume the responder's receive.
            s.src.clear();
            for sge in wr.sg.as_slice() {
                let lmr = local_mr(qp, sge)?;
                lmr.with_segments(sge.addr, u64::from(sge.length), MrAccess::NONE, |it| {
                    s.src.extend(it)
                })
                .map_err(|_| WcStatus::LocProtErr)?;
            }
            // Hold the responder's lock for the copy: its flush cannot overtake this receive.
            let mut pin = lock(&peer.inner);
            if pin.state == QpState::Err {
                return Err(WcStatus::RetryExcErr);
            }
            let Some(rwr) = pin.rq.pop_front() else {
                return Err(WcStatus::RnrRetryExcErr);
            };
            let recv_fail = |pin: &mut QpInner, st: WcStatus| {
                let wc = peer.wc(rwr.wr_id, st, WcOpcode::Recv, 0, None);
                peer.recv_cq.push(&[wc]);
                // Its own engine may be mid-turn: then it flushes after that turn's completions.
                peer.to_error(pin);
            };
            if total > rwr.sg.total() {
                recv_fail(&mut pin, WcStatus::LocLenErr);
                return Err(WcStatus::RemInvReqErr);
            }
            s.dst.clear();
            let mut left = total;
            for sge in rwr.sg.as_slice() {
                if left == 0 {
                    break;
                }
                let n = left.min(u64::from(sge.length));
                let ok = peer.nic.mr(sge.lkey).filter(|m| m.pd == peer.pd).map(|m| {
                    m.with_segments(sge.addr, n, MrAccess::LOCAL_WRITE, |it| s.dst.extend(it))
                });
                if !matches!(ok, Some(Ok(()))) {
                    recv_fail(&mut pin, WcStatus::LocProtErr);
                    return Err(WcStatus::RemOpErr);
                }
                left -= n;
            }
            // Receive buffers are the responder's; the translation was checked above and the
            // fabric checks the grants again during the copy. A SEND is never cut.
            let r = copy(
                qp,
                (qp.nic.dev, peer.nic.dev),
                s.src,
                s.dst,
                u64::MAX,
                &mut || true,
            );
            if let Err(st) = r {
                recv_fail(&mut pin, WcStatus::LocProtErr);
                return Err(st);
            }
            let wc = peer.wc(rwr.wr_id, WcStatus::Success, WcOpcode::Recv, total32, imm);
            peer.recv_cq.push(&[wc]);
            Ok(total32)
        }
    }
}

/// A message cut after `sent` of its `total` bytes: it completes flushed; a WRITE leaves its
/// responder mid-message (see the module docs).
fn cut(qp: &SimQp, peer: &SimQp, read: bool, sent: u64, total: u64) -> WcStatus {
    qp.nic.event(
        "MESSAGE_CUT",
        Some(qp.qpn),
        format!(
            "{} flushed after {sent} of {total} bytes",
            if read { "READ" } else { "WRITE" }
        ),
    );
    if !read {
        peer.partial.store(true, Ordering::SeqCst);
    }
    WcStatus::WrFlushErr
}

/// Why a message stopped between two packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The QP went to ERR: the rest is never sent.
    Flushed,
    /// A zap waits for one of the regions' translations.
    Zap,
}

/// Copy `src` segments (read by `devs.0`) into `dst` segments (written by `devs.1`) in bursts
/// of `mtu` bytes, asking `go_on` between two bursts; returns the bytes moved (fewer than asked
/// when `go_on` said stop).
fn copy(
    qp: &SimQp,
    devs: (DeviceId, DeviceId),
    src: &[(u64, u64)],
    dst: &[(u64, u64)],
    mtu: u64,
    go_on: &mut dyn FnMut() -> bool,
) -> Result<u64, WcStatus> {
    let fabric = &qp.nic.fabric;
    let (mut i, mut j) = (0, 0);
    let (mut so, mut d_o) = (0u64, 0u64);
    let mut moved = 0u64;
    while i < src.len() && j < dst.len() {
        let (sa, sl) = src[i];
        let (da, dl) = dst[j];
        let n = (sl - so).min(dl - d_o);
        if moved > 0 && !go_on() {
            return Ok(moved);
        }
        let got = fabric
            .dma_transfer_packets((devs.0, sa + so), (devs.1, da + d_o), n, mtu, go_on)
            .map_err(|f: DmaFault| {
                if f.device == qp.nic.dev {
                    WcStatus::LocProtErr
                } else {
                    WcStatus::RemAccessErr
                }
            })?;
        moved += got;
        if got < n {
            return Ok(moved);
        }
        so += n;
        d_o += n;
        if so == sl {
            i += 1;
            so = 0;
        }
        if d_o == dl {
            j += 1;
            d_o = 0;
        }
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::burst;

    #[test]
    fn bursts_are_whole_packets_a_quarter_of_the_message_at_most_64k() {
        assert_eq!(burst(4096, 4096), 4096);
        assert_eq!(burst(8192, 4096), 4096);
        assert_eq!(burst(64 << 10, 4096), 16 << 10);
        assert_eq!(burst(1 << 20, 4096), 64 << 10);
        assert_eq!(burst(100, 1024), 1024);
        assert_eq!(burst(1 << 20, 1024), 64 << 10);
        assert_eq!(burst(5000, 1024), 2048);
    }
}
