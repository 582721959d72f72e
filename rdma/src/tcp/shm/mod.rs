//! The TCP backend's shared-memory path: peers on one host move bytes through the registered
//! memory itself, one copy straight from source to target, as UCX's shared-memory transports
//! do for NIXL. The socket path stays for peers that are not on the same host.
//!
//! # The lane
//!
//! Every TCP NIC listens on an abstract Unix socket (`SOCK_SEQPACKET`) named by a random id,
//! which its engine tells a proven requester in the `welcome` of a data connection. A requester
//! that can reach that socket is on the same host (and in the same network namespace); it opens
//! a *lane* there for its queue pair's connection and proves itself again: the owner checks the
//! peer's credentials (`SO_PEERCRED`: the same user as this process, else refused — a same-user
//! process could read this process's memory through `ptrace` anyway; another user may not come
//! closer than the socket path) and an HMAC-SHA256 keyed by the QP's token over a fresh nonce,
//! as the data connection's hello does. The requester checks the owner is of its user too.
//!
//! # Views: keys, bounds and the revoke
//!
//! On the lane the requester asks for an rkey; the owner's engine checks it as a NIC checks a
//! request (a QP that takes requests, a region of its protection domain, live, the remote
//! access both grant — a refused key moves the QP to ERR, as a nak does) and answers with the
//! region's memory file (`SCM_RIGHTS`: the memfd of a host arena — read-only when no remote
//! write is granted), its offset, bounds and that access. The requester maps a
//! [`View`](dmaplane_core::fabric::View) of exactly that range and then executes its WRITEs and
//! READs to the rkey itself: checks bounds and access per message, as the owner's engine does
//! for frames, and copies between its local region and the view a chunk at a time — the QP's
//! state is looked at between chunks, so ERR cuts a message as it cuts one of frames.
//!
//! A zap of the owner's region ([`crate::backend::MrBackend::zap`]) sends `unmap` to every lane
//! it was shared on and waits until each answers `unmapped` — which the requester sends only
//! once the view is dropped (munmapped: it waits for the one chunk under way). So when the zap
//! returns, and before any revoke is acknowledged, no other process maps the memory; a peer that
//! does not answer within [`UNMAP_WAIT`] fails the zap, named (the region then keeps its pins,
//! so its memory is leaked rather than reused, and the peer stays its sharer: a later zap asks
//! again). A zap therefore waits for a peer, so the quiesce layer makes it from its worker
//! thread ([`crate::backend::DeviceBackend::calls_block`]). A lane's end drops all its views
//! first (a killed process's mappings go with it); a lane the owner closes answers for its
//! views as not dropped. When the owner's QP stops taking requests (ERR, RESET), its lane is
//! wound up: every view asked back, then the lane closed. Every send on a lane gives up after
//! [`UNMAP_WAIT`], so a peer that stops reading fails a zap instead of holding it.
//!
//! # Order
//!
//! A WRITE (without immediate) or READ goes through a view only once every earlier message of
//! its QP has been answered, and completes when its bytes have been copied — so messages still
//! execute and complete in order, whichever path each takes. Everything else (SENDs, immediates,
//! regions of several pieces or not of a memfd) takes the socket path.
//!
//! # The wire
//!
//! Every lane message is [`LEN`] bytes ([`Msg`]): magic, [`Kind`], a code, two words, three
//! double words, a GID and 32 bytes — checked whole before use ([`Msg::decode`]); a `mapped`
//! carries exactly one file, and nothing else carries any. The codec is public so a test can
//! play a peer that breaks the rules.

pub(crate) mod lane;
pub(crate) mod owner;

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix,
};

/// How long a zap waits for a peer to answer that it dropped its view.
pub const UNMAP_WAIT: Duration = Duration::from_secs(2);
/// How long a lane's hello, and a requester's wait for a mapping, may take.
pub const LANE_TIME: Duration = Duration::from_secs(5);
/// How often a lane's reader looks whether its lane is still wanted.
pub(crate) const TICK: Duration = Duration::from_millis(50);

const MAGIC: u16 = 0x4d53; // "SM"
/// Bytes of every lane message.
pub const LEN: usize = 96;

