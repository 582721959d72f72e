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
//! - **Dropping the ring waits.** Everything in flight is cancelled (`IORING_OP_ASYNC_CANCEL`)
//!   and reaped before the buffers go; a request that never completes keeps its buffer allocated
//!   (leaked, never freed under the device).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmaplane_core::fabric::Memory;
use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::error::{Result, StorageError};
use crate::file::DirectFile;

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
        let mut b = IoUring::<squeue::Entry, cqueue::Entry>::builder();
        if let Some(idle) = self.sqpoll_idle {
            b.setup_sqpoll(u32::try_from(idle.as_millis()).unwrap_or(u32::MAX));
        }
        let ring = b
            .build(self.depth)
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
            let m = Memory::anonymous(len).map_err(|e| {
                StorageError::invalid("io_uring buffer", "len", len, format!("buffer {i}: {e}"))
            })?;
            buffers.push(m);
        }
        if !buffers.is_empty() {
            let iov: Vec<libc::iovec> = buffers
                .iter()
                .map(|m| libc::iovec {
                    iov_base: m.process_va() as usize as *mut libc::c_void,
                    iov_len: m.len(),
                })
                .collect();
            // SAFETY: every iovec is exactly one of `buffers`' live mappings, which the ring
            // owns and drops only after `ring` (field order) and after draining every request
            // (Drop): the kernel never reaches them once freed.
            unsafe { ring.submitter().register_buffers(&iov) }.map_err(|e| {
                StorageError::os("IORING_REGISTER_BUFFERS", "the ring's buffers", e)
            })?;
        }
        if !self.files.is_empty() {
            let fds: Vec<i32> = self.files.iter().map(|f| f.raw_fd()).collect();
            ring.submitter()
                .register_files(&fds)
                .map_err(|e| StorageError::os("IORING_REGISTER_FILES", "the ring's files", e))?;
        }
        Ok(Ring {
            ring,
            buffers,
            files: self.files,
            in_flight: 0,
            queued: 0,
            sqpoll: self.sqpoll_idle.is_some(),
        })
    }
}

/// What the kernel said of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The caller's user data.
    pub user_data: u64,
    /// Bytes moved, or `-errno`.
    pub result: i32,
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
    buffers: Vec<Memory>,
    files: Vec<Arc<DirectFile>>,
    /// Requests submitted or queued whose completion was not reaped yet (the caller's only).
    in_flight: usize,
    /// Entries pushed but not submitted.
    queued: usize,
    sqpoll: bool,
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
        self.files.get(id.0 as usize).ok_or_else(|| {
            StorageError::invalid(
                "io_uring",
                "file",
                id.0,
                format!("the ring has {} registered files", self.files.len()),
            )
        })
    }

    fn buffer(&self, id: BufId) -> Result<&Memory> {
        self.buffers.get(usize::from(id.0)).ok_or_else(|| {
            StorageError::invalid(
                "io_uring",
                "buffer",
                id.0,
                format!("the ring has {} registered buffers", self.buffers.len()),
            )
        })
    }

    /// The length of a registered buffer.
    pub fn buffer_len(&self, id: BufId) -> Result<u64> {
        self.buffer(id).map(|m| m.len() as u64)
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
        let m = self.buffer(buf)?;
        if buf_off
            .checked_add(u64::from(len))
            .is_none_or(|end| end > m.len() as u64)
        {
            return Err(out_of(buf, m, buf_off, u64::from(len)));
        }
        let addr = m.process_va() + buf_off;
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
                out.push(Completion {
                    user_data: cqe.user_data(),
                    result: cqe.result(),
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
        let dropped = self.ring.completion().overflow();
        if dropped > 0 {
            return Err(StorageError::Ring(format!(
                "the kernel dropped {dropped} completions"
            )));
        }
        self.in_flight = self.in_flight.saturating_sub(got);
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
        }
    }
}

fn out_of(id: BufId, m: &Memory, offset: u64, len: u64) -> StorageError {
    StorageError::invalid(
        "io_uring buffer",
        "range",
        format!("[{offset:#x}, +{len:#x})"),
        format!("outside buffer {} of {} bytes", id.0, m.len()),
    )
}
