//! The owner's side of the agent-level stress: memory allocated, registered and announced;
//! the holder's WRITEs into it awaited; then it is freed under that traffic
//! ([`Memory::free_quarantined`]: the holder's queue pairs quiesce and its lease acks before the
//! free returns), every block of it checked, and its bytes poisoned — `revokes` times.
//!
//! Checks: at each free, every block is whole and at least as new as the last notification for
//! its slot (nothing torn, nothing lost); the freed memory must still be all poison at the end
//! (any DMA after the ack would have changed it); with the holder's counts (every transfer ends
//! exactly once; no remote access error), one [`StressReport`] and its verdict.

use std::time::{Duration, Instant};

use super::blocks::{check_block, parse_note};
use super::config::StressConfig;
use super::holder::HolderReport;
use super::report::{Latency, StressReport};
use crate::error::Error;
use crate::{Agent, Memory, Quarantine, Result};
use dmaplane_core::fabric::FileId;

/// What every freed block is filled with at the ack.
const POISON: u8 = 0xee;
/// How long the owner waits for the holder's traffic into one allocation.
const EPOCH_WAIT: Duration = Duration::from_secs(15);
/// Quarantines kept for the final poison check (older ones are checked and released early).
const KEEP: usize = 64;
/// How long the holder has to report once the owner is gone.
const HOLDER_WAIT: Duration = Duration::from_secs(30);

/// The holder, as the owner sees it: a thread on the same testbed, or a second process.
pub trait Holder {
    /// What it is, for the report's notes.
    fn describe(&self) -> String;
    /// Whether it ended while the owner still runs: with its report (one that says it
    /// [`HolderReport::stopped`] because nothing it sends can move), or why there is none.
    fn gone(&mut self) -> Option<std::result::Result<HolderReport, String>>;
    /// Its report, once the owner is gone: waited for up to `limit`; a holder that does not end
    /// by then is a failure in the report, not a hang of the run.
    fn report(&mut self, limit: Duration) -> HolderReport;
    /// How many mappings of the memory file `file` it has now, read from outside it (its
    /// process's memory map); `None` where that cannot be seen (a holder in this process).
    fn mappings_of(&mut self, _file: FileId) -> Option<std::result::Result<usize, String>> {
        None
    }
}

