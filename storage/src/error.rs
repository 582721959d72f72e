//! What can go wrong on the storage path, each error naming the file, the field or the request.

use std::path::Path;

use dmaplane_core::Invalid;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Bad input: names what, the field, its value and why.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The file system does not take `O_DIRECT` for this file.
    #[error(
        "{path}: its file system does not support O_DIRECT ({why}); open it with \
         `buffered_fallback` to go through the page cache instead"
    )]
    NoDirect { path: String, why: String },
    /// A system call on a file or the ring failed.
    #[error("{op} on {what}: {source}{hint}")]
    Os {
        op: &'static str,
        what: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A read or write the kernel completed with an error, or with fewer bytes than asked.
    #[error("{op} of {path} at offset {offset:#x} (+{len:#x}): {why}")]
    Io {
        op: &'static str,
        path: String,
        offset: u64,
        len: u64,
        why: String,
    },
    /// A request names an imported buffer whose exporter revoked it.
    #[error("{op}: buffer {slot} ({name:?}) was revoked at epoch {epoch}")]
    Revoked {
        op: &'static str,
        slot: u16,
        name: String,
        epoch: u64,
    },
    /// Import of exported memory failed: negotiation, or a list the ring cannot register.
    #[error("import of {name}: {why}")]
    Import { name: String, why: String },
    /// The kernel cannot give every completion (no `IORING_FEAT_NODROP`).
    #[error("io_uring: {0}")]
    Ring(String),
}

impl StorageError {
    /// True when io_uring or O_DIRECT is not available to this process (no io_uring in the
    /// kernel, io_uring forbidden by a sysctl or a container's seccomp profile, a file system
    /// without direct I/O), as opposed to a failure of something that is there.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StorageError::NoDirect { .. } => true,
            StorageError::Os { op, source, .. } => {
                *op == "io_uring_setup"
                    && matches!(source.raw_os_error(), Some(libc::ENOSYS | libc::EPERM))
            }
            _ => false,
        }
    }

    pub(crate) fn invalid(
        what: impl Into<String>,
        field: &'static str,
        value: impl std::fmt::Display,
        why: impl Into<String>,
    ) -> StorageError {
        StorageError::Invalid(Invalid::new(what, field, value, why))
    }

    pub(crate) fn os(op: &'static str, what: impl Into<String>, e: std::io::Error) -> StorageError {
        let hint = match e.raw_os_error() {
            Some(libc::ENOMEM) => {
                " (registered buffers count against RLIMIT_MEMLOCK: see `ulimit -l`)"
            }
            Some(libc::EPERM) => {
                " (io_uring may be disabled: see /proc/sys/kernel/io_uring_disabled)"
            }
            Some(libc::ENOSYS) => " (this kernel has no io_uring)",
            _ => "",
        };
        StorageError::Os {
            op,
            what: what.into(),
            hint,
            source: e,
        }
    }
}

pub(crate) fn shown(p: &Path) -> String {
    p.display().to_string()
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;
