//! The real dma-buf exporters (udmabuf, system dma-heap).
//!
//! Where `/dev/udmabuf` or `/dev/dma_heap/system` is missing, the tests that need them print why
//! and pass — unless `DMAPLANE_REQUIRE_DMABUF=1`, as in the qemu testbed, where a missing device
//! is a failure. The clean-error tests check whichever case this machine is in.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestImporter;
use dmaplane_core::dmabuf::{
    DMA_HEAP_SYSTEM_PATH, DMABUF_GRANULE, DmaBufError, DmaBufKind, DmaBufMemory, DmaHeapBuf,
    SyncAccess, UDMABUF_PATH, UdmaBuf,
};
use dmaplane_core::revoke::{AttachError, Exporter, ImporterKind, Outcome};
use dmaplane_core::{Accept, Access, AddrSpace, DmaBufId, DmaRange, Hints, SpaceKind};

const MIB: u64 = 1 << 20;

fn required() -> bool {
    std::env::var("DMAPLANE_REQUIRE_DMABUF").is_ok_and(|v| v == "1")
}

/// Unwrap a constructor; `None` (after saying why) when the device is unavailable here and not
/// required. Any other error fails the test.
fn or_skip<T>(what: &str, r: Result<T, DmaBufError>) -> Option<T> {
    match r {
        Ok(t) => Some(t),
        Err(e) if e.is_unavailable() && !required() => {
            eprintln!("skipping {what}: {e} (set DMAPLANE_REQUIRE_DMABUF=1 to make this fail)");
            None
        }
        Err(e) => panic!("{what}: {e}"),
    }
}

fn udmabuf(name: &str, size: u64) -> Option<UdmaBuf> {
    or_skip("udmabuf test", UdmaBuf::new(name, size))
}

