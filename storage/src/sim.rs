//! A simulated NVMe drive on the fabric: a topology device (`nvme0`) whose media are files (each
//! opened on the drive with [`SimNvme::add_file`], as a file system would map a file to the
//! drive's blocks), and whose engine moves data by DMA through the fabric — so the route rules decide where it may
//! write (a GPU's BAR1 only where the PCIe path allows peer to peer) and the fabric's oracle sees
//! every access, as it sees the NICs'.
//!
//! The contract, as for the other importers:
//!
//! - **Import.** [`SimNvme::import`] negotiates bus addresses (`PciBus`, `CpuPhys` or `Iova`,
//!   read-write, MMIO allowed) with the exporter, which grants the drive access to its window.
//!   A refusal (no P2P route) is the exporter's error, with its reason: the caller bounces
//!   through host memory instead.
//! - **Commands** run on the drive's engine thread in submission order, each in pieces of
//!   [`PIECE`] bytes; each gets exactly one [`Completion`]: the bytes moved (fewer than asked
//!   when a read runs past the end of its file, as the kernel's reads do), `-ECANCELED` when a
//!   revoke stopped it, `-EFAULT` when the fabric refused an access, the media file's own
//!   error when it failed (`-ENOSPC` on a full file system; `-EIO` when it gives none),
//!   `-EBADF` for a write to a file opened read-only.
//! - **Invalidate** (the exporter's thread, never blocks): the buffer is marked revoked, so no
//!   command that has not started on it will, and commands queued on it complete cancelled at
//!   once. If none is executing on it the fence is signalled there and then; else the engine
//!   signals it as soon as the executing one stops, which it does at its next piece.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, Weak};

use dmaplane_core::sync::{lock, wait_timeout};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dmaplane_core::fabric::{DeviceId, Fabric};
use dmaplane_core::revoke::{AttachError, Attachment, Importer, ImporterKind, Invalidation};
use dmaplane_core::{Accept, Access, DmaRange, Fence, SpaceKind};

use crate::error::{Result, StorageError};
use crate::ring::{BufId, Completion, FileId, Request};

/// Bytes a command moves between looks at a revoke.
pub const PIECE: u64 = 128 << 10;
/// The drive's bandwidth by default, bytes per second: a current PCIe 4.0 x4 NVMe drive's
/// sequential rate. The engine is a host thread; paced to this, it leaves the cores to the
/// other simulated devices between pieces, as a real drive's DMA engine would, instead of
/// moving at memcpy speed.
pub const RATE: u64 = 7_000_000_000;
/// Lead over the paced timeline the engine tolerates before it sleeps (below the timer's
/// granularity a sleep would overshoot).
const PACE_SLACK: Duration = Duration::from_micros(100);
/// The longest the engine sleeps between looks at a revoke while it paces.
const PACE_NAP: Duration = Duration::from_millis(1);
/// Commands queued at most (submissions past it are refused, naming the depth).
const QUEUE_DEPTH: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Media to memory.
    Read,
    /// Memory to media.
    Write,
}

#[derive(Debug)]
struct Cmd {
    user_data: u64,
    dir: Dir,
    file: FileId,
    media_off: u64,
    slot: u16,
    buf_off: u64,
    len: u64,
}

#[derive(Debug)]
struct Buf {
    /// Which import of the slot it is: an importer's revoke is matched against it, as slots
    /// are reused.
    import: u64,
    name: String,
    ranges: Vec<DmaRange>,
    len: u64,
    att: Option<Attachment>,
    revoked: Option<u64>,
    /// The fence of a revoke that waits for the executing command.
    fence: Option<Fence>,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Cmd>,
    /// The slot of the command executing now.
    running: Option<u16>,
    done: Vec<Completion>,
    bufs: Vec<Option<Buf>>,
    /// Imports made so far (each one's generation).
    imports: u64,
    /// The files opened on the drive, by [`FileId`]; `None` once removed.
    files: Vec<Option<Media>>,
    stop: bool,
}

