//! Peers and the built-in handshake: two agents meet over TCP (the listener every agent runs,
//! [`crate::Agent::listen_addr`]) with no other service, as Mooncake's P2P handshake does.
//!
//! The connecting side sends `hello` (its metadata); the listener answers `welcome` (its own) or
//! `refuse`. Both then take the same paths — every (connecting NIC, listening NIC) pair, in
//! order — and for each path connect `qps_per_path` RC queue pairs, swapping endpoints on the
//! same connection. The connecting side then opens one more TCP connection per path, announced
//! by `link`, which becomes that path's lease link: each side grants the peer leases on its
//! registrations there, and revokes them there. The first connection stays open as the control
//! channel: new registrations, notifications and `bye`. When it ends, the peer is lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dmaplane_rdma::oob::{Oob, OobListener};
use dmaplane_rdma::{LeaseLink, Mtu, Qp, QpCaps, RdmaError, RemoteMr};
use serde::{Deserialize, Serialize};

use crate::agent::AgentInner;
use crate::desc::Desc;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::metadata::{Metadata, RegionInfo, VERSION};
use crate::notify::{MAX_NOTIFY, Notification};
use crate::region::MemoryEntry;
use crate::stage::{StageFailure, StageRange};
use crate::sync::lock;

/// Registrations of one peer this agent keeps track of (what its announcements may fill).
const MAX_PEER_REGIONS: usize = 1 << 20;
/// Handshakes (and connections not yet past their first message) served at once.
const MAX_HANDSHAKES: usize = 64;

