//! A prepared transfer: a batch checked, routed and split into requests once
//! ([`crate::Agent::prepare_read`], [`crate::Agent::prepare_write`]), then posted as often as
//! wanted — each post a new [`Transfer`], with its own notification.

use std::sync::Weak;

use super::Transfer;
use super::route::{Plan, submit};
use crate::error::{Error, Result};
use crate::inner::AgentInner;
use crate::notify::Notify;

/// A batch ready to post again and again. It holds the registrations it names (they stay
/// registered while it lives); a post after memory on either side is gone is refused with
/// [`Error::Revoked`], after the peer is lost with [`Error::PeerLost`].
pub struct Prepared {
    pub(crate) agent: Weak<AgentInner>,
    pub(crate) plan: Plan,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("peer", &self.plan.peer.name)
            .field("requests", &self.plan.requests())
            .field("bytes", &self.plan.bytes())
            .finish()
    }
}

impl Prepared {
    /// Post it: a new transfer of the same requests; with a notification, the peer gets it
    /// once this post's data moved (see [`crate::notify`] for the ordering).
    pub fn post(&self, notify: Option<Notify>) -> Result<Transfer> {
        let Some(s) = self.agent.upgrade() else {
            return Err(Error::setup(
                "(dropped)",
                "the agent of this prepared transfer was dropped",
            ));
        };
        submit(&s, &self.plan, notify)
    }

    /// Requests each post makes.
    pub fn requests(&self) -> usize {
        self.plan.requests()
    }

    /// Bytes each post moves.
    pub fn bytes(&self) -> u64 {
        self.plan.bytes()
    }

    /// The peer it moves data with.
    pub fn peer(&self) -> &str {
        &self.plan.peer.name
    }
}
