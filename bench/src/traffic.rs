//! The revoke stress's two halves, shared by every backend (the simulated NIC here, real verbs
//! in the `dmaplane` tool): the exporter's loop that revokes, checks and re-exports, and the data
//! path that keeps WRITEs in flight and verifies each one.
//!
//! How "after the ack" is checked: the moment the exporter's revoke report returns, the old
//! memory is filled with a poison pattern, by the exporter. From then on:
//! - a successful WRITE to that epoch that the data path reaps afterwards must read as all
//!   poison — it landed before the ack and the poison covered it; its own bytes mean it landed
//!   after the ack — and its bytes are verified in the copy the exporter took at the ack, just
//!   before poisoning (the newest [`SNAPSHOTS`] epochs keep one). The data path verifies under
//!   the lock the exporter holds while it copies and poisons, so the two never interleave;
//! - at the next revoke (and at the end) the memory must still be all poison: a DMA that landed
//!   after the ack, completed or not, would have overwritten it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dmaplane_core::sync::{lock, read, try_lock, write};
use std::time::{Duration, Instant};

use dmaplane_core::RevokeReport;
use dmaplane_core::dmabuf::DmaBufMemory;
use dmaplane_core::fabric::{HostMemory, WindowHandle};
use dmaplane_rdma::{Completion, Cq, Mr, Pd, Qp, QpState, RdmaError, RemoteMr, SendWr, WcStatus};

use crate::stress_config::StressConfig;

pub const POISON: u8 = 0xd5;

