//! Staging: GPU memory a NIC cannot reach peer to peer goes through a host buffer on the GPU's
//! NUMA node, which that NIC registers instead and the GPU's copy engine imports.
//!
//! The contract, on both sides of a transfer:
//! - **Local side.** A WRITE copies its bytes from device memory into the staging buffer
//!   before any request is posted; a READ copies them from the staging buffer into device
//!   memory after every request completed, before the transfer is done.
//! - **Remote side.** A peer's region whose key is [`crate::RegionKey::staged`] is reached
//!   through its owner's staging buffer. After a WRITE's requests all completed, the writer
//!   asks the owner to *land* the ranges (copy them into device memory) and is done only when
//!   the owner answers; before a READ posts anything, it asks the owner to *stage* the ranges
//!   (copy them out of device memory) and posts once the owner answers. The owner serves these
//!   on its control connection, in order, so a notification sent after them is delivered
//!   after the copy.
//! - **Files.** A published file region ([`crate::Agent::publish_file`]) is served the same
//!   way: its keys are staged, to *stage* a range is to read it from the file into the buffer,
//!   to *land* one is to write it from the buffer to the file, through the owner's drive.
//! - **One buffer per peer.** Each peer a staged registration is announced to gets a staging
//!   buffer of its own ([`crate::region::PeerStage`]), with its own keys, told to that peer
//!   only and leased to it only: one peer can neither read what was staged for another nor
//!   overwrite what another is about to land, and a peer's land copies only its own buffer.
//!   The owner's own transfers use the registration's buffer. The memory's metadata for
//!   anyone (the blob) lists no staged key. A peer's buffers go when it is lost.
//! - **Revoke.** The staging buffer lives and dies with the registration; freeing the memory
//!   revokes the staging buffer first (the NICs that use it quiesce, peers' leases on it are
//!   withdrawn, the copy engine's view is zapped), then the memory itself. A copy that meets
//!   a revoked side fails, and the transfer ends with [`crate::Error::Revoked`].

use std::sync::Arc;

use dmaplane_core::ImporterKind;
use dmaplane_core::fabric::HostMemory;
use dmaplane_gpu::{Gpu, Loc, PeerMemory};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::memory::{Backing, Memory, Tied};
use crate::platform::Platform;

/// A host staging buffer for GPU memory some NIC cannot reach: as long as the registration,
/// registered by those NICs and imported by the GPU's copy engine. Field order is drop order:
/// the copy engine's view before the buffer.
pub(crate) struct Stage {
    pub(crate) view: PeerMemory,
    pub(crate) host: StageHost,
    pub(crate) gpu: Gpu,
    /// The host-memory device it lives on.
    pub(crate) through: String,
    /// The buffer's name (`<memory>-staging`).
    pub(crate) name: String,
}

impl Tied for Stage {
    fn revoke(&self, deadline: std::time::Duration) -> dmaplane_core::RevokeReport {
        self.host.revoke(deadline)
    }
}

/// The host side of a staging or bounce buffer.
pub(crate) enum StageHost {
    /// Host memory of the simulated testbed, reached by bus address.
    Fabric(HostMemory),
    /// Page-aligned memory of this process, reached by its address: what a real GPU's copy
    /// engine registers (`cuMemHostRegister`) and the kernel's `O_DIRECT` reads into.
    User(dmaplane_core::user::UserBuffer),
}

impl StageHost {
    /// Attach `importer`: by bus address for `dev` on the fabric, else by process address.
    pub(crate) fn attach(
        &self,
        importer: Arc<dyn dmaplane_core::revoke::Importer>,
        dev: Option<dmaplane_core::fabric::DeviceId>,
        accepts: &[dmaplane_core::Accept],
    ) -> std::result::Result<dmaplane_core::Attachment, dmaplane_core::AttachError> {
        match (self, dev) {
            (StageHost::Fabric(h), Some(dev)) => h.attach(importer, dev, accepts),
            (StageHost::Fabric(h), None) => Err(dmaplane_core::AttachError::Exporter {
                export: dmaplane_core::Exporter::name(h).to_string(),
                what: "fabric host memory needs the importer's fabric device".into(),
            }),
            (StageHost::User(u), _) => u.attach(importer, accepts),
        }
    }

    /// Revoke every importer of it.
    pub(crate) fn revoke(&self, deadline: std::time::Duration) -> dmaplane_core::RevokeReport {
        use dmaplane_core::Exporter;
        match self {
            StageHost::Fabric(h) => h.revoke(deadline),
            StageHost::User(u) => u.revoke(deadline),
        }
    }
}

impl Stage {
    /// Copy `len` bytes at registration offset `off` between the GPU memory and the staging
    /// buffer: `to_stage` before a NIC sends them, the other way after a NIC landed them.
    /// Fails once either side is revoked or freed.
    pub(crate) fn copy(
        &self,
        memory: &Memory,
        base: u64,
        off: u64,
        len: u64,
        to_stage: bool,
    ) -> Result<()> {
        self.copy_at(memory, base + off, off, len, to_stage)
    }

    /// Copy `len` bytes between memory offset `mem_off` and staging offset `stage_off` (a
    /// bounce buffer holds a piece of the memory at a time).
    pub(crate) fn copy_at(
        &self,
        memory: &Memory,
        mem_off: u64,
        stage_off: u64,
        len: u64,
        to_stage: bool,
    ) -> Result<()> {
        memory.with_backing(|b| match b {
            Backing::Gpu(g) => {
                let (mem, stage) = (Loc::Mem(g, mem_off), Loc::Peer(&self.view, stage_off));
                let (src, dst) = if to_stage { (mem, stage) } else { (stage, mem) };
                Ok(self.gpu.copy(src, dst, len)?)
            }
            _ => Err(Error::setup(
                memory.name(),
                "staging for memory that is not a GPU's",
            )),
        })
    }
}

