//! Remote leases: a peer that holds one of our rkeys is told to stop one-sided access before the
//! region's translation is zapped, and acknowledges once its own work on it has quiesced.
//!
//! The messages travel over a [`ControlLink`]: in-process between simulated devices, the
//! out-of-band TCP connection between real hosts. A holder that does not acknowledge by the
//! deadline is cut off: the region is zapped anyway, its later accesses fail with remote-access
//! errors at the NIC, and the cut-off is counted and reported.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::access::MrAccess;
use crate::error::Result;
use crate::wr::RemoteAddr;

/// One control message between the owner of a region and a holder of its rkey.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMsg {
    /// Owner → holder: stop one-sided access to `rkey`, quiescing in-flight work to it by the
    /// owner's `policy` (its deadline comes from the peer: the holder bounds it).
    LeaseRevoke {
        owner: [u8; 16],
        rkey: u32,
        epoch: u64,
        policy: crate::policy::QuiescePolicy,
    },
    /// Holder → owner: nothing of ours targets `rkey` any more.
    LeaseAck {
        holder: [u8; 16],
        rkey: u32,
        epoch: u64,
    },
}

/// Carries control messages to one peer.
pub trait ControlLink: Send + Sync + std::fmt::Debug {
    fn send(&self, msg: ControlMsg) -> Result<()>;
    /// The peer, for reports.
    fn peer(&self) -> String;
    /// Whether messages may still go over it (a closed connection: no).
    fn is_open(&self) -> bool {
        true
    }
}

/// The holder's side of a lease: what it may access, and whether it still may.
#[derive(Debug)]
pub struct RemoteMr {
    pub(crate) owner: [u8; 16],
    pub(crate) owner_name: String,
    pub(crate) addr: u64,
    pub(crate) len: u64,
    pub(crate) rkey: u32,
    pub(crate) access: MrAccess,
    /// 0 while valid; epoch + 1 once revoked.
    pub(crate) revoked: AtomicU64,
    pub(crate) link: Arc<dyn ControlLink>,
}

impl RemoteMr {
    pub fn rkey(&self) -> u32 {
        self.rkey
    }
    pub fn addr(&self) -> u64 {
        self.addr
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn access(&self) -> MrAccess {
        self.access
    }
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire) != 0
    }
    /// The epoch the owner revoked, once it did.
    pub fn revoked_at(&self) -> Option<u64> {
        self.revoked.load(Ordering::Acquire).checked_sub(1)
    }
    /// The owner device's name.
    pub fn owner_name(&self) -> &str {
        &self.owner_name
    }
    /// The remote address `offset` bytes in.
    pub fn at(&self, offset: u64) -> RemoteAddr {
        RemoteAddr {
            addr: self.addr.wrapping_add(offset),
            rkey: self.rkey,
        }
    }
}

/// The owner's record of one holder.
#[derive(Debug, Clone)]
pub(crate) struct Holder {
    pub(crate) gid: [u8; 16],
    pub(crate) link: Arc<dyn ControlLink>,
}
