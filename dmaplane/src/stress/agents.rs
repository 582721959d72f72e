//! The agent-level stress on the simulated testbed: the owner and the holder are two
//! [`Agent`]s of this process, on NICs of their own, the holder on a thread of its own. The
//! same run as the lab's (`stress revoke --backend verbs --exporter cuda`, where the holder is
//! a second process), with the testbed's GPU or host memory instead of CUDA memory.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dmaplane_rdma::Fault;

use super::config::{ExporterKind, Inject, StressConfig};
use super::holder::{HolderReport, hold};
use super::owner::{Holder, own};
use super::report::StressReport;
use crate::error::Error;
use crate::{Agent, Result, Testbed};

/// A holder's stall timeout: a request its NIC never completes is reported lost within it,
/// not waited for by the owner.
pub const HOLDER_STALL: Duration = Duration::from_secs(10);

/// The faults the agent-level stress injects, on (the owner's NIC, the holder's NIC): the
/// owner's fences early (`early-fence`); the holder ignores the lease revoke
/// (`ignore-lease-revoke`) or acknowledges it and writes on (`ack-then-write`); with `views`
/// (TCP NICs, the holder on the same host) the holder also keeps its view of revoked memory
/// (`keep-views`). The others break what only the raw stress drives; the refusal says so.
pub fn agent_faults(
    inject: Option<Inject>,
    views: bool,
) -> std::result::Result<(Option<Fault>, Option<Fault>), String> {
    match inject {
        None => Ok((None, None)),
        Some(Inject::Rdma(f @ Fault::EarlyFence)) => Ok((Some(f), None)),
        Some(Inject::Rdma(f @ (Fault::IgnoreLeaseRevoke | Fault::AckThenWrite))) => {
            Ok((None, Some(f)))
        }
        Some(Inject::Rdma(f @ Fault::KeepViews)) if views => Ok((None, Some(f))),
        Some(Inject::Rdma(Fault::KeepViews)) => Err(
            "--inject keep-views breaks the TCP backend's shared-memory path: run it with \
             `stress revoke --backend tcp` (host memory)"
                .into(),
        ),
        Some(i) => Err(format!(
            "--inject {i} on the agents: this stress runs early-fence (the owner's NIC), \
             ignore-lease-revoke and ack-then-write (the holder's); the raw stress runs every \
             fault"
        )),
    }
}

/// The holder on a thread of this process.
struct ThreadHolder {
    handle: Option<JoinHandle<Result<HolderReport>>>,
}

impl ThreadHolder {
    fn join(&mut self) -> Option<std::result::Result<HolderReport, String>> {
        let h = self.handle.take()?;
        Some(match h.join() {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(format!("it failed: {e}")),
            Err(_) => Err("it panicked".into()),
        })
    }
}

impl Holder for ThreadHolder {
    fn describe(&self) -> String {
        "stress-holder, a thread on the same testbed".into()
    }

    fn gone(&mut self) -> Option<std::result::Result<HolderReport, String>> {
        if !self.handle.as_ref().is_some_and(JoinHandle::is_finished) {
            return None;
        }
        self.join()
    }

    fn report(&mut self, limit: Duration) -> HolderReport {
        let due = Instant::now() + limit;
        while self.handle.as_ref().is_some_and(|h| !h.is_finished()) && Instant::now() < due {
            std::thread::sleep(Duration::from_millis(10));
        }
        let failed = |why: String| HolderReport {
            failed: 1,
            failures: vec![why],
            ..HolderReport::default()
        };
        if self.handle.as_ref().is_some_and(|h| !h.is_finished()) {
            // A hang is a result: the thread is left behind, and the run fails.
            self.handle = None;
            return failed(format!(
                "the holder did not end within {limit:?} of the owner's exit: it hung"
            ));
        }
        match self.join() {
            Some(Ok(r)) => r,
            Some(Err(why)) => failed(format!("the holder: {why}")),
            None => failed("the holder ended during the run".into()),
        }
    }
}

