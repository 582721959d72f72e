//! The DMA oracle: an observer of the fabric that is independent of the revoke protocol.
//!
//! # What it sees
//!
//! The fabric, not the importer or the exporter, records in one global order (a sequence
//! counter, never wall time):
//! - every DMA that touches a window's memory (its end is taken inside the access, before the
//!   issuing device can produce a completion for it), and every DMA the fabric refused;
//! - every fence signal: which importer, for which grant of which device on which window
//!   (logged by the [`Fence`](crate::fence::Fence) at the moment of signalling, before the
//!   exporter can see it);
//! - the exporter's revoke start and its ack on the window, and the exporter's own CPU accesses
//!   to the memory while the revoke is under way.
//!
//! # What it concludes
//!
//! - `dma_after_fence`: a DMA by a device that began, or was still running, after that device's
//!   importer signalled its fence for the window — a protocol violation even when the backstop
//!   stopped it. An access whose end comes after the fence in the global order is one: an honest
//!   importer signals only after the completion, which the device produces after the end.
//! - `dma_after_ack`: a DMA that touched the memory after the exporter's ack.
//! - `blocked_by_backstop`: an access the fabric refused only because step 4 of the revoke
//!   protocol had taken the device's grant away (or unmapped the window) — the importer tried.
//! - `reused_before_ack`: the exporter touched the memory between the start of its revoke and
//!   its ack (it freed or reused memory before the importers were done).
//!
//! For an honest importer and exporter all four are 0.
//!
//! # Cost
//!
//! A window that no revoke has touched costs every DMA one atomic load (`marked`): the fence and
//! the revoke start set it before they take their sequence number, so a DMA that reads it clear
//! after its copy ended before either. Only marked windows take the sequence counter and the
//! marks lock. The log itself keeps the newest [`RECENT`] events for diagnostics, or every event
//! when [`Oracle::record`] asked for it (tests compare the online counters with a replay of the
//! whole log: [`Verdict::replay`]).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

// Only `marked` is a loom atomic: its order against the DMA path is what the fast path relies
// on. The log, the marks and the counter are the observer's own bookkeeping, never held across
// a loom operation, so they stay std (loom need not explore them).
use crate::sync::atomic::AtomicBool as ModelAtomicBool;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::sync::lock;

use super::DeviceId;

/// Events kept for diagnostics when the full log is not recorded.
pub const RECENT: usize = 4096;
/// Violations kept verbatim in a verdict.
const KEEP_VIOLATIONS: usize = 32;

/// Identifies a window for the oracle's lifetime (bus addresses are never reused either).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct WindowId(pub u64);

/// One entry of the oracle's ordered log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// The exporter started revoking (or moving) the window's memory.
    RevokeBegin { seq: u64, window: WindowId },
    /// `importer`, doing DMA as `device`, signalled its fence for the window.
    Fence {
        seq: u64,
        window: WindowId,
        device: DeviceId,
        #[serde(serialize_with = "as_str")]
        importer: Arc<str>,
    },
    /// Step 4 took `device`'s grant on the window away during a revoke.
    GrantCut {
        seq: u64,
        window: WindowId,
        device: DeviceId,
    },
    /// The exporter's ack: the revoke report was returned.
    Ack { seq: u64, window: WindowId },
    /// A DMA by `device` touched the window's memory; `seq` is its end. Logged for marked windows
    /// only (on the others nothing can be after a fence or an ack).
    Dma {
        seq: u64,
        window: WindowId,
        device: DeviceId,
    },
    /// A DMA by `device` the fabric refused on the window (no grant, unmapped, revoked).
    Refused {
        seq: u64,
        window: WindowId,
        device: DeviceId,
    },
    /// The exporter read or wrote the memory itself.
    OwnerAccess { seq: u64, window: WindowId },
}

impl Event {
    pub fn seq(&self) -> u64 {
        match self {
            Event::RevokeBegin { seq, .. }
            | Event::Fence { seq, .. }
            | Event::GrantCut { seq, .. }
            | Event::Ack { seq, .. }
            | Event::Dma { seq, .. }
            | Event::Refused { seq, .. }
            | Event::OwnerAccess { seq, .. } => *seq,
        }
    }
}

fn as_str<S: serde::Serializer>(s: &Arc<str>, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s)
}

/// What the oracle concluded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub dma_after_fence: u64,
    pub dma_after_ack: u64,
    pub blocked_by_backstop: u64,
    pub reused_before_ack: u64,
    /// Fences and acks seen: a verdict over none of them proves nothing.
    pub fences: u64,
    pub acks: u64,
    /// Violations per importer (or device, for one that never signalled, or exporter).
    pub by_culprit: BTreeMap<String, u64>,
    /// The first few violations, in words.
    pub violations: Vec<String>,
}

