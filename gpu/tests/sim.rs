//! The simulated GPU on the built-in testbed: offers by route, the BAR1 aperture, the copy
//! engine through the fabric's checks, and free as a revoke.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dmaplane_core::fabric::{Fabric, HostMemory};
use dmaplane_core::revoke::{Importer, ImporterKind, Invalidation};
use dmaplane_core::topology::builtin;
use dmaplane_core::{Accept, Access, AddrSpace, Route, SpaceKind};
use dmaplane_gpu::{DmaClient, Gpu, GpuError, Loc, SimGpu};

fn fabric() -> Fabric {
    Fabric::with_topology(builtin::testbed())
}

fn gpu(f: &Fabric, name: &str) -> Gpu {
    SimGpu::new(f, name).unwrap().into_gpu()
}

fn nic_accepts() -> Vec<Accept> {
    [SpaceKind::PciBus, SpaceKind::CpuPhys]
        .into_iter()
        .map(|s| Accept::new(s, Access::READ_WRITE).with_mmio())
        .collect()
}

/// An importer that never does DMA itself: signals at once, or never (a liar).
#[derive(Debug)]
struct Probe {
    name: String,
    lying: bool,
    invalidated: AtomicBool,
}

impl Probe {
    fn new(name: &str, lying: bool) -> Arc<Probe> {
        Arc::new(Probe {
            name: name.into(),
            lying,
            invalidated: AtomicBool::new(false),
        })
    }
}

impl Importer for Probe {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> ImporterKind {
        ImporterKind::Pinned
    }
    fn invalidate(&self, inv: Invalidation) {
        self.invalidated.store(true, Ordering::SeqCst);
        if !self.lying {
            inv.fence.signal();
        }
    }
}

#[test]
fn offers_follow_the_route_to_each_peer() {
    let f = fabric();
    let dev = |n: &str| f.device(n).unwrap();
    let g0 = gpu(&f, "gpu0");
    let g1 = gpu(&f, "gpu1");
    let m0 = g0.alloc("a", 1 << 20).unwrap();
    let m1 = g1.alloc("b", 1 << 20).unwrap();

    let o = m0.offers(DmaClient::Fabric(dev("nic0")));
    assert!(matches!(o[0].space, AddrSpace::PciBus { .. }), "{o:?}");
    assert_eq!(o[0].hints.route, Route::BusAddr);
    let o = m1.offers(DmaClient::Fabric(dev("nic0")));
    assert_eq!(o[0].hints.route, Route::ThruHostBridge);
    let o = m0.offers(DmaClient::Fabric(dev("gpu0")));
    assert!(matches!(o[0].space, AddrSpace::DeviceVa { .. }));
    // Across sockets nothing a P2P importer can take: the refusal names the route.
    let err = m0
        .would_negotiate(DmaClient::Fabric(dev("nic1")), "nic1", &nic_accepts())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not-supported") || err.contains("NotSupported"),
        "{err}"
    );
    assert!(
        m0.would_negotiate(DmaClient::Fabric(dev("nic0")), "nic0", &nic_accepts())
            .is_ok()
    );
}

