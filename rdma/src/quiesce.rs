//! Revoke by quiescing — the importer side of the contract in `dmaplane_core::revoke`, written
//! once for every backend.
//!
//! When an exporter invalidates memory an MR maps ([`RdmaImporter::invalidate`], which never
//! blocks):
//! 1. the MR is marked revoked: every later post that names its key fails at once with
//!    [`RdmaError::Revoked`] carrying the epoch (posts check under the QP's lock, and the scan in
//!    step 3 takes the same lock, so no post slips between the mark and the scan);
//! 2. every peer holding a lease on its rkey is sent `LeaseRevoke`; each stops posting to it,
//!    quiesces its own requests that target it, and answers `LeaseAck`. A peer that has not
//!    answered by the cut-off (three quarters of the way to the exporter's deadline) is cut off:
//!    the zap goes ahead and its later accesses fail at the NIC with remote-access errors;
//! 3. every local QP with outstanding requests that use the MR is quiesced by the attachment's
//!    [`QuiescePolicy`]: `Boundary` (the default) stops it at the next message boundary (SQD:
//!    the message under way completes, every packet of it) and then flushes what did not start,
//!    or flushes at its deadline; `Flush` moves it to ERR at once (what has not started
//!    completes as flushed; a message under way is cut between two packets, which breaks the
//!    connection); `Drain` moves it to SQD so what was posted before completes, up to a deadline
//!    after which it is flushed;
//! 4. once every QP is quiescent (the backend says so, or every outstanding completion has been
//!    reaped) and every lease is settled, the MR's translation is zapped and the fence is
//!    signalled. Drained QPs go back to RTS; flushed ones do when `recover` was asked for, as
//!    soon as their flushed completions are reaped (resuming their PSNs, which the peer's
//!    responder kept). Every posted request gets exactly one completion.
//!
//! `invalidate` itself makes only step 1 and queues step 2's messages (a full queue or a dead
//! link fails at once, never blocks). A QP whose lock the data path holds is visited from the
//! timer thread once free. Where the backend's driver calls block (`ibv_modify_qp` and
//! `ibv_dereg_mr` wait for firmware: verbs, or the simulator with a call latency), every QP
//! modify and the zap are made on the tracker's worker thread (`dmaplane-quiesce`) instead.
//!
//! A remote holder quiesces its own requests to the region by the owner's policy (carried in
//! `LeaseRevoke`). With `Flush` a multi-packet WRITE cut in the middle leaves the owner's
//! responder mid-message, which breaks the connection; `Boundary` never cuts a message, so it
//! is safe for any request size and is the default. A packet already on the wire cannot land
//! after the fence either way: the zap comes first and waits for accesses under way.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use dmaplane_core::{
    AddrList, AddrSpace, AttachError, Attachment, Importer, ImporterKind, Invalidation, SpaceKind,
};
use serde::Serialize;

use dmaplane_core::counter::Counter;

use crate::access::MrAccess;
use crate::backend::{DeviceBackend, MrRequest};
use crate::device::{Mr, MrMap, MrShared, Pd, QpLedger, QpShared};
use crate::error::{RdmaError, Result};
use crate::inject::{Fault, Injected};
use crate::lease::{ControlMsg, RemoteMr};
use crate::qp::{QpAttr, QpState};
use crate::sync::{lock, read, try_lock, write};
use crate::timer::Timer;
use crate::wr::{RemoteAddr, Sge};

/// The first look at a polled boundary stop ([`QpBackend::sq_draining`]), and the longest
/// wait between two looks.
///
/// [`QpBackend::sq_draining`]: crate::backend::QpBackend::sq_draining
const BOUNDARY_POLL_FIRST: Duration = Duration::from_micros(20);
const BOUNDARY_POLL_MAX: Duration = Duration::from_millis(1);

/// How an attachment's queue pairs are quiesced on revoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "policy", rename_all = "kebab-case")]
pub enum QuiescePolicy {
    /// Stop affected QPs at the next message boundary (the message under way completes), then
    /// flush what did not start; flush anyway at `deadline`. Safe for any request size.
    Boundary { deadline: Duration },
    /// Move affected QPs to ERR at once: fastest, but a multi-packet message under way is cut,
    /// which breaks its connection.
    Flush,
    /// Move them to SQD and let what was posted finish, up to `deadline`; then flush.
    Drain { deadline: Duration },
}

