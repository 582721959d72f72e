//! Attachments and the revoke protocol — the one place it is written.
//!
//! # The contract
//!
//! Exporter side ([`Export::revoke`] and [`Export::begin_move`]), in order:
//! 1. take the export's revoke lock (revokes and moves serialise); mark the export revoking so
//!    every new [`Attachment::map`] fails and every [`Attachment::check`] of an older epoch fails;
//! 2. call every live attachment's [`Importer::invalidate`] with a [`Fence`] carrying the
//!    deadline — outside the state lock, so importers may call back into their attachment;
//! 3. wait for each fence, all against one deadline;
//! 4. for every attachment, revoke its [`AccessGrant`]: for an importer that signalled this is
//!    the unmap; for one that did not (a "lying importer", named in the report) it fences the
//!    importer off by force — in the fabric its window mapping is removed, so a later DMA faults
//!    and is counted instead of landing. Revoking a grant waits for DMA already under way;
//! 5. return the [`RevokeReport`] — the ack. After it no importer can touch the memory, and the
//!    exporter may free or move it.
//!
//! Importer side: [`Importer::invalidate`] must not block — stop issuing new DMA at once, and
//! signal the fence (now, or later from whatever sees in-flight work finish). A dynamic importer
//! calls [`Attachment::map`] again after a move and gets the new list with epoch + 1; a pinned
//! importer's attachment is dead after any revoke or move.
//!
//! Dropping an [`Export`] with live attachments revokes them first.

use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::addr::AddrList;
use crate::fence::{Fence, FenceObserver};
use crate::negotiate::{Accept, NegotiateError, Negotiated, Offer};
use crate::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::sync::{Mutex, lock};

/// How long a dropped exporter waits for its importers, as VFIO does.
pub const DROP_REVOKE_DEADLINE: Duration = Duration::from_secs(1);

/// Whether an importer can follow the exporter when it moves its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImporterKind {
    /// Re-maps after a move (new `AddrList`, epoch + 1).
    Dynamic,
    /// Revoke is final.
    Pinned,
}

/// Identifies one attachment within its export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct AttachmentId(pub u64);

/// Why an importer is being invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InvalidateReason {
    /// The memory goes away: the attachment is dead.
    Revoke,
    /// The memory moves: dynamic importers may map again afterwards.
    Move,
}

/// What an importer is told on revoke.
#[derive(Debug, Clone)]
pub struct Invalidation {
    pub export: Arc<str>,
    pub attachment: AttachmentId,
    /// The epoch being invalidated.
    pub epoch: u64,
    pub reason: InvalidateReason,
    /// Signal when no DMA to the memory can happen any more.
    pub fence: Fence,
}

/// Something that does DMA to exported memory.
pub trait Importer: Send + Sync {
    fn name(&self) -> &str;
    fn kind(&self) -> ImporterKind;
    /// Stop issuing DMA to the attachment and signal `inv.fence` once none can still happen.
    /// Must not block: work in flight is waited for by whoever signals the fence later.
    fn invalidate(&self, inv: Invalidation);
}

/// An importer's access to the memory, as the exporter's backend enforces it (a fabric grant, an
/// IOMMU mapping). Revoking it waits for accesses under way and makes every later one fail.
pub trait AccessGrant: Send + Sync + fmt::Debug {
    fn revoke(&self);
    /// Who must hear this importer's fence signals (the fabric's oracle); none by default.
    fn fence_observer(&self) -> Option<Arc<dyn FenceObserver>> {
        None
    }
}

/// Errors an attachment reports to its importer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("export {export} is revoked (epoch {epoch})")]
    Revoked { export: String, epoch: u64 },
    #[error(
        "export {export} is being revoked or moved (epoch {epoch}): map again after it completes"
    )]
    Revoking { export: String, epoch: u64 },
    #[error("stale handle on export {export}: epoch {held} is not the current epoch {current}")]
    Stale {
        export: String,
        held: u64,
        current: u64,
    },
    #[error(transparent)]
    Negotiate(#[from] NegotiateError),
    #[error("export {export}: {what}")]
    Exporter { export: String, what: String },
}

