//! `dmaplane bench agent`: the application library against the raw `dmaplane-rdma` layer doing
//! the same work in the same run.
//!
//! Each point moves `batch` blocks of `block` bytes from one agent's host memory into the
//! other's, as one transfer (`Agent::write` of `batch` descriptor pairs, then `wait`), over
//! and over for the point's time. The raw reference posts the same requests itself — the same
//! chunk size, the same number of queue pairs and depth, striped the same way — on a world of
//! its own and polls its completion queue, as an application without the library would. The
//! figures are nixlbench's: throughput, and the average and p99 of prepare (building the
//! descriptor lists), post (the call that starts the transfer) and completion (post to done).
//!
//! Both sides live through the whole run and every point is measured in paired rounds
//! ([`crate::rounds`]): the raw layer and the agents back to back, the order swapped each round;
//! the ratio is the median of the rounds' ratios, reported with its range.

use std::time::{Duration, Instant};

use dmaplane::{Agent, Desc, RemoteDesc, Testbed};
use dmaplane_rdma::{Completion, ImportOptions, QpCaps, SendWr};
use serde::Serialize;

use crate::rounds::{Spread, reference_first};
use dmaplane::RawPair;

/// One point of the table.
#[derive(Debug, Clone, Serialize)]
pub struct AgentRow {
    pub block: u64,
    pub batch: usize,
    /// Transfers the agents made over all rounds.
    pub iterations: u64,
    /// The agents' median round.
    pub agent_gb_s: f64,
    /// The raw layer's median round.
    pub raw_gb_s: f64,
    /// Agent / raw: the median of the rounds' ratios, each round's two sides back to back.
    pub ratio: f64,
    /// The rounds' ratios: median, lowest, highest.
    pub ratio_spread: Spread,
    pub rounds: u32,
    pub prepare_us: Stat,
    pub post_us: Stat,
    pub completion_us: Stat,
    pub raw_completion_us: Stat,
}

/// Average and 99th percentile, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stat {
    pub avg: f64,
    pub p99: f64,
}

impl Stat {
    fn of(mut v: Vec<f64>) -> Stat {
        if v.is_empty() {
            return Stat::default();
        }
        v.sort_by(f64::total_cmp);
        let avg = v.iter().sum::<f64>() / v.len() as f64;
        let i = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1;
        Stat { avg, p99: v[i] }
    }
}

/// The registration cache: `registrations` sub-ranges of one region registered from an empty
/// cache, then the same sub-ranges again.
#[derive(Debug, Clone, Serialize)]
pub struct CacheRow {
    pub region: u64,
    pub registrations: usize,
    pub first_pass_ms: f64,
    pub second_pass_ms: f64,
    /// Second pass / first pass.
    pub ratio: f64,
    pub hits: u64,
    pub misses: u64,
}

