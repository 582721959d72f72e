//! Memory-region access rights (`IBV_ACCESS_*`).

use std::fmt;

use serde::Serialize;

bitflags::bitflags! {
    /// What a memory region lets the NIC do. Local read is always allowed, as in verbs.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MrAccess: u32 {
        /// The NIC may write the region for the local side (RECV targets, RDMA READ responses).
        const LOCAL_WRITE = 1;
        /// Peers may RDMA WRITE into the region (needs `LOCAL_WRITE`, as verbs requires).
        const REMOTE_WRITE = 1 << 1;
        /// Peers may RDMA READ the region.
        const REMOTE_READ = 1 << 2;
        const ALL = Self::LOCAL_WRITE.bits() | Self::REMOTE_WRITE.bits() | Self::REMOTE_READ.bits();
    }
}

/// On the wire (metadata, leases) it is its bits, a number.
impl Serialize for MrAccess {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.bits())
    }
}

impl MrAccess {
    pub const NONE: MrAccess = MrAccess::empty();

    /// The rights in `other` that `self` lacks.
    pub const fn missing(self, other: MrAccess) -> MrAccess {
        other.difference(self)
    }

    /// Verbs rejects remote write without local write (EINVAL); so do we.
    pub fn validate(self) -> Result<(), &'static str> {
        if self.contains(MrAccess::REMOTE_WRITE) && !self.contains(MrAccess::LOCAL_WRITE) {
            return Err("REMOTE_WRITE requires LOCAL_WRITE");
        }
        if self.bits() & !MrAccess::ALL.bits() != 0 {
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
