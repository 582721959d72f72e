//! A queue pair's requester connection: dial the responder's data port and prove the token
//! (retrying while the peer's QP is not ready yet, as RC retries), then a sender thread that
//! frames the queued messages and a receiver thread that lands READ responses and completes
//! messages as the responder answers them.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::access::MrAccess;
use crate::qp::QpState;
use crate::sync::{lock, wait_timeout};
use crate::wc::WcStatus;
use crate::wr::{SendOp, SendWr};

use super::frame::{self, CHALLENGE_PAYLOAD, FIRST, HEADER, Header, IMM, Kind, LAST, Refusal};
use super::io::{self, Moved};
use super::qp::{Sent, TcpQp};
use super::shm::lane::{self, Lane};
use super::{ip_of, proof};

/// How long a requester keeps trying to reach a responder that is not ready (RC's retry count
/// times its timeout).
pub const CONNECT_TIME: Duration = Duration::from_secs(5);
/// How long one TCP connect may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the sender sleeps between two looks at an idle queue.
const IDLE: Duration = Duration::from_millis(50);

/// Start the requester connection of `qp` for `generation`.
pub(crate) fn start(qp: Arc<TcpQp>, generation: u64) {
    let name = format!("tcp-qp-{:x}-tx", qp.qpn);
    let q = qp.clone();
    if let Err(e) = std::thread::Builder::new()
        .name(name)
        .spawn(move || run(&q, generation))
    {
        tracing::error!(qpn = qp.qpn, error = %e, "could not start the requester thread");
        fail_to_connect(&qp, generation, format!("no thread: {e}"));
    }
}

/// Whether the connection of `generation` is still wanted.
fn wanted(qp: &TcpQp, generation: u64) -> bool {
    qp.nic.alive() && lock(&qp.inner).generation == generation
}

/// The connection could not be made: the first queued request fails as a retry-exceeded, as
/// RC's does when the peer never answers, and the QP goes to ERR (which flushes the rest).
fn fail_to_connect(qp: &TcpQp, generation: u64, why: String) {
    qp.nic.event("CONNECT_FAILED", Some(qp.qpn), why.clone());
    tracing::warn!(nic = %qp.nic.name, qpn = qp.qpn, %why, "requester connection failed");
    let mut inner = lock(&qp.inner);
    if inner.generation != generation {
        return;
    }
    if let Some(wr) = inner.sq.pop_front() {
        inner.inflight.push_back(Sent {
            wr,
            seq: u32::MAX,
            outcome: Some((WcStatus::RetryExcErr, 0)),
            got: 0,
        });
    }
    if inner.state != QpState::Err {
        qp.set_state(&mut inner, QpState::Err);
    }
    qp.finish(inner);
}

fn run(qp: &Arc<TcpQp>, generation: u64) {
    let alive = || wanted(qp, generation);
    let (stream, lane_id) = match dial(qp, &alive) {
        Ok(s) => s,
        Err(why) => return fail_to_connect(qp, generation, why),
    };
    // A responder on this host offers a lane: WRITEs and READs then go through views.
    let lane = open_lane(qp, lane_id);
    let rx = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            if let Some(l) = &lane {
                l.end();
            }
            return fail_to_connect(qp, generation, format!("socket clone: {e}"));
        }
    };
    let q = qp.clone();
    let name = format!("tcp-qp-{:x}-rx", qp.qpn);
    if let Err(e) = std::thread::Builder::new()
        .name(name)
        .spawn(move || receive(&q, generation, &rx))
    {
        if let Some(l) = &lane {
            l.end();
        }
        return fail_to_connect(qp, generation, format!("no receiver thread: {e}"));
    }
    send_loop(qp, generation, &stream, lane.as_deref());
    if let Some(l) = lane {
        l.end();
    }
}