/// A staging buffer for `len` bytes of GPU `memory`: host memory on the GPU's NUMA node,
/// resident, imported by the GPU's copy engine.
/// `peer`: the peer it stages for (its own buffer, [`crate::region::PeerStage`]); `None`: the
/// owner's own transfers.
pub(crate) fn staging(
    platform: &Platform,
    memory: &Memory,
    len: u64,
    peer: Option<&str>,
) -> Result<Arc<Stage>> {
    let gpu_name = memory.location().device();
    let what = || format!("staging for {}", memory.name());
    let name = match peer {
        Some(p) => format!("{}-staging-{p}", memory.name()),
        None => format!("{}-staging", memory.name()),
    };
    let Some(tb) = platform.testbed() else {
        // A real GPU (CUDA): memfd host memory of this process, which NICs register by address
        // (and peers on this host may map: the TCP backend's shared-memory path), registered
        // with the GPU's copy engine (`cuMemHostRegister`).
        let user = dmaplane_core::user::UserBuffer::memfd(&name, len)
            .map_err(|e| Error::setup(&what(), e.to_string()))?;
        return cuda_stage(platform, memory, StageHost::User(user), name);
    };
    let topo = tb.topology();
    let numa = topo
        .numa_of(gpu_name)
        .map_err(|e| Error::setup(&what(), e.to_string()))?;
    let Some(dev) = topo.host_memory_for_numa(numa) else {
        return Err(Error::setup(
            &what(),
            format!("no host memory on NUMA node {numa}, where {gpu_name} is"),
        ));
    };
    let through = dev.id.clone();
    let host = HostMemory::new(tb.fabric(), tb.device(&through)?, &name, len)
        .map_err(|e| Error::setup(&what(), e.to_string()))?;
    // Staging buffers are pinned host memory: resident before a transfer needs them.
    host.window().memory().fill(0);
    let gpu = tb.gpu(gpu_name)?.clone();
    let gdev = tb.device(gpu_name)?;
    let view = gpu.import(&name, ImporterKind::Pinned, |i, a| host.attach(i, gdev, a))?;
    Ok(Arc::new(Stage {
        view,
        host: StageHost::Fabric(host),
        gpu,
        through,
        name,
    }))
}

/// A bounce buffer of `len` bytes for CUDA `memory` (on `cuda:N`): page-aligned host memory of
/// this process, registered with the GPU's copy engine (`cuMemHostRegister`), which the
/// kernel's `O_DIRECT` reads fill and writes drain.
pub(crate) fn cuda_bounce(platform: &Platform, memory: &Memory, len: u64) -> Result<Arc<Stage>> {
    let name = format!("{}-bounce", memory.name());
    let user = dmaplane_core::user::UserBuffer::anonymous(&name, len).map_err(|e| {
        Error::setup(
            &format!("bounce buffer for {}", memory.name()),
            e.to_string(),
        )
    })?;
    cuda_stage(platform, memory, StageHost::User(user), name)
}

/// `host` (this process's memory) as a stage of CUDA `memory` (on `cuda:N`): registered with the
/// copy engine of the GPU handle that allocated the memory, which knows both sides.
fn cuda_stage(
    platform: &Platform,
    memory: &Memory,
    host: StageHost,
    name: String,
) -> Result<Arc<Stage>> {
    let device = memory.location().device();
    let Some(ordinal) = device
        .strip_prefix("cuda:")
        .and_then(|n| n.parse::<u32>().ok())
    else {
        return Err(Error::setup(
            &name,
            format!("{device} is not a CUDA GPU (cuda:N): no copy engine to stage it with"),
        ));
    };
    let gpu = platform.cuda_gpu(ordinal)?;
    let StageHost::User(user) = &host else {
        return Err(Error::setup(
            &name,
            "a CUDA stage is host memory of this process",
        ));
    };
    let view = gpu.import(&name, ImporterKind::Pinned, |i, a| user.attach(i, a))?;
    Ok(Arc::new(Stage {
        view,
        host,
        gpu,
        through: "host memory (cuMemHostRegister)".into(),
        name,
    }))
}

/// One range of a staged registration, as the control connection carries it:
/// `(registration id, offset within it, bytes)`.
pub(crate) type StageRange = (u32, u64, u64);

/// Why the owner could not land or stage a range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StageFailure {
    pub(crate) region: u32,
    pub(crate) name: String,
    /// The revoke's epoch, when a revoke is why.
    pub(crate) epoch: Option<u64>,
    pub(crate) why: String,
}

/// Merge ranges that continue one another (a scattered batch stays one range per piece).
pub(crate) fn merge(ranges: &mut Vec<StageRange>) {
    ranges.sort_unstable();
    let mut out: Vec<StageRange> = Vec::with_capacity(ranges.len());
    for &(r, off, len) in ranges.iter() {
        match out.last_mut() {
            Some((pr, po, pl)) if *pr == r && *po + *pl >= off => {
                *pl = (*pl).max(off + len - *po);
            }
            _ => out.push((r, off, len)),
        }
    }
    *ranges = out;
}
