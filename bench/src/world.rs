//! Two simulated hosts on the built-in topology: host A is socket 0 (`mem0`, `nic0`), host B is
//! socket 1 (`mem1`, `nic1`). Shared by `demo`, `stress revoke --backend sim` and `bench rdma`.

use dmaplane_core::cpu::{self, Placement};
use dmaplane_core::fabric::{DeviceId, Fabric, HostMemory};
use dmaplane_core::topology::builtin;
use dmaplane_rdma::{Cq, Device, ImportOptions, Mr, MrAccess, Pd, Qp, QpCaps, Result, SimNetwork};

/// One simulated host: its memory device, its NIC, a PD and one CQ.
#[derive(Debug)]
pub struct Host {
    pub mem: DeviceId,
    pub nic_dev: DeviceId,
    pub dev: Device,
    pub pd: Pd,
    pub cq: Cq,
}

#[derive(Debug)]
pub struct World {
    pub fabric: Fabric,
    pub net: SimNetwork,
    pub a: Host,
    pub b: Host,
    /// Where the NIC engines and the host threads run; None leaves it to the scheduler.
    pub placement: Option<Placement>,
}

pub(crate) fn host(net: &SimNetwork, mem: &str, nic: &str, cq_depth: u32) -> Result<Host> {
    let sim = net.nic(nic)?;
    let nic_dev = sim.device_id();
    let dev = Device::new(sim);
    let pd = dev.alloc_pd()?;
    let cq = dev.create_cq(cq_depth)?;
    let mem = net
        .fabric()
        .device(mem)
        .map_err(|e| dmaplane_rdma::RdmaError::NoDevice { why: e.to_string() })?;
    Ok(Host {
        mem,
        nic_dev,
        dev,
        pd,
        cq,
    })
}

impl World {
    /// With a `placement`, the NIC engines run on its engine CPUs and
    /// [`World::pin_host_thread`] keeps the host's threads on the others.
    pub fn new(cq_depth: u32, placement: Option<Placement>) -> Result<World> {
        let fabric = Fabric::with_topology(builtin::testbed());
        let engines = placement.as_ref().map_or(&[][..], |p| &p.engines[..]);
        let net = SimNetwork::new(&fabric).with_engine_cpus(engines);
        let a = host(&net, "mem0", "nic0", cq_depth)?;
        let b = host(&net, "mem1", "nic1", cq_depth)?;
        Ok(World {
            fabric,
            net,
            a,
            b,
            placement,
        })
    }

    /// Keep the calling thread off the NIC engines' CPUs (nothing without a placement).
    pub fn pin_host_thread(&self) {
        pin_host_thread(self.placement.as_ref());
    }

    /// How the run was placed, for reports.
    pub fn placement_note(&self) -> String {
        placement_note(self.placement.as_ref())
    }

    /// `n` connected QP pairs between A and B.
    pub fn connect(&self, n: usize, caps: QpCaps) -> Result<Vec<(Qp, Qp)>> {
        (0..n)
            .map(|_| {
                let qa = self.a.pd.create_qp(&self.a.cq, &self.a.cq, caps)?;
                let qb = self.b.pd.create_qp(&self.b.cq, &self.b.cq, caps)?;
                qa.connect(qb.endpoint(), MrAccess::ALL)?;
                qb.connect(qa.endpoint(), MrAccess::ALL)?;
                Ok((qa, qb))
            })
            .collect()
    }
}

impl Host {
    /// Host memory of this host, exported and imported by this host's NIC.
    pub fn memory(&self, fabric: &Fabric, name: &str, size: u64) -> Result<HostMemory> {
        HostMemory::new(fabric, self.mem, name, size).map_err(|e| {
            dmaplane_rdma::RdmaError::InvalidRegistration {
                field: "size",
                value: size.to_string(),
                why: e.to_string(),
            }
        })
    }

    pub fn import(&self, mem: &HostMemory, name: &str, opts: ImportOptions) -> Result<Mr> {
        let nic = self.nic_dev;
        self.pd
            .import(name, opts, None, |i, acc| mem.attach(i, nic, acc))
    }
}

/// Keep the calling thread off the NIC engines' CPUs (nothing without a placement).
pub(crate) fn pin_host_thread(placement: Option<&Placement>) {
    if let Some(p) = placement {
        pin_thread(&p.host, "host thread");
    }
}

/// Pin the calling thread to `cpus`; a failure leaves it to the scheduler, with a warning.
pub(crate) fn pin_thread(cpus: &[usize], what: &str) {
    if let Err(e) = cpu::pin_current(cpus) {
        tracing::warn!(error = %e, "{what} left unpinned");
    }
}

/// How a run was placed, for reports.
pub(crate) fn placement_note(placement: Option<&Placement>) -> String {
    match placement {
        Some(p) => p.to_string(),
        None => "threads left to the scheduler (NIC engines share cores with the host)".into(),
    }
}
