//! Memory the agent allocates for the application: host memory near its NICs, or GPU memory.
//! It is an exporter: registering it attaches the agent's NICs, and [`Memory::free`] revokes
//! every one of them (queue pairs stopped, translations zapped, remote leases withdrawn) before
//! the memory is given back — nothing is freed under a NIC.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use dmaplane_core::fabric::HostMemory;
use dmaplane_core::{Exporter, RevokeReport};
use dmaplane_gpu::DeviceMemory;

use crate::error::{Error, Result};
use crate::event::Event;
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
    /// Memory registered by its process VA: a caller's buffer on verbs or TCP, or host memory
    /// the agent allocated on TCP.
    User(dmaplane_core::user::UserBuffer),
}

/// A host access to a backing's bytes.
enum Io<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl Backing {
    fn len(&self) -> u64 {
        match self {
            Backing::Host(h) => h.len(),
            Backing::Gpu(g) => g.len(),
            #[cfg(feature = "verbs")]
            Backing::DmaBuf(m) => m.len(),
            Backing::User(u) => u.len(),
        }
    }

    /// Whether it is a caller's buffer ([`Agent::adopt`](crate::Agent::adopt)).
    fn is_adopted(&self) -> bool {
        match self {
            Backing::Host(h) => h.window().memory().is_heap(),
            Backing::User(u) => u.is_adopted(),
            _ => false,
        }
    }

    /// The export's epoch (moves on every revoke).
    pub(crate) fn epoch(&self) -> u64 {
        match self {
            Backing::Host(h) => h.epoch(),
            Backing::Gpu(g) => g.epoch(),
            #[cfg(feature = "verbs")]
            Backing::DmaBuf(m) => m.epoch(),
            Backing::User(u) => u.epoch(),
        }
    }

    /// Copy between the caller's buffer and the bytes at `offset`, from the host. A
    /// `quarantined` backing is revoked already: host memory is then reached through its
    /// window, as its own accessors refuse once revoked. `Ok(false)`: the export refused (it
    /// was revoked).
    #[cfg_attr(not(feature = "verbs"), allow(unused_variables))]
    fn io(&self, name: &str, offset: u64, io: Io<'_>, quarantined: bool) -> Result<bool> {
        Ok(match (self, io) {
            (Backing::Host(h), Io::Read(b)) if quarantined => h.window().memory().read(offset, b),
            (Backing::Host(h), Io::Write(b)) if quarantined => h.window().memory().write(offset, b),
            (Backing::Host(h), Io::Read(b)) => h.read(offset, b),
            (Backing::Host(h), Io::Write(b)) => h.write(offset, b),
            (Backing::Gpu(g), Io::Read(b)) => g.read(offset, b).map(|()| true)?,
            (Backing::Gpu(g), Io::Write(b)) => g.write(offset, b).map(|()| true)?,
            #[cfg(feature = "verbs")]
            (Backing::DmaBuf(m), io) => match io {
                Io::Read(b) => m.read(offset, b),
                Io::Write(b) => m.write(offset, b),
            }
            .map(|()| true)
            .map_err(|e| Error::setup(name, e.to_string()))?,
            (Backing::User(u), Io::Read(b)) => u.read(offset, b),
            (Backing::User(u), Io::Write(b)) => u.write(offset, b),
        })
    }

    /// Revoke every importer (the bytes stay until the backing is dropped or released).
    fn revoke(&self, deadline: Duration) -> RevokeReport {
        match self {
            Backing::Host(h) => h.revoke(deadline),
            #[cfg(feature = "verbs")]
            Backing::DmaBuf(m) => m.revoke(deadline),
            Backing::User(u) => u.revoke(deadline),
            Backing::Gpu(g) => g.revoke(deadline),
        }
    }
}

pub(crate) struct MemoryInner {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) len: u64,
    pub(crate) location: Location,
    /// `None` once freed.
    pub(crate) backing: Mutex<Option<Backing>>,
    /// The agent that allocated it (what a free reports to).
    pub(crate) owner: Weak<dyn Owner>,
    /// What is revoked with it, first: the staging buffers of its registrations.
    pub(crate) tied: Mutex<Vec<Weak<dyn Tied>>>,
    /// The export's epoch when its free began: set before the backing goes, so whoever meets
    /// it gone can name the revoke.
    pub(crate) freed_at: std::sync::OnceLock<u64>,
    /// Lent by an owner that forbids writes ([`crate::Agent::lend`]): registered read-only,
    /// never a READ's target.
    pub(crate) read_only: std::sync::atomic::AtomicBool,
}

