//! The agent's peers: those connected (listed until they are lost), and the handshakes under
//! way on the listening side with the lease-link connections that arrived for them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dmaplane_rdma::oob::Oob;

use crate::peer::PeerShared;
use crate::sync::lock;

/// Handshakes (and connections not yet past their first message) served at once.
pub(crate) const MAX_HANDSHAKES: usize = 64;

/// The connected peers and the handshakes under way.
#[derive(Debug, Default)]
pub(crate) struct Peers {
    list: Mutex<Vec<Arc<PeerShared>>>,
    /// Handshakes under way on the listening side: nonce → number of paths.
    handshakes: Mutex<HashMap<u64, usize>>,
    /// Lease-link connections that arrived for a handshake under way: (nonce, path) → conn.
    links: Mutex<HashMap<(u64, usize), Oob>>,
    /// Connections being served by the listener.
    serving: AtomicUsize,
}

impl Peers {
    /// Every peer listed now.
    pub(crate) fn list(&self) -> Vec<Arc<PeerShared>> {
        lock(&self.list).clone()
    }

    /// The listed peer called `name`.
    pub(crate) fn named(&self, name: &str) -> Option<Arc<PeerShared>> {
        lock(&self.list).iter().find(|p| p.name == name).cloned()
    }

    /// Whether a peer called `name` is listed and not lost.
    pub(crate) fn connected(&self, name: &str) -> bool {
        lock(&self.list)
            .iter()
            .any(|p| p.name == name && p.lost().is_none())
    }

    /// List a peer.
    pub(crate) fn add(&self, peer: Arc<PeerShared>) {
        lock(&self.list).push(peer);
    }

    /// Stop listing a peer.
    pub(crate) fn remove(&self, peer: &Arc<PeerShared>) {
        lock(&self.list).retain(|x| !Arc::ptr_eq(x, peer));
    }

    /// Take every peer off the list (the agent stops).
    pub(crate) fn drain(&self) -> Vec<Arc<PeerShared>> {
        lock(&self.list).drain(..).collect()
    }

    /// Serve one more connection on the listener, unless [`MAX_HANDSHAKES`] are served
    /// already; [`Peers::served`] when it is done.
    pub(crate) fn admit(&self) -> bool {
        if self.serving.fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKES {
            self.serving.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// A connection [`Peers::admit`] let in was served.
    pub(crate) fn served(&self) {
        self.serving.fetch_sub(1, Ordering::AcqRel);
    }

    /// A handshake with `paths` paths starts on the listening side: lease links for it are
    /// taken from now on.
    pub(crate) fn begin(&self, nonce: u64, paths: usize) {
        lock(&self.handshakes).insert(nonce, paths);
    }

    /// The handshake ended: lease links for it are refused, and those not taken dropped.
    pub(crate) fn end(&self, nonce: u64) {
        lock(&self.handshakes).remove(&nonce);
        lock(&self.links).retain(|(n, _), _| *n != nonce);
    }

    /// Keep a lease-link connection for path `path` of handshake `nonce`; it comes back when
    /// no such handshake is under way or it has no such path.
    pub(crate) fn park_link(&self, nonce: u64, path: usize, oob: Oob) -> Result<(), Oob> {
        match lock(&self.handshakes).get(&nonce) {
            Some(&paths) if path < paths => {
                lock(&self.links).insert((nonce, path), oob);
                Ok(())
            }
            _ => Err(oob),
        }
    }

    /// The lease-link connection for path `path` of handshake `nonce`, once it arrived.
    pub(crate) fn take_link(&self, nonce: u64, path: usize) -> Option<Oob> {
        lock(&self.links).remove(&(nonce, path))
    }
}
