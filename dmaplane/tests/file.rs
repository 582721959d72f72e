//! File regions through the Agent on the built-in testbed: files read into host memory and GPU
//! memory (straight into gpu0's BAR1, bounced through mem1 for gpu2, which the drive cannot
//! reach), written back, cached, refused with the field named, and a GPU freed under a read
//! judged by the fabric's oracle and a poisoned quarantine.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{T, block_on, pattern};
use dmaplane::{Agent, Error, FileSpec, StoragePath, Testbed};

const MIB: u64 = 1 << 20;

fn path(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}-{}", std::process::id()))
}

/// A file of `len` patterned bytes.
fn shard(name: &str, seed: u64, len: u64) -> (PathBuf, Vec<u8>) {
    let p = path(name);
    let data = pattern(seed, len as usize);
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

fn agent(tb: &std::sync::Arc<Testbed>, nic: &str) -> Agent {
    Agent::builder(format!("a-{nic}"))
        .testbed(tb.clone())
        .nics([nic])
        .chunk(MIB)
        .build()
        .unwrap()
}

fn spec(p: &std::path::Path) -> FileSpec {
    FileSpec::new(p).buffered_fallback()
}

#[test]
fn files_land_in_gpu_memory_direct_where_the_route_allows_and_bounced_where_not() {
    let tb = Testbed::builtin().unwrap();
    let a = agent(&tb, "nic0");
    let (p, data) = shard("file-gpu", 1, 8 * MIB);
    let f = a.register_file(&spec(&p)).unwrap();
    assert_eq!(f.len(), 8 * MIB);
    for (gpu, bounced) in [("gpu0", false), ("gpu1", false), ("gpu2", true)] {
        let m = a.alloc_gpu(gpu, gpu, 8 * MIB).unwrap();
        // nic0 reaches gpu2 only staged; the registration is what descriptors name.
        let r = a.register(&m).unwrap();
        let t = a.read_file(&[f.all()], &[r.all()]).unwrap();
        assert_eq!(t.wait(T).unwrap(), 8 * MIB, "{gpu}");
        match &t.paths()[0] {
            StoragePath::Direct { drive, route } => {
                assert!(!bounced, "{gpu} went direct ({route})");
                assert_eq!(drive, "nvme0");
            }
            StoragePath::Bounced { through, why, .. } => {
                assert!(bounced, "{gpu} bounced: {why}");
                assert_eq!(through, "mem1", "gpu2's NUMA node");
                assert!(why.contains("route") || why.contains("P2P"), "{why}");
            }
        }
        assert_eq!(a.storage_path(&m).unwrap(), t.paths()[0]);
        let mut got = vec![0u8; data.len()];
        m.read(0, &mut got).unwrap();
        assert!(got == data, "the file's bytes did not land in {gpu}");
    }
    let v = tb.fabric().oracle().verdict();
    assert!(v.is_clean(), "{v}");
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn memory_is_written_to_files_and_read_back_in_scattered_pieces() {
    let tb = Testbed::builtin().unwrap();
    let a = agent(&tb, "nic1");
    let out = path("file-out");
    let _ = std::fs::remove_file(&out);
    let f = a
        .register_file(&spec(&out).create(6 * MIB).range(0, 6 * MIB))
        .unwrap();
    assert!(f.is_writable());
    let host = a.alloc_host("host", 4 * MIB).unwrap();
    let gpu = a.alloc_gpu("far", "gpu2", 2 * MIB).unwrap();
    let (hd, gd) = (pattern(7, 4 << 20), pattern(8, 2 << 20));
    host.write(0, &hd).unwrap();
    gpu.write(0, &gd).unwrap();
    let (rh, rg) = (a.register(&host).unwrap(), a.register(&gpu).unwrap());
    // Two pairs in one batch: host memory to the first 4 MiB, gpu2 (bounced) to the rest.
    let t = a
        .write_file(
            &[rh.all(), rg.all()],
            &[
                f.desc(0, 4 * MIB).unwrap(),
                f.desc(4 * MIB, 2 * MIB).unwrap(),
            ],
        )
        .unwrap();
    assert_eq!(t.wait(T).unwrap(), 6 * MIB);
    assert_eq!(t.paths().len(), 2);
    assert!(t.paths()[1].is_bounced(), "{:?}", t.paths());
    let file = std::fs::read(&out).unwrap();
    assert!(file[..4 << 20] == hd[..] && file[4 << 20..] == gd[..]);
    // Back, 64 KiB pieces scattered in reverse order into one host buffer.
    let back = a.alloc_host("back", 6 * MIB).unwrap();
    let rb = a.register(&back).unwrap();
    let n = 6 * MIB / (64 << 10);
    let fd: Vec<_> = (0..n)
        .map(|k| f.desc(k * (64 << 10), 64 << 10).unwrap())
        .collect();
    let md: Vec<_> = (0..n)
        .map(|k| rb.desc((n - 1 - k) * (64 << 10), 64 << 10).unwrap())
        .collect();
    assert_eq!(a.read_file(&fd, &md).unwrap().wait(T).unwrap(), 6 * MIB);
    let mut got = vec![0u8; 64 << 10];
    for k in 0..n {
        back.read((n - 1 - k) * (64 << 10), &mut got).unwrap();
        let at = (k * (64 << 10)) as usize;
        assert!(got[..] == file[at..at + (64 << 10)], "piece {k}");
    }
    let v = tb.fabric().oracle().verdict();
    assert!(v.is_clean(), "{v}");
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn file_registrations_are_cached_like_memory() {
    let tb = Testbed::builtin().unwrap();
    let a = agent(&tb, "nic2");
    let (p, _) = shard("file-cache", 2, 4 * MIB);
    let before = a.stats().cache;
    let whole = a.register_file(&spec(&p)).unwrap();
    let part = a.register_file(&spec(&p).range(MIB, MIB)).unwrap();
    let s = a.stats().cache;
    assert_eq!((s.misses - before.misses, s.hits - before.hits), (1, 1));
    assert_eq!(part.id(), whole.id());
    assert_eq!(part.file_offset(), MIB);
    assert_eq!(
        part.all().offset,
        MIB,
        "a view's descriptors are of the registration"
    );
    // Another path to the same file is the same file.
    let dotted = p.parent().unwrap().join(".").join(p.file_name().unwrap());
    assert_eq!(a.register_file(&spec(&dotted)).unwrap().id(), whole.id());
    // Write access is not served by a read-only registration.
    let rw = a.register_file(&spec(&p).writable()).unwrap();
    assert_ne!(rw.id(), whole.id());
    // A deregistered one is gone from the cache, and refused.
    a.deregister_file(&whole);
    let m = a.alloc_host("m", MIB).unwrap();
    let r = a.register(&m).unwrap();
    let e = a
        .read_file(&[part.desc(0, MIB).unwrap()], &[r.all()])
        .unwrap_err();
    assert!(e.to_string().contains("no such file registration"), "{e}");
    let again = a.register_file(&spec(&p).range(0, MIB)).unwrap();
    assert_eq!(
        again.id(),
        rw.id(),
        "served by the read-write one that is left"
    );
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn bad_file_requests_are_refused_naming_the_field() {
    let tb = Testbed::builtin().unwrap();
    let a = agent(&tb, "nic0");
    let (p, _) = shard("file-bad", 3, 4 * MIB + 100);
    let m = a.alloc_host("m", 8 * MIB).unwrap();
    let r = a.register(&m).unwrap();
    let e = a
        .register_file(&FileSpec::new(path("no-such-file")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`path`") && e.contains("No such file"), "{e}");
    let e = a
        .register_file(&spec(&p).range(4 * MIB, MIB))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`range`") && e.contains("outside the file's"),
        "{e}"
    );
    let f = a.register_file(&spec(&p)).unwrap();
    let e = a
        .read_file(&[f.desc(0, MIB).unwrap()], &[r.desc(0, 2 * MIB).unwrap()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("`len`"), "{e}");
    let e = a
        .write_file(&[r.desc(0, MIB).unwrap()], &[f.desc(0, MIB).unwrap()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("read-only"), "{e}");
    let e = a.read_file(&[], &[]).unwrap_err().to_string();
    assert!(e.contains("`descriptors`"), "{e}");
    if f.is_direct() {
        let al = f.align();
        let e = a
            .read_file(&[f.desc(100, 4096).unwrap()], &[r.desc(0, 4096).unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`offset` = 0x64") && e.contains(&format!("multiples of {}", al.offset)),
            "{e}"
        );
        let e = a
            .read_file(&[f.desc(0, 100).unwrap()], &[r.desc(0, 100).unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`len` = 0x64"), "{e}");
        if al.mem > 1 {
            let e = a
                .read_file(&[f.desc(0, 4096).unwrap()], &[r.desc(1, 4096).unwrap()])
                .unwrap_err()
                .to_string();
            assert!(e.contains("`buffer`"), "{e}");
        }
        // The file's unaligned tail is read whole: a request ending at the end of the file.
        let t = a
            .read_file(&[f.desc(4 * MIB, 100).unwrap()], &[r.desc(0, 100).unwrap()])
            .unwrap();
        assert_eq!(t.wait(T).unwrap(), 100);
    } else {
        eprintln!("no O_DIRECT here: the alignment checks are not exercised");
    }
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn a_file_truncated_under_a_read_ends_it_with_an_error_that_says_so() {
    let tb = Testbed::builtin().unwrap();
    let a = agent(&tb, "nic1");
    let (p, _) = shard("file-trunc", 4, 16 * MIB);
    let f = a.register_file(&spec(&p)).unwrap();
    let m = a.alloc_host("m", 16 * MIB).unwrap();
    let r = a.register(&m).unwrap();
    // Shrunk before the read: the read past the new end comes back short.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(3 * MIB)
        .unwrap();
    let e = a
        .read_file(&[f.all()], &[r.all()])
        .unwrap()
        .wait(T)
        .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, Error::File { op: "read", .. }), "{e}");
    assert!(
        text.contains("short read")
            && text.contains("ends at 0x300000")
            && text.contains("truncated"),
        "{text}"
    );
    // Truncated while the read is under way (racing it): it ends short or whole, never hangs,
    // never says it moved bytes it did not.
    std::fs::write(&p, pattern(4, 16 << 20)).unwrap();
    let t = a.read_file(&[f.all()], &[r.all()]).unwrap();
    std::thread::sleep(Duration::from_micros(500));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    match t.wait(T) {
        Ok(n) => assert_eq!(n, 16 * MIB, "the read finished before the truncation"),
        Err(e) => assert!(e.to_string().contains("short read"), "{e}"),
    }
    std::fs::remove_file(&p).unwrap();
}

/// A GPU freed (quarantined) under a 64 MiB read from a file: the read ends with the typed
/// revoke, the oracle is clean, and nothing lands in the poisoned bytes after the ack.
fn free_under_read(gpu: &str) {
    let tb = Testbed::builtin().unwrap();
    let a = agent(&tb, "nic0");
    let Some((e, report, v, changed)) = free_under_read_on(&tb, &a, gpu) else {
        panic!("every read finished before the free");
    };
    assert!(matches!(e, Error::Revoked { .. }), "{gpu}: {e}");
    assert_eq!(changed, None, "DMA after the ack");
    assert!(v.is_clean(), "{v}: {:?}", v.violations);
    assert!(v.acks >= 1, "{v}");
    eprintln!("{gpu}: {e}; {report}; {v}");
}

/// How a free under a read went: the read's error, the revoke's report, the oracle's verdict
/// and the first poisoned byte changed after the ack (`None` when no read was still under way
/// at the free in 20 tries).
fn free_under_read_on(
    tb: &std::sync::Arc<Testbed>,
    a: &Agent,
    gpu: &str,
) -> Option<(
    Error,
    dmaplane_core::RevokeReport,
    dmaplane_core::fabric::Verdict,
    Option<u64>,
)> {
    let (p, _) = shard(&format!("file-free-{gpu}"), 5, 64 * MIB);
    let f = a.register_file(&spec(&p)).unwrap();
    for attempt in 0..20 {
        let m = a.alloc_gpu(&format!("w{attempt}"), gpu, 64 * MIB).unwrap();
        let r = a.register(&m).unwrap();
        let t = a.read_file(&[f.all()], &[r.all()]).unwrap();
        std::thread::sleep(Duration::from_micros(300));
        if t.is_done() {
            t.wait(T).unwrap();
            continue;
        }
        let (report, q) = m.free_quarantined(Duration::from_secs(5)).unwrap();
        q.fill(0xee).unwrap();
        let e = t.wait(T).unwrap_err();
        eprintln!("attempt {attempt}: {e}");
        // The transfer ended: every piece the drive took completed. Nothing may change the
        // poisoned bytes from here on.
        std::thread::sleep(Duration::from_millis(20));
        let changed = q.first_change(0xee).unwrap();
        std::fs::remove_file(&p).unwrap();
        return Some((e, report, tb.fabric().oracle().verdict(), changed));
    }
    std::fs::remove_file(&p).unwrap();
    None
}

#[test]
fn a_gpu_freed_under_a_direct_read_ends_it_revoked_and_nothing_lands_after_the_ack() {
    free_under_read("gpu0");
}

#[test]
fn a_gpu_freed_under_a_bounced_read_ends_it_revoked_and_nothing_lands_after_the_ack() {
    free_under_read("gpu2");
}

#[test]
fn a_drive_that_fences_early_is_caught_by_the_oracle() {
    // The same free under a read, the drive's importers breaking the protocol on purpose:
    // this is what the two tests above would see if the drive acknowledged before stopping.
    for attempt in 1..=10 {
        let tb = Testbed::builtin().unwrap();
        let a = Agent::builder("early")
            .testbed(tb.clone())
            .nics(["nic0"])
            .inject(Some(dmaplane::Fault::EarlyFence))
            .build()
            .unwrap();
        let Some((_, _, v, changed)) = free_under_read_on(&tb, &a, "gpu0") else {
            continue;
        };
        if !v.is_clean() || changed.is_some() {
            eprintln!("caught on attempt {attempt}: {v}; first poisoned byte changed: {changed:?}");
            assert!(v.dma_after_fence > 0 || v.dma_after_ack > 0, "{v}");
            return;
        }
    }
    panic!("an early fence was never caught: the checks cannot fail here");
}

#[test]
fn a_peers_published_file_is_read_straight_into_my_gpu_and_written_back() {
    let tb = Testbed::builtin().unwrap();
    let owner = agent(&tb, "nic1");
    let me = agent(&tb, "nic0");
    let (p, data) = shard("file-published", 9, 8 * MIB);
    let ro = owner
        .publish_file(&owner.register_file(&spec(&p)).unwrap())
        .unwrap();
    let rw = owner
        .publish_file(
            &owner
                .register_file(&spec(&p).writable().range(4 * MIB, 4 * MIB))
                .unwrap(),
        )
        .unwrap();
    let peer = me.connect(&owner.metadata_blob().unwrap()).unwrap();
    while peer.region(rw.id()).is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let info = peer.region(ro.id()).unwrap();
    assert_eq!(
        info.file.as_deref(),
        Some(std::fs::canonicalize(&p).unwrap().to_str().unwrap())
    );
    assert!(info.keys.iter().all(|k| k.staged), "{info:?}");
    // The owner's file → its drive → its buffer → nic1 → nic0 → my gpu0, in two pieces.
    let gpu = me.alloc_gpu("weights", "gpu0", 8 * MIB).unwrap();
    let g = me.register(&gpu).unwrap();
    let t = me
        .read(
            &peer,
            &[
                g.desc(0, 5 * MIB).unwrap(),
                g.desc(5 * MIB, 3 * MIB).unwrap(),
            ],
            &[
                peer.desc(ro.id(), 0, 5 * MIB).unwrap(),
                peer.desc(ro.id(), 5 * MIB, 3 * MIB).unwrap(),
            ],
            None,
        )
        .unwrap();
    t.wait(T).unwrap();
    let mut got = vec![0u8; data.len()];
    gpu.read(0, &mut got).unwrap();
    assert!(got == data, "the peer's file did not land in my GPU");
    // My bytes into the peer's writable range of the file: landed, then written to the file.
    let mine = pattern(10, 4 << 20);
    let host = me.alloc_host("mine", 4 * MIB).unwrap();
    host.write(0, &mine).unwrap();
    let h = me.register(&host).unwrap();
    me.write(
        &peer,
        &[h.all()],
        &[peer.desc(rw.id(), 0, 4 * MIB).unwrap()],
        None,
    )
    .unwrap()
    .wait(T)
    .unwrap();
    let file = std::fs::read(&p).unwrap();
    assert!(file[4 << 20..] == mine[..] && file[..4 << 20] == data[..4 << 20]);
    // The read-only one refuses a WRITE, saying so.
    let e = me
        .write(
            &peer,
            &[h.all()],
            &[peer.desc(ro.id(), 0, 4 * MIB).unwrap()],
            None,
        )
        .unwrap()
        .wait(T)
        .unwrap_err()
        .to_string();
    assert!(e.contains("published read-only"), "{e}");
    let v = tb.fabric().oracle().verdict();
    assert!(v.is_clean(), "{v}");
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn a_write_to_a_file_system_that_fills_up_ends_with_enospc() {
    // A small file system (a tmpfs of a few MiB; .ci/run mounts one where it may).
    let Ok(dir) = std::env::var("DMAPLANE_SMALL_FS") else {
        assert_ne!(
            std::env::var("DMAPLANE_REQUIRE_FAULTS").as_deref(),
            Ok("1"),
            "DMAPLANE_SMALL_FS is not set, and DMAPLANE_REQUIRE_FAULTS=1"
        );
        eprintln!("skipped: DMAPLANE_SMALL_FS is not set");
        return;
    };
    let st = rustix::fs::statvfs(dir.as_str()).unwrap();
    let size = st.f_blocks * st.f_frsize;
    let tb = Testbed::builtin().unwrap();
    let a = agent(&tb, "nic2");
    let p = PathBuf::from(&dir).join(format!("agent-fill-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    // Created sparse at twice the file system's size: the blocks run out as it is written.
    let f = a.register_file(&spec(&p).create(2 * size)).unwrap();
    let m = a.alloc_host("m", 2 * size).unwrap();
    let r = a.register(&m).unwrap();
    let e = a
        .write_file(&[r.all()], &[f.all()])
        .unwrap()
        .wait(T)
        .unwrap_err();
    std::fs::remove_file(&p).unwrap();
    eprintln!("{dir} ({size} bytes): {e}");
    assert!(matches!(e, Error::File { op: "write", .. }), "{e}");
    assert!(
        e.to_string()
            .contains("no space left on the file system (ENOSPC)"),
        "{e}"
    );
}

/// Whether io_uring and O_DIRECT work here (a container's seccomp profile may forbid io_uring):
/// where not, the kernel-engine tests say so and pass, unless `DMAPLANE_REQUIRE_IO_URING=1`.
fn io_uring_usable() -> bool {
    match dmaplane_storage::Ring::builder().depth(2).build() {
        Ok(_) => true,
        Err(e)
            if e.is_unavailable()
                && std::env::var("DMAPLANE_REQUIRE_IO_URING").as_deref() != Ok("1") =>
        {
            eprintln!("skipped: {e} (set DMAPLANE_REQUIRE_IO_URING=1 to make this fail)");
            false
        }
        Err(e) => panic!("io_uring: {e}"),
    }
}

fn kernel_agent(tb: &std::sync::Arc<Testbed>, nic: &str, fault: Option<dmaplane::Fault>) -> Agent {
    Agent::builder(format!("k-{nic}"))
        .testbed(tb.clone())
        .nics([nic])
        .chunk(MIB)
        .io_uring(true)
        .inject(fault)
        .build()
        .unwrap()
}

#[test]
fn the_kernel_engine_reads_with_o_direct_into_host_memory_and_bounces_gpu_memory() {
    if !io_uring_usable() {
        return;
    }
    let tb = Testbed::builtin().unwrap();
    let a = kernel_agent(&tb, "nic0", None);
    let (p, data) = shard("file-kernel", 11, 8 * MIB);
    let f = a.register_file(&FileSpec::new(&p).writable()).unwrap();
    assert!(
        f.is_direct(),
        "the target directory's file system takes O_DIRECT"
    );
    let host = a.alloc_host("host", 8 * MIB).unwrap();
    let gpu = a.alloc_gpu("gpu", "gpu0", 8 * MIB).unwrap();
    let (h, g) = (a.register(&host).unwrap(), a.register(&gpu).unwrap());
    let t = a
        .read_file(&[f.all(), f.all()], &[h.all(), g.all()])
        .unwrap();
    assert_eq!(t.wait(T).unwrap(), 16 * MIB);
    match t.paths() {
        [
            StoragePath::Direct { drive, route },
            StoragePath::Bounced { why, .. },
        ] => {
            assert_eq!(drive, "io_uring");
            assert!(route.contains("kernel"), "{route}");
            assert!(why.contains("bounce"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    let mut got = vec![0u8; data.len()];
    host.read(0, &mut got).unwrap();
    assert!(got == data, "host memory");
    gpu.read(0, &mut got).unwrap();
    assert!(got == data, "GPU memory, through the bounce");
    // And back from the GPU (bounced) into the file's second half, O_DIRECT.
    let mine = pattern(12, 4 << 20);
    gpu.write(0, &mine).unwrap();
    a.write_file(
        &[g.desc(0, 4 * MIB).unwrap()],
        &[f.desc(4 * MIB, 4 * MIB).unwrap()],
    )
    .unwrap()
    .wait(T)
    .unwrap();
    let file = std::fs::read(&p).unwrap();
    assert!(file[4 << 20..] == mine[..] && file[..4 << 20] == data[..4 << 20]);
    // O_DIRECT's alignment is the kernel's to enforce here too: refused before submission.
    let e = a
        .read_file(&[f.desc(100, 4096).unwrap()], &[h.desc(0, 4096).unwrap()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("`offset` = 0x64"), "{e}");
    std::fs::remove_file(&p).unwrap();
}

/// Host memory freed (quarantined) under a 64 MiB O_DIRECT read on the kernel engine: how the
/// read ended, and the first poisoned byte that changed after the ack (the kernel's DMA has no
/// oracle: the poison is the observer).
fn kernel_free_under_read(fault: Option<dmaplane::Fault>) -> Option<(Error, Option<u64>)> {
    let tb = Testbed::builtin().unwrap();
    let a = kernel_agent(&tb, "nic1", fault);
    let (p, _) = shard(
        &format!("file-kernel-free-{}", fault.map_or("none", |f| f.name())),
        13,
        64 * MIB,
    );
    let f = a.register_file(&FileSpec::new(&p)).unwrap();
    let mut found = None;
    for attempt in 0..20 {
        let m = a.alloc_host(&format!("dst{attempt}"), 64 * MIB).unwrap();
        let r = a.register(&m).unwrap();
        let t = a.read_file(&[f.all()], &[r.all()]).unwrap();
        std::thread::sleep(Duration::from_micros(500));
        if t.is_done() {
            t.wait(T).unwrap();
            continue;
        }
        let (_, q) = match m.free_quarantined(Duration::from_secs(5)) {
            Ok(x) => x,
            Err(e) => panic!("the free: {e}"),
        };
        q.fill(0xee).unwrap();
        let e = t.wait(T).unwrap_err();
        std::thread::sleep(Duration::from_millis(20));
        found = Some((e, q.first_change(0xee).unwrap()));
        break;
    }
    std::fs::remove_file(&p).unwrap();
    found
}

#[test]
fn host_memory_freed_under_a_kernel_read_ends_it_revoked_and_nothing_lands_after_the_ack() {
    if !io_uring_usable() {
        return;
    }
    let (e, changed) = kernel_free_under_read(None).expect("every read finished before the free");
    eprintln!("{e}");
    assert!(matches!(e, Error::Revoked { .. }), "{e}");
    assert_eq!(
        changed, None,
        "the kernel wrote into the memory after the ack"
    );
}

#[test]
fn a_ring_that_fences_early_is_caught_by_the_poison() {
    if !io_uring_usable() {
        return;
    }
    for attempt in 1..=10 {
        if let Some((e, Some(at))) = kernel_free_under_read(Some(dmaplane::Fault::EarlyFence)) {
            eprintln!(
                "caught on attempt {attempt}: poisoned byte {at:#x} changed after the ack; the read: {e}"
            );
            return;
        }
    }
    panic!("an early fence was never caught: the poison cannot fail here");
}

#[test]
fn a_file_let_go_of_mid_read_leaves_the_kernel_engine_working() {
    if !io_uring_usable() {
        return;
    }
    // The last references to a file registration and to a transfer dropped while its pieces
    // are on the ring: they go on the ring's thread, which must not lock itself out. A
    // deadlock there would hang every wait (they take the drive's lock), so the body runs on
    // its own thread and a minute without it finishing fails the test.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let_go_mid_read();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("the kernel engine locked itself out (deadlock)")
        }
        Err(e) => panic!("the test body panicked: {e}"),
    }
}

fn let_go_mid_read() {
    let tb = Testbed::builtin().unwrap();
    let a = kernel_agent(&tb, "nic2", None);
    let (p, data) = shard("file-kernel-drop", 14, 16 * MIB);
    let m = a.alloc_host("m", 16 * MIB).unwrap();
    let r = a.register(&m).unwrap();
    for _ in 0..5 {
        let f = a.register_file(&FileSpec::new(&p)).unwrap();
        let t = a.read_file(&[f.all()], &[r.all()]).unwrap();
        a.deregister_file(&f);
        drop(f);
        drop(t);
    }
    let f = a.register_file(&FileSpec::new(&p)).unwrap();
    let t = a.read_file(&[f.all()], &[r.all()]).unwrap();
    assert_eq!(t.wait(T).unwrap(), 16 * MIB, "the engine is stuck");
    let mut got = vec![0u8; data.len()];
    m.read(0, &mut got).unwrap();
    assert!(got == data);
    // A tail that is not a whole block: the kernel's O_DIRECT would move the whole block, past
    // the descriptor, so it is refused saying so.
    let (q, _) = shard("file-kernel-tail", 15, MIB + 100);
    let g = a.register_file(&FileSpec::new(&q)).unwrap();
    if g.is_direct() {
        let e = a
            .read_file(&[g.desc(MIB, 100).unwrap()], &[r.desc(0, 100).unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a whole") && e.contains("pad the file"),
            "{e}"
        );
    }
    std::fs::remove_file(&p).unwrap();
    std::fs::remove_file(&q).unwrap();
}

#[test]
fn a_file_transfer_is_a_future_on_both_engines() {
    let tb = Testbed::builtin().unwrap();
    let (p, data) = shard("file-future", 16, 8 * MIB);
    let mut agents = vec![agent(&tb, "nic0")];
    if io_uring_usable() {
        agents.push(kernel_agent(&tb, "nic1", None));
    }
    for a in &agents {
        let f = a.register_file(&spec(&p)).unwrap();
        let m = a.alloc_gpu("w", "gpu2", 8 * MIB).unwrap();
        let r = a.register(&m).unwrap();
        // gpu2 bounces on both engines: the copy engine's pieces end it too.
        assert_eq!(
            block_on(a.read_file(&[f.all()], &[r.all()]).unwrap()).unwrap(),
            8 * MIB
        );
        let mut got = vec![0u8; data.len()];
        m.read(0, &mut got).unwrap();
        assert!(got == data, "{}", a.name());
    }
    std::fs::remove_file(&p).unwrap();
}
