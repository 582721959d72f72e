//! One io_uring, owned by one thread: registered buffers and files, `READ_FIXED` /
//! `WRITE_FIXED` submitted in batches, completions reaped so that none is ever lost.
//!
//! The contract:
//!
//! - **Buffers belong to the ring.** They are allocated and registered (`IORING_REGISTER_BUFFERS`)
//!   when the ring is built and live exactly as long as it, so no request can name memory that
//!   was freed. The host reaches them only through copies ([`Ring::buffer_write`],
//!   [`Ring::buffer_read`]), never through references, so a copy racing the kernel's DMA is a
//!   race on values, as on hardware, not undefined behaviour.
//! - **Files are registered** (`IORING_REGISTER_FILES`) and held by the ring, so a request never
//!   names a closed or reused descriptor.
//! - **Every request gets exactly one completion.** The ring is set up only where the kernel
//!   keeps completions that do not fit the completion queue (`IORING_FEAT_NODROP`) and
//!   [`Ring::reap`] flushes that backlog (`IORING_SQ_CQ_OVERFLOW`) as it drains, so a caller that
//!   submits more than the queue holds before it reaps still gets them all.
//! - **Imported buffers** (exported memory, [`Ring::import`]) take free slots of the same table
//!   and are quiesced on revoke as `import.rs` describes.
//! - **Dropping the ring waits.** Everything in flight is cancelled (`IORING_OP_ASYNC_CANCEL`)
//!   and reaped before the buffers go; a request that never completes keeps its buffer allocated
//!   (leaked, never freed under the device).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmaplane_core::fabric::Mapping;
use dmaplane_core::revoke::{AttachError, Attachment, Importer};
use dmaplane_core::{Accept, Access, AddrSpace, SpaceKind};
use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::error::{Result, StorageError};
use crate::file::DirectFile;
use crate::import::{Pending, Revokes, StorageImporter};

/// User data with this bit set is the ring's own (cancellations).
const INTERNAL: u64 = 1 << 63;
/// How long a dropped ring waits for its requests before it gives their buffers up for lost.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// A registered buffer of a [`Ring`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BufId(pub u16);

/// A registered file of a [`Ring`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId(pub u32);

/// How to build a [`Ring`].
#[derive(Debug, Clone)]
pub struct RingBuilder {
    depth: u32,
    sqpoll_idle: Option<Duration>,
    buffers: Vec<u64>,
    files: Vec<Arc<DirectFile>>,
    import_slots: u16,
    file_slots: u32,
    early_fence: bool,
    single_issuer: bool,
}

impl RingBuilder {
    /// Submission queue entries (the completion queue is twice that).
    pub fn depth(mut self, depth: u32) -> Self {
        self.depth = depth;
        self
    }

    /// A kernel thread polls the submission queue (`IORING_SETUP_SQPOLL`), going idle after
    /// `idle` without submissions: no system call per submit.
    pub fn sqpoll(mut self, idle: Duration) -> Self {
        self.sqpoll_idle = Some(idle);
        self
    }

    /// A registered buffer of `len` bytes (page aligned, so any file's `O_DIRECT` memory
    /// alignment holds).
    pub fn buffer(mut self, len: u64) -> Self {
        self.buffers.push(len);
        self
    }

    /// A registered file.
    pub fn file(mut self, file: Arc<DirectFile>) -> Self {
        self.files.push(file);
        self
    }

    /// Only the thread that builds the ring submits to it and reaps it
    /// (`IORING_SETUP_SINGLE_ISSUER`, Linux 6.0), and the kernel runs completion work only when
    /// that thread reaps (`IORING_SETUP_DEFER_TASKRUN`, 6.1; what fio does where it can): fewer
    /// interruptions of the thread. A ring so built must stay on its thread.
    pub fn single_issuer(mut self, on: bool) -> Self {
        self.single_issuer = on;
        self
    }

    /// Room for `n` files opened later ([`Ring::add_file`]) after the ones given here.
    pub fn file_slots(mut self, n: u32) -> Self {
        self.file_slots = n;
        self
    }

    /// Room for `n` imported buffers ([`Ring::import`]) after the ring's own.
    pub fn import_slots(mut self, n: u16) -> Self {
        self.import_slots = n;
        self
    }

    /// Break the revoke contract on purpose: every importer of this ring signals its fence
    /// the moment it is invalidated, before anything is quiesced. For tests that must show
    /// their observers catch it; never in production.
    pub fn inject_early_fence(mut self, on: bool) -> Self {
        self.early_fence = on;
        self
    }