/// What [`Attachment::map`] returns: the list to program and the epoch it is valid for.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub list: Arc<AddrList>,
    pub epoch: u64,
}

/// How one importer answered one revoke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// Signalled its fence this long after the revoke started.
    Signalled { after_us: u64 },
    /// Did not signal before the deadline: fenced off by force.
    TimedOut,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImporterReport {
    pub importer: String,
    pub attachment: AttachmentId,
    pub kind: ImporterKind,
    pub outcome: Outcome,
}

/// The ack of a revoke or move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RevokeReport {
    pub export: String,
    /// The epoch that was invalidated.
    pub epoch: u64,
    pub reason: InvalidateReason,
    /// True when the export was already revoked: nothing was done.
    pub already_revoked: bool,
    pub importers: Vec<ImporterReport>,
    pub deadline_us: u64,
    pub elapsed_us: u64,
}

impl RevokeReport {
    /// Importers that did not signal in time and were fenced off.
    pub fn timed_out(&self) -> Vec<&str> {
        self.importers
            .iter()
            .filter(|i| i.outcome == Outcome::TimedOut)
            .map(|i| i.importer.as_str())
            .collect()
    }

    /// Every importer signalled in time.
    pub fn is_clean(&self) -> bool {
        self.importers
            .iter()
            .all(|i| i.outcome != Outcome::TimedOut)
    }
}

