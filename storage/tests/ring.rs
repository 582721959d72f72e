//! The ring and the direct file on this machine's kernel: bytes through O_DIRECT both ways,
//! every completion kept when the completion queue overflows, bad input refused by name.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

mod common;

use dmaplane_storage::{BufId, DirectFile, FileId, OpenOptions, Ring, StorageError};

const RW: OpenOptions = OpenOptions {
    write: true,
    create: true,
    buffered_fallback: false,
};

/// A fresh file under the target directory (the repository's file system, which takes
/// O_DIRECT where /tmp may be a tmpfs that does not).
fn scratch(name: &str, len: u64) -> (PathBuf, Arc<DirectFile>) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let f = DirectFile::open(&path, RW).unwrap();
    f.set_len(len).unwrap();
    (path, Arc::new(f))
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 9) as u8)
        .collect()
}

use common::reap_all;

#[test]
fn bytes_go_out_and_come_back_through_o_direct_in_one_batch() {
    if !common::usable() {
        return;
    }
    const LEN: u64 = 1 << 20;
    let (path, f) = scratch("roundtrip", LEN);
    assert!(f.is_direct());
    let mut ring = Ring::builder()
        .depth(16)
        .buffer(LEN)
        .buffer(LEN)
        .file(f)
        .build()
        .unwrap();
    let data = pattern(3, LEN as usize);
    ring.buffer_write(BufId(0), 0, &data).unwrap();
    // 16 writes of 64 KiB in one batch, then 16 reads into the other buffer.
    const PIECE: u32 = 64 << 10;
    for k in 0..16u64 {
        let off = k * u64::from(PIECE);
        ring.write((FileId(0), off), (BufId(0), off), PIECE, k)
            .unwrap();
    }
    let done = reap_all(&mut ring, 16);
    assert!(done.iter().all(|c| c.bytes().unwrap() == PIECE), "{done:?}");
    for k in 0..16u64 {
        let off = k * u64::from(PIECE);
        ring.read((FileId(0), off), (BufId(1), off), PIECE, 100 + k)
            .unwrap();
    }
    let done = reap_all(&mut ring, 16);
    let ids: BTreeSet<u64> = done.iter().map(|c| c.user_data).collect();
    assert_eq!(ids, (100..116).collect(), "each request once");
    let mut got = vec![0u8; LEN as usize];
    ring.buffer_read(BufId(1), 0, &mut got).unwrap();
    assert!(got == data, "the bytes read back differ");
    // And they are in the file, as a plain read sees it.
    assert!(std::fs::read(&path).unwrap() == data);
    assert_eq!(ring.in_flight(), 0);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn completions_that_overflow_the_completion_queue_are_all_reaped() {
    if !common::usable() {
        return;
    }
    // Depth 4: a completion queue of 8. 64 reads submitted before any is reaped.
    const N: u64 = 64;
    let (path, f) = scratch("overflow", N * 4096);
    let mut ring = Ring::builder()
        .depth(4)
        .buffer(N * 4096)
        .file(f)
        .build()
        .unwrap();
    for k in 0..N {
        ring.read((FileId(0), k * 4096), (BufId(0), k * 4096), 4096, k)
            .unwrap();
    }
    ring.submit().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // One reap, no waiting: the 8 in the queue and the 56 the kernel kept aside.
    let mut out = Vec::new();
    let n = ring.reap(&mut out, 0).unwrap();
    assert_eq!(n as u64, N, "completions lost: {out:?}");
    let ids: BTreeSet<u64> = out.iter().map(|c| c.user_data).collect();
    assert_eq!(ids.len() as u64, N);
    assert_eq!(ring.in_flight(), 0);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_read_past_the_end_of_the_file_is_short_and_says_how_short() {
    if !common::usable() {
        return;
    }
    let (path, f) = scratch("short", 8192);
    let mut ring = Ring::builder()
        .depth(2)
        .buffer(16384)
        .file(f)
        .build()
        .unwrap();
    ring.read((FileId(0), 0), (BufId(0), 0), 16384, 7).unwrap();
    let done = reap_all(&mut ring, 1);
    assert_eq!(done[0].bytes().unwrap(), 8192);
    let e = ring.check(&done[0]).unwrap_err().to_string();
    assert!(
        e.contains("short read: the file ends at 0x2000, 8192 bytes before the request's end"),
        "{e}"
    );
    assert!(
        e.contains("read of") && e.contains("at offset 0x0 (+0x4000)"),
        "{e}"
    );
    // Shrunk under the reader: the next read starts past the end.
    ring.file(FileId(0)).unwrap().set_len(4096).unwrap();
    ring.read((FileId(0), 8192), (BufId(0), 0), 8192, 8)
        .unwrap();
    let done = reap_all(&mut ring, 1);
    let e = ring.check(&done[0]).unwrap_err().to_string();
    assert!(
        e.contains("ends at 0x1000, at or before the request's offset"),
        "{e}"
    );
    assert!(e.contains("truncated"), "{e}");
    // A whole read checks out as its bytes.
    ring.read((FileId(0), 0), (BufId(0), 0), 4096, 9).unwrap();
    let done = reap_all(&mut ring, 1);
    assert_eq!(ring.check(&done[0]).unwrap(), 4096);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn misaligned_requests_are_refused_naming_the_field_and_the_alignment() {
    if !common::usable() {
        return;
    }
    let (path, f) = scratch("align", 1 << 20);
    let a = f.align();
    let mut ring = Ring::builder()
        .depth(2)
        .buffer(1 << 20)
        .file(f)
        .build()
        .unwrap();
    let block = u64::from(a.offset).max(4096);
    let err = |r: Result<(), StorageError>| r.unwrap_err().to_string();
    let e = err(ring.read((FileId(0), 1), (BufId(0), 0), block as u32, 1));
    assert!(e.contains("`offset` = 0x1"), "{e}");
    assert!(
        e.contains(&format!("multiples of {} bytes", a.offset)),
        "{e}"
    );
    let e = err(ring.read((FileId(0), 0), (BufId(0), 0), 100, 1));
    assert!(e.contains("`len` = 0x64"), "{e}");
    if a.mem > 1 {
        let e = err(ring.read((FileId(0), 0), (BufId(0), 1), block as u32, 1));
        assert!(e.contains("`buffer`"), "{e}");
        assert!(e.contains(&format!("aligned to {} bytes", a.mem)), "{e}");
    }
    let e = err(ring.read((FileId(0), 0), (BufId(0), 1 << 20), 4096, 1));
    assert!(e.contains("outside buffer 0"), "{e}");
    let e = err(ring.read((FileId(0), 0), (BufId(3), 0), 4096, 1));
    assert!(e.contains("1 registered buffers"), "{e}");
    let e = err(ring.read((FileId(2), 0), (BufId(0), 0), 4096, 1));
    assert!(e.contains("`file` = 2"), "{e}");
    let e = err(ring.read((FileId(0), 0), (BufId(0), 0), 4096, 1 << 63));
    assert!(e.contains("`user_data`"), "{e}");
    assert_eq!(ring.in_flight(), 0, "nothing refused was queued");
    let e = Ring::builder().depth(3).build().unwrap_err().to_string();
    assert!(e.contains("`depth` = 3"), "{e}");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_file_system_without_o_direct_is_refused_unless_buffered_io_is_asked_for() {
    // procfs has no direct I/O.
    let ro = OpenOptions::default();
    let e = DirectFile::open("/proc/self/status", ro).unwrap_err();
    assert!(matches!(e, StorageError::NoDirect { .. }), "{e}");
    assert!(e.to_string().contains("buffered_fallback"), "{e}");
    let f = DirectFile::open(
        "/proc/self/status",
        OpenOptions {
            buffered_fallback: true,
            ..ro
        },
    )
    .unwrap();
    assert!(!f.is_direct());
    let e = DirectFile::open("/nonexistent/dir/file", ro).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/dir/file"), "{e}");
}

#[test]
fn dropping_a_ring_with_requests_in_flight_waits_for_them() {
    if !common::usable() {
        return;
    }
    const N: u64 = 32;
    let (path, f) = scratch("drop", N * 65536);
    let mut ring = Ring::builder()
        .depth(32)
        .buffer(N * 65536)
        .file(f)
        .build()
        .unwrap();
    for k in 0..N {
        ring.read((FileId(0), k * 65536), (BufId(0), k * 65536), 65536, k)
            .unwrap();
    }
    ring.submit().unwrap();
    assert_eq!(ring.in_flight() as u64, N);
    let left = ring.drain(Duration::from_secs(10)).unwrap();
    assert_eq!(
        left.len() as u64,
        N,
        "every request completed or was cancelled"
    );
    assert_eq!(ring.in_flight(), 0);
    // And a ring dropped with requests under way drains itself.
    for k in 0..N {
        ring.read((FileId(0), k * 65536), (BufId(0), k * 65536), 65536, k)
            .unwrap();
    }
    drop(ring);
    std::fs::remove_file(&path).unwrap();
}
