//! The agent's registrations by id: what peers' requests and the agent's own transfers name.
//! Entries are held weakly: a registration lives while a handle or the cache holds it, and its
//! id is never given out again (file registrations draw from the same ids).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::region::MemoryEntry;
use crate::sync::lock;

/// Registration id → entry, and the next id.
#[derive(Debug)]
pub(crate) struct Registry {
    entries: Mutex<HashMap<u32, Weak<MemoryEntry>>>,
    /// Registrations whose memory was freed, with the epoch of the revoke that freed it (the
    /// newest [`BURIED`]): a peer's late request to one is told it was revoked, typed.
    buried: Mutex<BTreeMap<u32, u64>>,
    next: AtomicU32,
}

/// How many freed registrations the registry remembers.
const BURIED: usize = 4096;

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            entries: Mutex::new(HashMap::new()),
            buried: Mutex::new(BTreeMap::new()),
            next: AtomicU32::new(1),
        }
    }
}

impl Registry {
    /// A new registration id (ids start at 1 and are never reused).
    pub(crate) fn next_id(&self) -> u32 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// List a registration under its id.
    pub(crate) fn insert(&self, entry: &Arc<MemoryEntry>) {
        lock(&self.entries).insert(entry.id, Arc::downgrade(entry));
    }

    /// Stop listing registration `id`.
    pub(crate) fn remove(&self, id: u32) {
        lock(&self.entries).remove(&id);
    }

    /// Memory `memory` is being freed: remember each of its registrations with the epoch it
    /// was revoked at. Returns them, with that epoch.
    pub(crate) fn bury_memory(&self, memory: u64) -> Vec<(Arc<MemoryEntry>, u64)> {
        let gone: Vec<(Arc<MemoryEntry>, u64)> = lock(&self.entries)
            .values()
            .filter_map(Weak::upgrade)
            .filter(|e| e.memory.id() == memory)
            .filter_map(|e| {
                let epoch = e.revoked_at()?;
                Some((e, epoch))
            })
            .collect();
        let mut b = lock(&self.buried);
        b.extend(gone.iter().map(|(e, epoch)| (e.id, *epoch)));
        while b.len() > BURIED {
            b.pop_first();
        }
        gone
    }

    /// The epoch registration `id` was revoked at when its memory was freed, if it was (and is
    /// among the newest remembered).
    pub(crate) fn buried(&self, id: u32) -> Option<u64> {
        lock(&self.buried).get(&id).copied()
    }

    /// Registration `id`, while anything holds it.
    pub(crate) fn get(&self, id: u32) -> Option<Arc<MemoryEntry>> {
        lock(&self.entries).get(&id).and_then(Weak::upgrade)
    }

    /// Every registration alive and not revoked, by id.
    pub(crate) fn live(&self) -> Vec<Arc<MemoryEntry>> {
        let mut v: Vec<Arc<MemoryEntry>> = lock(&self.entries)
            .values()
            .filter_map(Weak::upgrade)
            .filter(|e| e.revoked_at().is_none())
            .collect();
        v.sort_by_key(|e| e.id);
        v
    }
}
