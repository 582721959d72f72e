//! `dmaplane`: peer-to-peer, zero-copy data movement — inspect, benchmark, stress.

mod agent;
mod agent_stress;
mod bench;
mod check;
mod demo;
mod doctor;
mod gpu_doctor;
mod load;
mod report;
mod secret;
mod storage_doctor;
mod stress;
mod topo;
mod units;
mod verbs_stress;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "dmaplane",
    version,
    about = "Peer-to-peer, zero-copy DMA between NICs, GPUs, storage and host memory"
)]
struct Cli {
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// GPU -> NIC -> NIC -> GPU over every PCIe route of the testbed, every byte verified, and a
    /// GPU free (a revoke) under traffic.
    Demo(demo::DemoArgs),
    /// Show the PCIe tree and the P2P route between every pair of devices.
    Topo(topo::TopoArgs),
    /// Benchmarks, each reported against a reference measured in the same run.
    Bench {
        /// Also write what the bench prints to FILE as a markdown report: the command, when,
        /// the machine, and the results.
        #[arg(long, global = true, value_name = "FILE")]
        report: Option<std::path::PathBuf>,
        #[command(subcommand)]
        which: bench::BenchCmd,
    },
    /// Stress tests that must end with nothing lost and nothing written after a revoke.
    Stress {
        #[command(subcommand)]
        which: stress::StressCmd,
    },
    /// Checkpoint shards (files) -> GPU memory of one agent -> NIC -> GPU memory of another, the
    /// read of shard n + 1 overlapping the send of shard n, every byte verified, against each
    /// stage alone in the same run (simulated testbed).
    Load(load::LoadArgs),
    /// What this machine offers the data path (RDMA, dma-buf exporters, io_uring), and what to fix.
    Doctor,
    /// An agent other processes reach over TCP or RDMA (`serve`), and its clients (`write`,
    /// `read`, `bench`).
    Agent {
        #[command(subcommand)]
        which: agent::AgentCmd,
    },
    /// The shared secret agents prove to each other on their handshake.
    Secret {
        #[command(subcommand)]
        which: secret::SecretCmd,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DMAPLANE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_thread_names(true)
        .init();
    let cli = Cli::parse();
    let res = match &cli.cmd {
        Cmd::Demo(args) => demo::run(args, cli.json),
        Cmd::Topo(args) => topo::run(args, cli.json),
        Cmd::Bench { which, report } => {
            if report.is_some() {
                report::start();
            }
            bench::run(which, cli.json).and_then(|()| match report {
                Some(path) => report::finish(path, cli.json),
                None => Ok(()),
            })
        }
        Cmd::Stress { which } => stress::run(which, cli.json),
        Cmd::Load(args) => load::run(args, cli.json),
        Cmd::Doctor => doctor::run(cli.json),
        Cmd::Secret { which } => secret::run(which, cli.json),
        Cmd::Agent { which } => agent::run(which, cli.json),
    };
    if let Err(e) = res {
        eprintln!("dmaplane: {e:#}");
        std::process::exit(1);
    }
}
