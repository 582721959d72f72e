//! The [`Agent`]: one per process (or per simulated host). It owns the devices, protection
//! domains, completion queues and queue pairs, registers memory, connects to peers and moves
//! data, with a progress thread that reaps completions, drives quiesce, leases and revokes,
//! and ends stalled transfers — the application never has to poll.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::blocks::{LocalBlocks, RemoteBlocks};
use crate::config::Config;
use crate::desc::{Desc, RemoteDesc};
use crate::drive::FileTransfer;
use crate::error::Result;
use crate::event::Event;
use crate::file::{FileRegion, FileSpec, StoragePath};
use crate::inner::AgentInner;
use crate::memory::Memory;
use crate::metadata::Metadata;
use crate::notify::{NextNotification, Notification, Notify, NotifyFilter};
use crate::peer::Peer;
use crate::publish::Publish;
use crate::region::Region;
use crate::stats::AgentStats;
use crate::sync::lock;
use crate::testbed::Testbed;
use crate::transfer::{Op, Prepared, Transfer, TransferHold};

/// The agent's threads and NIC claims: shut down exactly once, when the last [`Agent`] clone
/// lets go of them.
struct Threads {
    handles: Mutex<Vec<JoinHandle<()>>>,
    claimed: Vec<String>,
    shared: Weak<AgentInner>,
}

