//! The progress engine and its thread: posts requests as queue pairs have room, reaps every
//! NIC's completions, ends transfers (done, failed, stalled, peer lost) and sends their
//! notifications. The application never polls: a revoke's flush is reaped here, so quiesce and
//! leases complete on their own.
//!
//! Every posted request gets exactly one completion before its transfer lets go of the
//! registrations it uses; a transfer reported stalled or lost keeps them until then.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dmaplane_rdma::{Completion, QpState, RdmaError, SendWr, WcStatus};

use crate::error::{Error, Result, Side};
use crate::nics::Nics;
use crate::peer::PeerShared;
use crate::stage::StageFailure;
use crate::stats::AgentStats;
use crate::sync::{lock, try_lock, wait_timeout};
use crate::transfer::state::{CHUNK_BITS, Op, Status, TransferState};
use dmaplane_core::counter::Counter;

/// How many flushed requests a transfer may send again: as many as it has, plus some.
fn retry_limit(t: &TransferState) -> u64 {
    2 * t.chunks.len() as u64 + 16
}

/// How long a transfer whose request went unanswered (retries exceeded) waits for its peer's
/// control connection to say whether the peer is gone, before it fails with the completion's
/// status.
const LOSS_GRACE: Duration = Duration::from_millis(500);

/// Whether `e` is a request the peer never answered: a transport failure, not a refusal.
fn unanswered(e: &Error) -> bool {
    matches!(e, Error::Failed { status, .. } if status.contains("RetryExcErr"))
}

/// Polls of an idle engine before the thread sleeps.
const SPIN: u32 = 200;
/// Sleep of an idle engine with transfers under way, and with none.
const NAP_BUSY: Duration = Duration::from_micros(100);
const NAP_IDLE: Duration = Duration::from_millis(20);
/// The longest sleep while a waiter drives the engine. A waiter that stops driving with its
/// transfer under way wakes the thread at once ([`ProgressEngine::hand_off`]); this bounds only how
/// late the thread takes over from one that stopped without saying so (a caller that posts,
/// waits once and then only polls `status`). Short sleeps cost the NICs their cores: on two
/// cores a 50 µs sleep, woken 20 000 times a second, kept small batches at 13–70 % of the raw
/// layer's rate.
const NAP_DRIVEN: Duration = Duration::from_millis(1);

struct Active {
    t: Arc<TransferState>,
    /// Requests sent again after a flush that was not about this transfer.
    retries: u64,
    /// Chunk indices not posted yet, in order.
    pending: VecDeque<u32>,
    outstanding: u64,
    done: u64,
    error: Option<Error>,
    last: Instant,
    reported: bool,
    /// Where it stands with the peer's staging (see [`crate::stage`]).
    remote: Remote,
}

/// A transfer's exchange with the peer about the peer's staged registrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Remote {
    /// Nothing to ask (any longer).
    Ready,
    /// A READ waits for the peer to stage what it will fetch; nothing is posted until then.
    Fetching,
    /// A WRITE asks the peer to land its bytes once every request completed ...
    ToLand,
    /// ... and is done when the peer answers.
    Landing,
}

/// Transfer ids are small sequential integers: hash them by a multiply, not SipHash.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type Ids = std::hash::BuildHasherDefault<IdHasher>;

#[derive(Default)]
struct Inner {
    active: HashMap<u64, Active, Ids>,
    /// Transfers with chunks to post.
    queue: VecDeque<u64>,
    wake: bool,
    /// The progress thread is asleep on `cv` ([`ProgressEngine::nap`]): only then is it notified (a
    /// notify is a system call whether anyone waits or not).
    napping: bool,
    /// Completions of one round, kept between rounds (a poller's look allocates nothing).
    scratch: Vec<Completion>,
}

