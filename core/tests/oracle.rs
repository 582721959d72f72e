//! The fabric's oracle judges importers and exporters from what it saw, not from what they say:
//! an honest pair leaves it clean, and every kind of lie is caught with the backstop in place.
#![cfg(not(loom))]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Rig, TestImporter};
use dmaplane_core::fabric::{Fabric, Verdict};
use dmaplane_core::revoke::{Exporter, ImporterKind};

fn rig(importer: TestImporter) -> Rig {
    let r = Rig::new(importer, 1 << 16);
    r.fabric.oracle().record(true);
    r
}

/// DMA in a loop (stopping when the importer says so, or when told) while `revoke` runs.
fn under_load<R>(r: &Rig, revoke: impl FnOnce() -> R) -> R {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0u8;
            while !stop.load(Ordering::Relaxed) && r.importer.may_dma() {
                let _ = r.fabric.dma_write(r.nic, r.base, &[i; 64]);
                i = i.wrapping_add(1);
                std::thread::sleep(Duration::from_micros(20));
            }
            r.importer.finished();
        });
        std::thread::sleep(Duration::from_millis(5));
        let out = revoke();
        stop.store(true, Ordering::Relaxed);
        out
    })
}

fn replayed(f: &Fabric) -> Verdict {
    Verdict::replay(&f.oracle().events(), &|d| f.device_name(d))
}

#[test]
fn an_honest_importer_leaves_the_oracle_clean() {
    let r = rig(TestImporter::new("nic0", ImporterKind::Pinned, false));
    let report = under_load(&r, || r.mem.revoke(Duration::from_secs(2)));
    assert!(report.is_clean(), "{report}");
    let v = r.fabric.oracle().verdict();
    assert!(v.is_clean(), "{v}: {:?}", v.violations);
    assert_eq!((v.fences, v.acks), (1, 1), "{v}");
    assert_eq!(v, replayed(&r.fabric));
}

#[test]
fn an_early_fence_is_caught_although_the_backstop_stops_its_dma() {
    let r = rig(TestImporter::early_fence("nic0", ImporterKind::Pinned));
    let report = under_load(&r, || r.mem.revoke(Duration::from_secs(2)));
    // The protocol is fooled: the importer signalled in time.
    assert!(report.is_clean(), "{report}");
    // A DMA the importer issues after its promise: the backstop refuses it...
    assert!(r.fabric.dma_write(r.nic, r.base, &[1]).is_err());
    // ...and the oracle names it anyway.
    let v = r.fabric.oracle().verdict();
    assert!(v.dma_after_fence >= 1, "{v}");
    assert!(v.blocked_by_backstop >= 1, "{v}");
    assert_eq!(v.dma_after_ack, 0, "the backstop held: {v}");
    assert!(v.by_culprit.contains_key("nic0"), "{:?}", v.by_culprit);
    assert!(
        v.violations.iter().any(|s| s.contains("dma-after-fence")
            || s.contains("blocked-by-backstop") && s.contains("had signalled")),
        "{:?}",
        v.violations
    );
    assert_eq!(v, replayed(&r.fabric));
}

#[test]
fn a_silent_importer_is_blocked_by_the_backstop_and_named_by_device() {
    let r = rig(TestImporter::new("nic0", ImporterKind::Pinned, true));
    let report = r.mem.revoke(Duration::from_millis(20));
    assert_eq!(report.timed_out(), vec!["nic0"]);
    assert!(r.fabric.dma_write(r.nic, r.base, &[1]).is_err());
    let v = r.fabric.oracle().verdict();
    assert_eq!(v.blocked_by_backstop, 1, "{v}");
    // It never promised anything.
    assert_eq!(v.dma_after_fence, 0, "{v}");
    assert_eq!(v.fences, 0);
    assert_eq!(v.by_culprit.get("nic0"), Some(&1), "{:?}", v.by_culprit);
    assert!(
        v.violations[0].contains("never signalled"),
        "{:?}",
        v.violations
    );
    assert_eq!(v, replayed(&r.fabric));
}

#[test]
fn a_dma_to_moved_memory_is_judged_after_the_window_is_gone() {
    let r = rig(TestImporter::early_fence("nic0", ImporterKind::Dynamic));
    let report = r.mem.relocate(Duration::from_secs(1)).unwrap();
    assert!(report.is_clean(), "{report}");
    // The old address has no window any more: the fault is "unmapped", still the backstop's.
    let e = r.fabric.dma_write(r.nic, r.base, &[1]).unwrap_err();
    assert_eq!(e.kind, dmaplane_core::fabric::FaultKind::Unmapped);
    let v = r.fabric.oracle().verdict();
    assert_eq!((v.dma_after_fence, v.blocked_by_backstop), (1, 1), "{v}");
    assert_eq!(v, replayed(&r.fabric));
}

#[test]
fn an_exporter_that_reuses_memory_before_its_ack_is_caught() {
    for inject in [false, true] {
        let r = rig(TestImporter::new("nic0", ImporterKind::Pinned, false));
        r.fabric.inject_reuse_before_ack(inject);
        r.importer.finished();
        let report = r.mem.revoke(Duration::from_secs(1));
        assert!(report.is_clean(), "{report}");
        // Poisoning after the ack is the exporter's right.
        assert!(r.mem.write(0, &[0xd5; 64]));
        let v = r.fabric.oracle().verdict();
        assert_eq!(v.reused_before_ack, u64::from(inject), "{v}");
        assert_eq!(v.is_clean(), !inject, "{v}");
        if inject {
            assert_eq!(v.by_culprit.get("exporter"), Some(&1));
        }
        assert_eq!(v, replayed(&r.fabric));
    }
}

#[test]
fn a_detach_outside_a_revoke_is_not_the_backstop() {
    let r = rig(TestImporter::new("nic0", ImporterKind::Pinned, false));
    let Rig {
        fabric,
        nic,
        base,
        att,
        ..
    } = r;
    drop(att);
    assert!(fabric.dma_write(nic, base, &[1]).is_err());
    let v = fabric.oracle().verdict();
    assert!(v.is_clean(), "{v}");
    assert_eq!(fabric.faults(nic).no_grant, 1);
}
