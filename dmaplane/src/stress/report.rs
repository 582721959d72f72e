//! What a stress run reports, whatever its backend: the counts of every check, the revoke
//! latencies, and the violations they add up to.

use std::sync::atomic::Ordering;

use std::time::Instant;

use dmaplane_core::fabric::Verdict;
use serde::Serialize;

use super::config::{Inject, StressConfig};
use super::data_path::Counts;
use super::run_state::RunState;

/// Percentiles of a latency, in the unit it was measured in (the report says which).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// The median.
    pub p50: f64,
    /// The 99th percentile.
    pub p99: f64,
    /// The largest.
    pub max: f64,
}

impl Latency {
    /// The percentiles of `v` (all zero when it is empty).
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

/// What a stress run found: the same fields and the same verdict ([`StressReport::violations`])
/// whatever the backend.
#[derive(Debug, Clone, Serialize)]
pub struct StressReport {
    /// `sim` or `verbs`.
    pub backend: &'static str,
    /// Queue pairs the data path used.
    pub qps: usize,
    /// WRITEs in flight per queue pair.
    pub depth: usize,
    /// Bytes per WRITE.
    pub size: u32,
    /// WRITEs posted.
    pub posted: u64,
    /// Completions with success.
    pub completed_ok: u64,
    /// Completions flushed by a quiesce.
    pub flushed: u64,
    /// Completions with any other error.
    pub failed: u64,
    /// Posted requests that never got a completion: must be 0.
    pub lost: u64,
    /// Successful writes whose bytes did not match.
    pub corrupt: u64,
    /// Accesses to revoked memory after its ack (poison overwritten, remote-access errors,
    /// the oracle's count): must be 0.
    pub post_ack_accesses: u64,
    /// Requests that met their own source region zapped (a local protection error): the queue
    /// pair reading it was not quiesced before the zap.
    pub zapped_source_accesses: u64,
    /// Successful WRITEs checked byte for byte against their pattern.
    pub bytes_verified: u64,
    /// Successful WRITEs reaped after their epoch's ack, found covered by the poison written at
    /// the ack, whose copy at the ack was no longer kept (their bytes could not be compared).
    pub completed_before_ack: u64,
    /// Revokes of the target done.
    pub revokes: u64,
    /// Revokes of the source side, besides `revokes`: memory the owner's own queue pairs were
    /// reading (the sim stress moves its source before every other re-export).
    pub source_revokes: u64,
    /// From the revoke's start to its report (every importer's ack), in microseconds.
    pub revoke_latency_us: Latency,
    /// Revokes where an importer missed the deadline.
    pub revokes_timed_out: u64,
    /// Posts refused because the target was revoked (expected, not an error).
    pub posts_refused: u64,
    /// Revokes the run was asked for (`revokes` must reach it).
    pub revokes_asked: u64,
    /// Lease holders the owner had to cut off (they never acknowledged).
    pub holders_cut_off: u64,
    /// Frees after whose ack the holder's process still mapped the freed memory (a view of
    /// the shared-memory path that outlived the revoke), read from its memory map.
    pub views_after_ack: u64,
    /// Memory the owner's process freed while one of its software NICs still had it pinned
    /// (leaked instead): an importer fenced before it let go. Counted by the pin registry.
    pub dropped_while_pinned: u64,
    /// The fabric's oracle (sim only: on verbs the kernel does the DMA and no fabric sees it).
    pub oracle: Option<Verdict>,
    /// The fault injected on purpose, if any.
    pub inject: Option<Inject>,
    /// How long the run took.
    pub seconds: f64,
    /// Every violation and failure found on the way, in words.
    pub failures: Vec<String>,
    /// Why the run stopped before every asked-for revoke ran, when it stopped itself: after a
    /// violation, with nothing left that could move.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_early: Option<String>,
    /// What the run found out on the way (device, negotiated registration, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl StressReport {
    /// What every backend's run reports the same way, from its counts and shared state: the
    /// post-ack accesses it saw on the data path (poison overwritten, remote-access errors) and
    /// the shared failures. Backends add what only they see (fabric faults, device events).
    pub fn from_run(
        backend: &'static str,
        cfg: &StressConfig,
        counts: &Counts,
        sh: &RunState,
        start: Instant,
    ) -> StressReport {
        StressReport {
            backend,
            qps: cfg.qps,
            depth: cfg.depth,
            size: cfg.size,
            posted: counts.posted,
            completed_ok: counts.ok,
            flushed: counts.flushed,
            failed: counts.failed,
            lost: counts.lost,
            corrupt: counts.corrupt,
            post_ack_accesses: sh.post_ack_poison.load(Ordering::Relaxed) + counts.rem_access,
            zapped_source_accesses: counts.loc_prot,
            bytes_verified: counts.bytes,
            completed_before_ack: counts.before_ack,
            revokes: sh.revokes_done.load(Ordering::Relaxed),
            source_revokes: sh.source_revokes.load(Ordering::Relaxed),
            revoke_latency_us: Latency::of(sh.take_latencies()),
            revokes_timed_out: sh.timed_out.load(Ordering::Relaxed),
            posts_refused: counts.refused,
            revokes_asked: cfg.revokes,
            holders_cut_off: 0,
            views_after_ack: 0,
            dropped_while_pinned: 0,
            oracle: None,
            inject: cfg.inject,
            seconds: start.elapsed().as_secs_f64(),
            failures: sh.take_failures(),
            stopped_early: sh.stopped_early(),
            notes: Vec::new(),
        }
    }

