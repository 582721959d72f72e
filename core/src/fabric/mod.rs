//! The simulated PCIe fabric: a bus address space of windows backed by real memory.
//!
//! Every DMA names the device that issues it. The fabric checks, in order: a window is mapped at
//! the address, the access is in its bounds, the device holds a grant on the window, the grant
//! allows the access, and the window is not revoked. A violation is counted against the issuing
//! device (the IOMMU-fault / AER analogue) and touches no memory.
//!
//! Each access holds its window's state lock for reading while it copies; revoking a grant or a
//! window takes it for writing. So once [`Grant::revoke`] or [`Fabric::unmap`] returns, no access
//! through it is under way and none can start: this is the exporter's backstop (step 4 of the
//! revoke protocol). Concurrent DMA to the same bytes is the user's race, as on hardware.
//!
//! Whether the importers kept their promises is not the backstop's to say: the fabric's
//! [`Oracle`] (`oracle.rs`) logs every access, fence and ack in one order and judges them.

mod atomic_bytes;
mod bar;
mod export;
mod fault;
mod host;
mod memory;
mod oracle;
mod pinned;
mod pool;
mod view;

use std::collections::BTreeMap;
use std::fmt;

pub use bar::DeviceBar;
pub use export::FABRIC_GRANULE;
pub use fault::{FaultKind, Faults};
pub use host::HostMemory;
pub use memory::{FileId, Lent, Mapping, MappingError};
pub use oracle::{Event, Oracle, RECENT, Verdict, WindowId};
pub use pinned::{PinError, Pinned, dropped_while_pinned};
pub use view::{View, ViewError};

use crate::fence::FenceObserver;
use crate::hints::{Access, Route};
use crate::revoke::AccessGrant;
use crate::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use crate::sync::{Mutex, RwLock, lock, read, write};
use crate::topology::Topology;
use fault::FaultCounters;
use oracle::WindowWatch;
use pool::Pool;

/// Unmapped windows the oracle still judges accesses to (their addresses are never reused).
const RETIRED_WINDOWS: usize = 4096;

/// A device on the fabric (a bus master and/or the owner of windows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct DeviceId(pub u32);

/// Where the first window is placed: above 4 GiB, like a 64-bit BAR.
const BUS_BASE: u64 = 0x10_0000_0000;
/// Windows are placed at this alignment (and 1 GiB for large ones) so page-size selection sees
/// realistic alignment.
const WINDOW_ALIGN: u64 = 2 << 20;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FabricError {
    #[error("unknown fabric device {0:?}")]
    UnknownDevice(DeviceId),
    #[error("no device named {name:?} on the fabric (known: {known})")]
    UnknownDeviceName { name: String, known: String },
    #[error("window size {size:#x} for {owner}: {why}")]
    BadWindow {
        owner: String,
        size: u64,
        why: String,
    },
    #[error("bus address space exhausted placing a {size:#x}-byte window")]
    AddressSpaceFull { size: u64 },
    #[error("memory for {owner}: {source}")]
    Mapping {
        owner: String,
        #[source]
        source: Arc<MappingError>,
    },
    #[error(
        "{name}: the buffer is still reached through {holders} other handle(s) of its window \
         (an importer kept a mapping past its revoke); it stays allocated until they go and is \
         freed then, never handed back while a device can reach it"
    )]
    StillMapped { name: String, holders: usize },
    #[error("{name}: not a caller's buffer (only memory adopted from a Vec can be handed back)")]
    NotAdopted { name: String },
    #[error(
        "{name}: an importer that DMAs by process VA (the kernel's: io_uring, ibv_reg_mr) missed \
         a revoke's deadline, so the buffer is leaked — never handed back or freed while it may \
         still write"
    )]
    KeptForKernel { name: String },
}

/// A DMA the fabric refused. Counted against `device`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DMA {dir} by {device_name} at {addr:#x} (+{len:#x}) faulted: {kind}")]
pub struct DmaFault {
    pub device: DeviceId,
    pub device_name: String,
    pub dir: &'static str,
    pub addr: u64,
    pub len: u64,
    pub kind: FaultKind,
}

