//! An agent's counters, as [`crate::Agent::stats`] reports them.

use crate::cache::CacheStats;
use crate::limits::Refusals;

/// Counters of an agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AgentStats {
    /// The registration cache's counters.
    pub cache: CacheStats,
    /// Transfers handed to the progress engine (by [`crate::Agent::write`] and [`crate::Agent::read`]).
    pub transfers_started: u64,
    /// Transfers that ended done (every request completed, the notification if any sent).
    pub transfers_done: u64,
    /// Transfers that ended with an error (revoked, failed, stalled, peer lost).
    pub transfers_failed: u64,
    /// Requests (chunks) posted to queue pairs.
    pub requests_posted: u64,
    /// Completions reaped for them (successful or not): `requests_posted` once nothing is in
    /// flight — every posted request gets exactly one.
    pub requests_completed: u64,
    /// Of those, completions with an error (flushed by a revoke's quiesce, or failed).
    pub requests_failed: u64,
    /// Bytes of the transfers that ended done.
    pub bytes_moved: u64,
    /// Notifications queued to peers when their WRITE ended done.
    pub notifications_sent: u64,
    /// Notifications received from peers and queued (oversized ones, and those beyond a
    /// peer's share of the queue, are refused and not counted).
    pub notifications_received: u64,
    /// Peers' lease holders this agent's NICs cut off because they never acknowledged a
    /// revoke (see [`crate::Event::LeaseCutOff`]).
    pub holders_cut_off: u64,
    /// What peers sent that was refused, by the check it failed or the limit it would have
    /// gone past ([`crate::limits`]); [`Refusals::total`] sums them.
    pub refused: Refusals,
    /// Connections the handshake listener is serving now (at most
    /// [`crate::Limits::handshakes`]): each slot is given back when its handshake ends,
    /// however it ends.
    pub handshakes_under_way: u64,
}
