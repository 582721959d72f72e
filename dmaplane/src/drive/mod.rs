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

mod import;
mod piece;
mod schedule;
mod thread;
mod transfer;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use dmaplane_storage::sim::SimNvme;
use dmaplane_storage::{BufId, DirectFile, FileId, Ring, StorageError};

use crate::error::{Error, Result};
use crate::file::{FileMedia, StoragePath};
use crate::memory::{Memory, Tied};
use crate::platform::Platform;
use crate::stage::{Stage, cuda_bounce, staging};
use crate::sync::lock;

pub(crate) use piece::Pair;
use piece::{Bounce, FileOp, Piece, PieceBuffer};
use thread::{reaper, ring_thread};
pub use transfer::FileTransfer;

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
    ops: HashMap<u64, FileOp>,
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
    trash_ops: Vec<FileOp>,
}

#[derive(Clone)]
struct Import {
    epoch: u64,
    /// `None`: the memory bounces.
    buf: Option<BufId>,
    path: StoragePath,
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
            FileOp {
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
            staging(platform, memory, len, None)?
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
}