fn heap(size: u64) -> Option<DmaHeapBuf> {
    or_skip("dma-heap test", DmaHeapBuf::new(size))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Identity of an fd as the exporter computes it.
fn id_of(fd: impl std::os::fd::AsFd) -> DmaBufId {
    let st = rustix::fs::fstat(fd).unwrap();
    DmaBufId {
        dev: st.st_dev,
        ino: st.st_ino,
    }
}

#[test]
fn missing_devices_give_clean_distinct_errors() {
    let udmabuf_present = std::path::Path::new(UDMABUF_PATH).exists();
    match UdmaBuf::probe() {
        Ok(()) => assert!(udmabuf_present),
        Err(e) => {
            let s = e.to_string();
            assert!(e.is_unavailable(), "{s}");
            assert!(!required(), "udmabuf is required here: {s}");
            if !udmabuf_present {
                assert!(matches!(e, DmaBufError::NotPresent { .. }), "{s}");
                assert!(s.starts_with("/dev/udmabuf not present: "), "{s}");
                assert!(
                    s.contains("udmabuf module") && s.contains("CONFIG_UDMABUF"),
                    "{s}"
                );
                // The constructor reports the same thing, and does no other work first.
                let e2 = UdmaBuf::new("absent", MIB).unwrap_err();
                assert_eq!(e2.to_string(), s);
            }
        }
    }
    let heap_present = std::path::Path::new(DMA_HEAP_SYSTEM_PATH).exists();
    match DmaHeapBuf::probe() {
        Ok(()) => assert!(heap_present),
        Err(e) => {
            let s = e.to_string();
            assert!(e.is_unavailable(), "{s}");
            assert!(!required(), "the system dma-heap is required here: {s}");
            if !heap_present {
                assert!(matches!(e, DmaBufError::NotPresent { .. }), "{s}");
                assert!(s.starts_with("/dev/dma_heap/system not present: "), "{s}");
                assert!(s.contains("CONFIG_DMABUF_HEAPS"), "{s}");
                let e2 = DmaHeapBuf::new(MIB).unwrap_err();
                assert_eq!(e2.to_string(), s);
            }
        }
    }
}

#[test]
fn bad_sizes_are_refused_before_touching_a_device() {
    for size in [0, 100, MIB + 1] {
        let e = UdmaBuf::new("bad", size).unwrap_err();
        assert!(matches!(e, DmaBufError::BadSize { .. }), "{e}");
        assert!(!e.is_unavailable());
        let e = DmaHeapBuf::new(size).unwrap_err();
        assert!(matches!(e, DmaBufError::BadSize { .. }), "{e}");
    }
}

#[test]
fn required_devices_are_present() {
    if !required() {
        eprintln!("DMAPLANE_REQUIRE_DMABUF is not 1: not requiring the devices");
        return;
    }
    UdmaBuf::probe().unwrap();
    DmaHeapBuf::probe().unwrap();
}

/// Write through the mapping, read back, with syncs; out-of-bounds accesses fail cleanly.
fn roundtrip(mem: &DmaBufMemory) {
    let len = mem.len();
    assert!(!mem.is_empty());
    let a = pattern(1, 4096);
    let b = pattern(7, 10_000);
    mem.sync_start(SyncAccess::Write).unwrap();
    mem.write(0, &a).unwrap();
    mem.write(len - b.len() as u64, &b).unwrap();
    mem.sync_end(SyncAccess::Write).unwrap();

    mem.sync_start(SyncAccess::Read).unwrap();
    let mut got = vec![0u8; a.len()];
    mem.read(0, &mut got).unwrap();
    assert_eq!(got, a);
    let mut got = vec![0u8; b.len()];
    mem.read(len - b.len() as u64, &mut got).unwrap();
    assert_eq!(got, b);
    mem.sync_end(SyncAccess::Read).unwrap();

    mem.sync_start(SyncAccess::ReadWrite).unwrap();
    mem.sync_end(SyncAccess::ReadWrite).unwrap();

    let e = mem.write(len - 1, &[0, 0]).unwrap_err();
    assert!(matches!(e, DmaBufError::OutOfBounds { .. }), "{e}");
    assert!(e.to_string().contains(mem.name()), "{e}");
    assert!(mem.read(u64::MAX, &mut [0u8; 1]).is_err());
    // A failed access wrote nothing.
    let mut last = [0u8; 1];
    mem.read(len - 1, &mut last).unwrap();
    assert_eq!(last[0], *b.last().unwrap());
}

#[test]
fn udmabuf_maps_syncs_and_shares_pages_with_its_memfd() {
    let Some(buf) = udmabuf("roundtrip", 4 * MIB) else {
        return;
    };
    assert_eq!(buf.kind(), DmaBufKind::Udmabuf);
    assert_eq!(buf.len(), 4 * MIB);
    assert_eq!(buf.name(), "roundtrip");
    assert_eq!(buf.process_va() % DMABUF_GRANULE, 0);
    roundtrip(&buf);

    // The same pages: a write through the CPU view is in the memfd, and back.
    let mut seen = vec![0u8; 4096];
    rustix::io::pread(buf.memfd(), &mut seen, 0).unwrap();
    assert_eq!(seen, pattern(1, 4096));
    let c = pattern(42, 8192);
    rustix::io::pwrite(buf.memfd(), &c, MIB).unwrap();
    buf.sync_start(SyncAccess::Read).unwrap();
    let mut got = vec![0u8; c.len()];
    buf.read(MIB, &mut got).unwrap();
    buf.sync_end(SyncAccess::Read).unwrap();
    assert_eq!(got, c);

    // The identity is the dma-buf file's, whichever fd refers to it.
    let dup = rustix::io::dup(buf.fd()).unwrap();
    assert_eq!(buf.id(), id_of(&dup));
    assert_ne!(buf.id(), id_of(buf.memfd()));

    // Still the same data through the common type.
    let mem = buf.into_memory();
    let mut got = vec![0u8; 4096];
    mem.read(0, &mut got).unwrap();
    assert_eq!(got, pattern(1, 4096));
}

#[test]
fn system_heap_maps_and_syncs() {
    let Some(buf) = heap(2 * MIB) else {
        return;
    };
    assert_eq!(buf.kind(), DmaBufKind::SystemHeap);
    assert_eq!(buf.len(), 2 * MIB);
    assert!(buf.name().starts_with("dma-heap-system-"), "{}", buf.name());
    roundtrip(&buf);
    let other = heap(MIB).unwrap();
    assert_ne!(buf.id(), other.id());
    assert_ne!(buf.name(), other.name());
}

fn check_offers(mem: &DmaBufMemory) {
    let offers = mem.offers();
    assert_eq!(offers.len(), 2);
    assert_eq!(offers[0].space, AddrSpace::DmaBuf { id: mem.id() });
    assert_eq!(offers[1].space, AddrSpace::ProcessVa);
    assert!(offers.iter().all(|o| o.hints == Hints::HOST_MEMORY));

    let l = mem.addr_list(&offers[0]).unwrap();
    assert_eq!(l.space(), AddrSpace::DmaBuf { id: mem.id() });
    assert_eq!(l.granule(), DMABUF_GRANULE);
    assert_eq!(l.ranges(), &[DmaRange::new(0, mem.len())]);
    let l = mem.addr_list(&offers[1]).unwrap();
    assert_eq!(l.ranges(), &[DmaRange::new(mem.process_va(), mem.len())]);
    assert_eq!(l.hints(), Hints::HOST_MEMORY);

    // Spaces it does not offer, and another buffer's identity, are refused by name.
    let mut bad = offers[0];
    bad.space = AddrSpace::CpuPhys;
    let e = mem.addr_list(&bad).unwrap_err();
    assert!(e.to_string().contains("cpu-phys is not offered"), "{e}");
    bad.space = AddrSpace::DmaBuf {
        id: DmaBufId { dev: 0, ino: 0 },
    };
    assert!(mem.addr_list(&bad).is_err());
}

#[test]
fn offers_dma_buf_first_then_process_va() {
    if let Some(buf) = udmabuf("offers", MIB) {
        check_offers(&buf);
    }
    if let Some(buf) = heap(MIB) {
        check_offers(&buf);
    }
}

fn rw(space: SpaceKind) -> Vec<Accept> {
    vec![Accept::new(space, Access::READ_WRITE)]
}

/// Attach a dma-buf importer and a by-address importer, revoke, and check the protocol.
fn attach_and_revoke(mem: &DmaBufMemory) {
    let kernel = Arc::new(TestImporter::new("mr-dmabuf", ImporterKind::Pinned, false));
    let by_va = Arc::new(TestImporter::new("mr-by-va", ImporterKind::Dynamic, false));

    // An importer that takes either gets the exporter's first choice: the dma-buf.
    let both = vec![
        Accept::new(SpaceKind::ProcessVa, Access::READ_WRITE),
        Accept::new(SpaceKind::DmaBuf, Access::READ_WRITE),
    ];
    let a1 = mem.attach(kernel.clone(), &both).unwrap();
    let m1 = a1.map().unwrap();
    assert_eq!(m1.list.space(), AddrSpace::DmaBuf { id: mem.id() });
    assert_eq!(m1.list.ranges(), &[DmaRange::new(0, mem.len())]);

    // One that registers by address only (Soft-RoCE's fallback) gets the mapping.
    let a2 = mem
        .attach(by_va.clone(), &rw(SpaceKind::ProcessVa))
        .unwrap();
    let m2 = a2.map().unwrap();
    assert_eq!(m2.list.space(), AddrSpace::ProcessVa);
    assert_eq!(m2.list.ranges()[0].addr, mem.process_va());
    assert_eq!(mem.attachments(), 2);

    // Nothing matches: an error naming both sides.
    let nic = Arc::new(TestImporter::new("phys-only", ImporterKind::Pinned, false));
    let e = mem.attach(nic, &rw(SpaceKind::CpuPhys)).unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, AttachError::Negotiate(_)), "{s}");
    assert!(s.contains(mem.name()) && s.contains("phys-only"), "{s}");

    // Both importers are idle: they signal as soon as they are invalidated.
    kernel.finished();
    by_va.finished();
    let epoch = mem.epoch();
    let report = Exporter::revoke(mem, Duration::from_secs(5));
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.export, mem.name());
    assert_eq!(report.epoch, epoch);
    assert_eq!(report.importers.len(), 2);
    assert!(
        report
            .importers
            .iter()
            .all(|i| matches!(i.outcome, Outcome::Signalled { .. }))
    );
    assert_eq!(kernel.invalidations(), 1);
    assert_eq!(by_va.invalidations(), 1);
    assert!(mem.is_revoked());
    assert_eq!(mem.attachments(), 0);
    assert!(matches!(a1.map(), Err(AttachError::Revoked { .. })));
    assert!(a2.check(m2.epoch).is_err());
    let late = Arc::new(TestImporter::new("late", ImporterKind::Pinned, false));
    assert!(matches!(
        mem.attach(late, &rw(SpaceKind::DmaBuf)),
        Err(AttachError::Revoked { .. })
    ));
    assert!(mem.revoke(Duration::from_millis(10)).already_revoked);

    // The exporter still owns its memory: the CPU view works until it is dropped.
    mem.write(0, b"after revoke").unwrap();
}

