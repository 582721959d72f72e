//! Registrations: a [`Region`] is a range of a [`Memory`] that the agent's NICs can reach, with
//! one memory region (MR) per NIC that serves it zero-copy and the path each NIC takes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use dmaplane_core::Route;
use dmaplane_gpu::DmaClient;
use dmaplane_rdma::{ImportOptions, Mr, MrAccess};

use crate::error::{Error, Result};
use crate::handle::{Handle, Registration, debug_entry, sealed};
use crate::limits::Reservation;
use crate::memory::{Backing, Memory, Tied};
use crate::nics::Nic;
use crate::nics::Nics;
use crate::platform::Platform;
use crate::publish::Publish;
use crate::stage::{Stage, StageHost, staging};

/// How one NIC reaches a region.
///
/// ```
/// use dmaplane::{Agent, NicPath, Testbed};
/// # fn main() -> dmaplane::Result<()> {
/// // nic0 and gpu2 sit on different sockets: no P2P route, so nic0 reaches gpu2's memory
/// // through a host buffer on gpu2's NUMA node.
/// let agent = Agent::builder("a").testbed(Testbed::builtin()?).nics(["nic0"]).build()?;
/// let mem = agent.alloc_gpu("kv", "gpu2", 1 << 20)?;
/// let region = agent.register(&mem)?;
/// match &region.paths()[0] {
///     NicPath::Staged { nic, through, why } => {
///         assert_eq!((nic.as_str(), through.as_str()), ("nic0", "mem1"));
///         assert!(why.contains("route"), "{why}");
///     }
///     other => panic!("{other:?}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "path")]
pub enum NicPath {
    /// Registered zero-copy: the NIC DMAs straight into the memory.
    Direct {
        /// The NIC's name.
        nic: String,
        /// The topology route from the memory to the NIC (`Local`, `BusAddr` or
        /// `ThruHostBridge`).
        route: String,
        /// How the registration was negotiated with the memory's exporter, as the RDMA
        /// layer summarises it (empty when it gives none).
        negotiation: String,
    },
    /// The NIC cannot reach the memory peer to peer: it registers a host staging buffer on the
    /// memory's NUMA node instead, and the GPU's copy engine moves the bytes between the two
    /// (one extra copy per byte, on each transfer that takes this path).
    Staged {
        /// The NIC's name.
        nic: String,
        /// The host-memory device the staging buffer lives on.
        through: String,
        /// Why the NIC refused the memory itself (the negotiation's refusal).
        why: String,
    },
    /// The NIC cannot reach the memory peer to peer (no P2P route); it does not serve it.
    Unreachable {
        /// The NIC's name.
        nic: String,
        /// Why no route exists.
        why: String,
    },
}

impl NicPath {
    /// The name of the NIC this path is about.
    pub fn nic(&self) -> &str {
        match self {
            NicPath::Direct { nic, .. }
            | NicPath::Staged { nic, .. }
            | NicPath::Unreachable { nic, .. } => nic,
        }
    }

    /// Whether the NIC reaches the memory through a staging buffer.
    pub fn is_staged(&self) -> bool {
        matches!(self, NicPath::Staged { .. })
    }
}

/// One registration: bytes `[base, base + len)` of a memory, on every NIC that reaches it.
pub struct MemoryEntry {
    pub(crate) id: u32,
    pub(crate) memory: Memory,
    pub(crate) base: u64,
    pub(crate) len: u64,
    /// The memory's export epoch when it was registered.
    pub(crate) epoch: u64,
    /// Per agent NIC (same order), the MR where the path is direct.
    pub(crate) mrs: Vec<Option<Mr>>,
    pub(crate) paths: Vec<NicPath>,
    /// The staging buffer of the NICs whose path is [`NicPath::Staged`] (dropped after their
    /// MRs).
    pub(crate) stage: Option<Arc<Stage>>,
    /// The file a published file region serves through this memory
    /// ([`crate::Agent::publish_file`]): peers' READs are staged from it, WRITEs landed in it.
    /// With the offset of the buffer's first byte within the file registration.
    pub(crate) file: Option<(Arc<crate::file::FileEntry>, u64)>,
    /// [`crate::Agent::deregister`] ran (its MRs are revoked for that reason, not a free).
    pub(crate) deregistered: std::sync::atomic::AtomicBool,
    /// Who it is published to, and how.
    pub(crate) publish: Publish,
    /// The staging buffer of each peer it was announced to, when it is staged, with the
    /// bytes it holds of the agent's budget for them.
    per_peer: Mutex<PeerStages>,
}

