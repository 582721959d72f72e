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

pub mod builtin;
#[cfg(feature = "hwloc")]
pub mod discover;
pub mod load;
pub mod sysfs;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::hints::Route;

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
pub struct Location {
    pub file: String,
    pub line: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.file),
            None => f.write_str(&self.file),
        }
    }
}

/// An error building, loading or querying a topology; see [`TopologyErrorKind`]. Boxed so
/// `Result<Topology, TopologyError>` stays one pointer wide on the error side.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct TopologyError(Box<TopologyErrorKind>);

impl TopologyError {
    pub fn kind(&self) -> &TopologyErrorKind {
        &self.0
    }
}

impl From<TopologyErrorKind> for TopologyError {
    fn from(kind: TopologyErrorKind) -> Self {
        TopologyError(Box::new(kind))
    }
}

/// Everything that can go wrong building, loading or querying a topology. Messages name the
/// file, the line, the item and the field, so a user can fix a hand-written file at once.
#[derive(Debug, thiserror::Error)]
pub enum TopologyErrorKind {
    #[error("{}: cannot read topology: {err}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    /// TOML syntax, wrong value types, unknown or missing fields (from the toml parser).
    #[error("{file}:{line}:{col}: {message}")]
    Toml {
        file: String,
        line: usize,
        col: usize,
        message: String,
    },
    #[error(
        "{at}: {item} \"{id}\" field parent: unknown parent \"{parent}\" (known {expected}: {known})"
    )]
    UnknownParent {
        at: Location,
        item: &'static str,
        id: String,
        parent: String,
        expected: &'static str,
        known: String,
    },
    #[error("{at}: {item} field parent: \"{parent}\" is a {parent_kind}; {rule}")]
    WrongParentKind {
        at: Location,
        item: String,
        id: String,
        parent: String,
        parent_kind: &'static str,
        rule: &'static str,
    },
    #[error("{at}: {item} field id: duplicate id \"{id}\" (first defined {first})")]
    DuplicateId {
        at: Location,
        item: &'static str,
        id: String,
        first: String,
    },
    #[error(
        "{at}: switch \"{}\" field parent: cycle among switches: {}",
        ids.first().map(String::as_str).unwrap_or(""),
        cycle_text(ids)
    )]
    Cycle { at: Location, ids: Vec<String> },
    #[error("{at}: {item} \"{id}\" field {field}: bad size \"{value}\": {reason}")]
    BadSize {
        at: Location,
        item: &'static str,
        id: String,
        field: String,
        value: String,
        reason: String,
    },
    #[error(
        "{at}: device \"{id}\" field kind: unknown kind \"{value}\" (expected one of: gpu, nic, nvme, host-memory)"
    )]
    UnknownKind {
        at: Location,
        id: String,
        value: String,
    },
    /// Any other bad value (BAR index, id syntax, a field that does not fit the device kind).
    #[error("{at}: {item} \"{id}\" field {field}: bad value \"{value}\": {reason}")]
    Invalid {
        at: Location,
        item: &'static str,
        id: String,
        field: String,
        value: String,
        reason: String,
    },
    #[error("unknown device \"{id}\" in {file} (known devices: {known})")]
    UnknownDevice {
        file: String,
        id: String,
        known: String,
    },
    #[error("device \"{device}\" has no BAR {index} (its BARs: {bars})")]
    NoSuchBar {
        device: String,
        index: u8,
        bars: String,
    },
    #[error("topology discovery failed: {0}")]
    Discover(String),
}

fn cycle_text(ids: &[String]) -> String {
    let mut s = ids.join(" -> ");
    if let Some(first) = ids.first() {
        s.push_str(" -> ");
        s.push_str(first);
    }
    s
}

/// Joins ids for an error message, cut short so a discovered machine with hundreds of
/// devices still gives a readable line.
pub(crate) fn list_ids<'a>(ids: impl Iterator<Item = &'a str>) -> String {
    const MAX: usize = 16;
    let all: Vec<&str> = ids.collect();
    if all.is_empty() {
        return "none".to_string();
    }
    let mut s = all.iter().take(MAX).copied().collect::<Vec<_>>().join(", ");
    if all.len() > MAX {
        s.push_str(&format!(", ... ({} more)", all.len() - MAX));
    }
    s
}

