//! dmaplane-core: the vocabulary of the address-based DMA attachment, the revoke protocol, the
//! PCIe topology model, the scatterlist model it is measured against, and the simulated fabric.
//!
//! - [`addr`]: [`AddrList`], [`DmaRange`], [`AddrSpace`] — validated lists of DMA ranges.
//! - [`hints`]: [`Hints`] — how the ranges may be accessed.
//! - [`negotiate`](mod@negotiate): offers, accepts and [`negotiate()`](negotiate::negotiate).
//! - [`revoke`]: attachments, epochs, and the revoke protocol; [`fence`]: fences with deadlines.
//! - [`topology`]: host bridges, root ports, switches, devices; P2P route classification.
//! - [`sgl`]: the scatterlist model; [`pgsz`]: MR page-size selection.
//! - [`fabric`]: the simulated PCIe fabric with host-memory and BAR exporters.

pub mod addr;
pub mod counter;
pub mod cpu;
pub mod dmabuf;
pub mod fabric;
pub mod fence;
pub mod gate;
pub mod hints;
pub mod invalid;
pub mod negotiate;
pub mod pattern;
pub mod pgsz;
pub mod revoke;
pub mod sgl;
pub mod sync;
pub mod topology;
pub mod user;

pub use addr::{AddrList, AddrListError, AddrSpace, DmaBufId, DmaRange, SpaceKind};
pub use fence::{Fence, FenceObserver};
pub use gate::{Gate, Pass};
pub use hints::{Access, Caching, Confidentiality, Hints, MemKind, Route, Snoop};
pub use invalid::Invalid;
pub use negotiate::{Accept, Negotiated, Offer, negotiate};
pub use pgsz::{PageSize, best_page_size};
pub use revoke::{
    AttachError, Attachment, Export, Exporter, Importer, ImporterKind, Invalidation, RevokeReport,
};
