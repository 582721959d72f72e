//! `dmaplane agent serve`: a long-running agent. It allocates host memory (`--mem NAME=SIZE`)
//! and registers files (`--file PATH`), publishes them, prints how to reach it, and serves
//! until Ctrl-C (or SIGTERM): then it deregisters every region — each peer's transfers into
//! them end with a typed error, nothing lands after — and leaves.
//!
//! The first line on stdout is `LISTEN <address>`, so scripts (and `agent bench`) can read it.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use dmaplane::{FileSpec, Memory, Region};

use super::{AgentOpts, Interrupt, pattern};
use crate::units::{bytes, parse_size};

/// How long the deregistrations at exit wait for peers to acknowledge.
const LEAVE: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    opts: AgentOpts,
    /// The agent's name (peers name it by it).
    #[arg(long, default_value = "serve")]
    name: String,
    /// Where the handshake listener binds (port 0 picks one); TCP NICs take its address too.
    #[arg(long, default_value = "127.0.0.1:7474")]
    listen: String,
    /// The host:port peers dial, when --listen is a wildcard address (0.0.0.0).
    #[arg(long)]
    advertise: Option<String>,
    /// Listen on a routable address without a secret (anyone who reaches it may connect).
    #[arg(long)]
    insecure: bool,
    /// Host memory to allocate, register and publish, as NAME=SIZE (repeatable; default
    /// pool=64m when no --file is given either).
    #[arg(long = "mem", value_name = "NAME=SIZE")]
    mems: Vec<String>,
    /// A file to register and publish, read-only (repeatable).
    #[arg(long = "file", value_name = "PATH")]
    files: Vec<PathBuf>,
    /// Fill the memory with the pattern `agent read --verify` checks.
    #[arg(long)]
    fill: bool,
    /// Write the agent's metadata here (JSON), for peers that connect by metadata.
    #[arg(long, value_name = "FILE")]
    metadata_out: Option<PathBuf>,
    /// Print each notification a peer sends.
    #[arg(long)]
    quiet: bool,
}

fn parse_mem(spec: &str) -> Result<(String, u64)> {
    let Some((name, size)) = spec.split_once('=') else {
        bail!("--mem {spec:?}: expected NAME=SIZE, e.g. pool=64m");
    };
    if name.is_empty() {
        bail!("--mem {spec:?}: the name is empty");
    }
    let len = parse_size(size).map_err(|e| anyhow::anyhow!("--mem {spec:?}: {e}"))?;
    if len == 0 {
        bail!("--mem {spec:?}: a size of 0 registers nothing");
    }
    Ok((name.to_string(), len))
}

pub fn run(a: &ServeArgs, json: bool) -> Result<()> {
    let stop = Interrupt::install()?;
    let mut mems: Vec<(String, u64)> =
        a.mems.iter().map(|m| parse_mem(m)).collect::<Result<_>>()?;
    if mems.is_empty() && a.files.is_empty() {
        mems.push(("pool".into(), 64 << 20));
    }
    let mut b = a
        .opts
        .builder(&a.name)?
        .listen(&a.listen)
        .insecure(a.insecure);
    if let Some(adv) = &a.advertise {
        b = b.advertise(adv);
    }
    let agent = b.build().context("starting the agent")?;
    let mut held: Vec<(Memory, Region)> = Vec::new();
    for (name, len) in &mems {
        let m = agent
            .alloc_host(name, *len)
            .with_context(|| format!("--mem {name}"))?;
        if a.fill {
            let mut buf = vec![0u8; (*len).min(64 << 20) as usize];
            let mut at = 0;
            while at < *len {
                let n = (*len - at).min(buf.len() as u64) as usize;
                pattern::fill(&mut buf[..n], 0, at);
                m.write(at, &buf[..n])?;
                at += n as u64;
            }
        }
        let r = agent
            .register(&m)
            .with_context(|| format!("registering {name}"))?;
        held.push((m, r));
    }
    let mut files = Vec::new();
    for f in &a.files {
        let fr = agent
            .register_file(&FileSpec::new(f).buffered_fallback())
            .with_context(|| format!("--file {}", f.display()))?;
        let r = agent
            .publish_file(&fr)
            .with_context(|| format!("publishing {}", f.display()))?;
        files.push((fr, r));
    }
    let md = agent.metadata();
    if let Some(path) = &a.metadata_out {
        std::fs::write(path, serde_json::to_vec_pretty(&md)?)
            .with_context(|| format!("--metadata-out {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "LISTEN {}", agent.listen_addr())?;
    if json {
        writeln!(out, "{}", serde_json::to_string(&md)?)?;
    } else {
        writeln!(
            out,
            "agent {} on {} NICs ({}), handshake at {}",
            md.agent,
            a.opts.backend.name(),
            md.nics
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            md.handshake
        )?;
        for r in &md.regions {
            writeln!(
                out,
                "  region {:>3}  {:<16} {:>10}  {}",
                r.id,
                r.name,
                bytes(r.len),
                r.file.as_deref().unwrap_or("host memory")
            )?;
        }
        writeln!(
            out,
            "connect with: dmaplane agent write --connect {} --region {}{}",
            agent.listen_addr(),
            md.regions.first().map_or("NAME", |r| r.name.as_str()),
            if a.opts.secret_file.is_some() {
                " --secret-file FILE"
            } else {
                ""
            }
        )?;
        writeln!(out, "Ctrl-C deregisters everything and leaves")?;
    }
    out.flush()?;
    drop(out);
    while !stop.raised() {
        if let Some(n) = agent.next_notification(Duration::from_millis(200))
            && !a.quiet
        {
            println!(
                "notification from {} (tag {:?}, transfer {}): {}",
                n.from,
                n.tag,
                n.transfer.map_or_else(|| "none".into(), |t| t.to_string()),
                String::from_utf8_lossy(&n.bytes)
            );
        }
    }
    eprintln!(
        "dmaplane: leaving: deregistering {} region(s)",
        held.len() + files.len()
    );
    let mut failed = 0;
    for (_, r) in &held {
        if let Err(e) = agent.deregister(r, LEAVE) {
            eprintln!("dmaplane: region {}: {e}", r.id());
            failed += 1;
        }
    }
    for (fr, r) in &files {
        if let Err(e) = agent.deregister(r, LEAVE) {
            eprintln!("dmaplane: region {}: {e}", r.id());
            failed += 1;
        }
        agent.deregister_file(fr);
    }
    let s = agent.stats();
    eprintln!(
        "dmaplane: served {} transfer(s) of peers' requests; {} refusal(s); bye",
        s.transfers_done + s.transfers_failed,
        s.refused.total()
    );
    if failed > 0 {
        bail!("{failed} region(s) could not be deregistered cleanly");
    }
    Ok(())
}
