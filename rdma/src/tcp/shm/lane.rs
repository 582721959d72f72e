//! The requester's side of a lane: open and prove it, keep the views the owner handed out, drop
//! them when told, and execute WRITEs and READs through them (see the module docs of `shm`).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use dmaplane_core::fabric::View;
use rustix::net::{AddressFamily, SocketFlags, SocketType};

use crate::access::MrAccess;
use crate::qp::{QpState, RemoteQp};
use crate::sync::{lock, read, wait_timeout, write};
use crate::wc::WcStatus;
use crate::wr::{SendOp, SendWr};

use super::super::qp::TcpQp;
use super::super::{NicShared, proof};
use super::{Got, Kind, LANE_TIME, MapRefusal, Msg, Refusal, TICK};

/// How many bytes one copy moves at most: between two, the QP's state is looked at, and a
/// view's drop or a region's zap waits for at most one.
const CHUNK: usize = 1 << 20;
/// How many socket-only rkeys a lane remembers (then it forgets them all and asks again).
const SOCKET_ONLY: usize = 4096;

/// A region of the owner's, as the owner described it, and the view of it (`None` once the
/// owner had it dropped: requests to it then fail as a remote access error).
#[derive(Debug)]
struct Remote {
    iova: u64,
    len: u64,
    access: MrAccess,
    view: RwLock<Option<View>>,
}

/// What the owner answered to a `map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Mapped,
    Refused(u8),
    /// The view could not be made here: the socket path.
    Unusable,
}

/// A requester QP connection's lane (see the module docs of `shm`).
#[derive(Debug)]
pub(crate) struct Lane {
    nic: Arc<NicShared>,
    qpn: u32,
    sock: OwnedFd,
    remotes: RwLock<HashMap<u32, Arc<Remote>>>,
    /// Rkeys the owner said are not shared (or whose view could not be made): the socket path
    /// at once, without asking again (at most [`SOCKET_ONLY`] remembered).
    socket_only: Mutex<std::collections::HashSet<u32>>,
    answer: Mutex<Option<(u32, Answer)>>,
    cv: Condvar,
    ended: AtomicBool,
}

/// Open and prove a lane to lane listener `id` for `qp`, whose peer is `dest`. `Err` says why
/// not (the peer is not on this host, another user's, refused it): then the socket path only.
pub(crate) fn open(qp: &TcpQp, dest: &RemoteQp, id: u64) -> Result<Arc<Lane>, String> {
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    let addr = super::address(id).map_err(|e| format!("address: {e}"))?;
    rustix::net::connect(&sock, &addr)
        .map_err(|e| format!("not on this host (or not in this network namespace): {e}"))?;
    if !super::same_user(&sock)? {
        return Err("the owner runs as another user".into());
    }
    super::set_timeout(sock.as_fd(), LANE_TIME)?;
    let challenge = match super::recv(sock.as_fd())? {
        Got::Msg(m, None) if m.kind == Kind::Challenge => m,
        Got::Msg(m, _) if m.kind == Kind::Refuse => return Err(refusal(m.code)),
        _ => return Err("no challenge".into()),
    };
    let mut h = Msg::with(Kind::Hello, dest.qpn);
    h.b = qp.qpn;
    h.gid = qp.nic.gid;
    h.blob = proof(
        &dest.token,
        &super::lane_nonce(&challenge.blob),
        dest.qpn,
        qp.qpn,
        &qp.nic.gid,
    );
    super::send(sock.as_fd(), &h, None)?;
    match super::recv(sock.as_fd())? {
        Got::Msg(m, None) if m.kind == Kind::Welcome => {}
        Got::Msg(m, _) if m.kind == Kind::Refuse => return Err(refusal(m.code)),
        _ => return Err("no welcome".into()),
    }
    super::set_timeout(sock.as_fd(), TICK)?;
    let lane = Arc::new(Lane {
        nic: qp.nic.clone(),
        qpn: qp.qpn,
        sock,
        remotes: RwLock::new(HashMap::new()),
        socket_only: Mutex::new(std::collections::HashSet::new()),
        answer: Mutex::new(None),
        cv: Condvar::new(),
        ended: AtomicBool::new(false),
    });
    let l = lane.clone();
    std::thread::Builder::new()
        .name(format!("tcp-qp-{:x}-lane", qp.qpn))
        .spawn(move || l.read_loop())
        .map_err(|e| format!("no lane thread: {e}"))?;
    Ok(lane)
}

fn refusal(code: u8) -> String {
    match code {
        c if c == Refusal::User as u8 => "refused: another user's process".into(),
        c if c == Refusal::Denied as u8 => "refused: the proof or the QP pairing is wrong".into(),
        c if c == Refusal::Off as u8 => "the owner's shared-memory path is off".into(),
        c => format!("refused with unknown code {c}"),
    }
}

/// How a request through a view ended.
enum Outcome {
    /// Done: the completion's status and bytes.
    Done(WcStatus, u32),
    /// The region is not reachable through a view: send it on the socket.
    Socket,
}

