//! `dmaplane agent write|read`: connect to a served agent by address, move bytes to or from one
//! of its regions, with a progress bar, and verify them. Ctrl-C deregisters the local memory —
//! the transfer under way ends with a typed error, nothing of it lands after — and leaves.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use dmaplane::{Agent, Peer, Region, Status, Transfer};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::{AgentOpts, Interrupt, pattern};
use crate::units::{bytes, parse_size};

#[derive(Debug, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub(super) opts: AgentOpts,
    /// The served agent's handshake address (host:port), as `agent serve` prints it.
    #[arg(long)]
    pub(super) connect: String,
    /// Its region: a name or an id (default: its first).
    #[arg(long)]
    pub(super) region: Option<String>,
    /// Bytes to move (default: the whole region).
    #[arg(long, value_parser = parse_size)]
    pub(super) size: Option<u64>,
    /// Where in the region to start.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub(super) offset: u64,
    /// Send this notification with the WRITE (the server prints it).
    #[arg(long)]
    pub(super) notify: Option<String>,
    /// write: skip reading the bytes back to compare.
    #[arg(long)]
    pub(super) no_verify: bool,
    /// read: compare with the pattern `agent serve --fill` wrote.
    #[arg(long)]
    pub(super) verify: bool,
    /// read: write the bytes read to this file.
    #[arg(long, value_name = "FILE")]
    pub(super) out: Option<std::path::PathBuf>,
    /// This agent's name.
    #[arg(long, default_value = "client")]
    pub(super) name: String,
}

/// Which way the bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Write,
    Read,
}

#[derive(Debug, Serialize)]
struct Outcome {
    op: &'static str,
    peer: String,
    region: u32,
    bytes: u64,
    seconds: f64,
    gbps: f64,
    /// `None` when not checked.
    verified: Option<bool>,
    /// How the bytes moved, on TCP NICs: `shared-memory` (the peer on this host: every
    /// request through views of its memory), `socket`, or `both`; `None` on other backends.
    path: Option<&'static str>,
}

/// The client's agent, connected to `args.connect`, and the remote range it addresses.
pub(super) struct Connected {
    pub(super) agent: Agent,
    pub(super) peer: Peer,
    pub(super) region: u32,
    pub(super) offset: u64,
    pub(super) len: u64,
}