/// Run the agent-level stress on a simulated testbed of its own: the owner on `nic0` exports
/// `gpu0`'s memory ([`ExporterKind::Gpu`]) or host memory, the holder on `nic1` writes into it.
pub fn run_agents(cfg: &StressConfig, progress: &(dyn Fn(u64) + Sync)) -> Result<StressReport> {
    let (owner_fault, holder_fault) = agent_faults(cfg.inject, false).map_err(|why| {
        Error::invalid(
            "stress revoke on the agents",
            "inject",
            cfg.inject.map_or_else(String::new, |i| i.to_string()),
            why,
        )
    })?;
    let testbed: Arc<Testbed> = Testbed::builtin()?;
    let owner = Agent::builder("stress-owner")
        .testbed(testbed.clone())
        .nics(["nic0"])
        .inject(owner_fault)
        .stall_timeout(Duration::from_secs(60))
        .build()?;
    let holder_agent = Agent::builder("stress-holder")
        .testbed(testbed.clone())
        .nics(["nic1"])
        .inject(holder_fault)
        .stall_timeout(HOLDER_STALL)
        .build()?;
    let addr = owner.listen_addr().to_string();
    let (slots, size) = (cfg.qps, cfg.size);
    let handle = std::thread::Builder::new()
        .name("stress-holder".into())
        .spawn(move || {
            let peer = holder_agent.connect_to(&addr)?;
            hold(&holder_agent, &peer, slots, size, HOLDER_STALL)
        })
        .map_err(|e| Error::setup("stress-holder", format!("no thread for the holder: {e}")))?;
    let exporter = cfg.exporter;
    let alloc = move |a: &Agent, name: &str, len: u64| match exporter {
        ExporterKind::Gpu => a.alloc_gpu(name, "gpu0", len),
        ExporterKind::Host => a.alloc_host(name, len),
    };
    let mut r = own(
        owner,
        cfg,
        "sim (agents)",
        &alloc,
        &mut ThreadHolder {
            handle: Some(handle),
        },
        progress,
    )?;
    // The fabric saw every DMA of the run: its oracle judges them apart from what the agents
    // counted.
    let verdict = testbed.fabric().oracle().verdict();
    r.failures
        .extend(verdict.violations.iter().take(5).cloned());
    r.oracle = Some(verdict);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stress::config::test_config;

    fn cfg(exporter: ExporterKind, inject: Option<Inject>) -> StressConfig {
        let mut c = test_config(4, 1, 256 << 10);
        c.revokes = 10;
        c.deadline = Duration::from_millis(500);
        c.exporter = exporter;
        c.inject = inject;
        c
    }

    #[test]
    fn the_agents_free_gpu_and_host_memory_under_writes_and_lose_nothing() {
        for exporter in [ExporterKind::Gpu, ExporterKind::Host] {
            let r = run_agents(&cfg(exporter, None), &|_| {}).unwrap();
            assert!(r.is_clean(), "{exporter:?}: {:?}", r.violations());
            assert_eq!(r.revokes, 10);
            assert!(r.bytes_verified > 0 && r.posted > 0, "{r:?}");
            // The fabric's oracle watched every free (it is not the agents' own count).
            let o = r.oracle.as_ref().expect("the testbed's oracle");
            assert!(o.acks >= r.revokes, "{o:?}");
        }
    }

    #[test]
    fn a_holder_that_writes_after_its_ack_is_caught_and_the_run_stops_at_once() {
        for exporter in [ExporterKind::Gpu, ExporterKind::Host] {
            let c = cfg(exporter, Some(Inject::Rdma(Fault::AckThenWrite)));
            let t = Instant::now();
            let r = run_agents(&c, &|_| {}).unwrap();
            let v = r.violations().join("; ");
            assert!(v.contains("post_ack_accesses"), "{exporter:?}: {v}");
            // Every queue pair broke at the zapped region: the holder stopped and said why,
            // and the owner did not wait out its traffic deadline.
            let why = r.stopped_early.as_deref().unwrap_or_default();
            assert!(why.contains("every queue pair"), "{exporter:?}: {v}");
            assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        }
    }

    #[test]
    fn faults_the_agents_cannot_inject_are_refused_by_name() {
        let e = run_agents(
            &cfg(ExporterKind::Gpu, Some(Inject::FreeBeforeAck)),
            &|_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("free-before-ack") && e.contains("raw stress"),
            "{e}"
        );
    }
}
