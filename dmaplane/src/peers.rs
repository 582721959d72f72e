//! The agent's peers: those connected (listed until they are lost), and the handshakes under
//! way on the listening side with the lease-link connections that arrived for them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dmaplane_rdma::oob::Oob;

use crate::auth::{Secret, Session};
use crate::limits::{Refusal, RefusalCounters, Refusals};
use crate::peer::PeerShared;
use crate::sync::lock;

/// What a lease link of an authenticated handshake must prove: the handshake's session, and
/// the secret.
pub(crate) type LinkAuth = (Session, Secret);

/// The connected peers and the handshakes under way.
#[derive(Debug)]
pub(crate) struct Peers {
    list: Mutex<Vec<Arc<PeerShared>>>,
    /// Handshakes under way on the listening side: nonce → number of paths, and with a
    /// secret what a lease link for them must prove.
    handshakes: Mutex<HashMap<u64, (usize, Option<LinkAuth>)>>,
    /// Lease-link connections that arrived for a handshake under way: (nonce, path) → conn.
    links: Mutex<HashMap<(u64, usize), Oob>>,
    /// Connections being served by the listener.
    serving: Arc<AtomicUsize>,
    /// Handshakes (and connections not yet past their first message) served at once.
    max_handshakes: usize,
    /// What peers sent that was refused, by what for.
    refused: RefusalCounters,
}

/// One connection the listener serves; its slot is given back when this goes, however the
/// handshake ended (a panic included).
#[derive(Debug)]
pub(crate) struct Admission(Arc<AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Peers {
    /// No peers yet; the listener serves at most `max_handshakes` connections at once.
    pub(crate) fn new(max_handshakes: usize) -> Peers {
        Peers {
            list: Mutex::default(),
            handshakes: Mutex::default(),
            links: Mutex::default(),
            serving: Arc::default(),
            max_handshakes,
            refused: RefusalCounters::default(),
        }
    }

    /// Peers listed now.
    pub(crate) fn len(&self) -> usize {
        lock(&self.list).len()
    }

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

    /// Serve one more connection on the listener, unless the limit of handshakes at once is
    /// reached (counted as refused); the slot is held until the [`Admission`] goes.
    pub(crate) fn admit(&self) -> Option<Admission> {
        if self.serving.fetch_add(1, Ordering::AcqRel) >= self.max_handshakes {
            self.serving.fetch_sub(1, Ordering::AcqRel);
            self.refused.count(Refusal::Handshakes);
            return None;
        }
        Some(Admission(self.serving.clone()))
    }

    /// Connections the listener serves now.
    pub(crate) fn serving(&self) -> usize {
        self.serving.load(Ordering::Acquire)
    }

    /// Count a refusal (a handshake, a lease link, an announcement, ...), by what it was for.
    pub(crate) fn count_refusal(&self, why: Refusal) {
        self.refused.count(why);
    }

    /// Refusals so far.
    pub(crate) fn refused(&self) -> Refusals {
        self.refused.snapshot()
    }

    /// A handshake with `paths` paths starts on the listening side: lease links for it are
    /// taken from now on (with a secret, only those that prove it for their path).
    pub(crate) fn begin(&self, nonce: u64, paths: usize, auth: Option<LinkAuth>) {
        lock(&self.handshakes).insert(nonce, (paths, auth));
    }

    /// The handshake ended: lease links for it are refused, and those not taken dropped.
    pub(crate) fn end(&self, nonce: u64) {
        lock(&self.handshakes).remove(&nonce);
        lock(&self.links).retain(|(n, _), _| *n != nonce);
    }

    /// Keep a lease-link connection for path `path` of handshake `nonce`; refused (counted,
    /// and the reason returned) when no such handshake is under way, it has no such path, or
    /// the connection does not prove the handshake's secret for this path.
    pub(crate) fn park_link(
        &self,
        nonce: u64,
        path: usize,
        proof: Option<&[u8]>,
        oob: Oob,
    ) -> Result<(), &'static str> {
        let (why, kind) = match lock(&self.handshakes).get(&nonce) {
            Some((paths, _)) if path >= *paths => ("no such path", Refusal::Check),
            Some((_, Some((session, secret))))
                if !proof.is_some_and(|p| session.check_link(secret, path, p)) =>
            {
                (
                    "its proof does not match the handshake's secret",
                    Refusal::Auth,
                )
            }
            Some(_) => {
                lock(&self.links).insert((nonce, path), oob);
                return Ok(());
            }
            None => ("no handshake under way", Refusal::Check),
        };
        self.refused.count(kind);
        Err(why)
    }

    /// The lease-link connection for path `path` of handshake `nonce`, once it arrived.
    pub(crate) fn take_link(&self, nonce: u64, path: usize) -> Option<Oob> {
        lock(&self.links).remove(&(nonce, path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handshake_slot_is_given_back_however_the_handshake_ends() {
        let p = Peers::new(8);
        let held: Vec<Admission> = (0..8).map(|_| p.admit().unwrap()).collect();
        assert!(p.admit().is_none(), "more than 8 at once");
        assert_eq!(p.refused().handshakes, 1);
        // A handshake thread that panics still gives its slot back.
        let one = p.admit();
        assert!(one.is_none());
        drop(held);
        let a = p.admit().unwrap();
        let t = std::thread::spawn(move || {
            let _a = a;
            panic!("a handshake that panics");
        });
        assert!(t.join().is_err());
        assert_eq!(p.serving(), 0);
    }
}
