//! The PCIe topology model and P2P route classification.
//!
//! A machine is a forest: host bridges (one per root complex, with a NUMA node) own root
//! ports, root ports own switches (which can chain) or devices, and devices (GPU, NIC, NVMe)
//! sit below a switch or a root port. System memory is modelled as one `host-memory` device per
//! NUMA node, attached directly to a host bridge, so that "where does the bounce buffer live" is
//! a question the same model answers.
//!
//! [`Topology::route`] classifies the path between two devices the way the kernel's
//! `calc_map_type_and_dist()` (drivers/pci/p2pdma.c) does, so user space can predict what
//! `pci_p2pdma_map_type()` will say before it asks for a mapping.
//!
//! Topologies come from TOML ([`load`]), the built-in examples ([`builtin`]), a
//! [`TopologyBuilder`], or this machine through hwloc (`discover`, feature `hwloc`).

mod builder;
pub mod builtin;
#[cfg(feature = "hwloc")]
pub mod discover;
mod error;
pub mod load;
pub mod sysfs;

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::hints::Route;

pub use builder::TopologyBuilder;
pub(crate) use builder::{Lines, check_bar_size};
pub(crate) use error::list_ids;
pub use error::{TopologyError, TopologyErrorKind};
pub use load::{format_size, parse_size};

/// What a device is; decides where it may sit in the tree and how routes to it are classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    Gpu,
    Nic,
    Nvme,
    /// System memory of one NUMA node; reached by ordinary DMA, never peer to peer.
    HostMemory,
}

impl DeviceKind {
    pub const ALL: [DeviceKind; 4] = [
        DeviceKind::Gpu,
        DeviceKind::Nic,
        DeviceKind::Nvme,
        DeviceKind::HostMemory,
    ];

    /// The name used in TOML and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Gpu => "gpu",
            DeviceKind::Nic => "nic",
            DeviceKind::Nvme => "nvme",
            DeviceKind::HostMemory => "host-memory",
        }
    }

    /// Inverse of [`DeviceKind::as_str`].
    pub fn parse(s: &str) -> Option<DeviceKind> {
        DeviceKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A root complex. `p2p_allowed` mirrors the kernel's host-bridge allow-list: when false,
/// traffic between different root ports below it cannot go peer to peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostBridge {
    pub id: String,
    pub numa: u32,
    pub p2p_allowed: bool,
}

/// A PCIe root port; its parent is a host bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RootPort {
    pub id: String,
    pub parent: String,
}

/// A PCIe switch port (upstream or downstream); its parent is a root port or another switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Switch {
    pub id: String,
    pub parent: String,
}

/// One memory BAR of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Bar {
    /// 0..=5, the standard PCI BAR slots.
    pub index: u8,
    /// Bytes; always a power of two (PCI decodes BARs that way).
    pub size: u64,
}

/// A device of the model, validated and placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Device {
    pub id: String,
    pub kind: DeviceKind,
    /// A switch or root port; a host bridge for `host-memory`.
    pub parent: String,
    /// Sorted by index; empty for host memory.
    pub bars: Vec<Bar>,
    /// Bytes of memory, for `host-memory` only (optional there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The explicit `numa` if one was given, else the host bridge's.
    pub numa: u32,
    /// Whether `numa` was given explicitly (kept so a dump round-trips).
    #[serde(skip)]
    pub numa_explicit: bool,
    /// PCI address (`domain:bus:device.function`) of the real function, when known (discovered
    /// machines), so backends can find the matching verbs or CUDA device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci: Option<String>,
}

/// A device as handed to [`TopologyBuilder::device`]: like [`Device`] but `numa` is optional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub id: String,
    pub kind: DeviceKind,
    pub parent: String,
    pub bars: Vec<Bar>,
    pub size: Option<u64>,
    pub numa: Option<u32>,
    pub pci: Option<String>,
}

impl DeviceSpec {
    pub fn new(id: impl Into<String>, kind: DeviceKind, parent: impl Into<String>) -> Self {
        DeviceSpec {
            id: id.into(),
            kind,
            parent: parent.into(),
            bars: Vec::new(),
            size: None,
            numa: None,
            pci: None,
        }
    }

    pub fn with_bar(mut self, index: u8, size: u64) -> Self {
        self.bars.push(Bar { index, size });
        self
    }

    pub fn with_size(mut self, size: u64) -> Self {
        self.size = Some(size);
        self
    }

    pub fn with_numa(mut self, numa: u32) -> Self {
        self.numa = Some(numa);
        self
    }

    pub fn with_pci(mut self, pci: impl Into<String>) -> Self {
        self.pci = Some(pci.into());
        self
    }
}

/// Index of a device in one [`Topology`] (`devices()[id.index()]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceIndex(usize);

impl DeviceIndex {
    pub fn index(self) -> usize {
        self.0
    }
}