/// Line numbers of an item's fields, when it came from a file (crate-internal).
#[derive(Debug, Clone, Default)]
pub(crate) struct Lines {
    pub(crate) id: Option<usize>,
    pub(crate) parent: Option<usize>,
    pub(crate) size: Option<usize>,
    pub(crate) bars: Option<usize>,
    pub(crate) pci: Option<usize>,
    /// One entry per BAR, in the order given.
    pub(crate) bar: Vec<Option<usize>>,
}

/// Collects nodes and validates them into a [`Topology`]; the TOML loader and hwloc discovery
/// both go through it, so every topology obeys the same rules.
#[derive(Debug, Clone)]
pub struct TopologyBuilder {
    source: String,
    host_bridges: Vec<(HostBridge, Lines)>,
    root_ports: Vec<(RootPort, Lines)>,
    switches: Vec<(Switch, Lines)>,
    devices: Vec<(DeviceSpec, Lines)>,
}

impl TopologyBuilder {
    /// `source` names where the topology came from; it prefixes every error message.
    pub fn new(source: impl Into<String>) -> Self {
        TopologyBuilder {
            source: source.into(),
            host_bridges: Vec::new(),
            root_ports: Vec::new(),
            switches: Vec::new(),
            devices: Vec::new(),
        }
    }

    pub fn host_bridge(
        &mut self,
        id: impl Into<String>,
        numa: u32,
        p2p_allowed: bool,
    ) -> &mut Self {
        let hb = HostBridge {
            id: id.into(),
            numa,
            p2p_allowed,
        };
        self.host_bridges.push((hb, Lines::default()));
        self
    }

    pub fn root_port(&mut self, id: impl Into<String>, parent: impl Into<String>) -> &mut Self {
        let rp = RootPort {
            id: id.into(),
            parent: parent.into(),
        };
        self.root_ports.push((rp, Lines::default()));
        self
    }

    pub fn switch(&mut self, id: impl Into<String>, parent: impl Into<String>) -> &mut Self {
        let sw = Switch {
            id: id.into(),
            parent: parent.into(),
        };
        self.switches.push((sw, Lines::default()));
        self
    }

    pub fn device(&mut self, spec: DeviceSpec) -> &mut Self {
        self.devices.push((spec, Lines::default()));
        self
    }

    pub(crate) fn push_host_bridge(&mut self, hb: HostBridge, lines: Lines) {
        self.host_bridges.push((hb, lines));
    }
    pub(crate) fn push_root_port(&mut self, rp: RootPort, lines: Lines) {
        self.root_ports.push((rp, lines));
    }
    pub(crate) fn push_switch(&mut self, sw: Switch, lines: Lines) {
        self.switches.push((sw, lines));
    }
    pub(crate) fn push_device(&mut self, d: DeviceSpec, lines: Lines) {
        self.devices.push((d, lines));
    }

    fn at(&self, line: Option<usize>) -> Location {
        Location {
            file: self.source.clone(),
            line,
        }
    }