/// The owner's whole run, on `owner` (dropped at the end: that ends the holder's traffic).
/// `alloc` allocates each epoch's memory; `backend` names the run in the report.
pub fn own(
    owner: Agent,
    cfg: &StressConfig,
    backend: &'static str,
    alloc: &dyn Fn(&Agent, &str, u64) -> Result<Memory>,
    holder: &mut dyn Holder,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<StressReport> {
    if !matches!(cfg.policy, dmaplane_rdma::QuiescePolicy::Boundary { .. }) {
        return Err(Error::invalid(
            "stress revoke on the agents",
            "quiesce",
            format!("{:?}", cfg.policy),
            "the application library quiesces at a message boundary: drop --quiesce",
        ));
    }
    let start = Instant::now();
    // The pin registry's count of memory dropped while a software NIC held it: read around the
    // run (the owner's process frees; nothing else of it frees pinned memory).
    let pinned_drops_before = dmaplane_core::fabric::dropped_while_pinned();
    let size = cfg.size as usize;
    let slots = cfg.qps;
    let region = (slots as u64 * u64::from(cfg.size)).next_multiple_of(4096);
    let mut notes = vec![format!(
        "owner {} on {}, holder {}; {} transfers of {} B in flight",
        owner.name(),
        owner.nics().join(", "),
        holder.describe(),
        slots,
        size
    )];

    let mut failures: Vec<String> = Vec::new();
    let (mut corrupt, mut verified, mut post_ack) = (0u64, 0u64, 0u64);
    let (mut latencies, mut timed_out, mut revokes) = (Vec::new(), 0u64, 0u64);
    let mut kept: Vec<Quarantine> = Vec::new();
    let mut stalled = 0u64;
    // Acks after which the holder's memory map was read, and those where it still mapped the
    // freed memory.
    let (mut maps_checked, mut views_after_ack) = (0u64, 0u64);
    // The holder's report when it stopped before the owner went, and why.
    let (mut early, mut stopped_early): (Option<HolderReport>, Option<String>) = (None, None);
    let check_poison = |q: &Quarantine, failures: &mut Vec<String>| -> u64 {
        match q.first_change(POISON) {
            Ok(None) => 0,
            Ok(Some(off)) => {
                failures.push(format!(
                    "{}: byte {off:#x} changed after the ack (poison overwritten)",
                    q.name()
                ));
                1
            }
            Err(e) => {
                failures.push(format!("{}: poison check: {e}", q.name()));
                1
            }
        }
    };
    for epoch in 0..cfg.revokes {
        let name = format!("stress-dst-{epoch}");
        let mem = alloc(&owner, &name, region)?;
        zero(&mem)?;
        let r = owner.register(&mem)?;
        if epoch == 0 {
            let paths: Vec<String> = r.paths().iter().map(|p| format!("{p:?}")).collect();
            notes.push(format!("owner registration: {}", paths.join("; ")));
        }
        // The holder's traffic into it: at least two rounds over every slot.
        let mut last = vec![0u64; slots];
        let mut seen = 0usize;
        let due = Instant::now() + EPOCH_WAIT;
        while seen < 2 * slots {
            match holder.gone() {
                None => {}
                // It stopped because nothing it sends can move: the run ends now, with its
                // report (what broke its queue pairs is in it).
                Some(Ok(r)) if r.stopped.is_some() => {
                    stopped_early = Some(format!(
                        "the holder stopped in epoch {epoch}: {}",
                        r.stopped.as_deref().unwrap_or_default()
                    ));
                    early = Some(r);
                    break;
                }
                Some(Ok(r)) => {
                    return Err(Error::setup(
                        owner.name(),
                        format!("the holder ended during epoch {epoch}: {:?}", r.failures),
                    ));
                }
                Some(Err(why)) => {
                    return Err(Error::setup(
                        owner.name(),
                        format!("the holder ended during epoch {epoch}: {why}"),
                    ));
                }
            }
            let Some(n) = owner.next_notification(Duration::from_millis(50)) else {
                if Instant::now() > due {
                    // Reported, and the run ends here: the holder's report says why.
                    failures.push(format!(
                        "epoch {epoch}: the holder completed {seen} WRITEs in {EPOCH_WAIT:?}, \
                             not {}",
                        2 * slots
                    ));
                    stalled += 1;
                    break;
                }
                continue;
            };
            match parse_note(&n.bytes) {
                Some((e, slot, seq)) if e == epoch && (slot as usize) < slots => {
                    let s = &mut last[slot as usize];
                    *s = (*s).max(seq);
                    seen += 1;
                }
                Some(_) => {} // an earlier epoch's, late
                None => failures.push(format!("a notification that names no block: {:?}", n.bytes)),
            }
        }
        if stalled > 0 || early.is_some() {
            break;
        }
        // Free it under the traffic; keep its bytes.
        let t = Instant::now();
        match mem.free_quarantined(cfg.deadline) {
            Ok((report, q)) => {
                latencies.push(report.elapsed_us as f64);
                revokes += 1;
                // At the ack, no other process maps the memory any more (the shared-memory
                // path's views are dropped before it): seen from outside the holder.
                if let Some(file) = q.file_id() {
                    match holder.mappings_of(file) {
                        Some(Ok(0)) => maps_checked += 1,
                        Some(Ok(n)) => {
                            maps_checked += 1;
                            views_after_ack += 1;
                            failures.push(format!(
                                "epoch {epoch}: the holder still mapped {} ({n} mapping(s) \
                                 of its memfd) after the free's ack: a view outlived the revoke",
                                q.name()
                            ));
                        }
                        Some(Err(why)) => failures.push(format!(
                            "epoch {epoch}: the holder's memory map could not be read: {why}"
                        )),
                        None => {}
                    }
                }
                // Every block whole and at least as new as its last notification.
                let mut buf = vec![0u8; size];
                for (slot, &want) in last.iter().enumerate() {
                    q.read((slot * size) as u64, &mut buf)?;
                    match check_block(&buf, epoch, slot as u32, want) {
                        Ok(()) => verified += size as u64,
                        Err(why) => {
                            corrupt += 1;
                            failures.push(format!("epoch {epoch} slot {slot}: {why}"));
                        }
                    }
                }
                q.fill(POISON)?;
                kept.push(q);
                if kept.len() > KEEP {
                    let old = kept.remove(0);
                    post_ack += check_poison(&old, &mut failures);
                }
            }
            Err(e) => {
                timed_out += 1;
                failures.push(format!(
                    "free of epoch {epoch} after {:?}: {e}",
                    t.elapsed()
                ));
            }
        }
        progress(epoch + 1);
    }
    let cut_off = owner.stats().holders_cut_off;
    // Stop: the holder sees the owner go and reports.
    drop(owner);
    let h = match early {
        Some(h) => h,
        None => holder.report(HOLDER_WAIT),
    };
    for q in &kept {
        post_ack += check_poison(q, &mut failures);
    }
    drop(kept);
    let dropped_while_pinned =
        dmaplane_core::fabric::dropped_while_pinned().saturating_sub(pinned_drops_before);
    failures.extend(h.failures.iter().cloned());
    notes.extend(h.notes.iter().cloned());
    if maps_checked > 0 {
        notes.push(format!(
            "the holder's memory map read at {maps_checked} acks: {views_after_ack} still \
             mapped the freed memory"
        ));
    }
    let ended = h.done + h.revoked + h.failed + h.ended_at_exit;
    notes.push(format!(
        "holder transfers: {} started, {} done, {} ended by a revoke, {} refused at the start \
             (revoked already), {} ended with the owner at exit, {} stalled (counted lost)",
        h.started, h.done, h.revoked, h.refused, h.ended_at_exit, h.stalled
    ));
    Ok(StressReport {
        backend,
        qps: slots,
        depth: 1,
        size: cfg.size,
        posted: h.started,
        completed_ok: h.done,
        flushed: h.revoked,
        failed: h.failed + stalled,
        lost: h.started.saturating_sub(ended).max(h.never_ended),
        corrupt,
        post_ack_accesses: post_ack + h.remote_access_errors,
        zapped_source_accesses: 0,
        bytes_verified: verified,
        completed_before_ack: 0,
        revokes,
        source_revokes: 0,
        revoke_latency_us: Latency::of(latencies),
        revokes_timed_out: timed_out,
        posts_refused: h.refused,
        revokes_asked: cfg.revokes,
        holders_cut_off: cut_off,
        views_after_ack,
        dropped_while_pinned,
        oracle: None,
        inject: cfg.inject,
        seconds: start.elapsed().as_secs_f64(),
        failures,
        stopped_early,
        notes,
    })
}

/// Fill `mem` with zeros (a block never written reads as zeros).
fn zero(mem: &Memory) -> Result<()> {
    let piece = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < mem.len() {
        let n = (mem.len() - off).min(piece.len() as u64) as usize;
        mem.write(off, &piece[..n])?;
        off += n as u64;
    }
    Ok(())
}
