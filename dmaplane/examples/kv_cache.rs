//! A paged KV cache moved between two agents' GPU pools: 256 blocks of 64 KiB scattered in
//! agent a's pool on gpu0 go to scattered slots of agent b's pool on gpu2 in one batch, with one
//! notification that b reads only once every block has landed. Then b frees its pool while a
//! second batch is under way (held a quarter done with `Agent::hold_transfers`, so the free
//! meets it every run): a's transfer ends with a typed error naming b's region and epoch, a is
//! told (`Event::PeerRegionGone`), nothing is lost, and after b allocates a new pool the batch is
//! sent again and verified. Both pools are split into blocks once; batches name blocks by index.
//!
//!     cargo run --release --example kv_cache
use std::time::Duration;

use dmaplane::{Agent, Error, Event, Memory, Notify, Testbed};

const BLOCK: u64 = 64 << 10;
const SLOTS: u64 = 1024; // blocks per pool (64 MiB)
const BATCH: u64 = 256;
const T: Duration = Duration::from_secs(30);

/// Where block `k` of sequence `seq` lives in a pool: scattered, distinct for k < SLOTS.
fn slot(seq: u64, k: u64) -> u64 {
    (k * 389 + seq * 97) % SLOTS
}

fn block_bytes(seq: u64, k: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (i * 7 + k * 13 + seq * 29) as u8)
        .collect()
}

fn main() -> dmaplane::Result<()> {
    let tb = Testbed::builtin()?;
    let a = Agent::builder("prefill")
        .testbed(tb.clone())
        .nics(["nic0"])
        .chunk(BLOCK)
        .build()?;
    let b = Agent::builder("decode")
        .testbed(tb)
        .nics(["nic1"])
        .chunk(BLOCK)
        .build()?;
    let src = a.alloc_gpu("kv-src", "gpu0", SLOTS * BLOCK)?;
    let local = a.register(&src)?;
    println!("a's pool: {}; paths: {:?}", src.location(), local.paths());
    let mine = local.blocks(BLOCK)?;
    let peer = a.connect(&b.metadata_blob()?)?;

    for seq in [1u64, 2, 3] {
        for k in 0..BATCH {
            src.write(slot(seq, k) * BLOCK, &block_bytes(seq, k))?;
        }
        // b's pool (a new one after the free), found by name and split into blocks.
        let name = format!("kv-pool-{seq}");
        let dst = b.alloc_gpu(&name, "gpu2", SLOTS * BLOCK)?;
        let _registered = b.register(&dst)?;
        let theirs = peer.blocks(peer.wait_region(&name, T)?.id, BLOCK)?;
        let from: Vec<usize> = (0..BATCH).map(|k| slot(seq, k) as usize).collect();
        let to: Vec<usize> = (0..BATCH).map(|k| slot(seq + 10, k) as usize).collect();
        let note = Notify::new(format!("seq-{seq}"), format!("{BATCH} blocks").into_bytes());
        // seq 2: held a quarter done, and b gives its pool back then.
        let hold = (seq == 2).then(|| a.hold_transfers(BATCH / 4));
        let t = a.write_blocks(&peer, &mine, &from, &theirs, &to, Some(note))?;
        if let Some(hold) = hold {
            hold.wait_held(&t, T)?;
            let report = dst.free(Duration::from_secs(2))?;
            match t.wait(T) {
                Err(e @ Error::Revoked { .. }) => println!(
                    "seq 2: pool freed under the batch (acked in {} µs): {e}",
                    report.elapsed_us
                ),
                other => panic!("seq 2: the free did not end the batch: {other:?}"),
            }
            drop(hold);
            let due = std::time::Instant::now() + T;
            let gone = loop {
                if let Some(e) = a
                    .events()
                    .into_iter()
                    .find(|e| matches!(e, Event::PeerRegionGone { .. }))
                {
                    break e;
                }
                assert!(
                    std::time::Instant::now() < due,
                    "a was not told of the free"
                );
                std::thread::sleep(Duration::from_millis(1));
            };
            println!("seq 2: a was told: {gone:?}");
            continue;
        }
        t.wait(T)?;
        let n = b.next_notification(T).expect("a notification");
        verify(&dst, seq)?;
        println!(
            "seq {seq}: {BATCH} blocks of 64 KiB in {} requests, \"{}\" received after the data, every byte verified",
            t.requests(),
            String::from_utf8_lossy(&n.bytes)
        );
    }
    let v = a
        .testbed()
        .expect("a simulated testbed")
        .fabric()
        .oracle()
        .verdict();
    println!(
        "oracle: dma_after_fence = {}, dma_after_ack = {}, blocked_by_backstop = {}",
        v.dma_after_fence, v.dma_after_ack, v.blocked_by_backstop
    );
    assert!(v.is_clean(), "{v}");
    Ok(())
}

fn verify(dst: &Memory, seq: u64) -> dmaplane::Result<()> {
    let mut got = vec![0u8; BLOCK as usize];
    for k in 0..BATCH {
        dst.read(slot(seq + 10, k) * BLOCK, &mut got)?;
        assert!(got == block_bytes(seq, k), "seq {seq} block {k} differs");
    }
    Ok(())
}
