//! `dmaplane bench`: the macro benchmark harness.

mod p2p;

use anyhow::{Result, bail};
use clap::Subcommand;
use std::time::Duration;

use dmaplane_bench::rdma::{MAX_SIZE, RdmaBenchConfig};
use dmaplane_bench::sgl::{Row, Scenario, measure};
use dmaplane_bench::storage::Rw;

use crate::report::say;
use crate::units::{bytes, ns};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Address list vs scatterlist model: build + map time, metadata bytes, translation entries.
    Sgl {
        /// Registrations timed per side (the median is reported).
        #[arg(long, default_value_t = 5)]
        iters: u32,
        /// Only these scenarios (bar-1g-contiguous, bar-64g-contiguous, host-1g-2m-hugepages,
        /// host-1g-4k-fragmented); default: all.
        #[arg(long, value_delimiter = ',')]
        scenario: Vec<String>,
    },
    /// The application library (`Agent::write` + `wait`) against the raw RDMA layer doing the
    /// same work in the same run: GB/s and average / p99 of prepare, post and completion, per
    /// block size and batch size (nixlbench's figures).
    Agent {
        /// `sim` (the built-in testbed) or `verbs` (two agents on one RDMA device, feature
        /// `verbs`; 16 MiB working sets of udmabuf memory, no cache passes).
        #[arg(long, default_value = "sim")]
        backend: String,
        /// The RDMA device for `--backend verbs` (default: the first).
        #[arg(long)]
        device: Option<String>,
        /// Block sizes in bytes (default 4 KiB, 64 KiB, 1 MiB, 4 MiB, 64 MiB).
        #[arg(long, value_delimiter = ',')]
        blocks: Vec<u64>,
        /// Blocks per transfer (default 1, 16, 64, 128).
        #[arg(long, value_delimiter = ',')]
        batches: Vec<usize>,
        /// Seconds per point, each side, each round.
        #[arg(long, default_value_t = 0.3)]
        seconds: f64,
        /// Paired rounds per point: the raw layer and the agents back to back, the order
        /// swapped every round; the ratio is the median of the rounds' ratios, with its range.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Skip the registration cache passes (2000 sub-ranges of a 4 GiB region, twice).
        #[arg(long)]
        no_cache: bool,
        /// Handshakes each way, with a shared secret and without, to show what
        /// authenticating a peer costs (0 skips; simulated testbed only).
        #[arg(long, default_value_t = 20)]
        handshakes: usize,
        /// Rounds of posting a READ of 64 blocks three ways — 64 hand-built descriptor pairs,
        /// 64 indices into lists prepared once, a prepared transfer posted again — to show
        /// what preparing saves (0 skips; simulated testbed only).
        #[arg(long, default_value_t = 1000)]
        block_lists: usize,
        /// Leave every thread to the scheduler (see `bench rdma --no-pin`); by default the
        /// simulated NICs' engines get a core of their own for both the raw layer and the
        /// agents.
        #[arg(long)]
        no_pin: bool,
    },
    /// Simulated RDMA WRITE bandwidth (64 B to 4 MiB) against memcpy measured in the same run,
    /// the 64 B message rate on one queue pair, and revoke latency under load.
    Rdma {
        /// Message sizes in bytes (default: 64 B to 4 MiB, powers of 4).
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<u64>,
        /// Seconds spent on each bandwidth point (and on its memcpy reference).
        #[arg(long, default_value_t = 0.3)]
        seconds: f64,
        /// Revokes for the latency-under-load part (0 skips it).
        #[arg(long, default_value_t = 200)]
        revokes: u64,
        /// Leave every thread to the scheduler. By default the simulated NICs' engines get a
        /// core of their own (as a NIC's processors are its own) and the host's threads the rest.
        #[arg(long)]
        no_pin: bool,
    },
    /// The io_uring ring (dmaplane-storage) against fio on the same file in the same run: 4 KiB
    /// random reads at queue depth 64, 1 MiB sequential reads and writes at depth 16, all
    /// O_DIRECT with registered buffers and files. Without fio only this side runs.
    Storage {
        /// The test file's size (created, filled and removed by the run): bytes, or with k, m,
        /// g as fio takes it.
        #[arg(long, default_value = "1g", value_parser = crate::units::parse_size)]
        size: u64,
        /// fio's --rw: read, write, randread or randwrite. With --rw, --bs or --depth one
        /// workload of that shape runs (fio's defaults for what is not given: read, 4k, 1);
        /// without any, three: randread 4k × 64, read 1m × 16, write 1m × 16.
        #[arg(long)]
        rw: Option<dmaplane_bench::storage::Rw>,
        /// fio's --bs: the block size (bytes, or with k, m as fio takes it).
        #[arg(long, value_parser = crate::units::parse_size)]
        bs: Option<u64>,
        /// fio's --iodepth: requests kept in flight.
        #[arg(long)]
        depth: Option<u32>,
        /// Where the test file goes: its file system must take O_DIRECT (a tmpfs may not).
        #[arg(long, default_value = ".")]
        dir: std::path::PathBuf,
        /// Seconds per workload, per side, per round.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Rounds per workload, the two sides back to back in each, the order swapped every
        /// round; the ratio is the rounds' median, printed with their lowest and highest.
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=100))]
        rounds: u32,
    },
    /// Simulated GPU -> NIC -> NIC -> GPU throughput per PCIe route, direct vs staged, against
    /// memcpy in the same run; on a CUDA machine also host<->device bandwidth from registered
    /// host memory against PyTorch's pinned-memory copy.
    P2p {
        /// Bytes per transfer (a multiple of --chunk).
        #[arg(long, default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(4096..=(4 << 30)))]
        size: u64,
        /// Bytes per RDMA WRITE.
        #[arg(long, default_value_t = 4 << 20, value_parser = clap::value_parser!(u64).range(4096..=(1 << 30)))]
        chunk: u64,
        /// Runs per row (the best is reported).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
        reps: u32,
        /// Leave every thread to the scheduler (see `bench rdma --no-pin`).
        #[arg(long)]
        no_pin: bool,
    },
}

