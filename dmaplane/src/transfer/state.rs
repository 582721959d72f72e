//! What a transfer is while it runs: its requests, the lanes and leases they use, the
//! registrations it holds, and how it ended. The engine ([`crate::progress`]) works on it; the
//! [`super::Transfer`] handle reads it.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex};
use std::task::Waker;

use dmaplane_rdma::{RemoteAddr, RemoteMr, Sge};

use crate::error::{Error, Side};
use crate::peer::{Lane, PeerShared};
use crate::region::MemoryEntry;
use crate::stage::StageRange;
use crate::sync::lock;

/// Request ids carry their transfer and chunk: `transfer << CHUNK_BITS | chunk`.
pub(crate) const CHUNK_BITS: u32 = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Write,
    Read,
}

/// Where a transfer stands.
#[derive(Debug, Clone)]
pub enum Status {
    /// `done` of `total` requests completed.
    InProgress {
        /// Requests completed successfully so far.
        done: u64,
        /// Requests the transfer was split into.
        total: u64,
    },
    /// Every request completed and the notification, if any, was sent.
    Done,
    /// The transfer ended with this error.
    Failed(Error),
}

/// One request: `len` bytes between a local SGE and a remote address, on one lane.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Chunk {
    /// Index into the transfer's `lanes`.
    pub(crate) lane: u16,
    /// Index into the transfer's `leases`.
    pub(crate) lease: u16,
    /// Index into the transfer's `entries`.
    pub(crate) local_entry: u16,
    pub(crate) remote_region: u32,
    pub(crate) sge: Sge,
    pub(crate) remote: RemoteAddr,
}

/// How a transfer ended (or that it has not), and who waits for it.
pub(crate) struct TransferEnd {
    pub(crate) status: Status,
    pub(crate) waker: Option<Waker>,
    /// Threads asleep on the condvar: the end notifies only when there are any (a notify is
    /// a system call whether anyone waits or not).
    pub(crate) sleepers: u32,
}

/// What the engine and the handles share.
pub(crate) struct TransferState {
    pub(crate) id: u64,
    /// The agent it belongs to, for messages.
    pub(crate) agent: String,
    /// Requests completed successfully (the engine counts, `status` reads).
    pub(crate) done: AtomicU64,
    pub(crate) op: Op,
    pub(crate) peer: Arc<PeerShared>,
    pub(crate) chunks: Vec<Chunk>,
    /// The queue pairs its chunks use, and the leases they write under.
    pub(crate) lanes: Vec<Arc<Lane>>,
    pub(crate) leases: Vec<Arc<RemoteMr>>,
    /// Local registrations it uses: held until every request has completed, so nothing is
    /// unregistered under the NIC.
    pub(crate) entries: Vec<Arc<MemoryEntry>>,
    /// The notification's tag and bytes, sent once it is done.
    pub(crate) notify: Option<(String, Vec<u8>)>,
    /// Local staged ranges a READ copies into device memory once its requests completed:
    /// `(entry index, offset, bytes)`.
    pub(crate) stage_in: Vec<(u16, u64, u64)>,
    /// The peer's staged ranges: landed by the peer after a WRITE, staged before a READ.
    pub(crate) remote_stage: Vec<StageRange>,
    pub(crate) bytes: u64,
    pub(crate) outcome: Mutex<TransferEnd>,
    pub(crate) cv: Condvar,
}

impl TransferState {
    /// Copy what a READ landed in local staging buffers into device memory.
    pub(crate) fn copy_staged_in(&self) -> crate::error::Result<()> {
        for &(ei, off, len) in &self.stage_in {
            self.entries[usize::from(ei)].stage_copy(off, len, false)?;
        }
        Ok(())
    }

    /// The typed error for a staging request the peer could not serve.
    pub(crate) fn stage_error(&self, f: crate::stage::StageFailure, land: bool) -> Error {
        let what = if land { "land" } else { "stage" };
        match f.epoch {
            Some(epoch) => Error::Revoked {
                side: Side::Remote,
                region: f.region,
                name: f.name,
                epoch,
                why: format!("the peer could not {what} it: {}", f.why),
            },
            None => Error::Failed {
                transfer: self.id,
                peer: self.peer.name.clone(),
                chunk: 0,
                status: format!(
                    "the peer could not {what} region {} ({}): {}",
                    f.region, f.name, f.why
                ),
            },
        }
    }

