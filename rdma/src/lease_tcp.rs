//! Leases between processes or hosts: the lease messages of [`crate::lease`] over the
//! out-of-band TCP connection of [`crate::oob`].
//!
//! Each side wraps its end of one [`Oob`] connection in a [`LeaseLink`] bound to its [`Device`].
//! The two swap a hello (device GID and name: the identities leases are keyed by); then a
//! receiver thread on each side hands over what arrives:
//! - a grant: the peer (owner) gave this device a lease on one of its regions
//!   ([`LeaseLink::grant`]); it is recorded as a [`RemoteMr`] (posts to it are checked against
//!   it) and queued for [`LeaseLink::next_grant`];
//! - a [`ControlMsg`]: `LeaseRevoke` to a holder, `LeaseAck` to an owner, delivered to the
//!   device's quiesce machinery exactly as the in-process link does.
//!
//! Messages are processed in the order they were sent, so a revoke never overtakes the grant it
//! revokes. A holder that does not ack by the cut-off (its process hangs, its receiver stopped)
//! is cut off by the owner as [`crate::quiesce`] describes: the region is zapped anyway and its
//! later accesses fail at the NIC.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::access::MrAccess;
use crate::device::{Device, Mr};
use crate::error::{RdmaError, Result};
use crate::lease::{ControlLink, ControlMsg, RemoteMr};
use crate::oob::{Oob, RemoteMrInfo};
use crate::sync::{lock, wait_timeout};

/// How often the receiver looks at its stop flag while the connection is idle.
const RX_POLL: Duration = Duration::from_millis(20);

/// What travels on a lease connection (one JSON line each).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Wire {
    Hello { gid: [u8; 16], name: String },
    Grant { mr: RemoteMrInfo, access: u32 },
    Control(ControlMsg),
}

impl Wire {
    /// The message's kind (for errors: never the peer's contents).
    fn kind(&self) -> &'static str {
        match self {
            Wire::Hello { .. } => "hello",
            Wire::Grant { .. } => "grant",
            Wire::Control(_) => "control message",
        }
    }
}

/// Grants received and not yet taken ([`LeaseLink::next_grant`]) that a link keeps; beyond it
/// the oldest go (a peer must not grow this side's memory without bound).
pub const GRANT_QUEUE: usize = 65536;

/// Control messages queued for the writer thread before `send` refuses more.
pub const CONTROL_QUEUE: usize = 1024;

/// Sends control messages and grants to the peer of one lease connection.
///
/// `send` never blocks — it is called from `Importer::invalidate`, which must not, and grants
/// from every registration: it queues the message (at most [`CONTROL_QUEUE`]) for a writer
/// thread, and fails at once when the queue is full (the peer stopped reading) or the
/// connection is gone. The owner then cuts that holder off
/// instead of waiting for a socket.
#[derive(Debug)]
pub struct TcpLink {
    oob: Arc<Oob>,
    peer: String,
    /// `None` once the writer is gone (the connection failed or the link closed).
    queue: Mutex<Option<std::sync::mpsc::SyncSender<Wire>>>,
}

impl TcpLink {
    /// The link and its writer thread.
    fn start(oob: Arc<Oob>, peer: String) -> Result<(Arc<TcpLink>, JoinHandle<()>)> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Wire>(CONTROL_QUEUE);
        let link = Arc::new(TcpLink {
            oob,
            peer,
            queue: Mutex::new(Some(tx)),
        });
        let weak = Arc::downgrade(&link);
        let oob = link.oob.clone();
        let who = link.peer.clone();
        let writer = std::thread::Builder::new()
            .name(format!("lease-tx {}", oob.peer_addr()))
            .spawn(move || {
                for msg in rx {
                    if let Err(e) = oob.send(&msg) {
                        tracing::warn!(peer = %who, error = %e, "lease link lost: control messages dropped");
                        if let Some(l) = weak.upgrade() {
                            *lock(&l.queue) = None;
                        }
                        return;
                    }
                }
            })
            .map_err(|e| RdmaError::io(format!("lease writer thread for {}", link.peer), e))?;
        Ok((link, writer))
    }

    /// No more messages: the writer sends what is queued and ends.
    fn close(&self) {
        *lock(&self.queue) = None;
    }
}

