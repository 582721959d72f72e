//! `dmaplane bench rdma`: the simulated RC NIC's data path, reported against this machine's
//! memcpy measured in the same run.
//!
//! - Bandwidth: RDMA WRITEs of one size from host A's memory into host B's, `depth` in flight on
//!   one queue pair, against `memcpy` of the same sizes between the same two buffers. The engine
//!   moves real bytes, so the ratio says how much the NIC model (keys, translation, fabric
//!   checks, completions) costs on top of the copy itself. The two are measured in alternating
//!   rounds and each side's best round is kept.
//! - Message rate: 64 B WRITEs on one queue pair, posted in chains with one signaled request per
//!   chain (what perftest's `--post_list`/`--cq_mod` do), counting completed requests.
//! - Revoke latency under load: a short revoke stress (see [`dmaplane::stress`]).

use std::time::{Duration, Instant};

use dmaplane_core::ImporterKind;
use dmaplane_core::cpu::Placement;
use dmaplane_core::fabric::WindowHandle;
use dmaplane_rdma::{
    Completion, ImportOptions, MrAccess, Qp, QpCaps, RdmaError, RemoteAddr, SendWr, WcStatus,
};
use serde::Serialize;

use dmaplane::RawPair;
use dmaplane::stress::{Latency, StressConfig, StressReport, run_sim};

