//! The simulated RC NIC: verbs objects on the core fabric, an engine thread per NIC that moves
//! real bytes with fabric DMA (bus addresses, so a NIC can target a GPU BAR window), and the
//! hardware's checks — keys, bounds, access rights, PD, QP state — with verbs status codes.

mod cq;
mod engine;
mod mr;
mod qp;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use dmaplane_core::fabric::{DeviceId, Fabric};
use dmaplane_core::pgsz::MLX5_PGSZ_BITMAP;
use dmaplane_core::{Accept, Access, SpaceKind};

use crate::backend::{
    AsyncEvent, BackendKind, CqBackend, DeviceBackend, DeviceInfo, DmaBufMr, MrBackend, MrRequest,
    PdBackend, QpBackend,
};
use crate::error::{RdmaError, Result};
use crate::qp::QpCaps;

pub(crate) use cq::SimCq;
pub(crate) use mr::SimMr;
pub(crate) use qp::SimQp;

pub(crate) use crate::sync::{lock, read, write};

/// Most work requests per queue.
pub const SIM_MAX_QP_WR: u32 = 1 << 15;

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
            events: Mutex::new(VecDeque::new()),
            events_dropped: AtomicU64::new(0),
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

/// How many asynchronous events a simulated NIC keeps until they are read.
const EVENT_QUEUE: usize = 4096;

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
    events: Mutex<VecDeque<AsyncEvent>>,
    /// Events that found the queue full ([`EVENT_QUEUE`]).
    events_dropped: AtomicU64,
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
        tracing::debug!(nic = %self.name, kind, ?qpn, %detail, "async event");
        let mut q = lock(&self.events);
        if q.len() >= EVENT_QUEUE {
            // A NIC's event queue is bounded too: count what did not fit, report it once read.
            self.events_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back(AsyncEvent {
            kind: kind.into(),
            qpn,
            detail,
        });
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
            max_qp_wr: SIM_MAX_QP_WR,
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
        if depth == 0 || depth > 1 << 22 {
            return Err(RdmaError::InvalidAttr {
                qpn: 0,
                attr: "cq depth",
                value: depth.to_string(),
                why: "must be 1..=4194304",
            });
        }
        Ok(Arc::new(SimCq::new(depth)))
    }

    fn poll_async_event(&self) -> Option<AsyncEvent> {
        if let Some(e) = lock(&self.shared.events).pop_front() {
            return Some(e);
        }
        let dropped = self.shared.events_dropped.swap(0, Ordering::Relaxed);
        (dropped > 0).then(|| AsyncEvent {
            kind: "EVENTS_DROPPED".into(),
            qpn: None,
            detail: format!("{dropped} asynchronous event(s) found the queue full ({EVENT_QUEUE})"),
        })
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
            as_sim(send_cq, "send_cq")?,
            as_sim(recv_cq, "recv_cq")?,
            caps,
        )?;
        write(&self.nic.qps).insert(qpn, Arc::downgrade(&qp));
        Ok(Arc::new(qp))
    }
}

fn as_sim(cq: &Arc<dyn CqBackend>, what: &'static str) -> Result<Arc<SimCq>> {
    // Backends do not mix: a simulated QP needs simulated CQs.
    let any: Arc<dyn std::any::Any + Send + Sync> = cq.clone();
    any.downcast::<SimCq>().map_err(|_| RdmaError::InvalidAttr {
        qpn: 0,
        attr: what,
        value: "a CQ of another backend".into(),
        why: "a simulated QP needs simulated CQs",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmaplane_core::topology::builtin;

    /// The event queue is bounded: what does not fit is counted and reported once.
    #[test]
    fn the_event_queue_is_bounded_and_reports_what_it_dropped() {
        let fabric = Fabric::with_topology(builtin::testbed());
        let nic = SimNetwork::new(&fabric).nic("nic0").unwrap();
        for i in 0..EVENT_QUEUE + 4 {
            nic.shared.event("QP_FATAL", Some(1), format!("event {i}"));
        }
        let got: Vec<AsyncEvent> = std::iter::from_fn(|| nic.poll_async_event()).collect();
        assert_eq!(got.len(), EVENT_QUEUE + 1);
        let last = got.last().unwrap();
        assert_eq!(last.kind, "EVENTS_DROPPED");
        assert!(last.detail.starts_with("4 asynchronous"), "{}", last.detail);
        assert!(nic.poll_async_event().is_none());
    }
}
