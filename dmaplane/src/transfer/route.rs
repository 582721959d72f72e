//! A transfer's start: its descriptors checked, each (local, remote) pair routed to the best
//! paths' queue pairs and split into requests (a [`Plan`], made once for a prepared transfer),
//! then handed to the engine (each post of the plan).

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use dmaplane_core::Route;
use dmaplane_rdma::RemoteMr;

use super::Transfer;
use super::state::{CHUNK_BITS, Chunk, Op, Status, TransferEnd, TransferState};
use crate::desc::{Desc, RemoteDesc};
use crate::error::{Error, Result};
use crate::inner::AgentInner;
use crate::notify::Notify;
use crate::peer::{Lane, PeerShared};
use crate::region::MemoryEntry;
use crate::stage::StageRange;

/// How long a transfer waits for a lease its peer announced but whose grant is still on the
/// way.
const LEASE_WAIT: Duration = Duration::from_secs(5);

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
    remote: &[RemoteDesc],
    notify: Option<Notify>,
) -> Result<Transfer> {
    let plan = plan(s, peer, op, local, remote)?;
    submit(s, &plan, notify)
}

/// A batch checked, routed and split into requests: what each post of it hands the engine.
pub(crate) struct Plan {
    op: Op,
    pub(crate) peer: Arc<PeerShared>,
    chunks: Vec<Chunk>,
    lanes: Vec<Arc<Lane>>,
    leases: Vec<Arc<RemoteMr>>,
    entries: Vec<Arc<MemoryEntry>>,
    /// Local staged ranges a WRITE copies into their staging buffers before its requests.
    stage_out: Vec<(u16, u64, u64)>,
    stage_in: Vec<(u16, u64, u64)>,
    remote_stage: Vec<StageRange>,
    /// The peer's registrations it names.
    remote_regions: Vec<u32>,
    bytes: u64,
}

impl Plan {
    /// Requests each post makes.
    pub(crate) fn requests(&self) -> usize {
        self.chunks.len()
    }

    /// Bytes each post moves.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Hand a plan to the engine as a new transfer: refused, typed, when its peer was lost or
/// memory on either side is gone since it was made.
pub(crate) fn submit(s: &Arc<AgentInner>, plan: &Plan, notify: Option<Notify>) -> Result<Transfer> {
    let peer = &plan.peer;
    let what = || format!("transfer to {}", peer.name);
    if let Some(why) = peer.lost() {
        return Err(Error::PeerLost {
            peer: peer.name.clone(),
            why,
        });
    }
    if let Some(n) = &notify {
        n.check(what)?;
    }
    for e in &plan.entries {
        e.check_usable("transfer")?;
    }
    for &r in &plan.remote_regions {
        peer.region_or_gone(r, "transfer")?;
    }
    // A WRITE from staged memory: its bytes go to the staging buffer before any request.
    for &(ei, off, len) in &plan.stage_out {
        let e = &plan.entries[usize::from(ei)];
        e.stage_copy(off, len, true)?;
    }
    let total = plan.chunks.len() as u64;
    let id = s.engine.next_id();
    let mut notify = notify.map(Notify::into_parts);
    if s.injected.notifies_early()
        && let Some((tag, bytes)) = notify.take()
    {
        // The injected fault: before any of its data moved.
        peer.notify(Some(id), tag, bytes)?;
    }
    let state = Arc::new(TransferState {
        id,
        agent: s.name.clone(),
        done: std::sync::atomic::AtomicU64::new(0),
        op: plan.op,
        peer: peer.clone(),
        chunks: plan.chunks.clone(),
        lanes: plan.lanes.clone(),
        leases: plan.leases.clone(),
        entries: plan.entries.clone(),
        notify,
        stage_in: plan.stage_in.clone(),
        remote_stage: plan.remote_stage.clone(),
        bytes: plan.bytes,
        outcome: Mutex::new(TransferEnd {
            status: Status::InProgress { done: 0, total },
            waker: None,
            sleepers: 0,
        }),
        cv: Condvar::new(),
    });
    s.engine.submit(state.clone());
    Ok(Transfer {
        state,
        engine: Arc::downgrade(&s.engine),
    })
}

/// Check the batch, route each pair and split it into requests.
pub(crate) fn plan(
    s: &Arc<AgentInner>,
    peer: &Arc<PeerShared>,
    op: Op,
    local: &[Desc],
    remote: &[RemoteDesc],
) -> Result<Plan> {
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
    if let Some((i, r)) = remote.iter().enumerate().find(|(_, r)| r.peer != peer.tag) {
        let whose = if r.peer.name == peer.tag.name {
            format!("an earlier connection to {}", r.peer.name)
        } else {
            format!("peer {}", r.peer.name)
        };
        return Err(Error::invalid(
            what(),
            "remote desc",
            format!("pair {i}: region {} of {whose}", r.region),
            format!(
                "a descriptor of {whose}'s memory cannot be used in a transfer to peer {}: \
                 make it with {}'s Peer::desc",
                peer.name, peer.name
            ),
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
                    (peer, op),
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
    if total >= 1 << CHUNK_BITS {
        return Err(Error::invalid(
            what(),
            "descriptors",
            format!("{total} requests"),
            format!(
                "a transfer is split into at most {} requests: send it in parts, or raise the chunk size",
                (1u64 << CHUNK_BITS) - 1
            ),
        ));
    }
    crate::stage::merge(&mut remote_stage);
    let mut remote_regions: Vec<u32> = memo.iter().map(|m| m.key.1).collect();
    remote_regions.sort_unstable();
    remote_regions.dedup();
    Ok(Plan {
        op,
        peer: peer.clone(),
        chunks,
        lanes: t_lanes,
        leases: t_leases,
        entries,
        stage_out,
        stage_in,
        remote_stage,
        remote_regions,
        bytes,
    })
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
    (peer, op): (&PeerShared, Op),
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
    e.check_usable("transfer")?;
    if op == Op::Read && e.memory.is_read_only() {
        return Err(Error::invalid(
            what(),
            "local region",
            local,
            format!(
                "pair {i}: {} is read-only (lent so by its owner): a READ would write into \
                 it; READ into a writable buffer, or use it as a WRITE's source",
                e.memory.name()
            ),
        ));
    }
    let info = match peer.region_or_gone(remote, "transfer") {
        Ok(info) => info,
        Err(Error::Invalid(_)) => {
            return Err(Error::invalid(
                what(),
                "remote region",
                remote,
                format!("pair {i}: peer {} has no such registration", peer.name),
            ));
        }
        Err(e) => return Err(e),
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
