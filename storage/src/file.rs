//! A file opened for direct I/O (`O_DIRECT`), with the alignment its file system needs.
//!
//! `O_DIRECT` moves bytes between the device and the buffer without the page cache, so the file
//! system constrains three things: the file offset and the length (multiples of
//! [`DioAlign::offset`]) and the buffer's address (a multiple of [`DioAlign::mem`]). The kernel
//! reports both through `statx(STATX_DIOALIGN)` (Linux 6.1); where it does not, the logical block
//! size of 4096 is assumed and [`DioAlign::reported`] says so. A request that breaks them is
//! refused here, naming the field, before the kernel would answer EINVAL.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, StorageError, shown};

/// What `O_DIRECT` needs of a request on one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DioAlign {
    /// The buffer's address must be a multiple of this.
    pub mem: u32,
    /// The file offset and the length must be multiples of this.
    pub offset: u32,
    /// Whether the kernel reported them (`STATX_DIOALIGN`) or 4096 was assumed.
    pub reported: bool,
}

/// Bytes assumed when the kernel does not report the alignment.
const ASSUMED_ALIGN: u32 = 4096;

/// How to open a [`DirectFile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenOptions {
    /// Open read-write (else read-only).
    pub write: bool,
    /// Create the file if it does not exist (implies `write`).
    pub create: bool,
    /// Where the file system refuses `O_DIRECT`, open it buffered (through the page cache)
    /// instead of failing; [`DirectFile::is_direct`] then says false.
    pub buffered_fallback: bool,
}

/// A file for direct I/O.
#[derive(Debug)]
pub struct DirectFile {
    file: std::fs::File,
    path: PathBuf,
    align: DioAlign,
    direct: bool,
}

impl DirectFile {
    /// Open `path` with `O_DIRECT`. A file system without it is [`StorageError::NoDirect`],
    /// unless `opts.buffered_fallback` (then a warning, and [`DirectFile::is_direct`] false).
    pub fn open(path: impl AsRef<Path>, opts: OpenOptions) -> Result<DirectFile> {
        let path = path.as_ref().to_path_buf();
        let open = |direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.read(true)
                .write(opts.write || opts.create)
                .create(opts.create);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(&path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                if !opts.buffered_fallback {
                    return Err(StorageError::NoDirect {
                        path: shown(&path),
                        why: format!("open with O_DIRECT: {e}"),
                    });
                }
                tracing::warn!(path = %path.display(), "no O_DIRECT on this file system: buffered I/O, through the page cache");
                let f = open(false).map_err(|e| StorageError::os("open", shown(&path), e))?;
                (f, false)
            }
            Err(e) => return Err(StorageError::os("open", shown(&path), e)),
        };
        let align = dio_align(file.as_fd(), &path, direct)?;
        Ok(DirectFile {
            file,
            path,
            align,
            direct,
        })
    }

    /// The path it was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether I/O bypasses the page cache (false only after a buffered fallback).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// What `O_DIRECT` needs of requests on this file.
    pub fn align(&self) -> DioAlign {
        self.align
    }

    /// The file's size now.
    pub fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| StorageError::os("fstat", shown(&self.path), e))
    }

    /// Whether it is empty now.
    pub fn is_empty(&self) -> Result<bool> {
        self.len().map(|l| l == 0)
    }

    /// Grow or shrink it to `len` bytes.
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| StorageError::os("ftruncate", shown(&self.path), e))
    }

    pub(crate) fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Refuse a request `O_DIRECT` cannot do, naming the field: `offset` and `len` multiples of
    /// the offset alignment, `addr` (the buffer) of the memory alignment. Buffered files take
    /// anything.
    pub fn check(&self, op: &str, offset: u64, len: u64, addr: u64) -> Result<()> {
        if !self.direct {
            return Ok(());
        }
        let what = || format!("{op} of {}", self.path.display());
        let (a, m) = (u64::from(self.align.offset), u64::from(self.align.mem));
        let src = if self.align.reported {
            "statx STATX_DIOALIGN"
        } else {
            "assumed: the kernel reports none"
        };
        if len == 0 {
            return Err(StorageError::invalid(what(), "len", 0, "must be positive"));
        }
        for (field, v) in [("offset", offset), ("len", len)] {
            if !v.is_multiple_of(a) {
                return Err(StorageError::invalid(
                    what(),
                    field,
                    format!("{v:#x}"),
                    format!("O_DIRECT on this file needs multiples of {a} bytes ({src})"),
                ));
            }
        }
        if !addr.is_multiple_of(m) {
            return Err(StorageError::invalid(
                what(),
                "buffer",
                format!("address {addr:#x}"),
                format!("O_DIRECT on this file needs buffers aligned to {m} bytes ({src})"),
            ));
        }
        Ok(())
    }
}

impl AsFd for DirectFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The file's direct-I/O alignment: `statx(STATX_DIOALIGN)`, else the assumed 4096. Zero
/// offset alignment from the kernel means the file cannot do direct I/O after all.
fn dio_align(fd: BorrowedFd<'_>, path: &Path, direct: bool) -> Result<DioAlign> {
    use rustix::fs::{AtFlags, StatxFlags};
    let assumed = DioAlign {
        mem: ASSUMED_ALIGN,
        offset: ASSUMED_ALIGN,
        reported: false,
    };
    let st = match rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
        Ok(st) => st,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "statx(STATX_DIOALIGN)");
            return Ok(assumed);
        }
    };
    if st.stx_mask & StatxFlags::DIOALIGN.bits() == 0 {
        return Ok(assumed);
    }
    if direct && (st.stx_dio_offset_align == 0 || st.stx_dio_mem_align == 0) {
        return Err(StorageError::NoDirect {
            path: shown(path),
            why: "statx reports no direct-I/O alignment for it".into(),
        });
    }
    Ok(DioAlign {
        mem: st.stx_dio_mem_align.max(1),
        offset: st.stx_dio_offset_align.max(1),
        reported: true,
    })
}
