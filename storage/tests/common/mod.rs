//! What the storage tests share: whether this machine gives them io_uring and O_DIRECT.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;

use dmaplane_storage::{Completion, DirectFile, OpenOptions, Ring};

/// Where the tests' files go: the repository's file system (where /tmp may be a tmpfs).
pub fn dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Whether io_uring and O_DIRECT work here. Where they do not (a container whose seccomp
/// profile forbids io_uring, a file system without direct I/O) the test says so and passes —
/// unless `DMAPLANE_REQUIRE_IO_URING=1`, as in CI, where it fails.
pub fn usable() -> bool {
    let probe = dir().join(format!(
        "probe-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let opts = OpenOptions {
        write: true,
        create: true,
        buffered_fallback: false,
    };
    let r = DirectFile::open(&probe, opts).and_then(|_| Ring::builder().depth(2).build().map(drop));
    let _ = std::fs::remove_file(&probe);
    match r {
        Ok(()) => true,
        Err(e)
            if e.is_unavailable()
                && std::env::var("DMAPLANE_REQUIRE_IO_URING").as_deref() != Ok("1") =>
        {
            eprintln!("skipped: {e} (set DMAPLANE_REQUIRE_IO_URING=1 to make this fail)");
            false
        }
        Err(e) => panic!("io_uring or O_DIRECT: {e}"),
    }
}

/// Reap until `n` completions are in.
pub fn reap_all(ring: &mut Ring, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    while out.len() < n {
        ring.reap(&mut out, 1).unwrap();
    }
    out
}
