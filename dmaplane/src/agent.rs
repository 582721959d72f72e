//! The [`Agent`]: one per process (or per simulated host). It owns the devices, protection
//! domains, completion queues and queue pairs, registers memory, connects to peers and moves
//! data, with a progress thread that reaps completions, drives quiesce, leases and revokes,
//! and ends stalled transfers — the application never has to poll.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use dmaplane_rdma::oob::OobListener;

use crate::cache::{Cache, CacheStats};
use crate::desc::Desc;
use crate::drive::{FileTransfer, Pair};
use crate::error::{Error, Result, Side};
use crate::event::{Event, Events};
use crate::file::{FileEntry, FileRegion, FileSpec, StoragePath};
use crate::memory::Memory;
use crate::metadata::{Metadata, NicInfo, RegionInfo, RegionKey, VERSION};
use crate::nics::Nics;
use crate::notify::{Inbox, Notification};
use crate::peer::{self, Peer, PeerShared};
use crate::platform::{Backend, Platform};
use crate::progress::ProgressEngine;
use crate::region::{MemoryEntry, Region};
use crate::stage::{StageFailure, StageRange};
use crate::sync::lock;
use crate::testbed::Testbed;
use crate::transfer::{Op, Transfer};

/// Tunables, with the defaults [`AgentBuilder`] starts from.
#[derive(Debug, Clone)]
pub struct Config {
    /// Requests longer than this are split (and striped over queue pairs and NICs).
    pub chunk: u64,
    /// Queue pairs per (local NIC, peer NIC) pair.
    pub qps_per_path: usize,
    /// Send queue depth of each queue pair.
    pub depth: u32,
    /// A transfer that sees no completion for this long ends with [`Error::Stalled`].
    pub stall_timeout: Duration,
    /// How long connection setup steps wait for the peer.
    pub setup_timeout: Duration,
    /// Where the handshake listener binds (`host:port`; port 0 picks one).
    pub listen: String,
    /// The handshake address the metadata tells peers (`host:port`); `None`: the bound
    /// address, which must then be a specific one (not `0.0.0.0` or `::`).
    pub advertise: Option<String>,
    /// Stage GPU memory through host memory even where a NIC could reach it peer to peer
    /// (to measure what staging costs; off by default). File I/O bounces GPU memory through
    /// host memory then too.
    pub force_staging: bool,
    /// The testbed's NVMe drive file regions are read and written through (`None`: the
    /// topology's first).
    pub drive: Option<String>,
    /// The drive's bandwidth in bytes per second (`None`: the simulated drive's default,
    /// [`dmaplane_storage::sim::RATE`]; 0: as fast as the host copies).
    pub drive_rate: Option<u64>,
    /// Read and write files through this host's kernel (io_uring, `O_DIRECT`) instead of the
    /// testbed's simulated drive (always so on verbs).
    pub io_uring: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            chunk: 1 << 20,
            qps_per_path: 2,
            depth: 128,
            stall_timeout: Duration::from_secs(10),
            setup_timeout: Duration::from_secs(30),
            listen: "127.0.0.1:0".into(),
            advertise: None,
            force_staging: false,
            drive: None,
            drive_rate: None,
            io_uring: false,
        }
    }
}

/// Builds an [`Agent`]: `Agent::builder("name")...build()`.
#[derive(Debug, Clone)]
pub struct AgentBuilder {
    name: String,
    testbed: Option<Arc<Testbed>>,
    verbs: bool,
    nics: Option<Vec<String>>,
    cfg: Config,
    fault: Option<dmaplane_rdma::Fault>,
}

impl AgentBuilder {
    /// Run on this simulated testbed (default: the process's shared built-in one).
    pub fn testbed(mut self, t: Arc<Testbed>) -> Self {
        self.testbed = Some(t);
        self
    }

    /// Run on real RDMA devices through libibverbs (Soft-RoCE or a NIC) instead of the
    /// simulated testbed; host memory is then udmabuf memory, registered through dma-buf
    /// negotiation (the dma-buf MR where the provider has them, else the buffer's mapping).
    /// Needs feature `verbs`.
    #[cfg(feature = "verbs")]
    pub fn verbs(mut self) -> Self {
        self.verbs = true;
        self
    }

    /// Use these NICs (default: every NIC of the testbed no other agent uses; on verbs every
    /// RDMA device libibverbs lists).
    pub fn nics<S: AsRef<str>>(mut self, nics: impl IntoIterator<Item = S>) -> Self {
        self.nics = Some(nics.into_iter().map(|s| s.as_ref().to_string()).collect());
        self
    }

    /// Split requests into chunks of at most `bytes` bytes (default 1 MiB; 1 byte to
    /// 4 GiB - 1, checked by [`AgentBuilder::build`]).
    pub fn chunk(mut self, bytes: u64) -> Self {
        self.cfg.chunk = bytes;
        self
    }

    /// Connect `n` queue pairs per (local NIC, peer NIC) path (default 2; 1 to 64).
    pub fn qps_per_path(mut self, n: usize) -> Self {
        self.cfg.qps_per_path = n;
        self
    }

    /// Give each queue pair a send queue of `n` requests (default 128; 1 to 4096).
    pub fn depth(mut self, n: u32) -> Self {
        self.cfg.depth = n;
        self
    }

    /// End a transfer with [`Error::Stalled`] once it sees no completion for `t` (default
    /// 10 s; must be positive).
    pub fn stall_timeout(mut self, t: Duration) -> Self {
        self.cfg.stall_timeout = t;
        self
    }

    /// Let each connection setup step wait `t` for the peer (default 30 s).
    pub fn setup_timeout(mut self, t: Duration) -> Self {
        self.cfg.setup_timeout = t;
        self
    }

