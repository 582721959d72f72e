//! Host memory exporter: a memfd-backed arena in a fabric window.
//!
//! Offers, best first: the arena's fabric bus address (`CpuPhys`, plain DMA) and its address in
//! this process (`ProcessVa`, for `ibv_reg_mr`-style importers).

use std::sync::Arc;
use std::time::Duration;

use crate::addr::AddrSpace;
use crate::hints::Hints;
use crate::negotiate::{Accept, Offer};
use crate::revoke::{AttachError, Attachment, Exporter, Importer, RevokeReport};

use super::export::WindowExport;
use super::{DeviceId, Fabric, FabricError, WindowHandle};

#[derive(Debug)]
pub struct HostMemory {
    inner: WindowExport,
}

impl HostMemory {
    /// `size` bytes of host memory owned by `owner` (a host-memory device of the fabric).
    pub fn new(
        fabric: &Fabric,
        owner: DeviceId,
        name: &str,
        size: u64,
    ) -> Result<HostMemory, FabricError> {
        Ok(HostMemory {
            inner: WindowExport::new(fabric, owner, name, size, true)?,
        })
    }

    /// A caller's buffer as host memory owned by `owner`, zero-copy: its allocation is the
    /// window's memory, so DMA lands in it. [`into_vec`](Self::into_vec) gives it back.
    pub fn adopt(
        fabric: &Fabric,
        owner: DeviceId,
        name: &str,
        buf: Vec<u8>,
    ) -> Result<HostMemory, FabricError> {
        let mem = super::Mapping::from_vec(buf).map_err(|e| FabricError::Mapping {
            owner: name.to_string(),
            source: Arc::new(e),
        })?;
        Ok(HostMemory {
            inner: WindowExport::over(fabric, owner, name, mem)?,
        })
    }

    /// Another owner's memory as host memory owned by `owner`, zero-copy, for as long as this
    /// lives ([`super::Lent`]): DMA lands in it (never in read-only lent memory: the fabric
    /// refuses those writes).
    pub fn lent(
        fabric: &Fabric,
        owner: DeviceId,
        name: &str,
        lent: Box<dyn super::Lent>,
    ) -> Result<HostMemory, FabricError> {
        let mem = super::Mapping::lent(lent).map_err(|e| FabricError::Mapping {
            owner: name.to_string(),
            source: Arc::new(e),
        })?;
        Ok(HostMemory {
            inner: WindowExport::over(fabric, owner, name, mem)?,
        })
    }

    /// The adopted buffer back, with what DMA wrote into it. Every importer is revoked first
    /// (here, if the caller did not revoke) and the window unmapped, so the fabric refuses any
    /// later access to its addresses; the buffer comes back only when nothing else holds the
    /// window (a DMA refused at the unmap lets go at once; others get until `deadline`) — else
    /// [`FabricError::StillMapped`], and the bytes stay allocated (unreachable by the caller)
    /// until the last holder goes. Memory the fabric allocated is
    /// [`FabricError::NotAdopted`] (and revoked and freed with `self`).
    pub fn into_vec(self, deadline: Duration) -> Result<Vec<u8>, FabricError> {
        let name = self.inner.export.name().to_string();
        if !self.window().memory().is_heap() {
            return Err(FabricError::NotAdopted { name });
        }
        let mem = self
            .inner
            .into_memory(deadline)
            .map_err(|held| match held {
                Some(holders) => FabricError::StillMapped {
                    name: name.clone(),
                    holders,
                },
                None => FabricError::KeptForKernel { name: name.clone() },
            })?;
        mem.into_vec().map_err(|_| FabricError::NotAdopted { name })
    }

    pub fn window(&self) -> WindowHandle {
        self.inner.window()
    }

    pub fn len(&self) -> u64 {
        self.window().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The CPU's view: write bytes at `offset`. False when out of bounds or revoked.
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        self.inner.fabric.cpu_write(&self.window(), offset, data)
    }

    /// The CPU's view: read bytes at `offset`. False when out of bounds or revoked.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.inner.fabric.cpu_read(&self.window(), offset, buf)
    }

    pub fn offers(&self) -> Vec<Offer> {
        vec![
            Offer {
                space: AddrSpace::CpuPhys,
                hints: Hints::HOST_MEMORY,
            },
            Offer {
                space: AddrSpace::ProcessVa,
                hints: Hints::HOST_MEMORY,
            },
        ]
    }

    /// Negotiate with an importer whose DMA comes from `device`, grant it access, attach it.
    pub fn attach(
        &self,
        importer: Arc<dyn Importer>,
        device: DeviceId,
        accepts: &[Accept],
    ) -> Result<Attachment, AttachError> {
        self.inner.attach(importer, device, &self.offers(), accepts)
    }

    /// Move the arena to new memory (new bus address): dynamic importers map again, pinned die.
    /// A caller's buffer ([`HostMemory::adopt`]) does not move: the caller's allocation is the
    /// memory.
    pub fn relocate(&self, deadline: Duration) -> Result<RevokeReport, AttachError> {
        if self.window().memory().is_heap() {
            return Err(AttachError::Exporter {
                export: self.inner.export.name().to_string(),
                what: "a caller's buffer cannot move: it is the caller's allocation".into(),
            });
        }
        self.inner.relocate(deadline)
    }

    pub fn epoch(&self) -> u64 {
        self.inner.export.epoch()
    }
}

