//! What an agent's parts share: its devices, registrations, peers, engine, inbox, events and
//! files. The [`crate::Agent`] façade and the agent's threads hold it; each part owns its state
//! behind a handle of its own.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use crate::cache::Cache;
use crate::config::Config;
use crate::desc::Desc;
use crate::drive::Pair;
use crate::error::{Error, Result};
use crate::event::{Event, Events, GoneWhy};
use crate::file::FileEntry;
use crate::limits::Refusal;
use crate::metadata::{Metadata, NicInfo, RegionInfo, RegionKey, VERSION};
use crate::nics::Nics;
use crate::notify::{Inbox, Notification};
use crate::peer::{PeerHost, PeerShared};
use crate::peers::Peers;
use crate::platform::Platform;
use crate::progress::ProgressEngine;
use crate::region::{MemoryEntry, PeerKey, PeerStage};
use crate::registry::Registry;
use crate::stage::{StageFailure, StageRange};

/// What the agent's threads share.
pub(crate) struct AgentInner {
    pub(crate) name: String,
    pub(crate) platform: Platform,
    pub(crate) nics: Arc<Nics>,
    pub(crate) cfg: Config,
    pub(crate) cache: Cache,
    /// Registrations by id.
    pub(crate) registry: Registry,
    /// Connected peers and the handshakes under way.
    pub(crate) peers: Peers,
    pub(crate) engine: Arc<ProgressEngine>,
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) events: Events,
    pub(crate) addr: SocketAddr,
    pub(crate) stop: AtomicBool,
    /// File registrations and the drive they go through.
    pub(crate) files: crate::files::Files,
    pub(crate) next_memory: AtomicU64,
    /// The staging buffers held for peers ([`crate::Limits::staging_bytes`]).
    pub(crate) staging: Arc<crate::limits::Budget>,
    /// The faults injected on purpose (none in production).
    pub(crate) injected: Injected,
    /// Itself, for the memory it allocates (whose owner it is) where only `&self` is at hand.
    pub(crate) me: Weak<AgentInner>,
}

/// The faults injected into an agent on purpose, for tests that must show their checks fail —
/// one value, so what an agent breaks is read in one place. None in production.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Injected {
    /// The NICs' and importers' fault ([`crate::AgentBuilder::inject`]).
    pub(crate) fault: Option<dmaplane_rdma::Fault>,
    /// Notifications sent when transfers are posted, not once their data moved
    /// ([`crate::AgentBuilder::inject_early_notify`]).
    pub(crate) early_notify: bool,
}

impl Injected {
    /// Whether a transfer's notification goes out when it is posted.
    pub(crate) fn notifies_early(&self) -> bool {
        self.early_notify
    }

    /// Whether its peers' gone notices are ignored: the `ack-then-write` holder keeps writing
    /// the registration it acked, as a NIC that breaks the protocol would, instead of being
    /// stopped politely by the owner's notice.
    pub(crate) fn ignores_gone(&self) -> bool {
        self.fault == Some(dmaplane_rdma::Fault::AckThenWrite)
    }
}

impl crate::memory::Owner for AgentInner {
    fn holders_cut_off(&self) -> u64 {
        self.nics.holders_cut_off()
    }
    fn forget(&self, id: u64) {
        for (e, epoch) in self.registry.bury_memory(id) {
            self.tell_gone(&e, epoch, GoneWhy::Freed);
        }
        self.cache.forget_memory(id);
    }
    fn event(&self, e: Event) {
        self.events.push(e);
    }
}

