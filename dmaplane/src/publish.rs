//! Who may reach a registration, and how: a registration is announced and leased only to the
//! peers it is published to, with the access it is published with. A read-only registration's
//! MRs carry no remote-write right, so the NIC itself refuses a peer's WRITE into it.

use dmaplane_rdma::MrAccess;

use crate::error::Result;

/// Who a registration is published to, and how ([`crate::Agent::register_with`]). The default
/// ([`Publish::all`]) is every peer, read and write.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Publish {
    read_only: bool,
    /// `None`: every peer.
    peers: Option<Vec<String>>,
}

impl Publish {
    /// Every peer, read and write.
    pub fn all() -> Publish {
        Publish::default()
    }

    /// Peers may READ it, not WRITE it.
    pub fn read_only(mut self) -> Publish {
        self.read_only = true;
        self
    }

    /// Only these peers (by the names they proved, with a secret) learn of it and get leases
    /// on it; each name is checked as a peer's name is.
    pub fn to<S: Into<String>>(mut self, peers: impl IntoIterator<Item = S>) -> Result<Publish> {
        let names: Vec<String> = peers.into_iter().map(Into::into).collect();
        for n in &names {
            crate::metadata::check_name("publish", "peers", n)?;
        }
        self.peers = Some(names);
        Ok(self)
    }

    /// Whether peers may only READ it.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the peer called `peer` may reach it.
    pub fn allows(&self, peer: &str) -> bool {
        self.peers
            .as_ref()
            .is_none_or(|p| p.iter().any(|n| n == peer))
    }

    /// Published to every peer (what a metadata blob for anyone may list).
    pub(crate) fn is_open(&self) -> bool {
        self.peers.is_none()
    }

    /// The rights its MRs carry.
    pub(crate) fn access(&self) -> MrAccess {
        if self.read_only {
            MrAccess::LOCAL_WRITE | MrAccess::REMOTE_READ
        } else {
            MrAccess::ALL
        }
    }
}