impl Lane {
    /// The owner's messages, in order: views made and dropped as it says.
    fn read_loop(&self) {
        while !self.ended.load(Ordering::SeqCst) {
            let r = match super::recv(self.sock.as_fd()) {
                Ok(Got::Nothing) => continue,
                Ok(Got::End) => break,
                Ok(Got::Msg(m, file)) => self.take(&m, file),
                Err(why) => Err(why),
            };
            if let Err(why) = r {
                // Ended by this side (its connection is done): nothing to tell.
                if !self.ended.load(Ordering::SeqCst) {
                    tracing::warn!(nic = %self.nic.name, qpn = self.qpn, %why, "lane closed");
                }
                break;
            }
        }
        self.end();
    }

    fn take(&self, m: &Msg, file: Option<OwnedFd>) -> Result<(), String> {
        match (m.kind, file) {
            (Kind::Mapped, Some(f)) => {
                let access = MrAccess::from_bits(m.b)
                    .ok_or_else(|| format!("access {:#x} for rkey {:#x}", m.b, m.a))?;
                if m.x.checked_add(m.y).is_none() {
                    return Err(format!(
                        "rkey {:#x}: iova {:#x} + {:#x} bytes overflows",
                        m.a, m.x, m.y
                    ));
                }
                let answer =
                    match View::map(f.as_fd(), m.z, m.y, access.contains(MrAccess::REMOTE_WRITE)) {
                        Ok(view) => {
                            let r = Remote {
                                iova: m.x,
                                len: m.y,
                                access,
                                view: RwLock::new(Some(view)),
                            };
                            write(&self.remotes).insert(m.a, Arc::new(r));
                            Answer::Mapped
                        }
                        Err(e) => {
                            tracing::debug!(rkey = m.a, error = %e, "no view: the socket path");
                            Answer::Unusable
                        }
                    };
                self.answer(m.a, answer);
                Ok(())
            }
            (Kind::MapRefused, None) => {
                self.answer(m.a, Answer::Refused(m.code));
                Ok(())
            }
            (Kind::Unmap, None) => {
                if self.nic.keep_views.load(Ordering::SeqCst) {
                    tracing::warn!(rkey = m.a, "fault injected: the view is kept");
                } else {
                    self.drop_view(m.a);
                }
                super::send(self.sock.as_fd(), &Msg::with(Kind::Unmapped, m.a), None)
            }
            (k, f) => Err(format!(
                "a {k:?} message {} a file from the owner",
                if f.is_some() { "with" } else { "without" }
            )),
        }
    }

    fn answer(&self, rkey: u32, a: Answer) {
        *lock(&self.answer) = Some((rkey, a));
        self.cv.notify_all();
    }

    /// Drop the view of `rkey` (waiting for the one copy under way); requests to it fail from
    /// now on: one under way meets no view, and a later one asks the owner again, who refuses a
    /// zapped key. The entry goes too, so a long-lived lane keeps nothing of regions gone.
    fn drop_view(&self, rkey: u32) {
        let r = write(&self.remotes).remove(&rkey);
        if let Some(r) = r {
            let view = write(&r.view).take();
            drop(view);
            tracing::debug!(nic = %self.nic.name, qpn = self.qpn, rkey, "view dropped");
        }
    }

