//! A connected peer: its paths (queue pairs and lease links), the registrations it announced,
//! and its control connection — a writer thread sending what is queued, a reader thread acting
//! on what arrives (new registrations, notifications, staging, `bye`). When the control
//! connection ends, the peer is lost. How two agents meet is the handshake's (`handshake.rs`).

use std::collections::HashMap;
use std::sync::atomic::AtomicU32;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dmaplane_rdma::oob::Oob;
use dmaplane_rdma::{LeaseLink, Qp, RdmaError, RemoteMr};

use crate::desc::{PeerTag, RemoteDesc};
use crate::error::{Error, Result, Side};
use crate::event::Event;
use crate::known::{Gone, Known};
use crate::limits::{Limits, Refusal};
use crate::metadata::RegionInfo;
use crate::notify::Notification;
use crate::region::{MemoryEntry, PeerKey, PeerStage};
use crate::stage::{StageFailure, StageRange};
use crate::sync::lock;
use crate::wire::Wire;

/// Control messages queued for a peer before sends are refused.
const CONTROL_QUEUE: usize = 4096;
/// How often idle control readers and the listener look at the stop flag.
pub(crate) const POLL: Duration = Duration::from_millis(100);

/// One queue pair of a path, with its outstanding count (bounded by the QP's depth).
#[derive(Debug)]
pub(crate) struct Lane {
    pub(crate) qp: Qp,
    /// The agent NIC it runs on.
    pub(crate) nic: usize,
    pub(crate) outstanding: AtomicU32,
    /// Why its queue pair is in the error state for good (a request completed with an error
    /// other than a flush: a remote access error, retries exhausted), if it is. Set once;
    /// read on every post (an atomic load).
    broken: std::sync::OnceLock<String>,
}

impl Lane {
    pub(crate) fn new(qp: Qp, nic: usize) -> Lane {
        Lane {
            qp,
            nic,
            outstanding: AtomicU32::new(0),
            broken: std::sync::OnceLock::new(),
        }
    }

    pub(crate) fn mark_broken(&self, why: &str) {
        if self.broken.set(why.to_string()).is_ok() {
            tracing::warn!(qpn = self.qp.qpn(), %why, "queue pair broken: the agent does not reconnect it, so its path is dead");
        }
    }

    pub(crate) fn broken(&self) -> Option<&str> {
        self.broken.get().map(String::as_str)
    }
}

/// One (local NIC, peer NIC) pair.
#[derive(Debug)]
pub(crate) struct Path {
    pub(crate) local: usize,
    pub(crate) remote_nic: String,
    pub(crate) lanes: Vec<Arc<Lane>>,
    link: Mutex<Option<LeaseLink>>,
    /// Leases the peer granted on this path, by rkey.
    leases: Mutex<HashMap<u32, Arc<RemoteMr>>>,
    /// Registrations this side granted the peer on this path (each once: a second grant
    /// would make a revoke wait for a second ack that never comes).
    granted: Mutex<std::collections::HashSet<u32>>,
}

impl Path {
    pub(crate) fn new(
        local: usize,
        remote_nic: &str,
        lanes: Vec<Arc<Lane>>,
        link: LeaseLink,
    ) -> Path {
        Path {
            local,
            remote_nic: remote_nic.to_string(),
            lanes,
            link: Mutex::new(Some(link)),
            leases: Mutex::new(HashMap::new()),
            granted: Mutex::new(std::collections::HashSet::new()),
        }
    }
}

pub(crate) struct PeerShared {
    pub(crate) name: String,
    /// This connection, as its [`RemoteDesc`]s name it.
    pub(crate) tag: PeerTag,
    /// The nonce of the handshake it connected with: with the name, the key of what the
    /// agent holds for this connection alone (its staging buffers).
    pub(crate) session: u64,
    agent: Weak<dyn PeerHost>,
    limits: Limits,
    regions: Mutex<Known>,
    /// Woken when the peer announces a registration or goes ([`Peer::wait_region`]).
    announced: Condvar,
    pub(crate) paths: Vec<Path>,
    lost: Mutex<Option<String>>,
    ctrl: Arc<Oob>,
    tx: Mutex<Option<SyncSender<Wire>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for PeerShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("name", &self.name)
            .field("paths", &self.paths.len())
            .field("lost", &*lock(&self.lost))
            .finish_non_exhaustive()
    }
}

/// A connected peer agent.
#[derive(Debug, Clone)]
pub struct Peer {
    pub(crate) shared: Arc<PeerShared>,
}

