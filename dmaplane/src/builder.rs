//! [`AgentBuilder`]: an agent's devices, tunables and listening address, checked, then the
//! agent started.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use dmaplane_rdma::oob::OobListener;

use crate::agent::Agent;
use crate::auth::Secret;
use crate::cache::Cache;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::event::Events;
use crate::inner::{AgentInner, Injected};
use crate::limits::Limits;
use crate::nics::Nics;
use crate::notify::Inbox;
use crate::peers::Peers;
use crate::platform::{Backend, Platform};
use crate::progress::ProgressEngine;
use crate::registry::Registry;
use crate::testbed::Testbed;

impl Agent {
    /// Start building an agent called `name` (how peers name it).
    ///
    /// Agents on one testbed share no NIC, so each names its own:
    ///
    /// ```
    /// use dmaplane::{Agent, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let testbed = Testbed::builtin()?;
    /// let a = Agent::builder("a").testbed(testbed.clone()).nics(["nic0"]).build()?;
    /// let b = Agent::builder("b")
    ///     .testbed(testbed)
    ///     .nics(["nic1"])
    ///     .chunk(256 << 10)
    ///     .qps_per_path(4)
    ///     .build()?;
    /// assert_eq!(a.name(), "a");
    /// assert_eq!(a.nics(), ["nic0"]);
    /// assert_eq!(b.nics(), ["nic1"]);
    /// # Ok(()) }
    /// ```
    pub fn builder(name: impl Into<String>) -> AgentBuilder {
        AgentBuilder {
            name: name.into(),
            testbed: None,
            nics_from: NicsFrom::Testbed,
            nics: None,
            cfg: Config::default(),
            injected: Injected::default(),
            tcp_shm: true,
        }
    }
}

/// Where an agent's NICs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NicsFrom {
    Testbed,
    Verbs,
    Tcp,
}

/// Builds an [`Agent`]: `Agent::builder("name")...build()`.
#[derive(Debug, Clone)]
pub struct AgentBuilder {
    name: String,
    testbed: Option<Arc<Testbed>>,
    nics_from: NicsFrom,
    nics: Option<Vec<String>>,
    cfg: Config,
    injected: Injected,
    /// TCP NICs: offer and use the shared-memory path to peers on this host.
    tcp_shm: bool,
}

impl AgentBuilder {
    /// Run on this simulated testbed (default: the process's shared built-in one).
    pub fn testbed(mut self, t: Arc<Testbed>) -> Self {
        self.testbed = Some(t);
        self
    }

    /// Run on real RDMA devices through libibverbs (Soft-RoCE or a NIC) instead of the
    /// simulated testbed; host memory is then udmabuf memory, registered through dma-buf
    /// negotiation (the dma-buf MR where the provider has them, else the buffer's mapping).
    /// Needs feature `verbs`.
    #[cfg(feature = "verbs")]
    pub fn verbs(mut self) -> Self {
        self.nics_from = NicsFrom::Verbs;
        self
    }

    /// Run on software RC NICs whose wire is TCP ([`dmaplane_rdma::tcp`]): for hosts, containers
    /// and laptops without RDMA. Each NIC (default one, `tcp0`; [`AgentBuilder::nics`] names
    /// more) listens for its peers' data connections on the handshake listener's address, port
    /// chosen by the system (the advertised address where the listener binds a wildcard). Host
    /// memory is this process's memory, registered by address; every guarantee of the revoke
    /// holds as on verbs.
    pub fn tcp(mut self) -> Self {
        self.nics_from = NicsFrom::Tcp;
        self
    }

    /// On TCP NICs, whether peers on this host move bytes through shared memory (default on):
    /// the owner hands a proven peer of the same user its memfd over a Unix socket, and WRITEs
    /// and READs are one copy between the two processes' memory, revoked as on the socket path
    /// ([`dmaplane_rdma::tcp`]). Off, every byte takes the socket.
    pub fn tcp_shm(mut self, on: bool) -> Self {
        self.tcp_shm = on;
        self
    }

    /// Use these NICs (default: every NIC of the testbed no other agent uses; on verbs every
    /// RDMA device libibverbs lists).
    pub fn nics<S: AsRef<str>>(mut self, nics: impl IntoIterator<Item = S>) -> Self {
        self.nics = Some(nics.into_iter().map(|s| s.as_ref().to_string()).collect());
        self
    }

    /// Split requests into chunks of at most `bytes` bytes (default 1 MiB; 1 byte to
    /// 4 GiB - 1, checked by [`AgentBuilder::build`]).
    pub fn chunk(mut self, bytes: u64) -> Self {
        self.cfg.chunk = bytes;
        self
    }

    /// Connect `n` queue pairs per (local NIC, peer NIC) path (default 2; 1 to 64).
    pub fn qps_per_path(mut self, n: usize) -> Self {
        self.cfg.qps_per_path = n;
        self
    }

    /// Give each queue pair a send queue of `n` requests (default 128; 1 to 4096).
    pub fn depth(mut self, n: u32) -> Self {
        self.cfg.depth = n;
        self
    }

