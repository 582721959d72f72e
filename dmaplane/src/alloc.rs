//! The six ways an agent gets memory: host memory near its NICs (or a udmabuf on verbs), on a
//! named host-memory device, a caller's buffer adopted in place, a dma-buf from elsewhere,
//! simulated GPU memory and CUDA memory. Each becomes a [`Memory`] owned by the agent, which
//! its free reports to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use dmaplane_core::fabric::{HostMemory, Lent};

use crate::error::{Error, Result};
use crate::memory::{Backing, Location, Memory, MemoryInner, Owner};
use crate::nics::Nics;
use crate::platform::Platform;
use crate::testbed::Testbed;

/// What allocating needs of the agent (see the module).
pub(crate) struct Allocator<'a> {
    pub(crate) agent: &'a str,
    pub(crate) platform: &'a Platform,
    pub(crate) nics: &'a Nics,
    /// Memory ids, one counter per agent.
    pub(crate) next: &'a AtomicU64,
    pub(crate) owner: Weak<dyn Owner>,
}

impl Allocator<'_> {
    /// See [`Agent::alloc_host`](crate::Agent::alloc_host).
    pub(crate) fn alloc_host(&self, name: &str, len: u64) -> Result<Memory> {
        if self.platform.is_tcp() {
            return self.alloc_shared(name, len);
        }
        let Some(tb) = self.platform.testbed() else {
            return self.alloc_udmabuf(name, len);
        };
        let dev = self.host_device(tb)?;
        self.alloc_host_on(name, &dev, len)
    }

    /// See [`Agent::adopt`](crate::Agent::adopt).
    pub(crate) fn adopt(&self, name: &str, buf: Vec<u8>) -> Result<Memory> {
        let len = buf.len() as u64;
        check_alloc(name, len)?;
        let Some(tb) = self.platform.testbed() else {
            return self.adopt_user(name, buf);
        };
        let dev = self.host_device(tb)?;
        let id = tb.device(&dev)?;
        let host = HostMemory::adopt(tb.fabric(), id, name, buf).map_err(|e| {
            Error::invalid(format!("host memory {name}"), "device", &dev, e.to_string())
        })?;
        Ok(self.memory(name, len, Location::Host(dev), Backing::Host(host)))
    }

    /// See [`Agent::lend`](crate::Agent::lend).
    pub(crate) fn lend(&self, name: &str, lent: Box<dyn Lent>) -> Result<Memory> {
        let len = lent.len() as u64;
        check_alloc(name, len)?;
        let read_only = lent.read_only();
        let mem = match self.platform.testbed() {
            Some(tb) => {
                let dev = self.host_device(tb)?;
                let id = tb.device(&dev)?;
                let host = HostMemory::lent(tb.fabric(), id, name, lent).map_err(|e| {
                    Error::invalid(format!("host memory {name}"), "device", &dev, e.to_string())
                })?;
                self.memory(name, len, Location::Host(dev), Backing::Host(host))
            }
            None => {
                let u = dmaplane_core::user::UserBuffer::lent(name, lent)
                    .map_err(|e| Error::setup(self.agent, format!("buffer {name}: {e}")))?;
                self.memory(
                    name,
                    len,
                    Location::Host("process".into()),
                    Backing::User(u),
                )
            }
        };
        if read_only {
            mem.inner.read_only.store(true, Ordering::Relaxed);
        }
        Ok(mem)
    }

    /// Host memory on TCP NICs: memfd-backed, registered by its process VA.
    fn alloc_shared(&self, name: &str, len: u64) -> Result<Memory> {
        check_alloc(name, len)?;
        let u = dmaplane_core::user::UserBuffer::memfd(name, len)
            .map_err(|e| Error::setup(self.agent, format!("host memory {name}: {e}")))?;
        Ok(self.memory(name, len, Location::Host("memfd".into()), Backing::User(u)))
    }

    /// A caller's buffer on verbs or TCP: registered by its process VA.
    fn adopt_user(&self, name: &str, buf: Vec<u8>) -> Result<Memory> {
        let len = buf.len() as u64;
        let u = dmaplane_core::user::UserBuffer::new(name, buf)
            .map_err(|e| Error::setup(self.agent, format!("buffer {name}: {e}")))?;
        Ok(self.memory(
            name,
            len,
            Location::Host("process".into()),
            Backing::User(u),
        ))
    }

    /// Memory asked of an agent that has neither a testbed nor the verbs backend.
    #[cfg(not(feature = "verbs"))]
    fn no_backend(&self, what: &str) -> Error {
        Error::setup(self.agent, format!("{what}: no testbed and no verbs"))
    }

    /// See [`Agent::import_dmabuf`](crate::Agent::import_dmabuf).
    pub(crate) fn import_dmabuf(&self, name: &str, fd: std::os::fd::OwnedFd) -> Result<Memory> {
        self.import_dmabuf_verbs(name, fd)
    }

    #[cfg(feature = "verbs")]
    fn import_dmabuf_verbs(&self, name: &str, fd: std::os::fd::OwnedFd) -> Result<Memory> {
        if self.platform.testbed().is_some() {
            return Err(self.no_kernel_dmabuf(name));
        }
        let m = dmaplane_core::dmabuf::DmaBufMemory::import(name, fd)
            .map_err(|e| Error::invalid(format!("dma-buf {name}"), "fd", "given", e.to_string()))?;
        let len = m.len();
        Ok(self.memory(
            name,
            len,
            Location::Host("dma-buf".into()),
            Backing::DmaBuf(m),
        ))
    }

    #[cfg(not(feature = "verbs"))]
    fn import_dmabuf_verbs(&self, name: &str, _fd: std::os::fd::OwnedFd) -> Result<Memory> {
        Err(self.no_kernel_dmabuf(name))
    }

    fn no_kernel_dmabuf(&self, name: &str) -> Error {
        Error::setup(
            self.agent,
            format!(
                "dma-buf {name}: the simulated testbed has no kernel dma-bufs (an agent built \
                 with .verbs() imports them); use alloc_host or adopt"
            ),
        )
    }

    /// The host-memory device nearest the agent's first NIC.
    fn host_device(&self, tb: &Testbed) -> Result<String> {
        let numa = self.nics.iter().next().map_or(0, |n| n.numa());
        let topo = tb.topology();
        Ok(topo
            .host_memory_for_numa(numa)
            .or_else(|| {
                topo.devices_of_kind(dmaplane_core::topology::DeviceKind::HostMemory)
                    .next()
            })
            .ok_or_else(|| Error::setup(self.agent, "the testbed has no host memory"))?
            .id
            .clone())
    }

    /// Host memory on verbs: a udmabuf (memfd pages exported as a dma-buf).
    #[cfg(feature = "verbs")]
    fn alloc_udmabuf(&self, name: &str, len: u64) -> Result<Memory> {
        check_alloc(name, len)?;
        let m = dmaplane_core::dmabuf::UdmaBuf::new(name, len.div_ceil(4096) * 4096)
            .map_err(|e| Error::setup(self.agent, format!("host memory {name}: {e}")))?
            .into_memory();
        Ok(self.memory(
            name,
            len,
            Location::Host("udmabuf".into()),
            Backing::DmaBuf(m),
        ))
    }

    #[cfg(not(feature = "verbs"))]
    fn alloc_udmabuf(&self, name: &str, _len: u64) -> Result<Memory> {
        Err(self.no_backend(&format!("host memory {name}")))
    }

    /// See [`Agent::alloc_host_on`](crate::Agent::alloc_host_on).
    pub(crate) fn alloc_host_on(&self, name: &str, device: &str, len: u64) -> Result<Memory> {
        check_alloc(name, len)?;
        let tb = self.sim_only("alloc_host_on")?;
        let id = tb.device(device)?;
        let host = HostMemory::new(tb.fabric(), id, name, len).map_err(|e| {
            Error::invalid(
                format!("host memory {name}"),
                "device",
                device,
                e.to_string(),
            )
        })?;
        Ok(self.memory(
            name,
            len,
            Location::Host(device.into()),
            Backing::Host(host),
        ))
    }

    /// See [`Agent::alloc_gpu`](crate::Agent::alloc_gpu).
    pub(crate) fn alloc_gpu(&self, name: &str, gpu: &str, len: u64) -> Result<Memory> {
        check_alloc(name, len)?;
        let g = self.sim_only("alloc_gpu")?.gpu(gpu)?;
        let mem = g.alloc(name, len)?;
        Ok(self.memory(name, len, Location::Gpu(gpu.into()), Backing::Gpu(mem)))
    }

    /// See [`Agent::alloc_cuda`](crate::Agent::alloc_cuda).
    pub(crate) fn alloc_cuda(&self, name: &str, ordinal: u32, len: u64) -> Result<Memory> {
        check_alloc(name, len)?;
        let gpu = self.platform.cuda_gpu(ordinal)?;
        let mem = gpu.alloc(name, len)?;
        Ok(self.memory(
            name,
            len,
            Location::Gpu(format!("cuda:{ordinal}")),
            Backing::Gpu(mem),
        ))
    }

    /// See [`Agent::lend_cuda`](crate::Agent::lend_cuda).
    ///
    /// # Safety
    /// As [`Agent::lend_cuda`](crate::Agent::lend_cuda).
    pub(crate) unsafe fn lend_cuda(
        &self,
        name: &str,
        addr: u64,
        len: u64,
        keeper: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<Memory> {
        check_alloc(name, len)?;
        let Some(ordinal) = dmaplane_gpu::cuda::pointer_ordinal(addr)? else {
            return Err(Error::invalid(
                format!("CUDA memory {name}"),
                "address",
                format!("{addr:#x}"),
                "not CUDA device memory (host memory is lent with Agent::lend)",
            ));
        };
        let gpu = self.platform.cuda_gpu(ordinal)?;
        // SAFETY: the caller keeps the memory allocated while `keeper` lives.
        let mem = unsafe { gpu.lend(name, addr, len, keeper) }?;
        Ok(self.memory(
            name,
            len,
            Location::Gpu(format!("cuda:{ordinal}")),
            Backing::Gpu(mem),
        ))
    }

    fn sim_only(&self, what: &str) -> Result<&Arc<Testbed>> {
        self.platform.testbed().ok_or_else(|| {
            Error::setup(
                self.agent,
                format!("{what}: the testbed's devices; on verbs use alloc_host or alloc_cuda"),
            )
        })
    }

    fn memory(&self, name: &str, len: u64, location: Location, b: Backing) -> Memory {
        Memory {
            inner: Arc::new(MemoryInner {
                id: self.next.fetch_add(1, Ordering::Relaxed),
                name: name.to_string(),
                len,
                location,
                backing: Mutex::new(Some(b)),
                owner: self.owner.clone(),
                tied: Mutex::new(Vec::new()),
                freed_at: std::sync::OnceLock::new(),
                read_only: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }
}

fn check_alloc(name: &str, len: u64) -> Result<()> {
    if len == 0 {
        return Err(Error::invalid(
            format!("memory {name}"),
            "len",
            0,
            "must be positive",
        ));
    }
    Ok(())
}
