//! Simulated completion queue: a bounded ring with polling and blocking waits.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::backend::CqBackend;
use crate::error::Result;
use crate::wc::Completion;

use super::lock;

#[derive(Debug)]
pub(crate) struct SimCq {
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

impl SimCq {
    pub(crate) fn new(depth: u32) -> SimCq {
        SimCq {
            depth,
            ring: Mutex::new(VecDeque::with_capacity(depth as usize)),
            cv: Condvar::new(),
            waiters: AtomicU32::new(0),
            len: AtomicUsize::new(0),
            overrun: AtomicBool::new(false),
        }
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

impl CqBackend for SimCq {
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
