//! # dmaplane — the application library
//!
//! Register memory, connect to a peer, move data, get told when it landed — with revoke
//! honoured: memory freed or moved under a transfer ends it with a typed error, nothing lost,
//! nothing written after the exporter's ack.
//!
//! ## The tour: two engines sharing a KV cache
//!
//! A prefill agent owns a pool of 64 KV blocks on `gpu0`; a decode agent READs the blocks of
//! one request by id into its own 80-block pool on `gpu2`, tells prefill it is done (prefill may
//! reuse those blocks from then on), and learns when prefill frees the pool. In production the
//! two are processes on different hosts and the metadata blob travels by whatever the engines
//! already use (an HTTP side channel, etcd); here they share the built-in simulated testbed
//! ([`Testbed::builtin`]), and `examples/disagg_kv.rs` runs the same flow in two processes over
//! TCP.
//!
//! ```
//! use std::time::Duration;
//! use dmaplane::{Agent, Event, Notify, NotifyFilter, Testbed};
//! # fn main() -> dmaplane::Result<()> {
//! const BLOCK: u64 = 64 << 10;
//! let secs = Duration::from_secs;
//! let testbed = Testbed::builtin()?;
//!
//! // Prefill: its pool, registered (on every NIC that reaches gpu0) and so announced.
//! let prefill = Agent::builder("prefill").testbed(testbed.clone()).nics(["nic0"]).build()?;
//! let kv = prefill.alloc_gpu("kv", "gpu0", 64 * BLOCK)?;
//! kv.write(17 * BLOCK, b"block 17")?;
//! let _pool = prefill.register(&kv)?;
//! let blob = prefill.metadata_blob()?; // -> decode, by any side channel
//!
//! // Decode: connect with the blob, find prefill's pool by name, split both pools into
//! // blocks once.
//! let decode = Agent::builder("decode").testbed(testbed).nics(["nic1"]).build()?;
//! let peer = decode.connect(&blob)?;
//! let remote = peer.blocks(peer.wait_region("kv", secs(5))?.id, BLOCK)?;
//! let mine = decode.alloc_gpu("kv", "gpu2", 80 * BLOCK)?;
//! let local = decode.register(&mine)?.blocks(BLOCK)?;
//!
//! // READ blocks 17, 3 and 40 of prefill into slots 0, 1 and 2, with "done" attached:
//! // prefill gets it once every byte was read.
//! let t = decode.read_blocks(&peer, &local, &[0, 1, 2], &remote, &[17, 3, 40],
//!                            Some(Notify::new("req-42", b"done".to_vec())))?;
//! t.wait(secs(10))?;
//! let mut got = [0u8; 8];
//! mine.read(0, &mut got)?;
//! assert_eq!(&got, b"block 17");
//!
//! // Prefill: the notification, by sender and tag; the blocks are free to reuse.
//! let note = prefill
//!     .next_notification_matching(&NotifyFilter::any().from("decode").tag("req-42"), secs(5))
//!     .expect("decode is done");
//! assert_eq!(note.bytes, b"done");
//!
//! // Prefill frees the pool: decode is told, and its descriptors of it are refused.
//! kv.free(secs(5))?;
//! # let due = std::time::Instant::now() + secs(5);
//! # let mut events = Vec::new();
//! # while events.is_empty() && std::time::Instant::now() < due { events = decode.events(); std::thread::sleep(Duration::from_millis(1)); }
//! assert!(matches!(&events[0], Event::PeerRegionGone { peer, .. } if peer == "prefill"));
//! assert!(decode.read_blocks(&peer, &local, &[0], &remote, &[17], None).is_err());
//! # Ok(()) }
//! ```
//!
//! The layers: [`Agent`] (devices, queue pairs, progress) → [`Memory`] and [`Region`]
//! (registrations, cached) → [`Peer`] (handshake over TCP, leases, the peer's regions) →
//! [`Desc`] / [`RemoteDesc`] and [`LocalBlocks`] / [`RemoteBlocks`] (what to move, on which
//! side) → [`Transfer`] and [`Prepared`] (chunks, striping, status) → [`Notification`] and
//! [`Event`]. Files are registered like memory ([`FileRegion`]) and moved to and from it by the
//! agent's drive ([`Agent::read_file`], [`FileTransfer`]). To test revoke handling,
//! [`Agent::hold_transfers`] holds transfers half done so a free always meets one.

#![warn(missing_docs)]
pub mod agent;
mod alloc;
pub mod auth;
pub mod blocks;
mod builder;
pub mod cache;
pub mod config;
pub mod desc;
pub mod drive;
pub mod error;
pub mod event;
pub mod file;
mod files;
pub mod flow;
pub mod handle;
mod handshake;
mod inner;
mod known;
pub mod limits;
pub mod load;
pub mod memory;
pub mod metadata;
mod nics;
pub mod notify;
pub mod peer;
mod peers;
mod platform;
mod progress;
pub mod publish;
pub mod raw;
pub mod region;
mod register;
mod registry;
mod stage;
pub mod stats;
pub mod stress;
use dmaplane_core::sync;
pub mod testbed;
pub mod transfer;
mod wire;

pub use agent::Agent;
pub use blocks::{LocalBlocks, RemoteBlocks};
pub use builder::AgentBuilder;
pub use cache::CacheStats;
pub use config::Config;
pub use desc::{Desc, RemoteDesc};
pub use dmaplane_core::Invalid;
/// What a revoke or a free reports ([`Memory::free`], [`Memory::free_quarantined`]).
pub use dmaplane_core::RevokeReport;
/// Memory another owner lends ([`Agent::lend`]): the promise its implementor makes.
pub use dmaplane_core::fabric::Lent;
/// Faults [`AgentBuilder::inject`] can break the protocol with, on purpose (stress runs).
pub use dmaplane_rdma::Fault;
/// What a TCP NIC counted ([`Agent::tcp_stats`]): connections, refusals, and the
/// shared-memory path's lanes, views and messages.
pub use dmaplane_rdma::TcpStats;
pub use drive::FileTransfer;
pub use error::{Error, Result, Side};
pub use event::{Event, GoneWhy};
pub use file::{FileEntry, FileRegion, FileSpec, StoragePath};
pub use handle::{Handle, Registration};
pub use limits::{Limits, Refusals};
pub use memory::{Location, Memory, Quarantine};
pub use metadata::{Metadata, RegionInfo, RegionKey};
pub use notify::{NextNotification, Notification, Notify, NotifyFilter};
pub use peer::Peer;
pub use publish::Publish;
pub use raw::{RawHost, RawPair};
pub use region::{MemoryEntry, NicPath, Region};
pub use stats::AgentStats;
pub use testbed::Testbed;
pub use transfer::{Prepared, Status, Transfer, TransferHold};
