//! # dmaplane-storage — files into and out of registered memory on io_uring
//!
//! The storage importer: [`DirectFile`] (an `O_DIRECT` file and the alignment its
//! file system needs, refused with the field named before the kernel would say EINVAL) and
//! [`Ring`] (one io_uring per worker thread with registered buffers and files, `READ_FIXED` /
//! `WRITE_FIXED` in batches, and reaping that never loses a completion). Each module's
//! contract is at its top.
//!
//! ```
//! use std::sync::Arc;
//! use dmaplane_storage::{BufId, DirectFile, FileId, OpenOptions, Ring};
//! # fn main() -> Result<(), dmaplane_storage::StorageError> {
//! # if let Err(e) = Ring::builder().depth(2).build() {
//! #     if e.is_unavailable() { return Ok(()); } // io_uring forbidden here (a container)
//! # }
//! let path = std::env::temp_dir().join(format!("dmaplane-doc-{}", std::process::id()));
//! let opts = OpenOptions { write: true, create: true, buffered_fallback: true };
//! let file = Arc::new(DirectFile::open(&path, opts)?);
//! file.set_len(1 << 20)?;
//! let mut ring = Ring::builder().depth(8).buffer(1 << 20).file(file).build()?;
//! ring.buffer_write(BufId(0), 0, &[7u8; 4096])?;
//! ring.write((FileId(0), 0), (BufId(0), 0), 4096, 1)?;
//! let mut done = Vec::new();
//! while done.is_empty() {
//!     ring.reap(&mut done, 1)?;
//! }
//! assert_eq!(done[0].bytes().unwrap(), 4096);
//! # std::fs::remove_file(&path).ok();
//! # Ok(()) }
//! ```
//!
//! Exported memory is registered with [`Ring::import`] (a `ProcessVa` range negotiated with
//! the exporter, in a free slot of the buffer table) and quiesced on revoke by the ring's
//! owner — refused, cancelled, reaped, unregistered, then the fence; the contract is at the top
//! of `import.rs`.
//!
//! On the simulated testbed [`sim::SimNvme`] is a drive on the fabric (the topology's `nvme0`)
//! with a file as its media: it negotiates bus addresses like a NIC, so it DMAs straight into a
//! GPU's BAR1 only where the route allows, and the fabric's oracle judges its revokes.
//!
//! The Agent (`dmaplane`) drives it: file regions registered like memory, moved to and from
//! memory through the drive, bounced through host memory where a GPU refuses the drive.

pub mod error;
pub mod file;
mod import;
pub mod ring;
pub mod sim;

pub use error::{Result, StorageError};
pub use file::{DioAlign, DirectFile, OpenOptions};
pub use ring::{BufId, Completion, FileId, Request, Ring, RingBuilder};