impl Verdict {
    /// Nothing after a fence, nothing after an ack, nothing the backstop had to stop, no early
    /// reuse.
    pub fn is_clean(&self) -> bool {
        self.dma_after_fence == 0
            && self.dma_after_ack == 0
            && self.blocked_by_backstop == 0
            && self.reused_before_ack == 0
    }

    /// The counters recomputed from a whole log alone (what [`Oracle::record`] keeps). `name`
    /// names devices. Used to check the online evaluation against the definition.
    pub fn replay(log: &[Event], name: &dyn Fn(DeviceId) -> String) -> Verdict {
        let mut v = Verdict::default();
        let mut marks: BTreeMap<WindowId, Marks> = BTreeMap::new();
        for e in log {
            match e {
                Event::RevokeBegin { seq, window } => marks.entry(*window).or_default().begin(*seq),
                Event::Fence {
                    seq,
                    window,
                    device,
                    importer,
                } => marks
                    .entry(*window)
                    .or_default()
                    .fence(*seq, *device, importer.clone()),
                Event::GrantCut { window, device, .. } => {
                    marks.entry(*window).or_default().cut.push(*device)
                }
                Event::Ack { seq, window } => marks.entry(*window).or_default().ack(*seq),
                Event::Dma {
                    seq,
                    window,
                    device,
                } => {
                    let m = marks.entry(*window).or_default();
                    v.judge_dma(m, *window, *device, *seq, &name(*device));
                }
                Event::Refused {
                    seq,
                    window,
                    device,
                } => {
                    let m = marks.entry(*window).or_default();
                    v.judge_refused(m, *window, *device, *seq, &name(*device));
                }
                Event::OwnerAccess { seq, window } => {
                    let m = marks.entry(*window).or_default();
                    v.judge_owner(m, *window, *seq);
                }
            }
        }
        v.fences = log
            .iter()
            .filter(|e| matches!(e, Event::Fence { .. }))
            .count() as u64;
        v.acks = log
            .iter()
            .filter(|e| matches!(e, Event::Ack { .. }))
            .count() as u64;
        v
    }

    fn violation(&mut self, culprit: String, what: String) {
        *self.by_culprit.entry(culprit).or_insert(0) += 1;
        if self.violations.len() < KEEP_VIOLATIONS {
            self.violations.push(what);
        }
    }

    fn judge_dma(&mut self, m: &Marks, w: WindowId, dev: DeviceId, end: u64, name: &str) {
        if let Some(f) = m.fence_of(dev).filter(|f| f.seq < end) {
            self.dma_after_fence += 1;
            self.violation(
                f.importer.to_string(),
                format!(
                    "dma-after-fence: {} (importer {}) touched window {} at #{end}, after its \
                     fence at #{}",
                    name, f.importer, w.0, f.seq
                ),
            );
        }
        if let Some(a) = m.acked.filter(|a| *a < end) {
            self.dma_after_ack += 1;
            let culprit = m
                .fence_of(dev)
                .map_or_else(|| name.to_string(), |f| f.importer.to_string());
            self.violation(
                culprit,
                format!(
                    "dma-after-ack: {} touched window {} at #{end}, after the exporter's ack at \
                     #{a}",
                    name, w.0
                ),
            );
        }
    }

    fn judge_refused(&mut self, m: &Marks, w: WindowId, dev: DeviceId, at: u64, name: &str) {
        if !m.cut.contains(&dev) {
            // Never granted, or detached outside a revoke: not the backstop's doing.
            return;
        }
        self.blocked_by_backstop += 1;
        let fence = m.fence_of(dev);
        let culprit = fence.map_or_else(|| name.to_string(), |f| f.importer.to_string());
        self.violation(
            culprit,
            format!(
                "blocked-by-backstop: {} tried window {} at #{at} after step 4 took its grant \
                 ({})",
                name,
                w.0,
                match fence {
                    Some(f) => format!("its importer {} had signalled at #{}", f.importer, f.seq),
                    None => "its importer never signalled".into(),
                }
            ),
        );
        if fence.is_some() {
            // Issued after the promise: a violation of the fence too, whoever stopped it.
            self.dma_after_fence += 1;
        }
    }

    fn judge_owner(&mut self, m: &Marks, w: WindowId, at: u64) {
        if m.revoking.is_some() && m.acked.is_none() {
            self.reused_before_ack += 1;
            self.violation(
                "exporter".into(),
                format!(
                    "reused-before-ack: the exporter touched window {} at #{at}, after its revoke \
                     began at #{} and before its ack",
                    w.0,
                    m.revoking.unwrap_or(0)
                ),
            );
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dma_after_fence = {}, dma_after_ack = {}, blocked_by_backstop = {}, \
             reused_before_ack = {} ({} fences, {} acks observed)",
            self.dma_after_fence,
            self.dma_after_ack,
            self.blocked_by_backstop,
            self.reused_before_ack,
            self.fences,
            self.acks
        )
    }
}

