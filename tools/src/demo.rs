//! `dmaplane demo`: two simulated hosts on the built-in topology move a buffer with RDMA WRITE,
//! the receiver's exporter moves its memory in the middle (a revoke under traffic), the sender
//! resumes on the new lease, and the result is read back with RDMA READ — every byte checked.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use dmaplane_bench::world::World;
use dmaplane_core::ImporterKind;
use dmaplane_core::fabric::HostMemory;
use dmaplane_rdma::{
    Completion, ImportOptions, MrAccess, Qp, QpCaps, QpState, QuiescePolicy, RemoteMr, SendWr,
    WcStatus,
};
use serde::Serialize;

use crate::bench::bytes;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Bytes to move (a multiple of --chunk).
    #[arg(long, default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(4096..=(4 << 30)))]
    size: u64,
    /// Bytes per work request.
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(64..=(1 << 30)))]
    chunk: u64,
    /// Revoke after this many WRITEs have completed (default: a quarter of them).
    #[arg(long)]
    revoke_after: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub size: u64,
    pub chunk: u64,
    pub sender: String,
    pub receiver: String,
    /// How the receiver's NIC registered the memory (the negotiated address space).
    pub negotiation: String,
    pub write: WritePhase,
    pub revoke: RevokePhase,
    pub read: ReadPhase,
    pub seconds: f64,
    pub verified: bool,
}

#[derive(Debug, Serialize)]
pub struct WritePhase {
    pub posted: u64,
    pub completed_before_revoke: u64,
    pub flushed_by_revoke: u64,
    pub resent_after_revoke: u64,
    pub bytes_verified: u64,
}

#[derive(Debug, Serialize)]
pub struct RevokePhase {
    pub epoch_revoked: u64,
    pub epoch_now: u64,
    pub latency_us: u64,
    pub importers_signalled: usize,
    pub lease_acks: u64,
    /// What a post to the old rkey got after the revoke.
    pub post_after_revoke: String,
    pub qp_state_after: String,
    pub rkey_before: u32,
    pub rkey_after: u32,
}

#[derive(Debug, Serialize)]
pub struct ReadPhase {
    pub reads: u64,
    pub bytes_verified: u64,
}

pub fn run(a: &DemoArgs, json: bool) -> Result<()> {
    if !a.size.is_multiple_of(a.chunk) {
        bail!(
            "--size {} is not a multiple of --chunk {}: every request moves one whole chunk",
            a.size,
            a.chunk
        );
    }
    let chunks = a.size / a.chunk;
    let revoke_after = a.revoke_after.unwrap_or(chunks / 4);
    if revoke_after >= chunks {
        bail!(
            "--revoke-after {revoke_after}: must be less than the {chunks} requests of the transfer"
        );
    }
    let r = demo(a.size, a.chunk, revoke_after)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_summary(&r);
    }
    if !r.verified {
        bail!("verification failed: the bytes read back differ from the bytes sent");
    }
    Ok(())
}

/// The pattern byte at `off` (a position-dependent value, so a misplaced chunk shows).
fn pattern(off: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = off + i as u64;
        *b = (x ^ (x >> 8) ^ (x >> 16) ^ 0x5a) as u8;
    }
}

fn fill(mem: &HostMemory, size: u64) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        pattern(off, &mut buf[..n]);
        if !mem.write(off, &buf[..n]) {
            bail!("could not write the source pattern at {off:#x}");
        }
        off += n as u64;
    }
    Ok(())
}

/// Bytes of `mem` equal to the pattern, from the start (stops at the first difference).
fn verify(mem: &HostMemory, size: u64) -> u64 {
    let mut got = vec![0u8; 1 << 20];
    let mut want = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(got.len() as u64) as usize;
        pattern(off, &mut want[..n]);
        if !mem.read(off, &mut got[..n]) || got[..n] != want[..n] {
            return off;
        }
        off += n as u64;
    }
    size
}