    /// Validates ids, parents, BARs and the absence of cycles, and precomputes each device's
    /// ancestor chain so [`Topology::route`] is a short walk.
    pub fn build(&self) -> Result<Topology, TopologyError> {
        let mut index: HashMap<String, (NodeRef, Option<usize>)> = HashMap::new();
        let ids = self
            .host_bridges
            .iter()
            .enumerate()
            .map(|(i, (n, l))| (NodeRef::HostBridge(i), "host bridge", n.id.as_str(), l))
            .chain(
                self.root_ports
                    .iter()
                    .enumerate()
                    .map(|(i, (n, l))| (NodeRef::RootPort(i), "root port", n.id.as_str(), l)),
            )
            .chain(
                self.switches
                    .iter()
                    .enumerate()
                    .map(|(i, (n, l))| (NodeRef::Switch(i), "switch", n.id.as_str(), l)),
            )
            .chain(
                self.devices
                    .iter()
                    .enumerate()
                    .map(|(i, (n, l))| (NodeRef::Device(i), "device", n.id.as_str(), l)),
            );
        for (node, item, id, lines) in ids {
            if let Some(reason) = bad_id(id) {
                return Err(TopologyErrorKind::Invalid {
                    at: self.at(lines.id),
                    item,
                    id: id.to_string(),
                    field: "id".to_string(),
                    value: id.to_string(),
                    reason: reason.to_string(),
                }
                .into());
            }
            if let Some((first_node, first)) = index.get(id) {
                return Err(TopologyErrorKind::DuplicateId {
                    at: self.at(lines.id),
                    item,
                    id: id.to_string(),
                    first: match first {
                        Some(l) => format!("at line {l}, as a {}", first_node.kind_name()),
                        None => format!("earlier, as a {}", first_node.kind_name()),
                    },
                }
                .into());
            }
            index.insert(id.to_string(), (node, lines.id));
        }
        let lookup = |id: &str| index.get(id).map(|(n, _)| *n);

        let known = |pred: fn(NodeRef) -> bool| {
            let mut v: Vec<(usize, &str)> = index
                .iter()
                .filter(|(_, (n, _))| pred(*n))
                .map(|(id, (n, _))| (order_key(*n, self), id.as_str()))
                .collect();
            v.sort();
            list_ids(v.into_iter().map(|(_, id)| id))
        };

        // Root ports: parent must be a host bridge.
        let mut rp_parent = Vec::with_capacity(self.root_ports.len());
        for (rp, lines) in &self.root_ports {
            match lookup(&rp.parent) {
                Some(NodeRef::HostBridge(h)) => rp_parent.push(h),
                Some(other) => {
                    return Err(TopologyErrorKind::WrongParentKind {
                        at: self.at(lines.parent),
                        item: format!("root port \"{}\"", rp.id),
                        id: rp.id.clone(),
                        parent: rp.parent.clone(),
                        parent_kind: other.kind_name(),
                        rule: "a root port's parent must be a host bridge",
                    }
                    .into());
                }
                None => {
                    return Err(TopologyErrorKind::UnknownParent {
                        at: self.at(lines.parent),
                        item: "root port",
                        id: rp.id.clone(),
                        parent: rp.parent.clone(),
                        expected: "host bridges",
                        known: known(|n| matches!(n, NodeRef::HostBridge(_))),
                    }
                    .into());
                }
            }
        }

        let under_port = |n: NodeRef| matches!(n, NodeRef::Switch(_) | NodeRef::RootPort(_));

        // Switches: parent is a root port or a switch.
        let mut sw_parent = Vec::with_capacity(self.switches.len());
        for (sw, lines) in &self.switches {
            match lookup(&sw.parent) {
                Some(n @ (NodeRef::Switch(_) | NodeRef::RootPort(_))) => sw_parent.push(n),
                Some(other) => {
                    return Err(TopologyErrorKind::WrongParentKind {
                        at: self.at(lines.parent),
                        item: format!("switch \"{}\"", sw.id),
                        id: sw.id.clone(),
                        parent: sw.parent.clone(),
                        parent_kind: other.kind_name(),
                        rule: "a switch's parent must be a root port or another switch",
                    }
                    .into());
                }
                None => {
                    return Err(TopologyErrorKind::UnknownParent {
                        at: self.at(lines.parent),
                        item: "switch",
                        id: sw.id.clone(),
                        parent: sw.parent.clone(),
                        expected: "switches and root ports",
                        known: known(under_port),
                    }
                    .into());
                }
            }
        }
        self.check_switch_cycles(&sw_parent)?;

        // Devices.
        let mut devices = Vec::with_capacity(self.devices.len());
        let mut chains = Vec::with_capacity(self.devices.len());
        for (d, lines) in &self.devices {
            let host_memory = d.kind == DeviceKind::HostMemory;
            let parent = match (host_memory, lookup(&d.parent)) {
                (true, Some(p @ NodeRef::HostBridge(_)))
                | (false, Some(p @ (NodeRef::Switch(_) | NodeRef::RootPort(_)))) => p,
                (_, Some(other)) => {
                    return Err(TopologyErrorKind::WrongParentKind {
                        at: self.at(lines.parent),
                        item: format!("{} device \"{}\"", d.kind, d.id),
                        id: d.id.clone(),
                        parent: d.parent.clone(),
                        parent_kind: other.kind_name(),
                        rule: if host_memory {
                            "host-memory devices attach directly to a host bridge"
                        } else {
                            "a gpu, nic or nvme device sits under a switch or a root port \
                             (only host-memory devices attach to a host bridge)"
                        },
                    }
                    .into());
                }
                (_, None) => {
                    return Err(TopologyErrorKind::UnknownParent {
                        at: self.at(lines.parent),
                        item: "device",
                        id: d.id.clone(),
                        parent: d.parent.clone(),
                        expected: if host_memory {
                            "host bridges"
                        } else {
                            "switches and root ports"
                        },
                        known: if host_memory {
                            known(|n| matches!(n, NodeRef::HostBridge(_)))
                        } else {
                            known(under_port)
                        },
                    }
                    .into());
                }
            };
            let chain = ancestor_chain(parent, &rp_parent, &sw_parent);
            let Some(&NodeRef::HostBridge(hb)) = chain.last() else {
                return Err(TopologyErrorKind::Discover(format!(
                    "internal: device {} has no host bridge above it",
                    d.id
                ))
                .into());
            };
            let hb_numa = self.host_bridges.get(hb).map_or(0, |(h, _)| h.numa);
            let bars = self.check_bars(d, lines)?;
            if let Some(pci) = d.pci.as_deref().filter(|p| !is_pci_addr(p)) {
                return Err(self.invalid(
                    lines.pci.or(lines.id),
                    &d.id,
                    "pci",
                    pci,
                    "expected a PCI address like \"0000:3b:00.0\" (domain:bus:device.function, hex)",
                ));
            }
            if d.size.is_some() && !host_memory {
                return Err(self.invalid(
                    lines.size.or(lines.id),
                    &d.id,
                    "size",
                    &d.size.map(|s| s.to_string()).unwrap_or_default(),
                    "only host-memory devices have a size; describe device memory with bars",
                ));
            }
            if d.size == Some(0) {
                return Err(TopologyErrorKind::BadSize {
                    at: self.at(lines.size.or(lines.id)),
                    item: "device",
                    id: d.id.clone(),
                    field: "size".to_string(),
                    value: "0".to_string(),
                    reason: "size must be greater than zero".to_string(),
                }
                .into());
            }
            devices.push(Device {
                id: d.id.clone(),
                kind: d.kind,
                parent: d.parent.clone(),
                bars,
                size: d.size,
                numa: d.numa.unwrap_or(hb_numa),
                numa_explicit: d.numa.is_some(),
                pci: d.pci.clone(),
            });
            chains.push(chain);
        }

        let topo = Topology {
            source: self.source.clone(),
            host_bridges: self.host_bridges.iter().map(|(h, _)| h.clone()).collect(),
            root_ports: self.root_ports.iter().map(|(r, _)| r.clone()).collect(),
            switches: self.switches.iter().map(|(s, _)| s.clone()).collect(),
            devices,
            index: index.into_iter().map(|(k, (n, _))| (k, n)).collect(),
            chains,
        };
        tracing::debug!(
            source = %topo.source,
            host_bridges = topo.host_bridges.len(),
            root_ports = topo.root_ports.len(),
            switches = topo.switches.len(),
            devices = topo.devices.len(),
            "topology built"
        );
        Ok(topo)
    }

