//! What an import asks of the quiesce machinery: the policy a revoke quiesces queue pairs by,
//! the import's options, and the counters a device reports.

use std::time::Duration;

use serde::Serialize;

use crate::access::MrAccess;
use dmaplane_core::ImporterKind;

/// How an attachment's queue pairs are quiesced on revoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "policy", rename_all = "kebab-case")]
pub enum QuiescePolicy {
    /// Stop affected QPs at the next message boundary (the message under way completes), then
    /// flush what did not start; flush anyway at `deadline`. Safe for any request size.
    Boundary { deadline: Duration },
    /// Move affected QPs to ERR at once: fastest, but a multi-packet message under way is cut,
    /// which breaks its connection.
    Flush,
    /// Move them to SQD and let what was posted finish, up to `deadline`; then flush.
    Drain { deadline: Duration },
}

impl QuiescePolicy {
    /// The default: [`QuiescePolicy::Boundary`], flushing after 100 ms.
    pub const DEFAULT: QuiescePolicy = QuiescePolicy::Boundary {
        deadline: Duration::from_millis(100),
    };

    /// A policy from a peer: its deadline is bounded.
    pub(crate) fn bounded(self) -> QuiescePolicy {
        let cap = |d: Duration| d.min(Duration::from_secs(10));
        match self {
            QuiescePolicy::Boundary { deadline } => QuiescePolicy::Boundary {
                deadline: cap(deadline),
            },
            QuiescePolicy::Drain { deadline } => QuiescePolicy::Drain {
                deadline: cap(deadline),
            },
            QuiescePolicy::Flush => QuiescePolicy::Flush,
        }
    }
}

impl Default for QuiescePolicy {
    fn default() -> Self {
        QuiescePolicy::DEFAULT
    }
}

/// Options for [`crate::Pd::import`].
#[derive(Debug, Clone, Copy)]
pub struct ImportOptions {
    pub access: MrAccess,
    pub kind: ImporterKind,
    pub policy: QuiescePolicy,
    /// Bring flushed QPs back to RTS once their completions are reaped.
    pub recover: bool,
    /// Register only bytes `[offset, offset + len)` of the export (`Some((offset, len))`, both
    /// multiples of the export's granule), not all of it; the MR's iova is the range's first
    /// address. A revoke of the export still invalidates it.
    pub range: Option<(u64, u64)>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            access: MrAccess::ALL,
            kind: ImporterKind::Pinned,
            policy: QuiescePolicy::DEFAULT,
            recover: true,
            range: None,
        }
    }
}

/// How an imported MR came to be.
#[derive(Debug, Clone)]
pub(crate) struct ImportInfo {
    pub(crate) summary: String,
    pub(crate) opts: ImportOptions,
}

/// Counters of the quiesce machinery, per device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QuiesceStats {
    pub invalidations: u64,
    /// QPs stopped at a message boundary (then flushed).
    pub qps_stopped: u64,
    pub qps_flushed: u64,
    pub qps_drained: u64,
    pub drains_timed_out: u64,
    pub leases_revoked: u64,
    pub lease_acks: u64,
    pub holders_cut_off: u64,
    /// Lease messages from peers refused: a grant past [`crate::Device::limit_leases`], with
    /// unknown access bits or a range that wraps; a control message naming another device, or
    /// revoking a lease granted over another link.
    pub lease_messages_refused: u64,
}
