//! The drive's thread: the simulated drive's reaper, or the kernel engine's, which owns the
//! io_uring.

use std::sync::Weak;
use std::time::Duration;

use dmaplane_storage::Ring;

use super::{Drive, DriveBackend, Job};
use crate::sync::{lock, wait_timeout};

/// The simulated drive's thread: reap, account, queue more, until the agent lets go of the
/// drive.
pub(super) fn reaper(weak: &Weak<Drive>) {
    let mut out = Vec::new();
    loop {
        let Some(d) = weak.upgrade() else { return };
        if let DriveBackend::Sim(nvme) = &d.engine {
            nvme.reap(&mut out, Duration::from_millis(20));
        }
        let mut st = lock(&d.st);
        for c in out.drain(..) {
            d.complete(&mut st, &c);
        }
        d.pump(&mut st, None);
        d.release(&mut st, None);
        d.unlock(st);
    }
}

/// How long the kernel engine's thread waits for a completion before it looks at new work,
/// and, idle, for work before it looks at the exporters' revokes.
const RING_WAIT: Duration = Duration::from_millis(1);
const RING_IDLE: Duration = Duration::from_millis(5);

/// The kernel engine's thread: it owns the ring — lets go of imports nothing uses any more,
/// runs the jobs, queues the transfers' pieces, reaps (which also quiesces revoked imports) —
/// until the agent lets go of the drive; then the ring drains as it drops.
pub(super) fn ring_thread(weak: &Weak<Drive>, mut ring: Ring) {
    let mut out = Vec::new();
    loop {
        let Some(d) = weak.upgrade() else { return };
        // Releases first: a job's import may take a slot a release would then unregister.
        let mut st = lock(&d.st);
        d.release(&mut st, Some(&mut ring));
        d.unlock(st);
        let jobs: Vec<Job> = lock(&d.jobs).drain(..).collect();
        for job in jobs {
            match job {
                Job::Import {
                    name,
                    attach,
                    reply,
                } => {
                    if let Err(std::sync::mpsc::SendError(Ok(b))) =
                        reply.send(ring.import(&name, attach))
                    {
                        // Nobody waits for it any more (the asker timed out): let it go.
                        let _ = ring.release(b);
                    }
                }
                Job::AddFile { file, reply } => {
                    if let Err(std::sync::mpsc::SendError(Ok(id))) = reply.send(ring.add_file(file))
                    {
                        let _ = ring.remove_file(id);
                    }
                }
                Job::RemoveFile(id) => {
                    if let Err(e) = ring.remove_file(id) {
                        tracing::warn!(drive = %d.name, error = %e, "removing a file from the ring");
                    }
                }
            }
        }
        let mut st = lock(&d.st);
        d.pump(&mut st, Some(&mut ring));
        let idle = ring.in_flight() == 0;
        if idle && lock(&d.jobs).is_empty() {
            // Nothing in flight: sleep until work comes, then look at revokes anyway.
            st = wait_timeout(&d.work, st, RING_IDLE).0;
        }
        d.unlock(st);
        let reaped = ring.reap_within(&mut out, if idle { Duration::ZERO } else { RING_WAIT });
        let mut st = lock(&d.st);
        if let Err(e) = reaped {
            tracing::error!(drive = %d.name, error = %e, "reaping the ring");
        }
        for c in out.drain(..) {
            d.complete(&mut st, &c);
        }
        d.unlock(st);
    }
}
