//! Registration: a range of memory checked, served from the cache or registered on every NIC
//! that reaches it, listed and announced to the peers; and deregistration, which quiesces every
//! NIC first. [`crate::Agent`]'s `register*`, `publish_file` and `deregister` are these.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::file::FileRegion;
use crate::inner::AgentInner;
use crate::limits::Refusal;
use crate::memory::Memory;
use crate::peer::PeerShared;
use crate::publish::Publish;
use crate::region::{MemoryEntry, PeerKey, PeerStage, Region};

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
        // Memory its owner lent read-only: no peer may write into it.
        let publish = if memory.is_read_only() {
            publish.read_only()
        } else {
            publish
        };
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
        for p in self
            .peers
            .list()
            .iter()
            .filter(|p| entry.publish.allows(&p.name))
        {
            self.announce_to(p, &entry);
        }
        Region { entry, offset, len }
    }

    /// Tell `peer` of registration `e` and grant it leases: on a staged path, on a staging
    /// buffer of its own (made now, if it has none yet).
    pub(crate) fn announce_to(&self, peer: &PeerShared, e: &MemoryEntry) {
        // A peer retired meanwhile (this announcement iterates an older list) gets nothing:
        // a buffer made for it now would outlive it.
        if peer.lost().is_some() {
            return;
        }
        let key = (peer.name.as_str(), peer.session);
        let ps = self.peer_stage(e, key).unwrap_or_else(|err| {
            // Counted here, once per announcement (the welcome's metadata tried it first).
            if matches!(&err, Error::Invalid(i) if i.field == "limits.staging_bytes") {
                self.peers.count_refusal(Refusal::StagingBytes);
            }
            tracing::warn!(agent = %self.name, peer = %peer.name, region = e.id, error = %err, "no staging buffer for the peer: it is told of the registration without staged keys");
            None
        });
        // Lost between the look and the buffer: its retire may have run already.
        if ps.is_some() && peer.lost().is_some() {
            e.drop_peer_stage(key);
            return;
        }
        let info = self.region_info(e, ps.as_deref());
        peer.announce(e, ps.as_deref(), &info);
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
        // The peers' own staging buffers' MRs too: their leases are withdrawn the same way.
        for (nic, mr) in e.peer_mrs() {
            if let Some(n) = self.nics.iter().nth(nic)
                && let Err(err) = mr.deregister(n.pd(), deadline)
            {
                first_err.get_or_insert(err);
            }
        }
        // Its MRs are quiesced, not revoked: the epoch is the one it was registered at.
        let epoch = e.revoked_at().unwrap_or(e.epoch);
        self.tell_gone(e, epoch, crate::event::GoneWhy::Deregistered);
        match first_err {
            Some(err) => Err(err.into()),
            None => Ok(()),
        }
    }

    /// `peer`'s own staging buffer of `e` (made on first use; `None` where peers reach `e`
    /// directly): for GPU memory a host buffer its copy engine imports, for a published file
    /// a host buffer like the region's own, on the same host memory, registered the same way.
    pub(crate) fn peer_stage(
        &self,
        e: &MemoryEntry,
        key: PeerKey<'_>,
    ) -> Result<Option<Arc<PeerStage>>> {
        let peer = key.0;
        e.peer_stage(key, || {
            let Some(held) = self.staging.reserve(e.len) else {
                return Err(Error::invalid(
                    format!("agent {}", self.name),
                    "limits.staging_bytes",
                    self.staging.max(),
                    format!(
                        "{} bytes of staging buffers held for peers already; {peer}'s for \
                         registration {} ({} bytes) would go past it",
                        self.staging.held(),
                        e.id,
                        e.len
                    ),
                ));
            };
            if e.file.is_none() {
                return Ok((e.gpu_peer_stage(&self.register_cx(), peer)?, held));
            }
            let name = format!("{} for {peer}", e.memory.name());
            // Beside the published buffer on the testbed; this process's host memory on real
            // NICs (memfd on TCP, udmabuf on verbs).
            let mem = if self.platform.testbed().is_some() {
                self.allocator().alloc_host_on(
                    &name,
                    e.memory.location().device(),
                    e.memory.len(),
                )?
            } else {
                self.allocator().alloc_host(&name, e.memory.len())?
            };
            let mut own = MemoryEntry::register(
                &self.register_cx(),
                e.id,
                &mem,
                0,
                mem.len(),
                e.publish.clone(),
            )?;
            own.file = e.file.clone();
            Ok((PeerStage::File(Arc::new(own)), held))
        })
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{Agent, Testbed};

    const T: Duration = Duration::from_secs(10);
    const LEN: u64 = 64 << 10;

    /// a on nic0, b on nic1, c on nic2.
    fn three() -> (Agent, Agent, Agent) {
        let tb = Testbed::builtin().unwrap();
        let agent = |name: &str, nic: &str| {
            Agent::builder(name)
                .testbed(tb.clone())
                .nics([nic])
                .build()
                .unwrap()
        };
        (agent("a", "nic0"), agent("b", "nic1"), agent("c", "nic2"))
    }

    /// a and c connect to b; each is told its own staged key of `region`.
    fn both_meet(a: &Agent, b: &Agent, c: &Agent, region: u32) -> (crate::Peer, crate::Peer) {
        let pa = a.connect_to(&b.listen_addr().to_string()).unwrap();
        let pc = c.connect_to(&b.listen_addr().to_string()).unwrap();
        let (ka, kc) = (pa.region(region).unwrap(), pc.region(region).unwrap());
        assert!(ka.keys[0].staged && kc.keys[0].staged);
        assert_ne!(
            ka.keys[0].rkey, kc.keys[0].rkey,
            "one staging buffer for both peers"
        );
        (pa, pc)
    }

    /// `a` WRITEs LEN bytes of 0xaa into `region` of `peer` (landed by it when staged).
    fn write_aa(a: &Agent, peer: &crate::Peer, region: u32) {
        let src = a.alloc_host("src", LEN).unwrap();
        src.write(0, &vec![0xaa; LEN as usize]).unwrap();
        let ra = a.register(&src).unwrap();
        a.write(
            peer,
            &[ra.desc(0, LEN).unwrap()],
            &[peer.desc(region, 0, LEN).unwrap()],
            None,
        )
        .unwrap()
        .wait(T)
        .unwrap();
    }

    /// Two peers of one staged registration: each is told keys of a staging buffer of its
    /// own, the memory's metadata for anyone lists none, and a peer's land copies only its
    /// own buffer — so a peer that asks to land a range another peer wrote lands nothing of
    /// the other's bytes (with one shared buffer it landed them).
    #[test]
    fn each_peer_of_a_staged_registration_stages_through_its_own_buffer() {
        let (a, b, c) = three();
        // gpu0 sits on the other socket from nic1: b stages it.
        let dst = b.alloc_gpu("dst", "gpu0", LEN).unwrap();
        dst.write(0, &vec![0; LEN as usize]).unwrap();
        let rb = b.register(&dst).unwrap();
        assert!(rb.paths()[0].is_staged());
        let (pa, pc) = both_meet(&a, &b, &c, rb.id());
        let blob = crate::metadata::Metadata::from_blob(&b.metadata_blob().unwrap()).unwrap();
        let open = blob.regions.iter().find(|r| r.id == rb.id()).unwrap();
        assert!(open.keys.is_empty(), "staged keys for anyone: {open:?}");

        // a writes its bytes (WRITE into its staging buffer, then b lands them).
        write_aa(&a, &pa, rb.id());
        let mut got = vec![0; LEN as usize];
        dst.read(0, &mut got).unwrap();
        assert!(got.iter().all(|&x| x == 0xaa));
        // b's application clears it; c asks b to land the same range, which it never wrote.
        dst.write(0, &vec![0; LEN as usize]).unwrap();
        let session = |name: &str| b.shared.peers.named(name).unwrap().session;
        let (sa, sc) = (session("a"), session("c"));
        let failure = b.shared.serve_stage(("c", sc), &[(rb.id(), 0, LEN)], true);
        assert_eq!(failure, None);
        dst.read(0, &mut got).unwrap();
        assert!(
            got.iter().all(|&x| x == 0),
            "c's land put a's bytes into b's memory"
        );
        // A peer that was never told of it has no buffer to land from.
        let f = b
            .shared
            .serve_stage(("nobody", 0), &[(rb.id(), 0, LEN)], true);
        assert!(f.unwrap().why.contains("no staging buffer for nobody"));
        // A lost peer's buffer goes.
        drop(pc);
        drop(c);
        let e = b.shared.entry(rb.id()).unwrap();
        let due = std::time::Instant::now() + T;
        while e.existing_peer_stage(("c", sc)).is_some() {
            assert!(std::time::Instant::now() < due, "c's staging buffer kept");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(e.existing_peer_stage(("a", sa)).is_some());
    }

    /// The same for a published file region: each peer's WRITE lands from, and its READ is
    /// staged into, a buffer of its own.
    #[test]
    fn each_peer_of_a_published_file_goes_through_its_own_buffer() {
        let (a, b, c) = three();
        let dir = std::env::temp_dir().join(format!("dmaplane-peer-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shared.bin");
        std::fs::write(&path, vec![0u8; LEN as usize]).unwrap();
        let spec = crate::FileSpec::new(&path).writable();
        let rb = b.publish_file(&b.register_file(&spec).unwrap()).unwrap();
        let (pa, pc) = both_meet(&a, &b, &c, rb.id());
        write_aa(&a, &pa, rb.id());
        assert!(std::fs::read(&path).unwrap().iter().all(|&x| x == 0xaa));
        // The file is cleared; c asks b to land the range a wrote: its own (empty) buffer
        // goes to the file, not a's bytes.
        std::fs::write(&path, vec![0u8; LEN as usize]).unwrap();
        let sc = b.shared.peers.named("c").unwrap().session;
        assert_eq!(
            b.shared.serve_stage(("c", sc), &[(rb.id(), 0, LEN)], true),
            None
        );
        assert!(
            !std::fs::read(&path).unwrap().contains(&0xaa),
            "c's land wrote a's bytes to the file"
        );
        drop((pa, pc));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