#[derive(Debug, Clone)]
struct FenceMark {
    seq: u64,
    device: DeviceId,
    importer: Arc<str>,
}

/// What the log says so far about one window.
#[derive(Debug, Default)]
struct Marks {
    revoking: Option<u64>,
    acked: Option<u64>,
    fences: Vec<FenceMark>,
    /// Devices whose grant step 4 took away.
    cut: Vec<DeviceId>,
}

impl Marks {
    fn begin(&mut self, seq: u64) {
        self.revoking.get_or_insert(seq);
    }
    fn fence(&mut self, seq: u64, device: DeviceId, importer: Arc<str>) {
        // The first fence of a device counts: it is the promise.
        if self.fence_of(device).is_none() {
            self.fences.push(FenceMark {
                seq,
                device,
                importer,
            });
        }
    }
    fn ack(&mut self, seq: u64) {
        self.acked.get_or_insert(seq);
    }
    fn fence_of(&self, dev: DeviceId) -> Option<&FenceMark> {
        self.fences.iter().find(|f| f.device == dev)
    }
}

/// The oracle's per-window state, held by the window (and kept after its unmap, to judge
/// accesses to an address that is gone).
#[derive(Debug)]
pub(crate) struct WindowWatch {
    pub(crate) id: WindowId,
    marked: ModelAtomicBool,
    marks: Mutex<Marks>,
}

impl WindowWatch {
    pub(crate) fn new(id: WindowId) -> WindowWatch {
        WindowWatch {
            id,
            marked: ModelAtomicBool::new(false),
            marks: Mutex::new(Marks::default()),
        }
    }
}

#[derive(Debug, Default)]
struct Log {
    events: VecDeque<Event>,
    verdict: Verdict,
}

/// The fabric's observer. One per fabric.
#[derive(Debug)]
pub struct Oracle {
    seq: AtomicU64,
    record: AtomicBool,
    log: Mutex<Log>,
}

impl Oracle {
    pub(crate) fn new() -> Oracle {
        Oracle {
            seq: AtomicU64::new(0),
            record: AtomicBool::new(false),
            log: Mutex::new(Log::default()),
        }
    }

    /// Keep every event from now on (tests), not only the newest [`RECENT`].
    pub fn record(&self, on: bool) {
        self.record.store(on, Ordering::SeqCst);
    }

    /// The counters so far.
    pub fn verdict(&self) -> Verdict {
        lock(&self.log).verdict.clone()
    }

    /// The log as kept (everything when recording, else the newest [`RECENT`] events).
    pub fn events(&self) -> Vec<Event> {
        lock(&self.log).events.iter().cloned().collect()
    }

