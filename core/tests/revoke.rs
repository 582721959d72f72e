//! The revoke protocol on the real fabric, with real threads and real deadlines.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::TestImporter;
use dmaplane_core::fabric::{DeviceBar, Fabric, FaultKind, HostMemory};
use dmaplane_core::revoke::{AttachError, Exporter, ImporterKind, Outcome};
use dmaplane_core::topology::Topology;
use dmaplane_core::{Accept, Access, AddrSpace, Route, SpaceKind};

fn rw(space: SpaceKind) -> Vec<Accept> {
    vec![Accept::new(space, Access::READ_WRITE)]
}

fn setup() -> (
    Fabric,
    dmaplane_core::fabric::DeviceId,
    dmaplane_core::fabric::DeviceId,
) {
    let f = Fabric::new();
    let host = f.add_device("mem0");
    let nic = f.add_device("nic0");
    (f, host, nic)
}

#[test]
fn lying_importer_is_named_fenced_off_and_its_dma_faults() {
    let (fabric, host, nic) = setup();
    let mem = HostMemory::new(&fabric, host, "buf", 1 << 20).unwrap();
    let liar = Arc::new(TestImporter::new("liar-nic", ImporterKind::Pinned, true));
    let att = mem
        .attach(liar.clone(), nic, &rw(SpaceKind::CpuPhys))
        .unwrap();
    let base = att.map().unwrap().list.ranges()[0].addr;
    fabric.dma_write(nic, base, b"before").unwrap();

    let deadline = Duration::from_millis(50);
    let start = Instant::now();
    let report = mem.revoke(deadline);
    let took = start.elapsed();
    assert!(took >= deadline, "returned before the deadline: {took:?}");
    assert!(
        took < deadline + Duration::from_millis(500),
        "overran the deadline: {took:?}"
    );
    assert_eq!(report.timed_out(), vec!["liar-nic"]);
    assert!(
        report.to_string().contains("fenced off: liar-nic"),
        "{report}"
    );

    let err = fabric.dma_write(nic, base, b"after!").unwrap_err();
    assert_eq!(err.kind, FaultKind::NoGrant);
    assert!(err.to_string().contains("nic0"), "{err}");
    assert_eq!(fabric.faults(nic).no_grant, 1);
    let mut buf = [0u8; 6];
    assert!(mem.window().memory().read(0, &mut buf));
    assert_eq!(&buf, b"before");
    assert!(matches!(att.map(), Err(AttachError::Revoked { .. })));
}

#[test]
fn honest_importer_under_load_signals_and_nothing_lands_after_the_ack() {
    let (fabric, host, nic) = setup();
    let mem = HostMemory::new(&fabric, host, "buf", 1 << 20).unwrap();
    let imp = Arc::new(TestImporter::new("nic0", ImporterKind::Pinned, false));
    let att = mem
        .attach(imp.clone(), nic, &rw(SpaceKind::CpuPhys))
        .unwrap();
    let base = att.map().unwrap().list.ranges()[0].addr;
    let seq = Arc::new(AtomicU64::new(0));
    let t = {
        let (fabric, imp, seq) = (fabric.clone(), imp.clone(), seq.clone());
        std::thread::spawn(move || {
            while imp.may_dma() {
                let n = seq.fetch_add(1, Ordering::SeqCst) + 1;
                fabric.dma_write(nic, base, &n.to_le_bytes()).unwrap();
            }
        })
    };
    while seq.load(Ordering::SeqCst) < 1000 {
        std::thread::yield_now();
    }
    let report = mem.revoke(Duration::from_secs(5));
    assert!(report.is_clean(), "{report}");
    assert!(matches!(
        report.importers[0].outcome,
        Outcome::Signalled { .. }
    ));
    let mut at_ack = [0u8; 8];
    mem.window().memory().read(0, &mut at_ack);
    t.join().unwrap();
    let mut after = [0u8; 8];
    mem.window().memory().read(0, &mut after);
    assert_eq!(at_ack, after);
    assert_eq!(u64::from_le_bytes(after), seq.load(Ordering::SeqCst));
    assert_eq!(fabric.faults(nic).total(), 0);
}

