//! # dmaplane — the application library
//!
//! Register memory, connect to a peer, move data, get told when it landed — with revoke
//! honoured: memory freed or moved under a transfer ends it with a typed error, nothing lost,
//! nothing written after the exporter's ack.
//!
//! ```
//! use std::time::Duration;
//! use dmaplane::{Agent, Testbed};
//! # fn main() -> dmaplane::Result<()> {
//! let testbed = Testbed::builtin()?;
//! let a = Agent::builder("a").testbed(testbed.clone()).nics(["nic0"]).build()?;
//! let b = Agent::builder("b").testbed(testbed).nics(["nic1"]).build()?;
//! let src = a.alloc_host("src", 1 << 20)?;
//! let dst = b.alloc_host("dst", 1 << 20)?;
//! src.write(0, &[7u8; 4096])?;
//! let (ra, rb) = (a.register(&src)?, b.register(&dst)?);
//! let peer = a.connect(&b.metadata_blob()?)?;
//! let t = a.write(&peer, &[ra.all()], &[peer.desc(rb.id(), 0, 1 << 20)?], Some(b"done"))?;
//! t.wait(Duration::from_secs(10))?;
//! let note = b.next_notification(Duration::from_secs(5)).expect("notified");
//! assert_eq!(note.bytes, b"done");
//! let mut got = [0u8; 4096];
//! dst.read(0, &mut got)?;
//! assert_eq!(got, [7u8; 4096]);
//! # Ok(()) }
//! ```
//!
//! The layers: [`Agent`] (devices, queue pairs, progress) → [`Memory`] and [`Region`]
//! (registrations, cached) → [`Peer`] (handshake over TCP, leases) → [`Transfer`]
//! (descriptors, chunks, striping, status) → [`Notification`] and [`Event`]. Files are
//! registered like memory ([`FileRegion`]) and moved to and from it by the agent's drive
//! ([`Agent::read_file`], [`FileTransfer`]).

#![warn(missing_docs)]
pub mod agent;
mod alloc;
pub mod auth;
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
pub use builder::AgentBuilder;
pub use cache::CacheStats;
pub use config::Config;
pub use desc::Desc;
pub use dmaplane_core::Invalid;
/// What a revoke or a free reports ([`Memory::free`], [`Memory::free_quarantined`]).
pub use dmaplane_core::RevokeReport;
/// Faults [`AgentBuilder::inject`] can break the protocol with, on purpose (stress runs).
pub use dmaplane_rdma::Fault;
/// What a TCP NIC counted ([`Agent::tcp_stats`]): connections, refusals, and the
/// shared-memory path's lanes, views and messages.
pub use dmaplane_rdma::TcpStats;
pub use drive::FileTransfer;
pub use error::{Error, Result, Side};
pub use event::Event;
pub use file::{FileEntry, FileRegion, FileSpec, StoragePath};
pub use handle::{Handle, Registration};
pub use limits::{Limits, Refusals};
pub use memory::{Location, Memory, Quarantine};
pub use metadata::{Metadata, RegionInfo, RegionKey};
pub use notify::Notification;
pub use peer::Peer;
pub use publish::Publish;
pub use raw::{RawHost, RawPair};
pub use region::{MemoryEntry, NicPath, Region};
pub use stats::AgentStats;
pub use testbed::Testbed;
pub use transfer::{Status, Transfer};
