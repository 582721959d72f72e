//! Descriptors: what a transfer moves, as `(region, offset, len)` triples on each side — a
//! [`Desc`] of this agent's memory or files, a [`RemoteDesc`] of a peer's memory. Two types, so
//! the sides cannot be swapped.

/// `len` bytes at `offset` into registration `region` of **this agent** (a [`crate::Region`]
/// or a [`crate::FileRegion`]): the local side of a transfer. The peer's side is a
/// [`RemoteDesc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Desc {
    /// The registration id ([`crate::Region::id`]).
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

/// Which connection to which peer a [`RemoteDesc`] belongs to: the peer's name, and a number
/// unique to the connection within this process (a reconnection to the same agent is another
/// connection: its leases, and so its descriptors, are new).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PeerTag {
    pub(crate) name: std::sync::Arc<str>,
    pub(crate) connection: u64,
}

impl PeerTag {
    /// A tag for a new connection to `name`.
    pub(crate) fn new(name: &str) -> PeerTag {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        PeerTag {
            name: name.into(),
            connection: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// `len` bytes at `offset` into registration `region` of a **peer** — the remote side of a
/// transfer. Made only by the peer it belongs to ([`crate::Peer::desc`],
/// [`crate::Peer::blocks`]), so it cannot be confused with a local [`Desc`]: passing one where
/// the other is expected does not compile, and a descriptor of one peer used in a transfer to
/// another is refused, naming both.
///
/// ```compile_fail
/// # use dmaplane::{Agent, Testbed};
/// # fn main() -> dmaplane::Result<()> {
/// # let tb = Testbed::builtin()?;
/// # let a = Agent::builder("a").testbed(tb.clone()).nics(["nic0"]).build()?;
/// # let b = Agent::builder("b").testbed(tb).nics(["nic1"]).build()?;
/// let mine = a.register(&a.alloc_host("mine", 4096)?)?;
/// let peer = a.connect(&b.metadata_blob()?)?;
/// // A local region's descriptor where the peer's belongs: a type error, not a READ of
/// // whatever the peer registered under the same number.
/// a.read(&peer, &[mine.all()], &[mine.all()], None)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteDesc {
    pub(crate) peer: PeerTag,
    pub(crate) region: u32,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

impl RemoteDesc {
    /// The peer agent it is a descriptor of.
    pub fn peer(&self) -> &str {
        &self.peer.name
    }

    /// The peer's registration id ([`crate::RegionInfo::id`]).
    pub fn region(&self) -> u32 {
        self.region
    }

    /// Byte offset from the start of the peer's registration.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes described.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it describes no bytes (never true: [`crate::Peer::desc`] refuses empty ranges).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
