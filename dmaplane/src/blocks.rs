//! Prepared block lists: a region split into blocks once — a KV-cache pool into its pages, a
//! weight shard into its tensors — so transfers name blocks by index
//! ([`crate::Agent::read_blocks`], [`crate::Agent::prepare_read`]) instead of building
//! descriptors per batch. [`LocalBlocks`] are of this agent's memory, [`RemoteBlocks`] of one
//! peer's (and usable only with that peer).

use crate::desc::{Desc, RemoteDesc};
use crate::error::{Error, Result};

/// Ranges `(offset, len)` of `size` bytes each covering `len` bytes; refused, naming `what`,
/// unless `size` divides `len`.
pub(crate) fn split(len: u64, size: u64, what: impl Fn() -> String) -> Result<Vec<(u64, u64)>> {
    if size == 0 || !len.is_multiple_of(size) {
        return Err(Error::invalid(
            what(),
            "block size",
            size,
            format!("must divide its {len} bytes (for blocks of unequal sizes, list their ranges)"),
        ));
    }
    Ok((0..len / size).map(|i| (i * size, size)).collect())
}

/// The descriptors `indices` name in `list`, refused naming `side`, the index and the list's
/// length when one is out of range.
fn pick<D: Clone>(list: &[D], indices: &[usize], side: &str) -> Result<Vec<D>> {
    indices
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            list.get(i).cloned().ok_or_else(|| {
                Error::invalid(
                    format!("{side} blocks"),
                    "index",
                    format!("indices[{k}] = {i}"),
                    format!("the list has {} blocks", list.len()),
                )
            })
        })
        .collect()
}

/// Blocks of this agent's registrations, by index. Made by [`crate::Region::blocks`],
/// [`crate::Region::blocks_of`], or from descriptors ([`LocalBlocks::new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBlocks {
    descs: Vec<Desc>,
}

impl LocalBlocks {
    /// A list of the given descriptors, block `i` being `descs[i]`.
    pub fn new(descs: Vec<Desc>) -> LocalBlocks {
        LocalBlocks { descs }
    }

    /// How many blocks.
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    /// Every block, in index order.
    pub fn descs(&self) -> &[Desc] {
        &self.descs
    }

    /// The blocks `indices` name, in that order.
    pub fn pick(&self, indices: &[usize]) -> Result<Vec<Desc>> {
        pick(&self.descs, indices, "local")
    }
}

/// Blocks of one peer's registrations, by index. Made by [`crate::Peer::blocks`] or
/// [`crate::Peer::blocks_of`]; usable only in transfers to that peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteBlocks {
    descs: Vec<RemoteDesc>,
}

impl RemoteBlocks {
    /// Blocks from a peer's descriptors, in index order (each carries its peer: a transfer
    /// with a block of another peer is refused, naming both).
    pub fn new(descs: Vec<RemoteDesc>) -> RemoteBlocks {
        RemoteBlocks { descs }
    }

    /// How many blocks.
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    /// Every block, in index order.
    pub fn descs(&self) -> &[RemoteDesc] {
        &self.descs
    }

    /// The blocks `indices` name, in that order.
    pub fn pick(&self, indices: &[usize]) -> Result<Vec<RemoteDesc>> {
        pick(&self.descs, indices, "remote")
    }
}
