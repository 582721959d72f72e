//! Discover this machine's PCI tree and NUMA nodes with hwloc (feature `hwloc`).
//!
//! Mapping from hwloc's I/O tree to the model:
//!
//! - a hwloc **host bridge** (bridge with a host upstream side) → [`HostBridge`](super::HostBridge), id
//!   `pciDDDD:BB` as Linux names root buses; NUMA node = the first node of its first non-I/O
//!   ancestor (0 when hwloc does not know);
//! - a **PCI bridge** directly below a host bridge → root port; a PCI bridge below another PCI
//!   bridge → switch (a PCIe switch shows up as an upstream port with one bridge per downstream
//!   port, which the model's chained switches mirror exactly). Ids are the bridges' PCI addresses;
//! - a **PCI device** → a device when its class is one we move data with:
//!   `0x03xx` display/3D and `0x1200` processing accelerator → `gpu` (except emulated display
//!   adapters of virtual machines, which have no device memory worth a P2P path);
//!   `0x02xx` network, including `0x0207` InfiniBand → `nic`; `0x0108` NVM Express → `nvme`.
//!   Everything else (USB, SATA, audio, ...) is skipped. Ids are `gpu0`, `nic0`, ... in PCI
//!   order; `pci` keeps the real address;
//! - a device on the root bus itself (a root-complex integrated endpoint, common in virtual
//!   machines) gets a synthetic root port `rc:<address>` of its own: the kernel finds no upstream
//!   bridge for it, so it shares no switch with anything, which is what a private root port gives;
//! - BAR sizes come from `/sys/bus/pci/devices/<address>/resource` (hwloc does not report them):
//!   memory BARs 0..=5 only; a missing or unreadable file gives no BARs;
//! - one `host-memory` device `memN` per NUMA node, with hwloc's local memory size, under the
//!   first host bridge of that node (or a synthetic `numaN` bridge when the node has none).
//!
//! Bridges with no device of interest below them are left out.

pub use super::sysfs::parse_resource;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hwlocality::object::TopologyObject;
use hwlocality::object::attributes::{
    DownstreamAttributes, ObjectAttributes, PCIDeviceAttributes, UpstreamAttributes,
};
use hwlocality::object::types::{BridgeType, ObjectType};
use hwlocality::topology::builder::TypeFilter;

use super::{
    Bar, DeviceKind, DeviceSpec, Topology, TopologyBuilder, TopologyError, TopologyErrorKind,
};

/// What discovery may assume where hwloc cannot know.
#[derive(Debug, Clone)]
pub struct DiscoverOptions {
    /// Mark every host bridge `p2p_allowed`. Off by default: whether a root complex may route
    /// peer to peer is decided by the kernel (an allow-list of Intel root complexes, plus all AMD
    /// Zen hosts) and hwloc reports neither that list nor its verdict, so the safe answer is
    /// "not allowed" (bounce). Turn it on when the kernel is known to allow it on this host.
    pub assume_p2p_allowed: bool,
    /// Root of sysfs, read for BAR sizes. `/sys` unless testing.
    pub sysfs: PathBuf,
}

impl Default for DiscoverOptions {
    fn default() -> Self {
        DiscoverOptions {
            assume_p2p_allowed: false,
            sysfs: PathBuf::from("/sys"),
        }
    }
}

/// Source name of discovered topologies in messages and dumps.
pub const DISCOVERED_SOURCE: &str = "hwloc discovery";

/// Discovers this machine with the default options.
pub fn discover() -> Result<Topology, TopologyError> {
    discover_with(&DiscoverOptions::default())
}

