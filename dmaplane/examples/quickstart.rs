//! Register, connect, WRITE 64 MiB, wait, verify — on the built-in simulated testbed.
//!
//!     cargo run --release --example quickstart
use std::time::{Duration, Instant};

use dmaplane::{Agent, Testbed};

fn main() -> dmaplane::Result<()> {
    const LEN: u64 = 64 << 20;
    let testbed = Testbed::builtin()?;
    let a = Agent::builder("a")
        .testbed(testbed.clone())
        .nics(["nic0"])
        .build()?;
    let b = Agent::builder("b")
        .testbed(testbed)
        .nics(["nic1"])
        .build()?;
    let (src, dst) = (a.alloc_host("src", LEN)?, b.alloc_host("dst", LEN)?);
    let data: Vec<u8> = (0..LEN).map(|i| (i * 131 % 251) as u8).collect();
    src.write(0, &data)?;
    dst.write(0, &vec![0; LEN as usize])?; // first touch of fresh memory, outside the timing
    let (local, remote) = (a.register(&src)?, b.register(&dst)?);
    let peer = a.connect(&b.metadata_blob()?)?;
    let start = Instant::now();
    let t = a.write(
        &peer,
        &[local.all()],
        &[peer.desc(remote.id(), 0, LEN)?],
        None,
    )?;
    t.wait(Duration::from_secs(30))?;
    let secs = start.elapsed().as_secs_f64();
    let mut got = vec![0u8; LEN as usize];
    dst.read(0, &mut got)?;
    assert!(got == data, "the bytes differ");
    println!(
        "64 MiB WRITE a → b in {} requests: {:.2} GiB/s, every byte verified",
        t.requests(),
        LEN as f64 / secs / f64::from(1 << 30)
    );
    Ok(())
}
