//! Where threads run: the CPUs this process may use, pinning the calling thread to some of them,
//! and lowering its priority.
//!
//! A simulated device's engine stands in for hardware that has processors of its own. On a small
//! machine it competes with the host's threads for the same cores, and what it measures turns
//! into a measure of the scheduler instead: a revoke that waits for an engine preempted by the
//! revoking thread itself, a completion that waits for a time slice. [`Placement`] splits the
//! machine so that the engines have cores of their own, as hardware would.

use std::io;

use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};

/// The CPUs the calling thread may run on, in ascending order.
pub fn allowed() -> io::Result<Vec<usize>> {
    let set = sched_getaffinity(None)?;
    Ok((0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect())
}

/// Restrict the calling thread to `cpus`. An empty list, or a CPU this process may not use, is
/// an error that names it.
pub fn pin_current(cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cpus: empty list: a thread needs at least one CPU",
        ));
    }
    let mut set = CpuSet::new();
    for &c in cpus {
        if c >= CpuSet::MAX_CPU {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "cpus: CPU {c} is beyond the highest CPU number {}",
                    CpuSet::MAX_CPU - 1
                ),
            ));
        }
        set.set(c);
    }
    sched_setaffinity(None, &set).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cpus: cannot run on {cpus:?}: {e}"),
        )
    })
}

/// Give the calling thread the lowest priority (nice 19): it runs on whatever CPU time the
/// others leave. For load generators, so that they do not delay what they load.
pub fn background_current() -> io::Result<()> {
    // On Linux the nice value is per thread: `None` (0) is the calling thread.
    rustix::process::setpriority_process(None, 19).map_err(io::Error::from)
}

/// How a run splits the machine between simulated device engines and host threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// CPUs for the engines of simulated devices.
    pub engines: Vec<usize>,
    /// CPUs for everything else (the host's threads).
    pub host: Vec<usize>,
}

impl Placement {
    /// Split `cpus`: the last `engines` of them for device engines, the rest for the host. None
    /// when that would leave either side without a CPU: then nothing is pinned.
    pub fn split(cpus: &[usize], engines: usize) -> Option<Placement> {
        if engines == 0 || cpus.len() <= engines {
            return None;
        }
        let (host, eng) = cpus.split_at(cpus.len() - engines);
        Some(Placement {
            engines: eng.to_vec(),
            host: host.to_vec(),
        })
    }

    /// [`Placement::split`] of the CPUs this process may use: one core for the engines up to
    /// 3 CPUs, a quarter of them (at most 4) above that.
    pub fn auto() -> Option<Placement> {
        let cpus = allowed().ok()?;
        let engines = (cpus.len() / 4).clamp(1, 4);
        Placement::split(&cpus, engines)
    }
}

/// Pin the calling thread to `cpus`; a failure leaves it to the scheduler, with a warning
/// naming `what`.
pub fn pin_thread(cpus: &[usize], what: &str) {
    if let Err(e) = pin_current(cpus) {
        tracing::warn!(error = %e, "{what} left unpinned");
    }
}

/// Keep the calling thread off the device engines' CPUs (nothing without a placement).
pub fn pin_host_thread(placement: Option<&Placement>) {
    if let Some(p) = placement {
        pin_thread(&p.host, "host thread");
    }
}

/// How a run was placed, for reports.
pub fn placement_note(placement: Option<&Placement>) -> String {
    match placement {
        Some(p) => p.to_string(),
        None => "threads left to the scheduler (NIC engines share cores with the host)".into(),
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "device engines on CPU {}, host threads on CPU {}",
            list(&self.engines),
            list(&self.host)
        )
    }
}

fn list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_both_sides_non_empty() {
        assert_eq!(Placement::split(&[0], 1), None);
        assert_eq!(Placement::split(&[0, 1], 0), None);
        assert_eq!(Placement::split(&[0, 1], 2), None);
        let p = Placement::split(&[0, 1, 2, 5], 1).unwrap();
        assert_eq!(p.engines, vec![5]);
        assert_eq!(p.host, vec![0, 1, 2]);
        assert_eq!(
            p.to_string(),
            "device engines on CPU 5, host threads on CPU 0,1,2"
        );
    }

    #[test]
    fn pinning_follows_the_allowed_set() {
        let cpus = allowed().unwrap();
        assert!(!cpus.is_empty());
        // In a thread of its own: the test harness's threads keep their affinity.
        let first = cpus[0];
        let got = std::thread::spawn(move || {
            pin_current(&[first]).unwrap();
            allowed().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(got, vec![first]);
        let e = pin_current(&[]).unwrap_err();
        assert!(e.to_string().contains("cpus: empty list"), "{e}");
        let e = pin_current(&[CpuSet::MAX_CPU + 3]).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("CPU {}", CpuSet::MAX_CPU + 3)),
            "{e}"
        );
    }

    #[test]
    fn background_lowers_only_the_calling_thread() {
        let before = rustix::process::getpriority_process(None).unwrap();
        let nice = std::thread::spawn(|| {
            background_current().unwrap();
            rustix::process::getpriority_process(None).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(nice, 19);
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), before);
    }
}
