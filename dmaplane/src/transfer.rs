//! Transfers: a batch of WRITEs or READs between local and remote descriptors, split into
//! chunks, striped over the queue pairs of the best paths, run by the progress thread.
//!
//! A transfer ends exactly once — done, or failed with an error naming what went wrong — and
//! never hangs: a revoke or free of either side's memory ends it with [`Error::Revoked`], a lost
//! peer with [`Error::PeerLost`], silence with [`Error::Stalled`] after the stall timeout.
//! [`Transfer::wait`] blocks, [`Transfer::status`] looks, and `Transfer` is a `Future` (its own
//! waker, no runtime needed).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use dmaplane_core::Route;
use dmaplane_rdma::{RemoteAddr, RemoteMr, Sge};

use crate::agent::AgentInner;
use crate::desc::Desc;
use crate::error::{Error, Result, Side};
use crate::notify::MAX_NOTIFY;
use crate::peer::{Lane, PeerShared};
use crate::region::MemoryEntry;
use crate::stage::StageRange;
use crate::sync::{lock, wait_timeout};

/// How long a transfer waits for a lease its peer announced but whose grant is still on the
/// way.
const LEASE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Write,
    Read,
}

/// Where a transfer stands.
#[derive(Debug, Clone)]
pub enum Status {
    /// `done` of `total` requests completed.
    InProgress {
        /// Requests completed successfully so far.
        done: u64,
        /// Requests the transfer was split into.
        total: u64,
    },
    /// Every request completed and the notification, if any, was sent.
    Done,
    /// The transfer ended with this error.
    Failed(Error),
}

/// One request: `len` bytes between a local SGE and a remote address, on one lane.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Chunk {
    /// Index into the transfer's `lanes`.
    pub(crate) lane: u16,
    /// Index into the transfer's `leases`.
    pub(crate) lease: u16,
    /// Index into the transfer's `entries`.
    pub(crate) local_entry: u16,
    pub(crate) remote_region: u32,
    pub(crate) sge: Sge,
    pub(crate) remote: RemoteAddr,
}

pub(crate) struct Outcome {
    pub(crate) status: Status,
    waker: Option<Waker>,
    /// Threads asleep on the condvar: the end notifies only when there are any (a notify is
    /// a system call whether anyone waits or not).
    sleepers: u32,
}

/// What the engine and the handles share.
pub(crate) struct TransferState {
    pub(crate) id: u64,
    /// Requests completed successfully (the engine counts, `status` reads).
    pub(crate) done: std::sync::atomic::AtomicU64,
    /// The agent, whose engine a waiter drives while it spins.
    pub(crate) agent: std::sync::Weak<AgentInner>,
    pub(crate) op: Op,
    pub(crate) peer: Arc<PeerShared>,
    pub(crate) chunks: Vec<Chunk>,
    /// The queue pairs its chunks use, and the leases they write under.
    pub(crate) lanes: Vec<Arc<Lane>>,
    pub(crate) leases: Vec<Arc<RemoteMr>>,
    /// Local registrations it uses: held until every request has completed, so nothing is
    /// unregistered under the NIC.
    pub(crate) entries: Vec<Arc<MemoryEntry>>,
    pub(crate) notify: Option<Vec<u8>>,
    /// Local staged ranges a READ copies into device memory once its requests completed:
    /// `(entry index, offset, bytes)`.
    pub(crate) stage_in: Vec<(u16, u64, u64)>,
    /// The peer's staged ranges: landed by the peer after a WRITE, staged before a READ.
    pub(crate) remote_stage: Vec<StageRange>,
    pub(crate) bytes: u64,
    pub(crate) outcome: Mutex<Outcome>,
    pub(crate) cv: Condvar,
}

