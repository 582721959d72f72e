//! Memory-region access rights (`IBV_ACCESS_*`).

use std::fmt;

use serde::Serialize;

/// What a memory region lets the NIC do. Local read is always allowed, as in verbs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub struct MrAccess(u32);

impl MrAccess {
    pub const NONE: MrAccess = MrAccess(0);
    /// The NIC may write the region for the local side (RECV targets, RDMA READ responses).
    pub const LOCAL_WRITE: MrAccess = MrAccess(1);
    /// Peers may RDMA WRITE into the region (needs `LOCAL_WRITE`, as verbs requires).
    pub const REMOTE_WRITE: MrAccess = MrAccess(1 << 1);
    /// Peers may RDMA READ the region.
    pub const REMOTE_READ: MrAccess = MrAccess(1 << 2);
    pub const ALL: MrAccess = MrAccess(0b111);

    pub const fn bits(self) -> u32 {
        self.0
    }

    /// From [`bits`](Self::bits) (e.g. received from a peer); `None` when unknown bits are set.
    pub const fn from_bits(bits: u32) -> Option<MrAccess> {
        if bits & !MrAccess::ALL.0 == 0 {
            Some(MrAccess(bits))
        } else {
            None
        }
    }

    pub const fn contains(self, other: MrAccess) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn union(self, other: MrAccess) -> MrAccess {
        MrAccess(self.0 | other.0)
    }

    /// The rights in `other` that `self` lacks.
    pub const fn missing(self, other: MrAccess) -> MrAccess {
        MrAccess(other.0 & !self.0)
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Verbs rejects remote write without local write (EINVAL); so do we.
    pub fn validate(self) -> Result<(), &'static str> {
        if self.contains(MrAccess::REMOTE_WRITE) && !self.contains(MrAccess::LOCAL_WRITE) {
            return Err("REMOTE_WRITE requires LOCAL_WRITE");
        }
        if self.0 & !MrAccess::ALL.0 != 0 {
            return Err("unknown access bits");
        }
        Ok(())
    }

    /// The core access an exporter must grant for these rights.
    pub fn needs(self) -> dmaplane_core::Access {
        let mut a = dmaplane_core::Access::READ;
        if self.contains(MrAccess::LOCAL_WRITE) || self.contains(MrAccess::REMOTE_WRITE) {
            a = dmaplane_core::Access::READ_WRITE;
        }
        a
    }
}

impl std::ops::BitOr for MrAccess {
    type Output = MrAccess;
    fn bitor(self, rhs: MrAccess) -> MrAccess {
        self.union(rhs)
    }
}

impl fmt::Display for MrAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.contains(MrAccess::LOCAL_WRITE) {
            parts.push("local-write");
        }
        if self.contains(MrAccess::REMOTE_WRITE) {
            parts.push("remote-write");
        }
        if self.contains(MrAccess::REMOTE_READ) {
            parts.push("remote-read");
        }
        if parts.is_empty() {
            f.write_str("local-read-only")
        } else {
            f.write_str(&parts.join("|"))
        }
    }
}

impl fmt::Debug for MrAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MrAccess({self})")
    }
}
