//! Fault injection: the quiesce layer breaks its own contract on purpose, so that every check
//! that is meant to catch a broken importer or lease holder can be watched failing.
//!
//! Off unless a test or `dmaplane stress revoke --inject` asks, per device ([`Device::inject`]).
//! Importer faults act where the device imports memory; holder faults where it holds a lease.
//!
//! [`Device::inject`]: crate::Device::inject

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use serde::Serialize;

/// One way of breaking the revoke contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// Importer: signal the fence the moment it is invalidated, before its queue pairs are
    /// quiesced, its leases settled and its MR zapped.
    EarlyFence,
    /// Importer: never zap the MR's translation (it keeps mapping the old memory).
    NoZap,
    /// Importer: leave the queue pairs that use the MR alone (no flush, no drain, no wait).
    NoQpQuiesce,
    /// Lease holder: ignore the owner's revoke — keep posting, never acknowledge.
    IgnoreLeaseRevoke,
    /// Lease holder: acknowledge the revoke at once, then keep writing to the region.
    AckThenWrite,
    /// Lease holder on TCP NICs with its peer on the same host: answer the owner's `unmap` and
    /// keep the view of the revoked memory (and keep copying through it).
    KeepViews,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::EarlyFence,
        Fault::NoZap,
        Fault::NoQpQuiesce,
        Fault::IgnoreLeaseRevoke,
        Fault::AckThenWrite,
        Fault::KeepViews,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::EarlyFence => "early-fence",
            Fault::NoZap => "no-zap",
            Fault::NoQpQuiesce => "no-qp-quiesce",
            Fault::IgnoreLeaseRevoke => "ignore-lease-revoke",
            Fault::AckThenWrite => "ack-then-write",
            Fault::KeepViews => "keep-views",
        }
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Fault, String> {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let known: Vec<_> = Fault::ALL.iter().map(|f| f.name()).collect();
                format!("unknown fault {s:?} (known: {})", known.join(", "))
            })
    }
}

/// The fault a device commits, if any.
#[derive(Debug, Default)]
pub(crate) struct Injected(AtomicU8);

impl Injected {
    pub(crate) fn set(&self, f: Option<Fault>) {
        self.0.store(f.map_or(0, Fault::code), Ordering::SeqCst);
    }

    pub(crate) fn is(&self, f: Fault) -> bool {
        self.0.load(Ordering::Relaxed) == f.code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_known_ones() {
        for f in Fault::ALL {
            assert_eq!(f.name().parse::<Fault>(), Ok(f));
        }
        let e = "no-fence".parse::<Fault>().unwrap_err();
        assert!(
            e.contains("\"no-fence\"") && e.contains("ack-then-write"),
            "{e}"
        );
        let i = Injected::default();
        assert!(!i.is(Fault::EarlyFence));
        i.set(Some(Fault::NoZap));
        assert!(i.is(Fault::NoZap) && !i.is(Fault::EarlyFence));
        i.set(None);
        assert!(!i.is(Fault::NoZap));
    }
}
