//! The stress on the simulated testbed: the target and the source are revoked under WRITE
//! load, and every DMA the fabric refused because a grant was gone is counted too (an honest
//! importer never even tries).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dmaplane_core::sync::lock;
use std::time::{Duration, Instant};

use dmaplane_core::fabric::{HostMemory, WindowHandle};
use dmaplane_core::{Exporter, ImporterKind, RevokeReport};
use dmaplane_gpu::{DeviceMemory, DmaClient, GpuError};
use dmaplane_rdma::{
    Completion, Fault, ImportOptions, Mr, MrAccess, Qp, QpCaps, RdmaError, RemoteAddr, SendWr, Sge,
    WcStatus,
};

use super::bytes::Bytes;
use super::config::{ExporterKind, Inject, StressConfig};
use super::data_path::DataPath;
use super::exporter::{Revocable, exporter};
use super::fits::{check_fits, mem_available};
use super::report::StressReport;
use super::run_state::{EpochTarget, RunState};
use crate::RawPair;

/// One export of the simulated stress: host B's memory or GPU memory, imported by B's NIC,
/// leased to A.
struct SimExport<'p> {
    epoch: u64,
    probe: &'p Probe,
    // The registration goes before the memory, as an importer's teardown does.
    _mr: Mr,
    mem: Exported,
    /// The memory's window: it stays readable after the export is gone.
    window: WindowHandle,
}

enum Exported {
    Host(HostMemory),
    /// Freed by the revoke; errors other than a timed-out free go to `errors`.
    Gpu {
        mem: Mutex<Option<DeviceMemory>>,
        errors: Arc<Mutex<Vec<String>>>,
    },
}

/// A WRITE that reaches the target after the ack the way a packet still on the wire would: from
/// a third NIC (`nic2`) that holds no lease, so nothing on the sending side stops it and only the
/// owner's NIC can — by finding the region zapped. A region left mapped lets it through to the
/// fabric, where the oracle sees it (and the backstop refuses it).
struct Probe {
    qa: Qp,
    qb: Qp,
    src: Sge,
    // The source's registration, then its memory and the NIC's host (its CQ is the probe's).
    _mr: Mr,
    _mem: HostMemory,
    host: crate::RawHost,
}

impl Probe {
    fn new(w: &RawPair) -> Result<Probe, crate::Error> {
        let host = crate::RawHost::sim(&w.testbed, "straggler-probe", "nic2", "mem0", 16)?;
        let mem = host.memory("straggler-src", 4096)?;
        let mr = host.import(&mem, "straggler-src", ImportOptions::default())?;
        let cqb = w.b.dev.create_cq(16)?;
        let caps = QpCaps {
            max_send_wr: 4,
            max_recv_wr: 1,
            ..QpCaps::default()
        };
        let qa = host.pd.create_qp(&host.cq, &host.cq, caps)?;
        let qb = w.b.pd.create_qp(&cqb, &cqb, caps)?;
        let p = Probe {
            qa,
            qb,
            src: mr.sge(0, 64),
            _mr: mr,
            _mem: mem,
            host,
        };
        p.connect()?;
        Ok(p)
    }

    fn connect(&self) -> Result<(), RdmaError> {
        self.qa.connect(self.qb.endpoint(), MrAccess::ALL)?;
        self.qb.connect(self.qa.endpoint(), MrAccess::ALL)
    }

    /// Send the straggler to `target`; a zapped region refuses it (remote access error).
    fn fire(&self, target: RemoteAddr) -> Result<(), String> {
        self.qa
            .post_send(&[SendWr::write(0, self.src, target)])
            .map_err(|e| format!("straggler not posted: {e}"))?;
        let mut wcs: Vec<Completion> = Vec::new();
        let due = Instant::now() + Duration::from_secs(2);
        while wcs.is_empty() && Instant::now() < due {
            self.host
                .cq
                .poll(&mut wcs, 1)
                .map_err(|e| format!("straggler: {e}"))?;
            if wcs.is_empty() {
                let _ = self.host.cq.wait(Duration::from_millis(1));
            }
        }
        // The refusal breaks the connection (both sides in ERR): start a new one.
        self.connect()
            .map_err(|e| format!("straggler queue pair not reconnected: {e}"))?;
        match wcs.first().map(|c| c.status) {
            Some(WcStatus::RemAccessErr) => Ok(()),
            Some(WcStatus::Success) => Err(format!(
                "a WRITE to rkey {:#x} after the ack landed: the region still translates to \
                 memory the exporter has taken back",
                target.rkey
            )),
            Some(other) => Err(format!("straggler completed with {other}")),
            None => Err("straggler never completed".into()),
        }
    }
}