#[derive(Debug)]
struct DeviceEntry {
    name: String,
    faults: FaultCounters,
}

#[derive(Debug)]
struct WindowState {
    revoked: bool,
    grants: Vec<(u64, DeviceId, Access)>,
}

#[derive(Debug)]
struct Window {
    base: u64,
    len: u64,
    owner: DeviceId,
    mem: Arc<Mapping>,
    state: RwLock<WindowState>,
    /// Writers of `state` waiting for it (a revoke, an unmap, a new grant): a multi-packet
    /// transfer that holds the state between packets lets go when it sees one.
    writers: std::sync::atomic::AtomicUsize,
    /// Where the memory goes when the last handle is dropped.
    pool: Weak<Pool>,
    watch: Arc<WindowWatch>,
    oracle: Arc<Oracle>,
    /// Fault injection: grants of this fabric cannot be revoked (no backstop).
    no_backstop: Arc<std::sync::atomic::AtomicBool>,
    /// Leaked for good ([`WindowHandle::keep`]).
    kept: std::sync::atomic::AtomicBool,
}

impl Drop for Window {
    fn drop(&mut self) {
        if let Some(p) = self.pool.upgrade() {
            // The field drops right after this, leaving the pool the only owner.
            p.put(self.mem.clone());
        }
    }
}

impl Window {
    /// Take the state for writing, announced first to transfers holding it between packets.
    fn write_state(&self) -> crate::sync::RwLockWriteGuard<'_, WindowState> {
        self.writers
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let g = write(&self.state);
        self.writers
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        g
    }

    fn writer_waiting(&self) -> bool {
        self.writers.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.base
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= self.base + self.len)
    }
}

#[derive(Debug)]
struct Inner {
    topology: Option<Arc<Topology>>,
    devices: RwLock<Vec<Arc<DeviceEntry>>>,
    windows: RwLock<BTreeMap<u64, Arc<Window>>>,
    next_base: Mutex<u64>,
    next_grant: AtomicU64,
    // The oracle's bookkeeping stays std under loom (never held across a loom operation).
    next_window: std::sync::atomic::AtomicU64,
    pool: Arc<Pool>,
    oracle: Arc<Oracle>,
    /// Unmapped windows by base: (length, watch), the newest [`RETIRED_WINDOWS`].
    retired: std::sync::Mutex<BTreeMap<u64, (u64, Arc<WindowWatch>)>>,
    reuse_before_ack: std::sync::atomic::AtomicBool,
    no_backstop: Arc<std::sync::atomic::AtomicBool>,
}

/// The simulated fabric. Cheap to clone; clones share everything.
#[derive(Debug, Clone)]
pub struct Fabric {
    inner: Arc<Inner>,
}

impl Default for Fabric {
    fn default() -> Self {
        Fabric::new()
    }
}

/// A mapped window; dropping it does not unmap (the exporter calls [`Fabric::unmap`]).
#[derive(Debug, Clone)]
pub struct WindowHandle {
    window: Arc<Window>,
}

impl WindowHandle {
    pub fn base(&self) -> u64 {
        self.window.base
    }
    pub fn len(&self) -> u64 {
        self.window.len
    }
    pub fn is_empty(&self) -> bool {
        self.window.len == 0
    }
    pub fn owner(&self) -> DeviceId {
        self.window.owner
    }
    pub fn memory(&self) -> &Mapping {
        &self.window.mem
    }
    /// Keep the window (and its memory) alive for good: an importer the fabric cannot stop may
    /// still write into it. It is never pooled, freed or handed back.
    pub(crate) fn keep(&self) {
        self.window
            .kept
            .store(true, std::sync::atomic::Ordering::SeqCst);
        std::mem::forget(self.clone());
    }

