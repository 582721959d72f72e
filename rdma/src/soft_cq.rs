//! The completion queue of a software NIC (the simulator, the TCP backend): a bounded ring
//! with polling and blocking waits.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::backend::CqBackend;
use crate::error::Result;
use crate::wc::Completion;

use crate::sync::lock;

#[derive(Debug)]
pub(crate) struct SoftCq {
    pub(crate) depth: u32,
    ring: Mutex<VecDeque<Completion>>,
    cv: Condvar,
    waiters: AtomicU32,
    /// Completions in the ring, readable without the lock: an empty poll (the common case of a
    /// spinning consumer) never touches the lock the engine pushes under.
    len: AtomicUsize,
    /// Set once a completion was dropped because the ring was full (verbs: CQ overrun, fatal).
    overrun: AtomicBool,
}

impl SoftCq {
    pub(crate) fn new(depth: u32) -> SoftCq {
        SoftCq {
            depth,
            ring: Mutex::new(VecDeque::with_capacity(depth as usize)),
            cv: Condvar::new(),
            waiters: AtomicU32::new(0),
            len: AtomicUsize::new(0),
            overrun: AtomicBool::new(false),
        }
    }

    /// A CQ of `depth` entries, as a software NIC's `create_cq` makes it.
    pub(crate) fn create(depth: u32) -> Result<std::sync::Arc<dyn CqBackend>> {
        if depth == 0 || depth > 1 << 22 {
            return Err(crate::error::RdmaError::InvalidAttr {
                qpn: 0,
                attr: "cq depth",
                value: depth.to_string(),
                why: "must be 1..=4194304",
            });
        }
        Ok(std::sync::Arc::new(SoftCq::new(depth)))
    }

    /// Push completions in order. Overrun is recorded, never silent.
    pub(crate) fn push(&self, wcs: &[Completion]) {
        if wcs.is_empty() {
            return;
        }
        {
            let mut ring = lock(&self.ring);
            for wc in wcs {
                if ring.len() >= self.depth as usize {
                    self.overrun.store(true, Ordering::Relaxed);
                    tracing::error!(depth = self.depth, "CQ overrun: completion dropped");
                } else {
                    ring.push_back(*wc);
                }
            }
            self.len.store(ring.len(), Ordering::Release);
        }
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.cv.notify_all();
        }
    }
}

impl CqBackend for SoftCq {
    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize> {
        if self.len.load(Ordering::Acquire) == 0 {
            return Ok(0);
        }
        let mut ring = lock(&self.ring);
        let n = ring.len().min(max);
        out.extend(ring.drain(..n));
        self.len.store(ring.len(), Ordering::Release);
        Ok(n)
    }

    fn wait(&self, timeout: Duration) -> Result<bool> {
        let due = Instant::now() + timeout;
        let mut ring = lock(&self.ring);
        self.waiters.fetch_add(1, Ordering::SeqCst);
        while ring.is_empty() {
            let now = Instant::now();
            if now >= due {
                break;
            }
            ring = crate::sync::wait_timeout(&self.cv, ring, due - now).0;
        }
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        Ok(!ring.is_empty())
    }
}

/// A software NIC's queue pair needs its own kind of CQ: `cq` as a [`SoftCq`], or an error
/// naming `what` (`send_cq`, `recv_cq`) for a CQ of another backend.
pub(crate) fn as_soft(
    cq: &std::sync::Arc<dyn CqBackend>,
    what: &'static str,
) -> Result<std::sync::Arc<SoftCq>> {
    let any: std::sync::Arc<dyn std::any::Any + Send + Sync> = cq.clone();
    any.downcast::<SoftCq>()
        .map_err(|_| crate::error::RdmaError::InvalidAttr {
            qpn: 0,
            attr: what,
            value: "a CQ of another backend".into(),
            why: "a software NIC's queue pair needs that NIC's kind of CQ",
        })
}