/// Open a lane to listener `id` (0: none offered), when this NIC uses the path.
fn open_lane(qp: &TcpQp, id: u64) -> Option<Arc<Lane>> {
    if id == 0 || !qp.nic.shm.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let dest = lock(&qp.inner).dest?;
    match lane::open(qp, &dest, id) {
        Ok(l) => {
            tracing::debug!(nic = %qp.nic.name, qpn = qp.qpn, "lane open: the shared-memory path");
            Some(l)
        }
        Err(why) => {
            tracing::debug!(nic = %qp.nic.name, qpn = qp.qpn, %why, "no lane: the socket path");
            None
        }
    }
}

/// Why a dial attempt failed: worth another try within [`CONNECT_TIME`], or not.
enum DialError {
    Retry(String),
    Fatal(String),
}

/// Dial and prove; returns the connection and the lane listener its welcome named.
fn dial(qp: &TcpQp, alive: &dyn Fn() -> bool) -> Result<(TcpStream, u64), String> {
    let dest = lock(&qp.inner)
        .dest
        .ok_or_else(|| "the QP has no destination".to_string())?;
    if dest.port == 0 {
        return Err(format!(
            "QP {:#x}'s destination names no data port: it is not a QP of a TCP NIC",
            dest.qpn
        ));
    }
    let addr = SocketAddr::new(ip_of(&dest.gid), dest.port);
    let deadline = Instant::now() + CONNECT_TIME;
    let mut backoff = Duration::from_millis(2);
    loop {
        if !alive() {
            return Err("the QP was reset or its NIC stopped".into());
        }
        match dial_once(qp, addr, &dest, deadline, alive) {
            Ok(s) => return Ok(s),
            Err(DialError::Retry(why)) if Instant::now() + backoff < deadline => {
                tracing::trace!(qpn = qp.qpn, %addr, %why, "responder not ready: trying again");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
            Err(DialError::Retry(why)) => {
                return Err(format!(
                    "{addr} QP {:#x}: {why} (for {} s)",
                    dest.qpn,
                    CONNECT_TIME.as_secs()
                ));
            }
            Err(DialError::Fatal(why)) => return Err(format!("{addr} QP {:#x}: {why}", dest.qpn)),
        }
    }
}

fn dial_once(
    qp: &TcpQp,
    addr: SocketAddr,
    dest: &crate::qp::RemoteQp,
    deadline: Instant,
    alive: &dyn Fn() -> bool,
) -> Result<(TcpStream, u64), DialError> {
    use DialError::{Fatal, Retry};
    let s = TcpStream::connect_timeout(&addr, DIAL_TIMEOUT)
        .map_err(|e| Retry(format!("connect: {e}")))?;
    s.set_nodelay(true)
        .and_then(|()| s.set_nonblocking(true))
        .map_err(|e| Fatal(format!("socket options: {e}")))?;
    let in_time = || alive() && Instant::now() < deadline;
    let mut hdr = [0u8; HEADER];
    io::read_exact(&s, &mut hdr, &in_time).map_err(|e| Retry(format!("challenge: {e}")))?;
    let h = Header::decode(&hdr, false).map_err(|e| Fatal(format!("challenge: {e}")))?;
    if h.kind != Kind::Challenge {
        return Err(Fatal(format!(
            "expected a challenge, got a {}",
            h.kind.name()
        )));
    }
    let mut nonce = [0u8; CHALLENGE_PAYLOAD as usize];
    io::read_exact(&s, &mut nonce, &in_time).map_err(|e| Retry(format!("challenge: {e}")))?;
    let mut hello = Header::new(Kind::Hello);
    hello.rkey = dest.qpn;
    hello.arg = qp.qpn;
    hello.addr = u64::from(frame::VERSION);
    hello.payload = frame::HELLO_PAYLOAD;
    let mut out = Vec::with_capacity(HEADER + frame::HELLO_PAYLOAD as usize);
    out.extend_from_slice(&hello.encode());
    out.extend_from_slice(&qp.nic.gid);
    out.extend_from_slice(&proof(&dest.token, &nonce, dest.qpn, qp.qpn, &qp.nic.gid));
    io::write_all(&s, &out, &in_time).map_err(|e| Retry(format!("hello: {e}")))?;
    io::read_exact(&s, &mut hdr, &in_time).map_err(|e| Retry(format!("welcome: {e}")))?;
    let h = Header::decode(&hdr, false).map_err(|e| Fatal(format!("welcome: {e}")))?;
    match h.kind {
        Kind::Welcome => Ok((s, h.addr)),
        Kind::Refuse => match Refusal::from_code(h.arg) {
            Some(Refusal::NotReady) => Err(Retry("its QP is not ready".into())),
            Some(Refusal::Denied) => Err(Fatal(
                "refused: the proof or the QP pairing is wrong (a token not told to this QP)"
                    .into(),
            )),
            Some(Refusal::NoQp) => Err(Fatal("refused: no such QP".into())),
            Some(Refusal::Version) => Err(Fatal(format!(
                "refused: it does not speak protocol version {}",
                frame::VERSION
            ))),
            None => Err(Fatal(format!("refused with unknown code {}", h.arg))),
        },
        other => Err(Fatal(format!("expected a welcome, got a {}", other.name()))),
    }
}

/// Take the next message to start, or `None` when the connection is done: the QP went to ERR
/// (then `flush` is sent first) or was reset.
fn next(qp: &TcpQp, generation: u64, seq: u32, s: &TcpStream) -> Option<SendWr> {
    let mut inner = lock(&qp.inner);
    loop {
        if inner.generation != generation || !qp.nic.alive() {
            let _ = s.shutdown(std::net::Shutdown::Both);
            return None;
        }
        if inner.state == QpState::Err {
            let first = !inner.flush_sent;
            inner.flush_sent = true;
            drop(inner);
            if first {
                let mut h = Header::new(Kind::Flush);
                h.seq = seq;
                let alive = || wanted(qp, generation);
                // Nothing follows the flush: the end of this direction goes with it, so a
                // responder that stopped taking frames (after a nak) sees it and closes.
                let _ = io::write_all(s, &h.encode(), &alive);
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            return None;
        }
        if inner.may_start()
            && let Some(wr) = inner.sq.pop_front()
        {
            if inner.state == QpState::Sqd {
                inner.sqd_budget = inner.sqd_budget.saturating_sub(1);
            }
            inner.inflight.push_back(Sent {
                wr,
                seq,
                outcome: None,
                got: 0,
            });
            return Some(wr);
        }
        inner = wait_timeout(&qp.cv, inner, IDLE).0;
    }
}

fn send_loop(qp: &Arc<TcpQp>, generation: u64, s: &TcpStream, lane: Option<&Lane>) {
    let alive = || wanted(qp, generation);
    let mut seq = 0u32;
    while let Some(wr) = next(qp, generation, seq, s) {
        // Through a view, once every earlier message is answered: it takes no sequence number
        // on the wire (it completes before the next message starts).
        if let Some(l) = lane
            && matches!(wr.op, SendOp::RdmaWrite | SendOp::RdmaRead)
            && first_unanswered(qp, generation, seq)
        {
            lock(&qp.inner).copying = true;
            let o = l.execute(qp, generation, &wr);
            let mut inner = lock(&qp.inner);
            inner.copying = false;
            if inner.generation != generation {
                qp.finish(inner);
                return;
            }
            if let Some(o) = o {
                qp.resolve(&mut inner, seq, o);
                qp.cv.notify_all();
                qp.finish(inner);
                continue;
            }
            // Not through a view after all: the socket path below.
            qp.finish(inner);
        }
        let (outcome, broken) = match wr.op {
            SendOp::RdmaRead => request_read(qp, &wr, seq, s, &alive),
            _ => send_message(qp, &wr, seq, s, &alive),
        };
        let mut inner = lock(&qp.inner);
        if inner.generation != generation {
            return;
        }
        // Sent into a connection whose receiver has ended: no answer can come, as when RC's
        // retries run out.
        let done = inner.receiver_done;
        let outcome = outcome.or(done.then_some((WcStatus::RetryExcErr, 0)));
        if let Some(o) = outcome {
            qp.resolve(&mut inner, seq, o);
        }
        qp.cv.notify_all();
        qp.finish(inner);
        if broken || done {
            // Only this direction: the receiver still reads the responder's last answers.
            let _ = s.shutdown(std::net::Shutdown::Write);
            return;
        }
        seq = seq.wrapping_add(1);
    }
}

/// Wait until message `seq` is the first unanswered one of this connection: true then, false
/// when it was answered meanwhile (a connection that ended settles everything) or the
/// connection is no longer wanted.
fn first_unanswered(qp: &TcpQp, generation: u64, seq: u32) -> bool {
    let mut inner = lock(&qp.inner);
    let first = loop {
        if inner.generation != generation || !qp.nic.alive() {
            break false;
        }
        match inner.inflight.front() {
            Some(f) if f.seq == seq => break f.outcome.is_none(),
            None => break false,
            Some(_) => {}
        }
        if inner
            .inflight
            .iter()
            .any(|x| x.seq == seq && x.outcome.is_some())
        {
            break false;
        }
        inner.awaiting_answers = true;
        inner = wait_timeout(&qp.cv, inner, IDLE).0;
    };
    inner.awaiting_answers = false;
    first
}

/// Send a WRITE or SEND as frames. Returns its outcome when it is known here (a local failure,
/// a cut) and whether the connection broke — then the outcome is left to the receiver, which
/// reads the responder's last answers before the end of the stream.
fn send_message(
    qp: &TcpQp,
    wr: &SendWr,
    seq: u32,
    s: &TcpStream,
    alive: io::Alive<'_>,
) -> (Option<(WcStatus, u32)>, bool) {
    let (kind, imm) = match wr.op {
        SendOp::RdmaWrite => (Kind::Write, None),
        SendOp::RdmaWriteWithImm(i) => (Kind::Write, Some(i)),
        SendOp::Send => (Kind::Send, None),
        SendOp::SendWithImm(i) => (Kind::Send, Some(i)),
        SendOp::RdmaRead => return (Some((WcStatus::LocQpOpErr, 0)), false),
    };
    let sges = wr.sg.as_slice();
    let Some(mrs) = qp.local_mrs(sges, MrAccess::NONE) else {
        return (Some((WcStatus::LocProtErr, 0)), false);
    };
    let total = wr.sg.total();
    // The frames: (sge index, offset in it, bytes); an empty message is one empty frame.
    let mut frames: Vec<(usize, u64, u64)> = Vec::new();
    for (i, sge) in sges.iter().enumerate() {
        let len = u64::from(sge.length);
        let mut off = 0;
        while off < len {
            let n = (len - off).min(u64::from(frame::MAX_PAYLOAD));
            frames.push((i, off, n));
            off += n;
        }
    }
    if frames.is_empty() {
        frames.push((0, 0, 0));
    }
    let mut sent = 0u64;
    let last_i = frames.len() - 1;
    for (k, &(i, off, n)) in frames.iter().enumerate() {
        if qp.fast_state() == QpState::Err {
            if sent > 0 {
                qp.nic.event(
                    "MESSAGE_CUT",
                    Some(qp.qpn),
                    format!("{} flushed after {sent} of {total} bytes", kind.name()),
                );
            }
            return (Some((WcStatus::WrFlushErr, 0)), false);
        }
        let last = k == last_i;
        let mut h = Header::new(kind);
        h.seq = seq;
        h.flags = if k == 0 { FIRST } else { 0 } | if last { LAST } else { 0 };
        if last && let Some(v) = imm {
            h.flags |= IMM;
            h.arg = v;
        }
        h.payload = u32::try_from(n).unwrap_or(frame::MAX_PAYLOAD);
        h.rkey = wr.remote.rkey;
        h.addr = wr.remote.addr.wrapping_add(sent);
        let head = h.encode();
        if n == 0 {
            if io::write_all(s, &head, alive).is_err() {
                return (None, true);
            }
        } else {
            let sge = sges[i];
            match io::send_frame(
                s,
                &head,
                &mrs[i],
                sge.addr + off,
                n,
                MrAccess::NONE,
                !last,
                alive,
            ) {
                Ok(true) => {}
                // Zapped before this frame went: the message stops at a frame boundary (cut, if
                // frames went before; the flush that follows the QP's ERR ends it).
                Ok(false) => return (Some((WcStatus::LocProtErr, 0)), false),
                Err(Moved::Mr { done, .. }) => {
                    // The source was zapped mid-frame: the frame is promised whole, so the rest
                    // goes as zeros and the message fails (a failed request leaves its target
                    // undefined, as on RC).
                    if io::pad(s, n - done, alive).is_err() {
                        return (None, true);
                    }
                    return (Some((WcStatus::LocProtErr, 0)), false);
                }
                Err(Moved::Io(_)) => return (None, true),
            }
        }
        sent += n;
    }
    (None, false)
}

/// Send a READ request; its response frames land through the receiver. Returns its outcome
/// when known here, and whether the connection broke.
fn request_read(
    qp: &TcpQp,
    wr: &SendWr,
    seq: u32,
    s: &TcpStream,
    alive: io::Alive<'_>,
) -> (Option<(WcStatus, u32)>, bool) {
    if qp
        .local_mrs(wr.sg.as_slice(), MrAccess::LOCAL_WRITE)
        .is_none()
    {
        return (Some((WcStatus::LocProtErr, 0)), false);
    }
    if qp.fast_state() == QpState::Err {
        return (Some((WcStatus::WrFlushErr, 0)), false);
    }
    let mut h = Header::new(Kind::Read);
    h.seq = seq;
    h.flags = FIRST | LAST;
    h.rkey = wr.remote.rkey;
    h.addr = wr.remote.addr;
    h.arg = u32::try_from(wr.sg.total()).unwrap_or(u32::MAX);
    // A broken connection is the receiver's to report.
    (None, io::write_all(s, &h.encode(), alive).is_err())
}

/// The receiver: answers from the responder, in order.
fn receive(qp: &TcpQp, generation: u64, s: &TcpStream) {
    let alive = || wanted(qp, generation);
    let mut hdr = [0u8; HEADER];
    let end = |status_if_live: WcStatus, why: String| {
        let _ = s.shutdown(std::net::Shutdown::Both);
        let mut inner = lock(&qp.inner);
        if inner.generation != generation {
            return;
        }
        inner.receiver_done = true;
        let status = if inner.state == QpState::Err {
            WcStatus::WrFlushErr
        } else {
            qp.nic.event("CONNECTION_LOST", Some(qp.qpn), why);
            status_if_live
        };
        qp.resolve_all(&mut inner, status);
        qp.finish(inner);
    };
    loop {
        if let Err(e) = io::read_exact(s, &mut hdr, &alive) {
            return end(
                WcStatus::RetryExcErr,
                format!("the responder's connection ended: {e}"),
            );
        }
        let h = match Header::decode(&hdr, false) {
            Ok(h) => h,
            Err(e) => {
                return end(
                    WcStatus::RetryExcErr,
                    format!("bad frame from the responder: {e}"),
                );
            }
        };
        let r = match h.kind {
            Kind::Ack => ack_through(qp, generation, h.seq),
            Kind::Nak => {
                // The responder takes nothing after a nak: what followed never ran.
                let r = answer(qp, generation, h.seq, |_| {
                    Some((frame::nak_status(h.arg), 0))
                });
                if r.is_ok() {
                    return end(WcStatus::WrFlushErr, "refused by the responder".into());
                }
                r
            }
            Kind::ReadResp => land(qp, generation, &h, s, &alive),
            Kind::FlushAck => return end(WcStatus::WrFlushErr, "flushed".into()),
            other => Err(format!(
                "a {} frame on a requester connection",
                other.name()
            )),
        };
        if let Err(why) = r {
            return end(WcStatus::RetryExcErr, why);
        }
    }
}

/// A cumulative ack: every message up to `seq` is done. A READ among them not answered yet, or
/// an ack for no message in flight, is a protocol error.
fn ack_through(qp: &TcpQp, generation: u64, seq: u32) -> Result<(), String> {
    let mut inner = lock(&qp.inner);
    if inner.generation != generation {
        return Ok(());
    }
    // Sequence numbers wrap: `a` is at or before `seq` when it is less than half the space
    // behind it.
    let upto = |a: u32| seq.wrapping_sub(a) < 1 << 31;
    if !inner.inflight.iter().any(|s| s.seq == seq) {
        return Err(format!("an ack for message {seq}, which is not in flight"));
    }
    for s in inner.inflight.iter_mut().filter(|s| upto(s.seq)) {
        if s.outcome.is_some() {
            continue;
        }
        if matches!(s.wr.op, SendOp::RdmaRead) {
            return Err(format!(
                "an ack through message {seq} before READ {} was answered",
                s.seq
            ));
        }
        let n = u32::try_from(s.wr.sg.total()).unwrap_or(u32::MAX);
        s.outcome = Some((WcStatus::Success, n));
    }
    qp.finish(inner);
    Ok(())
}

/// Resolve message `seq` with what `f` makes of it; an answer for no message in flight, or one
/// `f` refuses, is a protocol error.
fn answer(
    qp: &TcpQp,
    generation: u64,
    seq: u32,
    f: impl FnOnce(&Sent) -> Option<(WcStatus, u32)>,
) -> Result<(), String> {
    let mut inner = lock(&qp.inner);
    if inner.generation != generation {
        return Ok(());
    }
    let Some(sent) = inner.inflight.iter().find(|s| s.seq == seq).copied() else {
        return Err(format!(
            "an answer for message {seq}, which is not in flight"
        ));
    };
    let outcome = f(&sent).ok_or_else(|| format!("an answer that does not fit message {seq}"))?;
    qp.resolve(&mut inner, seq, outcome);
    qp.finish(inner);
    Ok(())
}

/// Land one READ response frame in the request's local buffers.
fn land(
    qp: &TcpQp,
    generation: u64,
    h: &Header,
    s: &TcpStream,
    alive: io::Alive<'_>,
) -> Result<(), String> {
    let sent = {
        let inner = lock(&qp.inner);
        if inner.generation != generation {
            return Ok(());
        }
        inner.inflight.iter().find(|x| x.seq == h.seq).copied()
    };
    let Some(sent) = sent else {
        return Err(format!(
            "a READ response for message {}, which is not in flight",
            h.seq
        ));
    };
    let total = sent.wr.sg.total();
    let n = u64::from(h.payload);
    if !matches!(sent.wr.op, SendOp::RdmaRead) || sent.got + n > total {
        return Err(format!(
            "a READ response of {n} bytes at {} for message {} of {total} bytes",
            sent.got, h.seq
        ));
    }
    let mut fault = None;
    if sent.outcome.is_none() {
        let mr_of = |key: u32| qp.nic.mr(key).filter(|m| m.pd == qp.pd);
        match io::recv_scattered(s, sent.wr.sg.as_slice(), sent.got, n, &mr_of, alive) {
            Ok(()) => {}
            Err(Moved::Mr { .. }) => fault = Some(WcStatus::LocProtErr),
            Err(Moved::Io(e)) => return Err(format!("READ response: {e}")),
        }
    } else {
        io::discard(s, n, alive).map_err(|e| e.to_string())?;
    }
    let mut inner = lock(&qp.inner);
    if inner.generation != generation {
        return Ok(());
    }
    let got = match inner.inflight.iter_mut().find(|x| x.seq == h.seq) {
        Some(x) => {
            x.got += n;
            x.got
        }
        None => return Ok(()),
    };
    let outcome = match fault {
        Some(st) => Some((st, 0)),
        None if h.last() && got == total => {
            Some((WcStatus::Success, u32::try_from(total).unwrap_or(u32::MAX)))
        }
        None if h.last() => {
            return Err(format!(
                "the READ response for message {} ended after {got} of {total} bytes",
                h.seq
            ));
        }
        None => None,
    };
    if let Some(o) = outcome {
        qp.resolve(&mut inner, h.seq, o);
    }
    qp.finish(inner);
    Ok(())
}