    /// Set up the ring, allocate and register the buffers, register the files.
    pub fn build(self) -> Result<Ring> {
        if self.depth == 0 || self.depth > 32768 || !self.depth.is_power_of_two() {
            return Err(StorageError::invalid(
                "io_uring",
                "depth",
                self.depth,
                "a power of two from 1 to 32768",
            ));
        }
        if self.buffers.len() > usize::from(u16::MAX) {
            return Err(StorageError::invalid(
                "io_uring",
                "buffers",
                self.buffers.len(),
                "at most 65535 registered buffers",
            ));
        }
        let setup = |single: bool| {
            let mut b = IoUring::<squeue::Entry, cqueue::Entry>::builder();
            if single {
                // Only this thread submits and reaps; the kernel runs completion work when it
                // reaps (Linux 6.1; what fio does where it can).
                b.setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_taskrun_flag();
            } else {
                // Completions are posted when this task next enters the kernel, not by
                // interrupting it (Linux 5.19; fio does the same): one thread owns the ring
                // and reaps it anyway.
                b.setup_coop_taskrun();
            }
            if let Some(idle) = self.sqpoll_idle {
                b.setup_sqpoll(u32::try_from(idle.as_millis()).unwrap_or(u32::MAX));
            }
            b.build(self.depth)
        };
        let ring = match setup(self.single_issuer) {
            // A kernel before 6.1 refuses DEFER_TASKRUN: the ring it can make will do.
            Err(e) if self.single_issuer && e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!(error = %e, "no SINGLE_ISSUER/DEFER_TASKRUN here");
                setup(false)
            }
            r => r,
        }
        .map_err(|e| StorageError::os("io_uring_setup", "a new ring", e))?;
        if !ring.params().is_feature_nodrop() {
            return Err(StorageError::Ring(
                "this kernel drops completions that overflow the completion queue (no \
                 IORING_FEAT_NODROP, Linux 5.5): a completion could be lost"
                    .into(),
            ));
        }
        let mut buffers = Vec::with_capacity(self.buffers.len());
        for (i, &len) in self.buffers.iter().enumerate() {
            let m = Mapping::anonymous(len).map_err(|e| {
                StorageError::invalid("io_uring buffer", "len", len, format!("buffer {i}: {e}"))
            })?;
            buffers.push(m);
        }
        let iov: Vec<libc::iovec> = buffers
            .iter()
            .map(|m| libc::iovec {
                iov_base: m.process_va() as usize as *mut libc::c_void,
                iov_len: m.len(),
            })
            .collect();
        let slots = buffers.len() + usize::from(self.import_slots);
        if slots > usize::from(u16::MAX) {
            return Err(StorageError::invalid(
                "io_uring",
                "import_slots",
                self.import_slots,
                "the ring's own buffers and imported ones: at most 65535 slots",
            ));
        }
        if self.import_slots > 0 {
            // A table with empty slots the imports fill in later.
            ring.submitter()
                .register_buffers_sparse(slots as u32)
                .map_err(|e| {
                    StorageError::os(
                        "IORING_REGISTER_BUFFERS2 (sparse)",
                        "the ring's buffer table",
                        e,
                    )
                })?;
            if !iov.is_empty() {
                // SAFETY: as below, for `register_buffers`.
                unsafe { ring.submitter().register_buffers_update(0, &iov, None) }.map_err(
                    |e| StorageError::os("IORING_REGISTER_BUFFERS_UPDATE", "the ring's buffers", e),
                )?;
            }
        } else if !iov.is_empty() {
            // SAFETY: every iovec is exactly one of `buffers`' live mappings, which the ring
            // owns and drops only after `ring` (field order) and after draining every request
            // (Drop): the kernel never reaches them once freed.
            unsafe { ring.submitter().register_buffers(&iov) }.map_err(|e| {
                StorageError::os("IORING_REGISTER_BUFFERS", "the ring's buffers", e)
            })?;
        }
        let nfiles = self.files.len() as u64 + u64::from(self.file_slots);
        if nfiles > u64::from(u32::MAX >> 1) {
            return Err(StorageError::invalid(
                "io_uring",
                "file_slots",
                self.file_slots,
                "too many files",
            ));
        }
        if self.file_slots > 0 {
            ring.submitter()
                .register_files_sparse(nfiles as u32)
                .map_err(|e| {
                    StorageError::os("IORING_REGISTER_FILES2 (sparse)", "the ring's files", e)
                })?;
            let fds: Vec<i32> = self.files.iter().map(|f| f.raw_fd()).collect();
            if !fds.is_empty() {
                ring.submitter()
                    .register_files_update(0, &fds)
                    .map_err(|e| {
                        StorageError::os("IORING_REGISTER_FILES_UPDATE", "the ring's files", e)
                    })?;
            }
        } else if !self.files.is_empty() {
            let fds: Vec<i32> = self.files.iter().map(|f| f.raw_fd()).collect();
            ring.submitter()
                .register_files(&fds)
                .map_err(|e| StorageError::os("IORING_REGISTER_FILES", "the ring's files", e))?;
        }
        let mut files: Vec<Option<Arc<DirectFile>>> = self.files.into_iter().map(Some).collect();
        files.extend((0..self.file_slots).map(|_| None));
        Ok(Ring {
            ring,
            buffers,
            imports: (0..self.import_slots).map(|_| None).collect(),
            files,
            requests: HashMap::new(),
            revokes: Arc::default(),
            early_fence: self.early_fence,
            in_flight: 0,
            queued: 0,
            sqpoll: self.sqpoll_idle.is_some(),
            dropped: 0,
            imports_made: 0,
        })
    }
}

