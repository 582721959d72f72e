//! The NICs an agent uses: each one's device, protection domain and completion queue, opened
//! once and shared by every queue pair the agent makes on it, and the counts the progress
//! engine keeps its completion queue from overflowing with.

use std::sync::atomic::{AtomicU32, Ordering};

use dmaplane_core::counter::Counter;
use dmaplane_core::fabric::DeviceId;
use dmaplane_rdma::{Completion, Cq, Device, Fault, Mtu, Pd};

use crate::error::{Error, Result};
use crate::testbed::Testbed;

/// Completion queue depth of each NIC; the engine never has more requests outstanding on one.
pub(crate) const CQ_DEPTH: u32 = 1 << 16;
/// The same on a real device (within every provider's `max_cqe`, rxe's 32767 included).
const CQ_DEPTH_VERBS: u32 = 1 << 14;

/// Open the RDMA devices named (or all of them): (name, None, NUMA node, active MTU, device).
#[cfg(feature = "verbs")]
pub(crate) fn open_verbs(agent: &str, want: Option<&[String]>) -> Result<Vec<OpenedNic>> {
    use dmaplane_rdma::verbs::{VerbsDevice, list_devices};
    let names = match want {
        Some(w) => w.to_vec(),
        None => list_devices()?,
    };
    if names.is_empty() {
        return Err(Error::setup(agent, "no RDMA device: libibverbs lists none"));
    }
    names
        .into_iter()
        .map(|n| {
            let v = VerbsDevice::open(Some(&n))?;
            let mtu = v.active_mtu();
            let numa =
                std::fs::read_to_string(format!("/sys/class/infiniband/{n}/device/numa_node"))
                    .ok()
                    .and_then(|s| s.trim().parse::<i64>().ok())
                    .and_then(|x| u32::try_from(x).ok())
                    .unwrap_or(0);
            Ok(OpenedNic {
                name: n,
                id: None,
                numa,
                mtu,
                dev: Device::new(v),
                tcp: None,
            })
        })
        .collect()
}

#[cfg(not(feature = "verbs"))]
pub(crate) fn open_verbs(agent: &str, _want: Option<&[String]>) -> Result<Vec<OpenedNic>> {
    Err(Error::setup(
        agent,
        "the verbs backend needs the `verbs` feature",
    ))
}

/// Open TCP NICs (`tcp0`, or the names given) for `agent`, listening for data connections on
/// the IP address of `listen` (the handshake listener's), port chosen by the system, and known
/// to peers by the address of `advertise` where `listen` is a wildcard; `shm`: peers on this
/// host use the shared-memory path.
pub(crate) fn open_tcp(
    agent: &str,
    want: Option<&[String]>,
    listen: &str,
    advertise: Option<&str>,
    shm: bool,
) -> Result<Vec<OpenedNic>> {
    use std::net::{SocketAddr, ToSocketAddrs};
    let resolve = |field: &'static str, a: &str| -> Result<SocketAddr> {
        a.to_socket_addrs()
            .map_err(|e| Error::invalid(format!("agent {agent}"), field, a, e.to_string()))?
            .next()
            .ok_or_else(|| {
                Error::invalid(format!("agent {agent}"), field, a, "resolves to no address")
            })
    };
    let bind = resolve("listen", listen)?;
    let shown = advertise.map(|a| resolve("advertise", a)).transpose()?;
    if bind.ip().is_unspecified() && shown.is_none() {
        return Err(Error::invalid(
            format!("agent {agent}"),
            "listen",
            listen,
            "a wildcard address is no address a peer can dial: also set advertise (the \
             host:port peers should connect to)",
        ));
    }
    let names = want.map_or_else(|| vec!["tcp0".to_string()], <[String]>::to_vec);
    if names.is_empty() {
        return Err(Error::invalid(
            format!("agent {agent}"),
            "nics",
            "[]",
            "at least one NIC",
        ));
    }
    names
        .into_iter()
        .map(|n| {
            let nic = dmaplane_rdma::TcpNic::bind(
                &n,
                SocketAddr::new(bind.ip(), 0),
                shown.map(|a| a.ip()),
            )?;
            nic.set_shm(shm);
            let nic = std::sync::Arc::new(nic);
            Ok(OpenedNic {
                name: n,
                id: None,
                numa: 0,
                mtu: Mtu::Mtu4096,
                dev: Device::new(nic.clone()),
                tcp: Some(nic),
            })
        })
        .collect()
}

/// A device found for the agent, before it is opened: (name, its fabric device on the sim,
/// NUMA node, active path MTU, the device).
#[derive(Debug)]
pub(crate) struct OpenedNic {
    pub(crate) name: String,
    pub(crate) id: Option<DeviceId>,
    pub(crate) numa: u32,
    pub(crate) mtu: Mtu,
    pub(crate) dev: Device,
    /// The TCP NIC behind `dev` (its counters), on the TCP backend.
    pub(crate) tcp: Option<std::sync::Arc<dmaplane_rdma::TcpNic>>,
}

/// Claim the testbed's NICs named (or every one no other agent uses) for `agent`.
pub(crate) fn claim_sim(
    testbed: &Testbed,
    agent: &str,
    want: Option<&[String]>,
) -> Result<Vec<OpenedNic>> {
    let sims = testbed.claim(agent, want)?;
    Ok(sims
        .into_iter()
        .map(|sim| {
            let name = sim.name().to_string();
            let id = sim.device_id();
            let numa = testbed.topology().numa_of(&name).unwrap_or(0);
            OpenedNic {
                name,
                id: Some(id),
                numa,
                mtu: Mtu::Mtu4096,
                dev: Device::new(sim),
                tcp: None,
            }
        })
        .collect())
}