    fn invalid(
        &self,
        line: Option<usize>,
        id: &str,
        field: &str,
        value: &str,
        reason: &str,
    ) -> TopologyError {
        TopologyErrorKind::Invalid {
            at: self.at(line),
            item: "device",
            id: id.to_string(),
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        }
        .into()
    }

    fn check_bars(&self, d: &DeviceSpec, lines: &Lines) -> Result<Vec<Bar>, TopologyError> {
        if d.kind == DeviceKind::HostMemory && !d.bars.is_empty() {
            return Err(self.invalid(
                lines.bars.or(lines.id),
                &d.id,
                "bars",
                &format!("{} BARs", d.bars.len()),
                "host-memory devices have no BARs; give their size with `size`",
            ));
        }
        let mut bars = d.bars.clone();
        for (i, bar) in d.bars.iter().enumerate() {
            let line = lines.bar.get(i).copied().flatten().or(lines.id);
            if bar.index > 5 {
                return Err(self.invalid(
                    line,
                    &d.id,
                    &format!("bars[{i}].index"),
                    &bar.index.to_string(),
                    "a PCI device has BARs 0 to 5",
                ));
            }
            if let Err(reason) = check_bar_size(bar.size) {
                return Err(TopologyErrorKind::BadSize {
                    at: self.at(line),
                    item: "device",
                    id: d.id.clone(),
                    field: format!("bars[{i}].size"),
                    value: bar.size.to_string(),
                    reason: reason.to_string(),
                }
                .into());
            }
            if d.bars[..i].iter().any(|b| b.index == bar.index) {
                return Err(self.invalid(
                    line,
                    &d.id,
                    &format!("bars[{i}].index"),
                    &bar.index.to_string(),
                    "BAR index listed twice",
                ));
            }
        }
        bars.sort_by_key(|b| b.index);
        Ok(bars)
    }