    /// Bind the handshake listener here (default `127.0.0.1:0`; another host's peers need an
    /// address they can reach, e.g. `0.0.0.0:7400` with [`AgentBuilder::advertise`]).
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.cfg.listen = addr.into();
        self
    }

    /// Tell peers this handshake address in the metadata (`10.0.0.5:7400`, or a host alone,
    /// which gets the bound port) instead of the bound one: needed when the listener binds a
    /// wildcard address.
    pub fn advertise(mut self, addr: impl Into<String>) -> Self {
        self.cfg.advertise = Some(addr.into());
        self
    }

    /// Break the protocol on purpose on every device of the agent (see
    /// [`dmaplane_rdma::Fault`]; [`Fault::EarlyFence`](dmaplane_rdma::Fault::EarlyFence) breaks
    /// the drive's importers too): for stress runs that must show their checks fail. Never in
    /// production.
    pub fn inject(mut self, fault: Option<dmaplane_rdma::Fault>) -> Self {
        self.fault = fault;
        self
    }

    /// Stage every GPU registration through host memory, even where a NIC reaches the GPU
    /// peer to peer ([`Config::force_staging`]).
    pub fn force_staging(mut self, on: bool) -> Self {
        self.cfg.force_staging = on;
        self
    }

    /// Read and write file regions through this NVMe drive of the testbed (default: its
    /// first).
    pub fn drive(mut self, name: impl Into<String>) -> Self {
        self.cfg.drive = Some(name.into());
        self
    }

    /// Let the simulated drive move at most `bytes_per_sec` (0: as fast as the host copies; by
    /// default a PCIe 4.0 x4 drive's [`dmaplane_storage::sim::RATE`]).
    pub fn drive_rate(mut self, bytes_per_sec: u64) -> Self {
        self.cfg.drive_rate = Some(bytes_per_sec);
        self
    }

    /// Read and write file regions through this host's kernel — one io_uring on the drive's
    /// thread, `O_DIRECT`, host memory registered as fixed buffers by its process address, GPU
    /// memory through a host bounce buffer and the copy engine — instead of the testbed's
    /// simulated drive. The verbs backend always does.
    pub fn io_uring(mut self, on: bool) -> Self {
        self.cfg.io_uring = on;
        self
    }

    /// Check the settings, claim the NICs, open a protection domain and a completion queue
    /// on each, bind the handshake listener and start the agent's threads.
    ///
    /// Fails with [`Error::Invalid`] for a name that is empty or longer than 255 bytes, a
    /// tunable out of range, or a NIC that the testbed lacks or another agent holds, and with
    /// [`Error::Setup`] when every NIC is taken. On failure the NICs claimed are released.
    pub fn build(self) -> Result<Agent> {
        let name = self.name;
        if name.is_empty() || name.len() > 255 {
            return Err(Error::invalid("agent", "name", &name, "1 to 255 bytes"));
        }
        let c = &self.cfg;
        if c.chunk == 0 || c.chunk > u64::from(u32::MAX) {
            return Err(Error::invalid(
                format!("agent {name}"),
                "chunk",
                c.chunk,
                "1 byte to 4 GiB - 1",
            ));
        }
        if c.qps_per_path == 0 || c.qps_per_path > 64 {
            return Err(Error::invalid(
                format!("agent {name}"),
                "qps_per_path",
                c.qps_per_path,
                "1 to 64",
            ));
        }
        if c.depth == 0 || c.depth > 4096 {
            return Err(Error::invalid(
                format!("agent {name}"),
                "depth",
                c.depth,
                "1 to 4096",
            ));
        }
        if c.stall_timeout.is_zero() {
            return Err(Error::invalid(
                format!("agent {name}"),
                "stall_timeout",
                "0",
                "must be positive",
            ));
        }
        let (backend, opened) = if self.verbs {
            (
                Backend::Verbs,
                crate::nics::open_verbs(&name, self.nics.as_deref())?,
            )
        } else {
            let testbed = match self.testbed {
                Some(t) => t,
                None => Testbed::shared()?,
            };
            let v = crate::nics::claim_sim(&testbed, &name, self.nics.as_deref())?;
            (Backend::Sim(testbed), v)
        };
        let claimed: Vec<String> = opened.iter().map(|o| o.name.clone()).collect();
        let release = |b: &Backend| {
            if let Backend::Sim(t) = b {
                t.release(&claimed);
            }
        };
        let built = (|| -> Result<Agent> {
            let nics = Nics::open(opened, self.fault)?;
            let listener = OobListener::bind(c.listen.as_str())?;
            let addr = listener.local_addr();
            if addr.ip().is_unspecified() && c.advertise.is_none() {
                return Err(Error::invalid(
                    format!("agent {name}"),
                    "listen",
                    addr,
                    "a wildcard address is no address a peer can dial: also set advertise \
                     (the host:port peers should connect to)",
                ));
            }
            let shared = Arc::new(AgentInner {
                name: name.clone(),
                platform: Platform::new(backend.clone(), self.fault),
                nics,
                cfg: self.cfg.clone(),
                cache: Cache::default(),
                entries: Mutex::new(HashMap::new()),
                peers: Mutex::new(Vec::new()),
                engine: ProgressEngine::default(),
                inbox: Inbox::new(),
                events: Events::new(&name),
                addr,
                stop: AtomicBool::new(false),
                next_region: AtomicU32::new(1),
                files: crate::files::Files::new(crate::drive::DriveOptions {
                    agent: name.clone(),
                    device: self.cfg.drive.clone(),
                    io_uring: self.cfg.io_uring,
                    rate: self.cfg.drive_rate,
                    chunk: self.cfg.chunk,
                    force_bounce: self.cfg.force_staging,
                }),
                next_memory: AtomicU64::new(1),
                pending_links: Mutex::new(HashMap::new()),
                handshakes: Mutex::new(HashMap::new()),
                in_handshake: std::sync::atomic::AtomicUsize::new(0),
            });
            let accept = peer::spawn_listener(&shared, listener)?;
            let progress = crate::progress::spawn(&shared)?;
            let threads = Arc::new(Threads {
                handles: Mutex::new(vec![accept, progress]),
                claimed: claimed.clone(),
                shared: Arc::downgrade(&shared),
            });
            Ok(Agent {
                _threads: threads,
                shared,
            })
        })();
        if built.is_err() {
            release(&backend);
        }
        built
    }
}

