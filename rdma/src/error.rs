//! Errors from every layer of the RDMA importer. Each names the object, the field and the value.

use std::sync::Arc;

use crate::access::MrAccess;
use crate::qp_state::QpState;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RdmaError {
    #[error("no RDMA device: {why}")]
    NoDevice { why: String },
    #[error("RDMA device {name:?} not found (available: {available})")]
    UnknownDevice { name: String, available: String },
    #[error("{op} on {device}: {why}")]
    Backend {
        device: String,
        op: &'static str,
        why: String,
    },
    #[error("{op} on {device} is not supported by the provider (EOPNOTSUPP): {why}")]
    Unsupported {
        device: String,
        op: &'static str,
        why: String,
    },
    /// The last registration a negotiation tried failed, after earlier ones were refused.
    #[error("{source} (tried before: {tried})")]
    FellBack {
        tried: String,
        #[source]
        source: Box<RdmaError>,
    },
    #[error("QP {qpn:#x}: illegal transition {from} -> {to}")]
    IllegalTransition {
        qpn: u32,
        from: QpState,
        to: QpState,
    },
    #[error("QP {qpn:#x}: {from} -> {to} needs attribute `{attr}` (not in the mask)")]
    MissingAttr {
        qpn: u32,
        from: QpState,
        to: QpState,
        attr: &'static str,
    },
    #[error("QP {qpn:#x}: attribute `{attr}` = {value}: {why}")]
    InvalidAttr {
        qpn: u32,
        attr: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("QP {qpn:#x}: cannot post {op} in state {state}")]
    WrongState {
        qpn: u32,
        state: QpState,
        op: &'static str,
    },
    #[error("QP {qpn:#x}: {queue} queue full ({depth} outstanding)")]
    QueueFull {
        qpn: u32,
        queue: &'static str,
        depth: u32,
    },
    #[error("QP {qpn:#x}: work request {wr_id}: {n} scatter/gather entries (max {max})")]
    TooManySge {
        qpn: u32,
        wr_id: u64,
        n: usize,
        max: usize,
    },
    /// The provider took the first `posted` requests of a batch (each of them will complete,
    /// exactly once) and refused the one after them: that one and the rest were not posted.
    #[error(
        "QP {qpn:#x}: {posted} of {of} requests posted (they will complete); work request \
         {refused} and the {rest} after it were not: {source}",
        rest = of.saturating_sub(*posted + 1)
    )]
    PartlyPosted {
        qpn: u32,
        posted: usize,
        of: usize,
        /// The caller's `wr_id` of the first request not posted.
        refused: u64,
        source: Box<RdmaError>,
    },
    #[error("QP {qpn:#x}: work request {wr_id}: {op} needs {what}")]
    BadWorkRequest {
        qpn: u32,
        wr_id: u64,
        op: &'static str,
        what: String,
    },
    #[error("{what}: no memory region with {key_kind} {key:#x}")]
    BadKey {
        what: String,
        key_kind: &'static str,
        key: u32,
    },
    #[error("{what}: [{addr:#x}, +{len:#x}) is outside MR {key:#x} [{start:#x}, +{mr_len:#x})")]
    OutOfBounds {
        what: String,
        key: u32,
        addr: u64,
        len: u64,
        start: u64,
        mr_len: u64,
    },
    #[error("{what}: MR {key:#x} allows {have}, the operation needs {need}")]
    AccessDenied {
        what: String,
        key: u32,
        have: MrAccess,
        need: MrAccess,
    },
    #[error("{what} was revoked (epoch {epoch}): {why}")]
    Revoked {
        what: String,
        epoch: u64,
        why: String,
    },
    #[error("memory registration `{field}` = {value}: {why}")]
    InvalidRegistration {
        field: &'static str,
        value: String,
        why: String,
    },
    #[error(transparent)]
    Attach(#[from] dmaplane_core::AttachError),
    #[error(transparent)]
    List(#[from] dmaplane_core::AddrListError),
    #[error("connection {what}: {why}")]
    Connection { what: String, why: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("asynchronous event on {device}: {event}")]
    AsyncEvent { device: String, event: String },
    #[error("timed out after {ms} ms waiting for {what}")]
    Timeout { what: String, ms: u64 },
    #[error("{what}: longer than the {limit} bytes a message may take (no newline within them)")]
    MessageTooLong { what: String, limit: usize },
}

impl RdmaError {
    /// How many requests of the failed post were posted anyway (and will complete): the
    /// prefix of [`RdmaError::PartlyPosted`], 0 for every other error.
    pub fn posted_prefix(&self) -> usize {
        match self {
            RdmaError::PartlyPosted { posted, .. } => *posted,
            _ => 0,
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> RdmaError {
        RdmaError::Io {
            what: what.into(),
            source: Arc::new(source),
        }
    }
}

pub type Result<T, E = RdmaError> = std::result::Result<T, E>;
