//! Fences: one-shot completions with a deadline.
//!
//! The exporter hands one to each importer with every invalidation. The importer signals it when
//! no DMA to the invalidated memory can still happen — at once if it can stop everything in the
//! callback, later (from a completion thread) if work is in flight. The exporter waits for it only
//! up to the deadline; an importer that has not signalled by then is cut off by force.

use std::fmt;
use std::time::Instant;

use std::sync::Arc;

use crate::sync::{Condvar, Mutex, lock, wait_timeout};

/// Told the moment a fence is signalled, before the exporter can see the signal: how an observer
/// independent of the protocol (the fabric's oracle) puts the promise in its order of events.
pub trait FenceObserver: Send + Sync + fmt::Debug {
    fn signalled(&self, importer: &str);
}

#[derive(Debug, Clone)]
pub struct Fence {
    inner: Arc<FenceInner>,
}

#[derive(Debug)]
struct FenceInner {
    signalled: Mutex<bool>,
    cv: Condvar,
    deadline: Instant,
    observer: Option<(Arc<dyn FenceObserver>, Arc<str>)>,
}

impl Fence {
    pub fn new(deadline: Instant) -> Fence {
        Fence::observed(deadline, None)
    }

    /// A fence whose signal `observer` hears first, with the name of the importer it is for.
    pub fn observed(
        deadline: Instant,
        observer: Option<(Arc<dyn FenceObserver>, Arc<str>)>,
    ) -> Fence {
        Fence {
            inner: Arc::new(FenceInner {
                signalled: Mutex::new(false),
                cv: Condvar::new(),
                deadline,
                observer,
            }),
        }
    }

    /// When the exporter stops waiting.
    pub fn deadline(&self) -> Instant {
        self.inner.deadline
    }

    /// Promise that no DMA to the invalidated memory can happen any more. Idempotent.
    pub fn signal(&self) {
        let mut s = lock(&self.inner.signalled);
        if !*s {
            if let Some((o, importer)) = &self.inner.observer {
                o.signalled(importer);
            }
            *s = true;
            self.inner.cv.notify_all();
        }
    }

    pub fn is_signalled(&self) -> bool {
        *lock(&self.inner.signalled)
    }

    /// Wait until signalled or the deadline passes; true when signalled.
    #[cfg(not(loom))]
    pub fn wait(&self) -> bool {
        let mut s = lock(&self.inner.signalled);
        while !*s {
            let now = Instant::now();
            if now >= self.inner.deadline {
                return false;
            }
            s = wait_timeout(&self.inner.cv, s, self.inner.deadline - now).0;
        }
        true
    }

    /// Under loom time does not pass: the deadline may expire at any point, so one look decides,
    /// and the model explores both the orders where the importer signalled in time and where not.
    #[cfg(loom)]
    pub fn wait(&self) -> bool {
        self.is_signalled()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn signalled_from_another_thread() {
        let f = Fence::new(Instant::now() + Duration::from_secs(5));
        let g = f.clone();
        let t = std::thread::spawn(move || g.signal());
        assert!(f.wait());
        t.join().ok();
    }

    #[test]
    fn times_out_at_the_deadline() {
        let start = Instant::now();
        let f = Fence::new(start + Duration::from_millis(20));
        assert!(!f.wait());
        assert!(start.elapsed() >= Duration::from_millis(20));
        f.signal();
        assert!(f.wait());
    }
}