/// What the agent's threads share.
pub(crate) struct AgentInner {
    pub(crate) name: String,
    pub(crate) platform: Platform,
    pub(crate) nics: Nics,
    pub(crate) cfg: Config,
    pub(crate) cache: Cache,
    /// Registration id → entry (while any handle or the cache holds it).
    pub(crate) entries: Mutex<HashMap<u32, Weak<MemoryEntry>>>,
    pub(crate) peers: Mutex<Vec<Arc<PeerShared>>>,
    pub(crate) engine: ProgressEngine,
    pub(crate) inbox: Inbox,
    pub(crate) events: Events,
    pub(crate) addr: SocketAddr,
    pub(crate) stop: AtomicBool,
    pub(crate) next_region: AtomicU32,
    /// File registrations and the drive they go through.
    pub(crate) files: crate::files::Files,
    next_memory: AtomicU64,
    /// Lease-link connections that arrived for a handshake under way: (nonce, path) → conn.
    pub(crate) pending_links: Mutex<HashMap<(u64, usize), dmaplane_rdma::oob::Oob>>,
    /// Handshakes under way on the listening side: nonce → number of paths.
    pub(crate) handshakes: Mutex<HashMap<u64, usize>>,
    /// Connections being served by the listener (bounded).
    pub(crate) in_handshake: std::sync::atomic::AtomicUsize,
}

impl crate::memory::Owner for AgentInner {
    fn holders_cut_off(&self) -> u64 {
        self.nics.holders_cut_off()
    }
    fn forget(&self, id: u64) {
        self.cache.forget_memory(id);
    }
    fn event(&self, e: Event) {
        self.events.push(e);
    }
}