impl TransferState {
    pub(crate) fn finish(&self, status: Status) {
        let mut o = lock(&self.outcome);
        if !matches!(o.status, Status::InProgress { .. }) {
            return;
        }
        o.status = status;
        let waker = o.waker.take();
        if o.sleepers > 0 {
            self.cv.notify_all();
        }
        drop(o);
        // Outside the outcome's lock: a waker may poll the future at once.
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The typed error for a request that failed: a revoke of either side when one happened.
    pub(crate) fn classify(&self, chunk: &Chunk, status: &str) -> Error {
        self.revoked_or_lost(chunk, status)
            .unwrap_or_else(|| Error::Failed {
                transfer: self.id,
                peer: self.peer.name.clone(),
                chunk: 0,
                status: status.to_string(),
            })
    }

    /// The error for a request that met a broken queue pair.
    pub(crate) fn broken_lane(&self, lane: &Lane) -> Error {
        Error::Failed {
            transfer: self.id,
            peer: self.peer.name.clone(),
            chunk: 0,
            status: format!(
                "queue pair {:#x} to {} is broken ({}): an RC queue pair leaves the error state \
                 only by being connected anew, which the agent does not do yet, so this path \
                 is dead",
                lane.qp.qpn(),
                self.peer.name,
                lane.broken().unwrap_or_default()
            ),
        }
    }

    /// A revoke of either side's memory, or the peer's loss, if that is why a request failed.
    pub(crate) fn revoked_or_lost(&self, chunk: &Chunk, status: &str) -> Option<Error> {
        let e = &self.entries[usize::from(chunk.local_entry)];
        if let Some(epoch) = e.revoked_at() {
            return Some(Error::Revoked {
                side: Side::Local,
                region: e.id,
                name: e.memory.name().to_string(),
                epoch,
                why: format!("a request completed with {status}: {}", e.gone_why()),
            });
        }
        if let Some(epoch) = self.leases[usize::from(chunk.lease)].revoked_at() {
            let name = self
                .peer
                .region(chunk.remote_region)
                .map_or_else(String::new, |r| r.name);
            return Some(Error::Revoked {
                side: Side::Remote,
                region: chunk.remote_region,
                name,
                epoch,
                why: format!(
                    "the peer revoked it (a request completed with {status}); {} holds no lease on it any more",
                    self.peer.name
                ),
            });
        }
        self.peer.lost().map(|why| Error::PeerLost {
            peer: self.peer.name.clone(),
            why,
        })
    }
}

/// A transfer under way. Dropping the handle does not cancel it.
#[derive(Clone)]
pub struct Transfer {
    pub(crate) state: Arc<TransferState>,
}

impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfer")
            .field("id", &self.state.id)
            .field("peer", &self.state.peer.name)
            .field("requests", &self.state.chunks.len())
            .field("status", &self.status())
            .finish()
    }
}

impl Transfer {
    /// The transfer's id: unique within its agent, and what the peer's
    /// [`crate::Notification::transfer`] carries.
    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// Requests the transfer was split into.
    pub fn requests(&self) -> usize {
        self.state.chunks.len()
    }

    /// Bytes it moves.
    pub fn bytes(&self) -> u64 {
        self.state.bytes
    }

    /// Where the transfer stands now, without blocking.
    pub fn status(&self) -> Status {
        match &lock(&self.state.outcome).status {
            Status::InProgress { total, .. } => Status::InProgress {
                done: self.state.done.load(std::sync::atomic::Ordering::Relaxed),
                total: *total,
            },
            other => other.clone(),
        }
    }

