//! The agent's drive: file I/O between [`FileRegion`](crate::FileRegion)s and registered memory,
//! on the testbed's simulated NVMe drive.
//!
//! The contract:
//! - **Reach.** Memory is imported into the drive once (cached, per memory and export epoch)
//!   through the same negotiation as a NIC's: host memory and a GPU's BAR1 where the route
//!   allows go direct; a GPU the drive cannot reach peer to peer goes through a host bounce
//!   buffer on the GPU's NUMA node, two pieces long, that the drive and the GPU's copy engine
//!   import — the drive fills one piece while the copy engine empties the other.
//! - **Requests.** A transfer is split into pieces of the agent's chunk size; at most
//!   [`MAX_COMMANDS`] are queued on the drive at once, the rest are queued here. Every piece the
//!   drive took gets exactly one completion, reaped by the drive's thread; a transfer ends
//!   only when every piece it queued on the drive has completed, so nothing of it is still
//!   moving when [`FileTransfer::wait`] returns.
//! - **Errors.** The first failure ends the transfer: pieces not yet on the drive are never
//!   queued, those on it are reaped. A short read is an error that says where the file ends
//!   now (it was truncated under the read), the drive's `-errno` is said in words.
//! - **Revoke.** Freeing the memory revokes the drive's importer like a NIC's: the drive
//!   cancels the commands not started on it and stops the executing one at its next piece
//!   before the exporter's fence; the bounce buffer is revoked with the memory. The transfer
//!   ends with [`Error::Revoked`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use dmaplane_core::Route;
use dmaplane_gpu::Peer as GpuPeer;
use dmaplane_storage::sim::SimNvme;
use dmaplane_storage::{BufId, Completion, FileId, StorageError};

use crate::agent::Shared;
use crate::desc::Desc;
use crate::error::{Error, Result, Side};
use crate::file::{FileEntry, StoragePath};
use crate::memory::{Backing, Memory};
use crate::region::Entry;
use crate::stage::{Stage, staging};
use crate::sync::lock;

/// Commands the agent keeps queued on its drive at most.
pub const MAX_COMMANDS: usize = 256;
/// Pieces of a bounce buffer (two: one filling while the other empties).
const BOUNCE_PIECES: u64 = 2;

/// The agent's drive. See the module docs for the contract.
pub(crate) struct Drive {
    pub(crate) name: String,
    agent: String,
    nvme: SimNvme,
    /// Route lookups and bounce placement.
    testbed: Arc<crate::testbed::Testbed>,
    chunk: u64,
    force_bounce: bool,
    st: Mutex<State>,
    /// Transfers' waiters wait here.
    finished: Condvar,
}

#[derive(Default)]
struct State {
    /// memory id → how the drive reaches it.
    imports: HashMap<u64, Import>,
    ops: HashMap<u64, Op>,
    /// Command user data → (transfer, piece).
    cmds: HashMap<u64, (u64, Piece)>,
    next_ud: u64,
    next_op: u64,
    /// Imported buffers to let go of once nothing is queued on them.
    releases: Vec<BufId>,
}

#[derive(Clone)]
struct Import {
    epoch: u64,
    /// `None`: the memory bounces.
    buf: Option<BufId>,
    path: StoragePath,
}

struct Op {
    write: bool,
    queue: VecDeque<Piece>,
    in_flight: usize,
    moved: u64,
    error: Option<Error>,
    bounces: Vec<Bounce>,
    /// Its handle was dropped: forget it once finished.
    detached: bool,
    finished: bool,
}

/// A bounce buffer of one transfer for one memory: [`BOUNCE_PIECES`] pieces.
struct Bounce {
    memory: u64,
    stage: Arc<Stage>,
    buf: BufId,
    /// Offsets of its free pieces.
    free: Vec<u64>,
}

struct Piece {
    file: Arc<FileEntry>,
    /// Absolute file offset.
    at: u64,
    len: u64,
    region: Arc<Entry>,
    /// Absolute memory offset.
    mem_off: u64,
    target: Target,
}

#[derive(Clone, Copy)]
enum Target {
    Direct(BufId),
    /// Through bounce `idx` of the transfer; `slot` once it holds a piece of it.
    Bounce {
        idx: usize,
        slot: Option<u64>,
    },
}

