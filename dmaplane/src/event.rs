//! What happened to an agent that the application did not ask about directly: memory freed
//! (revoked) under it, peers lost, notifications that found the queue full.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::sync::lock;

/// Events kept until read ([`crate::Agent::events`]); older ones give way and are counted.
pub const EVENT_QUEUE: usize = 4096;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "event")]
pub enum Event {
    /// A memory of this agent was freed: every importer quiesced first.
    Freed {
        /// The memory's name.
        memory: String,
        /// The export epoch the revoke invalidated.
        epoch: u64,
        /// How long the revoke took, in microseconds.
        elapsed_us: u64,
    },
    /// Lease holders (peers writing to a memory of this agent) did not acknowledge its revoke
    /// in time and were cut off: their access was withdrawn at the NIC without their ack — a
    /// peer that ignores revokes.
    LeaseCutOff {
        /// The memory whose revoke they missed.
        memory: String,
        /// How many holders were cut off.
        holders: u64,
    },
    /// A peer's control connection ended.
    PeerLost {
        /// The peer agent's name.
        peer: String,
        /// Why the connection ended.
        why: String,
    },
    /// Events or notifications that did not fit their queues.
    Dropped {
        /// Which queue overflowed: `events` or `notifications`.
        what: String,
        /// How many were dropped since the last read of that queue.
        count: u64,
    },
}

/// A bounded queue that counts what it had to drop.
#[derive(Debug)]
pub(crate) struct Bounded<T> {
    q: Mutex<(VecDeque<T>, u64)>,
    cap: usize,
}

impl<T> Bounded<T> {
    pub(crate) fn new(cap: usize) -> Bounded<T> {
        Bounded {
            q: Mutex::new((VecDeque::new(), 0)),
            cap,
        }
    }

    /// Append; when full the oldest goes. Returns whether one was dropped.
    pub(crate) fn push(&self, v: T) -> bool {
        let mut g = lock(&self.q);
        let dropped = g.0.len() >= self.cap;
        if dropped {
            g.0.pop_front();
            g.1 += 1;
        }
        g.0.push_back(v);
        dropped
    }

    /// Append; when full the oldest goes, and is returned.
    pub(crate) fn push_evicting(&self, v: T) -> Option<T> {
        let mut g = lock(&self.q);
        let old = if g.0.len() >= self.cap {
            g.1 += 1;
            g.0.pop_front()
        } else {
            None
        };
        g.0.push_back(v);
        old
    }

    /// Everything queued, and how many were dropped since the last drain.
    pub(crate) fn drain(&self) -> (Vec<T>, u64) {
        let mut g = lock(&self.q);
        let dropped = std::mem::take(&mut g.1);
        (g.0.drain(..).collect(), dropped)
    }

    pub(crate) fn pop(&self) -> Option<T> {
        lock(&self.q).0.pop_front()
    }
}

/// The agent's events, bounded: what [`crate::Agent::events`] drains.
#[derive(Debug)]
pub(crate) struct Events {
    agent: String,
    queue: Bounded<Event>,
}

impl Events {
    pub(crate) fn new(agent: &str) -> Events {
        Events {
            agent: agent.to_string(),
            queue: Bounded::new(EVENT_QUEUE),
        }
    }

    pub(crate) fn push(&self, e: Event) {
        tracing::debug!(agent = %self.agent, event = ?e, "event");
        self.queue.push(e);
    }

    /// Everything since the last drain, with a [`Event::Dropped`] last when the queue overflowed.
    pub(crate) fn drain(&self) -> Vec<Event> {
        let (mut v, dropped) = self.queue.drain();
        if dropped > 0 {
            v.push(Event::Dropped {
                what: "events".into(),
                count: dropped,
            });
        }
        v
    }
}
