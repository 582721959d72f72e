//! Checkpoint shards (files) loaded into a remote GPU: agent "loader" reads each shard from its
//! file into one of two slots of GPU memory on gpu0 (the drive DMAs straight into gpu0's BAR1),
//! then WRITEs it over nic0 → nic1 into agent "trainer"'s weights on gpu2 — the read of shard
//! n + 1 overlapping the send of shard n. Every byte is verified against the files. Then the
//! load runs again and the loader frees its slots (a GPU free) while a shard is being read: the
//! load ends with a typed revoke, nothing lost, the fabric's oracle clean.
//!
//!     cargo run --release --example checkpoint_load
use std::path::PathBuf;
use std::time::Duration;

use dmaplane::load::{Shard, Step, load};
use dmaplane::{Agent, Error, FileSpec, Testbed};

const SHARDS: u64 = 8;
const SHARD: u64 = 8 << 20;
const T: Duration = Duration::from_secs(30);

fn shard_bytes(i: u64) -> Vec<u8> {
    (0..SHARD)
        .map(|k| (k.wrapping_mul(31).wrapping_add(i * 101) >> 3) as u8)
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("dmaplane-checkpoint-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let paths: Vec<PathBuf> = (0..SHARDS)
        .map(|i| dir.join(format!("shard-{i:02}.safetensors")))
        .collect();
    for (i, p) in paths.iter().enumerate() {
        std::fs::write(p, shard_bytes(i as u64))?;
    }
    let res = run(&paths);
    std::fs::remove_dir_all(&dir)?;
    res
}

fn run(paths: &[PathBuf]) -> Result<(), Box<dyn std::error::Error>> {
    let tb = Testbed::builtin()?;
    let loader = Agent::builder("loader")
        .testbed(tb.clone())
        .nics(["nic0"])
        .build()?;
    let trainer = Agent::builder("trainer")
        .testbed(tb.clone())
        .nics(["nic1"])
        .build()?;
    let files = paths
        .iter()
        .map(|p| loader.register_file(&FileSpec::new(p).buffered_fallback()))
        .collect::<dmaplane::Result<Vec<_>>>()?;
    let slots_mem = loader.alloc_gpu("slots", "gpu0", 2 * SHARD)?;
    let slots = loader.register(&slots_mem)?;
    println!("drive -> slots: {:?}", loader.storage_path(slots.memory())?);
    let peer = loader.connect(&trainer.metadata_blob()?)?;

    for attempt in ["load", "load with the slots freed mid-read"] {
        let weights = trainer.alloc_gpu(attempt, "gpu2", SHARDS * SHARD)?;
        let w = trainer.register(&weights)?;
        while peer.region(w.id()).is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let shards: Vec<Shard> = files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                Ok(Shard {
                    file: f.all(),
                    remote: peer.desc(w.id(), i as u64 * SHARD, SHARD)?,
                })
            })
            .collect::<dmaplane::Result<_>>()?;
        let two = [slots.desc(0, SHARD)?, slots.desc(SHARD, SHARD)?];
        let free_mid_read = attempt != "load";
        let before = (loader.stats(), trainer.stats());
        let mut freed = None;
        let r = load(&loader, &peer, &shards, &two, T, |n, step| match step {
            Step::SendDone => println!("  shard {n} landed in {}", weights.name()),
            Step::ReadStarted if free_mid_read && n == 5 && freed.is_none() => {
                freed = Some(slots_mem.free(Duration::from_secs(5)));
            }
            _ => {}
        });
        match (r, free_mid_read) {
            (Ok(report), false) => {
                let mut got = vec![0u8; SHARD as usize];
                for i in 0..SHARDS {
                    weights.read(i * SHARD, &mut got)?;
                    assert!(got == shard_bytes(i), "shard {i} differs in the GPU");
                }
                println!(
                    "{attempt}: {} shards, {} MiB in {:?} ({:.2} GB/s); every byte verified",
                    report.shards,
                    report.bytes >> 20,
                    report.elapsed,
                    report.gbps()
                );
            }
            (Err(e @ Error::Revoked { .. }), true) => {
                let report = freed.ok_or("the slots were never freed")??;
                let (a, b) = (loader.stats(), trainer.stats());
                let lost = (a.requests_posted - before.0.requests_posted)
                    + (b.requests_posted - before.1.requests_posted)
                    - (a.requests_completed - before.0.requests_completed)
                    - (b.requests_completed - before.1.requests_completed);
                let v = tb.fabric().oracle().verdict();
                println!("{attempt}: ended with: {e}");
                println!("  the free: {report}");
                println!("  lost = {lost}; oracle: {v}");
                assert_eq!(lost, 0, "requests without a completion");
                assert!(v.is_clean(), "{v}");
            }
            (Ok(_), true) => return Err("the load finished although its slots were freed".into()),
            (Err(e), _) => return Err(e.into()),
        }
    }
    Ok(())
}
