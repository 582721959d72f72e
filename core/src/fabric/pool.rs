//! Recycled host arenas: a window's memory goes back here when its last handle is dropped, and
//! the next window of the same kind and size reuses it, zeroed.
//!
//! Why: an exporter that revokes and re-exports over and over (the revoke stress, a checkpoint
//! loader cycling buffers) would otherwise pay a fresh memfd, its first-touch page faults and an
//! munmap every cycle — costs of the simulation's host, not of the protocol being measured. The
//! memory is zeroed before reuse, as the kernel hands out zeroed pages, so no bytes leak from one
//! export to the next.

use std::sync::Arc;

use super::memory::Mapping;
use crate::sync::{Mutex, lock};

/// At most this many bytes wait in the pool; beyond it, freed memory is unmapped.
pub(crate) const POOL_BYTES: usize = 512 << 20;

#[derive(Debug, Default)]
pub(crate) struct Pool {
    free: Mutex<Vec<Arc<Mapping>>>,
}

impl Pool {
    /// Keep `mem` for reuse when it is memfd-backed host memory and the pool has room;
    /// otherwise it is dropped (unmapped) as usual. Reuse waits until nobody else holds it.
    pub(crate) fn put(&self, mem: Arc<Mapping>) {
        if mem.fd().is_none() {
            return;
        }
        let mut free = lock(&self.free);
        let held: usize = free.iter().map(|m| m.len()).sum();
        if held + mem.len() <= POOL_BYTES {
            free.push(mem);
        }
    }

    /// Host memory of exactly `len` bytes from the pool, zeroed.
    pub(crate) fn take(&self, len: usize) -> Option<Mapping> {
        let m = {
            let mut free = lock(&self.free);
            let i = free
                .iter()
                .position(|m| m.len() == len && Arc::strong_count(m) == 1)?;
            free.swap_remove(i)
        };
        let m = Arc::into_inner(m)?;
        m.fill(0);
        Some(m)
    }
}
