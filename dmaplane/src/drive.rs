//! The agent's drive: file I/O between [`FileRegion`](crate::FileRegion)s and registered memory,
//! on one of two engines:
//!
//! - **The testbed's simulated NVMe drive** (`sim`, the default on the testbed): a device on the
//!   fabric that DMAs by bus address — into a GPU's BAR1 where the route allows (GPUDirect
//!   Storage) — judged by the fabric's oracle.
//! - **This host's kernel** (`io_uring`, [`crate::AgentBuilder::io_uring`], and always on verbs):
//!   one io_uring owned by the drive's thread, `O_DIRECT` files registered with it, host memory
//!   registered as fixed buffers by its process address; GPU memory goes through a host bounce
//!   buffer and the GPU's copy engine. The kernel does this DMA: its revokes are the ring's
//!   (`dmaplane-storage`'s `import.rs`).
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

use dmaplane_core::{Invalid, Route};
use dmaplane_gpu::DmaClient;
use dmaplane_storage::sim::SimNvme;
use dmaplane_storage::{BufId, Completion, DirectFile, FileId, Ring, StorageError};

use crate::error::{Error, Result, Side};
use crate::file::{FileEntry, FileMedia, StoragePath};
use crate::memory::{Backing, Memory, Tied};
use crate::platform::Platform;
use crate::region::MemoryEntry;
use crate::stage::{Stage, cuda_bounce, staging};
use crate::sync::{lock, wait_timeout};

/// Commands the agent keeps queued on its drive at most.
pub const MAX_COMMANDS: usize = 256;
/// Pieces of a bounce buffer (two: one filling while the other empties).
const BOUNCE_PIECES: u64 = 2;

/// The agent's drive. See the module docs for the contract.
pub(crate) struct Drive {
    pub(crate) name: String,
    agent: String,
    engine: DriveBackend,
    /// Route lookups and bounce placement (`None` on verbs).
    testbed: Option<Arc<crate::testbed::Testbed>>,
    /// The fabric device importers attach as (the drive; for the kernel, the drive it stands
    /// for, whose route the topology knows).
    dev: Option<dmaplane_core::fabric::DeviceId>,
    chunk: u64,
    force_bounce: bool,
    st: Mutex<State>,
    /// Transfers' waiters wait here.
    finished: Condvar,
    /// The kernel engine's thread waits here for work.
    work: Condvar,
    /// For the kernel engine's thread. Its own lock, taken after `st` or alone (never the
    /// other way): a file registration dropped under `st` queues its removal here.
    jobs: Mutex<VecDeque<Job>>,
    /// Held across an import (look-up, attach, insert): one memory is imported once.
    importing: Mutex<()>,
}

/// How the agent's drive is opened (from the agent's configuration).
#[derive(Debug, Clone)]
pub(crate) struct DriveOptions {
    /// The agent's name, for messages and thread names.
    pub(crate) agent: String,
    /// The testbed's NVMe drive to use (`None`: its first; on verbs, the kernel).
    pub(crate) device: Option<String>,
    /// Through this host's kernel (io_uring, `O_DIRECT`) instead of the simulated drive.
    pub(crate) io_uring: bool,
    /// The simulated drive's bandwidth (`None`: its default).
    pub(crate) rate: Option<u64>,
    /// Bytes per piece a transfer is cut into.
    pub(crate) chunk: u64,
    /// Bounce through host memory even where the drive reaches the memory.
    pub(crate) force_bounce: bool,
}

/// What moves the bytes.
enum DriveBackend {
    Sim(SimNvme),
    /// The ring lives on the drive's thread; the rest of the agent hands it [`Job`]s.
    Kernel,
}

/// What only the kernel engine's thread may do (it owns the ring).
enum Job {
    Import {
        name: String,
        attach: AttachFn,
        reply: std::sync::mpsc::Sender<std::result::Result<BufId, StorageError>>,
    },
    AddFile {
        file: Arc<DirectFile>,
        reply: std::sync::mpsc::Sender<std::result::Result<FileId, StorageError>>,
    },
    RemoveFile(FileId),
}

