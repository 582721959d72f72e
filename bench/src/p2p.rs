//! GPU → NIC → NIC → GPU on the simulated testbed, through the application library: the path
//! each GPU/NIC pair takes, the transfer itself, and a GPU free (a revoke) in the middle of it.
//! Shared by `dmaplane demo`, `dmaplane bench p2p` and the tests.
//!
//! Each flow is two [`Agent`]s on one [`Testbed`], a sender on the source NIC and a receiver on
//! the destination NIC. Each side of a flow is either **direct** — the NIC registers the GPU's
//! memory through BAR1, zero-copy — or **staged** through a host buffer on the GPU's NUMA node
//! and the GPU's copy engine. The agent decides which by negotiating with the allocation
//! ([`NicPath`]); a staged side carries the refusal that made it so. What this module adds is
//! measurement: the fabric's oracle before and after, the agents' request counts, every byte
//! read back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmaplane::{Agent, Desc, Error as AgentError, Memory, NicPath, Side, Status, Testbed};
use dmaplane_core::Route;
use dmaplane_core::cpu::Placement;
use dmaplane_core::fabric::Verdict;
use dmaplane_core::topology::builtin;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("{0}")]
    Flow(String),
}

pub type Result<T> = std::result::Result<T, P2pError>;

fn fail<T>(what: impl Into<String>) -> Result<T> {
    Err(P2pError::Flow(what.into()))
}

/// The built-in testbed, its NIC engines on `placement`'s engine CPUs (if any).
pub fn testbed(placement: Option<&Placement>) -> Result<Arc<Testbed>> {
    let engines = placement.map_or(&[][..], |p| &p.engines[..]);
    Ok(Testbed::with_engine_cpus(builtin::testbed(), engines)?)
}

/// One transfer: device memory of `src_gpu`, sent by `src_nic`, received by `dst_nic` into
/// device memory of `dst_gpu`.
#[derive(Debug, Clone, Serialize)]
pub struct Flow {
    pub src_gpu: String,
    pub src_nic: String,
    pub dst_nic: String,
    pub dst_gpu: String,
}

impl Flow {
    pub fn new(src_gpu: &str, src_nic: &str, dst_nic: &str, dst_gpu: &str) -> Flow {
        Flow {
            src_gpu: src_gpu.into(),
            src_nic: src_nic.into(),
            dst_nic: dst_nic.into(),
            dst_gpu: dst_gpu.into(),
        }
    }
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} -> {} => {} -> {}",
            self.src_gpu, self.src_nic, self.dst_nic, self.dst_gpu
        )
    }
}

