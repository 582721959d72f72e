//! The simulated NVMe drive on the built-in testbed: file bytes DMA'd into host memory and into
//! a GPU's BAR1 where the route allows, refused where it does not, and a revoke under reads in
//! flight judged by the fabric's oracle — which also catches a drive that acks early.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dmaplane_core::fabric::{Fabric, HostMemory};
use dmaplane_core::topology::builtin;
use dmaplane_gpu::{DmaClient, SimGpu};
use dmaplane_storage::sim::SimNvme;
use dmaplane_storage::{Completion, FileId, StorageError};

/// The media file every drive here gets first.
const F: FileId = FileId(0);

fn drive(f: &Fabric, path: &std::path::Path, early: bool) -> SimNvme {
    let d = if early {
        SimNvme::with_early_fence(f, "nvme0").unwrap()
    } else {
        SimNvme::new(f, "nvme0").unwrap()
    };
    assert_eq!(d.add_file(path, true).unwrap(), F);
    d
}

const LEN: u64 = 8 << 20;

fn media(name: &str) -> (PathBuf, Vec<u8>) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{}", std::process::id()));
    let data: Vec<u8> = (0..LEN)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

fn reap_n(d: &SimNvme, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let start = std::time::Instant::now();
    while out.len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "only {} of {n} completions",
            out.len()
        );
        d.reap(&mut out, Duration::from_millis(100));
    }
    out
}

#[test]
fn file_bytes_land_in_host_memory_and_go_back_through_the_fabric() {
    let f = Fabric::with_topology(builtin::testbed());
    let (path, data) = media("nvme-host");
    let d = drive(&f, &path, false);
    let host = HostMemory::new(&f, f.device("mem0").unwrap(), "host", LEN).unwrap();
    let b = d
        .import("host", |i, a| host.attach(i, d.device(), a))
        .unwrap();
    for k in 0..8u64 {
        d.read((F, k << 20), (b, k << 20), 1 << 20, k).unwrap();
    }
    let done = reap_n(&d, 8);
    assert!(done.iter().all(|c| c.result == 1 << 20), "{done:?}");
    let mut got = vec![0u8; LEN as usize];
    assert!(host.read(0, &mut got));
    assert!(got == data, "the media's bytes did not land");
    // And back: memory to media.
    assert!(host.write(0, &[0x5a; 4096]));
    d.write((F, 4 << 20), (b, 0), 4096, 99).unwrap();
    assert_eq!(reap_n(&d, 1)[0].result, 4096);
    drop(d);
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[4 << 20..(4 << 20) + 4096], &[0x5a; 4096][..]);
    let v = f.oracle().verdict();
    assert!(v.is_clean(), "{v}");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_gpu_takes_the_drive_peer_to_peer_only_where_the_route_allows() {
    let f = Fabric::with_topology(builtin::testbed());
    let (path, data) = media("nvme-gpu");
    let d = drive(&f, &path, false);
    // nvme0 and gpu0 share host bridge hb0, whose P2P is allow-listed: BAR1, direct.
    let g0 = SimGpu::new(&f, "gpu0").unwrap().into_gpu();
    let m0 = g0.alloc("weights", LEN).unwrap();
    let b = d
        .import("weights", |i, a| {
            m0.attach(i, DmaClient::Fabric(d.device()), a)
        })
        .unwrap();
    d.read((F, 0), (b, 0), LEN, 1).unwrap();
    assert_eq!(reap_n(&d, 1)[0].result, LEN as i32);
    let mut got = vec![0u8; LEN as usize];
    m0.read(0, &mut got).unwrap();
    assert!(got == data, "the media's bytes did not land in the GPU");
    // gpu2 hangs off the other host bridge: no P2P route, so the GPU refuses and says why.
    let g2 = SimGpu::new(&f, "gpu2").unwrap().into_gpu();
    let m2 = g2.alloc("far", LEN).unwrap();
    let e = d
        .import("far", |i, a| m2.attach(i, DmaClient::Fabric(d.device()), a))
        .unwrap_err();
    assert!(matches!(e, StorageError::Import { .. }), "{e}");
    let why = e.to_string();
    assert!(why.contains("far") && why.contains("nvme0"), "{why}");
    let v = f.oracle().verdict();
    assert!(v.is_clean(), "{v}");
    std::fs::remove_file(&path).unwrap();
}

/// Reads in flight into host memory, the memory revoked under them: how the oracle saw it.
fn revoke_under_reads(
    early: bool,
) -> (
    dmaplane_core::fabric::Verdict,
    Vec<Completion>,
    Option<StorageError>,
) {
    let f = Fabric::with_topology(builtin::testbed());
    let (path, _) = media(if early { "nvme-early" } else { "nvme-revoke" });
    let d = if early {
        drive(&f, &path, true)
    } else {
        drive(&f, &path, false)
    };
    let host = Arc::new(HostMemory::new(&f, f.device("mem0").unwrap(), "dst", LEN).unwrap());
    let b = d
        .import("dst", |i, a| host.attach(i, d.device(), a))
        .unwrap();
    const N: u64 = 64;
    let piece = LEN / N;
    for k in 0..N {
        d.read((F, k * piece), (b, k * piece), piece, k).unwrap();
    }
    // Let the engine get going, then revoke from another thread.
    std::thread::sleep(Duration::from_millis(2));
    let report = {
        let host = host.clone();
        std::thread::spawn(move || {
            use dmaplane_core::revoke::Exporter;
            host.revoke(Duration::from_secs(5))
        })
        .join()
        .unwrap()
    };
    assert!(early || report.is_clean(), "{report}");
    let done = reap_n(&d, N as usize);
    let refused = d.read((F, 0), (b, 0), 4096, 1000).err();
    drop(d);
    std::fs::remove_file(&path).unwrap();
    (f.oracle().verdict(), done, refused)
}