impl QuiescePolicy {
    /// The default: [`QuiescePolicy::Boundary`], flushing after 100 ms.
    pub const DEFAULT: QuiescePolicy = QuiescePolicy::Boundary {
        deadline: Duration::from_millis(100),
    };

    /// A policy from a peer: its deadline is bounded.
    fn bounded(self) -> QuiescePolicy {
        let cap = |d: Duration| d.min(Duration::from_secs(10));
        match self {
            QuiescePolicy::Boundary { deadline } => QuiescePolicy::Boundary {
                deadline: cap(deadline),
            },
            QuiescePolicy::Drain { deadline } => QuiescePolicy::Drain {
                deadline: cap(deadline),
            },
            QuiescePolicy::Flush => QuiescePolicy::Flush,
        }
    }
}

impl Default for QuiescePolicy {
    fn default() -> Self {
        QuiescePolicy::DEFAULT
    }
}

/// Options for [`Pd::import`].
#[derive(Debug, Clone, Copy)]
pub struct ImportOptions {
    pub access: MrAccess,
    pub kind: ImporterKind,
    pub policy: QuiescePolicy,
    /// Bring flushed QPs back to RTS once their completions are reaped.
    pub recover: bool,
    /// Register only bytes `[offset, offset + len)` of the export (`Some((offset, len))`, both
    /// multiples of the export's granule), not all of it; the MR's iova is the range's first
    /// address. A revoke of the export still invalidates it.
    pub range: Option<(u64, u64)>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            access: MrAccess::ALL,
            kind: ImporterKind::Pinned,
            policy: QuiescePolicy::DEFAULT,
            recover: true,
            range: None,
        }
    }
}

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

/// How an imported MR came to be.
#[derive(Debug, Clone)]
pub(crate) struct ImportInfo {
    pub(crate) summary: String,
    pub(crate) opts: ImportOptions,
}

/// Counters of the quiesce machinery, per device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QuiesceStats {
    pub invalidations: u64,
    /// QPs stopped at a message boundary (then flushed).
    pub qps_stopped: u64,
    pub qps_flushed: u64,
    pub qps_drained: u64,
    pub drains_timed_out: u64,
    pub leases_revoked: u64,
    pub lease_acks: u64,
    pub holders_cut_off: u64,
}

#[derive(Debug, Default)]
struct Counters {
    invalidations: Counter,
    qps_stopped: Counter,
    qps_flushed: Counter,
    qps_drained: Counter,
    drains_timed_out: Counter,
    leases_revoked: Counter,
    lease_acks: Counter,
    holders_cut_off: Counter,
}

/// A countdown: runs its finish once every registered condition is met. Starts with one token
/// held by the setup, so it cannot finish before everything is registered.
pub(crate) struct Pending {
    remaining: AtomicUsize,
    finish: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Pending {
    fn new(finish: impl FnOnce() + Send + 'static) -> Arc<Pending> {
        Arc::new(Pending {
            remaining: AtomicUsize::new(1),
            finish: Mutex::new(Some(Box::new(finish))),
        })
    }
    fn add(&self, n: usize) {
        self.remaining.fetch_add(n, Ordering::SeqCst);
    }
    pub(crate) fn done_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::SeqCst) == 1
            && let Some(f) = lock(&self.finish).take()
        {
            f();
        }
    }
}

/// A wait on completions, for backends that cannot report quiescence themselves.
struct SeqWait {
    qpn: u32,
    send: u64,
    recv: u64,
    latch: Arc<Pending>,
}

struct LeaseWait {
    waiting: Vec<[u8; 16]>,
    latch: Arc<Pending>,
}

/// What [`Tracker::for_each_qp`] does under one QP's track lock (maybe later, from the timer).
type QpVisit = Arc<dyn Fn(&Tracker, &Arc<QpShared>, &mut QpLedger) + Send + Sync>;

/// Leases this device holds, by (owner GID, rkey).
type Leases = HashMap<([u8; 16], u32), Arc<RemoteMr>>;

