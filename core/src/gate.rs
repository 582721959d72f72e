//! Gates: the importer half of the revoke contract for importers whose DMA is synchronous (a copy
//! engine, a CPU fallback) rather than queued on hardware.
//!
//! # The contract
//!
//! Every DMA to imported memory runs inside a [`Pass`] taken with [`Gate::enter`]. An
//! invalidation calls [`Gate::close`] with its fence, which never blocks: new passes are refused
//! from that moment, and the fence is signalled by whoever drops the last pass still out — or at
//! once when none is. So when the fence is signalled, no DMA through the gate is under way and
//! none can start: exactly what [`crate::revoke::Importer::invalidate`] promises. A dynamic
//! importer that has mapped the moved memory again calls [`Gate::reopen`].

use crate::fence::Fence;
use crate::sync::{Mutex, lock};

#[derive(Debug, Default)]
struct State {
    closed: bool,
    inflight: u64,
    /// Fences to signal when the last pass is dropped.
    waiting: Vec<Fence>,
}

/// Admits DMA until closed; signals the closing fence once the DMA under way has finished.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<State>,
}

/// One DMA's permission to touch the memory; dropping it ends the DMA.
#[derive(Debug)]
#[must_use = "the DMA is only covered while the pass is held"]
pub struct Pass<'a> {
    gate: &'a Gate,
}

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }

    /// A pass for one DMA, or `None` once the gate is closed.
    pub fn enter(&self) -> Option<Pass<'_>> {
        let mut s = lock(&self.state);
        if s.closed {
            return None;
        }
        s.inflight += 1;
        Some(Pass { gate: self })
    }

    /// Refuse new passes; signal `fence` once no pass is out (now, if none is). Never blocks.
    pub fn close(&self, fence: Fence) {
        let mut s = lock(&self.state);
        s.closed = true;
        if s.inflight == 0 {
            drop(s);
            fence.signal();
        } else {
            s.waiting.push(fence);
        }
    }

    /// Admit passes again (a dynamic importer after mapping the moved memory).
    pub fn reopen(&self) {
        lock(&self.state).closed = false;
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// Passes out now.
    pub fn inflight(&self) -> u64 {
        lock(&self.state).inflight
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut s = lock(&self.gate.state);
        s.inflight -= 1;
        if s.inflight == 0 && !s.waiting.is_empty() {
            let fences = std::mem::take(&mut s.waiting);
            drop(s);
            for f in fences {
                f.signal();
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn fence() -> Fence {
        Fence::new(Instant::now() + Duration::from_secs(1))
    }

    #[test]
    fn close_with_nothing_in_flight_signals_at_once() {
        let g = Gate::new();
        let f = fence();
        g.close(f.clone());
        assert!(f.is_signalled());
        assert!(g.enter().is_none());
    }

    #[test]
    fn last_pass_signals_and_reopen_admits_again() {
        let g = Gate::new();
        let (p1, p2) = (g.enter(), g.enter());
        assert!(p1.is_some() && p2.is_some());
        let f = fence();
        g.close(f.clone());
        assert!(g.enter().is_none(), "closed gates refuse new passes");
        drop(p1);
        assert!(!f.is_signalled(), "one DMA is still under way");
        drop(p2);
        assert!(f.is_signalled());
        assert_eq!(g.inflight(), 0);
        g.reopen();
        assert!(g.enter().is_some());
    }
}