/// One file request as it was queued, for judging its completion ([`Ring::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub write: bool,
    pub file: FileId,
    pub at: u64,
    pub len: u32,
}

/// What the kernel said of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The caller's user data.
    pub user_data: u64,
    /// Bytes moved, or `-errno`.
    pub result: i32,
    /// The request, where the completer knows it (a ring's own requests).
    pub request: Option<Request>,
}

impl Completion {
    /// Bytes moved, or the error.
    pub fn bytes(&self) -> std::result::Result<u32, std::io::Error> {
        u32::try_from(self.result)
            .map_err(|_| std::io::Error::from_raw_os_error(self.result.saturating_neg()))
    }
}

/// One io_uring with its registered buffers and files. See the module docs for the contract.
pub struct Ring {
    // Field order is drop order: the ring (its registrations) before the buffers.
    ring: IoUring,
    buffers: Vec<Mapping>,
    /// Imported buffers, in the slots after `buffers`.
    imports: Vec<Option<Imported>>,
    /// By [`FileId`]; `None`: a free slot of the sparse table.
    files: Vec<Option<Arc<DirectFile>>>,
    /// The slot and the request of each request in flight, by user data.
    requests: HashMap<u64, (u16, Request)>,
    revokes: Revokes,
    early_fence: bool,
    /// Requests submitted or queued whose completion was not reaped yet (the caller's only).
    in_flight: usize,
    /// Entries pushed but not submitted.
    queued: usize,
    sqpoll: bool,
    /// The kernel's dropped-completion count last seen.
    dropped: u32,
    /// Imports made so far (each one's sequence number).
    imports_made: u64,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("depth", &self.ring.params().sq_entries())
            .field("buffers", &self.buffers.len())
            .field("files", &self.files.len())
            .field("in_flight", &self.in_flight)
            .field("sqpoll", &self.sqpoll)
            .finish_non_exhaustive()
    }
}

/// Exported memory registered in one slot.
#[derive(Debug)]
struct Imported {
    /// Which import it is (the ring's count of imports then): a revoke is matched against it,
    /// not against the slot, which a later import may reuse.
    import: u64,
    name: String,
    va: u64,
    len: u64,
    /// Dropped (detached) once the slot is unregistered.
    att: Option<Attachment>,
    /// Requests in flight on the slot.
    in_flight: usize,
    /// Revoked at this epoch: requests are refused.
    revoked: Option<u64>,
    /// The revoke being quiesced: the fence goes once nothing is in flight.
    quiescing: Option<Pending>,
    cancelled: bool,
}

/// Which way a request moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

impl Ring {
    /// A ring of depth 64 with no buffers or files yet.
    pub fn builder() -> RingBuilder {
        RingBuilder {
            depth: 64,
            sqpoll_idle: None,
            buffers: Vec::new(),
            files: Vec::new(),
            import_slots: 0,
            file_slots: 0,
            early_fence: false,
            single_issuer: false,
        }
    }

    /// Requests whose completion was not reaped yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether the kernel polls the submission queue.
    pub fn is_sqpoll(&self) -> bool {
        self.sqpoll
    }

    /// A registered file.
    pub fn file(&self, id: FileId) -> Result<&Arc<DirectFile>> {
        match self.files.get(id.0 as usize) {
            Some(Some(f)) => Ok(f),
            _ => Err(StorageError::invalid(
                "io_uring",
                "file",
                id.0,
                format!(
                    "no file registered there (the ring has {} file slots)",
                    self.files.len()
                ),
            )),
        }
    }

