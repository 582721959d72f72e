//! The simulated GPU: device memory in windows of the core fabric, a BAR1 aperture of the
//! topology's size through which peers reach it, and a copy engine that DMAs through the fabric
//! under its checks (grants, bounds, revocation).
//!
//! BAR1 is accounted the way the driver does it: an allocation takes aperture space when it first
//! becomes visible to a peer (its first attachment by another device) and gives it back when
//! freed. An export that does not fit fails with [`GpuError::Bar1Full`].

mod alloc;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use dmaplane_core::sync::lock;

use dmaplane_core::fabric::{DeviceId, Fabric};
use dmaplane_core::topology::DeviceKind;
use dmaplane_core::{Accept, Access, AddrList, AddrSpace, SpaceKind};

use crate::backend::BAR1_INDEX;
use crate::backend::{
    AllocBackend, BackendKind, CopyRegistration, DmaBufSupport, GpuBackend, GpuInfo,
};
use crate::device::Gpu;
use crate::error::{GpuError, Result};

use alloc::SimAlloc;

/// Device memory of a simulated GPU unless said otherwise (an 80 GiB part).
pub const DEFAULT_MEMORY: u64 = 80 << 30;

#[derive(Debug, Default)]
struct State {
    used: u64,
    /// Peer-visible allocations and their BAR1 bytes.
    bar1: BTreeMap<u64, u64>,
    next_id: u64,
}

#[derive(Debug)]
struct SimGpuInner {
    fabric: Fabric,
    dev: DeviceId,
    name: String,
    memory: u64,
    bar1: u64,
    state: Mutex<State>,
}

impl SimGpuInner {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Take BAR1 space for allocation `id`; nothing when it already has it.
    fn map_bar1(&self, id: u64, alloc: &str, len: u64) -> Result<bool> {
        let mut st = self.state();
        if st.bar1.contains_key(&id) {
            return Ok(false);
        }
        let mapped: u64 = st.bar1.values().sum();
        if mapped.checked_add(len).is_none_or(|t| t > self.bar1) {
            return Err(GpuError::Bar1Full {
                gpu: self.name.clone(),
                alloc: alloc.to_string(),
                requested: len,
                mapped,
                aperture: self.bar1,
                allocations: st.bar1.len(),
            });
        }
        st.bar1.insert(id, len);
        tracing::debug!(gpu = %self.name, alloc, len, mapped = mapped + len, "BAR1 mapped");
        Ok(true)
    }

    fn unmap_bar1(&self, id: u64) {
        self.state().bar1.remove(&id);
    }
}

/// A simulated GPU on the fabric.
#[derive(Debug, Clone)]
pub struct SimGpu {
    shared: Arc<SimGpuInner>,
}

impl SimGpu {
    /// The fabric's GPU `name`, with the topology's BAR1 as its aperture and
    /// [`DEFAULT_MEMORY`] of device memory.
    pub fn new(fabric: &Fabric, name: &str) -> Result<SimGpu> {
        let no_dev = |why: String| GpuError::NoDevice {
            what: name.to_string(),
            why,
        };
        let topo = fabric
            .topology()
            .ok_or_else(|| no_dev("the fabric has no topology to size the GPU from".into()))?;
        let d = topo.device(name).map_err(|e| no_dev(e.to_string()))?;
        if d.kind != DeviceKind::Gpu {
            return Err(no_dev(format!(
                "{name} is a {}, not a gpu",
                d.kind.as_str()
            )));
        }
        let bar1 = topo
            .bar_size(name, BAR1_INDEX)
            .map_err(|e| no_dev(format!("no BAR1 aperture: {e}")))?;
        SimGpu::with_sizes(fabric, name, DEFAULT_MEMORY, bar1)
    }

    /// A GPU with explicit device memory and BAR1 sizes (small-BAR parts, tests).
    pub fn with_sizes(fabric: &Fabric, name: &str, memory: u64, bar1: u64) -> Result<SimGpu> {
        let dev = fabric.device(name).map_err(|e| GpuError::NoDevice {
            what: name.to_string(),
            why: e.to_string(),
        })?;
        if bar1 == 0 || memory == 0 {
            return Err(GpuError::invalid(
                if memory == 0 { "memory" } else { "bar1" },
                "0",
                "a GPU needs device memory and a BAR1 aperture",
            ));
        }
        Ok(SimGpu {
            shared: Arc::new(SimGpuInner {
                fabric: fabric.clone(),
                dev,
                name: name.to_string(),
                memory,
                bar1,
                state: Mutex::new(State::default()),
            }),
        })
    }

