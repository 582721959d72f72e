//! The out-of-band control connection: how two RDMA peers swap QP numbers, PSNs, GIDs and keys
//! before their queue pairs can talk (what `ibv_rc_pingpong` does over its TCP socket).
//!
//! One TCP connection carries newline-delimited JSON messages. Every error names the peer.
//!
//! ```no_run
//! use std::time::Duration;
//! use dmaplane_rdma::oob::{ConnInfo, Oob, OobListener};
//! # fn main() -> dmaplane_rdma::Result<()> {
//! let listener = OobListener::bind("127.0.0.1:0")?;
//! let addr = listener.local_addr();
//! let client = std::thread::spawn(move || -> dmaplane_rdma::Result<ConnInfo> {
//!     let oob = Oob::connect(addr, Duration::from_secs(5))?;
//!     oob.exchange(&ConnInfo::default())
//! });
//! let server = listener.accept(Duration::from_secs(5))?;
//! let theirs = server.exchange(&ConnInfo::default())?;
//! # let _ = (theirs, client.join());
//! # Ok(()) }
//! ```

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;

use crate::sync::lock;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{RdmaError, Result};
use crate::qp::RemoteQp;

/// Longest a send on the control connection may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest message accepted (a guard against a peer that never sends a newline).
pub const MAX_MESSAGE: usize = 16 << 20;

/// How long [`Oob::exchange`] waits for the peer's half.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Oob::try_recv`] may wait for bytes already on their way.
const TRY_RECV_WAIT: Duration = Duration::from_millis(1);

/// A remote memory region the peer may target with RDMA READ/WRITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RemoteMrInfo {
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
}

/// What one side of an RC connection tells the other.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConnInfo {
    pub qpn: u32,
    /// The first send PSN (the peer's `rq_psn`).
    pub psn: u32,
    pub gid: [u8; 16],
    pub lid: u16,
    /// The TCP backend's data port and connection token ([`RemoteQp::port`], [`RemoteQp::token`]).
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub token: [u8; 16],
    pub mrs: Vec<RemoteMrInfo>,
}

impl ConnInfo {
    /// From a QP's [`endpoint`](crate::backend::QpBackend::endpoint) and the regions offered.
    pub fn new(endpoint: RemoteQp, mrs: Vec<RemoteMrInfo>) -> ConnInfo {
        ConnInfo {
            qpn: endpoint.qpn,
            psn: endpoint.psn,
            gid: endpoint.gid,
            lid: endpoint.lid,
            port: endpoint.port,
            token: endpoint.token,
            mrs,
        }
    }

    /// The peer as `INIT → RTR` needs it.
    pub fn remote_qp(&self) -> RemoteQp {
        RemoteQp {
            port: self.port,
            token: self.token,
            ..RemoteQp::verbs(self.qpn, self.gid, self.lid, self.psn)
        }
    }
}

