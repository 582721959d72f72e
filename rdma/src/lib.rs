//! dmaplane-rdma: the RDMA importer.
//!
//! - [`access`], [`qp`], [`wr`], [`wc`]: verbs vocabulary shared by every backend.
//! - [`backend`]: the raw objects a backend provides.
//! - `sim`: the simulated RC NIC on the core fabric (always built).
//! - `verbs`: real libibverbs through sideway (feature `verbs`).

pub mod access;
pub mod backend;
pub mod error;
pub mod qp;
pub mod wc;
pub mod wr;

pub use access::MrAccess;
pub use backend::{BackendKind, DeviceInfo, DmaBufMr};
pub use error::{RdmaError, Result};
pub use qp::{Mtu, QpAttr, QpCaps, QpState, RemoteQp};
pub use wc::{Completion, WcOpcode, WcStatus};
pub use wr::{MAX_SGE, RecvWr, RemoteAddr, SendOp, SendWr, SgList, Sge};
