//! [`TopologyBuilder`]: nodes collected and validated into a [`Topology`], by the same rules
//! whether they came from a file, the built-in examples or hwloc.

use std::collections::HashMap;

use super::error::{TopologyError, TopologyErrorKind, list_ids};
use super::{
    Bar, Device, DeviceKind, DeviceSpec, HostBridge, NodeRef, RootPort, SourceLine, Switch,
    Topology,
};

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

    fn at(&self, line: Option<usize>) -> SourceLine {
        SourceLine {
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