/// Discovers this machine.
pub fn discover_with(opts: &DiscoverOptions) -> Result<Topology, TopologyError> {
    let err = |what: &str, e: &dyn std::fmt::Display| -> TopologyError {
        TopologyErrorKind::Discover(format!("hwloc {what}: {e}")).into()
    };
    let hw = hwlocality::Topology::builder()
        .with_type_filter(ObjectType::Bridge, TypeFilter::KeepAll)
        .map_err(|e| err("bridge filter", &e))?
        .with_type_filter(ObjectType::PCIDevice, TypeFilter::KeepAll)
        .map_err(|e| err("PCI filter", &e))?
        .build()
        .map_err(|e| err("topology", &e))?;

    let mut w = Walk {
        opts,
        devices: Vec::new(),
        counters: BTreeMap::new(),
        kept_bridges: Vec::new(),
    };

    // Host bridges, in hwloc's (PCI) order.
    let mut bridges: Vec<(String, u32, bool)> = Vec::new(); // (id, numa, has devices)
    for obj in hw.objects_with_type(ObjectType::Bridge) {
        let Some(ObjectAttributes::Bridge(b)) = obj.attributes() else {
            continue;
        };
        if b.upstream_type() != BridgeType::Host {
            continue;
        }
        let id = match b.downstream_attributes() {
            Some(DownstreamAttributes::PCI(d)) => {
                format!("pci{:04x}:{:02x}", d.domain(), d.secondary_bus())
            }
            _ => format!("hostbridge{}", bridges.len()),
        };
        let numa = numa_of(obj);
        let before = w.device_count();
        for child in obj.io_children() {
            w.walk(child, &id, true);
        }
        let has_devices = w.device_count() > before;
        tracing::debug!(%id, numa, has_devices, "host bridge");
        bridges.push((id, numa, has_devices));
    }

    // One host-memory device per NUMA node, under the first host bridge of that node.
    let mut memory: Vec<(u32, Option<u64>, String)> = Vec::new();
    let mut synthetic: Vec<u32> = Vec::new();
    for node in hw.objects_with_type(ObjectType::NUMANode) {
        let numa = node
            .os_index()
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or(0);
        let size = match node.attributes() {
            Some(ObjectAttributes::NUMANode(a)) => a.local_memory().map(u64::from),
            _ => None,
        };
        let parent = match bridges.iter_mut().find(|(_, n, _)| *n == numa) {
            Some((id, _, has)) => {
                *has = true;
                id.clone()
            }
            None => {
                synthetic.push(numa);
                format!("numa{numa}")
            }
        };
        memory.push((numa, size, parent));
    }

    let mut b = TopologyBuilder::new(DISCOVERED_SOURCE);
    for (id, numa, has) in &bridges {
        if *has {
            b.host_bridge(id.clone(), *numa, opts.assume_p2p_allowed);
        }
    }
    for numa in synthetic {
        b.host_bridge(format!("numa{numa}"), numa, false);
    }
    for (id, parent, is_root_port) in &w.kept_bridges {
        if *is_root_port {
            b.root_port(id.clone(), parent.clone());
        } else {
            b.switch(id.clone(), parent.clone());
        }
    }
    for (numa, size, parent) in memory {
        let mut d = DeviceSpec::new(format!("mem{numa}"), DeviceKind::HostMemory, parent);
        d.size = size;
        b.device(d);
    }
    for d in w.devices {
        b.device(d);
    }
    let topo = b.build()?;
    tracing::debug!(devices = topo.devices().len(), "hwloc discovery done");
    Ok(topo)
}

struct Walk<'a> {
    opts: &'a DiscoverOptions,
    /// Devices of interest, in PCI order.
    devices: Vec<DeviceSpec>,
    counters: BTreeMap<DeviceKind, usize>,
    /// (id, parent, is root port) of every bridge that leads to a kept device, parents first.
    kept_bridges: Vec<(String, String, bool)>,
}

impl Walk<'_> {
    fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Walks one I/O object below `parent`; `under_host` says `parent` is a host bridge.
    /// Returns whether anything was kept below (so the caller keeps its bridge).
    fn walk(&mut self, obj: &TopologyObject, parent: &str, under_host: bool) -> bool {
        match obj.attributes() {
            Some(ObjectAttributes::Bridge(b)) => {
                let Some(UpstreamAttributes::PCI(pci)) = b.upstream_attributes() else {
                    return false;
                };
                let id = pci_addr(pci);
                // Reserve our place so parents come before children in the list.
                let slot = self.kept_bridges.len();
                self.kept_bridges
                    .push((id.clone(), parent.to_string(), under_host));
                let mut kept = false;
                for child in obj.io_children() {
                    kept |= self.walk(child, &id, false);
                }
                if !kept {
                    self.kept_bridges.truncate(slot);
                }
                kept
            }
            Some(ObjectAttributes::PCIDevice(pci)) => {
                let Some(kind) = kind_from_class(pci.class_id(), pci.vendor_id()) else {
                    tracing::debug!(pci = %pci_addr(pci), class = pci.class_id(), "skipped");
                    return false;
                };
                let addr = pci_addr(pci);
                let mut parent = parent.to_string();
                if under_host {
                    // Root-complex integrated endpoint: give it a private root port.
                    let rc = format!("rc:{addr}");
                    self.kept_bridges.push((rc.clone(), parent, true));
                    parent = rc;
                }
                let n = self.counters.entry(kind).or_insert(0);
                let id = format!("{kind}{n}");
                *n += 1;
                let path = self
                    .opts
                    .sysfs
                    .join("bus/pci/devices")
                    .join(&addr)
                    .join("resource");
                let mut spec = DeviceSpec::new(id, kind, parent).with_pci(addr);
                spec.bars = read_bars(&path);
                self.devices.push(spec);
                true
            }
            _ => false,
        }
    }
}