/// Whose staging buffer: a peer's name and its session (the nonce of the handshake it connected
/// with), so a buffer made for one connection is never handed to, or dropped under, another
/// of the same name.
pub(crate) type PeerKey<'a> = (&'a str, u64);

/// Each peer's staging buffer, by (name, session), with the bytes it holds of the budget.
type PeerStages = HashMap<(String, u64), (Arc<PeerStage>, Reservation)>;

/// A peer's own staging buffer of a staged registration.
pub(crate) enum PeerStage {
    /// GPU memory some NIC cannot reach: a host buffer the GPU's copy engine imports, and
    /// its MRs on the staged NICs (field order is drop order: the MRs before the buffer).
    Gpu {
        mrs: Vec<Option<Mr>>,
        stage: Arc<Stage>,
    },
    /// A published file region: a host buffer of its own, registered like the region's,
    /// that the file is read into and written from.
    File(Arc<MemoryEntry>),
}

/// What registering memory needs of the agent: its NICs, its platform, whether to stage even
/// where a NIC could reach the memory directly, and its name for messages.
pub(crate) struct RegisterCx<'a> {
    pub(crate) agent: &'a str,
    pub(crate) nics: &'a Nics,
    pub(crate) platform: &'a Platform,
    pub(crate) force_staging: bool,
}

impl MemoryEntry {
    /// Register `[base, base + len)` of `memory` on every NIC of the agent.
    pub(crate) fn register(
        cx: &RegisterCx<'_>,
        id: u32,
        memory: &Memory,
        base: u64,
        len: u64,
        publish: Publish,
    ) -> Result<MemoryEntry> {
        let mut mrs = Vec::with_capacity(cx.nics.len());
        let mut paths = Vec::with_capacity(cx.nics.len());
        let mut stage: Option<Arc<Stage>> = None;
        for nic in cx.nics {
            let (mr, path) = match register_on(cx, nic, memory, base, len, publish.access())? {
                Reach::Registered(mr, path) => (Some(mr), path),
                Reach::Unreachable(path) => (None, path),
                Reach::Refused(why) => {
                    let st = match &stage {
                        Some(st) => st.clone(),
                        None => stage
                            .insert(staging(cx.platform, memory, len, None)?)
                            .clone(),
                    };
                    let mr = import_stage(cx, nic, &st, publish.access())?;
                    let path = NicPath::Staged {
                        nic: nic.name().to_string(),
                        through: st.through.clone(),
                        why,
                    };
                    (Some(mr), path)
                }
            };
            mrs.push(mr);
            paths.push(path);
        }
        if let Some(st) = &stage {
            memory.tie(Arc::downgrade(st) as Weak<dyn Tied>);
        }
        if mrs.iter().all(Option::is_none) {
            let why: Vec<String> = paths
                .iter()
                .map(|p| match p {
                    NicPath::Unreachable { nic, why } => format!("{nic}: {why}"),
                    NicPath::Direct { nic, .. } | NicPath::Staged { nic, .. } => nic.clone(),
                })
                .collect();
            return Err(Error::invalid(
                format!("registration of {}", memory.name()),
                "memory",
                memory.location(),
                format!(
                    "no NIC of agent {} reaches it ({})",
                    cx.agent,
                    why.join("; ")
                ),
            ));
        }
        let epoch = memory.with_backing(|b| Ok(b.epoch()))?;
        Ok(MemoryEntry {
            id,
            memory: memory.clone(),
            base,
            len,
            epoch,
            mrs,
            paths,
            stage,
            file: None,
            deregistered: std::sync::atomic::AtomicBool::new(false),
            publish,
            per_peer: Mutex::new(HashMap::new()),
        })
    }

    /// Whether peers reach it through a staging buffer of their own: GPU memory some NIC
    /// stages, or a published file region.
    pub(crate) fn staged_for_peers(&self) -> bool {
        self.stage.is_some() || self.file.is_some()
    }

