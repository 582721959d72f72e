//! Notifications: a few bytes a peer attaches to a WRITE, delivered after every byte of it has
//! landed (the sender sends it once every request of the transfer completed successfully, so
//! the data is in the receiver's memory before the notification can arrive).

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::event::Bounded;
use crate::sync::{lock, wait_timeout};

/// Notifications kept until read; a peer cannot grow the queue beyond this (the oldest go and
/// are reported as [`crate::Event::Dropped`]).
pub const NOTIFY_QUEUE: usize = 4096;

/// The largest notification accepted.
pub const MAX_NOTIFY: usize = 64 << 10;

/// One notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The sending agent.
    pub from: String,
    /// The sender's transfer id.
    pub transfer: u64,
    /// The bytes the sender attached to its WRITE (at most [`MAX_NOTIFY`]).
    pub bytes: Vec<u8>,
}

/// Notifications received and not yet read: a bounded queue, and a wake-up for a reader
/// waiting on it.
#[derive(Debug)]
pub(crate) struct Inbox {
    queue: Bounded<Notification>,
    lock: Mutex<()>,
    arrived: Condvar,
}

impl Inbox {
    pub(crate) fn new() -> Inbox {
        Inbox {
            queue: Bounded::new(NOTIFY_QUEUE),
            lock: Mutex::new(()),
            arrived: Condvar::new(),
        }
    }

    /// Queue one (the oldest goes when full) and wake a waiting reader.
    pub(crate) fn push(&self, n: Notification) {
        self.queue.push(n);
        let _g = lock(&self.lock);
        self.arrived.notify_all();
    }

    /// Everything queued, and how many were dropped since the last drain.
    pub(crate) fn drain(&self) -> (Vec<Notification>, u64) {
        self.queue.drain()
    }

    /// The next notification, waiting up to `timeout` for one.
    pub(crate) fn next(&self, timeout: Duration) -> Option<Notification> {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.lock);
        loop {
            if let Some(n) = self.queue.pop() {
                return Some(n);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            g = wait_timeout(&self.arrived, g, left.min(Duration::from_millis(50))).0;
        }
    }
}
