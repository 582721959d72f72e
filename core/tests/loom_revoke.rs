//! Loom models of revoke against in-flight DMA: in no interleaving does a DMA land after the ack.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p dmaplane-core --test loom_revoke --release`.
#![cfg(loom)]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestImporter;
use dmaplane_core::fabric::{Fabric, HostMemory};
use dmaplane_core::revoke::{Exporter, ImporterKind};
use dmaplane_core::{Accept, Access, SpaceKind};

const DMAS: u8 = 2;

fn byte(mem: &HostMemory) -> u8 {
    let mut b = [0u8];
    mem.window().memory().read(0, &mut b);
    b[0]
}

/// One importer DMAs `DMAS` times while the exporter revokes (or moves) the memory.
fn model(kind: ImporterKind, lying: bool, relocate: bool) {
    loom::model(move || {
        let fabric = Fabric::new();
        let host = fabric.add_device("mem0");
        let nic = fabric.add_device("nic0");
        let mem = HostMemory::new(&fabric, host, "buf", 4096).unwrap();
        let importer = Arc::new(TestImporter::new("nic0", kind, lying));
        let att = mem
            .attach(
                importer.clone(),
                nic,
                &[Accept::new(SpaceKind::CpuPhys, Access::READ_WRITE)],
            )
            .unwrap();
        let base = att.map().unwrap().list.ranges()[0].addr;
        let old_window = mem.window();

        let (f2, imp2) = (fabric.clone(), importer.clone());
        let dma = loom::thread::spawn(move || {
            let mut landed = 0u32;
            for i in 1..=DMAS {
                if !imp2.may_dma() {
                    return landed;
                }
                if f2.dma_write(nic, base, &[i]).is_ok() {
                    landed += 1;
                }
            }
            imp2.finished();
            landed
        });

        let report = if relocate {
            mem.relocate(Duration::from_secs(1)).unwrap()
        } else {
            mem.revoke(Duration::from_secs(1))
        };
        // The ack: from here nothing may land in the old memory.
        let mut at_ack = [0u8];
        old_window.memory().read(0, &mut at_ack);
        let landed = dma.join().unwrap();
        let mut after = [0u8];
        old_window.memory().read(0, &mut after);
        assert_eq!(at_ack, after, "a DMA landed after the ack");

        let faults = fabric.faults(nic).total();
        assert!(u64::from(landed) + faults <= u64::from(DMAS));
        if lying {
            assert_eq!(report.timed_out(), vec!["nic0"], "{report}");
        }
        match (relocate, kind) {
            (true, ImporterKind::Dynamic) => {
                let m = att.map().unwrap();
                assert_eq!(m.epoch, 1);
                assert_ne!(m.list.ranges()[0].addr, base);
                // The moved bytes are what the old memory held at the ack.
                assert_eq!(byte(&mem), at_ack[0]);
            }
            _ => assert!(att.map().is_err()),
        }
    });
}

#[test]
fn honest_pinned_importer_revoke() {
    model(ImporterKind::Pinned, false, false);
}

#[test]
fn lying_pinned_importer_revoke() {
    model(ImporterKind::Pinned, true, false);
}

#[test]
fn honest_dynamic_importer_move() {
    model(ImporterKind::Dynamic, false, true);
}

#[test]
fn lying_dynamic_importer_move() {
    model(ImporterKind::Dynamic, true, true);
}

#[test]
fn pinned_importer_move_is_final() {
    model(ImporterKind::Pinned, false, true);
}

/// A copy engine behind a [`dmaplane_core::Gate`]: its DMAs race the revoke, and none lands
/// after the ack.
#[test]
fn gated_importer_revoke() {
    use dmaplane_core::Gate;
    use dmaplane_core::revoke::{Importer, Invalidation};

    #[derive(Debug, Default)]
    struct Engine(Gate);
    impl Importer for Engine {
        fn name(&self) -> &str {
            "gpu0"
        }
        fn kind(&self) -> ImporterKind {
            ImporterKind::Pinned
        }
        fn invalidate(&self, inv: Invalidation) {
            self.0.close(inv.fence);
        }
    }

    loom::model(|| {
        let fabric = Fabric::new();
        let host = fabric.add_device("mem0");
        let gpu = fabric.add_device("gpu0");
        let mem = HostMemory::new(&fabric, host, "buf", 4096).unwrap();
        let engine = Arc::new(Engine::default());
        let att = mem
            .attach(
                engine.clone(),
                gpu,
                &[Accept::new(SpaceKind::CpuPhys, Access::READ_WRITE)],
            )
            .unwrap();
        let base = att.map().unwrap().list.ranges()[0].addr;
        let window = mem.window();
        let (f2, e2) = (fabric.clone(), engine.clone());
        let dma = loom::thread::spawn(move || {
            let mut landed = 0u32;
            for i in 1..=DMAS {
                let Some(_pass) = e2.0.enter() else { break };
                if f2.dma_write(gpu, base, &[i]).is_ok() {
                    landed += 1;
                }
            }
            landed
        });
        // Under loom the fence wait cannot block on time, so the report may say "fenced off";
        // either way the property holds: nothing lands after the ack.
        let report = mem.revoke(Duration::from_secs(1));
        let at_ack = byte_of(&window);
        let landed = dma.join().unwrap();
        assert_eq!(
            at_ack,
            byte_of(&window),
            "a DMA landed after the ack: {report}"
        );
        let faults = fabric.faults(gpu).total();
        assert!(u64::from(landed) + faults <= u64::from(DMAS));
        if report.is_clean() {
            assert_eq!(faults, 0, "an honest gate never faults");
        }
    });
}

fn byte_of(w: &dmaplane_core::fabric::WindowHandle) -> u8 {
    let mut b = [0u8];
    w.memory().read(0, &mut b);
    b[0]
}