/// What a memory needs of the agent that allocated it when it is freed.
pub(crate) trait Owner: Send + Sync {
    /// Lease holders cut off so far (a free reports those it cut off).
    fn holders_cut_off(&self) -> u64;
    /// Drop every registration of memory `id` from the registration cache.
    fn forget(&self, id: u64);
    /// Report an event.
    fn event(&self, e: Event);
}

/// Something revoked with a memory, before it: a staging buffer the memory is reached through.
pub(crate) trait Tied: Send + Sync {
    fn revoke(&self, deadline: Duration) -> RevokeReport;
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

    /// The epoch its free revoked, once a free began (before its backing went).
    pub(crate) fn freed_at(&self) -> Option<u64> {
        self.inner.freed_at.get().copied()
    }

    /// Whether its owner forbids writes ([`crate::Agent::lend`] of read-only memory): it is
    /// registered read-only for peers and refused as a READ's target.
    pub fn is_read_only(&self) -> bool {
        self.inner
            .read_only
            .load(std::sync::atomic::Ordering::Relaxed)
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
        self.io(offset, Io::Write(data))
    }

    /// Read `buf.len()` bytes at `offset` from the CPU.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.io(offset, Io::Read(buf))
    }

    fn io(&self, offset: u64, io: Io<'_>) -> Result<()> {
        let n = match &io {
            Io::Read(b) => b.len(),
            Io::Write(b) => b.len(),
        };
        self.check("offset", offset, n as u64)?;
        match &*lock(&self.inner.backing) {
            Some(b) if b.io(&self.inner.name, offset, io, false)? => Ok(()),
            _ => Err(self.freed()),
        }
    }

    /// Give the memory back: revoke every importer first (this agent's NICs quiesce and zap,
    /// peers holding leases on it stop and acknowledge), drop every cached registration of it,
    /// then free. Transfers that touch it end with [`Error::Revoked`]. Returns the revoke's
    /// ack; an error names the importers that missed `deadline`.
    pub fn free(&self, deadline: Duration) -> Result<RevokeReport> {
        let (report, backing) = self.revoke_for_good(deadline)?;
        Quarantine {
            name: self.inner.name.clone(),
            backing: Some(backing),
        }
        .release(deadline)?;
        self.acked(report)
    }

    /// Give a caller's buffer ([`Agent::adopt`](crate::Agent::adopt)) back, with what DMA wrote
    /// into it: the same allocation, not a copy. Everything [`Memory::free`] does happens first —
    /// every importer revoked and acknowledged, registrations forgotten, transfers that touch it
    /// ended with [`Error::Revoked`] — so no NIC can reach the buffer once it is returned.
    ///
    /// Refused before anything is revoked for memory the agent allocated. When an importer
    /// missed `deadline`, or something still reaches the buffer, the error says so and the
    /// buffer is not handed back: it is freed once nothing can reach it (on verbs, never —
    /// leaked, since a NIC that did not acknowledge may still write into its pages).
    ///
    /// ```
    /// use std::time::Duration;
    /// use dmaplane::{Agent, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let agent = Agent::builder("a").testbed(Testbed::builtin()?).nics(["nic0"]).build()?;
    /// let buf = vec![7u8; 1 << 20];
    /// let at = buf.as_ptr();
    /// let mem = agent.adopt("mine", buf)?;
    /// let _region = agent.register(&mem)?;
    /// mem.write(0, b"from the agent")?;
    /// let buf = mem.reclaim(Duration::from_secs(1))?;
    /// assert_eq!(buf.as_ptr(), at); // zero-copy both ways
    /// assert_eq!(&buf[..14], b"from the agent");
    /// assert!(mem.is_freed());
    /// # Ok(()) }
    /// ```
    pub fn reclaim(&self, deadline: Duration) -> Result<Vec<u8>> {
        let adopted = self.with_backing(|b| Ok(b.is_adopted()))?;
        if !adopted {
            return Err(Error::invalid(
                format!("reclaim of {}", self.inner.name),
                "memory",
                &self.inner.name,
                "the agent allocated it: only a caller's buffer (Agent::adopt) is handed back; \
                 use free",
            ));
        }
        let (report, backing) = self.revoke_for_good(deadline)?;
        let unacked = self.acked(report).err();
        let gone = |e: &dyn std::fmt::Display| {
            Error::setup(
                &self.inner.name,
                format!("reclaim: the buffer is not handed back: {e}"),
            )
        };
        let buf = match backing {
            Backing::Host(h) => h.into_vec(deadline).map_err(|e| gone(&e)),
            Backing::User(u) => u.into_vec(deadline).map_err(|e| gone(&e)),
            _ => Err(gone(&"not a caller's buffer")),
        };
        match unacked {
            // The fabric refuses every access to an unmapped window, so the sim could give it
            // back; the contract is the same on both backends: no ack, no buffer.
            Some(e) => Err(gone(&e)),
            None => buf,
        }
    }

    /// [`Memory::free`], except that the bytes are kept — unreachable by any NIC, its
    /// registrations gone — until the returned [`Quarantine`] is dropped. A stress run poisons
    /// them at the ack and checks at the end that nothing changed them: any DMA after the ack
    /// would have.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dmaplane::{Agent, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let agent = Agent::builder("a").testbed(Testbed::builtin()?).nics(["nic0"]).build()?;
    /// let mem = agent.alloc_host("buf", 1 << 20)?;
    /// let _region = agent.register(&mem)?;
    /// let (report, q) = mem.free_quarantined(Duration::from_secs(1))?;
    /// assert!(report.is_clean());
    /// assert!(mem.is_freed());
    /// q.fill(0xee)?;
    /// assert_eq!(q.first_change(0xee)?, None); // nothing touched it after the ack
    /// assert_eq!(q.first_change(0x00)?, Some(0)); // and a change would show
    /// # Ok(()) }
    /// ```
    pub fn free_quarantined(&self, deadline: Duration) -> Result<(RevokeReport, Quarantine)> {
        let (report, backing) = self.revoke_for_good(deadline)?;
        let q = Quarantine {
            name: self.inner.name.clone(),
            backing: Some(backing),
        };
        Ok((self.acked(report)?, q))
    }

    /// The revoke's ack, or the error naming who missed the deadline.
    fn acked(&self, report: RevokeReport) -> Result<RevokeReport> {
        if report.is_clean() {
            Ok(report)
        } else {
            Err(Error::setup(
                &self.inner.name,
                format!("free: importers missed the deadline: {report}"),
            ))
        }
    }

    /// The first half of a free: every importer of the memory and of its staging buffers
    /// revoked, its registrations forgotten; the backing handed over for release.
    fn revoke_for_good(&self, deadline: Duration) -> Result<(RevokeReport, Backing)> {
        let backing = {
            let mut b = lock(&self.inner.backing);
            if let Some(epoch) = b.as_ref().map(Backing::epoch) {
                let _ = self.inner.freed_at.set(epoch);
            }
            b.take()
        };
        let Some(backing) = backing else {
            return Err(self.freed());
        };
        // Staging buffers first: the NICs that reach this memory through one stop touching
        // it (and their peers' leases on it are withdrawn) before the memory goes.
        let tied: Vec<Arc<dyn Tied>> = lock(&self.inner.tied)
            .drain(..)
            .filter_map(|w| w.upgrade())
            .collect();
        let owner = self.inner.owner.upgrade();
        let cut_before = owner.as_ref().map_or(0, |a| a.holders_cut_off());
        let start = std::time::Instant::now();
        let staged: Vec<RevokeReport> = tied.iter().map(|t| t.revoke(deadline)).collect();
        let mut report = backing.revoke(deadline);
        // One report: the staging buffers' importers (the NICs that used them, the copy
        // engine) with the memory's own, over the whole free.
        for r in staged {
            report.importers.extend(r.importers);
        }
        report.elapsed_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.forget();
        if let Some(a) = owner {
            a.event(Event::Freed {
                memory: self.inner.name.clone(),
                epoch: report.epoch,
                elapsed_us: report.elapsed_us,
            });
            let cut = a.holders_cut_off().saturating_sub(cut_before);
            if cut > 0 {
                a.event(Event::LeaseCutOff {
                    memory: self.inner.name.clone(),
                    holders: cut,
                });
            }
        }
        Ok((report, backing))
    }

    /// Drop this memory's registrations from the agent's cache.
    fn forget(&self) {
        if let Some(a) = self.inner.owner.upgrade() {
            a.forget(self.inner.id);
        }
    }

    /// The backing export, for registration (`None` once freed).
    pub(crate) fn with_backing<T>(&self, f: impl FnOnce(&Backing) -> Result<T>) -> Result<T> {
        match &*lock(&self.inner.backing) {
            Some(b) => f(b),
            None => Err(self.freed()),
        }
    }

    /// Revoke `t` with this memory (before it) when it is freed.
    pub(crate) fn tie(&self, t: Weak<dyn Tied>) {
        let mut v = lock(&self.inner.tied);
        v.retain(|w| w.strong_count() > 0);
        v.push(t);
    }

    /// Whether `owner` (an agent's shared state) allocated it.
    pub(crate) fn owned_by<T: Owner>(&self, owner: &T) -> bool {
        std::ptr::addr_eq(self.inner.owner.as_ptr(), owner as *const T)
    }

    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }
}