impl fmt::Display for RevokeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} of {} epoch {}: {} importer(s) in {} us",
            self.reason,
            self.export,
            self.epoch,
            self.importers.len(),
            self.elapsed_us
        )?;
        let late = self.timed_out();
        if !late.is_empty() {
            write!(
                f,
                "; did not signal within {} us and were fenced off: {}",
                self.deadline_us,
                late.join(", ")
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Active,
    /// A revoke or move is in progress.
    Revoking,
    /// Memory moved away; waiting for [`Export::finish_move`].
    Moved,
    Revoked,
}

struct AttachedImporter {
    id: AttachmentId,
    importer: Arc<dyn Importer>,
    kind: ImporterKind,
    list: Arc<AddrList>,
    grant: Option<Box<dyn AccessGrant>>,
}

/// One importer a revoke invalidates.
struct ToInvalidate {
    id: AttachmentId,
    kind: ImporterKind,
    importer: Arc<dyn Importer>,
    observer: Option<Arc<dyn FenceObserver>>,
}

struct Inner {
    state: State,
    epoch: u64,
    next_id: u64,
    entries: Vec<AttachedImporter>,
}

struct ExportInner {
    name: Arc<str>,
    /// `epoch << 1 | usable` — read on every fast-path check without taking the lock.
    generation: AtomicU64,
    inner: Mutex<Inner>,
    /// Serialises revokes and moves.
    revoke_lock: Mutex<()>,
}

impl ExportInner {
    fn publish(&self, inner: &Inner) {
        let usable = (inner.state == State::Active) as u64;
        self.generation
            .store(inner.epoch << 1 | usable, Ordering::Release);
    }
}

/// The exporter side of one piece of exported memory: its attachments, its epoch, and the
/// revoke protocol. Concrete exporters own one and delegate to it.
pub struct Export {
    shared: Arc<ExportInner>,
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl Export {
    pub fn new(name: &str) -> Export {
        let shared = ExportInner {
            name: Arc::from(name),
            generation: AtomicU64::new(1),
            inner: Mutex::new(Inner {
                state: State::Active,
                epoch: 0,
                next_id: 0,
                entries: Vec::new(),
            }),
            revoke_lock: Mutex::new(()),
        };
        Export {
            shared: Arc::new(shared),
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn epoch(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire) >> 1
    }

    pub fn is_revoked(&self) -> bool {
        lock(&self.shared.inner).state == State::Revoked
    }

    /// Number of live attachments.
    pub fn attachments(&self) -> usize {
        lock(&self.shared.inner).entries.len()
    }

    /// Negotiate with `importer` and record the attachment. `produce` turns the negotiated offer
    /// into the importer's list and its access grant (called under no lock of this export).
    pub fn attach<F>(
        &self,
        importer: Arc<dyn Importer>,
        offers: &[Offer],
        accepts: &[Accept],
        produce: F,
    ) -> Result<Attachment, AttachError>
    where
        F: FnOnce(&Negotiated) -> Result<(AddrList, Option<Box<dyn AccessGrant>>), AttachError>,
    {
        let epoch = self.usable()?;
        let negotiated =
            crate::negotiate::negotiate(self.name(), offers, importer.name(), accepts)?;
        let (list, grant) = produce(&negotiated)?;
        let list = Arc::new(list);
        let kind = importer.kind();
        let mut inner = lock(&self.shared.inner);
        // Active again is not enough: a whole move may have run while `produce` made a list of
        // the old memory. Only the epoch it was made in may record it.
        if inner.state != State::Active || inner.epoch != epoch {
            let err = if inner.state == State::Active {
                AttachError::Stale {
                    export: self.shared.name.to_string(),
                    held: epoch,
                    current: inner.epoch,
                }
            } else {
                self.not_usable(&inner)
            };
            drop(inner);
            if let Some(g) = grant {
                g.revoke();
            }
            return Err(err);
        }
        let id = AttachmentId(inner.next_id);
        inner.next_id += 1;
        inner.entries.push(AttachedImporter {
            id,
            importer,
            kind,
            list,
            grant,
        });
        tracing::debug!(export = %self.shared.name, id = id.0, "attached");
        Ok(Attachment {
            shared: self.shared.clone(),
            id,
            kind,
            negotiated,
        })
    }

    /// The current epoch, when the export may be attached.
    fn usable(&self) -> Result<u64, AttachError> {
        let inner = lock(&self.shared.inner);
        if inner.state == State::Active {
            Ok(inner.epoch)
        } else {
            Err(self.not_usable(&inner))
        }
    }

    fn not_usable(&self, inner: &Inner) -> AttachError {
        not_usable(&self.shared.name, inner)
    }

    /// Revoke for good: the memory is about to be freed.
    pub fn revoke(&self, deadline: Duration) -> RevokeReport {
        self.invalidate_all(deadline, InvalidateReason::Revoke)
    }

    /// First half of a move: invalidate every attachment exactly as a revoke does. Pinned
    /// attachments die; dynamic ones wait for [`Export::finish_move`].
    pub fn begin_move(&self, deadline: Duration) -> RevokeReport {
        self.invalidate_all(deadline, InvalidateReason::Move)
    }

    /// Second half of a move: the memory is in its new place. `relist` produces each dynamic
    /// attachment's new list and grant; the epoch moves on and the export is usable again.
    pub fn finish_move<F>(&self, mut relist: F) -> Result<u64, AttachError>
    where
        F: FnMut(
            AttachmentId,
            &AddrList,
        ) -> Result<(AddrList, Option<Box<dyn AccessGrant>>), AttachError>,
    {
        let _serial = lock(&self.shared.revoke_lock);
        let mut inner = lock(&self.shared.inner);
        if inner.state != State::Moved {
            return Err(AttachError::Exporter {
                export: self.shared.name.to_string(),
                what: "finish_move without a begin_move".into(),
            });
        }
        // All or nothing: a relist that fails ends the export (see [`Export::abort_move`]).
        let mut relisted = Vec::with_capacity(inner.entries.len());
        for e in &inner.entries {
            match relist(e.id, &e.list) {
                Ok(r) => relisted.push(r),
                Err(err) => {
                    self.abort_locked(&mut inner, relisted);
                    return Err(err);
                }
            }
        }
        for (e, (list, grant)) in inner.entries.iter_mut().zip(relisted) {
            e.list = Arc::new(list);
            e.grant = grant;
        }
        inner.epoch += 1;
        inner.state = State::Active;
        self.shared.publish(&inner);
        Ok(inner.epoch)
    }

    /// A move that cannot complete (no new memory, a list that cannot be made): the export is
    /// revoked for good instead of staying `Moved`, where every attach and map would fail with
    /// "being moved" for ever. Its importers were already invalidated by the move's first half.
    pub fn abort_move(&self) {
        let _serial = lock(&self.shared.revoke_lock);
        let mut inner = lock(&self.shared.inner);
        if inner.state == State::Moved {
            self.abort_locked(&mut inner, Vec::new());
        }
    }

    fn abort_locked(&self, inner: &mut Inner, made: Vec<(AddrList, Option<Box<dyn AccessGrant>>)>) {
        tracing::warn!(export = %self.shared.name, "move failed: the export is revoked");
        inner.entries.clear();
        inner.state = State::Revoked;
        self.shared.publish(inner);
        for g in made.into_iter().filter_map(|(_, g)| g) {
            g.revoke();
        }
    }

    fn invalidate_all(&self, deadline: Duration, reason: InvalidateReason) -> RevokeReport {
        let _serial = lock(&self.shared.revoke_lock);
        let start = Instant::now();
        let due = start + deadline;
        // Step 1: mark revoking; new maps fail from here on.
        let (epoch, targets) = {
            let mut inner = lock(&self.shared.inner);
            if inner.state == State::Revoked {
                return RevokeReport {
                    export: self.shared.name.to_string(),
                    epoch: inner.epoch,
                    reason,
                    already_revoked: true,
                    importers: Vec::new(),
                    deadline_us: micros(deadline),
                    elapsed_us: 0,
                };
            }
            inner.state = State::Revoking;
            self.shared.publish(&inner);
            let targets: Vec<ToInvalidate> = inner
                .entries
                .iter()
                .map(|e| ToInvalidate {
                    id: e.id,
                    kind: e.kind,
                    importer: e.importer.clone(),
                    observer: e.grant.as_ref().and_then(|g| g.fence_observer()),
                })
                .collect();
            (inner.epoch, targets)
        };
        // Step 2: invalidate every importer, outside the lock.
        let fences: Vec<Fence> = targets
            .iter()
            .map(|t| {
                let fence = Fence::observed(
                    due,
                    t.observer
                        .clone()
                        .map(|o| (o, Arc::from(t.importer.name()))),
                );
                t.importer.invalidate(Invalidation {
                    export: self.shared.name.clone(),
                    attachment: t.id,
                    epoch,
                    reason,
                    fence: fence.clone(),
                });
                fence
            })
            .collect();
        // Step 3: wait for the fences against one deadline.
        let mut importers = Vec::with_capacity(targets.len());
        for (
            ToInvalidate {
                id, kind, importer, ..
            },
            fence,
        ) in targets.iter().zip(&fences)
        {
            let outcome = if fence.wait() {
                Outcome::Signalled {
                    after_us: micros(start.elapsed()),
                }
            } else {
                tracing::warn!(
                    export = %self.shared.name,
                    importer = importer.name(),
                    "importer did not signal before the deadline: fencing it off"
                );
                Outcome::TimedOut
            };
            importers.push(ImporterReport {
                importer: importer.name().to_string(),
                attachment: *id,
                kind: *kind,
                outcome,
            });
        }
        // Step 4: unmap everyone; for importers that timed out this is the forced fence-off.
        let grants: Vec<Box<dyn AccessGrant>> = {
            let mut inner = lock(&self.shared.inner);
            let grants = inner
                .entries
                .iter_mut()
                .filter_map(|e| e.grant.take())
                .collect();
            match reason {
                InvalidateReason::Revoke => {
                    inner.entries.clear();
                    inner.state = State::Revoked;
                }
                InvalidateReason::Move => {
                    inner.entries.retain(|e| e.kind == ImporterKind::Dynamic);
                    inner.state = State::Moved;
                }
            }
            self.shared.publish(&inner);
            grants
        };
        for g in grants {
            g.revoke();
        }
        // Step 5: the ack.
        let report = RevokeReport {
            export: self.shared.name.to_string(),
            epoch,
            reason,
            already_revoked: false,
            importers,
            deadline_us: micros(deadline),
            elapsed_us: micros(start.elapsed()),
        };
        tracing::debug!(%report, "revoke acked");
        report
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let live = {
            let inner = lock(&self.shared.inner);
            inner.state != State::Revoked && !inner.entries.is_empty()
        };
        if live {
            let report = self.revoke(DROP_REVOKE_DEADLINE);
            tracing::info!(%report, "exporter dropped: revoked its attachments first");
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn not_usable(name: &str, inner: &Inner) -> AttachError {
    match inner.state {
        State::Revoked => AttachError::Revoked {
            export: name.to_string(),
            epoch: inner.epoch,
        },
        _ => AttachError::Revoking {
            export: name.to_string(),
            epoch: inner.epoch,
        },
    }
}

/// One importer's handle on one export.
pub struct Attachment {
    shared: Arc<ExportInner>,
    id: AttachmentId,
    kind: ImporterKind,
    negotiated: Negotiated,
}

impl fmt::Debug for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment")
            .field("export", &self.shared.name)
            .field("id", &self.id)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Attachment {
    pub fn id(&self) -> AttachmentId {
        self.id
    }

    pub fn kind(&self) -> ImporterKind {
        self.kind
    }

    pub fn export_name(&self) -> &str {
        &self.shared.name
    }

    /// How the mapping was negotiated.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// The current list and epoch. Fails while a revoke or move is in progress, after a revoke,
    /// and — for pinned importers — after a move.
    pub fn map(&self) -> Result<Mapping, AttachError> {
        let inner = lock(&self.shared.inner);
        if inner.state != State::Active {
            return Err(not_usable(&self.shared.name, &inner));
        }
        match inner.entries.iter().find(|e| e.id == self.id) {
            Some(e) => Ok(Mapping {
                list: e.list.clone(),
                epoch: inner.epoch,
            }),
            None => Err(AttachError::Revoked {
                export: self.shared.name.to_string(),
                epoch: inner.epoch,
            }),
        }
    }

    /// Fast check, no lock: is a mapping of `epoch` still valid? Stale handles fail fast.
    pub fn check(&self, epoch: u64) -> Result<(), AttachError> {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation == (epoch << 1 | 1) {
            return Ok(());
        }
        let current = generation >> 1;
        if current != epoch {
            Err(AttachError::Stale {
                export: self.shared.name.to_string(),
                held: epoch,
                current,
            })
        } else {
            Err(AttachError::Revoking {
                export: self.shared.name.to_string(),
                epoch,
            })
        }
    }
}

impl Drop for Attachment {
    /// Detach: the importer no longer needs the memory; its access is revoked.
    fn drop(&mut self) {
        let grant = {
            let mut inner = lock(&self.shared.inner);
            let pos = inner.entries.iter().position(|e| e.id == self.id);
            pos.and_then(|p| inner.entries.swap_remove(p).grant)
        };
        if let Some(g) = grant {
            g.revoke();
        }
    }
}

/// An exporter: offers its memory and attaches importers. Implemented by every backend's exporter.
pub trait Exporter: Send + Sync {
    fn name(&self) -> &str;
    /// Revoke every attachment, wait for the importers up to `deadline`, report.
    fn revoke(&self, deadline: Duration) -> RevokeReport;
}
