//! The safe API: device, protection domain, memory region, completion queue, queue pair — one
//! set of types over every backend. Every post is checked against the regions' revoke state and
//! recorded, every completion is matched back to its request, so the quiesce logic in
//! [`crate::quiesce`] knows exactly what is in flight where.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use dmaplane_core::AddrList;

use crate::access::MrAccess;
use crate::backend::{
    AsyncEvent, CqBackend, DeviceBackend, DeviceInfo, MrBackend, MrRequest, PdBackend, Translation,
};
use crate::error::{RdmaError, Result};
use crate::lease::{ControlLink, ControlMsg, Holder, RemoteMr};
use crate::policy::{ImportInfo, QuiesceStats};
use crate::qp::{Mtu, QpAttr, QpCaps, RemoteQp};
use crate::qp_state::QpState;
use crate::quiesce::LocalLink;
use crate::sync::{lock, read, write};
use crate::tracker::{
    Conn, MrShared, QpLedger, QpShared, RequestRing, Slot, Tracker, local_revoked, remote_revoked,
};
use crate::wc::Completion;
use crate::wr::{RecvWr, SendWr, Sge};

/// An RDMA device of any backend.
#[derive(Debug, Clone)]
pub struct Device {
    pub(crate) backend: Arc<dyn DeviceBackend>,
    pub(crate) tracker: Arc<Tracker>,
}

impl Device {
    pub fn new(backend: Arc<dyn DeviceBackend>) -> Device {
        let info = backend.info();
        Device {
            tracker: Tracker::new(info.name.clone(), info.gid, Arc::downgrade(&backend)),
            backend,
        }
    }

    pub fn info(&self) -> DeviceInfo {
        self.backend.info()
    }

    pub fn name(&self) -> &str {
        &self.tracker.name
    }

    pub fn backend(&self) -> &Arc<dyn DeviceBackend> {
        &self.backend
    }

    pub fn alloc_pd(&self) -> Result<Pd> {
        Ok(Pd {
            backend: self.backend.alloc_pd()?,
            dev: self.clone(),
        })
    }

    pub fn create_cq(&self, depth: u32) -> Result<Cq> {
        Ok(Cq {
            backend: self.backend.create_cq(depth)?,
            tracker: self.tracker.clone(),
            scratch: Mutex::new(Vec::new()),
        })
    }

    /// Drain the asynchronous events seen so far.
    pub fn async_events(&self) -> Vec<AsyncEvent> {
        std::iter::from_fn(|| self.backend.poll_async_event()).collect()
    }

    /// Make this device break the revoke contract in one way ([`crate::inject`]); `None`
    /// restores honest behaviour. For tests and `stress revoke --inject` only.
    pub fn inject(&self, fault: Option<crate::Fault>) {
        if let Some(f) = fault {
            tracing::warn!(device = %self.name(), fault = %f, "fault injected");
        }
        self.tracker.injected.set(fault);
    }

    /// Counters of the quiesce machinery.
    pub fn stats(&self) -> QuiesceStats {
        self.tracker.stats()
    }

    /// Give `holder` a lease on `mr` (both simulated or in one process): the holder may post
    /// one-sided operations to it until the owner revokes, and acknowledges revokes in-process.
    pub fn lease(&self, mr: &Mr, holder: &Device) -> Arc<RemoteMr> {
        let remote = Arc::new(RemoteMr {
            owner: self.tracker.gid,
            owner_name: self.tracker.name.clone(),
            addr: mr.iova(),
            len: mr.len(),
            rkey: mr.rkey(),
            access: mr.access(),
            revoked: AtomicU64::new(0),
            link: Arc::new(LocalLink {
                peer: Arc::downgrade(&self.tracker),
                name: self.tracker.name.clone(),
            }),
        });
        // In one process both sides are this program's: no bound to enforce.
        holder.tracker.add_remote(remote.clone(), false);
        lock(&mr.shared.holders).push(Holder {
            gid: holder.tracker.gid,
            link: Arc::new(LocalLink {
                peer: Arc::downgrade(&holder.tracker),
                name: holder.tracker.name.clone(),
            }),
        });
        remote
    }
}

