//! A software NIC's asynchronous events (`ibv_get_async_event`): a bounded queue that counts
//! what did not fit and says so once read, as a NIC's event queue is bounded too.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::backend::AsyncEvent;
use crate::sync::lock;

/// How many events a NIC keeps until they are read.
pub(crate) const EVENT_QUEUE: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct EventQueue {
    events: Mutex<VecDeque<AsyncEvent>>,
    /// Events that found the queue full.
    dropped: AtomicU64,
}

impl EventQueue {
    pub(crate) fn push(&self, nic: &str, kind: &str, qpn: Option<u32>, detail: String) {
        tracing::debug!(nic, kind, ?qpn, %detail, "async event");
        let mut q = lock(&self.events);
        if q.len() >= EVENT_QUEUE {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back(AsyncEvent {
            kind: kind.into(),
            qpn,
            detail,
        });
    }

    /// The next event; once the queue is empty, one `EVENTS_DROPPED` for what did not fit.
    pub(crate) fn pop(&self) -> Option<AsyncEvent> {
        if let Some(e) = lock(&self.events).pop_front() {
            return Some(e);
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        (dropped > 0).then(|| AsyncEvent {
            kind: "EVENTS_DROPPED".into(),
            qpn: None,
            detail: format!("{dropped} asynchronous event(s) found the queue full ({EVENT_QUEUE})"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The queue is bounded: what does not fit is counted and reported once.
    #[test]
    fn the_event_queue_is_bounded_and_reports_what_it_dropped() {
        let q = EventQueue::default();
        for i in 0..EVENT_QUEUE + 4 {
            q.push("nic0", "QP_FATAL", Some(1), format!("event {i}"));
        }
        let got: Vec<AsyncEvent> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(got.len(), EVENT_QUEUE + 1);
        let last = got.last().unwrap();
        assert_eq!(last.kind, "EVENTS_DROPPED");
        assert!(last.detail.starts_with("4 asynchronous"), "{}", last.detail);
        assert!(q.pop().is_none());
    }
}