impl Drive {
    /// The drive `device` of the testbed, for `shared`'s agent, with its reaping thread.
    pub(crate) fn open(shared: &Shared, device: &str) -> Result<Arc<Drive>> {
        let Some(tb) = shared.testbed() else {
            return Err(Error::setup(
                &shared.name,
                "file regions on the verbs backend need the io_uring path, which the agent does \
                 not drive yet (issue 14); the simulated testbed's drive has them",
            ));
        };
        let nvme = if shared.fault == Some(dmaplane_rdma::Fault::EarlyFence) {
            SimNvme::with_early_fence(tb.fabric(), device)?
        } else {
            SimNvme::new(tb.fabric(), device)?
        };
        if let Some(rate) = shared.cfg.drive_rate {
            nvme.set_rate(rate);
        }
        let d = Arc::new(Drive {
            name: device.to_string(),
            agent: shared.name.clone(),
            nvme,
            testbed: tb.clone(),
            chunk: shared.cfg.chunk,
            force_bounce: shared.cfg.force_staging,
            st: Mutex::new(State::default()),
            finished: Condvar::new(),
        });
        let weak = Arc::downgrade(&d);
        std::thread::Builder::new()
            .name(format!("dmaplane-{}-{device}", shared.name))
            .spawn(move || reaper(&weak))
            .map_err(|e| Error::setup(&shared.name, format!("spawn the drive's thread: {e}")))?;
        Ok(d)
    }

    pub(crate) fn add_file(&self, path: &std::path::Path, writable: bool) -> Result<FileId> {
        Ok(self.nvme.add_file(path, writable)?)
    }

    pub(crate) fn remove_file(&self, id: FileId) {
        self.nvme.remove_file(id);
    }

    /// How the drive reaches `memory` (importing it on first use, or after a revoke moved its
    /// epoch).
    pub(crate) fn reach(&self, shared: &Shared, memory: &Memory) -> Result<StoragePath> {
        Ok(self.import(shared, memory)?.path)
    }

    fn import(&self, _shared: &Shared, memory: &Memory) -> Result<Import> {
        let epoch = memory.with_backing(|b| Ok(b.epoch()))?;
        let mut st = lock(&self.st);
        if let Some(i) = st.imports.get(&memory.id()) {
            if i.epoch == epoch {
                return Ok(i.clone());
            }
            if let Some(b) = i.buf {
                st.releases.push(b);
            }
            st.imports.remove(&memory.id());
        }
        let dev = self.nvme.device();
        let device = memory.location().device().to_string();
        let route = self
            .testbed
            .topology()
            .route_by_id(&device, &self.name)
            .map_err(|e| Error::setup(&self.agent, e.to_string()))?;
        let name = memory.name().to_string();
        let is_gpu = matches!(memory.location(), crate::Location::Gpu(_));
        let imported = if is_gpu && self.force_bounce {
            Err(format!(
                "agent {} stages all GPU memory (force_staging)",
                self.agent
            ))
        } else {
            memory
                .with_backing(|b| {
                    Ok(match b {
                        Backing::Host(h) => self.nvme.import(&name, |i, a| h.attach(i, dev, a)),
                        Backing::Gpu(g) => self
                            .nvme
                            .import(&name, |i, a| g.attach(i, GpuPeer::Fabric(dev), a)),
                        #[allow(unreachable_patterns)]
                        _ => Err(StorageError::Import {
                            name: name.clone(),
                            why: "only the simulated testbed's memory reaches its drive".into(),
                        }),
                    })
                })?
                .map_err(|e| match e {
                    StorageError::Import { why, .. } => why,
                    other => other.to_string(),
                })
        };
        let import = match imported {
            Ok(buf) => Import {
                epoch,
                buf: Some(buf),
                path: StoragePath::Direct {
                    drive: self.name.clone(),
                    route: format!("{route:?}"),
                },
            },
            Err(why) if is_gpu => {
                let topo = self.testbed.topology();
                let through = topo
                    .numa_of(&device)
                    .ok()
                    .and_then(|n| topo.host_memory_for_numa(n))
                    .map_or_else(|| "host memory".to_string(), |d| d.id.clone());
                Import {
                    epoch,
                    buf: None,
                    path: StoragePath::Bounced {
                        drive: self.name.clone(),
                        through,
                        why,
                    },
                }
            }
            Err(why) => {
                return Err(Error::invalid(
                    format!("file I/O on {}", memory.name()),
                    "memory",
                    memory.location(),
                    format!("drive {} cannot reach it: {why}", self.name),
                ));
            }
        };
        if route == Route::NotSupported && import.buf.is_some() {
            tracing::debug!(memory = %name, drive = %self.name, "imported though the topology has no P2P route");
        }
        st.imports.insert(memory.id(), import.clone());
        Ok(import)
    }