#[test]
fn dynamic_importer_follows_a_move_and_pinned_does_not() {
    let (fabric, host, nic) = setup();
    let gpu = fabric.add_device("gpu0");
    let mem = HostMemory::new(&fabric, host, "buf", 1 << 20).unwrap();
    let dynamic = Arc::new(TestImporter::new("dyn", ImporterKind::Dynamic, false));
    let pinned = Arc::new(TestImporter::new("pin", ImporterKind::Pinned, false));
    let d = mem
        .attach(dynamic.clone(), nic, &rw(SpaceKind::CpuPhys))
        .unwrap();
    let p = mem
        .attach(pinned.clone(), gpu, &rw(SpaceKind::CpuPhys))
        .unwrap();
    dynamic.finished();
    pinned.finished();
    let m0 = d.map().unwrap();
    fabric
        .dma_write(nic, m0.list.ranges()[0].addr + 100, b"kept")
        .unwrap();
    d.check(m0.epoch).unwrap();

    let report = mem.relocate(Duration::from_secs(1)).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(dynamic.invalidations(), 1);
    assert_eq!(pinned.invalidations(), 1);
    // Stale handles fail fast; the old address faults.
    assert!(matches!(
        d.check(m0.epoch),
        Err(AttachError::Stale {
            held: 0,
            current: 1,
            ..
        })
    ));
    let old = fabric
        .dma_write(nic, m0.list.ranges()[0].addr, b"x")
        .unwrap_err();
    assert_eq!(old.kind, FaultKind::Unmapped);

    let m1 = d.map().unwrap();
    assert_eq!(m1.epoch, 1);
    assert_ne!(m1.list.ranges()[0].addr, m0.list.ranges()[0].addr);
    let mut buf = [0u8; 4];
    fabric
        .dma_read(nic, m1.list.ranges()[0].addr + 100, &mut buf)
        .unwrap();
    assert_eq!(&buf, b"kept");
    assert!(matches!(p.map(), Err(AttachError::Revoked { .. })));
    assert_eq!(fabric.faults(gpu).total(), 0);
    // The pinned device never got a grant on the new window.
    assert_eq!(
        fabric
            .dma_write(gpu, m1.list.ranges()[0].addr, b"y")
            .unwrap_err()
            .kind,
        FaultKind::NoGrant
    );
}

#[test]
fn dropping_the_exporter_revokes_first() {
    let (fabric, host, nic) = setup();
    let mem = HostMemory::new(&fabric, host, "buf", 4096).unwrap();
    let imp = Arc::new(TestImporter::new("nic0", ImporterKind::Pinned, false));
    imp.finished();
    let att = mem
        .attach(imp.clone(), nic, &rw(SpaceKind::CpuPhys))
        .unwrap();
    let base = att.map().unwrap().list.ranges()[0].addr;
    drop(mem);
    assert_eq!(imp.invalidations(), 1);
    assert!(att.map().is_err());
    assert_eq!(
        fabric.dma_write(nic, base, b"z").unwrap_err().kind,
        FaultKind::Unmapped
    );
}

#[test]
fn detach_revokes_the_grant() {
    let (fabric, host, nic) = setup();
    let mem = HostMemory::new(&fabric, host, "buf", 4096).unwrap();
    let imp = Arc::new(TestImporter::new("nic0", ImporterKind::Pinned, false));
    let att = mem.attach(imp, nic, &rw(SpaceKind::ProcessVa)).unwrap();
    assert_eq!(
        att.negotiated().offer_index,
        1,
        "ProcessVa is the second offer"
    );
    assert_eq!(att.map().unwrap().list.space(), AddrSpace::ProcessVa);
    let base = mem.window().base();
    fabric.dma_write(nic, base, b"ok").unwrap();
    drop(att);
    assert_eq!(
        fabric.dma_write(nic, base, b"no").unwrap_err().kind,
        FaultKind::NoGrant
    );
}

