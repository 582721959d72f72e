//! What a file transfer is made of on the drive: checked pairs of (file range, memory range),
//! split into pieces, each direct or through a bounce buffer, and how a piece's end is judged.

use std::collections::VecDeque;
use std::sync::Arc;

use dmaplane_storage::{BufId, StorageError};

use crate::error::{Error, Result, Side};
use crate::file::FileEntry;
use crate::region::MemoryEntry;
use crate::stage::Stage;

/// One checked pair of a file transfer.
pub(crate) struct Pair {
    pub(crate) file: Arc<FileEntry>,
    /// Absolute file offset.
    pub(crate) at: u64,
    pub(crate) region: Arc<MemoryEntry>,
    /// Absolute memory offset.
    pub(crate) mem_off: u64,
    pub(crate) len: u64,
}

/// One file transfer on the drive: its pieces not queued yet, what is in flight, what moved,
/// its first error, and who waits for it.
pub(super) struct FileOp {
    pub(super) write: bool,
    pub(super) queue: VecDeque<Piece>,
    pub(super) in_flight: usize,
    pub(super) moved: u64,
    pub(super) error: Option<Error>,
    pub(super) bounces: Vec<Bounce>,
    /// Its handle was dropped: forget it once finished.
    pub(super) detached: bool,
    pub(super) finished: bool,
    /// Whoever awaits it ([`super::FileTransfer`] as a `Future`): woken when it ends.
    pub(super) waker: Option<std::task::Waker>,
}

/// A bounce buffer of one transfer for one memory: [`super::BOUNCE_PIECES`] pieces.
pub(super) struct Bounce {
    pub(super) memory: u64,
    pub(super) stage: Arc<Stage>,
    pub(super) buf: BufId,
    /// Offsets of its free pieces.
    pub(super) free: Vec<u64>,
}

pub(super) struct Piece {
    pub(super) file: Arc<FileEntry>,
    /// Absolute file offset.
    pub(super) at: u64,
    pub(super) len: u64,
    pub(super) region: Arc<MemoryEntry>,
    /// Absolute memory offset.
    pub(super) mem_off: u64,
    pub(super) target: PieceBuffer,
}

#[derive(Clone, Copy)]
pub(super) enum PieceBuffer {
    Direct(BufId),
    /// Through bounce `idx` of the transfer; `slot` once it holds a piece of it.
    Bounce {
        idx: usize,
        slot: Option<u64>,
    },
}

/// Give a bounce piece back to its buffer.
pub(super) fn free_slot(op: &mut FileOp, p: &Piece) {
    if let PieceBuffer::Bounce { idx, slot: Some(s) } = p.target {
        op.bounces[idx].free.push(s);
    }
}

/// The first error ends the transfer: what is not on the drive yet never goes (the caller
/// sets those pieces aside).
pub(super) fn fail(op: &mut FileOp, e: Error) {
    if op.error.is_none() {
        op.error = Some(e);
    }
}

/// A revoke if the piece's memory was revoked (what made the copy fail), else `e`.
pub(super) fn revoked_or(p: &Piece, e: Error) -> Error {
    revoked(p, "the copy engine's view of it was revoked mid-transfer").unwrap_or(e)
}

/// [`Error::Revoked`] for the piece's memory, if it was revoked or freed.
pub(super) fn revoked(p: &Piece, why: &str) -> Option<Error> {
    let e = &p.region;
    let epoch = e
        .revoked_at()
        .or_else(|| e.memory.is_freed().then_some(e.epoch + 1))?;
    Some(Error::Revoked {
        side: Side::Local,
        region: e.id,
        name: e.memory.name().to_string(),
        epoch,
        why: why.to_string(),
    })
}

/// A refused submission, as the agent says it.
pub(super) fn storage_error(p: &Piece, write: bool, e: StorageError) -> Error {
    match e {
        StorageError::Revoked { .. } => {
            revoked(p, "the drive refused a request on it").unwrap_or_else(|| Error::from(e))
        }
        other => Error::File {
            op: if write { "write" } else { "read" },
            path: p.file.path.display().to_string(),
            offset: p.at,
            len: p.len,
            why: other.to_string(),
        },
    }
}

/// What a completion's result says of the piece.
pub(super) fn judge(p: &Piece, write: bool, result: i32) -> Result<()> {
    let op = if write { "write" } else { "read" };
    let file = |why: String| Error::File {
        op,
        path: p.file.path.display().to_string(),
        offset: p.at,
        len: p.len,
        why,
    };
    if let Ok(n) = u64::try_from(result) {
        if n == p.len {
            // Landed, but the memory went before the transfer ended: it is not done (the
            // kernel finishes reads already at the device before the fence; none after it).
            return match revoked(p, "the memory was revoked before the transfer ended") {
                Some(r) => Err(r),
                None => Ok(()),
            };
        }
        let now = p.file.direct.len().ok();
        return Err(file(match (write, now) {
            (false, Some(end)) => format!(
                "short read: {n} of {} bytes; the file ends at {end:#x} now (it was {:#x} when \
                 registered: was it truncated during the read?)",
                p.len, p.file.file_len
            ),
            (false, None) => format!("short read: {n} of {} bytes", p.len),
            (true, _) => format!(
                "short write: {n} of {} bytes (is the file system full?)",
                p.len
            ),
        }));
    }
    let errno = result.saturating_neg();
    if (errno == libc::ECANCELED || errno == libc::EFAULT)
        && let Some(r) = revoked(
            p,
            if errno == libc::ECANCELED {
                "the drive cancelled or stopped the request when the memory was revoked"
            } else {
                "the fabric refused the drive's DMA: the memory was revoked"
            },
        )
    {
        return Err(r);
    }
    Err(file(dmaplane_storage::ring::errno_why(
        &std::io::Error::from_raw_os_error(errno),
    )))
}