pub fn run(cmd: &BenchCmd, json: bool) -> Result<()> {
    match cmd {
        BenchCmd::P2p {
            size,
            chunk,
            reps,
            no_pin,
        } => p2p::run(*size, *chunk, *reps, *no_pin, json),
        BenchCmd::Sgl { iters, scenario } => sgl(*iters, scenario, json),
        BenchCmd::Storage {
            size,
            rw,
            bs,
            depth,
            dir,
            seconds,
            rounds,
        } => storage(*size, (*rw, *bs, *depth), dir, *seconds, *rounds, json),
        BenchCmd::Agent {
            backend,
            device,
            blocks,
            batches,
            seconds,
            rounds,
            no_cache,
            handshakes,
            block_lists,
            no_pin,
        } => agent(
            backend,
            device.as_deref(),
            blocks,
            batches,
            (*seconds, *rounds),
            (*no_cache, *no_pin, *handshakes, *block_lists),
            json,
        ),
        BenchCmd::Rdma {
            sizes,
            seconds,
            revokes,
            no_pin,
        } => rdma(sizes, *seconds, *revokes, *no_pin, json),
    }
}

fn storage(
    size: u64,
    shape: (Option<Rw>, Option<u64>, Option<u32>),
    dir: &std::path::Path,
    seconds: f64,
    rounds: u32,
    json: bool,
) -> Result<()> {
    use dmaplane_bench::storage::{StorageBenchConfig, Workload, find_fio, run};
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 600.0) {
        bail!("--seconds {seconds}: must be more than 0 and at most 600");
    }
    let workloads = match shape {
        (None, None, None) => Workload::ALL.to_vec(),
        // fio's own defaults for what is not given.
        (rw, bs, depth) => vec![
            Workload::new(
                rw.unwrap_or(Rw::Read),
                bs.unwrap_or(4096),
                depth.unwrap_or(1),
            )
            .map_err(anyhow::Error::msg)?,
        ],
    };
    let cfg = StorageBenchConfig {
        dir: dir.to_path_buf(),
        size,
        per_point: Duration::from_secs_f64(seconds),
        rounds,
        fio: find_fio(),
        workloads,
    };
    let bar = ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    let r = run(&cfg, &|what: &str| bar.set_message(what.to_string()))?;
    bar.finish_and_clear();
    if json {
        say!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    say!(
        "storage: dmaplane's io_uring ring vs fio on {} ({}), O_DIRECT (alignment: memory {} B, offset {} B{}), registered buffers and files",
        r.file,
        bytes(r.size),
        r.align.0,
        r.align.1,
        if r.align.2 {
            ", from statx"
        } else {
            ", assumed"
        }
    );
    match (&r.fio_version, &r.fio_missing) {
        (Some(v), _) => say!("fio: {v}"),
        (None, Some(why)) => say!("{why}"),
        _ => {}
    }
    say!(
        "{:>9} {:>6} {:>3} {:>12} {:>10} {:>7} {:>12} {:>10} {:>7} {:>7} {:>11}",
        "workload",
        "block",
        "QD",
        "ours IOPS",
        "ours MB/s",
        "dev/IO",
        "fio IOPS",
        "fio MB/s",
        "dev/IO",
        "ratio",
        "range"
    );
    let per_io = |s: &dmaplane_bench::storage::Measured| {
        s.device
            .map_or_else(|| "-".to_string(), |d| format!("{:.2}", d.per_io(s.ios)))
    };
    for w in &r.rows {
        let (fi, fb, fd, ratio, range) = match (&w.fio, w.ratio, w.ratio_range) {
            (Some(f), Some(x), Some((lo, hi))) => (
                format!("{:.0}", f.iops),
                format!("{:.0}", f.mb_s),
                per_io(f),
                format!("{:.0}%", x * 100.0),
                format!("{:.0}-{:.0}%", lo * 100.0, hi * 100.0),
            ),
            _ => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        say!(
            "{:>9} {:>6} {:>3} {:>12.0} {:>10.0} {:>7} {:>12} {:>10} {:>7} {:>7} {:>11}",
            w.workload.rw,
            bytes(w.workload.block),
            w.workload.depth,
            w.ours.iops,
            w.ours.mb_s,
            per_io(&w.ours),
            fi,
            fb,
            fd,
            ratio,
            range
        );
    }
    say!(
        "each side's median of {} round(s) of {seconds} s; ratio: the median of the rounds' \
         ratios (ours / fio, the two back to back), range: their lowest and highest",
        rounds
    );
    if r.rows.iter().any(|w| w.ours.device.is_some()) {
        say!(
            "dev/IO: requests the disk completed per I/O a side made, counted by the block layer \
             (/sys/dev/block/*/stat; other I/O on the disk counts too). Above 1: the kernel split \
             the I/O (a buffer of more scattered pages than the queue's max_segments)"
        );
    }
    if let Some(cmd) = r.rows.first().and_then(|w| w.fio_command.as_ref()) {
        if r.rows.len() > 1 {
            say!("fio command (first workload; the others change --rw, --bs, --iodepth):\n  {cmd}");
        } else {
            say!("fio command:\n  {cmd}");
        }
    }
    Ok(())
}

fn sgl(iters: u32, names: &[String], json: bool) -> Result<()> {
    if iters == 0 {
        bail!("--iters 0: at least one registration per side is needed");
    }
    let mut scenarios = Vec::new();
    for n in names {
        match Scenario::parse(n) {
            Some(s) => scenarios.push(s),
            None => bail!(
                "--scenario {n:?} is not a scenario (known: {})",
                Scenario::ALL.map(|s| s.name()).join(", ")
            ),
        }
    }
    if scenarios.is_empty() {
        scenarios = Scenario::ALL.to_vec();
    }
    let bar = ProgressBar::new(scenarios.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    for s in scenarios {
        bar.set_message(s.name());
        rows.push(measure(s, iters));
        bar.inc(1);
    }
    bar.finish_and_clear();
    if json {
        say!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    Ok(())
}

fn agent(
    backend: &str,
    device: Option<&str>,
    blocks: &[u64],
    batches: &[usize],
    (seconds, rounds): (f64, u32),
    (no_cache, no_pin, handshakes, block_lists): (bool, bool, usize, usize),
    json: bool,
) -> Result<()> {
    let verbs = match backend {
        "sim" => None,
        "verbs" => Some(device.unwrap_or("").to_string()),
        other => bail!("--backend {other}: sim or verbs"),
    };
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 60.0) {
        bail!("--seconds {seconds}: must be more than 0 and at most 60");
    }
    if rounds == 0 || rounds > 1000 {
        bail!("--rounds {rounds}: 1 to 1000");
    }
    let mut cfg = dmaplane_bench::agent::AgentBenchConfig {
        per_point: Duration::from_secs_f64(seconds),
        rounds,
        ..Default::default()
    };
    if !blocks.is_empty() {
        cfg.blocks = blocks.to_vec();
    }
    if !batches.is_empty() {
        cfg.batches = batches.to_vec();
    }
    if no_cache {
        cfg.cache = None;
    }
    if handshakes > 1000 {
        bail!("--handshakes {handshakes}: 0 to 1000");
    }
    cfg.handshakes = handshakes;
    if block_lists > 100_000 {
        bail!("--block-lists {block_lists}: 0 to 100000");
    }
    cfg.block_lists = block_lists;
    if no_pin {
        cfg.placement = None;
    }
    if verbs.is_some() {
        // A real NIC's processors are its own: nothing to keep off the host's cores.
        cfg.placement = None;
        cfg.cache = None;
        cfg.handshakes = 0;
        cfg.block_lists = 0;
        cfg.working_set = 16 << 20;
        cfg.verbs = verbs;
    }
    let bar = ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    let r = dmaplane_bench::agent::run(&cfg, &|what: &str| bar.set_message(what.to_string()))?;
    bar.finish_and_clear();
    if json {
        say!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    say!(
        "agent vs raw rdma layer ({}): chunks of {}, {} QPs × depth {}; {} paired rounds of {} s a side per point \
         (GB/s: each side's median round; ratio: the median of the rounds' ratios [lowest-highest]); \
         times in µs (avg / p99)\nplacement: {}",
        r.backend,
        bytes(r.chunk),
        r.qps,
        r.depth,
        rounds,
        seconds,
        r.placement
    );
    say!(
        "{:>8} {:>6} {:>7} {:>10} {:>10} {:>7} {:>11} {:>15} {:>15} {:>17} {:>17}",
        "block",
        "batch",
        "iters",
        "agent",
        "raw",
        "ratio",
        "range",
        "prepare",
        "post",
        "completion",
        "raw completion"
    );
    for w in &r.rows {
        say!(
            "{:>8} {:>6} {:>7} {:>6.2} GB/s {:>5.2} GB/s {:>6.0}% {:>11} {:>7.1} /{:>6.1} {:>7.1} /{:>6.1} {:>8.1} /{:>7.1} {:>8.1} /{:>7.1}",
            bytes(w.block),
            w.batch,
            w.iterations,
            w.agent_gb_s,
            w.raw_gb_s,
            w.ratio * 100.0,
            format!(
                "{:.0}-{:.0}%",
                w.ratio_spread.low * 100.0,
                w.ratio_spread.high * 100.0
            ),
            w.prepare_us.avg,
            w.prepare_us.p99,
            w.post_us.avg,
            w.post_us.p99,
            w.completion_us.avg,
            w.completion_us.p99,
            w.raw_completion_us.avg,
            w.raw_completion_us.p99,
        );
    }
    if let Some(c) = &r.cache {
        say!(
            "\nregistration cache: {} sub-ranges of one {} region: first pass {:.2} ms ({} misses), \
             second pass {:.3} ms ({} hits): {:.2}% of the first",
            c.registrations,
            bytes(c.region),
            c.first_pass_ms,
            c.misses,
            c.second_pass_ms,
            c.hits,
            c.ratio * 100.0
        );
    }
    if let Some(b) = &r.block_lists {
        say!(
            "\nposting a READ of {} blocks of {} ({} rounds, the three in turn; µs from the first \
             descriptor to the transfer posted, median [lowest-highest]):\n  hand-built descriptors \
             {:.1} [{:.1}-{:.1}]\n  by index into prepared lists {:.1} [{:.1}-{:.1}]: {:.0}% of \
             hand-built\n  a prepared transfer posted again {:.1} [{:.1}-{:.1}]: {:.0}% of hand-built",
            b.batch,
            bytes(b.block),
            b.rounds,
            b.hand_built_us.median,
            b.hand_built_us.low,
            b.hand_built_us.high,
            b.by_index_us.median,
            b.by_index_us.low,
            b.by_index_us.high,
            b.by_index_ratio * 100.0,
            b.prepared_us.median,
            b.prepared_us.low,
            b.prepared_us.high,
            b.prepared_ratio * 100.0
        );
    }
    if let Some(h) = &r.handshake {
        say!(
            "\nhandshake (connect_to, paired, {} each way): without a secret {:.0} µs median \
             [{:.0}-{:.0}], with a secret {:.0} µs median [{:.0}-{:.0}]: {:.0}% of the time without",
            h.handshakes,
            h.plain_us.median,
            h.plain_us.low,
            h.plain_us.high,
            h.secret_us.median,
            h.secret_us.low,
            h.secret_us.high,
            h.ratio * 100.0
        );
    }
    Ok(())
}

fn rdma(sizes: &[u64], seconds: f64, revokes: u64, no_pin: bool, json: bool) -> Result<()> {
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 60.0) {
        bail!("--seconds {seconds}: must be more than 0 and at most 60");
    }
    let mut cfg = RdmaBenchConfig {
        per_point: Duration::from_secs_f64(seconds),
        rate_time: Duration::from_secs_f64((seconds * 3.0).max(0.5)),
        revokes,
        ..RdmaBenchConfig::default()
    };
    if no_pin {
        cfg.placement = None;
    }
    if !sizes.is_empty() {
        if let Some(bad) = sizes.iter().find(|&&s| s == 0 || s > MAX_SIZE) {
            bail!("--sizes: {bad} is not a message size (1 B to {MAX_SIZE} B)");
        }
        cfg.sizes = sizes.to_vec();
    }
    let bar = ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    let r = dmaplane_bench::rdma::run(&cfg, &|what: &str| bar.set_message(what.to_string()))?;
    bar.finish_and_clear();
    if json {
        say!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    say!(
        "{:>8} {:>10} {:>12} {:>12} {:>8} {:>18}",
        "size",
        "writes",
        "rdma write",
        "memcpy",
        "ratio",
        "fabric copy"
    );
    for b in &r.bandwidth {
        say!(
            "{:>8} {:>10} {:>8.2} GiB/s {:>6.2} GiB/s {:>7.0}% {:>8.2} GiB/s {:>4.0}%",
            bytes(b.size),
            b.writes,
            b.rdma_gib_s,
            b.memcpy_gib_s,
            b.ratio * 100.0,
            b.fabric_copy_gib_s,
            b.fabric_copy_gib_s / b.memcpy_gib_s * 100.0
        );
    }
    say!(
        "fabric copy: the simulated fabric's own copy of the same messages between the two \
         windows (byte-wise atomic, as every simulated DMA copies), against plain memcpy"
    );
    let m = &r.msg_rate;
    say!(
        "\nmessage rate: {:.2} M writes/s of {} B on one queue pair ({} writes in {:.2} s; chains \
         of {}, one signaled; {} in flight)",
        m.writes_per_s / 1e6,
        m.size,
        m.writes,
        m.seconds,
        m.chain,
        m.depth
    );
    let v = &r.revoke;
    if v.revokes > 0 {
        say!(
            "revoke under load ({} QPs x {} deep, 4 KiB writes): p50 {:.0} us, p99 {:.0} us, \
             max {:.0} us over {} revokes; lost {}, post-ack accesses {}",
            v.qps,
            v.depth,
            v.revoke_latency_us.p50,
            v.revoke_latency_us.p99,
            v.revoke_latency_us.max,
            v.revokes,
            v.lost,
            v.post_ack_accesses
        );
    }
    say!(
        "\nsimulated NIC on the built-in testbed: host A (mem0, nic0) writes into host B (mem1, \
         nic1); memcpy is this machine's, same sizes and working set, same run\nplacement: {}",
        r.placement
    );
    Ok(())
}

fn print_table(rows: &[Row]) {
    say!(
        "{:<22} {:>12} {:>12} {:>9} {:>11} {:>11} {:>9} {:>10} {:>10}",
        "scenario",
        "addrlist",
        "sgtable",
        "faster",
        "addrl meta",
        "sgt meta",
        "smaller",
        "addrl xlat",
        "sgt xlat"
    );
    for r in rows {
        say!(
            "{:<22} {:>12} {:>12} {:>8.1}x {:>11} {:>11} {:>8.1}x {:>10} {:>10}",
            r.scenario,
            ns(r.addrlist_ns),
            ns(r.sgtable_ns),
            r.time_ratio,
            bytes(r.addrlist_bytes),
            bytes(r.sgtable_bytes),
            r.bytes_ratio,
            format!("{}x{}", r.addrlist_entries, bytes(r.addrlist_page_size)),
            format!("{}x{}", r.sgtable_entries, bytes(r.sgtable_page_size)),
        );
    }
    say!(
        "\nmedian of {} registrations each way; xlat = MR translation entries x page size; a BAR's \
         ZONE_DEVICE page map is counted in sgt meta (built once per BAR: {} for the largest here)",
        rows.first().map_or(0, |r| r.iterations),
        ns(rows.iter().map(|r| r.pagemap_ns).max().unwrap_or(0))
    );
}