#[test]
fn a_revoke_under_reads_cancels_what_did_not_start_and_nothing_lands_after_the_fence() {
    let (v, done, refused) = revoke_under_reads(false);
    assert_eq!(done.len(), 64, "every command completed once");
    let ids: std::collections::BTreeSet<u64> = done.iter().map(|c| c.user_data).collect();
    assert_eq!(ids.len(), 64);
    assert!(
        done.iter()
            .all(|c| c.result == (LEN / 64) as i32 || c.result == -libc::ECANCELED),
        "{done:?}"
    );
    let cancelled = done.iter().filter(|c| c.result == -libc::ECANCELED).count();
    eprintln!(
        "{} read, {cancelled} cancelled by the revoke; {v}",
        64 - cancelled
    );
    assert!(v.is_clean(), "{v}: {:?}", v.violations);
    assert!(v.fences >= 1 && v.acks >= 1, "{v}");
    assert!(
        matches!(refused, Some(StorageError::Revoked { .. })),
        "{refused:?}"
    );
}

#[test]
fn a_drive_that_signals_its_fence_early_is_caught_by_the_oracle() {
    for attempt in 1..=10 {
        let (v, done, _) = revoke_under_reads(true);
        assert_eq!(done.len(), 64, "completions lost (attempt {attempt})");
        if !v.is_clean() {
            eprintln!("caught on attempt {attempt}: {v}");
            assert!(v.dma_after_fence > 0 || v.blocked_by_backstop > 0, "{v}");
            return;
        }
    }
    panic!("an early fence was never caught: the oracle cannot fail here");
}

#[test]
fn bad_commands_are_refused_naming_the_field() {
    let f = Fabric::with_topology(builtin::testbed());
    let (path, _) = media("nvme-bad");
    let d = drive(&f, &path, false);
    let host = HostMemory::new(&f, f.device("mem0").unwrap(), "h", 1 << 20).unwrap();
    let b = d.import("h", |i, a| host.attach(i, d.device(), a)).unwrap();
    let e = d.read((F, 0), (b, 1 << 20), 1, 1).unwrap_err().to_string();
    assert!(e.contains("outside buffer"), "{e}");
    let e = d.read((F, 0), (b, 0), 0, 1).unwrap_err().to_string();
    assert!(e.contains("`len` = 0"), "{e}");
    let e = d
        .read((F, 0), (dmaplane_storage::BufId(7), 0), 1, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`buffer` = 7"), "{e}");
    let e = d
        .read((FileId(3), 0), (b, 0), 1, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`file` = 3"), "{e}");
    let e = SimNvme::new(&f, "nvme9").unwrap_err().to_string();
    assert!(e.contains("nvme9"), "{e}");
    let e = SimNvme::new(&f, "gpu0").unwrap_err().to_string();
    assert!(e.contains("not an NVMe drive"), "{e}");
    // Past the end of the file: the read comes back short by what is missing, as the
    // kernel's reads do, and at the end it moves nothing.
    d.read((F, LEN - 4096), (b, 0), 8192, 5).unwrap();
    let c = reap_n(&d, 1)[0];
    assert_eq!(c.result, 4096);
    assert_eq!(c.request.unwrap().at, LEN - 4096);
    d.read((F, LEN), (b, 0), 4096, 6).unwrap();
    assert_eq!(reap_n(&d, 1)[0].result, 0);
    // A file opened read-only refuses writes with EBADF.
    let ro = d.add_file(&path, false).unwrap();
    d.write((ro, 0), (b, 0), 4096, 7).unwrap();
    assert_eq!(reap_n(&d, 1)[0].result, -libc::EBADF);
    // A buffer with commands queued is not released; one without is, and its slot is reused.
    d.release(b).unwrap();
    let e = d.read((F, 0), (b, 0), 1, 8).unwrap_err().to_string();
    assert!(e.contains("`buffer` = 0"), "{e}");
    drop(d);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn concurrent_imports_get_distinct_slots() {
    let f = Fabric::with_topology(builtin::testbed());
    let d = Arc::new(SimNvme::new(&f, "nvme0").unwrap());
    let mems: Vec<Arc<HostMemory>> = (0..8)
        .map(|i| {
            Arc::new(
                HostMemory::new(&f, f.device("mem0").unwrap(), &format!("m{i}"), 1 << 20).unwrap(),
            )
        })
        .collect();
    for _round in 0..20 {
        let barrier = Arc::new(std::sync::Barrier::new(mems.len()));
        let ids: Vec<u16> = std::thread::scope(|s| {
            let hs: Vec<_> = mems
                .iter()
                .map(|m| {
                    let (d, m, barrier) = (d.clone(), m.clone(), barrier.clone());
                    s.spawn(move || {
                        barrier.wait();
                        d.import("m", |i, a| m.attach(i, d.device(), a)).unwrap().0
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let set: std::collections::BTreeSet<u16> = ids.iter().copied().collect();
        assert_eq!(set.len(), ids.len(), "two imports got one slot: {ids:?}");
        for id in ids {
            d.release(dmaplane_storage::BufId(id)).unwrap();
        }
    }
}