impl Peer {
    /// The peer agent's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The peer's registration `id`, as its metadata (and later announcements) describe it.
    pub fn region(&self, id: u32) -> Option<RegionInfo> {
        lock(&self.shared.regions).map.get(&id).cloned()
    }

    /// The peer's most recent registration of a memory called `name`.
    pub fn region_named(&self, name: &str) -> Option<RegionInfo> {
        lock(&self.shared.regions)
            .map
            .values()
            .filter(|r| r.name == name)
            .max_by_key(|r| r.id)
            .cloned()
    }

    /// Every registration of the peer this agent knows of.
    pub fn regions(&self) -> Vec<RegionInfo> {
        let mut v: Vec<RegionInfo> = lock(&self.shared.regions).map.values().cloned().collect();
        v.sort_by_key(|r| r.id);
        v
    }

    /// Wait up to `timeout` for the peer to announce a registration of a memory called `name`
    /// (the newest, if there are several) — for a region the peer registers after the
    /// handshake. Fails naming the peer, the name and the regions it has announced when none
    /// comes in time, or at once when the peer is lost.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dmaplane::{Agent, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let testbed = Testbed::builtin()?;
    /// let prefill = Agent::builder("prefill").testbed(testbed.clone()).nics(["nic0"]).build()?;
    /// let decode = Agent::builder("decode").testbed(testbed).nics(["nic1"]).build()?;
    /// let peer = decode.connect(&prefill.metadata_blob()?)?;
    /// let kv = prefill.alloc_gpu("kv", "gpu0", 1 << 20)?;
    /// let _r = prefill.register(&kv)?; // after the handshake: announced on the way
    /// let info = peer.wait_region("kv", Duration::from_secs(5))?;
    /// assert_eq!(info.len, 1 << 20);
    /// let err = peer.wait_region("nope", Duration::from_millis(10)).unwrap_err();
    /// assert!(err.to_string().contains("\"nope\""), "{err}");
    /// # Ok(()) }
    /// ```
    pub fn wait_region(&self, name: &str, timeout: Duration) -> Result<RegionInfo> {
        let deadline = Instant::now() + timeout;
        let p = &self.shared;
        let mut k = lock(&p.regions);
        loop {
            if let Some(r) = k
                .map
                .values()
                .filter(|r| r.name == name)
                .max_by_key(|r| r.id)
            {
                return Ok(r.clone());
            }
            if let Some(why) = p.lost() {
                return Err(Error::PeerLost {
                    peer: p.name.clone(),
                    why,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let mut have: Vec<&str> = k.map.values().map(|r| r.name.as_str()).collect();
                have.sort_unstable();
                return Err(Error::invalid(
                    format!("peer {}", p.name),
                    "region name",
                    format!("{name:?}"),
                    format!(
                        "not announced within {timeout:?} (it has announced: {})",
                        if have.is_empty() {
                            "nothing".into()
                        } else {
                            have.join(", ")
                        }
                    ),
                ));
            }
            k = crate::sync::wait_timeout(&p.announced, k, left.min(POLL)).0;
        }
    }

    /// A descriptor into the peer's registration `region`, checked against its length: the
    /// remote side of a transfer to this peer (and to no other).
    ///
    /// Fails with [`Error::Invalid`] when this agent knows no such registration of the peer,
    /// or the range is empty or runs past the registration's end, and with [`Error::Revoked`]
    /// when the peer said the registration is gone ([`Event::PeerRegionGone`]).
    ///
    /// ```
    /// use dmaplane::{Agent, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let testbed = Testbed::builtin()?;
    /// let a = Agent::builder("a").testbed(testbed.clone()).nics(["nic0"]).build()?;
    /// let b = Agent::builder("b").testbed(testbed).nics(["nic1"]).build()?;
    /// let dst = b.alloc_host("dst", 1 << 20)?;
    /// let rb = b.register(&dst)?;
    /// let peer = a.connect(&b.metadata_blob()?)?;
    /// assert_eq!(peer.name(), "b");
    /// let d = peer.desc(rb.id(), 4096, 512)?;
    /// assert_eq!((d.peer(), d.region(), d.offset(), d.len()), ("b", rb.id(), 4096, 512));
    /// assert!(peer.desc(rb.id(), 0, (1 << 20) + 1).is_err());
    /// assert!(peer.desc(rb.id() + 1, 0, 512).is_err());
    /// # Ok(()) }
    /// ```
    pub fn desc(&self, region: u32, offset: u64, len: u64) -> Result<RemoteDesc> {
        let r = self.shared.region_or_gone(region, "descriptor")?;
        match offset.checked_add(len) {
            Some(end) if end <= r.len && len > 0 => Ok(RemoteDesc {
                peer: self.shared.tag.clone(),
                region,
                offset,
                len,
            }),
            _ => Err(Error::invalid(
                format!("peer {} region {region} ({})", self.shared.name, r.name),
                "desc",
                format!("[{offset:#x}, +{len:#x})"),
                format!("outside its {} bytes (or empty)", r.len),
            )),
        }
    }

    /// The peer's registration `region` split into blocks of `size` bytes, once — block `i`
    /// at `i * size` — for transfers by index to this peer ([`crate::Agent::read_blocks`],
    /// [`crate::Agent::prepare_read`]). Refused as [`Peer::desc`] refuses, and unless `size`
    /// divides the registration's length.
    pub fn blocks(&self, region: u32, size: u64) -> Result<crate::RemoteBlocks> {
        let r = self.shared.region_or_gone(region, "block list")?;
        let ranges = crate::blocks::split(r.len, size, || {
            format!("peer {} region {region} ({})", self.shared.name, r.name)
        })?;
        self.blocks_of(region, &ranges)
    }

    /// The peer's registration `region` split into the given `(offset, len)` ranges, block `i`
    /// being `ranges[i]`; each is checked as [`Peer::desc`] checks it.
    pub fn blocks_of(&self, region: u32, ranges: &[(u64, u64)]) -> Result<crate::RemoteBlocks> {
        let descs = ranges
            .iter()
            .map(|&(o, l)| self.desc(region, o, l))
            .collect::<Result<Vec<RemoteDesc>>>()?;
        Ok(crate::RemoteBlocks::new(descs))
    }

    /// Why the peer was lost, if it was.
    pub fn lost(&self) -> Option<String> {
        self.shared.lost()
    }

    /// Number of (local NIC, peer NIC) paths to the peer.
    pub fn paths(&self) -> usize {
        self.shared.paths.len()
    }
}

/// What a peer needs from the agent it belongs to. Held weakly: the agent may go first, and
/// then the peer's threads end.
pub(crate) trait PeerHost: Send + Sync {
    /// The peer was lost, for `why`: the agent records it and wakes its engine (transfers to
    /// the peer end).
    fn peer_lost(&self, peer: &str, why: String);
    /// A notification arrived from the peer.
    fn notified(&self, n: Notification);
    /// The peer said one of its registrations is gone.
    fn peer_region_gone(&self, e: Event);
    /// Whether the peers' gone notices are ignored (the injected `ack-then-write` holder).
    fn ignores_gone(&self) -> bool;
    /// The peer asks the agent to land (after its WRITE) or stage (before its READ) ranges of
    /// the agent's staged registrations; the failure, if any, goes back to it.
    fn serve_peer_stage(
        &self,
        peer: PeerKey<'_>,
        ranges: &[StageRange],
        land: bool,
    ) -> Option<StageFailure>;
    /// The peer answered the staging request of the agent's transfer `transfer`.
    fn staged(&self, transfer: u64, failure: Option<StageFailure>, peer: &Arc<PeerShared>);
    /// The agent is stopping.
    fn stopping(&self) -> bool;
    /// The peer is gone: the agent stops listing it.
    fn retire(&self, peer: &Arc<PeerShared>);
    /// Something the peer sent was refused (it failed its checks or a bound).
    fn count_refusal(&self, why: Refusal);
}

impl PeerShared {
    /// A peer called `name`, connected over `paths`, with `ctrl` as its control connection and
    /// the registrations its metadata listed (checked against `limits` already). Its threads
    /// start with [`PeerShared::start`].
    pub(crate) fn new(
        (name, session): (String, u64),
        agent: Weak<dyn PeerHost>,
        limits: Limits,
        regions: Known,
        paths: Vec<Path>,
        ctrl: Oob,
    ) -> (Arc<PeerShared>, Receiver<Wire>) {
        let (tx, rx) = sync_channel::<Wire>(CONTROL_QUEUE);
        let peer = Arc::new(PeerShared {
            tag: PeerTag::new(&name),
            name,
            session,
            agent,
            limits,
            regions: Mutex::new(regions),
            announced: Condvar::new(),
            paths,
            lost: Mutex::new(None),
            ctrl: Arc::new(ctrl),
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(Vec::new()),
        });
        (peer, rx)
    }

    /// Start the control connection's writer (sending what `rx` gets) and reader. A peer
    /// whose threads could not all start is lost; one with no reader is retired at once (no
    /// reader would ever retire it).
    pub(crate) fn start(self: &Arc<Self>, rx: Receiver<Wire>) {
        let writer = {
            let (p, c) = (self.clone(), self.ctrl.clone());
            std::thread::Builder::new()
                .name(format!("dmaplane-ctrl-tx {}", self.name))
                .spawn(move || write_loop(&p, &c, rx))
        };
        let reader = {
            let (p, c) = (self.clone(), self.ctrl.clone());
            std::thread::Builder::new()
                .name(format!("dmaplane-ctrl-rx {}", self.name))
                .spawn(move || read_loop(&p, &c))
        };
        match (writer, reader) {
            (Ok(w), Ok(r)) => lock(&self.threads).extend([w, r]),
            (w, r) => {
                self.mark_lost("no thread for the control connection".into());
                let no_reader = r.is_err();
                lock(&self.threads).extend(w.into_iter().chain(r));
                if no_reader {
                    self.retire();
                }
            }
        }
    }

    pub(crate) fn lost(&self) -> Option<String> {
        lock(&self.lost).clone()
    }

    pub(crate) fn region(&self, id: u32) -> Option<RegionInfo> {
        lock(&self.regions).map.get(&id).cloned()
    }

    /// What the peer said of its registration `id` when it said it is gone, if it did.
    pub(crate) fn gone(&self, id: u32) -> Option<Gone> {
        lock(&self.regions).gone.get(&id).cloned()
    }

    /// Registration `id` of the peer; refused typed when the peer said it is gone, invalid
    /// when it never told of one (`what` is being made of it).
    pub(crate) fn region_or_gone(&self, id: u32, what: &str) -> Result<RegionInfo> {
        if let Some(r) = self.region(id) {
            return Ok(r);
        }
        if let Some(g) = self.gone(id) {
            return Err(Error::Revoked {
                side: Side::Remote,
                region: id,
                name: g.name,
                epoch: g.epoch,
                why: format!("peer {} {} (a {what} of it is refused)", self.name, g.why),
            });
        }
        Err(Error::invalid(
            format!("peer {}", self.name),
            "region",
            id,
            "the peer has no such registration",
        ))
    }

    pub(crate) fn mark_lost(&self, why: String) {
        let mut l = lock(&self.lost);
        if l.is_some() {
            return;
        }
        tracing::info!(peer = %self.name, %why, "peer lost");
        *l = Some(why.clone());
        drop(l);
        self.announced.notify_all();
        // Its queue pairs are dead (never reconnected): flush them now, so a request still
        // waiting on one (its connection being dialled, say) ends at once as the peer lost,
        // not when its retries run out.
        for lane in self.paths.iter().flat_map(|p| &p.lanes) {
            if let Err(e) = lane
                .qp
                .modify(&dmaplane_rdma::QpAttr::to(dmaplane_rdma::QpState::Err))
            {
                tracing::debug!(peer = %self.name, qpn = lane.qp.qpn(), error = %e, "queue pair of a lost peer not flushed");
            }
        }
        if let Some(a) = self.agent.upgrade() {
            a.peer_lost(&self.name, why);
        }
    }

    /// Queue a control message; never blocks (a full queue or a lost peer fails at once).
    pub(crate) fn send(&self, w: Wire) -> Result<()> {
        if let Some(why) = self.lost() {
            return Err(Error::PeerLost {
                peer: self.name.clone(),
                why,
            });
        }
        let tx = lock(&self.tx);
        let Some(tx) = tx.as_ref() else {
            return Err(Error::PeerLost {
                peer: self.name.clone(),
                why: "closed".into(),
            });
        };
        tx.try_send(w).map_err(|e| match e {
            TrySendError::Full(_) => Error::PeerLost {
                peer: self.name.clone(),
                why: format!(
                    "its control queue is full ({CONTROL_QUEUE} messages): it stopped reading"
                ),
            },
            TrySendError::Disconnected(_) => Error::PeerLost {
                peer: self.name.clone(),
                why: "the control connection closed".into(),
            },
        })
    }

    pub(crate) fn notify(&self, transfer: Option<u64>, tag: String, bytes: Vec<u8>) -> Result<()> {
        self.send(Wire::Notify {
            transfer,
            tag,
            bytes,
        })
    }

    /// Ask the peer to land (or stage) ranges of its staged registrations for `transfer`.
    pub(crate) fn stage(&self, transfer: u64, land: bool, ranges: Vec<StageRange>) -> Result<()> {
        self.send(Wire::Stage {
            transfer,
            land,
            ranges,
        })
    }

    /// Tell the peer of a new registration and grant it leases on every path whose NIC
    /// serves it.
    pub(crate) fn announce(&self, entry: &MemoryEntry, ps: Option<&PeerStage>, info: &RegionInfo) {
        self.grant(entry, ps);
        if let Err(e) = self.send(Wire::Region { info: info.clone() }) {
            tracing::warn!(peer = %self.name, error = %e, "registration not announced");
        }
    }

    /// Leases on `entry` on every path whose NIC serves it: on a staged path, on the peer's
    /// own staging buffer (`ps`).
    fn grant(&self, entry: &MemoryEntry, ps: Option<&PeerStage>) {
        for p in &self.paths {
            let Some(mr) = entry.mr_for(p.local, ps) else {
                continue;
            };
            if !lock(&p.granted).insert(entry.id) {
                continue;
            }
            if let Some(link) = lock(&p.link).as_ref()
                && let Err(e) = link.grant(mr)
            {
                tracing::warn!(peer = %self.name, region = entry.id, error = %e, "lease not granted");
            }
        }
    }

    /// The lease the peer granted on `path` for `rkey`, waiting up to `timeout` for it (its
    /// announcement may overtake the grant: they travel on different connections).
    pub(crate) fn lease(&self, path: usize, rkey: u32, timeout: Duration) -> Option<Arc<RemoteMr>> {
        let p = &self.paths[path];
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = lock(&p.leases).get(&rkey) {
                return Some(l.clone());
            }
            let link = lock(&p.link);
            let link = link.as_ref()?;
            let got = match link.try_grant() {
                Some(g) => Some(g),
                None => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    link.next_grant(left.min(Duration::from_millis(20))).ok()
                }
            };
            if let Some(g) = got {
                lock(&p.leases).insert(g.rkey(), g);
            }
        }
    }

