//! The layer below the [`crate::Agent`], wired: one NIC's device, protection domain and
//! completion queue ([`RawHost`]), queue pairs connected in one process or across two, and
//! memory imported by a NIC. For what measures or stresses the raw `dmaplane-rdma` layer itself
//! — `dmaplane bench rdma`, the raw reference of `bench agent`, `stress revoke` with its fault
//! injection — so that none of them builds its own world. Applications use the Agent, which
//! builds on the same pieces and adds what makes them safe to use: leases, quiesce on free,
//! progress, staging.

use std::sync::Arc;
use std::time::Duration;

use dmaplane_core::cpu::Placement;
use dmaplane_core::fabric::{DeviceId, HostMemory};
use dmaplane_rdma::oob::{ConnInfo, Oob};
use dmaplane_rdma::{Cq, Device, ImportOptions, Mr, MrAccess, Mtu, Pd, Qp, QpCaps};

use crate::error::{Error, Result};
use crate::testbed::Testbed;

/// One NIC opened for raw use: its device, a protection domain and one completion queue. On a
/// testbed it claims the NIC (as an agent would) until dropped, and knows the host memory it
/// allocates from.
pub struct RawHost {
    /// The NIC's name (`nic0` on the testbed, the device's name on verbs).
    pub name: String,
    /// The host-memory device [`RawHost::memory`] allocates from (testbed only).
    pub mem: Option<DeviceId>,
    /// The NIC as a fabric device (testbed only).
    pub nic_dev: Option<DeviceId>,
    /// The device.
    pub dev: Device,
    /// A protection domain on it.
    pub pd: Pd,
    /// One completion queue on it, for every queue pair [`RawHost::qps`] makes.
    pub cq: Cq,
    testbed: Option<Arc<Testbed>>,
}

impl std::fmt::Debug for RawHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawHost")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RawHost {
    /// NIC `nic` of `testbed`, claimed for `owner`, allocating host memory from `mem` (a
    /// host-memory device, e.g. `mem0`), with a completion queue of `cq_depth` entries.
    ///
    /// ```
    /// use dmaplane::{RawHost, Testbed};
    /// use dmaplane_rdma::{ImportOptions, QpCaps};
    /// # fn main() -> dmaplane::Result<()> {
    /// let tb = Testbed::builtin()?;
    /// let a = RawHost::sim(&tb, "host-a", "nic0", "mem0", 256)?;
    /// let b = RawHost::sim(&tb, "host-b", "nic1", "mem1", 256)?;
    /// let pairs = a.connect(&b, 2, QpCaps::default(), None)?;
    /// let mem = b.memory("dst", 1 << 20)?;
    /// let mr = b.import(&mem, "dst", ImportOptions::default())?;
    /// let lease = b.dev.lease(&mr, &a.dev); // what A's WRITEs to it go under
    /// assert_eq!((pairs.len(), lease.rkey()), (2, mr.rkey()));
    /// // A NIC is one host's: a second claim is refused, naming who holds it.
    /// assert!(RawHost::sim(&tb, "host-c", "nic0", "mem0", 256).is_err());
    /// # Ok(()) }
    /// ```
    pub fn sim(
        testbed: &Arc<Testbed>,
        owner: &str,
        nic: &str,
        mem: &str,
        cq_depth: u32,
    ) -> Result<RawHost> {
        let mem = testbed.device(mem)?;
        let want = [nic.to_string()];
        let sim = testbed
            .claim(owner, Some(&want))?
            .pop()
            .ok_or_else(|| Error::setup(owner, format!("{nic}: not claimed")))?;
        let nic_dev = sim.device_id();
        let opened = RawHost::open(nic, Device::new(sim), cq_depth);
        if opened.is_err() {
            testbed.release(&want);
        }
        let mut h = opened?;
        h.mem = Some(mem);
        h.nic_dev = Some(nic_dev);
        h.testbed = Some(testbed.clone());
        Ok(h)
    }

    /// The RDMA device `device` (the first one when `None`) through libibverbs.
    #[cfg(feature = "verbs")]
    pub fn verbs(device: Option<&str>, cq_depth: u32) -> Result<RawHost> {
        let dev = dmaplane_rdma::verbs::VerbsDevice::open(device)?;
        let name = device.map_or_else(|| "verbs".to_string(), str::to_string);
        RawHost::open(&name, Device::new(dev), cq_depth)
    }

    /// A protection domain and a completion queue on `dev`.
    pub fn open(name: &str, dev: Device, cq_depth: u32) -> Result<RawHost> {
        let pd = dev.alloc_pd()?;
        let cq = dev.create_cq(cq_depth)?;
        Ok(RawHost {
            name: name.to_string(),
            mem: None,
            nic_dev: None,
            dev,
            pd,
            cq,
            testbed: None,
        })
    }

    /// The NIC as a fabric device: what the fabric's fault counters and exporters' `attach`
    /// name it by (testbed only).
    pub fn fabric_id(&self) -> Result<DeviceId> {
        self.nic_dev
            .ok_or_else(|| Error::setup(&self.name, "not a NIC of the simulated fabric"))
    }

    /// `n` queue pairs on this host's protection domain and completion queue.
    pub fn qps(&self, n: usize, caps: QpCaps) -> Result<Vec<Qp>> {
        (0..n)
            .map(|_| Ok(self.pd.create_qp(&self.cq, &self.cq, caps)?))
            .collect()
    }

    /// `n` connected queue-pair pairs between this host and `other` (one process), at `mtu`
    /// (the device's default when `None`).
    pub fn connect(
        &self,
        other: &RawHost,
        n: usize,
        caps: QpCaps,
        mtu: Option<Mtu>,
    ) -> Result<Vec<(Qp, Qp)>> {
        let (mine, theirs) = (self.qps(n, caps)?, other.qps(n, caps)?);
        for (a, b) in mine.iter().zip(&theirs) {
            match mtu {
                Some(m) => {
                    a.connect_mtu(b.endpoint(), MrAccess::ALL, m)?;
                    b.connect_mtu(a.endpoint(), MrAccess::ALL, m)?;
                }
                None => {
                    a.connect(b.endpoint(), MrAccess::ALL)?;
                    b.connect(a.endpoint(), MrAccess::ALL)?;
                }
            }
        }
        Ok(mine.into_iter().zip(theirs).collect())
    }

    /// `size` bytes of host memory from this host's memory device (testbed only).
    pub fn memory(&self, name: &str, size: u64) -> Result<HostMemory> {
        let (Some(tb), Some(mem)) = (&self.testbed, self.mem) else {
            return Err(Error::setup(
                &self.name,
                "host memory of the simulated fabric needs a testbed host",
            ));
        };
        HostMemory::new(tb.fabric(), mem, name, size)
            .map_err(|e| Error::invalid(format!("host memory {name}"), "size", size, e.to_string()))
    }

    /// Register host memory of the fabric with this NIC (testbed only).
    pub fn import(&self, mem: &HostMemory, name: &str, opts: ImportOptions) -> Result<Mr> {
        let nic = self.fabric_id()?;
        Ok(self
            .pd
            .import(name, opts, None, |i, a| mem.attach(i, nic, a))?)
    }

    /// Register a dma-buf (udmabuf) with this NIC: a dma-buf MR where the provider takes one,
    /// the buffer's process mapping where it refuses (the negotiation picks, and the MR says).
    #[cfg(feature = "verbs")]
    pub fn import_dmabuf(
        &self,
        mem: &dmaplane_core::dmabuf::DmaBufMemory,
        name: &str,
        opts: ImportOptions,
    ) -> Result<Mr> {
        Ok(self
            .pd
            .import(name, opts, Some(mem.fd()), |i, a| mem.attach(i, a))?)
    }
}