/// Memory the stress writes, verifies and poisons through the CPU.
pub trait Bytes: Send + Sync + std::fmt::Debug {
    fn read(&self, off: u64, buf: &mut [u8]) -> bool;
    fn write(&self, off: u64, data: &[u8]) -> bool;
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A window's memory, seen directly (a retired window stays readable after its unmap).
impl Bytes for WindowHandle {
    fn read(&self, off: u64, buf: &mut [u8]) -> bool {
        self.memory().read(off, buf)
    }
    fn write(&self, off: u64, data: &[u8]) -> bool {
        self.memory().write(off, data)
    }
    fn len(&self) -> u64 {
        WindowHandle::len(self)
    }
}

impl Bytes for HostMemory {
    fn read(&self, off: u64, buf: &mut [u8]) -> bool {
        HostMemory::read(self, off, buf)
    }
    fn write(&self, off: u64, data: &[u8]) -> bool {
        HostMemory::write(self, off, data)
    }
    fn len(&self) -> u64 {
        HostMemory::len(self)
    }
}

/// udmabuf pages are ordinary cache-coherent host memory: the CPU view shows what the NIC
/// wrote once the completion is seen.
impl Bytes for DmaBufMemory {
    fn read(&self, off: u64, buf: &mut [u8]) -> bool {
        DmaBufMemory::read(self, off, buf).is_ok()
    }
    fn write(&self, off: u64, data: &[u8]) -> bool {
        DmaBufMemory::write(self, off, data).is_ok()
    }
    fn len(&self) -> u64 {
        DmaBufMemory::len(self)
    }
}

/// The bytes a request with `tag` writes ([`dmaplane_core::pattern`]), in `buf`.
pub fn pattern(tag: u64, len: usize, buf: &mut Vec<u8>) {
    buf.clear();
    buf.resize(len, 0);
    dmaplane_core::pattern::fill(tag, 0, buf);
}

/// Deterministic generator for the revoke schedule.
pub fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

pub fn poison(mem: &dyn Bytes) -> bool {
    let chunk = vec![POISON; 1 << 16];
    let mut off = 0;
    while off < mem.len() {
        let n = (mem.len() - off).min(chunk.len() as u64) as usize;
        if !mem.write(off, &chunk[..n]) {
            return false;
        }
        off += n as u64;
    }
    true
}

/// Pages of `mem` that are no longer all poison (an unreadable page counts). Compared with
/// `memcmp` against a poison page, 64 KiB per read: this runs on every revoke cycle, next to
/// the traffic it must not starve.
pub fn poison_damage(mem: &dyn Bytes) -> u64 {
    const PAGE: usize = 4096;
    let page = [POISON; PAGE];
    let mut buf = vec![0u8; 16 * PAGE];
    let (mut bad, mut off) = (0, 0);
    while off < mem.len() {
        let n = (mem.len() - off).min(buf.len() as u64) as usize;
        if !mem.read(off, &mut buf[..n]) {
            bad += n.div_ceil(PAGE) as u64;
        } else {
            bad += buf[..n]
                .chunks(PAGE)
                .filter(|c| **c != page[..c.len()])
                .count() as u64;
        }
        off += n as u64;
    }
    bad
}

/// What the data path writes to in one epoch.
#[derive(Debug, Clone)]
pub struct EpochTarget {
    pub epoch: u64,
    pub remote: Arc<RemoteMr>,
    pub mem: Arc<dyn Bytes>,
}

/// What both halves share while a run lasts.
#[derive(Debug, Default)]
pub struct RunState {
    /// Requests outstanding per epoch, counted before the post so none slips past: the exporter
    /// poisons an old epoch only once all of its writes were reaped and verified.
    per_epoch: Mutex<BTreeMap<u64, u64>>,
    /// Requests ever posted per epoch (the newest few), for "revoke under load".
    posted: Mutex<BTreeMap<u64, u64>>,
    /// Successful WRITEs per epoch (the newest few): a revoke waits until traffic has landed.
    landed: Mutex<BTreeMap<u64, u64>>,
    /// Requests the data path tried to post per epoch, taken or refused (the newest few): after
    /// an ack the exporter waits for one more, so the holder is always asked to put a WRITE on
    /// the wire against a lease it has acknowledged giving up.
    tried: Mutex<BTreeMap<u64, u64>>,
    pub stop: AtomicBool,
    pub revokes_done: AtomicU64,
    /// Revokes of the source side (memory the owner's own queue pairs read), done.
    pub source_revokes: AtomicU64,
    /// Held by whoever moves the source, and by the data path while it writes the source's
    /// bytes: the application does not write memory that is on its way somewhere else (a write
    /// to the old place during the move would be lost, and the oracle counts it as the exporter
    /// touching its memory before the ack).
    pub source_moving: Mutex<()>,
    pub post_ack_poison: AtomicU64,
    pub timed_out: AtomicU64,
    pub latencies: Mutex<Vec<f64>>,
    failures: Mutex<Vec<String>>,
    /// Epochs whose memory the exporter has poisoned (at their ack), with the copy of the
    /// memory taken at the ack for the newest few: written while copying and poisoning, read
    /// while the data path verifies a completion.
    poisoned: RwLock<BTreeMap<u64, Option<Arc<Vec<u8>>>>>,
    /// Since when the data path has found every one of its queue pairs in ERR (nothing it
    /// posts can move data any more); `None` while any can.
    all_qps_err_since: Mutex<Option<Instant>>,
    /// Why the exporter stopped before every asked-for revoke ran, if it did.
    stopped_early: Mutex<Option<String>>,
}

/// Epochs whose memory at the ack is kept to verify WRITEs reaped after it.
pub const SNAPSHOTS: usize = 2;

/// How long every queue pair must have stayed in ERR, after a violation, before the run stops:
/// long enough for a flushed queue pair's recovery to have brought it back.
pub const STUCK_FOR: Duration = Duration::from_millis(250);

impl RunState {
    /// A revoke of the source side acknowledged: its latency joins the others; one an importer
    /// did not quiesce in time is a violation.
    pub fn source_revoked(&self, epoch: u64, report: &RevokeReport) {
        self.source_revokes.fetch_add(1, Ordering::Relaxed);
        lock(&self.latencies).push(report.elapsed_us as f64);
        if !report.is_clean() {
            self.timed_out.fetch_add(1, Ordering::Relaxed);
            self.fail(format!("source revoke before epoch {epoch}: {report}"));
        }
    }

    /// Whether a violation has been recorded already: the verdict is fail, whatever follows.
    pub fn violated(&self) -> bool {
        !lock(&self.failures).is_empty()
            || self.post_ack_poison.load(Ordering::Relaxed) > 0
            || self.timed_out.load(Ordering::Relaxed) > 0
    }