/// An exporter's attach, run on the ring's thread.
type AttachFn = Box<
    dyn FnOnce(
            Arc<dyn dmaplane_core::revoke::Importer>,
            &[dmaplane_core::Accept],
        )
            -> std::result::Result<dmaplane_core::Attachment, dmaplane_core::AttachError>
        + Send,
>;

/// Queue depth of the kernel engine's ring, and its file and import slots.
const RING_DEPTH: u32 = 256;
const RING_FILES: u32 = 1024;
const RING_IMPORTS: u16 = 1024;

#[derive(Default)]
struct State {
    /// memory id → how the drive reaches it.
    imports: HashMap<u64, Import>,
    ops: HashMap<u64, Op>,
    /// Command user data → (transfer, piece).
    cmds: HashMap<u64, (u64, Piece)>,
    next_ud: u64,
    next_op: u64,
    /// Imported buffers to let go of once nothing is queued on them, each with what keeps its
    /// memory alive until then (a bounce buffer's stage).
    releases: Vec<(BufId, Option<Arc<Stage>>)>,
    /// Pieces and transfers done with, dropped only once `st` is unlocked: their last
    /// references (a file registration, a memory, a bounce buffer) may revoke importers or
    /// queue jobs, which must not happen under it.
    trash: Vec<Piece>,
    trash_ops: Vec<Op>,
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
    /// Whoever awaits it ([`FileTransfer`] as a `Future`): woken when it ends.
    waker: Option<std::task::Waker>,
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
    region: Arc<MemoryEntry>,
    /// Absolute memory offset.
    mem_off: u64,
    target: PieceBuffer,
}

#[derive(Clone, Copy)]
enum PieceBuffer {
    Direct(BufId),
    /// Through bounce `idx` of the transfer; `slot` once it holds a piece of it.
    Bounce {
        idx: usize,
        slot: Option<u64>,
    },
}

impl FileMedia for Drive {
    fn remove_file(&self, id: FileId) {
        match &self.engine {
            DriveBackend::Sim(nvme) => {
                if let Err(e) = nvme.remove_file(id) {
                    tracing::warn!(drive = %self.name, error = %e, "closing a file on the drive");
                }
            }
            DriveBackend::Kernel => {
                lock(&self.jobs).push_back(Job::RemoveFile(id));
                self.work.notify_all();
            }
        }
    }
}

impl Drive {
    /// The drive `device` of the testbed (or, on verbs, this host's kernel), opened as `opts`
    /// say, with its thread.
    pub(crate) fn open(
        opts: &DriveOptions,
        platform: &Platform,
        device: &str,
    ) -> Result<Arc<Drive>> {
        let tb = platform.testbed().cloned();
        let kernel = tb.is_none() || opts.io_uring;
        let dev = match &tb {
            Some(tb) => Some(tb.device(device)?),
            None => None,
        };
        let engine = match &tb {
            Some(tb) if !kernel => {
                let nvme = if platform.fault() == Some(dmaplane_rdma::Fault::EarlyFence) {
                    SimNvme::with_early_fence(tb.fabric(), device)?
                } else {
                    SimNvme::new(tb.fabric(), device)?
                };
                if let Some(rate) = opts.rate {
                    nvme.set_rate(rate);
                }
                DriveBackend::Sim(nvme)
            }
            _ => DriveBackend::Kernel,
        };
        // The kernel's ring is built on the drive's thread, which alone submits to and reaps it
        // (SINGLE_ISSUER, DEFER_TASKRUN: the kernel runs completion work when it reaps).
        let ring = kernel.then(|| {
            Ring::builder()
                .depth(RING_DEPTH)
                .file_slots(RING_FILES)
                .import_slots(RING_IMPORTS)
                .single_issuer(true)
                .inject_early_fence(platform.fault() == Some(dmaplane_rdma::Fault::EarlyFence))
        });
        let name = if kernel {
            "io_uring".to_string()
        } else {
            device.to_string()
        };
        let d = Arc::new(Drive {
            name: name.clone(),
            agent: opts.agent.clone(),
            engine,
            testbed: tb,
            dev,
            chunk: opts.chunk,
            force_bounce: opts.force_bounce,
            st: Mutex::new(State::default()),
            finished: Condvar::new(),
            work: Condvar::new(),
            jobs: Mutex::new(VecDeque::new()),
            importing: Mutex::new(()),
        });
        let weak = Arc::downgrade(&d);
        let (built_tx, built_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("dmaplane-{}-{name}", opts.agent))
            .spawn(move || match ring {
                Some(b) => match b.build() {
                    Ok(ring) => {
                        let _ = built_tx.send(Ok(()));
                        ring_thread(&weak, ring);
                    }
                    Err(e) => {
                        let _ = built_tx.send(Err(e));
                    }
                },
                None => {
                    let _ = built_tx.send(Ok(()));
                    reaper(&weak);
                }
            })
            .map_err(|e| Error::setup(&opts.agent, format!("spawn the drive's thread: {e}")))?;
        match built_rx.recv() {
            Ok(Ok(())) => Ok(d),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(Error::setup(
                &opts.agent,
                "the drive's thread ended at once",
            )),
        }
    }

