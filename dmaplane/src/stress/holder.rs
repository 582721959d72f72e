//! The holder's side of the agent-level stress: `slots` WRITE transfers kept in flight into the
//! owner's newest allocation, each a [`block`] with a [`note`] naming it, until the owner goes.
//! Every transfer must end exactly once — done, or with the typed remote revoke — and a request
//! the owner's NIC refused at a zapped region (a remote access error) is an access after the ack.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::blocks::{block, note};
use crate::error::{Error, Side};
use crate::{Agent, Peer, Result, Status, Transfer};

/// How long the holder waits for the owner's next allocation after a revoke.
const NEXT_WAIT: Duration = Duration::from_secs(60);

/// What the holder counted, once the owner went away (a holder process prints it as JSON).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct HolderReport {
    /// WRITEs started.
    pub started: u64,
    /// WRITEs that ended done.
    pub done: u64,
    /// Ended with the typed remote revoke.
    pub revoked: u64,
    /// Refused at the start: the region was revoked already.
    pub refused: u64,
    /// Ended because the owner went away at the end of the run.
    pub ended_at_exit: u64,
    /// Ended stalled: requests the NIC never completed.
    pub stalled: u64,
    /// WRITEs that ended with any other error.
    pub failed: u64,
    /// Requests the owner's NIC refused at a zapped region.
    pub remote_access_errors: u64,
    /// What went wrong, in words (the first 20).
    pub failures: Vec<String>,
    /// What the holder found out on the way.
    pub notes: Vec<String>,
    /// WRITEs that never ended within the wait after the owner left, not even as stalled: the
    /// holder's engine is stuck.
    #[serde(default)]
    pub never_ended: u64,
    /// Why the holder stopped before the owner went, when nothing it sends can move any more
    /// (every queue pair broken).
    #[serde(default)]
    pub stopped: Option<String>,
}

