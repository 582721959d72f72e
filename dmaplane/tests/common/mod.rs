//! What the Agent's integration tests share.
#![allow(dead_code)]

use std::time::Duration;

/// How long any one wait in a test may take.
pub const T: Duration = Duration::from_secs(20);

/// An agent on TCP NICs (loopback), stalled transfers ended after 20 s.
pub fn tcp_agent(name: &str) -> dmaplane::Agent {
    dmaplane::Agent::builder(name)
        .tcp()
        .stall_timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Position- and seed-dependent bytes, so a misplaced or stale chunk shows.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) as u8)
        .collect()
}

/// Start transfers with `start` until one is still under way 300 µs later (up to 20 tries),
/// then run `meet` on it (a free, a deregistration): what `meet` returned, and how the
/// transfer ended.
pub fn meet_under_way<R>(
    start: impl Fn() -> dmaplane::Transfer,
    meet: impl FnOnce(&dmaplane::Transfer) -> R,
) -> (R, dmaplane::Result<()>) {
    for _ in 0..20 {
        let t = start();
        std::thread::sleep(Duration::from_micros(300));
        if matches!(t.status(), dmaplane::Status::InProgress { .. }) {
            let r = meet(&t);
            return (r, t.wait(T));
        }
    }
    panic!("every transfer finished before it could be met under way");
}

/// An executor that parks until woken: a file transfer that never wakes its task fails the
/// test (after `T`) instead of being polled to completion anyway.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        // A park that runs its whole course was never woken.
        let parked = std::time::Instant::now();
        std::thread::park_timeout(T);
        assert!(parked.elapsed() < T, "the transfer never woke its task");
    }
}