/// Control messages queued for a peer before sends are refused.
const CONTROL_QUEUE: usize = 4096;
/// How often idle control readers and the listener look at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// What travels on the control connection (one JSON line each).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "msg")]
enum Wire {
    Hello {
        version: u16,
        metadata: Metadata,
        qps: usize,
        nonce: u64,
    },
    Welcome {
        metadata: Metadata,
    },
    Refuse {
        why: String,
    },
    Link {
        nonce: u64,
        path: usize,
    },
    Region {
        info: RegionInfo,
    },
    Notify {
        transfer: u64,
        bytes: Vec<u8>,
    },
    /// Copy these ranges of the receiver's staged registrations into device memory (`land`,
    /// after a WRITE) or out of it into their staging buffers (before a READ); answered by
    /// `staged`.
    Stage {
        transfer: u64,
        land: bool,
        ranges: Vec<StageRange>,
    },
    Staged {
        transfer: u64,
        failure: Option<StageFailure>,
    },
    Bye,
}

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
    fn new(qp: Qp, nic: usize) -> Lane {
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
    fn new(local: usize, remote_nic: &str, lanes: Vec<Arc<Lane>>, link: LeaseLink) -> Path {
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
    agent: Weak<AgentInner>,
    regions: Mutex<HashMap<u32, RegionInfo>>,
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
        lock(&self.shared.regions).get(&id).cloned()
    }

    /// The peer's most recent registration of a memory called `name`.
    pub fn region_named(&self, name: &str) -> Option<RegionInfo> {
        lock(&self.shared.regions)
            .values()
            .filter(|r| r.name == name)
            .max_by_key(|r| r.id)
            .cloned()
    }

    /// Every registration of the peer this agent knows of.
    pub fn regions(&self) -> Vec<RegionInfo> {
        let mut v: Vec<RegionInfo> = lock(&self.shared.regions).values().cloned().collect();
        v.sort_by_key(|r| r.id);
        v
    }

    /// A descriptor into the peer's registration `region`, checked against its length.
    ///
    /// Fails with [`Error::Invalid`] when this agent knows no such registration of the peer,
    /// or the range is empty or runs past the registration's end.
    ///
    /// ```
    /// use dmaplane::{Agent, Desc, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let testbed = Testbed::builtin()?;
    /// let a = Agent::builder("a").testbed(testbed.clone()).nics(["nic0"]).build()?;
    /// let b = Agent::builder("b").testbed(testbed).nics(["nic1"]).build()?;
    /// let dst = b.alloc_host("dst", 1 << 20)?;
    /// let rb = b.register(&dst)?;
    /// let peer = a.connect(&b.metadata_blob()?)?;
    /// assert_eq!(peer.name(), "b");
    /// assert_eq!(peer.desc(rb.id(), 4096, 512)?, Desc::new(rb.id(), 4096, 512));
    /// assert!(peer.desc(rb.id(), 0, (1 << 20) + 1).is_err());
    /// assert!(peer.desc(rb.id() + 1, 0, 512).is_err());
    /// # Ok(()) }
    /// ```
    pub fn desc(&self, region: u32, offset: u64, len: u64) -> Result<Desc> {
        let Some(r) = self.region(region) else {
            return Err(Error::invalid(
                format!("peer {}", self.shared.name),
                "region",
                region,
                "the peer has no such registration",
            ));
        };
        match offset.checked_add(len) {
            Some(end) if end <= r.len && len > 0 => Ok(Desc::new(region, offset, len)),
            _ => Err(Error::invalid(
                format!("peer {} region {region} ({})", self.shared.name, r.name),
                "desc",
                format!("[{offset:#x}, +{len:#x})"),
                format!("outside its {} bytes (or empty)", r.len),
            )),
        }
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

impl PeerShared {
    pub(crate) fn lost(&self) -> Option<String> {
        lock(&self.lost).clone()
    }

    pub(crate) fn region(&self, id: u32) -> Option<RegionInfo> {
        lock(&self.regions).get(&id).cloned()
    }

    fn mark_lost(&self, why: String) {
        let mut l = lock(&self.lost);
        if l.is_some() {
            return;
        }
        tracing::info!(peer = %self.name, %why, "peer lost");
        *l = Some(why.clone());
        drop(l);
        if let Some(a) = self.agent.upgrade() {
            a.events.push(Event::PeerLost {
                peer: self.name.clone(),
                why,
            });
            a.engine.wake();
        }
    }

    /// Queue a control message; never blocks (a full queue or a lost peer fails at once).
    fn send(&self, w: Wire) -> Result<()> {
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

    pub(crate) fn notify(&self, transfer: u64, bytes: Vec<u8>) -> Result<()> {
        self.send(Wire::Notify { transfer, bytes })
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
    pub(crate) fn announce(&self, entry: &MemoryEntry, info: &RegionInfo) {
        self.grant(entry);
        if let Err(e) = self.send(Wire::Region { info: info.clone() }) {
            tracing::warn!(peer = %self.name, error = %e, "registration not announced");
        }
    }

    fn grant(&self, entry: &MemoryEntry) {
        for p in &self.paths {
            let Some(mr) = &entry.mrs[p.local] else {
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
    fn retire(self: &Arc<Self>, agent: &Weak<AgentInner>) {
        lock(&self.tx).take();
        for p in &self.paths {
            lock(&p.link).take();
        }
        let _ = self.ctrl.shutdown();
        if let Some(a) = agent.upgrade() {
            lock(&a.peers).retain(|x| !Arc::ptr_eq(x, self));
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

/// Accept peers until the agent stops.
pub(crate) fn spawn_listener(
    shared: &Arc<AgentInner>,
    listener: OobListener,
) -> Result<JoinHandle<()>> {
    let s = shared.clone();
    std::thread::Builder::new()
        .name(format!("dmaplane-accept {}", shared.name))
        .spawn(move || {
            while !s.stop.load(Ordering::Acquire) {
                match listener.accept(POLL) {
                    Ok(oob) => {
                        if s.in_handshake.fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKES {
                            s.in_handshake.fetch_sub(1, Ordering::AcqRel);
                            tracing::warn!(agent = %s.name, peer = %oob.peer_addr(), "too many handshakes at once: connection refused");
                            continue;
                        }
                        let s2 = s.clone();
                        let spawned = std::thread::Builder::new()
                            .name("dmaplane-handshake".into())
                            .spawn(move || {
                                first_message(&s2, oob);
                                s2.in_handshake.fetch_sub(1, Ordering::AcqRel);
                            });
                        if let Err(e) = spawned {
                            tracing::error!(agent = %s.name, error = %e, "no thread for a handshake");
                        }
                    }
                    Err(RdmaError::Timeout { .. }) => {}
                    Err(e) => {
                        tracing::warn!(agent = %s.name, error = %e, "accept");
                        std::thread::sleep(POLL);
                    }
                }
            }
        })
        .map_err(|e| Error::setup(&shared.name, format!("no listener thread: {e}")))
}

/// What a new connection is: a peer's hello, or a lease link for a handshake under way.
fn first_message(s: &Arc<AgentInner>, oob: Oob) {
    let peer = oob.peer_addr();
    match oob.recv::<Wire>(s.cfg.setup_timeout) {
        Ok(Wire::Hello {
            version,
            metadata,
            qps,
            nonce,
        }) => {
            if let Err(e) = accept(s, oob, version, metadata, qps, nonce) {
                tracing::warn!(agent = %s.name, %peer, error = %e, "handshake refused or failed");
            }
        }
        Ok(Wire::Link { nonce, path }) => {
            // Only for a handshake under way, and for a path it has.
            match lock(&s.handshakes).get(&nonce) {
                Some(&paths) if path < paths => {
                    lock(&s.pending_links).insert((nonce, path), oob);
                }
                _ => {
                    tracing::warn!(agent = %s.name, %peer, nonce, path, "lease link for no handshake under way: dropped")
                }
            }
        }
        Ok(other) => tracing::warn!(agent = %s.name, %peer, ?other, "unexpected first message"),
        Err(e) => tracing::debug!(agent = %s.name, %peer, error = %e, "connection without a hello"),
    }
}

/// Both sides take every (connecting NIC, listening NIC) pair, in this order.
fn paths(connecting: &Metadata, listening: &Metadata) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for a in &connecting.nics {
        for b in &listening.nics {
            v.push((a.name.clone(), b.name.clone()));
        }
    }
    v
}

fn handshake_err(peer: &str, why: impl Into<String>) -> Error {
    Error::Handshake {
        peer: peer.to_string(),
        why: why.into(),
    }
}

/// The listening side of a handshake.
fn accept(
    s: &Arc<AgentInner>,
    oob: Oob,
    version: u16,
    theirs: Metadata,
    qps: usize,
    nonce: u64,
) -> Result<()> {
    let peer = theirs.agent.clone();
    let refuse = |why: String| -> Result<()> {
        let _ = oob.send(&Wire::Refuse { why: why.clone() });
        Err(handshake_err(&peer, why))
    };
    if version != VERSION {
        return refuse(format!(
            "version {version}; this agent speaks version {VERSION}"
        ));
    }
    if qps == 0 || qps > 64 {
        return refuse(format!(
            "{qps} queue pairs per path asked; 1 to 64 accepted"
        ));
    }
    if lock(&s.peers)
        .iter()
        .any(|p| p.name == peer && p.lost().is_none())
    {
        return refuse(format!("an agent called {peer} is connected already"));
    }
    let mine = s.metadata();
    oob.send(&Wire::Welcome {
        metadata: mine.clone(),
    })?;
    let pairs = paths(&theirs, &mine);
    let t = s.cfg.setup_timeout;
    lock(&s.handshakes).insert(nonce, pairs.len());
    let r = accept_paths(s, &oob, &peer, &pairs, qps, nonce, &theirs, t);
    lock(&s.handshakes).remove(&nonce);
    lock(&s.pending_links).retain(|(n, _), _| *n != nonce);
    finish(s, oob, theirs, r?);
    Ok(())
}

/// The listening side's paths: queue pairs, then the lease link the other side opens.
#[allow(clippy::too_many_arguments)]
fn accept_paths(
    s: &Arc<AgentInner>,
    oob: &Oob,
    peer: &str,
    pairs: &[(String, String)],
    qps: usize,
    nonce: u64,
    theirs: &Metadata,
    t: Duration,
) -> Result<Vec<Path>> {
    let mut built = Vec::with_capacity(pairs.len());
    for (i, (their_nic, my_nic)) in pairs.iter().enumerate() {
        let local = nic_index(s, my_nic, peer)?;
        let mtu = path_mtu(s, local, theirs, their_nic);
        let lanes = lanes(s, local, qps, mtu, oob, t)?;
        // The connecting side opens this path's lease link next.
        let deadline = Instant::now() + t;
        let link_oob = loop {
            if let Some(o) = lock(&s.pending_links).remove(&(nonce, i)) {
                break o;
            }
            if Instant::now() > deadline {
                return Err(handshake_err(
                    peer,
                    format!("no lease link for path {i} within {t:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let link = LeaseLink::open(s.nics[local].dev(), link_oob, t)?;
        built.push(Path::new(local, their_nic, lanes, link));
    }
    Ok(built)
}

/// The connecting side of a handshake.
pub(crate) fn connect(s: &Arc<AgentInner>, addr: &str) -> Result<Peer> {
    let t = s.cfg.setup_timeout;
    let oob = Oob::connect(addr, t)?;
    let nonce = nonce();
    let mine = s.metadata();
    oob.send(&Wire::Hello {
        version: VERSION,
        metadata: mine.clone(),
        qps: s.cfg.qps_per_path,
        nonce,
    })?;
    let theirs = match oob.recv::<Wire>(t)? {
        Wire::Welcome { metadata } => metadata,
        Wire::Refuse { why } => return Err(handshake_err(addr, format!("refused: {why}"))),
        other => {
            return Err(handshake_err(
                addr,
                format!("expected welcome, got {other:?}"),
            ));
        }
    };
    let peer = theirs.agent.clone();
    let pairs = paths(&mine, &theirs);
    let mut built = Vec::with_capacity(pairs.len());
    for (i, (my_nic, their_nic)) in pairs.iter().enumerate() {
        let local = nic_index(s, my_nic, &peer)?;
        let mtu = path_mtu(s, local, &theirs, their_nic);
        let lanes = lanes(s, local, s.cfg.qps_per_path, mtu, &oob, t)?;
        let link_oob = Oob::connect(addr, t)?;
        link_oob.send(&Wire::Link { nonce, path: i })?;
        let link = LeaseLink::open(s.nics[local].dev(), link_oob, t)?;
        built.push(Path::new(local, their_nic, lanes, link));
    }
    Ok(Peer {
        shared: finish(s, oob, theirs, built),
    })
}

fn nic_index(s: &AgentInner, nic: &str, peer: &str) -> Result<usize> {
    s.nics.index_of(nic).ok_or_else(|| {
        handshake_err(
            peer,
            format!("path names NIC {nic}, which agent {} does not use", s.name),
        )
    })
}

/// `n` queue pairs on NIC `local`, each connected to the peer's over `oob`.
/// The smaller of both ends' active MTUs: the path MTU both queue pairs must use.
fn path_mtu(s: &AgentInner, local: usize, theirs: &Metadata, their_nic: &str) -> Mtu {
    let mine = s.nics[local].mtu();
    let other = theirs
        .nics
        .iter()
        .find(|n| n.name == their_nic)
        .map_or(mine.bytes(), |n| n.mtu);
    [
        Mtu::Mtu256,
        Mtu::Mtu512,
        Mtu::Mtu1024,
        Mtu::Mtu2048,
        Mtu::Mtu4096,
    ]
    .into_iter()
    .rev()
    .find(|m| m.bytes() <= mine.bytes().min(other))
    .unwrap_or(Mtu::Mtu256)
}

fn lanes(
    s: &AgentInner,
    local: usize,
    n: usize,
    mtu: Mtu,
    oob: &Oob,
    t: Duration,
) -> Result<Vec<Arc<Lane>>> {
    let nic = &s.nics[local];
    let caps = QpCaps {
        max_send_wr: s.cfg.depth,
        max_recv_wr: 1,
        ..QpCaps::default()
    };
    let qps = (0..n)
        .map(|_| nic.pd().create_qp(nic.cq(), nic.cq(), caps))
        .collect::<std::result::Result<Vec<Qp>, _>>()?;
    crate::raw::connect_over(&qps, oob, mtu, t)?;
    Ok(qps
        .into_iter()
        .map(|qp| Arc::new(Lane::new(qp, local)))
        .collect())
}

fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Both sides: the peer is connected — grant it leases on every registration, start the
/// control threads, and list it.
fn finish(s: &Arc<AgentInner>, oob: Oob, theirs: Metadata, paths: Vec<Path>) -> Arc<PeerShared> {
    let ctrl = Arc::new(oob);
    let (tx, rx) = sync_channel::<Wire>(CONTROL_QUEUE);
    let peer = Arc::new(PeerShared {
        name: theirs.agent.clone(),
        agent: Arc::downgrade(s),
        regions: Mutex::new(theirs.regions.iter().map(|r| (r.id, r.clone())).collect()),
        paths,
        lost: Mutex::new(None),
        ctrl: ctrl.clone(),
        tx: Mutex::new(Some(tx)),
        threads: Mutex::new(Vec::new()),
    });
    // Listed before its reader starts: a reader that finds the peer gone at once retires it
    // from the list, which it cannot do before the peer is in it (a peer that left during the
    // handshake stayed listed for good when the push came after the reader's retire).
    lock(&s.peers).push(peer.clone());
    let writer = {
        let (p, c) = (peer.clone(), ctrl.clone());
        std::thread::Builder::new()
            .name(format!("dmaplane-ctrl-tx {}", peer.name))
            .spawn(move || write_loop(&p, &c, rx))
    };
    let reader = {
        let p = peer.clone();
        let w = Arc::downgrade(s);
        std::thread::Builder::new()
            .name(format!("dmaplane-ctrl-rx {}", peer.name))
            .spawn(move || read_loop(&p, &ctrl, &w))
    };
    match (writer, reader) {
        (Ok(w), Ok(r)) => lock(&peer.threads).extend([w, r]),
        (w, r) => {
            peer.mark_lost("no thread for the control connection".into());
            let no_reader = r.is_err();
            lock(&peer.threads).extend(w.into_iter().chain(r));
            if no_reader {
                peer.retire(&Arc::downgrade(s));
            }
        }
    }
    // Listed first (above), then every live registration granted and announced: one
    // registered while the handshake ran (after its metadata was sent) is not missed, and one
    // registered from now on is announced by the registration itself (grants are
    // deduplicated).
    let entries: Vec<Arc<MemoryEntry>> = lock(&s.entries)
        .values()
        .filter_map(Weak::upgrade)
        .filter(|e| e.revoked_at().is_none())
        .collect();
    for e in &entries {
        peer.announce(e, &s.region_info(e));
    }
    // An agent dropped while this handshake ran closes what it just connected.
    if s.stop.load(Ordering::Acquire) {
        peer.close("the agent stopped during the handshake");
    }
    tracing::info!(agent = %s.name, peer = %peer.name, paths = peer.paths.len(), "peer connected");
    peer
}

fn write_loop(p: &PeerShared, oob: &Oob, rx: Receiver<Wire>) {
    for w in rx {
        if let Err(e) = oob.send(&w) {
            p.mark_lost(format!("sending on the control connection: {e}"));
            return;
        }
    }
}

fn read_loop(p: &Arc<PeerShared>, oob: &Oob, agent: &Weak<AgentInner>) {
    read_until_lost(p, oob, agent);
    p.retire(agent);
}

fn read_until_lost(p: &Arc<PeerShared>, oob: &Oob, agent: &Weak<AgentInner>) {
    loop {
        if p.lost().is_some() {
            return;
        }
        match oob.recv::<Wire>(POLL) {
            Ok(Wire::Region { info }) => {
                let mut r = lock(&p.regions);
                if r.len() >= MAX_PEER_REGIONS && !r.contains_key(&info.id) {
                    tracing::warn!(peer = %p.name, region = info.id, "the peer announced more than {MAX_PEER_REGIONS} registrations: ignored");
                    continue;
                }
                r.insert(info.id, info);
            }
            Ok(Wire::Notify { transfer, bytes }) => {
                let Some(a) = agent.upgrade() else { return };
                if bytes.len() > MAX_NOTIFY {
                    tracing::warn!(peer = %p.name, len = bytes.len(), "oversized notification dropped");
                    continue;
                }
                a.engine.count_notification_received();
                a.inbox.push(Notification {
                    from: p.name.clone(),
                    transfer,
                    bytes,
                });
            }
            Ok(Wire::Stage {
                transfer,
                land,
                ranges,
            }) => {
                let Some(a) = agent.upgrade() else { return };
                let failure = a.serve_stage(&ranges, land);
                if let Some(f) = &failure {
                    tracing::warn!(peer = %p.name, transfer, region = f.region, why = %f.why, "staging for the peer failed");
                }
                if let Err(e) = p.send(Wire::Staged { transfer, failure }) {
                    tracing::warn!(peer = %p.name, transfer, error = %e, "staging answer not sent");
                }
            }
            Ok(Wire::Staged { transfer, failure }) => {
                let Some(a) = agent.upgrade() else { return };
                a.engine.staged(transfer, failure, p);
            }
            Ok(Wire::Bye) => {
                p.mark_lost("it said bye".into());
                return;
            }
            Ok(other) => tracing::warn!(peer = %p.name, ?other, "unexpected control message"),
            Err(RdmaError::Timeout { .. }) => {
                // This agent went away (or is stopping): the connection goes with it, so
                // the peer sees it at once.
                if agent
                    .upgrade()
                    .is_none_or(|a| a.stop.load(Ordering::Acquire))
                {
                    p.mark_lost("this agent stopped".into());
                    let _ = oob.shutdown();
                    return;
                }
            }
            Err(e) => {
                p.mark_lost(format!("the control connection ended: {e}"));
                return;
            }
        }
    }
}
