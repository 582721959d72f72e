//! Registration: a range of memory checked, served from the cache or registered on every NIC
//! that reaches it, listed and announced to the peers; and deregistration, which quiesces every
//! NIC first. [`crate::Agent`]'s `register*`, `publish_file` and `deregister` are these.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::file::FileRegion;
use crate::inner::AgentInner;
use crate::memory::Memory;
use crate::publish::Publish;
use crate::region::{MemoryEntry, Region};

impl AgentInner {
    /// [`crate::Agent::register_with`]: a cache hit (published to all, read and write only:
    /// the cache holds no other), or the range registered on every NIC that reaches it and
    /// announced to the peers it is published to.
    pub(crate) fn register_with(
        &self,
        memory: &Memory,
        offset: u64,
        len: u64,
        publish: Publish,
    ) -> Result<Region> {
        if !memory.owned_by(self) {
            return Err(Error::invalid(
                format!("agent {}", self.name),
                "memory",
                memory.name(),
                "allocated by another agent",
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= memory.len() && len > 0 => {}
            _ => {
                return Err(Error::invalid(
                    format!("registration of {}", memory.name()),
                    "range",
                    format!("[{offset:#x}, +{len:#x})"),
                    format!("outside the memory's {} bytes (or empty)", memory.len()),
                ));
            }
        }
        if memory.is_freed() {
            return Err(Error::invalid(
                format!("registration of {}", memory.name()),
                "memory",
                memory.name(),
                "it was freed",
            ));
        }
        let cached = publish == Publish::all();
        if cached && let Some(e) = self.cache.lookup(memory.id(), offset, len) {
            let at = offset - e.base;
            return Ok(Region {
                entry: e,
                offset: at,
                len,
            });
        }
        // A miss registers the range rounded out to whole pages (what MRs take).
        let g = dmaplane_core::fabric::FABRIC_GRANULE;
        let base = offset / g * g;
        let end = (offset + len).div_ceil(g) * g;
        let end = end.min(memory.len().div_ceil(g) * g);
        let id = self.registry.next_id();
        let entry = Arc::new(MemoryEntry::register(
            &self.register_cx(),
            id,
            memory,
            base,
            (end - base).min(memory.len() - base),
            publish,
        )?);
        Ok(self.announce(entry, offset - base, len))
    }

    /// A new registration: listed, into the cache, and peers connected already learn of it
    /// now.
    fn announce(&self, entry: Arc<MemoryEntry>, offset: u64, len: u64) -> Region {
        let memory = &entry.memory;
        self.registry.insert(&entry);
        // The cache serves later registrations of the memory: only what any of them may get.
        if entry.publish == Publish::all() {
            self.cache.insert(
                memory.id(),
                entry.clone(),
                entry.mrs.iter().flatten().count(),
            );
        }
        let info = self.region_info(&entry);
        for p in self
            .peers
            .list()
            .iter()
            .filter(|p| entry.publish.allows(&p.name))
        {
            p.announce(&entry, &info);
        }
        Region { entry, offset, len }
    }

    /// [`crate::Agent::deregister`]: unlisted, out of the cache, and every NIC's MR
    /// deregistered (each quiesces first).
    pub(crate) fn deregister(&self, region: &Region, deadline: Duration) -> Result<()> {
        let e = &region.entry;
        if !e.memory.owned_by(self) {
            return Err(Error::invalid(
                format!("agent {}", self.name),
                "region",
                e.id,
                "registered by another agent",
            ));
        }
        e.deregistered.store(true, Ordering::Release);
        self.cache.remove(e.memory.id(), e);
        self.registry.remove(e.id);
        let mut first_err = None;
        for (mr, nic) in e.mrs.iter().zip(self.nics.iter()) {
            if let Some(mr) = mr
                && let Err(err) = mr.deregister(nic.pd(), deadline)
            {
                first_err.get_or_insert(err);
            }
        }
        match first_err {
            Some(err) => Err(err.into()),
            None => Ok(()),
        }
    }

    /// [`crate::Agent::publish_file`]: `mem` (a host buffer of the file region's length)
    /// registered as the file region's staged registration, and announced.
    pub(crate) fn publish_file(&self, file: &FileRegion, mem: &Memory) -> Result<Region> {
        let id = self.registry.next_id();
        let mut entry =
            MemoryEntry::register(&self.register_cx(), id, mem, 0, mem.len(), Publish::all())?;
        entry.file = Some((file.entry.clone(), file.offset));
        Ok(self.announce(Arc::new(entry), 0, file.len()))
    }
}