/// A protection domain.
#[derive(Debug, Clone)]
pub struct Pd {
    pub(crate) backend: Arc<dyn PdBackend>,
    pub(crate) dev: Device,
}

impl Pd {
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Register memory that no exporter governs (the caller owns it for the MR's lifetime).
    pub fn reg_mr(&self, list: &AddrList, access: MrAccess) -> Result<Mr> {
        let iova = list.ranges().first().map_or(0, |r| r.addr);
        let backend = self.backend.reg_mr(&MrRequest {
            list,
            iova,
            access,
            dmabuf_fd: None,
        })?;
        Ok(Mr::from_backend(self, backend, access, None))
    }

    pub fn create_qp(&self, send_cq: &Cq, recv_cq: &Cq, caps: QpCaps) -> Result<Qp> {
        let backend = self
            .backend
            .create_qp(&send_cq.backend, &recv_cq.backend, caps)?;
        let qpn = backend.qpn();
        let shared = Arc::new(QpShared {
            qpn,
            backend,
            tracker: self.dev.tracker.clone(),
            track: Mutex::new(QpLedger {
                send: RequestRing::new(caps.max_send_wr),
                recv: RequestRing::new(caps.max_recv_wr),
                conn: None,
                recover_pending: false,
                longest_send: 0,
                stops: 0,
                scratch_send: Vec::new(),
                scratch_recv: Vec::new(),
            }),
        });
        write(&self.dev.tracker.qps).insert(qpn, Arc::downgrade(&shared));
        Ok(Qp { shared })
    }
}

/// A registered memory region.
#[derive(Debug, Clone)]
pub struct Mr {
    pub(crate) shared: Arc<MrShared>,
}

impl Mr {
    pub(crate) fn from_backend(
        pd: &Pd,
        backend: Arc<dyn MrBackend>,
        access: MrAccess,
        import: Option<ImportInfo>,
    ) -> Mr {
        let key = backend.lkey();
        let shared = Arc::new(MrShared {
            lkey: AtomicU64::new(u64::from(key)),
            backend: RwLock::new(backend),
            revoked: AtomicU64::new(0),
            access,
            holders: Mutex::new(Vec::new()),
            attachment: Mutex::new(None),
            import,
        });
        pd.dev.tracker.add_mr(key, &shared);
        Mr { shared }
    }

    fn b(&self) -> Arc<dyn MrBackend> {
        read(&self.shared.backend).clone()
    }

    /// Keys, start and length of the current registration (they change when a dynamic
    /// importer re-registers).
    pub fn keys(&self) -> crate::backend::MrKeys {
        read(&self.shared.backend).keys()
    }

    pub fn lkey(&self) -> u32 {
        self.keys().lkey
    }
    pub fn rkey(&self) -> u32 {
        self.keys().rkey
    }
    pub fn iova(&self) -> u64 {
        self.keys().iova
    }
    pub fn len(&self) -> u64 {
        self.keys().len
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn access(&self) -> MrAccess {
        self.shared.access
    }
    pub fn translation(&self) -> Translation {
        self.b().translation()
    }
    /// The epoch it was revoked at, if it was.
    pub fn revoked_at(&self) -> Option<u64> {
        match self.shared.revoked.load(Ordering::Acquire) {
            0 => None,
            e => Some(e - 1),
        }
    }

    /// How the registration was negotiated (for imported regions).
    pub fn negotiation(&self) -> Option<String> {
        self.shared.import.as_ref().map(|i| i.summary.clone())
    }

    /// A scatter/gather element `len` bytes at `offset` into the region.
    pub fn sge(&self, offset: u64, len: u32) -> Sge {
        let k = self.keys();
        Sge {
            addr: k.iova.wrapping_add(offset),
            length: len,
            lkey: k.lkey,
        }
    }
}

/// A reliable-connected queue pair.
#[derive(Debug, Clone)]
pub struct Qp {
    pub(crate) shared: Arc<QpShared>,
}

impl Qp {
    pub fn qpn(&self) -> u32 {
        self.shared.qpn
    }

