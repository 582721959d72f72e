//! Descriptors: what a transfer moves, as `(region, offset, len)` triples on each side.

/// `len` bytes at `offset` into registration `region` (a [`crate::Region`] of this agent, or one
/// the peer's [`crate::Metadata`] lists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Desc {
    /// The registration id ([`crate::Region::id`], or [`crate::RegionInfo::id`] for the peer's).
    pub region: u32,
    /// Byte offset from the start of the registration.
    pub offset: u64,
    /// Bytes described.
    pub len: u64,
}

impl Desc {
    /// `len` bytes at `offset` into registration `region`, unchecked (see
    /// [`crate::Region::desc`] and [`crate::Peer::desc`] for checked ones).
    pub fn new(region: u32, offset: u64, len: u64) -> Desc {
        Desc {
            region,
            offset,
            len,
        }
    }
}
