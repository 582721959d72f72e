//! Loading files into a peer's memory through local memory — checkpoint shards to a remote GPU:
//! each shard is read from its file into a local slot (the agent's drive), then written from
//! the slot into the peer's memory (a NIC), the read of shard n + 1 overlapping the send of
//! shard n.
//!
//! The contract:
//! - Slot `n % slots.len()` holds shard n; a shard is read into its slot only once the send of
//!   the shard that held the slot before has completed, so no send reads a slot being filled.
//! - The first error (a revoke of either side, a short read, a lost peer) ends the load: every
//!   read and send already started is waited for (each ends, done or with its own error) before
//!   [`load`] returns the error, so nothing of the load is still moving afterwards.
//!
//! ```
//! use std::time::Duration;
//! use dmaplane::load::{Shard, load};
//! use dmaplane::{Agent, FileSpec, Testbed};
//! # fn main() -> dmaplane::Result<()> {
//! # let dir = std::env::temp_dir();
//! # let paths: Vec<_> = (0..3).map(|i| dir.join(format!("dmaplane-doc-shard-{}-{i}", std::process::id()))).collect();
//! # for (i, p) in paths.iter().enumerate() { std::fs::write(p, vec![i as u8 + 1; 1 << 20]).unwrap(); }
//! let tb = Testbed::builtin()?;
//! let a = Agent::builder("a").testbed(tb.clone()).nics(["nic0"]).build()?;
//! let b = Agent::builder("b").testbed(tb).nics(["nic1"]).build()?;
//! let slots = a.register(&a.alloc_gpu("slots", "gpu0", 2 << 20)?)?;
//! let weights = b.alloc_gpu("weights", "gpu2", 3 << 20)?;
//! let w = b.register(&weights)?;
//! let peer = a.connect(&b.metadata_blob()?)?;
//! # while peer.region(w.id()).is_none() { std::thread::sleep(Duration::from_millis(1)); }
//! let mut shards = Vec::new();
//! for (i, p) in paths.iter().enumerate() {
//!     let f = a.register_file(&FileSpec::new(p).buffered_fallback())?;
//!     shards.push(Shard { file: f.all(), remote: peer.desc(w.id(), i as u64 * (1 << 20), 1 << 20)? });
//! }
//! let two = [slots.desc(0, 1 << 20)?, slots.desc(1 << 20, 1 << 20)?];
//! let report = load(&a, &peer, &shards, &two, Duration::from_secs(10), |_, _| {})?;
//! assert_eq!(report.bytes, 3 << 20);
//! let mut got = [0u8; 4];
//! weights.read(2 << 20, &mut got)?;
//! assert_eq!(got, [3u8; 4]);
//! # for p in &paths { std::fs::remove_file(p).ok(); }
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::agent::Agent;
use crate::desc::{Desc, RemoteDesc};
use crate::drive::FileTransfer;
use crate::error::{Error, Result};
use crate::peer::Peer;
use crate::transfer::Transfer;

/// One shard: a file descriptor of this agent and the peer's memory it goes to (equal
/// lengths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// The bytes of a registered file ([`crate::FileRegion::desc`]).
    pub file: Desc,
    /// Where they go in the peer's memory ([`crate::Peer::desc`]).
    pub remote: RemoteDesc,
}

/// What the load is doing, told to its callback as it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The shard's read from its file into its slot was started.
    ReadStarted,
    /// Its bytes are in the slot.
    ReadDone,
    /// Its WRITE into the peer's memory was started.
    SendStarted,
    /// Its bytes landed in the peer's memory.
    SendDone,
}

/// How a load went.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LoadReport {
    /// Shards moved.
    pub shards: usize,
    /// Bytes moved.
    pub bytes: u64,
    /// From the first read started to the last send done.
    pub elapsed: Duration,
}

impl LoadReport {
    /// Bytes per second over the whole load, in GB/s.
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e9
    }
}

