//! `dmaplane load`: checkpoint shards (files) → GPU memory of agent a → NIC → GPU memory of
//! agent b, on the simulated testbed: the read of shard n + 1 overlapping the send of shard n,
//! every byte verified, the throughput against the slowest stage measured alone in the same run,
//! and (with `--free-at`) b's GPU freed in the middle of a load, judged like any revoke.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use dmaplane::load::{LoadReport, Shard, Step, load};
use dmaplane::{Agent, Desc, Error, FileSpec, Memory, Peer, Region, Testbed};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Shards to create (ignored with --files).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    shards: u64,
    /// Bytes per created shard.
    #[arg(long, default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range(4096..=(1 << 30)))]
    shard_size: u64,
    /// Where created shards go (removed afterwards).
    #[arg(long, default_value = "target/dmaplane-load")]
    dir: PathBuf,
    /// Load these files instead of created shards (kept; verified against their contents).
    #[arg(long, value_delimiter = ',')]
    files: Vec<PathBuf>,
    /// The GPU of agent a that the shards are read into (two slots).
    #[arg(long, default_value = "gpu0")]
    src_gpu: String,
    /// The GPU of agent b that the checkpoint lands in.
    #[arg(long, default_value = "gpu2")]
    dst_gpu: String,
    /// The simulated drive's bandwidth in bytes per second (default: a PCIe 4.0 x4 drive's,
    /// 7 GB/s; 0: as fast as this host copies, which then shares its cores and memory
    /// bandwidth with the simulated NICs).
    #[arg(long)]
    drive_rate: Option<u64>,
    /// Also run a load during which b frees its GPU memory as shard K is sent: it must end
    /// with a typed revoke, nothing lost, the oracle clean, nothing written after the ack.
    #[arg(long)]
    free_at: Option<usize>,
    /// Both agents prove this secret to each other on their handshake (a file readable by
    /// its owner only; `dmaplane secret new FILE` makes one).
    #[arg(long)]
    secret_file: Option<PathBuf>,
}

const T: Duration = Duration::from_secs(60);

#[derive(Debug, serde::Serialize)]
struct Stages {
    /// Files → a's slot, one shard at a time, alone.
    read_gbps: f64,
    /// a's slot → b's GPU, one shard at a time, alone.
    send_gbps: f64,
    /// The pipeline.
    load_gbps: f64,
    /// The load against the slower stage.
    ratio: f64,
    slowest: &'static str,
}

#[derive(Debug, serde::Serialize)]
struct FreeRun {
    free_at: usize,
    error: String,
    shards_landed: usize,
    requests_posted: u64,
    requests_completed: u64,
    lost: u64,
    oracle: String,
    oracle_clean: bool,
    changed_after_ack: Option<u64>,
}

#[derive(Debug, serde::Serialize)]
struct Out {
    drive_rate: Option<u64>,
    shards: usize,
    bytes: u64,
    src: String,
    dst: String,
    storage_path: String,
    nic_path: String,
    stages: Stages,
    verified_bytes: u64,
    free: Option<FreeRun>,
}

struct LoadSetup {
    tb: std::sync::Arc<Testbed>,
    a: Agent,
    b: Agent,
    peer: Peer,
    slots: Region,
    shards: Vec<(PathBuf, u64)>,
    files: Vec<dmaplane::FileRegion>,
    dst_gpu: String,
}

pub fn run(args: &LoadArgs, json: bool) -> Result<()> {
    let created = args.files.is_empty();
    let shards = if created {
        create(args)?
    } else {
        args.files
            .iter()
            .map(|p| {
                let len = std::fs::metadata(p)
                    .with_context(|| format!("--files {}", p.display()))?
                    .len();
                if len == 0 {
                    bail!("--files {}: empty", p.display());
                }
                Ok((p.clone(), len))
            })
            .collect::<Result<Vec<_>>>()?
    };
    let res = go(args, shards.clone(), json);
    if created {
        for (p, _) in &shards {
            let _ = std::fs::remove_file(p);
        }
    }
    res
}

/// Patterned shards, each distinct, so a misplaced byte shows.
fn create(args: &LoadArgs) -> Result<Vec<(PathBuf, u64)>> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("--dir {}", args.dir.display()))?;
    (0..args.shards)
        .map(|i| {
            let p = args.dir.join(format!("shard-{i:05}.bin"));
            std::fs::write(&p, pattern(i, args.shard_size))
                .with_context(|| format!("writing {}", p.display()))?;
            Ok((p, args.shard_size))
        })
        .collect()
}

fn pattern(seed: u64, len: u64) -> Vec<u8> {
    dmaplane_core::pattern::bytes(seed, usize::try_from(len).unwrap_or(usize::MAX))
}