/// A file opened on the drive.
#[derive(Debug)]
struct Media {
    file: Arc<std::fs::File>,
    writable: bool,
}

#[derive(Debug)]
struct NvmeInner {
    fabric: Fabric,
    dev: DeviceId,
    name: String,
    state: Mutex<State>,
    /// The engine waits here for commands; reapers wait here for completions.
    work: Condvar,
    reaped: Condvar,
    early_fence: bool,
    /// Bytes per second the drive moves at most (0: as fast as the host copies).
    rate: std::sync::atomic::AtomicU64,
}

/// A simulated NVMe drive. See the module docs for the contract.
#[derive(Debug)]
pub struct SimNvme {
    shared: Arc<NvmeInner>,
    engine: Option<JoinHandle<()>>,
}

impl SimNvme {
    /// The drive `device` (e.g. `nvme0`) of `fabric`'s topology, with no file on it yet.
    pub fn new(fabric: &Fabric, device: &str) -> Result<SimNvme> {
        Self::build(fabric, device, false)
    }

    /// [`SimNvme::new`] whose importers signal their fence the moment they are invalidated,
    /// before anything is stopped: for tests that must show the oracle catches it.
    pub fn with_early_fence(fabric: &Fabric, device: &str) -> Result<SimNvme> {
        Self::build(fabric, device, true)
    }

    fn build(fabric: &Fabric, device: &str, early_fence: bool) -> Result<SimNvme> {
        let dev = fabric.device(device).map_err(|e| {
            StorageError::invalid("simulated NVMe", "device", device, e.to_string())
        })?;
        match fabric.topology().and_then(|t| t.device(device).ok()) {
            Some(d) if d.kind == dmaplane_core::topology::DeviceKind::Nvme => {}
            Some(d) => {
                return Err(StorageError::invalid(
                    "simulated NVMe",
                    "device",
                    device,
                    format!("it is a {:?}, not an NVMe drive", d.kind),
                ));
            }
            None => {}
        }
        let shared = Arc::new(NvmeInner {
            fabric: fabric.clone(),
            dev,
            name: device.to_string(),
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            reaped: Condvar::new(),
            early_fence,
            rate: std::sync::atomic::AtomicU64::new(RATE),
        });
        let weak = Arc::downgrade(&shared);
        let engine = std::thread::Builder::new()
            .name(format!("sim-nvme-{device}"))
            .spawn(move || engine(&weak))
            .map_err(|e| StorageError::os("spawn", "the drive's engine", e))?;
        Ok(SimNvme {
            shared,
            engine: Some(engine),
        })
    }

    /// The drive's fabric device.
    pub fn device(&self) -> DeviceId {
        self.shared.dev
    }

