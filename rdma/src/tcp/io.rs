//! Socket work for the TCP backend's engine: non-blocking sockets, waits in slices so a
//! stopping engine is noticed, and the moves between a socket and a memory region — straight
//! between the kernel and the registered memory, one system call per hold of the region.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::access::MrAccess;

use super::mr::{MrFault, TcpMr};

/// How long one wait lasts before the engine looks at whether it should go on.
const SLICE: Duration = Duration::from_millis(50);

/// Bytes read at once when a frame's payload is thrown away.
const DISCARD: usize = 64 << 10;

/// Whether the work should go on (the NIC is not stopping, the connection is wanted).
pub(crate) type Alive<'a> = &'a dyn Fn() -> bool;

fn stopped() -> io::Error {
    io::Error::new(
        io::ErrorKind::Interrupted,
        "the engine stopped this connection",
    )
}

/// Wait until `s` is readable (or writable) for at most one slice.
fn wait(s: &TcpStream, readable: bool) -> io::Result<()> {
    wait_for(s, readable)
}

/// Wait until `fd` is readable (a listener: a connection waits) or writable, for at most one
/// slice: the loops that call it look whether they are still wanted in between.
pub(crate) fn wait_for(fd: impl AsFd, readable: bool) -> io::Result<()> {
    let flags = if readable {
        PollFlags::IN
    } else {
        PollFlags::OUT
    };
    let mut fds = [PollFd::new(&fd, flags)];
    let t = Timespec {
        tv_sec: 0,
        tv_nsec: i64::try_from(SLICE.as_nanos()).unwrap_or(50_000_000),
    };
    match rustix::event::poll(&mut fds, Some(&t)) {
        Ok(_) => Ok(()),
        Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Call `op` (one non-blocking read or write of `s`) until `done` says so: a would-block
/// waits for the socket (readable or writable) in slices, asking `alive` between them.
fn retry(
    s: &TcpStream,
    readable: bool,
    alive: Alive<'_>,
    mut op: impl FnMut() -> io::Result<usize>,
    mut done: impl FnMut(usize) -> io::Result<bool>,
) -> io::Result<()> {
    loop {
        match op() {
            Ok(n) => {
                if done(n)? {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !alive() {
                    return Err(stopped());
                }
                wait(s, readable)?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Fill `buf` from `s`; `UnexpectedEof` when the peer closes first.
pub(crate) fn read_exact(s: &TcpStream, buf: &mut [u8], alive: Alive<'_>) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let len = buf.len();
    let got = std::cell::Cell::new(0);
    retry(
        s,
        true,
        alive,
        || (&*s).read(&mut buf[got.get()..]),
        |n| match n {
            0 => Err(io::ErrorKind::UnexpectedEof.into()),
            n => {
                got.set(got.get() + n);
                Ok(got.get() == len)
            }
        },
    )
}

/// Write all of `buf` to `s`.
pub(crate) fn write_all(s: &TcpStream, buf: &[u8], alive: Alive<'_>) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let put = std::cell::Cell::new(0);
    retry(
        s,
        false,
        alive,
        || (&*s).write(&buf[put.get()..]),
        |n| match n {
            0 => Err(io::ErrorKind::WriteZero.into()),
            n => {
                put.set(put.get() + n);
                Ok(put.get() == buf.len())
            }
        },
    )
}

/// Why a move between a socket and a region stopped.
#[derive(Debug)]
pub(crate) enum Moved {
    /// The socket failed or closed.
    Io(io::Error),
    /// The region refused, after `done` bytes.
    Mr { fault: MrFault, done: u64 },
}

/// Which way bytes move between a socket and a region.
#[derive(Debug, Clone, Copy)]
enum Dir {
    /// From the socket into the region.
    Recv,
    /// From the region onto the socket; `more`: more follows at once.
    Send { more: bool },
}

/// Move `len` bytes of `mr` at `addr` (needing `need` on it), one system call per hold of the
/// region.
fn pump(
    s: &TcpStream,
    mr: &TcpMr,
    (addr, len): (u64, u64),
    need: MrAccess,
    dir: Dir,
    alive: Alive<'_>,
) -> Result<(), Moved> {
    let mut done = 0;
    let readable = matches!(dir, Dir::Recv);
    while done < len {
        let left = len - done;
        let (asked, r) = mr
            .access(addr + done, left, need, |pin, off, n| {
                let r = match dir {
                    Dir::Recv => pin.recv(s.as_fd(), off, n),
                    Dir::Send { more } => pin.send(s.as_fd(), off, n, more || (n as u64) < left),
                };
                (n, r)
            })
            .map_err(|fault| Moved::Mr { fault, done })?;
        let wait_first = match r {
            Ok(0) => return Err(Moved::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => {
                done += n as u64;
                // A short move found the socket empty (or full): the next call would only
                // say so. Wait for it instead (one system call saved per piece).
                n < asked
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
            Err(e) => return Err(Moved::Io(e)),
        };
        if wait_first && done < len {
            if !alive() {
                return Err(Moved::Io(stopped()));
            }
            wait(s, readable).map_err(Moved::Io)?;
        }
    }
    Ok(())
}

/// Receive `len` bytes from `s` into `mr` at `addr` (needing `need` on it).
pub(crate) fn recv_into(
    s: &TcpStream,
    mr: &TcpMr,
    addr: u64,
    len: u64,
    need: MrAccess,
    alive: Alive<'_>,
) -> Result<(), Moved> {
    pump(s, mr, (addr, len), need, Dir::Recv, alive)
}

/// Send `len` bytes of `mr` at `addr` on `s`; `more`: more follows at once.
pub(crate) fn send_from(
    s: &TcpStream,
    mr: &TcpMr,
    addr: u64,
    len: u64,
    need: MrAccess,
    more: bool,
    alive: Alive<'_>,
) -> Result<(), Moved> {
    pump(s, mr, (addr, len), need, Dir::Send { more }, alive)
}

/// Send a frame: `head`, then `len` bytes of `mr` at `addr`, the header and the first piece in
/// one system call. `Ok(false)`: the region refused before anything was sent (nothing of the
/// frame went); a refusal after the header went is `Moved::Mr`, with the payload bytes sent.
#[allow(clippy::too_many_arguments)]
pub(crate) fn send_frame(
    s: &TcpStream,
    head: &[u8],
    mr: &TcpMr,
    addr: u64,
    len: u64,
    need: MrAccess,
    more: bool,
    alive: Alive<'_>,
) -> Result<bool, Moved> {
    let Ok(r) = mr.access(addr, len, need, |pin, off, n| {
        pin.send_after(s.as_fd(), head, off, n, more || (n as u64) < len)
    }) else {
        return Ok(false);
    };
    let sent = match r {
        Ok(n) => n,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            0
        }
        Err(e) => return Err(Moved::Io(e)),
    };
    let head_sent = sent.min(head.len());
    write_all(s, &head[head_sent..], alive).map_err(Moved::Io)?;
    let body_sent = (sent - head_sent) as u64;
    if body_sent < len {
        send_from(s, mr, addr + body_sent, len - body_sent, need, more, alive).map_err(
            |e| match e {
                Moved::Mr { fault, done } => Moved::Mr {
                    fault,
                    done: done + body_sent,
                },
                io => io,
            },
        )?;
    }
    Ok(true)
}

/// Whether the peer's bytes are waiting to be read now (without waiting).
pub(crate) fn has_input(s: &TcpStream) -> bool {
    let mut fds = [PollFd::new(s, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut fds, Some(&zero)).is_ok_and(|n| n > 0)
}

/// Walk `[at, at + n)` of a request's elements: `f(element, offset in it, bytes)` for each
/// piece, in order, stopping at the first error.
pub(crate) fn scatter<E>(
    sges: &[crate::wr::Sge],
    at: u64,
    n: u64,
    mut f: impl FnMut(&crate::wr::Sge, u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    let (mut pos, mut left, mut base) = (at, n, 0u64);
    for sge in sges {
        let len = u64::from(sge.length);
        if left > 0 && pos < base + len {
            let off = pos - base;
            let k = left.min(len - off);
            f(sge, off, k)?;
            pos += k;
            left -= k;
        }
        base += len;
    }
    Ok(())
}

/// Receive `n` bytes into `[at, at + n)` of a request's elements, their regions found by
/// `mr_of` (in the right protection domain) and written with `LOCAL_WRITE`. When a region
/// refuses, the rest of the `n` bytes is read and dropped (the stream stays in step) and the
/// fault comes back with the bytes that landed.
pub(crate) fn recv_scattered(
    s: &TcpStream,
    sges: &[crate::wr::Sge],
    at: u64,
    n: u64,
    mr_of: &dyn Fn(u32) -> Option<std::sync::Arc<TcpMr>>,
    alive: Alive<'_>,
) -> Result<(), Moved> {
    let mut landed = 0;
    let r = scatter(sges, at, n, |sge, off, k| {
        let mr = mr_of(sge.lkey).ok_or(Moved::Mr {
            fault: MrFault::Key,
            done: landed,
        })?;
        recv_into(s, &mr, sge.addr + off, k, MrAccess::LOCAL_WRITE, alive).map_err(
            |e| match e {
                Moved::Mr { fault, done } => Moved::Mr {
                    fault,
                    done: landed + done,
                },
                io => io,
            },
        )?;
        landed += k;
        Ok(())
    });
    if let Err(Moved::Mr { fault, done }) = r {
        discard(s, n - done, alive).map_err(Moved::Io)?;
        return Err(Moved::Mr { fault, done });
    }
    r
}

/// Read and drop `len` bytes (a refused frame's payload).
pub(crate) fn discard(s: &TcpStream, len: u64, alive: Alive<'_>) -> io::Result<()> {
    let mut buf = vec![0u8; DISCARD.min(usize::try_from(len).unwrap_or(DISCARD))];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        read_exact(s, &mut buf[..n], alive)?;
        left -= n as u64;
    }
    Ok(())
}

/// Read and drop everything until the peer's end of the stream (or an error, or `alive` says
/// stop).
pub(crate) fn drain(s: &TcpStream, alive: Alive<'_>) -> io::Result<()> {
    let mut buf = vec![0u8; DISCARD];
    retry(s, true, alive, || (&*s).read(&mut buf), |n| Ok(n == 0))
}

/// Write `len` zero bytes (the rest of a frame whose source was zapped mid-frame: the message
/// then fails, and its target's contents are undefined, as for any failed RDMA request).
pub(crate) fn pad(s: &TcpStream, len: u64, alive: Alive<'_>) -> io::Result<()> {
    let buf = vec![0u8; DISCARD.min(usize::try_from(len).unwrap_or(DISCARD))];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        write_all(s, &buf[..n], alive)?;
        left -= n as u64;
    }
    Ok(())
}