    /// `peer`'s own staging buffer, made by `make` on first use with the bytes it holds
    /// (`None` when peers reach the registration directly, or it was deregistered). Made
    /// outside the lock (it allocates and registers): a second one made meanwhile is dropped.
    pub(crate) fn peer_stage(
        &self,
        (peer, session): PeerKey<'_>,
        make: impl FnOnce() -> Result<(PeerStage, Reservation)>,
    ) -> Result<Option<Arc<PeerStage>>> {
        let gone = || self.deregistered.load(std::sync::atomic::Ordering::Acquire);
        if !self.staged_for_peers() || gone() {
            return Ok(None);
        }
        let key = (peer.to_string(), session);
        if let Some((ps, _)) = crate::sync::lock(&self.per_peer).get(&key) {
            return Ok(Some(ps.clone()));
        }
        let (ps, held) = make()?;
        let ps = Arc::new(ps);
        let mut per = crate::sync::lock(&self.per_peer);
        // A deregistration that ran meanwhile took the MRs it found: this one would never
        // be deregistered.
        if gone() {
            drop(per);
            return Ok(None);
        }
        if let Some((theirs, _)) = per.get(&key) {
            return Ok(Some(theirs.clone()));
        }
        per.insert(key, (ps.clone(), held));
        Ok(Some(ps))
    }

    /// A GPU staging buffer of `peer`'s own and its MRs on the staged NICs. Tied to the
    /// memory: freeing it revokes the buffer, so the NICs quiesce and the peer's leases on it
    /// are withdrawn.
    pub(crate) fn gpu_peer_stage(&self, cx: &RegisterCx<'_>, peer: &str) -> Result<PeerStage> {
        let stage = staging(cx.platform, &self.memory, self.len, Some(peer))?;
        let mut mrs = Vec::with_capacity(self.paths.len());
        for (nic, path) in cx.nics.iter().zip(&self.paths) {
            mrs.push(match path {
                NicPath::Staged { .. } => {
                    Some(import_stage(cx, nic, &stage, self.publish.access())?)
                }
                _ => None,
            });
        }
        self.memory.tie(Arc::downgrade(&stage) as Weak<dyn Tied>);
        Ok(PeerStage::Gpu { mrs, stage })
    }

    /// `peer`'s staging buffer, if it has one.
    pub(crate) fn existing_peer_stage(
        &self,
        (peer, session): PeerKey<'_>,
    ) -> Option<Arc<PeerStage>> {
        crate::sync::lock(&self.per_peer)
            .get(&(peer.to_string(), session))
            .map(|(ps, _)| ps.clone())
    }

    /// `peer` is gone: its staging buffer goes (its MRs first), outside the lock.
    pub(crate) fn drop_peer_stage(&self, (peer, session): PeerKey<'_>) {
        let gone = crate::sync::lock(&self.per_peer).remove(&(peer.to_string(), session));
        drop(gone);
    }

