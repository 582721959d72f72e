//! Memory the agent allocates for the application: host memory near its NICs, or GPU memory.
//! It is an exporter: registering it attaches the agent's NICs, and [`Memory::free`] revokes
//! every one of them (queue pairs stopped, translations zapped, remote leases withdrawn) before
//! the memory is given back — nothing is freed under a NIC.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use dmaplane_core::fabric::HostMemory;
use dmaplane_core::{Exporter, RevokeReport};
use dmaplane_gpu::DeviceMemory;

use crate::agent::Shared;
use crate::error::{Error, Result};
use crate::stage::Stage;
use crate::sync::lock;

/// Where a [`Memory`] lives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "device")]
pub enum Location {
    /// Host memory on this host-memory device (a NUMA node's).
    Host(String),
    /// Device memory of this GPU.
    Gpu(String),
}

impl Location {
    /// The topology device the memory belongs to.
    pub fn device(&self) -> &str {
        match self {
            Location::Host(d) | Location::Gpu(d) => d,
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Host(d) => write!(f, "host memory on {d}"),
            Location::Gpu(d) => write!(f, "GPU memory on {d}"),
        }
    }
}

pub(crate) enum Backing {
    Host(HostMemory),
    Gpu(DeviceMemory),
    /// A real dma-buf (udmabuf) on the verbs backend.
    #[cfg(feature = "verbs")]
    DmaBuf(dmaplane_core::dmabuf::DmaBufMemory),
}

pub(crate) struct MemoryInner {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) len: u64,
    pub(crate) location: Location,
    /// `None` once freed.
    pub(crate) backing: Mutex<Option<Backing>>,
    pub(crate) agent: Weak<Shared>,
    /// Staging buffers of its registrations (revoked with it).
    pub(crate) stages: Mutex<Vec<Weak<Stage>>>,
}

/// An allocation of host or GPU memory owned by an agent. Cheap to clone; the memory is given
/// back by [`Memory::free`] (or when the last clone and every registration of it are dropped).
#[derive(Clone)]
pub struct Memory {
    pub(crate) inner: Arc<MemoryInner>,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("name", &self.inner.name)
            .field("len", &self.inner.len)
            .field("location", &self.inner.location)
            .finish_non_exhaustive()
    }
}

impl Memory {
    /// The name given at allocation (what the agent's metadata and peers call it).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.inner.len
    }

    /// Whether it holds no bytes (never true: allocation refuses a length of 0).
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// Where it lives: the host-memory device or the GPU.
    pub fn location(&self) -> &Location {
        &self.inner.location
    }

    /// Whether [`Memory::free`] ran.
    pub fn is_freed(&self) -> bool {
        lock(&self.inner.backing).is_none()
    }

    fn check(&self, field: &'static str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.len => Ok(()),
            _ => Err(Error::invalid(
                format!("memory {}", self.inner.name),
                field,
                format!("[{offset:#x}, +{len:#x})"),
                format!("outside its {} bytes", self.inner.len),
            )),
        }
    }

    fn freed(&self) -> Error {
        Error::invalid(
            format!("memory {}", self.inner.name),
            "memory",
            &self.inner.name,
            "it was freed",
        )
    }

    /// Write `data` at `offset` from the CPU.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check("offset", offset, data.len() as u64)?;
        match &*lock(&self.inner.backing) {
            Some(Backing::Host(h)) => h
                .write(offset, data)
                .then_some(())
                .ok_or_else(|| self.freed()),
            Some(Backing::Gpu(g)) => Ok(g.write(offset, data)?),
            #[cfg(feature = "verbs")]
            Some(Backing::DmaBuf(m)) => m
                .write(offset, data)
                .map_err(|e| Error::setup(&self.inner.name, e.to_string())),
            None => Err(self.freed()),
        }
    }

    /// Read `buf.len()` bytes at `offset` from the CPU.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check("offset", offset, buf.len() as u64)?;
        match &*lock(&self.inner.backing) {
            Some(Backing::Host(h)) => h
                .read(offset, buf)
                .then_some(())
                .ok_or_else(|| self.freed()),
            Some(Backing::Gpu(g)) => Ok(g.read(offset, buf)?),
            #[cfg(feature = "verbs")]
            Some(Backing::DmaBuf(m)) => m
                .read(offset, buf)
                .map_err(|e| Error::setup(&self.inner.name, e.to_string())),
            None => Err(self.freed()),
        }
    }

    /// Give the memory back: revoke every importer first (this agent's NICs quiesce and zap,
    /// peers holding leases on it stop and acknowledge), drop every cached registration of it,
    /// then free. Transfers that touch it end with [`Error::Revoked`]. Returns the revoke's
    /// ack; an error names the importers that missed `deadline`.
    pub fn free(&self, deadline: Duration) -> Result<RevokeReport> {
        let Some(backing) = lock(&self.inner.backing).take() else {
            return Err(self.freed());
        };
        // Staging buffers first: the NICs that reach this memory through one stop touching
        // it (and their peers' leases on it are withdrawn) before the memory goes.
        let stages: Vec<Arc<Stage>> = lock(&self.inner.stages)
            .drain(..)
            .filter_map(|w| w.upgrade())
            .collect();
        let start = std::time::Instant::now();
        let staged: Vec<RevokeReport> = stages.iter().map(|st| st.host.revoke(deadline)).collect();
        let mut report = match backing {
            Backing::Host(h) => {
                let r = h.revoke(deadline);
                drop(h);
                r
            }
            #[cfg(feature = "verbs")]
            Backing::DmaBuf(m) => {
                let r = m.revoke(deadline);
                drop(m);
                r
            }
            Backing::Gpu(g) => match g.free(deadline) {
                Ok(r) => r,
                Err(e) => {
                    self.forget();
                    return Err(e.into());
                }
            },
        };
        // One report: the staging buffers' importers (the NICs that used them, the copy
        // engine) with the memory's own, over the whole free.
        for r in staged {
            report.importers.extend(r.importers);
        }
        report.elapsed_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.forget();
        if let Some(a) = self.inner.agent.upgrade() {
            a.event(crate::event::Event::Freed {
                memory: self.inner.name.clone(),
                epoch: report.epoch,
                elapsed_us: report.elapsed_us,
            });
        }
        if report.is_clean() {
            Ok(report)
        } else {
            Err(Error::setup(
                &self.inner.name,
                format!("free: importers missed the deadline: {report}"),
            ))
        }
    }

    /// Drop this memory's registrations from the agent's cache.
    fn forget(&self) {
        if let Some(a) = self.inner.agent.upgrade() {
            a.cache.forget_memory(self.inner.id);
        }
    }

    /// The backing export, for registration (`None` once freed).
    pub(crate) fn with_backing<T>(&self, f: impl FnOnce(&Backing) -> Result<T>) -> Result<T> {
        match &*lock(&self.inner.backing) {
            Some(b) => f(b),
            None => Err(self.freed()),
        }
    }

    /// Revoke `stage` with this memory when it is freed.
    pub(crate) fn track_stage(&self, stage: &Arc<Stage>) {
        let mut v = lock(&self.inner.stages);
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(stage));
    }

    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }
}