    pub fn state(&self) -> QpState {
        self.shared.backend.state()
    }

    /// This end, for the peer's `connect`.
    pub fn endpoint(&self) -> RemoteQp {
        self.shared.backend.endpoint()
    }

    /// Raw `modify`, with the verbs rules.
    pub fn modify(&self, attr: &QpAttr) -> Result<()> {
        self.shared.backend.modify(attr)
    }

    /// SQD → ERR only while the QP is still in SQD (what a boundary stop's end does; see
    /// [`QpBackend::flush_stopped`](crate::backend::QpBackend::flush_stopped)): `Ok(false)`
    /// when it left SQD meanwhile and was left as it is.
    pub fn flush_stopped(&self) -> Result<bool> {
        self.shared.backend.flush_stopped()
    }

    /// RESET → INIT → RTR → RTS towards `dest`, remembering the attributes for recovery.
    pub fn connect(&self, dest: RemoteQp, access: MrAccess) -> Result<()> {
        self.connect_mtu(dest, access, Mtu::Mtu4096)
    }

    /// [`connect`](Self::connect) with a path MTU (a real port's active MTU: RoCE on a
    /// 1500-byte Ethernet runs 1024).
    pub fn connect_mtu(&self, dest: RemoteQp, access: MrAccess, mtu: Mtu) -> Result<()> {
        let conn = Conn {
            port: 1,
            access,
            dest,
            mtu,
        };
        self.shared.bring_up(&conn)?;
        lock(&self.shared.track).conn = Some(conn);
        Ok(())
    }

    /// Requests posted and not yet completed: (send, recv).
    pub fn outstanding(&self) -> (u64, u64) {
        let t = lock(&self.shared.track);
        (t.send.outstanding(), t.recv.outstanding())
    }

    /// Post send requests, all or none. Local keys, bounds and rights are checked here (a
    /// precise error instead of a protection-error completion), as are leases on remote keys;
    /// a request touching a revoked region fails with [`RdmaError::Revoked`].
    ///
    /// The checks run before the QP's lock is taken; under it, only the revoke marks of the
    /// regions they found are read again. That keeps the lock — which a revoke's scan takes
    /// too — held for a few hundred nanoseconds, not for the whole list's checks: a revoke
    /// never waits for a long post, and still no post slips past its scan.
    pub fn post_send(&self, wrs: &[SendWr]) -> Result<()> {
        let s = &self.shared;
        let dest = lock(&s.track).conn.map(|c| c.dest.gid);
        let mut seen = Seen::default();
        let mut slots = Vec::with_capacity(wrs.len());
        for wr in wrs {
            let what = || {
                format!(
                    "QP {:#x} work request {} ({})",
                    s.qpn,
                    wr.wr_id,
                    wr.op.name()
                )
            };
            let need = if wr.op.writes_local() {
                MrAccess::LOCAL_WRITE
            } else {
                MrAccess::NONE
            };
            let mut slot = Slot {
                wr_id: wr.wr_id,
                len: wr.sg.total(),
                ..Slot::default()
            };
            for (i, sge) in wr.sg.as_slice().iter().enumerate() {
                seen.local(sge.lkey, s.tracker.check_local(sge, need, &what)?);
                slot.lkeys[i] = sge.lkey;
            }
            slot.nkeys = wr.sg.as_slice().len() as u8;
            if wr.op.is_one_sided() {
                let rneed = if wr.op.writes_local() {
                    MrAccess::REMOTE_READ
                } else {
                    MrAccess::REMOTE_WRITE
                };
                if let Some(gid) = dest
                    && let Some(r) =
                        s.tracker
                            .check_remote(gid, wr.remote, wr.sg.total(), rneed, &what)?
                {
                    seen.remote(r);
                }
                slot.rkey = wr.remote.rkey;
                slot.one_sided = true;
            }
            slots.push(slot);
        }
        let mut t = lock(&s.track);
        if t.send.outstanding() + wrs.len() as u64 > t.send.slots.len() as u64 {
            return Err(RdmaError::QueueFull {
                qpn: s.qpn,
                queue: crate::wr::Queue::Send.name(),
                depth: t.send.slots.len() as u32,
            });
        }
        seen.recheck(&|| format!("QP {:#x} send list", s.qpn))?;
        let mut out = std::mem::take(&mut t.scratch_send);
        out.clear();
        let base = t.send.posted;
        for (k, (wr, slot)) in wrs.iter().zip(&slots).enumerate() {
            t.longest_send = t.longest_send.max(slot.len);
            *t.send.slot_mut(base + k as u64) = *slot;
            let mut b = *wr;
            b.wr_id = base + k as u64;
            out.push(b);
        }
        let (taken, r) = s.backend.post_send(&out);
        // What the provider took is in flight whatever it says about the rest: a revoke's scan
        // must see it and its completion must find its slot.
        let taken = taken.min(wrs.len());
        t.send.posted = base + taken as u64;
        t.scratch_send = out;
        partly_posted(s.qpn, wrs.len(), taken, r, |k| wrs[k].wr_id)
    }

