//! Transfers: a batch of WRITEs or READs between local and remote descriptors, split into
//! chunks, striped over the queue pairs of the best paths, run by the progress thread.
//!
//! A transfer ends exactly once — done, or failed with an error naming what went wrong — and
//! never hangs: a revoke or free of either side's memory ends it with [`Error::Revoked`], a lost
//! peer with [`Error::PeerLost`], silence with [`Error::Stalled`] after the stall timeout.
//! [`Transfer::wait`] blocks, [`Transfer::status`] looks, and `Transfer` is a `Future` (its own
//! waker, no runtime needed).

mod hold;
mod prepared;
pub(crate) mod route;
pub(crate) mod state;

pub use hold::TransferHold;
pub use prepared::Prepared;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::progress::ProgressEngine;
use crate::sync::{lock, wait_timeout};

pub(crate) use state::Op;
pub use state::Status;
use state::TransferState;

/// A transfer under way. Dropping the handle does not cancel it.
#[derive(Clone)]
pub struct Transfer {
    pub(crate) state: Arc<TransferState>,
    /// The agent's engine, which a waiter drives while it spins.
    pub(crate) engine: Weak<ProgressEngine>,
}

impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfer")
            .field("id", &self.state.id)
            .field("peer", &self.state.peer.name)
            .field("requests", &self.state.chunks.len())
            .field("status", &self.status())
            .finish()
    }
}

impl Transfer {
    /// The transfer's id: unique within its agent, and what the peer's
    /// [`crate::Notification::transfer`] carries when it came with a notification.
    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// The peer it moves data with.
    pub fn peer(&self) -> &str {
        &self.state.peer.name
    }

    /// Requests the transfer was split into.
    pub fn requests(&self) -> usize {
        self.state.chunks.len()
    }

    /// Bytes it moves.
    pub fn bytes(&self) -> u64 {
        self.state.bytes
    }

    /// Where the transfer stands now, without blocking.
    pub fn status(&self) -> Status {
        match &lock(&self.state.outcome).status {
            Status::InProgress { total, .. } => Status::InProgress {
                done: self.state.done.load(std::sync::atomic::Ordering::Relaxed),
                total: *total,
            },
            other => other.clone(),
        }
    }

