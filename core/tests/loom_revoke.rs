//! Loom models of revoke against in-flight DMA: in no interleaving does a DMA land after the ack.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p dmaplane-core --test loom_revoke --release`.
#![cfg(loom)]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Rig, TestImporter};
use dmaplane_core::fabric::HostMemory;
use dmaplane_core::revoke::{Exporter, ImporterKind};

const DMAS: u8 = 2;

fn byte(mem: &HostMemory) -> u8 {
    let mut b = [0u8];
    mem.window().memory().read(0, &mut b);
    b[0]
}

/// One importer DMAs `DMAS` times while the exporter revokes (or moves) the memory.
fn model(kind: ImporterKind, lying: bool, relocate: bool) {
    loom::model(move || {
        let Rig {
            fabric,
            nic,
            mem,
            importer,
            att,
            base,
        } = Rig::new(TestImporter::new("nic0", kind, lying), 4096);
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
        // The oracle: nothing after a fence (no one promised falsely), nothing after the ack, and
        // every access the backstop refused is one it stopped.
        let v = fabric.oracle().verdict();
        assert_eq!((v.dma_after_fence, v.dma_after_ack), (0, 0), "{v}");
        assert_eq!(v.blocked_by_backstop, faults, "{v}");
        if report.is_clean() {
            assert!(v.is_clean(), "{v}");
        }
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
        let Rig {
            fabric,
            nic: gpu,
            mem,
            importer: engine,
            att: _att,
            base,
        } = Rig::new(Engine::default(), 4096);
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
        let v = fabric.oracle().verdict();
        assert_eq!((v.dma_after_fence, v.dma_after_ack), (0, 0), "{v}");
        if report.is_clean() {
            assert_eq!(faults, 0, "an honest gate never faults");
            assert!(v.is_clean(), "{v}");
        }
    });
}

/// An importer that signals its fence at once and goes on DMAing, with the backstop in place:
/// the revoke report calls it clean, yet the oracle convicts it in every interleaving where it
/// DMAed after its fence (at least as many times as it did), and such interleavings exist.
#[test]
fn early_fence_importer_is_convicted_by_the_oracle() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static CONVICTED: AtomicUsize = AtomicUsize::new(0);
    loom::model(|| {
        let Rig {
            fabric,
            nic,
            mem,
            importer,
            att: _att,
            base,
        } = Rig::new(
            TestImporter::early_fence("nic0", ImporterKind::Pinned),
            4096,
        );
        let (f2, imp2) = (fabric.clone(), importer.clone());
        let dma = loom::thread::spawn(move || {
            // DMAs issued after the importer knew it had signalled.
            let mut after_fence = 0u64;
            for i in 1..=DMAS {
                let promised = imp2.has_signalled();
                let _ = f2.dma_write(nic, base, &[i]);
                after_fence += u64::from(promised);
            }
            after_fence
        });
        let report = mem.revoke(Duration::from_secs(1));
        assert!(report.is_clean(), "the protocol is fooled: {report}");
        let after_fence = dma.join().unwrap();
        let v = fabric.oracle().verdict();
        assert!(
            v.dma_after_fence >= after_fence,
            "{v}, {after_fence} issued after"
        );
        assert_eq!(v.dma_after_ack, 0, "the backstop held: {v}");
        assert_eq!(v.blocked_by_backstop, fabric.faults(nic).total(), "{v}");
        if v.dma_after_fence > 0 {
            CONVICTED.fetch_add(1, Ordering::Relaxed);
        }
    });
    assert!(
        CONVICTED.load(Ordering::Relaxed) > 0,
        "no interleaving convicted an importer that signals before it stops"
    );
}

fn byte_of(w: &dmaplane_core::fabric::WindowHandle) -> u8 {
    let mut b = [0u8];
    w.memory().read(0, &mut b);
    b[0]
}