impl Revocable for SimExport<'_> {
    fn epoch(&self) -> u64 {
        self.epoch
    }
    fn revoke(&self, deadline: Duration) -> RevokeReport {
        match &self.mem {
            Exported::Host(mem) => mem.revoke(deadline),
            Exported::Gpu { mem, errors } => {
                let Some(mem) = lock(mem).take() else {
                    lock(errors).push(format!("epoch {}: freed twice", self.epoch));
                    return not_freed(self.epoch, deadline);
                };
                match mem.free(deadline) {
                    Ok(report) => report,
                    Err(GpuError::FreeTimedOut { report, .. }) => *report,
                    Err(e) => {
                        lock(errors).push(format!("epoch {}: {e}", self.epoch));
                        not_freed(self.epoch, deadline)
                    }
                }
            }
        }
    }
    fn bytes(&self) -> Arc<dyn Bytes> {
        Arc::new(self.window.clone())
    }
    fn after_ack(&self) -> Result<(), String> {
        self.probe.fire(RemoteAddr {
            addr: self._mr.iova(),
            rkey: self._mr.rkey(),
        })
    }
}

/// The report of a free that did not happen (its error is recorded as a failure).
fn not_freed(epoch: u64, deadline: Duration) -> RevokeReport {
    RevokeReport {
        export: format!("stress-gpu-{epoch}"),
        epoch,
        reason: dmaplane_core::revoke::InvalidateReason::Revoke,
        already_revoked: true,
        importers: Vec::new(),
        deadline_us: deadline.as_micros() as u64,
        elapsed_us: 0,
    }
}