/// A listening control socket.
#[derive(Debug)]
pub struct OobListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl OobListener {
    /// Listen on `addr` (port 0 picks a free port: see [`local_addr`](Self::local_addr)).
    pub fn bind(addr: impl ToSocketAddrs) -> Result<OobListener> {
        let shown = describe(&addr);
        let listener = TcpListener::bind(addr).map_err(|e| RdmaError::Connection {
            what: format!("listen on {shown}"),
            why: e.to_string(),
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| RdmaError::io(format!("local address of the listener on {shown}"), e))?;
        Ok(OobListener { listener, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Wait up to `timeout` for one peer.
    pub fn accept(&self, timeout: Duration) -> Result<Oob> {
        let deadline = Instant::now() + timeout;
        self.listener
            .set_nonblocking(true)
            .map_err(|e| RdmaError::io(format!("listener on {}", self.addr), e))?;
        let accepted = loop {
            match self.listener.accept() {
                Ok((stream, peer)) => break Ok((stream, peer)),
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted =>
                {
                    if Instant::now() >= deadline {
                        break Err(RdmaError::Timeout {
                            what: format!("a peer to connect to {}", self.addr),
                            ms: millis(timeout),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    break Err(RdmaError::Connection {
                        what: format!("accept on {}", self.addr),
                        why: e.to_string(),
                    });
                }
            }
        };
        let restore = self.listener.set_nonblocking(false);
        let (stream, peer) = accepted?;
        restore.map_err(|e| RdmaError::io(format!("listener on {}", self.addr), e))?;
        Oob::from_stream(stream, peer)
    }
}

/// One control connection. Methods take `&self`: one thread may send while another receives.
#[derive(Debug)]
pub struct Oob {
    stream: TcpStream,
    peer: SocketAddr,
    /// Bytes read but not yet consumed (a partial line, or lines after the one returned).
    rx: Mutex<RxBuf>,
    tx: Mutex<()>,
    /// The longest line accepted ([`Oob::set_max_message`]).
    max: std::sync::atomic::AtomicUsize,
}

/// What was read and not yet returned, and how much of it is known to hold no newline (so a
/// long partial line is scanned once, not again at every poll).
#[derive(Debug, Default)]
struct RxBuf {
    bytes: Vec<u8>,
    scanned: usize,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn describe(addr: &impl ToSocketAddrs) -> String {
    match addr.to_socket_addrs() {
        Ok(mut it) => it
            .next()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "<no address>".into()),
        Err(e) => format!("<unresolved: {e}>"),
    }
}

impl Oob {
    /// Connect to `addr`, retrying (the peer may not listen yet) until `timeout` has passed.
    pub fn connect(addr: impl ToSocketAddrs, timeout: Duration) -> Result<Oob> {
        let deadline = Instant::now() + timeout;
        let shown = describe(&addr);
        let targets: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| RdmaError::Connection {
                what: format!("to {shown}"),
                why: format!("cannot resolve: {e}"),
            })?
            .collect();
        if targets.is_empty() {
            return Err(RdmaError::Connection {
                what: format!("to {shown}"),
                why: "the address resolves to nothing".into(),
            });
        }
        let mut last = String::new();
        loop {
            for &target in &targets {
                let left = deadline.saturating_duration_since(Instant::now());
                let attempt = left.clamp(Duration::from_millis(10), Duration::from_secs(5));
                match TcpStream::connect_timeout(&target, attempt) {
                    Ok(stream) => return Oob::from_stream(stream, target),
                    Err(e) => last = format!("{target}: {e}"),
                }
            }
            if Instant::now() >= deadline {
                return Err(RdmaError::Connection {
                    what: format!("to {shown}"),
                    why: format!("no connection within {} ms (last: {last})", millis(timeout)),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn from_stream(stream: TcpStream, peer: SocketAddr) -> Result<Oob> {
        let ctx = |e| RdmaError::io(format!("control connection with {peer}"), e);
        stream.set_nonblocking(false).map_err(ctx)?;
        stream.set_nodelay(true).map_err(ctx)?;
        // A peer that stops reading must not block a sender forever (an ack is sent from the
        // revoke path): a send that cannot finish in time fails, and the lease is cut off.
        stream.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(ctx)?;
        Ok(Oob {
            stream,
            peer,
            rx: Mutex::new(RxBuf::default()),
            tx: Mutex::new(()),
            max: std::sync::atomic::AtomicUsize::new(MAX_MESSAGE),
        })
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Accept messages of at most `bytes` (default and most [`MAX_MESSAGE`]): a longer one
    /// fails the receive with [`RdmaError::MessageTooLong`] once that many bytes came
    /// without a newline, so a peer cannot make this side buffer more.
    pub fn set_max_message(&self, bytes: usize) {
        self.max
            .store(bytes.min(MAX_MESSAGE), std::sync::atomic::Ordering::Relaxed);
    }

    /// Close both directions now, even while other owners of this connection still hold it:
    /// the peer reads end-of-stream, later sends here fail.
    pub fn shutdown(&self) -> Result<()> {
        match self.stream.shutdown(std::net::Shutdown::Both) {
            Ok(()) => Ok(()),
            // Already closed by the peer: nothing left to close.
            Err(e) if e.kind() == ErrorKind::NotConnected => Ok(()),
            Err(e) => Err(RdmaError::io(
                format!("closing the connection with {}", self.peer),
                e,
            )),
        }
    }

    /// Send one message (a JSON line).
    pub fn send<T: Serialize>(&self, msg: &T) -> Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(|e| RdmaError::Connection {
            what: format!("message to {}", self.peer),
            why: format!("cannot encode: {e}"),
        })?;
        line.push(b'\n');
        let _one_writer = lock(&self.tx);
        (&self.stream)
            .write_all(&line)
            .and_then(|()| (&self.stream).flush())
            .map_err(|e| RdmaError::io(format!("sending to {}", self.peer), e))
    }

    /// Receive one message, waiting up to `timeout`.
    pub fn recv<T: DeserializeOwned>(&self, timeout: Duration) -> Result<T> {
        match self.recv_until(Instant::now() + timeout)? {
            Some(line) => self.decode(&line),
            None => Err(RdmaError::Timeout {
                what: format!("a message from {}", self.peer),
                ms: millis(timeout),
            }),
        }
    }

    /// A message when one has arrived, `None` otherwise (waits at most a millisecond for bytes
    /// already on the wire).
    pub fn try_recv<T: DeserializeOwned>(&self) -> Result<Option<T>> {
        match self.recv_until(Instant::now() + TRY_RECV_WAIT)? {
            Some(line) => self.decode(&line).map(Some),
            None => Ok(None),
        }
    }

    /// Send `mine` and receive the peer's (both sides may call this at the same time).
    pub fn exchange(&self, mine: &ConnInfo) -> Result<ConnInfo> {
        self.exchange_timeout(mine, EXCHANGE_TIMEOUT)
    }

    pub fn exchange_timeout(&self, mine: &ConnInfo, timeout: Duration) -> Result<ConnInfo> {
        self.send(mine)?;
        self.recv(timeout)
    }

    fn decode<T: DeserializeOwned>(&self, line: &[u8]) -> Result<T> {
        serde_json::from_slice(line).map_err(|e| RdmaError::Connection {
            what: format!("message from {}", self.peer),
            why: format!(
                "cannot decode {:?}: {e}",
                String::from_utf8_lossy(&line[..line.len().min(200)])
            ),
        })
    }

    /// One line (without its newline), or `None` when the deadline passed first.
    fn recv_until(&self, deadline: Instant) -> Result<Option<Vec<u8>>> {
        let mut rx = lock(&self.rx);
        let max = self.max.load(std::sync::atomic::Ordering::Relaxed);
        loop {
            let RxBuf { bytes, scanned } = &mut *rx;
            if let Some(pos) = bytes[*scanned..].iter().position(|&b| b == b'\n') {
                let end = *scanned + pos;
                // A whole line that came in one read is held to the bound too.
                if end > max {
                    return Err(RdmaError::MessageTooLong {
                        what: format!("message from {}", self.peer),
                        limit: max,
                    });
                }
                let line = bytes[..end].to_vec();
                bytes.drain(..=end);
                *scanned = 0;
                return Ok(Some(line));
            }
            *scanned = bytes.len();
            if bytes.len() > max {
                return Err(RdmaError::MessageTooLong {
                    what: format!("message from {}", self.peer),
                    limit: max,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| RdmaError::io(format!("control connection with {}", self.peer), e))?;
            let mut buf = [0u8; 64 << 10];
            match (&self.stream).read(&mut buf) {
                Ok(0) => {
                    return Err(RdmaError::Connection {
                        what: format!("with {}", self.peer),
                        why: "closed by the peer".into(),
                    });
                }
                Ok(n) => rx.bytes.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    return Err(RdmaError::io(format!("receiving from {}", self.peer), e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Oob, Oob) {
        let l = OobListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr();
        let t = std::thread::spawn(move || Oob::connect(addr, Duration::from_secs(5)));
        let server = l.accept(Duration::from_secs(5)).expect("accept");
        let client = t.join().expect("join").expect("connect");
        (server, client)
    }

    fn info(qpn: u32) -> ConnInfo {
        ConnInfo {
            qpn,
            psn: 0x12_3456,
            gid: [7; 16],
            lid: 3,
            port: 4791,
            token: [9; 16],
            mrs: vec![RemoteMrInfo {
                addr: 0x1000,
                len: 4096,
                rkey: 0xabc,
            }],
        }
    }

    #[test]
    fn exchange_over_loopback() {
        let (s, c) = pair();
        assert_eq!(s.peer_addr().ip(), c.peer_addr().ip());
        let t = std::thread::spawn(move || c.exchange(&info(1)).expect("client exchange"));
        let got = s.exchange(&info(2)).expect("server exchange");
        assert_eq!(got, info(1));
        assert_eq!(t.join().expect("join"), info(2));
        assert_eq!(got.remote_qp().qpn, 1);
        assert_eq!(got.remote_qp().psn, 0x12_3456);
    }

    #[test]
    fn messages_keep_their_order_and_boundaries() {
        let (s, c) = pair();
        for i in 0..50u32 {
            c.send(&i).expect("send");
        }
        c.send(&"tail").expect("send");
        for i in 0..50u32 {
            assert_eq!(s.recv::<u32>(Duration::from_secs(5)).expect("recv"), i);
        }
        assert_eq!(
            s.recv::<String>(Duration::from_secs(5)).expect("recv"),
            "tail"
        );
    }

    #[test]
    fn try_recv_is_none_then_some() {
        let (s, c) = pair();
        assert_eq!(s.try_recv::<u32>().expect("try_recv"), None);
        c.send(&5u32).expect("send");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(v) = s.try_recv::<u32>().expect("try_recv") {
                assert_eq!(v, 5);
                break;
            }
            assert!(Instant::now() < deadline, "message never arrived");
        }
    }

    #[test]
    fn timeout_and_close_name_the_peer() {
        let (s, c) = pair();
        let e = s.recv::<u32>(Duration::from_millis(50)).unwrap_err();
        assert!(matches!(e, RdmaError::Timeout { .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&c.stream.local_addr().expect("addr").to_string()),
            "{e}"
        );
        drop(c);
        let e = s.recv::<u32>(Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("closed by the peer"), "{e}");
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let (s, c) = pair();
        (&c.stream).write_all(b"{not json\n").expect("write");
        let e = s.recv::<ConnInfo>(Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("cannot decode"), "{e}");
    }

    #[test]
    fn a_line_longer_than_the_bound_is_refused_naming_it_and_pieces_of_one_add_up() {
        let (s, c) = pair();
        s.set_max_message(1000);
        // A line sent in pieces, each arriving after the receiver's poll gave up: the partial
        // line is kept (and not rescanned) until its newline.
        let msg = serde_json::to_vec(&info(9)).unwrap();
        let (a, b) = msg.split_at(msg.len() / 2);
        (&c.stream).write_all(a).unwrap();
        assert!(matches!(
            s.recv::<ConnInfo>(Duration::from_millis(20)),
            Err(RdmaError::Timeout { .. })
        ));
        (&c.stream).write_all(b).unwrap();
        (&c.stream).write_all(b"\n").unwrap();
        assert_eq!(s.recv::<ConnInfo>(Duration::from_secs(5)).unwrap(), info(9));
        // A whole line past the bound, newline and all in one read: refused too.
        let (s2, c2) = pair();
        s2.set_max_message(1000);
        let mut long = vec![b'x'; 1500];
        long.push(b'\n');
        (&c2.stream).write_all(&long).unwrap();
        let e = s2.recv::<ConnInfo>(Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(e, RdmaError::MessageTooLong { limit: 1000, .. }),
            "{e}"
        );
        // 2000 bytes and no newline: refused once past 1000, naming the bound.
        (&c.stream).write_all(&[b'x'; 2000]).unwrap();
        let e = s.recv::<ConnInfo>(Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(e, RdmaError::MessageTooLong { limit: 1000, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("1000 bytes"), "{e}");
    }

    #[test]
    fn connect_retries_until_the_listener_appears() {
        // Find a free port, release it, and start listening on it a little later.
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let t = std::thread::spawn(move || Oob::connect(addr, Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(150));
        let l = OobListener::bind(addr).expect("late bind");
        let s = l.accept(Duration::from_secs(5)).expect("accept");
        let c = t.join().expect("join").expect("connect after retries");
        c.send(&1u8).expect("send");
        assert_eq!(s.recv::<u8>(Duration::from_secs(5)).expect("recv"), 1);
    }

    #[test]
    fn connect_gives_up_with_a_named_error() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let e = Oob::connect(("127.0.0.1", port), Duration::from_millis(100)).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        assert!(matches!(e, RdmaError::Connection { .. }), "{text}");
    }

    #[test]
    fn accept_times_out() {
        let l = OobListener::bind("127.0.0.1:0").expect("bind");
        let e = l.accept(Duration::from_millis(30)).unwrap_err();
        assert!(matches!(e, RdmaError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains(&l.local_addr().to_string()), "{e}");
    }
}
