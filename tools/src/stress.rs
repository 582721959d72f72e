//! `dmaplane stress revoke`.

use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use dmaplane::stress::{ExporterKind, Inject, StressConfig, StressReport, run_agents, run_sim};
use dmaplane_core::cpu::Placement;
use dmaplane_rdma::QuiescePolicy;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Subcommand)]
pub enum StressCmd {
    /// RDMA WRITE traffic while the exporter revokes and re-exports its memory.
    Revoke(RevokeArgs),
    /// The holder process of `revoke --layer agent` on verbs or TCP (started by it).
    #[command(hide = true)]
    RevokeHolder(crate::agent_stress::HolderArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Sim,
    Verbs,
    /// TCP NICs (a software RC NIC over TCP), the holder in a second process (`--layer agent`).
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Exporter {
    /// Host memory, revoked and exported anew.
    Host,
    /// Simulated GPU memory (gpu2, below nic1's switch), freed and re-allocated: every free is
    /// a revoke.
    Gpu,
    /// CUDA device memory (GPU 0), registered by the NIC as a dma-buf or by device VA (the
    /// negotiation picks and the run reports it), revoked under WRITE traffic (verbs backend;
    /// with `--layer agent`, freed by an Agent under a second process's transfers).
    Cuda,
}

/// Which layer the stress drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Layer {
    /// The RDMA layer itself: queue pairs, MRs and leases, every fault injectable.
    Raw,
    /// The application library: an owner Agent frees memory under a holder Agent's WRITE
    /// transfers (what `--exporter cuda` runs on a real device).
    Agent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    /// Stop at the next message boundary, then flush what did not start (the default: safe for
    /// any WRITE size).
    Boundary,
    /// Flush at once (a multi-packet WRITE under way is cut and breaks its connection).
    Flush,
    /// Let everything posted finish, up to the deadline.
    Drain,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    #[arg(long, value_enum, default_value = "sim")]
    backend: Backend,
    /// Whose memory is revoked under the traffic (sim backend).
    #[arg(long, value_enum, default_value = "host")]
    exporter: Exporter,
    /// Which layer the traffic goes through: the raw RDMA layer, or two Agents (`--qps`
    /// transfers in flight, one WRITE each; `--depth` does not apply; on verbs with
    /// `--exporter cuda` only). `--backend tcp` always runs the agents, in two processes.
    #[arg(long, value_enum, default_value = "raw")]
    layer: Layer,
    /// Queue pairs.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    qps: u32,
    /// Outstanding work requests per queue pair.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=32768))]
    depth: u32,
    /// Bytes per work request.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=(64 << 20)))]
    size: u32,
    /// Revoke/re-export cycles.
    #[arg(long, default_value_t = 100)]
    revokes: u64,
    /// Run at least this long.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Seed for the revoke schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How queue pairs are quiesced.
    #[arg(long, value_enum, default_value = "boundary")]
    quiesce: Policy,
    /// Drain deadline and exporter deadline, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    deadline_ms: u64,
    /// RDMA device (verbs backend; default: the first libibverbs lists).
    #[arg(long)]
    device: Option<String>,
    /// Simulated backend: leave every thread to the scheduler. By default the NICs' engines get
    /// a core of their own (as a NIC's processors are its own), the exporter and the data path
    /// the rest, and the data path (the load) runs at the lowest priority.
    #[arg(long)]
    no_pin: bool,
    /// TCP backend: the holder's bytes take the socket even though both agents run on this
    /// host (by default they move through shared memory, and the holder's memory map is read
    /// at every ack).
    #[arg(long)]
    no_shm: bool,
    /// Break the protocol on purpose — early-fence, no-zap, ignore-lease-revoke, ack-then-write,
    /// free-before-ack, no-backstop, no-qp-quiesce (the writer's NIC leaves its queue pairs
    /// running when the source memory they read moves), keep-views (TCP: the holder keeps its
    /// view of freed memory). The run must then exit non-zero, naming the violation.
    #[arg(long, value_parser = clap::value_parser!(Inject))]
    inject: Option<Inject>,
}

pub fn run(cmd: &StressCmd, json: bool) -> Result<()> {
    let a = match cmd {
        StressCmd::Revoke(a) => a,
        StressCmd::RevokeHolder(h) => return crate::agent_stress::holder(h),
    };
    if !(a.seconds.is_finite() && a.seconds >= 0.0) {
        bail!("--seconds must be a non-negative number, got {}", a.seconds);
    }
    let slots = u64::from(a.qps) * u64::from(a.depth) * u64::from(a.size);
    if slots > 8 << 30 {
        bail!(
            "--qps {} × --depth {} × --size {} = {} bytes of buffers: more than the 8 GiB limit",
            a.qps,
            a.depth,
            a.size,
            slots
        );
    }
    if a.backend == Backend::Sim && a.exporter == Exporter::Cuda {
        bail!(
            "--exporter cuda runs on a real RDMA device: add --backend verbs (the simulated \
             GPUs are --exporter gpu)"
        );
    }
    if a.backend == Backend::Verbs && a.exporter == Exporter::Gpu {
        bail!(
            "--exporter gpu --backend verbs: the verbs stress exports host memory (udmabuf, \
             dma-heap) or CUDA memory (--exporter cuda); the simulated GPUs are --backend sim"
        );
    }
    if a.backend == Backend::Verbs && a.layer == Layer::Agent && a.exporter != Exporter::Cuda {
        bail!(
            "--layer agent --backend verbs runs with --exporter cuda (CUDA memory); the \
             agents on host or simulated GPU memory are --backend sim"
        );
    }
    let deadline = Duration::from_millis(a.deadline_ms);
    let cfg = StressConfig {
        qps: a.qps as usize,
        depth: a.depth as usize,
        size: a.size,
        revokes: a.revokes,
        seconds: a.seconds,
        seed: a.seed,
        policy: match a.quiesce {
            Policy::Boundary => QuiescePolicy::Boundary { deadline },
            Policy::Flush => QuiescePolicy::Flush,
            Policy::Drain => QuiescePolicy::Drain { deadline },
        },
        deadline,
        placement: if a.no_pin { None } else { Placement::auto() },
        exporter: match a.exporter {
            Exporter::Host => ExporterKind::Host,
            Exporter::Gpu | Exporter::Cuda => ExporterKind::Gpu,
        },
        inject: a.inject,
    };
    let bar = if json {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(a.revokes);
        b.set_style(
            ProgressStyle::with_template("revokes {bar:40} {pos}/{len} [{elapsed_precise}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    };
    if a.backend == Backend::Sim
        && a.layer == Layer::Raw
        && let Some(avail) = dmaplane::stress::mem_available()
        && let Err(why) = dmaplane::stress::check_fits(&cfg, avail)
    {
        bar.finish_and_clear();
        bail!("this run does not fit: {why}");
    }
    if a.backend == Backend::Tcp && a.exporter == Exporter::Gpu {
        bail!(
            "--exporter gpu --backend tcp: TCP agents export host memory (--exporter host) or \
             CUDA memory (--exporter cuda); the simulated GPUs are --backend sim"
        );
    }
    let report = match a.backend {
        Backend::Sim if a.layer == Layer::Agent => run_agents(&cfg, &|n| bar.set_position(n))?,
        Backend::Sim => run_sim(&cfg, &|n| bar.set_position(n))?,
        Backend::Verbs if a.layer == Layer::Agent => crate::agent_stress::run(
            &cfg,
            crate::agent_stress::Nics::Verbs,
            crate::agent_stress::Memory::Cuda,
            a.device.as_deref(),
            false,
            &|n| bar.set_position(n),
        )?,
        Backend::Tcp => crate::agent_stress::run(
            &cfg,
            crate::agent_stress::Nics::Tcp,
            if a.exporter == Exporter::Cuda {
                crate::agent_stress::Memory::Cuda
            } else {
                crate::agent_stress::Memory::Host
            },
            None,
            !a.no_shm,
            &|n| bar.set_position(n),
        )?,
        Backend::Verbs => {
            crate::verbs_stress::run(&cfg, a.device.as_deref(), &|n| bar.set_position(n))?
        }
    };
    bar.finish_and_clear();
    print(&report, json)?;
    let violations = report.violations();
    if !violations.is_empty() {
        let injected = a
            .inject
            .map_or(String::new(), |i| format!(" (fault injected: {i})"));
        bail!("stress failed{injected}: {}", violations.join("; "));
    }
    if let Some(i) = a.inject {
        bail!("--inject {i}: the fault went unnoticed — a check that cannot fail");
    }
    Ok(())
}

fn print(r: &StressReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    println!(
        "stress revoke ({}): {} QPs × {} deep × {} B, {} of {} revokes ({}) in {:.1} s{}",
        r.backend,
        r.qps,
        r.depth,
        r.size,
        r.revokes,
        r.revokes_asked,
        if r.source_revokes > 0 {
            format!(
                "and {} of the source under its own queue pairs",
                r.source_revokes
            )
        } else {
            "of the target".to_string()
        },
        r.seconds,
        r.inject
            .map_or(String::new(), |i| format!(", fault injected: {i}"))
    );
    println!("  posted             {}", r.posted);
    println!("  completed_ok       {}", r.completed_ok);
    println!("  flushed            {}", r.flushed);
    println!("  failed             {}", r.failed);
    println!("  lost               {}", r.lost);
    println!("  corrupt            {}", r.corrupt);
    println!("  post_ack_accesses  {}", r.post_ack_accesses);
    println!("  zapped_source_accesses {}", r.zapped_source_accesses);
    match &r.oracle {
        Some(o) => {
            println!("  dma_after_fence    {}", o.dma_after_fence);
            println!("  dma_after_ack      {}", o.dma_after_ack);
            println!("  blocked_by_backstop {}", o.blocked_by_backstop);
            println!("  reused_before_ack  {}", o.reused_before_ack);
            println!(
                "  oracle             {} fences, {} acks observed",
                o.fences, o.acks
            );
        }
        None => println!(
            "  oracle             none on this backend (the NIC does the DMA; judged by the poison at each ack)"
        ),
    }
    println!("  holders_cut_off    {}", r.holders_cut_off);
    println!("  views_after_ack    {}", r.views_after_ack);
    println!("  dropped_while_pinned {}", r.dropped_while_pinned);
    println!(
        "  bytes_verified     {}",
        crate::units::bytes(r.bytes_verified)
    );
    println!(
        "  completed_before_ack {} (reaped after the ack, covered by its poison)",
        r.completed_before_ack
    );
    println!(
        "  posts refused      {} (target revoked or QP recovering)",
        r.posts_refused
    );
    println!(
        "  revoke_latency_us  p50 {:.0}  p99 {:.0}  max {:.0}",
        r.revoke_latency_us.p50, r.revoke_latency_us.p99, r.revoke_latency_us.max
    );
    for n in &r.notes {
        println!("  note: {n}");
    }
    for f in r.failures.iter().take(10) {
        println!("  ! {f}");
    }
    Ok(())
}
