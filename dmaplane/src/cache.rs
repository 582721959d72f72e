//! The registration cache: registrations by (memory, range), range-aware and refcounted.
//!
//! Registering a range that an existing registration of the same memory covers costs a lookup
//! and hands out a view of it; only a range nothing covers is registered (on every NIC). An
//! entry whose memory was revoked is never handed out again, and freeing a memory drops all of
//! its entries at once, so the cache never keeps freed memory pinned. Entries live until then:
//! a handle dropped and taken again is a hit.
//!
//! File registrations are cached the same way, by canonical path (the agent's file registrations).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::region::MemoryEntry;
use crate::sync::lock;

/// Cache counters, in [`crate::AgentStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Registrations served by an existing entry that covers the range.
    pub hits: u64,
    /// Registrations that nothing covered, so a new entry was registered.
    pub misses: u64,
    /// Bytes registered by misses (on each NIC that serves them).
    pub bytes_registered: u64,
    /// Entries held now.
    pub entries: u64,
    /// Entries dropped because their memory was revoked or freed.
    pub invalidated: u64,
}

impl CacheStats {
    /// The counts of two caches together (memory and files).
    pub(crate) fn merge(self, o: CacheStats) -> CacheStats {
        CacheStats {
            hits: self.hits + o.hits,
            misses: self.misses + o.misses,
            bytes_registered: self.bytes_registered + o.bytes_registered,
            entries: self.entries + o.entries,
            invalidated: self.invalidated + o.invalidated,
        }
    }
}

/// One memory's registrations: base → the entries starting there.
type Entries = BTreeMap<u64, Vec<Arc<MemoryEntry>>>;

#[derive(Default)]
pub(crate) struct Cache {
    /// memory id → its registrations.
    by_memory: Mutex<HashMap<u64, Entries>>,
    hits: AtomicU64,
    misses: AtomicU64,
    bytes: AtomicU64,
    invalidated: AtomicU64,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Cache {
    /// An entry of `memory` covering `[offset, offset + len)`, counted as a hit; revoked
    /// entries met on the way are dropped.
    pub(crate) fn lookup(&self, memory: u64, offset: u64, len: u64) -> Option<Arc<MemoryEntry>> {
        let mut all = lock(&self.by_memory);
        let tree = all.get_mut(&memory)?;
        let mut stale = Vec::new();
        let mut found = None;
        // Entries starting at or before `offset`, nearest first: the nearest that is long
        // enough covers the range.
        'outer: for (&base, entries) in tree.range(..=offset).rev() {
            for e in entries {
                if e.revoked_at().is_some() {
                    stale.push(base);
                    continue;
                }
                if e.covers(offset, len) {
                    found = Some(e.clone());
                    break 'outer;
                }
            }
        }
        for base in stale {
            if let Some(v) = tree.get_mut(&base) {
                let before = v.len();
                v.retain(|e| e.revoked_at().is_none());
                self.invalidated
                    .fetch_add((before - v.len()) as u64, Ordering::Relaxed);
                if v.is_empty() {
                    tree.remove(&base);
                }
            }
        }
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Record a new registration (a miss).
    pub(crate) fn insert(&self, memory: u64, entry: Arc<MemoryEntry>, nics: usize) {
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.bytes
            .fetch_add(entry.len * nics as u64, Ordering::Relaxed);
        lock(&self.by_memory)
            .entry(memory)
            .or_default()
            .entry(entry.base)
            .or_default()
            .push(entry);
    }

    /// Drop one entry (deregistered).
    pub(crate) fn remove(&self, memory: u64, entry: &Arc<MemoryEntry>) {
        let mut all = lock(&self.by_memory);
        if let Some(tree) = all.get_mut(&memory)
            && let Some(v) = tree.get_mut(&entry.base)
        {
            v.retain(|e| !Arc::ptr_eq(e, entry));
            if v.is_empty() {
                tree.remove(&entry.base);
            }
        }
    }

    /// Every entry of a memory that is being freed goes.
    pub(crate) fn forget_memory(&self, memory: u64) {
        if let Some(tree) = lock(&self.by_memory).remove(&memory) {
            let n: usize = tree.values().map(Vec::len).sum();
            self.invalidated.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Entries held for `memory` now.
    pub(crate) fn entries_of(&self, memory: u64) -> usize {
        lock(&self.by_memory)
            .get(&memory)
            .map_or(0, |t| t.values().map(Vec::len).sum())
    }

    pub(crate) fn stats(&self) -> CacheStats {
        let entries: usize = lock(&self.by_memory)
            .values()
            .flat_map(|t| t.values())
            .map(Vec::len)
            .sum::<usize>();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes_registered: self.bytes.load(Ordering::Relaxed),
            entries: entries as u64,
            invalidated: self.invalidated.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::memory::Backing;
    use crate::{Agent, Error, Testbed};

    /// The rule at the top of this file: an entry whose memory was revoked (here the exporter
    /// moved the memory: every MR of it was revoked, the memory lives on) is never handed out
    /// again; the next registration of the same range registers anew.
    #[test]
    fn an_entry_whose_memory_was_revoked_is_never_handed_out_again() {
        let a = Agent::builder("a")
            .testbed(Testbed::builtin().unwrap())
            .nics(["nic0"])
            .build()
            .unwrap();
        let mem = a.alloc_host("pool", 4 << 20).unwrap();
        let first = a.register_range(&mem, 0, 1 << 20).unwrap();
        let again = a.register_range(&mem, 4096, 4096).unwrap();
        assert_eq!(again.id(), first.id(), "a covered range is a hit");
        let before = a.stats().cache;
        mem.with_backing(|b| match b {
            Backing::Host(h) => h
                .relocate(Duration::from_secs(1))
                .map_err(|e| Error::setup("pool", e.to_string())),
            _ => unreachable!("alloc_host on the testbed is fabric host memory"),
        })
        .unwrap();
        assert!(
            first.entry.revoked_at().is_some(),
            "the move revoked the MR"
        );
        let after_move = a.register_range(&mem, 4096, 4096).unwrap();
        assert_ne!(
            after_move.id(),
            first.id(),
            "a revoked registration was handed out again"
        );
        assert!(after_move.entry.revoked_at().is_none());
        let s = a.stats().cache;
        assert_eq!(s.hits, before.hits, "no hit on a revoked entry");
        assert_eq!(s.misses, before.misses + 1);
        assert_eq!(
            s.invalidated,
            before.invalidated + 1,
            "the stale entry dropped"
        );
        assert_eq!(a.cached_registrations(&mem), 1);
    }
}
