//! `stress revoke --backend verbs --exporter cuda`: the lab-testbed stress, on the application
//! library. What a user runs on a machine with an RDMA NIC and a GPU.
//!
//! Two processes, each with an [`dmaplane::Agent`] on the RDMA device, meet over the built-in TCP
//! handshake. The *owner* (this process) allocates CUDA device memory, which its NIC registers
//! as a dma-buf (`ibv_reg_dmabuf_mr`) or, where the driver or the NIC refuses that, by device VA
//! through a peer-memory client — the negotiation picks and the run reports which. The
//! *holder* (a second process, this binary again) keeps `--qps` WRITE transfers in flight into
//! it, each a self-describing block (its epoch, slot and sequence number in a header, the body
//! derived from them) with a notification naming it. The owner frees the memory under that
//! traffic with [`dmaplane::Memory::free_quarantined`] — the holder's queue pairs quiesce and its lease
//! acks before the free returns — then allocates and registers new memory, which the holder
//! picks up from the announcement, `--revokes` times.
//!
//! Checks: at each free, every block of the freed memory is whole (a header and a body that
//! match) and at least as new as the last notification for its slot — nothing torn, nothing
//! lost; the freed memory is then poisoned and must still be all poison at the end (any DMA
//! after the ack would have changed it); every holder transfer ends exactly once, done or with
//! the typed remote revoke, never another error or a hang; a request the NIC refused at a
//! zapped region (a remote access error) is an access after the ack — an honest holder never
//! makes one; every free's ack comes within the deadline (no holder cut off).

use clap::Args;

/// The holder, as the owner starts it (hidden from `--help`).
#[derive(Debug, Args)]
pub struct HolderArgs {
    /// The owner's handshake address.
    #[arg(long)]
    connect: String,
    #[arg(long)]
    device: Option<String>,
    /// Transfers in flight.
    #[arg(long)]
    slots: usize,
    /// Bytes per transfer.
    #[arg(long)]
    size: u32,
    #[arg(long, value_parser = clap::value_parser!(dmaplane::stress::Inject))]
    inject: Option<dmaplane::stress::Inject>,
}

/// Without the `verbs` feature: the same one-line refusal as the raw verbs stress.
#[cfg(not(feature = "verbs"))]
pub use crate::verbs_stress::run;

#[cfg(not(feature = "verbs"))]
pub fn holder(_a: &HolderArgs) -> anyhow::Result<()> {
    anyhow::bail!("the stress holder needs the `verbs` feature")
}

#[cfg(feature = "verbs")]
pub use imp::{holder, run};