    pub(crate) fn finish(&self, status: Status) {
        let mut o = lock(&self.outcome);
        if !matches!(o.status, Status::InProgress { .. }) {
            return;
        }
        o.status = status;
        let waker = o.waker.take();
        if o.sleepers > 0 {
            self.cv.notify_all();
        }
        drop(o);
        // Outside the outcome's lock: a waker may poll the future at once.
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The typed error for a request that failed: a revoke of either side when one happened.
    pub(crate) fn classify(&self, chunk: &Chunk, status: &str) -> Error {
        self.revoked_or_lost(chunk, status)
            .unwrap_or_else(|| Error::Failed {
                transfer: self.id,
                peer: self.peer.name.clone(),
                chunk: 0,
                status: status.to_string(),
            })
    }

    /// The error for a request that met a broken queue pair.
    pub(crate) fn broken_lane(&self, lane: &Lane) -> Error {
        Error::Failed {
            transfer: self.id,
            peer: self.peer.name.clone(),
            chunk: 0,
            status: format!(
                "queue pair {:#x} to {} is broken ({}): an RC queue pair leaves the error state \
                 only by being connected anew, which the agent does not do yet, so this path \
                 is dead",
                lane.qp.qpn(),
                self.peer.name,
                lane.broken().unwrap_or_default()
            ),
        }
    }

    /// A revoke of either side's memory, or the peer's loss, met by a transfer held with
    /// requests still to post ([`crate::Agent::hold_transfers`]).
    pub(crate) fn revoked_while_held(
        &self,
        pending: &std::collections::VecDeque<u32>,
    ) -> Option<Error> {
        pending.iter().find_map(|&ci| {
            let c = &self.chunks[ci as usize];
            let gone = self.entries[usize::from(c.local_entry)]
                .revoked_at()
                .is_some()
                || self.leases[usize::from(c.lease)].revoked_at().is_some();
            if gone {
                self.revoked_or_lost(c, "held")
            } else {
                None
            }
        })
    }

    /// A revoke of either side's memory, or the peer's loss, if that is why a request failed.
    pub(crate) fn revoked_or_lost(&self, chunk: &Chunk, status: &str) -> Option<Error> {
        let e = &self.entries[usize::from(chunk.local_entry)];
        if let Some(epoch) = e.revoked_at() {
            return Some(Error::Revoked {
                side: Side::Local,
                region: e.id,
                name: e.memory.name().to_string(),
                epoch,
                why: format!(
                    "{} under transfer {} to {}, and {}",
                    e.gone_why(),
                    self.id,
                    self.peer.name,
                    in_words(status)
                ),
            });
        }
        if let Some(epoch) = self.leases[usize::from(chunk.lease)].revoked_at() {
            let gone = self.peer.gone(chunk.remote_region);
            let name = match (&gone, self.peer.region(chunk.remote_region)) {
                (Some(g), _) => g.name.clone(),
                (None, Some(r)) => r.name,
                (None, None) => String::new(),
            };
            let did = gone.map_or_else(|| "revoked it".to_string(), |g| g.why.to_string());
            return Some(Error::Revoked {
                side: Side::Remote,
                region: chunk.remote_region,
                name,
                epoch,
                why: format!(
                    "peer {} {did} while transfer {} of agent {} was using it: {}'s lease on \
                     it was withdrawn, and {}",
                    self.peer.name,
                    self.id,
                    self.agent,
                    self.agent,
                    in_words(status)
                ),
            });
        }
        self.peer.lost().map(|why| Error::PeerLost {
            peer: self.peer.name.clone(),
            why,
        })
    }
}

/// What happened to a request, in words (the completion status as a detail).
pub(crate) fn in_words(status: &str) -> String {
    match status {
        "WrFlushErr" => "a request under way was stopped (flushed, WrFlushErr)".into(),
        "RemAccessErr" => "the peer's NIC refused a request (RemAccessErr)".into(),
        "a refused post" => "a request could not be posted any more".into(),
        "held" => "the requests it had not posted yet never were (it was held: \
                   Agent::hold_transfers)"
            .into(),
        other => format!("a request ended with {other}"),
    }
}