    /// Register `file` in a free file slot ([`RingBuilder::file_slots`]).
    pub fn add_file(&mut self, file: Arc<DirectFile>) -> Result<FileId> {
        let Some(i) = self.files.iter().position(Option::is_none) else {
            return Err(StorageError::invalid(
                "io_uring",
                "files",
                self.files.len(),
                "no free file slot (RingBuilder::file_slots)",
            ));
        };
        self.ring
            .submitter()
            .register_files_update(i as u32, &[file.raw_fd()])
            .map_err(|e| {
                StorageError::os(
                    "IORING_REGISTER_FILES_UPDATE",
                    file.path().display().to_string(),
                    e,
                )
            })?;
        self.files[i] = Some(file);
        Ok(FileId(i as u32))
    }

    /// Unregister file `id`: requests already queued on it keep the kernel's reference and
    /// complete; new ones are refused.
    pub fn remove_file(&mut self, id: FileId) -> Result<()> {
        self.file(id)?;
        // Entries queued but not submitted resolve the slot when submitted: submit them first.
        self.submit()?;
        self.ring
            .submitter()
            .register_files_update(id.0, &[-1])
            .map_err(|e| StorageError::os("IORING_REGISTER_FILES_UPDATE", "a removed file", e))?;
        self.files[id.0 as usize] = None;
        Ok(())
    }

    fn buffer(&self, id: BufId) -> Result<&Mapping> {
        self.buffers.get(usize::from(id.0)).ok_or_else(|| {
            let why = if usize::from(id.0) < self.buffers.len() + self.imports.len() {
                "it is an import slot: imported memory is read and written through its exporter"
                    .to_string()
            } else {
                format!("the ring has {} registered buffers", self.buffers.len())
            };
            StorageError::invalid("io_uring", "buffer", id.0, why)
        })
    }

    /// The length of a registered buffer, the ring's own or imported.
    pub fn buffer_len(&self, id: BufId) -> Result<u64> {
        self.slot_range("io_uring", id).map(|(_, len)| len)
    }

    /// Where a slot's buffer is in this process, for a request: refused when it is empty or
    /// its exporter revoked it.
    fn slot_range(&self, op: &'static str, id: BufId) -> Result<(u64, u64)> {
        let i = usize::from(id.0);
        if let Some(m) = self.buffers.get(i) {
            return Ok((m.process_va(), m.len() as u64));
        }
        match self.imports.get(i - self.buffers.len()) {
            Some(Some(im)) => match im.revoked {
                Some(epoch) => Err(StorageError::Revoked {
                    op,
                    slot: id.0,
                    name: im.name.clone(),
                    epoch,
                }),
                None => Ok((im.va, im.len)),
            },
            _ => Err(StorageError::invalid(
                op,
                "buffer",
                id.0,
                format!(
                    "the ring has {} registered buffers and no import in that slot",
                    self.buffers.len()
                ),
            )),
        }
    }

    /// Register exported memory as a fixed buffer in a free import slot: `attach` negotiates
    /// (the ring accepts one `ProcessVa` range, read-write) and records the attachment. Its
    /// revoke is quiesced by this ring's owner (see `import.rs`).
    pub fn import<F>(&mut self, name: &str, attach: F) -> Result<BufId>
    where
        F: FnOnce(Arc<dyn Importer>, &[Accept]) -> std::result::Result<Attachment, AttachError>,
    {
        let err = |why: String| StorageError::Import {
            name: name.to_string(),
            why,
        };
        // An empty slot, else one whose import was revoked and is quiesced (a tombstone kept so
        // requests naming it get the typed revoke until the slot is needed again).
        let free = self
            .imports
            .iter()
            .position(Option::is_none)
            .or_else(|| {
                self.imports.iter().position(|s| {
                    s.as_ref()
                        .is_some_and(|im| im.att.is_none() && im.quiescing.is_none())
                })
            })
            .ok_or_else(|| {
                err(format!(
                    "no free import slot (the ring was built with {}; RingBuilder::import_slots)",
                    self.imports.len()
                ))
            })?;
        let slot = u16::try_from(self.buffers.len() + free)
            .map_err(|_| err("slot numbers end at 65535".into()))?;
        self.imports_made += 1;
        let seq = self.imports_made;
        let importer = Arc::new(StorageImporter {
            name: format!("io_uring/{name}"),
            slot,
            import: seq,
            revokes: self.revokes.clone(),
            early_fence: self.early_fence,
        });
        let att = attach(
            importer,
            &[Accept::new(SpaceKind::ProcessVa, Access::READ_WRITE)],
        )
        .map_err(|e| err(e.to_string()))?;
        let map = att.map().map_err(|e| err(e.to_string()))?;
        if map.list.space() != AddrSpace::ProcessVa {
            return Err(err(format!(
                "negotiated {} where the ring registers process VAs",
                map.list.space()
            )));
        }
        let [range] = map.list.ranges() else {
            return Err(err(format!(
                "{} ranges: a fixed buffer is one contiguous range of this process",
                map.list.len()
            )));
        };
        let iov = libc::iovec {
            iov_base: range.addr as usize as *mut libc::c_void,
            iov_len: usize::try_from(range.len).map_err(|e| err(e.to_string()))?,
        };
        // SAFETY: the range is what the exporter listed for this attachment; by the revoke
        // contract it stays valid until this importer's fence, and the ring unregisters the
        // slot (and reaps every request on it) before it signals that fence.
        unsafe {
            self.ring
                .submitter()
                .register_buffers_update(u32::from(slot), &[iov], None)
        }
        .map_err(|e| StorageError::os("IORING_REGISTER_BUFFERS_UPDATE", name, e))?;
        self.imports[free] = Some(Imported {
            import: seq,
            name: name.to_string(),
            va: range.addr,
            len: range.len,
            att: Some(att),
            in_flight: 0,
            revoked: None,
            quiescing: None,
            cancelled: false,
        });
        Ok(BufId(slot))
    }

