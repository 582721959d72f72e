//! The copy engine as an importer: every copy to or from peer memory runs under the import's
//! [`Gate`], so an invalidation refuses new copies at once and its fence is signalled when the
//! copy under way ends (the contract is written in [`dmaplane_core::gate`]).

use std::sync::atomic::{AtomicU64, Ordering};

use dmaplane_core::{Gate, Importer, ImporterKind, Invalidation};

#[derive(Debug)]
pub(crate) struct CopyImporter {
    pub(crate) name: String,
    pub(crate) kind: ImporterKind,
    pub(crate) gate: Gate,
    /// Invalidations seen.
    pub(crate) invalidations: AtomicU64,
}

impl CopyImporter {
    pub(crate) fn new(name: String, kind: ImporterKind) -> CopyImporter {
        CopyImporter {
            name,
            kind,
            gate: Gate::new(),
            invalidations: AtomicU64::new(0),
        }
    }
}

impl Importer for CopyImporter {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> ImporterKind {
        self.kind
    }

    fn invalidate(&self, inv: Invalidation) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(importer = %self.name, export = %inv.export, epoch = inv.epoch, "copy engine invalidated");
        self.gate.close(inv.fence);
    }
}
