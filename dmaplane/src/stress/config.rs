//! What a revoke stress run is asked to do: its shape, whose memory is revoked, and the fault
//! injected on purpose, if any. Shared by the simulated setup ([`super::run_sim`]), the two
//! halves of a run and the verbs backend.

use std::time::Duration;

use dmaplane_core::ImporterKind;
use dmaplane_core::cpu::Placement;
use dmaplane_rdma::{Fault, ImportOptions, MrAccess, QuiescePolicy};
use serde::Serialize;

/// The shape of a stress run and what it breaks on purpose.
#[derive(Debug, Clone)]
pub struct StressConfig {
    /// Queue pairs the data path keeps WRITEs in flight on.
    pub qps: usize,
    /// WRITEs in flight per queue pair.
    pub depth: usize,
    /// Bytes per WRITE.
    pub size: u32,
    /// Revokes of the target (every other one also moves the source).
    pub revokes: u64,
    /// Seconds of traffic between revokes at least (0: revoke as soon as traffic is in flight).
    pub seconds: f64,
    /// Seed of the revoke schedule (where under the load each revoke falls).
    pub seed: u64,
    /// How the importer quiesces its queue pairs on a revoke (drain or flush, and bounds).
    pub policy: QuiescePolicy,
    /// Exporter's deadline per revoke.
    pub deadline: Duration,
    /// Simulated backend: NIC engines on cores of their own, the host's threads (exporter and
    /// data path, the latter at the lowest priority) on the rest. None leaves every thread to
    /// the scheduler.
    pub placement: Option<Placement>,
    /// Whose memory is revoked: host memory (moved) or GPU memory (freed and re-allocated).
    pub exporter: ExporterKind,
    /// Break the protocol on purpose: the run must then fail, naming what broke.
    pub inject: Option<Inject>,
}

/// What `stress revoke --inject` breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum Inject {
    /// The importer (the target's NIC) or the lease holder (the writer's NIC) misbehaves.
    Rdma(Fault),
    /// The exporter reuses its memory before its revoke report (the ack) is out.
    FreeBeforeAck,
    /// The exporter cannot cut grants (as a dma-buf exporter, which passes none), the
    /// target's NIC signals its fence at once and its lease holder keeps writing: WRITEs really
    /// land after the ack, and only the oracle and the poison can tell.
    NoBackstop,
}

impl StressConfig {
    /// How every backend's target NIC imports an export: writable by the holder, pinned (the
    /// export revokes it), under the run's quiesce policy, its queue pairs recovered after a
    /// flush.
    pub fn target_import(&self) -> ImportOptions {
        ImportOptions {
            access: MrAccess::LOCAL_WRITE | MrAccess::REMOTE_WRITE | MrAccess::REMOTE_READ,
            kind: ImporterKind::Pinned,
            policy: self.policy,
            recover: true,
            range: None,
        }
    }
}

impl Inject {
    /// Every fault the stress can inject, in the order the CI loop runs them.
    pub fn all() -> Vec<Inject> {
        let mut v: Vec<Inject> = Fault::ALL.into_iter().map(Inject::Rdma).collect();
        v.push(Inject::FreeBeforeAck);
        v.push(Inject::NoBackstop);
        v
    }

    /// The name `--inject` takes.
    pub fn name(self) -> &'static str {
        match self {
            Inject::Rdma(f) => f.name(),
            Inject::FreeBeforeAck => "free-before-ack",
            Inject::NoBackstop => "no-backstop",
        }
    }
}

impl From<Inject> for String {
    fn from(i: Inject) -> String {
        i.name().to_string()
    }
}

impl std::fmt::Display for Inject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Inject {
    type Err = String;
    fn from_str(s: &str) -> Result<Inject, String> {
        Inject::all()
            .into_iter()
            .find(|i| i.name() == s)
            .ok_or_else(|| {
                let known: Vec<_> = Inject::all().iter().map(|i| i.name()).collect();
                format!("unknown fault {s:?} (known: {})", known.join(", "))
            })
    }
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

/// A run of `qps` queue pairs, `depth` deep, of `size`-byte WRITEs, one revoke, no fault: what
/// the tests start from.
#[cfg(test)]
pub(crate) fn test_config(qps: usize, depth: usize, size: u32) -> StressConfig {
    StressConfig {
        qps,
        depth,
        size,
        revokes: 1,
        seconds: 0.0,
        seed: 1,
        policy: QuiescePolicy::DEFAULT,
        deadline: Duration::from_secs(1),
        placement: None,
        exporter: ExporterKind::Host,
        inject: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fault_name_parses_and_unknown_ones_list_the_known() {
        for i in Inject::all() {
            assert_eq!(i.name().parse::<Inject>(), Ok(i));
        }
        let e = "early".parse::<Inject>().unwrap_err();
        assert!(
            e.contains("free-before-ack") && e.contains("no-backstop"),
            "{e}"
        );
    }
}