impl TcpLink {
    /// Queue a message for the writer; never blocks (a full queue or a lost connection fails
    /// at once).
    fn enqueue(&self, msg: Wire) -> Result<()> {
        use std::sync::mpsc::TrySendError;
        let q = lock(&self.queue);
        let Some(tx) = q.as_ref() else {
            return Err(RdmaError::Connection {
                what: format!("lease link with {}", self.peer),
                why: "the connection is gone".into(),
            });
        };
        tx.try_send(msg).map_err(|e| match e {
            TrySendError::Full(_) => RdmaError::QueueFull {
                qpn: 0,
                queue: "lease control",
                depth: CONTROL_QUEUE as u32,
            },
            TrySendError::Disconnected(_) => RdmaError::Connection {
                what: format!("lease link with {}", self.peer),
                why: "the connection is gone".into(),
            },
        })
    }
}

impl ControlLink for TcpLink {
    fn send(&self, msg: ControlMsg) -> Result<()> {
        self.enqueue(Wire::Control(msg))
    }
    fn peer(&self) -> String {
        self.peer.clone()
    }
    fn is_open(&self) -> bool {
        lock(&self.queue).is_some()
    }
}

/// What the receiver thread shares with the link.
#[derive(Debug, Default)]
struct Rx {
    stop: AtomicBool,
    state: Mutex<RxState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct RxState {
    grants: VecDeque<Arc<RemoteMr>>,
    /// Why the receiver ended (the peer closed, a broken message, stopped).
    ended: Option<String>,
}

/// One device's end of a lease connection: grants leases to the peer, receives the peer's
/// grants and control messages.
#[derive(Debug)]
pub struct LeaseLink {
    link: Arc<TcpLink>,
    peer_gid: [u8; 16],
    peer_name: String,
    rx: Arc<Rx>,
    thread: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
}

impl LeaseLink {
    /// Bind `dev` to the connection: swap hellos (waiting up to `timeout` for the peer's; both
    /// sides call this at about the same time) and start the receiver.
    pub fn open(dev: &Device, oob: Oob, timeout: Duration) -> Result<LeaseLink> {
        let addr = oob.peer_addr();
        oob.send(&Wire::Hello {
            gid: dev.gid(),
            name: dev.name().to_string(),
        })?;
        let (peer_gid, peer_name) = match oob.recv::<Wire>(timeout)? {
            // The name comes from the peer and goes into logs and errors: 1 to 255 bytes, no
            // control characters.
            Wire::Hello { name, .. }
                if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) =>
            {
                return Err(RdmaError::Connection {
                    what: format!("lease link with {addr}"),
                    why: format!(
                        "its hello names the device {:?}: a name is 1 to 255 bytes without \
                         control characters",
                        name.chars().take(64).collect::<String>()
                    ),
                });
            }
            Wire::Hello { gid, name } => (gid, name),
            other => {
                return Err(RdmaError::Connection {
                    what: format!("lease link with {addr}"),
                    why: format!("expected a hello first, got {}", other.kind()),
                });
            }
        };
        let oob = Arc::new(oob);
        let (link, writer) = TcpLink::start(oob.clone(), format!("{peer_name} at {addr}"))?;
        let rx = Arc::new(Rx::default());
        let thread = {
            let (dev, link, rx) = (dev.clone(), link.clone(), rx.clone());
            let (owner_gid, owner_name) = (peer_gid, peer_name.clone());
            std::thread::Builder::new()
                .name(format!("lease-rx {addr}"))
                .spawn(move || receive(&dev, &oob, &link, &rx, owner_gid, &owner_name))
                .map_err(|e| RdmaError::io(format!("lease receiver thread for {addr}"), e))?
        };
        tracing::debug!(device = %dev.name(), peer = %link.peer, "lease link open");
        Ok(LeaseLink {
            link,
            peer_gid,
            peer_name,
            rx,
            thread: Some(thread),
            writer: Some(writer),
        })
    }

    /// The peer device's GID (its identity in leases).
    pub fn peer_gid(&self) -> [u8; 16] {
        self.peer_gid
    }

    pub fn peer_name(&self) -> &str {
        &self.peer_name
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.link.oob.peer_addr()
    }

    /// The sending half, as a [`ControlLink`] (for [`Mr::add_holder`] / [`Device::hold`]).
    pub fn control_link(&self) -> Arc<dyn ControlLink> {
        self.link.clone()
    }