pub(crate) struct ProgressEngine {
    /// The agent's name, for logs.
    name: String,
    /// The NICs whose completion queues it reaps.
    nics: Arc<Nics>,
    /// Requests a queue pair keeps outstanding ([`crate::Config::depth`]).
    depth: u32,
    /// A transfer with no completion for this long ends as stalled.
    stall: Duration,
    /// Set when the agent stops: the thread fails what is left and ends.
    stop: AtomicBool,
    inner: Mutex<Inner>,
    cv: Condvar,
    next_id: AtomicU64,
    started: Counter,
    done: Counter,
    failed: Counter,
    posted: Counter,
    completed: Counter,
    completed_bad: Counter,
    bytes: Counter,
    notes_sent: Counter,
    notes_received: Counter,
    /// Waiters driving the engine from their own thread right now ([`ProgressEngine::driving`]):
    /// while there are any, the progress thread naps instead of spinning, so the two do not
    /// fight over the cores the NICs need.
    drivers: AtomicU32,
    /// When the last waiter stopped driving ([`since_start`] nanoseconds).
    last_drive: AtomicU64,
    /// The progress thread sleeps here while waiters drive; [`ProgressEngine::hand_off`] and
    /// [`ProgressEngine::wake`] end the sleep (the flag says one did).
    handed: Mutex<bool>,
    drive_cv: Condvar,
    /// Requests each transfer may post before it waits ([`crate::Agent::hold_transfers`]);
    /// `u64::MAX` when nothing is held.
    hold: AtomicU64,
}

/// Nanoseconds since the first call in this process: a clock atomics can hold.
fn since_start() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// After a waiter stops driving, the progress thread stays asleep this long: an application
/// that posts and waits in a loop drives every transfer itself, and a progress thread that
/// woke between two of them would only take the cores its NICs need.
const DRIVEN_GRACE_NS: u64 = 200_000;

/// A waiter drives the engine while this lives.
pub(crate) struct Driving<'a>(&'a ProgressEngine);

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        self.0.last_drive.store(since_start(), Ordering::Relaxed);
        self.0.drivers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for ProgressEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressEngine").finish_non_exhaustive()
    }
}

impl ProgressEngine {
    /// An engine over `nics`, keeping `depth` requests outstanding per queue pair and ending a
    /// transfer as stalled after `stall` without a completion. Its thread is [`spawn`]ed apart.
    pub(crate) fn new(name: &str, nics: Arc<Nics>, depth: u32, stall: Duration) -> ProgressEngine {
        ProgressEngine {
            name: name.to_string(),
            nics,
            depth,
            stall,
            stop: AtomicBool::new(false),
            inner: Mutex::default(),
            cv: Condvar::new(),
            next_id: AtomicU64::new(0),
            started: Counter::default(),
            done: Counter::default(),
            failed: Counter::default(),
            posted: Counter::default(),
            completed: Counter::default(),
            completed_bad: Counter::default(),
            bytes: Counter::default(),
            notes_sent: Counter::default(),
            notes_received: Counter::default(),
            drivers: AtomicU32::new(0),
            last_drive: AtomicU64::new(0),
            handed: Mutex::new(false),
            drive_cv: Condvar::new(),
            hold: AtomicU64::new(u64::MAX),
        }
    }

