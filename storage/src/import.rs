//! The storage importer: exported memory registered as a ring's fixed buffer, and the revoke
//! contract for it.
//!
//! - **Import.** [`Ring::import`](crate::Ring::import) negotiates a `ProcessVa` list with the
//!   exporter (one contiguous range: the kernel registers one iovec per slot) and registers it in
//!   a free slot of the ring's buffer table (`IORING_REGISTER_BUFFERS_UPDATE`).
//! - **Invalidate** (the exporter's thread, never blocks): the slot is queued as revoked with
//!   its fence. Nothing else happens on that thread: the ring belongs to its owner's thread.
//! - **Quiesce** (the owner's thread, in [`Ring::reap`](crate::Ring::reap) or
//!   [`Ring::progress`](crate::Ring::progress)): requests naming the slot are refused from then on
//!   with [`StorageError::Revoked`](crate::StorageError::Revoked); those in flight are cancelled
//!   (`IORING_OP_ASYNC_CANCEL`; an O_DIRECT read already at the device completes anyway) and
//!   reaped; once none is left the slot is unregistered (updated to an empty iovec) and only
//!   then is the fence signalled. Every request gets its one completion before the ack.
//! - **The owner must reap.** A ring nobody reaps cannot quiesce: its revoke misses the
//!   exporter's deadline and is reported as timed out, and an exporter that honours the
//!   contract keeps the memory (as `UserBuffer` does) rather than freeing it under the kernel.
//!
//! The kernel does this DMA, not a fabric, so there is no backstop and no oracle inside it: the
//! tests observe from outside — the memory poisoned at the ack and checked afterwards, and the
//! completions the kernel queued after the ack counted — and break the contract on purpose
//! ([`RingBuilder::inject_early_fence`](crate::RingBuilder::inject_early_fence)) to show both
//! observers catch it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dmaplane_core::sync::lock;

use dmaplane_core::revoke::{Importer, ImporterKind, Invalidation};

/// A revoke the exporter asked for, waiting for the ring's owner.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) slot: u16,
    /// Which import of the slot it is for ([`StorageImporter::import`]).
    pub(crate) import: u64,
    pub(crate) inv: Invalidation,
}

/// What the importers of one ring and the ring share: revokes not yet handled, and a flag the
/// ring's request path reads instead of taking the lock.
#[derive(Debug, Default)]
pub(crate) struct RevokeQueue {
    any: AtomicBool,
    list: Mutex<Vec<Pending>>,
}

impl RevokeQueue {
    fn push(&self, p: Pending) {
        lock(&self.list).push(p);
        // After the push: a reader that sees the flag finds the entry.
        self.any.store(true, Ordering::Release);
    }

    /// Every revoke queued so far (none without taking the lock when there is none).
    pub(crate) fn take(&self) -> Vec<Pending> {
        if !self.any.swap(false, Ordering::Acquire) {
            return Vec::new();
        }
        std::mem::take(&mut *lock(&self.list))
    }
}

pub(crate) type Revokes = Arc<RevokeQueue>;

/// The importer of one imported slot.
pub(crate) struct StorageImporter {
    pub(crate) name: String,
    pub(crate) slot: u16,
    /// The ring's count of imports when this one was made: slots are reused, and attachment ids
    /// are per export, so this is what tells one import's revoke from another's.
    pub(crate) import: u64,
    pub(crate) revokes: Revokes,
    /// Fault injection: signal the fence at once, before anything is quiesced.
    pub(crate) early_fence: bool,
}

impl Importer for StorageImporter {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> ImporterKind {
        ImporterKind::Pinned
    }

    fn invalidate(&self, inv: Invalidation) {
        if self.early_fence {
            tracing::warn!(importer = %self.name, "injected: fence signalled before the quiesce");
            inv.fence.signal();
        }
        self.revokes.push(Pending {
            slot: self.slot,
            import: self.import,
            inv,
        });
    }
}
