//! Two simulated hosts on the built-in topology, built by the library
//! ([`dmaplane::RawHost`]): host A is socket 0 (`mem0`, `nic0`), host B is socket 1 (`mem1`,
//! `nic1`). What `bench rdma`, the raw reference of `bench agent` and `stress revoke --backend
//! sim` measure the raw layer on; and where their threads run.

use std::sync::Arc;

use dmaplane::{RawHost, Result, Testbed};
use dmaplane_core::cpu::{self, Placement};
use dmaplane_core::topology::builtin;
use dmaplane_rdma::{Qp, QpCaps};

#[derive(Debug)]
pub struct World {
    pub testbed: Arc<Testbed>,
    pub a: RawHost,
    pub b: RawHost,
    /// Where the NIC engines and the host threads run; None leaves it to the scheduler.
    pub placement: Option<Placement>,
}

impl World {
    /// With a `placement`, the NIC engines run on its engine CPUs and
    /// [`World::pin_host_thread`] keeps the host's threads on the others.
    pub fn new(cq_depth: u32, placement: Option<Placement>) -> Result<World> {
        let engines = placement.as_ref().map_or(&[][..], |p| &p.engines[..]);
        let testbed = Testbed::with_engine_cpus(builtin::testbed(), engines)?;
        let a = RawHost::sim(&testbed, "host-a", "nic0", "mem0", cq_depth)?;
        let b = RawHost::sim(&testbed, "host-b", "nic1", "mem1", cq_depth)?;
        Ok(World {
            testbed,
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
        self.a.connect(&self.b, n, caps, None)
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