/// Any node of the tree, by kind and index into the matching slice of [`Topology`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeRef {
    HostBridge(usize),
    RootPort(usize),
    Switch(usize),
    Device(usize),
}

impl NodeRef {
    /// Human name of the node's kind ("host bridge", "root port", ...).
    pub fn kind_name(self) -> &'static str {
        match self {
            NodeRef::HostBridge(_) => "host bridge",
            NodeRef::RootPort(_) => "root port",
            NodeRef::Switch(_) => "switch",
            NodeRef::Device(_) => "device",
        }
    }
}

/// Where in which file an error was found (`file:line`, or just `file` when no line is known,
/// e.g. for topologies built in code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLine {
    pub file: String,
    pub line: Option<usize>,
}

impl fmt::Display for SourceLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.file),
            None => f.write_str(&self.file),
        }
    }
}

/// A validated machine: every parent exists and has the right kind, switches do not loop,
/// ids are unique across all node kinds.
#[derive(Debug, Clone)]
pub struct Topology {
    source: String,
    host_bridges: Vec<HostBridge>,
    root_ports: Vec<RootPort>,
    switches: Vec<Switch>,
    devices: Vec<Device>,
    index: HashMap<String, NodeRef>,
    /// Per device: ancestors from its parent up to its host bridge (inclusive).
    chains: Vec<Vec<NodeRef>>,
}

/// Dumps as `{source, host_bridges, root_ports, switches, devices}` (the lookup index and
/// the ancestor chains are derived, so they are left out).
impl Serialize for Topology {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut st = s.serialize_struct("Topology", 5)?;
        st.serialize_field("source", &self.source)?;
        st.serialize_field("host_bridges", &self.host_bridges)?;
        st.serialize_field("root_ports", &self.root_ports)?;
        st.serialize_field("switches", &self.switches)?;
        st.serialize_field("devices", &self.devices)?;
        st.end()
    }
}

impl Topology {
    pub fn builder(source: impl Into<String>) -> TopologyBuilder {
        TopologyBuilder::new(source)
    }

    /// Where the topology came from (file path, "built-in testbed", "hwloc discovery").
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn host_bridges(&self) -> &[HostBridge] {
        &self.host_bridges
    }

    pub fn root_ports(&self) -> &[RootPort] {
        &self.root_ports
    }

