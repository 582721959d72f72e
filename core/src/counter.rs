//! A statistics counter: bumped from any thread, read in snapshots. Relaxed ordering: a counter
//! counts, it does not synchronise anything, so a snapshot of several counters is of each at
//! some moment, not of all at one moment.

use std::fmt;

use crate::sync::atomic::{AtomicU64, Ordering};

/// One count. The stats types of the workspace are snapshots of these.
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for Counter {
    fn default() -> Counter {
        Counter(AtomicU64::new(0))
    }
}

impl fmt::Debug for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.get())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads() {
        let c = Counter::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        c.inc();
                    }
                    c.add(10);
                });
            }
        });
        assert_eq!(c.get(), 4040);
        assert_eq!(format!("{c:?}"), "4040");
    }
}