/// One agent. Cheap to clone (all clones are the same agent); dropping the last clone stops its
/// threads, closes its peers and releases its NICs.
#[derive(Clone)]
pub struct Agent {
    // Field order is drop order: the threads shut down while this clone still holds the state.
    _threads: Arc<Threads>,
    pub(crate) shared: Arc<AgentInner>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.shared.name)
            .field("nics", &self.nics())
            .field("handshake", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// The façade over a started agent: `handles` are its threads, `claimed` the testbed NICs
    /// it holds.
    pub(crate) fn new(
        shared: Arc<AgentInner>,
        handles: Vec<JoinHandle<()>>,
        claimed: Vec<String>,
    ) -> Agent {
        let threads = Arc::new(Threads {
            handles: Mutex::new(handles),
            claimed,
            shared: Arc::downgrade(&shared),
        });
        Agent {
            _threads: threads,
            shared,
        }
    }

    /// The agent's name, as given to [`Agent::builder`] (what peers know it by).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The tunables and limits the agent was built with.
    pub fn config(&self) -> &Config {
        &self.shared.cfg
    }

    /// The NICs this agent uses.
    pub fn nics(&self) -> Vec<String> {
        self.shared
            .nics
            .iter()
            .map(|n| n.name().to_string())
            .collect()
    }

    /// What each of its TCP NICs counted — connections, refusals, and the shared-memory path's
    /// lanes, views and messages (empty on other backends).
    pub fn tcp_stats(&self) -> Vec<(String, crate::TcpStats)> {
        self.shared
            .nics
            .iter()
            .filter_map(|n| Some((n.name().to_string(), n.tcp_stats()?)))
            .collect()
    }

    /// The simulated testbed the agent runs on (`None` on verbs).
    pub fn testbed(&self) -> Option<&Arc<Testbed>> {
        self.shared.platform.testbed()
    }

    /// Where the handshake listener accepts peers.
    pub fn listen_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `len` bytes of host memory on the NUMA node of the agent's first NIC (on verbs: a
    /// udmabuf).
    pub fn alloc_host(&self, name: &str, len: u64) -> Result<Memory> {
        self.shared.allocator().alloc_host(name, len)
    }

    /// A caller's buffer as memory the agent registers, zero-copy: NICs read and write its
    /// allocation in place. The agent holds the buffer from here on — no safe code can free,
    /// grow or move it while a NIC may reach it — and [`Memory::reclaim`] gives it back, after
    /// every NIC is revoked, with what DMA wrote into it. Dropping every handle without
    /// reclaiming frees it the same way (revoked first).
    ///
    /// On the testbed it is host memory on the NUMA node of the agent's first NIC; on verbs it
    /// is registered by its process VA (`ibv_reg_mr`). An empty buffer is refused.
    ///
    /// ```
    /// use dmaplane::{Agent, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let agent = Agent::builder("a").testbed(Testbed::builtin()?).nics(["nic0"]).build()?;
    /// let mem = agent.adopt("weights", vec![0u8; 4 << 20])?;
    /// assert_eq!(mem.len(), 4 << 20);
    /// let err = agent.adopt("empty", Vec::new()).unwrap_err();
    /// assert!(err.to_string().contains("`len` = 0"), "{err}");
    /// # Ok(()) }
    /// ```
    pub fn adopt(&self, name: &str, buf: Vec<u8>) -> Result<Memory> {
        self.shared.allocator().adopt(name, buf)
    }

    /// Another owner's memory as memory the agent registers, zero-copy, for as long as the
    /// returned [`Memory`] (and any registration of it) lives: what the Python package lends a
    /// NumPy array or a `bytearray` through, holding the object's buffer export so it cannot be
    /// freed or resized under a NIC. [`Lent`](crate::Lent) is an `unsafe` trait: its
    /// implementor promises the bytes stay valid and in place until it is dropped. Memory lent
    /// read-only ([`Lent::read_only`](crate::Lent::read_only)) is registered without remote
    /// write access and refused as a READ's target. Freeing it revokes every importer, then
    /// drops the lender.
    ///
    /// On the testbed it is host memory on the NUMA node of the agent's first NIC; on verbs and
    /// TCP it is registered by its process VA.
    pub fn lend(&self, name: &str, lent: Box<dyn crate::Lent>) -> Result<Memory> {
        self.shared.allocator().lend(name, lent)
    }

    /// A dma-buf fd from elsewhere (another driver's export, a dma-heap or udmabuf buffer
    /// made by other code, one received over a socket) as memory the agent registers: its NICs
    /// take it as the dma-buf (`ibv_reg_dmabuf_mr`) where the provider has dma-buf MRs, else by
    /// its mapping's process VAs, which the kernel may refuse to pin (udmabuf and the system
    /// heap map `VM_PFNMAP`) — [`Region::paths`](crate::Region::paths) says which, and a
    /// registration no NIC takes says why. The agent owns the fd from here on; freeing the
    /// memory revokes every NIC first, then closes it (the exporter's pages stay while any
    /// other fd refers to them). Verbs only: the simulated testbed has no kernel dma-bufs.
    pub fn import_dmabuf(&self, name: &str, fd: std::os::fd::OwnedFd) -> Result<Memory> {
        self.shared.allocator().import_dmabuf(name, fd)
    }

    /// `len` bytes of host memory on the host-memory device `device` (e.g. `mem1`) of the
    /// simulated testbed.
    pub fn alloc_host_on(&self, name: &str, device: &str, len: u64) -> Result<Memory> {
        self.shared.allocator().alloc_host_on(name, device, len)
    }

    /// `len` bytes of device memory on `gpu` (e.g. `gpu0`) of the simulated testbed.
    pub fn alloc_gpu(&self, name: &str, gpu: &str, len: u64) -> Result<Memory> {
        self.shared.allocator().alloc_gpu(name, gpu, len)
    }

    /// `len` bytes of device memory on CUDA GPU `ordinal`, through the driver (libcuda). Its
    /// NICs register it as a dma-buf where the driver exports one and the NIC takes it
    /// (`ibv_reg_dmabuf_mr`), else by its device VAs through a peer-memory client
    /// (nvidia-peermem); [`Region::paths`](crate::Region::paths) says which. Fails with
    /// [`Error::Gpu`](crate::Error::Gpu) when there is no driver or no such GPU.
    pub fn alloc_cuda(&self, name: &str, ordinal: u32, len: u64) -> Result<Memory> {
        self.shared.allocator().alloc_cuda(name, ordinal, len)
    }

    /// `len` bytes of CUDA device memory at `addr` that the caller allocated (a PyTorch
    /// tensor's, a CuPy array's), as memory the agent registers without a copy — the way
    /// [`Agent::alloc_cuda`]'s memory is: a dma-buf where the driver exports one over the
    /// tensor's host pages inside its allocation, else its device VAs, else staged through
    /// host memory (TCP NICs). The device is the one the driver says holds `addr`. Freeing the
    /// memory revokes every importer first; only then is `keeper` dropped (a registration
    /// holding a tensor gives it back). Refused, naming the field, unless `[addr, addr + len)`
    /// is device memory inside one allocation; [`Error::Gpu`](crate::Error::Gpu) without a
    /// driver.
    ///
    /// # Safety
    /// The memory must stay allocated while `keeper` lives (whatever frees it waits for the
    /// keeper's drop), and nothing else may free it meanwhile.
    pub unsafe fn lend_cuda(
        &self,
        name: &str,
        addr: u64,
        len: u64,
        keeper: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<Memory> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.shared.allocator().lend_cuda(name, addr, len, keeper) }
    }

    /// Register all of `memory` on every NIC of the agent that reaches it.
    pub fn register(&self, memory: &Memory) -> Result<Region> {
        self.register_range(memory, 0, memory.len())
    }

    /// Register `[offset, offset + len)` of `memory`. A range inside an earlier registration
    /// of the same memory costs a cache lookup, not a registration.
    ///
    /// A miss registers the range rounded out to whole pages, on every NIC of the agent that
    /// reaches the memory, and announces it to connected peers. Fails with [`Error::Invalid`](crate::Error::Invalid)
    /// when the memory belongs to another agent, was freed, no NIC reaches it, or the range is
    /// empty or runs past its end.
    ///
    /// ```
    /// use dmaplane::{Agent, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let testbed = Testbed::builtin()?;
    /// let agent = Agent::builder("a").testbed(testbed).nics(["nic0"]).build()?;
    /// let mem = agent.alloc_host("buf", 1 << 20)?;
    /// let whole = agent.register(&mem)?;
    /// assert_eq!(agent.stats().cache.misses, 1);
    /// // A range inside the earlier registration is served by it.
    /// let part = agent.register_range(&mem, 4096, 8192)?;
    /// assert_eq!(agent.stats().cache.hits, 1);
    /// assert_eq!(agent.stats().cache.misses, 1);
    /// assert_eq!(part.id(), whole.id());
    /// assert_eq!(part.len(), 8192);
    /// # Ok(()) }
    /// ```
    pub fn register_range(&self, memory: &Memory, offset: u64, len: u64) -> Result<Region> {
        self.shared
            .register_with(memory, offset, len, Publish::all())
    }

    /// Register `[offset, offset + len)` of `memory` for the peers and the access `publish`
    /// says: only those peers are told of it and granted leases on it, and a read-only
    /// registration's MRs carry no remote-write right (the NIC refuses a peer's WRITE). Not
    /// served from the registration cache unless published to all, read and write.
    ///
    /// ```
    /// use dmaplane::{Agent, Publish, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let testbed = Testbed::builtin()?;
    /// let agent = Agent::builder("a").testbed(testbed).nics(["nic0"]).build()?;
    /// let weights = agent.alloc_host("weights", 1 << 20)?;
    /// let r = agent.register_with(&weights, 0, 1 << 20, Publish::all().read_only().to(["trainer-1"])?)?;
    /// assert!(r.publish().is_read_only() && r.publish().allows("trainer-1"));
    /// assert!(!r.publish().allows("trainer-2"));
    /// // Only what is published to every peer is in the metadata anyone may get.
    /// assert!(agent.metadata().region(r.id()).is_none());
    /// # Ok(()) }
    /// ```
    pub fn register_with(
        &self,
        memory: &Memory,
        offset: u64,
        len: u64,
        publish: Publish,
    ) -> Result<Region> {
        self.shared.register_with(memory, offset, len, publish)
    }

    /// Let peers reach a file region: a host buffer of its length near the agent's first NIC,
    /// registered on its NICs and listed in the metadata with the file's path
    /// ([`RegionInfo::file`](crate::RegionInfo::file)) and staged keys. Before a peer's READ
    /// of a range this agent reads that range from the file into the buffer (through its
    /// drive), after a peer's WRITE it writes the landed range to the file (the region must be
    /// writable), each answered on the control connection before the peer's transfer goes on
    /// or ends — so a peer reads a checkpoint shard from this agent's disk straight into its own
    /// GPU. Ranges are subject to the file's `O_DIRECT` alignment. Deregistering the returned
    /// region (or dropping it, the buffer going with it) withdraws it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dmaplane::{Agent, FileSpec, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// # let path = std::env::temp_dir().join(format!("dmaplane-doc-pub-{}", std::process::id()));
    /// # std::fs::write(&path, vec![5u8; 1 << 20]).unwrap();
    /// let tb = Testbed::builtin()?;
    /// let owner = Agent::builder("owner").testbed(tb.clone()).nics(["nic1"]).build()?;
    /// let me = Agent::builder("me").testbed(tb).nics(["nic0"]).build()?;
    /// let shard = owner.publish_file(&owner.register_file(&FileSpec::new(&path).buffered_fallback())?)?;
    /// let peer = me.connect(&owner.metadata_blob()?)?;
    /// # while peer.region(shard.id()).is_none() { std::thread::sleep(Duration::from_millis(1)); }
    /// let gpu = me.alloc_gpu("weights", "gpu0", 1 << 20)?;
    /// let g = me.register(&gpu)?;
    /// me.read(&peer, &[g.all()], &[peer.desc(shard.id(), 0, 1 << 20)?], None)?.wait(Duration::from_secs(10))?;
    /// let mut got = [0u8; 8];
    /// gpu.read(0, &mut got)?;
    /// assert_eq!(got, [5u8; 8]);
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(()) }
    /// ```
    pub fn publish_file(&self, file: &FileRegion) -> Result<Region> {
        let name = format!("file:{}", file.path().display());
        let mem = self.alloc_host(&name, file.len())?;
        self.shared.publish_file(file, &mem)
    }

    /// Deregister `region` (the whole registration it is a view of) while transfers may still
    /// use it: every NIC quiesces first — posts naming it are refused, queue pairs with
    /// requests on it are stopped, peers holding leases on it stop and acknowledge, the
    /// translation is zapped — so nothing touches it afterwards, and transfers that use it end
    /// with [`Error::Revoked`](crate::Error::Revoked) ("it was deregistered"). The memory stays allocated and can be
    /// registered again. Fails with [`Error::Rdma`](crate::Error::Rdma) naming the NIC whose quiesce missed
    /// `deadline`.
    pub fn deregister(&self, region: &Region, deadline: Duration) -> Result<()> {
        self.shared.deregister(region, deadline)
    }

    /// This agent's metadata (handshake address, NICs, live registrations).
    pub fn metadata(&self) -> Metadata {
        self.shared.metadata()
    }

    /// [`Agent::metadata`] as a blob for [`Agent::connect`].
    pub fn metadata_blob(&self) -> Result<Vec<u8>> {
        self.shared.metadata().to_blob()
    }

    /// Connect to the agent a metadata blob describes (its handshake listener).
    pub fn connect(&self, blob: &[u8]) -> Result<Peer> {
        let meta = Metadata::from_blob(blob)?;
        crate::handshake::connect(&self.shared, &meta.handshake)
    }

    /// Connect to the agent listening at `addr`.
    pub fn connect_to(&self, addr: &str) -> Result<Peer> {
        crate::handshake::connect(&self.shared, addr)
    }

    /// Peers connected to this agent (those it connected to and those that connected to it).
    pub fn peers(&self) -> Vec<Peer> {
        self.shared
            .peers
            .list()
            .into_iter()
            .map(|shared| Peer { shared })
            .collect()
    }

    /// The connected peer called `name`.
    pub fn peer(&self, name: &str) -> Option<Peer> {
        self.shared.peers.named(name).map(|shared| Peer { shared })
    }

    /// WRITE `local` into the peer's `remote`, pairwise (equal lengths), in one batch. With a
    /// notification, the peer receives it after every byte has landed in its memory.
    pub fn write(
        &self,
        peer: &Peer,
        local: &[Desc],
        remote: &[RemoteDesc],
        notify: Option<Notify>,
    ) -> Result<Transfer> {
        crate::transfer::route::start(&self.shared, &peer.shared, Op::Write, local, remote, notify)
    }

    /// READ the peer's `remote` into `local`, pairwise (equal lengths), in one batch. With a
    /// notification, the peer receives it after every byte was read out of its memory (so it
    /// may reuse the blocks once it has it).
    pub fn read(
        &self,
        peer: &Peer,
        local: &[Desc],
        remote: &[RemoteDesc],
        notify: Option<Notify>,
    ) -> Result<Transfer> {
        crate::transfer::route::start(&self.shared, &peer.shared, Op::Read, local, remote, notify)
    }

    /// READ blocks `remote_idx` of the peer's prepared list into blocks `local_idx` of this
    /// agent's, pairwise: [`Agent::read`] by index.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dmaplane::{Agent, Notify, NotifyFilter, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// const BLOCK: u64 = 4096;
    /// let testbed = Testbed::builtin()?;
    /// let prefill = Agent::builder("prefill").testbed(testbed.clone()).nics(["nic0"]).build()?;
    /// let decode = Agent::builder("decode").testbed(testbed).nics(["nic1"]).build()?;
    /// let kv = prefill.alloc_gpu("kv", "gpu0", 64 * BLOCK)?;
    /// kv.write(5 * BLOCK, &[5u8; BLOCK as usize])?;
    /// let _pool = prefill.register(&kv)?;
    /// // decode: the prefill pool by name, both pools split into blocks once.
    /// let peer = decode.connect(&prefill.metadata_blob()?)?;
    /// let theirs = peer.blocks(peer.wait_region("kv", Duration::from_secs(5))?.id, BLOCK)?;
    /// let mine = decode.register(&decode.alloc_gpu("kv", "gpu1", 80 * BLOCK)?)?.blocks(BLOCK)?;
    /// let t = decode.read_blocks(&peer, &mine, &[70], &theirs, &[5], Some(Notify::tag_only("req-9")))?;
    /// t.wait(Duration::from_secs(10))?;
    /// let note = prefill
    ///     .next_notification_matching(&NotifyFilter::any().from("decode").tag("req-9"), Duration::from_secs(5))
    ///     .expect("decode said it is done");
    /// assert_eq!(note.transfer, Some(t.id()));
    /// # Ok(()) }
    /// ```
    pub fn read_blocks(
        &self,
        peer: &Peer,
        local: &LocalBlocks,
        local_idx: &[usize],
        remote: &RemoteBlocks,
        remote_idx: &[usize],
        notify: Option<Notify>,
    ) -> Result<Transfer> {
        self.read(
            peer,
            &local.pick(local_idx)?,
            &remote.pick(remote_idx)?,
            notify,
        )
    }

    /// WRITE blocks `local_idx` of this agent's prepared list into blocks `remote_idx` of the
    /// peer's, pairwise: [`Agent::write`] by index.
    pub fn write_blocks(
        &self,
        peer: &Peer,
        local: &LocalBlocks,
        local_idx: &[usize],
        remote: &RemoteBlocks,
        remote_idx: &[usize],
        notify: Option<Notify>,
    ) -> Result<Transfer> {
        self.write(
            peer,
            &local.pick(local_idx)?,
            &remote.pick(remote_idx)?,
            notify,
        )
    }

    /// A READ of blocks `remote_idx` into blocks `local_idx`, checked, routed and split into
    /// requests once, to [`Prepared::post`] as often as wanted.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dmaplane::{Agent, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let testbed = Testbed::builtin()?;
    /// let a = Agent::builder("a").testbed(testbed.clone()).nics(["nic0"]).build()?;
    /// let b = Agent::builder("b").testbed(testbed).nics(["nic1"]).build()?;
    /// let rb = b.register(&b.alloc_host("src", 16 * 4096)?)?;
    /// let peer = a.connect(&b.metadata_blob()?)?;
    /// let mine = a.register(&a.alloc_host("dst", 16 * 4096)?)?.blocks(4096)?;
    /// let theirs = peer.blocks(rb.id(), 4096)?;
    /// let again = a.prepare_read(&peer, &mine, &[0, 1, 2, 3], &theirs, &[12, 13, 14, 15])?;
    /// for _ in 0..3 {
    ///     again.post(None)?.wait(Duration::from_secs(10))?;
    /// }
    /// assert_eq!(again.bytes(), 4 * 4096);
    /// # Ok(()) }
    /// ```
    pub fn prepare_read(
        &self,
        peer: &Peer,
        local: &LocalBlocks,
        local_idx: &[usize],
        remote: &RemoteBlocks,
        remote_idx: &[usize],
    ) -> Result<Prepared> {
        self.prepare(
            Op::Read,
            peer,
            &local.pick(local_idx)?,
            &remote.pick(remote_idx)?,
        )
    }

    /// [`Agent::prepare_read`] for a WRITE of blocks `local_idx` into blocks `remote_idx`.
    pub fn prepare_write(
        &self,
        peer: &Peer,
        local: &LocalBlocks,
        local_idx: &[usize],
        remote: &RemoteBlocks,
        remote_idx: &[usize],
    ) -> Result<Prepared> {
        self.prepare(
            Op::Write,
            peer,
            &local.pick(local_idx)?,
            &remote.pick(remote_idx)?,
        )
    }

    fn prepare(
        &self,
        op: Op,
        peer: &Peer,
        local: &[Desc],
        remote: &[RemoteDesc],
    ) -> Result<Prepared> {
        let plan = crate::transfer::route::plan(&self.shared, &peer.shared, op, local, remote)?;
        Ok(Prepared {
            agent: Arc::downgrade(&self.shared),
            plan,
        })
    }

    /// Send `notify` to `peer` on its own — no transfer — after every notification this agent
    /// queued for it before (transfers' included: one connection, in order).
    pub fn notify(&self, peer: &Peer, notify: Notify) -> Result<()> {
        notify.check(|| format!("notification to {}", peer.name()))?;
        let (tag, bytes) = notify.into_parts();
        peer.shared.notify(None, tag, bytes)?;
        self.shared.engine.count_notification_sent();
        Ok(())
    }

    /// Notifications received so far (and taken from the queue).
    pub fn notifications(&self) -> Vec<Notification> {
        let (v, dropped) = self.shared.inbox.drain();
        if dropped > 0 {
            self.shared.events.push(Event::Dropped {
                what: "notifications".into(),
                count: dropped,
            });
        }
        v
    }

    /// Wait up to `timeout` for the next notification, from any peer.
    pub fn next_notification(&self, timeout: Duration) -> Option<Notification> {
        self.next_notification_matching(&NotifyFilter::any(), timeout)
    }

    /// Wait up to `timeout` for the next notification from the agent called `peer` (others
    /// stay queued for other readers).
    pub fn next_notification_from(&self, peer: &str, timeout: Duration) -> Option<Notification> {
        self.next_notification_matching(&NotifyFilter::any().from(peer), timeout)
    }

    /// Wait up to `timeout` for the next notification `filter` takes (by sender, tag or tag
    /// prefix); the others stay queued, in order.
    pub fn next_notification_matching(
        &self,
        filter: &NotifyFilter,
        timeout: Duration,
    ) -> Option<Notification> {
        self.shared.inbox.next(filter, timeout)
    }

    /// The next notification `filter` takes, as a `Future` (no runtime needed; bound it with
    /// the runtime's timeout).
    pub fn notification(&self, filter: NotifyFilter) -> NextNotification {
        NextNotification {
            inbox: self.shared.inbox.clone(),
            filter,
        }
    }

    /// Hold every transfer of this agent after its first `after` requests, until the returned
    /// hold is dropped — a test's way to have a free or deregistration (its own, or the peer's)
    /// meet a transfer half done, every time: post, [`TransferHold::wait_held`], free, then
    /// look at how the transfer ended. A held transfer whose memory is revoked meanwhile ends
    /// with [`Error::Revoked`](crate::Error::Revoked) as one in flight would; one whose memory
    /// stays goes on at the release. Not for production: nothing moves while it is held.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dmaplane::{Agent, Error, Event, Side, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let testbed = Testbed::builtin()?;
    /// let a = Agent::builder("a").testbed(testbed.clone()).nics(["nic0"]).chunk(4096).build()?;
    /// let b = Agent::builder("b").testbed(testbed).nics(["nic1"]).build()?;
    /// let theirs = b.alloc_host("src", 1 << 20)?;
    /// let rb = b.register(&theirs)?;
    /// let peer = a.connect(&b.metadata_blob()?)?;
    /// let dst = a.register(&a.alloc_host("dst", 1 << 20)?)?;
    /// let hold = a.hold_transfers(4);
    /// let t = a.read(&peer, &[dst.all()], &[peer.desc(rb.id(), 0, 1 << 20)?], None)?;
    /// hold.wait_held(&t, Duration::from_secs(5))?; // 4 of 256 requests done, the rest held
    /// theirs.free(Duration::from_secs(5))?;
    /// let err = t.wait(Duration::from_secs(5)).unwrap_err();
    /// assert!(matches!(err, Error::Revoked { side: Side::Remote, .. }), "{err}");
    /// # Ok(()) }
    /// ```
    pub fn hold_transfers(&self, after: u64) -> TransferHold {
        self.shared.engine.set_hold(after);
        TransferHold {
            engine: Arc::downgrade(&self.shared.engine),
            after,
        }
    }

    /// Events since the last call (frees, lost peers, drops).
    pub fn events(&self) -> Vec<Event> {
        self.shared.events.drain()
    }

    /// The agent's counters now: transfers, requests, bytes, notifications and the cache.
    pub fn stats(&self) -> AgentStats {
        let mut s = self.shared.engine.stats();
        s.cache = self.shared.cache.stats().merge(self.shared.files.stats());
        s.holders_cut_off = self.shared.holders_cut_off();
        s.refused = self.shared.peers.refused();
        s.refused.leases = self.shared.nics.lease_messages_refused();
        s.handshakes_under_way = self.shared.peers.serving() as u64;
        s
    }

    /// Requests posted on each NIC so far, in the agent's NIC order: how transfers were
    /// striped over the rails.
    pub fn requests_by_nic(&self) -> Vec<(String, u64)> {
        self.shared
            .nics
            .iter()
            .map(|n| (n.name().to_string(), n.posted()))
            .collect()
    }

    /// Register a file region: `spec`'s range of a file, opened for direct I/O, on the agent's
    /// drive. A range inside an earlier registration of the same file is a cache hit.
    ///
    /// Fails with [`Error::Invalid`](crate::Error::Invalid) naming the field for a path that does not exist (and is
    /// not to be created) or a range outside the file, and with [`Error::Storage`](crate::Error::Storage) for a file
    /// system without `O_DIRECT` (unless [`FileSpec::buffered_fallback`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use dmaplane::{Agent, FileSpec, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// # let path = std::env::temp_dir().join(format!("dmaplane-doc-file-{}", std::process::id()));
    /// # std::fs::write(&path, vec![9u8; 1 << 20]).unwrap();
    /// let agent = Agent::builder("a").testbed(Testbed::builtin()?).nics(["nic0"]).build()?;
    /// let shard = agent.register_file(&FileSpec::new(&path).buffered_fallback())?;
    /// let weights = agent.alloc_gpu("weights", "gpu0", 1 << 20)?;
    /// let w = agent.register(&weights)?;
    /// let t = agent.read_file(&[shard.all()], &[w.all()])?;
    /// assert_eq!(t.wait(Duration::from_secs(10))?, 1 << 20);
    /// assert!(!t.paths()[0].is_bounced()); // nvme0 reaches gpu0's BAR1 peer to peer
    /// let mut got = [0u8; 16];
    /// weights.read(0, &mut got)?;
    /// assert_eq!(got, [9u8; 16]);
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(()) }
    /// ```
    pub fn register_file(&self, spec: &FileSpec) -> Result<FileRegion> {
        self.shared
            .files
            .register(&self.shared.platform, &self.shared.registry, spec)
    }

    /// Deregister a file region: new transfers naming it are refused; those under way finish.
    pub fn deregister_file(&self, region: &FileRegion) {
        self.shared.files.deregister(region);
    }

    /// Read file descriptors `files` into memory descriptors `into`, pairwise (equal
    /// lengths), through the agent's drive — straight into a GPU's memory where the drive
    /// reaches it peer to peer, else through a host bounce buffer
    /// ([`FileTransfer::paths`] says which). Misaligned `O_DIRECT` requests are refused
    /// before anything moves, naming the field and the alignment.
    pub fn read_file(&self, files: &[Desc], into: &[Desc]) -> Result<FileTransfer> {
        let pairs = self.shared.resolve_files(false, files, into)?;
        self.shared
            .files
            .drive(&self.shared.platform)?
            .start(&self.shared.platform, false, pairs)
    }

    /// Write memory descriptors `from` into file descriptors `files`, pairwise.
    pub fn write_file(&self, from: &[Desc], files: &[Desc]) -> Result<FileTransfer> {
        let pairs = self.shared.resolve_files(true, files, from)?;
        self.shared
            .files
            .drive(&self.shared.platform)?
            .start(&self.shared.platform, true, pairs)
    }

    /// How the agent's drive reaches `memory`: direct, or bounced through host memory and why.
    pub fn storage_path(&self, memory: &Memory) -> Result<StoragePath> {
        self.shared
            .files
            .drive(&self.shared.platform)?
            .reach(memory)
    }

    /// Registrations the cache holds for `memory` (0 once it is freed).
    pub fn cached_registrations(&self, memory: &Memory) -> usize {
        self.shared.cache.entries_of(memory.id())
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        // The accept thread holds the agent's state until it sees `stop`.
        let Some(s) = self.shared.upgrade() else {
            return;
        };
        s.stop.store(true, Ordering::Release);
        s.engine.stop();
        // Taken out first: a peer's reader retiring takes this lock too.
        for p in s.peers.drain() {
            p.close("the agent was dropped");
        }
        for h in lock(&self.handles).drain(..) {
            if h.join().is_err() {
                tracing::error!(agent = %s.name, "an agent thread panicked");
            }
        }
        if let Some(t) = s.platform.testbed() {
            t.release(&self.claimed);
        }
    }
}