    /// Every check that failed, one line each, naming the counter (and, from the oracle, the
    /// importer); empty when the run is clean.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut count = |name: &str, n: u64, what: &str| {
            if n > 0 {
                v.push(format!("{name} = {n}: {what}"));
            }
        };
        count("lost", self.lost, "requests without exactly one completion");
        count(
            "corrupt",
            self.corrupt,
            "successful WRITEs whose bytes differ",
        );
        count("failed", self.failed, "requests or steps that failed");
        count(
            "post_ack_accesses",
            self.post_ack_accesses,
            "poisoned pages overwritten after an ack, or WRITEs refused at a zapped region",
        );
        count(
            "zapped_source_accesses",
            self.zapped_source_accesses,
            "requests that met their own source region zapped: a queue pair left running",
        );
        count(
            "revokes_timed_out",
            self.revokes_timed_out,
            "revokes where an importer missed the deadline",
        );
        count(
            "holders_cut_off",
            self.holders_cut_off,
            "lease holders that never acknowledged a revoke",
        );
        count(
            "dropped_while_pinned",
            self.dropped_while_pinned,
            "memory freed while a software NIC still had it pinned (an importer fenced before it let go; leaked, not freed)",
        );
        count(
            "views_after_ack",
            self.views_after_ack,
            "frees after whose ack the holder's process still mapped the memory",
        );
        if let Some(o) = &self.oracle {
            let culprits = o
                .by_culprit
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            let named = |what: &str| format!("{what} (by {culprits})");
            count(
                "dma_after_fence",
                o.dma_after_fence,
                &named("DMA after the importer's fence"),
            );
            count(
                "dma_after_ack",
                o.dma_after_ack,
                &named("DMA after the exporter's ack"),
            );
            count(
                "blocked_by_backstop",
                o.blocked_by_backstop,
                &named("accesses only step 4 stopped"),
            );
            count(
                "reused_before_ack",
                o.reused_before_ack,
                &named("exporter touched its memory before its ack"),
            );
            if o.acks < self.revokes {
                v.push(format!(
                    "oracle saw {} acks for {} revokes: it did not watch every revoke",
                    o.acks, self.revokes
                ));
            }
        }
        if self.revokes < self.revokes_asked {
            v.push(format!(
                "revokes = {} of {} asked for: the run stopped early{}",
                self.revokes,
                self.revokes_asked,
                self.stopped_early
                    .as_ref()
                    .map(|why| format!(" ({why})"))
                    .unwrap_or_default()
            ));
        }
        if v.is_empty() && !self.failures.is_empty() {
            v.push(format!("{} step(s) failed", self.failures.len()));
        }
        v
    }

    /// Nothing lost, nothing after a fence or an ack, every revoke asked for ran, no step failed.
    pub fn is_clean(&self) -> bool {
        self.violations().is_empty()
    }
}