impl PeerHost for AgentInner {
    fn peer_lost(&self, peer: &str, why: String) {
        self.events.push(Event::PeerLost {
            peer: peer.to_string(),
            why,
        });
        self.engine.wake();
    }
    fn peer_region_gone(&self, e: Event) {
        self.events.push(e);
    }
    fn ignores_gone(&self) -> bool {
        self.injected.ignores_gone()
    }
    fn notified(&self, n: Notification) {
        let from = n.from.clone();
        // Counted before a reader can wake: what it took is in the count.
        if !self
            .inbox
            .push(n, || self.engine.count_notification_received())
        {
            self.peers.count_refusal(Refusal::Notifications);
            tracing::warn!(agent = %self.name, peer = %from, limit = self.cfg.limits.notifications, "notification refused: the peer has as many queued as limits.notifications allows");
        }
    }
    fn serve_peer_stage(
        &self,
        key: PeerKey<'_>,
        ranges: &[StageRange],
        land: bool,
    ) -> Option<StageFailure> {
        let peer = key.0;
        // Served inline by the peer's control reader: bounded in ranges and bytes.
        let limits = &self.cfg.limits;
        let bytes = ranges
            .iter()
            .fold(0u64, |sum, &(_, _, len)| sum.saturating_add(len));
        let over = if ranges.len() > limits.stage_ranges {
            Some((
                Refusal::StageRanges,
                format!(
                    "{} ranges in one request, more than limits.stage_ranges ({})",
                    ranges.len(),
                    limits.stage_ranges
                ),
            ))
        } else if bytes > limits.stage_bytes {
            Some((
                Refusal::StageBytes,
                format!(
                    "{bytes} bytes in one request, more than limits.stage_bytes ({})",
                    limits.stage_bytes
                ),
            ))
        } else {
            None
        };
        if let Some((kind, why)) = over {
            self.peers.count_refusal(kind);
            let region = ranges.first().map_or(0, |r| r.0);
            return Some(StageFailure {
                region,
                name: String::new(),
                epoch: None,
                why: format!("agent {} refused: {why}", self.name),
            });
        }
        // A peer stages or lands only what is published to it, and lands nothing in what is
        // published read-only.
        for &(region, _, _) in ranges {
            let Some(e) = self.entry(region) else {
                continue;
            };
            let why = if !e.publish.allows(peer) {
                "it is not published to this peer"
            } else if land && e.publish.is_read_only() {
                "it is published read-only"
            } else {
                continue;
            };
            self.peers.count_refusal(Refusal::Check);
            return Some(StageFailure {
                region,
                name: e.memory.name().to_string(),
                epoch: None,
                why: format!("agent {} refused: {why}", self.name),
            });
        }
        self.serve_stage(key, ranges, land)
    }
    fn staged(&self, transfer: u64, failure: Option<StageFailure>, peer: &Arc<PeerShared>) {
        self.engine.staged(transfer, failure, peer);
    }
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
    fn retire(&self, peer: &Arc<PeerShared>) {
        self.peers.remove(peer);
        // Its staging buffers go with it (those of this connection only: a peer of its name
        // that connected again has its own).
        for e in self.registry.live() {
            e.drop_peer_stage((&peer.name, peer.session));
        }
    }
    fn count_refusal(&self, why: Refusal) {
        self.peers.count_refusal(why);
    }
}

impl AgentInner {
    /// Tell every peer that was told of registration `e` that it is gone (revoked at `epoch`):
    /// they forget it, refuse descriptors of it and raise [`Event::PeerRegionGone`].
    pub(crate) fn tell_gone(&self, e: &MemoryEntry, epoch: u64, why: GoneWhy) {
        for p in self
            .peers
            .list()
            .iter()
            .filter(|p| e.publish.allows(&p.name))
        {
            self.tell_gone_to(p, e.id, epoch, why);
        }
    }

    /// Tell `peer` that registration `region` is gone.
    pub(crate) fn tell_gone_to(&self, peer: &PeerShared, region: u32, epoch: u64, why: GoneWhy) {
        if let Err(err) = peer.send(crate::wire::Wire::Gone { region, epoch, why }) {
            tracing::debug!(agent = %self.name, peer = %peer.name, region, error = %err, "not told the registration is gone");
        }
    }