    /// Switch parents form a forest only if following them always reaches a root port.
    fn check_switch_cycles(&self, sw_parent: &[NodeRef]) -> Result<(), TopologyError> {
        // 0 = unvisited, 1 = on the current path, 2 = known to reach a root port.
        let mut state = vec![0u8; sw_parent.len()];
        for start in 0..sw_parent.len() {
            let mut path: Vec<usize> = Vec::new();
            let mut cur = start;
            loop {
                match state.get(cur).copied().unwrap_or(2) {
                    2 => break,
                    1 => {
                        let pos = path.iter().position(|&s| s == cur).unwrap_or(0);
                        let mut cycle: Vec<usize> = path[pos..].to_vec();
                        // Start the report at the switch defined first in the file.
                        if let Some(min_pos) = cycle
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, s)| **s)
                            .map(|(p, _)| p)
                        {
                            cycle.rotate_left(min_pos);
                        }
                        let first = cycle.first().copied().unwrap_or(cur);
                        let line = self.switches.get(first).and_then(|(_, l)| l.parent);
                        return Err(TopologyErrorKind::Cycle {
                            at: self.at(line),
                            ids: cycle
                                .iter()
                                .filter_map(|&s| self.switches.get(s).map(|(sw, _)| sw.id.clone()))
                                .collect(),
                        }
                        .into());
                    }
                    _ => {}
                }
                state[cur] = 1;
                path.push(cur);
                match sw_parent.get(cur) {
                    Some(NodeRef::Switch(p)) => cur = *p,
                    _ => break,
                }
            }
            for s in path {
                state[s] = 2;
            }
        }
        Ok(())
    }
}

/// Position of a node in definition order, for stable listings.
fn order_key(n: NodeRef, b: &TopologyBuilder) -> usize {
    match n {
        NodeRef::HostBridge(i) => i,
        NodeRef::RootPort(i) => b.host_bridges.len() + i,
        NodeRef::Switch(i) => b.host_bridges.len() + b.root_ports.len() + i,
        NodeRef::Device(i) => b.host_bridges.len() + b.root_ports.len() + b.switches.len() + i,
    }
}

/// `dddd:bb:dd.f` in hex, as Linux names PCI functions in sysfs.
pub(crate) fn is_pci_addr(s: &str) -> bool {
    let hex = |p: &str, n: usize| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit());
    let mut parts = s.split(':');
    let (Some(dom), Some(bus), Some(df), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Some((dev, func)) = df.split_once('.') else {
        return false;
    };
    hex(dom, 4) && hex(bus, 2) && hex(dev, 2) && hex(func, 1)
}

/// Ids are printed in quotes and used as table keys: no whitespace or control characters.
fn bad_id(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        Some("ids must not be empty")
    } else if id
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '"')
    {
        Some("ids must not contain whitespace, control characters or quotes")
    } else {
        None
    }
}

pub(crate) fn check_bar_size(size: u64) -> Result<(), &'static str> {
    if size == 0 {
        Err("size must be greater than zero")
    } else if !size.is_power_of_two() {
        Err("PCI BAR sizes are powers of two")
    } else {
        Ok(())
    }
}

/// Parent, grandparent, ... up to and including the host bridge. Needs acyclic switches.
fn ancestor_chain(parent: NodeRef, rp_parent: &[usize], sw_parent: &[NodeRef]) -> Vec<NodeRef> {
    let mut chain = Vec::new();
    let mut cur = parent;
    // Bounded by the number of nodes, so a bug can never loop forever.
    for _ in 0..=(rp_parent.len() + sw_parent.len() + 1) {
        chain.push(cur);
        cur = match cur {
            NodeRef::Switch(s) => match sw_parent.get(s) {
                Some(p) => *p,
                None => break,
            },
            NodeRef::RootPort(r) => match rp_parent.get(r) {
                Some(h) => NodeRef::HostBridge(*h),
                None => break,
            },
            NodeRef::HostBridge(_) | NodeRef::Device(_) => break,
        };
    }
    chain
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