    /// A lost peer lets go of what it holds: the writer ends, the lease links and the control
    /// connection close, and the agent stops listing it. Queue pairs go with the last transfer
    /// that uses them.
    pub(crate) fn retire(self: &Arc<Self>) {
        lock(&self.tx).take();
        for p in &self.paths {
            lock(&p.link).take();
        }
        let _ = self.ctrl.shutdown();
        if let Some(a) = self.agent.upgrade() {
            a.retire(self);
        }
    }

    /// Close: `bye` to the peer, links and the control connection shut.
    pub(crate) fn close(&self, why: &str) {
        let _ = self.send(Wire::Bye);
        self.mark_lost(why.to_string());
        // The writer sends what is queued (the bye) and ends once the sender goes.
        lock(&self.tx).take();
        for p in &self.paths {
            lock(&p.link).take();
        }
        let handles: Vec<JoinHandle<()>> = lock(&self.threads).drain(..).collect();
        let me = std::thread::current().id();
        let mut writer_done = false;
        for h in handles {
            if h.thread().id() == me {
                continue;
            }
            if !writer_done {
                // The first handle is the writer: let it flush the bye before the shutdown.
                writer_done = true;
                let _ = h.join();
                let _ = self.ctrl.shutdown();
                continue;
            }
            let _ = h.join();
        }
        let _ = self.ctrl.shutdown();
    }
}