/// Load `shards` into the peer's memory through `slots` (local memory descriptors, each at
/// least as long as the longest shard; two let the read of shard n + 1 overlap the send of
/// shard n). `timeout` bounds each wait; `step` is called as each shard moves on.
pub fn load(
    agent: &Agent,
    peer: &Peer,
    shards: &[Shard],
    slots: &[Desc],
    timeout: Duration,
    mut step: impl FnMut(usize, Step),
) -> Result<LoadReport> {
    check(shards, slots)?;
    let start = Instant::now();
    let s = slots.len();
    let slot = |n: usize| Desc::new(slots[n % s].region, slots[n % s].offset, shards[n].file.len);
    let mut reads: VecDeque<FileTransfer> = VecDeque::new();
    let mut sends: VecDeque<Transfer> = VecDeque::new();
    let (mut next_read, mut sends_done) = (0usize, 0usize);
    let run = (|| -> Result<()> {
        for n in 0..shards.len() {
            // Every read whose slot is free (the send of its slot's last shard completed).
            while next_read < shards.len() && next_read < sends_done + s {
                reads.push_back(agent.read_file(&[shards[next_read].file], &[slot(next_read)])?);
                step(next_read, Step::ReadStarted);
                next_read += 1;
            }
            let Some(r) = reads.front() else {
                return Err(Error::setup(agent.name(), "load: a read went missing"));
            };
            r.wait(timeout)?;
            reads.pop_front();
            step(n, Step::ReadDone);
            sends.push_back(agent.write(
                peer,
                &[slot(n)],
                std::slice::from_ref(&shards[n].remote),
                None,
            )?);
            step(n, Step::SendStarted);
            // Free the slot the next read needs; the read already started runs meanwhile.
            while next_read < shards.len() && next_read >= sends_done + s {
                wait_send(&mut sends, timeout)?;
                step(sends_done, Step::SendDone);
                sends_done += 1;
            }
        }
        while !sends.is_empty() {
            wait_send(&mut sends, timeout)?;
            step(sends_done, Step::SendDone);
            sends_done += 1;
        }
        Ok(())
    })();
    if let Err(e) = run {
        // Nothing of the load keeps moving once it returns: each started part ends first
        // (a wait that times out is waited again, up to ten times).
        for r in reads {
            for _ in 0..10 {
                if !matches!(r.wait(timeout), Err(Error::WaitTimeout { .. })) {
                    break;
                }
            }
        }
        for t in sends {
            for _ in 0..10 {
                if !matches!(t.wait_sleeping(timeout), Err(Error::WaitTimeout { .. })) {
                    break;
                }
            }
        }
        return Err(e);
    }
    Ok(LoadReport {
        shards: shards.len(),
        bytes: shards.iter().map(|s| s.file.len).sum(),
        elapsed: start.elapsed(),
    })
}

fn wait_send(sends: &mut VecDeque<Transfer>, timeout: Duration) -> Result<()> {
    if let Some(t) = sends.front() {
        // Megabytes on a NIC: sleep rather than spin, leaving the cores to the devices.
        t.wait_sleeping(timeout)?;
        sends.pop_front();
    }
    Ok(())
}

fn check(shards: &[Shard], slots: &[Desc]) -> Result<()> {
    if slots.is_empty() {
        return Err(Error::invalid(
            "load",
            "slots",
            0,
            "at least one (two to overlap)",
        ));
    }
    let room = slots.iter().map(|d| d.len).min().unwrap_or(0);
    for (i, a) in slots.iter().enumerate() {
        for b in &slots[i + 1..] {
            if a.region == b.region && a.offset < b.offset + b.len && b.offset < a.offset + a.len {
                return Err(Error::invalid(
                    "load",
                    "slots",
                    format!(
                        "[{:#x}, +{:#x}) and [{:#x}, +{:#x}) of region {}",
                        a.offset, a.len, b.offset, b.len, a.region
                    ),
                    "slots overlap: a read would land in a slot a send is reading",
                ));
            }
        }
    }
    for (i, sh) in shards.iter().enumerate() {
        if sh.file.len != sh.remote.len() {
            return Err(Error::invalid(
                "load",
                "shards",
                format!(
                    "shard {i}: file {} / remote {}",
                    sh.file.len,
                    sh.remote.len()
                ),
                "a shard's file and remote descriptors must be the same length",
            ));
        }
        if sh.file.len > room {
            return Err(Error::invalid(
                "load",
                "slots",
                format!("{room} bytes"),
                format!(
                    "shard {i} is {} bytes: every slot must hold it",
                    sh.file.len
                ),
            ));
        }
    }
    Ok(())
}
