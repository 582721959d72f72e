//! The simulated RC NIC: verbs objects on the core fabric, an engine thread per NIC that moves
//! real bytes with fabric DMA (bus addresses, so a NIC can target a GPU BAR window), and the
//! hardware's checks — keys, bounds, access rights, PD, QP state — with verbs status codes.

mod engine;
mod mr;
mod qp;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};

use dmaplane_core::fabric::{DeviceId, Fabric};
use dmaplane_core::pgsz::MLX5_PGSZ_BITMAP;
use dmaplane_core::{Accept, Access, SpaceKind};

use crate::backend::{
    AsyncEvent, BackendKind, CqBackend, DeviceBackend, DeviceInfo, DmaBufMr, MrBackend, MrRequest,
    PdBackend, QpBackend,
};
use crate::error::{RdmaError, Result};
use crate::qp::QpCaps;

pub(crate) use crate::soft_cq::SoftCq;
pub(crate) use mr::SimMr;
pub(crate) use qp::SimQp;

pub(crate) use crate::sync::{lock, read, write};

/// The wire between simulated NICs: finds a NIC by GID for `INIT → RTR`.
#[derive(Debug, Clone)]
pub struct SimNetwork {
    fabric: Fabric,
    nics: Arc<RwLock<HashMap<[u8; 16], Weak<NicShared>>>>,
    engine_cpus: Vec<usize>,
}

impl SimNetwork {
    pub fn new(fabric: &Fabric) -> SimNetwork {
        SimNetwork {
            fabric: fabric.clone(),
            nics: Arc::new(RwLock::new(HashMap::new())),
            engine_cpus: Vec::new(),
        }
    }

    /// Run the engines of NICs created from now on on these CPUs (see
    /// [`dmaplane_core::cpu::Placement`]); empty leaves them to the scheduler. A NIC's engine
    /// stands in for the NIC's own processors: on a small machine, sharing cores with the host's
    /// threads makes it wait for them (and them for it) as no NIC does.
    pub fn with_engine_cpus(mut self, cpus: &[usize]) -> SimNetwork {
        self.engine_cpus = cpus.to_vec();
        self
    }

    pub fn fabric(&self) -> &Fabric {
        &self.fabric
    }

    /// A NIC that issues DMA as fabric device `name` (it must exist on the fabric, e.g. a NIC of
    /// the topology, or one added with `Fabric::add_device`).
    pub fn nic(&self, name: &str) -> Result<Arc<SimNic>> {
        let dev = self
            .fabric
            .device(name)
            .map_err(|e| RdmaError::NoDevice { why: e.to_string() })?;
        // RoCEv2-style IPv4-mapped GID: ::ffff:10.<dev>.
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12] = 10;
        gid[13..16].copy_from_slice(&dev.0.to_be_bytes()[1..]);
        let shared = Arc::new(NicShared {
            fabric: self.fabric.clone(),
            network: self.clone(),
            dev,
            name: name.to_string(),
            gid,
            next_key: AtomicU32::new(0x100),
            next_qpn: AtomicU32::new(0x11),
            next_pd: AtomicU32::new(1),
            mrs: RwLock::new(HashMap::new()),
            qps: RwLock::new(HashMap::new()),
            events: crate::event_queue::EventQueue::default(),
            engine: engine::NicEngine::default(),
            engine_cpus: self.engine_cpus.clone(),
            call_latency: Arc::default(),
        });
        write(&self.nics).insert(gid, Arc::downgrade(&shared));
        engine::start(&shared);
        Ok(Arc::new(SimNic { shared }))
    }

    pub(crate) fn find(&self, gid: &[u8; 16]) -> Option<Arc<NicShared>> {
        read(&self.nics).get(gid).and_then(Weak::upgrade)
    }
}

#[derive(Debug)]
pub(crate) struct NicShared {
    pub(crate) fabric: Fabric,
    network: SimNetwork,
    pub(crate) dev: DeviceId,
    pub(crate) name: String,
    pub(crate) gid: [u8; 16],
    next_key: AtomicU32,
    next_qpn: AtomicU32,
    next_pd: AtomicU32,
    /// lkey = rkey; keys are never reused while the NIC lives.
    pub(crate) mrs: RwLock<HashMap<u32, Weak<SimMr>>>,
    pub(crate) qps: RwLock<HashMap<u32, Weak<SimQp>>>,
    events: crate::event_queue::EventQueue,
    pub(crate) engine: engine::NicEngine,
    engine_cpus: Vec<usize>,
    /// How long every QP modify and MR zap takes, in nanoseconds ([`SimNic::set_call_latency`]).
    pub(crate) call_latency: Arc<AtomicU64>,
}

