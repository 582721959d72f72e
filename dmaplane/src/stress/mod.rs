//! The revoke stress (`dmaplane stress revoke`): RDMA WRITE traffic on many queue pairs while
//! the memory it lands in — and the memory it comes from — is revoked and exported again, over
//! and over. Every request must complete exactly once, every successful WRITE must be
//! byte-exact, and nothing may touch memory after a revoke's ack.
//!
//! One harness, whatever the backend: the exporter's loop ([`exporter`]) revokes, checks and
//! exports again; the data path ([`DataPath`]) keeps WRITEs in flight and verifies each one;
//! both share a [`RunState`] and end in one [`StressReport`]. A backend supplies the memory
//! ([`Bytes`]) and the exports ([`Revocable`]): [`run_sim`] is the simulated testbed's,
//! `run_verbs` (feature `verbs`) a real RDMA device's.
//!
//! How "after the ack" is checked: the moment the exporter's revoke report returns, the old
//! memory is filled with a poison pattern, by the exporter. From then on:
//! - a successful WRITE to that epoch that the data path reaps afterwards must read as all
//!   poison — it landed before the ack and the poison covered it; its own bytes mean it landed
//!   after the ack — and its bytes are verified in the copy the exporter took at the ack, just
//!   before poisoning (the newest [`SNAPSHOTS`] epochs keep one). The data path verifies under
//!   the lock the exporter holds while it copies and poisons, so the two never interleave;
//! - at the next revoke (and at the end) the memory must still be all poison: a DMA that landed
//!   after the ack, completed or not, would have overwritten it.
//!
//! The agent-level stress drives the same revoke through the application library instead: an
//! owner [`Agent`](crate::Agent) frees memory under a holder Agent's WRITE transfers
//! ([`own`], [`hold`]), its blocks self-describing ([`block`]) and checked at each free
//! ([`check_block`]), with the same report and verdict. [`run_agents`] runs it on the simulated
//! testbed; the `dmaplane` tool runs it with CUDA memory and the holder in a second process.
//!
//! On the simulated testbed, every DMA the fabric refused because a grant was gone is counted
//! too (an honest importer never even tries), and so is every access to the source while it
//! moves.

mod agents;
mod blocks;
mod bytes;
mod config;
mod data_path;
mod exporter;
mod fits;
mod holder;
mod owner;
mod report;
mod run_state;
mod sim;
#[cfg(feature = "verbs")]
mod verbs;

pub use agents::{HOLDER_STALL, agent_faults, run_agents};
pub use blocks::{HEADER, block, check_block, note, parse_note};
pub use bytes::{Bytes, POISON, next, pattern, poison, poison_damage};
pub use config::{ExporterKind, Inject, StressConfig};
pub use data_path::{Counts, DataPath};
pub use exporter::{Revocable, exporter};
pub use fits::{check_fits, mem_available, sim_memory_needed};
pub use holder::{HolderReport, hold};
pub use owner::{Holder, own};
pub use report::{Latency, StressReport};
pub use run_state::{EpochTarget, RunState, SNAPSHOTS, STUCK_FOR};
pub use sim::run_sim;
#[cfg(feature = "verbs")]
pub use verbs::run_verbs;