#[test]
fn fabric_checks_bounds_rights_and_mapping() {
    let (fabric, host, nic) = setup();
    let mem = HostMemory::new(&fabric, host, "buf", 8192).unwrap();
    let imp = Arc::new(TestImporter::new("nic0", ImporterKind::Pinned, false));
    let _att = mem
        .attach(imp, nic, &[Accept::new(SpaceKind::CpuPhys, Access::READ)])
        .unwrap();
    let base = mem.window().base();
    let e = fabric.dma_write(nic, base, b"w").unwrap_err();
    assert_eq!(e.kind, FaultKind::AccessDenied);
    let mut b = [0u8; 16];
    assert_eq!(
        fabric.dma_read(nic, base + 8190, &mut b).unwrap_err().kind,
        FaultKind::OutOfBounds
    );
    assert_eq!(
        fabric.dma_read(nic, 0x1000, &mut b).unwrap_err().kind,
        FaultKind::Unmapped
    );
    fabric.dma_read(nic, base, &mut b).unwrap();
    let f = fabric.faults(nic);
    assert_eq!((f.access_denied, f.out_of_bounds, f.unmapped), (1, 1, 1));
    assert_eq!(fabric.faults(host).total(), 0);
}

#[test]
fn bar_offers_follow_the_route() {
    let topo = Topology::from_toml_str(
        r#"
[[host_bridge]]
id = "hb0"
numa = 0
p2p_allowed = true
[[host_bridge]]
id = "hb1"
numa = 1
p2p_allowed = true
[[root_port]]
id = "rp0"
parent = "hb0"
[[root_port]]
id = "rp1"
parent = "hb0"
[[root_port]]
id = "rp2"
parent = "hb1"
[[switch]]
id = "sw0"
parent = "rp0"
[[device]]
id = "gpu0"
kind = "gpu"
parent = "sw0"
bars = [{ index = 1, size = "1GiB" }]
[[device]]
id = "nic0"
kind = "nic"
parent = "sw0"
[[device]]
id = "nic1"
kind = "nic"
parent = "rp1"
[[device]]
id = "nic2"
kind = "nic"
parent = "rp2"
"#,
        "inline",
    )
    .unwrap();
    let fabric = Fabric::with_topology(topo);
    let id = |n: &str| fabric.device(n).unwrap();
    let bar = DeviceBar::new(&fabric, id("gpu0"), "gpu0.bar1", 1 << 20).unwrap();
    let p2p = vec![
        Accept::new(SpaceKind::PciBus, Access::READ_WRITE).with_mmio(),
        Accept::new(SpaceKind::CpuPhys, Access::READ_WRITE).with_mmio(),
    ];
    let cases = [
        ("nic0", Route::BusAddr, SpaceKind::PciBus),
        ("nic1", Route::ThruHostBridge, SpaceKind::CpuPhys),
    ];
    let mut held = Vec::new();
    for (nic, route, space) in cases {
        let imp = Arc::new(TestImporter::new(nic, ImporterKind::Dynamic, false));
        let att = bar.attach(imp, id(nic), &p2p).unwrap();
        assert_eq!(att.negotiated().offer.hints.route, route);
        assert_eq!(att.map().unwrap().list.space().kind(), space);
        let addr = att.map().unwrap().list.ranges()[0].addr;
        fabric.dma_write(id(nic), addr, b"p2p").unwrap();
        held.push(att);
    }
    let imp = Arc::new(TestImporter::new("nic2", ImporterKind::Dynamic, false));
    let err = bar.attach(imp, id("nic2"), &p2p).unwrap_err().to_string();
    assert!(err.contains("route: not-supported"), "{err}");
    assert!(err.contains("gpu0.bar1") && err.contains("nic2"), "{err}");
    let own = bar.offers(id("gpu0"));
    assert!(matches!(own[0].space, AddrSpace::DeviceVa { .. }));
    let report = bar.revoke(Duration::from_millis(100));
    assert_eq!(report.importers.len(), 2);
}