#[test]
fn attach_negotiates_and_revoke_quiesces_importers() {
    if let Some(buf) = udmabuf("attach", MIB) {
        attach_and_revoke(&buf);
    }
    if let Some(buf) = heap(MIB) {
        attach_and_revoke(&buf);
    }
}

#[test]
fn lying_importer_is_named_and_drop_revokes_first() {
    let Some(buf) = udmabuf("liar", MIB) else {
        return;
    };
    let liar = Arc::new(TestImporter::new("liar", ImporterKind::Pinned, true));
    let att = buf.attach(liar.clone(), &rw(SpaceKind::DmaBuf)).unwrap();
    let report = buf.revoke(Duration::from_millis(50));
    assert_eq!(report.timed_out(), vec!["liar"]);
    assert!(matches!(att.map(), Err(AttachError::Revoked { .. })));

    // Dropping an exporter with live attachments invalidates them before it unmaps.
    let Some(buf) = heap(MIB).map(DmaHeapBuf::into_memory) else {
        return;
    };
    let imp = Arc::new(TestImporter::new("held", ImporterKind::Dynamic, false));
    imp.finished();
    let att = buf.attach(imp.clone(), &rw(SpaceKind::ProcessVa)).unwrap();
    drop(buf);
    assert_eq!(imp.invalidations(), 1);
    assert!(matches!(att.map(), Err(AttachError::Revoked { .. })));
}

