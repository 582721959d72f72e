//! `stress revoke --layer agent` across two processes: `--backend verbs --exporter cuda` (the
//! agent-level stress, [`dmaplane::stress::own`] and [`dmaplane::stress::hold`], on a real RDMA
//! device with CUDA memory) and `--backend tcp` (on TCP NICs, with host memory or CUDA memory).
//! What a user runs on a machine with an RDMA NIC and a GPU, or on any host.
//!
//! The *owner* (this process) allocates the memory; on verbs its NIC registers CUDA memory as a
//! dma-buf (`ibv_reg_dmabuf_mr`) or, where the driver or the NIC refuses that, by device VA
//! through a peer-memory client — the negotiation picks and the run reports which; on TCP host
//! memory is registered by address and CUDA memory is staged. The *holder* is a second process
//! (this binary again, `stress revoke-holder`) that meets the owner over the built-in TCP
//! handshake and prints its report as JSON when the owner goes. This file is only that
//! plumbing: the run and its checks are the library's, the same as `stress revoke --layer
//! agent` on the simulated testbed.

use clap::{Args, ValueEnum};

/// The NICs both agents of the run use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Nics {
    Verbs,
    Tcp,
}

impl Nics {
    fn name(self) -> &'static str {
        match self {
            Nics::Verbs => "verbs",
            Nics::Tcp => "tcp",
        }
    }
}

/// What the owner exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    Host,
    Cuda,
}

/// The holder, as the owner starts it (hidden from `--help`).
#[derive(Debug, Args)]
pub struct HolderArgs {
    /// The owner's handshake address.
    #[arg(long)]
    connect: String,
    #[arg(long, value_enum, default_value = "verbs")]
    nics: Nics,
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
    /// TCP: the socket path only.
    #[arg(long)]
    no_shm: bool,
    /// The secret the owner made for this run (both prove it on the handshake).
    #[arg(long)]
    secret_file: Option<std::path::PathBuf>,
}

pub use imp::{holder, run};