    /// Run `job` on the kernel engine's thread and wait for its answer.
    fn ask<T>(
        &self,
        job: impl FnOnce(std::sync::mpsc::Sender<std::result::Result<T, StorageError>>) -> Job,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        lock(&self.jobs).push_back(job(tx));
        self.work.notify_all();
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(r) => Ok(r?),
            Err(_) => Err(Error::setup(
                &self.agent,
                format!("drive {}: its thread did not answer", self.name),
            )),
        }
    }

    pub(crate) fn add_file(&self, file: &Arc<DirectFile>, writable: bool) -> Result<FileId> {
        match &self.engine {
            DriveBackend::Sim(nvme) => Ok(nvme.add_file(file.path(), writable)?),
            DriveBackend::Kernel => {
                let file = file.clone();
                self.ask(|reply| Job::AddFile { file, reply })
            }
        }
    }

    /// Import exported memory into the engine: `attach` negotiates with what it accepts.
    fn attach(&self, name: &str, attach: AttachFn) -> std::result::Result<BufId, StorageError> {
        match &self.engine {
            DriveBackend::Sim(nvme) => nvme.import(name, attach),
            DriveBackend::Kernel => {
                let name = name.to_string();
                self.ask(|reply| Job::Import {
                    name,
                    attach,
                    reply,
                })
                .map_err(|e| StorageError::Import {
                    name: String::new(),
                    why: e.to_string(),
                })
            }
        }
    }

    /// Unlock `st`, then drop what it set aside.
    fn unlock(&self, mut st: std::sync::MutexGuard<'_, State>) {
        let trash = std::mem::take(&mut st.trash);
        let ops = std::mem::take(&mut st.trash_ops);
        drop(st);
        drop(trash);
        drop(ops);
    }

    pub(crate) fn is_kernel(&self) -> bool {
        matches!(self.engine, DriveBackend::Kernel)
    }

    /// How the drive reaches `memory` (importing it on first use, or after a revoke moved its
    /// epoch).
    pub(crate) fn reach(&self, memory: &Memory) -> Result<StoragePath> {
        Ok(self.import(memory)?.path)
    }

    fn import(&self, memory: &Memory) -> Result<Import> {
        let _one = lock(&self.importing);
        let epoch = memory.with_backing(|b| Ok(b.epoch()))?;
        {
            let mut st = lock(&self.st);
            if let Some(i) = st.imports.get(&memory.id()) {
                if i.epoch == epoch {
                    return Ok(i.clone());
                }
                if let Some(b) = i.buf {
                    st.releases.push((b, None));
                }
                st.imports.remove(&memory.id());
            }
        }
        let device = memory.location().device().to_string();
        let route = match &self.testbed {
            Some(tb) if !self.is_kernel() => Some(
                tb.topology()
                    .route_by_id(&device, &self.name)
                    .map_err(|e| Error::setup(&self.agent, e.to_string()))?,
            ),
            _ => None,
        };
        let name = memory.name().to_string();
        let is_gpu = matches!(memory.location(), crate::Location::Gpu(_));
        let imported = if is_gpu && self.force_bounce {
            Err(format!(
                "agent {} stages all GPU memory (force_staging)",
                self.agent
            ))
        } else if is_gpu && self.is_kernel() {
            Err(
                "the kernel's O_DIRECT reads into host memory: GPU memory goes through a host \
                 bounce buffer and the GPU's copy engine"
                    .to_string(),
            )
        } else {
            let mem = memory.clone();
            let dev = self.dev;
            let attach: AttachFn = Box::new(move |i, a| {
                mem.with_backing(|b| Ok(attach_backing(b, dev, i, a)))
                    .unwrap_or_else(|e| {
                        Err(dmaplane_core::AttachError::Exporter {
                            export: mem.name().to_string(),
                            what: e.to_string(),
                        })
                    })
            });
            self.attach(&name, attach).map_err(|e| match e {
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
                    route: route.map_or_else(
                        || "the kernel's (O_DIRECT into the memory's process address)".into(),
                        |r| format!("{r:?}"),
                    ),
                },
            },
            Err(why) if is_gpu => {
                let through = self.testbed.as_ref().map_or_else(
                    || "this process's host memory, registered with cuMemHostRegister".to_string(),
                    |tb| {
                        let topo = tb.topology();
                        topo.numa_of(&device)
                            .ok()
                            .and_then(|n| topo.host_memory_for_numa(n))
                            .map_or_else(|| "host memory".to_string(), |d| d.id.clone())
                    },
                );
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
        if route == Some(Route::NotSupported) && import.buf.is_some() {
            tracing::debug!(memory = %name, drive = %self.name, "imported though the topology has no P2P route");
        }
        let mut st = lock(&self.st);
        if let Some(old) = st.imports.insert(memory.id(), import.clone())
            && let Some(b) = old.buf
        {
            st.releases.push((b, None));
        }
        Ok(import)
    }

    /// Start moving `pairs` between files and memory: `write` from memory to file.
    pub(crate) fn start(
        self: &Arc<Drive>,
        platform: &Platform,
        write: bool,
        pairs: Vec<Pair>,
    ) -> Result<FileTransfer> {
        let mut bounces: Vec<Bounce> = Vec::new();
        let mut paths = Vec::new();
        let mut queue = VecDeque::new();
        let mut total = 0u64;
        let built = self.plan(
            platform,
            pairs,
            &mut bounces,
            &mut paths,
            &mut queue,
            &mut total,
        );
        if let Err(e) = built {
            // The bounce buffers made so far go, once the engine has let go of them.
            let mut st = lock(&self.st);
            for b in bounces {
                st.releases.push((b.buf, Some(b.stage)));
            }
            self.unlock(st);
            return Err(e);
        }
        if queue.is_empty() {
            return Err(Error::invalid(
                format!("file I/O of agent {}", self.agent),
                "descriptors",
                0,
                "nothing to move",
            ));
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
                waker: None,
            },
        );
        self.pump(&mut st, None);
        self.unlock(st);
        self.finished.notify_all();
        Ok(FileTransfer {
            drive: self.clone(),
            id,
            total,
            paths,
        })
    }

    /// Import every pair's memory (or make its bounce buffer) and cut the pairs into pieces.
    fn plan(
        &self,
        platform: &Platform,
        pairs: Vec<Pair>,
        bounces: &mut Vec<Bounce>,
        paths: &mut Vec<StoragePath>,
        queue: &mut VecDeque<Piece>,
        total: &mut u64,
    ) -> Result<()> {
        for Pair {
            file,
            at,
            region,
            mem_off,
            len,
        } in pairs
        {
            let memory = &region.memory;
            let import = self.import(memory)?;
            if !paths.contains(&import.path) {
                paths.push(import.path.clone());
            }
            let target = match import.buf {
                Some(b) => PieceBuffer::Direct(b),
                None => {
                    let idx = match bounces.iter().position(|b| b.memory == memory.id()) {
                        Some(i) => i,
                        None => {
                            bounces.push(self.bounce(platform, memory)?);
                            bounces.len() - 1
                        }
                    };
                    PieceBuffer::Bounce { idx, slot: None }
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
            *total += len;
        }
        Ok(())
    }

    /// A bounce buffer for `memory` (GPU memory the drive cannot reach), imported by the drive
    /// and the GPU's copy engine, revoked with the memory.
    fn bounce(&self, platform: &Platform, memory: &Memory) -> Result<Bounce> {
        let len = BOUNCE_PIECES * self.chunk;
        // On the testbed host memory on the GPU's NUMA node; with CUDA this process's memory,
        // registered with the copy engine.
        let stage = if memory.location().device().starts_with("cuda:") {
            cuda_bounce(platform, memory, len)?
        } else {
            staging(platform, memory, len)?
        };
        memory.tie(Arc::downgrade(&stage) as Weak<dyn Tied>);
        let (st, dev) = (stage.clone(), self.dev);
        let buf = self.attach(&stage.name, Box::new(move |i, a| st.host.attach(i, dev, a)))?;
        Ok(Bounce {
            memory: memory.id(),
            stage,
            buf,
            free: (0..BOUNCE_PIECES).rev().map(|k| k * self.chunk).collect(),
        })
    }

    /// Queue what the transfers have room for on the drive: on the simulated one from any
    /// thread, on the kernel's only from its thread (which passes its ring).
    fn pump(&self, st: &mut State, ring: Option<&mut Ring>) {
        match (&self.engine, ring) {
            (DriveBackend::Sim(nvme), _) => self.pump_with(st, &mut |write, at, buf, len, ud| {
                if write {
                    nvme.write(at, buf, len, ud)
                } else {
                    nvme.read(at, buf, len, ud)
                }
            }),
            (DriveBackend::Kernel, Some(ring)) => {
                self.pump_with(st, &mut |write, at, buf, len, ud| {
                    let len = u32::try_from(len).map_err(|_| {
                        StorageError::Invalid(Invalid::new(
                            "io_uring",
                            "len",
                            len,
                            "at most 4 GiB - 1",
                        ))
                    })?;
                    if write {
                        ring.write(at, buf, len, ud)
                    } else {
                        ring.read(at, buf, len, ud)
                    }
                });
                if let Err(e) = ring.submit() {
                    tracing::warn!(drive = %self.name, error = %e, "io_uring submit");
                }
            }
            // Only the ring's thread submits: wake it.
            (DriveBackend::Kernel, None) => self.work.notify_all(),
        }
    }

    fn pump_with(&self, st: &mut State, submit: &mut Submit<'_>) {
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
                    PieceBuffer::Direct(b) => (*b, p.mem_off),
                    PieceBuffer::Bounce { idx, slot } => {
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
                    && let PieceBuffer::Bounce { idx, .. } = p.target
                {
                    // Out of device memory into the bounce piece before the drive takes it.
                    let b = &op.bounces[idx];
                    result = b
                        .stage
                        .copy_at(&p.region.memory, p.mem_off, off, p.len, true)
                        .map_err(|e| revoked_or(&p, e));
                }
                if result.is_ok() {
                    result = submit(op.write, (p.file.media, p.at), (buf, off), p.len, ud)
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
                        let left: Vec<Piece> = op.queue.drain(..).collect();
                        st.trash.extend(left);
                        st.trash.push(p);
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
            (Ok(()), PieceBuffer::Bounce { idx, slot: Some(s) })
                if !op.write && op.error.is_none() =>
            {
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
        if op.error.is_some() {
            let left: Vec<Piece> = op.queue.drain(..).collect();
            st.trash.extend(left);
        }
        st.trash.push(p);
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
        let left: Vec<Piece> = op.queue.drain(..).collect();
        op.finished = true;
        if let Some(w) = op.waker.take() {
            w.wake();
        }
        // Nothing of it is on the drive: its bounce buffers are let go of, each kept alive
        // until the engine has (the kernel's ring does it on its thread).
        let bufs: Vec<(BufId, Arc<Stage>)> = op
            .bounces
            .iter()
            .map(|b| (b.buf, b.stage.clone()))
            .collect();
        for (b, stage) in bufs {
            match &self.engine {
                DriveBackend::Sim(nvme) if nvme.release(b).is_ok() => {}
                _ => st.releases.push((b, Some(stage))),
            }
        }
        st.trash.extend(left);
        if st.ops.get(&id).is_some_and(|o| o.detached)
            && let Some(op) = st.ops.remove(&id)
        {
            st.trash_ops.push(op);
        }
        self.finished.notify_all();
    }

    /// Let go of imported buffers nothing is queued on any more.
    fn release(&self, st: &mut State, ring: Option<&mut Ring>) {
        match (&self.engine, ring) {
            (DriveBackend::Sim(nvme), _) => st.releases.retain(|(b, _)| nvme.release(*b).is_err()),
            (DriveBackend::Kernel, Some(ring)) => {
                st.releases.retain(|(b, _)| ring.release(*b).is_err())
            }
            (DriveBackend::Kernel, None) => {}
        }
    }
}

/// Queue one request on the engine: (write, (file, at), (buffer, offset), len, user data).
type Submit<'a> = dyn FnMut(bool, (FileId, u64), (BufId, u64), u64, u64) -> std::result::Result<(), StorageError>
    + 'a;

/// Attach a backing to the drive's engine: by bus address for the simulated drive (`dev` is
/// the drive), by process address for the kernel's ring (which asks for `ProcessVa` only).
fn attach_backing(
    b: &Backing,
    dev: Option<dmaplane_core::fabric::DeviceId>,
    i: Arc<dyn dmaplane_core::revoke::Importer>,
    a: &[dmaplane_core::Accept],
) -> std::result::Result<dmaplane_core::Attachment, dmaplane_core::AttachError> {
    let refuse = |why: &str| {
        Err(dmaplane_core::AttachError::Exporter {
            export: String::new(),
            what: why.to_string(),
        })
    };
    match (b, dev) {
        (Backing::Host(h), Some(dev)) => h.attach(i, dev, a),
        (Backing::Gpu(g), Some(dev)) => g.attach(i, DmaClient::Fabric(dev), a),
        #[cfg(feature = "verbs")]
        (Backing::DmaBuf(m), _) => m.attach(i, a),
        #[cfg(feature = "verbs")]
        (Backing::User(u), _) => u.attach(i, a),
        #[allow(unreachable_patterns)]
        _ => refuse("this memory does not reach the drive"),
    }
}

/// Give a bounce piece back to its buffer.
fn free_slot(op: &mut Op, p: &Piece) {
    if let PieceBuffer::Bounce { idx, slot: Some(s) } = p.target {
        op.bounces[idx].free.push(s);
    }
}

/// The first error ends the transfer: what is not on the drive yet never goes (the caller
/// sets those pieces aside).
fn fail(op: &mut Op, e: Error) {
    if op.error.is_none() {
        op.error = Some(e);
    }
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
            // Landed, but the memory went before the transfer ended: it is not done (the
            // kernel finishes reads already at the device before the fence; none after it).
            return match revoked(p, "the memory was revoked before the transfer ended") {
                Some(r) => Err(r),
                None => Ok(()),
            };
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

/// The simulated drive's thread: reap, account, queue more, until the agent lets go of the
/// drive.
fn reaper(weak: &Weak<Drive>) {
    let mut out = Vec::new();
    loop {
        let Some(d) = weak.upgrade() else { return };
        if let DriveBackend::Sim(nvme) = &d.engine {
            nvme.reap(&mut out, Duration::from_millis(20));
        }
        let mut st = lock(&d.st);
        for c in out.drain(..) {
            d.complete(&mut st, &c);
        }
        d.pump(&mut st, None);
        d.release(&mut st, None);
        d.unlock(st);
    }
}

/// How long the kernel engine's thread waits for a completion before it looks at new work,
/// and, idle, for work before it looks at the exporters' revokes.
const RING_WAIT: Duration = Duration::from_millis(1);
const RING_IDLE: Duration = Duration::from_millis(5);

/// The kernel engine's thread: it owns the ring — lets go of imports nothing uses any more,
/// runs the jobs, queues the transfers' pieces, reaps (which also quiesces revoked imports) —
/// until the agent lets go of the drive; then the ring drains as it drops.
fn ring_thread(weak: &Weak<Drive>, mut ring: Ring) {
    let mut out = Vec::new();
    loop {
        let Some(d) = weak.upgrade() else { return };
        // Releases first: a job's import may take a slot a release would then unregister.
        let mut st = lock(&d.st);
        d.release(&mut st, Some(&mut ring));
        d.unlock(st);
        let jobs: Vec<Job> = lock(&d.jobs).drain(..).collect();
        for job in jobs {
            match job {
                Job::Import {
                    name,
                    attach,
                    reply,
                } => {
                    if let Err(std::sync::mpsc::SendError(Ok(b))) =
                        reply.send(ring.import(&name, attach))
                    {
                        // Nobody waits for it any more (the asker timed out): let it go.
                        let _ = ring.release(b);
                    }
                }
                Job::AddFile { file, reply } => {
                    if let Err(std::sync::mpsc::SendError(Ok(id))) = reply.send(ring.add_file(file))
                    {
                        let _ = ring.remove_file(id);
                    }
                }
                Job::RemoveFile(id) => {
                    if let Err(e) = ring.remove_file(id) {
                        tracing::warn!(drive = %d.name, error = %e, "removing a file from the ring");
                    }
                }
            }
        }
        let mut st = lock(&d.st);
        d.pump(&mut st, Some(&mut ring));
        let idle = ring.in_flight() == 0;
        if idle && lock(&d.jobs).is_empty() {
            // Nothing in flight: sleep until work comes, then look at revokes anyway.
            st = wait_timeout(&d.work, st, RING_IDLE).0;
        }
        d.unlock(st);
        let reaped = ring.reap_within(&mut out, if idle { Duration::ZERO } else { RING_WAIT });
        let mut st = lock(&d.st);
        if let Err(e) = reaped {
            tracing::error!(drive = %d.name, error = %e, "reaping the ring");
        }
        for c in out.drain(..) {
            d.complete(&mut st, &c);
        }
        d.unlock(st);
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
            st = wait_timeout(&self.drive.finished, st, left).0;
        }
    }
}

/// Awaiting a file transfer needs no runtime: the drive's thread wakes the task when the last
/// piece completes. The output is [`FileTransfer::wait`]'s.
impl std::future::Future for FileTransfer {
    type Output = Result<u64>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<u64>> {
        let mut st = lock(&self.drive.st);
        let poll = match st.ops.get_mut(&self.id) {
            Some(op) if op.finished => std::task::Poll::Ready(match &op.error {
                Some(e) => Err(e.clone()),
                None => Ok(op.moved),
            }),
            Some(op) => {
                op.waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
            None => std::task::Poll::Ready(Err(Error::setup(
                &self.drive.agent,
                "file transfer forgotten",
            ))),
        };
        self.drive.unlock(st);
        poll
    }
}

impl Drop for FileTransfer {
    fn drop(&mut self) {
        let mut st = lock(&self.drive.st);
        match st.ops.get_mut(&self.id) {
            Some(op) if op.finished => {
                if let Some(op) = st.ops.remove(&self.id) {
                    st.trash_ops.push(op);
                }
            }
            Some(op) => op.detached = true,
            None => {}
        }
        self.drive.unlock(st);
    }
}

/// One checked pair of a file transfer.
pub(crate) struct Pair {
    pub(crate) file: Arc<FileEntry>,
    /// Absolute file offset.
    pub(crate) at: u64,
    pub(crate) region: Arc<MemoryEntry>,
    /// Absolute memory offset.
    pub(crate) mem_off: u64,
    pub(crate) len: u64,
}