impl Exporter for HostMemory {
    fn name(&self) -> &str {
        self.inner.export.name()
    }

    fn revoke(&self, deadline: Duration) -> RevokeReport {
        self.inner.revoke(deadline)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::hints::Access;

    fn fabric() -> (Fabric, DeviceId, DeviceId) {
        let f = Fabric::new();
        let mem = f.add_device("mem0");
        let nic = f.add_device("nic0");
        (f, mem, nic)
    }

    #[test]
    fn an_adopted_buffer_is_zero_copy_and_comes_back_with_what_dma_wrote() {
        let (f, mem, nic) = fabric();
        let buf: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let ptr = buf.as_ptr();
        let h = HostMemory::adopt(&f, mem, "caller", buf).unwrap();
        let w = h.window();
        let base = w.base();
        let grant = f.grant(&w, nic, Access::READ_WRITE);
        let mut head = [0u8; 4];
        f.dma_read(nic, w.base(), &mut head).unwrap();
        assert_eq!(head, [0, 1, 2, 3]);
        f.dma_write(nic, w.base() + 4096, b"landed").unwrap();
        drop(grant);
        drop(w);
        let back = h.into_vec(Duration::ZERO).unwrap();
        assert_eq!(back.as_ptr(), ptr, "the same allocation, not a copy");
        assert_eq!(&back[4096..4102], b"landed");
        assert_eq!(back[4102], 4102u32 as u8);
        // Its addresses are gone from the fabric: a late DMA faults instead of landing.
        assert!(f.dma_write(nic, base, b"late").is_err());
    }

    #[test]
    fn a_buffer_still_reached_through_its_window_is_not_handed_back() {
        let (f, mem, nic) = fabric();
        let h = HostMemory::adopt(&f, mem, "held", vec![7u8; 4096]).unwrap();
        let w = h.window();
        let base = w.base();
        let err = h.into_vec(Duration::from_millis(1)).unwrap_err();
        assert!(
            matches!(err, FabricError::StillMapped { holders: 1, .. }),
            "{err}"
        );
        // The holder's handle is unmapped: the fabric refuses DMA to it.
        assert!(f.dma_write(nic, base, b"late").is_err());
        assert!(w.memory().is_heap());
    }

    /// An importer that never acknowledges.
    struct Deaf;
    impl Importer for Deaf {
        fn name(&self) -> &str {
            "deaf"
        }
        fn kind(&self) -> crate::revoke::ImporterKind {
            crate::revoke::ImporterKind::Pinned
        }
        fn invalidate(&self, _inv: crate::revoke::Invalidation) {}
    }

    #[test]
    fn a_buffer_a_kernel_importer_never_let_go_of_is_kept_not_handed_back() {
        use crate::{Accept, SpaceKind};
        let (f, mem, nic) = fabric();
        // By process VA (the kernel's DMA, which no grant stops): kept for good.
        let h = HostMemory::adopt(&f, mem, "by-va", vec![1u8; 4096]).unwrap();
        let _a = h
            .attach(
                Arc::new(Deaf),
                nic,
                &[Accept::new(SpaceKind::ProcessVa, Access::READ_WRITE)],
            )
            .unwrap();
        let report = h.revoke(Duration::from_millis(20));
        assert!(!report.is_clean());
        let err = h.into_vec(Duration::ZERO).map(|v| v.len()).unwrap_err();
        assert!(matches!(err, FabricError::KeptForKernel { .. }), "{err}");
        // By bus address (the fabric's DMA, which the backstop stops): handed back.
        let h = HostMemory::adopt(&f, mem, "by-bus", vec![2u8; 4096]).unwrap();
        let a = h
            .attach(
                Arc::new(Deaf),
                nic,
                &[Accept::new(SpaceKind::CpuPhys, Access::READ_WRITE)],
            )
            .unwrap();
        assert!(!h.revoke(Duration::from_millis(20)).is_clean());
        drop(a);
        assert_eq!(
            h.into_vec(Duration::from_millis(100)).unwrap(),
            vec![2u8; 4096]
        );
        // A caller's buffer does not move.
        let h = HostMemory::adopt(&f, mem, "fixed", vec![3u8; 4096]).unwrap();
        let e = h.relocate(Duration::from_millis(20)).unwrap_err();
        assert!(e.to_string().contains("cannot move"), "{e}");
    }

    #[test]
    fn memory_the_fabric_allocated_is_not_a_callers_buffer() {
        let (f, mem, _) = fabric();
        let h = HostMemory::new(&f, mem, "arena", 4096).unwrap();
        let err = h.into_vec(Duration::from_millis(1)).unwrap_err();
        assert!(matches!(err, FabricError::NotAdopted { .. }), "{err}");
        let empty = HostMemory::adopt(&f, mem, "empty", Vec::new()).unwrap_err();
        assert!(empty.to_string().contains("size 0"), "{empty}");
    }
}