    /// Move at most `bytes_per_sec` (default [`RATE`]); 0 lets the engine run as fast as the
    /// host copies.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.shared
            .rate
            .store(bytes_per_sec, std::sync::atomic::Ordering::Relaxed);
    }

    /// The drive's name (its topology device).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Open the file at `path` on the drive (read-only unless `writable`): commands name it
    /// by the id returned. The file is the media those commands read and write.
    pub fn add_file(&self, path: &std::path::Path, writable: bool) -> Result<FileId> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| StorageError::os("open", path.display().to_string(), e))?;
        let media = Media {
            file: Arc::new(file),
            writable,
        };
        let mut st = lock(&self.shared.state);
        let id = match st.files.iter().position(Option::is_none) {
            Some(i) => {
                st.files[i] = Some(media);
                i
            }
            None => {
                st.files.push(Some(media));
                st.files.len() - 1
            }
        };
        u32::try_from(id)
            .map(FileId)
            .map_err(|_| StorageError::invalid("simulated NVMe", "files", id, "too many files"))
    }

    /// Close file `id` on the drive. Commands queued on it that have not started complete with
    /// `-EBADF`; refused while any is queued, so a later [`SimNvme::add_file`] reusing the id
    /// cannot receive them.
    pub fn remove_file(&self, id: FileId) -> Result<()> {
        let mut st = lock(&self.shared.state);
        let queued = st.queue.iter().filter(|c| c.file == id).count();
        if queued > 0 {
            return Err(StorageError::invalid(
                "simulated NVMe",
                "file",
                id.0,
                format!("{queued} command(s) queued on it: reap them first"),
            ));
        }
        if let Some(slot) = st.files.get_mut(id.0 as usize) {
            *slot = None;
        }
        Ok(())
    }

    /// Forget imported buffer `buf` (its slot is reused by a later import): the importer lets go
    /// of its attachment, as on a revoke, once no command is queued or executing on it; until
    /// then it is refused with [`StorageError::Invalid`] naming what is outstanding.
    pub fn release(&self, buf: BufId) -> Result<()> {
        let mut st = lock(&self.shared.state);
        let queued = st.queue.iter().filter(|c| c.slot == buf.0).count()
            + usize::from(st.running == Some(buf.0));
        if queued > 0 {
            return Err(StorageError::invalid(
                "release of an imported buffer",
                "buffer",
                buf.0,
                format!("{queued} command(s) still queued or executing on it: reap them first"),
            ));
        }
        if let Some(slot) = st.bufs.get_mut(usize::from(buf.0)) {
            *slot = None;
        }
        Ok(())
    }

    /// What the drive's DMA engine takes: bus addresses, read-write, device memory allowed.
    pub fn accepts() -> Vec<Accept> {
        [SpaceKind::PciBus, SpaceKind::CpuPhys, SpaceKind::Iova]
            .into_iter()
            .map(|s| Accept::new(s, Access::READ_WRITE).with_mmio())
            .collect()
    }

    /// Give the drive access to exported memory: `attach` negotiates with [`SimNvme::accepts`]
    /// (pass the drive's [`SimNvme::device`] to the exporter). A refusal is
    /// [`StorageError::Import`] with the exporter's reason (no P2P route to a GPU, say).
    pub fn import<F>(&self, name: &str, attach: F) -> Result<BufId>
    where
        F: FnOnce(Arc<dyn Importer>, &[Accept]) -> std::result::Result<Attachment, AttachError>,
    {
        let err = |why: String| StorageError::Import {
            name: name.to_string(),
            why,
        };
        // The slot is reserved (an empty buffer no command fits in) before the exporter is
        // asked, so a concurrent import cannot take it too.
        let (slot, import) = {
            let mut st = lock(&self.shared.state);
            let free = st.bufs.iter().position(Option::is_none);
            let slot = free.unwrap_or(st.bufs.len());
            if slot >= usize::from(u16::MAX) {
                return Err(err("the drive holds at most 65535 buffers".into()));
            }
            if free.is_none() {
                st.bufs.push(None);
            }
            st.imports += 1;
            let import = st.imports;
            st.bufs[slot] = Some(Buf {
                import,
                name: name.to_string(),
                ranges: Vec::new(),
                len: 0,
                att: None,
                revoked: None,
                fence: None,
            });
            (slot as u16, import)
        };
        let importer = Arc::new(NvmeImporter {
            name: format!("{}/{name}", self.shared.name),
            slot,
            import,
            shared: Arc::downgrade(&self.shared),
        });
        let mapped = attach(importer, &Self::accepts())
            .map_err(|e| err(e.to_string()))
            .and_then(|att| {
                let map = att.map().map_err(|e| err(e.to_string()))?;
                Ok((att, map))
            });
        let mut st = lock(&self.shared.state);
        let Some(Some(b)) = st.bufs.get_mut(usize::from(slot)) else {
            return Err(err("the reserved slot went".into()));
        };
        match mapped {
            // A revoke that came in during the attach marked the reservation: keep it revoked.
            Ok((att, map)) => {
                b.ranges = map.list.ranges().to_vec();
                b.len = map.list.total_len();
                if b.revoked.is_none() {
                    b.att = Some(att);
                }
                Ok(BufId(slot))
            }
            Err(e) => {
                st.bufs[usize::from(slot)] = None;
                Err(e)
            }
        }
    }

    /// Queue a read of `len` bytes of `file` at `at` into `buf` at `buf_off`.
    pub fn read(
        &self,
        (file, at): (FileId, u64),
        (buf, buf_off): (BufId, u64),
        len: u64,
        user_data: u64,
    ) -> Result<()> {
        self.submit(Dir::Read, (file, at), (buf, buf_off), len, user_data)
    }

    /// Queue a write of `len` bytes from `buf` at `buf_off` to `file` at `at`.
    pub fn write(
        &self,
        (file, at): (FileId, u64),
        (buf, buf_off): (BufId, u64),
        len: u64,
        user_data: u64,
    ) -> Result<()> {
        self.submit(Dir::Write, (file, at), (buf, buf_off), len, user_data)
    }

    fn submit(
        &self,
        dir: Dir,
        (file, media_off): (FileId, u64),
        (buf, buf_off): (BufId, u64),
        len: u64,
        user_data: u64,
    ) -> Result<()> {
        let op = match dir {
            Dir::Read => "NVMe read",
            Dir::Write => "NVMe write",
        };
        if len == 0 || len > i32::MAX as u64 {
            return Err(StorageError::invalid(
                op,
                "len",
                len,
                "from 1 byte to 2 GiB - 1 (a completion says the bytes moved in an i32)",
            ));
        }
        let mut st = lock(&self.shared.state);
        if !matches!(st.files.get(file.0 as usize), Some(Some(_))) {
            return Err(StorageError::invalid(
                op,
                "file",
                file.0,
                "no file is open on the drive with that id",
            ));
        }
        let b = match st.bufs.get(usize::from(buf.0)) {
            Some(Some(b)) => b,
            _ => {
                return Err(StorageError::invalid(
                    op,
                    "buffer",
                    buf.0,
                    "the drive has no buffer imported in that slot",
                ));
            }
        };
        if let Some(epoch) = b.revoked {
            return Err(StorageError::Revoked {
                op,
                slot: buf.0,
                name: b.name.clone(),
                epoch,
            });
        }
        if buf_off.checked_add(len).is_none_or(|end| end > b.len) {
            return Err(StorageError::invalid(
                op,
                "range",
                format!("[{buf_off:#x}, +{len:#x})"),
                format!("outside buffer {} of {} bytes", buf.0, b.len),
            ));
        }
        if media_off.checked_add(len).is_none() {
            return Err(StorageError::invalid(
                op,
                "media_off",
                format!("{media_off:#x}"),
                "the end overflows",
            ));
        }
        if st.queue.len() >= QUEUE_DEPTH {
            return Err(StorageError::invalid(
                op,
                "queue",
                st.queue.len(),
                format!("the drive queues at most {QUEUE_DEPTH} commands: reap first"),
            ));
        }
        st.queue.push_back(Cmd {
            user_data,
            dir,
            file,
            media_off,
            slot: buf.0,
            buf_off,
            len,
        });
        drop(st);
        self.shared.work.notify_all();
        Ok(())
    }

    /// Append the completions there are to `out`, waiting up to `wait` for at least one.
    pub fn reap(&self, out: &mut Vec<Completion>, wait: Duration) -> usize {
        let until = Instant::now() + wait;
        let mut st = lock(&self.shared.state);
        while st.done.is_empty() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return 0;
            }
            st = wait_timeout(&self.shared.reaped, st, left).0;
        }
        let n = st.done.len();
        out.append(&mut st.done);
        n
    }
}