impl Drop for RawHost {
    fn drop(&mut self) {
        if let Some(tb) = &self.testbed {
            tb.release(std::slice::from_ref(&self.name));
        }
    }
}

/// Connect `qps` to the peer's, one endpoint exchange each over `oob` (the peer runs the same
/// call with its own queue pairs, in the same order), at `mtu`.
pub fn connect_over(qps: &[Qp], oob: &Oob, mtu: Mtu, timeout: Duration) -> Result<()> {
    for qp in qps {
        let theirs = oob.exchange_timeout(&ConnInfo::new(qp.endpoint(), vec![]), timeout)?;
        qp.connect_mtu(theirs.remote_qp(), MrAccess::ALL, mtu)?;
    }
    Ok(())
}

/// Two simulated hosts on the built-in topology: host A is socket 0 (`mem0`, `nic0`), host B
/// socket 1 (`mem1`, `nic1`). What `bench rdma`, the raw reference of `bench agent` and
/// `stress revoke --backend sim` measure the raw layer on; and where their threads run.
#[derive(Debug)]
pub struct RawPair {
    /// The testbed both hosts are on.
    pub testbed: Arc<Testbed>,
    /// Host A (`nic0`, `mem0`).
    pub a: RawHost,
    /// Host B (`nic1`, `mem1`).
    pub b: RawHost,
    /// Where the NIC engines and the host threads run; `None` leaves it to the scheduler.
    pub placement: Option<Placement>,
}

impl RawPair {
    /// With a `placement`, the NIC engines run on its engine CPUs and
    /// [`RawPair::pin_host_thread`] keeps the host's threads on the others. Each host's
    /// completion queue has `cq_depth` entries.
    pub fn sim(cq_depth: u32, placement: Option<Placement>) -> Result<RawPair> {
        let engines = placement.as_ref().map_or(&[][..], |p| &p.engines[..]);
        let testbed =
            Testbed::with_engine_cpus(dmaplane_core::topology::builtin::testbed(), engines)?;
        let a = RawHost::sim(&testbed, "host-a", "nic0", "mem0", cq_depth)?;
        let b = RawHost::sim(&testbed, "host-b", "nic1", "mem1", cq_depth)?;
        Ok(RawPair {
            testbed,
            a,
            b,
            placement,
        })
    }

    /// Keep the calling thread off the NIC engines' CPUs (nothing without a placement).
    pub fn pin_host_thread(&self) {
        dmaplane_core::cpu::pin_host_thread(self.placement.as_ref());
    }

    /// How the run was placed, for reports.
    pub fn placement_note(&self) -> String {
        dmaplane_core::cpu::placement_note(self.placement.as_ref())
    }

    /// `n` connected queue-pair pairs between A and B.
    pub fn connect(&self, n: usize, caps: QpCaps) -> Result<Vec<(Qp, Qp)>> {
        self.a.connect(&self.b, n, caps, None)
    }
}
