//! The TCP backend's memory regions: ranges of this process's memory (`ProcessVa`), each held
//! by a [`Pinned`] so the engine can move bytes between it and a socket, keyed by lkey/rkey and
//! checked on every access.
//!
//! Every access holds the region's translation for reading during one system call, never
//! longer (never while it waits for a peer): so [`MrBackend::zap`] waits for at most one
//! `recv` or `send` in progress, and from its return on every access fails. A zap drops the
//! pins: the exporter may then free or move the memory.
//!
//! A region may also be shared with a peer on this host ([`TcpMr::share`], the shared-memory
//! path: `shm/`): then its zap also waits until every peer it was shared with has dropped its
//! view, and fails, naming them, for a peer that does not answer. Until every such peer has
//! answered, the region keeps its pins (the memory cannot be freed, only leaked, and the pin
//! registry counts that) and the peers that did not answer stay its sharers: a later zap asks
//! them again. Dropping a region that was never zapped tells its sharers too.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dmaplane_core::fabric::Pinned;
use dmaplane_core::{AddrList, AddrSpace};

use crate::access::MrAccess;
use crate::backend::{MrBackend, MrKeys, Translation};
use crate::error::{RdmaError, Result};
use crate::sync::{lock, read, write};

/// Someone a region's memory file was shared with (a lane's owner side), who must drop its view
/// of the region before its zap returns.
pub(crate) trait Sharer: Send + Sync + std::fmt::Debug {
    /// Tell the peer to drop its view of `rkey` and wait until it has; `Err` says why it did
    /// not answer.
    fn unmap(&self, rkey: u32) -> std::result::Result<(), String>;
}

/// What a peer on this host is given to map a region: its memory file, where the region starts
/// in it, and the region's keys.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) file: Arc<OwnedFd>,
    pub(crate) offset: u64,
    pub(crate) iova: u64,
    pub(crate) len: u64,
    pub(crate) access: MrAccess,
}

/// Why a region is not shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotShared {
    /// Zapped, or it grants no remote access: a request fails as a remote access error.
    Denied,
    /// Not one range of a memory file: requests take the socket path.
    NoFile,
}

/// Why an access through an MR failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MrFault {
    /// No region of this protection domain has the key.
    Key,
    Zapped,
    OutOfBounds,
    Access,
}

/// One pinned range and where it starts in the region's iova space.
#[derive(Debug)]
struct Piece {
    iova: u64,
    pin: Pinned,
}

#[derive(Debug)]
pub(crate) struct TcpMr {
    keys: MrKeys,
    pub(crate) pd: u32,
    /// `None` once zapped.
    pieces: RwLock<Option<Vec<Piece>>>,
    zapping: AtomicBool,
    /// The peers it was shared with (held strongly: a lane that ended still answers for its
    /// views, see `shm::owner`).
    sharers: Mutex<Vec<Arc<dyn Sharer>>>,
    /// Pins taken out by a zap whose peers did not all answer: kept until they do (or for good).
    held: Mutex<Vec<Piece>>,
}

