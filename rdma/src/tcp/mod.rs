//! The TCP backend: a software RC NIC whose wire is TCP, as Soft-RoCE is one whose wire is UDP.
//!
//! It has what verbs has — protection domains, memory regions with lkey/rkey, RC queue pairs
//! with the verbs state machine ([`crate::qp::check_modify`]), completion queues, `ERR` flushing
//! every outstanding request, SQD, partial posts — so the quiesce layer, leases and revoke run
//! on it unchanged. Its memory regions are this process's memory (`mr.rs`); one-sided WRITEs and
//! READs are executed by the target's engine, which checks key, bounds, access and the region's
//! state as a NIC does, and moves bytes straight between the socket and the registered memory.
//!
//! # Connections
//!
//! Each queue pair's requests travel on a TCP connection of its own, which the requester opens
//! to the data port of the responder's NIC when it first has work (`requester.rs`); the
//! responder's engine serves it (`responder.rs`). The connection is proven before a frame is
//! taken: the responder sends a nonce, and the requester answers with an HMAC-SHA256, keyed by
//! the responder QP's token, over the nonce and both QP numbers and the requester's GID. The
//! token is random per queue pair and told only in the endpoint ([`crate::RemoteQp::token`]),
//! which the agents exchange over their authenticated control connection: an rkey alone opens
//! nothing, and neither does a QP number.
//!
//! # Messages, frames and the revoke
//!
//! A message moves in frames of at most [`frame::MAX_PAYLOAD`] bytes ([`frame`]). Between two
//! frames the requester looks at its QP: once it is in ERR the rest of the message is not sent
//! (the message is cut and completes flushed), and once it stops at a boundary (SQD, the default
//! policy) no new message starts. The responder answers each message once it is in memory
//! (`ack`), and the requester completes requests in order as the answers come. A QP that goes
//! to ERR sends `flush`: the responder answers `flush-ack` once everything before it is done and
//! takes nothing after it. A QP is quiescent — [`crate::backend::QpBackend::quiesce`] calls back
//! — only once every message it started has been answered (or the peer closed the connection):
//! so after a holder's ack no frame of its is still on its way to land.
//!
//! A zap ([`crate::backend::MrBackend::zap`]) waits for the one system call under way on the
//! region; from its return on, frames for it are refused with a remote access error (`nak`),
//! and the requester's QP goes to ERR, as on RC.
//!
//! # Peers on one host
//!
//! A requester on the responder's host (and network namespace) moves the bytes of its WRITEs
//! and READs through shared memory instead — one copy between its region and a view of the
//! responder's, with the same keys, bounds and revoke — and the socket path stays for everything
//! else: see [`shm`].

pub mod frame;
mod io;
mod mr;
mod qp;
mod requester;
mod responder;
pub mod shm;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::thread::JoinHandle;

use dmaplane_core::{Accept, Access, SpaceKind};

use crate::backend::{
    AsyncEvent, BackendKind, CqBackend, DeviceBackend, DeviceInfo, DmaBufMr, MrBackend, MrRequest,
    PdBackend, QpBackend,
};
use crate::error::{RdmaError, Result};
use crate::qp::QpCaps;
use crate::soft_cq::SoftCq;
use crate::sync::{lock, read, write};

pub use frame::{FrameError, MAX_PAYLOAD};
pub(crate) use mr::TcpMr;
pub(crate) use qp::TcpQp;
pub use shm::UNMAP_WAIT;

