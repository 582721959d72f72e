//! GPU → NIC → NIC → GPU on the simulated testbed, through the application library: the path
//! each GPU/NIC pair takes, the transfer itself, and a GPU free (a revoke) in the middle of it.
//! `dmaplane demo` runs it; `dmaplane bench p2p` times it.
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

use crate::{Agent, Error as AgentError, Memory, NicPath, Side, Status, Testbed};
use dmaplane_core::Route;
use dmaplane_core::cpu::Placement;
use dmaplane_core::fabric::Verdict;
use dmaplane_core::topology::builtin;
use serde::Serialize;

/// Why a flow could not run, or ran but failed a check.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// The library refused or failed a step.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// A check of the flow failed (bytes, counts, the free), said in words.
    #[error("{0}")]
    Flow(String),
}

/// `std::result::Result` with [`FlowError`].
pub type Result<T> = std::result::Result<T, FlowError>;

fn fail<T>(what: impl Into<String>) -> Result<T> {
    Err(FlowError::Flow(what.into()))
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
    /// The GPU whose memory is sent.
    pub src_gpu: String,
    /// The NIC that sends it.
    pub src_nic: String,
    /// The NIC that receives it.
    pub dst_nic: String,
    /// The GPU whose memory receives it.
    pub dst_gpu: String,
}

impl Flow {
    /// A flow from `src_gpu` through `src_nic` and `dst_nic` into `dst_gpu`.
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

/// How one side of a flow reaches the GPU's memory.
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
    /// The GPU.
    pub gpu: String,
    /// The NIC.
    pub nic: String,
    /// The PCIe route between them.
    pub route: Route,
    /// Direct or staged.
    pub path: PathKind,
    /// The negotiated registration (direct) or the refusal (staged).
    pub why: String,
    /// The host buffer of a staged side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staging: Option<String>,
}

/// How a flow runs.
#[derive(Debug, Clone)]
pub struct FlowOptions {
    /// Bytes the flow moves.
    pub size: u64,
    /// Bytes per RDMA WRITE (the agents' chunk).
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
    /// From the free's start to its ack.
    pub latency_us: u64,
    /// Importers the free revoked (and that acknowledged).
    pub importers_quiesced: usize,
    /// The typed error the transfer ended with.
    pub transfer_error: String,
    /// What a WRITE to the freed registration got.
    pub post_after_free: String,
    /// Requests of the transfer sent again into the new allocation.
    pub resent: u64,
}

/// What one flow did, and what the checks found.
#[derive(Debug, Clone, Serialize)]
pub struct FlowReport {
    /// The flow.
    pub flow: Flow,
    /// The sending side's path.
    pub src: SidePath,
    /// The receiving side's path.
    pub dst: SidePath,
    /// Bytes moved.
    pub size: u64,
    /// Bytes per WRITE.
    pub chunk: u64,
    /// Copies each byte costs on this path: the NIC's, plus one per staged side.
    pub copies: u32,
    /// The sender's requests: posted, completed (each exactly once), completed with an error
    /// (flushed by the free's quiesce).
    pub posted: u64,
    /// See `posted`.
    pub completed: u64,
    /// See `posted`.
    pub flushed: u64,
    /// Requests posted that never completed: must be 0.
    pub lost: u64,
    /// What the fabric's oracle saw during this flow: DMA after a fence or an ack, or stopped
    /// by the backstop. Must be 0.
    pub post_ack_accesses: u64,
    /// Bytes read back and found as sent.
    pub bytes_verified: u64,
    /// How long the transfer took.
    pub seconds: f64,
    /// `size` / `seconds`.
    pub bytes_per_sec: f64,
    /// The free under traffic, when one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free: Option<FreeReport>,
}

impl FlowReport {
    /// Nothing lost, nothing after a fence or an ack, every byte verified.
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
fn peer_desc(peer: &crate::Peer, region: u32, len: u64) -> Result<crate::RemoteDesc> {
    let due = Instant::now() + Duration::from_secs(5);
    loop {
        match peer.desc(region, 0, len) {
            Ok(d) => return Ok(d),
            Err(e @ AgentError::Revoked { .. }) => return Err(e.into()),
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
    let send = |id: u32| -> Result<crate::Transfer> {
        let remote = peer_desc(&peer, id, o.size)?;
        Ok(sender.write(
            &peer,
            &[ra.all()],
            &[remote],
            Some(crate::Notify::new("flow", b"flow".to_vec())),
        )?)
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
        let post_after_free = match peer
            .desc(rb.id(), 0, o.size)
            .and_then(|d| sender.write(&peer, &[ra.all()], &[d], None))
        {
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
            Some(n) if n.transfer == Some(t.id()) => break,
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
