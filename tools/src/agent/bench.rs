//! `dmaplane agent bench`: WRITEs and READs between two agents in two processes, against a plain
//! TCP stream of the same bytes over as many connections, measured in the same run.
//!
//! Unless `--connect` names a served agent, it starts one (`agent serve`, this program again)
//! and the plain peer (`agent sink`) itself, both on loopback. Then, rounds of each:
//! - `--size` in `--block` requests, WRITE and READ: median and best throughput;
//! - batches of `--batch` × `--small` WRITEs: the rate, and the p50 and p99 of a batch's
//!   completion time;
//!
//! and the same bytes over `--qps` plain TCP connections (each connection's share sent, then
//! one byte back once it is all in). Ratios are dmaplane's over the plain stream's.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde::Serialize;

use super::client::{ClientArgs, connect};
use super::sink::{OP_READ, OP_WRITE};
use super::{AgentOpts, Interrupt};
use crate::units::{bytes, ns, parse_size};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    opts: AgentOpts,
    /// A served agent to measure against (default: start one on loopback).
    #[arg(long)]
    connect: Option<String>,
    /// The plain TCP peer (`agent sink`) to measure the reference against (default: start one;
    /// with --connect to another host, run `dmaplane agent sink --listen 0.0.0.0:7475` there).
    #[arg(long)]
    sink: Option<String>,
    /// Bytes per large transfer.
    #[arg(long, default_value = "64m", value_parser = parse_size)]
    size: u64,
    /// Bytes per request of a large transfer.
    #[arg(long, default_value = "4m", value_parser = parse_size)]
    block: u64,
    /// Bytes per request of a small batch.
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    small: u64,
    /// Requests per small batch.
    #[arg(long, default_value_t = 64)]
    batch: u64,
    /// Rounds of each large transfer.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Seconds of small batches, a side.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Large {
    median_gbps: f64,
    best_gbps: f64,
}

