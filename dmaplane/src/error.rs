//! The Agent's errors: each names the agent, the peer, the region or the field it is about.

use std::time::Duration;

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

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A caller-supplied value is wrong.
    #[error("{what}: `{field}` = {value}: {why}")]
    Invalid {
        what: String,
        field: &'static str,
        value: String,
        why: String,
    },
    /// The memory a transfer touches was revoked, freed or moved: nothing was lost (every
    /// request completed once) and nothing touched it after the exporter's ack.
    #[error("{side} region {region} (\"{name}\") was revoked at epoch {epoch}: {why}")]
    Revoked {
        side: Side,
        region: u32,
        name: String,
        epoch: u64,
        why: String,
    },
    /// The peer went away (its control connection closed).
    #[error("peer {peer} was lost: {why}")]
    PeerLost { peer: String, why: String },
    /// A transfer made no progress for the stall timeout.
    #[error(
        "transfer {transfer} to {peer} stalled: no completion for {:?}, {outstanding} of {total} \
         requests outstanding",
        stall
    )]
    Stalled {
        transfer: u64,
        peer: String,
        outstanding: u64,
        total: u64,
        stall: Duration,
    },
    /// A request completed with an error that is not a revoke.
    #[error("transfer {transfer} to {peer}: request {chunk} completed with {status}")]
    Failed {
        transfer: u64,
        peer: String,
        chunk: u64,
        status: String,
    },
    /// `Transfer::wait` gave up (the transfer goes on; wait again or drop it).
    #[error("transfer {transfer} to {peer}: not done after {:?}", waited)]
    WaitTimeout {
        transfer: u64,
        peer: String,
        waited: Duration,
    },
    /// A metadata blob that cannot be read.
    #[error("metadata blob: {0}")]
    Metadata(String),
    /// The handshake with a peer failed.
    #[error("handshake with {peer}: {why}")]
    Handshake { peer: String, why: String },
    /// Setting up the agent failed.
    #[error("agent {agent}: {why}")]
    Setup { agent: String, why: String },
    #[error(transparent)]
    Rdma(#[from] RdmaError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(
        what: impl Into<String>,
        field: &'static str,
        value: impl std::fmt::Display,
        why: impl Into<String>,
    ) -> Error {
        Error::Invalid {
            what: what.into(),
            field,
            value: value.to_string(),
            why: why.into(),
        }
    }

    pub(crate) fn setup(agent: &str, why: impl Into<String>) -> Error {
        Error::Setup {
            agent: agent.to_string(),
            why: why.into(),
        }
    }
}
