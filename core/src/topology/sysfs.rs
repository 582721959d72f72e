//! What sysfs says about PCI functions that the model needs: their memory BARs (shared by
//! discovery, feature `hwloc`, and the backends that size a real device's BAR, CUDA's BAR1), and
//! where they sit — a [`Topology`] built from their `/sys/devices/pci…` paths, so that a tool
//! without hwloc (the doctor) asks [`Topology::route`] rather than a second copy of its rule.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{
    Bar, DeviceKind, DeviceSpec, Topology, TopologyBuilder, TopologyError, TopologyErrorKind,
};

/// Source name of topologies built from sysfs paths.
pub const SYSFS_SOURCE: &str = "sysfs PCI paths";

/// A PCI function to place: its id in the model, its kind, and its canonical sysfs path
/// (`/sys/devices/pci0000:00/0000:00:01.0/…/0000:3b:00.0`, as `canonicalize` of
/// `/sys/bus/pci/devices/<address>` gives it).
#[derive(Debug, Clone)]
pub struct PciFunction {
    pub id: String,
    pub kind: DeviceKind,
    pub path: PathBuf,
}

/// The model of the PCI tree above `functions`: one host bridge per `pciDDDD:BB` root (marked
/// `p2p_allowed` as given: sysfs does not say what the kernel's allow-list does), the bridge
/// right below it a root port, every bridge further down a switch, and the function a device
/// (a root-complex integrated endpoint gets a private root port, as in discovery). BARs are read
/// from each function's `resource` file when it is there.
pub fn from_pci_paths(
    functions: &[PciFunction],
    p2p_allowed: bool,
) -> Result<Topology, TopologyError> {
    let mut hosts: BTreeSet<String> = BTreeSet::new();
    let mut ports: Vec<(String, String)> = Vec::new();
    let mut switches: Vec<(String, String)> = Vec::new();
    let mut devices = Vec::new();
    for f in functions {
        let names: Vec<String> = f
            .path
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let Some(root) = names.iter().position(|n| n.starts_with("pci")) else {
            return Err(TopologyErrorKind::Discover(format!(
                "{}: {} is not below a PCI root (/sys/devices/pciDDDD:BB/...)",
                f.id,
                f.path.display()
            ))
            .into());
        };
        let below = &names[root + 1..];
        let Some((func, bridges)) = below.split_last() else {
            return Err(TopologyErrorKind::Discover(format!(
                "{}: {} names a PCI root, not a function",
                f.id,
                f.path.display()
            ))
            .into());
        };
        let host = names[root].clone();
        hosts.insert(host.clone());
        let mut parent = host;
        match bridges.split_first() {
            None => {
                let rc = format!("rc:{func}");
                push_new(&mut ports, &rc, &parent);
                parent = rc;
            }
            Some((port, rest)) => {
                push_new(&mut ports, port, &parent);
                parent = port.clone();
                for sw in rest {
                    push_new(&mut switches, sw, &parent);
                    parent = sw.clone();
                }
            }
        }
        let mut spec = DeviceSpec::new(f.id.clone(), f.kind, parent).with_pci(func.clone());
        spec.bars = read_bars(&f.path);
        devices.push(spec);
    }
    let mut b = TopologyBuilder::new(SYSFS_SOURCE);
    for h in hosts {
        b.host_bridge(h, 0, p2p_allowed);
    }
    for (id, parent) in ports {
        b.root_port(id, parent);
    }
    for (id, parent) in switches {
        b.switch(id, parent);
    }
    for d in devices {
        b.device(d);
    }
    b.build()
}

/// Adds `(id, parent)` unless `id` is there already (two functions below one bridge).
fn push_new(nodes: &mut Vec<(String, String)>, id: &str, parent: &str) {
    if !nodes.iter().any(|(n, _)| n == id) {
        nodes.push((id.to_string(), parent.to_string()));
    }
}

fn read_bars(function: &Path) -> Vec<Bar> {
    std::fs::read_to_string(function.join("resource"))
        .map(|t| parse_resource(&t))
        .unwrap_or_default()
}

/// `IORESOURCE_MEM` in the flags column of sysfs `resource`.
const IORESOURCE_MEM: u64 = 0x200;

/// Memory BARs from a sysfs `resource` file: one `start end flags` line per resource, lines
/// 0..=5 being the BARs. Unused slots (the upper half of a 64-bit BAR included) are all zero;
/// I/O-port BARs and non-power-of-two sizes are skipped. Malformed lines are ignored.
pub fn parse_resource(text: &str) -> Vec<Bar> {
    let mut bars = Vec::new();
    for (index, line) in text.lines().take(6).enumerate() {
        let mut cols = line.split_whitespace().map(|c| {
            let c = c.trim_start_matches("0x");
            u64::from_str_radix(c, 16).ok()
        });
        let (Some(Some(start)), Some(Some(end)), Some(Some(flags))) =
            (cols.next(), cols.next(), cols.next())
        else {
            continue;
        };
        if flags & IORESOURCE_MEM == 0 || end <= start {
            continue;
        }
        let Some(size) = (end - start).checked_add(1) else {
            continue;
        };
        let Ok(index) = u8::try_from(index) else {
            continue;
        };
        if size.is_power_of_two() {
            bars.push(Bar { index, size });
        }
    }
    bars
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Route;

    fn f(id: &str, kind: DeviceKind, path: &str) -> PciFunction {
        PciFunction {
            id: id.into(),
            kind,
            path: PathBuf::from(path),
        }
    }

    #[test]
    fn routes_come_from_the_model_built_from_paths() {
        let fns = [
            f(
                "gpu0",
                DeviceKind::Gpu,
                "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0",
            ),
            f(
                "nic0",
                DeviceKind::Nic,
                "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.0",
            ),
            f(
                "nic1",
                DeviceKind::Nic,
                "/sys/devices/pci0000:00/0000:00:02.0/0000:05:00.0",
            ),
            f(
                "nic2",
                DeviceKind::Nic,
                "/sys/devices/pci0000:80/0000:80:01.0/0000:81:00.0",
            ),
            f(
                "nic3",
                DeviceKind::Nic,
                "/sys/devices/pci0000:00/0000:00:1f.6",
            ),
        ];
        let t = from_pci_paths(&fns, false).unwrap();
        assert_eq!(t.route_by_id("gpu0", "nic0").unwrap(), Route::BusAddr);
        // Different root ports: through the host bridge only if the kernel allows it.
        assert_eq!(t.route_by_id("gpu0", "nic1").unwrap(), Route::NotSupported);
        assert_eq!(t.route_by_id("gpu0", "nic3").unwrap(), Route::NotSupported);
        assert_eq!(t.route_by_id("gpu0", "nic2").unwrap(), Route::NotSupported);
        assert_eq!(
            t.device("nic0").unwrap().pci.as_deref(),
            Some("0000:04:00.0")
        );
        let t = from_pci_paths(&fns, true).unwrap();
        assert_eq!(
            t.route_by_id("gpu0", "nic1").unwrap(),
            Route::ThruHostBridge
        );
        assert_eq!(
            t.route_by_id("gpu0", "nic3").unwrap(),
            Route::ThruHostBridge
        );
        assert_eq!(t.route_by_id("gpu0", "nic2").unwrap(), Route::NotSupported);
    }

    #[test]
    fn a_path_outside_the_pci_tree_is_an_error_naming_it() {
        let e = from_pci_paths(
            &[f("nic0", DeviceKind::Nic, "/sys/devices/virtual/net/lo")],
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("/sys/devices/virtual/net/lo"), "{e}");
    }
}