impl NicShared {
    /// Spend the modelled driver-call time ([`SimNic::set_call_latency`]); call it before
    /// taking any lock.
    pub(crate) fn driver_call(latency: &AtomicU64) {
        let ns = latency.load(Ordering::Relaxed);
        if ns > 0 {
            std::thread::sleep(std::time::Duration::from_nanos(ns));
        }
    }

    pub(crate) fn event(&self, kind: &str, qpn: Option<u32>, detail: String) {
        self.events.push(&self.name, kind, qpn, detail);
    }

    pub(crate) fn mr(&self, key: u32) -> Option<Arc<SimMr>> {
        read(&self.mrs).get(&key).and_then(Weak::upgrade)
    }
}

/// A simulated RC NIC; implements [`DeviceBackend`].
#[derive(Debug)]
pub struct SimNic {
    shared: Arc<NicShared>,
}

impl SimNic {
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn device_id(&self) -> DeviceId {
        self.shared.dev
    }

    /// Model driver calls that take time, as a real NIC's do (`ibv_modify_qp` and
    /// `ibv_dereg_mr` wait for firmware commands of tens of microseconds to milliseconds):
    /// every QP modify and MR zap then sleeps `latency` first, and the device reports that its
    /// calls block ([`DeviceBackend::calls_block`]), so the quiesce layer makes them off the
    /// invalidating thread, as it does on verbs. Zero (the default) turns it off.
    pub fn set_call_latency(&self, latency: std::time::Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.shared.call_latency.store(ns, Ordering::Relaxed);
    }
}

impl Drop for SimNic {
    fn drop(&mut self) {
        self.shared.engine.stop();
        write(&self.shared.network.nics).remove(&self.shared.gid);
    }
}

impl DeviceBackend for SimNic {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.shared.name.clone(),
            kind: BackendKind::Sim,
            description: format!("simulated RC NIC on fabric {}", self.shared.dev),
            port: 1,
            port_state: "ACTIVE".into(),
            gid: self.shared.gid,
            lid: 0,
            max_mr_size: u64::MAX,
            page_size_cap: MLX5_PGSZ_BITMAP,
            max_qp_wr: crate::qp::SOFT_MAX_QP_WR,
            max_sge: crate::wr::MAX_SGE as u32,
            dmabuf_mr: DmaBufMr::Unsupported {
                why: "the simulator registers fabric bus addresses, not dma-buf fds".into(),
            },
        }
    }

    fn accepts(&self) -> Vec<Accept> {
        [SpaceKind::PciBus, SpaceKind::CpuPhys, SpaceKind::Iova]
            .into_iter()
            .map(|s| Accept::new(s, Access::READ_WRITE).with_mmio())
            .collect()
    }

    fn alloc_pd(&self) -> Result<Arc<dyn PdBackend>> {
        Ok(Arc::new(SimPd {
            nic: self.shared.clone(),
            pdn: self.shared.next_pd.fetch_add(1, Ordering::Relaxed),
        }))
    }

    fn create_cq(&self, depth: u32) -> Result<Arc<dyn CqBackend>> {
        SoftCq::create(depth)
    }

    fn poll_async_event(&self) -> Option<AsyncEvent> {
        self.shared.events.pop()
    }

    fn fabric_device(&self) -> Option<DeviceId> {
        Some(self.shared.dev)
    }

    fn calls_block(&self) -> bool {
        self.shared.call_latency.load(Ordering::Relaxed) > 0
    }
}

#[derive(Debug)]
struct SimPd {
    nic: Arc<NicShared>,
    pdn: u32,
}

impl PdBackend for SimPd {
    fn reg_mr(&self, req: &MrRequest<'_>) -> Result<Arc<dyn MrBackend>> {
        let key = self.nic.next_key.fetch_add(1, Ordering::Relaxed);
        let mr = Arc::new(
            SimMr::new(key, self.pdn, req.list, req.iova, req.access)?
                .with_call_latency(self.nic.call_latency.clone()),
        );
        write(&self.nic.mrs).insert(key, Arc::downgrade(&mr));
        tracing::debug!(nic = %self.nic.name, key, translation = ?mr.translation(), "MR registered");
        Ok(mr)
    }

    fn create_qp(
        &self,
        send_cq: &Arc<dyn CqBackend>,
        recv_cq: &Arc<dyn CqBackend>,
        caps: QpCaps,
    ) -> Result<Arc<dyn QpBackend>> {
        let qpn = self.nic.next_qpn.fetch_add(1, Ordering::Relaxed) & 0xff_ffff;
        let qp = SimQp::new(
            self.nic.clone(),
            self.pdn,
            qpn,
            crate::soft_cq::as_soft(send_cq, "send_cq")?,
            crate::soft_cq::as_soft(recv_cq, "recv_cq")?,
            caps,
        )?;
        write(&self.nic.qps).insert(qpn, Arc::downgrade(&qp));
        Ok(Arc::new(qp))
    }
}