    /// Every GPU of the fabric's topology, in topology order.
    pub fn all(fabric: &Fabric) -> Result<Vec<Gpu>> {
        let Some(topo) = fabric.topology() else {
            return Ok(Vec::new());
        };
        topo.devices_of_kind(DeviceKind::Gpu)
            .map(|d| Ok(SimGpu::new(fabric, &d.id)?.into_gpu()))
            .collect()
    }

    pub fn into_gpu(self) -> Gpu {
        Gpu::new(Arc::new(self))
    }

    pub fn device_id(&self) -> DeviceId {
        self.shared.dev
    }

    /// Bytes of BAR1 mapped for peer-visible allocations.
    pub fn bar1_mapped(&self) -> u64 {
        self.shared.state().bar1.values().sum()
    }
}

impl GpuBackend for SimGpu {
    fn info(&self) -> GpuInfo {
        let s = &self.shared;
        GpuInfo {
            name: s.name.clone(),
            backend: BackendKind::Sim,
            description: format!("simulated GPU on fabric {}", s.dev),
            pci: None,
            memory_bytes: s.memory,
            bar1_bytes: Some(s.bar1),
            bar1_mapped: self.bar1_mapped(),
            dmabuf: DmaBufSupport::Supported,
        }
    }

    fn accepts(&self) -> Vec<Accept> {
        // A P2P-capable DMA engine: bus addresses of host memory, NIC buffers and other BARs.
        [SpaceKind::PciBus, SpaceKind::CpuPhys, SpaceKind::Iova]
            .into_iter()
            .map(|s| Accept::new(s, Access::READ_WRITE).with_mmio())
            .collect()
    }

    fn alloc(&self, name: &str, size: u64) -> Result<Arc<dyn AllocBackend>> {
        let s = &self.shared;
        let id = {
            let mut st = s.state();
            if st.used.checked_add(size).is_none_or(|t| t > s.memory) {
                return Err(GpuError::OutOfMemory {
                    gpu: s.name.clone(),
                    requested: size,
                    used: st.used,
                    total: s.memory,
                });
            }
            st.used += size;
            st.next_id += 1;
            st.next_id
        };
        match SimAlloc::new(s.clone(), id, name, size) {
            Ok(a) => Ok(Arc::new(a)),
            Err(e) => {
                s.state().used -= size;
                Err(e)
            }
        }
    }

    fn register(&self, name: &str, list: &AddrList) -> Result<Box<dyn CopyRegistration>> {
        let offset = match list.space() {
            AddrSpace::CpuPhys | AddrSpace::Iova { .. } => 0,
            AddrSpace::PciBus { bus_offset, .. } => bus_offset,
            other => {
                return Err(GpuError::invalid(
                    "list.space",
                    format!("{other:?}"),
                    format!(
                        "the copy engine of {} DMAs fabric bus addresses (CpuPhys, PciBus, \
                         Iova); {name} offered none",
                        self.shared.name
                    ),
                ));
            }
        };
        Ok(Box::new(BusRegistration { offset }))
    }

    fn copy(&self, src: u64, dst: u64, len: u64) -> Result<()> {
        self.shared
            .fabric
            .dma_copy(self.shared.dev, src, dst, len)
            .map_err(|fault| GpuError::Fault {
                gpu: self.shared.name.clone(),
                fault,
            })
    }

    fn fabric_device(&self) -> Option<DeviceId> {
        Some(self.shared.dev)
    }
}

/// Fabric addresses need no registration: the fabric checks every access against the grant.
#[derive(Debug)]
struct BusRegistration {
    offset: u64,
}

impl CopyRegistration for BusRegistration {
    fn translate(&self, addr: u64) -> u64 {
        addr.wrapping_add(self.offset)
    }
}
