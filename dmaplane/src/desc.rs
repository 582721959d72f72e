//! Descriptors: what a transfer moves, as `(region, offset, len)` triples on each side.

/// `len` bytes at `offset` into registration `region` (a [`crate::Region`] of this agent, or one
/// the peer's [`crate::Metadata`] lists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Desc {
    pub region: u32,
    pub offset: u64,
    pub len: u64,
}

impl Desc {
    pub fn new(region: u32, offset: u64, len: u64) -> Desc {
        Desc {
            region,
            offset,
            len,
        }
    }
}