impl TcpMr {
    pub(crate) fn new(
        key: u32,
        pd: u32,
        list: &AddrList,
        iova: u64,
        access: MrAccess,
    ) -> Result<TcpMr> {
        let bad = |field: &'static str, value: String, why: String| {
            RdmaError::InvalidRegistration { field, value, why }
        };
        access
            .validate()
            .map_err(|why| bad("access", access.to_string(), why.into()))?;
        if list.space() != AddrSpace::ProcessVa {
            return Err(bad(
                "list.space",
                format!("{:?}", list.space()),
                "the TCP backend's engine moves this process's memory: ProcessVa only".into(),
            ));
        }
        let len = list.total_len();
        if iova.checked_add(len).is_none() {
            return Err(bad(
                "iova",
                format!("{iova:#x}"),
                format!("iova + length {len:#x} overflows"),
            ));
        }
        let mut pieces = Vec::with_capacity(list.ranges().len());
        let mut at = iova;
        for r in list.ranges() {
            let pin = Pinned::new(r.addr, r.len).map_err(|e| {
                bad(
                    "list",
                    format!("[{:#x}, +{:#x})", r.addr, r.len),
                    e.to_string(),
                )
            })?;
            pieces.push(Piece { iova: at, pin });
            at += r.len;
        }
        Ok(TcpMr {
            keys: MrKeys {
                lkey: key,
                rkey: key,
                iova,
                len,
                access,
            },
            pd,
            pieces: RwLock::new(Some(pieces)),
            zapping: AtomicBool::new(false),
            sharers: Mutex::new(Vec::new()),
            held: Mutex::new(Vec::new()),
        })
    }

    /// Check `[addr, +len)` against the bounds and `need`, and that the region is live.
    pub(crate) fn check(
        &self,
        addr: u64,
        len: u64,
        need: MrAccess,
    ) -> std::result::Result<(), MrFault> {
        if !self.keys.access.contains(need) {
            return Err(MrFault::Access);
        }
        let end = self.keys.iova + self.keys.len;
        if addr < self.keys.iova || addr.checked_add(len).is_none_or(|e| e > end) {
            return Err(MrFault::OutOfBounds);
        }
        if read(&self.pieces).is_none() {
            return Err(MrFault::Zapped);
        }
        Ok(())
    }

    /// Run one access on the piece holding `addr`: `f(pin, offset in the pin, bytes)` with at
    /// most `len` bytes, fewer where the piece ends. The translation is held for reading while
    /// `f` runs (one system call). Bounds and access are checked first.
    pub(crate) fn access<R>(
        &self,
        addr: u64,
        len: u64,
        need: MrAccess,
        f: impl FnOnce(&Pinned, u64, usize) -> R,
    ) -> std::result::Result<R, MrFault> {
        if !self.keys.access.contains(need) {
            return Err(MrFault::Access);
        }
        let end = self.keys.iova + self.keys.len;
        if addr < self.keys.iova || addr.checked_add(len).is_none_or(|e| e > end) {
            return Err(MrFault::OutOfBounds);
        }
        let guard = read(&self.pieces);
        let pieces = guard.as_ref().ok_or(MrFault::Zapped)?;
        let i = pieces.partition_point(|p| p.iova <= addr).saturating_sub(1);
        let p = pieces.get(i).ok_or(MrFault::OutOfBounds)?;
        let off = addr - p.iova;
        let room = (p.pin.len() as u64).saturating_sub(off);
        let n = usize::try_from(len.min(room)).unwrap_or(usize::MAX);
        Ok(f(&p.pin, off, n))
    }

    /// Share the region with `to` (see the module docs): refused once zapped, for a region that
    /// grants no remote access, and for one that is not a single range of a memory file.
    pub(crate) fn share(&self, to: &Arc<dyn Sharer>) -> std::result::Result<Shared, NotShared> {
        let access = self.keys.access;
        if !access.intersects(MrAccess::REMOTE_READ | MrAccess::REMOTE_WRITE) {
            return Err(NotShared::Denied);
        }
        // Entered under the translation's read lock: a zap (which takes it for writing) either
        // sees this sharer or came first, and then nothing is shared.
        let guard = read(&self.pieces);
        let pieces = guard.as_ref().ok_or(NotShared::Denied)?;
        let [piece] = pieces.as_slice() else {
            return Err(NotShared::NoFile);
        };
        let (file, offset) = piece.pin.file().ok_or(NotShared::NoFile)?;
        let mut sharers = lock(&self.sharers);
        if !sharers.iter().any(|s| Arc::ptr_eq(s, to)) {
            sharers.push(to.clone());
        }
        Ok(Shared {
            file,
            offset,
            iova: self.keys.iova,
            len: self.keys.len,
            access,
        })
    }

    /// A zap waits for the translation (or is done with it): a message under way stops at its
    /// next frame.
    pub(crate) fn zapping(&self) -> bool {
        self.zapping.load(Ordering::SeqCst)
    }
}

impl TcpMr {
    /// Tell every sharer to drop its view and wait; those that did not answer stay sharers.
    /// Returns why each of those did not.
    fn unshare(&self) -> Vec<String> {
        let sharers = std::mem::take(&mut *lock(&self.sharers));
        let mut failed = Vec::new();
        let mut kept = Vec::new();
        for s in sharers {
            if let Err(why) = s.unmap(self.keys.rkey) {
                failed.push(why);
                kept.push(s);
            }
        }
        lock(&self.sharers).extend(kept);
        failed
    }
}

impl Drop for TcpMr {
    fn drop(&mut self) {
        // Deregistered without a zap (a caller's `Mr` dropped): its peers still drop their
        // views first, or the pins stay (leaked with the memory, counted by the registry).
        if lock(&self.sharers).is_empty() {
            return;
        }
        let failed = self.unshare();
        if !failed.is_empty() {
            tracing::error!(rkey = self.keys.rkey, why = %failed.join("; "), "a region dropped while a peer may still map it: its memory is leaked");
            let pieces = write(&self.pieces).take().unwrap_or_default();
            std::mem::forget(pieces);
            std::mem::forget(std::mem::take(&mut *lock(&self.held)));
        }
    }
}

impl MrBackend for TcpMr {
    fn keys(&self) -> MrKeys {
        self.keys
    }

    fn translation(&self) -> Translation {
        // The engine addresses bytes, not pages: one entry per pinned range, at page granule.
        let entries = read(&self.pieces).as_ref().map_or(0, |p| p.len() as u64);
        Translation {
            page_size: 4096,
            entries,
        }
    }

    fn zap(&self) -> Result<()> {
        self.zapping.store(true, Ordering::SeqCst);
        // Waits for the one system call under way, if any: from here on this engine reaches
        // nothing of the region.
        let pieces = write(&self.pieces).take();
        // Then every peer it was shared with drops its view (outside the lock: the peer's
        // engine may be finishing a copy it started before).
        let failed = self.unshare();
        if failed.is_empty() {
            // Nobody reaches the memory any more: the pins go.
            drop(pieces);
            lock(&self.held).clear();
            return Ok(());
        }
        // Someone may still map it: the pins stay, so the memory is leaked, never reused.
        lock(&self.held).extend(pieces.unwrap_or_default());
        Err(RdmaError::Backend {
            device: "tcp".into(),
            op: "zap",
            why: format!(
                "rkey {:#x}: a peer on this host may still map the memory: {}",
                self.keys.rkey,
                failed.join("; ")
            ),
        })
    }
}
