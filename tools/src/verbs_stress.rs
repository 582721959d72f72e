//! `stress revoke --backend verbs`: the revoke stress on a real RDMA device (Soft-RoCE in the
//! qemu testbed, or a NIC), feature `verbs`.
//!
//! Two contexts of one device play two hosts: the *owner* exports udmabuf memory and imports it
//! with `Pd::import` (where the provider refuses dma-buf MRs, as rxe does, the negotiation falls
//! back to the buffer's process mapping, and the run reports it); the *holder* writes into it
//! over N RC queue pairs. The owner grants each export to the holder and revokes it over a
//! lease link on a real TCP connection (127.0.0.1), exactly as two hosts would: `LeaseRevoke`
//! out, the holder quiesces its queue pairs, `LeaseAck` back, then the zap and the fence.
//!
//! Checks, as in the simulated stress: every request completes exactly once; every successful
//! WRITE is read back byte for byte from the owner's memory; after each ack the old buffer is
//! poisoned and must still be all poison at the next revoke (any DMA that landed after the ack
//! would have changed it); and every access the NIC refused because a key was gone (a
//! remote-access error at the holder, an access-error event at the owner) is counted — an honest
//! holder never even tries.

#[cfg(not(feature = "verbs"))]
pub fn run(
    _cfg: &dmaplane_bench::stress::StressConfig,
    _device: Option<&str>,
    _progress: &(dyn Fn(u64) + Sync),
) -> anyhow::Result<dmaplane_bench::stress::StressReport> {
    anyhow::bail!(
        "stress revoke --backend verbs needs the `verbs` feature, which this dmaplane was built \
         without: cargo build --release -p dmaplane-tools --features verbs (building needs cmake \
         and libclang-dev; running needs libibverbs1 and ibverbs-providers)"
    )
}

#[cfg(feature = "verbs")]
pub use imp::run;