    /// Block until it ends, or `timeout` passes ([`Error::WaitTimeout`]; the transfer goes
    /// on). The stall timeout bounds every transfer, so a long `timeout` never hangs.
    /// Returns `Ok(())` once it is done, or the error it ended with.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dmaplane::{Agent, Status, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let testbed = Testbed::builtin()?;
    /// let a = Agent::builder("a").testbed(testbed.clone()).nics(["nic0"]).build()?;
    /// let b = Agent::builder("b").testbed(testbed).nics(["nic1"]).build()?;
    /// let src = a.alloc_host("src", 64 << 10)?;
    /// let dst = b.alloc_host("dst", 64 << 10)?;
    /// src.write(0, &[9u8; 4096])?;
    /// let (ra, rb) = (a.register(&src)?, b.register(&dst)?);
    /// let peer = a.connect(&b.metadata_blob()?)?;
    /// let t = a.write(&peer, &[ra.desc(0, 4096)?], &[peer.desc(rb.id(), 0, 4096)?], None)?;
    /// t.wait(Duration::from_secs(10))?;
    /// assert!(matches!(t.status(), Status::Done));
    /// assert_eq!(t.bytes(), 4096);
    /// let mut got = [0u8; 4096];
    /// dst.read(0, &mut got)?;
    /// assert_eq!(got, [9u8; 4096]);
    /// # Ok(()) }
    /// ```
    pub fn wait(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let deadline = start + timeout;
        // First drive the engine from this thread, as a poller would: a short transfer ends
        // without a thread hand-off. Then sleep and leave it to the progress thread.
        let spin_until = start + WAIT_SPIN.min(timeout);
        let mut wcs = Vec::new();
        if let Some(a) = self.state.agent.upgrade() {
            let driving = a.engine.driving();
            let mut idle = 0u32;
            while Instant::now() < spin_until {
                if let Some(r) = self.outcome() {
                    return r;
                }
                if a.engine.try_step(&a, &mut wcs) {
                    idle = 0;
                } else {
                    // Spin as a poller does; now and then let the NIC (a simulated one is a
                    // thread) have the core, without a system call per empty poll.
                    idle += 1;
                    if idle.is_multiple_of(4) {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
            // Still under way: the progress thread takes it from here.
            drop(driving);
            a.engine.hand_off();
        }
        self.sleep_until(deadline, timeout)
    }

    /// [`Transfer::wait`] without driving the engine first: the thread sleeps at once and the
    /// progress thread completes the transfer. For waits known to be long (a pipeline stage of
    /// many megabytes), where a spinning waiter would take a core from the devices.
    pub fn wait_sleeping(&self, timeout: Duration) -> Result<()> {
        self.sleep_until(Instant::now() + timeout, timeout)
    }

    fn sleep_until(&self, deadline: Instant, timeout: Duration) -> Result<()> {
        let mut o = lock(&self.state.outcome);
        loop {
            match &o.status {
                Status::Done => return Ok(()),
                Status::Failed(e) => return Err(e.clone()),
                Status::InProgress { .. } => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::WaitTimeout {
                    transfer: self.state.id,
                    peer: self.state.peer.name.clone(),
                    waited: timeout,
                });
            }
            o.sleepers += 1;
            o = wait_timeout(&self.state.cv, o, left).0;
            o.sleepers -= 1;
        }
    }
}

impl Transfer {
    /// The result, once the transfer ended.
    fn outcome(&self) -> Option<Result<()>> {
        match &lock(&self.state.outcome).status {
            Status::Done => Some(Ok(())),
            Status::Failed(e) => Some(Err(e.clone())),
            Status::InProgress { .. } => None,
        }
    }
}

/// How long [`Transfer::wait`] drives the engine itself before it sleeps.
const WAIT_SPIN: Duration = Duration::from_micros(500);

impl Future for Transfer {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let mut o = lock(&self.state.outcome);
        match &o.status {
            Status::Done => Poll::Ready(Ok(())),
            Status::Failed(e) => Poll::Ready(Err(e.clone())),
            Status::InProgress { .. } => {
                o.waker = Some(cx.waker().clone());
                drop(o);
                // Nobody drives an awaited transfer: the progress thread must not wait out a
                // blocking waiter's grace period.
                if let Some(a) = self.state.agent.upgrade() {
                    a.engine.hand_off();
                }
                Poll::Pending
            }
        }
    }
}

/// How good a path's local NIC is for memory on `device`: lower is better (same switch, then
/// same host bridge, then the same NUMA node, then anything).
fn rank(s: &AgentInner, device: &str, nic: usize) -> u32 {
    let n = &s.nics[nic];
    let Some(tb) = s.platform.testbed() else {
        // Real devices: no topology model here; every NIC that registered the memory is equal.
        return 0;
    };
    let topo = tb.topology();
    match topo.route_by_id(device, n.name()) {
        Ok(Route::BusAddr) => 0,
        Ok(Route::ThruHostBridge) => 1,
        Ok(Route::Local) => {
            // Host memory: every NIC reaches it; prefer the NIC on its NUMA node.
            if topo.numa_of(device).ok() == Some(n.numa()) {
                2
            } else {
                3
            }
        }
        _ => 4,
    }
}

/// Check the batch, route it, split it and hand it to the engine.
pub(crate) fn start(
    s: &Arc<AgentInner>,
    peer: &Arc<PeerShared>,
    op: Op,
    local: &[Desc],
    remote: &[Desc],
    notify: Option<&[u8]>,
) -> Result<Transfer> {
    let what = || format!("transfer to {}", peer.name);
    if let Some(why) = peer.lost() {
        return Err(Error::PeerLost {
            peer: peer.name.clone(),
            why,
        });
    }
    if local.is_empty() || local.len() != remote.len() {
        return Err(Error::invalid(
            what(),
            "descriptors",
            format!("{} local, {} remote", local.len(), remote.len()),
            "both lists must be non-empty and of the same length",
        ));
    }
    if let Some(n) = notify
        && n.len() > MAX_NOTIFY
    {
        return Err(Error::invalid(
            what(),
            "notify",
            format!("{} bytes", n.len()),
            format!("at most {MAX_NOTIFY}"),
        ));
    }
    let mut entries: Vec<Arc<MemoryEntry>> = Vec::new();
    let mut memo: Vec<Routed> = Vec::new();
    let mut t_lanes: Vec<Arc<Lane>> = Vec::new();
    let mut t_leases: Vec<Arc<RemoteMr>> = Vec::new();
    let mut chunks = Vec::new();
    let mut rr = 0usize;
    let mut bytes = 0u64;
    let mut stage_out: Vec<(u16, u64, u64)> = Vec::new();
    let mut stage_in: Vec<(u16, u64, u64)> = Vec::new();
    let mut remote_stage: Vec<StageRange> = Vec::new();
    for (i, (l, r)) in local.iter().zip(remote).enumerate() {
        if l.len != r.len || l.len == 0 {
            return Err(Error::invalid(
                what(),
                "descriptors",
                format!("pair {i}: local {} bytes, remote {} bytes", l.len, r.len),
                "each pair must have the same, non-zero length",
            ));
        }
        let k = match memo.iter().position(|m| m.key == (l.region, r.region)) {
            Some(k) => k,
            None => {
                memo.push(route(
                    s,
                    peer,
                    (l.region, r.region),
                    i,
                    &mut entries,
                    &mut t_lanes,
                    &mut t_leases,
                )?);
                memo.len() - 1
            }
        };
        let m = &memo[k];
        let e = &entries[m.entry];
        if l.offset.checked_add(l.len).is_none_or(|end| end > e.len) {
            return Err(Error::invalid(
                what(),
                "local desc",
                format!("pair {i}: [{:#x}, +{:#x})", l.offset, l.len),
                format!("outside region {} ({} bytes)", e.id, e.len),
            ));
        }
        if r.offset
            .checked_add(r.len)
            .is_none_or(|end| end > m.remote_len)
        {
            return Err(Error::invalid(
                what(),
                "remote desc",
                format!("pair {i}: [{:#x}, +{:#x})", r.offset, r.len),
                format!(
                    "outside the peer's region {} ({} bytes)",
                    r.region, m.remote_len
                ),
            ));
        }
        let (ei, lanes) = (m.entry, &m.lanes);
        if m.local_staged {
            let v = if op == Op::Write {
                &mut stage_out
            } else {
                &mut stage_in
            };
            v.push((ei as u16, l.offset, l.len));
        }
        if m.remote_staged {
            remote_stage.push((r.region, r.offset, r.len));
        }
        if entries.len() > usize::from(u16::MAX) || t_lanes.len() > usize::from(u16::MAX) {
            return Err(Error::invalid(
                what(),
                "descriptors",
                format!("{} registrations", entries.len()),
                "a transfer names at most 65535 registrations",
            ));
        }
        let mut off = 0u64;
        while off < l.len {
            let n = (l.len - off).min(s.cfg.chunk);
            let (lane, lease) = lanes[rr % lanes.len()];
            rr += 1;
            let k = m.keys[t_lanes[usize::from(lane)].nic]
                .ok_or_else(|| Error::setup(&s.name, "a lane on a NIC without the MR"))?;
            chunks.push(Chunk {
                lane,
                lease,
                local_entry: ei as u16,
                remote_region: r.region,
                sge: dmaplane_rdma::wr::Sge {
                    addr: k.iova.wrapping_add(l.offset + off),
                    length: n as u32,
                    lkey: k.lkey,
                },
                remote: t_leases[usize::from(lease)].at(r.offset + off),
            });
            off += n;
        }
        bytes += l.len;
    }
    let total = chunks.len() as u64;
    if total >= 1 << crate::progress::CHUNK_BITS {
        return Err(Error::invalid(
            what(),
            "descriptors",
            format!("{total} requests"),
            format!(
                "a transfer is split into at most {} requests: send it in parts, or raise the chunk size",
                (1u64 << crate::progress::CHUNK_BITS) - 1
            ),
        ));
    }
    // A WRITE from staged memory: its bytes go to the staging buffer before any request.
    for &(ei, off, len) in &stage_out {
        let e = &entries[usize::from(ei)];
        e.stage_copy(off, len, true)?;
    }
    crate::stage::merge(&mut remote_stage);
    let state = Arc::new(TransferState {
        id: s.engine.next_id(),
        agent: Arc::downgrade(s),
        done: std::sync::atomic::AtomicU64::new(0),
        op,
        peer: peer.clone(),
        chunks,
        lanes: t_lanes,
        leases: t_leases,
        entries,
        notify: notify.map(<[u8]>::to_vec),
        stage_in,
        remote_stage,
        bytes,
        outcome: Mutex::new(Outcome {
            status: Status::InProgress { done: 0, total },
            waker: None,
            sleepers: 0,
        }),
        cv: Condvar::new(),
    });
    s.engine.submit(s, state.clone());
    Ok(Transfer { state })
}

/// How one (local registration, remote registration) pair of a batch goes: looked up once per
/// batch, however many descriptors name it.
struct Routed {
    key: (u32, u32),
    /// Index into the transfer's entries.
    entry: usize,
    remote_len: u64,
    /// The lanes of the best-ranked paths, each with its lease on the remote registration
    /// (indices into the transfer's tables).
    lanes: Vec<(u16, u16)>,
    /// The local NIC reaches the memory through its staging buffer.
    local_staged: bool,
    /// The peer's key is of its staging buffer.
    remote_staged: bool,
    /// The keys of the local registration's MR on each NIC (fixed for the MR's life), read
    /// once per batch rather than once per request.
    keys: Vec<Option<dmaplane_rdma::MrKeys>>,
}

/// Rank penalties: a path staged on this side, or on the peer's, is taken only when no
/// better one serves the pair (staging costs a copy per byte; the peer's also a round trip).
const LOCAL_STAGED: u32 = 8;
const REMOTE_STAGED: u32 = 16;

fn route(
    s: &AgentInner,
    peer: &PeerShared,
    (local, remote): (u32, u32),
    i: usize,
    entries: &mut Vec<Arc<MemoryEntry>>,
    t_lanes: &mut Vec<Arc<Lane>>,
    t_leases: &mut Vec<Arc<RemoteMr>>,
) -> Result<Routed> {
    let what = || format!("transfer to {}", peer.name);
    let Some(e) = s.entry(local) else {
        return Err(Error::invalid(
            what(),
            "local region",
            local,
            format!("pair {i}: agent {} has no such registration", s.name),
        ));
    };
    if let Some(epoch) = e.revoked_at() {
        return Err(Error::Revoked {
            side: Side::Local,
            region: e.id,
            name: e.memory.name().to_string(),
            epoch,
            why: format!("{} before the transfer started", e.gone_why()),
        });
    }
    let Some(info) = peer.region(remote) else {
        return Err(Error::invalid(
            what(),
            "remote region",
            remote,
            format!("pair {i}: peer {} has no such registration", peer.name),
        ));
    };
    // The paths that serve both ends, best ranked for the local memory.
    let mut usable: Vec<(u32, usize, Arc<RemoteMr>, bool, bool)> = Vec::new();
    for (pi, p) in peer.paths.iter().enumerate() {
        if e.mrs[p.local].is_none() {
            continue;
        }
        let Some(key) = info.keys.iter().find(|k| k.nic == p.remote_nic) else {
            continue;
        };
        let Some(lease) = peer.lease(pi, key.rkey, LEASE_WAIT) else {
            continue;
        };
        let local_staged = e.paths[p.local].is_staged();
        let r = rank(s, e.memory.location().device(), p.local)
            + if local_staged { LOCAL_STAGED } else { 0 }
            + if key.staged { REMOTE_STAGED } else { 0 };
        usable.push((r, pi, lease, local_staged, key.staged));
    }
    // No path for this pair of regions, and why.
    let no_path = |why: String| {
        Error::invalid(
            what(),
            "descriptors",
            format!(
                "pair {i}: local region {} ↔ remote region {}",
                e.id, info.id
            ),
            why,
        )
    };
    let Some(best) = usable.iter().map(|u| u.0).min() else {
        return Err(no_path(
            "no path serves both: no NIC pair where this agent's NIC reaches the local memory \
             and the peer granted a lease on the remote one"
                .into(),
        ));
    };
    usable.retain(|u| u.0 == best);
    let (local_staged, remote_staged) = (usable[0].3, usable[0].4);
    let mut lanes = Vec::new();
    for (_, pi, lease, _, _) in &usable {
        let li = index_of(t_leases, lease)?;
        for l in peer.paths[*pi]
            .lanes
            .iter()
            .filter(|l| l.broken().is_none())
        {
            lanes.push((index_of(t_lanes, l)?, li));
        }
    }
    if lanes.is_empty() {
        let why: Vec<String> = usable
            .iter()
            .flat_map(|(_, pi, ..)| &peer.paths[*pi].lanes)
            .filter_map(|l| l.broken().map(|w| format!("{:#x}: {w}", l.qp.qpn())))
            .collect();
        return Err(no_path(format!(
            "every queue pair of the paths that serve both is broken ({}): they leave the \
                 error state only by being connected anew, which the agent does not do yet \
                 (peer {})",
            why.join(", "),
            peer.name
        )));
    }
    let entry = match entries.iter().position(|x| Arc::ptr_eq(x, &e)) {
        Some(k) => k,
        None => {
            entries.push(e);
            entries.len() - 1
        }
    };
    let keys = entries[entry]
        .mrs
        .iter()
        .map(|m| m.as_ref().map(dmaplane_rdma::Mr::keys))
        .collect();
    Ok(Routed {
        key: (local, remote),
        keys,
        entry,
        remote_len: info.len,
        lanes,
        local_staged,
        remote_staged,
    })
}

/// The index of `x` in `v`, appended if it is not there yet.
fn index_of<T>(v: &mut Vec<Arc<T>>, x: &Arc<T>) -> Result<u16> {
    let k = match v.iter().position(|y| Arc::ptr_eq(y, x)) {
        Some(k) => k,
        None => {
            v.push(x.clone());
            v.len() - 1
        }
    };
    u16::try_from(k).map_err(|_| {
        Error::invalid(
            "transfer",
            "descriptors",
            format!("{} queue pairs or leases", v.len()),
            "a transfer uses at most 65536 of each: send it in parts",
        )
    })
}
