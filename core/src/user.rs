//! A caller's buffer exported by its address in this process (`ProcessVa`): what `ibv_reg_mr`
//! registers when there is no dma-buf. The exporter owns the buffer from [`UserBuffer::new`] on,
//! so it cannot be freed, moved or reallocated while a NIC may reach it.
//!
//! The contract, in the order things happen:
//!
//! - **Attach.** Each importer gets one `ProcessVa` range `[va, len)`; it registers it (pins the
//!   pages) and may DMA until it is invalidated.
//! - **Revoke.** [`UserBuffer::revoke`] invalidates every importer and waits, up to the
//!   deadline, for each to quiesce and drop its registration (for verbs, `ibv_dereg_mr`: after it
//!   returns the NIC no longer reaches the pages). An importer that misses the deadline may still
//!   reach them; the buffer is then **leaked**, never freed: the kernel's pin keeps the pages,
//!   and a NIC writing into memory the allocator handed to someone else would corrupt it.
//! - **Give back.** [`UserBuffer::into_vec`] revokes (if the caller did not), then returns the
//!   same allocation with what DMA wrote into it — only after every importer acknowledged.
//!   Dropping the exporter does the same and frees the buffer.
//!
//! There is no fabric here to refuse a late DMA: the guarantee rests on the importers' acks,
//! which is why an unacknowledged revoke leaks instead of freeing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::addr::{AddrList, AddrSpace, DmaRange};
use crate::fabric::{Mapping, MappingError};
use crate::hints::Hints;
use crate::negotiate::{Accept, Offer};
use crate::revoke::{AttachError, Attachment, Export, Exporter, Importer, RevokeReport};

/// Why a caller's buffer was not handed back.
#[derive(Debug, thiserror::Error)]
pub enum UserBufferError {
    #[error(
        "{name}: importers did not acknowledge the revoke ({report}); the buffer is leaked, not \
         freed, since a NIC may still write into it"
    )]
    Unacked { name: String, report: RevokeReport },
}

/// A caller's `Vec<u8>` as an exporter of its process virtual addresses. See the module docs for
/// the contract.
#[derive(Debug)]
pub struct UserBuffer {
    export: Export,
    /// `None` once handed back or leaked.
    mem: Option<Mapping>,
    len: u64,
    /// A revoke missed its deadline: the buffer may never be freed.
    unacked: AtomicBool,
}

impl UserBuffer {
    /// Take `buf` (zero-copy: its allocation is what importers register). An empty buffer is
    /// refused.
    pub fn new(name: &str, buf: Vec<u8>) -> Result<UserBuffer, MappingError> {
        let mem = Mapping::from_vec(buf)?;
        Ok(UserBuffer {
            export: Export::new(name),
            len: mem.len() as u64,
            mem: Some(mem),
            unacked: AtomicBool::new(false),
        })
    }

    /// Another owner's memory as such an exporter, zero-copy, for as long as this lives
    /// ([`crate::fabric::Lent`]). An empty one is refused.
    pub fn lent(
        name: &str,
        lent: Box<dyn crate::fabric::Lent>,
    ) -> Result<UserBuffer, MappingError> {
        let mem = Mapping::lent(lent)?;
        Ok(UserBuffer {
            export: Export::new(name),
            len: mem.len() as u64,
            mem: Some(mem),
            unacked: AtomicBool::new(false),
        })
    }

    /// `len` bytes of page-aligned anonymous memory as such an exporter: for bounce buffers
    /// that `O_DIRECT` and `cuMemHostRegister` need aligned (a `Vec`'s allocation is not).
    /// [`UserBuffer::into_vec`] refuses it.
    pub fn anonymous(name: &str, len: u64) -> Result<UserBuffer, MappingError> {
        let mem = Mapping::anonymous(len)?;
        Ok(UserBuffer {
            export: Export::new(name),
            len: mem.len() as u64,
            mem: Some(mem),
            unacked: AtomicBool::new(false),
        })
    }

    /// `len` bytes of memfd-backed shared memory as such an exporter: host memory an agent
    /// allocates where NICs register by address (the TCP backend), and whose pages can be handed
    /// to another process by its fd. [`UserBuffer::into_vec`] refuses it.
    pub fn memfd(name: &str, len: u64) -> Result<UserBuffer, MappingError> {
        let mem = Mapping::memfd(name, len)?;
        Ok(UserBuffer {
            export: Export::new(name),
            len: mem.len() as u64,
            mem: Some(mem),
            unacked: AtomicBool::new(false),
        })
    }

