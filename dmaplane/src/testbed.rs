//! The simulated testbed agents run on: one fabric (the built-in topology, or a given one) with
//! its NICs and GPUs. Agents on one testbed are hosts of one machine model: each claims the NICs
//! it uses, and no two agents share a NIC.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use dmaplane_core::fabric::{DeviceId, Fabric};
use dmaplane_core::topology::{Topology, builtin};
use dmaplane_gpu::{Gpu, SimGpu};
use dmaplane_rdma::{SimNetwork, SimNic};

use crate::error::{Error, Result};
use crate::sync::lock;

/// A simulated machine: the fabric, its NICs and GPUs, and which agent uses which NIC.
pub struct Testbed {
    fabric: Fabric,
    net: SimNetwork,
    gpus: Vec<Gpu>,
    /// NIC name → the agent that claimed it.
    claims: Mutex<BTreeMap<String, String>>,
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed")
            .field("topology", &self.topology().source())
            .field("claims", &*lock(&self.claims))
            .finish_non_exhaustive()
    }
}

impl Testbed {
    /// The built-in testbed (`topologies/testbed.toml`): one two-socket machine on which every
    /// peer-to-peer route occurs.
    ///
    /// ```text
    /// hb0 (NUMA 0)                               hb1 (NUMA 1)
    /// |- mem0 host memory                        |- mem1 host memory
    /// |- rp0 - sw0 -+- gpu0                      |- rp3 - sw1 -+- sw2 - gpu2
    /// |             +- nic0                      |             +- sw3 - nic1
    /// |- rp1 - gpu1                              |- rp4 - nic2
    /// |- rp2 - nvme0
    /// ```
    ///
    /// | pair | route | what a transfer does |
    /// |---|---|---|
    /// | gpu0 ↔ nic0 | same switch (sw0) | peer to peer, by bus address |
    /// | gpu2 ↔ nic1 | same upstream switch (sw1) | peer to peer, by bus address |
    /// | gpu1 ↔ nic0 | through host bridge hb0 (allow-listed) | peer to peer, through the host bridge |
    /// | gpu0 ↔ nvme0 | through host bridge hb0 | direct file I/O into the GPU |
    /// | a GPU ↔ a NIC on the other socket (gpu0 ↔ nic1, gpu2 ↔ nic0, any GPU ↔ nic2 …) | not supported | staged through host memory ([`crate::NicPath::Staged`]) |
    /// | mem0 / mem1 ↔ any NIC | host memory | direct; the NIC on the memory's NUMA node preferred |
    ///
    /// So for a GPU-to-GPU READ without staging on either side, put one agent on `nic0` with
    /// its memory on `gpu0` (or `gpu1`), the other on `nic1` with its memory on `gpu2`. Each NIC
    /// is claimed by one agent at a time ([`crate::AgentBuilder::nics`]); the GPUs' memory is
    /// shared by every agent of the process. Every DMA is checked by the testbed's oracle
    /// ([`Testbed::fabric`]).
    ///
    /// ```
    /// use dmaplane::{Agent, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let tb = Testbed::builtin()?;
    /// let on_nic0 = Agent::builder("a").testbed(tb.clone()).nics(["nic0"]).build()?;
    /// let on_nic1 = Agent::builder("b").testbed(tb).nics(["nic1"]).build()?;
    /// let staged = |a: &Agent, gpu: &str| -> dmaplane::Result<bool> {
    ///     Ok(a.register(&a.alloc_gpu("probe", gpu, 4096)?)?.paths()[0].is_staged())
    /// };
    /// assert!(!staged(&on_nic0, "gpu0")? && !staged(&on_nic0, "gpu1")?);
    /// assert!(!staged(&on_nic1, "gpu2")?);
    /// assert!(staged(&on_nic1, "gpu0")? && staged(&on_nic0, "gpu2")?);
    /// # Ok(()) }
    /// ```
    pub fn builtin() -> Result<Arc<Testbed>> {
        Testbed::with_topology(builtin::testbed())
    }

    /// A testbed on `topology`.
    pub fn with_topology(topology: Topology) -> Result<Arc<Testbed>> {
        Testbed::with_engine_cpus(topology, &[])
    }