/// The bytes of a freed [`Memory`], kept for checking ([`Memory::free_quarantined`]): every
/// importer was revoked and acknowledged, so from the ack on nothing may change them. Dropping
/// it gives the memory back.
pub struct Quarantine {
    name: String,
    backing: Option<Backing>,
}

impl std::fmt::Debug for Quarantine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quarantine")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Bytes per read or write of a quarantine check.
const QUARANTINE_PIECE: usize = 1 << 20;

impl Quarantine {
    /// The freed memory's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> u64 {
        self.backing.as_ref().map_or(0, Backing::len)
    }

    /// The identity of the memory file behind it, when it is one another process on this host
    /// may have mapped (host memory of a TCP agent): how that process's memory map names it.
    pub fn file_id(&self) -> Option<dmaplane_core::fabric::FileId> {
        match &self.backing {
            Some(Backing::User(u)) => u.file_id(),
            _ => None,
        }
    }

    fn io(&self, offset: u64, io: Io<'_>) -> Result<()> {
        match &self.backing {
            Some(b) if b.io(&self.name, offset, io, true)? => Ok(()),
            _ => Err(Error::setup(
                &self.name,
                "quarantined memory could not be accessed",
            )),
        }
    }

    /// Read `buf.len()` bytes at `offset` (from the host).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.len())
        {
            return Err(Error::invalid(
                format!("quarantine {}", self.name),
                "offset",
                format!("[{offset:#x}, +{:#x})", buf.len()),
                format!("outside its {} bytes", self.len()),
            ));
        }
        self.io(offset, Io::Read(buf))
    }

    /// Fill every byte with `byte` (from the host).
    pub fn fill(&self, byte: u8) -> Result<()> {
        let buf = vec![byte; QUARANTINE_PIECE];
        let mut off = 0;
        while off < self.len() {
            let n = (self.len() - off).min(QUARANTINE_PIECE as u64) as usize;
            self.io(off, Io::Write(&buf[..n]))?;
            off += n as u64;
        }
        Ok(())
    }

    /// The first offset whose byte is not `byte`, or `None` when every byte still is.
    pub fn first_change(&self, byte: u8) -> Result<Option<u64>> {
        let mut buf = vec![0u8; QUARANTINE_PIECE];
        let mut off = 0;
        while off < self.len() {
            let n = (self.len() - off).min(QUARANTINE_PIECE as u64) as usize;
            self.io(off, Io::Read(&mut buf[..n]))?;
            if let Some(i) = buf[..n].iter().position(|&b| b != byte) {
                return Ok(Some(off + i as u64));
            }
            off += n as u64;
        }
        Ok(None)
    }

    /// Give the memory back now (device memory whose importers did not all quiesce stays
    /// allocated, and the error says so).
    pub fn release(mut self, deadline: Duration) -> Result<()> {
        match self.backing.take() {
            Some(Backing::Gpu(g)) => g.free(deadline).map(drop).map_err(Error::from),
            _ => Ok(()),
        }
    }
}

impl Drop for Quarantine {
    fn drop(&mut self) {
        if let Some(Backing::Gpu(g)) = self.backing.take()
            && let Err(e) = g.free(Duration::from_secs(1))
        {
            tracing::warn!(memory = %self.name, error = %e, "quarantined device memory not released");
        }
    }
}