    /// Owner side: make the peer a holder of `mr` and send it the grant. Returns what was sent.
    /// The peer is registered before the grant leaves, so a revoke racing with it still waits
    /// for the peer's ack.
    pub fn grant(&self, mr: &Mr) -> Result<RemoteMrInfo> {
        if let Some(epoch) = mr.revoked_at() {
            return Err(RdmaError::Revoked {
                what: format!("lease on MR {:#x} for {}", mr.rkey(), self.link.peer),
                epoch,
                why: "the region was already revoked".into(),
            });
        }
        let info = RemoteMrInfo {
            addr: mr.iova(),
            len: mr.len(),
            rkey: mr.rkey(),
        };
        mr.add_holder(self.peer_gid, self.link.clone());
        // A revoke between the first look and the registration did not see this holder: do
        // not grant what is about to be zapped.
        if let Some(epoch) = mr.revoked_at() {
            mr.remove_holder(self.peer_gid, &(self.link.clone() as Arc<dyn ControlLink>));
            return Err(RdmaError::Revoked {
                what: format!("lease on MR {:#x} for {}", mr.rkey(), self.link.peer),
                epoch,
                why: "the region was revoked while the grant was prepared".into(),
            });
        }
        // Through the writer's queue, as every control message: a peer that stops reading
        // never blocks the caller (a registration grants to every peer).
        if let Err(e) = self.link.enqueue(Wire::Grant {
            mr: info,
            access: mr.access().bits(),
        }) {
            mr.remove_holder(self.peer_gid, &(self.link.clone() as Arc<dyn ControlLink>));
            return Err(e);
        }
        Ok(info)
    }

    /// Holder side: the next lease the peer granted, waiting up to `timeout`.
    pub fn next_grant(&self, timeout: Duration) -> Result<Arc<RemoteMr>> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.rx.state);
        loop {
            if let Some(r) = st.grants.pop_front() {
                return Ok(r);
            }
            if let Some(why) = &st.ended {
                return Err(RdmaError::Connection {
                    what: format!("lease link with {}", self.link.peer),
                    why: format!("no more grants: {why}"),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RdmaError::Timeout {
                    what: format!("a lease grant from {}", self.link.peer),
                    ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                });
            }
            st = wait_timeout(&self.rx.changed, st, left).0;
        }
    }

    /// Holder side: a lease the peer granted, if one arrived.
    pub fn try_grant(&self) -> Option<Arc<RemoteMr>> {
        lock(&self.rx.state).grants.pop_front()
    }

    /// Why the receiver ended, if it did (the peer closed the connection, sent something that
    /// is not a lease message, or [`stop_receiving`](Self::stop_receiving) was called).
    pub fn ended(&self) -> Option<String> {
        lock(&self.rx.state).ended.clone()
    }

    /// Stop handling what the peer sends while keeping the connection open: to the peer this
    /// side now looks hung (its revokes are never acked). For fault injection and tests.
    pub fn stop_receiving(&mut self) {
        self.rx.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!(peer = %self.link.peer, "lease receiver panicked");
        }
    }
}

impl Drop for LeaseLink {
    /// A dropped link is closed: the peer sees the end of the connection at once (an owner
    /// then cuts this side off at its next revoke instead of waiting for the cut-off).
    fn drop(&mut self) {
        // No more control messages; then close: a writer or receiver blocked on a peer that
        // stopped reading returns.
        self.link.close();
        if let Err(e) = self.link.oob.shutdown() {
            tracing::debug!(peer = %self.link.peer, error = %e, "closing the lease link");
        }
        self.stop_receiving();
        if let Some(w) = self.writer.take()
            && w.join().is_err()
        {
            tracing::error!(peer = %self.link.peer, "lease writer panicked");
        }
    }
}