    /// The data path's look at its queue pairs: whether every one is in ERR.
    fn observe_qps(&self, all_err: bool) {
        let mut since = lock(&self.all_qps_err_since);
        match (all_err, *since) {
            (true, None) => *since = Some(Instant::now()),
            (false, Some(_)) => *since = None,
            _ => {}
        }
    }

    /// A violation was seen and nothing is left that can move: every queue pair of the data
    /// path has been in ERR for [`STUCK_FOR`]. Going on would only wait out every remaining
    /// revoke's deadline for traffic that cannot come; the verdict and the counts stay as they
    /// are.
    pub fn stuck_after_violation(&self) -> bool {
        self.violated() && lock(&self.all_qps_err_since).is_some_and(|t| t.elapsed() >= STUCK_FOR)
    }

    /// Why the run stopped before every asked-for revoke ran (`None` if it did not).
    pub fn stopped_early(&self) -> Option<String> {
        lock(&self.stopped_early).clone()
    }

    /// Stop the run now, saying why.
    fn stop_early(&self, why: String) {
        lock(&self.stopped_early).get_or_insert(why);
        self.stop.store(true, Ordering::Relaxed);
    }

    pub fn outstanding_in(&self, e: u64) -> u64 {
        lock(&self.per_epoch).get(&e).copied().unwrap_or(0)
    }

    pub fn posted_in(&self, e: u64) -> u64 {
        lock(&self.posted).get(&e).copied().unwrap_or(0)
    }

    pub fn landed_in(&self, e: u64) -> u64 {
        lock(&self.landed).get(&e).copied().unwrap_or(0)
    }

    pub fn tried_in(&self, e: u64) -> u64 {
        lock(&self.tried).get(&e).copied().unwrap_or(0)
    }

    fn count_tried(&self, e: u64, n: u64) {
        let mut m = lock(&self.tried);
        *m.entry(e).or_insert(0) += n;
        while m.len() > 4 {
            m.pop_first();
        }
    }

    fn count_landed(&self, e: u64) {
        let mut m = lock(&self.landed);
        *m.entry(e).or_insert(0) += 1;
        while m.len() > 4 {
            m.pop_first();
        }
    }

    fn count(&self, e: u64, delta: i64) {
        let mut m = lock(&self.per_epoch);
        let v = m.entry(e).or_insert(0);
        *v = v.saturating_add_signed(delta);
        if *v == 0 {
            m.remove(&e);
        }
    }

    fn count_posted(&self, e: u64, n: u64) {
        let mut m = lock(&self.posted);
        *m.entry(e).or_insert(0) += n;
        while m.len() > 4 {
            m.pop_first();
        }
    }

    /// Record a failure (the first few are kept for the report).
    pub fn fail(&self, s: String) {
        let mut f = lock(&self.failures);
        if f.len() < 20 {
            f.push(s);
        }
    }

    pub fn take_failures(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.failures))
    }

    pub fn take_latencies(&self) -> Vec<f64> {
        std::mem::take(&mut *lock(&self.latencies))
    }

    /// Poison epoch `e`'s memory at its ack, and from then on judge its completions by it.
    fn poison_at_ack(&self, e: u64, mem: &dyn Bytes) -> bool {
        let mut p = write(&self.poisoned);
        let mut copy = vec![0u8; usize::try_from(mem.len()).unwrap_or(0)];
        let copied = mem.read(0, &mut copy);
        let done = poison(mem);
        p.insert(e, copied.then(|| Arc::new(copy)));
        // Only the newest few epochs keep their copy, and only a few more can still have
        // WRITEs in flight at all.
        let n = p.len();
        for (_, snap) in p.iter_mut().take(n.saturating_sub(SNAPSHOTS)) {
            *snap = None;
        }
        while p.len() > 8 {
            p.pop_first();
        }
        done
    }
}

