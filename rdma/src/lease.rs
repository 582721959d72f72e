//! Remote leases: a peer that holds one of our rkeys is told to stop one-sided access before the
//! region's translation is zapped, and acknowledges once its own work on it has quiesced.
//!
//! The messages travel over a [`ControlLink`]: in-process between simulated devices, the
//! out-of-band TCP connection between real hosts. A holder that does not acknowledge by the
//! deadline is cut off: the region is zapped anyway, its later accesses fail with remote-access
//! errors at the NIC, and the cut-off is counted and reported.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use serde::{Deserialize, Serialize};

use crate::access::MrAccess;
use crate::error::Result;
use crate::quiesce::Tracker;
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
        policy: crate::quiesce::QuiescePolicy,
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
}

/// In-process link: delivery is a call into the peer's tracker (a NIC-to-NIC message handled by
/// the peer's firmware; no user thread has to be polling).
#[derive(Debug)]
pub(crate) struct LocalLink {
    pub(crate) peer: Weak<Tracker>,
    pub(crate) name: String,
}

impl ControlLink for LocalLink {
    fn send(&self, msg: ControlMsg) -> Result<()> {
        match self.peer.upgrade() {
            Some(t) => {
                t.on_control(msg);
                Ok(())
            }
            None => Err(crate::RdmaError::Connection {
                what: self.name.clone(),
                why: "peer device is gone".into(),
            }),
        }
    }
    fn peer(&self) -> String {
        self.name.clone()
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

/// Leases over any [`ControlLink`] (another process, another host): the two halves
/// [`Device::lease`] wires up in-process, for a link the caller provides.
impl crate::device::Mr {
    /// Owner side: make the device identified by `holder_gid` a holder of this region. A revoke
    /// sends it `LeaseRevoke` over `link` and waits for its `LeaseAck` until the cut-off.
    pub fn add_holder(&self, holder_gid: [u8; 16], link: Arc<dyn ControlLink>) {
        crate::sync::lock(&self.shared.holders).push(Holder {
            gid: holder_gid,
            link,
        });
    }

    /// Owner side: undo the latest [`add_holder`](Self::add_holder) for `holder_gid`.
    pub fn remove_holder(&self, holder_gid: [u8; 16]) {
        let mut h = crate::sync::lock(&self.shared.holders);
        if let Some(i) = h.iter().rposition(|x| x.gid == holder_gid) {
            h.remove(i);
        }
    }
}

impl crate::device::Device {
    /// The identity leases are keyed by (the port GID).
    pub fn gid(&self) -> [u8; 16] {
        self.tracker.gid
    }

    /// Holder side: record a lease on a peer's region (`info` as the owner sent it). Posts that
    /// target it are checked against it, a `LeaseRevoke` for it quiesces them, and the ack goes
    /// back over `link`. A later lease on the same key from the same owner replaces this one.
    /// `info` comes from the peer: a range that wraps around the address space is refused.
    pub fn hold(
        &self,
        owner_gid: [u8; 16],
        owner_name: &str,
        info: crate::oob::RemoteMrInfo,
        access: MrAccess,
        link: Arc<dyn ControlLink>,
    ) -> Result<Arc<RemoteMr>> {
        if info.addr.checked_add(info.len).is_none() {
            return Err(crate::RdmaError::InvalidRegistration {
                field: "remote.len",
                value: format!("{:#x} at {:#x}", info.len, info.addr),
                why: format!("the lease from {owner_name} wraps around the address space"),
            });
        }
        let remote = Arc::new(RemoteMr {
            owner: owner_gid,
            owner_name: owner_name.to_string(),
            addr: info.addr,
            len: info.len,
            rkey: info.rkey,
            access,
            revoked: AtomicU64::new(0),
            link,
        });
        self.tracker.add_remote(remote.clone());
        Ok(remote)
    }

    /// Hand a control message that arrived from a peer to this device (what a link's receiver
    /// does): `LeaseRevoke` quiesces what targets the lease and acks; `LeaseAck` settles a
    /// revoke in progress. Unknown leases and stale epochs are ignored.
    pub fn deliver(&self, msg: ControlMsg) {
        self.tracker.on_control(msg);
    }
}
