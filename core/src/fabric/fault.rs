//! Per-device fault counters: what an IOMMU fault log or AER would show on real hardware.

use std::fmt;

use serde::Serialize;

use crate::counter::Counter;

/// Why the fabric refused a DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// No window at the address (never mapped, or unmapped by a revoke).
    Unmapped,
    /// The access runs past the end of its window.
    OutOfBounds,
    /// The device holds no grant on the window (never granted, or fenced off).
    NoGrant,
    /// The grant lacks the right (read or write) the access needs.
    AccessDenied,
    /// The window's memory is revoked.
    Revoked,
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultKind::Unmapped => "no window mapped at this address",
            FaultKind::OutOfBounds => "access runs past the end of the window",
            FaultKind::NoGrant => "device has no grant on this window",
            FaultKind::AccessDenied => "grant does not allow this access",
            FaultKind::Revoked => "window is revoked",
        })
    }
}

#[derive(Debug, Default)]
pub(crate) struct FaultCounters {
    unmapped: Counter,
    out_of_bounds: Counter,
    no_grant: Counter,
    access_denied: Counter,
    revoked: Counter,
}

impl FaultCounters {
    pub(crate) fn count(&self, kind: FaultKind) {
        let c = match kind {
            FaultKind::Unmapped => &self.unmapped,
            FaultKind::OutOfBounds => &self.out_of_bounds,
            FaultKind::NoGrant => &self.no_grant,
            FaultKind::AccessDenied => &self.access_denied,
            FaultKind::Revoked => &self.revoked,
        };
        c.inc();
    }

    pub(crate) fn snapshot(&self) -> Faults {
        Faults {
            unmapped: self.unmapped.get(),
            out_of_bounds: self.out_of_bounds.get(),
            no_grant: self.no_grant.get(),
            access_denied: self.access_denied.get(),
            revoked: self.revoked.get(),
        }
    }
}

/// A snapshot of one device's fault counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Faults {
    pub unmapped: u64,
    pub out_of_bounds: u64,
    pub no_grant: u64,
    pub access_denied: u64,
    pub revoked: u64,
}

impl Faults {
    /// Accesses to memory whose grant or window was already gone: what touching memory after
    /// its revoke looks like. An honest importer never makes one.
    pub fn after_revoke(&self) -> u64 {
        self.revoked + self.no_grant + self.unmapped
    }

    pub fn total(&self) -> u64 {
        self.unmapped + self.out_of_bounds + self.no_grant + self.access_denied + self.revoked
    }
}
