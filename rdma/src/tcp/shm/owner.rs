//! The owner's side of the lanes: the NIC's listener, the proof, views handed out, and the
//! wait for `unmapped` that a zap makes (see the module docs of `shm`).

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use rustix::net::{AddressFamily, SocketFlags, SocketType};

use crate::access::MrAccess;
use crate::qp::QpState;
use crate::sync::{lock, wait_timeout};

use super::super::mr::{NotShared, Sharer};
use super::super::qp::TcpQp;
use super::super::{MAX_UNPROVEN, NicShared, verify};
use super::{Got, Kind, LANE_TIME, MapRefusal, Msg, Refusal, TICK, UNMAP_WAIT};

/// Listen on the abstract socket of lane id `id`.
pub(crate) fn listen(id: u64) -> Result<OwnedFd, String> {
    let s = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    let addr = super::address(id).map_err(|e| format!("address: {e}"))?;
    rustix::net::bind(&s, &addr).map_err(|e| format!("bind: {e}"))?;
    rustix::net::listen(&s, 64).map_err(|e| format!("listen: {e}"))?;
    Ok(s)
}

/// Accept lanes on `listener` while the NIC runs.
pub(crate) fn start(nic: &Arc<NicShared>, listener: OwnedFd) -> std::io::Result<JoinHandle<()>> {
    let n = nic.clone();
    std::thread::Builder::new()
        .name(format!("tcp-nic-{}-shm", nic.name))
        .spawn(move || accept_loop(&n, &listener))
}

fn accept_loop(nic: &Arc<NicShared>, listener: &OwnedFd) {
    while nic.alive() {
        match rustix::net::accept_with(listener, SocketFlags::CLOEXEC) {
            Ok(s) => {
                if nic.unproven.fetch_add(1, Ordering::SeqCst) >= MAX_UNPROVEN {
                    nic.unproven.fetch_sub(1, Ordering::SeqCst);
                    nic.count_unproven_closed();
                    tracing::warn!(nic = %nic.name, "too many lanes waiting for their hello: closed");
                    continue;
                }
                let n = nic.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("tcp-nic-{}-lane", nic.name))
                    .spawn(move || serve(&n, s));
                if let Err(e) = spawned {
                    nic.unproven.fetch_sub(1, Ordering::SeqCst);
                    tracing::error!(nic = %nic.name, error = %e, "no thread for a lane");
                }
            }
            Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR => {
                let _ = super::super::io::wait_for(listener, true);
            }
            Err(e) => {
                tracing::warn!(nic = %nic.name, error = %e, "lane accept failed");
                std::thread::sleep(TICK);
            }
        }
    }
}

#[derive(Debug, Default)]
struct PeerState {
    /// Rkeys whose view the peer holds (or is about to: `mapped` sent), until it says it
    /// dropped it.
    shared: HashSet<u32>,
    /// The lane ended; `by_peer`: the peer closed it (having dropped its views first).
    ended: bool,
    by_peer: bool,
}

/// A proven lane: a requester QP's peer on this host (the [`Sharer`] its regions are shared
/// with; they hold it as long as they live, so a lane that ended still answers for its views).
#[derive(Debug)]
struct Peer {
    nic: String,
    qpn: u32,
    pid: i32,
    sock: OwnedFd,
    /// Held from a region's sharing to the `mapped` sent for it, and around each `unmap` sent:
    /// so a zap's `unmap` follows the `mapped` of a sharing it waits for, on the wire too.
    sending: Mutex<()>,
    state: Mutex<PeerState>,
    cv: Condvar,
}

impl Peer {
    fn end(&self, by_peer: bool) {
        let mut st = lock(&self.state);
        st.ended = true;
        st.by_peer = by_peer;
        if by_peer {
            // The peer drops every view before it closes its end.
            st.shared.clear();
        }
        self.cv.notify_all();
        drop(st);
        let _ = rustix::net::shutdown(&self.sock, rustix::net::Shutdown::Both);
    }