mod imp {
    use super::{HolderArgs, Memory, Nics};
    use std::io::{Read, Write};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, anyhow};
    use dmaplane::Agent;
    use dmaplane::stress::{
        HOLDER_STALL, Holder, HolderReport, StressConfig, StressReport, agent_faults, hold, own,
    };

    /// The holder process, as the owner sees it.
    struct ProcessHolder(Child);

    impl ProcessHolder {
        fn output(&mut self) -> String {
            let mut s = String::new();
            if let Some(out) = self.0.stdout.as_mut() {
                let _ = out.read_to_string(&mut s);
            }
            s
        }
    }

    impl Holder for ProcessHolder {
        fn describe(&self) -> String {
            format!("a second process (pid {})", self.0.id())
        }

        /// Its memory map, read by this process (the same user's): no help from the holder.
        fn mappings_of(
            &mut self,
            file: dmaplane_core::fabric::FileId,
        ) -> Option<std::result::Result<usize, String>> {
            let path = format!("/proc/{}/maps", self.0.id());
            Some(
                std::fs::read_to_string(&path)
                    .map(|maps| file.mappings_in(&maps))
                    .map_err(|e| format!("{path}: {e}")),
            )
        }

        fn gone(&mut self) -> Option<std::result::Result<HolderReport, String>> {
            match self.0.try_wait() {
                Ok(Some(st)) => {
                    let out = self.output();
                    Some(
                        serde_json::from_str(out.trim())
                            .map_err(|_| format!("it exited ({st}) with no report: {out:?}")),
                    )
                }
                Ok(None) => None,
                Err(e) => Some(Err(format!("it cannot be waited for: {e}"))),
            }
        }

        fn report(&mut self, limit: Duration) -> HolderReport {
            let failed = |why: String| HolderReport {
                failed: 1,
                failures: vec![why],
                ..HolderReport::default()
            };
            let due = Instant::now() + limit;
            loop {
                match self.0.try_wait() {
                    Ok(Some(st)) => {
                        let out = self.output();
                        return serde_json::from_str(out.trim()).unwrap_or_else(|e| {
                            failed(format!(
                                "the holder ({st}) printed no report ({e}): {out:?}"
                            ))
                        });
                    }
                    Ok(None) if Instant::now() > due => {
                        // A hang is a result, not a crash of the run: killed, and counted failed.
                        let _ = self.0.kill();
                        let _ = self.0.wait();
                        return failed(format!(
                            "the holder did not end within {limit:?} of the owner's exit: it \
                             hung (killed; its counts are unknown)"
                        ));
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    Err(e) => return failed(format!("the holder cannot be waited for: {e}")),
                }
            }
        }
    }

    /// A directory of the owner's only, holding this run's secret; removed with the run.
    struct SecretDir(std::path::PathBuf);

    impl SecretDir {
        fn new() -> Result<(SecretDir, dmaplane::auth::Secret)> {
            use std::os::unix::fs::DirBuilderExt;
            let dir = std::env::temp_dir().join(format!(
                "dmaplane-stress-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos())
            ));
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .with_context(|| format!("a directory for the run's secret: {}", dir.display()))?;
            let d = SecretDir(dir);
            let secret = dmaplane::auth::Secret::create_file(&d.file())?;
            Ok((d, secret))
        }

        fn file(&self) -> std::path::PathBuf {
            self.0.join("secret")
        }
    }

    impl Drop for SecretDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// An agent on `nics` (the device named, on verbs); `shm`: TCP NICs use the shared-memory
    /// path with a peer on this host.
    fn builder(
        name: &str,
        nics: Nics,
        device: Option<&str>,
        shm: bool,
    ) -> Result<dmaplane::AgentBuilder> {
        let b = Agent::builder(name);
        let b = match nics {
            Nics::Tcp => b.tcp().tcp_shm(shm),
            #[cfg(feature = "verbs")]
            Nics::Verbs => b.verbs(),
            #[cfg(not(feature = "verbs"))]
            Nics::Verbs => anyhow::bail!("the verbs backend needs the `verbs` feature"),
        };
        Ok(match device {
            Some(d) => b.nics([d]),
            None => b,
        })
    }

    fn spawn_holder(
        cfg: &StressConfig,
        nics: Nics,
        device: Option<&str>,
        shm: bool,
        addr: &str,
        secret: &std::path::Path,
    ) -> Result<Child> {
        let exe = std::env::current_exe().context("this program's path, to start the holder")?;
        let mut c = Command::new(exe);
        c.args(["stress", "revoke-holder", "--connect", addr])
            .args(["--nics", nics.name()])
            .args(if shm { None } else { Some("--no-shm") })
            .arg("--secret-file")
            .arg(secret)
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

    /// The owner's side: the whole run.
    pub fn run(
        cfg: &StressConfig,
        nics: Nics,
        memory: Memory,
        device: Option<&str>,
        shm: bool,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<StressReport> {
        let views = shm && matches!((nics, memory), (Nics::Tcp, Memory::Host));
        let (owner_fault, _) = agent_faults(cfg.inject, views).map_err(|why| anyhow!(why))?;
        // Two processes of this program: only the holder it starts may connect.
        let (dir, secret) = SecretDir::new()?;
        let owner = builder("stress-owner", nics, device, shm)?
            .inject(owner_fault)
            .secret(secret)
            .stall_timeout(Duration::from_secs(60))
            .build()
            .context("the owner's agent")?;
        let mut holder = ProcessHolder(spawn_holder(
            cfg,
            nics,
            device,
            shm,
            &owner.listen_addr().to_string(),
            &dir.file(),
        )?);
        let alloc = move |a: &Agent, name: &str, len: u64| match memory {
            Memory::Cuda => a.alloc_cuda(name, 0, len),
            Memory::Host => a.alloc_host(name, len),
        };
        let what = match (nics, memory) {
            (Nics::Verbs, Memory::Cuda) => "verbs (agents)",
            (Nics::Verbs, Memory::Host) => "verbs (agents, host memory)",
            (Nics::Tcp, Memory::Host) => "tcp (agents, host memory)",
            (Nics::Tcp, Memory::Cuda) => "tcp (agents, CUDA memory, staged)",
        };
        Ok(own(owner, cfg, what, &alloc, &mut holder, progress)?)
    }

    /// The holder process: WRITE traffic into the owner's newest allocation until the owner
    /// goes, then its report on stdout.
    pub fn holder(a: &HolderArgs) -> Result<()> {
        let (_, fault) =
            agent_faults(a.inject, a.nics == Nics::Tcp && !a.no_shm).map_err(|why| anyhow!(why))?;
        let mut b = builder("stress-holder", a.nics, a.device.as_deref(), !a.no_shm)?
            .inject(fault)
            .stall_timeout(HOLDER_STALL);
        if let Some(f) = &a.secret_file {
            b = b.secret(dmaplane::auth::Secret::from_file(f)?);
        }
        let agent = b.build().context("the holder's agent")?;
        let peer = agent
            .connect_to(&a.connect)
            .context("connecting to the owner")?;
        let r = hold(&agent, &peer, a.slots, a.size, HOLDER_STALL)?;
        println!("{}", serde_json::to_string(&r)?);
        std::io::stdout().flush()?;
        if r.never_ended > 0 {
            // The owner judges the report; a holder whose agent is stuck must still end.
            std::process::exit(0);
        }
        Ok(())
    }
}
