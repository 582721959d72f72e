//! Errors the kernel really returns, said in words by `Ring::check`: ENOSPC from a file system
//! that fills up under `WRITE_FIXED`, and from a device that fails a read the block layer's
//! error — EIO, or ENODATA for a medium error, as the testbed's scsi_debug disk gives.
//!
//! They need what a laptop does not have lying around: a small file system
//! (`DMAPLANE_SMALL_FS`, a directory on a tmpfs of a few MiB) and a failing block device
//! (`DMAPLANE_EIO_DEV`, a scsi_debug disk with its medium errors switched on, and
//! `DMAPLANE_EIO_AT`, the byte offset of a bad sector). The qemu testbed sets both up (its
//! `storage-faults` step; `.ci/run` mounts the tmpfs where it may). Without them each test says
//! so and passes, unless `DMAPLANE_REQUIRE_FAULTS=1`, where it fails. Given them, io_uring must
//! work.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;

mod common;

use common::reap_all;
use dmaplane_storage::{BufId, DirectFile, FileId, OpenOptions, Ring, StorageError};

fn needed(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var("DMAPLANE_REQUIRE_FAULTS").as_deref() == Ok("1") => {
            panic!("{var} is not set, and DMAPLANE_REQUIRE_FAULTS=1")
        }
        _ => {
            eprintln!("skipped: {var} is not set (the qemu testbed sets it)");
            None
        }
    }
}

#[test]
fn a_file_system_that_fills_up_says_enospc_or_a_short_write() {
    let Some(dir) = needed("DMAPLANE_SMALL_FS") else {
        return;
    };
    let st = rustix::fs::statvfs(dir.as_str()).unwrap();
    let size = st.f_blocks * st.f_frsize;
    assert!(
        size <= 64 << 20,
        "{dir} holds {size} bytes: not a small file system"
    );
    let path = PathBuf::from(&dir).join(format!("fill-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let opts = OpenOptions {
        write: true,
        create: true,
        // A tmpfs takes O_DIRECT from Linux 6.6; older ones go through the page cache, which
        // runs out of space the same way.
        buffered_fallback: true,
    };
    let f = Arc::new(DirectFile::open(&path, opts).unwrap());
    const PIECE: u64 = 1 << 20;
    let n = size / PIECE + 4;
    let mut ring = Ring::builder()
        .depth(8)
        .buffer(PIECE)
        .file(f.clone())
        .build()
        .unwrap();
    ring.buffer_write(BufId(0), 0, &vec![0x5a; PIECE as usize])
        .unwrap();
    let mut errors = Vec::new();
    let mut written = 0u64;
    // In order, one at a time: the file grows until the file system is full.
    for k in 0..n {
        ring.write((FileId(0), k * PIECE), (BufId(0), 0), PIECE as u32, k)
            .unwrap();
        let c = reap_all(&mut ring, 1);
        match ring.check(&c[0]) {
            Ok(b) => written += u64::from(b),
            Err(e) => errors.push(e),
        }
    }
    drop(ring);
    let _ = std::fs::remove_file(&path);
    eprintln!(
        "{dir}: {size} bytes; {written} written before it filled; {} requests refused, the first: {}",
        errors.len(),
        errors.first().map_or_else(String::new, ToString::to_string)
    );
    assert!(written > 0 && written <= size, "{written} of {size}");
    let first = errors.first().expect("a full file system refused nothing");
    assert!(
        matches!(first, StorageError::Io { op: "write", .. }),
        "{first}"
    );
    let text = first.to_string();
    assert!(
        text.contains("no space left on the file system (ENOSPC)")
            || text.contains("is the file system full?"),
        "{text}"
    );
    // Every later one is the plain ENOSPC.
    for e in &errors[1..] {
        assert!(e.to_string().contains("ENOSPC"), "{e}");
    }
}

#[test]
fn a_device_that_fails_a_read_says_so_and_reads_elsewhere() {
    let (Some(dev), Some(at)) = (needed("DMAPLANE_EIO_DEV"), needed("DMAPLANE_EIO_AT")) else {
        return;
    };
    let bad: u64 = at.parse().unwrap();
    let f = Arc::new(DirectFile::open(&dev, OpenOptions::default()).unwrap());
    assert!(f.is_direct(), "{dev} without O_DIRECT");
    const LEN: u64 = 64 << 10;
    let mut ring = Ring::builder()
        .depth(4)
        .buffer(LEN)
        .file(f)
        .build()
        .unwrap();
    // A good stretch first: the device works.
    ring.read((FileId(0), 0), (BufId(0), 0), LEN as u32, 1)
        .unwrap();
    let c = reap_all(&mut ring, 1);
    assert_eq!(ring.check(&c[0]).unwrap(), LEN as u32);
    // Then the stretch holding the bad sector.
    let at = bad / LEN * LEN;
    ring.read((FileId(0), at), (BufId(0), 0), LEN as u32, 2)
        .unwrap();
    let c = reap_all(&mut ring, 1);
    let e = ring.check(&c[0]).unwrap_err();
    eprintln!("{dev} at {at:#x}: {e}");
    assert!(matches!(e, StorageError::Io { op: "read", .. }), "{e}");
    let text = e.to_string();
    // The block layer says EIO, or ENODATA for a medium error (what scsi_debug's is).
    assert!(
        (text.contains("the device failed the I/O (EIO)")
            || text.contains("the device failed to read its medium (ENODATA: a medium error)"))
            && text.contains(&format!("{at:#x}")),
        "{text}"
    );
}
