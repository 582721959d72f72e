//! Holding transfers mid-way, for tests of revoke handling: with a [`TransferHold`] every
//! transfer of the agent posts its first requests and waits, so a free or deregistration
//! made then is certain to meet it — no tuned depths, chunk sizes or sleeps.

use std::sync::Weak;
use std::time::{Duration, Instant};

use super::{Status, Transfer};
use crate::error::{Error, Result};
use crate::progress::ProgressEngine;

/// While it lives, every transfer of its agent posts at most `after` requests and then waits
/// ([`crate::Agent::hold_transfers`]). A held transfer ends only when memory it uses is revoked,
/// freed or deregistered on either side — with [`Error::Revoked`], as it would mid-flight — or
/// its peer is lost; otherwise it goes on once the hold is released (dropped). It is never
/// reported stalled while held.
#[derive(Debug)]
#[must_use = "the hold ends when it is dropped"]
pub struct TransferHold {
    pub(crate) engine: Weak<ProgressEngine>,
    pub(crate) after: u64,
}

impl TransferHold {
    /// Wait up to `timeout` until `t` has reached the hold — its first requests (as many as
    /// the hold lets through, or all of a smaller transfer) completed — or ended. Then a free
    /// meets it half done.
    pub fn wait_held(&self, t: &Transfer, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let want = self.after.min(t.requests() as u64);
        loop {
            match t.status() {
                Status::InProgress { done, .. } if done >= want => return Ok(()),
                Status::InProgress { .. } => {}
                Status::Done | Status::Failed(_) => return Ok(()),
            }
            if Instant::now() >= deadline {
                return Err(Error::WaitTimeout {
                    transfer: t.id(),
                    peer: t.state.peer.name.clone(),
                    waited: timeout,
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Let the held transfers go on (as dropping the hold does).
    pub fn release(self) {}
}

impl Drop for TransferHold {
    fn drop(&mut self) {
        if let Some(e) = self.engine.upgrade() {
            e.set_hold(u64::MAX);
        }
    }
}
