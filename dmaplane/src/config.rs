//! An agent's tunables: what [`crate::AgentBuilder`] sets and the agent keeps.

use std::time::Duration;

use crate::auth::Secret;
use crate::limits::Limits;

/// Tunables, with the defaults [`crate::AgentBuilder`] starts from.
#[derive(Debug, Clone)]
pub struct Config {
    /// Requests longer than this are split (and striped over queue pairs and NICs).
    pub chunk: u64,
    /// Queue pairs per (local NIC, peer NIC) pair.
    pub qps_per_path: usize,
    /// Send queue depth of each queue pair.
    pub depth: u32,
    /// A transfer that sees no completion for this long ends with [`crate::Error::Stalled`].
    pub stall_timeout: Duration,
    /// How long connection setup steps wait for the peer.
    pub setup_timeout: Duration,
    /// Where the handshake listener binds (`host:port`; port 0 picks one).
    pub listen: String,
    /// The handshake address the metadata tells peers (`host:port`); `None`: the bound
    /// address, which must then be a specific one (not `0.0.0.0` or `::`).
    pub advertise: Option<String>,
    /// Stage GPU memory through host memory even where a NIC could reach it peer to peer
    /// (to measure what staging costs; off by default). File I/O bounces GPU memory through
    /// host memory then too.
    pub force_staging: bool,
    /// The testbed's NVMe drive file regions are read and written through (`None`: the
    /// topology's first).
    pub drive: Option<String>,
    /// The drive's bandwidth in bytes per second (`None`: the simulated drive's default,
    /// [`dmaplane_storage::sim::RATE`]; 0: as fast as the host copies).
    pub drive_rate: Option<u64>,
    /// Read and write files through this host's kernel (io_uring, `O_DIRECT`) instead of the
    /// testbed's simulated drive (always so on verbs).
    pub io_uring: bool,
    /// The secret peers must prove they hold ([`crate::auth`]); `None`: any peer that
    /// reaches the listener is accepted, so the agent listens on loopback only unless
    /// [`Config::insecure`].
    pub secret: Option<Secret>,
    /// Listen on a routable address without a secret: every host that reaches it may connect
    /// as any name. Off by default.
    pub insecure: bool,
    /// Bounds on what peers may make the agent hold ([`crate::limits`]).
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            chunk: 1 << 20,
            qps_per_path: 2,
            depth: 128,
            stall_timeout: Duration::from_secs(10),
            setup_timeout: Duration::from_secs(30),
            listen: "127.0.0.1:0".into(),
            advertise: None,
            force_staging: false,
            drive: None,
            drive_rate: None,
            io_uring: false,
            secret: None,
            insecure: false,
            limits: Limits::default(),
        }
    }
}