/// One export as the exporter's loop sees it.
pub trait Revocable {
    fn epoch(&self) -> u64;
    fn revoke(&self, deadline: Duration) -> RevokeReport;
    /// The memory, kept after the export is gone for the poison check.
    fn bytes(&self) -> Arc<dyn Bytes>;
    /// Right after the ack (and the poison): what a packet still on the wire finds at the revoked
    /// region. `Err` names what went wrong; the backend's observer judges the rest.
    fn after_ack(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The exporter: wait until traffic is in flight on the live export, revoke it at a random
/// point, wait until the data path has reaped and verified all of its writes, check the
/// previous epoch's poison and poison this one, re-export. `in_flight` is how many requests
/// must have been posted to an export before it is revoked; `before_revoke(epoch)` runs under
/// that load right before each revoke.
#[allow(clippy::too_many_arguments)]
pub fn exporter<E: Revocable>(
    cfg: &StressConfig,
    sh: &RunState,
    first: E,
    in_flight: u64,
    random_point: Duration,
    mut export: impl FnMut(u64) -> Result<E, String>,
    mut before_revoke: impl FnMut(u64),
    progress: &(dyn Fn(u64) + Sync),
) -> Option<E> {
    let mut seed = cfg.seed | 1;
    let mut live = Some(first);
    let mut retired: Option<Arc<dyn Bytes>> = None;
    let interval = cfg.seconds.max(0.0) / cfg.revokes.max(1) as f64;
    let stuck = |epoch: u64| {
        let stop = sh.stuck_after_violation();
        if stop {
            sh.stop_early(format!(
                "stopped before revoke {epoch} of {}: a violation was seen and nothing can move \
                 (every queue pair in ERR for {} ms)",
                cfg.revokes,
                STUCK_FOR.as_millis()
            ));
        }
        stop
    };
    'revokes: for epoch in 1..=cfg.revokes {
        if sh.stop.load(Ordering::Relaxed) || stuck(epoch) {
            break;
        }
        let ex = live.take()?;
        // Revoke under load: let the data path get requests in flight on this export, one of
        // them land, and the queues be at least half full again (bounded, so a stalled data
        // path cannot stall the schedule).
        let since = Instant::now();
        let half_full = (cfg.qps * cfg.depth / 2).max(1) as u64;
        while (sh.posted_in(ex.epoch()) < in_flight
            || sh.landed_in(ex.epoch()) == 0
            || sh.outstanding_in(ex.epoch()) < half_full)
            && since.elapsed() < Duration::from_secs(5)
            && !sh.stop.load(Ordering::Relaxed)
        {
            if stuck(epoch) {
                live = Some(ex);
                break 'revokes;
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        let jitter = (next(&mut seed) % 1000) as f64 / 1000.0 * 2.0 * interval;
        let point = (next(&mut seed) % 1000) as f64 / 1000.0 * random_point.as_secs_f64();
        std::thread::sleep(Duration::from_secs_f64(jitter.min(0.05) + point));
        // Whatever else is revoked under the same load (the sim stress moves its source).
        before_revoke(epoch);
        let report = ex.revoke(cfg.deadline);
        // The ack: poison now, before anything else can happen to the memory.
        let mem = ex.bytes();
        if !sh.poison_at_ack(ex.epoch(), &*mem) {
            sh.fail(format!("could not poison epoch {}", ex.epoch()));
        }
        lock(&sh.latencies).push(report.elapsed_us as f64);
        if !report.is_clean() {
            sh.timed_out.fetch_add(1, Ordering::Relaxed);
            sh.fail(format!("revoke {epoch}: {report}"));
        }
        if let Err(e) = ex.after_ack() {
            sh.post_ack_poison.fetch_add(1, Ordering::Relaxed);
            sh.fail(format!("revoke {epoch}: {e}"));
        }
        // A holder that acknowledged without stopping is caught by what it sends next (refused
        // at the zapped region), so whether the check can fail must not depend on whether any
        // WRITE was still on the wire at the ack (a starved data path may have had none): keep
        // the revoked epoch current until the data path has tried to post to it again. A
        // holder that honoured the revoke refuses the post itself.
        let tried = sh.tried_in(ex.epoch());
        let since = Instant::now();
        while sh.tried_in(ex.epoch()) == tried
            && since.elapsed() < Duration::from_secs(2)
            && !sh.stop.load(Ordering::Relaxed)
            && !stuck(epoch + 1)
        {
            std::thread::sleep(Duration::from_micros(20));
        }
        // The previous epoch must still be all poison.
        if let Some(old) = retired.take() {
            sh.post_ack_poison
                .fetch_add(poison_damage(&*old), Ordering::Relaxed);
        }
        retired = Some(mem);
        drop(ex);
        match export(epoch) {
            Ok(e) => live = Some(e),
            Err(e) => {
                sh.fail(format!("re-export {epoch}: {e}"));
                break;
            }
        }
        sh.revokes_done.store(epoch, Ordering::Relaxed);
        progress(epoch);
    }
    if let Some(old) = retired.take() {
        sh.post_ack_poison
            .fetch_add(poison_damage(&*old), Ordering::Relaxed);
    }
    live
}

/// What the data path counted.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub posted: u64,
    pub ok: u64,
    pub flushed: u64,
    pub failed: u64,
    pub corrupt: u64,
    pub bytes: u64,
    pub refused: u64,
    /// Completions with a remote-access error (a post-ack access the NIC refused).
    pub rem_access: u64,
    /// Completions with a local protection error: a request that met its own source region
    /// zapped, because its queue pair was not quiesced before the zap.
    pub loc_prot: u64,
    /// Successes reaped after their epoch's ack, found covered by its poison (landed before).
    pub before_ack: u64,
    pub lost: u64,
}

/// The data path's fixed parts.
#[derive(Debug)]
pub struct DataPath<'a> {
    pub cfg: &'a StressConfig,
    pub qps: &'a [Qp],
    pub cq: &'a Cq,
    pub src: &'a Mr,
    pub src_mem: &'a dyn Bytes,
    /// Where the source registration is made again after its memory moved (a dynamic import:
    /// the stress moves the source under the owner's own queue pairs); `None` when it never
    /// moves.
    pub src_pd: Option<&'a Pd>,
    /// How long to keep reaping after the last revoke before calling a request lost.
    pub drain_limit: Duration,
}

impl DataPath<'_> {
    /// Keep `depth` WRITEs outstanding on every QP against the current target (`refresh`
    /// updates it), verify every success byte for byte, until the exporter is done
    /// (`exporter_done`) and the minimum time has passed; then reap what is left.
    pub fn run(
        &self,
        sh: &RunState,
        mut current: EpochTarget,
        mut refresh: impl FnMut(&mut EpochTarget),
        exporter_done: &dyn Fn() -> bool,
    ) -> Result<Counts, RdmaError> {
        let cfg = self.cfg;
        let slots = cfg.qps * cfg.depth;
        let size = cfg.size as usize;
        let mut c = Counts::default();
        // Per slot: what was posted there (target and tag), None when free.
        let mut inflight: Vec<Option<(EpochTarget, u64)>> = vec![None; slots];
        let mut free: Vec<Vec<usize>> = (0..cfg.qps)
            .map(|q| (0..cfg.depth).map(|d| q * cfg.depth + d).collect())
            .collect();
        let mut wcs: Vec<Completion> = Vec::with_capacity(1024);
        let mut buf = Vec::with_capacity(size);
        let mut got = vec![0u8; size];
        let mut serial = 0u64;
        let mut batch: Vec<SendWr> = Vec::with_capacity(cfg.depth);
        let mut tags: Vec<u64> = Vec::with_capacity(cfg.depth);
        let start = Instant::now();
        let min_time = Duration::from_secs_f64(cfg.seconds.max(0.0));
        let mut draining_since: Option<Instant> = None;
        let mut looked_at_qps = Instant::now();
        loop {
            refresh(&mut current);
            let stopping = exporter_done() && start.elapsed() >= min_time;
            if stopping && draining_since.is_none() {
                draining_since = Some(Instant::now());
            }
            // The source moved (its memory revoked under the queue pairs reading it, then
            // re-exported): register it again before posting from it; until the move is done
            // the posts are refused and counted so.
            if let Some(pd) = self.src_pd
                && self.src.revoked_at().is_some()
            {
                let _ = self.src.refresh(pd);
            }
            let mut posted_now = 0u64;
            // Nothing is written into the source while it moves: this round only reaps.
            let source = try_lock(&sh.source_moving);
            for (q, qp) in self.qps.iter().enumerate() {
                if stopping || free[q].is_empty() || source.is_none() {
                    continue;
                }
                batch.clear();
                tags.clear();
                for &slot in &free[q] {
                    serial += 1;
                    let tag = (current.epoch << 40) ^ serial;
                    tags.push(tag);
                    pattern(tag, size, &mut buf);
                    let off = slot as u64 * u64::from(cfg.size);
                    if !self.src_mem.write(off, &buf) {
                        sh.fail(format!("could not fill source slot {slot}"));
                    }
                    batch.push(SendWr::write(
                        slot as u64,
                        self.src.sge(off, cfg.size),
                        current.remote.at(off),
                    ));
                }
                sh.count(current.epoch, batch.len() as i64);
                sh.count_tried(current.epoch, batch.len() as u64);
                let r = qp.post_send(&batch);
                // A provider may take a prefix of the batch before refusing a request: what it
                // took is in flight and will complete like any other post.
                let taken = match &r {
                    Ok(()) => batch.len(),
                    Err(e) => e.posted_prefix().min(batch.len()),
                };
                let n = taken as u64;
                c.posted += n;
                posted_now += n;
                sh.count_posted(current.epoch, n);
                for (wr, &tag) in batch[..taken].iter().zip(&tags) {
                    inflight[wr.wr_id as usize] = Some((current.clone(), tag));
                }
                free[q].drain(..taken);
                if let Err(e) = r {
                    sh.count(current.epoch, -((batch.len() - taken) as i64));
                    match e {
                        // The target was revoked, or the QP is still recovering from its
                        // flush: expected while a revoke is under way.
                        RdmaError::Revoked { .. } | RdmaError::WrongState { .. } => {
                            c.refused += 1;
                        }
                        RdmaError::PartlyPosted { ref source, .. }
                            if matches!(
                                **source,
                                RdmaError::Revoked { .. } | RdmaError::WrongState { .. }
                            ) =>
                        {
                            c.refused += 1;
                        }
                        e => {
                            sh.fail(format!("post on QP {:#x}: {e}", qp.qpn()));
                            c.failed += 1;
                        }
                    }
                }
            }
            drop(source);
            wcs.clear();
            if let Err(e) = self.cq.poll(&mut wcs, 1024) {
                // Counted, never propagated: what is still in flight is reported lost below.
                sh.fail(format!("polling the completion queue: {e}"));
                c.failed += 1;
                break;
            }
            for wc in &wcs {
                let slot = wc.wr_id as usize;
                let Some((target, tag)) = inflight.get_mut(slot).and_then(Option::take) else {
                    sh.fail(format!("completion for unknown request {}", wc.wr_id));
                    c.failed += 1;
                    continue;
                };
                free[slot / cfg.depth].push(slot);
                match wc.status {
                    WcStatus::Success => {
                        c.ok += 1;
                        sh.count_landed(target.epoch);
                        pattern(tag, size, &mut buf);
                        let off = slot as u64 * u64::from(cfg.size);
                        let poisoned = read(&sh.poisoned);
                        let read = target.mem.read(off, &mut got);
                        if let Some(snap) = poisoned.get(&target.epoch) {
                            // Reaped after the ack: it must have landed before it, with its
                            // bytes in the memory as it was at the ack.
                            let at_ack = snap
                                .as_ref()
                                .and_then(|m| m.get(off as usize..off as usize + size));
                            if !(read && got.iter().all(|&b| b == POISON)) {
                                sh.post_ack_poison.fetch_add(1, Ordering::Relaxed);
                                sh.fail(format!(
                                    "slot {slot} epoch {}: a successful WRITE reaped after the \
                                     ack is not covered by the poison written at the ack: it \
                                     landed after the ack (its own bytes: {})",
                                    target.epoch,
                                    got == buf
                                ));
                            } else if let Some(at_ack) = at_ack {
                                if at_ack == buf.as_slice() {
                                    c.bytes += u64::from(cfg.size);
                                } else {
                                    c.corrupt += 1;
                                    sh.fail(format!(
                                        "slot {slot} epoch {}: completed before the ack, but the \
                                         memory at the ack does not hold its bytes",
                                        target.epoch
                                    ));
                                }
                            } else {
                                c.before_ack += 1;
                            }
                        } else if read && got == buf {
                            c.bytes += u64::from(cfg.size);
                        } else {
                            c.corrupt += 1;
                            let first = got.iter().zip(&buf).position(|(a, b)| a != b);
                            sh.fail(format!(
                                "slot {slot} epoch {} (current {}): bytes differ from byte \
                                 {first:?} (read {read}, all poison {})",
                                target.epoch,
                                current.epoch,
                                got.iter().all(|&b| b == POISON)
                            ));
                        }
                    }
                    WcStatus::WrFlushErr => c.flushed += 1,
                    other => {
                        c.failed += 1;
                        match other {
                            WcStatus::RemAccessErr => c.rem_access += 1,
                            WcStatus::LocProtErr => c.loc_prot += 1,
                            _ => {}
                        }
                        sh.fail(format!(
                            "QP {:#x} request {} (epoch {}): {other}",
                            wc.qp_num, wc.wr_id, target.epoch
                        ));
                    }
                }
                sh.count(target.epoch, -1);
            }
            // Every few milliseconds (a state query may be a system call on real hardware):
            // whether any queue pair can still move data.
            if looked_at_qps.elapsed() >= Duration::from_millis(5) {
                looked_at_qps = Instant::now();
                sh.observe_qps(self.qps.iter().all(|qp| qp.state() == QpState::Err));
            }
            if wcs.is_empty() && posted_now == 0 {
                // Nothing to do: wait for a completion instead of spinning a core away from
                // the NIC engines and the exporter.
                if let Err(e) = self.cq.wait(Duration::from_micros(500)) {
                    sh.fail(format!("waiting on the completion queue: {e}"));
                    c.failed += 1;
                    break;
                }
            }
            if let Some(since) = draining_since {
                let outstanding = inflight.iter().filter(|x| x.is_some()).count();
                if outstanding == 0 || since.elapsed() > self.drain_limit {
                    break;
                }
            }
        }
        sh.stop.store(true, Ordering::Relaxed);
        c.lost = inflight.iter().filter(|x| x.is_some()).count() as u64;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Buf(Mutex<Vec<u8>>);

    impl Bytes for Buf {
        fn read(&self, off: u64, buf: &mut [u8]) -> bool {
            let v = lock(&self.0);
            let o = off as usize;
            match v.get(o..o + buf.len()) {
                Some(s) => {
                    buf.copy_from_slice(s);
                    true
                }
                None => false,
            }
        }
        fn write(&self, off: u64, data: &[u8]) -> bool {
            let mut v = lock(&self.0);
            let o = off as usize;
            match v.get_mut(o..o + data.len()) {
                Some(s) => {
                    s.copy_from_slice(data);
                    true
                }
                None => false,
            }
        }
        fn len(&self) -> u64 {
            lock(&self.0).len() as u64
        }
    }

    #[test]
    fn stuck_means_a_violation_and_every_queue_pair_in_err_for_a_while() {
        let sh = RunState::default();
        sh.observe_qps(true);
        // No violation: never stuck, however long the queue pairs stay in ERR (a flushed queue
        // pair recovers; an honest run must go through every revoke).
        std::thread::sleep(STUCK_FOR);
        assert!(!sh.stuck_after_violation());
        sh.fail("a violation".into());
        assert!(sh.stuck_after_violation());
        // One queue pair back: it can move again, and the clock starts over.
        sh.observe_qps(false);
        assert!(!sh.stuck_after_violation());
        sh.observe_qps(true);
        assert!(!sh.stuck_after_violation());
        std::thread::sleep(STUCK_FOR);
        assert!(sh.stuck_after_violation());
    }

    #[test]
    fn poison_damage_counts_every_touched_page_and_nothing_else() {
        let m = Buf(Mutex::new(vec![0; 40 * 4096 + 100]));
        assert!(poison(&m));
        assert_eq!(poison_damage(&m), 0);
        assert!(m.write(5 * 4096 + 17, &[1]));
        assert!(m.write(40 * 4096 + 99, &[2]));
        assert!(m.write(20 * 4096 - 1, &[3, 4]));
        assert_eq!(poison_damage(&m), 4);
    }
}
