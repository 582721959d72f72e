//! Exported memory as a ring's fixed buffer, revoked with reads in flight: every request gets
//! its one completion before the ack, nothing lands after it, and the slot is unregistered —
//! observed from outside the ring (the memory poisoned at the ack, the completions the kernel
//! queued after it), and shown to catch a ring that signals its fence early.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dmaplane_core::user::UserBuffer;
mod common;

use dmaplane_storage::{BufId, Completion, DirectFile, FileId, OpenOptions, Ring, StorageError};

const LEN: u64 = 16 << 20;
const PIECE: u32 = 256 << 10;

fn file_with_data(name: &str) -> (PathBuf, Arc<DirectFile>) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{}", std::process::id()));
    let data: Vec<u8> = (0..LEN).map(|i| (i >> 12) as u8 | 1).collect();
    std::fs::write(&path, &data).unwrap();
    let f = DirectFile::open(&path, OpenOptions::default()).unwrap();
    (path, Arc::new(f))
}

/// What one revoke under reads in flight looked like from outside the ring.
struct Seen {
    submitted: usize,
    before_ack: usize,
    after_ack: usize,
    /// Bytes of the buffer that changed after it was poisoned at the ack.
    changed_after_ack: usize,
    registered_after: bool,
    refused_after: Option<StorageError>,
}