    /// Start moving `pairs` between files and memory: `write` from memory to file.
    pub(crate) fn start(
        self: &Arc<Drive>,
        shared: &Shared,
        write: bool,
        pairs: Vec<Pair>,
    ) -> Result<FileTransfer> {
        let mut bounces: Vec<Bounce> = Vec::new();
        let mut paths = Vec::new();
        let mut queue = VecDeque::new();
        let mut total = 0u64;
        for Pair {
            file,
            at,
            region,
            mem_off,
            len,
        } in pairs
        {
            let memory = &region.memory;
            let import = self.import(shared, memory)?;
            if !paths.contains(&import.path) {
                paths.push(import.path.clone());
            }
            let target = match import.buf {
                Some(b) => Target::Direct(b),
                None => {
                    let idx = match bounces.iter().position(|b| b.memory == memory.id()) {
                        Some(i) => i,
                        None => {
                            bounces.push(self.bounce(shared, memory)?);
                            bounces.len() - 1
                        }
                    };
                    Target::Bounce { idx, slot: None }
                }
            };
            let mut done = 0;
            while done < len {
                let n = (len - done).min(self.chunk);
                queue.push_back(Piece {
                    file: file.clone(),
                    at: at + done,
                    len: n,
                    region: region.clone(),
                    mem_off: mem_off + done,
                    target,
                });
                done += n;
            }
            total += len;
        }
        let mut st = lock(&self.st);
        let id = st.next_op;
        st.next_op += 1;
        st.ops.insert(
            id,
            Op {
                write,
                queue,
                in_flight: 0,
                moved: 0,
                error: None,
                bounces,
                detached: false,
                finished: false,
            },
        );
        self.pump(&mut st);
        drop(st);
        self.finished.notify_all();
        Ok(FileTransfer {
            drive: self.clone(),
            id,
            total,
            paths,
        })
    }

    /// A bounce buffer for `memory` (GPU memory the drive cannot reach), imported by the drive
    /// and the GPU's copy engine, revoked with the memory.
    fn bounce(&self, shared: &Shared, memory: &Memory) -> Result<Bounce> {
        let len = BOUNCE_PIECES * self.chunk;
        let stage = staging(shared, memory, len)?;
        memory.track_stage(&stage);
        let dev = self.nvme.device();
        let buf = self
            .nvme
            .import(&stage.name, |i, a| stage.host.attach(i, dev, a))?;
        Ok(Bounce {
            memory: memory.id(),
            stage,
            buf,
            free: (0..BOUNCE_PIECES).rev().map(|k| k * self.chunk).collect(),
        })
    }

    /// Queue what the transfers have room for on the drive.
    fn pump(&self, st: &mut State) {
        let mut queued: usize = st.cmds.len();
        let ids: Vec<u64> = st.ops.keys().copied().collect();
        for id in ids {
            loop {
                if queued >= MAX_COMMANDS {
                    return;
                }
                let ud = st.next_ud;
                let Some(op) = st.ops.get_mut(&id) else { break };
                if op.error.is_some() || op.finished {
                    break;
                }
                let Some(mut p) = op.queue.pop_front() else {
                    break;
                };
                let (buf, off) = match &mut p.target {
                    Target::Direct(b) => (*b, p.mem_off),
                    Target::Bounce { idx, slot } => {
                        let b = &mut op.bounces[*idx];
                        let Some(s) = b.free.pop() else {
                            op.queue.push_front(p);
                            break;
                        };
                        *slot = Some(s);
                        (b.buf, s)
                    }
                };
                let mut result = Ok(());
                if op.write
                    && let Target::Bounce { idx, .. } = p.target
                {
                    // Out of device memory into the bounce piece before the drive takes it.
                    let b = &op.bounces[idx];
                    result = b
                        .stage
                        .copy_at(&p.region.memory, p.mem_off, off, p.len, true)
                        .map_err(|e| revoked_or(&p, e));
                }
                if result.is_ok() {
                    let at = (p.file.media, p.at);
                    result = if op.write {
                        self.nvme.write(at, (buf, off), p.len, ud)
                    } else {
                        self.nvme.read(at, (buf, off), p.len, ud)
                    }
                    .map_err(|e| storage_error(&p, op.write, e));
                }
                match result {
                    Ok(()) => {
                        op.in_flight += 1;
                        st.next_ud += 1;
                        st.cmds.insert(ud, (id, p));
                        queued += 1;
                    }
                    Err(e) => {
                        free_slot(op, &p);
                        fail(op, e);
                        self.settle(st, id);
                        break;
                    }
                }
            }
        }
    }