#[test]
fn a_dma_buf_fd_from_elsewhere_is_imported_and_other_files_are_refused() {
    // Not a dma-buf: a memfd (refused by its fdinfo, or — without /proc — by its mapping
    // being a plain file's, which an importer would then see through the fstat check).
    let memfd = rustix::fs::memfd_create("not-a-dmabuf", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&memfd, 4096).unwrap();
    if std::path::Path::new("/proc/self/fdinfo").exists() {
        let err = DmaBufMemory::import("memfd", memfd).unwrap_err();
        assert!(matches!(err, DmaBufError::NotADmaBuf { .. }), "{err}");
        assert!(err.to_string().contains("exp_name"), "{err}");
    }
    let Some(buf) = udmabuf("exported", 2 * MIB) else {
        return;
    };
    buf.write(0, &pattern(9, 8192)).unwrap();
    // Handed over as a plain fd, as another process or driver would.
    let fd = rustix::io::dup(buf.fd()).unwrap();
    let imported = DmaBufMemory::import("imported", fd).unwrap();
    assert_eq!(imported.kind(), DmaBufKind::Imported);
    assert_eq!(imported.len(), 2 * MIB, "the size is the dma-buf's");
    assert_eq!(imported.id(), buf.id(), "the same dma-buf");
    let mut got = vec![0u8; 8192];
    imported.read(0, &mut got).unwrap();
    assert_eq!(got, pattern(9, 8192), "the same pages");
    imported.write(MIB, b"both ways").unwrap();
    let mut back = [0u8; 9];
    buf.read(MIB, &mut back).unwrap();
    assert_eq!(&back, b"both ways");
    roundtrip(&imported);
}