/// How many connections may be waiting for their hello at once; more are closed at once.
pub const MAX_UNPROVEN: usize = 64;
/// What a TCP NIC counts of its peers' connections (an observer outside the engine's data path:
/// every refusal is counted where it is decided).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TcpStats {
    /// Connections proven and served.
    pub connections: u64,
    /// Hellos refused: wrong proof, unknown QP, a QP connected to another, a wrong version.
    pub hellos_refused: u64,
    /// Connections closed before a hello came (too many waiting, too slow, not a frame).
    pub unproven_closed: u64,
    /// Frames refused after the hello (bad header, out of order, key/bounds/access), and
    /// requests through views refused the same way.
    pub frames_refused: u64,
    /// Lanes to peers on this host proven and served (the shared-memory path, as the owner).
    pub lanes: u64,
    /// Views of its regions handed to peers on this host.
    pub views_shared: u64,
    /// Views peers said they dropped when told to.
    pub views_dropped: u64,
    /// Messages this NIC's requesters executed through views, and their bytes.
    pub shm_messages: u64,
    pub shm_bytes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    hellos_refused: AtomicU64,
    unproven_closed: AtomicU64,
    frames_refused: AtomicU64,
    lanes: AtomicU64,
    views_shared: AtomicU64,
    views_dropped: AtomicU64,
    shm_messages: AtomicU64,
    shm_bytes: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct NicShared {
    pub(crate) name: String,
    pub(crate) gid: [u8; 16],
    pub(crate) port: u16,
    next_key: AtomicU32,
    next_qpn: AtomicU32,
    next_pd: AtomicU32,
    pub(crate) mrs: RwLock<HashMap<u32, Weak<TcpMr>>>,
    pub(crate) qps: RwLock<HashMap<u32, Weak<TcpQp>>>,
    events: crate::event_queue::EventQueue,
    pub(crate) stopping: AtomicBool,
    /// Connections accepted that have not proven themselves yet.
    pub(crate) unproven: AtomicUsize,
    counters: Counters,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    /// The lane listener's id (0: none), told to proven requesters in the welcome.
    pub(crate) shm_id: u64,
    /// Whether it offers and uses the shared-memory path.
    pub(crate) shm: AtomicBool,
    shm_acceptor: Mutex<Option<JoinHandle<()>>>,
    /// Fault injection: its lanes say they dropped a view and keep it (see
    /// [`TcpNic::inject_keep_views`]).
    pub(crate) keep_views: AtomicBool,
    /// Starts a QP's requester connection (`requester::start`): handed to the QP rather than
    /// imported by it, so the QP and its requester do not import each other.
    pub(crate) start_requester: fn(Arc<TcpQp>, u64),
}

impl NicShared {
    pub(crate) fn event(&self, kind: &str, qpn: Option<u32>, detail: String) {
        self.events.push(&self.name, kind, qpn, detail);
    }

    pub(crate) fn mr(&self, key: u32) -> Option<Arc<TcpMr>> {
        read(&self.mrs).get(&key).and_then(Weak::upgrade)
    }

    pub(crate) fn qp(&self, qpn: u32) -> Option<Arc<TcpQp>> {
        read(&self.qps).get(&qpn).and_then(Weak::upgrade)
    }

    pub(crate) fn alive(&self) -> bool {
        !self.stopping.load(Ordering::Relaxed)
    }