/// A lane message's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Owner → requester: a nonce to prove the token over.
    Challenge = 1,
    /// Requester → owner: `a` the owner's QP, `b` its own, `gid`, `blob` the proof.
    Hello = 2,
    Welcome = 3,
    /// `code`: a [`Refusal`].
    Refuse = 4,
    /// Requester → owner: a view of rkey `a`.
    Map = 5,
    /// Owner → requester, with the file: rkey `a`, access `b`, iova `x`, length `y`, the
    /// range's offset in the file `z`.
    Mapped = 6,
    /// Owner → requester: rkey `a` is not shared; `code` says why ([`MapRefusal`]).
    MapRefused = 7,
    /// Owner → requester: drop the view of rkey `a`.
    Unmap = 8,
    /// Requester → owner: the view of rkey `a` is dropped.
    Unmapped = 9,
    /// Requester → owner: a request to rkey `a` at `x` of `y` bytes broke the region's bounds
    /// or access, or came after its view was dropped: the owner's QP goes to ERR, as a
    /// responder's does when it naks.
    Violation = 10,
}

impl Kind {
    const ALL: [Kind; 10] = [
        Kind::Challenge,
        Kind::Hello,
        Kind::Welcome,
        Kind::Refuse,
        Kind::Map,
        Kind::Mapped,
        Kind::MapRefused,
        Kind::Unmap,
        Kind::Unmapped,
        Kind::Violation,
    ];
}

/// Why the owner refused a lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Refusal {
    /// Another user's process.
    User = 1,
    /// The proof, the QP or its pairing is wrong.
    Denied = 2,
    /// The NIC does not offer the shared-memory path.
    Off = 3,
}

/// Why the owner refused a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MapRefusal {
    /// No live region of the QP's protection domain has the key, or it grants no remote
    /// access: a request to it fails as a remote access error.
    Denied = 1,
    /// The region is not one memfd range: requests to it take the socket path.
    NotShared = 2,
}

/// One lane message (see [`Kind`] for what each field means per kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg {
    pub kind: Kind,
    pub code: u8,
    pub a: u32,
    pub b: u32,
    pub x: u64,
    pub y: u64,
    pub z: u64,
    pub gid: [u8; 16],
    pub blob: [u8; 32],
}

impl Msg {
    pub fn new(kind: Kind) -> Msg {
        Msg {
            kind,
            code: 0,
            a: 0,
            b: 0,
            x: 0,
            y: 0,
            z: 0,
            gid: [0; 16],
            blob: [0; 32],
        }
    }

    pub fn with(kind: Kind, a: u32) -> Msg {
        Msg {
            a,
            ..Msg::new(kind)
        }
    }

    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[2] = self.kind as u8;
        b[3] = self.code;
        b[4..8].copy_from_slice(&self.a.to_le_bytes());
        b[8..12].copy_from_slice(&self.b.to_le_bytes());
        b[16..24].copy_from_slice(&self.x.to_le_bytes());
        b[24..32].copy_from_slice(&self.y.to_le_bytes());
        b[32..40].copy_from_slice(&self.z.to_le_bytes());
        b[40..56].copy_from_slice(&self.gid);
        b[56..88].copy_from_slice(&self.blob);
        b
    }

    /// Decode a message of `n` bytes: exactly [`LEN`], the magic, a known kind, zero reserved
    /// bytes — anything else is refused, named.
    pub fn decode(b: &[u8; LEN], n: usize) -> Result<Msg, String> {
        if n != LEN {
            return Err(format!("a lane message of {n} bytes (they are {LEN})"));
        }
        let magic = u16::from_le_bytes([b[0], b[1]]);
        if magic != MAGIC {
            return Err(format!("magic {magic:#06x} (expected {MAGIC:#06x})"));
        }
        let kind = Kind::ALL
            .into_iter()
            .find(|k| *k as u8 == b[2])
            .ok_or_else(|| format!("unknown lane message kind {}", b[2]))?;
        if b[12..16].iter().chain(&b[88..]).any(|&x| x != 0) {
            return Err("reserved bytes of a lane message are not zero".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[40..56]);
        let mut blob = [0u8; 32];
        blob.copy_from_slice(&b[56..88]);
        Ok(Msg {
            kind,
            code: b[3],
            a: u32_at(4),
            b: u32_at(8),
            x: u64_at(16),
            y: u64_at(24),
            z: u64_at(32),
            gid,
            blob,
        })
    }
}

/// The abstract socket address of the lane listener `id`.
pub fn address(id: u64) -> rustix::io::Result<SocketAddrUnix> {
    SocketAddrUnix::new_abstract_name(format!("dmaplane-tcp-shm-{id:016x}").as_bytes())
}