    pub fn post_recv(&self, wrs: &[RecvWr]) -> Result<()> {
        let s = &self.shared;
        let mut seen = Seen::default();
        let mut slots = Vec::with_capacity(wrs.len());
        for wr in wrs {
            let what = || format!("QP {:#x} receive {}", s.qpn, wr.wr_id);
            let mut slot = Slot {
                wr_id: wr.wr_id,
                len: wr.sg.total(),
                ..Slot::default()
            };
            for (i, sge) in wr.sg.as_slice().iter().enumerate() {
                let mr = s.tracker.check_local(sge, MrAccess::LOCAL_WRITE, &what)?;
                seen.local(sge.lkey, mr);
                slot.lkeys[i] = sge.lkey;
            }
            slot.nkeys = wr.sg.as_slice().len() as u8;
            slots.push(slot);
        }
        let mut t = lock(&s.track);
        if t.recv.outstanding() + wrs.len() as u64 > t.recv.slots.len() as u64 {
            return Err(RdmaError::QueueFull {
                qpn: s.qpn,
                queue: crate::wr::Queue::Recv.name(),
                depth: t.recv.slots.len() as u32,
            });
        }
        seen.recheck(&|| format!("QP {:#x} receive list", s.qpn))?;
        let mut out = std::mem::take(&mut t.scratch_recv);
        out.clear();
        let base = t.recv.posted;
        for (k, (wr, slot)) in wrs.iter().zip(&slots).enumerate() {
            *t.recv.slot_mut(base + k as u64) = *slot;
            let mut b = *wr;
            b.wr_id = base + k as u64;
            out.push(b);
        }
        let (taken, r) = s.backend.post_recv(&out);
        // What the provider took is in flight whatever it says about the rest: a revoke's scan
        // must see it and its completion must find its slot.
        let taken = taken.min(wrs.len());
        t.recv.posted = base + taken as u64;
        t.scratch_recv = out;
        partly_posted(s.qpn, wrs.len(), taken, r, |k| wrs[k].wr_id)
    }
}

/// A backend's post result as the caller sees it: an error after a prefix was taken becomes
/// [`RdmaError::PartlyPosted`] naming the caller's `wr_id` (`id_of(index)`) of the first refused.
fn partly_posted(
    qpn: u32,
    of: usize,
    taken: usize,
    r: Result<()>,
    id_of: impl Fn(usize) -> u64,
) -> Result<()> {
    let Err(mut e) = r else {
        return Ok(());
    };
    // The backend saw the slot numbers the safe layer posts under; name the caller's id.
    if taken < of
        && let RdmaError::TooManySge { wr_id, .. } | RdmaError::BadWorkRequest { wr_id, .. } =
            &mut e
    {
        *wr_id = id_of(taken);
    }
    if taken > 0 && taken < of {
        return Err(RdmaError::PartlyPosted {
            qpn,
            posted: taken,
            of,
            refused: id_of(taken),
            source: Box::new(e),
        });
    }
    Err(e)
}

/// The regions a post list touches, each once, for the re-check under the QP lock.
#[derive(Default)]
struct Seen {
    local: Vec<(u32, Arc<MrShared>)>,
    remote: Vec<Arc<RemoteMr>>,
}

impl Seen {
    fn local(&mut self, key: u32, mr: Arc<MrShared>) {
        if !self.local.iter().any(|(_, m)| Arc::ptr_eq(m, &mr)) {
            self.local.push((key, mr));
        }
    }