    /// The lane ends: every view is dropped first, then the socket is closed — so the owner,
    /// seeing its end, knows no view is left.
    pub(crate) fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        let remotes: Vec<Arc<Remote>> = read(&self.remotes).values().cloned().collect();
        for r in remotes {
            let view = write(&r.view).take();
            drop(view);
        }
        let _ = rustix::net::shutdown(&self.sock, rustix::net::Shutdown::Both);
        self.cv.notify_all();
    }

    /// The region of `rkey`, asked of the owner the first time.
    fn remote(&self, rkey: u32) -> Result<Arc<Remote>, Outcome> {
        if let Some(r) = read(&self.remotes).get(&rkey) {
            return Ok(r.clone());
        }
        if self.ended.load(Ordering::SeqCst) || lock(&self.socket_only).contains(&rkey) {
            return Err(Outcome::Socket);
        }
        *lock(&self.answer) = None;
        if super::send(self.sock.as_fd(), &Msg::with(Kind::Map, rkey), None).is_err() {
            return Err(Outcome::Socket);
        }
        let deadline = Instant::now() + LANE_TIME;
        let mut a = lock(&self.answer);
        let answer = loop {
            if let Some((k, x)) = *a
                && k == rkey
            {
                break x;
            }
            let now = Instant::now();
            if self.ended.load(Ordering::SeqCst) || now >= deadline {
                break Answer::Unusable;
            }
            a = wait_timeout(&self.cv, a, (deadline - now).min(TICK)).0;
        };
        drop(a);
        match answer {
            Answer::Mapped => read(&self.remotes)
                .get(&rkey)
                .cloned()
                .ok_or(Outcome::Done(WcStatus::RemAccessErr, 0)),
            Answer::Refused(c) if c == MapRefusal::NotShared as u8 => {
                self.socket_only(rkey);
                Err(Outcome::Socket)
            }
            Answer::Refused(_) => Err(Outcome::Done(WcStatus::RemAccessErr, 0)),
            Answer::Unusable => {
                self.socket_only(rkey);
                Err(Outcome::Socket)
            }
        }
    }

    /// Requests to `rkey` take the socket from now on.
    fn socket_only(&self, rkey: u32) {
        let mut s = lock(&self.socket_only);
        if s.len() >= SOCKET_ONLY {
            s.clear();
        }
        s.insert(rkey);
    }

    /// `wr` broke its region's rules (or its view was dropped): the owner is told (its QP goes
    /// to ERR, as a responder's does when it naks), and it fails as a remote access error.
    fn violation(&self, wr: &SendWr) -> (WcStatus, u32) {
        let mut m = Msg::with(Kind::Violation, wr.remote.rkey);
        m.x = wr.remote.addr;
        m.y = wr.sg.total();
        if let Err(why) = super::send(self.sock.as_fd(), &m, None) {
            tracing::debug!(nic = %self.nic.name, qpn = self.qpn, %why, "violation not told");
        }
        (WcStatus::RemAccessErr, 0)
    }

    /// Execute `wr` (a WRITE without immediate, or a READ) through a view, when its region can
    /// be reached so: `None` sends it on the socket instead. Every earlier message of the QP has
    /// been answered (the caller waited).
    pub(crate) fn execute(
        &self,
        qp: &TcpQp,
        generation: u64,
        wr: &SendWr,
    ) -> Option<(WcStatus, u32)> {
        if self.ended.load(Ordering::SeqCst) {
            return None;
        }
        let (to_view, need) = match wr.op {
            SendOp::RdmaWrite => (true, MrAccess::REMOTE_WRITE),
            SendOp::RdmaRead => (false, MrAccess::REMOTE_READ),
            _ => return None,
        };
        let remote = match self.remote(wr.remote.rkey) {
            Ok(r) => r,
            Err(Outcome::Socket) => return None,
            Err(Outcome::Done(st, n)) => return Some((st, n)),
        };
        let total = wr.sg.total();
        let end = remote.iova.saturating_add(remote.len);
        let in_bounds = wr.remote.addr >= remote.iova
            && wr.remote.addr.checked_add(total).is_some_and(|e| e <= end);
        if !remote.access.contains(need) || !in_bounds {
            return Some(self.violation(wr));
        }
        let local_need = if to_view {
            MrAccess::NONE
        } else {
            MrAccess::LOCAL_WRITE
        };
        let sges = wr.sg.as_slice();
        let Some(mrs) = qp.local_mrs(sges, local_need) else {
            return Some((WcStatus::LocProtErr, 0));
        };
        let mut done = 0u64;
        for (sge, mr) in sges.iter().zip(&mrs) {
            let len = u64::from(sge.length);
            let mut off = 0u64;
            while off < len {
                // ERR cuts the message between two chunks; a RESET (a new generation) ends it.
                let state = qp.fast_state();
                if state == QpState::Err
                    || !matches!(state, QpState::Rts | QpState::Sqd)
                    || lock(&qp.inner).generation != generation
                {
                    if done > 0 {
                        qp.nic.event(
                            "MESSAGE_CUT",
                            Some(qp.qpn),
                            format!("a view's copy flushed after {done} of {total} bytes"),
                        );
                    }
                    return Some((WcStatus::WrFlushErr, 0));
                }
                let want = (len - off).min(CHUNK as u64);
                let at = wr.remote.addr - remote.iova + done;
                // (copied, bytes): the local region gives at most `want`, fewer at a piece's end.
                let r = mr.access(sge.addr + off, want, local_need, |pin, poff, n| {
                    let view = read(&remote.view);
                    let moved = view.as_ref().is_some_and(|v| {
                        if to_view {
                            v.write_from(at, pin, poff, n)
                        } else {
                            v.read_into(at, pin, poff, n)
                        }
                    });
                    (moved, n)
                });
                match r {
                    Ok((true, n)) => {
                        off += n as u64;
                        done += n as u64;
                    }
                    // The lane ended under the copy (the owner's process went away, or closed
                    // it): the message is sent again on the socket, which tells whether the
                    // peer is still there (a WRITE or READ may run twice, as RC retransmits).
                    Ok((false, _)) if self.ended.load(Ordering::SeqCst) => return None,
                    // The owner had the view dropped (a zap): a remote access error, as a
                    // zapped region's nak is.
                    Ok((false, _)) => return Some(self.violation(wr)),
                    Err(_) => return Some((WcStatus::LocProtErr, 0)),
                }
            }
        }
        self.nic.count_shm_message(done);
        Some((WcStatus::Success, u32::try_from(total).unwrap_or(u32::MAX)))
    }
}
