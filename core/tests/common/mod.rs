//! Test importers shared by the revoke tests and the loom models.
#![allow(dead_code, clippy::unwrap_used)]

#[cfg(loom)]
use loom::sync::Mutex;
#[cfg(not(loom))]
use std::sync::Mutex;

use std::sync::Arc;

use dmaplane_core::fabric::{DeviceId, Fabric, HostMemory};
use dmaplane_core::fence::Fence;
use dmaplane_core::revoke::{Importer, ImporterKind, Invalidation};
use dmaplane_core::{Accept, Access, Attachment, SpaceKind};

/// `mem0`'s host memory of `size` bytes on a fresh fabric, attached by `importer` doing DMA as
/// `nic0` (CPU-physical, read/write).
pub struct Rig<I = TestImporter> {
    pub fabric: Fabric,
    pub nic: DeviceId,
    pub mem: HostMemory,
    pub importer: Arc<I>,
    pub att: Attachment,
    /// The bus address the importer DMAs to.
    pub base: u64,
}

impl<I: Importer + 'static> Rig<I> {
    pub fn new(importer: I, size: u64) -> Rig<I> {
        let fabric = Fabric::new();
        let host = fabric.add_device("mem0");
        let nic = fabric.add_device("nic0");
        let mem = HostMemory::new(&fabric, host, "buf", size).unwrap();
        let importer = Arc::new(importer);
        let att = mem
            .attach(
                importer.clone(),
                nic,
                &[Accept::new(SpaceKind::CpuPhys, Access::READ_WRITE)],
            )
            .unwrap();
        let base = att.map().unwrap().list.ranges()[0].addr;
        Rig {
            fabric,
            nic,
            mem,
            importer,
            att,
            base,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    invalidated: bool,
    idle: bool,
    fence: Option<Fence>,
    invalidations: u32,
}

/// An importer whose DMA loop runs elsewhere. Honest: it stops before its next DMA and signals
/// once idle. Lying: it ignores invalidations and never signals. Early: it signals at once and
/// goes on DMAing (the fence is a lie the backstop would hide).
#[derive(Debug)]
pub struct TestImporter {
    name: String,
    kind: ImporterKind,
    lying: bool,
    early: bool,
    state: Mutex<State>,
}

impl TestImporter {
    pub fn new(name: &str, kind: ImporterKind, lying: bool) -> TestImporter {
        TestImporter {
            name: name.into(),
            kind,
            lying,
            early: false,
            state: Mutex::new(State::default()),
        }
    }

    /// Signals its fence the moment it is invalidated and never stops.
    pub fn early_fence(name: &str, kind: ImporterKind) -> TestImporter {
        TestImporter {
            early: true,
            ..TestImporter::new(name, kind, true)
        }
    }

    /// Called by the DMA loop before each DMA: false once it must stop (then it is idle).
    pub fn may_dma(&self) -> bool {
        let mut s = self.state.lock().unwrap();
        if self.lying || !s.invalidated {
            return true;
        }
        s.idle = true;
        if let Some(f) = s.fence.take() {
            f.signal();
        }
        false
    }

    /// The DMA loop finished on its own.
    pub fn finished(&self) {
        let mut s = self.state.lock().unwrap();
        s.idle = true;
        if !self.lying
            && let Some(f) = s.fence.take()
        {
            f.signal();
        }
    }

    /// A dynamic importer maps again after a move: reset.
    pub fn resume(&self) {
        let mut s = self.state.lock().unwrap();
        s.invalidated = false;
        s.idle = false;
    }

    /// An early-fence importer has signalled (it keeps its fence to say so).
    pub fn has_signalled(&self) -> bool {
        let s = self.state.lock().unwrap();
        self.early && s.fence.as_ref().is_some_and(|f| f.is_signalled())
    }

    pub fn invalidations(&self) -> u32 {
        self.state.lock().unwrap().invalidations
    }
}

impl Importer for TestImporter {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> ImporterKind {
        self.kind
    }
    fn invalidate(&self, inv: Invalidation) {
        let mut s = self.state.lock().unwrap();
        s.invalidations += 1;
        if self.early {
            inv.fence.signal();
            s.fence = Some(inv.fence);
            return;
        }
        if self.lying {
            return;
        }
        s.invalidated = true;
        if s.idle {
            inv.fence.signal();
        } else {
            s.fence = Some(inv.fence);
        }
    }
}