/// One flow per route on the testbed, both ends on that route:
/// bus-addr (GPU and NIC below one switch), thru-host-bridge (root ports of an allow-listed
/// host bridge), not-supported (GPU and NIC on different sockets).
pub fn testbed_flows() -> Vec<(Route, Flow)> {
    vec![
        (Route::BusAddr, Flow::new("gpu0", "nic0", "nic1", "gpu2")),
        (
            Route::ThruHostBridge,
            Flow::new("gpu1", "nic0", "nic2", "gpu2"),
        ),
        (
            Route::NotSupported,
            Flow::new("gpu2", "nic0", "nic1", "gpu0"),
        ),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    /// The NIC registers the GPU's memory: zero-copy.
    Direct,
    /// Through a host buffer and the GPU's copy engine.
    Staged,
}

/// The path one GPU/NIC pair took, and why.
#[derive(Debug, Clone, Serialize)]
pub struct SidePath {
    pub gpu: String,
    pub nic: String,
    pub route: Route,
    pub path: PathKind,
    /// The negotiated registration (direct) or the refusal (staged).
    pub why: String,
    /// The host buffer of a staged side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staging: Option<String>,
}

#[derive(Debug, Clone)]
pub struct FlowOptions {
    pub size: u64,
    pub chunk: u64,
    /// Requests in flight at once on the sender's queue pair.
    pub depth: u32,
    /// Free the receiving GPU's memory after this many requests completed.
    pub free_after: Option<u64>,
    /// Stage both sides even where the route allows direct.
    pub force_staged: bool,
}

/// What the free in the middle of a flow did.
#[derive(Debug, Clone, Serialize)]
pub struct FreeReport {
    /// Requests of the transfer that had completed when the free began.
    pub after_completions: u64,
    /// Transfers it took for the free to meet one under way (1 unless the machine was busy).
    pub attempts: u32,
    /// The export epoch the free revoked.
    pub epoch_freed: u64,
    pub latency_us: u64,
    pub importers_quiesced: usize,
    /// The typed error the transfer ended with.
    pub transfer_error: String,
    /// What a WRITE to the freed registration got.
    pub post_after_free: String,
    /// Requests of the transfer sent again into the new allocation.
    pub resent: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlowReport {
    pub flow: Flow,
    pub src: SidePath,
    pub dst: SidePath,
    pub size: u64,
    pub chunk: u64,
    /// Copies each byte costs on this path: the NIC's, plus one per staged side.
    pub copies: u32,
    /// The sender's requests: posted, completed (each exactly once), completed with an error
    /// (flushed by the free's quiesce).
    pub posted: u64,
    pub completed: u64,
    pub flushed: u64,
    /// Requests posted that never completed: must be 0.
    pub lost: u64,
    /// What the fabric's oracle saw during this flow: DMA after a fence or an ack, or stopped
    /// by the backstop. Must be 0.
    pub post_ack_accesses: u64,
    pub bytes_verified: u64,
    pub seconds: f64,
    pub bytes_per_sec: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free: Option<FreeReport>,
}

impl FlowReport {
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.post_ack_accesses == 0 && self.bytes_verified == self.size
    }
}

/// The pattern byte at `off` (position-dependent, so a misplaced chunk shows).
pub fn pattern(off: u64, buf: &mut [u8]) {
    dmaplane_core::pattern::fill(PATTERN_SEED, off, buf);
}

/// The stream every flow's source holds ([`dmaplane_core::pattern`]).
const PATTERN_SEED: u64 = 0x5a;

const PIECE: u64 = 1 << 20;

fn fill(mem: &Memory) -> Result<()> {
    let mut buf = vec![0u8; PIECE as usize];
    let mut off = 0;
    while off < mem.len() {
        let n = (mem.len() - off).min(PIECE) as usize;
        pattern(off, &mut buf[..n]);
        mem.write(off, &buf[..n])?;
        off += n as u64;
    }
    Ok(())
}

/// Bytes of `mem` equal to the pattern, from the start (stops at the first difference).
fn verify(mem: &Memory) -> Result<u64> {
    let (mut got, mut want) = (vec![0u8; PIECE as usize], vec![0u8; PIECE as usize]);
    let mut off = 0;
    while off < mem.len() {
        let n = (mem.len() - off).min(PIECE) as usize;
        pattern(off, &mut want[..n]);
        mem.read(off, &mut got[..n])?;
        if got[..n] != want[..n] {
            return Ok(off);
        }
        off += n as u64;
    }
    Ok(mem.len())
}

fn check_options(o: &FlowOptions) -> Result<()> {
    if o.chunk == 0 || o.size == 0 || !o.size.is_multiple_of(o.chunk) {
        return fail(format!(
            "size {} is not a whole number of {}-byte chunks",
            o.size, o.chunk
        ));
    }
    if o.depth == 0 {
        return fail("depth 0: at least one WRITE must be in flight");
    }
    if o.chunk > u64::from(u32::MAX) {
        return fail(format!("chunk {} is over 4 GiB", o.chunk));
    }
    Ok(())
}

/// The oracle's violations so far.
fn violations(v: &Verdict) -> u64 {
    v.dma_after_fence + v.dma_after_ack + v.blocked_by_backstop + v.reused_before_ack
}

/// How `region`'s memory reaches its agent's only NIC.
fn side_path(tb: &Testbed, gpu: &str, path: &NicPath) -> SidePath {
    let nic = path.nic().to_string();
    let route = tb
        .topology()
        .route_by_id(gpu, &nic)
        .unwrap_or(Route::NotSupported);
    let (kind, why, staging) = match path {
        NicPath::Direct { negotiation, .. } => (PathKind::Direct, negotiation.clone(), None),
        NicPath::Staged { through, why, .. } => {
            (PathKind::Staged, why.clone(), Some(through.clone()))
        }
        NicPath::Unreachable { why, .. } => (PathKind::Staged, why.clone(), None),
    };
    SidePath {
        gpu: gpu.into(),
        nic,
        route,
        path: kind,
        why,
        staging,
    }
}

/// The path `gpu`'s memory takes to `nic`, as an agent on that NIC registers it.
pub fn path(tb: &Arc<Testbed>, gpu: &str, nic: &str) -> Result<SidePath> {
    let a = Agent::builder(format!("path-{gpu}-{nic}"))
        .testbed(tb.clone())
        .nics([nic])
        .build()?;
    let probe = a.alloc_gpu("path-probe", gpu, 4096)?;
    let r = a.register(&probe)?;
    let p = side_path(tb, gpu, &r.paths()[0]);
    drop(r);
    probe.free(Duration::from_secs(1))?;
    Ok(p)
}

/// A registered memory's view on the peer, once the peer's announcement reached `sender`.
fn peer_desc(peer: &dmaplane::Peer, region: u32, len: u64) -> Result<Desc> {
    let due = Instant::now() + Duration::from_secs(5);
    loop {
        match peer.desc(region, 0, len) {
            Ok(d) => return Ok(d),
            Err(e) if Instant::now() > due => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

const WAIT: Duration = Duration::from_secs(60);
const FREE_ATTEMPTS: u32 = 20;

/// Run one flow: fill the source GPU's memory, WRITE it to the receiver's GPU memory (staging
/// where a side must), optionally free the receiving memory part-way and send everything again
/// into a new allocation, and verify every byte.
pub fn run_flow(tb: &Arc<Testbed>, flow: &Flow, o: &FlowOptions) -> Result<FlowReport> {
    check_options(o)?;
    let agent = |name: &str, nic: &str| {
        Agent::builder(name)
            .testbed(tb.clone())
            .nics([nic])
            .chunk(o.chunk)
            .depth(o.depth)
            .qps_per_path(1)
            .force_staging(o.force_staged)
            .build()
    };
    let sender = agent("sender", &flow.src_nic)?;
    let receiver = agent("receiver", &flow.dst_nic)?;
    let tag = format!("{}-{}", flow.src_gpu, flow.dst_gpu);
    let src = sender.alloc_gpu(&format!("{tag}-src"), &flow.src_gpu, o.size)?;
    let mut dst = receiver.alloc_gpu(&format!("{tag}-dst"), &flow.dst_gpu, o.size)?;
    fill(&src)?;
    let ra = sender.register(&src)?;
    let mut rb = receiver.register(&dst)?;
    let src_path = side_path(tb, &flow.src_gpu, &ra.paths()[0]);
    let dst_path = side_path(tb, &flow.dst_gpu, &rb.paths()[0]);
    let peer = sender.connect(&receiver.metadata_blob()?)?;
    let before = violations(&tb.fabric().oracle().verdict());

    // The whole source to the receiver's registration `id`, notified.
    let send = |id: u32| -> Result<dmaplane::Transfer> {
        let remote = peer_desc(&peer, id, o.size)?;
        Ok(sender.write(&peer, &[ra.all()], &[remote], Some(b"flow"))?)
    };
    let start = Instant::now();
    let mut t = send(rb.id())?;
    let mut free = None;
    if let Some(n) = o.free_after {
        // Free once `n` requests completed, while the rest are under way. On a busy machine
        // the whole transfer may finish before this thread looks again: then it runs again
        // (the same bytes into the same memory), a bounded number of times.
        let mut attempts = 1;
        let (done_then, report, transfer_error) = loop {
            while matches!(t.status(), Status::InProgress { done, .. } if done < n) {
                std::hint::spin_loop();
            }
            match t.status() {
                Status::InProgress { done, .. } => {
                    let report = dst.free(Duration::from_secs(1))?;
                    match t.wait(WAIT) {
                        Err(
                            e @ AgentError::Revoked {
                                side: Side::Remote, ..
                            },
                        ) => {
                            break (done, report, e.to_string());
                        }
                        Err(e) => {
                            return fail(format!(
                                "{flow}: after the free the transfer ended with {e}, not a remote revoke"
                            ));
                        }
                        // Its last requests completed before the revoke reached them: legal,
                        // and the oracle would have seen anything after the ack. New memory.
                        Ok(()) => {
                            dst = receiver.alloc_gpu(
                                &format!("{tag}-dst-{attempts}"),
                                &flow.dst_gpu,
                                o.size,
                            )?;
                            rb = receiver.register(&dst)?;
                        }
                    }
                }
                _ => t.wait(WAIT)?,
            }
            if attempts == FREE_ATTEMPTS {
                return fail(format!(
                    "{flow}: in {FREE_ATTEMPTS} attempts the transfer always ended before the free \
                     could meet it (raise the size or lower --free-after)"
                ));
            }
            attempts += 1;
            t = send(rb.id())?;
        };
        let post_after_free =
            match sender.write(&peer, &[ra.all()], &[Desc::new(rb.id(), 0, o.size)], None) {
                Err(e) => e.to_string(),
                Ok(t2) => match t2.wait(WAIT) {
                    Err(e) => e.to_string(),
                    Ok(()) => {
                        return fail(format!(
                            "{flow}: a WRITE to the freed registration completed"
                        ));
                    }
                },
            };
        // Everything again, into new memory.
        dst = receiver.alloc_gpu(&format!("{tag}-dst-realloc"), &flow.dst_gpu, o.size)?;
        rb = receiver.register(&dst)?;
        t = send(rb.id())?;
        free = Some(FreeReport {
            after_completions: done_then,
            attempts,
            epoch_freed: report.epoch,
            latency_us: report.elapsed_us,
            importers_quiesced: report.importers.len(),
            transfer_error,
            post_after_free,
            resent: t.requests() as u64,
        });
    }
    t.wait(WAIT)?;
    let seconds = start.elapsed().as_secs_f64();
    // The last transfer's notification (earlier attempts sent theirs too).
    let due = Instant::now() + Duration::from_secs(5);
    loop {
        let left = due.saturating_duration_since(Instant::now());
        match receiver.next_notification(left) {
            Some(n) if n.transfer == t.id() => break,
            Some(_) => {}
            None => {
                return fail(format!(
                    "{flow}: no notification of transfer {} reached the receiver",
                    t.id()
                ));
            }
        }
    }
    let bytes_verified = verify(&dst)?;
    let st = sender.stats();
    let after = violations(&tb.fabric().oracle().verdict());
    let copies = 1 + [&src_path, &dst_path]
        .iter()
        .filter(|p| p.path == PathKind::Staged)
        .count() as u32;
    Ok(FlowReport {
        flow: flow.clone(),
        src: src_path,
        dst: dst_path,
        size: o.size,
        chunk: o.chunk,
        copies,
        posted: st.requests_posted,
        completed: st.requests_completed,
        flushed: st.requests_failed,
        lost: st.requests_posted.saturating_sub(st.requests_completed),
        post_ack_accesses: after - before,
        bytes_verified,
        seconds,
        bytes_per_sec: if free.is_none() {
            o.size as f64 / seconds
        } else {
            0.0
        },
        free,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(free_after: Option<u64>, force_staged: bool) -> FlowOptions {
        FlowOptions {
            size: 4 << 20,
            chunk: 256 << 10,
            depth: 2,
            free_after,
            force_staged,
        }
    }

    #[test]
    fn every_route_moves_every_byte_on_the_path_it_must() -> Result<()> {
        let tb = testbed(None)?;
        for (route, flow) in testbed_flows() {
            let r = run_flow(&tb, &flow, &opts(None, false))?;
            assert!(r.is_clean(), "{r:?}");
            assert_eq!(r.src.route, route);
            let want = if route == Route::NotSupported {
                PathKind::Staged
            } else {
                PathKind::Direct
            };
            assert_eq!((r.src.path, r.dst.path), (want, want), "{r:?}");
            if want == PathKind::Staged {
                assert!(r.src.why.contains("route"), "{}", r.src.why);
                assert!(r.src.staging.is_some());
            }
        }
        Ok(())
    }

    #[test]
    fn a_free_under_traffic_loses_nothing_and_nothing_lands_after_it() -> Result<()> {
        let tb = testbed(None)?;
        for (_, flow) in testbed_flows() {
            let r = run_flow(&tb, &flow, &opts(Some(4), false))?;
            assert!(r.is_clean(), "{r:?}");
            let f = r.free.as_ref().expect("the free happened");
            assert!(f.importers_quiesced >= 1, "{f:?}");
            assert!(f.transfer_error.contains("revoked"), "{}", f.transfer_error);
            assert_eq!(r.posted, r.completed);
        }
        let v = tb.fabric().oracle().verdict();
        assert!(v.is_clean() && v.acks >= 3, "{v}");
        Ok(())
    }

    #[test]
    fn staging_can_be_forced_on_a_direct_route() -> Result<()> {
        let tb = testbed(None)?;
        let (_, flow) = &testbed_flows()[0];
        let r = run_flow(&tb, flow, &opts(None, true))?;
        assert!(r.is_clean(), "{r:?}");
        assert_eq!(r.copies, 3);
        Ok(())
    }
}

/// One row of `dmaplane bench p2p`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub route: Route,
    pub path: String,
    pub flow: String,
    /// Copies each byte costs (the NIC's, plus one per staged side).
    pub copies: u32,
    pub gib_s: f64,
    /// Bandwidth / memcpy bandwidth of the same run.
    pub of_memcpy: f64,
    /// Bandwidth / (memcpy bandwidth / copies): 1.0 means the path costs exactly its copies.
    pub of_copies: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub size: u64,
    pub chunk: u64,
    /// The reference: `size` bytes memcpy'd in `chunk` pieces between fresh allocations of the
    /// flow's GPUs, the source just written, on the NIC engines' CPUs — the state a flow's
    /// buffers are in and the copies its NIC makes. Best of the run.
    pub memcpy_gib_s: f64,
    /// memcpy repeated over the same two host buffers for 50 ms (cache-hot for sizes the
    /// last-level cache holds). Shown for context, not the reference: a flow moves each byte once.
    pub memcpy_hot_gib_s: f64,
    /// Where the NIC engines and the host thread ran.
    pub placement: String,
    pub rows: Vec<BenchRow>,
}

const GIB: f64 = (1u64 << 30) as f64;

/// The memcpy a flow is measured against: `size` bytes between fresh private buffers, touched
/// once as the simulated GPU touches its allocations, with a plain memcpy (the fabric's own
/// copies are byte-wise atomic: this is what they cost against), copied in `chunk` pieces as the
/// NIC moves them (one memcpy of 64 MiB would stream with
/// non-temporal stores a 4 MiB WRITE never gets), on the NIC engines' CPUs. Bytes per second.
fn memcpy_once(placement: Option<&Placement>, size: u64, chunk: u64) -> Result<f64> {
    let n = usize::try_from(size).map_err(|_| P2pError::Flow(format!("size {size} too large")))?;
    // Fresh private memory, as a flow gets fresh GPU memory: a plain memcpy, not the fabric's
    // (byte-wise atomic) copy — the reference is what the machine can do.
    // Touched once, as the simulated GPU faults its allocations in at allocation time.
    let mut sw = vec![0x5au8; n];
    let mut dw = vec![0xa5u8; n];
    for (i, b) in sw.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31);
    }
    let piece = usize::try_from(chunk).unwrap_or(n).max(1);
    // On the CPUs the simulated NICs copy on: the flow's copy reads bytes the host thread just
    // wrote from another core's cache, and so must the reference.
    let engines = placement.map(|p| p.engines.clone());
    let secs = std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(cpus) = &engines {
                crate::world::pin_thread(cpus, "memcpy reference");
            }
            let t = Instant::now();
            let mut off = 0;
            while off < n {
                let k = piece.min(n - off);
                dw[off..off + k].copy_from_slice(&sw[off..off + k]);
                off += k;
            }
            std::hint::black_box(&dw);
            t.elapsed().as_secs_f64()
        })
        .join()
    })
    .map_err(|_| P2pError::Flow("the memcpy reference thread panicked".into()))?;
    Ok(size as f64 / secs.max(1e-9))
}