    fn remote(&mut self, r: Arc<RemoteMr>) {
        if !self.remote.iter().any(|x| Arc::ptr_eq(x, &r)) {
            self.remote.push(r);
        }
    }

    /// Fails if a revoke marked any of them since it was checked.
    fn recheck(&self, what: &dyn Fn() -> String) -> Result<()> {
        for (key, mr) in &self.local {
            local_revoked(mr, *key, what)?;
        }
        for r in &self.remote {
            remote_revoked(r, what)?;
        }
        Ok(())
    }
}

/// A completion queue.
#[derive(Debug)]
pub struct Cq {
    pub(crate) backend: Arc<dyn CqBackend>,
    pub(crate) tracker: Arc<Tracker>,
    scratch: Mutex<Vec<Completion>>,
}

impl Cq {
    /// Append up to `max` completions to `out`, with the caller's wr_ids. Also advances any
    /// quiesce waiting on these completions and recovers flushed queue pairs.
    pub fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize> {
        let mut raw = lock(&self.scratch);
        raw.clear();
        let n = self.backend.poll(&mut raw, max)?;
        let mut cur: Option<(u32, Arc<QpShared>)> = None;
        for wc in raw.iter() {
            let qp = match &cur {
                Some((q, s)) if *q == wc.qp_num => s.clone(),
                _ => {
                    // Bound first: replacing `cur` may drop the last handle of a QP, whose
                    // drop takes the map's write lock.
                    let found = read(&self.tracker.qps)
                        .get(&wc.qp_num)
                        .and_then(Weak::upgrade);
                    match found {
                        Some(s) => {
                            cur = Some((wc.qp_num, s.clone()));
                            s
                        }
                        None => {
                            out.push(*wc);
                            continue;
                        }
                    }
                }
            };
            let mut t = lock(&qp.track);
            let ring = if wc.is_send() {
                &mut t.send
            } else {
                &mut t.recv
            };
            let seq = wc.wr_id;
            let mut user = *wc;
            user.wr_id = ring.slot(seq).wr_id;
            // Completions are in order per queue: everything up to `seq` is done.
            ring.done = ring.done.max(seq + 1);
            out.push(user);
            self.tracker.completions_reaped(&qp, &mut t);
        }
        Ok(n)
    }

    pub fn wait(&self, timeout: Duration) -> Result<bool> {
        self.backend.wait(timeout)
    }
}

/// Leases over any [`ControlLink`] (another process, another host): the two halves
/// [`Device::lease`] wires up in-process, for a link the caller provides.
impl Mr {
    /// Owner side: make the device identified by `holder_gid` a holder of this region. A revoke
    /// sends it `LeaseRevoke` over `link` and waits for its `LeaseAck` until the cut-off.
    pub fn add_holder(&self, holder_gid: [u8; 16], link: Arc<dyn ControlLink>) {
        crate::sync::lock(&self.shared.holders).push(Holder {
            gid: holder_gid,
            link,
        });
    }

