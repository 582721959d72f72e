//! GPU → NIC → NIC → GPU on the simulated testbed: the path each GPU/NIC pair takes, the
//! transfer itself, and a GPU free (a revoke) in the middle of it. Shared by `dmaplane demo`,
//! `dmaplane bench p2p` and the tests.
//!
//! Each side of a flow is either **direct** — the NIC registers the GPU's memory through BAR1,
//! zero-copy — or **staged**: the NIC registers a host buffer on the GPU's NUMA node and the
//! GPU's copy engine moves the bytes between it and device memory. Which one is decided by
//! negotiation between the allocation's offers for that NIC (by PCIe route) and the NIC's
//! accepts, never guessed; a staged side carries the refusal that made it so.

use std::time::{Duration, Instant};

use dmaplane_core::cpu::Placement;
use dmaplane_core::fabric::{DeviceId, Fabric, HostMemory, WindowHandle};
use dmaplane_core::topology::builtin;
use dmaplane_core::{ImporterKind, Route};
use dmaplane_gpu::{DeviceMemory, Gpu, GpuError, Loc, Peer, PeerMemory, SimGpu};
use dmaplane_rdma::{
    Completion, Cq, Device, ImportOptions, Mr, MrAccess, Pd, Qp, QpCaps, QpState, RdmaError,
    RemoteMr, SendWr, SimNetwork, WcStatus,
};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error(transparent)]
    Rdma(#[from] RdmaError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("{0}")]
    Flow(String),
    /// The flow failed after traffic started: what was counted up to then.
    #[error(
        "{flow}: {source} — {} posted, {} ok, {} flushed, lost = {} (posted without a \
         completion when it stopped)",
        tally.posted, tally.ok, tally.flushed, tally.lost()
    )]
    Traffic {
        flow: String,
        tally: Tally,
        source: Box<P2pError>,
    },
}

/// A flow's requests as counted from its completions, on every exit path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub posted: u64,
    pub ok: u64,
    pub flushed: u64,
}

impl Tally {
    /// Requests posted that produced no completion (yet): 0 on a clean flow.
    pub fn lost(&self) -> u64 {
        self.posted.saturating_sub(self.ok + self.flushed)
    }
}

pub type Result<T> = std::result::Result<T, P2pError>;

fn fail<T>(what: impl Into<String>) -> Result<T> {
    Err(P2pError::Flow(what.into()))
}

/// A NIC of the testbed with a protection domain and one completion queue.
#[derive(Debug)]
struct Nic {
    name: String,
    id: DeviceId,
    dev: Device,
    pd: Pd,
    cq: Cq,
}

/// The built-in testbed with every NIC and GPU of it live.
#[derive(Debug)]
pub struct P2pWorld {
    pub fabric: Fabric,
    pub net: SimNetwork,
    nics: Vec<Nic>,
    gpus: Vec<Gpu>,
    placement: Option<Placement>,
}

/// One transfer: device memory of `src_gpu`, sent by `src_nic`, received by `dst_nic` into
/// device memory of `dst_gpu`.
#[derive(Debug, Clone, Serialize)]
pub struct Flow {
    pub src_gpu: String,
    pub src_nic: String,
    pub dst_nic: String,
    pub dst_gpu: String,
}

impl Flow {
    pub fn new(src_gpu: &str, src_nic: &str, dst_nic: &str, dst_gpu: &str) -> Flow {
        Flow {
            src_gpu: src_gpu.into(),
            src_nic: src_nic.into(),
            dst_nic: dst_nic.into(),
            dst_gpu: dst_gpu.into(),
        }
    }
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} -> {} => {} -> {}",
            self.src_gpu, self.src_nic, self.dst_nic, self.dst_gpu
        )
    }
}