    /// End a transfer with [`Error::Stalled`] once it sees no completion for `t` (default
    /// 10 s; must be positive).
    pub fn stall_timeout(mut self, t: Duration) -> Self {
        self.cfg.stall_timeout = t;
        self
    }

    /// Let each connection setup step wait `t` for the peer (default 30 s).
    pub fn setup_timeout(mut self, t: Duration) -> Self {
        self.cfg.setup_timeout = t;
        self
    }

    /// Bind the handshake listener here (default `127.0.0.1:0`; another host's peers need an
    /// address they can reach, e.g. `0.0.0.0:7400` with [`AgentBuilder::advertise`]).
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.cfg.listen = addr.into();
        self
    }

    /// Tell peers this handshake address in the metadata (`10.0.0.5:7400`, or a host alone,
    /// which gets the bound port) instead of the bound one: needed when the listener binds a
    /// wildcard address.
    pub fn advertise(mut self, addr: impl Into<String>) -> Self {
        self.cfg.advertise = Some(addr.into());
        self
    }

    /// Break the protocol on purpose on every device of the agent (see
    /// [`dmaplane_rdma::Fault`]; [`Fault::EarlyFence`](dmaplane_rdma::Fault::EarlyFence) breaks
    /// the drive's importers too): for stress runs that must show their checks fail. Never in
    /// production. With [`Fault::AckThenWrite`](dmaplane_rdma::Fault::AckThenWrite) the agent
    /// also ignores its peers' gone notices, so it keeps writing a registration it acked (the
    /// owner's notice would otherwise stop it before its NIC could show the fault).
    pub fn inject(mut self, fault: Option<dmaplane_rdma::Fault>) -> Self {
        self.injected.fault = fault;
        self
    }

    /// Break the notification ordering on purpose: send a transfer's notification when it is
    /// posted, not once its data moved — so a test can show that its ordering check fails.
    /// Never in production.
    #[doc(hidden)]
    pub fn inject_early_notify(mut self, on: bool) -> Self {
        self.injected.early_notify = on;
        self
    }

    /// Stage every GPU registration through host memory, even where a NIC reaches the GPU
    /// peer to peer ([`Config::force_staging`]).
    pub fn force_staging(mut self, on: bool) -> Self {
        self.cfg.force_staging = on;
        self
    }

    /// Read and write file regions through this NVMe drive of the testbed (default: its
    /// first).
    pub fn drive(mut self, name: impl Into<String>) -> Self {
        self.cfg.drive = Some(name.into());
        self
    }

    /// Let the simulated drive move at most `bytes_per_sec` (0: as fast as the host copies; by
    /// default a PCIe 4.0 x4 drive's [`dmaplane_storage::sim::RATE`]).
    pub fn drive_rate(mut self, bytes_per_sec: u64) -> Self {
        self.cfg.drive_rate = Some(bytes_per_sec);
        self
    }

    /// Read and write file regions through this host's kernel — one io_uring on the drive's
    /// thread, `O_DIRECT`, host memory registered as fixed buffers by its process address, GPU
    /// memory through a host bounce buffer and the copy engine — instead of the testbed's
    /// simulated drive. The verbs backend always does.
    pub fn io_uring(mut self, on: bool) -> Self {
        self.cfg.io_uring = on;
        self
    }

    /// Accept only peers that prove they hold `secret`, and prove it to them
    /// ([`crate::auth`]). Without one the agent listens on loopback only.
    pub fn secret(mut self, secret: Secret) -> Self {
        self.cfg.secret = Some(secret);
        self
    }

    /// Allow listening on a routable address without a secret: anyone who reaches it may
    /// connect, under any name (default: refused at [`AgentBuilder::build`]).
    pub fn insecure(mut self, on: bool) -> Self {
        self.cfg.insecure = on;
        self
    }

    /// Bound what peers may make the agent hold: connections, paths, registrations,
    /// notifications, staging, timeouts ([`crate::limits`]; checked at
    /// [`AgentBuilder::build`], naming the field out of range).
    ///
    /// ```
    /// use dmaplane::{Agent, Limits, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let testbed = Testbed::builtin()?;
    /// let a = Agent::builder("a")
    ///     .testbed(testbed.clone())
    ///     .nics(["nic0"])
    ///     .limits(Limits { peers: 8, notifications: 64, ..Limits::default() })
    ///     .build()?;
    /// assert_eq!(a.config().limits.peers, 8);
    /// let zero = Limits { regions: 0, ..Limits::default() };
    /// let e = Agent::builder("b").testbed(testbed).nics(["nic1"]).limits(zero).build();
    /// assert!(e.unwrap_err().to_string().contains("limits.regions"));
    /// # Ok(()) }
    /// ```
    pub fn limits(mut self, limits: Limits) -> Self {
        self.cfg.limits = limits;
        self
    }

    /// Check the settings, claim the NICs, open a protection domain and a completion queue
    /// on each, bind the handshake listener and start the agent's threads.
    ///
    /// Fails with [`Error::Invalid`] for a name that is empty, longer than 255 bytes or has
    /// control characters, a routable listening address without a secret (unless
    /// [`AgentBuilder::insecure`]), a
    /// tunable out of range, or a NIC that the testbed lacks or another agent holds, and with
    /// [`Error::Setup`] when every NIC is taken. On failure the NICs claimed are released.
    pub fn build(self) -> Result<Agent> {
        let name = self.name;
        crate::metadata::check_name("agent", "name", &name)?;
        let c = &self.cfg;
        if c.chunk == 0 || c.chunk > u64::from(u32::MAX) {
            return Err(Error::invalid(
                format!("agent {name}"),
                "chunk",
                c.chunk,
                "1 byte to 4 GiB - 1",
            ));
        }
        if c.qps_per_path == 0 || c.qps_per_path > 64 {
            return Err(Error::invalid(
                format!("agent {name}"),
                "qps_per_path",
                c.qps_per_path,
                "1 to 64",
            ));
        }
        if c.depth == 0 || c.depth > 4096 {
            return Err(Error::invalid(
                format!("agent {name}"),
                "depth",
                c.depth,
                "1 to 4096",
            ));
        }
        c.limits.check(&format!("agent {name}"))?;
        if c.stall_timeout.is_zero() {
            return Err(Error::invalid(
                format!("agent {name}"),
                "stall_timeout",
                "0",
                "must be positive",
            ));
        }
        let (backend, opened) = if self.nics_from == NicsFrom::Verbs {
            (
                Backend::Verbs,
                crate::nics::open_verbs(&name, self.nics.as_deref())?,
            )
        } else if self.nics_from == NicsFrom::Tcp {
            (
                Backend::Tcp,
                crate::nics::open_tcp(
                    &name,
                    self.nics.as_deref(),
                    &c.listen,
                    c.advertise.as_deref(),
                    self.tcp_shm,
                )?,
            )
        } else {
            let testbed = match self.testbed {
                Some(t) => t,
                None => Testbed::shared()?,
            };
            let v = crate::nics::claim_sim(&testbed, &name, self.nics.as_deref())?;
            (Backend::Sim(testbed), v)
        };
        let claimed: Vec<String> = opened.iter().map(|o| o.name.clone()).collect();
        let release = |b: &Backend| {
            if let Backend::Sim(t) = b {
                t.release(&claimed);
            }
        };
        let built = (|| -> Result<Agent> {
            let nics = Nics::open(opened, self.injected.fault)?;
            // A peer grants a lease per registration and path: no more than it may announce.
            for n in nics.iter() {
                n.dev().limit_leases(c.limits.regions);
            }
            let listener = OobListener::bind(c.listen.as_str())?;
            let addr = listener.local_addr();
            if addr.ip().is_unspecified() && c.advertise.is_none() {
                return Err(Error::invalid(
                    format!("agent {name}"),
                    "listen",
                    addr,
                    "a wildcard address is no address a peer can dial: also set advertise \
                     (the host:port peers should connect to)",
                ));
            }
            match (&c.secret, addr.ip().is_loopback()) {
                (Some(_), _) => {
                    tracing::info!(agent = %name, %addr, "listening; peers must prove the secret")
                }
                (None, true) => {
                    tracing::info!(agent = %name, %addr, "no secret: listening on loopback only")
                }
                (None, false) if c.insecure => {
                    tracing::warn!(agent = %name, %addr, "no secret, listening on a routable address (insecure): anyone who reaches it may connect as any name")
                }
                (None, false) => {
                    return Err(Error::invalid(
                        format!("agent {name}"),
                        "listen",
                        addr,
                        "a routable address without a secret lets anyone who reaches it \
                         connect as any name: set a secret (AgentBuilder::secret), listen on \
                         loopback, or allow it explicitly (AgentBuilder::insecure)",
                    ));
                }
            }
            let nics = Arc::new(nics);
            let engine = Arc::new(ProgressEngine::new(
                &name,
                nics.clone(),
                c.depth,
                c.stall_timeout,
            ));
            let shared = Arc::new_cyclic(|me| AgentInner {
                me: me.clone(),
                injected: self.injected,
                staging: crate::limits::Budget::new(c.limits.staging_bytes),
                name: name.clone(),
                platform: Platform::new(backend.clone(), self.injected.fault),
                nics,
                cfg: self.cfg.clone(),
                cache: Cache::default(),
                registry: Registry::default(),
                peers: Peers::new(c.limits.handshakes),
                engine: engine.clone(),
                inbox: Arc::new(Inbox::new(c.limits.notifications)),
                events: Events::new(&name),
                addr,
                stop: AtomicBool::new(false),
                files: crate::files::Files::new(crate::drive::DriveOptions {
                    agent: name.clone(),
                    device: self.cfg.drive.clone(),
                    io_uring: self.cfg.io_uring,
                    rate: self.cfg.drive_rate,
                    chunk: self.cfg.chunk,
                    force_bounce: self.cfg.force_staging,
                }),
                next_memory: AtomicU64::new(1),
            });
            let accept = crate::handshake::spawn_listener(&shared, listener)?;
            let progress = crate::progress::spawn(&engine)?;
            Ok(Agent::new(shared, vec![accept, progress], claimed.clone()))
        })();
        if built.is_err() {
            release(&backend);
        }
        built
    }
}
