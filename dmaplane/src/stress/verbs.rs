//! The revoke stress on a real RDMA device (`stress revoke --backend verbs`; Soft-RoCE in the
//! qemu testbed, or a NIC), feature `verbs`: the same harness as [`super::run_sim`], with
//! udmabuf exports.
//!
//! Two contexts of one device play two hosts: the *owner* exports udmabuf memory and imports it
//! with `Pd::import` (where the provider refuses dma-buf MRs, as rxe does, the negotiation falls
//! back to the buffer's process mapping, and the run reports it); the *holder* writes into it
//! over N RC queue pairs. The owner grants each export to the holder and revokes it over a
//! lease link on a real TCP connection (127.0.0.1), exactly as two hosts would: `LeaseRevoke`
//! out, the holder quiesces its queue pairs, `LeaseAck` back, then the zap and the fence.
//!
//! Checks, as in the simulated stress: every request completes exactly once; every successful
//! WRITE is read back byte for byte from the owner's memory; after each ack the old buffer is
//! poisoned and must still be all poison at the next revoke (any DMA that landed after the ack
//! would have changed it); and every access the NIC refused because a key was gone (a
//! remote-access error at the holder, an access-error event at the owner) is counted — an honest
//! holder never even tries.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmaplane_core::RevokeReport;
use dmaplane_core::dmabuf::{DmaBufMemory, UdmaBuf};
use dmaplane_gpu::cuda::CudaGpu;
use dmaplane_gpu::{DeviceMemory, DmaClient};
use dmaplane_rdma::oob::{Oob, OobListener};
use dmaplane_rdma::verbs::{VerbsDevice, list_devices};
use dmaplane_rdma::{
    Fault, ImportOptions, LeaseLink, Mr, MrAccess, Qp, QpCaps, QuiescePolicy, RemoteMr,
};

use super::bytes::Bytes;
use super::config::{ExporterKind, Inject, StressConfig};
use super::data_path::DataPath;
use super::exporter::{Revocable, exporter};
use super::report::StressReport;
use super::run_state::{EpochTarget, RunState};
use crate::RawHost;
use crate::error::{Error, Result};
use crate::raw::connect_over;
use crate::sync::lock;

/// Who the setup errors name.
const WHO: &str = "stress (verbs)";

/// Setup steps over the control connection (Soft-RoCE under TCG is slow).
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the data path keeps reaping after the last revoke before calling a request lost.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// The owner's memory of one epoch: host memory (a udmabuf) or CUDA device memory.
enum Exported {
    Host(Arc<DmaBufMemory>),
    /// Revoked at the revoke and kept (a quarantine: its bytes stay readable for the poison
    /// check); freed when the last holder lets go.
    Cuda(Arc<DeviceMemory>),
}

impl Exported {
    fn bytes(&self) -> Arc<dyn Bytes> {
        match self {
            Exported::Host(m) => m.clone(),
            Exported::Cuda(m) => m.clone(),
        }
    }
}

/// One export: the owner's memory and registration of one epoch.
struct VerbsExport {
    epoch: u64,
    mem: Exported,
    mr: Mr,
}

impl Revocable for VerbsExport {
    fn epoch(&self) -> u64 {
        self.epoch
    }
    fn revoke(&self, deadline: Duration) -> RevokeReport {
        match &self.mem {
            Exported::Host(m) => m.revoke(deadline),
            Exported::Cuda(m) => m.revoke(deadline),
        }
    }
    fn bytes(&self) -> Arc<dyn Bytes> {
        self.mem.bytes()
    }
}

/// An export as the data path looks it up when its grant arrives.
struct Published {
    rkey: u32,
    addr: u64,
    epoch: u64,
    mem: Arc<dyn Bytes>,
}

/// One side: a context of the device (from the library) and its queue pairs.
struct VerbsSide {
    host: RawHost,
    qps: Vec<Qp>,
}

fn side(name: &str, qps: usize, caps: QpCaps, cq_depth: u32) -> Result<VerbsSide> {
    let host = RawHost::verbs(Some(name), cq_depth)?;
    let qps = host.qps(qps, caps)?;
    Ok(VerbsSide { host, qps })
}

/// Connect every QP over `oob`, then open the lease link on it.
fn connect(s: &VerbsSide, oob: Oob, mtu: dmaplane_rdma::Mtu) -> Result<LeaseLink> {
    connect_over(&s.qps, &oob, mtu, SETUP_TIMEOUT)?;
    Ok(LeaseLink::open(&s.host.dev, oob, SETUP_TIMEOUT)?)
}