/// One flow per route on the testbed, both ends on that route:
/// bus-addr (GPU and NIC below one switch), thru-host-bridge (root ports of an allow-listed
/// host bridge), not-supported (GPU and NIC on different sockets).
pub fn testbed_flows() -> Vec<(Route, Flow)> {
    vec![
        (Route::BusAddr, Flow::new("gpu0", "nic0", "nic1", "gpu2")),
        (
            Route::ThruHostBridge,
            Flow::new("gpu1", "nic0", "nic2", "gpu2"),
        ),
        (
            Route::NotSupported,
            Flow::new("gpu2", "nic0", "nic1", "gpu0"),
        ),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    /// The NIC registers the GPU's memory: zero-copy.
    Direct,
    /// Through a host buffer and the GPU's copy engine.
    Staged,
}

/// The path one GPU/NIC pair took, and why.
#[derive(Debug, Clone, Serialize)]
pub struct SidePath {
    pub gpu: String,
    pub nic: String,
    pub route: Route,
    pub path: PathKind,
    /// The negotiated registration (direct) or the refusal (staged).
    pub why: String,
    /// The host buffer of a staged side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staging: Option<String>,
}

#[derive(Debug, Clone)]
pub struct FlowOptions {
    pub size: u64,
    pub chunk: u64,
    /// WRITEs in flight at once.
    pub depth: u32,
    /// Free the receiving GPU's memory after this many WRITEs completed.
    pub free_after: Option<u64>,
    /// Stage both sides even where the route allows direct.
    pub force_staged: bool,
}

/// What the free in the middle of a flow did.
#[derive(Debug, Clone, Serialize)]
pub struct FreeReport {
    pub after_completions: u64,
    pub epoch_freed: u64,
    pub latency_us: u64,
    pub importers_quiesced: usize,
    /// WRITEs in flight that the free flushed (each completed exactly once, with an error).
    pub flushed: u64,
    /// What a post to the freed memory's rkey got.
    pub post_after_free: String,
    pub qp_state_after: String,
    /// Chunks sent again into the new allocation (those that had landed in the freed memory
    /// and those flushed).
    pub resent: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlowReport {
    pub flow: Flow,
    pub src: SidePath,
    pub dst: SidePath,
    pub size: u64,
    pub chunk: u64,
    /// Copies each byte costs on this path: the NIC's, plus one per staged side.
    pub copies: u32,
    pub posted: u64,
    pub completed_ok: u64,
    pub flushed: u64,
    /// WRITEs that never completed: must be 0.
    pub lost: u64,
    /// DMA that touched freed memory after the free's ack (fabric faults against the NICs and
    /// GPUs, and overwritten poison): must be 0.
    pub post_ack_accesses: u64,
    pub bytes_verified: u64,
    pub seconds: f64,
    pub bytes_per_sec: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free: Option<FreeReport>,
}

impl FlowReport {
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.post_ack_accesses == 0 && self.bytes_verified == self.size
    }
}

impl P2pWorld {
    /// With a `placement`, the NIC engines run on its engine CPUs and
    /// [`P2pWorld::pin_host_thread`] keeps the host's threads (and the GPUs' copy engines,
    /// which copy in the caller's thread) on the others.
    pub fn new(cq_depth: u32, placement: Option<Placement>) -> Result<P2pWorld> {
        let fabric = Fabric::with_topology(builtin::testbed());
        let engines = placement.as_ref().map_or(&[][..], |p| &p.engines[..]);
        let net = SimNetwork::new(&fabric).with_engine_cpus(engines);
        let gpus = SimGpu::all(&fabric)?;
        let mut nics = Vec::new();
        let names: Vec<String> = fabric
            .topology()
            .map(|t| {
                t.devices_of_kind(dmaplane_core::topology::DeviceKind::Nic)
                    .map(|d| d.id.clone())
                    .collect()
            })
            .unwrap_or_default();
        for name in names {
            let sim = net.nic(&name)?;
            let id = sim.device_id();
            let dev = Device::new(sim);
            let pd = dev.alloc_pd()?;
            let cq = dev.create_cq(cq_depth)?;
            nics.push(Nic {
                name,
                id,
                dev,
                pd,
                cq,
            });
        }
        Ok(P2pWorld {
            fabric,
            net,
            nics,
            gpus,
            placement,
        })
    }

    /// Keep the calling thread off the NIC engines' CPUs (nothing without a placement).
    pub fn pin_host_thread(&self) {
        crate::world::pin_host_thread(self.placement.as_ref());
    }

    /// How the run was placed, for reports.
    pub fn placement_note(&self) -> String {
        crate::world::placement_note(self.placement.as_ref())
    }

    fn nic(&self, name: &str) -> Result<&Nic> {
        match self.nics.iter().find(|n| n.name == name) {
            Some(n) => Ok(n),
            None => fail(format!(
                "no NIC {name:?} on the testbed (NICs: {})",
                self.nics
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    pub fn gpu(&self, name: &str) -> Result<&Gpu> {
        match self.gpus.iter().find(|g| g.name() == name) {
            Some(g) => Ok(g),
            None => fail(format!(
                "no GPU {name:?} on the testbed (GPUs: {})",
                self.gpus
                    .iter()
                    .map(|g| g.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    fn device(&self, name: &str) -> Result<DeviceId> {
        self.fabric
            .device(name)
            .map_err(|e| P2pError::Flow(e.to_string()))
    }

    /// The path `gpu`'s memory would take to `nic`, decided by negotiation.
    pub fn path(&self, gpu: &str, nic: &str) -> Result<SidePath> {
        let probe = self.gpu(gpu)?.alloc("path-probe", 4096)?;
        self.decide(&probe, gpu, self.nic(nic)?, false)
    }

    fn decide(&self, mem: &DeviceMemory, gpu: &str, nic: &Nic, staged: bool) -> Result<SidePath> {
        let route = self.fabric.route(self.device(gpu)?, nic.id);
        let accepts = nic.dev.backend().accepts();
        let decision = if staged {
            Err("staging forced".to_string())
        } else {
            mem.would_negotiate(Peer::Fabric(nic.id), &nic.name, &accepts)
                .map_err(|e| e.to_string())
        };
        let (path, why) = match decision {
            Ok(summary) => (PathKind::Direct, summary),
            Err(why) => (PathKind::Staged, why),
        };
        Ok(SidePath {
            gpu: gpu.into(),
            nic: nic.name.clone(),
            route,
            path,
            why,
            staging: None,
        })
    }

    /// GPU memory on one end of a flow and the NIC's registration of it (or of its staging).
    fn side(
        &self,
        gpu_name: &str,
        nic_name: &str,
        name: &str,
        size: u64,
        opts: ImportOptions,
        staged: bool,
    ) -> Result<Side> {
        let gpu = self.gpu(gpu_name)?.clone();
        let nic = self.nic(nic_name)?;
        let mem = gpu.alloc(name, size)?;
        let mut path = self.decide(&mem, gpu_name, nic, staged)?;
        if path.path == PathKind::Direct {
            let mr = nic.pd.import(name, opts, None, |i, a| {
                mem.attach(i, Peer::Fabric(nic.id), a)
            })?;
            if let Some(n) = mr.negotiation() {
                path.why = n;
            }
            return Ok(Side {
                mr,
                stage: None,
                mem: Some(mem),
                gpu,
                path,
            });
        }
        // Staged: a host buffer on the GPU's NUMA node, registered by the NIC and imported by
        // the GPU's copy engine.
        let topo = self
            .fabric
            .topology()
            .ok_or_else(|| P2pError::Flow("the fabric has no topology".into()))?;
        let numa = topo
            .numa_of(gpu_name)
            .map_err(|e| P2pError::Flow(e.to_string()))?;
        let host_dev = match topo.host_memory_for_numa(numa) {
            Some(d) => self.device(&d.id)?,
            None => {
                return fail(format!(
                    "no host memory on NUMA node {numa} to stage {name}"
                ));
            }
        };
        let stage_name = format!("{name}-staging");
        let host = HostMemory::new(&self.fabric, host_dev, &stage_name, size)
            .map_err(|e| P2pError::Flow(format!("staging buffer for {name}: {e}")))?;
        // Staging buffers are pinned host memory: resident before the transfer starts.
        host.window().memory().fill(0);
        path.staging = Some(format!(
            "{} on {}",
            stage_name,
            self.fabric.device_name(host_dev)
        ));
        let mr = nic
            .pd
            .import(&stage_name, opts, None, |i, a| host.attach(i, nic.id, a))?;
        let gdev = self.device(gpu_name)?;
        let view = gpu.import(&stage_name, ImporterKind::Pinned, |i, a| {
            host.attach(i, gdev, a)
        })?;
        Ok(Side {
            mr,
            stage: Some(Stage { view, _host: host }),
            mem: Some(mem),
            gpu,
            path,
        })
    }

    /// DMA the fabric refused because a grant or window was gone, against every NIC and GPU.
    fn late_faults(&self) -> u64 {
        let mut n = 0;
        for d in self
            .nics
            .iter()
            .map(|n| n.id)
            .chain(self.gpus.iter().filter_map(|g| g.backend().fabric_device()))
        {
            n += self.fabric.faults(d).after_revoke();
        }
        n
    }
}

#[derive(Debug)]
struct Stage {
    view: PeerMemory,
    _host: HostMemory,
}

/// One end of a flow. Field order is drop order: registrations before the memory.
#[derive(Debug)]
struct Side {
    mr: Mr,
    stage: Option<Stage>,
    mem: Option<DeviceMemory>,
    gpu: Gpu,
    path: SidePath,
}

impl Side {
    fn mem(&self) -> Result<&DeviceMemory> {
        self.mem
            .as_ref()
            .ok_or_else(|| P2pError::Flow("the allocation was freed".into()))
    }

    /// Source side: make chunk `off` ready for the NIC (a copy to staging, or nothing).
    fn before_send(&self, off: u64, len: u64) -> Result<()> {
        if let Some(s) = &self.stage {
            self.gpu
                .copy(Loc::Mem(self.mem()?, off), Loc::Peer(&s.view, off), len)?;
        }
        Ok(())
    }

    /// Receiving side: move a landed chunk into device memory (a copy from staging, or nothing).
    fn after_receive(&self, off: u64, len: u64) -> Result<()> {
        if let Some(s) = &self.stage {
            self.gpu
                .copy(Loc::Peer(&s.view, off), Loc::Mem(self.mem()?, off), len)?;
        }
        Ok(())
    }
}

/// The pattern byte at `off` (position-dependent, so a misplaced chunk shows).
pub fn pattern(off: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = off + i as u64;
        *b = (x ^ (x >> 8) ^ (x >> 16) ^ 0x5a) as u8;
    }
}

const PIECE: u64 = 1 << 20;

fn fill(mem: &DeviceMemory) -> Result<()> {
    let mut buf = vec![0u8; PIECE as usize];
    let mut off = 0;
    while off < mem.len() {
        let n = (mem.len() - off).min(PIECE) as usize;
        pattern(off, &mut buf[..n]);
        mem.write(off, &buf[..n])?;
        off += n as u64;
    }
    Ok(())
}

/// Bytes of `mem` equal to the pattern, from the start (stops at the first difference).
fn verify(mem: &DeviceMemory) -> Result<u64> {
    let (mut got, mut want) = (vec![0u8; PIECE as usize], vec![0u8; PIECE as usize]);
    let mut off = 0;
    while off < mem.len() {
        let n = (mem.len() - off).min(PIECE) as usize;
        pattern(off, &mut want[..n]);
        mem.read(off, &mut got[..n])?;
        if got[..n] != want[..n] {
            return Ok(off);
        }
        off += n as u64;
    }
    Ok(mem.len())
}

const POISON: u8 = 0xee;

fn poisoned(w: &WindowHandle) -> bool {
    let mut buf = vec![0u8; PIECE as usize];
    let mut off = 0;
    while off < w.len() {
        let n = (w.len() - off).min(PIECE) as usize;
        if !w.memory().read(off, &mut buf[..n]) || buf[..n].iter().any(|&b| b != POISON) {
            return false;
        }
        off += n as u64;
    }
    true
}

fn check_options(o: &FlowOptions) -> Result<u32> {
    if o.chunk == 0 || o.size == 0 || !o.size.is_multiple_of(o.chunk) {
        return fail(format!(
            "size {} is not a whole number of {}-byte chunks",
            o.size, o.chunk
        ));
    }
    if o.depth == 0 {
        return fail("depth 0: at least one WRITE must be in flight");
    }
    u32::try_from(o.chunk).map_err(|_| P2pError::Flow(format!("chunk {} is over 4 GiB", o.chunk)))
}

/// Run one flow: fill the source GPU's memory, move it with RDMA WRITE (staging where a side
/// must), optionally free the receiving GPU's memory part-way, and verify every byte.
pub fn run_flow(w: &P2pWorld, flow: &Flow, o: &FlowOptions) -> Result<FlowReport> {
    let chunk32 = check_options(o)?;
    let chunks = o.size / o.chunk;
    let local = ImportOptions {
        access: MrAccess::LOCAL_WRITE,
        ..ImportOptions::default()
    };
    // The default policy: the free stops the receiving NIC's QPs at a message boundary, so a
    // 1 MiB WRITE under way lands whole and never breaks the connection.
    let remote = ImportOptions {
        access: MrAccess::ALL,
        kind: ImporterKind::Pinned,
        ..ImportOptions::default()
    };
    let tag = format!("{}-{}", flow.src_gpu, flow.dst_gpu);
    let src = w.side(
        &flow.src_gpu,
        &flow.src_nic,
        &format!("{tag}-src"),
        o.size,
        local,
        o.force_staged,
    )?;
    let mut dst = w.side(
        &flow.dst_gpu,
        &flow.dst_nic,
        &format!("{tag}-dst"),
        o.size,
        remote,
        o.force_staged,
    )?;
    fill(src.mem()?)?;
    let (sn, dn) = (w.nic(&flow.src_nic)?, w.nic(&flow.dst_nic)?);
    let caps = QpCaps {
        max_send_wr: o.depth,
        max_recv_wr: 1,
        ..QpCaps::default()
    };
    let qa = sn.pd.create_qp(&sn.cq, &sn.cq, caps)?;
    let qb = dn.pd.create_qp(&dn.cq, &dn.cq, caps)?;
    qa.connect(qb.endpoint(), MrAccess::ALL)?;
    qb.connect(qa.endpoint(), MrAccess::ALL)?;
    let mut lease = dn.dev.lease(&dst.mr, &sn.dev);
    let faults_before = w.late_faults();

    let post = |qp: &Qp, lease: &RemoteMr, i: u64| -> Result<()> {
        let off = i * o.chunk;
        src.before_send(off, o.chunk)?;
        qp.post_send(&[SendWr::write(i, src.mr.sge(off, chunk32), lease.at(off))])?;
        Ok(())
    };
    let mut t = Tally::default();
    let traffic = (|| -> Result<FlowReport> {
        let start = Instant::now();
        let (mut next, mut outstanding) = (0u64, 0u64);
        let mut landed = 0u64;
        let mut free: Option<FreeReport> = None;
        let mut retired: Option<WindowHandle> = None;
        let mut wcs: Vec<Completion> = Vec::new();
        let due = Instant::now() + Duration::from_secs(60);
        let mut idle = Idle::default();
        while landed < chunks {
            while outstanding < u64::from(o.depth) && next < chunks {
                post(&qa, &lease, next)?;
                next += 1;
                outstanding += 1;
                t.posted += 1;
            }
            wcs.clear();
            // With a free pending, reap no further than its point, so it lands mid-traffic.
            let max = match o.free_after {
                Some(n) if free.is_none() => n.saturating_sub(landed).clamp(1, 256) as usize,
                _ => 256,
            };
            if sn.cq.poll(&mut wcs, max)? == 0 {
                if Instant::now() > due {
                    return fail(format!(
                        "{flow}: {outstanding} WRITE(s) still outstanding after 60 s"
                    ));
                }
                idle.wait(&sn.cq)?;
                continue;
            }
            idle.reset();
            for wc in &wcs {
                outstanding -= 1;
                match wc.status {
                    WcStatus::Success => {
                        t.ok += 1;
                        dst.after_receive(wc.wr_id * o.chunk, o.chunk)?;
                        landed += 1;
                    }
                    WcStatus::WrFlushErr => t.flushed += 1,
                    other => {
                        return fail(format!("{flow}: WRITE {} completed with {other}", wc.wr_id));
                    }
                }
            }
            if free.is_none() && o.free_after.is_some_and(|n| landed >= n) {
                let (report, window) =
                    free_mid_flow(w, &qa, &mut dst, &lease, &src, chunk32, landed)?;
                // Wait for what the free flushed, then receive everything again into new memory.
                let mut flushed_here = 0;
                while outstanding > 0 {
                    wcs.clear();
                    if sn.cq.poll(&mut wcs, 256)? == 0 {
                        if Instant::now() > due {
                            return fail(format!("{flow}: flushed WRITEs never completed"));
                        }
                        idle.wait(&sn.cq)?;
                    }
                    for wc in &wcs {
                        outstanding -= 1;
                        match wc.status {
                            WcStatus::Success => t.ok += 1,
                            WcStatus::WrFlushErr => flushed_here += 1,
                            other => {
                                return fail(format!(
                                    "{flow}: WRITE {} completed with {other} during the free",
                                    wc.wr_id
                                ));
                            }
                        }
                    }
                }
                t.flushed += flushed_here;
                let qp_state_after = wait_rts(&qa)?;
                dst = w.side(
                    &flow.dst_gpu,
                    &flow.dst_nic,
                    &format!("{tag}-dst-realloc"),
                    o.size,
                    remote,
                    o.force_staged,
                )?;
                lease = dn.dev.lease(&dst.mr, &sn.dev);
                free = Some(FreeReport {
                    flushed: flushed_here,
                    qp_state_after,
                    resent: next,
                    ..report
                });
                retired = Some(window);
                next = 0;
                landed = 0;
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        let bytes_verified = verify(dst.mem()?)?;
        let mut post_ack = w.late_faults() - faults_before;
        if let Some(win) = &retired
            && !poisoned(win)
        {
            post_ack += 1;
        }
        let copies = 1 + [&src.path, &dst.path]
            .iter()
            .filter(|p| p.path == PathKind::Staged)
            .count() as u32;
        Ok(FlowReport {
            flow: flow.clone(),
            src: src.path.clone(),
            dst: dst.path.clone(),
            size: o.size,
            chunk: o.chunk,
            copies,
            posted: t.posted,
            completed_ok: t.ok,
            flushed: t.flushed,
            lost: t.lost(),
            post_ack_accesses: post_ack,
            bytes_verified,
            seconds,
            bytes_per_sec: if free.is_none() {
                o.size as f64 / seconds
            } else {
                0.0
            },
            free,
        })
    })();
    traffic.map_err(|e| P2pError::Traffic {
        flow: flow.to_string(),
        tally: t,
        source: Box::new(e),
    })
}

/// Polls that found the completion queue empty. A poller spins first, as RDMA applications
/// do (perftest's default), because a sleep-and-wake costs tens of microseconds per WRITE;
/// then it blocks, so a stalled flow does not burn a core.
#[derive(Debug, Default)]
struct Idle(u32);

impl Idle {
    const SPINS: u32 = 4096;

    fn wait(&mut self, cq: &Cq) -> Result<()> {
        self.0 += 1;
        if self.0 < Self::SPINS {
            std::hint::spin_loop();
            if self.0.is_multiple_of(64) {
                std::thread::yield_now();
            }
            return Ok(());
        }
        cq.wait(Duration::from_millis(10))?;
        Ok(())
    }

    fn reset(&mut self) {
        self.0 = 0;
    }
}

/// Free the receiving GPU's memory under traffic; returns the report (flush counts filled in
/// by the caller) and the freed memory's window, poisoned after the ack.
fn free_mid_flow(
    w: &P2pWorld,
    qa: &Qp,
    dst: &mut Side,
    lease: &RemoteMr,
    src: &Side,
    chunk32: u32,
    landed: u64,
) -> Result<(FreeReport, WindowHandle)> {
    let Some(mem) = dst.mem.take() else {
        return fail("the receiving allocation is already freed");
    };
    let window = mem
        .fabric_window()
        .ok_or_else(|| P2pError::Flow("simulated memory without a window".into()))?;
    let epoch_freed = mem.epoch();
    let report = mem.free(Duration::from_secs(1))?;
    // From the ack on nothing may touch it: poison it, and check at the end it is untouched.
    window.memory().fill(POISON);
    let post_after_free =
        match qa.post_send(&[SendWr::write(u64::MAX, src.mr.sge(0, chunk32), lease.at(0))]) {
            Err(e) => e.to_string(),
            Ok(()) => return fail("a WRITE to the freed memory's rkey was accepted"),
        };
    let _ = w;
    Ok((
        FreeReport {
            after_completions: landed,
            epoch_freed,
            latency_us: report.elapsed_us,
            importers_quiesced: report.importers.len(),
            flushed: 0,
            post_after_free,
            qp_state_after: String::new(),
            resent: 0,
        },
        window,
    ))
}

/// The QP comes back to RTS once its flushed requests are reaped.
fn wait_rts(qp: &Qp) -> Result<String> {
    let due = Instant::now() + Duration::from_secs(5);
    while qp.state() != QpState::Rts {
        if Instant::now() > due {
            return fail(format!(
                "the queue pair stayed in {} after the free",
                qp.state()
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(qp.state().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(free_after: Option<u64>, force_staged: bool) -> FlowOptions {
        FlowOptions {
            size: 4 << 20,
            chunk: 256 << 10,
            depth: 8,
            free_after,
            force_staged,
        }
    }

    #[test]
    fn every_route_moves_every_byte_on_the_path_it_must() -> Result<()> {
        let w = P2pWorld::new(1024, None)?;
        for (route, flow) in testbed_flows() {
            let r = run_flow(&w, &flow, &opts(None, false))?;
            assert!(r.is_clean(), "{r:?}");
            assert_eq!(r.src.route, route);
            let want = if route == Route::NotSupported {
                PathKind::Staged
            } else {
                PathKind::Direct
            };
            assert_eq!((r.src.path, r.dst.path), (want, want), "{r:?}");
            if want == PathKind::Staged {
                assert!(r.src.why.contains("route"), "{}", r.src.why);
                assert!(r.src.staging.is_some());
            }
        }
        Ok(())
    }

    #[test]
    fn a_free_under_traffic_loses_nothing_and_nothing_lands_after_it() -> Result<()> {
        let w = P2pWorld::new(1024, None)?;
        let (_, flow) = &testbed_flows()[0];
        let r = run_flow(&w, flow, &opts(Some(4), false))?;
        assert!(r.is_clean(), "{r:?}");
        let f = r.free.as_ref().expect("the free happened");
        assert_eq!(f.importers_quiesced, 1);
        assert!(
            f.post_after_free.contains("revoked"),
            "{}",
            f.post_after_free
        );
        assert_eq!(r.posted, r.completed_ok + r.flushed);
        Ok(())
    }

    /// A flow that stops on an error still reports what its completions counted: the
    /// requests posted without one are `lost`, never a fixed 0.
    #[test]
    fn a_failed_flow_names_what_it_counted() {
        let t = Tally {
            posted: 12,
            ok: 7,
            flushed: 2,
        };
        assert_eq!(t.lost(), 3);
        let e = P2pError::Traffic {
            flow: "gpu0 → gpu1".into(),
            tally: t,
            source: Box::new(P2pError::Flow("WRITE 9 completed with RemAccessErr".into())),
        };
        let s = e.to_string();
        assert!(
            s.contains("12 posted, 7 ok, 2 flushed, lost = 3") && s.contains("RemAccessErr"),
            "{s}"
        );
    }

    #[test]
    fn staging_can_be_forced_on_a_direct_route() -> Result<()> {
        let w = P2pWorld::new(1024, None)?;
        let (_, flow) = &testbed_flows()[0];
        let r = run_flow(&w, flow, &opts(None, true))?;
        assert!(r.is_clean(), "{r:?}");
        assert_eq!(r.copies, 3);
        Ok(())
    }
}

/// One row of `dmaplane bench p2p`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub route: Route,
    pub path: String,
    pub flow: String,
    /// Copies each byte costs (the NIC's, plus one per staged side).
    pub copies: u32,
    pub gib_s: f64,
    /// Bandwidth / memcpy bandwidth of the same run.
    pub of_memcpy: f64,
    /// Bandwidth / (memcpy bandwidth / copies): 1.0 means the path costs exactly its copies.
    pub of_copies: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub size: u64,
    pub chunk: u64,
    /// The reference: `size` bytes memcpy'd in `chunk` pieces between fresh allocations of the
    /// flow's GPUs, the source just written, on the NIC engines' CPUs — the state a flow's
    /// buffers are in and the copies its NIC makes. Best of the run.
    pub memcpy_gib_s: f64,
    /// memcpy repeated over the same two host buffers for 50 ms (cache-hot for sizes the
    /// last-level cache holds). Shown for context, not the reference: a flow moves each byte once.
    pub memcpy_hot_gib_s: f64,
    /// Where the NIC engines and the host thread ran.
    pub placement: String,
    pub rows: Vec<BenchRow>,
}

const GIB: f64 = (1u64 << 30) as f64;

/// The memcpy a flow is measured against: `size` bytes between fresh private buffers, touched
/// once as the simulated GPU touches its allocations, with a plain memcpy (the fabric's own
/// copies are byte-wise atomic: this is what they cost against), copied in `chunk` pieces as the
/// NIC moves them (one memcpy of 64 MiB would stream with
/// non-temporal stores a 4 MiB WRITE never gets), on the NIC engines' CPUs. Bytes per second.
fn memcpy_once(w: &P2pWorld, flow: &Flow, size: u64, chunk: u64) -> Result<f64> {
    let _ = flow;
    let n = usize::try_from(size).map_err(|_| P2pError::Flow(format!("size {size} too large")))?;
    // Fresh private memory, as a flow gets fresh GPU memory: a plain memcpy, not the fabric's
    // (byte-wise atomic) copy — the reference is what the machine can do.
    // Touched once, as the simulated GPU faults its allocations in at allocation time.
    let mut sw = vec![0x5au8; n];
    let mut dw = vec![0xa5u8; n];
    for (i, b) in sw.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31);
    }
    let piece = usize::try_from(chunk).unwrap_or(n).max(1);
    // On the CPUs the simulated NICs copy on: the flow's copy reads bytes the host thread just
    // wrote from another core's cache, and so must the reference.
    let engines = w.placement.as_ref().map(|p| p.engines.clone());
    let secs = std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(cpus) = &engines {
                crate::world::pin_thread(cpus, "memcpy reference");
            }
            let t = Instant::now();
            let mut off = 0;
            while off < n {
                let k = piece.min(n - off);
                dw[off..off + k].copy_from_slice(&sw[off..off + k]);
                off += k;
            }
            std::hint::black_box(&dw);
            t.elapsed().as_secs_f64()
        })
        .join()
    })
    .map_err(|_| P2pError::Flow("the memcpy reference thread panicked".into()))?;
    Ok(size as f64 / secs.max(1e-9))
}

/// Simulated GPU→NIC→NIC→GPU throughput for each route, direct and staged, against memcpy of
/// the same transfer size measured in the same run. Each figure is the best of `reps` runs.
pub fn bench(
    size: u64,
    chunk: u64,
    reps: u32,
    placement: Option<Placement>,
) -> Result<BenchReport> {
    // In a thread of its own, so pinning it to the host CPUs does not outlive the run.
    std::thread::scope(|s| {
        s.spawn(|| bench_pinned(size, chunk, reps, placement))
            .join()
            .unwrap_or_else(|_| fail("the benchmark thread panicked"))
    })
}

fn bench_pinned(
    size: u64,
    chunk: u64,
    reps: u32,
    placement: Option<Placement>,
) -> Result<BenchReport> {
    let chunks = size / chunk.max(1);
    let depth = u32::try_from(chunks.clamp(1, 64)).unwrap_or(64);
    let w = P2pWorld::new(depth * 4 + 64, placement)?;
    w.pin_host_thread();
    let host = w.device("mem0")?;
    let mk = |n: &str| {
        HostMemory::new(&w.fabric, host, n, size)
            .map_err(|e| P2pError::Flow(format!("memcpy reference buffer: {e}")))
    };
    let (a, b) = (mk("memcpy-src")?, mk("memcpy-dst")?);
    a.window().memory().fill(1);
    b.window().memory().fill(2);
    let mut rows = Vec::new();
    let (mut memcpy, mut memcpy_hot): (f64, f64) = (0.0, 0.0);
    for (route, flow) in testbed_flows() {
        for staged in [false, true] {
            if staged && route == Route::NotSupported {
                continue; // the direct run of this route is already staged
            }
            let o = FlowOptions {
                size,
                chunk,
                depth,
                free_after: None,
                force_staged: staged,
            };
            let mut best: Option<FlowReport> = None;
            for _ in 0..reps.max(1) {
                // Both references measured between the runs, so they see the same machine state.
                memcpy = memcpy.max(memcpy_once(&w, &flow, size, chunk)?);
                let (ps, mut pd) = crate::rdma::private_pair(size);
                memcpy_hot = memcpy_hot.max(crate::rdma::memcpy_bw(
                    &ps,
                    &mut pd,
                    size,
                    Duration::from_millis(50),
                ));
                let r = run_flow(&w, &flow, &o)?;
                if !r.is_clean() {
                    return fail(format!(
                        "{flow}: the benchmark transfer did not verify: {r:?}"
                    ));
                }
                if best
                    .as_ref()
                    .is_none_or(|b| r.bytes_per_sec > b.bytes_per_sec)
                {
                    best = Some(r);
                }
            }
            let Some(r) = best else { continue };
            let path = match (r.src.path, r.dst.path) {
                (PathKind::Direct, PathKind::Direct) => "direct".to_string(),
                _ if staged => "staged (forced)".to_string(),
                _ => "staged".to_string(),
            };
            rows.push(BenchRow {
                route,
                path,
                flow: flow.to_string(),
                copies: r.copies,
                gib_s: r.bytes_per_sec / GIB,
                of_memcpy: 0.0,
                of_copies: 0.0,
            });
        }
    }
    for r in &mut rows {
        r.of_memcpy = r.gib_s * GIB / memcpy;
        r.of_copies = r.of_memcpy * f64::from(r.copies);
    }
    Ok(BenchReport {
        size,
        chunk,
        memcpy_gib_s: memcpy / GIB,
        memcpy_hot_gib_s: memcpy_hot / GIB,
        placement: w.placement_note(),
        rows,
    })
}