    /// Owner side: undo the latest [`add_holder`](Self::add_holder) for `holder_gid` over
    /// `link` (another holder may share the GID: processes on one NIC).
    pub fn remove_holder(&self, holder_gid: [u8; 16], link: &Arc<dyn ControlLink>) {
        let id = crate::tracker::link_id(link);
        let mut h = crate::sync::lock(&self.shared.holders);
        if let Some(i) = h
            .iter()
            .rposition(|x| x.gid == holder_gid && crate::tracker::link_id(&x.link) == id)
        {
            h.remove(i);
        }
    }
}

impl Device {
    /// The identity leases are keyed by (the port GID).
    pub fn gid(&self) -> [u8; 16] {
        self.tracker.gid
    }

    /// Holder side: record a lease on a peer's region (`info` as the owner sent it). Posts that
    /// target it are checked against it, a `LeaseRevoke` for it quiesces them, and the ack goes
    /// back over `link`. A later lease on the same key from the same owner replaces this one.
    /// `info` comes from the peer: a range that wraps around the address space is refused.
    pub fn hold(
        &self,
        owner_gid: [u8; 16],
        owner_name: &str,
        info: crate::oob::RemoteMrInfo,
        access: MrAccess,
        link: Arc<dyn ControlLink>,
    ) -> Result<Arc<RemoteMr>> {
        if info.addr.checked_add(info.len).is_none() {
            return Err(crate::RdmaError::InvalidRegistration {
                field: "remote.len",
                value: format!("{:#x} at {:#x}", info.len, info.addr),
                why: format!("the lease from {owner_name} wraps around the address space"),
            });
        }
        let remote = Arc::new(RemoteMr {
            owner: owner_gid,
            owner_name: owner_name.to_string(),
            addr: info.addr,
            len: info.len,
            rkey: info.rkey,
            access,
            revoked: AtomicU64::new(0),
            link,
        });
        if !self.tracker.add_remote(remote.clone(), true) {
            return Err(crate::RdmaError::InvalidRegistration {
                field: "leases",
                value: format!("rkey {:#x}", info.rkey),
                why: format!(
                    "{owner_name} already granted this device as many leases as one owner may \
                     (Device::limit_leases), or the key's lease is another open link's"
                ),
            });
        }
        Ok(remote)
    }

    /// Accept at most `n` leases from any one owner ([`Device::hold`] refuses more; default
    /// [`crate::MAX_LEASES_PER_OWNER`]): what a peer grants is recorded for good
    /// (a revoked lease stays marked), so a peer must not be able to grow the record without
    /// bound.
    pub fn limit_leases(&self, n: usize) {
        self.tracker.limit_leases(n);
    }

    /// Hand a control message that arrived from a peer to this device (what a link's receiver
    /// does): `LeaseRevoke` quiesces what targets the lease and acks; `LeaseAck` settles a
    /// revoke in progress. Unknown leases and stale epochs are ignored.
    pub fn deliver(&self, msg: ControlMsg) {
        self.tracker.on_control(msg, None);
    }

    /// [`Device::deliver`] for a message that came over `link`: it revokes only a lease
    /// granted over that link, and settles only a holder registered with it — a peer speaks
    /// for its own leases, whatever GID it names (processes on one NIC share one).
    pub fn deliver_via(&self, msg: ControlMsg, link: &Arc<dyn ControlLink>) {
        self.tracker
            .on_control(msg, Some(crate::tracker::link_id(link)));
    }

    /// A lease message from a peer was refused (counted in
    /// [`QuiesceStats::lease_messages_refused`]).
    pub(crate) fn count_lease_refusal(&self) {
        self.tracker.counters.lease_messages_refused.add(1);
    }
}
