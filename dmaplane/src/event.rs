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
    /// A registration of a peer is gone — the peer freed or revoked its memory, or
    /// deregistered it: descriptors of it are refused from now on, and a transfer that was
    /// using it ends with [`crate::Error::Revoked`] on the remote side.
    PeerRegionGone {
        /// The peer agent's name.
        peer: String,
        /// The peer's registration id ([`crate::RegionInfo::id`]).
        region: u32,
        /// The name of the memory it registered.
        name: String,
        /// The export epoch its revoke invalidated.
        epoch: u64,
        /// What the peer did.
        why: GoneWhy,
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

/// What became of a registration that is gone ([`Event::PeerRegionGone`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GoneWhy {
    /// Its memory was freed ([`crate::Memory::free`], [`crate::Memory::reclaim`]).
    Freed,
    /// It was deregistered ([`crate::Agent::deregister`]).
    Deregistered,
}

impl std::fmt::Display for GoneWhy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GoneWhy::Freed => "freed its memory",
            GoneWhy::Deregistered => "deregistered it",
        })
    }
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

    /// Take the oldest that `pred` accepts (the rest keep their order).
    pub(crate) fn take_first(&self, pred: impl Fn(&T) -> bool) -> Option<T> {
        let mut g = lock(&self.q);
        let i = g.0.iter().position(pred)?;
        g.0.remove(i)
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