impl Large {
    fn of(mut gbps: Vec<f64>) -> Large {
        gbps.sort_by(f64::total_cmp);
        Large {
            median_gbps: gbps.get(gbps.len() / 2).copied().unwrap_or(0.0),
            best_gbps: gbps.last().copied().unwrap_or(0.0),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Small {
    /// Requests per second.
    rate: f64,
    gbps: f64,
    p50_us: f64,
    p99_us: f64,
    batches: usize,
}

impl Small {
    fn of(mut times: Vec<Duration>, per_batch: u64, bytes_per: u64) -> Small {
        let total: f64 = times.iter().map(Duration::as_secs_f64).sum();
        times.sort();
        let q = |p: f64| {
            times
                .get(((times.len() as f64 * p) as usize).min(times.len().saturating_sub(1)))
                .map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        let n = times.len() as f64 * per_batch as f64;
        Small {
            rate: n / total,
            gbps: n * bytes_per as f64 / total / 1e9,
            p50_us: q(0.50),
            p99_us: q(0.99),
            batches: times.len(),
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    backend: &'static str,
    connections: usize,
    size: u64,
    block: u64,
    small: u64,
    batch: u64,
    rounds: usize,
    write: Large,
    read: Large,
    small_write: Small,
    plain_write: Large,
    plain_read: Large,
    plain_small_write: Small,
    /// The same with the client's TCP NICs using the shared-memory path, when they did (the
    /// rows above are the socket path, `--no-shm`).
    shm: Option<Run>,
    /// Whether the shared-memory path was measured, and how much went through it.
    shm_note: String,
    /// What became of NIXL: measured, not installed, or failed (and why).
    nixl: String,
    /// NIXL's Python agent with UCX over TCP only (`UCX_TLS=tcp`), and with UCX's default
    /// transports (shared memory on one host), when it is installed.
    nixl_tcp: Option<Nixl>,
    nixl_default: Option<Nixl>,
}

/// What the NIXL script measured (`nixl_bench.py`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Nixl {
    write: LargeIn,
    read: LargeIn,
    small_write: SmallIn,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct LargeIn {
    median_gbps: f64,
    best_gbps: f64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct SmallIn {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
}

/// A child process of this program, stopped (Ctrl-C, then killed) when dropped.
struct Helper(Child);

impl Helper {
    fn start(args: &[String]) -> Result<(Helper, String)> {
        let exe = std::env::current_exe().context("this program's path")?;
        let mut child = Command::new(exe)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting `dmaplane {}`", args.join(" ")))?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut out = BufReader::new(out);
        let mut line = String::new();
        out.read_line(&mut line)?;
        // Keep reading what it prints after (a closed pipe would end it on its next line).
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let addr = line
            .trim()
            .strip_prefix("LISTEN ")
            .ok_or_else(|| anyhow!("`dmaplane {}` said {line:?}, not LISTEN", args.join(" ")))?
            .to_string();
        Ok((Helper(child), addr))
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        let due = Instant::now() + Duration::from_secs(15);
        while Instant::now() < due {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(a: &BenchArgs, json: bool) -> Result<()> {
    if a.block == 0 || a.small == 0 || a.batch == 0 || a.rounds == 0 {
        bail!("--block, --small, --batch and --rounds must be positive");
    }
    if a.size < a.block || a.small * a.batch > a.size {
        bail!(
            "--size {} must hold a --block ({}) and a batch ({} × {})",
            a.size,
            a.block,
            a.batch,
            a.small
        );
    }
    let stop = Interrupt::install()?;
    let mut opts = a.opts.clone();
    opts.chunk = a.block;
    let mut helpers = Vec::new();
    let addr = match &a.connect {
        Some(c) => c.clone(),
        None => {
            let mut args: Vec<String> = [
                "agent",
                "serve",
                "--quiet",
                "--name",
                "bench-serve",
                "--listen",
                "127.0.0.1:0",
                "--backend",
                a.opts.backend.name(),
                "--qps",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.push(a.opts.qps.to_string());
            args.push("--mem".into());
            args.push(format!("bench={}", a.size));
            if let Some(f) = &a.opts.secret_file {
                args.push("--secret-file".into());
                args.push(f.display().to_string());
            }
            if let Some(d) = &a.opts.device {
                args.push("--device".into());
                args.push(d.clone());
            }
            let (h, addr) = Helper::start(&args)?;
            helpers.push(h);
            addr
        }
    };
    let sink = match &a.sink {
        Some(s) => s.clone(),
        None => {
            let args = ["agent", "sink", "--size", &a.size.to_string()].map(String::from);
            let (h, addr) = Helper::start(&args)?;
            helpers.push(h);
            addr
        }
    };
    let client = |no_shm: bool| {
        let mut opts = opts.clone();
        opts.no_shm = no_shm;
        ClientArgs {
            opts,
            connect: addr.clone(),
            region: None,
            size: Some(a.size),
            offset: 0,
            notify: None,
            no_verify: true,
            verify: false,
            out: None,
            name: "bench-client".into(),
        }
    };
    // The socket path, against the plain stream in the same rounds; then, on TCP, the same
    // against the same server through shared memory (one copy between the processes).
    let sock = measure(a, &client(true), &stop, Some(&sink))?;
    let plain = sock
        .plain
        .clone()
        .context("the plain stream was measured")?;
    let (shm, shm_note) = if a.opts.backend != super::Backend::Tcp {
        (None, "not a TCP run".to_string())
    } else if a.opts.no_shm {
        (None, "off (--no-shm)".to_string())
    } else {
        let m = measure(a, &client(false), &stop, None)?;
        if m.shm_messages == 0 {
            (
                None,
                "not used: the server is not on this host (or refused the lane)".to_string(),
            )
        } else {
            let note = format!(
                "{} of the client's requests through views ({})",
                m.shm_messages,
                bytes(m.shm_bytes)
            );
            (Some(m.run), note)
        }
    };
    let report = Report {
        backend: a.opts.backend.name(),
        connections: sock.conns,
        size: a.size,
        block: a.block,
        small: a.small,
        batch: a.batch,
        rounds: a.rounds,
        write: sock.run.write,
        read: sock.run.read,
        small_write: sock.run.small_write,
        plain_write: plain.write,
        plain_read: plain.read,
        plain_small_write: plain.small_write,
        shm,
        shm_note,
        nixl: String::new(),
        nixl_tcp: None,
        nixl_default: None,
    };
    let mut report = report;
    nixl(a, &mut report);
    drop(helpers);
    print(&report, &addr, json)
}

/// One path's numbers: large WRITEs and READs, and small batches.
#[derive(Debug, Clone, Serialize)]
struct Run {
    write: Large,
    read: Large,
    small_write: Small,
}

/// What [`measure`] got: dmaplane's run, the plain stream's (when asked), the connections, and
/// what the client's NICs counted through views.
struct Measured {
    run: Run,
    plain: Option<Run>,
    conns: usize,
    shm_messages: u64,
    shm_bytes: u64,
}

/// Measure dmaplane with a client agent of `client` (and the plain stream to `sink` in the same
/// rounds, when given).
fn measure(
    a: &BenchArgs,
    client: &ClientArgs,
    stop: &Interrupt,
    sink: Option<&str>,
) -> Result<Measured> {
    let c = connect(client, "bench-client")?;
    let mem = c.agent.alloc_host("bench-src", a.size)?;
    let local = c.agent.register(&mem)?;
    let remote = c.peer.desc(c.region, 0, a.size)?;
    let conns = usize::from(a.opts.qps) * c.peer.paths().max(1);
    let timed = |write: bool| -> Result<f64> {
        let t0 = Instant::now();
        let t = if write {
            c.agent
                .write(&c.peer, &[local.all()], std::slice::from_ref(&remote), None)?
        } else {
            c.agent
                .read(&c.peer, &[local.all()], std::slice::from_ref(&remote), None)?
        };
        t.wait(Duration::from_secs(120))?;
        Ok(a.size as f64 / t0.elapsed().as_secs_f64() / 1e9)
    };
    let plain = sink.map(|s| Plain::connect(s, conns)).transpose()?;
    let (mut w, mut r, mut pw, mut pr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Warm both paths up (connections dialled, views mapped, pages touched) before the first
    // round counts.
    timed(true)?;
    if let Some(p) = &plain {
        p.large(OP_WRITE, a.size)?;
    }
    for _ in 0..a.rounds {
        if stop.raised() {
            bail!("interrupted");
        }
        // Interleaved with the plain stream, so both see the same moments of the machine.
        w.push(timed(true)?);
        if let Some(p) = &plain {
            pw.push(p.large(OP_WRITE, a.size)?);
        }
        r.push(timed(false)?);
        if let Some(p) = &plain {
            pr.push(p.large(OP_READ, a.size)?);
        }
    }
    // Small batches: `batch` requests of `small` bytes, one transfer each batch.
    let locals: Vec<_> = (0..a.batch)
        .map(|i| local.desc(i * a.small, a.small))
        .collect::<dmaplane::Result<_>>()?;
    let remotes: Vec<_> = (0..a.batch)
        .map(|i| c.peer.desc(c.region, i * a.small, a.small))
        .collect::<dmaplane::Result<_>>()?;
    let span = Duration::from_secs_f64(a.seconds.max(0.01));
    let mut st = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < span || st.len() < 100 {
        let b0 = Instant::now();
        c.agent
            .write(&c.peer, &locals, &remotes, None)?
            .wait(Duration::from_secs(30))?;
        st.push(b0.elapsed());
    }
    let plain = match &plain {
        Some(p) => {
            let mut pst = Vec::new();
            let t0 = Instant::now();
            while t0.elapsed() < span || pst.len() < 100 {
                pst.push(p.batch(a.small * a.batch, a.small)?);
            }
            Some(Run {
                write: Large::of(pw),
                read: Large::of(pr),
                small_write: Small::of(pst, a.batch, a.small),
            })
        }
        None => None,
    };
    let stats = c.agent.tcp_stats();
    Ok(Measured {
        run: Run {
            write: Large::of(w),
            read: Large::of(r),
            small_write: Small::of(st, a.batch, a.small),
        },
        plain,
        conns,
        shm_messages: stats.iter().map(|(_, s)| s.shm_messages).sum(),
        shm_bytes: stats.iter().map(|(_, s)| s.shm_bytes).sum(),
    })
}

/// The plain TCP reference: `n` connections to the sink.
struct Plain {
    conns: Vec<TcpStream>,
    buf: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl Plain {
    fn connect(addr: &str, n: usize) -> Result<Plain> {
        let conns = (0..n)
            .map(|_| {
                let s = TcpStream::connect(addr).with_context(|| format!("the sink at {addr}"))?;
                s.set_nodelay(true)?;
                Ok(s)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Plain {
            conns,
            buf: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Move `total` bytes split over the connections, each connection's share in pieces of
    /// `each` bytes (0: one piece), each written and read on its own; returns the seconds it
    /// took.
    fn run(&self, op: u8, total: u64, each: u64) -> Result<f64> {
        let n = self.conns.len() as u64;
        let share = total.div_ceil(n);
        let mut bufs = std::mem::take(&mut *self.buf.lock().map_err(|_| anyhow!("poisoned"))?);
        bufs.resize_with(self.conns.len(), Vec::new);
        for b in &mut bufs {
            b.resize(share as usize, 0x5a);
        }
        let t0 = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let hs: Vec<_> = self
                .conns
                .iter()
                .zip(bufs.iter_mut())
                .map(|(c, b)| {
                    s.spawn(move || -> Result<()> {
                        let mut c = c;
                        let mut req = [0u8; 17];
                        req[0] = op;
                        req[1..9].copy_from_slice(&(b.len() as u64).to_le_bytes());
                        req[9..].copy_from_slice(&each.to_le_bytes());
                        c.write_all(&req)?;
                        if op == OP_WRITE {
                            let piece = if each == 0 { b.len() } else { each as usize };
                            for p in b.chunks(piece.max(1)) {
                                c.write_all(p)?;
                            }
                            let mut ack = [0u8; 1];
                            c.read_exact(&mut ack)?;
                        } else {
                            c.read_exact(b)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in hs {
                h.join()
                    .map_err(|_| anyhow!("a connection's thread panicked"))??;
            }
            Ok(())
        })?;
        let secs = t0.elapsed().as_secs_f64();
        *self.buf.lock().map_err(|_| anyhow!("poisoned"))? = bufs;
        Ok(secs)
    }

    fn large(&self, op: u8, total: u64) -> Result<f64> {
        Ok(total as f64 / self.run(op, total, 0)? / 1e9)
    }

    /// A batch: `total` bytes in messages of `each`, one write and one read per message.
    fn batch(&self, total: u64, each: u64) -> Result<Duration> {
        Ok(Duration::from_secs_f64(self.run(OP_WRITE, total, each)?))
    }
}

/// The NIXL driver (run by the Python that `DMAPLANE_PYTHON` names, default `python3`).
const NIXL_SCRIPT: &str = include_str!("nixl_bench.py");

/// Measure NIXL's Python agent in the same run, when it is installed: once with UCX over TCP
/// only, once with UCX's default transports.
fn nixl(a: &BenchArgs, r: &mut Report) {
    let python = std::env::var("DMAPLANE_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = "import importlib.util as u, sys; \
                 sys.exit(not (u.find_spec('nixl_cu12') or u.find_spec('nixl')))";
    let found = Command::new(&python)
        .args(["-c", probe])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        r.nixl = format!(
            "not installed for {python} (pip install --no-deps nixl-cu12==1.5.1 numpy; \
             DMAPLANE_PYTHON names another interpreter)"
        );
        return;
    }
    let script = std::env::temp_dir().join(format!("dmaplane-nixl-{}.py", std::process::id()));
    if let Err(e) = std::fs::write(&script, NIXL_SCRIPT) {
        r.nixl = format!("could not write its driver to {}: {e}", script.display());
        return;
    }
    let run = |tls: Option<&str>| -> Result<Nixl> {
        let mut c = Command::new(&python);
        c.arg(&script).args([
            a.size.to_string(),
            a.block.to_string(),
            a.small.to_string(),
            a.batch.to_string(),
            a.rounds.to_string(),
            a.seconds.to_string(),
        ]);
        if let Some(t) = tls {
            c.env("UCX_TLS", t);
        }
        let out = c.stderr(Stdio::piped()).output()?;
        if !out.status.success() {
            bail!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or_default()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or_default();
        serde_json::from_str(line).with_context(|| format!("its output {line:?}"))
    };
    let tcp = run(Some("tcp"));
    let default = run(None);
    let _ = std::fs::remove_file(&script);
    r.nixl = match (&tcp, &default) {
        (Ok(_), Ok(_)) => format!("nixl 1.5 ({python}), two processes, host memory"),
        (Err(e), _) | (_, Err(e)) => format!("failed: {e}"),
    };
    r.nixl_tcp = tcp.ok();
    r.nixl_default = default.ok();
}

fn print(r: &Report, addr: &str, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let pct = |a: f64, b: f64| if b > 0.0 { a / b * 100.0 } else { 0.0 };
    let large = |what: &str| format!("{} {what}, {} requests", bytes(r.size), bytes(r.block));
    println!(
        "agent bench ({}): agent at {addr}, {} connection(s); {} rounds; plain TCP over as many \
         connections in the same run",
        r.backend, r.connections, r.rounds
    );
    println!(
        "  {:<28} {:>22} {:>22} {:>8}",
        "", "dmaplane", "plain TCP", "ratio"
    );
    for (name, d, p) in [
        (large("WRITE"), &r.write, &r.plain_write),
        (large("READ"), &r.read, &r.plain_read),
    ] {
        println!(
            "  {:<28} {:>9.2} ({:>5.2}) GB/s {:>9.2} ({:>5.2}) GB/s {:>7.0}%",
            name,
            d.median_gbps,
            d.best_gbps,
            p.median_gbps,
            p.best_gbps,
            pct(d.median_gbps, p.median_gbps)
        );
    }
    let (s, p) = (&r.small_write, &r.plain_small_write);
    println!(
        "  {:<28} {:>13.0} req/s {:>15.0} req/s {:>7.0}%",
        format!("{} × {} WRITE batches", bytes(r.small), r.batch),
        s.rate,
        p.rate,
        pct(s.rate, p.rate)
    );
    println!(
        "  {:<28} {:>22} {:>22}",
        "  batch completion p50 / p99",
        format!(
            "{} / {}",
            ns((s.p50_us * 1e3) as u64),
            ns((s.p99_us * 1e3) as u64)
        ),
        format!(
            "{} / {}",
            ns((p.p50_us * 1e3) as u64),
            ns((p.p99_us * 1e3) as u64)
        )
    );
    println!(
        "  (median (best) of the rounds; the plain stream answers each connection's share with one \
         byte, and sends and receives a batch's messages one by one)"
    );
    match &r.shm {
        Some(m) => {
            println!("  shared memory, both agents on this host: {}", r.shm_note);
            for (name, d, sock) in [
                (large("WRITE"), &m.write, &r.write),
                (large("READ"), &m.read, &r.read),
            ] {
                println!(
                    "  {:<28} {:>9.2} ({:>5.2}) GB/s   ({:.1}× the socket path)",
                    name,
                    d.median_gbps,
                    d.best_gbps,
                    d.median_gbps / sock.median_gbps.max(1e-9)
                );
            }
            println!(
                "  {:<28} {:>13.0} req/s   (p50 / p99 {} / {})",
                format!("{} × {} WRITE batches", bytes(r.small), r.batch),
                m.small_write.rate,
                ns((m.small_write.p50_us * 1e3) as u64),
                ns((m.small_write.p99_us * 1e3) as u64),
            );
        }
        None => println!("  shared memory: {}", r.shm_note),
    }
    println!("  NIXL: {}", r.nixl);
    // NIXL over TCP against dmaplane's socket path; NIXL's default transports (shared memory
    // on one host) against dmaplane's shared-memory path where it ran.
    let ours = |shm: bool| match (&r.shm, shm) {
        (Some(m), true) => (m.clone(), "shared-memory"),
        _ => (
            Run {
                write: r.write.clone(),
                read: r.read.clone(),
                small_write: r.small_write.clone(),
            },
            "socket",
        ),
    };
    for (name, n, shm) in [
        ("UCX_TLS=tcp", &r.nixl_tcp, false),
        ("UCX default transports", &r.nixl_default, true),
    ] {
        let Some(n) = n else { continue };
        let (d, path) = ours(shm);
        println!(
            "    {name:<24} WRITE {:.2} ({:.2}) GB/s, READ {:.2} ({:.2}) GB/s, {:.0} req/s in \
             batches (p99 {}): dmaplane's {path} path WRITE {:.0}%, READ {:.0}%, batches \
             {:.0}% of it",
            n.write.median_gbps,
            n.write.best_gbps,
            n.read.median_gbps,
            n.read.best_gbps,
            n.small_write.rate,
            ns((n.small_write.p99_us * 1e3) as u64),
            pct(d.write.median_gbps, n.write.median_gbps),
            pct(d.read.median_gbps, n.read.median_gbps),
            pct(d.small_write.rate, n.small_write.rate),
        );
    }
    Ok(())
}
