//! Revoke by quiescing — the importer side of the contract in `dmaplane_core::revoke`, written
//! once for every backend.
//!
//! When an exporter invalidates memory an MR maps
//! ([`Importer::invalidate`](dmaplane_core::revoke::Importer::invalidate) on
//! [`crate::import::RdmaImporter`], which never blocks):
//! 1. the MR is marked revoked: every later post that names its key fails at once with
//!    [`crate::RdmaError::Revoked`] carrying the epoch (posts check under the QP's lock, and the scan in
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

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use dmaplane_core::Invalidation;

use crate::error::Result;
use crate::inject::Fault;
use crate::lease::{ControlLink, ControlMsg};
use crate::policy::{ImportOptions, QuiescePolicy};
use crate::qp::QpAttr;
use crate::qp_state::QpState;
use crate::sync::{lock, read, try_lock};
use crate::tracker::{
    LeaseWait, LinkId, MrShared, Pending, QpLedger, QpShared, SeqWait, Tracker, link_id,
};

/// The first look at a polled boundary stop ([`QpBackend::sq_draining`]), and the longest
/// wait between two looks.
///
/// [`QpBackend::sq_draining`]: crate::backend::QpBackend::sq_draining
const BOUNDARY_POLL_FIRST: Duration = Duration::from_micros(20);
const BOUNDARY_POLL_MAX: Duration = Duration::from_millis(1);

/// What [`Tracker::for_each_qp`] does under one QP's track lock (maybe later, from the timer).
type QpVisit = Arc<dyn Fn(&Tracker, &Arc<QpShared>, &mut QpLedger) + Send + Sync>;

impl Tracker {
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
    pub(crate) fn quiesce_mr(&self, mr: &Arc<MrShared>, inv: &Invalidation, opts: ImportOptions) {
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
                    // The translation may still reach the memory (a peer on this host may
                    // still map it): no promise is made — the fence stays unsignalled and the
                    // exporter's revoke reports this importer late, at its deadline.
                    tracing::error!(device = %name, error = %e, "zap failed: the fence is not signalled");
                    return;
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
                    waiting: holders.iter().map(|h| (h.gid, h.link.clone())).collect(),
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
                    if h.link.is_open() {
                        tracing::warn!(device = %self.name, peer = %h.link.peer(), error = %e, "lease revoke not delivered: holder cut off");
                    } else {
                        // The usual end of a peer that left: said, not shouted.
                        tracing::info!(device = %self.name, peer = %h.link.peer(), "lease revoke for a holder whose link is closed (it left): cut off");
                    }
                    self.settle_lease(rkey, inv.epoch, h.gid, Some(link_id(&h.link)));
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
            // queued (it would touch the revoked memory) completes flushed — unless the QP
            // already went back to RTS (everything it had completed and was reaped first):
            // then nothing stayed queued, and a flush would leave it in ERR for good.
            if let Some(q) = weak.upgrade()
                && let Err(e) = q.backend.flush_stopped()
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

    /// The holder side of `LeaseRevoke`, and the owner side of `LeaseAck`. `via`: the link it
    /// came over (`None` in one process, where both sides are this program's): then it may
    /// only revoke a lease granted over that link, or settle a holder registered with it.
    pub(crate) fn on_control(&self, msg: ControlMsg, via: Option<LinkId>) {
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
                if let Some(v) = via
                    && link_id(&remote.link) != v
                {
                    self.counters.lease_messages_refused.add(1);
                    tracing::warn!(device = %self.name, rkey, owner = %remote.owner_name, "revoke of a lease granted over another link ignored");
                    return;
                }
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
                self.settle_lease(rkey, epoch, holder, via);
            }
        }
    }

    fn settle_lease(&self, rkey: u32, epoch: u64, holder: [u8; 16], via: Option<LinkId>) {
        let latch = {
            let mut w = lock(&self.lease_waits);
            let Some(lw) = w.get_mut(&(rkey, epoch)) else {
                return;
            };
            let Some(i) = lw
                .waiting
                .iter()
                .position(|(g, l)| *g == holder && via.is_none_or(|v| v == link_id(l)))
            else {
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
        for (g, _) in &lw.waiting {
            self.counters.holders_cut_off.add(1);
            tracing::warn!(device = %self.name, rkey, holder = ?g, "lease holder did not acknowledge: cut off");
            lw.latch.done_one();
        }
    }
}

/// In-process link: delivery is a call into the peer's tracker (a NIC-to-NIC message handled by
/// the peer's firmware; no user thread has to be polling).
#[derive(Debug)]
pub(crate) struct LocalLink {
    pub(crate) peer: Weak<Tracker>,
    pub(crate) name: String,
}

impl ControlLink for LocalLink {
    fn send(&self, msg: ControlMsg) -> Result<()> {
        match self.peer.upgrade() {
            Some(t) => {
                t.on_control(msg, None);
                Ok(())
            }
            None => Err(crate::RdmaError::Connection {
                what: self.name.clone(),
                why: "peer device is gone".into(),
            }),
        }
    }
    fn peer(&self) -> String {
        self.name.clone()
    }
}
