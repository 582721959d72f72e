//! The agent's file registrations: [`Files`] registers a [`FileSpec`] (or finds it in the
//! cache), keeps the registrations by id, and opens the drive they go through on first use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use dmaplane_core::counter::Counter;
use dmaplane_storage::{DirectFile, OpenOptions};

use crate::cache::CacheStats;
use crate::drive::{Drive, DriveOptions};
use crate::error::{Error, Result};
use crate::file::{FileEntry, FileRegion, FileSpec};
use crate::platform::Platform;
use crate::registry::Registry;
use crate::sync::lock;

/// The agent's file registrations, their cache, and the drive they go through (opened on
/// first use).
pub(crate) struct Files {
    opts: DriveOptions,
    /// File registration id → entry (while a handle or the cache holds it).
    entries: Mutex<HashMap<u32, Weak<FileEntry>>>,
    cache: FileCache,
    drive: Mutex<Option<Arc<Drive>>>,
}

impl std::fmt::Debug for Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Files")
            .field("agent", &self.opts.agent)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Files {
    pub(crate) fn new(opts: DriveOptions) -> Files {
        Files {
            opts,
            entries: Mutex::new(HashMap::new()),
            cache: FileCache::default(),
            drive: Mutex::new(None),
        }
    }

    /// File registration `id`, while any handle or the cache holds it.
    pub(crate) fn get(&self, id: u32) -> Option<Arc<FileEntry>> {
        lock(&self.entries).get(&id).and_then(Weak::upgrade)
    }

    pub(crate) fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// The drive, opened on first use.
    pub(crate) fn drive(&self, platform: &Platform) -> Result<Arc<Drive>> {
        let mut d = lock(&self.drive);
        if let Some(d) = &*d {
            return Ok(d.clone());
        }
        let name = match (&self.opts.device, platform.testbed()) {
            (Some(n), _) => n.clone(),
            (None, Some(tb)) => tb
                .topology()
                .devices_of_kind(dmaplane_core::topology::DeviceKind::Nvme)
                .next()
                .map(|d| d.id.clone())
                .ok_or_else(|| Error::setup(&self.opts.agent, "the testbed has no NVMe drive"))?,
            (None, None) => String::new(),
        };
        let drive = Drive::open(&self.opts, platform, &name)?;
        *d = Some(drive.clone());
        Ok(drive)
    }

    /// Register `spec` (its id from `ids`, which memory registrations share): a cache hit, or
    /// the file opened (created and grown if asked), checked and put on the agent's drive.
    pub(crate) fn register(
        &self,
        platform: &Platform,
        ids: &Registry,
        spec: &FileSpec,
    ) -> Result<FileRegion> {
        let shown = spec.path.display().to_string();
        let what = || format!("file region {shown}");
        if spec.path.as_os_str().is_empty() {
            return Err(Error::invalid(what(), "path", "\"\"", "empty"));
        }
        if spec.len == Some(0) {
            return Err(Error::invalid(what(), "len", 0, "must be positive"));
        }
        let opts = OpenOptions {
            write: spec.write,
            create: spec.create.is_some(),
            buffered_fallback: spec.buffered_fallback,
        };
        let path = match std::fs::canonicalize(&spec.path) {
            Ok(p) => p,
            Err(e) if spec.create.is_some() && e.kind() == std::io::ErrorKind::NotFound => {
                // Created by the open below; canonical once it exists.
                DirectFile::open(&spec.path, opts)?;
                std::fs::canonicalize(&spec.path)
                    .map_err(|e| Error::invalid(what(), "path", &shown, e.to_string()))?
            }
            Err(e) => return Err(Error::invalid(what(), "path", &shown, e.to_string())),
        };
        let want_len = spec.len;
        if let Some(len) = want_len
            && let Some(e) = self.cache.lookup(&path, spec.write, spec.offset, len)
        {
            return Ok(FileRegion {
                offset: spec.offset - e.base,
                len,
                entry: e,
            });
        }
        let direct = Arc::new(DirectFile::open(&path, opts)?);
        if let Some(size) = spec.create
            && direct.len()? < size
        {
            direct.set_len(size)?;
        }
        let file_len = direct.len()?;
        let len = match want_len {
            Some(l) => l,
            None => file_len.saturating_sub(spec.offset),
        };
        if spec
            .offset
            .checked_add(len)
            .is_none_or(|end| end > file_len)
            || len == 0
        {
            return Err(Error::invalid(
                what(),
                "range",
                format!("[{:#x}, +{len:#x})", spec.offset),
                format!(
                    "outside the file's {file_len} bytes (or empty){}",
                    if spec.write {
                        "; FileSpec::create(len) grows it"
                    } else {
                        ""
                    }
                ),
            ));
        }
        if want_len.is_none()
            && let Some(e) = self.cache.lookup(&path, spec.write, spec.offset, len)
        {
            return Ok(FileRegion {
                offset: spec.offset - e.base,
                len,
                entry: e,
            });
        }
        let drive = self.drive(platform)?;
        let media = drive.add_file(&direct, spec.write)?;
        let id = ids.next_id();
        let entry = Arc::new(FileEntry {
            id,
            path,
            base: spec.offset,
            len,
            writable: spec.write,
            file_len,
            direct,
            media,
            drive,
            closed: AtomicBool::new(false),
        });
        lock(&self.entries).insert(id, Arc::downgrade(&entry));
        self.cache.insert(entry.clone());
        tracing::debug!(agent = %self.opts.agent, id, path = %entry.path.display(), len, direct = entry.direct.is_direct(), "file registered");
        Ok(FileRegion {
            entry,
            offset: 0,
            len,
        })
    }

    /// Deregister a file registration: no new transfer may name it (those under way finish).
    pub(crate) fn deregister(&self, region: &FileRegion) {
        let e = &region.entry;
        e.closed.store(true, Ordering::Release);
        self.cache.remove(e);
        lock(&self.entries).remove(&e.id);
    }
}

/// File registrations by canonical path: a range inside an earlier registration of the same
/// file with the access asked for (a read-write one serves reads too) is a hit; they live
/// until deregistered.
#[derive(Debug, Default)]
pub(crate) struct FileCache {
    by_file: Mutex<HashMap<PathBuf, Vec<Arc<FileEntry>>>>,
    hits: Counter,
    misses: Counter,
}

impl FileCache {
    /// A registration of file `path` covering `[offset, offset + len)` with write access if
    /// `write`, counted as a hit.
    pub(crate) fn lookup(
        &self,
        path: &Path,
        write: bool,
        offset: u64,
        len: u64,
    ) -> Option<Arc<FileEntry>> {
        let found = lock(&self.by_file)
            .get(path)?
            .iter()
            .find(|e| (e.writable || !write) && e.covers(offset, len))
            .cloned();
        if found.is_some() {
            self.hits.inc();
        }
        found
    }

    /// Record a new file registration (a miss).
    pub(crate) fn insert(&self, entry: Arc<FileEntry>) {
        self.misses.inc();
        lock(&self.by_file)
            .entry(entry.path.clone())
            .or_default()
            .push(entry);
    }

    /// Drop one file registration (deregistered).
    pub(crate) fn remove(&self, entry: &Arc<FileEntry>) {
        let mut all = lock(&self.by_file);
        if let Some(v) = all.get_mut(&entry.path) {
            v.retain(|e| !Arc::ptr_eq(e, entry));
            if v.is_empty() {
                all.remove(&entry.path);
            }
        }
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.get(),
            misses: self.misses.get(),
            entries: lock(&self.by_file).values().map(Vec::len).sum::<usize>() as u64,
            ..CacheStats::default()
        }
    }
}
