//! Per-device bookkeeping: the registrations and queue pairs a device has, the leases it holds,
//! the quiesces in progress, and the post-time checks against them. The objects it tracks —
//! an MR's shared state ([`MrShared`]), a queue pair's ([`QpShared`]) and its ledger of
//! requests ([`QpLedger`]) — live here with it, since each refers to the other. The revoke
//! protocol that runs on this state is in [`crate::quiesce`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Instant;

use dmaplane_core::Attachment;
use dmaplane_core::counter::Counter;

use crate::access::MrAccess;
use crate::backend::{DeviceBackend, MrBackend, QpBackend};
use crate::error::{RdmaError, Result};
use crate::inject::Injected;
use crate::lease::{Holder, RemoteMr};
use crate::policy::{ImportInfo, ImportOptions, QuiesceStats};
use crate::qp::{Mtu, QpAttr, RemoteQp};
use crate::qp_state::QpState;
use crate::sync::{lock, read, write};
use crate::timer::Timer;
use crate::wr::{MAX_SGE, RecvWr, RemoteAddr, SendWr, Sge};

/// What one registration knows beyond the backend object.
pub(crate) struct MrShared {
    pub(crate) backend: RwLock<Arc<dyn MrBackend>>,
    /// Keys of the current registration (they change when a dynamic importer re-registers).
    pub(crate) lkey: AtomicU64,
    /// 0 while usable; epoch + 1 once invalidated.
    pub(crate) revoked: AtomicU64,
    pub(crate) access: MrAccess,
    pub(crate) holders: Mutex<Vec<Holder>>,
    pub(crate) attachment: Mutex<Option<Attachment>>,
    pub(crate) import: Option<ImportInfo>,
}

impl MrShared {
    /// The options it was imported with (the defaults for a plain registration).
    pub(crate) fn import_opts(&self) -> ImportOptions {
        self.import.as_ref().map(|i| i.opts).unwrap_or_default()
    }
}

impl std::fmt::Debug for MrShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MrShared")
            .field("lkey", &self.lkey)
            .field("revoked", &self.revoked)
            .finish_non_exhaustive()
    }
}

/// Registrations by key, for the post-time checks.
pub(crate) type MrMap = HashMap<u32, Weak<MrShared>>;

/// The request ring of one queue: user wr_ids and the keys each request references, indexed by
/// sequence number (which is what the backend sees as wr_id).
#[derive(Debug)]
pub(crate) struct RequestRing {
    pub(crate) slots: Vec<Slot>,
    pub(crate) posted: u64,
    pub(crate) done: u64,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Slot {
    pub(crate) wr_id: u64,
    pub(crate) lkeys: [u32; MAX_SGE],
    pub(crate) nkeys: u8,
    /// The remote rkey of a one-sided request (0 = none).
    pub(crate) rkey: u32,
    pub(crate) one_sided: bool,
    /// Bytes the request moves (a message longer than the path MTU is several packets).
    pub(crate) len: u64,
}

impl Slot {
    pub(crate) fn uses_lkey(&self, key: u32) -> bool {
        self.lkeys[..usize::from(self.nkeys)].contains(&key)
    }
}

impl RequestRing {
    pub(crate) fn new(cap: u32) -> RequestRing {
        RequestRing {
            slots: vec![Slot::default(); cap.max(1) as usize],
            posted: 0,
            done: 0,
        }
    }
    pub(crate) fn outstanding(&self) -> u64 {
        self.posted - self.done
    }
    pub(crate) fn slot(&self, seq: u64) -> &Slot {
        &self.slots[(seq % self.slots.len() as u64) as usize]
    }
    pub(crate) fn slot_mut(&mut self, seq: u64) -> &mut Slot {
        let n = self.slots.len() as u64;
        &mut self.slots[(seq % n) as usize]
    }
    /// Outstanding sequence numbers.
    pub(crate) fn live(&self) -> std::ops::Range<u64> {
        self.done..self.posted
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Conn {
    pub(crate) port: u8,
    pub(crate) access: MrAccess,
    pub(crate) dest: RemoteQp,
    pub(crate) mtu: Mtu,
}

#[derive(Debug)]
pub(crate) struct QpLedger {
    pub(crate) send: RequestRing,
    pub(crate) recv: RequestRing,
    pub(crate) conn: Option<Conn>,
    /// Return to RTS once every outstanding completion is reaped.
    pub(crate) recover_pending: bool,
    /// The longest send request ever posted: while it fits one packet, no message of this QP
    /// can be cut by a flush.
    pub(crate) longest_send: u64,
    /// Drain and boundary stops begun on this QP: a stop's deadline timer acts only while its
    /// own stop is the latest (a stale one must not flush a later stop early).
    pub(crate) stops: u64,
    pub(crate) scratch_send: Vec<SendWr>,
    pub(crate) scratch_recv: Vec<RecvWr>,
}

#[derive(Debug)]
pub(crate) struct QpShared {
    pub(crate) qpn: u32,
    pub(crate) backend: Arc<dyn QpBackend>,
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) track: Mutex<QpLedger>,
}

impl Drop for QpShared {
    fn drop(&mut self) {
        write(&self.tracker.qps).remove(&self.qpn);
    }
}

impl QpShared {
    pub(crate) fn bring_up(&self, c: &Conn) -> Result<()> {
        self.bring_up_at(c, None)
    }

