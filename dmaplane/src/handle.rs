//! The handle onto a registration, memory ([`crate::Region`]) or file ([`crate::FileRegion`]):
//! bytes `[offset, offset + len)` of one registration, what descriptors name. Cheap to clone;
//! the registration stays in the agent's cache after the last handle goes.

use std::sync::Arc;

use crate::desc::Desc;
use crate::error::Result;

pub(crate) mod sealed {
    /// Only the agent's registrations are [`super::Registration`]s.
    pub trait Sealed {}
}

/// What a [`Handle`] can be onto: a memory registration ([`MemoryEntry`](crate::MemoryEntry))
/// or a file registration ([`FileEntry`](crate::FileEntry)). Sealed: the agent makes them.
pub trait Registration: sealed::Sealed {
    /// The handle's name in `Debug` output and messages.
    const KIND: &'static str;
    /// The registration's id: what descriptors name, one space for memory and files.
    fn id(&self) -> u32;
    /// What it registers, for messages and `Debug`: the memory's name, the file's path.
    fn subject(&self) -> String;
    /// Where in what it registers the registration starts (0 for memory, the file offset for
    /// files), for `Debug`.
    fn base(&self) -> u64;
}

/// A registered range: `len` bytes at `offset` into registration `R`.
pub struct Handle<R: Registration> {
    pub(crate) entry: Arc<R>,
    /// This handle's bytes within the registration.
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

impl<R: Registration> Clone for Handle<R> {
    fn clone(&self) -> Self {
        Handle {
            entry: self.entry.clone(),
            offset: self.offset,
            len: self.len,
        }
    }
}

impl<R: Registration> std::fmt::Debug for Handle<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(R::KIND)
            .field("id", &self.entry.id())
            .field("of", &self.entry.subject())
            .field("offset", &(self.entry.base() + self.offset))
            .field("len", &self.len)
            .finish()
    }
}

impl<R: Registration> Handle<R> {
    /// The registration's id: what the peer's descriptors name (see [`crate::Metadata`]).
    pub fn id(&self) -> u32 {
        self.entry.id()
    }

    /// Bytes this handle covers (the range asked for, not a page-rounded registration).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the handle covers no bytes (never true: registration refuses empty ranges).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A descriptor of `len` bytes at `offset` into this handle; refused, naming the handle,
    /// when it runs past the handle or is empty.
    pub fn desc(&self, offset: u64, len: u64) -> Result<Desc> {
        Desc::within(
            self.entry.id(),
            (self.offset, self.len),
            (offset, len),
            || format!("{} {} ({})", R::KIND, self.entry.id(), self.entry.subject()),
        )
    }

    /// The handle split into blocks of `size` bytes, once — block `i` at `i * size` — for
    /// transfers by index ([`crate::Agent::read_blocks`], [`crate::Agent::prepare_read`]).
    /// Refused unless `size` divides the handle's length.
    ///
    /// ```
    /// use dmaplane::{Agent, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let agent = Agent::builder("a").testbed(Testbed::builtin()?).nics(["nic0"]).build()?;
    /// let pool = agent.register(&agent.alloc_gpu("kv", "gpu0", 64 * 4096)?)?;
    /// let blocks = pool.blocks(4096)?;
    /// assert_eq!(blocks.len(), 64);
    /// assert_eq!(blocks.pick(&[3])?[0], pool.desc(3 * 4096, 4096)?);
    /// assert!(blocks.pick(&[64]).unwrap_err().to_string().contains("indices[0] = 64"));
    /// assert!(pool.blocks(5000).is_err());
    /// # Ok(()) }
    /// ```
    pub fn blocks(&self, size: u64) -> Result<crate::LocalBlocks> {
        let ranges = crate::blocks::split(self.len, size, || {
            format!("{} {} ({})", R::KIND, self.entry.id(), self.entry.subject())
        })?;
        self.blocks_of(&ranges)
    }

    /// The handle split into the given `(offset, len)` ranges, block `i` being `ranges[i]`;
    /// each is checked as [`Handle::desc`] checks it.
    pub fn blocks_of(&self, ranges: &[(u64, u64)]) -> Result<crate::LocalBlocks> {
        let descs = ranges
            .iter()
            .map(|&(o, l)| self.desc(o, l))
            .collect::<Result<Vec<Desc>>>()?;
        Ok(crate::LocalBlocks::new(descs))
    }

    /// The whole handle as one descriptor.
    pub fn all(&self) -> Desc {
        Desc {
            region: self.entry.id(),
            offset: self.offset,
            len: self.len,
        }
    }
}

/// A registration in `Debug` output: its kind, id and what it registers.
pub(crate) fn debug_entry<R: Registration>(
    r: &R,
    f: &mut std::fmt::Formatter<'_>,
) -> std::fmt::Result {
    write!(f, "{} {} ({})", R::KIND, r.id(), r.subject())
}