/// Per-device bookkeeping: registrations, queue pairs, leases held, quiesces in progress.
pub(crate) struct Tracker {
    pub(crate) name: String,
    pub(crate) gid: [u8; 16],
    pub(crate) mrs: RwLock<MrMap>,
    pub(crate) qps: RwLock<HashMap<u32, Weak<QpShared>>>,
    remotes: RwLock<Leases>,
    seq_waits: Mutex<Vec<SeqWait>>,
    n_seq_waits: AtomicUsize,
    lease_waits: Mutex<HashMap<(u32, u64), LeaseWait>>,
    timer: Timer,
    /// Where driver calls go that may block (see [`Tracker::offload`]): QP modifies and zaps.
    worker: Timer,
    /// The device, asked whether its driver calls block.
    device: Weak<dyn DeviceBackend>,
    counters: Counters,
    pub(crate) injected: Injected,
    me: Weak<Tracker>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Tracker {
    pub(crate) fn new(
        name: String,
        gid: [u8; 16],
        device: Weak<dyn DeviceBackend>,
    ) -> Arc<Tracker> {
        Arc::new_cyclic(|me| Tracker {
            name,
            gid,
            mrs: RwLock::new(HashMap::new()),
            qps: RwLock::new(HashMap::new()),
            remotes: RwLock::new(HashMap::new()),
            seq_waits: Mutex::new(Vec::new()),
            n_seq_waits: AtomicUsize::new(0),
            lease_waits: Mutex::new(HashMap::new()),
            timer: Timer::new("dmaplane-timer"),
            worker: Timer::new("dmaplane-quiesce"),
            device,
            counters: Counters::default(),
            injected: Injected::default(),
            me: me.clone(),
        })
    }

    /// Whether driver calls (a QP modify, a zap) may block: `ibv_modify_qp` and
    /// `ibv_dereg_mr` are firmware commands that take from tens of microseconds to milliseconds.
    /// Then `invalidate`, which must not block, leaves them to the worker thread: only the mark
    /// (step 1) and the lease messages (queued, never blocking) are made inline.
    fn offload(&self) -> bool {
        self.device.upgrade().is_some_and(|d| d.calls_block())
    }

    /// Run `job` now, or on the worker thread when driver calls may block.
    fn run_driver_calls(&self, job: impl FnOnce() + Send + 'static) {
        if self.offload() {
            self.worker.at(Instant::now(), job);
        } else {
            job();
        }
    }

    pub(crate) fn stats(&self) -> QuiesceStats {
        let c = &self.counters;
        QuiesceStats {
            invalidations: c.invalidations.get(),
            qps_stopped: c.qps_stopped.get(),
            qps_flushed: c.qps_flushed.get(),
            qps_drained: c.qps_drained.get(),
            drains_timed_out: c.drains_timed_out.get(),
            leases_revoked: c.leases_revoked.get(),
            lease_acks: c.lease_acks.get(),
            holders_cut_off: c.holders_cut_off.get(),
        }
    }

    pub(crate) fn add_mr(&self, key: u32, mr: &Arc<MrShared>) {
        let mut m = write(&self.mrs);
        m.retain(|_, w| w.strong_count() > 0);
        m.insert(key, Arc::downgrade(mr));
    }

    pub(crate) fn add_remote(&self, r: Arc<RemoteMr>) {
        let old = write(&self.remotes).insert((r.owner, r.rkey), r.clone());
        // A post that checked the lease being replaced must fail its re-check, not slip past
        // a revoke that only marks the new one.
        if let Some(old) = old
            && !Arc::ptr_eq(&old, &r)
        {
            let _ = old
                .revoked
                .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    /// Post-time check of a local scatter/gather element.
    pub(crate) fn check_local(
        &self,
        sge: &Sge,
        need: MrAccess,
        what: &dyn Fn() -> String,
    ) -> Result<Arc<MrShared>> {
        let mr = read(&self.mrs).get(&sge.lkey).and_then(Weak::upgrade);
        let Some(mr) = mr else {
            return Err(RdmaError::BadKey {
                what: what(),
                key_kind: "lkey",
                key: sge.lkey,
            });
        };
        local_revoked(&mr, sge.lkey, what)?;
        let k = read(&mr.backend).keys();
        let (start, len) = (k.iova, k.len);
        let end = sge.addr.checked_add(u64::from(sge.length));
        if sge.addr < start || end.is_none_or(|e| e > start + len) {
            return Err(RdmaError::OutOfBounds {
                what: what(),
                key: sge.lkey,
                addr: sge.addr,
                len: u64::from(sge.length),
                start,
                mr_len: len,
            });
        }
        if !mr.access.contains(need) {
            return Err(RdmaError::AccessDenied {
                what: what(),
                key: sge.lkey,
                have: mr.access,
                need,
            });
        }
        Ok(mr)
    }

    /// Post-time check of a one-sided target against the lease we hold on it, if any.
    pub(crate) fn check_remote(
        &self,
        owner: [u8; 16],
        remote: RemoteAddr,
        len: u64,
        need: MrAccess,
        what: &dyn Fn() -> String,
    ) -> Result<Option<Arc<RemoteMr>>> {
        let r = read(&self.remotes).get(&(owner, remote.rkey)).cloned();
        let Some(r) = r else { return Ok(None) };
        remote_revoked(&r, what)?;
        let end = remote.addr.checked_add(len);
        if remote.addr < r.addr || end.is_none_or(|e| e > r.addr + r.len) {
            return Err(RdmaError::OutOfBounds {
                what: what(),
                key: remote.rkey,
                addr: remote.addr,
                len,
                start: r.addr,
                mr_len: r.len,
            });
        }
        if !r.access.contains(need) {
            return Err(RdmaError::AccessDenied {
                what: what(),
                key: remote.rkey,
                have: r.access,
                need,
            });
        }
        Ok(Some(r))
    }

    fn live_qps(&self) -> Vec<Arc<QpShared>> {
        read(&self.qps).values().filter_map(Weak::upgrade).collect()
    }

    /// Run `visit` under each live QP's track lock. A QP whose lock is held right now (the data
    /// path posting or reaping) is not waited for — `invalidate` must not block: it is visited
    /// from the timer thread once its lock is free, and counted on `latch` until then, so the
    /// fence cannot go before it is quiesced. A post that held the lock is seen by that visit.
    fn for_each_qp(&self, latch: &Arc<Pending>, visit: QpVisit) {
        let offload = self.offload();
        for qp in self.live_qps() {
            if !offload && let Some(mut t) = try_lock(&qp.track) {
                visit(self, &qp, &mut t);
                continue;
            }
            latch.add(1);
            let (me, l, v) = (self.me.clone(), latch.clone(), visit.clone());
            let runner = if offload { &self.worker } else { &self.timer };
            runner.at(Instant::now(), move || {
                if let Some(tracker) = me.upgrade() {
                    v(&tracker, &qp, &mut lock(&qp.track));
                }
                l.done_one();
            });
        }
    }

    /// Register "the completions of requests up to (`send`, `recv`) are reaped" as one
    /// condition of `latch`. Called with the QP's track lock held (`t`).
    fn wait_reaped(
        &self,
        qp: &QpShared,
        t: &mut QpLedger,
        send: u64,
        recv: u64,
        latch: &Arc<Pending>,
    ) {
        latch.add(1);
        lock(&self.seq_waits).push(SeqWait {
            qpn: qp.qpn,
            send,
            recv,
            latch: latch.clone(),
        });
        self.n_seq_waits.fetch_add(1, Ordering::SeqCst);
        // The completions may all be in already.
        self.completions_reaped(qp, t);
    }

    /// Called with the QP's track lock held after completions were matched.
    pub(crate) fn completions_reaped(&self, qp: &QpShared, t: &mut QpLedger) {
        if self.n_seq_waits.load(Ordering::SeqCst) > 0 {
            let mut done = Vec::new();
            {
                let mut w = lock(&self.seq_waits);
                w.retain(|s| {
                    let hit = s.qpn == qp.qpn && t.send.done >= s.send && t.recv.done >= s.recv;
                    if hit {
                        done.push(s.latch.clone());
                    }
                    !hit
                });
                self.n_seq_waits.store(w.len(), Ordering::SeqCst);
            }
            done.iter().for_each(|l| l.done_one());
        }
        qp.try_recover(t);
    }

    /// Step 1–4 for one MR (see the module docs).
    fn quiesce_mr(&self, mr: &Arc<MrShared>, inv: &Invalidation, opts: ImportOptions) {
        self.counters.invalidations.add(1);
        if self.injected.is(Fault::EarlyFence) {
            inv.fence.signal();
        }
        mr.revoked.store(inv.epoch + 1, Ordering::SeqCst);
        let (lkey, rkey) = {
            let b = read(&mr.backend);
            (b.lkey(), b.rkey())
        };
        let fence = inv.fence.clone();
        let zap_mr = mr.clone();
        let name = self.name.clone();
        let zap = !self.injected.is(Fault::NoZap);
        let me = self.me.clone();
        let latch = Pending::new(move || {
            let zap_and_signal = move || {
                if zap && let Err(e) = read(&zap_mr.backend).zap() {
                    tracing::error!(device = %name, error = %e, "zap failed");
                }
                fence.signal();
            };
            match me.upgrade() {
                Some(t) => t.run_driver_calls(zap_and_signal),
                None => zap_and_signal(),
            }
        });
        // Step 2: leases.
        let holders = lock(&mr.holders).clone();
        if !holders.is_empty() {
            self.counters.leases_revoked.add(holders.len() as u64);
            latch.add(holders.len());
            lock(&self.lease_waits).insert(
                (rkey, inv.epoch),
                LeaseWait {
                    waiting: holders.iter().map(|h| h.gid).collect(),
                    latch: latch.clone(),
                },
            );
            let now = Instant::now();
            let cut = now + inv.fence.deadline().saturating_duration_since(now) * 3 / 4;
            let me = self.me.clone();
            let epoch = inv.epoch;
            self.timer.at(cut, move || {
                if let Some(t) = me.upgrade() {
                    t.cut_off(rkey, epoch);
                }
            });
            for h in &holders {
                let msg = ControlMsg::LeaseRevoke {
                    owner: self.gid,
                    rkey,
                    epoch: inv.epoch,
                    policy: opts.policy,
                };
                if let Err(e) = h.link.send(msg) {
                    // It will never ack: cut off now rather than at the deadline.
                    self.counters.holders_cut_off.add(1);
                    tracing::warn!(device = %self.name, peer = %h.link.peer(), error = %e, "lease revoke not delivered: holder cut off");
                    self.settle_lease(rkey, inv.epoch, h.gid);
                }
            }
        }
        // Step 3: local queue pairs using the MR.
        let skip_qps = self.injected.is(Fault::NoQpQuiesce);
        let l = latch.clone();
        self.for_each_qp(
            &latch,
            Arc::new(move |me: &Tracker, qp: &Arc<QpShared>, t: &mut QpLedger| {
                if skip_qps {
                    return;
                }
                let uses = t.send.live().any(|s| t.send.slot(s).uses_lkey(lkey))
                    || t.recv.live().any(|s| t.recv.slot(s).uses_lkey(lkey));
                if uses {
                    me.quiesce_qp(qp, t, opts.policy, &l, opts.recover);
                }
            }),
        );
        latch.done_one();
    }

    /// Quiesce one QP whose outstanding requests may touch the region, count it on `latch`,
    /// and arm the return to RTS when `recover`.
    ///
    /// All of it under the QP's track lock (`t`), which recovery (`bring_up`) holds too: the
    /// waiter, the modify and the recovery arm cannot interleave with a QP on its way back to
    /// RTS (a drain would otherwise find it in INIT or RTR, skip SQD and wait for ever), nor
    /// with the data path matching completions. Recovery is armed after the modify.
    fn quiesce_qp(
        &self,
        qp: &Arc<QpShared>,
        t: &mut QpLedger,
        policy: QuiescePolicy,
        latch: &Arc<Pending>,
        recover: bool,
    ) {
        if let QuiescePolicy::Boundary { deadline } = policy {
            return self.stop_qp(qp, t, deadline, latch);
        }
        let to = match policy {
            QuiescePolicy::Flush => {
                self.counters.qps_flushed.add(1);
                Some(QpState::Err)
            }
            QuiescePolicy::Boundary { .. } => None,
            QuiescePolicy::Drain { deadline } => {
                self.counters.qps_drained.add(1);
                self.arm_drain_deadline(qp, t, deadline);
                // Only a QP in RTS moves to SQD; one already in SQD or ERR is on its way.
                (qp.backend.state() == QpState::Rts).then_some(QpState::Sqd)
            }
        };
        latch.add(1);
        let l = latch.clone();
        let (r, tells) = qp.backend.quiesce(to, Box::new(move || l.done_one()));
        if !tells {
            // The backend cannot say when nothing executes: wait for the completions of
            // everything posted so far (the flush or drain produces them) instead.
            self.wait_reaped(qp, t, t.send.posted, t.recv.posted, latch);
            latch.done_one();
        }
        if let Err(e) = r {
            // A QP already in ERR or RESET is quiescent as it is.
            tracing::debug!(device = %self.name, qpn = qp.qpn, error = %e, "quiesce modify");
        }
        // A drained QP always goes back to RTS (nothing was lost); a flushed one when asked.
        if recover || matches!(policy, QuiescePolicy::Drain { .. }) {
            t.recover_pending = true;
            // Everything may be reaped already; then nobody else would come by.
            qp.try_recover(t);
        }
    }

    /// [`QuiescePolicy::Boundary`] for one QP (under its track lock `t`): stop at the message
    /// boundary, then flush what did not start; the latch counts it done once nothing executes.
    /// When every outstanding request fits one packet no message can be cut, and the QP is
    /// flushed at once (the faster path, with the same guarantee). A backend that cannot say
    /// when it stopped is flushed at once too (then a message under way may be cut).
    fn stop_qp(
        &self,
        qp: &Arc<QpShared>,
        t: &mut QpLedger,
        deadline: Duration,
        latch: &Arc<Pending>,
    ) {
        let mtu = t.conn.map_or(256, |c| u64::from(c.mtu.bytes()));
        if t.longest_send <= mtu {
            return self.quiesce_qp(qp, t, QuiescePolicy::Flush, latch, true);
        }
        self.arm_drain_deadline(qp, t, deadline);
        latch.add(1);
        let state = qp.backend.state();
        if state != QpState::Rts && qp.backend.sq_draining().is_some() {
            // An earlier stop is under way (SQD: its message may still be on the wire) or its
            // flush is (ERR), not yet recovered: join it. Flushing here would cut the message
            // that stop lets finish, and the responder would refuse the next request after
            // recovery (remote invalid request).
            self.counters.qps_stopped.add(1);
            tracing::debug!(device = %self.name, qpn = qp.qpn, %state, "boundary stop joins the one under way");
            self.watch_boundary(qp, latch.clone(), BOUNDARY_POLL_FIRST);
            t.recover_pending = true;
            qp.try_recover(t);
            return;
        }
        let l = latch.clone();
        let weak = Arc::downgrade(qp);
        let (r, tells) = qp.backend.stop_at_boundary(Box::new(move || {
            // Nothing executes and nothing can start: the fence may go, and what stayed
            // queued (it would touch the revoked memory) completes flushed.
            if let Some(q) = weak.upgrade()
                && let Err(e) = q.backend.modify(&QpAttr::to(QpState::Err))
            {
                tracing::debug!(qpn = q.qpn, error = %e, "flush after the boundary");
            }
            l.done_one();
        }));
        if let Err(e) = &r {
            tracing::debug!(device = %self.name, qpn = qp.qpn, error = %e, "stop at boundary");
        }
        if tells {
            self.counters.qps_stopped.add(1);
        } else if r.is_ok() && qp.backend.sq_draining().is_some() {
            // The backend cannot call back but can be asked: watch the drain from the timer
            // thread (it counts `latch` done for the call back that was dropped).
            self.counters.qps_stopped.add(1);
            self.watch_boundary(qp, latch.clone(), BOUNDARY_POLL_FIRST);
        } else {
            // Counted as what it is: a flush (a message under way may be cut, so say why).
            self.counters.qps_flushed.add(1);
            tracing::warn!(
                device = %self.name,
                qpn = qp.qpn,
                %state,
                stop = ?r.as_ref().err(),
                draining = ?qp.backend.sq_draining(),
                "boundary stop not possible: flushing"
            );
            if let Err(e) = qp.backend.modify(&QpAttr::to(QpState::Err)) {
                tracing::debug!(device = %self.name, qpn = qp.qpn, error = %e, "flush");
            }
            self.wait_reaped(qp, t, t.send.posted, t.recv.posted, latch);
            latch.done_one();
        }
        t.recover_pending = true;
        qp.try_recover(t);
    }

    /// The end of a boundary stop on a backend that is polled ([`QpBackend::sq_draining`]):
    /// every `poll` (doubling up to [`BOUNDARY_POLL_MAX`]) until the message under way is
    /// acknowledged; then what did not start is flushed, and `latch` is counted done once
    /// every completion is reaped (the backend cannot say when its flush is over). A QP the
    /// drain deadline already flushed is waited for the same way; one that went back to RTS
    /// (everything completed and recovery ran) is quiescent as it is.
    fn watch_boundary(&self, qp: &Arc<QpShared>, latch: Arc<Pending>, poll: Duration) {
        let weak = Arc::downgrade(qp);
        let me = self.me.clone();
        self.timer.at(Instant::now() + poll, move || {
            let (Some(qp), Some(tr)) = (weak.upgrade(), me.upgrade()) else {
                // The QP or its device is gone: nothing of it can execute.
                latch.done_one();
                return;
            };
            let mut t = lock(&qp.track);
            let state = qp.backend.state();
            tracing::trace!(qpn = qp.qpn, %state, outstanding = t.send.outstanding(), ?poll, "boundary watch");
            match state {
                // Every request completed: nothing executes, whatever the provider's drain flag
                // says; back to RTS, nothing to flush.
                QpState::Sqd if t.send.outstanding() == 0 => {
                    t.recover_pending = true;
                    qp.try_recover(&mut t);
                    latch.done_one();
                }
                QpState::Sqd if qp.backend.sq_draining() == Some(true) => {
                    drop(t);
                    tr.watch_boundary(&qp, latch, (poll * 2).min(BOUNDARY_POLL_MAX));
                }
                QpState::Sqd | QpState::Err => {
                    if state == QpState::Sqd
                        && let Err(e) = qp.backend.modify(&QpAttr::to(QpState::Err))
                    {
                        tracing::debug!(qpn = qp.qpn, error = %e, "flush after the boundary");
                    }
                    let (send, recv) = (t.send.posted, t.recv.posted);
                    tr.wait_reaped(&qp, &mut t, send, recv, &latch);
                    latch.done_one();
                    t.recover_pending = true;
                    qp.try_recover(&mut t);
                }
                _ => latch.done_one(),
            }
        });
    }

    /// At the drain deadline, a QP still draining is flushed — if the stop that armed the
    /// deadline is still the QP's latest (under its track lock `t`).
    fn arm_drain_deadline(&self, qp: &Arc<QpShared>, t: &mut QpLedger, deadline: Duration) {
        t.stops += 1;
        let stop = t.stops;
        let weak = Arc::downgrade(qp);
        let me = self.me.clone();
        self.timer.at(Instant::now() + deadline, move || {
            let (Some(qp), Some(t)) = (weak.upgrade(), me.upgrade()) else {
                return;
            };
            // Under the track lock: a reaper cannot bring the QP back to RTS between the look
            // and the flush (which would put a recovered QP into ERR).
            let mut tr = lock(&qp.track);
            if tr.stops != stop {
                // Its stop ended and a later one began: that one has its own deadline.
                return;
            }
            let state = qp.backend.state();
            if state == QpState::Sqd && tr.send.outstanding() > 0 {
                t.counters.drains_timed_out.add(1);
                tracing::warn!(device = %t.name, qpn = qp.qpn, "drain deadline passed: flushing");
                if let Err(e) = qp.backend.modify(&QpAttr::to(QpState::Err)) {
                    tracing::error!(qpn = qp.qpn, error = %e, "flush after drain failed");
                }
                tr.recover_pending = true;
            } else if state == QpState::Sqd {
                // Drained, but its recovery found the provider's drain flag still up.
                qp.try_recover(&mut tr);
            }
        });
    }

    /// The holder side of `LeaseRevoke`, and the owner side of `LeaseAck`.
    pub(crate) fn on_control(&self, msg: ControlMsg) {
        match msg {
            ControlMsg::LeaseRevoke {
                owner,
                rkey,
                epoch,
                policy,
            } => {
                let policy = policy.bounded();
                tracing::debug!(device = %self.name, rkey, epoch, "lease revoke received");
                // The entry stays (marked) so a post racing with this revoke still sees it.
                let Some(remote) = read(&self.remotes).get(&(owner, rkey)).cloned() else {
                    tracing::debug!(device = %self.name, rkey, "revoke of a lease we do not hold");
                    return;
                };
                if self.injected.is(Fault::IgnoreLeaseRevoke) {
                    return;
                }
                if self.injected.is(Fault::AckThenWrite) {
                    let ack = ControlMsg::LeaseAck {
                        holder: self.gid,
                        rkey,
                        epoch,
                    };
                    if let Err(e) = remote.link.send(ack) {
                        tracing::warn!(error = %e, "lease ack not delivered");
                    }
                    return;
                }
                // The epoch comes from the peer: one that cannot be stored is refused.
                let Some(mark) = epoch.checked_add(1) else {
                    tracing::warn!(device = %self.name, rkey, epoch, "lease revoke with an impossible epoch ignored");
                    return;
                };
                remote.revoked.store(mark, Ordering::SeqCst);
                let me = self.gid;
                let r2 = remote.clone();
                let latch = Pending::new(move || {
                    let ack = ControlMsg::LeaseAck {
                        holder: me,
                        rkey,
                        epoch,
                    };
                    if let Err(e) = r2.link.send(ack) {
                        tracing::warn!(error = %e, "lease ack not delivered");
                    }
                });
                let l = latch.clone();
                self.for_each_qp(
                    &latch,
                    Arc::new(move |me: &Tracker, qp: &Arc<QpShared>, t: &mut QpLedger| {
                        let to_owner = t.conn.is_some_and(|c| c.dest.gid == owner);
                        let uses = to_owner
                            && t.send.live().any(|s| {
                                let sl = t.send.slot(s);
                                sl.one_sided && sl.rkey == rkey
                            });
                        match policy {
                            _ if !uses => {}
                            QuiescePolicy::Drain { .. } => {
                                // Other traffic on the QP goes on; wait for ours to complete.
                                me.wait_reaped(qp, t, t.send.posted, 0, &l);
                            }
                            p => me.quiesce_qp(qp, t, p, &l, true),
                        }
                    }),
                );
                latch.done_one();
            }
            ControlMsg::LeaseAck {
                holder,
                rkey,
                epoch,
            } => {
                self.counters.lease_acks.add(1);
                self.settle_lease(rkey, epoch, holder);
            }
        }
    }

    fn settle_lease(&self, rkey: u32, epoch: u64, holder: [u8; 16]) {
        let latch = {
            let mut w = lock(&self.lease_waits);
            let Some(lw) = w.get_mut(&(rkey, epoch)) else {
                return;
            };
            let Some(i) = lw.waiting.iter().position(|g| *g == holder) else {
                return;
            };
            lw.waiting.swap_remove(i);
            let l = lw.latch.clone();
            if lw.waiting.is_empty() {
                w.remove(&(rkey, epoch));
            }
            l
        };
        latch.done_one();
    }

    /// The lease deadline passed: whoever has not acknowledged is cut off.
    fn cut_off(&self, rkey: u32, epoch: u64) {
        let Some(lw) = lock(&self.lease_waits).remove(&(rkey, epoch)) else {
            return;
        };
        for g in &lw.waiting {
            self.counters.holders_cut_off.add(1);
            tracing::warn!(device = %self.name, rkey, holder = ?g, "lease holder did not acknowledge: cut off");
            lw.latch.done_one();
        }
    }
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
        let opts = self
            .shared
            .import
            .as_ref()
            .map(|i| i.opts)
            .unwrap_or_default();
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
        let opts = self
            .shared
            .import
            .as_ref()
            .map(|i| i.opts)
            .unwrap_or_default();
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

/// [`RdmaError::Revoked`] when `mr` (named by `lkey`) has been invalidated.
pub(crate) fn local_revoked(mr: &MrShared, lkey: u32, what: &dyn Fn() -> String) -> Result<()> {
    if mr.lkey.load(Ordering::Acquire) != u64::from(lkey) {
        return Err(RdmaError::Revoked {
            what: format!("{}: MR {:#x}", what(), lkey),
            epoch: mr.revoked.load(Ordering::Acquire).saturating_sub(1),
            why: "the region was re-registered after its memory moved: post with its new key"
                .into(),
        });
    }
    match mr.revoked.load(Ordering::Acquire) {
        0 => Ok(()),
        rev => Err(RdmaError::Revoked {
            what: format!("{}: MR {:#x}", what(), lkey),
            epoch: rev - 1,
            why: "its exporter invalidated the memory".into(),
        }),
    }
}

/// [`RdmaError::Revoked`] when the lease on `r` has been withdrawn.
pub(crate) fn remote_revoked(r: &RemoteMr, what: &dyn Fn() -> String) -> Result<()> {
    match r.revoked.load(Ordering::Acquire) {
        0 => Ok(()),
        rev => Err(RdmaError::Revoked {
            what: format!("{}: remote MR {:#x} of {}", what(), r.rkey, r.owner_name),
            epoch: rev - 1,
            why: "its owner withdrew the lease".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
