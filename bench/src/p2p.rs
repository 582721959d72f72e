//! `dmaplane bench p2p`: the library's GPU → NIC → NIC → GPU flows ([`dmaplane::flow`]) timed
//! per route, against memcpy measured in the same run.

use std::time::{Duration, Instant};

use dmaplane::flow::{FlowOptions, FlowReport, PathKind, Result, run_flow, testbed, testbed_flows};
use dmaplane_core::Route;
use dmaplane_core::cpu::Placement;
use serde::Serialize;

pub use dmaplane::flow::FlowError as P2pError;

fn fail<T>(what: impl Into<String>) -> Result<T> {
    Err(P2pError::Flow(what.into()))
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
                dmaplane_core::cpu::pin_thread(cpus, "memcpy reference");
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
    dmaplane_core::cpu::pin_host_thread(placement.as_ref());
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
        placement: dmaplane_core::cpu::placement_note(placement.as_ref()),
        rows,
    })
}