    fn who(&self) -> String {
        format!("the lane of QP {:#x} (process {})", self.qpn, self.pid)
    }

    /// Send `unmap` for `rkey` unless the peer holds no view of it: `None` when it holds none,
    /// else whether the send failed and why (a peer that closed its end fails it; the lane's
    /// thread sees that end next, and it answers for the view).
    fn ask_unmap(&self, rkey: u32) -> Result<Option<Option<String>>, String> {
        let _sending = lock(&self.sending);
        let st = lock(&self.state);
        if !st.shared.contains(&rkey) {
            return Ok(None);
        }
        if st.ended {
            return Err(format!(
                "{} was closed by this side before the peer said it dropped its view",
                self.who()
            ));
        }
        drop(st);
        Ok(Some(
            super::send(self.sock.as_fd(), &Msg::with(Kind::Unmap, rkey), None).err(),
        ))
    }
}

impl Sharer for Peer {
    fn unmap(&self, rkey: u32) -> Result<(), String> {
        let Some(unsent) = self.ask_unmap(rkey)? else {
            return Ok(());
        };
        let deadline = Instant::now() + UNMAP_WAIT;
        let mut st = lock(&self.state);
        loop {
            if !st.shared.contains(&rkey) {
                tracing::debug!(nic = %self.nic, qpn = self.qpn, rkey, "peer dropped its view");
                return Ok(());
            }
            if st.ended {
                return Err(format!(
                    "{} was closed by this side before the peer said it dropped its view",
                    self.who()
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(match &unsent {
                    Some(why) => format!(
                        "{}: unmap not sent ({why}), and the lane did not end within {} s",
                        self.who(),
                        UNMAP_WAIT.as_secs()
                    ),
                    None => format!(
                        "{} did not say it dropped its view within {} s",
                        self.who(),
                        UNMAP_WAIT.as_secs()
                    ),
                });
            }
            st = wait_timeout(&self.cv, st, deadline - now).0;
        }
    }
}

/// Gives the unproven slot back however the hello ends.
struct Unproven<'a>(&'a NicShared);

impl Drop for Unproven<'_> {
    fn drop(&mut self) {
        self.0.unproven.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve(nic: &Arc<NicShared>, sock: OwnedFd) {
    let slot = Unproven(nic);
    let Some((peer, qp)) = hello(nic, sock) else {
        return;
    };
    drop(slot);
    let peer: Arc<Peer> = Arc::new(peer);
    let mut by_peer = false;
    // Once the QP stops responding (ERR, RESET), the lane is wound up: every view is asked
    // back, and it ends when all are dropped (or when UNMAP_WAIT runs out).
    let mut winding: Option<Instant> = None;
    while nic.alive() {
        if winding.is_none() && !responding(&qp) {
            let rkeys: Vec<u32> = lock(&peer.state).shared.iter().copied().collect();
            for rkey in rkeys {
                match peer.ask_unmap(rkey) {
                    Ok(Some(Some(why))) | Err(why) => {
                        tracing::debug!(nic = %nic.name, qpn = peer.qpn, %why, "lane wound up");
                    }
                    Ok(_) => {}
                }
            }
            winding = Some(Instant::now() + UNMAP_WAIT);
        }
        if let Some(due) = winding
            && (lock(&peer.state).shared.is_empty() || Instant::now() >= due)
        {
            break;
        }
        let m = match super::recv(peer.sock.as_fd()) {
            Ok(Got::Msg(m, None)) => m,
            Ok(Got::Msg(_, Some(_))) => {
                tracing::warn!(nic = %nic.name, qpn = peer.qpn, "a requester sent a file: lane closed");
                break;
            }
            Ok(Got::Nothing) => continue,
            Ok(Got::End) => {
                by_peer = true;
                break;
            }
            Err(why) => {
                tracing::warn!(nic = %nic.name, qpn = peer.qpn, %why, "lane closed");
                break;
            }
        };
        let r = match m.kind {
            Kind::Map => map(nic, &peer, &qp, m.a),
            Kind::Unmapped => {
                let mut st = lock(&peer.state);
                if st.shared.remove(&m.a) {
                    nic.count_view_dropped();
                }
                peer.cv.notify_all();
                Ok(())
            }
            Kind::Violation => {
                let why = format!(
                    "a request through a view of rkey {:#x} at {:#x} of {} bytes was refused \
                     (bounds, access, or the region was zapped)",
                    m.a, m.x, m.y
                );
                nic.count_frame_refused();
                qp.responder_error("QP_ACCESS_ERR", why);
                Ok(())
            }
            other => Err(format!("a {other:?} message from a requester")),
        };
        if let Err(why) = r {
            tracing::warn!(nic = %nic.name, qpn = peer.qpn, %why, "lane closed");
            break;
        }
    }
    peer.end(by_peer);
}

/// Whether the QP takes requests (as the socket path's responder does only then).
fn responding(qp: &TcpQp) -> bool {
    matches!(qp.fast_state(), QpState::Rtr | QpState::Rts | QpState::Sqd)
}

/// The hello: the peer's user, the challenge, the proof. Returns the proven peer and its QP's
/// protection domain.
fn hello(nic: &NicShared, sock: OwnedFd) -> Option<(Peer, Arc<TcpQp>)> {
    let refuse = |sock: &OwnedFd, r: Refusal, why: String| {
        nic.count_hello_refused();
        nic.event("LANE_REFUSED", None, why.clone());
        tracing::warn!(nic = %nic.name, %why, "lane refused");
        let mut m = Msg::new(Kind::Refuse);
        m.code = r as u8;
        let _ = super::send(sock.as_fd(), &m, None);
        None
    };
    let close = |why: &str| {
        nic.count_unproven_closed();
        tracing::debug!(nic = %nic.name, why, "lane closed before its hello");
        None
    };
    if super::set_timeout(sock.as_fd(), TICK).is_err() {
        return close("no receive timeout");
    }
    if !nic.shm.load(Ordering::Relaxed) {
        return refuse(&sock, Refusal::Off, "the shared-memory path is off".into());
    }
    let pid =
        rustix::net::sockopt::socket_peercred(&sock).map_or(0, |c| c.pid.as_raw_nonzero().get());
    match super::same_user(&sock) {
        Ok(true) => {}
        Ok(false) => {
            return refuse(
                &sock,
                Refusal::User,
                format!("process {pid} runs as another user"),
            );
        }
        Err(why) => return close(&why),
    }
    let Some(nonce) = super::super::random::<32>() else {
        return close("no random bytes for a nonce");
    };
    let mut c = Msg::new(Kind::Challenge);
    c.blob = nonce;
    if super::send(sock.as_fd(), &c, None).is_err() {
        return close("challenge not sent");
    }
    let deadline = Instant::now() + LANE_TIME;
    let h = loop {
        if !nic.alive() || Instant::now() >= deadline {
            return close("no hello in time");
        }
        match super::recv(sock.as_fd()) {
            Ok(Got::Msg(m, None)) if m.kind == Kind::Hello => break m,
            Ok(Got::Nothing) => {}
            _ => return close("not a hello"),
        }
    };
    let Some(qp) = nic.qp(h.a) else {
        return refuse(&sock, Refusal::Denied, format!("no QP {:#x}", h.a));
    };
    {
        let inner = lock(&qp.inner);
        let ready = matches!(inner.state, QpState::Rtr | QpState::Rts | QpState::Sqd);
        let paired = inner.dest.is_some_and(|d| d.qpn == h.b && d.gid == h.gid);
        let proven = verify(
            &qp.token,
            &super::lane_nonce(&nonce),
            h.a,
            h.b,
            &h.gid,
            &h.blob,
        );
        if !(ready && paired && proven) {
            drop(inner);
            return refuse(
                &sock,
                Refusal::Denied,
                format!(
                    "a lane for QP {:#x} from QP {:#x} (process {pid}): {}",
                    h.a,
                    h.b,
                    if !proven {
                        "a wrong proof"
                    } else if !paired {
                        "not the QP it is connected to"
                    } else {
                        "the QP is not ready"
                    }
                ),
            );
        }
    }
    // Counted before the peer can know it was served.
    nic.count_lane();
    if super::send(sock.as_fd(), &Msg::new(Kind::Welcome), None).is_err() {
        return None;
    }
    tracing::debug!(nic = %nic.name, qpn = h.a, pid, "lane proven");
    Some((
        Peer {
            nic: nic.name.clone(),
            qpn: h.a,
            pid,
            sock,
            sending: Mutex::new(()),
            state: Mutex::new(PeerState::default()),
            cv: Condvar::new(),
        },
        qp,
    ))
}

/// Answer a request for a view of `rkey`: checked as a NIC checks a request — a QP that takes
/// requests, a live region of its protection domain, the access both grant. A refused key
/// moves the QP to ERR, as a nak does.
fn map(nic: &NicShared, peer: &Arc<Peer>, qp: &TcpQp, rkey: u32) -> Result<(), String> {
    let refuse = |r: MapRefusal| {
        let mut m = Msg::with(Kind::MapRefused, rkey);
        m.code = r as u8;
        super::send(peer.sock.as_fd(), &m, None)
    };
    let denied = |why: String| {
        nic.count_frame_refused();
        // Not under `sending`: the QP's ERR may run a quiesce whose zap sends on this lane.
        qp.responder_error("QP_ACCESS_ERR", why);
        refuse(MapRefusal::Denied)
    };
    if !responding(qp) {
        return refuse(MapRefusal::Denied);
    }
    let qp_access = lock(&qp.inner).access;
    let Some(mr) = nic.mr(rkey).filter(|m| m.pd == qp.pd) else {
        return denied(format!(
            "a view of rkey {rkey:#x} refused: no region of the QP's protection domain has it"
        ));
    };
    let me: Arc<dyn Sharer> = peer.clone();
    let sending = lock(&peer.sending);
    let shared = match mr.share(&me) {
        Ok(s) => s,
        Err(NotShared::Denied) => {
            drop(sending);
            return denied(format!(
                "a view of rkey {rkey:#x} refused: the region is zapped or grants no remote access"
            ));
        }
        Err(NotShared::NoFile) => return refuse(MapRefusal::NotShared),
    };
    // What the peer may do through the view: what the region and the QP both grant.
    let access = shared.access & (qp_access | MrAccess::LOCAL_WRITE);
    if !access.intersects(MrAccess::REMOTE_READ | MrAccess::REMOTE_WRITE) {
        drop(sending);
        return denied(format!(
            "a view of rkey {rkey:#x} refused: the QP grants no remote access ({qp_access})"
        ));
    }
    // A region the peer may only read is handed over as a read-only file: the peer cannot map
    // it for writing.
    let ro;
    let file = if access.contains(MrAccess::REMOTE_WRITE) {
        shared.file.as_fd()
    } else {
        let path = format!("/proc/self/fd/{}", shared.file.as_raw_fd());
        match rustix::fs::open(
            path.as_str(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) {
            Ok(f) => {
                ro = f;
                ro.as_fd()
            }
            Err(e) => {
                tracing::debug!(rkey, error = %e, "no read-only reopening of a memory file");
                return refuse(MapRefusal::NotShared);
            }
        }
    };
    let mut m = Msg::with(Kind::Mapped, rkey);
    m.b = access.bits();
    m.x = shared.iova;
    m.y = shared.len;
    m.z = shared.offset;
    // Shared from now on: a zap's unmap (which waits for `sending`) follows this `mapped`.
    // Counted before the peer can know it was shared.
    lock(&peer.state).shared.insert(rkey);
    nic.count_view_shared();
    super::send(peer.sock.as_fd(), &m, Some(file))
}
