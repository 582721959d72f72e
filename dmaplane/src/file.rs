//! File regions: a byte range of a file (path, range, open flags) registered with the agent like
//! memory, so descriptors name files the way they name memory, and
//! [`Agent::read_file`](crate::Agent::read_file) / [`Agent::write_file`](crate::Agent::write_file)
//! move bytes between the two.
//!
//! A file region is opened for direct I/O (`O_DIRECT`) and keeps the alignment its file system
//! needs (`statx` `STATX_DIOALIGN`): requests on it must start at a multiple of it and be
//! multiples of it long — except one that ends where the file ends — and land at a memory
//! offset aligned to its memory alignment; a request that does not is refused before anything
//! moves, naming the field and the alignment. A file system without `O_DIRECT` is refused unless
//! the spec asks for [`FileSpec::buffered_fallback`].
//!
//! Registrations are cached like memory's: a range inside an earlier registration of the same
//! file (same path, same access) is a hit ([`crate::CacheStats`]), served by the same
//! registration.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use dmaplane_storage::{DioAlign, DirectFile, FileId};

use crate::error::{Error, Result};
use crate::handle::{Handle, Registration, debug_entry, sealed};

/// What to register: a file, a range of it, and how to open it.
///
/// ```
/// use dmaplane::FileSpec;
/// let shard = FileSpec::new("/data/ckpt/shard-0007.bin").range(0, 64 << 20);
/// let out = FileSpec::new("/data/spill.bin").create(1 << 30);
/// assert!(!shard.is_writable() && out.is_writable());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    pub(crate) path: PathBuf,
    pub(crate) offset: u64,
    /// `None`: to the end of the file.
    pub(crate) len: Option<u64>,
    pub(crate) write: bool,
    /// Create the file (or grow it) to this many bytes.
    pub(crate) create: Option<u64>,
    pub(crate) buffered_fallback: bool,
}

impl FileSpec {
    /// The whole of the file at `path`, read-only.
    pub fn new(path: impl Into<PathBuf>) -> FileSpec {
        FileSpec {
            path: path.into(),
            offset: 0,
            len: None,
            write: false,
            create: None,
            buffered_fallback: false,
        }
    }

    /// Only `len` bytes at `offset` of the file.
    pub fn range(mut self, offset: u64, len: u64) -> FileSpec {
        self.offset = offset;
        self.len = Some(len);
        self
    }

    /// Open it read-write, so [`Agent::write_file`](crate::Agent::write_file) may write it.
    pub fn writable(mut self) -> FileSpec {
        self.write = true;
        self
    }

    /// Create the file if it does not exist and make it at least `len` bytes long (read-write).
    pub fn create(mut self, len: u64) -> FileSpec {
        self.write = true;
        self.create = Some(len);
        self
    }

    /// Where the file system refuses `O_DIRECT`, go through the page cache instead of failing
    /// (a warning says so, and [`FileRegion::is_direct`] is false).
    pub fn buffered_fallback(mut self) -> FileSpec {
        self.buffered_fallback = true;
        self
    }

    /// Whether it is opened read-write.
    pub fn is_writable(&self) -> bool {
        self.write
    }

    /// The path given.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One file registration: bytes `[base, base + len)` of a file, open on the agent's drive.
pub struct FileEntry {
    pub(crate) id: u32,
    /// The canonical path (what the cache keys on).
    pub(crate) path: PathBuf,
    pub(crate) base: u64,
    pub(crate) len: u64,
    pub(crate) writable: bool,
    /// The file's length when registered (requests may end short only there).
    pub(crate) file_len: u64,
    /// The file as direct I/O sees it: the alignment, O_DIRECT or buffered.
    pub(crate) direct: Arc<DirectFile>,
    /// Its id on the agent's drive.
    pub(crate) media: FileId,
    /// What the file is open on (the agent's drive): told when the registration goes.
    pub(crate) drive: Arc<dyn FileMedia>,
    /// [`crate::Agent::deregister_file`] ran.
    pub(crate) closed: AtomicBool,
}

/// What a file registration is open on: the agent's drive, which lets go of the file when the
/// last handle and the cache have let go of the registration.
pub(crate) trait FileMedia: Send + Sync {
    fn remove_file(&self, id: FileId);
}

impl Drop for FileEntry {
    fn drop(&mut self) {
        self.drive.remove_file(self.media);
    }
}

impl FileEntry {
    /// Whether `[offset, offset + len)` of the file lies inside this registration.
    pub(crate) fn covers(&self, offset: u64, len: u64) -> bool {
        offset >= self.base && offset + len <= self.base + self.len
    }

