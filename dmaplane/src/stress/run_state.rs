//! What both halves of a stress run share while it lasts: the live epoch's target, the
//! violations, the counts of every check, and when the run must stop.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dmaplane_core::sync::{lock, write};
use std::time::{Duration, Instant};

use dmaplane_core::RevokeReport;
use dmaplane_rdma::RemoteMr;

use super::bytes::{Bytes, poison};

/// What the data path writes to in one epoch.
#[derive(Debug, Clone)]
pub struct EpochTarget {
    /// The export it belongs to.
    pub epoch: u64,
    /// The lease the writer holds on it.
    pub remote: Arc<RemoteMr>,
    /// Its bytes, for the checks.
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
    /// Set when the run ends (every revoke done, time up, or stopped early).
    pub stop: AtomicBool,
    /// Revokes of the target done.
    pub revokes_done: AtomicU64,
    /// Revokes of the source side (memory the owner's own queue pairs read), done.
    pub source_revokes: AtomicU64,
    /// Held by whoever moves the source, and by the data path while it writes the source's
    /// bytes: the application does not write memory that is on its way somewhere else (a write
    /// to the old place during the move would be lost, and the oracle counts it as the exporter
    /// touching its memory before the ack).
    pub source_moving: Mutex<()>,
    /// Writes found in revoked memory after its ack (the poison overwritten).
    pub post_ack_poison: AtomicU64,
    /// Revokes where an importer missed the deadline.
    pub timed_out: AtomicU64,
    /// Each revoke's latency, in microseconds.
    pub latencies: Mutex<Vec<f64>>,
    failures: Mutex<Vec<String>>,
    /// Epochs whose memory the exporter has poisoned (at their ack), with the copy of the
    /// memory taken at the ack for the newest few: written while copying and poisoning, read
    /// while the data path verifies a completion.
    pub(super) poisoned: RwLock<BTreeMap<u64, Option<Arc<Vec<u8>>>>>,
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
    pub(super) fn observe_qps(&self, all_err: bool) {
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
    pub(super) fn stop_early(&self, why: String) {
        lock(&self.stopped_early).get_or_insert(why);
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Requests of epoch `e` posted and not reaped yet.
    pub fn outstanding_in(&self, e: u64) -> u64 {
        lock(&self.per_epoch).get(&e).copied().unwrap_or(0)
    }

    /// Requests ever posted to epoch `e`.
    pub fn posted_in(&self, e: u64) -> u64 {
        lock(&self.posted).get(&e).copied().unwrap_or(0)
    }

    /// Successful WRITEs to epoch `e`.
    pub fn landed_in(&self, e: u64) -> u64 {
        lock(&self.landed).get(&e).copied().unwrap_or(0)
    }

    /// Requests the data path tried to post to epoch `e`, taken or refused.
    pub fn tried_in(&self, e: u64) -> u64 {
        lock(&self.tried).get(&e).copied().unwrap_or(0)
    }

    pub(super) fn count_tried(&self, e: u64, n: u64) {
        let mut m = lock(&self.tried);
        *m.entry(e).or_insert(0) += n;
        while m.len() > 4 {
            m.pop_first();
        }
    }

    pub(super) fn count_landed(&self, e: u64) {
        let mut m = lock(&self.landed);
        *m.entry(e).or_insert(0) += 1;
        while m.len() > 4 {
            m.pop_first();
        }
    }

    pub(super) fn count(&self, e: u64, delta: i64) {
        let mut m = lock(&self.per_epoch);
        let v = m.entry(e).or_insert(0);
        *v = v.saturating_add_signed(delta);
        if *v == 0 {
            m.remove(&e);
        }
    }

    pub(super) fn count_posted(&self, e: u64, n: u64) {
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

    /// The failures recorded so far, taken out.
    pub fn take_failures(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.failures))
    }

    /// The revoke latencies recorded so far, taken out.
    pub fn take_latencies(&self) -> Vec<f64> {
        std::mem::take(&mut *lock(&self.latencies))
    }

    /// Poison epoch `e`'s memory at its ack, and from then on judge its completions by it.
    pub(super) fn poison_at_ack(&self, e: u64, mem: &dyn Bytes) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
