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
    /// `len` bytes at `offset` into a handle of `view` bytes that starts at `start` within
    /// registration `region`; refused, naming `what`, when it runs past the handle or is empty.
    pub(crate) fn within(
        region: u32,
        (start, view): (u64, u64),
        (offset, len): (u64, u64),
        what: impl FnOnce() -> String,
    ) -> crate::Result<Desc> {
        match offset.checked_add(len) {
            Some(end) if end <= view && len > 0 => Ok(Desc {
                region,
                offset: start + offset,
                len,
            }),
            _ => Err(crate::Error::invalid(
                what(),
                "desc",
                format!("[{offset:#x}, +{len:#x})"),
                format!("outside its {view} bytes (or empty)"),
            )),
        }
    }

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