    fn next(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Log `make(seq)` and judge it against the window's marks, all under the marks lock (so the
    /// log's order is the order the judgements saw).
    fn log(
        &self,
        w: &WindowWatch,
        make: impl FnOnce(u64) -> Event,
        judge: impl FnOnce(&mut Marks, &mut Verdict, u64),
    ) {
        let mut marks = lock(&w.marks);
        let seq = self.next();
        let mut log = lock(&self.log);
        judge(&mut marks, &mut log.verdict, seq);
        log.events.push_back(make(seq));
        if !self.record.load(Ordering::Relaxed) {
            while log.events.len() > RECENT {
                log.events.pop_front();
            }
        }
    }

    pub(crate) fn revoke_begin(&self, w: &WindowWatch) {
        w.marked.store(true, Ordering::SeqCst);
        self.log(
            w,
            |seq| Event::RevokeBegin { seq, window: w.id },
            |m, _, seq| m.begin(seq),
        );
    }

    pub(crate) fn fence(&self, w: &WindowWatch, device: DeviceId, importer: &str) {
        w.marked.store(true, Ordering::SeqCst);
        let importer: Arc<str> = Arc::from(importer);
        let i2 = importer.clone();
        self.log(
            w,
            |seq| Event::Fence {
                seq,
                window: w.id,
                device,
                importer: i2,
            },
            |m, v, seq| {
                v.fences += 1;
                m.fence(seq, device, importer)
            },
        );
    }

    pub(crate) fn grant_cut(&self, w: &WindowWatch, device: DeviceId) {
        // Only a cut during a revoke is the backstop; a detach is not.
        let revoking = w.marked.load(Ordering::SeqCst) && lock(&w.marks).revoking.is_some();
        if !revoking {
            return;
        }
        self.log(
            w,
            |seq| Event::GrantCut {
                seq,
                window: w.id,
                device,
            },
            |m, _, _| m.cut.push(device),
        );
    }

    pub(crate) fn ack(&self, w: &WindowWatch) {
        w.marked.store(true, Ordering::SeqCst);
        self.log(
            w,
            |seq| Event::Ack { seq, window: w.id },
            |m, v, seq| {
                v.acks += 1;
                m.ack(seq)
            },
        );
    }

    /// Called by the fabric right after a DMA touched the window's memory, before it returns to
    /// the device. `name` names the device; it is asked before any of the oracle's locks is
    /// taken (it may take the fabric's).
    #[inline]
    pub(crate) fn dma(&self, w: &WindowWatch, device: DeviceId, name: &dyn Fn(DeviceId) -> String) {
        self.access(w, device, name, true);
    }

    /// Called by the fabric when it refused a DMA by `device` on the window.
    pub(crate) fn refused(
        &self,
        w: &WindowWatch,
        device: DeviceId,
        name: &dyn Fn(DeviceId) -> String,
    ) {
        self.access(w, device, name, false);
    }

    #[inline]
    fn access(
        &self,
        w: &WindowWatch,
        device: DeviceId,
        name: &dyn Fn(DeviceId) -> String,
        landed: bool,
    ) {
        if !w.marked.load(Ordering::SeqCst) {
            return;
        }
        let name = name(device);
        let window = w.id;
        self.log(
            w,
            |seq| match landed {
                true => Event::Dma {
                    seq,
                    window,
                    device,
                },
                false => Event::Refused {
                    seq,
                    window,
                    device,
                },
            },
            |m, v, seq| match landed {
                true => v.judge_dma(m, window, device, seq, &name),
                false => v.judge_refused(m, window, device, seq, &name),
            },
        );
    }

    pub(crate) fn owner_access(&self, w: &WindowWatch) {
        if !w.marked.load(Ordering::SeqCst) {
            return;
        }
        self.log(
            w,
            |seq| Event::OwnerAccess { seq, window: w.id },
            |m, v, seq| v.judge_owner(m, w.id, seq),
        );
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::super::Fabric;
    use crate::hints::Access;
    use crate::revoke::AccessGrant;

    /// An exporter without a backstop (a dma-buf exporter passes no grant to revoke): the oracle
    /// alone sees the DMA that landed after the fence and after the ack.
    #[test]
    fn without_the_backstop_a_late_dma_lands_and_is_counted() {
        let f = Fabric::new();
        f.oracle().record(true);
        let owner = f.add_device("mem0");
        let nic = f.add_device("nic0");
        let w = f.map_new(owner, 4096, true).unwrap();
        let g = f.grant(&w, nic, Access::READ_WRITE);
        assert!(f.dma_write(nic, w.base(), &[1]).is_ok());
        f.revoke_begins(&w);
        assert!(f.dma_write(nic, w.base(), &[2]).is_ok());
        g.fence_observer().unwrap().signalled("nic0/buf");
        f.acked(&w);
        // The grant was never cut: the write lands.
        assert!(f.dma_write(nic, w.base(), &[3]).is_ok());
        let v = f.oracle().verdict();
        assert_eq!(v.dma_after_fence, 1, "{v}");
        assert_eq!(v.dma_after_ack, 1, "{v}");
        assert_eq!(v.blocked_by_backstop, 0, "{v}");
        assert_eq!(v.by_culprit.get("nic0/buf"), Some(&2));
        let replay = super::Verdict::replay(&f.oracle().events(), &|d| f.device_name(d));
        assert_eq!(v, replay);
        // The write before the fence is logged (the window was marked) but judged fine.
        let dmas = f
            .oracle()
            .events()
            .iter()
            .filter(|e| matches!(e, super::Event::Dma { .. }))
            .count();
        assert_eq!(dmas, 2);
    }

    #[test]
    fn the_log_keeps_the_newest_events_unless_recording() {
        let f = Fabric::new();
        let owner = f.add_device("mem0");
        let nic = f.add_device("nic0");
        let w = f.map_new(owner, 4096, true).unwrap();
        let _g = f.grant(&w, nic, Access::READ_WRITE);
        f.revoke_begins(&w);
        for _ in 0..super::RECENT + 10 {
            f.dma_write(nic, w.base(), &[1]).unwrap();
        }
        let ev = f.oracle().events();
        assert_eq!(ev.len(), super::RECENT);
        assert!(ev.windows(2).all(|p| p[0].seq() < p[1].seq()));
    }
}