    /// RESET → RTS; `psns` (send, receive) resume a connection the peer still has.
    pub(crate) fn bring_up_at(&self, c: &Conn, psns: Option<(u32, u32)>) -> Result<()> {
        let b = &self.backend;
        if b.state() != QpState::Reset {
            b.modify(&QpAttr::to(QpState::Reset))?;
        }
        let mut rtr = QpAttr::rtr(c.dest, c.mtu);
        let mut sq_psn = b.endpoint().psn;
        if let Some((sq, rq)) = psns {
            rtr.rq_psn = Some(rq);
            sq_psn = sq;
        }
        b.modify(&QpAttr::init(c.port, c.access))?;
        b.modify(&rtr)?;
        b.modify(&QpAttr::rts(sq_psn))
    }

    /// ERR → RESET → RTS on the same connection, resuming its PSNs (read before the reset,
    /// which forgets them; without them the peer would drop what follows as duplicates: then
    /// it stays in ERR). A QP never connected stays as it is.
    fn out_of_err(&self, t: &QpLedger) -> Result<()> {
        match t.conn {
            Some(c) => {
                let psns = self.backend.next_psns()?;
                self.bring_up_at(&c, psns)
            }
            None => Ok(()),
        }
    }

    /// Back to RTS after a flush once every outstanding completion is reaped.
    pub(crate) fn try_recover(&self, t: &mut QpLedger) {
        if !t.recover_pending || t.send.outstanding() != 0 {
            return;
        }
        let mut state = self.backend.state();
        if state == QpState::Sqd && self.backend.sq_draining() == Some(true) {
            // Every request of ours has completed, yet the provider's drain flag is up (rxe
            // never lowers it when the queue was empty at the stop) and it refuses SQD → RTS
            // while it is (EINVAL). Nothing executes: leave through ERR, which flushes nothing
            // but posted receives (they complete as flushed), and recover from there.
            if let Err(e) = self.backend.modify(&QpAttr::to(QpState::Err)) {
                tracing::warn!(qpn = self.qpn, error = %e, "recovery out of SQD failed");
                t.recover_pending = false;
                return;
            }
            if t.recv.outstanding() != 0 {
                // Recovered once the flushed receives are reaped.
                return;
            }
            state = QpState::Err;
        }
        // Out of SQD only the send queue must be done (receives stay posted across the
        // drain); out of ERR every flushed receive must have been reaped too.
        if state != QpState::Sqd && t.recv.outstanding() != 0 {
            return;
        }
        let r = match state {
            QpState::Err => self.out_of_err(t),
            QpState::Sqd => match self.backend.modify(&QpAttr::to(QpState::Rts)) {
                // A boundary stop's flush came in between (its call back runs on the NIC's
                // side, outside this lock): recover from ERR instead, once the flushed
                // receives are reaped.
                Err(_) if self.backend.state() == QpState::Err => {
                    if t.recv.outstanding() != 0 {
                        return;
                    }
                    self.out_of_err(t)
                }
                other => other,
            },
            _ => Ok(()),
        };
        t.recover_pending = false;
        match r {
            Ok(()) => tracing::debug!(qpn = self.qpn, "recovered to RTS"),
            Err(e) => tracing::warn!(qpn = self.qpn, error = %e, "recovery failed"),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) invalidations: Counter,
    pub(crate) qps_stopped: Counter,
    pub(crate) qps_flushed: Counter,
    pub(crate) qps_drained: Counter,
    pub(crate) drains_timed_out: Counter,
    pub(crate) leases_revoked: Counter,
    pub(crate) lease_acks: Counter,
    pub(crate) holders_cut_off: Counter,
    pub(crate) lease_messages_refused: Counter,
}

/// A countdown: runs its finish once every registered condition is met. Starts with one token
/// held by the setup, so it cannot finish before everything is registered.
pub(crate) struct Pending {
    remaining: AtomicUsize,
    finish: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Pending {
    pub(crate) fn new(finish: impl FnOnce() + Send + 'static) -> Arc<Pending> {
        Arc::new(Pending {
            remaining: AtomicUsize::new(1),
            finish: Mutex::new(Some(Box::new(finish))),
        })
    }
    pub(crate) fn add(&self, n: usize) {
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
pub(crate) struct SeqWait {
    pub(crate) qpn: u32,
    pub(crate) send: u64,
    pub(crate) recv: u64,
    pub(crate) latch: Arc<Pending>,
}

pub(crate) struct LeaseWait {
    /// The holders that have not acknowledged: each GID with the link it was granted over
    /// (two holders may share a GID: processes on one NIC). The link is held, so its address
    /// (its [`LinkId`]) cannot be reused by another while the revoke waits.
    pub(crate) waiting: Vec<([u8; 16], Arc<dyn crate::lease::ControlLink>)>,
    pub(crate) latch: Arc<Pending>,
}

/// Which link a lease was granted over, or a control message arrived on: the address of the
/// link object (one per connection). A control message may only touch the leases of its own
/// link — a GID alone names no peer (processes on one NIC share it, and a peer may declare
/// any).
pub(crate) type LinkId = usize;

pub(crate) fn link_id(link: &Arc<dyn crate::lease::ControlLink>) -> LinkId {
    Arc::as_ptr(link) as *const () as usize
}

/// Leases one owner may grant a device by default ([`crate::Device::limit_leases`]).
pub const MAX_LEASES_PER_OWNER: usize = 1 << 16;

/// Leases this device holds, by (owner GID, rkey).
type Leases = HashMap<([u8; 16], u32), Arc<RemoteMr>>;

/// Per-device bookkeeping: registrations, queue pairs, leases held, quiesces in progress.
pub(crate) struct Tracker {
    pub(crate) name: String,
    pub(crate) gid: [u8; 16],
    pub(crate) mrs: RwLock<MrMap>,
    pub(crate) qps: RwLock<HashMap<u32, Weak<QpShared>>>,
    pub(crate) remotes: RwLock<Leases>,
    /// Leases held per owner (what `remotes` holds of each), and the most one owner may grant
    /// this device ([`crate::Device::limit_leases`]).
    per_owner: Mutex<HashMap<[u8; 16], usize>>,
    max_per_owner: AtomicUsize,
    pub(crate) seq_waits: Mutex<Vec<SeqWait>>,
    pub(crate) n_seq_waits: AtomicUsize,
    pub(crate) lease_waits: Mutex<HashMap<(u32, u64), LeaseWait>>,
    pub(crate) timer: Timer,
    /// Where driver calls go that may block (see [`Tracker::offload`]): QP modifies and zaps.
    pub(crate) worker: Timer,
    /// The device, asked whether its driver calls block.
    pub(crate) device: Weak<dyn DeviceBackend>,
    pub(crate) counters: Counters,
    pub(crate) injected: Injected,
    pub(crate) me: Weak<Tracker>,
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
            per_owner: Mutex::new(HashMap::new()),
            max_per_owner: AtomicUsize::new(MAX_LEASES_PER_OWNER),
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
    pub(crate) fn offload(&self) -> bool {
        self.device.upgrade().is_some_and(|d| d.calls_block())
    }

    /// Run `job` now, or on the worker thread when driver calls may block.
    pub(crate) fn run_driver_calls(&self, job: impl FnOnce() + Send + 'static) {
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
            lease_messages_refused: c.lease_messages_refused.get(),
        }
    }

    pub(crate) fn add_mr(&self, key: u32, mr: &Arc<MrShared>) {
        let mut m = write(&self.mrs);
        m.retain(|_, w| w.strong_count() > 0);
        m.insert(key, Arc::downgrade(mr));
    }

    /// The most leases one owner may grant this device.
    pub(crate) fn limit_leases(&self, n: usize) {
        self.max_per_owner.store(n, Ordering::Relaxed);
    }

    /// Record a lease. Over a link (`bounded`), refused (`false`) when the key's lease is
    /// another link's that is still open (a GID names no peer: a peer declaring another's
    /// must not replace its leases), or when the owner already granted as many other keys as
    /// one owner may — first letting go of the entries of its links that closed (entries stay
    /// otherwise, so a post racing with a revoke still finds the mark).
    pub(crate) fn add_remote(&self, r: Arc<RemoteMr>, bounded: bool) -> bool {
        let mut remotes = write(&self.remotes);
        match remotes.get(&(r.owner, r.rkey)) {
            Some(old)
                if bounded && old.link.is_open() && link_id(&old.link) != link_id(&r.link) =>
            {
                return false;
            }
            Some(_) => {}
            None if !bounded => {}
            None => {
                let mut per = lock(&self.per_owner);
                let max = self.max_per_owner.load(Ordering::Relaxed);
                if per.get(&r.owner).copied().unwrap_or(0) >= max {
                    // Leases over closed links are of no use to anyone: let them go.
                    let before = remotes.len();
                    remotes.retain(|(o, _), l| *o != r.owner || l.link.is_open());
                    let gone = before - remotes.len();
                    if let Some(n) = per.get_mut(&r.owner) {
                        *n = n.saturating_sub(gone);
                    }
                }
                let n = per.entry(r.owner).or_default();
                if *n >= max {
                    return false;
                }
                *n += 1;
            }
        }
        let old = remotes.insert((r.owner, r.rkey), r.clone());
        drop(remotes);
        // A post that checked the lease being replaced must fail its re-check, not slip past
        // a revoke that only marks the new one.
        if let Some(old) = old
            && !Arc::ptr_eq(&old, &r)
        {
            let _ = old
                .revoked
                .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
        }
        true
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
