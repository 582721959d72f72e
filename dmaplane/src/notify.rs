//! Notifications: a tag and a few bytes one agent sends another — attached to a transfer, or
//! on their own ([`crate::Agent::notify`]) — and the receiver's inbox, read by sender and tag.
//!
//! # Ordering
//!
//! A notification attached to a transfer is sent on the control connection only once every
//! request of the transfer completed successfully (and, for a peer's staged memory, once the
//! peer landed or staged it), so:
//!
//! - on a **WRITE**, every byte is in the receiver's memory before the notification can arrive;
//! - on a **READ**, every byte was read out of the receiver's memory before it arrives — the
//!   receiver may reuse the blocks once it has the notification;
//! - a transfer that fails sends none;
//! - notifications from one agent to another arrive in the order they were sent (one
//!   connection), [`crate::Agent::notify`]'s included.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::event::Bounded;
use crate::sync::{lock, wait_timeout};

/// Notifications kept until read; a peer cannot grow the queue beyond this (the oldest go and
/// are reported as [`crate::Event::Dropped`]).
pub const NOTIFY_QUEUE: usize = 4096;

/// The largest notification payload accepted.
pub const MAX_NOTIFY: usize = 64 << 10;

/// The longest tag, in bytes.
pub const MAX_TAG: usize = 256;

/// What to send: a tag the receiver filters on (a request id, a kind) and bytes. Attached to a
/// transfer ([`crate::Agent::write`], [`crate::Agent::read`], [`crate::Prepared::post`]) or
/// sent on its own ([`crate::Agent::notify`]).
///
/// ```
/// use dmaplane::Notify;
/// let n = Notify::new("req-17", b"done".to_vec());
/// assert_eq!((n.tag(), n.bytes()), ("req-17", &b"done"[..]));
/// assert!(Notify::tag_only("req-18").bytes().is_empty());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    tag: String,
    bytes: Vec<u8>,
}

impl Notify {
    /// A notification tagged `tag` carrying `bytes` (checked when it is sent: at most
    /// [`MAX_TAG`] bytes of tag without control characters, [`MAX_NOTIFY`] bytes of payload).
    pub fn new(tag: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Notify {
        Notify {
            tag: tag.into(),
            bytes: bytes.into(),
        }
    }

    /// A notification with a tag and no bytes.
    pub fn tag_only(tag: impl Into<String>) -> Notify {
        Notify::new(tag, Vec::new())
    }

    /// Its tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Refused, naming `what` and the field, when the tag or the bytes are over their bounds.
    pub(crate) fn check(&self, what: impl Fn() -> String) -> Result<()> {
        check_tag(&self.tag).map_err(|why| {
            Error::invalid(what(), "notify.tag", format!("{:.40?}", self.tag), why)
        })?;
        if self.bytes.len() > MAX_NOTIFY {
            return Err(Error::invalid(
                what(),
                "notify.bytes",
                format!("{} bytes", self.bytes.len()),
                format!("at most {MAX_NOTIFY}"),
            ));
        }
        Ok(())
    }

    pub(crate) fn into_parts(self) -> (String, Vec<u8>) {
        (self.tag, self.bytes)
    }
}

/// Why a tag cannot be used, if it cannot.
pub(crate) fn check_tag(tag: &str) -> std::result::Result<(), String> {
    if tag.len() > MAX_TAG {
        return Err(format!("{} bytes, at most {MAX_TAG}", tag.len()));
    }
    if tag.chars().any(char::is_control) {
        return Err("control characters are not allowed".into());
    }
    Ok(())
}

/// One notification received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The sending agent's name ([`crate::Peer::name`]).
    pub from: String,
    /// The tag the sender chose ([`Notify::tag`]).
    pub tag: String,
    /// The bytes the sender attached (at most [`crate::Limits::notification_bytes`]).
    pub bytes: Vec<u8>,
    /// The sender's [`crate::Transfer::id`] when it came with a transfer; `None` for one sent
    /// on its own.
    pub transfer: Option<u64>,
}

/// Which notifications to take: by sender, by tag or tag prefix. [`NotifyFilter::any`] takes
/// every one.
///
/// ```
/// use dmaplane::{Notification, NotifyFilter};
/// let n = Notification { from: "decode".into(), tag: "done:17".into(), bytes: vec![], transfer: None };
/// assert!(NotifyFilter::any().from("decode").tag_prefix("done:").matches(&n));
/// assert!(!NotifyFilter::any().from("prefill").matches(&n));
/// assert!(!NotifyFilter::any().tag("done:1").matches(&n));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyFilter {
    from: Option<String>,
    tag: Option<String>,
    prefix: Option<String>,
}

