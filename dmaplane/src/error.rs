//! The Agent's errors: each names the agent, the peer, the region or the field it is about.

use std::time::Duration;

use dmaplane_core::Invalid;
use dmaplane_gpu::GpuError;
use dmaplane_rdma::RdmaError;

/// Which end of a transfer an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    /// This agent's memory.
    Local,
    /// The peer's memory.
    Remote,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Local => "local",
            Side::Remote => "remote",
        })
    }
}

/// Everything that can go wrong in this crate. The message names the agent, peer, region or
/// field concerned.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A caller-supplied value is wrong: what it was for, the field, the value and why.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The memory a transfer touches was revoked, freed or moved: nothing was lost (every
    /// request completed once) and nothing touched it after the exporter's ack.
    #[error("{side} region {region} (\"{name}\") was revoked at epoch {epoch}: {why}")]
    Revoked {
        /// Whose memory was revoked: this agent's or the peer's.
        side: Side,
        /// The registration id, on that side.
        region: u32,
        /// The memory's name (empty when a remote registration is no longer known).
        name: String,
        /// The export epoch at which it was revoked.
        epoch: u64,
        /// How the transfer met the revoke.
        why: String,
    },
    /// The peer went away (its control connection closed).
    #[error("peer {peer} was lost: {why}")]
    PeerLost {
        /// The peer agent's name.
        peer: String,
        /// Why the connection ended (e.g. `it said bye`).
        why: String,
    },
    /// A transfer made no progress for the stall timeout.
    #[error(
        "transfer {transfer} to {peer} stalled: no completion for {:?}, {outstanding} of {total} \
         requests outstanding",
        stall
    )]
    Stalled {
        /// The transfer's id.
        transfer: u64,
        /// The peer agent's name.
        peer: String,
        /// Requests posted and not completed when it was reported.
        outstanding: u64,
        /// Requests the transfer was split into.
        total: u64,
        /// The agent's stall timeout.
        stall: Duration,
    },
    /// A request completed with an error that is not a revoke.
    #[error("transfer {transfer} to {peer}: request {chunk} completed with {status}")]
    Failed {
        /// The transfer's id.
        transfer: u64,
        /// The peer agent's name.
        peer: String,
        /// The index of the request whose post failed (0 when an error completion or a refused
        /// post reported it).
        chunk: u64,
        /// The completion status or posting error, as text.
        status: String,
    },
    /// `Transfer::wait` gave up (the transfer goes on; wait again or drop it).
    #[error("transfer {transfer} to {peer}: not done after {:?}", waited)]
    WaitTimeout {
        /// The transfer's id.
        transfer: u64,
        /// The peer agent's name.
        peer: String,
        /// The timeout given to `wait`.
        waited: Duration,
    },
    /// A metadata blob that cannot be read.
    #[error("metadata blob: {0}")]
    Metadata(String),
    /// The handshake with a peer failed.
    #[error("handshake with {peer}: {why}")]
    Handshake {
        /// The peer agent's name, or the address dialled when its name is not known yet.
        peer: String,
        /// What went wrong (a refusal, a version mismatch, a missing lease link, ...).
        why: String,
    },
    /// Setting up the agent failed.
    #[error("agent {agent}: {why}")]
    Setup {
        /// The agent's name (for a [`crate::Memory::free`] that missed its deadline, the
        /// memory's).
        agent: String,
        /// What failed.
        why: String,
    },
    /// A file read or write failed, or moved fewer bytes than asked.
    #[error("{op} of {path} at offset {offset:#x} (+{len:#x}): {why}")]
    File {
        /// `read` or `write`.
        op: &'static str,
        /// The file.
        path: String,
        /// The file offset of the request.
        offset: u64,
        /// Its length.
        len: u64,
        /// What happened (a short read and where the file ends, the device's error in words).
        why: String,
    },
    /// An error from the storage layer (`dmaplane-storage`) that names no field: opening a
    /// file, a file system without `O_DIRECT`, the drive.
    #[error("{0}")]
    Storage(String),
    /// An error from the RDMA layer (`dmaplane-rdma`), passed through.
    #[error(transparent)]
    Rdma(#[from] RdmaError),
    /// An error from the GPU layer (`dmaplane-gpu`), passed through.
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

impl From<dmaplane_storage::StorageError> for Error {
    fn from(e: dmaplane_storage::StorageError) -> Error {
        use dmaplane_storage::StorageError as S;
        match e {
            S::Invalid(i) => Error::Invalid(i),
            S::Io {
                op,
                path,
                offset,
                len,
                why,
            } => Error::File {
                op,
                path,
                offset,
                len,
                why,
            },
            other => Error::Storage(other.to_string()),
        }
    }
}

/// `std::result::Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(
        what: impl Into<String>,
        field: &'static str,
        value: impl std::fmt::Display,
        why: impl Into<String>,
    ) -> Error {
        Error::Invalid(Invalid::new(what, field, value, why))
    }

    pub(crate) fn setup(agent: &str, why: impl Into<String>) -> Error {
        Error::Setup {
            agent: agent.to_string(),
            why: why.into(),
        }
    }
}