impl Drop for SimNvme {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.work.notify_all();
        if let Some(e) = self.engine.take() {
            let _ = e.join();
        }
    }
}

/// The importer of one imported buffer.
struct NvmeImporter {
    name: String,
    slot: u16,
    /// The import it is ([`Buf::import`]): a slot reused since is not its own.
    import: u64,
    shared: Weak<NvmeInner>,
}

impl Importer for NvmeImporter {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> ImporterKind {
        ImporterKind::Pinned
    }

    fn invalidate(&self, inv: Invalidation) {
        let Some(sh) = self.shared.upgrade() else {
            // The drive is gone: nothing of it can execute.
            inv.fence.signal();
            return;
        };
        if sh.early_fence {
            tracing::warn!(importer = %self.name, "injected: fence signalled before the quiesce");
            inv.fence.signal();
        }
        let mut st = lock(&sh.state);
        if !matches!(st.bufs.get(usize::from(self.slot)), Some(Some(b)) if b.import == self.import)
        {
            // Released (or replaced) already: nothing of this import can execute.
            drop(st);
            inv.fence.signal();
            return;
        }
        // Commands on it that have not started never will.
        let mut cancelled = Vec::new();
        st.queue.retain(|c| {
            let keep = c.slot != self.slot;
            if !keep {
                cancelled.push(c.completion(-libc::ECANCELED));
            }
            keep
        });
        st.done.extend(cancelled);
        let running = st.running == Some(self.slot);
        if let Some(Some(b)) = st.bufs.get_mut(usize::from(self.slot)) {
            b.revoked = Some(inv.epoch);
            if running {
                b.fence = Some(inv.fence);
            } else {
                b.att = None;
                inv.fence.signal();
            }
        } else {
            inv.fence.signal();
        }
        drop(st);
        sh.reaped.notify_all();
    }
}

