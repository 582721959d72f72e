//! Every shipped topology on the simulated fabric: a GPU BAR exported to every NIC either works
//! zero-copy (P2P route) or is refused by negotiation naming the route — and a revoke with a
//! lying NIC leaves nothing able to write into the BAR.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use dmaplane_core::fabric::{DeviceBar, Fabric, FaultKind};
use dmaplane_core::revoke::{Exporter, Importer, ImporterKind, Invalidation};
use dmaplane_core::topology::{DeviceKind, Topology};
use dmaplane_core::{Accept, Access, SpaceKind};
use dmaplane_tests::shipped_topologies;

/// Ignores invalidations (never signals): the worst importer.
struct Liar(String);
impl Importer for Liar {
    fn name(&self) -> &str {
        &self.0
    }
    fn kind(&self) -> ImporterKind {
        ImporterKind::Pinned
    }
    fn invalidate(&self, _inv: Invalidation) {}
}

#[test]
fn gpu_bars_reach_nics_exactly_where_the_route_allows() {
    let files = shipped_topologies();
    assert!(
        files.len() >= 3,
        "expected the shipped topologies, found {files:?}"
    );
    let accepts = [
        Accept::new(SpaceKind::PciBus, Access::READ_WRITE).with_mmio(),
        Accept::new(SpaceKind::CpuPhys, Access::READ_WRITE).with_mmio(),
    ];
    for file in files {
        let topo = Topology::from_file(&file).unwrap();
        let gpus: Vec<String> = topo
            .devices_of_kind(DeviceKind::Gpu)
            .map(|d| d.id.clone())
            .collect();
        let nics: Vec<String> = topo
            .devices_of_kind(DeviceKind::Nic)
            .map(|d| d.id.clone())
            .collect();
        let fabric = Fabric::with_topology(topo);
        for gpu in &gpus {
            let owner = fabric.device(gpu).unwrap();
            let bar = DeviceBar::new(&fabric, owner, &format!("{gpu}.bar"), 1 << 20).unwrap();
            let mut held = Vec::new();
            for nic in &nics {
                let dev = fabric.device(nic).unwrap();
                let route = fabric.route(owner, dev);
                let imp = Arc::new(Liar(nic.clone()));
                match bar.attach(imp, dev, &accepts) {
                    Ok(att) => {
                        assert!(
                            route.is_p2p_capable(),
                            "{}: {gpu}->{nic} attached over {route}",
                            file.display()
                        );
                        let addr = att.map().unwrap().list.ranges()[0].addr;
                        fabric.dma_write(dev, addr, b"zero-copy").unwrap();
                        held.push((dev, addr, att));
                    }
                    Err(e) => {
                        assert!(
                            !route.is_p2p_capable(),
                            "{}: {gpu}->{nic} refused over {route}: {e}",
                            file.display()
                        );
                        assert!(e.to_string().contains("route: not-supported"), "{e}");
                    }
                }
            }
            let report = bar.revoke(Duration::from_millis(5));
            assert_eq!(report.timed_out().len(), held.len(), "{report}");
            for (dev, addr, _att) in &held {
                let fault = fabric.dma_write(*dev, *addr, b"late").unwrap_err();
                assert_eq!(fault.kind, FaultKind::NoGrant);
            }
            let mut buf = [0u8; 9];
            assert!(held.is_empty() || bar.read(0, &mut buf));
            assert!(held.is_empty() || &buf == b"zero-copy");
        }
    }
}