#[test]
fn exporting_past_bar1_fails_and_names_what_is_mapped() {
    let f = fabric();
    let nic = f.device("nic0").unwrap();
    let g = SimGpu::with_sizes(&f, "gpu0", 1 << 30, 8 << 20)
        .unwrap()
        .into_gpu();
    let a = g.alloc("a", 4 << 20).unwrap();
    let b = g.alloc("b", 4 << 20).unwrap();
    let c = g.alloc("c", 4 << 20).unwrap();
    let _aa = a
        .attach(
            Probe::new("nic0", false),
            DmaClient::Fabric(nic),
            &nic_accepts(),
        )
        .unwrap();
    // A second attachment of a mapped allocation takes no more aperture.
    let _aa2 = a
        .attach(
            Probe::new("nic0b", false),
            DmaClient::Fabric(nic),
            &nic_accepts(),
        )
        .unwrap();
    let _bb = b
        .attach(
            Probe::new("nic0", false),
            DmaClient::Fabric(nic),
            &nic_accepts(),
        )
        .unwrap();
    assert_eq!(g.info().bar1_mapped, 8 << 20);
    let err = c
        .attach(
            Probe::new("nic0", false),
            DmaClient::Fabric(nic),
            &nic_accepts(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("BAR1 aperture full"), "{err}");
    assert!(
        err.contains("8388608 of the 8388608-byte aperture"),
        "{err}"
    );
    assert!(err.contains("2 allocation(s)"), "{err}");
    // The GPU's own import needs no BAR1; freeing a peer-visible allocation gives it back.
    let gdev = f.device("gpu0").unwrap();
    let own = vec![Accept::new(SpaceKind::DeviceVa, Access::READ_WRITE).with_mmio()];
    c.attach(Probe::new("self", false), DmaClient::Fabric(gdev), &own)
        .unwrap();
    a.free(Duration::from_secs(1)).unwrap();
    assert_eq!(g.info().bar1_mapped, 4 << 20);
    c.attach(
        Probe::new("nic0", false),
        DmaClient::Fabric(nic),
        &nic_accepts(),
    )
    .unwrap();
}

#[test]
fn out_of_device_memory_is_an_error_naming_the_numbers() {
    let f = fabric();
    let g = SimGpu::with_sizes(&f, "gpu0", 8 << 20, 8 << 20)
        .unwrap()
        .into_gpu();
    let _a = g.alloc("a", 6 << 20).unwrap();
    let err = g.alloc("b", 4 << 20).unwrap_err().to_string();
    assert!(err.contains("4194304") && err.contains("6291456"), "{err}");
    assert!(
        g.alloc("zero", 0)
            .unwrap_err()
            .to_string()
            .contains("`size` = 0")
    );
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

#[test]
fn copy_engine_moves_bytes_between_host_gpu_and_a_peer_bar() {
    let f = fabric();
    let g0 = gpu(&f, "gpu0");
    let g1 = gpu(&f, "gpu1");
    let gdev0 = f.device("gpu0").unwrap();
    let host = HostMemory::new(&f, f.device("mem0").unwrap(), "host", 1 << 20).unwrap();
    let data = pattern(1 << 20, 7);
    host.write(0, &data);
    let h = g0
        .import("host", ImporterKind::Pinned, |i, a| {
            host.attach(i, gdev0, a)
        })
        .unwrap();
    let m = g0.alloc("dev", 1 << 20).unwrap();
    g0.copy(Loc::Peer(&h, 0), Loc::Mem(&m, 0), 1 << 20).unwrap();
    let mut back = vec![0u8; 1 << 20];
    m.read(0, &mut back).unwrap();
    assert_eq!(back, data, "host to device");

    // gpu0 reaches gpu1's memory through gpu1's BAR (thru-host-bridge on hb0).
    let m1 = g1.alloc("peer", 1 << 20).unwrap();
    let p = g0
        .import("gpu1-bar", ImporterKind::Pinned, |i, a| {
            m1.attach(i, DmaClient::Fabric(gdev0), a)
        })
        .unwrap();
    assert!(
        p.negotiation().contains("CpuPhys") || p.negotiation().contains("cpu-phys"),
        "{}",
        p.negotiation()
    );
    g0.copy(Loc::Mem(&m, 4096), Loc::Peer(&p, 0), 8192).unwrap();
    let mut got = vec![0u8; 8192];
    m1.read(0, &mut got).unwrap();
    assert_eq!(got, data[4096..4096 + 8192]);

    // Bounds are checked, not truncated.
    let err = g0
        .copy(Loc::Mem(&m, (1 << 20) - 16), Loc::Peer(&p, 0), 32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("past the end of dev"), "{err}");
    // Another GPU's allocation is not this engine's memory.
    assert!(g0.copy(Loc::Mem(&m1, 0), Loc::Mem(&m, 0), 16).is_err());
    assert_eq!(f.faults(gdev0).total(), 0);
}

#[test]
fn a_gpu_across_sockets_cannot_import_p2p() {
    let f = fabric();
    let g0 = gpu(&f, "gpu0");
    let g2 = gpu(&f, "gpu2");
    let m2 = g2.alloc("far", 1 << 20).unwrap();
    let gdev0 = f.device("gpu0").unwrap();
    let err = g0
        .import("far", ImporterKind::Pinned, |i, a| {
            m2.attach(i, DmaClient::Fabric(gdev0), a)
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("route"), "{err}");
    assert_eq!(g2.info().bar1_mapped, 0, "a refused export holds no BAR1");
}

#[test]
fn free_revokes_every_importer_and_names_the_ones_that_hang() {
    let f = fabric();
    let g0 = gpu(&f, "gpu0");
    let g1 = gpu(&f, "gpu1");
    let gdev1 = f.device("gpu1").unwrap();
    let m = g0.alloc("victim", 1 << 20).unwrap();
    let p = g1
        .import("victim", ImporterKind::Pinned, |i, a| {
            m.attach(i, DmaClient::Fabric(gdev1), a)
        })
        .unwrap();
    let own = g1.alloc("own", 1 << 20).unwrap();
    g1.copy(Loc::Peer(&p, 0), Loc::Mem(&own, 0), 4096).unwrap();
    let report = m.free(Duration::from_secs(1)).unwrap();
    assert_eq!(report.importers.len(), 1);
    assert!(p.is_revoked());
    let err = g1
        .copy(Loc::Peer(&p, 0), Loc::Mem(&own, 0), 4096)
        .unwrap_err();
    assert!(matches!(err, GpuError::Revoked { .. }), "{err}");
    assert_eq!(
        f.faults(gdev1).total(),
        0,
        "an honest importer never faults"
    );

    // A liar holds the free up to the deadline, is named, and is fenced off by force.
    let nic = f.device("nic0").unwrap();
    let m = g0.alloc("held", 1 << 20).unwrap();
    let liar = Probe::new("stuck-nic", true);
    let att = m
        .attach(liar.clone(), DmaClient::Fabric(nic), &nic_accepts())
        .unwrap();
    let base = att.map().unwrap().list.ranges()[0].addr;
    let err = m.free(Duration::from_millis(50)).unwrap_err();
    match &err {
        GpuError::FreeTimedOut {
            importers,
            released,
            ..
        } => {
            assert_eq!(importers, &vec!["stuck-nic".to_string()]);
            assert!(released);
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("stuck-nic"));
    assert!(liar.invalidated.load(Ordering::SeqCst));
    assert!(
        f.dma_write(nic, base, &[1]).is_err(),
        "fenced off after the free"
    );
}

#[test]
fn free_under_concurrent_copies_never_faults_or_lands_late() {
    let f = fabric();
    let g0 = gpu(&f, "gpu0");
    let g1 = gpu(&f, "gpu1");
    let gdev1 = f.device("gpu1").unwrap();
    for round in 0..20 {
        let m = g0.alloc(&format!("v{round}"), 1 << 20).unwrap();
        let window = m.fabric_window().unwrap();
        let p = g1
            .import("v", ImporterKind::Pinned, |i, a| {
                m.attach(i, DmaClient::Fabric(gdev1), a)
            })
            .unwrap();
        let src = g1.alloc("src", 1 << 20).unwrap();
        src.write(0, &vec![0xab; 1 << 20]).unwrap();
        let report = std::thread::scope(|s| {
            let h = s.spawn(|| {
                let mut ok = 0;
                while g1
                    .copy(Loc::Mem(&src, 0), Loc::Peer(&p, 0), 64 << 10)
                    .is_ok()
                {
                    ok += 1;
                }
                ok
            });
            std::thread::sleep(Duration::from_micros(200));
            let report = m.free(Duration::from_secs(1)).unwrap();
            // Poison after the ack: a late copy would overwrite it.
            window.memory().fill(0x11);
            h.join().unwrap();
            report
        });
        assert!(report.is_clean());
        let mut b = vec![0u8; 64 << 10];
        window.memory().read(0, &mut b);
        assert!(b.iter().all(|&x| x == 0x11), "a copy landed after the ack");
        assert_eq!(f.faults(gdev1).total(), 0);
    }
}
