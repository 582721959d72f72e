//! What a peer may make this agent hold, and for how long: every bound on what arrives from the
//! wire, in one place, with the count of what each refused.
//!
//! The contract: nothing a peer sends grows this agent's threads or memory past these bounds.
//! What would go past one is refused at once — the peer (where it is still connected) is told
//! which limit, the agent logs it, and [`crate::AgentStats::refused`] counts it under that
//! limit's name. Honest peers are not slowed by a hostile one: each bound is per peer where a
//! peer could otherwise take another's share.
//!
//! | limit | what it bounds | where it is enforced |
//! | --- | --- | --- |
//! | `handshakes` | connections the listener serves at once (each a thread) | the listener |
//! | `handshake_time` | one handshake, start to end, however slowly the peer answers | each handshake step |
//! | `message_bytes` | one message on any connection (buffered until its newline) | the connection |
//! | `peers` | peers connected at once | the handshake |
//! | `paths` | (local NIC, peer NIC) paths to one peer (each with its queue pairs and a lease link) | the handshake |
//! | `qps_per_path` | queue pairs a peer may ask for on each path | the handshake |
//! | `regions` | registrations of one peer this agent keeps track of, and the leases it may grant each NIC | metadata and announcements; the NICs ([`dmaplane_rdma::Device::limit_leases`]) |
//! | `region_bytes` | the memory those descriptions take | metadata and announcements |
//! | `notifications` | notifications of one peer queued until read | the inbox |
//! | `notification_bytes` | one notification | the control reader |
//! | `stage_ranges` | ranges one stage or land request names (served inline, one after another) | staging |
//! | `stage_bytes` | bytes one stage or land request moves | staging |
//! | `staging_bytes` | the staging buffers this agent holds for its peers, all together (one per peer and staged registration) | announcing a staged registration to a peer |
//! | `idle` | silence on a peer's control connection before the peer is lost | the control reader |
//! | `keepalive` | how often this agent speaks on an otherwise idle control connection | the control writer |

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};

/// Bounds on what peers may make this agent hold ([`crate::AgentBuilder::limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections the handshake listener serves at once.
    pub handshakes: usize,
    /// The longest one handshake may take, however slowly the peer answers each step.
    pub handshake_time: Duration,
    /// The longest message accepted on any connection, in bytes.
    pub message_bytes: usize,
    /// Peers connected at once.
    pub peers: usize,
    /// Paths to one peer (its NICs times this agent's).
    pub paths: usize,
    /// Queue pairs a peer may ask for on each path.
    pub qps_per_path: usize,
    /// Registrations of one peer this agent keeps track of, and leases one peer may grant
    /// each of its NICs.
    pub regions: usize,
    /// The memory the descriptions of one peer's registrations may take, in bytes.
    pub region_bytes: usize,
    /// Notifications of one peer queued until read.
    pub notifications: usize,
    /// The largest notification accepted, in bytes.
    pub notification_bytes: usize,
    /// Ranges one stage or land request may name.
    pub stage_ranges: usize,
    /// Bytes one stage or land request may move.
    pub stage_bytes: u64,
    /// Bytes of staging buffers held for peers, all together: each peer a staged registration
    /// is announced to gets a buffer of its size. Past it, a peer is told of the registration
    /// without staged keys (it cannot reach it through a staged path).
    pub staging_bytes: u64,
    /// Silence on a peer's control connection after which the peer is lost.
    pub idle: Duration,
    /// How often an otherwise idle control connection carries a keepalive (less than `idle`).
    pub keepalive: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            handshakes: 64,
            handshake_time: Duration::from_secs(60),
            message_bytes: 16 << 20,
            peers: 1024,
            paths: 64,
            qps_per_path: 64,
            regions: 1 << 20,
            region_bytes: 256 << 20,
            notifications: crate::notify::NOTIFY_QUEUE / 8,
            notification_bytes: crate::notify::MAX_NOTIFY,
            stage_ranges: 1 << 16,
            stage_bytes: 1 << 40,
            staging_bytes: 64 << 30,
            idle: Duration::from_secs(60),
            keepalive: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// Every limit positive, and keepalives more frequent than the idle timeout.
    pub fn check(&self, what: &str) -> Result<()> {
        let counts = [
            ("limits.handshakes", self.handshakes),
            ("limits.message_bytes", self.message_bytes),
            ("limits.peers", self.peers),
            ("limits.paths", self.paths),
            ("limits.qps_per_path", self.qps_per_path),
            ("limits.regions", self.regions),
            ("limits.region_bytes", self.region_bytes),
            ("limits.notifications", self.notifications),
            ("limits.notification_bytes", self.notification_bytes),
            ("limits.stage_ranges", self.stage_ranges),
        ];
        for (field, v) in counts {
            if v == 0 {
                return Err(Error::invalid(what, field, 0, "must be at least 1"));
            }
        }
        for (field, v) in [
            ("limits.stage_bytes", self.stage_bytes),
            ("limits.staging_bytes", self.staging_bytes),
        ] {
            if v == 0 {
                return Err(Error::invalid(what, field, 0, "must be at least 1"));
            }
        }
        if self.notification_bytes > crate::notify::MAX_NOTIFY {
            return Err(Error::invalid(
                what,
                "limits.notification_bytes",
                self.notification_bytes,
                format!(
                    "at most {} (what a sender may attach)",
                    crate::notify::MAX_NOTIFY
                ),
            ));
        }
        if self.qps_per_path > 64 {
            return Err(Error::invalid(
                what,
                "limits.qps_per_path",
                self.qps_per_path,
                "at most 64",
            ));
        }
        for (field, d) in [
            ("limits.handshake_time", self.handshake_time),
            ("limits.idle", self.idle),
            ("limits.keepalive", self.keepalive),
        ] {
            if d.is_zero() {
                return Err(Error::invalid(what, field, "0", "must be positive"));
            }
        }
        if self.keepalive >= self.idle {
            return Err(Error::invalid(
                what,
                "limits.keepalive",
                format!("{:?}", self.keepalive),
                format!(
                    "must be shorter than limits.idle ({:?}), or an idle peer is lost between \
                     two keepalives",
                    self.idle
                ),
            ));
        }
        Ok(())
    }
}