#[cfg(feature = "verbs")]
mod imp {
    use super::HolderArgs;
    use std::io::Read;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, bail};
    use dmaplane::stress::{Inject, Latency, StressConfig, StressReport};
    use dmaplane::{Agent, Error as AgentError, Memory, Quarantine, Side, Status, Transfer};
    use dmaplane_rdma::Fault;
    use serde::{Deserialize, Serialize};

    /// What every freed block is filled with at the ack.
    const POISON: u8 = 0xee;
    /// A block's header: magic, epoch, slot, sequence number.
    const MAGIC: &[u8; 4] = b"DMPS";
    const HEADER: usize = 4 + 8 + 4 + 8;
    /// How long the owner waits for the holder's traffic into one allocation.
    const EPOCH_WAIT: Duration = Duration::from_secs(15);
    /// How long the holder waits for the owner's next allocation after a revoke.
    const NEXT_WAIT: Duration = Duration::from_secs(60);
    /// How long a holder transfer may see no completion before it ends as stalled (its requests
    /// then count as lost).
    const HOLDER_STALL: Duration = Duration::from_secs(10);
    /// Quarantines kept for the final poison check (older ones are checked and released early).
    const KEEP: usize = 64;

    /// What the holder reports on its stdout when the owner goes away.
    #[derive(Debug, Default, Serialize, Deserialize)]
    struct HolderReport {
        started: u64,
        done: u64,
        /// Ended with the typed remote revoke.
        revoked: u64,
        /// Refused at the start: the region was revoked already.
        refused: u64,
        /// Ended because the owner went away at the end of the run.
        ended_at_exit: u64,
        /// Ended stalled: requests the NIC never completed.
        stalled: u64,
        failed: u64,
        /// Requests the owner's NIC refused at a zapped region.
        remote_access_errors: u64,
        failures: Vec<String>,
        notes: Vec<String>,
    }

    /// A block's bytes: the header, then a body derived from it.
    fn block(epoch: u64, slot: u32, seq: u64, size: usize) -> Vec<u8> {
        let mut b = vec![0u8; size];
        let mut h = Vec::with_capacity(HEADER);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&epoch.to_le_bytes());
        h.extend_from_slice(&slot.to_le_bytes());
        h.extend_from_slice(&seq.to_le_bytes());
        let n = HEADER.min(size);
        b[..n].copy_from_slice(&h[..n]);
        let seed = epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (u64::from(slot) << 32) ^ seq;
        for (i, x) in b.iter_mut().enumerate().skip(n) {
            *x = ((i as u64).wrapping_mul(2654435761) ^ seed).to_le_bytes()[i % 8];
        }
        b
    }

    /// The notification a block's WRITE carries: epoch, slot, sequence number.
    fn note(epoch: u64, slot: u32, seq: u64) -> Vec<u8> {
        let mut n = epoch.to_le_bytes().to_vec();
        n.extend_from_slice(&slot.to_le_bytes());
        n.extend_from_slice(&seq.to_le_bytes());
        n
    }

    fn parse_note(b: &[u8]) -> Option<(u64, u32, u64)> {
        if b.len() != 20 {
            return None;
        }
        Some((
            u64::from_le_bytes(b[0..8].try_into().ok()?),
            u32::from_le_bytes(b[8..12].try_into().ok()?),
            u64::from_le_bytes(b[12..20].try_into().ok()?),
        ))
    }

    fn fault_of(inject: Option<Inject>) -> Result<(Option<Fault>, Option<Fault>)> {
        Ok(match inject {
            None => (None, None),
            Some(Inject::Rdma(f @ Fault::EarlyFence)) => (Some(f), None),
            Some(Inject::Rdma(f @ (Fault::IgnoreLeaseRevoke | Fault::AckThenWrite))) => {
                (None, Some(f))
            }
            Some(i) => bail!(
                "--inject {i} with --exporter cuda: this stress runs early-fence (the owner's NIC), \
                 ignore-lease-revoke and ack-then-write (the holder's); the sim backend runs every \
                 fault"
            ),
        })
    }

    /// The owner's side: the whole run.
    pub fn run(
        cfg: &StressConfig,
        device: Option<&str>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<StressReport> {
        let (owner_fault, _) = fault_of(cfg.inject)?;
        if !matches!(cfg.policy, dmaplane_rdma::QuiescePolicy::Boundary { .. }) {
            bail!(
                "--exporter cuda runs on the application library, which quiesces at a message \
                 boundary: drop --quiesce"
            );
        }
        let start = Instant::now();
        let mut b = Agent::builder("stress-owner")
            .verbs()
            .inject(owner_fault)
            .stall_timeout(Duration::from_secs(60));
        if let Some(d) = device {
            b = b.nics([d]);
        }
        let owner = b.build().context("the owner's agent")?;
        let size = cfg.size as usize;
        let slots = cfg.qps;
        let region = (slots as u64 * u64::from(cfg.size)).next_multiple_of(4096);
        let mut notes = vec![format!(
            "owner {} on {}, holder a second process; {} transfers of {} B in flight",
            owner.name(),
            owner.nics().join(", "),
            slots,
            size
        )];

        // The holder: this binary again, pointed at the owner's handshake listener.
        let mut holder = spawn_holder(cfg, device, &owner.listen_addr().to_string())?;
        let mut failures: Vec<String> = Vec::new();
        let (mut corrupt, mut verified, mut post_ack) = (0u64, 0u64, 0u64);
        let (mut latencies, mut timed_out, mut revokes) = (Vec::new(), 0u64, 0u64);
        let mut kept: Vec<Quarantine> = Vec::new();
        let mut stalled = 0u64;
        let check_poison = |q: &Quarantine, failures: &mut Vec<String>| -> u64 {
            match q.first_change(POISON) {
                Ok(None) => 0,
                Ok(Some(off)) => {
                    failures.push(format!(
                        "{}: byte {off:#x} changed after the ack (poison overwritten)",
                        q.name()
                    ));
                    1
                }
                Err(e) => {
                    failures.push(format!("{}: poison check: {e}", q.name()));
                    1
                }
            }
        };
        for epoch in 0..cfg.revokes {
            let name = format!("stress-dst-{epoch}");
            let mem = owner
                .alloc_cuda(&name, 0, region)
                .with_context(|| format!("CUDA memory for epoch {epoch}"))?;
            zero(&mem)?;
            let r = owner
                .register(&mem)
                .with_context(|| format!("registering {name}"))?;
            if epoch == 0 {
                let paths: Vec<String> = r.paths().iter().map(|p| format!("{p:?}")).collect();
                notes.push(format!("owner registration: {}", paths.join("; ")));
            }
            // The holder's traffic into it: at least two rounds over every slot.
            let mut last = vec![0u64; slots];
            let mut seen = 0usize;
            let due = Instant::now() + EPOCH_WAIT;
            while seen < 2 * slots {
                if holder.try_wait()?.is_some() {
                    bail!(
                        "the holder exited during epoch {epoch}: {}",
                        holder_output(&mut holder)
                    );
                }
                let Some(n) = owner.next_notification(Duration::from_millis(50)) else {
                    if Instant::now() > due {
                        // Reported, and the run ends here: the holder's report says why.
                        failures.push(format!(
                            "epoch {epoch}: the holder completed {seen} WRITEs in {EPOCH_WAIT:?}, \
                             not {}",
                            2 * slots
                        ));
                        stalled += 1;
                        break;
                    }
                    continue;
                };
                match parse_note(&n.bytes) {
                    Some((e, slot, seq)) if e == epoch && (slot as usize) < slots => {
                        let s = &mut last[slot as usize];
                        *s = (*s).max(seq);
                        seen += 1;
                    }
                    Some(_) => {} // an earlier epoch's, late
                    None => {
                        failures.push(format!("a notification that names no block: {:?}", n.bytes))
                    }
                }
            }
            if stalled > 0 {
                break;
            }
            // Free it under the traffic; keep its bytes.
            let t = Instant::now();
            match mem.free_quarantined(cfg.deadline) {
                Ok((report, q)) => {
                    latencies.push(report.elapsed_us as f64);
                    revokes += 1;
                    // Every block whole and at least as new as its last notification.
                    let mut buf = vec![0u8; size];
                    for (slot, &want) in last.iter().enumerate() {
                        q.read((slot * size) as u64, &mut buf)?;
                        match check_block(&buf, epoch, slot as u32, want) {
                            Ok(()) => verified += size as u64,
                            Err(why) => {
                                corrupt += 1;
                                failures.push(format!("epoch {epoch} slot {slot}: {why}"));
                            }
                        }
                    }
                    q.fill(POISON)?;
                    kept.push(q);
                    if kept.len() > KEEP {
                        let old = kept.remove(0);
                        post_ack += check_poison(&old, &mut failures);
                    }
                }
                Err(e) => {
                    timed_out += 1;
                    failures.push(format!(
                        "free of epoch {epoch} after {:?}: {e}",
                        t.elapsed()
                    ));
                }
            }
            progress(epoch + 1);
        }
        let cut_off = owner.stats().holders_cut_off;
        // Stop: the holder sees the owner go and reports.
        drop(owner);
        let h = wait_holder(&mut holder, HOLDER_STALL * 3)?;
        for q in &kept {
            post_ack += check_poison(q, &mut failures);
        }
        drop(kept);
        failures.extend(h.failures.iter().cloned());
        notes.extend(h.notes.iter().cloned());
        let ended = h.done + h.revoked + h.failed + h.ended_at_exit;
        notes.push(format!(
            "holder transfers: {} started, {} done, {} ended by a revoke, {} refused at the start \
             (revoked already), {} ended with the owner at exit, {} stalled (counted lost)",
            h.started, h.done, h.revoked, h.refused, h.ended_at_exit, h.stalled
        ));
        Ok(StressReport {
            backend: "verbs (agent)",
            qps: slots,
            depth: 1,
            size: cfg.size,
            posted: h.started,
            completed_ok: h.done,
            flushed: h.revoked,
            failed: h.failed + stalled,
            lost: h.started.saturating_sub(ended),
            corrupt,
            post_ack_accesses: post_ack + h.remote_access_errors,
            zapped_source_accesses: 0,
            bytes_verified: verified,
            completed_before_ack: 0,
            revokes,
            source_revokes: 0,
            revoke_latency_us: Latency::of(latencies),
            revokes_timed_out: timed_out,
            posts_refused: h.refused,
            revokes_asked: cfg.revokes,
            holders_cut_off: cut_off,
            oracle: None,
            inject: cfg.inject,
            seconds: start.elapsed().as_secs_f64(),
            failures,
            stopped_early: None,
            notes,
        })
    }

    fn zero(mem: &Memory) -> Result<()> {
        let piece = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < mem.len() {
            let n = (mem.len() - off).min(piece.len() as u64) as usize;
            mem.write(off, &piece[..n])?;
            off += n as u64;
        }
        Ok(())
    }

    /// A freed block: never written (zero, when no notification named it), or whole and at least
    /// as new as the newest notification for it.
    fn check_block(
        b: &[u8],
        epoch: u64,
        slot: u32,
        newest: u64,
    ) -> std::result::Result<(), String> {
        if b.iter().all(|&x| x == 0) {
            return if newest == 0 {
                Ok(())
            } else {
                Err(format!("empty, though WRITE {newest} into it was notified"))
            };
        }
        let n = HEADER.min(b.len());
        if b.len() < HEADER || &b[..4] != MAGIC {
            return Err("no block header: a torn or foreign WRITE".into());
        }
        let e = u64::from_le_bytes(b[4..12].try_into().unwrap_or_default());
        let s = u32::from_le_bytes(b[12..16].try_into().unwrap_or_default());
        let q = u64::from_le_bytes(b[16..24].try_into().unwrap_or_default());
        if (e, s) != (epoch, slot) {
            return Err(format!("holds epoch {e} slot {s}'s block"));
        }
        if q < newest {
            return Err(format!("holds WRITE {q}, older than the notified {newest}"));
        }
        if b[n..] != block(e, s, q, b.len())[n..] {
            return Err(format!("WRITE {q}'s body differs from its header: torn"));
        }
        Ok(())
    }

    fn spawn_holder(cfg: &StressConfig, device: Option<&str>, addr: &str) -> Result<Child> {
        let exe = std::env::current_exe().context("this program's path, to start the holder")?;
        let mut c = Command::new(exe);
        c.args(["stress", "revoke-holder", "--connect", addr])
            .args(["--slots", &cfg.qps.to_string()])
            .args(["--size", &cfg.size.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(d) = device {
            c.args(["--device", d]);
        }
        if let Some(i) = cfg.inject {
            c.args(["--inject", &i.to_string()]);
        }
        c.spawn().context("starting the holder process")
    }

    fn holder_output(child: &mut Child) -> String {
        let mut s = String::new();
        if let Some(out) = child.stdout.as_mut() {
            let _ = out.read_to_string(&mut s);
        }
        s
    }

    fn wait_holder(child: &mut Child, limit: Duration) -> Result<HolderReport> {
        let due = Instant::now() + limit;
        loop {
            if let Some(st) = child.try_wait()? {
                let out = holder_output(child);
                let r: HolderReport = serde_json::from_str(out.trim())
                    .with_context(|| format!("the holder ({st}) printed no report: {out:?}"))?;
                return Ok(r);
            }
            if Instant::now() > due {
                // A hang is a result, not a crash of the run: killed, and counted failed.
                let _ = child.kill();
                let _ = child.wait();
                return Ok(HolderReport {
                    failed: 1,
                    failures: vec![format!(
                        "the holder did not end within {limit:?} of the owner's exit: it hung \
                         (killed; its counts are unknown)"
                    )],
                    ..HolderReport::default()
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The holder process: WRITE traffic into the owner's newest allocation until the owner goes.
    pub fn holder(a: &HolderArgs) -> Result<()> {
        let (_, fault) = fault_of(a.inject)?;
        let mut b = Agent::builder("stress-holder")
            .verbs()
            .inject(fault)
            .stall_timeout(HOLDER_STALL);
        if let Some(d) = &a.device {
            b = b.nics([d.as_str()]);
        }
        let agent = b.build().context("the holder's agent")?;
        // (The holder's stall timeout is short: a request the NIC never completes is reported as
        // lost within it, not waited for by the owner.)
        let peer = agent
            .connect_to(&a.connect)
            .context("connecting to the owner")?;
        let size = a.size as usize;
        let src = agent.alloc_host("stress-src", (a.slots * size) as u64)?;
        let rs = agent.register(&src)?;
        let mut r = HolderReport::default();
        r.notes.push(format!(
            "holder source registration: {:?}",
            rs.paths().first()
        ));
        let mut inflight: Vec<Option<Transfer>> = (0..a.slots).map(|_| None).collect();
        let mut seq = 0u64;
        // The owner's allocation in use: (region id, epoch), and the newest epoch known revoked.
        let mut current: Option<(u32, u64)> = None;
        let mut dead: Option<u64> = None;
        let mut waiting_since = Instant::now();
        'run: loop {
            if peer.lost().is_some() {
                break;
            }
            if current.is_none() {
                current = peer
                    .regions()
                    .into_iter()
                    .filter_map(|g| {
                        let e = g.name.strip_prefix("stress-dst-")?.parse::<u64>().ok()?;
                        (dead.is_none_or(|d| e > d)).then_some((g.id, e))
                    })
                    .max_by_key(|x| x.1);
                if current.is_none() {
                    if waiting_since.elapsed() > NEXT_WAIT {
                        r.failed += 1;
                        r.failures
                            .push(format!("no new allocation from the owner in {NEXT_WAIT:?}"));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            for (slot, t) in inflight.iter_mut().enumerate() {
                if let Some(x) = t {
                    match x.status() {
                        Status::InProgress { .. } => continue,
                        Status::Done => r.done += 1,
                        Status::Failed(e) => match classify(&e) {
                            End::Revoked { region, access } => {
                                r.revoked += 1;
                                r.remote_access_errors += u64::from(access);
                                if access {
                                    r.failures.push(format!("slot {slot}: {e}"));
                                }
                                if let Some((id, ep)) = current
                                    && (region == Some(id) || access)
                                {
                                    dead = Some(ep);
                                    current = None;
                                    waiting_since = Instant::now();
                                }
                            }
                            End::Lost => {
                                r.ended_at_exit += 1;
                                *t = None;
                                break 'run;
                            }
                            End::Stalled => {
                                r.stalled += 1;
                                r.failures.push(format!("slot {slot}: {e}"));
                            }
                            End::Other => {
                                r.failed += 1;
                                r.failures.push(format!("slot {slot}: {e}"));
                            }
                        },
                    }
                    *t = None;
                }
                let Some((id, epoch)) = current else { continue };
                // Starting a WRITE can wait for the owner's lease grant: look for the owner's
                // departure before each one, not once a round.
                if peer.lost().is_some() {
                    break 'run;
                }
                seq += 1;
                let off = (slot * size) as u64;
                src.write(off, &block(epoch, slot as u32, seq, size))?;
                let remote = match peer.desc(id, off, size as u64) {
                    Ok(d) => d,
                    Err(e) => bail!("the owner's region {id}: {e}"),
                };
                match agent.write(
                    &peer,
                    &[rs.desc(off, size as u64)?],
                    &[remote],
                    Some(&note(epoch, slot as u32, seq)),
                ) {
                    Ok(x) => {
                        r.started += 1;
                        *t = Some(x);
                    }
                    Err(AgentError::Revoked { .. }) => {
                        r.refused += 1;
                        dead = Some(epoch);
                        current = None;
                        waiting_since = Instant::now();
                    }
                    Err(AgentError::PeerLost { .. }) => break 'run,
                    Err(e) => {
                        r.failed += 1;
                        r.failures
                            .push(format!("slot {slot}: starting a WRITE: {e}"));
                        // Every queue pair broken (a protocol violation was refused): nothing
                        // more can be sent; wait for the owner to end the run.
                        if matches!(&e, AgentError::Invalid(i) if i.why.contains("broken")) {
                            r.notes.push(format!("traffic stopped: {e}"));
                            while peer.lost().is_none() {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            break 'run;
                        }
                    }
                }
            }
            std::thread::yield_now();
        }
        // Whatever is still under way ends now (the owner is gone): each exactly once, all within
        // one deadline (the stall timeout bounds each; they run at once).
        let due = Instant::now() + HOLDER_STALL * 2;
        let mut left: Vec<Transfer> = inflight.into_iter().flatten().collect();
        while !left.is_empty() && Instant::now() < due {
            left.retain(|t| {
                let e = match t.status() {
                    Status::InProgress { .. } => return true,
                    Status::Done => {
                        r.done += 1;
                        return false;
                    }
                    Status::Failed(e) => e,
                };
                match classify(&e) {
                    End::Revoked { access, .. } => {
                        r.revoked += 1;
                        r.remote_access_errors += u64::from(access);
                    }
                    End::Lost => r.ended_at_exit += 1,
                    End::Stalled => {
                        r.stalled += 1;
                        r.failures.push(format!("at exit: {e}"));
                    }
                    End::Other => {
                        r.failed += 1;
                        r.failures.push(format!("at exit: {e}"));
                    }
                }
                false
            });
            std::thread::sleep(Duration::from_millis(10));
        }
        if !left.is_empty() {
            // Never ended, not even stalled: the agent's engine is stuck (seen only with an
            // injected fault). Counted lost, and reported.
            r.failures.push(format!(
                "{} transfer(s) never ended within {:?} of the owner's exit, not even as stalled",
                left.len(),
                HOLDER_STALL * 2
            ));
        }
        r.failures.truncate(20);
        println!("{}", serde_json::to_string(&r)?);
        use std::io::Write;
        std::io::stdout().flush()?;
        if !left.is_empty() {
            // The owner judges the report; a holder whose agent is stuck must still end.
            std::process::exit(0);
        }
        Ok(())
    }

    enum End {
        /// The typed remote revoke; `access` when a request met the zapped region (a remote access
        /// error: an access after the ack).
        Revoked {
            region: Option<u32>,
            access: bool,
        },
        Lost,
        Stalled,
        Other,
    }

    fn classify(e: &AgentError) -> End {
        match e {
            AgentError::Revoked {
                side: Side::Remote,
                region,
                why,
                ..
            } => End::Revoked {
                region: Some(*region),
                access: why.contains("RemAccessErr"),
            },
            // A request the NIC refused at a zapped region, under a lease the holder never saw
            // revoked: it acknowledged and kept writing.
            AgentError::Failed { status, .. } if status.contains("RemAccessErr") => End::Revoked {
                region: None,
                access: true,
            },
            AgentError::PeerLost { .. } => End::Lost,
            AgentError::Stalled { .. } => End::Stalled,
            _ => End::Other,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The block check can fail: every way a freed block can be wrong is named.
        #[test]
        fn a_freed_block_that_is_torn_stale_foreign_or_missing_is_refused() {
            let size = 4096;
            let good = block(3, 1, 7, size);
            assert_eq!(check_block(&good, 3, 1, 7), Ok(()));
            assert_eq!(
                check_block(&good, 3, 1, 5),
                Ok(()),
                "newer than notified is fine"
            );
            assert_eq!(
                check_block(&vec![0; size], 3, 1, 0),
                Ok(()),
                "never written"
            );
            let mut torn = good.clone();
            torn[size / 2..].copy_from_slice(&block(3, 1, 8, size)[size / 2..]);
            let why = |b: &[u8], e, s, q| check_block(b, e, s, q).unwrap_err();
            assert!(why(&torn, 3, 1, 7).contains("torn"));
            assert!(why(&good, 3, 1, 9).contains("older"));
            assert!(why(&good, 4, 1, 7).contains("epoch 3"));
            assert!(why(&good, 3, 2, 7).contains("slot 1"));
            assert!(why(&vec![0; size], 3, 1, 2).contains("empty"));
            assert!(why(&vec![0xee; size], 3, 1, 2).contains("header"));
        }
    }
}