/// One bandwidth point.
#[derive(Debug, Clone, Serialize)]
pub struct BwRow {
    pub size: u64,
    /// Work requests completed.
    pub writes: u64,
    pub rdma_gib_s: f64,
    /// Plain memcpy between two private buffers of the same working set (the reference).
    pub memcpy_gib_s: f64,
    /// RDMA bandwidth / memcpy bandwidth.
    pub ratio: f64,
    /// The fabric's own copy (byte-wise atomic, as every simulated DMA copies) of the same
    /// sizes between the two windows: what sound copies cost against memcpy.
    pub fabric_copy_gib_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MsgRate {
    pub size: u32,
    pub writes: u64,
    pub seconds: f64,
    pub writes_per_s: f64,
    /// Requests per posted chain; one in each chain is signaled.
    pub chain: usize,
    pub depth: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct RevokeUnderLoad {
    pub qps: usize,
    pub depth: usize,
    pub revokes: u64,
    pub revoke_latency_us: Latency,
    pub lost: u64,
    pub post_ack_accesses: u64,
    pub bytes_verified: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RdmaReport {
    /// Where the NIC engines and the measuring thread ran.
    pub placement: String,
    pub bandwidth: Vec<BwRow>,
    pub msg_rate: MsgRate,
    pub revoke: RevokeUnderLoad,
}

#[derive(Debug, Clone)]
pub struct RdmaBenchConfig {
    /// Message sizes for the bandwidth table.
    pub sizes: Vec<u64>,
    /// Time spent on each bandwidth point (and on each memcpy reference).
    pub per_point: Duration,
    /// Time spent on the message rate.
    pub rate_time: Duration,
    /// Revokes for the latency-under-load part (0 skips it).
    pub revokes: u64,
    /// NIC engines on cores of their own, the measuring thread on the rest (None: wherever the
    /// scheduler puts them).
    pub placement: Option<Placement>,
}

impl Default for RdmaBenchConfig {
    fn default() -> Self {
        RdmaBenchConfig {
            sizes: (6..=22).step_by(2).map(|s| 1u64 << s).collect(),
            per_point: Duration::from_millis(300),
            rate_time: Duration::from_secs(1),
            revokes: 200,
            placement: Placement::auto(),
        }
    }
}

/// Largest message size (the simulated NIC takes up to 4 GiB - 1 per request; the table stops
/// at 1 GiB so the working set stays bounded).
pub const MAX_SIZE: u64 = 1 << 30;
/// Working set of each side for the bandwidth points: large enough to leave the caches for big
/// messages, the same for memcpy and RDMA.
const WORKING_SET: u64 = 64 << 20;
const DEPTH: usize = 16;
/// Alternating rounds per bandwidth point (best of each side is reported).
const ROUNDS: u32 = 3;
const RATE_DEPTH: usize = 1024;
const RATE_CHAIN: usize = 64;

/// What the harness reports while it runs.
pub trait Progress: Sync {
    fn step(&self, what: &str);
}

impl<F: Fn(&str) + Sync> Progress for F {
    fn step(&self, what: &str) {
        self(what)
    }
}

pub fn run(cfg: &RdmaBenchConfig, progress: &dyn Progress) -> Result<RdmaReport, dmaplane::Error> {
    // In a thread of its own, so that pinning it leaves the caller's thread as it was.
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("bench-rdma".into())
            .spawn_scoped(s, || measure(cfg, progress))
            .map_err(|e| RdmaError::io("starting the benchmark thread", e))?
            .join()
            .unwrap_or_else(|_| {
                Err(dmaplane::Error::from(RdmaError::Connection {
                    what: "bench rdma".into(),
                    why: "the benchmark thread panicked".into(),
                }))
            })
    })
}

fn measure(cfg: &RdmaBenchConfig, progress: &dyn Progress) -> Result<RdmaReport, dmaplane::Error> {
    for &s in &cfg.sizes {
        if s == 0 || s > MAX_SIZE {
            return Err(dmaplane::Error::from(RdmaError::InvalidRegistration {
                field: "size",
                value: s.to_string(),
                why: format!("a message size must be 1 B to {MAX_SIZE} B"),
            }));
        }
    }
    let max = cfg.sizes.iter().copied().max().unwrap_or(64);
    let set = WORKING_SET.max(max * DEPTH as u64);
    let w = RawPair::sim(4096, cfg.placement.clone())?;
    w.pin_host_thread();
    let caps = QpCaps {
        max_send_wr: RATE_DEPTH as u32,
        max_recv_wr: 1,
        ..QpCaps::default()
    };
    let mut pairs = w.connect(1, caps)?;
    let (qp, _peer) = pairs.pop().ok_or_else(|| RdmaError::NoDevice {
        why: "no queue pair was created".into(),
    })?;
    let src_mem = w.a.memory("bench-src", set)?;
    let dst_mem = w.b.memory("bench-dst", set)?;
    let opts = ImportOptions {
        access: MrAccess::ALL,
        kind: ImporterKind::Pinned,
        ..ImportOptions::default()
    };
    let src = w.a.import(&src_mem, "bench-src", opts)?;
    let dst = w.b.import(&dst_mem, "bench-dst", opts)?;
    let remote = w.b.dev.lease(&dst, &w.a.dev);
    // Touch every page once so neither side pays first-touch faults inside the timing.
    let fill = vec![0x5au8; 1 << 20];
    for off in (0..set).step_by(fill.len()) {
        let n = (set - off).min(fill.len() as u64) as usize;
        w.testbed
            .fabric()
            .cpu_write(&src_mem.window(), off, &fill[..n]);
        w.testbed
            .fabric()
            .cpu_write(&dst_mem.window(), off, &fill[..n]);
    }
    let (src_win, dst_win) = (src_mem.window(), dst_mem.window());
    let target = |off: u64| RemoteAddr {
        addr: remote.addr() + off,
        rkey: remote.rkey(),
    };

    let mut bandwidth = Vec::new();
    for &size in &cfg.sizes {
        progress.step(&format!("bandwidth {size} B"));
        let slots = (set / size).max(1);
        // Alternate the two in short rounds and keep each one's best: on a shared machine the
        // background load drifts, and a single long run of each would compare different moments.
        let round = cfg.per_point / ROUNDS;
        let (mut writes, mut rdma, mut mem, mut fab) = (0u64, 0f64, 0f64, 0f64);
        let (psrc, mut pdst) = private_pair(set);
        for _ in 0..ROUNDS {
            let (n, secs) = pump(&w, &qp, DEPTH, 1, round, |i| {
                let off = (i % slots) * size;
                SendWr::write(i, src.sge(off, size as u32), target(off))
            })?;
            writes += n;
            rdma = rdma.max((n * size) as f64 / secs);
            mem = mem.max(memcpy_bw(&psrc, &mut pdst, size, round));
            fab = fab.max(fabric_copy_bw(&src_win, &dst_win, size, set, round));
        }
        bandwidth.push(BwRow {
            size,
            writes,
            rdma_gib_s: rdma / GIB,
            memcpy_gib_s: mem / GIB,
            ratio: rdma / mem,
            fabric_copy_gib_s: fab / GIB,
        });
    }

    progress.step("message rate 64 B");
    let slots = set / 64;
    let (writes, secs) = pump(&w, &qp, RATE_DEPTH, RATE_CHAIN, cfg.rate_time, |i| {
        let off = (i % slots) * 64;
        SendWr::write(i, src.sge(off, 64), target(off))
    })?;
    let msg_rate = MsgRate {
        size: 64,
        writes,
        seconds: secs,
        writes_per_s: writes as f64 / secs,
        chain: RATE_CHAIN,
        depth: RATE_DEPTH,
    };
    drop(pairs);

    progress.step("revoke latency under load");
    let stress = if cfg.revokes == 0 {
        None
    } else {
        Some(run_sim(
            &StressConfig {
                qps: 16,
                depth: 64,
                size: 4096,
                revokes: cfg.revokes,
                seconds: 0.0,
                seed: 7,
                policy: dmaplane_rdma::QuiescePolicy::DEFAULT,
                deadline: Duration::from_secs(1),
                placement: cfg.placement.clone(),
                exporter: dmaplane::stress::ExporterKind::Host,
                inject: None,
            },
            &|_| {},
        )?)
    };
    Ok(RdmaReport {
        placement: w.placement_note(),
        bandwidth,
        msg_rate,
        revoke: revoke_row(stress),
    })
}

fn revoke_row(r: Option<StressReport>) -> RevokeUnderLoad {
    match r {
        Some(r) => RevokeUnderLoad {
            qps: r.qps,
            depth: r.depth,
            revokes: r.revokes,
            revoke_latency_us: r.revoke_latency_us,
            lost: r.lost,
            post_ack_accesses: r.post_ack_accesses,
            bytes_verified: r.bytes_verified,
        },
        None => RevokeUnderLoad {
            qps: 0,
            depth: 0,
            revokes: 0,
            revoke_latency_us: Latency::default(),
            lost: 0,
            post_ack_accesses: 0,
            bytes_verified: 0,
        },
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// Keep `depth` requests in flight on `qp` for `dur`, posting chains of `chain` with the last
/// one signaled. Returns (requests completed, seconds). Any failed completion is an error: the
/// benchmark only counts clean transfers.
fn pump(
    w: &RawPair,
    qp: &Qp,
    depth: usize,
    chain: usize,
    dur: Duration,
    wr: impl Fn(u64) -> SendWr,
) -> Result<(u64, f64), RdmaError> {
    let cq = &w.a.cq;
    let mut wcs: Vec<Completion> = Vec::with_capacity(256);
    let mut batch: Vec<SendWr> = Vec::with_capacity(chain);
    let (mut next, mut done) = (0u64, 0u64);
    let start = Instant::now();
    let mut stop_posting = false;
    let mut spins = 0u32;
    loop {
        // The clock is read every few rounds: a spinning consumer should cost the engine nothing.
        spins = spins.wrapping_add(1);
        if !stop_posting && spins.is_multiple_of(64) && start.elapsed() >= dur {
            stop_posting = true;
        }
        while !stop_posting && (next - done) as usize + chain <= depth {
            batch.clear();
            for k in 0..chain as u64 {
                let mut r = wr(next + k);
                r.signaled = k + 1 == chain as u64;
                batch.push(r);
            }
            qp.post_send(&batch)?;
            next += chain as u64;
        }
        if done == next && stop_posting {
            break;
        }
        wcs.clear();
        if cq.poll(&mut wcs, 256)? == 0 {
            std::hint::spin_loop();
            continue;
        }
        for wc in &wcs {
            if wc.status != WcStatus::Success {
                return Err(RdmaError::BadWorkRequest {
                    qpn: wc.qp_num,
                    wr_id: wc.wr_id,
                    op: "RDMA WRITE",
                    what: format!(
                        "a successful completion in the benchmark (got {})",
                        wc.status
                    ),
                });
            }
            // The signaled request closes its chain: every request up to it is done.
            done = wc.wr_id + 1;
        }
    }
    Ok((next, start.elapsed().as_secs_f64()))
}

/// memcpy bandwidth for `size`-byte copies cycling over a `set`-byte working set, between the
/// very buffers the RDMA points use (same memory kind and pages, so the ratio isolates the NIC
/// model's cost from the memory's).
/// Two private buffers of `set` bytes, every page touched: the plain memcpy reference's.
pub fn private_pair(set: u64) -> (Vec<u8>, Vec<u8>) {
    let n = usize::try_from(set).unwrap_or(usize::MAX);
    (vec![0x5a; n], vec![0xa5; n])
}

/// Plain memcpy of `size`-byte messages through the working set `src` → `dst` for `dur`, the
/// messages laid out as the RDMA ones are. Bytes per second.
pub fn memcpy_bw(src: &[u8], dst: &mut [u8], size: u64, dur: Duration) -> f64 {
    let n_bytes = usize::try_from(size).unwrap_or(usize::MAX).min(src.len());
    let slots = (src.len() / n_bytes.max(1)).max(1);
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < dur {
        for _ in 0..64 {
            let off = (n % slots) * n_bytes;
            dst[off..off + n_bytes].copy_from_slice(&src[off..off + n_bytes]);
            n += 1;
        }
    }
    std::hint::black_box(&dst);
    (n * n_bytes) as f64 / start.elapsed().as_secs_f64()
}

/// The fabric's copy (byte-wise atomic) of `size`-byte messages between two windows.
pub fn fabric_copy_bw(
    src: &WindowHandle,
    dst: &WindowHandle,
    size: u64,
    set: u64,
    dur: Duration,
) -> f64 {
    let n_bytes = size as usize;
    let slots = (set / size).max(1);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        // A batch between clock reads so small copies are not dominated by the clock.
        for _ in 0..64 {
            let off = (n % slots) * size;
            dst.memory().copy_from(off, src.memory(), off, n_bytes);
            n += 1;
        }
    }
    (n * size) as f64 / start.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_run_moves_data_and_reports_every_size() {
        let cfg = RdmaBenchConfig {
            sizes: vec![64, 4096, 1 << 20],
            per_point: Duration::from_millis(20),
            rate_time: Duration::from_millis(20),
            revokes: 3,
            placement: Placement::auto(),
        };
        let r = run(&cfg, &|_: &str| {}).expect("bench runs");
        assert_eq!(r.bandwidth.len(), 3);
        for row in &r.bandwidth {
            assert!(row.writes > 0, "{row:?}");
            assert!(row.rdma_gib_s > 0.0 && row.memcpy_gib_s > 0.0, "{row:?}");
        }
        assert!(r.msg_rate.writes > 0);
        assert_eq!(r.revoke.revokes, 3);
        assert_eq!(r.revoke.lost, 0);
        assert_eq!(r.revoke.post_ack_accesses, 0);
    }

    #[test]
    fn a_zero_size_is_refused_by_name() {
        let cfg = RdmaBenchConfig {
            sizes: vec![0],
            ..RdmaBenchConfig::default()
        };
        let e = run(&cfg, &|_: &str| {}).unwrap_err().to_string();
        assert!(e.contains("size") && e.contains('0'), "{e}");
    }
}