/// What a refusal was for: a check the input failed, or the limit it would have gone past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// It failed a check (a name, a version, a registration it may not touch).
    Check,
    /// It did not prove the secret, or named an identity its handshake did not prove.
    Auth,
    Handshakes,
    HandshakeTime,
    MessageBytes,
    Peers,
    Paths,
    QpsPerPath,
    Regions,
    RegionBytes,
    Notifications,
    NotificationBytes,
    StageRanges,
    StageBytes,
    Idle,
    StagingBytes,
}

const KINDS: usize = 16;

impl Refusal {
    fn index(self) -> usize {
        self as usize
    }
}

/// The refusals so far, by what each was for ([`crate::AgentStats::refused`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Refusals {
    /// Input that failed a check: a hello or announcement with a bad name or field, a version
    /// this agent does not speak, a name already connected, a lease link for no handshake, a
    /// stage or land of a registration not published to the peer (or read-only).
    pub check: u64,
    /// Peers that did not prove the secret, or named an identity (a GID) their handshake did
    /// not prove.
    pub auth: u64,
    /// Connections beyond [`Limits::handshakes`].
    pub handshakes: u64,
    /// Handshakes past [`Limits::handshake_time`].
    pub handshake_time: u64,
    /// Messages longer than [`Limits::message_bytes`].
    pub message_bytes: u64,
    /// Peers beyond [`Limits::peers`].
    pub peers: u64,
    /// Peers whose paths would exceed [`Limits::paths`].
    pub paths: u64,
    /// Peers asking more than [`Limits::qps_per_path`].
    pub qps_per_path: u64,
    /// Registrations announced beyond [`Limits::regions`].
    pub regions: u64,
    /// Registrations announced beyond [`Limits::region_bytes`].
    pub region_bytes: u64,
    /// Notifications beyond a peer's [`Limits::notifications`].
    pub notifications: u64,
    /// Notifications longer than [`Limits::notification_bytes`].
    pub notification_bytes: u64,
    /// Stage or land requests naming more than [`Limits::stage_ranges`] ranges.
    pub stage_ranges: u64,
    /// Stage or land requests moving more than [`Limits::stage_bytes`].
    pub stage_bytes: u64,
    /// Peers lost after [`Limits::idle`] of silence.
    pub idle: u64,
    /// Lease messages refused by this agent's NICs (counted by them): grants beyond
    /// [`Limits::regions`], with unknown access or a range that wraps; revokes or acks that
    /// name another device, or a lease granted over another link.
    pub leases: u64,
    /// Staging buffers not made for a peer because [`Limits::staging_bytes`] were held.
    pub staging_bytes: u64,
}

impl Refusals {
    /// Every refusal, whatever it was for.
    pub fn total(&self) -> u64 {
        [
            self.check,
            self.auth,
            self.handshakes,
            self.handshake_time,
            self.message_bytes,
            self.peers,
            self.paths,
            self.qps_per_path,
            self.regions,
            self.region_bytes,
            self.notifications,
            self.notification_bytes,
            self.stage_ranges,
            self.stage_bytes,
            self.idle,
            self.leases,
            self.staging_bytes,
        ]
        .iter()
        .sum()
    }
}

/// Bytes held against a bound, by reservations that give them back when they go.
#[derive(Debug)]
pub(crate) struct Budget {
    held: AtomicU64,
    max: u64,
}

