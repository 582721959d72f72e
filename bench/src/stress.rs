//! `dmaplane stress revoke`: RDMA WRITE traffic on many queue pairs while the target memory is
//! revoked and re-exported over and over. Every request must complete exactly once, every
//! successful write must be byte-exact, and nothing may touch memory after a revoke's ack.
//!
//! How "after the ack" is checked: right after each ack the old memory is filled with a poison
//! pattern; at the next revoke (and at the end) it must still be all poison. Any DMA that
//! landed after the ack would have overwritten it. On top of that, every DMA the fabric refused
//! because a grant was gone is counted (an honest importer never even tries).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmaplane_core::fabric::{HostMemory, WindowHandle};
use dmaplane_core::{Exporter, ImporterKind};
use dmaplane_rdma::{
    Completion, ImportOptions, MrAccess, QpCaps, QuiescePolicy, RdmaError, RemoteMr, SendWr,
    WcStatus,
};
use serde::Serialize;

use crate::world::World;

#[derive(Debug, Clone)]
pub struct StressConfig {
    pub qps: usize,
    pub depth: usize,
    pub size: u32,
    pub revokes: u64,
    pub seconds: f64,
    pub seed: u64,
    pub policy: QuiescePolicy,
    /// Exporter's deadline per revoke.
    pub deadline: Duration,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    pub fn of(mut v: Vec<f64>) -> Latency {
        if v.is_empty() {
            return Latency::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Latency {
            p50: at(0.5),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StressReport {
    pub backend: &'static str,
    pub qps: usize,
    pub depth: usize,
    pub size: u32,
    pub posted: u64,
    pub completed_ok: u64,
    pub flushed: u64,
    pub failed: u64,
    pub lost: u64,
    /// Successful writes whose bytes did not match.
    pub corrupt: u64,
    pub post_ack_accesses: u64,
    pub bytes_verified: u64,
    pub revokes: u64,
    pub revoke_latency_us: Latency,
    /// Revokes where an importer missed the deadline.
    pub revokes_timed_out: u64,
    /// Posts refused because the target was revoked (expected, not an error).
    pub posts_refused: u64,
    pub seconds: f64,
    pub failures: Vec<String>,
    /// What the run found out on the way (device, negotiated registration, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl StressReport {
    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.post_ack_accesses == 0
            && self.corrupt == 0
            && self.failed == 0
            && self.revokes_timed_out == 0
    }
}

/// The target of the traffic in one epoch.
#[derive(Debug, Clone)]
struct Target {
    epoch: u64,
    remote: Arc<RemoteMr>,
    window: WindowHandle,
}

const POISON: u8 = 0xd5;

/// The bytes a request with `tag` writes: a word per 8 bytes, unique to the tag and position,
/// generated a word at a time so that filling and checking cost the data path little CPU (on a
/// small machine it shares the cores with the NIC engines it is measuring).
fn pattern(tag: u64, len: usize, buf: &mut Vec<u8>) {
    buf.clear();
    buf.resize(len, 0);
    let mut chunks = buf.chunks_exact_mut(8);
    let mut k = 0u64;
    for c in &mut chunks {
        c.copy_from_slice(&word(tag, k).to_le_bytes());
        k += 1;
    }
    let rest = chunks.into_remainder();
    let n = rest.len();
    rest.copy_from_slice(&word(tag, k).to_le_bytes()[..n]);
}

fn word(tag: u64, k: u64) -> u64 {
    tag ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Simple deterministic generator for the revoke schedule.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

pub fn run_sim(
    cfg: &StressConfig,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<StressReport, RdmaError> {
    let slots = cfg.qps * cfg.depth;
    let region = slots as u64 * u64::from(cfg.size);
    let region = region.next_multiple_of(4096).max(4096);
    let cq_depth = u32::try_from(slots * 2 + 64).unwrap_or(u32::MAX);
    let w = World::new(cq_depth)?;
    let caps = QpCaps {
        max_send_wr: cfg.depth as u32,
        max_recv_wr: 1,
        ..QpCaps::default()
    };
    let pairs = w.connect(cfg.qps, caps)?;
    let src_mem = w.a.memory(&w.fabric, "stress-src", region)?;
    let src = w.a.import(&src_mem, "src", ImportOptions::default())?;
    let opts = ImportOptions {
        access: MrAccess::LOCAL_WRITE | MrAccess::REMOTE_WRITE | MrAccess::REMOTE_READ,
        kind: ImporterKind::Pinned,
        policy: cfg.policy,
        recover: true,
    };
    let export = |epoch: u64| -> Result<(HostMemory, dmaplane_rdma::Mr, Target), RdmaError> {
        let mem =
            w.b.memory(&w.fabric, &format!("stress-dst-{epoch}"), region)?;
        let mr = w.b.import(&mem, "dst", opts)?;
        let remote = w.b.dev.lease(&mr, &w.a.dev);
        let window = mem.window();
        Ok((
            mem,
            mr,
            Target {
                epoch,
                remote,
                window,
            },
        ))
    };
    let (mem0, mr0, t0) = export(0)?;
    let current: Arc<Mutex<Target>> = Arc::new(Mutex::new(t0));
    let stop = AtomicBool::new(false);
    // Lowest epoch with a request still outstanding (u64::MAX when none): the revoker poisons
    // an old epoch only once the data path has verified all of its writes.
    // Requests outstanding per epoch, counted before the post so none can slip past.
    let per_epoch: Mutex<std::collections::BTreeMap<u64, u64>> = Mutex::new(Default::default());
    let outstanding_in = |e: u64| {
        per_epoch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&e)
            .copied()
            .unwrap_or(0)
    };
    let count = |e: u64, delta: i64| {
        let mut m = per_epoch.lock().unwrap_or_else(|p| p.into_inner());
        let v = m.entry(e).or_insert(0);
        *v = v.saturating_add_signed(delta);
        if *v == 0 {
            m.remove(&e);
        }
    };
    let revokes_done = AtomicU64::new(0);
    let post_ack_poison = AtomicU64::new(0);
    let timed_out = AtomicU64::new(0);
    let latencies = Mutex::new(Vec::with_capacity(cfg.revokes as usize));
    let failures = Mutex::new(Vec::<String>::new());
    let start = Instant::now();
    let min_time = Duration::from_secs_f64(cfg.seconds.max(0.0));

    let report = std::thread::scope(|s| -> Result<StressReport, RdmaError> {
        // The exporter: revoke, check, re-export.
        let revoker = s.spawn(|| {
            let mut seed = cfg.seed | 1;
            let mut live = Some((mem0, mr0));
            let mut retired: Option<WindowHandle> = None;
            let interval = min_time.as_secs_f64() / cfg.revokes.max(1) as f64;
            for epoch in 1..=cfg.revokes {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                // Revoke under load: let the data path get requests in flight on the live target
                // first (bounded, so a stalled data path cannot stall the schedule).
                let since = Instant::now();
                while outstanding_in(epoch - 1) == 0
                    && since.elapsed() < Duration::from_millis(50)
                    && !stop.load(Ordering::Relaxed)
                {
                    std::thread::sleep(Duration::from_micros(20));
                }
                let jitter = (next(&mut seed) % 1000) as f64 / 1000.0 * 2.0 * interval;
                std::thread::sleep(Duration::from_secs_f64(jitter.min(0.05)));
                let Some((mem, mr)) = live.take() else { break };
                let report = mem.revoke(cfg.deadline);
                latencies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(report.elapsed_us as f64);
                if !report.is_clean() {
                    timed_out.fetch_add(1, Ordering::Relaxed);
                    failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("revoke {epoch}: {report}"));
                }
                // Wait until every write of the revoked epoch has been reaped and verified.
                let wait_from = Instant::now();
                while outstanding_in(epoch - 1) > 0
                    && wait_from.elapsed() < Duration::from_secs(10)
                    && !stop.load(Ordering::Relaxed)
                {
                    std::thread::sleep(Duration::from_micros(200));
                }
                // Check the previous epoch's poison, then poison this one.
                if let Some(old) = retired.take() {
                    post_ack_poison.fetch_add(poison_damage(&old), Ordering::Relaxed);
                }
                let win = mem.window();
                poison(&win);
                retired = Some(win);
                drop(mr);
                drop(mem);
                match export(epoch) {
                    Ok((m, r, t)) => {
                        *current.lock().unwrap_or_else(|p| p.into_inner()) = t;
                        live = Some((m, r));
                    }
                    Err(e) => {
                        failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(format!("re-export {epoch}: {e}"));
                        break;
                    }
                }
                revokes_done.store(epoch, Ordering::Relaxed);
                progress(epoch);
            }
            if let Some(old) = retired.take() {
                post_ack_poison.fetch_add(poison_damage(&old), Ordering::Relaxed);
            }
            live
        });

        // The data path: keep `depth` writes outstanding on every QP, verify each success.
        let mut posted = 0u64;
        let mut ok = 0u64;
        let mut flushed = 0u64;
        let mut failed = 0u64;
        let mut corrupt = 0u64;
        let mut bytes = 0u64;
        let mut refused = 0u64;
        let size = cfg.size as usize;
        // Per slot: what was posted there (target epoch and tag), None when free.
        let mut inflight: Vec<Option<(Target, u64)>> = vec![None; slots];
        let mut free: Vec<Vec<usize>> = (0..cfg.qps)
            .map(|q| (0..cfg.depth).map(|d| q * cfg.depth + d).collect())
            .collect();
        let mut wcs: Vec<Completion> = Vec::with_capacity(1024);
        let mut buf = Vec::with_capacity(size);
        let mut got = vec![0u8; size];
        let mut serial = 0u64;
        let mut batch: Vec<SendWr> = Vec::with_capacity(cfg.depth);
        let mut tags: Vec<u64> = Vec::with_capacity(cfg.depth);
        let mut draining_since: Option<Instant> = None;
        loop {
            let done_revoking =
                revokes_done.load(Ordering::Relaxed) >= cfg.revokes || revoker.is_finished();
            let stopping = done_revoking && start.elapsed() >= min_time;
            if stopping && draining_since.is_none() {
                draining_since = Some(Instant::now());
            }
            let mut posted_now = 0u64;
            if !stopping {
                let target = current.lock().unwrap_or_else(|p| p.into_inner()).clone();
                for (q, (qa, _)) in pairs.iter().enumerate() {
                    if free[q].is_empty() {
                        continue;
                    }
                    batch.clear();
                    tags.clear();
                    for &slot in free[q].iter() {
                        serial += 1;
                        let tag = (target.epoch << 40) ^ serial;
                        tags.push(tag);
                        pattern(tag, size, &mut buf);
                        let off = slot as u64 * u64::from(cfg.size);
                        src_mem.write(off, &buf);
                        batch.push(SendWr::write(
                            slot as u64,
                            src.sge(off, cfg.size),
                            target.remote.at(off),
                        ));
                    }
                    count(target.epoch, batch.len() as i64);
                    let r = qa.post_send(&batch);
                    if r.is_err() {
                        count(target.epoch, -(batch.len() as i64));
                    }
                    match r {
                        Ok(()) => {
                            posted += batch.len() as u64;
                            posted_now += batch.len() as u64;
                            for (wr, &tag) in batch.iter().zip(&tags) {
                                inflight[wr.wr_id as usize] = Some((target.clone(), tag));
                            }
                            free[q].clear();
                        }
                        Err(RdmaError::Revoked { .. }) | Err(RdmaError::WrongState { .. }) => {
                            refused += 1;
                        }
                        Err(e) => {
                            failures
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(format!("post on QP {:#x}: {e}", qa.qpn()));
                            failed += 1;
                        }
                    }
                }
            }
            wcs.clear();
            w.a.cq.poll(&mut wcs, 1024)?;
            for wc in &wcs {
                let slot = wc.wr_id as usize;
                let Some((target, tag)) = inflight.get_mut(slot).and_then(Option::take) else {
                    failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("completion for unknown request {}", wc.wr_id));
                    failed += 1;
                    continue;
                };
                free[slot / cfg.depth].push(slot);
                let verify_epoch = target.epoch;
                match wc.status {
                    WcStatus::Success => {
                        ok += 1;
                        pattern(tag, size, &mut buf);
                        let off = slot as u64 * u64::from(cfg.size);
                        let read_ok = target.window.memory().read(off, &mut got);
                        if read_ok && got == buf {
                            bytes += u64::from(cfg.size);
                        } else {
                            corrupt += 1;
                            let mut f = failures.lock().unwrap_or_else(|p| p.into_inner());
                            if f.len() < 5 {
                                let poisoned = got.iter().all(|&b| b == POISON);
                                let first = got.iter().zip(&buf).position(|(a, b)| a != b);
                                f.push(format!(
                                    "slot {slot} epoch {} (current {}): bytes differ from byte {first:?}, read_ok {read_ok}, all poison {poisoned}",
                                    target.epoch,
                                    current.lock().unwrap_or_else(|p| p.into_inner()).epoch
                                ));
                            }
                        }
                    }
                    WcStatus::WrFlushErr => flushed += 1,
                    other => {
                        failed += 1;
                        let mut f = failures.lock().unwrap_or_else(|p| p.into_inner());
                        if f.len() < 20 {
                            f.push(format!("QP {:#x} request {}: {other}", wc.qp_num, wc.wr_id));
                        }
                    }
                }
                count(verify_epoch, -1);
            }
            if wcs.is_empty() && posted_now == 0 {
                // Nothing to do: wait for a completion instead of spinning a core away from the
                // engine and the exporter.
                w.a.cq.wait(Duration::from_micros(500))?;
            }
            if let Some(since) = draining_since {
                let outstanding = inflight.iter().filter(|x| x.is_some()).count();
                if outstanding == 0 || since.elapsed() > Duration::from_secs(10) {
                    break;
                }
                if wcs.is_empty() {
                    std::thread::yield_now();
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let live = revoker.join().unwrap_or(None);
        drop(live);
        let lost = inflight.iter().filter(|x| x.is_some()).count() as u64;
        let faults = |d| {
            let f = w.fabric.faults(d);
            f.revoked + f.no_grant + f.unmapped
        };
        let post_ack =
            faults(w.a.nic_dev) + faults(w.b.nic_dev) + post_ack_poison.load(Ordering::Relaxed);
        let lat = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(StressReport {
            backend: "sim",
            qps: cfg.qps,
            depth: cfg.depth,
            size: cfg.size,
            posted,
            completed_ok: ok,
            flushed,
            failed,
            lost,
            corrupt,
            post_ack_accesses: post_ack,
            bytes_verified: bytes,
            revokes: revokes_done.load(Ordering::Relaxed),
            revoke_latency_us: Latency::of(lat),
            revokes_timed_out: timed_out.load(Ordering::Relaxed),
            posts_refused: refused,
            seconds: start.elapsed().as_secs_f64(),
            failures: std::mem::take(&mut *failures.lock().unwrap_or_else(|p| p.into_inner())),
            notes: Vec::new(),
        })
    })?;
    Ok(report)
}

fn poison(w: &WindowHandle) {
    let chunk = vec![POISON; 1 << 16];
    let len = w.len();
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk.len() as u64) as usize;
        w.memory().write(off, &chunk[..n]);
        off += n as u64;
    }
}

/// Pages of `w` that are no longer all poison.
fn poison_damage(w: &WindowHandle) -> u64 {
    let mut buf = vec![0u8; 4096];
    let mut bad = 0;
    let mut off = 0;
    while off < w.len() {
        w.memory().read(off, &mut buf);
        if buf.iter().any(|&b| b != POISON) {
            bad += 1;
        }
        off += 4096;
    }
    bad
}