    /// A testbed on `topology` whose simulated NICs' engines run on `cpus` (none: left to the
    /// scheduler), so a benchmark can keep them off the application's cores.
    pub fn with_engine_cpus(topology: Topology, cpus: &[usize]) -> Result<Arc<Testbed>> {
        let fabric = Fabric::with_topology(topology);
        let net = SimNetwork::new(&fabric).with_engine_cpus(cpus);
        let gpus = SimGpu::all(&fabric)?;
        Ok(Arc::new(Testbed {
            fabric,
            net,
            gpus,
            claims: Mutex::new(BTreeMap::new()),
        }))
    }

    /// The process's default testbed (the built-in one), shared by every agent built without
    /// one.
    pub fn shared() -> Result<Arc<Testbed>> {
        static SHARED: OnceLock<Arc<Testbed>> = OnceLock::new();
        if let Some(t) = SHARED.get() {
            return Ok(t.clone());
        }
        let t = Testbed::builtin()?;
        Ok(SHARED.get_or_init(|| t).clone())
    }

    /// The simulated fabric its devices and memory live on.
    pub fn fabric(&self) -> &Fabric {
        &self.fabric
    }

    /// The topology the fabric was built from: devices, switches, NUMA nodes and routes.
    pub fn topology(&self) -> &Topology {
        // The fabric is always built with a topology here.
        self.fabric
            .topology()
            .unwrap_or_else(|| unreachable!("a testbed's fabric has a topology"))
    }

    /// Every NIC of the topology, in order.
    pub fn nic_names(&self) -> Vec<String> {
        self.kind_names(dmaplane_core::topology::DeviceKind::Nic)
    }

    /// Every GPU of the topology, in order.
    pub fn gpu_names(&self) -> Vec<String> {
        self.gpus.iter().map(|g| g.name().to_string()).collect()
    }

    fn kind_names(&self, kind: dmaplane_core::topology::DeviceKind) -> Vec<String> {
        let t = self.topology();
        t.devices_of_kind(kind).map(|d| d.id.clone()).collect()
    }

    /// The simulated GPU called `name` (for raw use; agents allocate through
    /// [`crate::Agent::alloc_gpu`]).
    pub fn gpu(&self, name: &str) -> Result<&Gpu> {
        self.gpus.iter().find(|g| g.name() == name).ok_or_else(|| {
            Error::invalid(
                "GPU memory",
                "gpu",
                name,
                format!(
                    "no such GPU on this testbed (it has {})",
                    self.gpu_names().join(", ")
                ),
            )
        })
    }

    /// The fabric device called `name`.
    pub fn device(&self, name: &str) -> Result<DeviceId> {
        self.fabric
            .device(name)
            .map_err(|e| Error::invalid("testbed", "device", name, e.to_string()))
    }

    /// Claim NICs for `agent`: the ones named, or every NIC no other agent holds.
    pub(crate) fn claim(&self, agent: &str, want: Option<&[String]>) -> Result<Vec<Arc<SimNic>>> {
        let mut claims = lock(&self.claims);
        let all = self.nic_names();
        let names: Vec<String> = match want {
            Some(w) => {
                for n in w {
                    if !all.contains(n) {
                        return Err(Error::invalid(
                            format!("agent {agent}"),
                            "nics",
                            n,
                            format!("no such NIC on this testbed (it has {})", all.join(", ")),
                        ));
                    }
                    if let Some(other) = claims.get(n) {
                        return Err(Error::invalid(
                            format!("agent {agent}"),
                            "nics",
                            n,
                            format!("agent {other} uses it (agents on one testbed share no NIC)"),
                        ));
                    }
                }
                w.to_vec()
            }
            None => all
                .into_iter()
                .filter(|n| !claims.contains_key(n))
                .collect(),
        };
        if names.is_empty() {
            let held: Vec<String> = claims.iter().map(|(n, a)| format!("{n}: {a}")).collect();
            return Err(Error::setup(
                agent,
                format!("every NIC of the testbed is taken ({})", held.join(", ")),
            ));
        }
        let nics = names
            .iter()
            .map(|n| self.net.nic(n))
            .collect::<Result<Vec<_>, _>>()?;
        for n in &names {
            claims.insert(n.clone(), agent.to_string());
        }
        Ok(nics)
    }

    pub(crate) fn release(&self, nics: &[String]) {
        let mut claims = lock(&self.claims);
        for n in nics {
            claims.remove(n);
        }
    }
}