/// Bytes of a [`Budget`], held until this goes.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: std::sync::Arc<Budget>,
    bytes: u64,
}

impl Budget {
    pub(crate) fn new(max: u64) -> std::sync::Arc<Budget> {
        std::sync::Arc::new(Budget {
            held: AtomicU64::new(0),
            max,
        })
    }

    /// Hold `bytes` more, unless that goes past the bound (then `None`).
    pub(crate) fn reserve(self: &std::sync::Arc<Self>, bytes: u64) -> Option<Reservation> {
        let mut held = self.held.load(Ordering::Acquire);
        loop {
            let next = held.checked_add(bytes).filter(|&n| n <= self.max)?;
            match self
                .held
                .compare_exchange(held, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Some(Reservation {
                        budget: self.clone(),
                        bytes,
                    });
                }
                Err(now) => held = now,
            }
        }
    }

    /// Bytes held now.
    pub(crate) fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    pub(crate) fn max(&self) -> u64 {
        self.max
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The counters behind [`Refusals`], one per [`Refusal`].
#[derive(Debug, Default)]
pub(crate) struct RefusalCounters([AtomicU64; KINDS]);

impl RefusalCounters {
    pub(crate) fn count(&self, r: Refusal) {
        self.0[r.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Refusals {
        let g = |r: Refusal| self.0[r.index()].load(Ordering::Relaxed);
        Refusals {
            check: g(Refusal::Check),
            auth: g(Refusal::Auth),
            handshakes: g(Refusal::Handshakes),
            handshake_time: g(Refusal::HandshakeTime),
            message_bytes: g(Refusal::MessageBytes),
            peers: g(Refusal::Peers),
            paths: g(Refusal::Paths),
            qps_per_path: g(Refusal::QpsPerPath),
            regions: g(Refusal::Regions),
            region_bytes: g(Refusal::RegionBytes),
            notifications: g(Refusal::Notifications),
            notification_bytes: g(Refusal::NotificationBytes),
            stage_ranges: g(Refusal::StageRanges),
            stage_bytes: g(Refusal::StageBytes),
            idle: g(Refusal::Idle),
            leases: 0,
            staging_bytes: g(Refusal::StagingBytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_kind_has_its_own_counter_and_counts_in_the_total() {
        let c = RefusalCounters::default();
        let all = [
            Refusal::Check,
            Refusal::Auth,
            Refusal::Handshakes,
            Refusal::HandshakeTime,
            Refusal::MessageBytes,
            Refusal::Peers,
            Refusal::Paths,
            Refusal::QpsPerPath,
            Refusal::Regions,
            Refusal::RegionBytes,
            Refusal::Notifications,
            Refusal::NotificationBytes,
            Refusal::StageRanges,
            Refusal::StageBytes,
            Refusal::Idle,
            Refusal::StagingBytes,
        ];
        assert_eq!(all.len(), KINDS);
        for (i, r) in all.iter().enumerate() {
            for _ in 0..=i {
                c.count(*r);
            }
        }
        let s = c.snapshot();
        let got = [
            s.check,
            s.auth,
            s.handshakes,
            s.handshake_time,
            s.message_bytes,
            s.peers,
            s.paths,
            s.qps_per_path,
            s.regions,
            s.region_bytes,
            s.notifications,
            s.notification_bytes,
            s.stage_ranges,
            s.stage_bytes,
            s.idle,
            s.staging_bytes,
        ];
        let want: Vec<u64> = (1..=KINDS as u64).collect();
        assert_eq!(got.to_vec(), want);
        assert_eq!(s.total(), want.iter().sum::<u64>());
    }

    #[test]
    fn a_budget_holds_up_to_its_bound_and_gets_back_what_goes() {
        let b = Budget::new(100);
        let r1 = b.reserve(60).unwrap();
        assert!(b.reserve(41).is_none());
        let r2 = b.reserve(40).unwrap();
        assert_eq!(b.held(), 100);
        drop(r1);
        assert_eq!(b.held(), 40);
        assert!(b.reserve(u64::MAX).is_none());
        drop(r2);
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn limits_name_the_field_that_is_out_of_range() {
        assert!(Limits::default().check("agent a").is_ok());
        let e = Limits {
            peers: 0,
            ..Limits::default()
        }
        .check("agent a")
        .unwrap_err();
        assert!(e.to_string().contains("limits.peers"), "{e}");
        let e = Limits {
            keepalive: Duration::from_secs(5),
            idle: Duration::from_secs(5),
            ..Limits::default()
        }
        .check("agent a")
        .unwrap_err();
        assert!(e.to_string().contains("limits.keepalive"), "{e}");
        let e = Limits {
            qps_per_path: 65,
            ..Limits::default()
        }
        .check("agent a")
        .unwrap_err();
        assert!(e.to_string().contains("limits.qps_per_path"), "{e}");
    }
}
