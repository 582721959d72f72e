//! The responder's engine: accept a peer's connection, have it prove the QP's token, then take
//! its frames — each header checked in full, each frame's key, bounds, access and the region's
//! state checked before a byte of it lands — and answer every message in order.
//!
//! Bounds on what a peer can make this side hold: at most [`MAX_UNPROVEN`] connections waiting
//! for their hello, each for at most [`HELLO_TIME`]; one thread per proven connection (a QP
//! serves one at a time: a newer proven one ends the older); a refused frame's payload is read
//! and dropped through a fixed buffer, never allocated from its length.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::access::MrAccess;
use crate::error::{RdmaError, Result};
use crate::qp::QpState;
use crate::sync::lock;
use crate::wc::{WcOpcode, WcStatus};
use crate::wr::RecvWr;

use super::frame::{self, CHALLENGE_PAYLOAD, HEADER, HELLO_PAYLOAD, Header, Kind, LAST, Refusal};
use super::io::{self, Moved};
use super::mr::TcpMr;
use super::qp::TcpQp;
use super::{MAX_UNPROVEN, NicShared, verify};

/// How long a responder reads and drops what a requester still sends after the connection's
/// last answer, before it closes.
pub const LINGER: Duration = Duration::from_secs(2);

/// How long a connection has to send its hello.
pub const HELLO_TIME: Duration = Duration::from_secs(5);

pub(crate) fn start_acceptor(
    nic: &Arc<NicShared>,
    listener: TcpListener,
) -> Result<JoinHandle<()>> {
    let n = nic.clone();
    std::thread::Builder::new()
        .name(format!("tcp-nic-{}", nic.name))
        .spawn(move || accept_loop(&n, &listener))
        .map_err(|e| RdmaError::io(format!("TCP NIC {}: acceptor thread", nic.name), e))
}