    pub(crate) fn count_connection(&self) {
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_hello_refused(&self) {
        self.counters.hellos_refused.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_unproven_closed(&self) {
        self.counters
            .unproven_closed
            .fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_frame_refused(&self) {
        self.counters.frames_refused.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_lane(&self) {
        self.counters.lanes.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_view_shared(&self) {
        self.counters.views_shared.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_view_dropped(&self) {
        self.counters.views_dropped.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_shm_message(&self, bytes: u64) {
        self.counters.shm_messages.fetch_add(1, Ordering::Relaxed);
        self.counters.shm_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The lane id to tell a requester in the welcome: 0 when the path is off.
    pub(crate) fn offered_lane(&self) -> u64 {
        if self.shm.load(Ordering::Relaxed) {
            self.shm_id
        } else {
            0
        }
    }
}

type Hmac = hmac::Hmac<sha2::Sha256>;

fn mac(token: &[u8; 16], nonce: &[u8], responder: u32, requester: u32, gid: &[u8; 16]) -> Hmac {
    use hmac::Mac;
    let mut m = <Hmac as Mac>::new_from_slice(token).expect("HMAC takes keys of any length");
    m.update(b"dmaplane-tcp-hello-v1");
    m.update(nonce);
    m.update(&responder.to_le_bytes());
    m.update(&requester.to_le_bytes());
    m.update(gid);
    m
}

/// What a requester sends to prove it holds the responder QP's token: HMAC-SHA256 over the
/// responder's nonce, both QP numbers and the requester's GID. (Public so a test can play a
/// peer that knows the token and breaks every other rule.)
pub fn proof(
    token: &[u8; 16],
    nonce: &[u8],
    responder: u32,
    requester: u32,
    gid: &[u8; 16],
) -> [u8; 32] {
    use hmac::Mac;
    mac(token, nonce, responder, requester, gid)
        .finalize()
        .into_bytes()
        .into()
}

/// Check a requester's proof, in constant time.
pub(crate) fn verify(
    token: &[u8; 16],
    nonce: &[u8],
    responder: u32,
    requester: u32,
    gid: &[u8; 16],
    got: &[u8],
) -> bool {
    use hmac::Mac;
    mac(token, nonce, responder, requester, gid)
        .verify_slice(got)
        .is_ok()
}

/// A GID for an IP address, as RoCEv2 forms them: IPv4 mapped into IPv6.
pub fn gid_of(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The IP address a GID names.
pub fn ip_of(gid: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*gid);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// A software RC NIC whose wire is TCP; implements [`DeviceBackend`]. See the module docs.
#[derive(Debug)]
pub struct TcpNic {
    shared: Arc<NicShared>,
}

impl TcpNic {
    /// A NIC named `name` listening for its peers' data connections on `listen` (port 0 picks
    /// one). Its GID is the listening address; a wildcard address is refused unless
    /// `advertise` names the address peers reach it at.
    pub fn bind(name: &str, listen: SocketAddr, advertise: Option<IpAddr>) -> Result<TcpNic> {
        let ip = match (advertise, listen.ip()) {
            (Some(a), _) => a,
            (None, ip) if ip.is_unspecified() => {
                return Err(RdmaError::Connection {
                    what: format!("TCP NIC {name}: listen on {listen}"),
                    why: "a wildcard address is no address a peer can reach: give the address \
                          to advertise"
                        .into(),
                });
            }
            (None, ip) => ip,
        };
        let listener = TcpListener::bind(listen).map_err(|e| RdmaError::Connection {
            what: format!("TCP NIC {name}: listen on {listen}"),
            why: e.to_string(),
        })?;
        let port = listener
            .local_addr()
            .map_err(|e| RdmaError::io(format!("TCP NIC {name}: local address"), e))?
            .port();
        listener
            .set_nonblocking(true)
            .map_err(|e| RdmaError::io(format!("TCP NIC {name}: non-blocking listener"), e))?;
        // The lane listener for peers on this host: without one, the socket path only.
        let lanes = random::<8>()
            .map(|b| u64::from_le_bytes(b) | 1)
            .ok_or_else(|| "no random bytes for its name".to_string())
            .and_then(|id| shm::owner::listen(id).map(|l| (id, l)));
        let (shm_id, lane_listener) = match lanes {
            Ok((id, l)) => (id, Some(l)),
            Err(why) => {
                tracing::warn!(nic = name, %why, "no shared-memory lanes: the socket path only");
                (0, None)
            }
        };
        let shared = Arc::new(NicShared {
            name: name.to_string(),
            gid: gid_of(ip),
            port,
            next_key: AtomicU32::new(0x100 | (random_u32() & 0xfff0_0000)),
            next_qpn: AtomicU32::new(0x11),
            next_pd: AtomicU32::new(1),
            mrs: RwLock::new(HashMap::new()),
            qps: RwLock::new(HashMap::new()),
            events: crate::event_queue::EventQueue::default(),
            stopping: AtomicBool::new(false),
            unproven: AtomicUsize::new(0),
            counters: Counters::default(),
            acceptor: Mutex::new(None),
            shm_id,
            shm: AtomicBool::new(shm_id != 0),
            shm_acceptor: Mutex::new(None),
            keep_views: AtomicBool::new(false),
            start_requester: requester::start,
        });
        let handle = responder::start_acceptor(&shared, listener)?;
        *lock(&shared.acceptor) = Some(handle);
        if let Some(l) = lane_listener {
            let h = shm::owner::start(&shared, l)
                .map_err(|e| RdmaError::io(format!("TCP NIC {name}: lane acceptor thread"), e))?;
            *lock(&shared.shm_acceptor) = Some(h);
        }
        tracing::info!(nic = name, %ip, port, "TCP NIC listening");
        Ok(TcpNic { shared })
    }

    /// On loopback, a free port: for tests and one-host runs.
    pub fn loopback(name: &str) -> Result<TcpNic> {
        TcpNic::bind(name, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), None)
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Where peers reach its data port.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(ip_of(&self.shared.gid), self.shared.port)
    }

    /// What it counted of its peers' connections.
    pub fn stats(&self) -> TcpStats {
        let c = &self.shared.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TcpStats {
            connections: n(&c.connections),
            hellos_refused: n(&c.hellos_refused),
            unproven_closed: n(&c.unproven_closed),
            frames_refused: n(&c.frames_refused),
            lanes: n(&c.lanes),
            views_shared: n(&c.views_shared),
            views_dropped: n(&c.views_dropped),
            shm_messages: n(&c.shm_messages),
            shm_bytes: n(&c.shm_bytes),
        }
    }

    /// Offer and use the shared-memory path to peers on this host (on by default, when the
    /// lane listener could be made): off, every byte takes the socket. It applies to
    /// connections made from now on.
    pub fn set_shm(&self, on: bool) {
        self.shared
            .shm
            .store(on && self.shared.shm_id != 0, Ordering::Relaxed);
    }

    /// Break the shared-memory path's revoke on purpose, so the checks that judge it can be
    /// watched failing: this NIC's lanes answer `unmapped` and keep their views (and keep
    /// copying through them). Never on outside tests and `stress revoke --inject keep-views`.
    pub fn inject_keep_views(&self, on: bool) {
        if on {
            tracing::warn!(nic = %self.shared.name, "fault injected: lanes keep their views past a zap");
        }
        self.shared.keep_views.store(on, Ordering::SeqCst);
    }

    /// Whether it offers and uses the shared-memory path.
    pub fn shm(&self) -> bool {
        self.shared.shm.load(Ordering::Relaxed)
    }
}

impl Drop for TcpNic {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for a in [&self.shared.acceptor, &self.shared.shm_acceptor] {
            if let Some(t) = lock(a).take() {
                let _ = t.join();
            }
        }
    }
}

/// A random word (keys' high bits, so a restarted NIC does not hand out the keys it had).
fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        tracing::warn!("no random bytes for the TCP NIC's keys: starting from 0");
    }
    u32::from_le_bytes(b)
}

/// Random bytes for tokens and nonces. `None` when the system has none to give: then no
/// connection is made (a guessable token would be no token).
pub(crate) fn random<const N: usize>() -> Option<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).ok().map(|()| b)
}

impl DeviceBackend for TcpNic {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.shared.name.clone(),
            kind: BackendKind::Tcp,
            description: format!("software RC NIC over TCP at {}", self.addr()),
            port: 1,
            port_state: if self.shared.alive() {
                "ACTIVE".into()
            } else {
                "DOWN".into()
            },
            gid: self.shared.gid,
            lid: 0,
            max_mr_size: u64::MAX,
            page_size_cap: 1 << 12,
            max_qp_wr: crate::qp::SOFT_MAX_QP_WR,
            max_sge: crate::wr::MAX_SGE as u32,
            dmabuf_mr: DmaBufMr::Unsupported {
                why: "the TCP backend registers this process's memory by address".into(),
            },
        }
    }

    fn accepts(&self) -> Vec<Accept> {
        vec![Accept::new(SpaceKind::ProcessVa, Access::READ_WRITE)]
    }

    fn alloc_pd(&self) -> Result<Arc<dyn PdBackend>> {
        Ok(Arc::new(TcpPd {
            nic: self.shared.clone(),
            pdn: self.shared.next_pd.fetch_add(1, Ordering::Relaxed),
        }))
    }

    fn create_cq(&self, depth: u32) -> Result<Arc<dyn CqBackend>> {
        SoftCq::create(depth)
    }

    fn poll_async_event(&self) -> Option<AsyncEvent> {
        self.shared.events.pop()
    }

    /// A zap of a region shared with a peer on this host waits for that peer (up to
    /// [`UNMAP_WAIT`]): the quiesce layer makes it from its worker thread.
    fn calls_block(&self) -> bool {
        true
    }
}

/// Enter `v` under `key`, forgetting dropped entries now and then (amortised: when the map
/// doubles).
fn insert_pruned<T>(map: &mut HashMap<u32, Weak<T>>, key: u32, v: &Arc<T>) {
    if map.len().is_power_of_two() {
        map.retain(|_, w| w.strong_count() > 0);
    }
    map.insert(key, Arc::downgrade(v));
}

#[derive(Debug)]
struct TcpPd {
    nic: Arc<NicShared>,
    pdn: u32,
}

impl PdBackend for TcpPd {
    fn reg_mr(&self, req: &MrRequest<'_>) -> Result<Arc<dyn MrBackend>> {
        let key = self.nic.next_key.fetch_add(1, Ordering::Relaxed);
        let mr = Arc::new(TcpMr::new(key, self.pdn, req.list, req.iova, req.access)?);
        insert_pruned(&mut write(&self.nic.mrs), key, &mr);
        Ok(mr)
    }

    fn create_qp(
        &self,
        send_cq: &Arc<dyn CqBackend>,
        recv_cq: &Arc<dyn CqBackend>,
        caps: QpCaps,
    ) -> Result<Arc<dyn QpBackend>> {
        let qpn = self.nic.next_qpn.fetch_add(1, Ordering::Relaxed) & 0xff_ffff;
        let qp = TcpQp::new(
            self.nic.clone(),
            self.pdn,
            qpn,
            crate::soft_cq::as_soft(send_cq, "send_cq")?,
            crate::soft_cq::as_soft(recv_cq, "recv_cq")?,
            caps,
        )?;
        insert_pruned(&mut write(&self.nic.qps), qpn, &qp);
        Ok(Arc::new(qp))
    }
}