fn revoke_under_reads(early_fence: bool) -> Seen {
    let (path, f) = file_with_data(if early_fence {
        "import-early"
    } else {
        "import"
    });
    let align = u64::from(f.align().mem).max(1);
    let mut ring = Ring::builder()
        .depth(64)
        .file(f)
        .import_slots(2)
        .inject_early_fence(early_fence)
        .build()
        .unwrap();
    // The caller's buffer, one alignment unit larger: reads start at the first aligned byte.
    let ub = Arc::new(UserBuffer::new("dst", vec![0u8; (LEN + align) as usize]).unwrap());
    let skew = (align - ub.process_va() % align) % align;
    let slot = {
        let ub = ub.clone();
        ring.import("dst", move |i, a| ub.attach(i, a)).unwrap()
    };
    assert!(ring.is_registered(slot));
    let n = (LEN / u64::from(PIECE)) as usize;
    for k in 0..n as u64 {
        let off = k * u64::from(PIECE);
        ring.read((FileId(0), off), (slot, skew + off), PIECE, k)
            .unwrap();
    }
    ring.submit().unwrap();
    // The exporter revokes from its own thread; this one keeps reaping, as the owner must.
    let acked = Arc::new(AtomicBool::new(false));
    let revoker = {
        let (ub, acked) = (ub.clone(), acked.clone());
        std::thread::spawn(move || {
            let report = ub.revoke(Duration::from_secs(10));
            // The ack: every completion reaped from here on came after it, and the bytes are
            // poisoned — from here on nothing may change them. (A read landing between the
            // two is hidden by the poison but its completion is counted after the ack.)
            acked.store(true, Ordering::SeqCst);
            ub.write(0, &vec![0xee; (LEN + align) as usize]);
            report
        })
    };
    let (mut before, mut after) = (Vec::new(), Vec::new());
    let start = std::time::Instant::now();
    while before.len() + after.len() < n && start.elapsed() < Duration::from_secs(20) {
        let mut out: Vec<Completion> = Vec::new();
        // Looked at before the reap: the reap that reaps the last request is the one that
        // signals the fence, so the flag may turn within it.
        let was_acked = acked.load(Ordering::SeqCst);
        ring.reap(&mut out, 0).unwrap();
        // Completions reaped by a call that began after the ack came after it.
        if was_acked {
            after.extend(out);
        } else {
            before.extend(out);
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    let report = revoker.join().unwrap();
    assert!(report.is_clean(), "{report}");
    // Give a late DMA every chance to land, then look.
    std::thread::sleep(Duration::from_millis(100));
    let mut got = vec![0u8; (LEN + align) as usize];
    assert!(ub.read(0, &mut got));
    let refused = ring.read((FileId(0), 0), (slot, skew), PIECE, 10_000).err();
    let seen = Seen {
        submitted: n,
        before_ack: before.len(),
        after_ack: after.len(),
        changed_after_ack: got.iter().filter(|&&b| b != 0xee).count(),
        registered_after: ring.is_registered(slot),
        refused_after: refused,
    };
    drop(ring);
    std::fs::remove_file(&path).unwrap();
    seen
}

#[test]
fn a_revoke_with_reads_in_flight_loses_no_completion_and_nothing_lands_after_the_ack() {
    if !common::usable() {
        return;
    }
    let s = revoke_under_reads(false);
    assert_eq!(
        s.before_ack, s.submitted,
        "every request completed once, before the ack"
    );
    assert_eq!(s.after_ack, 0, "completions after the ack");
    assert_eq!(s.changed_after_ack, 0, "bytes changed after the ack");
    assert!(!s.registered_after, "the revoked slot is still registered");
    match s.refused_after {
        Some(StorageError::Revoked { name, epoch, .. }) => {
            assert_eq!((name.as_str(), epoch), ("dst", 0));
        }
        other => panic!("expected the typed revoke for a new read, got {other:?}"),
    }
}

#[test]
fn a_ring_that_signals_its_fence_early_is_caught_by_both_observers() {
    if !common::usable() {
        return;
    }
    // The injected ring acks before its reads are done: reads land after the ack. On a fast
    // disk they may all be done first; a few tries make the window.
    for attempt in 1..=10 {
        let s = revoke_under_reads(true);
        assert_eq!(
            s.before_ack + s.after_ack,
            s.submitted,
            "completions lost (attempt {attempt})"
        );
        if s.after_ack > 0 || s.changed_after_ack > 0 {
            eprintln!(
                "caught on attempt {attempt}: {} completions after the ack, {} bytes changed after it",
                s.after_ack, s.changed_after_ack
            );
            return;
        }
    }
    panic!("an early fence was never caught: the observers cannot fail");
}

#[test]
fn imports_that_do_not_fit_are_refused_saying_why() {
    if !common::usable() {
        return;
    }
    let (path, f) = file_with_data("import-bad");
    let mut ring = Ring::builder().depth(4).file(f).build().unwrap();
    let ub = UserBuffer::new("x", vec![0u8; 8192]).unwrap();
    let e = ring.import("x", |i, a| ub.attach(i, a)).unwrap_err();
    assert!(e.to_string().contains("no free import slot"), "{e}");
    let e = ring.buffer_write(BufId(0), 0, b"x").unwrap_err();
    assert!(e.to_string().contains("`buffer` = 0"), "{e}");
    std::fs::remove_file(&path).unwrap();
}

/// A ring of depth 4 with one import slot over a fresh data file; the file's memory alignment.
fn one_slot_ring(name: &str) -> (PathBuf, u64, Ring) {
    let (path, f) = file_with_data(name);
    let align = u64::from(f.align().mem).max(1);
    let ring = Ring::builder()
        .depth(4)
        .file(f)
        .import_slots(1)
        .build()
        .unwrap();
    (path, align, ring)
}

#[test]
fn a_revoked_slot_refuses_at_once_and_is_reused_by_the_next_import() {
    if !common::usable() {
        return;
    }
    let (path, align, mut ring) = one_slot_ring("import-reuse");
    for round in 0..3u64 {
        let ub = Arc::new(UserBuffer::new("b", vec![0u8; (1 << 20) + align as usize]).unwrap());
        let skew = (align - ub.process_va() % align) % align;
        let slot = {
            let ub = ub.clone();
            ring.import("b", move |i, a| ub.attach(i, a)).unwrap()
        };
        let revoker = {
            let ub = ub.clone();
            std::thread::spawn(move || ub.revoke(Duration::from_secs(10)))
        };
        // Refused as soon as the exporter asked, before this owner reaped anything.
        let refused = loop {
            match ring.read((FileId(0), 0), (slot, skew), 4096, round) {
                Err(e) => break e,
                Ok(()) => {
                    // Not revoked yet: this read is in flight and must complete first.
                    let mut out = Vec::new();
                    while out.is_empty() {
                        ring.reap(&mut out, 1).unwrap();
                    }
                }
            }
        };
        assert!(matches!(refused, StorageError::Revoked { .. }), "{refused}");
        while !revoker.is_finished() {
            ring.progress(&mut Vec::new()).unwrap();
            std::thread::sleep(Duration::from_micros(100));
        }
        let report = revoker.join().unwrap();
        assert!(report.is_clean(), "round {round}: {report}");
        assert!(!ring.is_registered(slot));
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_revoke_of_an_import_that_failed_does_not_touch_the_next_one_in_its_slot() {
    if !common::usable() {
        return;
    }
    let (path, align, mut ring) = one_slot_ring("import-stale");
    // An export revoked while it is being imported: the attachment is made, then revoked (its
    // revoke queued for the ring, which is busy importing and misses the short deadline), so
    // the import fails and its slot stays free.
    let gone = UserBuffer::new("gone", vec![0u8; 8192]).unwrap();
    let e = ring
        .import("gone", |i, a| {
            let att = gone.attach(i, a)?;
            let _ = gone.revoke(Duration::from_millis(10));
            Ok(att)
        })
        .unwrap_err();
    assert!(matches!(e, StorageError::Import { .. }), "{e}");
    // The next import takes the slot; the stale revoke must not be applied to it.
    let ub = Arc::new(UserBuffer::new("next", vec![0u8; (1 << 20) + align as usize]).unwrap());
    let skew = (align - ub.process_va() % align) % align;
    let slot = {
        let ub = ub.clone();
        ring.import("next", move |i, a| ub.attach(i, a)).unwrap()
    };
    ring.read((FileId(0), 0), (slot, skew), 4096, 1).unwrap();
    let mut out = Vec::new();
    while out.is_empty() {
        ring.reap(&mut out, 1).unwrap();
    }
    assert_eq!(ring.check(&out[0]).unwrap(), 4096);
    assert!(
        ring.is_registered(slot),
        "the stale revoke unregistered the new import"
    );
    std::fs::remove_file(&path).unwrap();
}