/// Simulated GPU→NIC→NIC→GPU throughput for each route, direct and staged, against memcpy of
/// the same transfer size measured in the same run. Each figure is the best of `reps` runs.
pub fn bench(
    size: u64,
    chunk: u64,
    reps: u32,
    placement: Option<Placement>,
) -> Result<BenchReport> {
    // In a thread of its own, so pinning it to the host CPUs does not outlive the run.
    std::thread::scope(|s| {
        s.spawn(|| bench_pinned(size, chunk, reps, placement))
            .join()
            .unwrap_or_else(|_| fail("the benchmark thread panicked"))
    })
}

fn bench_pinned(
    size: u64,
    chunk: u64,
    reps: u32,
    placement: Option<Placement>,
) -> Result<BenchReport> {
    let chunks = size / chunk.max(1);
    let depth = u32::try_from(chunks.clamp(1, 64)).unwrap_or(64);
    let tb = testbed(placement.as_ref())?;
    crate::world::pin_host_thread(placement.as_ref());
    let mut rows = Vec::new();
    let (mut memcpy, mut memcpy_hot): (f64, f64) = (0.0, 0.0);
    for (route, flow) in testbed_flows() {
        for staged in [false, true] {
            if staged && route == Route::NotSupported {
                continue; // the direct run of this route is already staged
            }
            let o = FlowOptions {
                size,
                chunk,
                depth,
                free_after: None,
                force_staged: staged,
            };
            let mut best: Option<FlowReport> = None;
            for _ in 0..reps.max(1) {
                // Both references measured between the runs, so they see the same machine state.
                memcpy = memcpy.max(memcpy_once(placement.as_ref(), size, chunk)?);
                let (ps, mut pd) = crate::rdma::private_pair(size);
                memcpy_hot = memcpy_hot.max(crate::rdma::memcpy_bw(
                    &ps,
                    &mut pd,
                    size,
                    Duration::from_millis(50),
                ));
                let r = run_flow(&tb, &flow, &o)?;
                if !r.is_clean() {
                    return fail(format!(
                        "{flow}: the benchmark transfer did not verify: {r:?}"
                    ));
                }
                if best
                    .as_ref()
                    .is_none_or(|b| r.bytes_per_sec > b.bytes_per_sec)
                {
                    best = Some(r);
                }
            }
            let Some(r) = best else { continue };
            let path = match (r.src.path, r.dst.path) {
                (PathKind::Direct, PathKind::Direct) => "direct".to_string(),
                _ if staged => "staged (forced)".to_string(),
                _ => "staged".to_string(),
            };
            rows.push(BenchRow {
                route,
                path,
                flow: flow.to_string(),
                copies: r.copies,
                gib_s: r.bytes_per_sec / GIB,
                of_memcpy: 0.0,
                of_copies: 0.0,
            });
        }
    }
    for r in &mut rows {
        r.of_memcpy = r.gib_s * GIB / memcpy;
        r.of_copies = r.of_memcpy * f64::from(r.copies);
    }
    Ok(BenchReport {
        size,
        chunk,
        memcpy_gib_s: memcpy / GIB,
        memcpy_hot_gib_s: memcpy_hot / GIB,
        placement: crate::world::placement_note(placement.as_ref()),
        rows,
    })
}