impl AgentInner {
    /// Where this agent's memory comes from.
    pub(crate) fn allocator(self: &Arc<Self>) -> crate::alloc::Allocator<'_> {
        crate::alloc::Allocator {
            agent: &self.name,
            platform: &self.platform,
            nics: &self.nics,
            next: &self.next_memory,
            owner: Arc::downgrade(self) as Weak<dyn crate::memory::Owner>,
        }
    }

    /// The owner's side of a peer's transfer on a published file region: read `len` bytes at
    /// `off` of the region from the file into its buffer (`land` false: before the peer's READ), or
    /// write them from the buffer to the file (`land`: after the peer's WRITE landed), and wait.
    pub(crate) fn serve_file(
        &self,
        region: &Arc<MemoryEntry>,
        (file, at): (&Arc<FileEntry>, u64),
        (off, len): (u64, u64),
        land: bool,
    ) -> Result<u64> {
        let op = if land { "write" } else { "read" };
        if land && !file.writable {
            return Err(Error::invalid(
                format!("peer's {op} of {}", file.path.display()),
                "file region",
                file.id,
                "published read-only: register it with FileSpec::writable",
            ));
        }
        // The peer chose these: checked before anything is computed from them.
        let published = region.len.min(file.len.saturating_sub(at));
        if len == 0 || off.checked_add(len).is_none_or(|end| end > published) {
            return Err(Error::invalid(
                format!("peer's {op} of {}", file.path.display()),
                "range",
                format!("[{off:#x}, +{len:#x})"),
                format!("outside the published {published} bytes (or empty)"),
            ));
        }
        if file.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::invalid(
                format!("peer's {op} of {}", file.path.display()),
                "file region",
                file.id,
                "it was deregistered",
            ));
        }
        let file_at = file.base + at + off;
        let mem_off = region.base + off;
        let drive = self.files.drive(&self.platform)?;
        file.check(op, file_at, len, mem_off, drive.is_kernel())?;
        let pair = Pair {
            file: file.clone(),
            at: file_at,
            region: region.clone(),
            mem_off,
            len,
        };
        drive
            .start(&self.platform, land, vec![pair])?
            .wait(self.cfg.stall_timeout)
    }

    /// Check `pairs` of (file desc, memory desc) for a transfer and resolve them.
    pub(crate) fn resolve_files(
        &self,
        write: bool,
        files: &[Desc],
        memory: &[Desc],
    ) -> Result<Vec<Pair>> {
        let op = if write { "write_file" } else { "read_file" };
        let what = || format!("{op} of agent {}", self.name);
        if files.len() != memory.len() || files.is_empty() {
            return Err(Error::invalid(
                what(),
                "descriptors",
                format!("{} file, {} memory", files.len(), memory.len()),
                "one memory descriptor per file descriptor, at least one",
            ));
        }
        let mut out = Vec::with_capacity(files.len());
        for (i, (f, m)) in files.iter().zip(memory).enumerate() {
            let Some(fe) = self.files.get(f.region) else {
                return Err(Error::invalid(
                    what(),
                    "file region",
                    f.region,
                    format!("pair {i}: no such file registration (deregistered?)"),
                ));
            };
            let Some(me) = self.entry(m.region) else {
                return Err(Error::invalid(
                    what(),
                    "memory region",
                    m.region,
                    format!("pair {i}: no such memory registration"),
                ));
            };
            if let Some(epoch) = me.revoked_at() {
                return Err(Error::Revoked {
                    side: Side::Local,
                    region: me.id,
                    name: me.memory.name().to_string(),
                    epoch,
                    why: format!("{} before the file transfer started", me.gone_why()),
                });
            }
            if f.len != m.len || f.len == 0 {
                return Err(Error::invalid(
                    what(),
                    "len",
                    format!("file {} / memory {}", f.len, m.len),
                    format!("pair {i}: both sides must be the same, positive length"),
                ));
            }
            if f.offset.checked_add(f.len).is_none_or(|e| e > fe.len) {
                return Err(Error::invalid(
                    what(),
                    "file desc",
                    format!("[{:#x}, +{:#x})", f.offset, f.len),
                    format!(
                        "pair {i}: outside file region {} of {} bytes",
                        fe.id, fe.len
                    ),
                ));
            }
            if m.offset.checked_add(m.len).is_none_or(|e| e > me.len) {
                return Err(Error::invalid(
                    what(),
                    "memory desc",
                    format!("[{:#x}, +{:#x})", m.offset, m.len),
                    format!(
                        "pair {i}: outside memory region {} of {} bytes",
                        me.id, me.len
                    ),
                ));
            }
            if write && !fe.writable {
                return Err(Error::invalid(
                    what(),
                    "file region",
                    format!("{} ({})", fe.id, fe.path.display()),
                    "registered read-only: register it with FileSpec::writable",
                ));
            }
            if fe.closed.load(std::sync::atomic::Ordering::Acquire) {
                return Err(Error::invalid(
                    what(),
                    "file region",
                    fe.id,
                    "it was deregistered",
                ));
            }
            let at = fe.base + f.offset;
            let mem_off = me.base + m.offset;
            fe.check(
                op,
                at,
                f.len,
                mem_off,
                self.files.drive(&self.platform)?.is_kernel(),
            )?;
            out.push(Pair {
                file: fe,
                at,
                region: me,
                mem_off,
                len: f.len,
            });
        }
        Ok(out)
    }

    /// What registering memory needs of this agent.
    pub(crate) fn register_cx(&self) -> crate::region::RegisterCx<'_> {
        crate::region::RegisterCx {
            agent: &self.name,
            nics: &self.nics,
            platform: &self.platform,
            force_staging: self.cfg.force_staging,
        }
    }

    /// The owner's side: copy `ranges` of its staged registrations into device memory (`land`)
    /// or out of it into their staging buffers.
    pub(crate) fn serve_stage(&self, ranges: &[StageRange], land: bool) -> Option<StageFailure> {
        let s = self;
        for &(region, off, len) in ranges {
            let fail = |name: &str, epoch: Option<u64>, why: String| StageFailure {
                region,
                name: name.to_string(),
                epoch,
                why,
            };
            let Some(e) = s.entry(region) else {
                return Some(fail(
                    "",
                    None,
                    format!(
                        "agent {} has no registration {region} (deregistered or freed)",
                        s.name
                    ),
                ));
            };
            let name = e.memory.name();
            if let Some(epoch) = e.revoked_at() {
                return Some(fail(name, Some(epoch), e.gone_why().to_string()));
            }
            if let Some((file, at)) = &e.file {
                if let Err(err) = s.serve_file(&e, (file, *at), (off, len), land) {
                    return Some(fail(name, e.revoked_at(), format!("file I/O: {err}")));
                }
                continue;
            }
            let Some(st) = &e.stage else {
                return Some(fail(
                    name,
                    None,
                    "it is not staged: no NIC of this agent stages it".into(),
                ));
            };
            if off.checked_add(len).is_none_or(|end| end > e.len) || len == 0 {
                return Some(fail(
                    name,
                    None,
                    format!("range [{off:#x}, +{len:#x}) outside its {} bytes", e.len),
                ));
            }
            if let Err(err) = st.copy(&e.memory, e.base, off, len, !land) {
                return Some(fail(
                    name,
                    e.revoked_at(),
                    format!("the copy engine failed: {err}"),
                ));
            }
        }
        None
    }

    /// Lease holders this agent's NICs cut off so far (they never acknowledged a revoke).
    pub(crate) fn holders_cut_off(&self) -> u64 {
        self.nics.holders_cut_off()
    }

    pub(crate) fn entry(&self, id: u32) -> Option<Arc<MemoryEntry>> {
        lock(&self.entries).get(&id).and_then(Weak::upgrade)
    }

    /// This agent's metadata: every live registration.
    pub(crate) fn metadata(&self) -> Metadata {
        let mut entries: Vec<Arc<MemoryEntry>> = lock(&self.entries)
            .values()
            .filter_map(Weak::upgrade)
            .filter(|e| e.revoked_at().is_none())
            .collect();
        entries.sort_by_key(|e| e.id);
        Metadata {
            version: VERSION,
            agent: self.name.clone(),
            handshake: match &self.cfg.advertise {
                // A host alone gets the bound port.
                Some(a) if a.parse::<SocketAddr>().is_err() => format!("{a}:{}", self.addr.port()),
                Some(a) => a.clone(),
                None => self.addr.to_string(),
            },
            backend: self.platform.kind().into(),
            nics: self
                .nics
                .iter()
                .map(|n| NicInfo {
                    name: n.name().to_string(),
                    gid: n.dev().gid(),
                    numa: n.numa(),
                    mtu: n.mtu().bytes(),
                })
                .collect(),
            regions: entries.iter().map(|e| self.region_info(e)).collect(),
        }
    }

    pub(crate) fn region_info(&self, e: &MemoryEntry) -> RegionInfo {
        RegionInfo {
            id: e.id,
            name: e.memory.name().to_string(),
            len: e.len,
            location: e.memory.location().clone(),
            file: e.file.as_ref().map(|(f, _)| f.path.display().to_string()),
            epoch: e.epoch,
            keys: e
                .mrs
                .iter()
                .zip(&self.nics)
                .zip(&e.paths)
                .filter_map(|((mr, nic), path)| {
                    mr.as_ref().map(|mr| RegionKey {
                        nic: nic.name().to_string(),
                        rkey: mr.rkey(),
                        addr: mr.iova(),
                        // A published file's bytes are staged from (and landed in) the file.
                        staged: path.is_staged() || e.file.is_some(),
                    })
                })
                .collect(),
        }
    }
}