#[cfg(feature = "verbs")]
mod imp {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, bail};
    use dmaplane_bench::stress::{Latency, StressConfig, StressReport};
    use dmaplane_core::ImporterKind;
    use dmaplane_core::dmabuf::{DmaBufMemory, UdmaBuf};
    use dmaplane_rdma::oob::{ConnInfo, Oob, OobListener};
    use dmaplane_rdma::verbs::{VerbsDevice, list_devices};
    use dmaplane_rdma::{
        Completion, Cq, Device, ImportOptions, LeaseLink, Mr, MrAccess, Pd, Qp, QpCaps,
        QuiescePolicy, RdmaError, RemoteMr, SendWr, WcStatus,
    };

    const POISON: u8 = 0xd5;
    /// Setup steps over the control connection (Soft-RoCE under TCG is slow).
    const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
    /// How long the data path keeps reaping after the last revoke before calling a request lost.
    const DRAIN_LIMIT: Duration = Duration::from_secs(30);

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bytes request `tag` writes: a word per 8 bytes, unique to tag and position.
    fn pattern(tag: u64, len: usize, buf: &mut Vec<u8>) {
        buf.clear();
        buf.extend(
            (0..len.div_ceil(8))
                .flat_map(|k| (tag ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes()),
        );
        buf.truncate(len);
    }

    /// Deterministic generator for the revoke schedule.
    fn next(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    /// One export: the owner's memory and registration of one epoch.
    struct Export {
        epoch: u64,
        mem: Arc<DmaBufMemory>,
        mr: Mr,
    }

    /// An export as the data path looks it up when its grant arrives.
    struct Published {
        rkey: u32,
        addr: u64,
        epoch: u64,
        mem: Arc<DmaBufMemory>,
    }

    /// What the data path writes to in one epoch.
    #[derive(Clone)]
    struct Target {
        epoch: u64,
        remote: Arc<RemoteMr>,
        mem: Arc<DmaBufMemory>,
    }

    /// One side's verbs objects.
    struct Side {
        dev: Device,
        pd: Pd,
        cq: Cq,
        qps: Vec<Qp>,
    }

    fn side(name: &str, qps: usize, caps: QpCaps, cq_depth: u32) -> Result<Side> {
        let dev = Device::new(VerbsDevice::open(Some(name))?);
        let pd = dev.alloc_pd()?;
        let cq = dev.create_cq(cq_depth)?;
        let qps = (0..qps)
            .map(|_| pd.create_qp(&cq, &cq, caps))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Side { dev, pd, cq, qps })
    }

    /// Swap every QP's endpoint over `oob`, connect them, then open the lease link.
    fn connect(s: &Side, oob: Oob, mtu: dmaplane_rdma::Mtu) -> Result<LeaseLink> {
        for qp in &s.qps {
            let theirs =
                oob.exchange_timeout(&ConnInfo::new(qp.endpoint(), vec![]), SETUP_TIMEOUT)?;
            qp.connect_mtu(theirs.remote_qp(), MrAccess::ALL, mtu)?;
        }
        Ok(LeaseLink::open(&s.dev, oob, SETUP_TIMEOUT)?)
    }

    /// Import `mem` into `pd` (dma-buf first, the process mapping when the provider refuses).
    fn import(pd: &Pd, name: &str, mem: &DmaBufMemory, opts: ImportOptions) -> Result<Mr> {
        Ok(pd.import(name, opts, Some(mem.fd()), |i, a| mem.attach(i, a))?)
    }

    fn poison(mem: &DmaBufMemory) -> Result<()> {
        let chunk = vec![POISON; 1 << 16];
        let mut off = 0;
        while off < mem.len() {
            let n = (mem.len() - off).min(chunk.len() as u64) as usize;
            mem.write(off, &chunk[..n])?;
            off += n as u64;
        }
        Ok(())
    }

    /// Pages of `mem` that are no longer all poison.
    fn poison_damage(mem: &DmaBufMemory) -> Result<u64> {
        let mut buf = vec![0u8; 4096];
        let (mut bad, mut off) = (0, 0);
        while off < mem.len() {
            mem.read(off, &mut buf)?;
            if buf.iter().any(|&b| b != POISON) {
                bad += 1;
            }
            off += 4096;
        }
        Ok(bad)
    }

    pub fn run(
        cfg: &StressConfig,
        device: Option<&str>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<StressReport> {
        let names = list_devices()?;
        let name = match device {
            Some(d) => d.to_string(),
            None => match names.first() {
                Some(n) => n.clone(),
                None => bail!("no RDMA device: libibverbs lists none"),
            },
        };
        let probe = VerbsDevice::open(Some(&name))?;
        let mtu = probe.active_mtu();
        drop(probe);
        if cfg.policy == QuiescePolicy::Flush && cfg.size > mtu.bytes() {
            bail!(
                "--quiesce flush with --size {} on {name}: a WRITE must fit one packet (path MTU {} \
                 bytes) — flushing a multi-packet WRITE can leave the owner's responder in the \
                 middle of a message, which breaks the connection; use --size {} or less, or \
                 --quiesce drain",
                cfg.size,
                mtu.bytes(),
                mtu.bytes()
            );
        }
        let slots = cfg.qps * cfg.depth;
        let region = (slots as u64 * u64::from(cfg.size))
            .next_multiple_of(4096)
            .max(4096);
        let mut notes = vec![format!("device {name}, path MTU {} bytes", mtu.bytes())];

        let caps = QpCaps {
            max_send_wr: u32::try_from(cfg.depth).context("--depth")?,
            max_recv_wr: 1,
            ..QpCaps::default()
        };
        let cq_depth = u32::try_from(slots * 2 + 64).unwrap_or(u32::MAX);
        let owner = side(&name, cfg.qps, caps, 64)?;
        let holder = side(&name, cfg.qps, caps, cq_depth)?;

        // Connect through the out-of-band TCP connection, as two hosts would.
        let listener = OobListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr();
        let (olink, hlink) = std::thread::scope(|s| -> Result<(LeaseLink, LeaseLink)> {
            let h = s.spawn(|| connect(&holder, Oob::connect(addr, SETUP_TIMEOUT)?, mtu));
            let o = connect(&owner, listener.accept(SETUP_TIMEOUT)?, mtu);
            let h = h
                .join()
                .map_err(|_| anyhow::anyhow!("holder setup thread panicked"))?;
            Ok((o?, h?))
        })?;
        notes.push(format!(
            "lease link over TCP {} ↔ {}",
            hlink.peer_addr(),
            olink.peer_addr()
        ));

        // The holder's source memory (also a udmabuf, imported the same way).
        let src_mem = UdmaBuf::new("stress-src", region)
            .context("the holder's source buffer")?
            .into_memory();
        let src = import(
            &holder.pd,
            "stress-src",
            &src_mem,
            ImportOptions {
                access: MrAccess::LOCAL_WRITE,
                ..ImportOptions::default()
            },
        )?;
        let opts = ImportOptions {
            access: MrAccess::LOCAL_WRITE | MrAccess::REMOTE_WRITE | MrAccess::REMOTE_READ,
            kind: ImporterKind::Pinned,
            policy: cfg.policy,
            recover: true,
        };
        // Every export so far, by (rkey, address): how the data path finds the memory behind
        // a grant it received over TCP.
        let exports: Mutex<Vec<Published>> = Mutex::new(Vec::new());
        let export = |epoch: u64| -> Result<Export> {
            let mem = Arc::new(
                UdmaBuf::new(&format!("stress-dst-{epoch}"), region)
                    .with_context(|| format!("export {epoch}"))?
                    .into_memory(),
            );
            let mr = import(&owner.pd, "stress-dst", &mem, opts)?;
            {
                let mut ex = lock(&exports);
                // Grants are taken up long before two more exports follow.
                ex.retain(|e| e.epoch + 2 >= epoch);
                ex.push(Published {
                    rkey: mr.rkey(),
                    addr: mr.iova(),
                    epoch,
                    mem: mem.clone(),
                });
            }
            olink.grant(&mr)?;
            Ok(Export { epoch, mem, mr })
        };
        let first = export(0)?;
        notes.push(format!(
            "owner registration: {}",
            first.mr.negotiation().unwrap_or_default()
        ));
        notes.push(format!(
            "holder source registration: {}",
            src.negotiation().unwrap_or_default()
        ));
        let target_of = |remote: Arc<RemoteMr>| -> Result<Target> {
            let found = lock(&exports)
                .iter()
                .rev()
                .find(|p| p.rkey == remote.rkey() && p.addr == remote.addr())
                .map(|p| (p.epoch, p.mem.clone()));
            match found {
                Some((epoch, mem)) => Ok(Target { epoch, remote, mem }),
                None => bail!(
                    "grant for rkey {:#x} that was never exported",
                    remote.rkey()
                ),
            }
        };
        let first_target = target_of(hlink.next_grant(SETUP_TIMEOUT)?)?;

        let stop = AtomicBool::new(false);
        // Requests outstanding per epoch, counted before the post so none slips past: the
        // revoker poisons an old epoch only once all of its writes were reaped and verified.
        let per_epoch: Mutex<BTreeMap<u64, u64>> = Mutex::new(BTreeMap::new());
        let outstanding_in = |e: u64| lock(&per_epoch).get(&e).copied().unwrap_or(0);
        let count = |e: u64, delta: i64| {
            let mut m = lock(&per_epoch);
            let v = m.entry(e).or_insert(0);
            *v = v.saturating_add_signed(delta);
            if *v == 0 {
                m.remove(&e);
            }
        };
        // (epoch, requests posted to it) for the newest epoch the data path posted to.
        let load: Mutex<(u64, u64)> = Mutex::new((0, 0));
        let load_of = |e: u64| {
            let l = lock(&load);
            if l.0 == e { l.1 } else { 0 }
        };
        let revokes_done = AtomicU64::new(0);
        let post_ack_poison = AtomicU64::new(0);
        let timed_out = AtomicU64::new(0);
        let latencies = Mutex::new(Vec::with_capacity(cfg.revokes as usize));
        let failures = Mutex::new(Vec::<String>::new());
        let fail = |s: String| {
            let mut f = lock(&failures);
            if f.len() < 20 {
                f.push(s);
            }
        };
        let start = Instant::now();
        let min_time = Duration::from_secs_f64(cfg.seconds.max(0.0));

        let report = std::thread::scope(|s| -> Result<StressReport> {
            // The owner: revoke, wait for the old epoch's writes, check and poison, re-export.
            let revoker = s.spawn(|| {
                let mut seed = cfg.seed | 1;
                let mut live = Some(first);
                let mut retired: Option<Arc<DmaBufMemory>> = None;
                let interval = min_time.as_secs_f64() / cfg.revokes.max(1) as f64;
                for epoch in 1..=cfg.revokes {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Some(ex) = live.take() else { break };
                    // Revoke under load: once the data path has filled every queue pair of this
                    // export twice (grant, then posts, take milliseconds under emulation, far
                    // longer than a revoke), then at a random point of the traffic.
                    let wait_from = Instant::now();
                    while load_of(ex.epoch) < 2 * slots as u64
                        && wait_from.elapsed() < Duration::from_secs(5)
                        && !stop.load(Ordering::Relaxed)
                    {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    let jitter = (next(&mut seed) % 1000) as f64 / 1000.0 * 2.0 * interval;
                    let random_point = (next(&mut seed) % 3000) as f64 * 1e-6;
                    std::thread::sleep(Duration::from_secs_f64(jitter.min(0.05) + random_point));
                    let report = ex.mem.revoke(cfg.deadline);
                    lock(&latencies).push(report.elapsed_us as f64);
                    if !report.is_clean() {
                        timed_out.fetch_add(1, Ordering::Relaxed);
                        fail(format!("revoke {epoch}: {report}"));
                    }
                    let wait_from = Instant::now();
                    while outstanding_in(ex.epoch) > 0
                        && wait_from.elapsed() < Duration::from_secs(10)
                        && !stop.load(Ordering::Relaxed)
                    {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    // The previous epoch must still be all poison; then poison this one.
                    if let Some(old) = retired.take() {
                        match poison_damage(&old) {
                            Ok(n) => {
                                post_ack_poison.fetch_add(n, Ordering::Relaxed);
                            }
                            Err(e) => fail(format!("poison check: {e}")),
                        }
                    }
                    if let Err(e) = poison(&ex.mem) {
                        fail(format!("poison: {e}"));
                    }
                    retired = Some(ex.mem.clone());
                    drop(ex);
                    match export(epoch) {
                        Ok(next_ex) => live = Some(next_ex),
                        Err(e) => {
                            fail(format!("re-export {epoch}: {e:#}"));
                            break;
                        }
                    }
                    revokes_done.store(epoch, Ordering::Relaxed);
                    progress(epoch);
                }
                if let Some(old) = retired.take() {
                    match poison_damage(&old) {
                        Ok(n) => {
                            post_ack_poison.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => fail(format!("poison check: {e}")),
                    }
                }
                live
            });

            // The holder: keep `depth` WRITEs outstanding on every QP, verify each success.
            let mut current = first_target;
            let (mut posted, mut ok, mut flushed, mut failed) = (0u64, 0u64, 0u64, 0u64);
            let (mut corrupt, mut bytes, mut refused, mut rem_access) = (0u64, 0u64, 0u64, 0u64);
            let size = cfg.size as usize;
            let mut inflight: Vec<Option<(Target, u64)>> = vec![None; slots];
            let mut free: Vec<Vec<usize>> = (0..cfg.qps)
                .map(|q| (0..cfg.depth).map(|d| q * cfg.depth + d).collect())
                .collect();
            let mut wcs: Vec<Completion> = Vec::with_capacity(1024);
            let mut buf = Vec::with_capacity(size);
            let mut got = vec![0u8; size];
            let mut serial = 0u64;
            let mut batch: Vec<SendWr> = Vec::with_capacity(cfg.depth);
            let mut tags: Vec<u64> = Vec::with_capacity(cfg.depth);
            let mut draining_since: Option<Instant> = None;
            loop {
                // Only the newest grant matters: the ones before it are revoked already.
                if let Some(r) = std::iter::from_fn(|| hlink.try_grant()).last() {
                    match target_of(r) {
                        Ok(t) => current = t,
                        Err(e) => fail(format!("{e:#}")),
                    }
                }
                let done_revoking =
                    revokes_done.load(Ordering::Relaxed) >= cfg.revokes || revoker.is_finished();
                let stopping = done_revoking && start.elapsed() >= min_time;
                if stopping && draining_since.is_none() {
                    draining_since = Some(Instant::now());
                }
                let mut posted_now = 0u64;
                if !stopping {
                    for (q, qp) in holder.qps.iter().enumerate() {
                        if free[q].is_empty() {
                            continue;
                        }
                        batch.clear();
                        tags.clear();
                        for &slot in &free[q] {
                            serial += 1;
                            let tag = (current.epoch << 40) ^ serial;
                            tags.push(tag);
                            pattern(tag, size, &mut buf);
                            let off = slot as u64 * u64::from(cfg.size);
                            src_mem.write(off, &buf)?;
                            batch.push(SendWr::write(
                                slot as u64,
                                src.sge(off, cfg.size),
                                current.remote.at(off),
                            ));
                        }
                        count(current.epoch, batch.len() as i64);
                        let r = qp.post_send(&batch);
                        if r.is_err() {
                            count(current.epoch, -(batch.len() as i64));
                        }
                        match r {
                            Ok(()) => {
                                posted += batch.len() as u64;
                                posted_now += batch.len() as u64;
                                {
                                    let mut l = lock(&load);
                                    if l.0 != current.epoch {
                                        *l = (current.epoch, 0);
                                    }
                                    l.1 += batch.len() as u64;
                                }
                                for (wr, &tag) in batch.iter().zip(&tags) {
                                    inflight[wr.wr_id as usize] = Some((current.clone(), tag));
                                }
                                free[q].clear();
                            }
                            // The lease was withdrawn, or the QP is still recovering from its
                            // flush: expected while a revoke is under way.
                            Err(RdmaError::Revoked { .. }) | Err(RdmaError::WrongState { .. }) => {
                                refused += 1;
                            }
                            Err(e) => {
                                fail(format!("post on QP {:#x}: {e}", qp.qpn()));
                                failed += 1;
                            }
                        }
                    }
                }
                wcs.clear();
                holder.cq.poll(&mut wcs, 1024)?;
                for wc in &wcs {
                    let slot = wc.wr_id as usize;
                    let Some((target, tag)) = inflight.get_mut(slot).and_then(Option::take) else {
                        fail(format!("completion for unknown request {}", wc.wr_id));
                        failed += 1;
                        continue;
                    };
                    free[slot / cfg.depth].push(slot);
                    match wc.status {
                        WcStatus::Success => {
                            ok += 1;
                            pattern(tag, size, &mut buf);
                            let off = slot as u64 * u64::from(cfg.size);
                            // udmabuf pages are ordinary cache-coherent host memory: the CPU
                            // view shows what the NIC wrote once the completion is seen.
                            let read = target.mem.read(off, &mut got);
                            if read.is_ok() && got == buf {
                                bytes += u64::from(cfg.size);
                            } else {
                                corrupt += 1;
                                let first = got.iter().zip(&buf).position(|(a, b)| a != b);
                                fail(format!(
                                    "slot {slot} epoch {} (current {}): bytes differ from byte \
                                     {first:?} ({read:?})",
                                    target.epoch, current.epoch
                                ));
                            }
                        }
                        WcStatus::WrFlushErr => flushed += 1,
                        other => {
                            failed += 1;
                            if other == WcStatus::RemAccessErr {
                                rem_access += 1;
                            }
                            fail(format!(
                                "QP {:#x} request {} (epoch {}): {other}",
                                wc.qp_num, wc.wr_id, target.epoch
                            ));
                        }
                    }
                    count(target.epoch, -1);
                }
                if wcs.is_empty() && posted_now == 0 {
                    holder.cq.wait(Duration::from_micros(500))?;
                }
                if let Some(since) = draining_since {
                    let outstanding = inflight.iter().filter(|x| x.is_some()).count();
                    if outstanding == 0 || since.elapsed() > DRAIN_LIMIT {
                        break;
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            let live = revoker.join().unwrap_or(None);
            drop(live);
            let lost = inflight.iter().filter(|x| x.is_some()).count() as u64;
            // Accesses the NIC refused because a key was gone, seen by the owner's responder.
            let mut access_events = 0u64;
            for (who, dev) in [("owner", &owner.dev), ("holder", &holder.dev)] {
                for ev in dev.async_events() {
                    if ev.kind == "QP_ACCESS_ERR" {
                        access_events += 1;
                    }
                    fail(format!("{who} async event {} ({})", ev.kind, ev.detail));
                }
            }
            let stats = owner.dev.stats();
            if stats.holders_cut_off > 0 {
                fail(format!(
                    "{} lease holder(s) cut off without an ack",
                    stats.holders_cut_off
                ));
            }
            let lat = std::mem::take(&mut *lock(&latencies));
            let mut notes = std::mem::take(&mut notes);
            notes.push(format!(
                "leases: {} revoked, {} acked over TCP, {} cut off; holder QP flushes {} \
                 (under drain the holder waits for its WRITEs instead)",
                stats.leases_revoked,
                stats.lease_acks,
                stats.holders_cut_off,
                holder.dev.stats().qps_flushed,
            ));
            Ok(StressReport {
                backend: "verbs",
                qps: cfg.qps,
                depth: cfg.depth,
                size: cfg.size,
                posted,
                completed_ok: ok,
                flushed,
                failed,
                lost,
                corrupt,
                post_ack_accesses: post_ack_poison.load(Ordering::Relaxed)
                    + rem_access
                    + access_events,
                bytes_verified: bytes,
                revokes: revokes_done.load(Ordering::Relaxed),
                revoke_latency_us: Latency::of(lat),
                revokes_timed_out: timed_out.load(Ordering::Relaxed) + stats.holders_cut_off,
                posts_refused: refused,
                seconds: start.elapsed().as_secs_f64(),
                failures: std::mem::take(&mut *lock(&failures)),
                notes,
            })
        })?;
        // Close the lease links before the devices go (the receivers hold device handles).
        drop((hlink, olink));
        Ok(report)
    }
}
