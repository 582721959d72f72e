//! The data path's half of a stress run: WRITEs kept in flight on every queue pair, each
//! completion reaped once and its bytes verified against the epoch it went to.

use std::sync::atomic::Ordering;

use dmaplane_core::sync::{read, try_lock};
use std::time::{Duration, Instant};

use dmaplane_rdma::{Completion, Cq, Mr, Pd, Qp, QpState, RdmaError, SendWr, WcStatus};

use super::config::StressConfig;

use super::bytes::{Bytes, POISON, pattern};
use super::run_state::{EpochTarget, RunState};

/// What the data path counted.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// WRITEs posted.
    pub posted: u64,
    /// Completions with success, their bytes verified.
    pub ok: u64,
    /// Completions flushed by a quiesce (never landed, sent again or given up with the epoch).
    pub flushed: u64,
    /// Completions with any other error.
    pub failed: u64,
    /// Successful WRITEs whose bytes were wrong where they landed (or after the ack).
    pub corrupt: u64,
    /// Bytes of the successful WRITEs.
    pub bytes: u64,
    /// Posts refused at once (a queue pair in ERR, a lease gone).
    pub refused: u64,
    /// Completions with a remote-access error (a post-ack access the NIC refused).
    pub rem_access: u64,
    /// Completions with a local protection error: a request that met its own source region
    /// zapped, because its queue pair was not quiesced before the zap.
    pub loc_prot: u64,
    /// Successes reaped after their epoch's ack, found covered by its poison (landed before).
    pub before_ack: u64,
    /// Posted requests that never got a completion.
    pub lost: u64,
}

/// The data path's fixed parts.
#[derive(Debug)]
pub struct DataPath<'a> {
    /// The run's shape.
    pub cfg: &'a StressConfig,
    /// The writer's queue pairs, connected to the target's NIC.
    pub qps: &'a [Qp],
    /// Their completion queue.
    pub cq: &'a Cq,
    /// The source registration every WRITE reads from.
    pub src: &'a Mr,
    /// The source's bytes, as the CPU fills them.
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