impl NotifyFilter {
    /// Every notification.
    pub fn any() -> NotifyFilter {
        NotifyFilter::default()
    }

    /// Only those from the agent called `peer`.
    pub fn from(mut self, peer: impl Into<String>) -> NotifyFilter {
        self.from = Some(peer.into());
        self
    }

    /// Only those tagged exactly `tag`.
    pub fn tag(mut self, tag: impl Into<String>) -> NotifyFilter {
        self.tag = Some(tag.into());
        self
    }

    /// Only those whose tag starts with `prefix`.
    pub fn tag_prefix(mut self, prefix: impl Into<String>) -> NotifyFilter {
        self.prefix = Some(prefix.into());
        self
    }

    /// Whether `n` passes.
    pub fn matches(&self, n: &Notification) -> bool {
        self.from.as_ref().is_none_or(|f| *f == n.from)
            && self.tag.as_ref().is_none_or(|t| *t == n.tag)
            && self.prefix.as_ref().is_none_or(|p| n.tag.starts_with(p))
    }
}

/// Notifications received and not yet read: a bounded queue, and a wake-up for readers waiting
/// on it (threads and futures).
#[derive(Debug)]
pub(crate) struct Inbox {
    queue: Bounded<Notification>,
    /// Queued notifications per sender.
    per_peer: Mutex<HashMap<String, usize>>,
    /// Notifications of one sender kept until read ([`crate::Limits::notifications`]): more
    /// from it are refused (and counted), so one peer that floods cannot push the others'
    /// out of the queue.
    limit: usize,
    lock: Mutex<Vec<Waker>>,
    arrived: Condvar,
}

impl Inbox {
    /// An empty inbox keeping at most `per_peer` notifications of each sender.
    pub(crate) fn new(per_peer: usize) -> Inbox {
        Inbox {
            queue: Bounded::new(NOTIFY_QUEUE),
            per_peer: Mutex::new(HashMap::new()),
            limit: per_peer,
            lock: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
        }
    }

    /// Queue `n` (the oldest goes when full), run `accepted`, then wake waiting readers —
    /// unless its sender has as many queued as it may already (then `false`).
    pub(crate) fn push(&self, n: Notification, accepted: impl FnOnce()) -> bool {
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
        accepted();
        let wakers = std::mem::take(&mut *lock(&self.lock));
        self.arrived.notify_all();
        wakers.into_iter().for_each(Waker::wake);
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

    /// The oldest queued notification `filter` takes, if any (the others stay queued).
    fn take(&self, filter: &NotifyFilter) -> Option<Notification> {
        let n = self.queue.take_first(|n| filter.matches(n))?;
        self.taken(std::slice::from_ref(&n));
        Some(n)
    }

    /// The next notification `filter` takes, waiting up to `timeout` for one.
    pub(crate) fn next(&self, filter: &NotifyFilter, timeout: Duration) -> Option<Notification> {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.lock);
        loop {
            if let Some(n) = self.take(filter) {
                return Some(n);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            g = wait_timeout(&self.arrived, g, left.min(Duration::from_millis(50))).0;
        }
    }

    /// Take one for `filter`, or leave `waker` to be woken by the next arrival.
    fn poll_take(&self, filter: &NotifyFilter, waker: &Waker) -> Option<Notification> {
        let mut g = lock(&self.lock);
        if let Some(n) = self.take(filter) {
            return Some(n);
        }
        if !g.iter().any(|w| w.will_wake(waker)) {
            g.push(waker.clone());
        }
        None
    }
}

/// The next notification a filter takes, as a `Future` ([`crate::Agent::notification`]): its
/// own waker, no runtime needed. It waits as long as it is polled; bound it with the runtime's
/// timeout.
#[derive(Debug)]
pub struct NextNotification {
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) filter: NotifyFilter,
}

impl Future for NextNotification {
    type Output = Notification;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Notification> {
        match self.inbox.poll_take(&self.filter, cx.waker()) {
            Some(n) => Poll::Ready(n),
            None => Poll::Pending,
        }
    }
}