    /// Account one completion of the drive.
    fn complete(&self, st: &mut State, c: &Completion) {
        let Some((id, p)) = st.cmds.remove(&c.user_data) else {
            tracing::warn!(drive = %self.name, user_data = c.user_data, "a completion for no command");
            return;
        };
        let Some(op) = st.ops.get_mut(&id) else {
            return;
        };
        op.in_flight -= 1;
        let judged = judge(&p, op.write, c.result);
        let result = match (judged, p.target) {
            (Ok(()), Target::Bounce { idx, slot: Some(s) }) if !op.write && op.error.is_none() => {
                // Out of the bounce piece into device memory, on this thread, while the
                // drive fills the other piece.
                op.bounces[idx]
                    .stage
                    .copy_at(&p.region.memory, p.mem_off, s, p.len, false)
                    .map_err(|e| revoked_or(&p, e))
            }
            (r, _) => r,
        };
        free_slot(op, &p);
        match result {
            Ok(()) => op.moved += p.len,
            Err(e) => fail(op, e),
        }
        self.settle(st, id);
    }

    /// Finish transfer `id` if nothing of it is left on the drive and nothing more will go.
    fn settle(&self, st: &mut State, id: u64) {
        let Some(op) = st.ops.get_mut(&id) else {
            return;
        };
        if op.in_flight > 0 || (op.error.is_none() && !op.queue.is_empty()) {
            return;
        }
        op.queue.clear();
        op.finished = true;
        // Nothing of it is on the drive: its bounce buffers go now (before their memory).
        let bufs: Vec<BufId> = op.bounces.iter().map(|b| b.buf).collect();
        for b in bufs {
            if self.nvme.release(b).is_err() {
                st.releases.push(b);
            }
        }
        if op.detached {
            st.ops.remove(&id);
        }
        self.finished.notify_all();
    }

    /// Let go of imported buffers nothing is queued on any more.
    fn release(&self, st: &mut State) {
        let nvme = &self.nvme;
        st.releases.retain(|&b| nvme.release(b).is_err());
    }
}

/// Give a bounce piece back to its buffer.
fn free_slot(op: &mut Op, p: &Piece) {
    if let Target::Bounce { idx, slot: Some(s) } = p.target {
        op.bounces[idx].free.push(s);
    }
}

fn fail(op: &mut Op, e: Error) {
    if op.error.is_none() {
        op.error = Some(e);
    }
    op.queue.clear();
}

/// A revoke if the piece's memory was revoked (what made the copy fail), else `e`.
fn revoked_or(p: &Piece, e: Error) -> Error {
    revoked(p, "the copy engine's view of it was revoked mid-transfer").unwrap_or(e)
}

/// [`Error::Revoked`] for the piece's memory, if it was revoked or freed.
fn revoked(p: &Piece, why: &str) -> Option<Error> {
    let e = &p.region;
    let epoch = e
        .revoked_at()
        .or_else(|| e.memory.is_freed().then_some(e.epoch + 1))?;
    Some(Error::Revoked {
        side: Side::Local,
        region: e.id,
        name: e.memory.name().to_string(),
        epoch,
        why: why.to_string(),
    })
}

/// A refused submission, as the agent says it.
fn storage_error(p: &Piece, write: bool, e: StorageError) -> Error {
    match e {
        StorageError::Revoked { .. } => {
            revoked(p, "the drive refused a request on it").unwrap_or_else(|| Error::from(e))
        }
        other => Error::File {
            op: if write { "write" } else { "read" },
            path: p.file.path.display().to_string(),
            offset: p.at,
            len: p.len,
            why: other.to_string(),
        },
    }
}