/// Register `n` equal sub-ranges of a `region`-byte host memory, twice.
pub fn cache_passes(region: u64, n: usize) -> Result<CacheRow, AgentBenchError> {
    if n == 0 || region / n as u64 == 0 {
        return Err(AgentBenchError::Bad(format!(
            "{n} sub-ranges of {region} bytes"
        )));
    }
    let tb = Testbed::builtin()?;
    let a = Agent::builder("cache").testbed(tb).nics(["nic0"]).build()?;
    let mem = a.alloc_host("cache-pool", region)?;
    let step = region / n as u64;
    let pass = || -> Result<(f64, Vec<dmaplane::Region>), AgentBenchError> {
        let t = Instant::now();
        let v = (0..n as u64)
            .map(|k| a.register_range(&mem, k * step, step))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((t.elapsed().as_secs_f64() * 1e3, v))
    };
    let (first, keep) = pass()?;
    let (second, again) = pass()?;
    drop((keep, again));
    let st = a.stats().cache;
    Ok(CacheRow {
        region,
        registrations: n,
        first_pass_ms: first,
        second_pass_ms: second,
        ratio: second / first,
        hits: st.hits,
        misses: st.misses,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentReport {
    pub backend: String,
    /// Where the threads ran (the same for the raw layer and the agents).
    pub placement: String,
    pub chunk: u64,
    pub qps: usize,
    pub depth: u32,
    pub rows: Vec<AgentRow>,
    pub cache: Option<CacheRow>,
    pub handshake: Option<HandshakeRow>,
    pub block_lists: Option<crate::blocks::PostRow>,
}

/// What authenticating a peer costs: `Agent::connect_to` (the whole handshake, both sides'
/// queue pairs and lease links) with a shared secret against without one, measured in pairs,
/// the order swapped every pair.
#[derive(Debug, Clone, Serialize)]
pub struct HandshakeRow {
    pub handshakes: usize,
    /// Microseconds per handshake without a secret: median, lowest, highest.
    pub plain_us: Spread,
    /// The same with a secret.
    pub secret_us: Spread,
    /// Median with the secret over median without.
    pub ratio: f64,
}

/// `n` handshakes each way between two fresh agents (built outside the timing) on `tb`.
fn handshakes(tb: &std::sync::Arc<Testbed>, n: usize) -> Result<HandshakeRow, AgentBenchError> {
    let secret = dmaplane::auth::Secret::new(b"dmaplane bench handshake secret".to_vec())?;
    let once = |with: bool| -> Result<f64, AgentBenchError> {
        let build = |name: &str, nic: &str| {
            let b = Agent::builder(name).testbed(tb.clone()).nics([nic]);
            if with { b.secret(secret.clone()) } else { b }.build()
        };
        let (a, b) = (build("hs-a", "nic0")?, build("hs-b", "nic1")?);
        let addr = b.listen_addr().to_string();
        let t = Instant::now();
        let peer = a.connect_to(&addr)?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        drop((peer, a, b));
        Ok(us)
    };
    let (mut plain, mut with) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        if reference_first(i as u32) {
            plain.push(once(false)?);
            with.push(once(true)?);
        } else {
            with.push(once(true)?);
            plain.push(once(false)?);
        }
    }
    let spread =
        |v: &[f64]| Spread::of(v).ok_or_else(|| AgentBenchError::Bad("no handshakes".into()));
    let (plain_us, secret_us) = (spread(&plain)?, spread(&with)?);
    let ratio = secret_us.median / plain_us.median;
    Ok(HandshakeRow {
        handshakes: n,
        plain_us,
        secret_us,
        ratio,
    })
}

#[derive(Debug, Clone)]
pub struct AgentBenchConfig {
    pub blocks: Vec<u64>,
    pub batches: Vec<usize>,
    /// Each side's time per point and round.
    pub per_point: Duration,
    /// Paired rounds per point.
    pub rounds: u32,
    pub chunk: u64,
    pub qps: usize,
    pub depth: u32,
    /// The cache passes: (region bytes, sub-ranges); `None` skips them.
    pub cache: Option<(u64, usize)>,
    /// Handshakes each way (with a secret and without) on the simulated testbed; 0 skips.
    pub handshakes: usize,
    /// Rounds of posting a 64-block READ three ways — hand-built descriptors, by index into
    /// prepared lists, a prepared transfer again ([`crate::blocks`]); 0 skips.
    pub block_lists: usize,
    /// Run on this RDMA device through verbs (`Some("")`: the first) instead of the simulated
    /// testbed. Feature `verbs`.
    pub verbs: Option<String>,
    /// Each side's buffer: blocks wrap around in it.
    pub working_set: u64,
    /// Where the simulated NICs' engines and the measuring thread run, the same for the raw
    /// layer and the agents (`None`: left to the scheduler). A NIC's processors are its own;
    /// a simulated engine sharing the measuring thread's core makes every run a draw of where
    /// the scheduler put it (on two cores: 14 % or 60 % of the raw rate for single 4 KiB
    /// blocks, from one run to the next).
    pub placement: Option<dmaplane_core::cpu::Placement>,
}

impl Default for AgentBenchConfig {
    fn default() -> Self {
        AgentBenchConfig {
            blocks: vec![4 << 10, 64 << 10, 1 << 20, 4 << 20, 64 << 20],
            batches: vec![1, 16, 64, 128],
            per_point: Duration::from_millis(300),
            rounds: 5,
            chunk: 1 << 20,
            qps: 2,
            depth: 128,
            cache: Some((4 << 30, 2000)),
            handshakes: 20,
            block_lists: 1000,
            placement: dmaplane_core::cpu::Placement::auto(),
            verbs: None,
            working_set: 256 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentBenchError {
    #[error(transparent)]
    Agent(#[from] dmaplane::Error),
    #[error(transparent)]
    Rdma(#[from] dmaplane_rdma::RdmaError),
    #[error(transparent)]
    Blocks(#[from] crate::blocks::BlocksError),
    #[error("{0}")]
    Bad(String),
}

/// Block `k` of a batch: its offset in a working set of `set` bytes.
fn offset(set: u64, block: u64, k: usize) -> u64 {
    let per = (set / block).max(1);
    (k as u64 % per) * block
}

pub fn run(
    cfg: &AgentBenchConfig,
    progress: &dyn crate::rdma::Progress,
) -> Result<AgentReport, AgentBenchError> {
    let set = cfg.working_set;
    if let Some(&b) = cfg.blocks.iter().find(|&&b| b == 0 || b > set) {
        return Err(AgentBenchError::Bad(format!(
            "--blocks {b}: blocks must be 1 byte to {set}"
        )));
    }
    if let Some(&b) = cfg.batches.iter().find(|&&b| b == 0 || b > 4096) {
        return Err(AgentBenchError::Bad(format!("--batches {b}: 1 to 4096")));
    }
    if cfg.rounds == 0 || cfg.rounds > 1000 {
        return Err(AgentBenchError::Bad(format!(
            "--rounds {}: 1 to 1000",
            cfg.rounds
        )));
    }
    // Both sides live through the run; a side's NIC engines sleep while the other measures.
    let raw = match &cfg.verbs {
        None => Raw::sim(cfg)?,
        Some(dev) => Raw::verbs(cfg, dev)?,
    };
    let engines = cfg.placement.as_ref().map_or(&[][..], |p| &p.engines[..]);
    let tb = Testbed::with_engine_cpus(dmaplane_core::topology::builtin::testbed(), engines)?;
    let build = |name: &str, nic: &str| {
        let b = Agent::builder(name)
            .chunk(cfg.chunk)
            .qps_per_path(cfg.qps)
            .depth(cfg.depth);
        match &cfg.verbs {
            None => b.testbed(tb.clone()).nics([nic]).build(),
            Some(dev) => verbs_agent(b, dev),
        }
    };
    let (a, b) = (build("bench-a", "nic0")?, build("bench-b", "nic1")?);
    let (src, dst) = (
        a.alloc_host("bench-src", set)?,
        b.alloc_host("bench-dst", set)?,
    );
    src.write(0, &vec![0x11; set as usize])?;
    dst.write(0, &vec![0; set as usize])?;
    let (ra, rb) = (a.register(&src)?, b.register(&dst)?);
    let peer = a.connect(&b.metadata_blob()?)?;
    // One side's rounds of `batch` blocks for `time` (at least one): transfers, seconds, and
    // each transfer's prepare, post and completion times.
    let agent_side = |block: u64, batch: usize| -> Result<AgentSide, AgentBenchError> {
        let mut side = AgentSide::default();
        let start = Instant::now();
        while side.iters == 0 || start.elapsed() < cfg.per_point {
            let t0 = Instant::now();
            let local: Vec<Desc> = (0..batch)
                .map(|k| ra.desc(offset(set, block, k), block))
                .collect::<Result<_, _>>()?;
            let remote: Vec<RemoteDesc> = (0..batch)
                .map(|k| peer.desc(rb.id(), offset(set, block, k), block))
                .collect::<Result<_, _>>()?;
            let t1 = Instant::now();
            let t = a.write(&peer, &local, &remote, None)?;
            let t2 = Instant::now();
            t.wait(Duration::from_secs(60))?;
            let t3 = Instant::now();
            side.prep.push((t1 - t0).as_secs_f64() * 1e6);
            side.post.push((t2 - t1).as_secs_f64() * 1e6);
            side.comp.push((t3 - t1).as_secs_f64() * 1e6);
            side.iters += 1;
        }
        Ok(side)
    };
    let mut rows = Vec::new();
    for &block in &cfg.blocks {
        for &batch in &cfg.batches {
            let bytes = (block * batch as u64) as f64;
            let mut all = AgentSide::default();
            let mut raw_comp = Vec::new();
            let (mut agent_rates, mut raw_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..cfg.rounds {
                let mut agent = None;
                let mut reference = None;
                for turn in 0..2 {
                    if (turn == 0) == reference_first(round) {
                        progress.step(&format!(
                            "round {}/{}: raw: block {block} × batch {batch}",
                            round + 1,
                            cfg.rounds
                        ));
                        reference = Some(raw.measure(block, batch, cfg.per_point)?);
                    } else {
                        progress.step(&format!(
                            "round {}/{}: agent: block {block} × batch {batch}",
                            round + 1,
                            cfg.rounds
                        ));
                        agent = Some(agent_side(block, batch)?);
                    }
                }
                let (Some(agent), Some((raw_iters, raw_s, comp))) = (agent, reference) else {
                    return Err(AgentBenchError::Bad(
                        "a round measured one side only".into(),
                    ));
                };
                // The agents' time is what the application waits for: prepare + completion.
                let agent_s = agent
                    .comp
                    .iter()
                    .zip(&agent.prep)
                    .map(|(c, p)| c + p)
                    .sum::<f64>()
                    / 1e6;
                let agent_rate = bytes * agent.iters as f64 / agent_s / 1e9;
                let raw_rate = bytes * raw_iters as f64 / raw_s / 1e9;
                agent_rates.push(agent_rate);
                raw_rates.push(raw_rate);
                ratios.push(agent_rate / raw_rate);
                all.absorb(agent);
                raw_comp.extend(comp);
            }
            let spread =
                |v: &[f64]| Spread::of(v).ok_or_else(|| AgentBenchError::Bad("no rounds".into()));
            let ratio_spread = spread(&ratios)?;
            rows.push(AgentRow {
                block,
                batch,
                iterations: all.iters,
                agent_gb_s: spread(&agent_rates)?.median,
                raw_gb_s: spread(&raw_rates)?.median,
                ratio: ratio_spread.median,
                ratio_spread,
                rounds: cfg.rounds,
                prepare_us: Stat::of(all.prep),
                post_us: Stat::of(all.post),
                completion_us: Stat::of(all.comp),
                raw_completion_us: Stat::of(raw_comp),
            });
        }
    }
    drop((ra, rb, peer, a, b, src, dst, raw));
    let cache = match cfg.cache {
        Some((region, n)) => {
            progress.step(&format!(
                "registration cache: {n} sub-ranges of {region} bytes"
            ));
            Some(cache_passes(region, n)?)
        }
        None => None,
    };
    let handshake = match cfg.handshakes {
        0 => None,
        n => {
            progress.step(&format!("{n} handshakes with a secret and without"));
            Some(handshakes(&tb, n)?)
        }
    };
    let block_lists = match cfg.block_lists {
        0 => None,
        n => {
            progress.step(&format!(
                "{n} rounds of a 64-block READ posted three ways (hand-built, by index, prepared)"
            ));
            Some(crate::blocks::post_by_index(&tb, 4 << 10, n)?)
        }
    };
    Ok(AgentReport {
        block_lists,
        placement: dmaplane_core::cpu::placement_note(cfg.placement.as_ref()),
        backend: if cfg.verbs.is_some() {
            "verbs".into()
        } else {
            "sim".into()
        },
        chunk: cfg.chunk,
        qps: cfg.qps,
        depth: cfg.depth,
        rows,
        cache,
        handshake,
    })
}

/// One point's transfers through the agents: how many, and each one's prepare, post and
/// completion time in microseconds.
#[derive(Debug, Default)]
struct AgentSide {
    iters: u64,
    prep: Vec<f64>,
    post: Vec<f64>,
    comp: Vec<f64>,
}

impl AgentSide {
    fn absorb(&mut self, other: AgentSide) {
        self.iters += other.iters;
        self.prep.extend(other.prep);
        self.post.extend(other.post);
        self.comp.extend(other.comp);
    }
}

/// The raw layer: the same requests, posted and reaped by hand.
/// Where the raw reference's sending completion queue lives.
enum RawSide {
    Sim(Box<RawPair>),
    #[cfg(feature = "verbs")]
    Verbs(Box<dmaplane::RawHost>),
}

struct Raw {
    side: RawSide,
    qps: Vec<dmaplane_rdma::Qp>,
    src: dmaplane_rdma::Mr,
    dst: std::sync::Arc<dmaplane_rdma::RemoteMr>,
    chunk: u64,
    depth: usize,
    set: u64,
    /// Devices, memory and the peer queue pairs, kept alive.
    _keep: Box<dyn std::any::Any>,
}

impl Raw {
    fn new(
        cfg: &AgentBenchConfig,
        side: RawSide,
        qps: Vec<dmaplane_rdma::Qp>,
        src: dmaplane_rdma::Mr,
        dst: std::sync::Arc<dmaplane_rdma::RemoteMr>,
        keep: Box<dyn std::any::Any>,
    ) -> Raw {
        Raw {
            side,
            qps,
            src,
            dst,
            chunk: cfg.chunk,
            depth: cfg.depth as usize,
            set: cfg.working_set,
            _keep: keep,
        }
    }

    fn sim(cfg: &AgentBenchConfig) -> Result<Raw, AgentBenchError> {
        let world = RawPair::sim(1 << 16, cfg.placement.clone())?;
        // The measuring thread too (the agents' waits run on it later).
        world.pin_host_thread();
        let caps = QpCaps {
            max_send_wr: cfg.depth,
            max_recv_wr: 1,
            ..QpCaps::default()
        };
        let pairs = world.connect(cfg.qps, caps)?;
        let qps = pairs.iter().map(|(a, _)| a.clone()).collect();
        let ms = world.a.memory("raw-src", cfg.working_set)?;
        let md = world.b.memory("raw-dst", cfg.working_set)?;
        ms.window().memory().fill(0x11);
        md.window().memory().fill(0);
        let src = world.a.import(&ms, "raw-src", ImportOptions::default())?;
        let dmr = world.b.import(&md, "raw-dst", ImportOptions::default())?;
        let dst = world.b.dev.lease(&dmr, &world.a.dev);
        let keep = Box::new((ms, md, dmr, pairs));
        Ok(Raw::new(
            cfg,
            RawSide::Sim(Box::new(world)),
            qps,
            src,
            dst,
            keep,
        ))
    }

    /// Two contexts of one RDMA device, udmabuf memory on each, as the agents have.
    #[cfg(feature = "verbs")]
    fn verbs(cfg: &AgentBenchConfig, dev: &str) -> Result<Raw, AgentBenchError> {
        use dmaplane::RawHost;
        use dmaplane_core::dmabuf::UdmaBuf;
        let name = (!dev.is_empty()).then_some(dev);
        let (ha, hb) = (RawHost::verbs(name, 1 << 14)?, RawHost::verbs(name, 64)?);
        let mtu = dmaplane_rdma::verbs::VerbsDevice::open(name)?.active_mtu();
        let caps = QpCaps {
            max_send_wr: cfg.depth,
            max_recv_wr: 1,
            ..QpCaps::default()
        };
        let pairs = ha.connect(&hb, cfg.qps, caps, Some(mtu))?;
        let qps = pairs.iter().map(|(a, _)| a.clone()).collect();
        // udmabuf memory imported by one context (the dma-buf MR, or the buffer's mapping).
        let imported = |h: &RawHost, n: &str| -> Result<_, AgentBenchError> {
            let m = UdmaBuf::new(n, cfg.working_set)
                .map(UdmaBuf::into_memory)
                .map_err(|e| AgentBenchError::Bad(format!("{n}: {e}")))?;
            let mr = h.import_dmabuf(&m, n, ImportOptions::default())?;
            Ok((m, mr))
        };
        let (ms, src) = imported(&ha, "raw-src")?;
        let (md, dmr) = imported(&hb, "raw-dst")?;
        let dst = hb.dev.lease(&dmr, &ha.dev);
        let keep = Box::new((hb, ms, md, dmr, pairs));
        Ok(Raw::new(
            cfg,
            RawSide::Verbs(Box::new(ha)),
            qps,
            src,
            dst,
            keep,
        ))
    }

    #[cfg(not(feature = "verbs"))]
    fn verbs(_cfg: &AgentBenchConfig, _dev: &str) -> Result<Raw, AgentBenchError> {
        Err(AgentBenchError::Bad(
            "--backend verbs needs the `verbs` feature: cargo build --release -p dmaplane-tools --features verbs".into(),
        ))
    }

    fn cq(&self) -> &dmaplane_rdma::Cq {
        match &self.side {
            RawSide::Sim(w) => &w.a.cq,
            #[cfg(feature = "verbs")]
            RawSide::Verbs(h) => &h.cq,
        }
    }

    /// Rounds of `batch` blocks for `time` (at least one): rounds, total seconds and each
    /// round's time.
    fn measure(
        &self,
        block: u64,
        batch: usize,
        time: Duration,
    ) -> Result<(u64, f64, Vec<f64>), AgentBenchError> {
        // The same chunks, striped round robin over the queue pairs.
        let mut wrs: Vec<Vec<SendWr>> = vec![Vec::new(); self.qps.len()];
        let mut n = 0usize;
        for k in 0..batch {
            let base = offset(self.set, block, k);
            let mut off = 0;
            while off < block {
                let len = (block - off).min(self.chunk);
                let q = n % self.qps.len();
                wrs[q].push(SendWr::write(
                    n as u64,
                    self.src.sge(base + off, len as u32),
                    self.dst.at(base + off),
                ));
                n += 1;
                off += len;
            }
        }
        let mut times = Vec::new();
        let mut wcs: Vec<Completion> = Vec::with_capacity(256);
        let total = Instant::now();
        while times.is_empty() || total.elapsed() < time {
            let t0 = Instant::now();
            let mut next = vec![0usize; self.qps.len()];
            let mut out = vec![0usize; self.qps.len()];
            let mut done = 0usize;
            while done < n {
                for (q, qp) in self.qps.iter().enumerate() {
                    let room = self.depth - out[q];
                    let end = (next[q] + room).min(wrs[q].len());
                    if end > next[q] {
                        qp.post_send(&wrs[q][next[q]..end])?;
                        out[q] += end - next[q];
                        next[q] = end;
                    }
                }
                wcs.clear();
                self.cq().poll(&mut wcs, 256)?;
                for wc in &wcs {
                    if wc.status != dmaplane_rdma::WcStatus::Success {
                        return Err(AgentBenchError::Bad(format!(
                            "raw WRITE {} completed with {:?}",
                            wc.wr_id, wc.status
                        )));
                    }
                    out[wc.wr_id as usize % self.qps.len()] -= 1;
                    done += 1;
                }
            }
            times.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        Ok((times.len() as u64, total.elapsed().as_secs_f64(), times))
    }
}

#[cfg(feature = "verbs")]
fn verbs_agent(b: dmaplane::AgentBuilder, dev: &str) -> Result<Agent, dmaplane::Error> {
    let b = b.verbs();
    if dev.is_empty() {
        b.build()
    } else {
        b.nics([dev]).build()
    }
}

#[cfg(not(feature = "verbs"))]
fn verbs_agent(_b: dmaplane::AgentBuilder, _dev: &str) -> Result<Agent, dmaplane::Error> {
    Err(dmaplane::Error::Setup {
        agent: "bench".into(),
        why: "--backend verbs needs the `verbs` feature".into(),
    })
}
