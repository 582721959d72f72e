//! The exporter's half of a stress run: revoke under load, check the poison, re-export.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use dmaplane_core::sync::lock;
use std::time::{Duration, Instant};

use dmaplane_core::RevokeReport;

use super::config::StressConfig;

use super::bytes::{Bytes, next, poison_damage};
use super::run_state::{RunState, STUCK_FOR};

/// One export as the exporter's loop sees it.
pub trait Revocable {
    /// Which export this is (counts from 1).
    fn epoch(&self) -> u64;
    /// Revoke it, waiting up to `deadline` for every importer's ack.
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
