//! `dmaplane stress revoke`: RDMA WRITE traffic on many queue pairs while the target memory is
//! revoked and re-exported over and over. Every request must complete exactly once, every
//! successful write must be byte-exact, and nothing may touch memory after a revoke's ack.
//!
//! The two halves (exporter and data path) live in [`crate::traffic`], shared with the verbs
//! backend; this file is the simulated setup. On top of the poison check there, every DMA the
//! fabric refused because a grant was gone is counted (an honest importer never even tries).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmaplane_core::cpu::Placement;
use dmaplane_core::fabric::{HostMemory, WindowHandle};
use dmaplane_core::{Exporter, ImporterKind, RevokeReport};
use dmaplane_gpu::{DeviceMemory, GpuError, Peer, SimGpu};
use dmaplane_rdma::{ImportOptions, Mr, MrAccess, Qp, QpCaps, QuiescePolicy, RdmaError};
use serde::Serialize;

use crate::traffic::{Bytes, Counts, DataPath, Export, Shared, Target, exporter};
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
    /// Simulated backend: NIC engines on cores of their own, the host's threads (exporter and
    /// data path, the latter at the lowest priority) on the rest. None leaves every thread to
    /// the scheduler.
    pub placement: Option<Placement>,
    /// Whose memory is revoked: host memory (moved) or GPU memory (freed and re-allocated).
    pub exporter: ExporterKind,
}

/// The exporter of the simulated stress's target memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExporterKind {
    /// Host memory of host B (`mem1`), revoked and exported anew.
    #[default]
    Host,
    /// Device memory of `gpu2` (below the same switch as host B's `nic1`), freed and
    /// re-allocated: every free is a revoke.
    Gpu,
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
    /// What every backend's run reports the same way, from its counts and shared state: the
    /// post-ack accesses it saw on the data path (poison overwritten, remote-access errors) and
    /// the shared failures. Backends add what only they see (fabric faults, device events).
    pub fn from_run(
        backend: &'static str,
        cfg: &StressConfig,
        counts: &Counts,
        sh: &Shared,
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
            bytes_verified: counts.bytes,
            revokes: sh.revokes_done.load(Ordering::Relaxed),
            revoke_latency_us: Latency::of(sh.take_latencies()),
            revokes_timed_out: sh.timed_out.load(Ordering::Relaxed),
            posts_refused: counts.refused,
            seconds: start.elapsed().as_secs_f64(),
            failures: sh.take_failures(),
            notes: Vec::new(),
        }
    }

    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.post_ack_accesses == 0
            && self.corrupt == 0
            && self.failed == 0
            && self.revokes_timed_out == 0
    }
}

/// One export of the simulated stress: host B's memory or GPU memory, imported by B's NIC,
/// leased to A.
struct SimExport {
    epoch: u64,
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

impl Export for SimExport {
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

pub fn run_sim(
    cfg: &StressConfig,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<StressReport, RdmaError> {
    let slots = cfg.qps * cfg.depth;
    let region = slots as u64 * u64::from(cfg.size);
    let region = region.next_multiple_of(4096).max(4096);
    let cq_depth = u32::try_from(slots * 2 + 64).unwrap_or(u32::MAX);
    let w = World::new(cq_depth, cfg.placement.clone())?;
    let caps = QpCaps {
        max_send_wr: cfg.depth as u32,
        max_recv_wr: 1,
        ..QpCaps::default()
    };
    let pairs = w.connect(cfg.qps, caps)?;
    let qps: Vec<Qp> = pairs.iter().map(|(a, _)| a.clone()).collect();
    let src_mem = w.a.memory(&w.fabric, "stress-src", region)?;
    let src = w.a.import(&src_mem, "src", ImportOptions::default())?;
    let opts = ImportOptions {
        access: MrAccess::LOCAL_WRITE | MrAccess::REMOTE_WRITE | MrAccess::REMOTE_READ,
        kind: ImporterKind::Pinned,
        policy: cfg.policy,
        recover: true,
    };
    let current: Mutex<Option<Target>> = Mutex::new(None);
    let gpu = match cfg.exporter {
        ExporterKind::Host => None,
        ExporterKind::Gpu => Some(
            SimGpu::new(&w.fabric, "gpu2")
                .map_err(|e| RdmaError::NoDevice { why: e.to_string() })?,
        ),
    };
    let gpu_errors = Arc::new(Mutex::new(Vec::new()));
    let export = |epoch: u64| -> Result<SimExport, String> {
        let (mr, mem, window) = match &gpu {
            None => {
                let mem =
                    w.b.memory(&w.fabric, &format!("stress-dst-{epoch}"), region)
                        .map_err(|e| e.to_string())?;
                let mr = w.b.import(&mem, "dst", opts).map_err(|e| e.to_string())?;
                let window = mem.window();
                (mr, Exported::Host(mem), window)
            }
            Some(g) => {
                let mem = g
                    .clone()
                    .into_gpu()
                    .alloc(&format!("stress-gpu-{epoch}"), region)
                    .map_err(|e| e.to_string())?;
                let window = mem
                    .fabric_window()
                    .ok_or("simulated GPU memory without a fabric window")?;
                let nic = w.b.nic_dev;
                let mr =
                    w.b.pd
                        .import("dst", opts, None, |i, a| {
                            mem.attach(i, Peer::Fabric(nic), a)
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
        *lock(&current) = Some(Target {
            epoch,
            remote,
            mem: Arc::new(window.clone()),
        });
        Ok(SimExport {
            epoch,
            mem,
            window,
            _mr: mr,
        })
    };
    let first = export(0).map_err(|why| RdmaError::InvalidRegistration {
        field: "export",
        value: "0".into(),
        why,
    })?;
    let first_target = lock(&current).clone();
    let Some(first_target) = first_target else {
        return Err(RdmaError::InvalidRegistration {
            field: "export",
            value: "0".into(),
            why: "no target was published".into(),
        });
    };
    let sh = Shared::default();
    let start = Instant::now();
    let data = DataPath {
        cfg,
        qps: &qps,
        cq: &w.a.cq,
        src: &src,
        src_mem: &src_mem,
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
                exporter(cfg, &sh, first, 1, Duration::ZERO, export, progress)
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
    // Every DMA the fabric refused because a grant or window was gone: an honest importer
    // never even tries one.
    let faults = |d| w.fabric.faults(d).after_revoke();
    let fabric_faults = faults(w.a.nic_dev)
        + faults(w.b.nic_dev)
        + gpu.as_ref().map_or(0, |g| faults(g.device_id()));
    let gpu_errors = std::mem::take(&mut *lock(&gpu_errors));
    let mut r = StressReport::from_run("sim", cfg, &counts, &sh, start);
    r.post_ack_accesses += fabric_faults;
    r.failed += gpu_errors.len() as u64;
    r.failures.extend(gpu_errors);
    r.notes = {
        let mut n = vec![format!("placement: {}", w.placement_note())];
        if gpu.is_some() {
            n.push(
                "exporter: gpu2 device memory (BAR1, below nic1's switch), freed and \
                 re-allocated on every revoke"
                    .into(),
            );
        }
        n
    };
    Ok(r)
}

struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