/// Send `m`, with `file` when given (one message: both arrive together or not at all).
pub fn send(sock: BorrowedFd<'_>, m: &Msg, file: Option<BorrowedFd<'_>>) -> Result<(), String> {
    let bytes = m.encode();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(f) = file {
        fds = [f];
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err("no room for the file in the message".into());
        }
    }
    let n = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(|e| format!("send: {e}"))?;
    if n != LEN {
        return Err(format!("sent {n} of {LEN} bytes"));
    }
    Ok(())
}

/// What [`recv`] got.
#[derive(Debug)]
pub enum Got {
    Msg(Msg, Option<OwnedFd>),
    /// Nothing within the socket's receive timeout.
    Nothing,
    /// The peer closed the lane.
    End,
}

/// Receive one message (and the file it carries, if any: more than one, or a file with a kind
/// that carries none, is refused). Waits up to the socket's receive timeout.
pub fn recv(sock: BorrowedFd<'_>) -> Result<Got, String> {
    let mut bytes = [0u8; LEN];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let r = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut bytes)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    );
    let got = match r {
        Ok(g) => g,
        Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR => {
            return Ok(Got::Nothing);
        }
        Err(e) => return Err(format!("receive: {e}")),
    };
    // Files that came are owned now (closed when dropped), whatever is wrong with the message.
    let mut files: Vec<OwnedFd> = Vec::new();
    for c in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = c {
            files.extend(fds);
        }
    }
    if got.bytes == 0 {
        // The end of the lane — or an empty message, which no peer of this protocol sends.
        return if hung_up(sock) {
            Ok(Got::End)
        } else {
            Err("an empty lane message".into())
        };
    }
    if got
        .flags
        .intersects(rustix::net::ReturnFlags::TRUNC | rustix::net::ReturnFlags::CTRUNC)
    {
        return Err("a lane message was truncated".into());
    }
    let m = Msg::decode(&bytes, got.bytes)?;
    let file = match (m.kind, files.len()) {
        (_, 0) => None,
        (Kind::Mapped, 1) => files.pop(),
        (k, n) => return Err(format!("a {k:?} message carried {n} files")),
    };
    Ok(Got::Msg(m, file))
}

/// Wait up to `t` for each receive on `sock`; a send waits up to [`UNMAP_WAIT`] (a peer that
/// stopped reading fails the send, not the sender forever).
pub fn set_timeout(sock: BorrowedFd<'_>, t: Duration) -> Result<(), String> {
    use rustix::net::sockopt::{Timeout, set_socket_timeout};
    set_socket_timeout(sock, Timeout::Recv, Some(t))
        .map_err(|e| format!("receive timeout: {e}"))?;
    set_socket_timeout(sock, Timeout::Send, Some(UNMAP_WAIT))
        .map_err(|e| format!("send timeout: {e}"))
}

/// Whether the other end of `sock` closed it.
fn hung_up(sock: BorrowedFd<'_>) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(&sock, PollFlags::IN | PollFlags::RDHUP)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut fds, Some(&zero)).is_ok()
        && fds[0]
            .revents()
            .intersects(PollFlags::HUP | PollFlags::RDHUP)
}

/// Whether the process at the other end of `sock` runs as this process's user.
pub(crate) fn same_user(sock: impl AsFd) -> Result<bool, String> {
    let cred =
        rustix::net::sockopt::socket_peercred(sock).map_err(|e| format!("SO_PEERCRED: {e}"))?;
    Ok(cred.uid == rustix::process::geteuid())
}

/// The nonce a lane's proof covers: the owner's random bytes, told apart from a data
/// connection's.
pub fn lane_nonce(nonce: &[u8; 32]) -> [u8; 40] {
    let mut n = [0u8; 40];
    n[..8].copy_from_slice(b"shm-lane");
    n[8..].copy_from_slice(nonce);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_malformed_ones_are_refused() {
        let mut m = Msg::with(Kind::Mapped, 0x1234);
        m.b = 7;
        m.x = 0x1000;
        m.y = 1 << 20;
        m.z = 4096;
        m.gid = [9; 16];
        m.blob = [3; 32];
        let b = m.encode();
        assert_eq!(Msg::decode(&b, LEN).unwrap(), m);
        assert!(Msg::decode(&b, LEN - 1).unwrap_err().contains("bytes"));
        let mut bad = b;
        bad[0] = 0;
        assert!(Msg::decode(&bad, LEN).unwrap_err().contains("magic"));
        let mut bad = b;
        bad[2] = 99;
        assert!(Msg::decode(&bad, LEN).unwrap_err().contains("kind 99"));
        let mut bad = b;
        bad[90] = 1;
        assert!(Msg::decode(&bad, LEN).unwrap_err().contains("reserved"));
    }
}