/// The drive's engine: one command at a time, in pieces, a revoke looked at between them.
fn engine(weak: &Weak<NvmeInner>) {
    // When the drive, paced to its rate, is next free.
    let mut free_at = Instant::now();
    loop {
        let Some(sh) = weak.upgrade() else { return };
        let cmd = {
            let mut st = lock(&sh.state);
            loop {
                if st.stop {
                    // The drive goes: what never started completes cancelled.
                    let left: Vec<Completion> = st
                        .queue
                        .drain(..)
                        .map(|c| c.completion(-libc::ECANCELED))
                        .collect();
                    st.done.extend(left);
                    return;
                }
                if let Some(c) = st.queue.pop_front() {
                    st.running = Some(c.slot);
                    let media = match st.files.get(c.file.0 as usize) {
                        Some(Some(m)) if m.writable || c.dir == Dir::Read => Ok(m.file.clone()),
                        Some(Some(_)) => Err(-libc::EBADF),
                        _ => Err(-libc::EBADF),
                    };
                    break (c, media);
                }
                st = wait_timeout(&sh.work, st, Duration::from_millis(50)).0;
            }
        };
        let (cmd, media) = cmd;
        let result = match media {
            Ok(file) => execute(&sh, &file, &cmd, &mut free_at),
            Err(e) => e,
        };
        let mut st = lock(&sh.state);
        st.running = None;
        st.done.push(cmd.completion(result));
        // A revoke that waited for this command: nothing executes on its buffer now.
        if let Some(Some(b)) = st.bufs.get_mut(usize::from(cmd.slot))
            && let Some(f) = b.fence.take()
        {
            b.att = None;
            f.signal();
        }
        drop(st);
        sh.reaped.notify_all();
    }
}

impl Cmd {
    fn completion(&self, result: i32) -> Completion {
        Completion {
            user_data: self.user_data,
            result,
            request: Some(Request {
                write: self.dir == Dir::Write,
                file: self.file,
                at: self.media_off,
                // Commands are at most 2 GiB - 1 (checked at submission).
                len: u32::try_from(self.len).unwrap_or(u32::MAX),
            }),
        }
    }
}