/// Reap A's completions into `out` until it holds at least `n` (bounded: a demo must not hang).
fn reap(w: &World, n: u64, out: &mut Vec<Completion>) -> Result<()> {
    let due = Instant::now() + Duration::from_secs(30);
    while (out.len() as u64) < n {
        if w.a.cq.poll(out, 256)? == 0 {
            if Instant::now() > due {
                bail!("only {} of {n} completions arrived within 30 s", out.len());
            }
            w.a.cq.wait(Duration::from_millis(10))?;
        }
    }
    Ok(())
}

fn demo(size: u64, chunk: u64, revoke_after: u64) -> Result<DemoReport> {
    let start = Instant::now();
    let chunks = size / chunk;
    let chunk32 = u32::try_from(chunk).context("--chunk must be below 4 GiB")?;
    let depth = u32::try_from(chunks.max(1)).unwrap_or(u32::MAX).min(4096);
    let w = World::new(depth * 2 + 64, None)?;
    let caps = QpCaps {
        max_send_wr: depth,
        max_recv_wr: 1,
        ..QpCaps::default()
    };
    let (qp, _peer) = w
        .connect(1, caps)?
        .pop()
        .context("no queue pair was created")?;

    // Host A: the source and a buffer for the read-back. Host B: the receiving buffer, imported
    // by its NIC as a dynamic importer (it follows the exporter when the memory moves).
    let src_mem = w.a.memory(&w.fabric, "demo-source", size)?;
    let back_mem = w.a.memory(&w.fabric, "demo-readback", size)?;
    let dst_mem = w.b.memory(&w.fabric, "demo-receive", size)?;
    fill(&src_mem, size)?;
    let local = ImportOptions {
        access: MrAccess::LOCAL_WRITE,
        ..ImportOptions::default()
    };
    let src = w.a.import(&src_mem, "source", local)?;
    let back = w.a.import(&back_mem, "readback", local)?;
    let dst = w.b.import(
        &dst_mem,
        "receive",
        ImportOptions {
            access: MrAccess::ALL,
            kind: ImporterKind::Dynamic,
            policy: QuiescePolicy::Flush,
            recover: true,
        },
    )?;
    let negotiation = dst.negotiation().unwrap_or_default();
    let lease = w.b.dev.lease(&dst, &w.a.dev);
    let rkey_before = lease.rkey();

    // Phase 1: every chunk as one WRITE; after `revoke_after` complete, B's memory moves.
    let write = |qp: &Qp, lease: &RemoteMr, i: u64| {
        let off = i * chunk;
        qp.post_send(&[SendWr::write(i, src.sge(off, chunk32), lease.at(off))])
    };
    for i in 0..chunks {
        write(&qp, &lease, i)?;
    }
    let mut wcs = Vec::new();
    reap(&w, revoke_after, &mut wcs)?;
    let epoch_revoked = dst_mem.epoch();
    let report = dst_mem
        .relocate(Duration::from_secs(1))
        .context("moving the receiver's memory")?;
    if !report.is_clean() {
        bail!("the revoke did not complete cleanly: {report}");
    }
    // What a sender that has not noticed gets: a precise error, not a silent write.
    let post_after_revoke = match write(&qp, &lease, 0) {
        Err(e) => e.to_string(),
        Ok(()) => bail!("a WRITE to the revoked rkey was accepted"),
    };
    reap(&w, chunks, &mut wcs)?;
    let mut flushed = Vec::new();
    let mut ok = 0u64;
    for wc in &wcs {
        match wc.status {
            WcStatus::Success => ok += 1,
            WcStatus::WrFlushErr => flushed.push(wc.wr_id),
            other => bail!("WRITE {} completed with {other}", wc.wr_id),
        }
    }
    // The QP comes back to RTS on its own once its flushed requests are reaped.
    let due = Instant::now() + Duration::from_secs(5);
    while qp.state() != QpState::Rts {
        if Instant::now() > due {
            bail!("the queue pair stayed in {} after the revoke", qp.state());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let qp_state_after = qp.state().to_string();

    // The receiver re-registers the moved memory and hands out a new lease; A resends.
    let epoch_now = dst.refresh(&w.b.pd)?;
    let lease2 = w.b.dev.lease(&dst, &w.a.dev);
    for &i in &flushed {
        write(&qp, &lease2, i)?;
    }
    wcs.clear();
    reap(&w, flushed.len() as u64, &mut wcs)?;
    if let Some(bad) = wcs.iter().find(|c| c.status != WcStatus::Success) {
        bail!("resent WRITE {} completed with {}", bad.wr_id, bad.status);
    }
    let written = verify(&dst_mem, size);

    // Phase 2: read it all back into A with RDMA READ.
    for i in 0..chunks {
        let off = i * chunk;
        qp.post_send(&[SendWr::read(i, back.sge(off, chunk32), lease2.at(off))])?;
    }
    wcs.clear();
    reap(&w, chunks, &mut wcs)?;
    if let Some(bad) = wcs.iter().find(|c| c.status != WcStatus::Success) {
        bail!("READ {} completed with {}", bad.wr_id, bad.status);
    }
    let read_back = verify(&back_mem, size);
    let stats = w.a.dev.stats();

    Ok(DemoReport {
        size,
        chunk,
        sender: "host A (mem0, nic0)".into(),
        receiver: "host B (mem1, nic1)".into(),
        negotiation,
        write: WritePhase {
            posted: chunks,
            completed_before_revoke: ok,
            flushed_by_revoke: flushed.len() as u64,
            resent_after_revoke: flushed.len() as u64,
            bytes_verified: written,
        },
        revoke: RevokePhase {
            epoch_revoked,
            epoch_now,
            latency_us: report.elapsed_us,
            importers_signalled: report.importers.len(),
            lease_acks: w.b.dev.stats().lease_acks,
            post_after_revoke,
            qp_state_after,
            rkey_before,
            rkey_after: lease2.rkey(),
        },
        read: ReadPhase {
            reads: chunks,
            bytes_verified: read_back,
        },
        seconds: start.elapsed().as_secs_f64(),
        verified: written == size && read_back == size && stats.holders_cut_off == 0,
    })
}

fn print_summary(r: &DemoReport) {
    let w = &r.write;
    let v = &r.revoke;
    println!(
        "dmaplane demo: {} from {} to {} over simulated RC queue pairs, {} per request",
        bytes(r.size),
        r.sender,
        r.receiver,
        bytes(r.chunk)
    );
    println!("  receiver's registration  {}", r.negotiation);
    println!(
        "  RDMA WRITE               {} requests posted; {} completed before the revoke",
        w.posted, w.completed_before_revoke
    );
    println!(
        "  revoke (memory moved)    epoch {} -> {} in {} us: {} importer(s) quiesced, {} lease ack(s); \
         {} requests flushed, none lost; QP back to {}",
        v.epoch_revoked,
        v.epoch_now,
        v.latency_us,
        v.importers_signalled,
        v.lease_acks,
        w.flushed_by_revoke,
        v.qp_state_after
    );
    println!(
        "  a post to the old rkey   {}",
        v.post_after_revoke.lines().next().unwrap_or_default()
    );
    println!(
        "  resumed                  new rkey {:#x} (was {:#x}); {} requests resent; {} verified at the receiver",
        v.rkey_after,
        v.rkey_before,
        w.resent_after_revoke,
        bytes(w.bytes_verified)
    );
    println!(
        "  RDMA READ                {} requests; {} read back and verified",
        r.read.reads,
        bytes(r.read.bytes_verified)
    );
    println!(
        "  {} in {:.2} s",
        if r.verified {
            "every byte verified"
        } else {
            "VERIFICATION FAILED"
        },
        r.seconds
    );
}
