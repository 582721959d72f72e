//! dmaplane-rdma: the RDMA importer.
//!
//! - [`access`], [`qp`], [`wr`], [`wc`]: verbs vocabulary shared by every backend.
//! - [`backend`]: the raw objects a backend provides.
//! - `sim`: the simulated RC NIC on the core fabric (always built).
//! - `verbs`: real libibverbs through sideway (feature `verbs`).
//! - [`tcp`]: a software RC NIC whose wire is TCP, for hosts without RDMA.
//! - [`lease`], [`lease_tcp`], [`oob`]: remote leases, in-process and over the out-of-band TCP
//!   connection.

pub mod access;
pub mod backend;
pub mod device;
pub mod error;
mod event_queue;
pub mod import;
pub mod inject;
pub mod lease;
pub mod lease_tcp;
pub mod oob;
pub mod policy;
pub mod qp;
pub mod qp_state;
pub mod quiesce;
pub mod sim;
mod soft_cq;
pub mod tcp;
use dmaplane_core::sync;
mod timer;
mod tracker;
#[cfg(feature = "verbs")]
pub mod verbs;
pub mod wc;
pub mod wr;

pub use access::MrAccess;
pub use backend::{BackendKind, DeviceInfo, DmaBufMr, MrKeys};
pub use device::{Cq, Device, Mr, Pd, Qp};
pub use error::{RdmaError, Result};
pub use import::RdmaImporter;
pub use inject::Fault;
pub use lease::{ControlLink, ControlMsg, RemoteMr};
pub use lease_tcp::{LeaseLink, TcpLink};
pub use policy::{ImportOptions, QuiescePolicy, QuiesceStats};
pub use qp::{Mtu, QpAttr, QpCaps, QpState, RemoteQp, SOFT_MAX_QP_WR};
pub use sim::{SimNetwork, SimNic};
pub use tcp::{TcpNic, TcpStats};
pub use tracker::MAX_LEASES_PER_OWNER;
pub use wc::{Completion, WcOpcode, WcStatus};
pub use wr::{MAX_SGE, RecvWr, RemoteAddr, SendOp, SendWr, SgList, Sge};
