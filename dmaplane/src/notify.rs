//! Notifications: a few bytes a peer attaches to a WRITE, delivered after every byte of it has
//! landed (the sender sends it once every request of the transfer completed successfully, so
//! the data is in the receiver's memory before the notification can arrive).

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