/// The receiver thread: hand every message to the device until stopped or the connection ends.
fn receive(
    dev: &Device,
    oob: &Oob,
    link: &Arc<TcpLink>,
    rx: &Rx,
    owner_gid: [u8; 16],
    owner_name: &str,
) {
    let ended = loop {
        if rx.stop.load(Ordering::Acquire) {
            break "stopped by this side".to_string();
        }
        match oob.recv::<Wire>(RX_POLL) {
            // Only messages about this link's peer: it may revoke its own leases and ack its
            // own holds, not speak for a third device.
            Ok(Wire::Control(msg)) => {
                let from = match msg {
                    ControlMsg::LeaseRevoke { owner, .. } => owner,
                    ControlMsg::LeaseAck { holder, .. } => holder,
                };
                if from == owner_gid {
                    dev.deliver_via(msg, &(link.clone() as Arc<dyn ControlLink>));
                } else {
                    dev.count_lease_refusal();
                    tracing::warn!(peer = %link.peer, ?msg, "control message naming another device ignored");
                }
            }
            Ok(Wire::Grant { mr, access }) => {
                let Some(access) = MrAccess::from_bits(access) else {
                    dev.count_lease_refusal();
                    tracing::warn!(peer = %link.peer, access, rkey = mr.rkey, "grant with unknown access bits ignored");
                    continue;
                };
                match dev.hold(owner_gid, owner_name, mr, access, link.clone()) {
                    Ok(remote) => {
                        let mut st = lock(&rx.state);
                        // The peer decides how many it grants: keep the newest, bounded.
                        if st.grants.len() >= GRANT_QUEUE {
                            st.grants.pop_front();
                            tracing::warn!(peer = %link.peer, "more than {GRANT_QUEUE} grants not taken: the oldest dropped");
                        }
                        st.grants.push_back(remote);
                        drop(st);
                        rx.changed.notify_all();
                    }
                    Err(e) => {
                        dev.count_lease_refusal();
                        tracing::warn!(peer = %link.peer, error = %e, "grant ignored");
                    }
                }
            }
            Ok(Wire::Hello { .. }) => {
                tracing::debug!(peer = %link.peer, "repeated hello ignored");
            }
            Err(RdmaError::Timeout { .. }) => {}
            Err(e) => break e.to_string(),
        }
    };
    tracing::debug!(device = %dev.name(), peer = %link.peer, why = %ended, "lease receiver ended");
    // Nobody reads this connection any more: close it, so the peer's next revoke fails to
    // send and cuts this side off at once instead of waiting for an ack that cannot come.
    if !rx.stop.load(Ordering::Acquire)
        && let Err(e) = oob.shutdown()
    {
        tracing::debug!(peer = %link.peer, error = %e, "closing the lease link");
    }
    lock(&rx.state).ended = Some(ended);
    rx.changed.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oob::OobListener;
    use proptest::prelude::*;

    proptest! {
        /// Any line a peer sends on a lease link decodes to a lease message or fails, never a
        /// panic; a grant's access bits are accepted only when every bit is one this build
        /// knows.
        #[test]
        fn any_bytes_are_refused_or_decoded_never_a_panic(
            line in prop::collection::vec(any::<u8>(), 0..1024),
            addr in any::<u64>(), len in any::<u64>(), rkey in any::<u32>(), access in any::<u32>(),
        ) {
            let _ = serde_json::from_slice::<Wire>(&line);
            let g = serde_json::to_vec(&Wire::Grant { mr: RemoteMrInfo { addr, len, rkey }, access })
                .unwrap_or_default();
            if let Ok(Wire::Grant { access: a, .. }) = serde_json::from_slice::<Wire>(&g)
                && let Some(bits) = MrAccess::from_bits(a)
            {
                prop_assert_eq!(bits.bits(), a);
                prop_assert!(MrAccess::ALL.contains(bits));
            }
        }
    }

    /// A peer that stopped reading: sends queue up to the bound, then fail at once, naming the
    /// queue — they never wait for the socket (a revoke calls them from `invalidate`).
    #[test]
    fn sends_to_a_peer_that_stopped_reading_never_block() {
        let t = Duration::from_secs(5);
        let l = OobListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr();
        let acceptor = std::thread::spawn(move || l.accept(t).unwrap());
        let c = Oob::connect(addr, t).unwrap();
        let _silent_peer = acceptor.join().unwrap();
        let (link, writer) = TcpLink::start(Arc::new(c), "silent".into()).unwrap();
        let msg = ControlMsg::LeaseAck {
            holder: [7; 16],
            rkey: 1,
            epoch: 2,
        };
        let start = Instant::now();
        let mut refused = None;
        // Far more than the socket buffers hold: the writer blocks on the socket long before.
        for _ in 0..200_000 {
            if let Err(e) = link.send(msg) {
                refused = Some(e);
                break;
            }
        }
        let took = start.elapsed();
        let e = refused.expect("a full queue was never refused");
        assert!(e.to_string().contains("lease control"), "{e}");
        assert!(took < Duration::from_secs(2), "sends blocked for {took:?}");
        // Closing ends the writer once the socket gives way.
        link.close();
        link.oob.shutdown().unwrap();
        writer.join().unwrap();
        assert!(link.send(msg).is_err());
    }
}