    /// Whether a slot holds a registered buffer (false once an import's revoke unregistered
    /// it).
    pub fn is_registered(&self, id: BufId) -> bool {
        let i = usize::from(id.0);
        i < self.buffers.len()
            || self
                .imports
                .get(i - self.buffers.len())
                .is_some_and(|s| s.as_ref().is_some_and(|im| im.att.is_some()))
    }

    /// Let go of imported buffer `id` (its slot is reused by a later import): unregistered and
    /// detached, as after a revoke. Refused while requests on it are in flight, naming how
    /// many; a revoked slot is released once its quiesce is done.
    pub fn release(&mut self, id: BufId) -> Result<()> {
        let owned = self.buffers.len();
        let k = usize::from(id.0).wrapping_sub(owned);
        let Some(Some(im)) = self.imports.get(k) else {
            return Err(StorageError::invalid(
                "release of an imported buffer",
                "buffer",
                id.0,
                "no import in that slot",
            ));
        };
        if im.in_flight > 0 || im.quiescing.is_some() {
            return Err(StorageError::invalid(
                "release of an imported buffer",
                "buffer",
                id.0,
                format!(
                    "{} request(s) in flight on it{}: reap them first",
                    im.in_flight,
                    if im.quiescing.is_some() {
                        " (its revoke is being quiesced)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        if im.att.is_some() {
            let empty = libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            };
            // SAFETY: an empty iovec unregisters the slot; it names no memory.
            unsafe {
                self.ring
                    .submitter()
                    .register_buffers_update(u32::from(id.0), &[empty], None)
            }
            .map_err(|e| StorageError::os("IORING_REGISTER_BUFFERS_UPDATE", &im.name, e))?;
        }
        // Unregistered: dropping the attachment detaches it from its exporter.
        self.imports[k] = None;
        Ok(())
    }

    /// [`Ring::reap`] waiting at most `timeout` for one completion (none when nothing is in
    /// flight: then it only handles the exporters' revokes).
    pub fn reap_within(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<usize> {
        if self.in_flight > 0 && !timeout.is_zero() {
            let ts = types::Timespec::from(timeout);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(n) => self.queued = self.queued.saturating_sub(n),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                    ) => {}
                Err(e) => return Err(StorageError::os("io_uring_enter", "the ring", e)),
            }
        }
        self.reap(out, 0)
    }

    /// Handle what the exporters asked for (revokes) and reap: [`Ring::reap`] without waiting.
    pub fn progress(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        self.reap(out, 0)
    }

    /// Judge a completion of this ring: the bytes moved when they are all the request asked
    /// for, else [`StorageError::Io`] saying what happened — a short read at the end of the
    /// file (and where it ends), a file that ends before the request (truncated?), a short
    /// write, or the kernel's error in words (ENOSPC, EIO, a cancel).
    pub fn check(&self, c: &Completion) -> Result<u32> {
        let Some(r) = c.request else {
            return c.bytes().map_err(|e| StorageError::Io {
                op: "io_uring request",
                path: String::new(),
                offset: 0,
                len: 0,
                why: e.to_string(),
            });
        };
        let file = self.file(r.file)?;
        let op = if r.write { "write" } else { "read" };
        let io = |why: String| StorageError::Io {
            op,
            path: file.path().display().to_string(),
            offset: r.at,
            len: u64::from(r.len),
            why,
        };
        let got = match c.bytes() {
            Ok(n) => n,
            Err(e) => return Err(io(errno_why(&e))),
        };
        if got >= r.len {
            return Ok(got);
        }
        if r.write {
            return Err(io(format!(
                "short write: {got} of {} bytes (is the file system full?)",
                r.len
            )));
        }
        let size = file.len()?;
        let why = if size <= r.at {
            format!(
                "the file ends at {size:#x}, at or before the request's offset: nothing read \
                 (was it truncated?)"
            )
        } else if r.at + u64::from(got) == size {
            format!(
                "short read: the file ends at {size:#x}, {} bytes before the request's end",
                u64::from(r.len) - u64::from(got)
            )
        } else {
            format!(
                "short read: {got} of {} bytes, and the file is {size:#x} bytes long now \
                 (truncated during the read?)",
                r.len
            )
        };
        Err(io(why))
    }

    /// Take the revokes the exporters queued: their slots refuse new requests from here on.
    fn absorb_revokes(&mut self) {
        let owned = self.buffers.len();
        for p in self.revokes.take() {
            match self.imports.get_mut(usize::from(p.slot) - owned) {
                Some(Some(im)) if im.import == p.import && im.att.is_some() => {
                    im.revoked = Some(p.inv.epoch);
                    im.quiescing = Some(p);
                }
                // An import that never completed, or one unregistered already (the slot may
                // hold another import now): nothing of that attachment can execute.
                _ => p.inv.fence.signal(),
            }
        }
    }

    /// Quiesce revoked slots: refuse, cancel what is in flight, and once nothing is, unregister
    /// and signal the fence.
    fn quiesce(&mut self) -> Result<()> {
        self.absorb_revokes();
        let owned = self.buffers.len();
        let mut cancels: Vec<(usize, Vec<u64>)> = Vec::new();
        for (k, slot) in self.imports.iter_mut().enumerate() {
            let Some(im) = slot else { continue };
            if im.quiescing.is_none() {
                continue;
            }
            let id = (owned + k) as u16;
            if im.in_flight > 0 {
                if !im.cancelled {
                    let uds = self
                        .requests
                        .iter()
                        .filter(|&(_, &(s, _))| s == id)
                        .map(|(&ud, _)| ud)
                        .collect();
                    cancels.push((k, uds));
                }
                continue;
            }
            let empty = libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            };
            // SAFETY: an empty iovec unregisters the slot; it names no memory.
            if let Err(e) = unsafe {
                self.ring
                    .submitter()
                    .register_buffers_update(u32::from(id), &[empty], None)
            } {
                // The slot stays registered: no ack, so the exporter keeps its memory.
                tracing::error!(slot = id, buffer = %im.name, error = %e, "unregistering a revoked buffer failed: the fence is withheld");
                continue;
            }
            im.att = None;
            if let Some(p) = im.quiescing.take() {
                tracing::debug!(slot = id, buffer = %im.name, epoch = p.inv.epoch, "revoked buffer quiesced and unregistered");
                p.inv.fence.signal();
            }
        }
        for (k, uds) in cancels {
            for ud in uds {
                let c = opcode::AsyncCancel::new(ud).build().user_data(INTERNAL);
                self.push(&c)?;
            }
            // Marked only once every cancel is queued: a failed push is tried again next time.
            if let Some(Some(im)) = self.imports.get_mut(k) {
                im.cancelled = true;
            }
        }
        Ok(())
    }

    /// Copy `data` into a registered buffer at `offset` (from the host).
    pub fn buffer_write(&self, id: BufId, offset: u64, data: &[u8]) -> Result<()> {
        let m = self.buffer(id)?;
        if m.write(offset, data) {
            Ok(())
        } else {
            Err(out_of(id, m, offset, data.len() as u64))
        }
    }

    /// Copy out of a registered buffer at `offset` (from the host).
    pub fn buffer_read(&self, id: BufId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let m = self.buffer(id)?;
        if m.read(offset, buf) {
            Ok(())
        } else {
            Err(out_of(id, m, offset, buf.len() as u64))
        }
    }

    /// Queue a `READ_FIXED` of `len` bytes of `file` at `at` into `buf` at `buf_off`.
    pub fn read(
        &mut self,
        (file, at): (FileId, u64),
        (buf, buf_off): (BufId, u64),
        len: u32,
        user_data: u64,
    ) -> Result<()> {
        self.queue(Dir::Read, (file, at), (buf, buf_off), len, user_data)
    }

    /// Queue a `WRITE_FIXED` of `len` bytes from `buf` at `buf_off` to `file` at `at`.
    pub fn write(
        &mut self,
        (file, at): (FileId, u64),
        (buf, buf_off): (BufId, u64),
        len: u32,
        user_data: u64,
    ) -> Result<()> {
        self.queue(Dir::Write, (file, at), (buf, buf_off), len, user_data)
    }

    fn queue(
        &mut self,
        dir: Dir,
        (file, at): (FileId, u64),
        (buf, buf_off): (BufId, u64),
        len: u32,
        user_data: u64,
    ) -> Result<()> {
        let op = match dir {
            Dir::Read => "READ_FIXED",
            Dir::Write => "WRITE_FIXED",
        };
        if user_data & INTERNAL != 0 {
            return Err(StorageError::invalid(
                op,
                "user_data",
                format!("{user_data:#x}"),
                "the top bit is the ring's own",
            ));
        }
        // A revoke the exporter queued since the last reap: refuse at once, not after it.
        self.absorb_revokes();
        if self.requests.contains_key(&user_data) {
            return Err(StorageError::invalid(
                op,
                "user_data",
                user_data,
                "a request with this user data is in flight: completions could not be told apart",
            ));
        }
        let (va, blen) = self.slot_range(op, buf)?;
        if buf_off
            .checked_add(u64::from(len))
            .is_none_or(|end| end > blen)
        {
            return Err(StorageError::invalid(
                op,
                "range",
                format!("[{buf_off:#x}, +{len:#x})"),
                format!("outside buffer {} of {blen} bytes", buf.0),
            ));
        }
        let addr = va + buf_off;
        self.file(file)?.check(op, at, u64::from(len), addr)?;
        let ptr = addr as usize as *mut u8;
        let fixed = types::Fixed(file.0);
        let entry = match dir {
            Dir::Read => opcode::ReadFixed::new(fixed, ptr, len, buf.0)
                .offset(at)
                .build(),
            Dir::Write => opcode::WriteFixed::new(fixed, ptr, len, buf.0)
                .offset(at)
                .build(),
        }
        .user_data(user_data);
        self.push(&entry)?;
        self.in_flight += 1;
        let req = Request {
            write: dir == Dir::Write,
            file,
            at,
            len,
        };
        self.requests.insert(user_data, (buf.0, req));
        if let Some(Some(im)) = self
            .imports
            .get_mut(usize::from(buf.0).wrapping_sub(self.buffers.len()))
        {
            im.in_flight += 1;
        }
        Ok(())
    }

    /// Push one entry, submitting first when the submission queue is full.
    fn push(&mut self, entry: &squeue::Entry) -> Result<()> {
        loop {
            // SAFETY: the entry names a registered buffer range checked in bounds above (or
            // none, for a cancel) and a registered file the ring holds; both outlive every
            // request (the ring drains before its buffers and files go).
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.queued += 1;
                return Ok(());
            }
            self.submit()?;
            if self.ring.submission().is_full() {
                // SQPOLL: the kernel thread has not taken them yet.
                self.ring
                    .submitter()
                    .squeue_wait()
                    .map_err(|e| StorageError::os("io_uring_enter(SQ_WAIT)", "the ring", e))?;
            }
        }
    }