/// Send what is queued; on an otherwise idle connection a ping every [`Limits::keepalive`],
/// so the peer's idle timeout does not take this agent for gone.
fn write_loop(p: &PeerShared, oob: &Oob, rx: Receiver<Wire>) {
    loop {
        let w = match rx.recv_timeout(p.limits.keepalive) {
            Ok(w) => w,
            Err(RecvTimeoutError::Timeout) => Wire::Ping,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if let Err(e) = oob.send(&w) {
            p.mark_lost(format!("sending on the control connection: {e}"));
            return;
        }
    }
}

fn read_loop(p: &Arc<PeerShared>, oob: &Oob) {
    read_until_lost(p, oob);
    p.retire();
}

fn read_until_lost(p: &Arc<PeerShared>, oob: &Oob) {
    let agent = &p.agent;
    let refused = |why: Refusal| {
        if let Some(a) = agent.upgrade() {
            a.count_refusal(why);
        }
    };
    let mut heard = Instant::now();
    loop {
        if p.lost().is_some() {
            return;
        }
        let got = oob.recv::<Wire>(POLL);
        if got.is_ok() {
            heard = Instant::now();
        }
        match got {
            Ok(Wire::Region { info }) => {
                if let Err(e) = info.check(&p.name) {
                    tracing::warn!(peer = %p.name, error = %e, "announcement refused");
                    refused(Refusal::Check);
                    continue;
                }
                let id = info.id;
                let kept = lock(&p.regions).insert(info, &p.limits);
                p.announced.notify_all();
                if let Err((limit, why)) = kept {
                    tracing::warn!(peer = %p.name, region = id, %why, "announcement refused");
                    refused(limit);
                }
            }
            Ok(Wire::Gone { region, epoch, why }) => {
                let Some(a) = agent.upgrade() else { return };
                if a.ignores_gone() {
                    tracing::debug!(peer = %p.name, region, "gone ignored: injected fault ack-then-write");
                    continue;
                }
                let forgot = lock(&p.regions).forget(region, epoch, why);
                p.announced.notify_all();
                match forgot {
                    Some(g) => a.peer_region_gone(Event::PeerRegionGone {
                        peer: p.name.clone(),
                        region,
                        name: g.name,
                        epoch,
                        why,
                    }),
                    None => {
                        tracing::debug!(peer = %p.name, region, "gone: a registration this agent was not told of")
                    }
                }
            }
            Ok(Wire::Notify {
                transfer,
                tag,
                bytes,
            }) => {
                let Some(a) = agent.upgrade() else { return };
                if bytes.len() > p.limits.notification_bytes {
                    tracing::warn!(peer = %p.name, len = bytes.len(), limit = p.limits.notification_bytes, "notification refused: longer than limits.notification_bytes");
                    a.count_refusal(Refusal::NotificationBytes);
                    continue;
                }
                if let Err(why) = crate::notify::check_tag(&tag) {
                    tracing::warn!(peer = %p.name, %why, "notification refused: its tag");
                    a.count_refusal(Refusal::Check);
                    continue;
                }
                a.notified(Notification {
                    from: p.name.clone(),
                    tag,
                    bytes,
                    transfer,
                });
            }
            Ok(Wire::Stage {
                transfer,
                land,
                ranges,
            }) => {
                let Some(a) = agent.upgrade() else { return };
                let failure = a.serve_peer_stage((&p.name, p.session), &ranges, land);
                if let Some(f) = &failure
                    && f.epoch.is_some()
                {
                    // A revoke under the peer's transfer: expected, and typed for the peer.
                    tracing::debug!(peer = %p.name, transfer, region = f.region, why = %f.why, "staging for the peer met a revoke");
                } else if let Some(f) = &failure {
                    tracing::warn!(peer = %p.name, transfer, region = f.region, why = %f.why, "staging for the peer failed");
                }
                if let Err(e) = p.send(Wire::Staged { transfer, failure }) {
                    tracing::warn!(peer = %p.name, transfer, error = %e, "staging answer not sent");
                }
            }
            Ok(Wire::Staged { transfer, failure }) => {
                let Some(a) = agent.upgrade() else { return };
                a.staged(transfer, failure, p);
            }
            Ok(Wire::Bye) => {
                p.mark_lost("it said bye".into());
                return;
            }
            Ok(Wire::Ping) => {}
            Ok(other) => tracing::warn!(peer = %p.name, ?other, "unexpected control message"),
            Err(RdmaError::Timeout { .. }) => {
                // This agent went away (or is stopping): the connection goes with it, so
                // the peer sees it at once.
                if agent.upgrade().is_none_or(|a| a.stopping()) {
                    p.mark_lost("this agent stopped".into());
                    let _ = oob.shutdown();
                    return;
                }
                // An honest peer pings every keepalive: silence this long is a peer gone
                // (its host, or its process, hung) or one holding the connection idle.
                let idle = p.limits.idle;
                if heard.elapsed() > idle {
                    refused(Refusal::Idle);
                    p.mark_lost(format!(
                        "nothing heard from it for {} ms (limits.idle)",
                        idle.as_millis()
                    ));
                    let _ = oob.shutdown();
                    return;
                }
            }
            Err(e) => {
                if let RdmaError::MessageTooLong { .. } = e {
                    refused(Refusal::MessageBytes);
                }
                p.mark_lost(format!("the control connection ended: {e}"));
                return;
            }
        }
    }
}