    /// The agent stops: the thread fails every transfer left and ends.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake();
    }

    /// Mark the calling thread as driving the engine until the guard goes.
    pub(crate) fn driving(&self) -> Driving<'_> {
        self.drivers.fetch_add(1, Ordering::Relaxed);
        Driving(self)
    }

    /// A waiter stops driving with its transfer under way (it will sleep until the transfer
    /// ends): the progress thread takes over now, with no grace period.
    pub(crate) fn hand_off(&self) {
        self.last_drive.store(0, Ordering::Relaxed);
        *lock(&self.handed) = true;
        self.drive_cv.notify_all();
    }

    /// The progress thread's sleep while waiters drive: until a hand-off, a wake, or
    /// [`NAP_DRIVEN`].
    fn nap_driven(&self) {
        let mut h = lock(&self.handed);
        if !*h {
            h = wait_timeout(&self.drive_cv, h, NAP_DRIVEN).0;
        }
        *h = false;
    }

    /// A waiter drives the engine now, or did a moment ago.
    fn driven(&self) -> bool {
        self.drivers.load(Ordering::Relaxed) > 0
            || since_start().saturating_sub(self.last_drive.load(Ordering::Relaxed))
                < DRIVEN_GRACE_NS
    }

    /// Let each transfer post at most `requests` requests, then wait (`u64::MAX`: no hold).
    pub(crate) fn set_hold(&self, requests: u64) {
        self.hold.store(requests, Ordering::Release);
        self.wake();
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn stats(&self) -> AgentStats {
        AgentStats {
            transfers_started: self.started.get(),
            transfers_done: self.done.get(),
            transfers_failed: self.failed.get(),
            requests_posted: self.posted.get(),
            requests_completed: self.completed.get(),
            requests_failed: self.completed_bad.get(),
            bytes_moved: self.bytes.get(),
            notifications_sent: self.notes_sent.get(),
            notifications_received: self.notes_received.get(),
            ..AgentStats::default()
        }
    }

    pub(crate) fn count_notification_sent(&self) {
        self.notes_sent.inc();
    }

    pub(crate) fn count_notification_received(&self) {
        self.notes_received.inc();
    }

    /// Wake the progress thread, whether it naps or sleeps while waiters drive (a peer lost,
    /// the agent stopping).
    pub(crate) fn wake(&self) {
        lock(&self.inner).wake = true;
        self.cv.notify_all();
        self.hand_off();
    }

    /// The peer answered a transfer's staging request (see [`crate::stage`]).
    pub(crate) fn staged(&self, tid: u64, failure: Option<StageFailure>, peer: &Arc<PeerShared>) {
        let mut g = lock(&self.inner);
        let Some(a) = g.active.get_mut(&tid) else {
            tracing::debug!(transfer = tid, "staging answer for a transfer that ended");
            return;
        };
        if !Arc::ptr_eq(&a.t.peer, peer) || !matches!(a.remote, Remote::Fetching | Remote::Landing)
        {
            tracing::warn!(peer = %peer.name, transfer = tid, "staging answer nobody asked for: ignored");
            return;
        }
        let fetched = a.remote == Remote::Fetching;
        a.remote = Remote::Ready;
        a.last = Instant::now();
        if let Some(f) = failure
            && a.error.is_none()
        {
            a.error = Some(a.t.stage_error(f, !fetched));
            a.pending.clear();
        }
        if fetched && a.error.is_none() {
            g.queue.push_back(tid);
        }
        self.nudge(g);
    }

    /// Tell the progress thread there is work, waking it if it naps.
    fn nudge(&self, mut g: std::sync::MutexGuard<'_, Inner>) {
        g.wake = true;
        let napping = g.napping;
        drop(g);
        if napping {
            self.cv.notify_all();
        }
    }

    /// Take a new transfer and post what fits at once, from the caller's thread.
    pub(crate) fn submit(&self, t: Arc<TransferState>) {
        self.started.inc();
        let mut g = lock(&self.inner);
        let id = t.id;
        let n = t.chunks.len() as u32;
        let (mut remote, mut error) = (Remote::Ready, None);
        if !t.remote_stage.is_empty() {
            remote = match t.op {
                Op::Write => Remote::ToLand,
                Op::Read => match t.peer.stage(id, false, t.remote_stage.clone()) {
                    Ok(()) => Remote::Fetching,
                    Err(e) => {
                        error = Some(e);
                        Remote::Ready
                    }
                },
            };
        }
        g.active.insert(
            id,
            Active {
                t,
                retries: 0,
                pending: (0..n).collect(),
                outstanding: 0,
                done: 0,
                error,
                last: Instant::now(),
                reported: false,
                remote,
            },
        );
        if remote != Remote::Fetching {
            g.queue.push_back(id);
        }
        self.post(&mut g);
        self.nudge(g);
    }

    /// One round: reap, post, end. Returns whether anything happened.
    pub(crate) fn step(&self) -> bool {
        let mut g = lock(&self.inner);
        self.round(&mut g)
    }

    /// [`ProgressEngine::step`] unless another thread is at it (a waiter driving its transfer).
    pub(crate) fn try_step(&self) -> bool {
        match try_lock(&self.inner) {
            Some(mut g) => self.round(&mut g),
            None => false,
        }
    }

    fn round(&self, g: &mut Inner) -> bool {
        let mut wcs = std::mem::take(&mut g.scratch);
        let did = self.reap_and_post(g, &mut wcs);
        g.scratch = wcs;
        did
    }

    fn reap_and_post(&self, g: &mut Inner, wcs: &mut Vec<Completion>) -> bool {
        let mut did = false;
        let now = Instant::now();
        for nic in self.nics.iter() {
            wcs.clear();
            match nic.poll(wcs, 256) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(agent = %self.name, nic = %nic.name(), error = %e, "polling the completion queue");
                    continue;
                }
            }
            did = true;
            for wc in wcs.iter() {
                self.complete(g, wc, now);
            }
        }
        did |= self.post(g);
        did |= self.settle(g);
        did
    }

    fn complete(&self, g: &mut Inner, wc: &Completion, now: Instant) {
        let mut requeue = false;
        let (tid, ci) = (
            wc.wr_id >> CHUNK_BITS,
            (wc.wr_id & ((1 << CHUNK_BITS) - 1)) as u32,
        );
        let Some(a) = g.active.get_mut(&tid) else {
            tracing::warn!(agent = %self.name, wr_id = wc.wr_id, "completion for no request of ours");
            return;
        };
        if ci as usize >= a.t.chunks.len() {
            tracing::warn!(agent = %self.name, wr_id = wc.wr_id, "completion for no request of ours");
            return;
        }
        self.completed.inc();
        if wc.status != WcStatus::Success {
            self.completed_bad.inc();
        }
        let chunk = &a.t.chunks[ci as usize];
        let lane = &a.t.lanes[usize::from(chunk.lane)];
        lane.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.nics[lane.nic].note_completed();
        a.outstanding -= 1;
        a.last = now;
        // Any error but a flush moves an RC queue pair to the error state for good (this
        // agent's own quiesce only ever flushes): the lane is broken.
        if !matches!(wc.status, WcStatus::Success | WcStatus::WrFlushErr) {
            lane.mark_broken(&format!("{:?}", wc.status));
        }
        if wc.status == WcStatus::Success {
            a.done += 1;
            a.t.done.store(a.done, Ordering::Relaxed);
        } else if a.error.is_none() {
            match a.t.revoked_or_lost(chunk, &format!("{:?}", wc.status)) {
                Some(e) => a.error = Some(e),
                None if wc.status == WcStatus::WrFlushErr && lane.broken().is_some() => {
                    a.error = Some(a.t.broken_lane(lane));
                }
                // Flushed because another transfer's memory was revoked on the same queue
                // pair: this one's memory is fine, so the request goes again once the queue
                // pair is back (a bounded number of times).
                None if wc.status == WcStatus::WrFlushErr && a.retries < retry_limit(&a.t) => {
                    a.retries += 1;
                    a.pending.push_back(ci);
                    requeue = true;
                }
                None => a.error = Some(a.t.classify(chunk, &format!("{:?}", wc.status))),
            }
        }
        let tid = wc.wr_id >> CHUNK_BITS;
        if requeue && !g.queue.contains(&tid) {
            g.queue.push_back(tid);
        }
    }

    /// Post what the queue pairs have room for. Returns whether anything was posted.
    fn post(&self, g: &mut Inner) -> bool {
        let mut posted_any = false;
        let mut requeue = VecDeque::new();
        while let Some(tid) = g.queue.pop_front() {
            let Some(a) = g.active.get_mut(&tid) else {
                continue;
            };
            if a.error.is_some() || a.t.peer.lost().is_some() {
                a.pending.clear();
                continue;
            }
            // Batches per lane, in chunk order.
            let mut batches: Vec<Vec<u32>> = vec![Vec::new(); a.t.lanes.len()];
            // Requests this round adds to each NIC's completion queue, over all its lanes.
            let mut nic_queued = vec![0u32; self.nics.len()];
            let mut blocked = VecDeque::new();
            // Held: it posts up to the hold's count and waits, ending only when memory it
            // uses is revoked (or the peer is lost) meanwhile.
            let hold = self.hold.load(Ordering::Acquire);
            let started = (a.t.chunks.len() - a.pending.len()) as u64;
            let mut room_held = hold.saturating_sub(started);
            if room_held == 0 && !a.pending.is_empty() {
                match a.t.revoked_while_held(&a.pending) {
                    Some(e) => {
                        a.error = Some(e);
                        a.pending.clear();
                        continue;
                    }
                    None => a.last = Instant::now(),
                }
            }
            while room_held > 0
                && let Some(ci) = a.pending.pop_front()
            {
                let c = &a.t.chunks[ci as usize];
                let li = usize::from(c.lane);
                let lane = &a.t.lanes[li];
                let queued = batches[li].len() as u32;
                let nic = &self.nics[lane.nic];
                let room = lane.outstanding.load(Ordering::Relaxed) + queued < self.depth
                    && nic.has_room(nic_queued[lane.nic]);
                if !room {
                    blocked.push_back(ci);
                    if blocked.len() > 64 {
                        break;
                    }
                    continue;
                }
                batches[li].push(ci);
                nic_queued[lane.nic] += 1;
                room_held -= 1;
            }
            // What could not go now goes first next time.
            while let Some(ci) = blocked.pop_back() {
                a.pending.push_front(ci);
            }
            for (li, idx) in batches.into_iter().enumerate() {
                if idx.is_empty() {
                    continue;
                }
                let lane = a.t.lanes[li].clone();
                if lane.broken().is_some() {
                    a.error = Some(a.t.broken_lane(&lane));
                    a.pending.clear();
                    break;
                }
                // After a flush not about it, post again only once the QP is back in RTS (a
                // request posted while it recovers is flushed at once, using up retries).
                if a.retries > 0 && lane.qp.state() != QpState::Rts {
                    for &ci in idx.iter().rev() {
                        a.pending.push_front(ci);
                    }
                    continue;
                }
                let wrs: Vec<SendWr> = idx
                    .iter()
                    .map(|&ci| {
                        let c = &a.t.chunks[ci as usize];
                        let wr_id = tid << CHUNK_BITS | u64::from(ci);
                        match a.t.op {
                            Op::Write => SendWr::write(wr_id, c.sge, c.remote),
                            Op::Read => SendWr::read(wr_id, c.sge, c.remote),
                        }
                    })
                    .collect();
                let r = lane.qp.post_send(&wrs);
                let taken = match &r {
                    Ok(()) => wrs.len(),
                    Err(e) => e.posted_prefix().min(wrs.len()),
                };
                lane.outstanding.fetch_add(taken as u32, Ordering::Relaxed);
                self.nics[lane.nic].note_posted(taken as u32);
                a.outstanding += taken as u64;
                if taken > 0 {
                    a.last = Instant::now();
                }
                self.posted.add(taken as u64);
                posted_any |= taken > 0;
                if let Err(e) = r {
                    let source = match &e {
                        RdmaError::PartlyPosted { source, .. } => (**source).clone(),
                        other => other.clone(),
                    };
                    match source {
                        // A QP on its way back to RTS after a flush, or full: try again.
                        RdmaError::WrongState { .. } | RdmaError::QueueFull { .. } => {
                            for &ci in idx[taken..].iter().rev() {
                                a.pending.push_front(ci);
                            }
                        }
                        RdmaError::Revoked { epoch, what, .. } => {
                            let c = &a.t.chunks[idx[taken] as usize];
                            let local = &a.t.entries[usize::from(c.local_entry)];
                            a.error = Some(if local.revoked_at().is_some() {
                                Error::Revoked {
                                    side: Side::Local,
                                    region: local.id,
                                    name: local.memory.name().to_string(),
                                    epoch,
                                    why: format!(
                                        "{} under transfer {tid} to {}: a request could not be \
                                         posted any more ({what})",
                                        local.gone_why(),
                                        a.t.peer.name
                                    ),
                                }
                            } else {
                                a.t.classify(c, "a refused post")
                            });
                            a.pending.clear();
                        }
                        other => {
                            a.error = Some(Error::Failed {
                                transfer: tid,
                                peer: a.t.peer.name.clone(),
                                chunk: u64::from(idx[taken]),
                                status: other.to_string(),
                            });
                            a.pending.clear();
                        }
                    }
                }
            }
            if !a.pending.is_empty() {
                requeue.push_back(tid);
            }
        }
        g.queue = requeue;
        posted_any
    }

    /// End what is over: done, failed once every request completed, stalled, peer lost.
    fn settle(&self, g: &mut Inner) -> bool {
        let now = Instant::now();
        let stall = self.stall;
        let mut over = Vec::new();
        for (&tid, a) in g.active.iter_mut() {
            // A request the peer never answered (its NIC's retries ran out) is the peer gone
            // more often than not: once its control connection says so, that is the error.
            if (a.error.is_none() || a.error.as_ref().is_some_and(unanswered))
                && let Some(why) = a.t.peer.lost()
            {
                a.error = Some(Error::PeerLost {
                    peer: a.t.peer.name.clone(),
                    why,
                });
                a.pending.clear();
            }
            // Every request of a WRITE to the peer's staging completed: ask it to land them.
            if a.error.is_none()
                && a.remote == Remote::ToLand
                && a.outstanding == 0
                && a.pending.is_empty()
            {
                a.last = now;
                match a.t.peer.stage(tid, true, a.t.remote_stage.clone()) {
                    Ok(()) => a.remote = Remote::Landing,
                    Err(e) => a.error = Some(e),
                }
            }
            let waiting = matches!(a.remote, Remote::Fetching | Remote::Landing);
            let idle = now.saturating_duration_since(a.last);
            // Silent with requests out, unable to post what is left, or the peer not
            // answering about its staging: stalled either way.
            if (a.outstanding > 0 || !a.pending.is_empty() || waiting)
                && idle >= stall
                && !a.reported
            {
                // Reported now; the registrations stay held until the NIC answers.
                let e = match a.error.take() {
                    Some(e @ Error::PeerLost { .. }) => e,
                    _ => Error::Stalled {
                        transfer: tid,
                        peer: a.t.peer.name.clone(),
                        outstanding: a.outstanding,
                        total: a.t.chunks.len() as u64,
                        stall,
                    },
                };
                a.pending.clear();
                a.t.finish(Status::Failed(e.clone()));
                a.error = Some(e);
                a.reported = true;
                self.failed.inc();
            }
            // An unanswered request waits a little for the control connection's verdict (the
            // data connections of a peer that died see it first).
            let deciding = a.error.as_ref().is_some_and(unanswered)
                && now.saturating_duration_since(a.last) < LOSS_GRACE.min(stall);
            if a.outstanding == 0
                && !deciding
                && (a.error.is_some() || (a.pending.is_empty() && a.remote == Remote::Ready))
            {
                over.push(tid);
            }
        }
        let any = !over.is_empty();
        for tid in over {
            let Some(a) = g.active.remove(&tid) else {
                continue;
            };
            if a.reported {
                continue;
            }
            match a.error {
                Some(e) => {
                    self.failed.inc();
                    a.t.finish(Status::Failed(e));
                }
                None => {
                    // A READ into staged memory: the bytes go to device memory now.
                    if let Err(e) = a.t.copy_staged_in() {
                        self.failed.inc();
                        a.t.finish(Status::Failed(e));
                        continue;
                    }
                    let sent = match &a.t.notify {
                        Some((tag, b)) => {
                            a.t.peer
                                .notify(Some(tid), tag.clone(), b.clone())
                                .map(|()| {
                                    self.notes_sent.inc();
                                })
                        }
                        None => Ok(()),
                    };
                    match sent {
                        Ok(()) => {
                            self.done.inc();
                            self.bytes.add(a.t.bytes);
                            a.t.finish(Status::Done);
                        }
                        Err(e) => {
                            self.failed.inc();
                            a.t.finish(Status::Failed(e));
                        }
                    }
                }
            }
        }
        any
    }

    /// The agent stops: every transfer still under way ends with an error (its requests die
    /// with the agent's queue pairs).
    fn fail_all(&self, agent: &str) {
        let mut g = lock(&self.inner);
        g.queue.clear();
        for (_, a) in g.active.drain() {
            if !a.reported {
                self.failed.inc();
                a.t.finish(Status::Failed(Error::PeerLost {
                    peer: a.t.peer.name.clone(),
                    why: format!("agent {agent} stopped with the transfer under way"),
                }));
            }
        }
    }

    fn nap(&self, busy: bool) {
        let g = lock(&self.inner);
        if g.wake {
            drop(g);
            lock(&self.inner).wake = false;
            return;
        }
        let d = if busy { NAP_BUSY } else { NAP_IDLE };
        let mut g = g;
        g.napping = true;
        let mut g = wait_timeout(&self.cv, g, d).0;
        g.napping = false;
        g.wake = false;
    }

    fn busy(&self) -> bool {
        !lock(&self.inner).active.is_empty()
    }
}

/// The progress thread of an agent: runs until the agent stops ([`ProgressEngine::stop`]) or
/// lets go of its engine.
pub(crate) fn spawn(engine: &Arc<ProgressEngine>) -> Result<JoinHandle<()>> {
    let w: Weak<ProgressEngine> = Arc::downgrade(engine);
    std::thread::Builder::new()
        .name(format!("dmaplane-progress {}", engine.name))
        .spawn(move || {
            let mut idle = 0u32;
            loop {
                let Some(e) = w.upgrade() else { return };
                if e.stop.load(Ordering::Acquire) {
                    e.fail_all(&e.name);
                    return;
                }

                // A waiter is driving: stay out of its way (it reaps and posts for everyone)
                // until it hands off.
                if e.driven() {
                    e.nap_driven();
                    continue;
                }
                if e.step() {
                    idle = 0;
                    continue;
                }
                idle += 1;
                if idle < SPIN {
                    std::thread::yield_now();
                } else {
                    let busy = e.busy();
                    e.nap(busy);
                }
            }
        })
        .map_err(|e| Error::setup(&engine.name, format!("no progress thread: {e}")))
}