pub(super) fn connect(args: &ClientArgs, name: &str) -> Result<Connected> {
    let agent = args
        .opts
        .builder(name)?
        .build()
        .context("starting the agent")?;
    let peer = agent
        .connect_to(&args.connect)
        .with_context(|| format!("connecting to {}", args.connect))?;
    let regions = peer.regions();
    let info = match &args.region {
        None => regions.first().cloned(),
        Some(r) => match r.parse::<u32>() {
            Ok(id) => peer.region(id),
            Err(_) => peer.region_named(r),
        },
    }
    .ok_or_else(|| {
        anyhow!(
            "{} has no region {} (it has: {})",
            peer.name(),
            args.region.as_deref().unwrap_or("at all"),
            regions
                .iter()
                .map(|r| format!("{} {} ({})", r.id, r.name, bytes(r.len)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    if args.offset > info.len {
        bail!(
            "--offset {}: past the end of region {} ({})",
            args.offset,
            info.name,
            bytes(info.len)
        );
    }
    let len = args.size.unwrap_or(info.len - args.offset);
    if len == 0 || args.offset + len > info.len {
        bail!(
            "--size {}: region {} has {} from offset {}",
            len,
            info.name,
            bytes(info.len - args.offset),
            args.offset
        );
    }
    Ok(Connected {
        agent,
        peer,
        region: info.id,
        offset: args.offset,
        len,
    })
}

/// Wait for `t`, a progress bar of `len` bytes unless `quiet`; Ctrl-C deregisters `local`
/// (the transfer ends with a typed error) and fails.
pub(super) fn follow(
    c: &Connected,
    t: &Transfer,
    local: &Region,
    stop: &Interrupt,
    what: &str,
    quiet: bool,
) -> Result<()> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(c.len);
        b.set_style(
            ProgressStyle::with_template(&format!(
                "{what} {{bar:40}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} [{{elapsed_precise}}]"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    };
    let per = c.len.div_ceil(t.requests().max(1) as u64);
    loop {
        if stop.raised() {
            bar.abandon();
            c.agent
                .deregister(local, Duration::from_secs(10))
                .context("deregistering on Ctrl-C")?;
            let why = match t.wait(Duration::from_secs(10)) {
                Err(e) => e.to_string(),
                Ok(()) => "it had finished".into(),
            };
            bail!("interrupted: the local memory is deregistered, the transfer ended: {why}");
        }
        match t.status() {
            Status::InProgress { done, .. } => bar.set_position((done * per).min(c.len)),
            Status::Done => break,
            Status::Failed(_) => break,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bar.finish_and_clear();
    t.wait(Duration::from_secs(1))
        .map_err(|e| anyhow!("{what}: {e}"))
}

fn remote(c: &Connected) -> Result<dmaplane::RemoteDesc> {
    Ok(c.peer.desc(c.region, c.offset, c.len)?)
}

pub fn run(a: &ClientArgs, op: Op, json: bool) -> Result<()> {
    let stop = Interrupt::install()?;
    let c = connect(a, &a.name)?;
    let mem = c.agent.alloc_host("client", c.len)?;
    let local = c.agent.register(&mem)?;
    let started = Instant::now();
    let mut verified = None;
    match op {
        Op::Write => {
            let mut buf = vec![0u8; c.len as usize];
            pattern::fill(&mut buf, 1, c.offset);
            mem.write(0, &buf)?;
            let t = c.agent.write(
                &c.peer,
                &[local.all()],
                &[remote(&c)?],
                a.notify
                    .as_deref()
                    .map(|n| dmaplane::Notify::new("cli", n.as_bytes().to_vec())),
            )?;
            follow(&c, &t, &local, &stop, "write", json)?;
        }
        Op::Read => {
            let t = c
                .agent
                .read(&c.peer, &[local.all()], &[remote(&c)?], None)?;
            follow(&c, &t, &local, &stop, "read", json)?;
            if let Some(path) = &a.out {
                let mut buf = vec![0u8; c.len as usize];
                mem.read(0, &mut buf)?;
                std::fs::write(path, &buf).with_context(|| format!("--out {}", path.display()))?;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let check = match op {
        Op::Write if !a.no_verify => {
            let back = c.agent.alloc_host("client-back", c.len)?;
            let rb = c.agent.register(&back)?;
            let t = c.agent.read(&c.peer, &[rb.all()], &[remote(&c)?], None)?;
            follow(&c, &t, &rb, &stop, "read back", json)?;
            Some((back, 1))
        }
        Op::Read if a.verify => Some((mem.clone(), 0)),
        _ => None,
    };
    if let Some((m, seed)) = check {
        let mut buf = vec![0u8; c.len as usize];
        m.read(0, &mut buf)?;
        let bad = pattern::first_difference(&buf, seed, c.offset);
        verified = Some(bad.is_none());
        if let Some(at) = bad {
            bail!(
                "{} bytes differ from what was {} at region offset {at}",
                c.peer.name(),
                if op == Op::Write {
                    "written"
                } else {
                    "filled (agent serve --fill)"
                }
            );
        }
    }
    // The client NICs' own count of requests through views (which path carried the bytes).
    let tcp = c.agent.tcp_stats();
    let path = (!tcp.is_empty()).then(|| {
        let views: u64 = tcp.iter().map(|(_, s)| s.shm_messages).sum();
        let posted = c.agent.stats().requests_posted;
        match views {
            0 => "socket",
            v if v >= posted => "shared-memory",
            _ => "both",
        }
    });
    let o = Outcome {
        op: if op == Op::Write { "write" } else { "read" },
        peer: c.peer.name().to_string(),
        region: c.region,
        bytes: c.len,
        seconds,
        gbps: c.len as f64 / seconds / 1e9,
        verified,
        path,
    };
    if json {
        println!("{}", serde_json::to_string(&o)?);
    } else {
        println!(
            "{} {} {} region {} in {:.3} s: {:.2} GB/s{}{}",
            o.op,
            bytes(o.bytes),
            if op == Op::Write { "to" } else { "from" },
            o.region,
            o.seconds,
            o.gbps,
            match verified {
                Some(true) => ", every byte verified",
                Some(false) => ", bytes differ",
                None => "",
            },
            o.path.map(|p| format!(" ({p})")).unwrap_or_default()
        );
    }
    Ok(())
}