fn pci_addr(p: &PCIDeviceAttributes) -> String {
    format!(
        "{:04x}:{:02x}:{:02x}.{:x}",
        p.domain(),
        p.bus_id(),
        p.bus_device(),
        p.function()
    )
}

/// First NUMA node near an I/O object, 0 when hwloc does not know.
fn numa_of(obj: &TopologyObject) -> u32 {
    obj.first_non_io_ancestor()
        .and_then(|a| a.nodeset())
        .and_then(|ns| ns.first_set())
        .and_then(|i| u32::try_from(usize::from(i)).ok())
        .unwrap_or(0)
}

/// PCI vendors whose display adapters are emulated by a hypervisor (QEMU/Bochs, Cirrus, virtio,
/// VMware SVGA, Red Hat QEMU, Microsoft Hyper-V).
const EMULATED_DISPLAY_VENDORS: [u16; 6] = [0x1234, 0x1013, 0x1af4, 0x15ad, 0x1b36, 0x1414];

/// Device kind from the PCI class code (`class << 8 | subclass`), `None` for devices the data
/// path does not use.
pub fn kind_from_class(class_id: u16, vendor_id: u16) -> Option<DeviceKind> {
    match class_id >> 8 {
        0x03 if !EMULATED_DISPLAY_VENDORS.contains(&vendor_id) => Some(DeviceKind::Gpu),
        0x12 if class_id == 0x1200 => Some(DeviceKind::Gpu),
        0x02 => Some(DeviceKind::Nic),
        0x01 if class_id == 0x0108 => Some(DeviceKind::Nvme),
        _ => None,
    }
}

fn read_bars(path: &Path) -> Vec<Bar> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_resource(&text),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "no BAR sizes");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn discovers_this_machine() {
        let t = discover().unwrap();
        assert!(
            t.devices_of_kind(DeviceKind::HostMemory).count() >= 1,
            "{t:#?}"
        );
        // Every route is computable and symmetric on whatever this machine has.
        for (a, b, r) in t.route_matrix() {
            assert_eq!(t.route_by_id(b, a).unwrap(), r);
        }
        // A dump loads back.
        let back = Topology::from_toml_str(&t.to_toml(), "dump").unwrap();
        assert_eq!(back.devices(), t.devices());
        if std::env::var_os("DMAPLANE_SHOW_DISCOVERY").is_some() {
            eprintln!("{}", t.to_toml());
        }
    }

    #[test]
    fn assume_p2p_allowed_marks_bridges() {
        let t = discover_with(&DiscoverOptions {
            assume_p2p_allowed: true,
            ..DiscoverOptions::default()
        })
        .unwrap();
        for hb in t.host_bridges() {
            // Synthetic per-NUMA bridges hold only memory and stay closed.
            assert_eq!(hb.p2p_allowed, !hb.id.starts_with("numa"));
        }
    }

    #[test]
    fn classes() {
        assert_eq!(kind_from_class(0x0302, 0x10de), Some(DeviceKind::Gpu));
        assert_eq!(kind_from_class(0x0300, 0x1002), Some(DeviceKind::Gpu));
        assert_eq!(kind_from_class(0x0300, 0x1234), None);
        assert_eq!(kind_from_class(0x1200, 0x1da3), Some(DeviceKind::Gpu));
        assert_eq!(kind_from_class(0x0200, 0x15b3), Some(DeviceKind::Nic));
        assert_eq!(kind_from_class(0x0207, 0x15b3), Some(DeviceKind::Nic));
        assert_eq!(kind_from_class(0x0108, 0x144d), Some(DeviceKind::Nvme));
        assert_eq!(kind_from_class(0x0106, 0x8086), None);
        assert_eq!(kind_from_class(0x0c03, 0x8086), None);
    }

    #[test]
    fn resource_file() {
        // A GPU: BAR0 16 MiB, BAR1 64-bit 64 GiB prefetchable (slot 2 is its upper half),
        // BAR3 32 MiB, BAR5 an I/O port range, then the ROM line.
        let text = "\
0x00000000fa000000 0x00000000faffffff 0x0000000000040200
0x0000380000000000 0x0000380fffffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000381000000000 0x0000381001ffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x000000000000e000 0x000000000000e07f 0x0000000000040101
0x00000000fb000000 0x00000000fb07ffff 0x0000000000046200
";
        assert_eq!(
            parse_resource(text),
            vec![
                Bar {
                    index: 0,
                    size: 16 << 20
                },
                Bar {
                    index: 1,
                    size: 64 << 30
                },
                Bar {
                    index: 3,
                    size: 32 << 20
                },
            ]
        );
        assert!(parse_resource("").is_empty());
        assert!(parse_resource("garbage\n0x1 0x0 0x200\n0xffffffffffffffff").is_empty());
        assert!(parse_resource("0x0 0xffffffffffffffff 0x200").is_empty());
    }
}