/// What a completion's result says of the piece.
fn judge(p: &Piece, write: bool, result: i32) -> Result<()> {
    let op = if write { "write" } else { "read" };
    let file = |why: String| Error::File {
        op,
        path: p.file.path.display().to_string(),
        offset: p.at,
        len: p.len,
        why,
    };
    if let Ok(n) = u64::try_from(result) {
        if n == p.len {
            return Ok(());
        }
        let now = p.file.direct.len().ok();
        return Err(file(match (write, now) {
            (false, Some(end)) => format!(
                "short read: {n} of {} bytes; the file ends at {end:#x} now (it was {:#x} when \
                 registered: was it truncated during the read?)",
                p.len, p.file.file_len
            ),
            (false, None) => format!("short read: {n} of {} bytes", p.len),
            (true, _) => format!(
                "short write: {n} of {} bytes (is the file system full?)",
                p.len
            ),
        }));
    }
    let errno = result.saturating_neg();
    if (errno == libc::ECANCELED || errno == libc::EFAULT)
        && let Some(r) = revoked(
            p,
            if errno == libc::ECANCELED {
                "the drive cancelled or stopped the request when the memory was revoked"
            } else {
                "the fabric refused the drive's DMA: the memory was revoked"
            },
        )
    {
        return Err(r);
    }
    Err(file(dmaplane_storage::ring::errno_why(
        &std::io::Error::from_raw_os_error(errno),
    )))
}

/// The drive's thread: reap, account, queue more, until the agent lets go of the drive.
fn reaper(weak: &Weak<Drive>) {
    let mut out = Vec::new();
    loop {
        let Some(d) = weak.upgrade() else { return };
        d.nvme.reap(&mut out, Duration::from_millis(20));
        let mut st = lock(&d.st);
        for c in out.drain(..) {
            d.complete(&mut st, &c);
        }
        d.pump(&mut st);
        d.release(&mut st);
    }
}

/// File I/O under way ([`crate::Agent::read_file`], [`crate::Agent::write_file`]). Dropping it
/// does not stop it: what was queued still completes.
pub struct FileTransfer {
    drive: Arc<Drive>,
    id: u64,
    total: u64,
    paths: Vec<StoragePath>,
}

impl std::fmt::Debug for FileTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileTransfer")
            .field("id", &self.id)
            .field("drive", &self.drive.name)
            .field("bytes", &self.total)
            .finish()
    }
}

impl FileTransfer {
    /// Bytes it moves when done.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether it moves nothing (never true: empty descriptors are refused).
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// How the drive reaches each memory the transfer touches.
    pub fn paths(&self) -> &[StoragePath] {
        &self.paths
    }

    /// Whether it ended (done or failed).
    pub fn is_done(&self) -> bool {
        lock(&self.drive.st)
            .ops
            .get(&self.id)
            .is_none_or(|o| o.finished)
    }