fn go(args: &LoadArgs, shards: Vec<(PathBuf, u64)>, json: bool) -> Result<()> {
    let total: u64 = shards.iter().map(|s| s.1).sum();
    let biggest = shards.iter().map(|s| s.1).max().unwrap_or(0);
    let tb = Testbed::builtin()?;
    let secret = args
        .secret_file
        .as_deref()
        .map(dmaplane::auth::Secret::from_file)
        .transpose()?;
    let with_secret = |b: dmaplane::AgentBuilder| match &secret {
        Some(s) => b.secret(s.clone()),
        None => b,
    };
    let mut a = with_secret(Agent::builder("loader").testbed(tb.clone()).nics(["nic0"]));
    if let Some(r) = args.drive_rate {
        a = a.drive_rate(r);
    }
    let a = a.build()?;
    let b = with_secret(Agent::builder("trainer").testbed(tb.clone()).nics(["nic1"])).build()?;
    let slots = a.register(&a.alloc_gpu("slots", &args.src_gpu, 2 * biggest)?)?;
    let files = shards
        .iter()
        .map(|(p, _)| a.register_file(&FileSpec::new(p).buffered_fallback()))
        .collect::<dmaplane::Result<Vec<_>>>()?;
    let peer = a.connect(&b.metadata_blob()?)?;
    let w = LoadSetup {
        tb,
        a,
        b,
        peer,
        slots,
        shards,
        files,
        dst_gpu: args.dst_gpu.clone(),
    };
    let (dst, remote) = w.target("checkpoint", total)?;
    let plan = w.plan(&remote)?;
    if let Some(k) = args.free_at
        && k >= plan.len()
    {
        bail!(
            "--free-at {k}: there are {} shards (0 to {})",
            plan.len(),
            plan.len() - 1
        );
    }
    let storage_path = format!("{:?}", w.a.storage_path(w.slots.memory())?);
    let nic_path = format!("{:?}", w.slots.paths());

    // Each stage alone, then the pipeline; twice in swapped order, the best of each kept.
    let (mut read, mut send, mut piped) = (f64::MAX, f64::MAX, f64::MAX);
    let bar = bar(json, 2 * plan.len() as u64);
    for round in 0..2 {
        let mut go_read = || w.read_alone(&plan).map(|t| read = read.min(t));
        let mut go_send = || w.send_alone(&plan).map(|t| send = send.min(t));
        if round == 0 {
            go_read()?;
            go_send()?;
        } else {
            go_send()?;
            go_read()?;
        }
        bar.set_message(format!("load, round {}", round + 1));
        let r = load(&w.a, &w.peer, &plan, &w.two(biggest)?, T, |_, s| {
            if s == Step::SendDone {
                bar.inc(1);
            }
        })?;
        piped = piped.min(r.elapsed.as_secs_f64());
    }
    bar.finish_and_clear();
    let gbps = |secs: f64| total as f64 / secs.max(1e-9) / 1e9;
    let (rg, sg, lg) = (gbps(read), gbps(send), gbps(piped));
    let (slow, slowest) = if rg <= sg { (rg, "read") } else { (sg, "send") };
    let verified = w.verify(&dst)?;
    let free = match args.free_at {
        Some(k) => Some(w.free_run(k, total, biggest)?),
        None => None,
    };
    let out = Out {
        drive_rate: args
            .drive_rate
            .or(Some(dmaplane_storage::sim::RATE))
            .filter(|&r| r > 0),
        shards: plan.len(),
        bytes: total,
        src: args.src_gpu.clone(),
        dst: args.dst_gpu.clone(),
        storage_path,
        nic_path,
        stages: Stages {
            read_gbps: rg,
            send_gbps: sg,
            load_gbps: lg,
            ratio: lg / slow,
            slowest,
        },
        verified_bytes: verified,
        free,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print(&out);
    }
    if let Some(f) = &out.free
        && (f.lost != 0 || !f.oracle_clean || f.changed_after_ack.is_some())
    {
        bail!(
            "the free during the load was not handled: lost {}, oracle {}, changed after the ack at {:?}",
            f.lost,
            f.oracle,
            f.changed_after_ack
        );
    }
    Ok(())
}

