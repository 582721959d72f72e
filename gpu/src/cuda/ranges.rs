//! The address ranges a GPU's copy engine may touch: its live allocations and the host ranges
//! registered for it. [`GpuBackend::copy`](crate::backend::GpuBackend::copy) takes raw addresses
//! and `cuMemcpy` under unified addressing would copy to any address of the process, so every
//! copy is checked against this table first, and holds the table (shared) until it has finished:
//! an owner removes its range (exclusively) before `cuMemFree` or `cuMemHostUnregister`, so no
//! copy can be under way into memory that goes.

use std::collections::BTreeMap;
use std::sync::{RwLock, RwLockReadGuard};

use dmaplane_core::sync::{read, write};

/// Live ranges, possibly overlapping (the same host buffer imported twice).
#[derive(Debug, Default)]
pub(super) struct CopyRanges {
    inner: RwLock<Inner>,
}

/// The table held for reading: what a copy holds while it runs.
#[derive(Debug)]
pub(super) struct Admitted<'a>(RwLockReadGuard<'a, Inner>);

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    /// `(start, id) -> end`.
    ranges: BTreeMap<(u64, u64), u64>,
}

/// One entry of the table, to remove it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RangeKey {
    start: u64,
    id: u64,
}

impl CopyRanges {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        write(&self.inner)
    }

    /// The table for checking copies; ranges cannot be removed while it is held.
    pub(super) fn read(&self) -> Admitted<'_> {
        Admitted(read(&self.inner))
    }

    /// Admit `[start, start + len)`; `None` when it wraps around the address space.
    pub(super) fn add(&self, start: u64, len: u64) -> Option<RangeKey> {
        let end = start.checked_add(len)?;
        let mut inner = self.write();
        inner.next += 1;
        let key = RangeKey {
            start,
            id: inner.next,
        };
        inner.ranges.insert((start, key.id), end);
        Some(key)
    }

    /// Withdraw a range; waits for copies under way (they hold the table shared).
    pub(super) fn remove(&self, key: RangeKey) {
        self.write().ranges.remove(&(key.start, key.id));
    }
}

impl Admitted<'_> {
    /// Whether one admitted range holds all of `[addr, addr + len)`.
    pub(super) fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.0
            .ranges
            .range(..=(addr, u64::MAX))
            .any(|(_, &e)| e >= end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes the read side for each check, as a copy does.
    struct Tab<'a>(&'a CopyRanges);
    impl Tab<'_> {
        fn contains(&self, addr: u64, len: u64) -> bool {
            self.0.read().contains(addr, len)
        }
        fn add(&self, start: u64, len: u64) -> Option<RangeKey> {
            self.0.add(start, len)
        }
        fn remove(&self, key: RangeKey) {
            self.0.remove(key)
        }
    }

    #[test]
    fn copies_must_lie_in_one_live_range() {
        let t = CopyRanges::default();
        let r = Tab(&t);
        assert!(!r.contains(0x1000, 1));
        let a = r.add(0x1000, 0x1000).unwrap();
        let b = r.add(0x1800, 0x1000).unwrap();
        assert!(r.contains(0x1000, 0x1000));
        assert!(r.contains(0x1800, 0x1000));
        assert!(r.contains(0x1fff, 1));
        // Across the two ranges is not inside one of them.
        assert!(!r.contains(0x1000, 0x1800));
        assert!(!r.contains(0xfff, 2));
        assert!(!r.contains(0x2800, 1));
        assert!(!r.contains(u64::MAX, 2));
        r.remove(b);
        assert!(!r.contains(0x2000, 0x100));
        assert!(r.contains(0x1000, 0x1000));
        // The same range twice: it stays admitted until both are gone.
        let c = r.add(0x1000, 0x1000).unwrap();
        r.remove(a);
        assert!(r.contains(0x1000, 0x1000));
        r.remove(c);
        assert!(!r.contains(0x1000, 1));
        assert!(r.add(u64::MAX, 2).is_none());
    }
}