    /// Refuse a request `O_DIRECT` could not do: file offset `at` (absolute), `len` bytes, to or
    /// from memory offset `mem_off`. On the simulated drive a request ending where the file
    /// ends may be of any length (it reads exactly); the kernel's `O_DIRECT` moves whole blocks,
    /// which would run past the descriptor, so there (`kernel`) the tail must be aligned too and
    /// the error says so.
    pub(crate) fn check(
        &self,
        op: &str,
        at: u64,
        len: u64,
        mem_off: u64,
        kernel: bool,
    ) -> Result<()> {
        let a = u64::from(self.direct.align().offset);
        let tail = at + len == self.file_len && !len.is_multiple_of(a);
        if tail && kernel && self.direct.is_direct() {
            return Err(Error::invalid(
                format!("{op} of {}", self.path.display()),
                "len",
                format!("{len:#x}"),
                format!(
                    "the file's last {} bytes are not a whole {a}-byte block, and O_DIRECT moves \
                     whole blocks: pad the file to a multiple of {a}, or register it with \
                     FileSpec::buffered_fallback on a file system without O_DIRECT",
                    self.file_len % a
                ),
            ));
        }
        let len = if tail { len.div_ceil(a) * a } else { len };
        self.direct.check(op, at, len, mem_off).map_err(Error::from)
    }
}

/// A registered range of a file: what file descriptors name. Cheap to clone; the registration
/// stays in the agent's cache after the last handle goes, until
/// [`Agent::deregister_file`](crate::Agent::deregister_file).
pub type FileRegion = Handle<FileEntry>;

impl sealed::Sealed for FileEntry {}

impl std::fmt::Debug for FileEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_entry(self, f)
    }
}

impl Registration for FileEntry {
    const KIND: &'static str = "file region";
    fn id(&self) -> u32 {
        self.id
    }
    fn subject(&self) -> String {
        self.path.display().to_string()
    }
    fn base(&self) -> u64 {
        self.base
    }
}

impl Handle<FileEntry> {
    /// The file (its canonical path).
    pub fn path(&self) -> &Path {
        &self.entry.path
    }

    /// Where in the file this handle starts.
    pub fn file_offset(&self) -> u64 {
        self.entry.base + self.offset
    }

    /// Whether it was opened read-write.
    pub fn is_writable(&self) -> bool {
        self.entry.writable
    }

    /// Whether I/O on it bypasses the page cache (`O_DIRECT`); false after a buffered
    /// fallback.
    pub fn is_direct(&self) -> bool {
        self.entry.direct.is_direct()
    }

    /// What `O_DIRECT` needs of requests on it.
    pub fn align(&self) -> DioAlign {
        self.entry.direct.align()
    }
}

/// How the agent's drive reaches a memory, reported as [`crate::NicPath`] reports a NIC's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "path")]
pub enum StoragePath {
    /// The drive DMAs straight into the memory (for a GPU: its BAR1, the GPUDirect Storage
    /// case).
    Direct {
        /// The drive's name.
        drive: String,
        /// The topology route from the memory to the drive.
        route: String,
    },
    /// The drive cannot reach the memory peer to peer: it DMAs into a host bounce buffer on
    /// the memory's NUMA node, and the GPU's copy engine moves each piece on (double-buffered,
    /// so the drive reads piece n + 1 while piece n is copied).
    Bounced {
        /// The drive's name.
        drive: String,
        /// The host-memory device the bounce buffer lives on.
        through: String,
        /// Why the memory refused the drive (the negotiation's refusal).
        why: String,
    },
}

impl StoragePath {
    /// Whether the bytes go through a host bounce buffer.
    pub fn is_bounced(&self) -> bool {
        matches!(self, StoragePath::Bounced { .. })
    }
}