fn accept_loop(nic: &Arc<NicShared>, listener: &TcpListener) {
    while nic.alive() {
        match listener.accept() {
            Ok((s, peer)) => {
                if nic.unproven.fetch_add(1, Ordering::SeqCst) >= MAX_UNPROVEN {
                    nic.unproven.fetch_sub(1, Ordering::SeqCst);
                    nic.count_unproven_closed();
                    tracing::warn!(nic = %nic.name, %peer, "too many connections waiting for their hello: closed");
                    continue;
                }
                let n = nic.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("tcp-nic-{}-rx", nic.name))
                    .spawn(move || serve(&n, &s));
                if let Err(e) = spawned {
                    nic.unproven.fetch_sub(1, Ordering::SeqCst);
                    tracing::error!(nic = %nic.name, %peer, error = %e, "no thread for a connection");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = io::wait_for(listener, true);
            }
            Err(e) => {
                tracing::warn!(nic = %nic.name, error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Gives the unproven slot back however the hello phase ends.
struct Unproven<'a>(&'a NicShared);

impl Drop for Unproven<'_> {
    fn drop(&mut self) {
        self.0.unproven.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve(nic: &NicShared, s: &TcpStream) {
    let slot = Unproven(nic);
    if s.set_nonblocking(true)
        .and_then(|()| s.set_nodelay(true))
        .is_err()
    {
        return;
    }
    let Some((qp, id)) = hello(nic, s) else {
        return;
    };
    drop(slot);
    // The connection is served while the NIC runs, no newer connection replaced it, and the QP
    // can respond (a QP moved to ERR or reset stops responding, as on RC: a receive under way is
    // then flushed, not left waiting for a peer).
    let alive = || {
        nic.alive()
            && lock(&qp.inner).responder == id
            && matches!(qp.fast_state(), QpState::Rtr | QpState::Rts | QpState::Sqd)
    };
    let mut c = Conn {
        qp: &qp,
        s,
        expected: 0,
        msg: None,
        unacked: None,
        begun: None,
        alive: &alive,
    };
    if let Err(why) = c.run() {
        tracing::debug!(nic = %nic.name, qpn = qp.qpn, %why, "responder connection ended");
    }
    if let Some(r) = c.begun.take() {
        // The message it was for was cut: its receive is flushed, and the queue's flush goes on.
        qp.complete_recv(qp.wc(r.wr_id, WcStatus::WrFlushErr, WcOpcode::Recv, 0, None));
    }
    // Close gently: the last answer (a nak, a flush-ack) must reach the requester, and closing
    // with its frames unread would reset the connection and drop that answer on the way. So
    // send the end of this side, then read and drop what still comes, for a bounded time.
    let _ = s.shutdown(std::net::Shutdown::Write);
    // A connection a newer one replaced ends at once: a peer opening connection after
    // connection holds no thread for long.
    let until = Instant::now() + LINGER;
    let _ = io::drain(s, &|| alive() && Instant::now() < until);
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// The hello phase: the challenge, then the peer's proof. Returns the QP it proved itself to and
/// this connection's number on it.
fn hello(nic: &NicShared, s: &TcpStream) -> Option<(Arc<TcpQp>, u64)> {
    let deadline = Instant::now() + HELLO_TIME;
    let in_time = || nic.alive() && Instant::now() < deadline;
    let close = |why: &str| {
        nic.count_unproven_closed();
        tracing::debug!(nic = %nic.name, why, "connection closed before its hello");
        None
    };
    let Some(nonce) = super::random::<{ CHALLENGE_PAYLOAD as usize }>() else {
        return close("no random bytes for a nonce");
    };
    let mut c = Header::new(Kind::Challenge);
    c.payload = CHALLENGE_PAYLOAD;
    let mut out = c.encode().to_vec();
    out.extend_from_slice(&nonce);
    if io::write_all(s, &out, &in_time).is_err() {
        return close("challenge not sent");
    }
    let mut hdr = [0u8; HEADER];
    if io::read_exact(s, &mut hdr, &in_time).is_err() {
        return close("no hello in time");
    }
    let h = match Header::decode(&hdr, true) {
        Ok(h) if h.kind == Kind::Hello => h,
        _ => return close("not a hello"),
    };
    let mut body = [0u8; HELLO_PAYLOAD as usize];
    if io::read_exact(s, &mut body, &in_time).is_err() {
        return close("hello cut short");
    }
    let mut gid = [0u8; 16];
    gid.copy_from_slice(&body[..16]);
    let refuse = |r: Refusal, why: String| {
        if r != Refusal::NotReady {
            nic.count_hello_refused();
            nic.event("CONNECTION_REFUSED", Some(h.rkey), why.clone());
            tracing::warn!(nic = %nic.name, qpn = h.rkey, %why, "hello refused");
        }
        let mut f = Header::new(Kind::Refuse);
        f.arg = r as u32;
        let _ = io::write_all(s, &f.encode(), &in_time);
        None
    };
    if h.addr != u64::from(frame::VERSION) {
        return refuse(
            Refusal::Version,
            format!("protocol version {} (this is {})", h.addr, frame::VERSION),
        );
    }
    let Some(qp) = nic.qp(h.rkey) else {
        return refuse(Refusal::NoQp, format!("no QP {:#x}", h.rkey));
    };
    let id = {
        let mut inner = lock(&qp.inner);
        if !matches!(inner.state, QpState::Rtr | QpState::Rts | QpState::Sqd) {
            drop(inner);
            return refuse(Refusal::NotReady, String::new());
        }
        let paired = inner.dest.is_some_and(|d| d.qpn == h.arg && d.gid == gid);
        if !paired {
            drop(inner);
            return refuse(
                Refusal::Denied,
                format!(
                    "QP {:#x} is not connected to QP {:#x} at that GID",
                    h.rkey, h.arg
                ),
            );
        }
        if !verify(&qp.token, &nonce, h.rkey, h.arg, &gid, &body[16..]) {
            drop(inner);
            return refuse(
                Refusal::Denied,
                format!("a wrong proof for QP {:#x}", h.rkey),
            );
        }
        inner.responder += 1;
        inner.responder
    };
    // Counted before the peer can know it was served.
    nic.count_connection();
    // The welcome names the lane listener for a requester on this host (0: none offered).
    let mut w = Header::new(Kind::Welcome);
    w.addr = nic.offered_lane();
    io::write_all(s, &w.encode(), &in_time).ok()?;
    Some((qp, id))
}

/// The message whose frames are arriving.
#[derive(Debug)]
struct Msg {
    seq: u32,
    kind: Kind,
    /// The remote address the next WRITE frame must name.
    next_addr: u64,
    /// Bytes of it so far.
    bytes: u64,
    /// A SEND's receive request.
    recv: Option<RecvWr>,
}

struct Conn<'a> {
    qp: &'a TcpQp,
    s: &'a TcpStream,
    /// The sequence number the next message must have.
    expected: u32,
    msg: Option<Msg>,
    /// The receive this connection took for a message under way (`TcpQp::begin_recv`), until it
    /// completes it: ended as flushed if the connection ends first.
    begun: Option<RecvWr>,
    /// The last message done and not yet acknowledged: acks are cumulative (one for message n
    /// answers every message up to n, as RC's do), sent once no more frames wait to be read.
    unacked: Option<u32>,
    alive: io::Alive<'a>,
}

impl Conn<'_> {
    fn run(&mut self) -> std::result::Result<(), String> {
        let mut hdr = [0u8; HEADER];
        loop {
            if self.unacked.is_some() && !io::has_input(self.s) {
                self.send_ack()?;
            }
            io::read_exact(self.s, &mut hdr, self.alive).map_err(|e| e.to_string())?;
            let h = Header::decode(&hdr, true).map_err(|e| self.refused(e.to_string()))?;
            match h.kind {
                Kind::Flush => {
                    if self.msg.take().is_some() {
                        self.qp.nic.event(
                            "MESSAGE_CUT",
                            Some(self.qp.qpn),
                            "the requester flushed in the middle of a message".into(),
                        );
                    }
                    self.send_ack()?;
                    let mut a = Header::new(Kind::FlushAck);
                    a.seq = h.seq;
                    io::write_all(self.s, &a.encode(), self.alive).map_err(|e| e.to_string())?;
                    return Ok(());
                }
                Kind::Hello => return Err(self.refused("a second hello".into())),
                _ => {}
            }
            self.check_sequence(&h)?;
            if !matches!(
                self.qp.fast_state(),
                QpState::Rtr | QpState::Rts | QpState::Sqd
            ) {
                io::discard(self.s, u64::from(h.payload), self.alive).map_err(|e| e.to_string())?;
                return self.nak(
                    h.seq,
                    WcStatus::RetryExcErr,
                    "the responder QP is not ready",
                );
            }
            match h.kind {
                Kind::Write => self.write(&h)?,
                Kind::Send => self.send(&h)?,
                Kind::Read => self.read(&h)?,
                _ => return Err(self.refused(format!("a {} frame", h.kind.name()))),
            }
        }
    }

    /// A frame the peer should not have sent: counted, and the connection ends.
    fn refused(&self, why: String) -> String {
        self.qp.nic.count_frame_refused();
        self.qp
            .nic
            .event("FRAME_REFUSED", Some(self.qp.qpn), why.clone());
        why
    }

    fn check_sequence(&mut self, h: &Header) -> std::result::Result<(), String> {
        match &self.msg {
            Some(m) if m.seq == h.seq && m.kind == h.kind && !h.first() => Ok(()),
            None if h.seq == self.expected && h.first() => Ok(()),
            _ => Err(self.refused(format!(
                "{} frame {} out of sequence (expected message {})",
                h.kind.name(),
                h.seq,
                self.expected
            ))),
        }
    }

    /// Answer `seq` with a failure; the connection ends.
    fn nak(&mut self, seq: u32, status: WcStatus, why: &str) -> std::result::Result<(), String> {
        self.send_ack()?;
        let mut n = Header::new(Kind::Nak);
        n.seq = seq;
        n.arg = status.ibv();
        io::write_all(self.s, &n.encode(), self.alive).map_err(|e| e.to_string())?;
        Err(format!("message {seq}: {why} ({status})"))
    }

    fn begin_recv(&mut self) -> Option<RecvWr> {
        let r = self.qp.begin_recv();
        self.begun = r;
        r
    }

    fn complete_recv(&mut self, wc: crate::wc::Completion) {
        self.begun = None;
        self.qp.complete_recv(wc);
    }

    /// Message `seq` is done: acknowledged with the next ack sent.
    fn ack(&mut self, seq: u32) -> std::result::Result<(), String> {
        self.msg = None;
        self.expected = self.expected.wrapping_add(1);
        self.unacked = Some(seq);
        Ok(())
    }

    /// Send the cumulative ack owed, if any.
    fn send_ack(&mut self) -> std::result::Result<(), String> {
        let Some(seq) = self.unacked.take() else {
            return Ok(());
        };
        let mut a = Header::new(Kind::Ack);
        a.seq = seq;
        io::write_all(self.s, &a.encode(), self.alive).map_err(|e| e.to_string())
    }

    /// The region `rkey` names, if this QP may reach it with `need`.
    fn remote_mr(
        &self,
        rkey: u32,
        addr: u64,
        len: u64,
        need: MrAccess,
    ) -> std::result::Result<Arc<TcpMr>, String> {
        let qp_allows = lock(&self.qp.inner).access.contains(need);
        let why = match self.qp.nic.mr(rkey) {
            None => "no such key".to_string(),
            Some(mr) if mr.pd != self.qp.pd => "another protection domain's key".into(),
            Some(_) if !qp_allows => format!("the QP does not allow {need}"),
            Some(mr) => match mr.check(addr, len, need) {
                Ok(()) => return Ok(mr),
                Err(f) => format!("{f:?}"),
            },
        };
        Err(format!(
            "rkey {rkey:#x} [{addr:#x}, +{len:#x}) refused: {why}"
        ))
    }

    /// A peer's access broke the rules: the responder QP goes to ERR, the requester is told.
    fn access_error(&mut self, seq: u32, why: String) -> std::result::Result<(), String> {
        self.qp.nic.count_frame_refused();
        self.qp.responder_error("QP_ACCESS_ERR", why.clone());
        self.nak(seq, WcStatus::RemAccessErr, &why)
    }

    fn write(&mut self, h: &Header) -> std::result::Result<(), String> {
        let n = u64::from(h.payload);
        match &self.msg {
            Some(m) if m.next_addr != h.addr => {
                return Err(self.refused(format!(
                    "write frame at {:#x}, expected {:#x}",
                    h.addr, m.next_addr
                )));
            }
            Some(_) => {}
            None => {
                self.msg = Some(Msg {
                    seq: h.seq,
                    kind: Kind::Write,
                    next_addr: h.addr,
                    bytes: 0,
                    recv: None,
                });
            }
        }
        let imm = h.imm().filter(|_| h.last());
        let recv = if imm.is_some() {
            match self.begin_recv() {
                Some(r) => Some(r),
                None => {
                    io::discard(self.s, n, self.alive).map_err(|e| e.to_string())?;
                    return self.nak(
                        h.seq,
                        WcStatus::RnrRetryExcErr,
                        "no receive posted for the immediate",
                    );
                }
            }
        } else {
            None
        };
        if n > 0 {
            let mr = match self.remote_mr(h.rkey, h.addr, n, MrAccess::REMOTE_WRITE) {
                Ok(mr) => mr,
                Err(why) => {
                    io::discard(self.s, n, self.alive).map_err(|e| e.to_string())?;
                    return self.access_error(h.seq, why);
                }
            };
            match io::recv_into(self.s, &mr, h.addr, n, MrAccess::REMOTE_WRITE, self.alive) {
                Ok(()) => {}
                Err(Moved::Mr { fault, done }) => {
                    io::discard(self.s, n - done, self.alive).map_err(|e| e.to_string())?;
                    return self.access_error(
                        h.seq,
                        format!("rkey {:#x} refused mid-frame: {fault:?}", h.rkey),
                    );
                }
                Err(Moved::Io(e)) => return Err(e.to_string()),
            }
        }
        if let Some(m) = self.msg.as_mut() {
            m.next_addr = m.next_addr.wrapping_add(n);
            m.bytes += n;
        }
        if !h.last() {
            return Ok(());
        }
        if let (Some(rwr), Some(v)) = (recv, imm) {
            let bytes = self.msg.as_ref().map_or(n, |m| m.bytes);
            let wc = self.qp.wc(
                rwr.wr_id,
                WcStatus::Success,
                WcOpcode::RecvRdmaWithImm,
                u32::try_from(bytes).unwrap_or(u32::MAX),
                Some(v),
            );
            self.complete_recv(wc);
        }
        self.ack(h.seq)
    }

    fn send(&mut self, h: &Header) -> std::result::Result<(), String> {
        let n = u64::from(h.payload);
        if self.msg.is_none() {
            let Some(rwr) = self.begin_recv() else {
                io::discard(self.s, n, self.alive).map_err(|e| e.to_string())?;
                return self.nak(h.seq, WcStatus::RnrRetryExcErr, "no receive posted");
            };
            self.msg = Some(Msg {
                seq: h.seq,
                kind: Kind::Send,
                next_addr: 0,
                bytes: 0,
                recv: Some(rwr),
            });
        }
        let (rwr, at) = match &self.msg {
            Some(Msg {
                recv: Some(r),
                bytes,
                ..
            }) => (*r, *bytes),
            _ => return Err("a send without its receive".into()),
        };
        let fail = |c: &mut Self, st: WcStatus, nak: WcStatus, why: String| {
            let wc = c.qp.wc(rwr.wr_id, st, WcOpcode::Recv, 0, None);
            c.complete_recv(wc);
            c.qp.responder_error("QP_REQ_ERR", why.clone());
            c.nak(h.seq, nak, &why)
        };
        if at + n > rwr.sg.total() {
            io::discard(self.s, n, self.alive).map_err(|e| e.to_string())?;
            return fail(
                self,
                WcStatus::LocLenErr,
                WcStatus::RemInvReqErr,
                format!(
                    "a SEND of more than the {} bytes received into",
                    rwr.sg.total()
                ),
            );
        }
        let (qp, s) = (self.qp, self.s);
        let mr_of = |key: u32| qp.nic.mr(key).filter(|m| m.pd == qp.pd);
        match io::recv_scattered(s, rwr.sg.as_slice(), at, n, &mr_of, self.alive) {
            Ok(()) => {}
            Err(Moved::Mr { fault, .. }) => {
                return fail(
                    self,
                    WcStatus::LocProtErr,
                    WcStatus::RemOpErr,
                    format!("a receive buffer refused the SEND: {fault:?}"),
                );
            }
            Err(Moved::Io(e)) => return Err(e.to_string()),
        }
        if let Some(m) = self.msg.as_mut() {
            m.bytes += n;
        }
        if !h.last() {
            return Ok(());
        }
        let bytes = at + n;
        let wc = self.qp.wc(
            rwr.wr_id,
            WcStatus::Success,
            WcOpcode::Recv,
            u32::try_from(bytes).unwrap_or(u32::MAX),
            h.imm(),
        );
        {
            self.complete_recv(wc);
        }
        self.ack(h.seq)
    }

    fn read(&mut self, h: &Header) -> std::result::Result<(), String> {
        self.send_ack()?;
        let total = u64::from(h.arg);
        let mr = if total > 0 {
            match self.remote_mr(h.rkey, h.addr, total, MrAccess::REMOTE_READ) {
                Ok(mr) => Some(mr),
                Err(why) => return self.access_error(h.seq, why),
            }
        } else {
            None
        };
        let mut off = 0u64;
        loop {
            let n = (total - off).min(u64::from(frame::MAX_PAYLOAD));
            let last = off + n == total;
            if let Some(mr) = &mr
                && mr.zapping()
            {
                return self
                    .access_error(h.seq, format!("rkey {:#x} zapped during a READ", h.rkey));
            }
            let mut r = Header::new(Kind::ReadResp);
            r.seq = h.seq;
            r.payload = u32::try_from(n).unwrap_or(frame::MAX_PAYLOAD);
            r.flags = if last { LAST } else { 0 };
            let head = r.encode();
            match &mr {
                Some(mr) if n > 0 => match io::send_frame(
                    self.s,
                    &head,
                    mr,
                    h.addr + off,
                    n,
                    MrAccess::REMOTE_READ,
                    !last,
                    self.alive,
                ) {
                    Ok(true) => {}
                    // Zapped before this frame went: nothing of it is on the wire.
                    Ok(false) => {
                        return self.access_error(
                            h.seq,
                            format!("rkey {:#x} zapped during a READ", h.rkey),
                        );
                    }
                    Err(Moved::Mr { done, fault }) => {
                        io::pad(self.s, n - done, self.alive).map_err(|e| e.to_string())?;
                        return self.access_error(
                            h.seq,
                            format!("rkey {:#x} refused mid-READ: {fault:?}", h.rkey),
                        );
                    }
                    Err(Moved::Io(e)) => return Err(e.to_string()),
                },
                _ => io::write_all(self.s, &head, self.alive).map_err(|e| e.to_string())?,
            }
            off += n;
            if last {
                break;
            }
        }
        self.msg = None;
        self.expected = self.expected.wrapping_add(1);
        Ok(())
    }
}