/// One NIC the agent uses.
#[derive(Debug)]
pub(crate) struct Nic {
    name: String,
    /// Its device on the simulated fabric (`None` on verbs).
    id: Option<DeviceId>,
    numa: u32,
    /// The port's active path MTU (queue pairs use the smaller of both ends').
    mtu: Mtu,
    dev: Device,
    tcp: Option<std::sync::Arc<dmaplane_rdma::TcpNic>>,
    pd: Pd,
    cq: Cq,
    /// Entries of its CQ: the engine never has more requests outstanding on it.
    cq_depth: u32,
    /// Requests outstanding on its CQ (bounded by `cq_depth`).
    outstanding: AtomicU32,
    /// Requests posted on it so far.
    posted: Counter,
}

impl Nic {
    pub(crate) fn name(&self) -> &str {
        &self.name
    }
    /// Its device on the simulated fabric (`None` on verbs).
    pub(crate) fn id(&self) -> Option<DeviceId> {
        self.id
    }
    pub(crate) fn numa(&self) -> u32 {
        self.numa
    }
    /// The port's active path MTU.
    pub(crate) fn mtu(&self) -> Mtu {
        self.mtu
    }
    pub(crate) fn dev(&self) -> &Device {
        &self.dev
    }
    /// What its TCP NIC counted (`None` on other backends).
    pub(crate) fn tcp_stats(&self) -> Option<dmaplane_rdma::TcpStats> {
        self.tcp.as_ref().map(|t| t.stats())
    }
    pub(crate) fn pd(&self) -> &Pd {
        &self.pd
    }
    pub(crate) fn cq(&self) -> &Cq {
        &self.cq
    }
    /// Requests posted on it so far.
    pub(crate) fn posted(&self) -> u64 {
        self.posted.get()
    }

    /// Reap up to `max` completions of its CQ into `wcs`.
    #[inline]
    pub(crate) fn poll(&self, wcs: &mut Vec<Completion>, max: usize) -> Result<usize> {
        Ok(self.cq.poll(wcs, max)?)
    }

    /// Whether `queued` more requests fit its completion queue now.
    #[inline]
    pub(crate) fn has_room(&self, queued: u32) -> bool {
        self.outstanding.load(Ordering::Relaxed) + queued < self.cq_depth
    }

    /// `n` requests were posted on it.
    #[inline]
    pub(crate) fn note_posted(&self, n: u32) {
        self.posted.add(u64::from(n));
        self.outstanding.fetch_add(n, Ordering::Relaxed);
    }

    /// One of its requests completed.
    #[inline]
    pub(crate) fn note_completed(&self) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The agent's NICs, in the order it was given them.
#[derive(Debug)]
pub(crate) struct Nics {
    list: Vec<Nic>,
}

impl Nics {
    /// Open every device found: its protection domain and completion queue, with `fault`
    /// injected on it.
    pub(crate) fn open(opened: Vec<OpenedNic>, fault: Option<Fault>) -> Result<Nics> {
        let mut list = Vec::with_capacity(opened.len());
        for o in opened {
            o.dev.inject(fault);
            if let Some(t) = &o.tcp {
                t.inject_keep_views(fault == Some(Fault::KeepViews));
            }
            let pd = o.dev.alloc_pd()?;
            // rxe caps CQs at 32767 entries; a NIC's real limit is higher, the engine
            // bounds what it keeps outstanding by what it got.
            let cq_depth = if o.id.is_some() {
                CQ_DEPTH
            } else {
                CQ_DEPTH_VERBS
            };
            let cq = o.dev.create_cq(cq_depth)?;
            list.push(Nic {
                name: o.name,
                id: o.id,
                numa: o.numa,
                mtu: o.mtu,
                dev: o.dev,
                tcp: o.tcp,
                pd,
                cq,
                cq_depth,
                outstanding: AtomicU32::new(0),
                posted: Counter::default(),
            });
        }
        Ok(Nics { list })
    }

    pub(crate) fn iter(&self) -> std::slice::Iter<'_, Nic> {
        self.list.iter()
    }

    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// The position of the NIC called `name`.
    pub(crate) fn index_of(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|n| n.name == name)
    }

    /// Lease holders the NICs cut off so far (they never acknowledged a revoke).
    pub(crate) fn holders_cut_off(&self) -> u64 {
        self.list
            .iter()
            .map(|n| n.dev.stats().holders_cut_off)
            .sum()
    }

    /// Lease messages from peers the NICs refused (a grant past [`crate::Limits::regions`], a
    /// revoke of another link's lease, ...).
    pub(crate) fn lease_messages_refused(&self) -> u64 {
        self.list
            .iter()
            .map(|n| n.dev.stats().lease_messages_refused)
            .sum()
    }
}

impl std::ops::Index<usize> for Nics {
    type Output = Nic;
    fn index(&self, i: usize) -> &Nic {
        &self.list[i]
    }
}

impl<'a> IntoIterator for &'a Nics {
    type Item = &'a Nic;
    type IntoIter = std::slice::Iter<'a, Nic>;
    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}