/// Hold `peer` (the owner) under WRITE load from `agent` until it goes: `slots` transfers of
/// `size` bytes in flight. `stall` is the agent's stall timeout: what is under way when the
/// owner goes must end within twice that.
pub fn hold(
    agent: &Agent,
    peer: &Peer,
    slots: usize,
    size: u32,
    stall: Duration,
) -> Result<HolderReport> {
    let size = size as usize;
    let src = agent.alloc_host("stress-src", (slots * size) as u64)?;
    let rs = agent.register(&src)?;
    let mut r = HolderReport::default();
    r.notes.push(format!(
        "holder source registration: {:?}",
        rs.paths().first()
    ));
    // Each slot's WRITE in flight, with the owner's allocation it targets (region id, epoch).
    let mut inflight: Vec<Option<(Transfer, (u32, u64))>> = (0..slots).map(|_| None).collect();
    let mut seq = 0u64;
    // The owner's allocation in use: (region id, epoch), and the newest epoch known revoked.
    let mut current: Option<(u32, u64)> = None;
    let mut dead: Option<u64> = None;
    let mut waiting_since = Instant::now();
    'run: loop {
        if peer.lost().is_some() {
            break;
        }
        if current.is_none() {
            current = peer
                .regions()
                .into_iter()
                .filter_map(|g| {
                    let e = g.name.strip_prefix("stress-dst-")?.parse::<u64>().ok()?;
                    (dead.is_none_or(|d| e > d)).then_some((g.id, e))
                })
                .max_by_key(|x| x.1);
            if current.is_none() {
                if waiting_since.elapsed() > NEXT_WAIT {
                    r.failed += 1;
                    r.failures
                        .push(format!("no new allocation from the owner in {NEXT_WAIT:?}"));
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for (slot, t) in inflight.iter_mut().enumerate() {
            if let Some((x, target)) = t {
                match x.status() {
                    Status::InProgress { .. } => continue,
                    Status::Done => r.done += 1,
                    Status::Failed(e) => match classify(&e) {
                        End::Revoked { region, access } => {
                            r.revoked += 1;
                            r.remote_access_errors += u64::from(access);
                            if access {
                                r.failures.push(format!("slot {slot}: {e}"));
                            }
                            // The allocation this WRITE targeted is gone (a remote access
                            // error names no region: it is the target's) — not a newer one
                            // the holder moved to while this one was still in flight.
                            let (tid, tep) = *target;
                            if region == Some(tid) || access {
                                dead = dead.max(Some(tep));
                                if current.is_some_and(|(_, ep)| ep <= tep) {
                                    current = None;
                                    waiting_since = Instant::now();
                                }
                            }
                        }
                        End::Lost => {
                            r.ended_at_exit += 1;
                            *t = None;
                            break 'run;
                        }
                        End::Stalled => {
                            r.stalled += 1;
                            r.failures.push(format!("slot {slot}: {e}"));
                        }
                        End::Other => {
                            r.failed += 1;
                            r.failures.push(format!("slot {slot}: {e}"));
                        }
                    },
                }
                *t = None;
            }
            let Some((id, epoch)) = current else { continue };
            // Starting a WRITE can wait for the owner's lease grant: look for the owner's
            // departure before each one, not once a round.
            if peer.lost().is_some() {
                break 'run;
            }
            seq += 1;
            let off = (slot * size) as u64;
            src.write(off, &block(epoch, slot as u32, seq, size))?;
            // A registration the owner said is gone is refused here already, typed.
            let started = peer.desc(id, off, size as u64).and_then(|remote| {
                agent.write(
                    peer,
                    &[rs.desc(off, size as u64)?],
                    &[remote],
                    Some(crate::Notify::new("stress", note(epoch, slot as u32, seq))),
                )
            });
            match started {
                Ok(x) => {
                    r.started += 1;
                    *t = Some((x, (id, epoch)));
                }
                Err(Error::Revoked { .. }) => {
                    r.refused += 1;
                    dead = Some(epoch);
                    current = None;
                    waiting_since = Instant::now();
                }
                Err(Error::PeerLost { .. }) => break 'run,
                Err(e) => {
                    r.failed += 1;
                    r.failures
                        .push(format!("slot {slot}: starting a WRITE: {e}"));
                    // Every queue pair broken (a protocol violation was refused): nothing
                    // more can be sent. The holder ends with its report now; the owner sees
                    // it go and stops at once instead of waiting for traffic.
                    if matches!(&e, Error::Invalid(i) if i.why.contains("broken")) {
                        r.stopped = Some(format!("every queue pair to the owner is broken: {e}"));
                        break 'run;
                    }
                }
            }
        }
        std::thread::yield_now();
    }
    // Whatever is still under way ends now (the owner is gone): each exactly once, all within
    // one deadline (the stall timeout bounds each; they run at once).
    let due = Instant::now() + stall * 2;
    let mut left: Vec<Transfer> = inflight.into_iter().flatten().map(|(t, _)| t).collect();
    while !left.is_empty() && Instant::now() < due {
        left.retain(|t| {
            let e = match t.status() {
                Status::InProgress { .. } => return true,
                Status::Done => {
                    r.done += 1;
                    return false;
                }
                Status::Failed(e) => e,
            };
            match classify(&e) {
                End::Revoked { access, .. } => {
                    r.revoked += 1;
                    r.remote_access_errors += u64::from(access);
                }
                End::Lost => r.ended_at_exit += 1,
                End::Stalled => {
                    r.stalled += 1;
                    r.failures.push(format!("at exit: {e}"));
                }
                End::Other => {
                    r.failed += 1;
                    r.failures.push(format!("at exit: {e}"));
                }
            }
            false
        });
        std::thread::sleep(Duration::from_millis(10));
    }
    if !left.is_empty() {
        // Never ended, not even stalled: the agent's engine is stuck (seen only with an
        // injected fault). Counted lost, and reported.
        r.never_ended = left.len() as u64;
        r.failures.push(format!(
            "{} transfer(s) never ended within {:?} of the owner's exit, not even as stalled",
            left.len(),
            stall * 2
        ));
    }
    r.failures.truncate(20);
    // Which path its bytes took, on TCP NICs (the NIC's own count: a note, not a check).
    for (nic, st) in agent.tcp_stats() {
        r.notes.push(format!(
            "holder NIC {nic}: {} requests through views of the owner's memory ({} B), the \
             rest on the socket",
            st.shm_messages, st.shm_bytes
        ));
    }
    Ok(r)
}

enum End {
    /// The typed remote revoke; `access` when a request met the zapped region (a remote access
    /// error: an access after the ack).
    Revoked {
        region: Option<u32>,
        access: bool,
    },
    Lost,
    Stalled,
    Other,
}

fn classify(e: &Error) -> End {
    match e {
        Error::Revoked {
            side: Side::Remote,
            region,
            why,
            ..
        } => End::Revoked {
            region: Some(*region),
            access: why.contains("RemAccessErr"),
        },
        // A request the NIC refused at a zapped region, under a lease the holder never saw
        // revoked: it acknowledged and kept writing.
        Error::Failed { status, .. } if status.contains("RemAccessErr") => End::Revoked {
            region: None,
            access: true,
        },
        Error::PeerLost { .. } => End::Lost,
        Error::Stalled { .. } => End::Stalled,
        _ => End::Other,
    }
}