/// The agent's threads and NIC claims: shut down exactly once, when the last [`Agent`] clone
/// lets go of them.
struct Threads {
    handles: Mutex<Vec<JoinHandle<()>>>,
    claimed: Vec<String>,
    shared: Weak<AgentInner>,
}

/// Counters of an agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AgentStats {
    /// The registration cache's counters.
    pub cache: CacheStats,
    /// Transfers handed to the progress engine (by [`Agent::write`] and [`Agent::read`]).
    pub transfers_started: u64,
    /// Transfers that ended done (every request completed, the notification if any sent).
    pub transfers_done: u64,
    /// Transfers that ended with an error (revoked, failed, stalled, peer lost).
    pub transfers_failed: u64,
    /// Requests (chunks) posted to queue pairs.
    pub requests_posted: u64,
    /// Completions reaped for them (successful or not): `requests_posted` once nothing is in
    /// flight — every posted request gets exactly one.
    pub requests_completed: u64,
    /// Of those, completions with an error (flushed by a revoke's quiesce, or failed).
    pub requests_failed: u64,
    /// Bytes of the transfers that ended done.
    pub bytes_moved: u64,
    /// Notifications queued to peers when their WRITE ended done.
    pub notifications_sent: u64,
    /// Notifications received from peers (oversized ones are dropped and not counted).
    pub notifications_received: u64,
    /// Peers' lease holders this agent's NICs cut off because they never acknowledged a
    /// revoke (see [`Event::LeaseCutOff`]).
    pub holders_cut_off: u64,
}

