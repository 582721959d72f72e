#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! CUDA memory the caller allocated — a framework's tensor — lent to an agent
//! ([`Agent::lend_cuda`]): WRITE from it and READ into it between two agents on TCP NICs (staged
//! through host memory there), the bytes where the caller's pointer is; a free under a
//! transfer ends it with the typed revoke, and only then is the caller's keeper dropped.
//!
//! Runs against the fake driver built from `gpu/src/cuda/fake_libcuda.c` (this binary runs
//! its test again with it), and against a real driver where there is one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cudarc::driver::{result, sys};
use dmaplane::{Error, Side};

mod common;
use common::{T, pattern, tcp_agent as agent};
/// Set for the run of this binary against the fake driver.
const CHILD: &str = "DMAPLANE_LEND_CUDA_CHILD";

/// Device memory allocated as a framework would (`cuMemAlloc` in the primary context), freed
/// when dropped; `dropped` says when.
struct Tensor {
    ctx: usize,
    base: u64,
    dropped: Arc<AtomicBool>,
}

impl Tensor {
    fn new(len: usize) -> Option<Tensor> {
        // cudarc panics where there is no driver library: ask dmaplane's probe first.
        if dmaplane_gpu::cuda::devices().map_or(true, |d| d.is_empty()) {
            return None;
        }
        result::init().ok()?;
        let dev = result::device::get(0).ok()?;
        // SAFETY: the primary context of device 0, retained for the life of the process.
        let ctx = unsafe { result::primary_ctx::retain(dev) }.ok()?;
        // SAFETY: `ctx` is live; the allocation is freed once, by `drop`.
        let base = unsafe {
            result::ctx::set_current(ctx).ok()?;
            result::malloc_sync(len).ok()?
        };
        Some(Tensor {
            ctx: ctx as usize,
            base,
            dropped: Arc::default(),
        })
    }

    fn current(&self) {
        // SAFETY: the context was retained and is never released.
        unsafe { result::ctx::set_current(self.ctx as sys::CUcontext) }.unwrap();
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        self.current();
        let mut out = vec![0u8; len];
        // SAFETY: `[addr, addr + len)` lies in this live allocation.
        unsafe { result::memcpy_dtoh_sync(&mut out, addr) }.unwrap();
        out
    }

    fn write(&self, addr: u64, data: &[u8]) {
        self.current();
        // SAFETY: as in `read`.
        unsafe { result::memcpy_htod_sync(addr, data) }.unwrap();
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        self.current();
        // SAFETY: `base` came from cuMemAlloc and is freed once, here.
        unsafe { result::free_sync(self.base) }.unwrap();
        self.dropped.store(true, Ordering::SeqCst);
    }
}

#[test]
fn lent_cuda_memory_on_the_fake_driver() {
    use std::process::Command;
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dmaplane-lend-cuda-{}", std::process::id()));
    if let Err(why) = dmaplane_tests::build_fake_libcuda(&dir) {
        assert!(std::env::var_os("CI").is_none(), "CI is set and {why}");
        eprintln!("skipping: {why}");
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lent_cuda_memory_is_used_in_place_and_given_back_after_its_free",
            "--nocapture",
        ])
        .env("LD_LIBRARY_PATH", &dir)
        .env(CHILD, "1")
        .env("DMAPLANE_REQUIRE_CUDA", "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("FAKE CUDA"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lent_cuda_memory_is_used_in_place_and_given_back_after_its_free() {
    const LEN: usize = 8 << 20;
    let Some(tensor) = Tensor::new(LEN + (64 << 10)) else {
        assert!(
            std::env::var("DMAPLANE_REQUIRE_CUDA").as_deref() != Ok("1"),
            "DMAPLANE_REQUIRE_CUDA=1 but no CUDA device"
        );
        eprintln!("skipped: no CUDA device");
        return;
    };
    let dropped = tensor.dropped.clone();
    // Inside the allocation and not page aligned, as a caching allocator hands tensors out.
    let at = tensor.base + 8192 + 512;
    let (a, b) = (agent("a"), agent("b"));
    let data = pattern(5, LEN);
    tensor.write(at, &data);
    // Host memory and ranges past the allocation are refused, naming the field.
    let host = vec![0u8; 4096];
    // SAFETY: refused before anything is kept.
    let e = unsafe { a.lend_cuda("host", host.as_ptr() as u64, 4096, Box::new(())) }.unwrap_err();
    assert!(e.to_string().contains("address"), "{e}");
    // SAFETY: as above.
    let e = unsafe { a.lend_cuda("long", at, 1 << 30, Box::new(())) }.unwrap_err();
    assert!(e.to_string().contains("len"), "{e}");
    let probe = tensor.read(at, 16);
    // SAFETY: the allocation lives until `tensor` (the keeper) drops, which only the free does.
    let lent = unsafe { a.lend_cuda("tensor", at, LEN as u64, Box::new(tensor)) }.unwrap();
    assert_eq!(lent.location().to_string(), "GPU memory on cuda:0");
    let rl = a.register(&lent).unwrap();
    let dst = b.alloc_host("dst", LEN as u64).unwrap();
    let rd = b.register(&dst).unwrap();
    let peer = a.connect_to(&b.listen_addr().to_string()).unwrap();
    let remote = peer.desc(rd.id(), 0, LEN as u64).unwrap();
    a.write(&peer, &[rl.all()], std::slice::from_ref(&remote), None)
        .unwrap()
        .wait(T)
        .unwrap();
    let mut got = vec![0u8; LEN];
    dst.read(0, &mut got).unwrap();
    assert!(
        got == data,
        "the WRITE from the lent tensor moved other bytes"
    );
    assert_eq!(&data[..16], &probe[..]);
    // READ into it: the peer's bytes land at the caller's pointer.
    let data2 = pattern(9, LEN);
    dst.write(0, &data2).unwrap();
    a.read(&peer, &[rl.all()], std::slice::from_ref(&remote), None)
        .unwrap()
        .wait(T)
        .unwrap();
    let mut back = vec![0u8; LEN];
    lent.read(0, &mut back).unwrap();
    assert!(
        back == data2,
        "the READ into the lent tensor landed other bytes"
    );
    // Freed under a READ: the typed revoke; the keeper is dropped by the free, not before.
    let t = a
        .read(&peer, &[rl.all()], std::slice::from_ref(&remote), None)
        .unwrap();
    assert!(
        !dropped.load(Ordering::SeqCst),
        "the keeper went before the free"
    );
    lent.free(Duration::from_secs(10)).unwrap();
    assert!(
        dropped.load(Ordering::SeqCst),
        "the free did not give the tensor back"
    );
    match t.wait(T) {
        Err(Error::Revoked {
            side: Side::Local, ..
        })
        | Ok(()) => {}
        Err(e) => panic!("the READ under the free: {e}"),
    }
}