    /// Wait up to `timeout` for it to end: the bytes moved, or the first error (every piece on
    /// the drive completed first). [`Error::WaitTimeout`] leaves it going.
    pub fn wait(&self, timeout: Duration) -> Result<u64> {
        let until = Instant::now() + timeout;
        let mut st = lock(&self.drive.st);
        loop {
            match st.ops.get(&self.id) {
                Some(op) if op.finished => {
                    return match &op.error {
                        Some(e) => Err(e.clone()),
                        None => Ok(op.moved),
                    };
                }
                Some(_) => {}
                None => {
                    return Err(Error::setup(&self.drive.agent, "file transfer forgotten"));
                }
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::WaitTimeout {
                    transfer: self.id,
                    peer: format!("drive {}", self.drive.name),
                    waited: timeout,
                });
            }
            st = self
                .drive
                .finished
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for FileTransfer {
    fn drop(&mut self) {
        let mut st = lock(&self.drive.st);
        match st.ops.get_mut(&self.id) {
            Some(op) if op.finished => {
                st.ops.remove(&self.id);
            }
            Some(op) => op.detached = true,
            None => {}
        }
    }
}

/// The owner's side of a peer's transfer on a published file region: read `len` bytes at
/// `off` of the region from the file into its buffer (`land` false: before the peer's READ), or
/// write them from the buffer to the file (`land`: after the peer's WRITE landed), and wait.
pub(crate) fn serve(
    s: &Shared,
    region: &Arc<Entry>,
    (file, at): (&Arc<FileEntry>, u64),
    (off, len): (u64, u64),
    land: bool,
) -> Result<u64> {
    let op = if land { "write" } else { "read" };
    if land && !file.writable {
        return Err(Error::invalid(
            format!("peer's {op} of {}", file.path.display()),
            "file region",
            file.id,
            "published read-only: register it with FileSpec::writable",
        ));
    }
    if at + off + len > file.len {
        return Err(Error::invalid(
            format!("peer's {op} of {}", file.path.display()),
            "range",
            format!("[{off:#x}, +{len:#x})"),
            format!("outside the published {} bytes", file.len - at),
        ));
    }
    let file_at = file.base + at + off;
    let mem_off = region.base + off;
    file.check(op, file_at, len, mem_off)?;
    let pair = Pair {
        file: file.clone(),
        at: file_at,
        region: region.clone(),
        mem_off,
        len,
    };
    s.drive()?
        .start(s, land, vec![pair])?
        .wait(s.cfg.stall_timeout)
}

/// One checked pair of a file transfer.
pub(crate) struct Pair {
    file: Arc<FileEntry>,
    /// Absolute file offset.
    at: u64,
    region: Arc<Entry>,
    /// Absolute memory offset.
    mem_off: u64,
    len: u64,
}

/// Check `pairs` of (file desc, memory desc) for a transfer and resolve them.
pub(crate) fn resolve(
    shared: &Shared,
    write: bool,
    files: &[Desc],
    memory: &[Desc],
) -> Result<Vec<Pair>> {
    let op = if write { "write_file" } else { "read_file" };
    let what = || format!("{op} of agent {}", shared.name);
    if files.len() != memory.len() || files.is_empty() {
        return Err(Error::invalid(
            what(),
            "descriptors",
            format!("{} file, {} memory", files.len(), memory.len()),
            "one memory descriptor per file descriptor, at least one",
        ));
    }
    let mut out = Vec::with_capacity(files.len());
    for (i, (f, m)) in files.iter().zip(memory).enumerate() {
        let Some(fe) = shared.file_entry(f.region) else {
            return Err(Error::invalid(
                what(),
                "file region",
                f.region,
                format!("pair {i}: no such file registration (deregistered?)"),
            ));
        };
        let Some(me) = shared.entry(m.region) else {
            return Err(Error::invalid(
                what(),
                "memory region",
                m.region,
                format!("pair {i}: no such memory registration"),
            ));
        };
        if let Some(epoch) = me.revoked_at() {
            return Err(Error::Revoked {
                side: Side::Local,
                region: me.id,
                name: me.memory.name().to_string(),
                epoch,
                why: format!("{} before the file transfer started", me.gone_why()),
            });
        }
        if f.len != m.len || f.len == 0 {
            return Err(Error::invalid(
                what(),
                "len",
                format!("file {} / memory {}", f.len, m.len),
                format!("pair {i}: both sides must be the same, positive length"),
            ));
        }
        if f.offset.checked_add(f.len).is_none_or(|e| e > fe.len) {
            return Err(Error::invalid(
                what(),
                "file desc",
                format!("[{:#x}, +{:#x})", f.offset, f.len),
                format!(
                    "pair {i}: outside file region {} of {} bytes",
                    fe.id, fe.len
                ),
            ));
        }
        if m.offset.checked_add(m.len).is_none_or(|e| e > me.len) {
            return Err(Error::invalid(
                what(),
                "memory desc",
                format!("[{:#x}, +{:#x})", m.offset, m.len),
                format!(
                    "pair {i}: outside memory region {} of {} bytes",
                    me.id, me.len
                ),
            ));
        }
        if write && !fe.writable {
            return Err(Error::invalid(
                what(),
                "file region",
                format!("{} ({})", fe.id, fe.path.display()),
                "registered read-only: register it with FileSpec::writable",
            ));
        }
        if fe.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::invalid(
                what(),
                "file region",
                fe.id,
                "it was deregistered",
            ));
        }
        let at = fe.base + f.offset;
        let mem_off = me.base + m.offset;
        fe.check(op, at, f.len, mem_off)?;
        out.push(Pair {
            file: fe,
            at,
            region: me,
            mem_off,
            len: f.len,
        });
    }
    Ok(out)
}
