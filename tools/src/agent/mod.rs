//! `dmaplane agent`: an agent another process can reach, and the clients that use it.
//!
//! - `serve` ([`serve`]): a long-running agent — TCP NICs (any host) or verbs (an RDMA device),
//!   host memory and files it registers and publishes, its metadata printed and written to a
//!   file — until Ctrl-C, which deregisters everything and leaves cleanly.
//! - `write` and `read` ([`client`]): connect to a served agent by address and move bytes,
//!   with a progress bar, `--json`, verification, and Ctrl-C that deregisters and leaves.
//! - `bench` ([`mod@bench`]): the same, measured against a plain TCP stream of the same bytes over
//!   as many connections, in the same run.

mod bench;
mod client;
mod pattern;
mod serve;
mod sink;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use dmaplane::{Agent, AgentBuilder};

use crate::units::parse_size;

#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Run an agent other processes and hosts connect to, until Ctrl-C.
    Serve(serve::ServeArgs),
    /// WRITE to a served agent's region (then READ it back and compare, unless --no-verify).
    Write(client::ClientArgs),
    /// READ a served agent's region (compared with the pattern `serve --fill` wrote, with
    /// --verify).
    Read(client::ClientArgs),
    /// Measure WRITEs and READs against a served agent, and a plain TCP stream of the same bytes
    /// over as many connections in the same run (starts the server itself unless --connect).
    Bench(bench::BenchArgs),
    /// The plain TCP peer `agent bench` measures its reference against (started by it).
    #[command(hide = true)]
    Sink(sink::SinkArgs),
}

/// The NICs an agent runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Software RC NICs over TCP: any host, container or laptop.
    Tcp,
    /// An RDMA device through libibverbs (feature `verbs`).
    Verbs,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Tcp => "tcp",
            Backend::Verbs => "verbs",
        }
    }
}

/// What every agent of these commands is built from.
#[derive(Debug, Clone, Args)]
pub struct AgentOpts {
    /// The NICs.
    #[arg(long, value_enum, default_value = "tcp")]
    backend: Backend,
    /// RDMA device (verbs; default: every device libibverbs lists).
    #[arg(long)]
    device: Option<String>,
    /// The shared secret both agents prove on the handshake: a file `dmaplane secret new`
    /// made (mode 0600). Without one, agents accept peers on loopback only.
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// Queue pairs per path (on TCP, one connection each).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    qps: u16,
    /// Bytes per request: a transfer is split into WRITEs or READs of at most this.
    #[arg(long, default_value = "4m", value_parser = parse_size)]
    chunk: u64,
    /// How long a transfer may see no completion before it fails.
    #[arg(long, default_value_t = 10.0)]
    stall_s: f64,
    /// How long each step of connecting to a peer may wait for it (a server that is not up yet
    /// is tried again until then).
    #[arg(long, default_value_t = 5.0)]
    connect_s: f64,
    /// TCP: never move bytes through shared memory, even with a peer on this host (by default
    /// a proven peer of the same user maps the registered memory and copies once; every other
    /// peer takes the socket).
    #[arg(long)]
    no_shm: bool,
}

impl AgentOpts {
    fn builder(&self, name: &str) -> Result<AgentBuilder> {
        for (flag, v) in [("--stall-s", self.stall_s), ("--connect-s", self.connect_s)] {
            if !(v.is_finite() && v > 0.0) {
                anyhow::bail!("{flag} must be a positive number of seconds, got {v}");
            }
        }
        let b = Agent::builder(name)
            .qps_per_path(usize::from(self.qps))
            .chunk(self.chunk)
            .stall_timeout(std::time::Duration::from_secs_f64(self.stall_s))
            .setup_timeout(std::time::Duration::from_secs_f64(self.connect_s));
        let b = match self.backend {
            Backend::Tcp => b.tcp().tcp_shm(!self.no_shm),
            #[cfg(feature = "verbs")]
            Backend::Verbs => b.verbs(),
            #[cfg(not(feature = "verbs"))]
            Backend::Verbs => anyhow::bail!("--backend verbs needs the `verbs` feature"),
        };
        let b = match &self.device {
            Some(d) => b.nics([d.as_str()]),
            None => b,
        };
        Ok(match &self.secret_file {
            Some(f) => b.secret(
                dmaplane::auth::Secret::from_file(f)
                    .with_context(|| format!("--secret-file {}", f.display()))?,
            ),
            None => b,
        })
    }
}

/// Ctrl-C (SIGINT) and SIGTERM, as a flag the commands look at between steps.
#[derive(Debug, Clone)]
struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    fn install() -> Result<Interrupt> {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        ctrlc::set_handler(move || {
            if f.swap(true, Ordering::SeqCst) {
                // A second Ctrl-C: the user means it.
                std::process::exit(130);
            }
        })
        .context("installing the Ctrl-C handler")?;
        Ok(Interrupt(flag))
    }

    fn raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

pub fn run(cmd: &AgentCmd, json: bool) -> Result<()> {
    match cmd {
        AgentCmd::Serve(a) => serve::run(a, json),
        AgentCmd::Write(a) => client::run(a, client::Op::Write, json),
        AgentCmd::Read(a) => client::run(a, client::Op::Read, json),
        AgentCmd::Bench(a) => bench::run(a, json),
        AgentCmd::Sink(a) => sink::run(a),
    }
}