    /// Where this agent's memory comes from.
    pub(crate) fn allocator(&self) -> crate::alloc::Allocator<'_> {
        crate::alloc::Allocator {
            agent: &self.name,
            platform: &self.platform,
            nics: &self.nics,
            next: &self.next_memory,
            owner: self.me.clone() as Weak<dyn crate::memory::Owner>,
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
            me.check_usable("file transfer")?;
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
    /// or out of it, from or into `peer`'s own staging buffers.
    pub(crate) fn serve_stage(
        &self,
        key: PeerKey<'_>,
        ranges: &[StageRange],
        land: bool,
    ) -> Option<StageFailure> {
        let peer = key.0;
        for &(region, off, len) in ranges {
            let fail = |name: &str, epoch: Option<u64>, why: String| StageFailure {
                region,
                name: name.to_string(),
                epoch,
                why,
            };
            let Some(e) = self.entry(region) else {
                // Freed under the peer's transfer: typed as the revoke it was.
                if let Some(epoch) = self.registry.buried(region) {
                    return Some(fail("", Some(epoch), "its memory was freed".to_string()));
                }
                return Some(fail(
                    "",
                    None,
                    format!(
                        "agent {} has no registration {region} (deregistered or freed)",
                        self.name
                    ),
                ));
            };
            let name = e.memory.name();
            if let Some(epoch) = e.revoked_at() {
                return Some(fail(name, Some(epoch), e.gone_why().to_string()));
            }
            if let Some((file, at)) = &e.file {
                // Through the asking peer's own buffer.
                let own = match e.existing_peer_stage(key).as_deref() {
                    Some(PeerStage::File(own)) => own.clone(),
                    _ => {
                        return Some(fail(
                            name,
                            None,
                            format!(
                                "it holds no staging buffer for {peer} (never announced to it)"
                            ),
                        ));
                    }
                };
                if let Err(err) = self.serve_file(&own, (file, *at), (off, len), land) {
                    let epoch = e.revoked_at().or_else(|| own.revoked_at());
                    return Some(fail(name, epoch, format!("file I/O: {err}")));
                }
                continue;
            }
            if e.stage.is_none() {
                return Some(fail(
                    name,
                    None,
                    "it is not staged: no NIC of this agent stages it".into(),
                ));
            }
            let Some(ps) = e.existing_peer_stage(key) else {
                return Some(fail(
                    name,
                    None,
                    format!("it holds no staging buffer for {peer} (never announced to it)"),
                ));
            };
            if off.checked_add(len).is_none_or(|end| end > e.len) || len == 0 {
                return Some(fail(
                    name,
                    None,
                    format!("range [{off:#x}, +{len:#x}) outside its {} bytes", e.len),
                ));
            }
            // The free revokes the peer's buffer and the registration's own in no particular
            // order: either one revoked is a revoke.
            if let Some(epoch) = ps.revoked_at() {
                return Some(fail(name, Some(epoch), e.gone_why().to_string()));
            }
            if let Err(err) = e.peer_stage_copy(&ps, off, len, !land) {
                // A free takes the memory before it revokes its staging buffers: a copy can
                // meet the memory gone before any MR's revoke is recorded. The free named its
                // epoch first; that is the revoke, typed.
                let epoch = e
                    .revoked_at()
                    .or_else(|| ps.revoked_at())
                    .or_else(|| e.memory.freed_at());
                return Some(fail(name, epoch, format!("the copy engine failed: {err}")));
            }
        }
        None
    }

    /// Lease holders this agent's NICs cut off so far (they never acknowledged a revoke).
    pub(crate) fn holders_cut_off(&self) -> u64 {
        self.nics.holders_cut_off()
    }

    pub(crate) fn entry(&self, id: u32) -> Option<Arc<MemoryEntry>> {
        self.registry.get(id)
    }

    /// This agent's NICs as its metadata describes them.
    pub(crate) fn nic_infos(&self) -> Vec<NicInfo> {
        self.nics
            .iter()
            .map(|n| NicInfo {
                name: n.name().to_string(),
                gid: n.dev().gid(),
                numa: n.numa(),
                mtu: n.mtu().bytes(),
            })
            .collect()
    }

    /// This agent's metadata: every live registration.
    pub(crate) fn metadata(&self) -> Metadata {
        self.metadata_for(None)
    }

    /// This agent's metadata as `peer` (name, session) may see it: the registrations
    /// published to it, with its own staging keys (`None`: published to every peer, no
    /// staged key).
    pub(crate) fn metadata_for(&self, peer: Option<PeerKey<'_>>) -> Metadata {
        let entries: Vec<Arc<MemoryEntry>> = self
            .registry
            .live()
            .into_iter()
            .filter(|e| match peer {
                Some((p, _)) => e.publish.allows(p),
                None => e.publish.is_open(),
            })
            .collect();
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
            nics: self.nic_infos(),
            regions: entries
                .iter()
                .map(|e| {
                    // A peer's view carries its own staging keys (made now if need be).
                    let ps = peer.and_then(|p| {
                        self.peer_stage(e, p).unwrap_or_else(|err| {
                            tracing::warn!(agent = %self.name, peer = %p.0, region = e.id, error = %err, "no staging buffer for the peer");
                            None
                        })
                    });
                    self.region_info(e, ps.as_deref())
                })
                .collect(),
        }
    }

    /// How `e` is described to a peer: its keys on every NIC that serves it — on a staged
    /// path, the keys of the peer's own staging buffer `ps` (none without one: the
    /// registration's own staging buffer is not for peers).
    pub(crate) fn region_info(&self, e: &MemoryEntry, ps: Option<&PeerStage>) -> RegionInfo {
        RegionInfo {
            id: e.id,
            name: e.memory.name().to_string(),
            len: e.len,
            location: e.memory.location().clone(),
            file: e.file.as_ref().map(|(f, _)| f.path.display().to_string()),
            epoch: e.epoch,
            keys: self
                .nics
                .iter()
                .zip(&e.paths)
                .enumerate()
                .filter_map(|(i, (nic, path))| {
                    e.mr_for(i, ps).map(|mr| RegionKey {
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