/// Run the stress on the RDMA device `device` (default: the first libibverbs lists): two
/// contexts of it play the owner and the holder, their lease link a TCP connection. The
/// owner exports udmabuf memory ([`ExporterKind::Host`]) or CUDA memory on GPU 0
/// ([`ExporterKind::Gpu`]), which its NIC registers as a dma-buf or by device VA, as the
/// negotiation finds.
pub fn run_verbs(
    cfg: &StressConfig,
    device: Option<&str>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<StressReport> {
    let names = list_devices()?;
    let name = match device {
        Some(d) => d.to_string(),
        None => match names.first() {
            Some(n) => n.clone(),
            None => return Err(Error::setup(WHO, "no RDMA device: libibverbs lists none")),
        },
    };
    let probe = VerbsDevice::open(Some(&name))?;
    let mtu = probe.active_mtu();
    drop(probe);
    if cfg.policy == QuiescePolicy::Flush && cfg.size > mtu.bytes() {
        return Err(Error::invalid(
            format!("stress revoke --quiesce flush on {name}"),
            "size",
            cfg.size,
            format!(
                "a WRITE must fit one packet (path MTU {} bytes) — flushing a multi-packet \
                 WRITE can leave the owner's responder in the middle of a message, which \
                 breaks the connection; use --size {} or less, or the default --quiesce \
                 boundary (stops at a message boundary) or drain",
                mtu.bytes(),
                mtu.bytes()
            ),
        ));
    }
    // Faults this stress can see: where the owner imports and where the holder holds.
    let (owner_fault, holder_fault) = match cfg.inject {
        None => (None, None),
        Some(Inject::Rdma(f @ Fault::EarlyFence)) => (Some(f), None),
        Some(Inject::Rdma(f @ (Fault::IgnoreLeaseRevoke | Fault::AckThenWrite))) => (None, Some(f)),
        Some(i) => {
            return Err(Error::invalid(
                "stress revoke --backend verbs",
                "inject",
                i,
                "this stress could not see it (no straggler from a third NIC, no \
                 exporter-side reuse, and a dma-buf exporter has no backstop to remove); on \
                 verbs it runs early-fence, ignore-lease-revoke and ack-then-write — the sim \
                 backend runs every fault",
            ));
        }
    };
    let slots = cfg.qps * cfg.depth;
    let region = (slots as u64 * u64::from(cfg.size))
        .next_multiple_of(4096)
        .max(4096);
    let mut notes = vec![format!("device {name}, path MTU {} bytes", mtu.bytes())];

    let caps = QpCaps {
        max_send_wr: u32::try_from(cfg.depth)
            .map_err(|_| Error::invalid("stress revoke", "depth", cfg.depth, "at most 2^32 - 1"))?,
        max_recv_wr: 1,
        ..QpCaps::default()
    };
    let cq_depth = u32::try_from(slots * 2 + 64).unwrap_or(u32::MAX);
    let owner = side(&name, cfg.qps, caps, 64)?;
    let holder = side(&name, cfg.qps, caps, cq_depth)?;
    owner.host.dev.inject(owner_fault);
    holder.host.dev.inject(holder_fault);

    // Connect through the out-of-band TCP connection, as two hosts would.
    let listener = OobListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr();
    let (olink, hlink) = std::thread::scope(|s| -> Result<(LeaseLink, LeaseLink)> {
        let h = s.spawn(|| connect(&holder, Oob::connect(addr, SETUP_TIMEOUT)?, mtu));
        let o = connect(&owner, listener.accept(SETUP_TIMEOUT)?, mtu);
        let h = h
            .join()
            .map_err(|_| Error::setup(WHO, "the holder's setup thread panicked"))?;
        Ok((o?, h?))
    })?;
    notes.push(format!(
        "lease link over TCP {} ↔ {}",
        hlink.peer_addr(),
        olink.peer_addr()
    ));

    // The holder's source memory (also a udmabuf, imported the same way).
    let src_mem = UdmaBuf::new("stress-src", region)
        .map_err(|e| Error::setup(WHO, format!("the holder's source buffer: {e}")))?
        .into_memory();
    let src = holder.host.import_dmabuf(
        &src_mem,
        "stress-src",
        ImportOptions {
            access: MrAccess::LOCAL_WRITE,
            ..ImportOptions::default()
        },
    )?;
    let opts = cfg.target_import();
    // Every export so far, by (rkey, address): how the data path finds the memory behind
    // a grant it received over TCP.
    let exports: Mutex<Vec<Published>> = Mutex::new(Vec::new());
    let gpu = match cfg.exporter {
        ExporterKind::Host => None,
        ExporterKind::Gpu => Some(CudaGpu::new(0)?.into_gpu()),
    };
    let export = |epoch: u64| -> Result<VerbsExport> {
        let name = format!("stress-dst-{epoch}");
        let (mem, mr) = match &gpu {
            None => {
                let mem = Arc::new(
                    UdmaBuf::new(&name, region)
                        .map_err(|e| Error::setup(WHO, format!("export {epoch}: {e}")))?
                        .into_memory(),
                );
                let mr = owner.host.import_dmabuf(&mem, "stress-dst", opts)?;
                (Exported::Host(mem), mr)
            }
            Some(g) => {
                let mem = Arc::new(g.alloc(&name, region)?);
                // Its dma-buf (ibv_reg_dmabuf_mr) where the driver exports one, else its
                // device VAs (a peer-memory client): negotiated, as the Agent does.
                let mr = owner
                    .host
                    .pd
                    .import("stress-dst", opts, mem.dmabuf_fd(), |i, a| {
                        mem.attach(i, DmaClient::External, a)
                    })?;
                (Exported::Cuda(mem), mr)
            }
        };
        {
            let mut ex = lock(&exports);
            // Grants are taken up long before two more exports follow.
            ex.retain(|e| e.epoch + 2 >= epoch);
            ex.push(Published {
                rkey: mr.rkey(),
                addr: mr.iova(),
                epoch,
                mem: mem.bytes(),
            });
        }
        olink.grant(&mr)?;
        Ok(VerbsExport { epoch, mem, mr })
    };
    let first = export(0)?;
    notes.push(format!(
        "owner registration: {}",
        first.mr.negotiation().unwrap_or_default()
    ));
    notes.push(format!(
        "holder source registration: {}",
        src.negotiation().unwrap_or_default()
    ));
    let target_of = |remote: Arc<RemoteMr>| -> Result<EpochTarget> {
        let found = lock(&exports)
            .iter()
            .rev()
            .find(|p| p.rkey == remote.rkey() && p.addr == remote.addr())
            .map(|p| (p.epoch, p.mem.clone()));
        match found {
            Some((epoch, mem)) => Ok(EpochTarget { epoch, remote, mem }),
            None => Err(Error::setup(
                WHO,
                format!(
                    "a grant for rkey {:#x} that was never exported",
                    remote.rkey()
                ),
            )),
        }
    };
    let first_target = target_of(hlink.next_grant(SETUP_TIMEOUT)?)?;

    let sh = RunState::default();
    let start = Instant::now();
    let data = DataPath {
        cfg,
        qps: &holder.qps,
        cq: &holder.host.cq,
        src: &src,
        src_mem: &src_mem,
        src_pd: None,
        drain_limit: DRAIN_LIMIT,
    };
    let report = std::thread::scope(|s| -> Result<StressReport> {
        // The owner: revoke once the data path has filled every queue pair of this export
        // twice (grant, then posts, take milliseconds under emulation, far longer than a
        // revoke), then at a random point of the traffic.
        let exp = s.spawn(|| {
            exporter(
                cfg,
                &sh,
                first,
                2 * slots as u64,
                Duration::from_millis(3),
                |epoch| export(epoch).map_err(|e| e.to_string()),
                |_| {},
                progress,
            )
        });
        // The holder: only the newest grant matters, the ones before it are revoked already.
        let counts = data.run(
            &sh,
            first_target,
            |t| {
                if let Some(r) = std::iter::from_fn(|| hlink.try_grant()).last() {
                    match target_of(r) {
                        Ok(n) => *t = n,
                        Err(e) => sh.fail(e.to_string()),
                    }
                }
            },
            &|| sh.revokes_done.load(Ordering::Relaxed) >= cfg.revokes || exp.is_finished(),
        );
        sh.stop.store(true, Ordering::Relaxed);
        drop(exp.join());
        let counts = counts?;
        // Accesses the NIC refused because a key was gone, seen by the owner's responder.
        let mut access_events = 0u64;
        let mut benign: std::collections::BTreeMap<String, u64> = Default::default();
        for (who, dev) in [("owner", &owner.host.dev), ("holder", &holder.host.dev)] {
            for ev in dev.async_events() {
                if ev.kind == "QP_ACCESS_ERR" {
                    access_events += 1;
                }
                // A boundary stop's drain notice and the port coming up are news, not
                // faults; every other event is.
                if matches!(ev.kind.as_str(), "SQ_DRAINED" | "PORT_ACTIVE" | "COMM_EST") {
                    *benign.entry(format!("{who} {}", ev.kind)).or_default() += 1;
                } else {
                    sh.fail(format!("{who} async event {} ({})", ev.kind, ev.detail));
                }
            }
        }
        let stats = owner.host.dev.stats();
        let hstats = holder.host.dev.stats();
        if stats.holders_cut_off > 0 {
            sh.fail(format!(
                "{} lease holder(s) cut off without an ack",
                stats.holders_cut_off
            ));
        }
        let mut notes = std::mem::take(&mut notes);
        notes.push(format!(
            "leases: {} revoked, {} acked over TCP, {} cut off; holder QPs stopped at a \
             boundary {}, flushed {}, drains timed out {} (under drain the holder waits for \
             its WRITEs instead)",
            stats.leases_revoked,
            stats.lease_acks,
            stats.holders_cut_off,
            hstats.qps_stopped,
            hstats.qps_flushed,
            hstats.drains_timed_out,
        ));
        if !benign.is_empty() {
            let seen: Vec<String> = benign.iter().map(|(k, n)| format!("{k} × {n}")).collect();
            notes.push(format!("async events (not faults): {}", seen.join(", ")));
        }
        let mut r = StressReport::from_run("verbs", cfg, &counts, &sh, start);
        r.post_ack_accesses += access_events;
        r.holders_cut_off = stats.holders_cut_off;
        r.notes = notes;
        Ok(r)
    })?;
    // Close the lease links before the devices go (the receivers hold device handles).
    drop((hlink, olink));
    Ok(report)
}