    pub fn switches(&self) -> &[Switch] {
        &self.switches
    }

    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    pub fn device_indices(&self) -> impl Iterator<Item = DeviceIndex> + '_ {
        (0..self.devices.len()).map(DeviceIndex)
    }

    /// Any node by id.
    pub fn node(&self, id: &str) -> Option<NodeRef> {
        self.index.get(id).copied()
    }

    /// The id of a node.
    pub fn node_id(&self, node: NodeRef) -> Option<&str> {
        match node {
            NodeRef::HostBridge(i) => self.host_bridges.get(i).map(|n| n.id.as_str()),
            NodeRef::RootPort(i) => self.root_ports.get(i).map(|n| n.id.as_str()),
            NodeRef::Switch(i) => self.switches.get(i).map(|n| n.id.as_str()),
            NodeRef::Device(i) => self.devices.get(i).map(|n| n.id.as_str()),
        }
    }

    /// Direct children of a node, in definition order (root ports, switches, then devices).
    pub fn children(&self, node: NodeRef) -> Vec<NodeRef> {
        let Some(id) = self.node_id(node) else {
            return Vec::new();
        };
        let rps = self
            .root_ports
            .iter()
            .enumerate()
            .filter(|(_, n)| n.parent == id)
            .map(|(i, _)| NodeRef::RootPort(i));
        let sws = self
            .switches
            .iter()
            .enumerate()
            .filter(|(_, n)| n.parent == id)
            .map(|(i, _)| NodeRef::Switch(i));
        let devs = self
            .devices
            .iter()
            .enumerate()
            .filter(|(_, n)| n.parent == id)
            .map(|(i, _)| NodeRef::Device(i));
        rps.chain(sws).chain(devs).collect()
    }

    /// A device's index by id; the error names the id and lists the known devices.
    pub fn device_index(&self, id: &str) -> Result<DeviceIndex, TopologyError> {
        match self.index.get(id) {
            Some(NodeRef::Device(i)) => Ok(DeviceIndex(*i)),
            _ => Err(TopologyErrorKind::UnknownDevice {
                file: self.source.clone(),
                id: id.to_string(),
                known: list_ids(self.devices.iter().map(|d| d.id.as_str())),
            }
            .into()),
        }
    }

    /// A device by id; the error names the id and lists the known devices.
    pub fn device(&self, id: &str) -> Result<&Device, TopologyError> {
        let d = self.device_index(id)?;
        self.devices.get(d.0).ok_or_else(|| {
            TopologyErrorKind::UnknownDevice {
                file: self.source.clone(),
                id: id.to_string(),
                known: list_ids(self.devices.iter().map(|d| d.id.as_str())),
            }
            .into()
        })
    }

    pub fn device_at(&self, id: DeviceIndex) -> Option<&Device> {
        self.devices.get(id.0)
    }

    pub fn devices_of_kind(&self, kind: DeviceKind) -> impl Iterator<Item = &Device> + '_ {
        self.devices.iter().filter(move |d| d.kind == kind)
    }

    /// The NUMA node a device is local to.
    pub fn numa_of(&self, id: &str) -> Result<u32, TopologyError> {
        Ok(self.device(id)?.numa)
    }

    /// Size of one BAR of a device; the error lists the BARs the device has.
    pub fn bar_size(&self, id: &str, bar_index: u8) -> Result<u64, TopologyError> {
        let d = self.device(id)?;
        d.bars
            .iter()
            .find(|b| b.index == bar_index)
            .map(|b| b.size)
            .ok_or_else(|| {
                TopologyErrorKind::NoSuchBar {
                    device: d.id.clone(),
                    index: bar_index,
                    bars: if d.bars.is_empty() {
                        "none".to_string()
                    } else {
                        d.bars
                            .iter()
                            .map(|b| format!("{} ({})", b.index, format_size(b.size)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                }
                .into()
            })
    }

    /// The host bridge above a device.
    pub fn host_bridge_of(&self, id: DeviceIndex) -> Option<&HostBridge> {
        match self.chains.get(id.0)?.last()? {
            NodeRef::HostBridge(h) => self.host_bridges.get(*h),
            _ => None,
        }
    }

    /// The host-memory device of a NUMA node (where to put a bounce buffer for a device).
    pub fn host_memory_for_numa(&self, numa: u32) -> Option<&Device> {
        self.devices_of_kind(DeviceKind::HostMemory)
            .find(|d| d.numa == numa)
    }

    /// The P2P route between two devices, by the kernel's rule (`calc_map_type_and_dist`):
    ///
    /// - the same device → `Local`;
    /// - either side host memory → `Local`: that is ordinary DMA to system memory, which every
    ///   device can do whatever the bridges say (this is the bounce path itself);
    /// - a switch or root port above both (the first common upstream bridge) → `BusAddr`:
    ///   traffic turns around below the root complex;
    /// - otherwise the same host bridge → `ThruHostBridge` if that bridge is allow-listed
    ///   (`p2p_allowed`), else `NotSupported`;
    /// - different host bridges → `NotSupported`. (The kernel also lets some CPUs, e.g. AMD Zen,
    ///   go between host bridges; say so with one host bridge per socket in the model.)
    ///
    /// Symmetric: `route(a, b) == route(b, a)`. ACS redirection, which makes the kernel send
    /// switch traffic up to the root complex, is not modelled. A `DeviceIndex` from another
    /// topology that is out of range gives `NotSupported`, the answer that can never corrupt
    /// memory.
    pub fn route(&self, a: DeviceIndex, b: DeviceIndex) -> Route {
        if a == b {
            return Route::Local;
        }
        let (Some(da), Some(db)) = (self.devices.get(a.0), self.devices.get(b.0)) else {
            return Route::NotSupported;
        };
        if da.kind == DeviceKind::HostMemory || db.kind == DeviceKind::HostMemory {
            return Route::Local;
        }
        let (Some(ca), Some(cb)) = (self.chains.get(a.0), self.chains.get(b.0)) else {
            return Route::NotSupported;
        };
        if ca
            .iter()
            .any(|n| matches!(n, NodeRef::Switch(_) | NodeRef::RootPort(_)) && cb.contains(n))
        {
            return Route::BusAddr;
        }
        match (ca.last(), cb.last()) {
            (Some(NodeRef::HostBridge(ha)), Some(NodeRef::HostBridge(hb))) if ha == hb => {
                match self.host_bridges.get(*ha) {
                    Some(h) if h.p2p_allowed => Route::ThruHostBridge,
                    _ => Route::NotSupported,
                }
            }
            _ => Route::NotSupported,
        }
    }

    /// [`Topology::route`] by device ids; unknown ids are an error naming them.
    pub fn route_by_id(&self, a: &str, b: &str) -> Result<Route, TopologyError> {
        Ok(self.route(self.device_index(a)?, self.device_index(b)?))
    }

    /// The route for every unordered pair of distinct devices, `(a, b)` with `a` defined
    /// before `b`. Routes are symmetric, so this is the whole matrix; the diagonal is `Local`.
    pub fn route_matrix(&self) -> Vec<(&str, &str, Route)> {
        let n = self.devices.len();
        let mut out = Vec::with_capacity(n * n.saturating_sub(1) / 2);
        for (i, da) in self.devices.iter().enumerate() {
            for (j, db) in self.devices.iter().enumerate().skip(i + 1) {
                out.push((
                    da.id.as_str(),
                    db.id.as_str(),
                    self.route(DeviceIndex(i), DeviceIndex(j)),
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