    /// Block until it ends, or `timeout` passes ([`Error::WaitTimeout`]; the transfer goes
    /// on). The stall timeout bounds every transfer, so a long `timeout` never hangs.
    /// Returns `Ok(())` once it is done, or the error it ended with.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dmaplane::{Agent, Status, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let testbed = Testbed::builtin()?;
    /// let a = Agent::builder("a").testbed(testbed.clone()).nics(["nic0"]).build()?;
    /// let b = Agent::builder("b").testbed(testbed).nics(["nic1"]).build()?;
    /// let src = a.alloc_host("src", 64 << 10)?;
    /// let dst = b.alloc_host("dst", 64 << 10)?;
    /// src.write(0, &[9u8; 4096])?;
    /// let (ra, rb) = (a.register(&src)?, b.register(&dst)?);
    /// let peer = a.connect(&b.metadata_blob()?)?;
    /// let t = a.write(&peer, &[ra.desc(0, 4096)?], &[peer.desc(rb.id(), 0, 4096)?], None)?;
    /// t.wait(Duration::from_secs(10))?;
    /// assert!(matches!(t.status(), Status::Done));
    /// assert_eq!(t.bytes(), 4096);
    /// let mut got = [0u8; 4096];
    /// dst.read(0, &mut got)?;
    /// assert_eq!(got, [9u8; 4096]);
    /// # Ok(()) }
    /// ```
    pub fn wait(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let deadline = start + timeout;
        // First drive the engine from this thread, as a poller would: a short transfer ends
        // without a thread hand-off. Then sleep and leave it to the progress thread.
        let spin_until = start + WAIT_SPIN.min(timeout);
        if let Some(e) = self.engine.upgrade() {
            let driving = e.driving();
            let mut idle = 0u32;
            while Instant::now() < spin_until {
                if let Some(r) = self.outcome() {
                    return r;
                }
                if e.try_step() {
                    idle = 0;
                } else {
                    // Spin as a poller does; now and then let the NIC (a simulated one is a
                    // thread) have the core, without a system call per empty poll.
                    idle += 1;
                    if idle.is_multiple_of(4) {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
            // Still under way: the progress thread takes it from here.
            drop(driving);
            e.hand_off();
        }
        self.sleep_until(deadline, timeout)
    }

    /// Its status after driving the engine once from this thread, as a poller does (NIXL's
    /// `check_xfer_state`, UCX's progress call): a short transfer polled in a loop ends without
    /// waiting for the progress thread, which still completes it when nobody polls.
    ///
    /// ```
    /// use dmaplane::{Agent, Status, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let testbed = Testbed::builtin()?;
    /// let a = Agent::builder("a").testbed(testbed.clone()).nics(["nic0"]).build()?;
    /// let b = Agent::builder("b").testbed(testbed).nics(["nic1"]).build()?;
    /// let (src, dst) = (a.alloc_host("src", 4096)?, b.alloc_host("dst", 4096)?);
    /// src.write(0, &[7u8; 4096])?;
    /// let (ra, rb) = (a.register(&src)?, b.register(&dst)?);
    /// let peer = a.connect(&b.metadata_blob()?)?;
    /// let t = a.write(&peer, &[ra.all()], &[peer.desc(rb.id(), 0, 4096)?], None)?;
    /// let status = loop {
    ///     match t.poll() {
    ///         Status::InProgress { .. } => std::hint::spin_loop(),
    ///         ended => break ended,
    ///     }
    /// };
    /// assert!(matches!(status, Status::Done));
    /// let mut got = [0u8; 4096];
    /// dst.read(0, &mut got)?;
    /// assert_eq!(got, [7u8; 4096]);
    /// # Ok(()) }
    /// ```
    pub fn poll(&self) -> Status {
        let s = self.status();
        if !matches!(s, Status::InProgress { .. }) {
            return s;
        }
        if let Some(e) = self.engine.upgrade() {
            let _driving = e.driving();
            e.try_step();
        }
        self.status()
    }

    /// [`Transfer::wait`] without driving the engine first: the thread sleeps at once and the
    /// progress thread completes the transfer. For waits known to be long (a pipeline stage of
    /// many megabytes), where a spinning waiter would take a core from the devices.
    pub fn wait_sleeping(&self, timeout: Duration) -> Result<()> {
        self.sleep_until(Instant::now() + timeout, timeout)
    }

    fn sleep_until(&self, deadline: Instant, timeout: Duration) -> Result<()> {
        let mut o = lock(&self.state.outcome);
        loop {
            match &o.status {
                Status::Done => return Ok(()),
                Status::Failed(e) => return Err(e.clone()),
                Status::InProgress { .. } => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::WaitTimeout {
                    transfer: self.state.id,
                    peer: self.state.peer.name.clone(),
                    waited: timeout,
                });
            }
            o.sleepers += 1;
            o = wait_timeout(&self.state.cv, o, left).0;
            o.sleepers -= 1;
        }
    }
}

impl Transfer {
    /// The result, once the transfer ended.
    fn outcome(&self) -> Option<Result<()>> {
        match &lock(&self.state.outcome).status {
            Status::Done => Some(Ok(())),
            Status::Failed(e) => Some(Err(e.clone())),
            Status::InProgress { .. } => None,
        }
    }
}

/// How long [`Transfer::wait`] drives the engine itself before it sleeps.
const WAIT_SPIN: Duration = Duration::from_micros(500);

impl Future for Transfer {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let mut o = lock(&self.state.outcome);
        match &o.status {
            Status::Done => Poll::Ready(Ok(())),
            Status::Failed(e) => Poll::Ready(Err(e.clone())),
            Status::InProgress { .. } => {
                o.waker = Some(cx.waker().clone());
                drop(o);
                // Nobody drives an awaited transfer: the progress thread must not wait out a
                // blocking waiter's grace period.
                if let Some(e) = self.engine.upgrade() {
                    e.hand_off();
                }
                Poll::Pending
            }
        }
    }
}
