//! Host memory a software engine may touch by its address in this process, and the pins that
//! keep it mapped while it does.
//!
//! A NIC that is a program (the TCP backend's engine) registers `ProcessVa` ranges and then
//! moves bytes between them and sockets itself. A range it was handed is only sound to touch if
//! it is memory this process mapped and keeps mapped: so every [`Mapping`] is entered here when
//! it is made, and an engine may reach a range only through a [`Pinned`] — which exists only
//! for a range inside one live mapping, and which keeps that mapping from being unmapped or
//! freed while it lives.
//!
//! The contract, in the order things happen:
//!
//! - **Made.** Every [`Mapping`] (a memfd arena, a shared mapping of a dma-buf, a BAR, a
//!   caller's buffer) is entered with its address range.
//! - **Pinned.** [`Pinned::new`] checks the range lies inside one entered mapping that is not
//!   being dropped, and counts a pin on it. A range of anything else (a stack, an address
//!   someone made up, a mapping already gone) is refused with [`PinError`].
//! - **Touched.** Every access goes through the pin, bounds-checked against its range: byte-wise
//!   atomic copies ([`Pinned::read`], [`Pinned::write`], [`Pinned::copy_to`]) or the kernel's
//!   copies from and into a socket ([`Pinned::recv`], [`Pinned::send`]).
//! - **Dropped.** A [`Mapping`] dropped (or given back as a `Vec`) while pinned is **leaked**,
//!   never unmapped or freed: an engine may still be writing into it, and memory handed back to
//!   the allocator must not be. This is a bug of whoever dropped it (the exporter's contract says
//!   importers are invalidated first); it is logged, and the leak is the safe way out.
//!
//! [`Mapping`]: super::Mapping

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::atomic_bytes;
use crate::sync::lock;

#[derive(Debug)]
struct Live {
    len: usize,
    pins: u64,
    /// Its owner dropped it while pinned: it is leaked, and no new pin is given.
    dropped: bool,
    /// The memory file it maps from offset 0 (a memfd host arena), which another process on
    /// this host may map too ([`Pinned::file`]).
    file: Option<Arc<OwnedFd>>,
}

/// Every live mapping, by start address (its exposed provenance).
static LIVE: Mutex<BTreeMap<usize, Live>> = Mutex::new(BTreeMap::new());

/// Mappings dropped while pinned, in this process so far.
static DROPPED_PINNED: AtomicU64 = AtomicU64::new(0);

/// How many mappings this process dropped while a software engine still had them pinned (and
/// so leaked): each one an importer that let its exporter go on — a fence signalled, a revoke
/// acknowledged — before it let go of the memory. An observer outside every engine: the
/// registry counts it where the mapping is dropped.
pub fn dropped_while_pinned() -> u64 {
    DROPPED_PINNED.load(Ordering::Relaxed)
}

/// Enter a new mapping at `start` (an address whose provenance was exposed) of `len` bytes.
pub(super) fn enter(start: usize, len: usize) {
    lock(&LIVE).insert(
        start,
        Live {
            len,
            pins: 0,
            dropped: false,
            file: None,
        },
    );
}

/// The mapping entered at `start` maps `file` from offset 0.
pub(super) fn set_file(start: usize, file: OwnedFd) {
    if let Some(l) = lock(&LIVE).get_mut(&start) {
        l.file = Some(Arc::new(file));
    }
}

/// The mapping at `start` is about to be unmapped or freed: true when it may be (no pin), false
/// when it is pinned — then it must be leaked, and it stays entered (with no new pins) until the
/// last pin goes.
pub(super) fn leave(start: usize) -> bool {
    let mut live = lock(&LIVE);
    match live.get_mut(&start) {
        Some(l) if l.pins > 0 => {
            if !l.dropped {
                DROPPED_PINNED.fetch_add(1, Ordering::Relaxed);
            }
            l.dropped = true;
            false
        }
        Some(_) => {
            live.remove(&start);
            true
        }
        None => true,
    }
}

/// Whether the mapping at `start` is pinned now.
pub(super) fn is_pinned(start: usize) -> bool {
    lock(&LIVE).get(&start).is_some_and(|l| l.pins > 0)
}

/// Why a range could not be pinned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error("[{va:#x}, +{len:#x}) is not inside memory this process mapped for DMA")]
    NotMapped { va: u64, len: u64 },
    #[error("[{va:#x}, +{len:#x}) is memory whose owner has dropped it")]
    Dropped { va: u64, len: u64 },
    #[error("[{va:#x}, +{len:#x}): an empty range pins nothing")]
    Empty { va: u64, len: u64 },
}

/// A range of live host memory, kept mapped while this value lives (see the module docs).
#[derive(Debug)]
pub struct Pinned {
    /// The entered mapping's start (its key in the registry).
    base: usize,
    /// This pin's range.
    start: usize,
    len: usize,
}