    /// Whether it is a caller's buffer ([`UserBuffer::new`]), which
    /// [`UserBuffer::into_vec`] hands back.
    pub fn is_adopted(&self) -> bool {
        self.mem().is_some_and(Mapping::is_heap)
    }

    /// The export's name (in revoke reports and errors).
    pub fn name(&self) -> &str {
        self.export.name()
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: empty buffers are refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn mem(&self) -> Option<&Mapping> {
        self.mem.as_ref()
    }

    /// The identity of its memfd ([`UserBuffer::memfd`] only): how another process's memory
    /// map names a view of it.
    pub fn file_id(&self) -> Option<crate::fabric::FileId> {
        self.mem()?.file_id()
    }

    /// The buffer's address in this process: what the `ProcessVa` offer lists.
    pub fn process_va(&self) -> u64 {
        self.mem().map_or(0, Mapping::process_va)
    }

    /// Copy `data` in at `offset`; false when out of bounds.
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        self.mem().is_some_and(|m| m.write(offset, data))
    }

    /// Copy out at `offset`; false when out of bounds.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.mem().is_some_and(|m| m.read(offset, buf))
    }

    /// Its one offer: the process VA range, host memory.
    pub fn offers(&self) -> Vec<Offer> {
        vec![Offer {
            space: AddrSpace::ProcessVa,
            hints: Hints::HOST_MEMORY,
        }]
    }

    /// Negotiate with `importer` and record the attachment (no access grant: the importer's
    /// registration is the access; revoke relies on it quiescing).
    pub fn attach(
        &self,
        importer: Arc<dyn Importer>,
        accepts: &[Accept],
    ) -> Result<Attachment, AttachError> {
        let va = self.process_va();
        self.export.attach(importer, &self.offers(), accepts, |n| {
            let list =
                AddrList::single(n.offer.space, n.offer.hints, 1, DmaRange::new(va, self.len))
                    .map_err(|e| AttachError::Exporter {
                        export: self.name().to_string(),
                        what: e.to_string(),
                    })?;
            Ok((list, None))
        })
    }

    /// Revoke every attachment, waiting for the importers up to `deadline`. A report that is
    /// not clean marks the buffer as never to be freed.
    pub fn revoke(&self, deadline: Duration) -> RevokeReport {
        let report = self.export.revoke(deadline);
        if !report.is_clean() {
            self.unacked.store(true, Ordering::SeqCst);
        }
        report
    }

    /// The current epoch (moves on every revoke).
    pub fn epoch(&self) -> u64 {
        self.export.epoch()
    }

    /// Number of live attachments.
    pub fn attachments(&self) -> usize {
        self.export.attachments()
    }

    /// The buffer back, with what DMA wrote into it: every importer revoked first (waiting up
    /// to `deadline`, when the caller did not revoke). Refused — and the buffer leaked — when an
    /// importer did not acknowledge.
    pub fn into_vec(mut self, deadline: Duration) -> Result<Vec<u8>, UserBufferError> {
        let report = self.revoke(deadline);
        if self.unacked.load(Ordering::SeqCst) {
            self.leak();
            return Err(UserBufferError::Unacked {
                name: self.name().to_string(),
                report,
            });
        }
        let mem = self.mem.take();
        Ok(mem.and_then(|m| m.into_vec().ok()).unwrap_or_default())
    }

    fn leak(&mut self) {
        if let Some(m) = self.mem.take() {
            tracing::error!(
                buffer = %self.export.name(),
                bytes = self.len,
                "importers missed the revoke deadline: the buffer is leaked, not freed"
            );
            std::mem::forget(m);
        }
    }
}

impl Exporter for UserBuffer {
    fn name(&self) -> &str {
        self.export.name()
    }

    fn revoke(&self, deadline: Duration) -> RevokeReport {
        UserBuffer::revoke(self, deadline)
    }
}

impl Drop for UserBuffer {
    /// Revoke before freeing; leak when an importer did not acknowledge.
    fn drop(&mut self) {
        if self.mem.is_none() {
            return;
        }
        if !self.export.is_revoked() && self.export.attachments() > 0 {
            let report = self.revoke(crate::revoke::DROP_REVOKE_DEADLINE);
            tracing::info!(%report, "caller's buffer dropped: revoked first");
        }
        if self.unacked.load(Ordering::SeqCst) {
            self.leak();
        }
    }
}