/// A whole move that runs while an attach makes its list must not let the attach record a list
/// of the old memory under the new epoch (it used to: only `Active` was re-checked).
#[test]
fn an_attach_that_a_whole_move_overtook_is_refused_as_stale() {
    use dmaplane_core::revoke::Export;
    use dmaplane_core::{AddrList, DmaRange, Hints, Offer};
    let export = Export::new("buf");
    let offers = [Offer {
        space: AddrSpace::CpuPhys,
        hints: Hints::HOST_MEMORY,
    }];
    let importer = Arc::new(TestImporter::new("nic0", ImporterKind::Dynamic, false));
    importer.finished();
    let r = export.attach(importer, &offers, &rw(SpaceKind::CpuPhys), |_| {
        // The move lands here: both halves, the epoch moves on, the export is Active again.
        let report = export.begin_move(Duration::from_millis(100));
        assert!(!report.already_revoked);
        export.finish_move(|_, l| Ok((l.clone(), None))).unwrap();
        let list = AddrList::single(
            AddrSpace::CpuPhys,
            Hints::HOST_MEMORY,
            4096,
            DmaRange::new(0x1000, 0x1000),
        )
        .unwrap();
        Ok((list, None))
    });
    match r {
        Err(AttachError::Stale {
            held: 0,
            current: 1,
            ..
        }) => {}
        other => panic!("expected a stale attach, got {other:?}"),
    }
    assert_eq!(export.attachments(), 0);
}

/// A move whose second half cannot complete ends the export instead of leaving it "being moved"
/// for ever; the grants already made for the new memory are revoked.
#[test]
fn a_failed_move_revokes_the_export_instead_of_wedging_it() {
    use dmaplane_core::revoke::{AccessGrant, Export};
    use dmaplane_core::{Hints, Offer};
    #[derive(Debug)]
    struct Flag(Arc<AtomicU64>);
    impl AccessGrant for Flag {
        fn revoke(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let export = Export::new("buf");
    let offers = [Offer {
        space: AddrSpace::CpuPhys,
        hints: Hints::HOST_MEMORY,
    }];
    let revoked = Arc::new(AtomicU64::new(0));
    let mut atts = Vec::new();
    for name in ["nic0", "nic1"] {
        let i = Arc::new(TestImporter::new(name, ImporterKind::Dynamic, false));
        i.finished();
        let list = dmaplane_core::AddrList::single(
            AddrSpace::CpuPhys,
            Hints::HOST_MEMORY,
            4096,
            dmaplane_core::DmaRange::new(0x1000, 0x1000),
        )
        .unwrap();
        atts.push(
            export
                .attach(i, &offers, &rw(SpaceKind::CpuPhys), |_| Ok((list, None)))
                .unwrap(),
        );
    }
    assert!(export.begin_move(Duration::from_millis(100)).is_clean());
    let mut n = 0;
    let e = export
        .finish_move(|_, l| {
            n += 1;
            if n == 2 {
                return Err(AttachError::Exporter {
                    export: "buf".into(),
                    what: "no memory for the new place".into(),
                });
            }
            Ok((
                l.clone(),
                Some(Box::new(Flag(revoked.clone())) as Box<dyn AccessGrant>),
            ))
        })
        .unwrap_err();
    assert!(e.to_string().contains("no memory"), "{e}");
    assert!(export.is_revoked(), "wedged in Moved");
    assert_eq!(
        revoked.load(Ordering::SeqCst),
        1,
        "the first new grant was not revoked"
    );
    assert!(matches!(atts[0].map(), Err(AttachError::Revoked { .. })));
    let i = Arc::new(TestImporter::new("nic2", ImporterKind::Dynamic, false));
    let again = export.attach(i, &offers, &rw(SpaceKind::CpuPhys), |_| unreachable!());
    assert!(
        matches!(again, Err(AttachError::Revoked { .. })),
        "{again:?}"
    );
    // And the explicit abort after a first half does the same.
    let export = Export::new("buf2");
    let _ = export.begin_move(Duration::from_millis(10));
    export.abort_move();
    assert!(export.is_revoked());
}