/// One agent. Cheap to clone (all clones are the same agent); dropping the last clone stops its
/// threads, closes its peers and releases its NICs.
#[derive(Clone)]
pub struct Agent {
    // Field order is drop order: the threads shut down while this clone still holds the state.
    _threads: Arc<Threads>,
    pub(crate) shared: Arc<AgentInner>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.shared.name)
            .field("nics", &self.nics())
            .field("handshake", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Start building an agent called `name` (how peers name it).
    ///
    /// Agents on one testbed share no NIC, so each names its own:
    ///
    /// ```
    /// use dmaplane::{Agent, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let testbed = Testbed::builtin()?;
    /// let a = Agent::builder("a").testbed(testbed.clone()).nics(["nic0"]).build()?;
    /// let b = Agent::builder("b")
    ///     .testbed(testbed)
    ///     .nics(["nic1"])
    ///     .chunk(256 << 10)
    ///     .qps_per_path(4)
    ///     .build()?;
    /// assert_eq!(a.name(), "a");
    /// assert_eq!(a.nics(), ["nic0"]);
    /// assert_eq!(b.nics(), ["nic1"]);
    /// # Ok(()) }
    /// ```
    pub fn builder(name: impl Into<String>) -> AgentBuilder {
        AgentBuilder {
            name: name.into(),
            testbed: None,
            verbs: false,
            nics: None,
            cfg: Config::default(),
            fault: None,
        }
    }

    /// The agent's name, as given to [`Agent::builder`] (what peers know it by).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The NICs this agent uses.
    pub fn nics(&self) -> Vec<String> {
        self.shared
            .nics
            .iter()
            .map(|n| n.name().to_string())
            .collect()
    }

    /// The simulated testbed the agent runs on (`None` on verbs).
    pub fn testbed(&self) -> Option<&Arc<Testbed>> {
        self.shared.platform.testbed()
    }

    /// Where the handshake listener accepts peers.
    pub fn listen_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `len` bytes of host memory on the NUMA node of the agent's first NIC (on verbs: a
    /// udmabuf).
    pub fn alloc_host(&self, name: &str, len: u64) -> Result<Memory> {
        self.shared.allocator().alloc_host(name, len)
    }

    /// A caller's buffer as memory the agent registers, zero-copy: NICs read and write its
    /// allocation in place. The agent holds the buffer from here on — no safe code can free,
    /// grow or move it while a NIC may reach it — and [`Memory::reclaim`] gives it back, after
    /// every NIC is revoked, with what DMA wrote into it. Dropping every handle without
    /// reclaiming frees it the same way (revoked first).
    ///
    /// On the testbed it is host memory on the NUMA node of the agent's first NIC; on verbs it
    /// is registered by its process VA (`ibv_reg_mr`). An empty buffer is refused.
    ///
    /// ```
    /// use dmaplane::{Agent, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let agent = Agent::builder("a").testbed(Testbed::builtin()?).nics(["nic0"]).build()?;
    /// let mem = agent.adopt("weights", vec![0u8; 4 << 20])?;
    /// assert_eq!(mem.len(), 4 << 20);
    /// let err = agent.adopt("empty", Vec::new()).unwrap_err();
    /// assert!(err.to_string().contains("`len` = 0"), "{err}");
    /// # Ok(()) }
    /// ```
    pub fn adopt(&self, name: &str, buf: Vec<u8>) -> Result<Memory> {
        self.shared.allocator().adopt(name, buf)
    }

    /// A dma-buf fd from elsewhere (another driver's export, a dma-heap or udmabuf buffer
    /// made by other code, one received over a socket) as memory the agent registers: its NICs
    /// take it as the dma-buf (`ibv_reg_dmabuf_mr`) where the provider has dma-buf MRs, else by
    /// its mapping's process VAs, which the kernel may refuse to pin (udmabuf and the system
    /// heap map `VM_PFNMAP`) — [`Region::paths`](crate::Region::paths) says which, and a
    /// registration no NIC takes says why. The agent owns the fd from here on; freeing the
    /// memory revokes every NIC first, then closes it (the exporter's pages stay while any
    /// other fd refers to them). Verbs only: the simulated testbed has no kernel dma-bufs.
    pub fn import_dmabuf(&self, name: &str, fd: std::os::fd::OwnedFd) -> Result<Memory> {
        self.shared.allocator().import_dmabuf(name, fd)
    }

    /// `len` bytes of host memory on the host-memory device `device` (e.g. `mem1`) of the
    /// simulated testbed.
    pub fn alloc_host_on(&self, name: &str, device: &str, len: u64) -> Result<Memory> {
        self.shared.allocator().alloc_host_on(name, device, len)
    }

    /// `len` bytes of device memory on `gpu` (e.g. `gpu0`) of the simulated testbed.
    pub fn alloc_gpu(&self, name: &str, gpu: &str, len: u64) -> Result<Memory> {
        self.shared.allocator().alloc_gpu(name, gpu, len)
    }

    /// `len` bytes of device memory on CUDA GPU `ordinal`, through the driver (libcuda). Its
    /// NICs register it as a dma-buf where the driver exports one and the NIC takes it
    /// (`ibv_reg_dmabuf_mr`), else by its device VAs through a peer-memory client
    /// (nvidia-peermem); [`Region::paths`](crate::Region::paths) says which. Fails with
    /// [`Error::Gpu`] when there is no driver or no such GPU.
    pub fn alloc_cuda(&self, name: &str, ordinal: u32, len: u64) -> Result<Memory> {
        self.shared.allocator().alloc_cuda(name, ordinal, len)
    }

    /// Register all of `memory` on every NIC of the agent that reaches it.
    pub fn register(&self, memory: &Memory) -> Result<Region> {
        self.register_range(memory, 0, memory.len())
    }

    /// Register `[offset, offset + len)` of `memory`. A range inside an earlier registration
    /// of the same memory costs a cache lookup, not a registration.
    ///
    /// A miss registers the range rounded out to whole pages, on every NIC of the agent that
    /// reaches the memory, and announces it to connected peers. Fails with [`Error::Invalid`]
    /// when the memory belongs to another agent, was freed, no NIC reaches it, or the range is
    /// empty or runs past its end.
    ///
    /// ```
    /// use dmaplane::{Agent, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let testbed = Testbed::builtin()?;
    /// let agent = Agent::builder("a").testbed(testbed).nics(["nic0"]).build()?;
    /// let mem = agent.alloc_host("buf", 1 << 20)?;
    /// let whole = agent.register(&mem)?;
    /// assert_eq!(agent.stats().cache.misses, 1);
    /// // A range inside the earlier registration is served by it.
    /// let part = agent.register_range(&mem, 4096, 8192)?;
    /// assert_eq!(agent.stats().cache.hits, 1);
    /// assert_eq!(agent.stats().cache.misses, 1);
    /// assert_eq!(part.id(), whole.id());
    /// assert_eq!(part.len(), 8192);
    /// # Ok(()) }
    /// ```
    pub fn register_range(&self, memory: &Memory, offset: u64, len: u64) -> Result<Region> {
        let s = &self.shared;
        if !memory.owned_by(s) {
            return Err(Error::invalid(
                format!("agent {}", s.name),
                "memory",
                memory.name(),
                "allocated by another agent",
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= memory.len() && len > 0 => {}
            _ => {
                return Err(Error::invalid(
                    format!("registration of {}", memory.name()),
                    "range",
                    format!("[{offset:#x}, +{len:#x})"),
                    format!("outside the memory's {} bytes (or empty)", memory.len()),
                ));
            }
        }
        if memory.is_freed() {
            return Err(Error::invalid(
                format!("registration of {}", memory.name()),
                "memory",
                memory.name(),
                "it was freed",
            ));
        }
        if let Some(e) = s.cache.lookup(memory.id(), offset, len) {
            let at = offset - e.base;
            return Ok(Region {
                entry: e,
                offset: at,
                len,
            });
        }
        // A miss registers the range rounded out to whole pages (what MRs take).
        let g = dmaplane_core::fabric::FABRIC_GRANULE;
        let base = offset / g * g;
        let end = (offset + len).div_ceil(g) * g;
        let end = end.min(memory.len().div_ceil(g) * g);
        let id = s.next_region.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(MemoryEntry::register(
            &s.register_cx(),
            id,
            memory,
            base,
            (end - base).min(memory.len() - base),
        )?);
        Ok(self.announce(entry, offset - base, len))
    }

    /// A new registration: into the cache, and peers connected already learn of it now.
    fn announce(&self, entry: Arc<MemoryEntry>, offset: u64, len: u64) -> Region {
        let s = &self.shared;
        let id = entry.id;
        let memory = &entry.memory;
        lock(&s.entries).insert(id, Arc::downgrade(&entry));
        s.cache.insert(
            memory.id(),
            entry.clone(),
            entry.mrs.iter().flatten().count(),
        );
        let info = s.region_info(&entry);
        let peers: Vec<Arc<PeerShared>> = lock(&s.peers).clone();
        for p in &peers {
            p.announce(&entry, &info);
        }
        Region { entry, offset, len }
    }

    /// Let peers reach a file region: a host buffer of its length near the agent's first NIC,
    /// registered on its NICs and listed in the metadata with the file's path
    /// ([`RegionInfo::file`](crate::RegionInfo::file)) and staged keys. Before a peer's READ
    /// of a range this agent reads that range from the file into the buffer (through its
    /// drive), after a peer's WRITE it writes the landed range to the file (the region must be
    /// writable), each answered on the control connection before the peer's transfer goes on
    /// or ends — so a peer reads a checkpoint shard from this agent's disk straight into its own
    /// GPU. Ranges are subject to the file's `O_DIRECT` alignment. Deregistering the returned
    /// region (or dropping it, the buffer going with it) withdraws it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dmaplane::{Agent, FileSpec, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// # let path = std::env::temp_dir().join(format!("dmaplane-doc-pub-{}", std::process::id()));
    /// # std::fs::write(&path, vec![5u8; 1 << 20]).unwrap();
    /// let tb = Testbed::builtin()?;
    /// let owner = Agent::builder("owner").testbed(tb.clone()).nics(["nic1"]).build()?;
    /// let me = Agent::builder("me").testbed(tb).nics(["nic0"]).build()?;
    /// let shard = owner.publish_file(&owner.register_file(&FileSpec::new(&path).buffered_fallback())?)?;
    /// let peer = me.connect(&owner.metadata_blob()?)?;
    /// # while peer.region(shard.id()).is_none() { std::thread::sleep(Duration::from_millis(1)); }
    /// let gpu = me.alloc_gpu("weights", "gpu0", 1 << 20)?;
    /// let g = me.register(&gpu)?;
    /// me.read(&peer, &[g.all()], &[peer.desc(shard.id(), 0, 1 << 20)?])?.wait(Duration::from_secs(10))?;
    /// let mut got = [0u8; 8];
    /// gpu.read(0, &mut got)?;
    /// assert_eq!(got, [5u8; 8]);
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(()) }
    /// ```
    pub fn publish_file(&self, file: &FileRegion) -> Result<Region> {
        let name = format!("file:{}", file.path().display());
        let mem = self.alloc_host(&name, file.len())?;
        let s = &self.shared;
        let id = s.next_region.fetch_add(1, Ordering::Relaxed);
        let mut entry = MemoryEntry::register(&s.register_cx(), id, &mem, 0, mem.len())?;
        entry.file = Some((file.entry.clone(), file.offset));
        Ok(self.announce(Arc::new(entry), 0, file.len()))
    }

    /// Deregister `region` (the whole registration it is a view of) while transfers may still
    /// use it: every NIC quiesces first — posts naming it are refused, queue pairs with
    /// requests on it are stopped, peers holding leases on it stop and acknowledge, the
    /// translation is zapped — so nothing touches it afterwards, and transfers that use it end
    /// with [`Error::Revoked`] ("it was deregistered"). The memory stays allocated and can be
    /// registered again. Fails with [`Error::Rdma`] naming the NIC whose quiesce missed
    /// `deadline`.
    pub fn deregister(&self, region: &Region, deadline: Duration) -> Result<()> {
        let e = &region.entry;
        if !e.memory.owned_by(&self.shared) {
            return Err(Error::invalid(
                format!("agent {}", self.shared.name),
                "region",
                e.id,
                "registered by another agent",
            ));
        }
        e.deregistered.store(true, Ordering::Release);
        self.shared.cache.remove(e.memory.id(), e);
        lock(&self.shared.entries).remove(&e.id);
        let mut first_err = None;
        for (mr, nic) in e.mrs.iter().zip(&self.shared.nics) {
            if let Some(mr) = mr
                && let Err(err) = mr.deregister(nic.pd(), deadline)
            {
                first_err.get_or_insert(err);
            }
        }
        match first_err {
            Some(err) => Err(err.into()),
            None => Ok(()),
        }
    }

    /// This agent's metadata (handshake address, NICs, live registrations).
    pub fn metadata(&self) -> Metadata {
        self.shared.metadata()
    }

    /// [`Agent::metadata`] as a blob for [`Agent::connect`].
    pub fn metadata_blob(&self) -> Result<Vec<u8>> {
        self.shared.metadata().to_blob()
    }

    /// Connect to the agent a metadata blob describes (its handshake listener).
    pub fn connect(&self, blob: &[u8]) -> Result<Peer> {
        let meta = Metadata::from_blob(blob)?;
        peer::connect(&self.shared, &meta.handshake)
    }

    /// Connect to the agent listening at `addr`.
    pub fn connect_to(&self, addr: &str) -> Result<Peer> {
        peer::connect(&self.shared, addr)
    }

    /// Peers connected to this agent (those it connected to and those that connected to it).
    pub fn peers(&self) -> Vec<Peer> {
        lock(&self.shared.peers)
            .iter()
            .map(|p| Peer { shared: p.clone() })
            .collect()
    }

    /// The connected peer called `name`.
    pub fn peer(&self, name: &str) -> Option<Peer> {
        lock(&self.shared.peers)
            .iter()
            .find(|p| p.name == name)
            .map(|p| Peer { shared: p.clone() })
    }

    /// WRITE `local` into the peer's `remote`, pairwise (equal lengths), in one batch. With a
    /// notification, the peer receives it after every byte has landed.
    pub fn write(
        &self,
        peer: &Peer,
        local: &[Desc],
        remote: &[Desc],
        notify: Option<&[u8]>,
    ) -> Result<Transfer> {
        crate::transfer::start(&self.shared, &peer.shared, Op::Write, local, remote, notify)
    }

    /// READ the peer's `remote` into `local`, pairwise, in one batch.
    pub fn read(&self, peer: &Peer, local: &[Desc], remote: &[Desc]) -> Result<Transfer> {
        crate::transfer::start(&self.shared, &peer.shared, Op::Read, local, remote, None)
    }

    /// Notifications received so far (and taken from the queue).
    pub fn notifications(&self) -> Vec<Notification> {
        let (v, dropped) = self.shared.inbox.drain();
        if dropped > 0 {
            self.shared.events.push(Event::Dropped {
                what: "notifications".into(),
                count: dropped,
            });
        }
        v
    }

    /// Wait up to `timeout` for the next notification.
    pub fn next_notification(&self, timeout: Duration) -> Option<Notification> {
        self.shared.inbox.next(timeout)
    }

    /// Events since the last call (frees, lost peers, drops).
    pub fn events(&self) -> Vec<Event> {
        self.shared.events.drain()
    }

    /// The agent's counters now: transfers, requests, bytes, notifications and the cache.
    pub fn stats(&self) -> AgentStats {
        let mut s = self.shared.engine.stats();
        s.cache = self.shared.cache.stats().merge(self.shared.files.stats());
        s.holders_cut_off = self.shared.holders_cut_off();
        s
    }

    /// Requests posted on each NIC so far, in the agent's NIC order: how transfers were
    /// striped over the rails.
    pub fn requests_by_nic(&self) -> Vec<(String, u64)> {
        self.shared
            .nics
            .iter()
            .map(|n| (n.name().to_string(), n.posted()))
            .collect()
    }

    /// Register a file region: `spec`'s range of a file, opened for direct I/O, on the agent's
    /// drive. A range inside an earlier registration of the same file is a cache hit.
    ///
    /// Fails with [`Error::Invalid`] naming the field for a path that does not exist (and is
    /// not to be created) or a range outside the file, and with [`Error::Storage`] for a file
    /// system without `O_DIRECT` (unless [`FileSpec::buffered_fallback`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use dmaplane::{Agent, FileSpec, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// # let path = std::env::temp_dir().join(format!("dmaplane-doc-file-{}", std::process::id()));
    /// # std::fs::write(&path, vec![9u8; 1 << 20]).unwrap();
    /// let agent = Agent::builder("a").testbed(Testbed::builtin()?).nics(["nic0"]).build()?;
    /// let shard = agent.register_file(&FileSpec::new(&path).buffered_fallback())?;
    /// let weights = agent.alloc_gpu("weights", "gpu0", 1 << 20)?;
    /// let w = agent.register(&weights)?;
    /// let t = agent.read_file(&[shard.all()], &[w.all()])?;
    /// assert_eq!(t.wait(Duration::from_secs(10))?, 1 << 20);
    /// assert!(!t.paths()[0].is_bounced()); // nvme0 reaches gpu0's BAR1 peer to peer
    /// let mut got = [0u8; 16];
    /// weights.read(0, &mut got)?;
    /// assert_eq!(got, [9u8; 16]);
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(()) }
    /// ```
    pub fn register_file(&self, spec: &FileSpec) -> Result<FileRegion> {
        self.shared
            .files
            .register(&self.shared.platform, &self.shared.next_region, spec)
    }

    /// Deregister a file region: new transfers naming it are refused; those under way finish.
    pub fn deregister_file(&self, region: &FileRegion) {
        self.shared.files.deregister(region);
    }

    /// Read file descriptors `files` into memory descriptors `into`, pairwise (equal
    /// lengths), through the agent's drive — straight into a GPU's memory where the drive
    /// reaches it peer to peer, else through a host bounce buffer
    /// ([`FileTransfer::paths`] says which). Misaligned `O_DIRECT` requests are refused
    /// before anything moves, naming the field and the alignment.
    pub fn read_file(&self, files: &[Desc], into: &[Desc]) -> Result<FileTransfer> {
        let pairs = self.shared.resolve_files(false, files, into)?;
        self.shared
            .files
            .drive(&self.shared.platform)?
            .start(&self.shared.platform, false, pairs)
    }

    /// Write memory descriptors `from` into file descriptors `files`, pairwise.
    pub fn write_file(&self, from: &[Desc], files: &[Desc]) -> Result<FileTransfer> {
        let pairs = self.shared.resolve_files(true, files, from)?;
        self.shared
            .files
            .drive(&self.shared.platform)?
            .start(&self.shared.platform, true, pairs)
    }

    /// How the agent's drive reaches `memory`: direct, or bounced through host memory and why.
    pub fn storage_path(&self, memory: &Memory) -> Result<StoragePath> {
        self.shared
            .files
            .drive(&self.shared.platform)?
            .reach(memory)
    }

    /// Registrations the cache holds for `memory` (0 once it is freed).
    pub fn cached_registrations(&self, memory: &Memory) -> usize {
        self.shared.cache.entries_of(memory.id())
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        // The accept thread holds the agent's state until it sees `stop`.
        let Some(s) = self.shared.upgrade() else {
            return;
        };
        s.stop.store(true, Ordering::Release);
        s.engine.wake();
        // Taken out first: a peer's reader retiring takes this lock too.
        let peers: Vec<Arc<PeerShared>> = lock(&s.peers).drain(..).collect();
        for p in peers {
            p.close("the agent was dropped");
        }
        for h in lock(&self.handles).drain(..) {
            if h.join().is_err() {
                tracing::error!(agent = %s.name, "an agent thread panicked");
            }
        }
        if let Some(t) = s.platform.testbed() {
            t.release(&self.claimed);
        }
    }
}