fn bar(json: bool, n: u64) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} shards {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn print(o: &Out) {
    println!(
        "{} shards, {} MiB: files -> {} (agent loader) -> nic0 -> nic1 -> {} (agent trainer)",
        o.shards,
        o.bytes >> 20,
        o.src,
        o.dst
    );
    println!(
        "  drive -> {}: {} ({})",
        o.src,
        o.storage_path,
        o.drive_rate.map_or_else(
            || "unpaced: as fast as this host copies".to_string(),
            |r| format!("paced to {:.2} GB/s", r as f64 / 1e9)
        )
    );
    println!("  nic0 -> {}: {}", o.src, o.nic_path);
    let s = &o.stages;
    println!("  {:<28} {:>8}", "stage", "GB/s");
    println!(
        "  {:<28} {:>8.2}",
        "read alone (files -> slot)", s.read_gbps
    );
    println!(
        "  {:<28} {:>8.2}",
        "send alone (slot -> remote)", s.send_gbps
    );
    println!("  {:<28} {:>8.2}", "load (pipelined)", s.load_gbps);
    println!(
        "  load / slowest stage ({}): {:.1} %",
        s.slowest,
        100.0 * s.ratio
    );
    println!("  verified: {} bytes, every one", o.verified_bytes);
    if let Some(f) = &o.free {
        println!(
            "  free of the destination as shard {} was sent: {}",
            f.free_at, f.error
        );
        println!(
            "    shards landed before it: {}; requests posted {}, completed {}, lost {}",
            f.shards_landed, f.requests_posted, f.requests_completed, f.lost
        );
        println!("    oracle: {}", f.oracle);
        println!(
            "    poisoned bytes changed after the ack: {}",
            f.changed_after_ack
                .map_or_else(|| "none".to_string(), |o| format!("at {o:#x}"))
        );
    }
}

impl LoadSetup {
    /// Destination memory on b, registered, and its registration known to a's peer.
    fn target(&self, name: &str, len: u64) -> Result<(Memory, Region)> {
        let dst = self.b.alloc_gpu(name, &self.dst_gpu, len)?;
        let r = self.b.register(&dst)?;
        let until = Instant::now() + T;
        while self.peer.region(r.id()).is_none() {
            if Instant::now() > until {
                bail!("the peer never learned of region {}", r.id());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok((dst, r))
    }

    fn plan(&self, remote: &Region) -> Result<Vec<Shard>> {
        let mut at = 0;
        let mut v = Vec::with_capacity(self.files.len());
        for (f, (_, len)) in self.files.iter().zip(&self.shards) {
            v.push(Shard {
                file: f.all(),
                remote: self.peer.desc(remote.id(), at, *len)?,
            });
            at += len;
        }
        Ok(v)
    }

    fn two(&self, biggest: u64) -> dmaplane::Result<[Desc; 2]> {
        Ok([
            self.slots.desc(0, biggest)?,
            self.slots.desc(biggest, biggest)?,
        ])
    }

    fn slot0(&self, len: u64) -> dmaplane::Result<Desc> {
        self.slots.desc(0, len)
    }

    /// Seconds to read every shard into slot 0, one after the other.
    fn read_alone(&self, plan: &[Shard]) -> Result<f64> {
        let t = Instant::now();
        for s in plan {
            self.a
                .read_file(&[s.file], &[self.slot0(s.file.len)?])?
                .wait(T)?;
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// Seconds to send slot 0 to every shard's place, one after the other.
    fn send_alone(&self, plan: &[Shard]) -> Result<f64> {
        let t = Instant::now();
        for s in plan {
            self.a
                .write(
                    &self.peer,
                    &[self.slot0(s.remote.len())?],
                    std::slice::from_ref(&s.remote),
                    None,
                )?
                .wait(T)?;
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// Compare b's memory with the files, every byte.
    fn verify(&self, dst: &Memory) -> Result<u64> {
        let mut at = 0u64;
        let mut got = Vec::new();
        for (p, len) in &self.shards {
            let want = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            if want.len() as u64 != *len {
                bail!("{} changed size during the load", p.display());
            }
            got.resize(want.len(), 0);
            dst.read(at, &mut got)?;
            if let Some(i) = got.iter().zip(&want).position(|(g, w)| g != w) {
                bail!(
                    "byte {i} of {} differs in {} at {:#x}",
                    p.display(),
                    dst.name(),
                    at + i as u64
                );
            }
            at += len;
        }
        Ok(at)
    }

    /// A load into fresh memory that b frees as shard `k` is sent.
    fn free_run(&self, k: usize, total: u64, biggest: u64) -> Result<FreeRun> {
        let (dst, remote) = self.target("checkpoint-freed", total)?;
        let plan = self.plan(&remote)?;
        let before = (self.a.stats(), self.b.stats());
        let mut quarantine = None;
        let mut landed = 0;
        let r: dmaplane::Result<LoadReport> = load(
            &self.a,
            &self.peer,
            &plan,
            &self.two(biggest)?,
            T,
            |n, s| {
                if s == Step::SendDone {
                    landed += 1;
                }
                if n == k && s == Step::SendStarted && quarantine.is_none() {
                    quarantine = Some(dst.free_quarantined(Duration::from_secs(5)));
                }
            },
        );
        let (report, q) = match quarantine {
            Some(q) => q?,
            None => bail!("the load never reached shard {k}"),
        };
        q.fill(0xee)?;
        let error = match r {
            Ok(_) => bail!("the load finished although its destination was freed"),
            Err(e @ Error::Revoked { .. }) => e.to_string(),
            Err(e) => bail!("the load ended with {e}, not the revoke"),
        };
        // Give anything that would still land time to.
        std::thread::sleep(Duration::from_millis(50));
        let changed = q.first_change(0xee)?;
        let (sa, sb) = (self.a.stats(), self.b.stats());
        let posted = (sa.requests_posted - before.0.requests_posted)
            + (sb.requests_posted - before.1.requests_posted);
        let completed = (sa.requests_completed - before.0.requests_completed)
            + (sb.requests_completed - before.1.requests_completed);
        let v = self.tb.fabric().oracle().verdict();
        tracing::info!(%report, "the destination's free");
        Ok(FreeRun {
            free_at: k,
            error,
            shards_landed: landed,
            requests_posted: posted,
            requests_completed: completed,
            lost: posted.saturating_sub(completed),
            oracle: v.to_string(),
            oracle_clean: v.is_clean(),
            changed_after_ack: changed,
        })
    }
}