    /// Submit everything queued. Returns how many entries the kernel took.
    pub fn submit(&mut self) -> Result<usize> {
        let n = self
            .ring
            .submit()
            .map_err(|e| StorageError::os("io_uring_enter", "the ring", e))?;
        self.queued = self.queued.saturating_sub(n);
        if self.sqpoll {
            self.queued = 0;
        }
        Ok(n)
    }

    /// Submit what is queued, wait for at least `wait` completions (at most what is in flight),
    /// and append every completion there is to `out` — the ones that overflowed the completion
    /// queue too. Returns how many were appended.
    pub fn reap(&mut self, out: &mut Vec<Completion>, wait: usize) -> Result<usize> {
        let want = wait.min(self.in_flight);
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(n) => {
                    self.queued = self.queued.saturating_sub(n);
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                Err(e) => return Err(StorageError::os("io_uring_enter", "the ring", e)),
            }
        }
        let mut got = 0;
        loop {
            for cqe in self.ring.completion() {
                if cqe.user_data() & INTERNAL != 0 {
                    continue;
                }
                let taken = self.requests.remove(&cqe.user_data());
                if let Some((slot, _)) = taken
                    && let Some(Some(im)) = self
                        .imports
                        .get_mut(usize::from(slot).wrapping_sub(self.buffers.len()))
                {
                    im.in_flight = im.in_flight.saturating_sub(1);
                }
                out.push(Completion {
                    user_data: cqe.user_data(),
                    result: cqe.result(),
                    request: taken.map(|(_, r)| r),
                });
                got += 1;
            }
            // Completions the kernel kept aside because the queue was full: an enter with
            // GETEVENTS moves them in.
            if !self.ring.submission().cq_overflow() {
                break;
            }
            self.ring
                .submit_and_wait(0)
                .map_err(|e| StorageError::os("io_uring_enter(GETEVENTS)", "the ring", e))?;
        }
        self.in_flight = self.in_flight.saturating_sub(got);
        self.quiesce()?;
        // The kernel's count of dropped completions is cumulative: report what is new.
        let dropped = self.ring.completion().overflow();
        if dropped != self.dropped {
            let new = dropped.wrapping_sub(self.dropped);
            self.dropped = dropped;
            return Err(StorageError::Ring(format!(
                "the kernel dropped {new} completions (out of memory for its overflow list): \
                 their requests will never be reported"
            )));
        }
        Ok(got)
    }

    /// Cancel everything in flight and reap it, up to `deadline`. Returns the completions
    /// (cancelled ones with `-ECANCELED`); what is still in flight at the deadline stays so.
    pub fn drain(&mut self, deadline: Duration) -> Result<Vec<Completion>> {
        let mut out = Vec::new();
        if self.in_flight == 0 {
            return Ok(out);
        }
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(INTERNAL);
        self.push(&cancel)?;
        let until = Instant::now() + deadline;
        while self.in_flight > 0 && Instant::now() < until {
            if self.reap(&mut out, 0)? == 0 {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        Ok(out)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.in_flight == 0 {
            // Revokes that came in since the last reap: nothing is in flight, so they settle.
            if let Err(e) = self.quiesce() {
                tracing::error!(error = %e, "settling revokes of a dropped ring");
            }
            return;
        }
        let left = match self.drain(DRAIN_DEADLINE) {
            Ok(_) => self.in_flight,
            Err(e) => {
                tracing::error!(error = %e, "draining a dropped ring");
                self.in_flight
            }
        };
        if left > 0 {
            tracing::error!(
                requests = left,
                "a dropped ring's requests never completed: its buffers are leaked, not freed"
            );
            for m in std::mem::take(&mut self.buffers) {
                std::mem::forget(m);
            }
            // Imported memory too: its attachments stay, so the exporter's revoke finds an
            // importer that never acknowledges and keeps the memory instead of freeing it
            // under the kernel's DMA.
            std::mem::forget(std::mem::take(&mut self.imports));
            std::mem::forget(self.revokes.clone());
        }
    }
}

/// The kernel's (or a drive's) error for a file request, in words.
pub fn errno_why(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => "no space left on the file system (ENOSPC)".into(),
        Some(libc::EIO) => "the device failed the I/O (EIO)".into(),
        // What the block layer gives for a medium error (BLK_STS_MEDIUM).
        Some(libc::ENODATA) => {
            "the device failed to read its medium (ENODATA: a medium error)".into()
        }
        Some(libc::ECANCELED) => "cancelled: its buffer was revoked, or the ring dropped".into(),
        Some(libc::EFBIG) => "past the largest file size allowed here (EFBIG)".into(),
        Some(libc::EINVAL) => "the kernel refused it (EINVAL): an alignment or range the file \
                               system does not take"
            .into(),
        Some(libc::EFAULT) => {
            "the buffer is not memory the device may reach (EFAULT: not registered, or revoked)"
                .into()
        }
        Some(libc::EBADF) => "the file is not open for that (EBADF: read-only?)".into(),
        _ => e.to_string(),
    }
}

fn out_of(id: BufId, m: &Mapping, offset: u64, len: u64) -> StorageError {
    StorageError::invalid(
        "io_uring buffer",
        "range",
        format!("[{offset:#x}, +{len:#x})"),
        format!("outside buffer {} of {} bytes", id.0, m.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::errno_why;

    #[test]
    fn the_kernels_errors_are_said_in_words() {
        let w = |e| errno_why(&std::io::Error::from_raw_os_error(e));
        assert_eq!(w(libc::ENOSPC), "no space left on the file system (ENOSPC)");
        assert_eq!(w(libc::EIO), "the device failed the I/O (EIO)");
        assert!(w(libc::ENODATA).contains("medium error"));
        assert!(w(libc::ECANCELED).contains("revoked"));
        assert!(w(libc::EFBIG).contains("EFBIG"));
        assert!(w(libc::EINVAL).contains("EINVAL"));
        assert!(w(libc::EPERM).contains("ermitted"), "{}", w(libc::EPERM));
    }
}