    pub(crate) fn is_kept(&self) -> bool {
        self.window.kept.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The memory behind an unmapped window, consuming this handle: `Ok` once this is the last
    /// handle of the window and nothing else holds its memory. A DMA that looked the window up
    /// before the unmap holds it for the moment it takes to be refused (the window is revoked),
    /// so the other holders get until `deadline` to let go; `Err(n)`: `n` still hold it.
    pub(crate) fn into_memory(self, deadline: std::time::Duration) -> Result<Mapping, usize> {
        let until = std::time::Instant::now() + deadline;
        let mut window = self.window;
        let window = loop {
            match Arc::try_unwrap(window) {
                Ok(w) => break w,
                Err(w) if std::time::Instant::now() >= until => {
                    return Err(Arc::strong_count(&w) - 1);
                }
                Err(w) => {
                    window = w;
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
            }
        };
        // The window's drop would give the memory to the pool: take it out first.
        let mem = window.mem.clone();
        drop(window);
        Arc::try_unwrap(mem).map_err(|m| Arc::strong_count(&m) - 1)
    }
    /// The window's identity in the oracle's log.
    pub fn id(&self) -> WindowId {
        self.window.watch.id
    }
}

/// One device's right to access one window. [`AccessGrant::revoke`] removes it and waits for
/// accesses under way; dropping the grant revokes it too.
#[derive(Debug)]
pub struct Grant {
    window: Arc<Window>,
    id: u64,
    device: DeviceId,
}

impl Grant {
    pub fn device(&self) -> DeviceId {
        self.device
    }
}

impl AccessGrant for Grant {
    fn revoke(&self) {
        if self
            .window
            .no_backstop
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        // The write lock waits for every DMA holding the read side: after this, none can land.
        let mut st = self.window.write_state();
        if st.grants.iter().any(|g| g.0 == self.id) {
            // Logged before the grant goes, so every refusal it causes comes after it.
            let w = &self.window;
            w.oracle.grant_cut(&w.watch, self.device);
            st.grants.retain(|g| g.0 != self.id);
        }
    }

    fn fence_observer(&self) -> Option<Arc<dyn FenceObserver>> {
        Some(Arc::new(GrantWatch {
            window: self.window.clone(),
            device: self.device,
        }))
    }
}

/// Puts a fence signal for one grant in the oracle's log.
#[derive(Debug)]
struct GrantWatch {
    window: Arc<Window>,
    device: DeviceId,
}

impl FenceObserver for GrantWatch {
    fn signalled(&self, importer: &str) {
        self.window
            .oracle
            .fence(&self.window.watch, self.device, importer);
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.revoke();
    }
}

impl Fabric {
    /// An empty fabric with no topology: every route is `Local`.
    pub fn new() -> Fabric {
        Fabric::build(None)
    }

    /// A fabric whose devices are the topology's devices (same names, same order).
    pub fn with_topology(topology: Topology) -> Fabric {
        let names: Vec<String> = topology.devices().iter().map(|d| d.id.clone()).collect();
        let f = Fabric::build(Some(Arc::new(topology)));
        for n in names {
            f.add_device(&n);
        }
        f
    }

    fn build(topology: Option<Arc<Topology>>) -> Fabric {
        Fabric {
            inner: Arc::new(Inner {
                topology,
                devices: RwLock::new(Vec::new()),
                windows: RwLock::new(BTreeMap::new()),
                next_base: Mutex::new(BUS_BASE),
                next_grant: AtomicU64::new(1),
                next_window: std::sync::atomic::AtomicU64::new(1),
                pool: Arc::new(Pool::default()),
                oracle: Arc::new(Oracle::new()),
                retired: std::sync::Mutex::new(BTreeMap::new()),
                reuse_before_ack: std::sync::atomic::AtomicBool::new(false),
                no_backstop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            }),
        }
    }

    pub fn topology(&self) -> Option<&Topology> {
        self.inner.topology.as_deref()
    }

    /// The observer of every access, fence and ack on this fabric.
    pub fn oracle(&self) -> &Oracle {
        &self.inner.oracle
    }

    /// Fault injection for the exporters of this fabric: when on, each one writes its memory
    /// (reuses it) as soon as its revoke starts, before the importers are done and before its
    /// ack. The oracle must call it `reused_before_ack`.
    pub fn inject_reuse_before_ack(&self, on: bool) {
        self.inner
            .reuse_before_ack
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Fault injection: from now on revoking a grant does nothing — the exporter has no backstop,
    /// as a dma-buf exporter passes no grant to revoke. A lying importer's DMA then lands after
    /// the ack, and only the oracle (and the poison) can tell.
    pub fn inject_no_backstop(&self, on: bool) {
        self.inner
            .no_backstop
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn reuses_before_ack(&self) -> bool {
        self.inner
            .reuse_before_ack
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The exporter of `window` starts a revoke or move (logged before any importer hears of it).
    pub(crate) fn revoke_begins(&self, window: &WindowHandle) {
        self.inner.oracle.revoke_begin(&window.window.watch);
    }

    /// The exporter of `window` acks: its revoke report is about to be returned.
    pub(crate) fn acked(&self, window: &WindowHandle) {
        self.inner.oracle.ack(&window.window.watch);
    }

    /// Register a device (a bus master); its fault counters start at zero.
    pub fn add_device(&self, name: &str) -> DeviceId {
        let mut devs = write(&self.inner.devices);
        let id = DeviceId(devs.len() as u32);
        devs.push(Arc::new(DeviceEntry {
            name: name.to_string(),
            faults: FaultCounters::default(),
        }));
        id
    }

    pub fn device(&self, name: &str) -> Result<DeviceId, FabricError> {
        let devs = read(&self.inner.devices);
        match devs.iter().position(|d| d.name == name) {
            Some(i) => Ok(DeviceId(i as u32)),
            None => Err(FabricError::UnknownDeviceName {
                name: name.to_string(),
                known: devs
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    fn entry(&self, dev: DeviceId) -> Result<Arc<DeviceEntry>, FabricError> {
        read(&self.inner.devices)
            .get(dev.0 as usize)
            .cloned()
            .ok_or(FabricError::UnknownDevice(dev))
    }

    pub fn device_name(&self, dev: DeviceId) -> String {
        self.entry(dev)
            .map(|e| e.name.clone())
            .unwrap_or_else(|_| format!("device#{}", dev.0))
    }

    /// The P2P route between two devices, from the topology (`Local` without one).
    pub fn route(&self, a: DeviceId, b: DeviceId) -> Route {
        let Some(topo) = self.topology() else {
            return Route::Local;
        };
        let (na, nb) = (self.device_name(a), self.device_name(b));
        match (topo.device_index(&na), topo.device_index(&nb)) {
            (Ok(ta), Ok(tb)) => topo.route(ta, tb),
            // A device outside the topology (added by hand) has no known P2P path.
            _ => Route::NotSupported,
        }
    }

    /// Faults counted against a device so far.
    pub fn faults(&self, dev: DeviceId) -> Faults {
        self.entry(dev)
            .map(|e| e.faults.snapshot())
            .unwrap_or_default()
    }

    /// Map `mem` as a window owned by `owner` at a fresh bus address.
    pub fn map(&self, owner: DeviceId, mem: Mapping) -> Result<WindowHandle, FabricError> {
        let owner_name = self.entry(owner)?.name.clone();
        let len = mem.len() as u64;
        let align = if len >= 1 << 30 {
            1 << 30
        } else {
            WINDOW_ALIGN
        };
        let base = {
            let mut next = lock(&self.inner.next_base);
            let base = next
                .checked_next_multiple_of(align)
                .ok_or(FabricError::AddressSpaceFull { size: len })?;
            *next = base
                .checked_add(len)
                .ok_or(FabricError::AddressSpaceFull { size: len })?;
            base
        };
        let window = Arc::new(Window {
            base,
            len,
            owner,
            mem: Arc::new(mem),
            state: RwLock::new(WindowState {
                revoked: false,
                grants: Vec::new(),
            }),
            writers: std::sync::atomic::AtomicUsize::new(0),
            pool: Arc::downgrade(&self.inner.pool),
            watch: Arc::new(WindowWatch::new(WindowId(
                self.inner
                    .next_window
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ))),
            oracle: self.inner.oracle.clone(),
            no_backstop: self.inner.no_backstop.clone(),
            kept: std::sync::atomic::AtomicBool::new(false),
        });
        write(&self.inner.windows).insert(base, window.clone());
        tracing::debug!(owner = %owner_name, base, len, "window mapped");
        Ok(WindowHandle { window })
    }

    /// Allocate host memory (memfd) or BAR memory (anonymous) and map it.
    pub fn map_new(
        &self,
        owner: DeviceId,
        size: u64,
        host: bool,
    ) -> Result<WindowHandle, FabricError> {
        let name = self.device_name(owner);
        let recycled = match usize::try_from(size) {
            Ok(len) if host => self.inner.pool.take(len),
            _ => None,
        };
        if let Some(mem) = recycled {
            return self.map(owner, mem);
        }
        let mem = if host {
            Mapping::memfd(&name, size)
        } else {
            Mapping::anonymous(size)
        }
        .map_err(|e| FabricError::Mapping {
            owner: name,
            source: Arc::new(e),
        })?;
        self.map(owner, mem)
    }

    /// Give `device` access to a window.
    pub fn grant(&self, window: &WindowHandle, device: DeviceId, access: Access) -> Grant {
        let id = self.inner.next_grant.fetch_add(1, Ordering::Relaxed);
        window
            .window
            .write_state()
            .grants
            .push((id, device, access));
        Grant {
            window: window.window.clone(),
            id,
            device,
        }
    }

    /// Mark a window revoked (every later access faults) and remove it from the address space.
    /// Waits for accesses under way.
    pub fn unmap(&self, window: &WindowHandle) {
        {
            let mut st = window.window.write_state();
            st.revoked = true;
            st.grants.clear();
        }
        // Retired before it leaves the address space: an access that no longer finds the window
        // still finds its watch.
        let w = &window.window;
        {
            let mut retired = lock(&self.inner.retired);
            retired.insert(w.base, (w.len, w.watch.clone()));
            while retired.len() > RETIRED_WINDOWS {
                retired.pop_first();
            }
        }
        write(&self.inner.windows).remove(&w.base);
    }

    /// The oracle's watch on an address that no longer has a window.
    fn retired_watch(&self, addr: u64) -> Option<Arc<WindowWatch>> {
        lock(&self.inner.retired)
            .range(..=addr)
            .next_back()
            .filter(|(base, (len, _))| addr < *base + *len)
            .map(|(_, (_, w))| w.clone())
    }

    fn find(&self, addr: u64) -> Option<Arc<Window>> {
        let windows = read(&self.inner.windows);
        windows
            .range(..=addr)
            .next_back()
            .map(|(_, w)| w.clone())
            .filter(|w| addr < w.base + w.len)
    }

    /// Run `f` on the window holding `[addr, addr+len)` with its state read-locked, after every
    /// check passed, and tell the oracle the memory was touched; otherwise count the fault, tell
    /// the oracle what was refused, and return the fault.
    fn access<R>(
        &self,
        dev: DeviceId,
        dir: &'static str,
        addr: u64,
        len: u64,
        need: Access,
        f: impl FnOnce(&Window, &WindowState) -> R,
    ) -> Result<R, DmaFault> {
        let (kind, watch) = match self.find(addr) {
            None => (FaultKind::Unmapped, self.retired_watch(addr)),
            Some(w) if !w.contains(addr, len) => (FaultKind::OutOfBounds, None),
            Some(w) => {
                let st = read(&w.state);
                let kind = if st.revoked {
                    FaultKind::Revoked
                } else {
                    match st.grants.iter().find(|g| g.1 == dev) {
                        None => FaultKind::NoGrant,
                        Some(g) if !g.2.contains(need) => FaultKind::AccessDenied,
                        Some(_) => {
                            let r = f(&w, &st);
                            // Still under the read lock: before the device can complete it.
                            w.oracle.dma(&w.watch, dev, &|d| self.device_name(d));
                            return Ok(r);
                        }
                    }
                };
                drop(st);
                (kind, Some(w.watch.clone()))
            }
        };
        if let Some(watch) = watch
            && matches!(
                kind,
                FaultKind::Unmapped | FaultKind::NoGrant | FaultKind::Revoked
            )
        {
            self.inner
                .oracle
                .refused(&watch, dev, &|d| self.device_name(d));
        }
        Err(self.fault(dev, dir, addr, len, kind))
    }

    fn fault(
        &self,
        dev: DeviceId,
        dir: &'static str,
        addr: u64,
        len: u64,
        kind: FaultKind,
    ) -> DmaFault {
        let entry = self.entry(dev);
        if let Ok(e) = &entry {
            e.faults.count(kind);
        }
        let device_name = entry.map(|e| e.name.clone()).unwrap_or_default();
        tracing::trace!(%device_name, dir, addr, len, ?kind, "DMA fault");
        DmaFault {
            device: dev,
            device_name,
            dir,
            addr,
            len,
            kind,
        }
    }

    /// `dev` writes `data` at bus address `addr`.
    pub fn dma_write(&self, dev: DeviceId, addr: u64, data: &[u8]) -> Result<(), DmaFault> {
        self.access(
            dev,
            "write",
            addr,
            data.len() as u64,
            Access::WRITE,
            |w, _| w.mem.write(addr - w.base, data),
        )
        .map(|_| ())
    }

    /// `dev` reads `buf.len()` bytes at bus address `addr`.
    pub fn dma_read(&self, dev: DeviceId, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        self.access(dev, "read", addr, buf.len() as u64, Access::READ, |w, _| {
            w.mem.read(addr - w.base, buf)
        })
        .map(|_| ())
    }

    /// `dev` copies `len` bytes from `src` to `dst` (a copy engine, or a NIC moving data between
    /// two windows): both windows are checked and held for the duration of the copy.
    pub fn dma_copy(&self, dev: DeviceId, src: u64, dst: u64, len: u64) -> Result<(), DmaFault> {
        let n = usize::try_from(len).unwrap_or(usize::MAX);
        self.access(dev, "read", src, len, Access::READ, |sw, st| {
            if sw.contains(dst, len) {
                // Same window: its lock is already held, so check the write grant in place.
                if st
                    .grants
                    .iter()
                    .any(|g| g.1 == dev && g.2.contains(Access::WRITE))
                {
                    sw.mem.copy_from(dst - sw.base, &sw.mem, src - sw.base, n);
                    return Ok(());
                }
                return Err(self.fault(dev, "write", dst, len, FaultKind::AccessDenied));
            }
            self.access(dev, "write", dst, len, Access::WRITE, |dw, _| {
                dw.mem.copy_from(dst - dw.base, &sw.mem, src - sw.base, n);
            })
        })?
    }

    /// `src_dev` reads `len` bytes at `src` and `dst_dev` writes them at `dst` — an RDMA
    /// transfer between two NICs' views of the fabric (requester reads, responder writes, or
    /// the reverse for RDMA READ). Each side is checked against its own device's grant; both
    /// windows are held for the duration of the copy.
    pub fn dma_transfer(
        &self,
        src_dev: DeviceId,
        src: u64,
        dst_dev: DeviceId,
        dst: u64,
        len: u64,
    ) -> Result<(), DmaFault> {
        if src_dev == dst_dev {
            return self.dma_copy(src_dev, src, dst, len);
        }
        let n = usize::try_from(len).unwrap_or(usize::MAX);
        self.access(src_dev, "read", src, len, Access::READ, |sw, st| {
            if sw.contains(dst, len) {
                // Same window (loopback): its lock is held, check the writer's grant in place.
                if st
                    .grants
                    .iter()
                    .any(|g| g.1 == dst_dev && g.2.contains(Access::WRITE))
                {
                    sw.mem.copy_from(dst - sw.base, &sw.mem, src - sw.base, n);
                    return Ok(());
                }
                return Err(self.fault(dst_dev, "write", dst, len, FaultKind::NoGrant));
            }
            self.access(dst_dev, "write", dst, len, Access::WRITE, |dw, _| {
                dw.mem.copy_from(dst - dw.base, &sw.mem, src - sw.base, n);
            })
        })?
    }

    /// `src_dev` reads and `dst_dev` writes `len` bytes from `src` to `dst` in packets of
    /// `packet` bytes: a NIC moving one RDMA message. Each side is checked as in
    /// [`Fabric::dma_transfer`]. The windows stay held from one packet to the next while nobody
    /// waits for them; as soon as a writer does (a revoke, an unmap), the transfer lets go after
    /// the packet under way and checks both sides again before the next one — so a revoke gets
    /// in after at most one packet and meets the message half landed. Before every packet but the
    /// first it asks `go_on`; when that says no, it stops. Returns the bytes moved; a fault on a
    /// later packet leaves the earlier ones landed.
    pub fn dma_transfer_packets(
        &self,
        (src_dev, src): (DeviceId, u64),
        (dst_dev, dst): (DeviceId, u64),
        len: u64,
        packet: u64,
        go_on: &mut dyn FnMut() -> bool,
    ) -> Result<u64, DmaFault> {
        enum Step {
            Done,
            Stopped,
            Yield,
        }
        let packet = packet.max(1);
        let mut done = 0u64;
        while done < len {
            let left = len - done;
            let (s0, d0) = (src + done, dst + done);
            // Moves packets between two held windows until done, stopped or a writer waits.
            let mut run = |sw: &Window, dw: &Window, done: &mut u64| -> Step {
                loop {
                    let n = (len - *done).min(packet);
                    let (so, d_o) = (src + *done - sw.base, dst + *done - dw.base);
                    let n_us = usize::try_from(n).unwrap_or(usize::MAX);
                    dw.mem.copy_from(d_o, &sw.mem, so, n_us);
                    *done += n;
                    if *done == len {
                        return Step::Done;
                    }
                    if !go_on() {
                        return Step::Stopped;
                    }
                    if sw.writer_waiting() || dw.writer_waiting() {
                        return Step::Yield;
                    }
                }
            };
            let step = if src_dev == dst_dev {
                // One device on both sides (a loopback or a copy): packet by packet.
                self.dma_copy(src_dev, s0, d0, left.min(packet))?;
                done += left.min(packet);
                if done < len && !go_on() {
                    Step::Stopped
                } else {
                    Step::Done
                }
            } else {
                self.access(src_dev, "read", s0, left, Access::READ, |sw, st| {
                    if sw.contains(d0, left) {
                        // Same window: its lock is held, check the writer's grant in place.
                        if !st
                            .grants
                            .iter()
                            .any(|g| g.1 == dst_dev && g.2.contains(Access::WRITE))
                        {
                            return Err(self.fault(dst_dev, "write", d0, left, FaultKind::NoGrant));
                        }
                        return Ok(run(sw, sw, &mut done));
                    }
                    self.access(dst_dev, "write", d0, left, Access::WRITE, |dw, _| {
                        run(sw, dw, &mut done)
                    })
                })??
            };
            match step {
                Step::Done if done == len => break,
                Step::Done => continue,
                Step::Stopped => break,
                Step::Yield => std::thread::yield_now(),
            }
        }
        Ok(done)
    }

    /// CPU access to a window by its owner (the exporter's own view of its memory), bypassing
    /// grants but not revocation.
    pub fn cpu_write(&self, window: &WindowHandle, off: u64, data: &[u8]) -> bool {
        let st = read(&window.window.state);
        let done = !st.revoked && window.window.mem.write(off, data);
        if done {
            self.inner.oracle.owner_access(&window.window.watch);
        }
        done
    }

    pub fn cpu_read(&self, window: &WindowHandle, off: u64, buf: &mut [u8]) -> bool {
        let st = read(&window.window.state);
        let done = !st.revoked && window.window.mem.read(off, buf);
        if done {
            self.inner.oracle.owner_access(&window.window.watch);
        }
        done
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device#{}", self.0)
    }
}
