//! How an address list may be accessed: the attributes the kernel's `phys_vec` lacks.
//!
//! The DMA-buf maintainer's objection to raw physical addresses was that they miss "which bus
//! they belong to and details how the access should be made (e.g. snoop vs no-snoop)". These
//! types carry exactly that, next to every [`crate::AddrList`].

use std::fmt;

use serde::{Deserialize, Serialize};

/// Whether the bytes are ordinary memory or device MMIO (`DMA_ATTR_MMIO`: never cached by the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemKind {
    Memory,
    Mmio,
}

/// CPU cache attribute a mapping of the range must use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Caching {
    WriteBack,
    WriteCombining,
    Uncached,
}

/// Whether DMA to the range must snoop CPU caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Snoop {
    Snoop,
    NoSnoop,
}

/// Confidential-computing attribute: shared (decrypted, `DMA_ATTR_CC_SHARED`) or private.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Confidentiality {
    Shared,
    Private,
}

/// The PCIe path between an exporter's memory and an importer, as the kernel's
/// `pci_p2pdma_map_type` classifies it (plus `Local` for ordinary DMA to system memory or a
/// device's own memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    /// Same device, or system memory reached by ordinary DMA.
    Local,
    /// Both below a common switch (or root port): program PCI bus addresses.
    BusAddr,
    /// Different root ports under one allow-listed host bridge: CPU physical / IOVA addresses.
    ThruHostBridge,
    /// No P2P path: the data must bounce through host memory.
    NotSupported,
}

impl Route {
    /// Whether peer-to-peer DMA can take this route (no bounce buffer).
    pub fn is_p2p_capable(self) -> bool {
        !matches!(self, Route::NotSupported)
    }

    /// Short name used in tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::BusAddr => "bus-addr",
            Route::ThruHostBridge => "thru-host-bridge",
            Route::NotSupported => "not-supported",
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

bitflags::bitflags! {
    /// Access rights (read = the device may read the memory, write = may write it).
    ///
    /// On the wire (metadata, hints) it is its bits, a number; unknown bits are refused.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Access: u8 {
        const READ = 1;
        const WRITE = 1 << 1;
        const READ_WRITE = Self::READ.bits() | Self::WRITE.bits();
    }
}

impl Access {
    pub const NONE: Access = Access::empty();

    /// The rights in `other` that `self` lacks.
    pub const fn missing(self, other: Access) -> Access {
        other.difference(self)
    }
}

impl Serialize for Access {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.bits())
    }
}

impl<'de> Deserialize<'de> for Access {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Access, D::Error> {
        let bits = u8::deserialize(d)?;
        Access::from_bits(bits).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "access bits {bits:#x}: only read (1) and write (2) exist"
            ))
        })
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self.bits() & 3 {
            0 => "none",
            1 => "read",
            2 => "write",
            _ => "read-write",
        };
        f.write_str(s)
    }
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Access({self})")
    }
}

/// Everything an importer must know about how to access an address list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hints {
    pub mem: MemKind,
    pub caching: Caching,
    pub snoop: Snoop,
    pub confidentiality: Confidentiality,
    pub route: Route,
    pub relaxed_ordering: bool,
    /// What the exporter grants.
    pub access: Access,
}

impl Hints {
    /// Ordinary cacheable system memory, read-write, reached by plain DMA.
    pub const HOST_MEMORY: Hints = Hints {
        mem: MemKind::Memory,
        caching: Caching::WriteBack,
        snoop: Snoop::Snoop,
        confidentiality: Confidentiality::Shared,
        route: Route::Local,
        relaxed_ordering: false,
        access: Access::READ_WRITE,
    };

    /// A device BAR reached peer to peer: MMIO, write-combining, no-snoop.
    pub const fn device_bar(route: Route) -> Hints {
        Hints {
            mem: MemKind::Mmio,
            caching: Caching::WriteCombining,
            snoop: Snoop::NoSnoop,
            confidentiality: Confidentiality::Shared,
            route,
            relaxed_ordering: true,
            access: Access::READ_WRITE,
        }
    }

    pub const fn with_access(mut self, access: Access) -> Hints {
        self.access = access;
        self
    }

    pub const fn with_route(mut self, route: Route) -> Hints {
        self.route = route;
        self
    }
}

impl Default for Hints {
    fn default() -> Self {
        Hints::HOST_MEMORY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_set_operations() {
        assert!(Access::READ_WRITE.contains(Access::READ));
        assert!(!Access::READ.contains(Access::WRITE));
        assert_eq!(Access::READ.missing(Access::READ_WRITE), Access::WRITE);
        assert_eq!((Access::READ | Access::WRITE), Access::READ_WRITE);
        assert_eq!(Access::WRITE.to_string(), "write");
    }

    #[test]
    fn access_is_its_bits_on_the_wire_and_unknown_bits_are_refused() {
        assert_eq!(serde_json::to_string(&Access::READ_WRITE).unwrap(), "3");
        assert_eq!(serde_json::from_str::<Access>("2").unwrap(), Access::WRITE);
        let e = serde_json::from_str::<Access>("5").unwrap_err().to_string();
        assert!(e.contains("access bits 0x5"), "{e}");
    }
}