    /// Every peer's staging MRs, with the NIC index each is on (for a deregistration, after
    /// the flag is set: no more are made).
    pub(crate) fn peer_mrs(&self) -> Vec<(usize, Mr)> {
        crate::sync::lock(&self.per_peer)
            .values()
            .flat_map(|(ps, _)| {
                ps.mrs()
                    .iter()
                    .enumerate()
                    .filter_map(|(i, m)| m.clone().map(|m| (i, m)))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The MR a peer reaches through NIC `nic`: on a staged path, or for a published file,
    /// its own staging buffer's (`None` without one: the registration's own buffer is the
    /// owner's alone); else the registration's.
    pub(crate) fn mr_for<'a>(&'a self, nic: usize, ps: Option<&'a PeerStage>) -> Option<&'a Mr> {
        let staged =
            self.file.is_some() || matches!(self.paths.get(nic), Some(NicPath::Staged { .. }));
        if staged {
            ps.and_then(|ps| ps.mrs().get(nic)?.as_ref())
        } else {
            self.mrs.get(nic)?.as_ref()
        }
    }

    /// Why it cannot be used: deregistered, or its memory revoked or freed.
    pub(crate) fn gone_why(&self) -> &'static str {
        if self.deregistered.load(std::sync::atomic::Ordering::Acquire) {
            "it was deregistered"
        } else {
            "its memory was revoked or freed"
        }
    }

    /// The epoch at which any of its MRs was revoked.
    pub(crate) fn revoked_at(&self) -> Option<u64> {
        self.mrs.iter().flatten().find_map(Mr::revoked_at)
    }

    /// Refused, typed, once it was revoked: the `what` (a transfer) that would use it has not
    /// started.
    pub(crate) fn check_usable(&self, what: &str) -> Result<()> {
        match self.revoked_at() {
            None => Ok(()),
            Some(epoch) => Err(Error::Revoked {
                side: crate::error::Side::Local,
                region: self.id,
                name: self.memory.name().to_string(),
                epoch,
                why: format!("{} before the {what} started", self.gone_why()),
            }),
        }
    }

    /// Copy `len` bytes at `off` between the memory and its staging buffer (`to_stage`: before
    /// a NIC sends them; else after a NIC landed them). A copy that meets a revoke is
    /// [`Error::Revoked`] naming this registration.
    pub(crate) fn stage_copy(&self, off: u64, len: u64, to_stage: bool) -> Result<()> {
        let Some(st) = &self.stage else {
            return Err(Error::setup(
                self.memory.name(),
                "a staged path without a staging buffer",
            ));
        };
        st.copy(&self.memory, self.base, off, len, to_stage)
            .map_err(|err| match self.revoked_at() {
                Some(epoch) => Error::Revoked {
                    side: crate::error::Side::Local,
                    region: self.id,
                    name: self.memory.name().to_string(),
                    epoch,
                    why: format!(
                        "the copy {} its staging buffer failed ({}): {err}",
                        if to_stage { "into" } else { "out of" },
                        self.gone_why()
                    ),
                },
                None => err,
            })
    }

    /// Copy between the memory and `peer`'s GPU staging buffer (`to_stage`: before the peer
    /// READs; else after it WROTE): the owner's side of a peer's stage or land.
    pub(crate) fn peer_stage_copy(
        &self,
        ps: &PeerStage,
        off: u64,
        len: u64,
        to_stage: bool,
    ) -> Result<()> {
        match ps {
            PeerStage::Gpu { stage, .. } => stage.copy(&self.memory, self.base, off, len, to_stage),
            PeerStage::File(_) => Err(Error::setup(
                self.memory.name(),
                "a file region's staging buffer is served by file I/O, not a copy",
            )),
        }
    }

    pub(crate) fn covers(&self, offset: u64, len: u64) -> bool {
        offset >= self.base && offset + len <= self.base + self.len
    }
}

impl PeerStage {
    /// The epoch at which any of its MRs was revoked (the memory's free revokes every peer's
    /// buffer, in no particular order with the registration's own).
    pub(crate) fn revoked_at(&self) -> Option<u64> {
        self.mrs().iter().flatten().find_map(Mr::revoked_at)
    }

    /// Its MRs, per agent NIC (same order).
    fn mrs(&self) -> &[Option<Mr>] {
        match self {
            PeerStage::Gpu { mrs, .. } => mrs,
            PeerStage::File(e) => &e.mrs,
        }
    }
}

/// An MR of `nic` on staging buffer `st`.
fn import_stage(cx: &RegisterCx<'_>, nic: &Nic, st: &Stage, access: MrAccess) -> Result<Mr> {
    // Fabric host memory by the NIC's bus address; this process's memory by its address.
    let id = match (&st.host, nic.id()) {
        (StageHost::Fabric(_), None) => {
            return Err(Error::setup(
                cx.agent,
                format!("{} is not on the fabric", nic.name()),
            ));
        }
        (_, id) => id,
    };
    let opts = ImportOptions {
        access,
        ..ImportOptions::default()
    };
    Ok(nic
        .pd()
        .import(&st.name, opts, None, |i, a| st.host.attach(i, id, a))?)
}

/// How one NIC takes a registration.
enum Reach {
    /// Zero-copy: its MR of the memory itself.
    Registered(Mr, NicPath),
    /// It refused the memory (the refusal): the path must be staged.
    Refused(String),
    /// It cannot serve it at all.
    Unreachable(NicPath),
}

fn register_on(
    cx: &RegisterCx<'_>,
    nic: &Nic,
    memory: &Memory,
    base: u64,
    len: u64,
    access: MrAccess,
) -> Result<Reach> {
    // On the testbed the topology says whether a P2P path exists; a real device's exporter
    // (the kernel's dma-buf) decides for itself.
    let route = match cx.platform.testbed() {
        Some(tb) => Some(
            tb.topology()
                .route_by_id(memory.location().device(), nic.name())
                .map_err(|e| Error::setup(cx.agent, e.to_string()))?,
        ),
        None => None,
    };
    let opts = ImportOptions {
        access,
        range: (base != 0 || len != memory.len()).then_some((base, len)),
        ..ImportOptions::default()
    };
    let on_fabric = || {
        nic.id()
            .ok_or_else(|| Error::setup(cx.agent, format!("{} is not on the fabric", nic.name())))
    };
    // GPU memory: negotiate first, without attaching; a refusal (no P2P route, or no offer
    // the NIC accepts) means staging, and says why.
    let refused = memory.with_backing(|b| {
        Ok(match b {
            // A software NIC (TCP) reaches only this process's memory: GPU memory is staged
            // unless it offers some.
            Backing::Gpu(g)
                if nic.id().is_none()
                    && nic.dev().backend().info().kind == dmaplane_rdma::BackendKind::Tcp =>
            {
                g.would_negotiate(
                    DmaClient::External,
                    nic.name(),
                    &nic.dev().backend().accepts(),
                )
                .err()
                .map(|e| e.to_string())
            }
            // A real device: the driver's dma-buf export and the kernel decide at import.
            Backing::Gpu(_) if nic.id().is_none() => None,
            Backing::Gpu(g) => g
                .would_negotiate(
                    DmaClient::Fabric(on_fabric()?),
                    nic.name(),
                    &nic.dev().backend().accepts(),
                )
                .err()
                .map(|e| e.to_string()),
            _ => None,
        })
    })?;
    let refused = match refused {
        None if cx.force_staging && matches!(memory.location(), crate::Location::Gpu(_)) => Some(
            format!("agent {} stages all GPU memory (force_staging)", cx.agent),
        ),
        other => other,
    };
    if let Some(why) = refused {
        return Ok(Reach::Refused(why));
    }
    if route == Some(Route::NotSupported) {
        return Ok(Reach::Unreachable(NicPath::Unreachable {
            nic: nic.name().to_string(),
            why: format!(
                "no P2P route between {} and {} (different host bridges)",
                memory.location().device(),
                nic.name()
            ),
        }));
    }
    let name = memory.name().to_string();
    let mr = memory.with_backing(|b| {
        Ok(match b {
            Backing::Host(h) => {
                let id = on_fabric()?;
                nic.pd()
                    .import(&name, opts, None, |i, a| h.attach(i, id, a))?
            }
            Backing::Gpu(g) => match nic.id() {
                Some(id) => nic.pd().import(&name, opts, None, |i, a| {
                    g.attach(i, DmaClient::Fabric(id), a)
                })?,
                // CUDA memory on a real NIC: its dma-buf (ibv_reg_dmabuf_mr) where the driver
                // exports one, else its device VAs (a peer-memory client); negotiated.
                None => nic.pd().import(&name, opts, g.dmabuf_fd(), |i, a| {
                    g.attach(i, DmaClient::External, a)
                })?,
            },
            #[cfg(feature = "verbs")]
            Backing::DmaBuf(m) => nic
                .pd()
                .import(&name, opts, Some(m.fd()), |i, a| m.attach(i, a))?,
            Backing::User(u) => nic.pd().import(&name, opts, None, |i, a| u.attach(i, a))?,
        })
    })?;
    let negotiation = mr.negotiation().unwrap_or_default();
    Ok(Reach::Registered(
        mr,
        NicPath::Direct {
            nic: nic.name().to_string(),
            route: route.map_or_else(
                || "external (the exporter decides)".into(),
                |r| format!("{r:?}"),
            ),
            negotiation,
        },
    ))
}

/// A registered range of a [`Memory`]: what descriptors name. Cheap to clone; the registration
/// stays in the agent's cache after the last handle goes (until its memory is freed), so
/// registering the same range again, or any range inside it, costs a lookup.
pub type Region = Handle<MemoryEntry>;

impl sealed::Sealed for MemoryEntry {}

impl std::fmt::Debug for MemoryEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_entry(self, f)
    }
}

impl Registration for MemoryEntry {
    const KIND: &'static str = "region";
    fn id(&self) -> u32 {
        self.id
    }
    fn subject(&self) -> String {
        self.memory.name().to_string()
    }
    fn base(&self) -> u64 {
        0
    }
}

impl Handle<MemoryEntry> {
    /// The memory it registers.
    pub fn memory(&self) -> &Memory {
        &self.entry.memory
    }

    /// Who it is published to, and how.
    pub fn publish(&self) -> &Publish {
        &self.entry.publish
    }

    /// How each NIC of the agent reaches it.
    pub fn paths(&self) -> &[NicPath] {
        &self.entry.paths
    }
}