impl Pinned {
    /// Pin `[va, va + len)`: refused unless it lies inside one live [`super::Mapping`].
    pub fn new(va: u64, len: u64) -> Result<Pinned, PinError> {
        if len == 0 {
            return Err(PinError::Empty { va, len });
        }
        let not_mapped = PinError::NotMapped { va, len };
        let start = usize::try_from(va).map_err(|_| not_mapped.clone())?;
        let n = usize::try_from(len).map_err(|_| not_mapped.clone())?;
        let end = start.checked_add(n).ok_or_else(|| not_mapped.clone())?;
        let mut live = lock(&LIVE);
        let Some((&base, l)) = live.range_mut(..=start).next_back() else {
            return Err(not_mapped);
        };
        if end > base + l.len {
            return Err(not_mapped);
        }
        if l.dropped {
            return Err(PinError::Dropped { va, len });
        }
        l.pins += 1;
        Ok(Pinned {
            base,
            start,
            len: n,
        })
    }

    /// Its first address.
    pub fn va(&self) -> u64 {
        self.start as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory file behind the pinned range and the range's offset in it, when the mapping
    /// is one of a memfd (a host arena): what a peer on this host maps to reach the same pages
    /// (the TCP backend's shared-memory path). `None` for any other memory.
    pub fn file(&self) -> Option<(Arc<OwnedFd>, u64)> {
        let live = lock(&LIVE);
        let f = live.get(&self.base)?.file.clone()?;
        Some((f, (self.start - self.base) as u64))
    }

    /// A pointer to `off` for `n` bytes, or `None` when that leaves the pinned range.
    pub(super) fn at(&self, off: u64, n: usize) -> Option<*mut u8> {
        let off = usize::try_from(off).ok()?;
        (off.checked_add(n)? <= self.len)
            .then(|| std::ptr::with_exposed_provenance_mut::<u8>(self.start + off))
    }

    /// Copy `src` into the memory at `off`; false when out of the pinned range.
    pub fn write(&self, off: u64, src: &[u8]) -> bool {
        let Some(p) = self.at(off, src.len()) else {
            return false;
        };
        // SAFETY: in bounds of a mapping kept live by this pin; shared bytes are only accessed
        // atomically (or by the kernel), and `src` is outside them.
        unsafe { atomic_bytes::store(p, src) };
        true
    }

    /// Copy from the memory at `off` into `dst`; false when out of the pinned range.
    pub fn read(&self, off: u64, dst: &mut [u8]) -> bool {
        let Some(p) = self.at(off, dst.len()) else {
            return false;
        };
        // SAFETY: as in `write`; `dst` is a unique borrow outside the mapping.
        unsafe { atomic_bytes::load(p, dst) };
        true
    }

    /// Copy `len` bytes at `off` to `dst` at `dst_off` (they may overlap); false when either
    /// side leaves its pinned range.
    pub fn copy_to(&self, off: u64, dst: &Pinned, dst_off: u64, len: usize) -> bool {
        let (Some(s), Some(d)) = (self.at(off, len), dst.at(dst_off, len)) else {
            return false;
        };
        // SAFETY: both ranges are in bounds of mappings kept live by their pins;
        // `atomic_bytes::copy` tolerates overlap.
        unsafe { atomic_bytes::copy(d, s, len) };
        true
    }

    /// Receive up to `len` bytes from the socket `fd` into the memory at `off`, without
    /// blocking (`MSG_DONTWAIT`): the bytes go from the kernel straight into the memory, no copy
    /// in between. `Ok(0)` is the end of the stream; `WouldBlock` when nothing is there yet.
    pub fn recv(&self, fd: BorrowedFd<'_>, off: u64, len: usize) -> io::Result<usize> {
        let p = self
            .at(off, len)
            .ok_or_else(|| out_of_range(off, len, self.len))?;
        // SAFETY: `recv` writes at most `len` bytes at `p`, in bounds of a mapping this pin keeps
        // live; the kernel's writes race with other accesses only as a device's DMA does (the
        // shared bytes are never referenced by Rust code). `fd` is a borrowed, open descriptor.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                p.cast::<libc::c_void>(),
                len,
                libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Send up to `len` bytes of the memory at `off` on the socket `fd`, without blocking and
    /// without `SIGPIPE`; `more` tells the kernel more follows at once (`MSG_MORE`). Returns
    /// how many the kernel took; `WouldBlock` when none fit.
    pub fn send(&self, fd: BorrowedFd<'_>, off: u64, len: usize, more: bool) -> io::Result<usize> {
        let p = self
            .at(off, len)
            .ok_or_else(|| out_of_range(off, len, self.len))?;
        let mut flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        if more {
            flags |= libc::MSG_MORE;
        }
        // SAFETY: `send` reads at most `len` bytes at `p`, in bounds of a mapping this pin keeps
        // live; `fd` is a borrowed, open descriptor.
        let n = unsafe { libc::send(fd.as_raw_fd(), p.cast::<libc::c_void>(), len, flags) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Send `head` (bytes of the caller's) and then up to `len` bytes of the memory at `off`, in
    /// one system call (`sendmsg` of two pieces), without blocking and without `SIGPIPE`; `more`
    /// as in [`Pinned::send`]. Returns how many bytes of the two together the kernel took.
    pub fn send_after(
        &self,
        fd: BorrowedFd<'_>,
        head: &[u8],
        off: u64,
        len: usize,
        more: bool,
    ) -> io::Result<usize> {
        let p = self
            .at(off, len)
            .ok_or_else(|| out_of_range(off, len, self.len))?;
        let iov = [
            libc::iovec {
                iov_base: head.as_ptr().cast_mut().cast::<libc::c_void>(),
                iov_len: head.len(),
            },
            libc::iovec {
                iov_base: p.cast::<libc::c_void>(),
                iov_len: len,
            },
        ];
        // SAFETY: an all-zero msghdr is a valid empty one (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr().cast_mut();
        msg.msg_iovlen = iov.len();
        let mut flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        if more {
            flags |= libc::MSG_MORE;
        }
        // SAFETY: `sendmsg` only reads the two pieces: `head`, borrowed for the call, and `len`
        // bytes at `p`, in bounds of a mapping this pin keeps live; `msg` and `iov` outlive the
        // call; `fd` is a borrowed, open descriptor.
        let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, flags) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

fn out_of_range(off: u64, len: usize, have: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("[{off:#x}, +{len:#x}) leaves a pinned range of {have:#x} bytes"),
    )
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut live = lock(&LIVE);
        if let Some(l) = live.get_mut(&self.base) {
            l.pins = l.pins.saturating_sub(1);
            // A dropped mapping stays entered (and leaked) for good: its address range is not
            // given back to the allocator, so no new mapping can start there.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Mapping;
    use super::*;

    #[test]
    fn only_ranges_inside_a_live_mapping_pin() {
        let m = Mapping::memfd("pin", 8192).unwrap();
        let va = m.process_va();
        let p = Pinned::new(va + 4096, 4096).unwrap();
        assert!(p.write(0, b"hello"));
        let mut got = [0u8; 5];
        assert!(m.read(4096, &mut got));
        assert_eq!(&got, b"hello");
        assert!(!p.write(4092, b"hello"), "past the pin's end");
        assert_eq!(
            Pinned::new(va + 4096, 8192).unwrap_err(),
            PinError::NotMapped {
                va: va + 4096,
                len: 8192
            }
        );
        let local = [0u8; 64];
        let stack = local.as_ptr() as u64;
        assert!(matches!(
            Pinned::new(stack, 64),
            Err(PinError::NotMapped { .. })
        ));
        assert!(matches!(Pinned::new(va, 0), Err(PinError::Empty { .. })));
        drop(p);
        drop(m);
        assert!(matches!(
            Pinned::new(va, 16),
            Err(PinError::NotMapped { .. })
        ));
    }

    /// A mapping dropped while pinned is leaked, not unmapped: the pin can still write into it,
    /// and no new pin is given.
    #[test]
    fn a_pinned_mapping_dropped_is_leaked_not_unmapped() {
        let m = Mapping::from_vec(vec![7u8; 4096]).unwrap();
        let va = m.process_va();
        let p = Pinned::new(va, 4096).unwrap();
        assert!(is_pinned(va as usize));
        let dropped = dropped_while_pinned();
        let m = match m.into_vec() {
            Ok(_) => panic!("a pinned buffer was given back"),
            Err(m) => m,
        };
        drop(m);
        assert!(dropped_while_pinned() > dropped, "the leak was not counted");
        assert!(p.write(0, b"still mapped"));
        let mut got = [0u8; 4];
        assert!(p.read(0, &mut got));
        assert_eq!(&got, b"stil");
        assert!(matches!(Pinned::new(va, 16), Err(PinError::Dropped { .. })));
    }

    #[test]
    fn recv_and_send_move_bytes_between_a_socket_and_the_memory() {
        use std::io::{Read, Write};
        use std::os::fd::AsFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let m = Mapping::memfd("sock", 4096).unwrap();
        let p = Pinned::new(m.process_va(), 4096).unwrap();
        a.write_all(b"over the wire").unwrap();
        let mut got = 0;
        while got < 13 {
            match p.recv(b.as_fd(), 100 + got as u64, 13 - got) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        let mut buf = [0u8; 13];
        assert!(m.read(100, &mut buf));
        assert_eq!(&buf, b"over the wire");
        assert_eq!(p.send(b.as_fd(), 100, 13, false).unwrap(), 13);
        let mut back = [0u8; 13];
        a.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"over the wire");
        assert!(p.recv(b.as_fd(), 4090, 13).is_err(), "out of range");
    }
}