/// Run one command on `media`: its bytes in pieces, stopping at a revoke. Bytes moved (a read
/// stops short at the end of the file), or `-errno`.
fn execute(sh: &NvmeInner, media: &std::fs::File, c: &Cmd, free_at: &mut Instant) -> i32 {
    let mut moved = 0u64;
    let mut piece = vec![0u8; PIECE.min(c.len) as usize];
    while moved < c.len {
        let (ranges, revoked) = {
            let st = lock(&sh.state);
            match st.bufs.get(usize::from(c.slot)) {
                Some(Some(b)) => (b.ranges.clone(), b.revoked.is_some()),
                _ => return -libc::ECANCELED,
            }
        };
        if revoked {
            return -libc::ECANCELED;
        }
        let mut n = (c.len - moved).min(PIECE);
        if c.dir == Dir::Read {
            // Past the end of the file a read comes back short, as the kernel's does.
            let end = match media.metadata() {
                Ok(m) => m.len(),
                Err(_) => return -libc::EIO,
            };
            let at = c.media_off + moved;
            if at >= end {
                break;
            }
            n = n.min(end - at);
        }
        let buf = &mut piece[..n as usize];
        // One piece may straddle ranges of the buffer's list.
        let mut done = 0u64;
        while done < n {
            let Some((addr, run)) = locate(&ranges, c.buf_off + moved + done) else {
                return -libc::EFAULT;
            };
            let k = run.min(n - done);
            let part = &mut buf[done as usize..(done + k) as usize];
            let media_at = c.media_off + moved + done;
            let r = match c.dir {
                Dir::Read => match media.read_exact_at(part, media_at) {
                    Ok(()) => sh
                        .fabric
                        .dma_write(sh.dev, addr, part)
                        .map_err(|_| -libc::EFAULT),
                    // Truncated under the read: it ends short where the file now ends.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return i32::try_from(moved + done).unwrap_or(i32::MAX);
                    }
                    Err(_) => Err(-libc::EIO),
                },
                Dir::Write => match sh.fabric.dma_read(sh.dev, addr, part) {
                    // The file system's own error (ENOSPC on a full one), else EIO.
                    Ok(()) => media
                        .write_all_at(part, media_at)
                        .map_err(|e| -e.raw_os_error().unwrap_or(libc::EIO)),
                    Err(_) => Err(-libc::EFAULT),
                },
            };
            if let Err(e) = r {
                return e;
            }
            done += k;
        }
        moved += n;
        pace(
            sh,
            n,
            free_at,
            || matches!(lock(&sh.state).bufs.get(usize::from(c.slot)), Some(Some(b)) if b.revoked.is_some()),
        );
    }
    i32::try_from(moved).unwrap_or(i32::MAX)
}

/// Hold the engine to the drive's rate: `n` more bytes moved puts the drive's timeline
/// `n / rate` later; the engine sleeps while it is ahead of it.
fn pace(sh: &NvmeInner, n: u64, free_at: &mut Instant, revoked: impl Fn() -> bool) {
    let rate = sh.rate.load(std::sync::atomic::Ordering::Relaxed);
    if rate == 0 {
        return;
    }
    let now = Instant::now();
    let floor = now.checked_sub(PACE_SLACK).unwrap_or(now);
    *free_at = (*free_at).max(floor) + Duration::from_secs_f64(n as f64 / rate as f64);
    // In short naps, so a revoke waiting for this command is looked at soon.
    while Instant::now() + PACE_SLACK < *free_at {
        if revoked() {
            return;
        }
        std::thread::sleep((*free_at - Instant::now()).min(PACE_NAP));
    }
}

/// The bus address of byte `off` of a buffer listed by `ranges`, and how many bytes follow it
/// in the same range.
fn locate(ranges: &[DmaRange], mut off: u64) -> Option<(u64, u64)> {
    for r in ranges {
        if off < r.len {
            return Some((r.addr + off, r.len - off));
        }
        off -= r.len;
    }
    None
}