/// Run the stress on a simulated testbed of its own: host A writes into memory that B exports
/// (host or GPU memory, [`StressConfig::exporter`]), B revokes it `cfg.revokes` times and A
/// moves its source before every other revoke. `progress` gets the revokes done so far.
pub fn run_sim(
    cfg: &StressConfig,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<StressReport, crate::Error> {
    if cfg.inject == Some(Inject::Rdma(Fault::KeepViews)) {
        return Err(crate::Error::invalid(
            "stress revoke",
            "inject",
            Fault::KeepViews,
            "keep-views breaks the TCP backend's shared-memory path, which the simulated NICs \
             do not have: run it with `stress revoke --backend tcp`",
        ));
    }
    let slots = cfg.qps * cfg.depth;
    let region = slots as u64 * u64::from(cfg.size);
    let region = region.next_multiple_of(4096).max(4096);
    if let Some(avail) = mem_available() {
        check_fits(cfg, avail).map_err(|why| RdmaError::InvalidRegistration {
            field: "depth",
            value: cfg.depth.to_string(),
            why,
        })?;
    }
    let cq_depth = u32::try_from(slots * 2 + 64).unwrap_or(u32::MAX);
    let w = RawPair::sim(cq_depth, cfg.placement.clone())?;
    match cfg.inject {
        // Importer faults on the target's NIC, holder faults on the writer's; a queue-pair
        // quiesce skipped where queue pairs read the revoked memory: the writer's own NIC, whose
        // source memory moves under them.
        Some(Inject::Rdma(f @ (Fault::EarlyFence | Fault::NoZap))) => w.b.dev.inject(Some(f)),
        Some(Inject::Rdma(f @ Fault::NoQpQuiesce)) => w.a.dev.inject(Some(f)),
        Some(Inject::Rdma(f)) => w.a.dev.inject(Some(f)),
        Some(Inject::FreeBeforeAck) => w.testbed.fabric().inject_reuse_before_ack(true),
        Some(Inject::NoBackstop) => {
            w.testbed.fabric().inject_no_backstop(true);
            w.b.dev.inject(Some(Fault::EarlyFence));
            w.a.dev.inject(Some(Fault::IgnoreLeaseRevoke));
        }
        None => {}
    }
    let caps = QpCaps {
        max_send_wr: cfg.depth as u32,
        max_recv_wr: 1,
        ..QpCaps::default()
    };
    let pairs = w.connect(cfg.qps, caps)?;
    let qps: Vec<Qp> = pairs.iter().map(|(a, _)| a.clone()).collect();
    let src_mem = w.a.memory("stress-src", region)?;
    // The source is a dynamic import: every other epoch its memory moves (a revoke of memory
    // the owner's own queue pairs are reading), and the data path registers it again.
    let src = w.a.import(
        &src_mem,
        "src",
        ImportOptions {
            kind: ImporterKind::Dynamic,
            policy: cfg.policy,
            ..ImportOptions::default()
        },
    )?;
    let sh = RunState::default();
    let probe = Probe::new(&w)?;
    let opts = cfg.target_import();
    let current: Mutex<Option<EpochTarget>> = Mutex::new(None);
    let gpu = match cfg.exporter {
        ExporterKind::Host => None,
        ExporterKind::Gpu => Some(w.testbed.gpu("gpu2")?.clone()),
    };
    let gpu_errors = Arc::new(Mutex::new(Vec::new()));
    let export = |epoch: u64| -> Result<SimExport, String> {
        let (mr, mem, window) = match &gpu {
            None => {
                let mem =
                    w.b.memory(&format!("stress-dst-{epoch}"), region)
                        .map_err(|e| e.to_string())?;
                let mr = w.b.import(&mem, "dst", opts).map_err(|e| e.to_string())?;
                let window = mem.window();
                (mr, Exported::Host(mem), window)
            }
            Some(g) => {
                let mem = g
                    .alloc(&format!("stress-gpu-{epoch}"), region)
                    .map_err(|e| e.to_string())?;
                let window = mem
                    .fabric_window()
                    .ok_or("simulated GPU memory without a fabric window")?;
                let nic = w.b.fabric_id().map_err(|e| e.to_string())?;
                let mr =
                    w.b.pd
                        .import("dst", opts, None, |i, a| {
                            mem.attach(i, DmaClient::Fabric(nic), a)
                        })
                        .map_err(|e| e.to_string())?;
                let mem = Exported::Gpu {
                    mem: Mutex::new(Some(mem)),
                    errors: gpu_errors.clone(),
                };
                (mr, mem, window)
            }
        };
        let remote = w.b.dev.lease(&mr, &w.a.dev);
        *lock(&current) = Some(EpochTarget {
            epoch,
            remote,
            mem: Arc::new(window.clone()),
        });
        Ok(SimExport {
            epoch,
            probe: &probe,
            mem,
            window,
            _mr: mr,
        })
    };
    // Before every other revoke of the target, under the same load, the source side: the
    // owner's own queue pairs are reading this memory, and its move must quiesce them (stopped,
    // flushed) before it acks; the oracle judges every DMA on the old window against the fence
    // and the ack. The data path writes nothing into the source meanwhile.
    let move_source = |epoch: u64| {
        if !epoch.is_multiple_of(2) {
            return;
        }
        let moving = lock(&sh.source_moving);
        let moved = src_mem.relocate(cfg.deadline);
        drop(moving);
        match moved {
            Ok(report) => sh.source_revoked(epoch, &report),
            Err(e) => sh.fail(format!("moving the source before revoke {epoch}: {e}")),
        }
    };
    let first = export(0).map_err(|why| RdmaError::InvalidRegistration {
        field: "export",
        value: "0".into(),
        why,
    })?;
    let first_target = lock(&current).clone();
    let Some(first_target) = first_target else {
        return Err(crate::Error::from(RdmaError::InvalidRegistration {
            field: "export",
            value: "0".into(),
            why: "no target was published".into(),
        }));
    };
    let start = Instant::now();
    let data = DataPath {
        cfg,
        qps: &qps,
        cq: &w.a.cq,
        src: &src,
        src_mem: &src_mem,
        src_pd: Some(&w.a.pd),
        drain_limit: Duration::from_secs(10),
    };
    let exporter_done = AtomicBool::new(false);
    let counts = std::thread::scope(|s| {
        let exp = std::thread::Builder::new()
            .name("stress-exporter".into())
            .spawn_scoped(s, || {
                // Set however the exporter ends (a panic included): the data path stops on it.
                let _done = SetOnDrop(&exporter_done);
                w.pin_host_thread();
                // Revoke at a random point once traffic flows to the live export (the jitter is
                // drawn from --seconds / --revokes; by then every queue pair is full).
                exporter(
                    cfg,
                    &sh,
                    first,
                    1,
                    Duration::ZERO,
                    export,
                    move_source,
                    progress,
                )
            })
            .map_err(|e| RdmaError::io("starting the exporter thread", e))?;
        // The data path is the load: at the lowest priority, on the host's CPUs, it takes the
        // CPU time the exporter leaves and never delays the revoke it loads.
        let counts = std::thread::Builder::new()
            .name("stress-data-path".into())
            .spawn_scoped(s, || {
                w.pin_host_thread();
                if cfg.placement.is_some()
                    && let Err(e) = dmaplane_core::cpu::background_current()
                {
                    tracing::warn!(error = %e, "data path left at normal priority");
                }
                data.run(
                    &sh,
                    first_target,
                    |t| {
                        if let Some(c) = lock(&current).as_ref()
                            && c.epoch != t.epoch
                        {
                            *t = c.clone();
                        }
                    },
                    &|| {
                        sh.revokes_done.load(Ordering::Relaxed) >= cfg.revokes
                            || exporter_done.load(Ordering::Relaxed)
                    },
                )
            })
            .map_err(|e| RdmaError::io("starting the data path thread", e))
            .and_then(|t| {
                t.join().unwrap_or_else(|_| {
                    Err(RdmaError::Connection {
                        what: "stress data path".into(),
                        why: "the thread panicked".into(),
                    })
                })
            });
        sh.stop.store(true, Ordering::Relaxed);
        drop(exp.join());
        counts
    })?;
    // Every DMA the fabric refused: the oracle explains those the backstop stopped; any other
    // is a bug of its own.
    let faults = |d| w.testbed.fabric().faults(d).total();
    let fabric_faults = faults(w.a.fabric_id()?)
        + faults(w.b.fabric_id()?)
        + gpu
            .as_ref()
            .and_then(|g| g.backend().fabric_device())
            .map_or(0, faults);
    let verdict = w.testbed.fabric().oracle().verdict();
    let gpu_errors = std::mem::take(&mut *lock(&gpu_errors));
    let mut r = StressReport::from_run("sim", cfg, &counts, &sh, start);
    r.failed += gpu_errors.len() as u64;
    r.failures.extend(gpu_errors);
    if fabric_faults > verdict.blocked_by_backstop {
        r.failures.push(format!(
            "{} DMA fault(s) on the fabric that no revoke explains",
            fabric_faults - verdict.blocked_by_backstop
        ));
        r.failed += 1;
    }
    r.failures
        .extend(verdict.violations.iter().take(5).cloned());
    r.holders_cut_off = w.b.dev.stats().holders_cut_off;
    r.oracle = Some(verdict);
    r.notes.extend({
        let mut n = vec![format!("placement: {}", w.placement_note())];
        if gpu.is_some() {
            n.push(
                "exporter: gpu2 device memory (BAR1, below nic1's switch), freed and \
                 re-allocated on every revoke"
                    .into(),
            );
        }
        n
    });
    Ok(r)
}

struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::test_config as cfg;
    use super::*;

    #[test]
    fn a_violation_with_nothing_left_to_move_stops_the_run_at_once_and_a_clean_run_never_does() {
        // A holder that acknowledges and keeps writing breaks every queue pair at the zapped
        // region: without the stop, each of the 48 remaining revokes waited 5 s for traffic.
        let mut c = cfg(8, 32, 4096);
        c.revokes = 50;
        c.deadline = Duration::from_millis(200);
        c.inject = Some(Inject::Rdma(Fault::AckThenWrite));
        let r = run_sim(&c, &|_| {}).unwrap();
        assert!(!r.is_clean());
        let v = r.violations().join("; ");
        assert!(v.contains("post_ack_accesses"), "{v}");
        assert!(r.revokes < 50, "{v}");
        let why = r.stopped_early.as_deref().unwrap_or_default();
        assert!(why.contains("every queue pair in ERR"), "{v}");
        assert!(v.contains(why), "{v}");
        // The same run without the fault goes through every revoke and never stops itself.
        c.inject = None;
        c.revokes = 5;
        let r = run_sim(&c, &|_| {}).unwrap();
        assert!(r.is_clean(), "{:?}", r.violations());
        assert_eq!((r.revokes, r.stopped_early), (5, None));
        assert_eq!(
            r.source_revokes, 2,
            "the source moved under its own queue pairs too"
        );
    }

    #[test]
    fn a_queue_pair_left_running_under_a_source_move_is_caught_by_the_stress() {
        let mut c = cfg(8, 16, 64 << 10);
        // About one revoke in three moves the source, and a move catches the fault only when
        // a WRITE of the source's own queue pairs is in flight then: enough moves that one
        // does on a loaded machine too (six revokes missed it once in a full test run). The
        // run stops early once the violation is recorded.
        c.revokes = 40;
        c.deadline = Duration::from_millis(200);
        c.inject = Some(Inject::Rdma(Fault::NoQpQuiesce));
        let r = run_sim(&c, &|_| {}).unwrap();
        let v = r.violations().join("; ");
        assert!(r.zapped_source_accesses > 0, "{v}");
        assert!(v.contains("zapped_source_accesses"), "{v}");
    }
}
