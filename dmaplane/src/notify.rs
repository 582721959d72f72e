//! Notifications: a few bytes a peer attaches to a WRITE, delivered after every byte of it has
//! landed (the sender sends it once every request of the transfer completed successfully, so
//! the data is in the receiver's memory before the notification can arrive).

use std::collections::HashMap;
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
    /// Queued notifications per sender.
    per_peer: Mutex<HashMap<String, usize>>,
    /// Notifications of one sender kept until read ([`crate::Limits::notifications`]): more
    /// from it are refused (and counted), so one peer that floods cannot push the others'
    /// out of the queue.
    limit: usize,
    lock: Mutex<()>,
    arrived: Condvar,
}

impl Inbox {
    /// An empty inbox keeping at most `per_peer` notifications of each sender.
    pub(crate) fn new(per_peer: usize) -> Inbox {
        Inbox {
            queue: Bounded::new(NOTIFY_QUEUE),
            per_peer: Mutex::new(HashMap::new()),
            limit: per_peer,
            lock: Mutex::new(()),
            arrived: Condvar::new(),
        }
    }

    /// Queue `n` (the oldest goes when full) and wake a waiting reader, unless its sender has
    /// as many queued as it may already (then `false`).
    pub(crate) fn push(&self, n: Notification) -> bool {
        {
            let mut per = lock(&self.per_peer);
            let queued = per.entry(n.from.clone()).or_default();
            if *queued >= self.limit {
                return false;
            }
            *queued += 1;
        }
        if let Some(old) = self.queue.push_evicting(n) {
            self.taken(std::slice::from_ref(&old));
        }
        let _g = lock(&self.lock);
        self.arrived.notify_all();
        true
    }

    /// Everything queued, and how many were dropped since the last drain.
    pub(crate) fn drain(&self) -> (Vec<Notification>, u64) {
        let (v, dropped) = self.queue.drain();
        self.taken(&v);
        (v, dropped)
    }

    /// These left the queue: their senders may queue as many more.
    fn taken(&self, gone: &[Notification]) {
        let mut per = lock(&self.per_peer);
        for n in gone {
            if let Some(q) = per.get_mut(&n.from) {
                *q = q.saturating_sub(1);
                if *q == 0 {
                    per.remove(&n.from);
                }
            }
        }
    }

    /// The next notification, waiting up to `timeout` for one.
    pub(crate) fn next(&self, timeout: Duration) -> Option<Notification> {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.lock);
        loop {
            if let Some(n) = self.queue.pop() {
                self.taken(std::slice::from_ref(&n));
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
