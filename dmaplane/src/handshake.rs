//! The built-in handshake: two agents meet over TCP (the listener every agent runs,
//! [`crate::Agent::listen_addr`]) with no other service, as Mooncake's P2P handshake does.
//!
//! The connecting side sends `hello` (its metadata); the listener answers `welcome` (its own) or
//! `refuse`. Both then take the same paths — every (connecting NIC, listening NIC) pair, in
//! order — and for each path connect `qps_per_path` RC queue pairs, swapping endpoints on the
//! same connection. The connecting side then opens one more TCP connection per path, announced
//! by `link`, which becomes that path's lease link: each side grants the peer leases on its
//! registrations there, and revokes them there. The first connection stays open as the control
//! channel ([`crate::peer`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dmaplane_rdma::oob::{Oob, OobListener};
use dmaplane_rdma::{LeaseLink, Mtu, Qp, QpCaps, RdmaError};

use crate::auth::{PROOF, Session};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::inner::AgentInner;
use crate::known::Known;
use crate::limits::Refusal;
use crate::metadata::{Metadata, NicInfo, VERSION};
use crate::peer::{Lane, POLL, Path, Peer, PeerHost, PeerShared};
use crate::wire::Wire;

/// One handshake's time: each step waits at most [`Config::setup_timeout`], and all of them
/// together at most [`crate::Limits::handshake_time`] — a peer that answers every step just in
/// time still cannot hold a handshake (a thread and a slot) longer.
#[derive(Debug, Clone, Copy)]
struct Clock {
    end: Instant,
    step: Duration,
    total: Duration,
}

impl Clock {
    fn start(cfg: &Config) -> Clock {
        let total = cfg.limits.handshake_time;
        Clock {
            end: Instant::now() + total,
            step: cfg.setup_timeout,
            total,
        }
    }

    /// How long the next step may wait; an error naming the limit once the time is up.
    fn step(&self, peer: &str) -> Result<Duration> {
        let left = self.end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.late(peer));
        }
        Ok(left.min(self.step))
    }

    fn late(&self, peer: &str) -> Error {
        handshake_err(
            peer,
            format!(
                "the handshake took longer than limits.handshake_time ({} ms)",
                self.total.as_millis()
            ),
        )
    }

    /// The peer's next message, within the step's time; a wait cut by the handshake's end
    /// names the limit.
    fn recv(&self, oob: &Oob, peer: &str) -> Result<Wire> {
        match oob.recv::<Wire>(self.step(peer)?) {
            Err(RdmaError::Timeout { .. }) if self.expired() => Err(self.late(peer)),
            r => Ok(r?),
        }
    }

    fn expired(&self) -> bool {
        Instant::now() >= self.end
    }
}

/// What a refusal that comes from a receive was for: a message over the length bound, a
/// handshake out of time, or something else the peer got wrong.
fn refusal_of(e: &Error, clock: &Clock) -> Refusal {
    match e {
        Error::Rdma(RdmaError::MessageTooLong { .. }) => Refusal::MessageBytes,
        _ if clock.expired() => Refusal::HandshakeTime,
        _ => Refusal::Check,
    }
}

/// Accept peers until the agent stops.
pub(crate) fn spawn_listener(
    shared: &Arc<AgentInner>,
    listener: OobListener,
) -> Result<JoinHandle<()>> {
    let s = shared.clone();
    std::thread::Builder::new()
        .name(format!("dmaplane-accept {}", shared.name))
        .spawn(move || {
            while !s.stop.load(Ordering::Acquire) {
                match listener.accept(POLL) {
                    Ok(oob) => {
                        let Some(admission) = s.peers.admit() else {
                            tracing::warn!(agent = %s.name, peer = %oob.peer_addr(), limit = s.cfg.limits.handshakes, "connection refused: as many handshakes under way as limits.handshakes allows");
                            continue;
                        };
                        let s2 = s.clone();
                        // The admission goes with the thread (or with the closure, when no
                        // thread starts): its slot is given back however the handshake ends.
                        let spawned = std::thread::Builder::new()
                            .name("dmaplane-handshake".into())
                            .spawn(move || {
                                let _admission = admission;
                                first_message(&s2, oob);
                            });
                        if let Err(e) = spawned {
                            tracing::error!(agent = %s.name, error = %e, "no thread for a handshake");
                        }
                    }
                    Err(RdmaError::Timeout { .. }) => {}
                    Err(e) => {
                        tracing::warn!(agent = %s.name, error = %e, "accept");
                        std::thread::sleep(POLL);
                    }
                }
            }
        })
        .map_err(|e| Error::setup(&shared.name, format!("no listener thread: {e}")))
}

/// What a new connection is: a peer's hello, or a lease link for a handshake under way.
fn first_message(s: &Arc<AgentInner>, oob: Oob) {
    let peer = oob.peer_addr();
    let clock = Clock::start(&s.cfg);
    oob.set_max_message(s.cfg.limits.message_bytes);
    match clock.recv(&oob, &peer.to_string()) {
        Ok(Wire::Hello {
            version,
            metadata,
            qps,
            nonce,
            challenge,
        }) => {
            let hello = Hello {
                version,
                theirs: metadata,
                qps,
                nonce,
                challenge,
            };
            if let Err(e) = accept(s, oob, hello, clock) {
                tracing::warn!(agent = %s.name, %peer, error = %e, "handshake refused or failed");
            }
        }
        Ok(Wire::Link { nonce, path, proof }) => {
            // Only for a handshake under way, for a path it has, and with a secret only with
            // the proof for that path.
            if let Err(why) = s
                .peers
                .park_link(nonce, path, proof.as_ref().map(|p| &p[..]), oob)
            {
                tracing::warn!(agent = %s.name, %peer, nonce, path, why, "lease link refused");
            }
        }
        Ok(other) => {
            s.peers.count_refusal(Refusal::Check);
            tracing::warn!(agent = %s.name, %peer, kind = other.kind(), "unexpected first message");
        }
        Err(e) => {
            // A connection that closed or said nothing in time holds nothing any more; one
            // that sent more than a message may take is refused, naming the limit.
            match refusal_of(&e, &clock) {
                Refusal::Check => {
                    tracing::debug!(agent = %s.name, %peer, error = %e, "connection without a hello");
                }
                kind => {
                    s.peers.count_refusal(kind);
                    tracing::warn!(agent = %s.name, %peer, error = %e, "connection refused before its hello");
                }
            }
        }
    }
}

/// Both sides take every (connecting NIC, listening NIC) pair, in this order: at most `limit`
/// ([`crate::Limits::paths`]) of them, or the reason why not.
fn paths(
    connecting: &[NicInfo],
    listening: &[NicInfo],
    limit: usize,
) -> std::result::Result<Vec<(String, String)>, String> {
    let n = connecting.len() * listening.len();
    if n > limit {
        return Err(format!(
            "{n} paths ({} NICs of the connecting side times {} of the listening side), more \
             than limits.paths ({limit})",
            connecting.len(),
            listening.len(),
        ));
    }
    let mut v = Vec::new();
    for a in connecting {
        for b in listening {
            v.push((a.name.clone(), b.name.clone()));
        }
    }
    Ok(v)
}

fn handshake_err(peer: &str, why: impl Into<String>) -> Error {
    Error::Handshake {
        peer: peer.to_string(),
        why: why.into(),
    }
}

/// A connector's hello, as the listener got it.
struct Hello {
    version: u16,
    theirs: Metadata,
    qps: usize,
    nonce: u64,
    challenge: Option<[u8; PROOF]>,
}

/// The listening side of a handshake.
fn accept(s: &Arc<AgentInner>, oob: Oob, hello: Hello, clock: Clock) -> Result<()> {
    let Hello {
        version,
        theirs,
        qps,
        nonce,
        challenge,
    } = hello;
    // What the peer says is checked before any of it is used (its name ends up in thread
    // names and logs).
    let checked = theirs.check();
    let peer = match &checked {
        Ok(()) => theirs.agent.clone(),
        Err(_) => format!("{:?}", theirs.agent.chars().take(64).collect::<String>()),
    };
    let limits = &s.cfg.limits;
    let refuse = |kind: Refusal, why: String| -> Result<()> {
        s.peers.count_refusal(kind);
        let _ = oob.send(&Wire::Refuse { why: why.clone() });
        Err(handshake_err(&peer, why))
    };
    if let Err(e) = checked {
        return refuse(Refusal::Check, format!("its hello: {e}"));
    }
    if version != VERSION {
        return refuse(
            Refusal::Check,
            format!("version {version}; this agent speaks version {VERSION}"),
        );
    }
    if theirs.backend != s.platform.kind() {
        return refuse(
            Refusal::Check,
            format!(
                "its NICs are {} NICs and this agent's are {}: they cannot reach each other",
                theirs.backend,
                s.platform.kind()
            ),
        );
    }
    if qps == 0 || qps > limits.qps_per_path {
        return refuse(
            Refusal::QpsPerPath,
            format!(
                "{qps} queue pairs per path asked; 1 to {} accepted (limits.qps_per_path)",
                limits.qps_per_path
            ),
        );
    }
    // With a secret, the connector proves it before it learns anything of this agent (its
    // metadata lists every registration).
    let auth = match (&s.cfg.secret, challenge) {
        (None, _) => None,
        (Some(_), None) => {
            return refuse(
                Refusal::Auth,
                "this agent accepts only peers that prove its secret, and the hello \
                 carries no challenge (the peer has no secret)"
                    .into(),
            );
        }
        (Some(secret), Some(c)) => {
            let session = Session {
                c,
                l: crate::auth::challenge()?,
                nonce,
            };
            oob.send(&Wire::Challenge {
                challenge: session.l,
                proof: session.proof(secret, "listener", &theirs),
            })?;
            match clock.recv(&oob, &peer) {
                Ok(Wire::Proof { proof })
                    if session.check(secret, "connector", &theirs, &proof) => {}
                Ok(Wire::Proof { .. }) => {
                    return refuse(
                        Refusal::Auth,
                        format!(
                            "the proof from {peer} does not match: it does not hold this \
                             agent's secret, or it is not the {peer} with the NICs it declared"
                        ),
                    );
                }
                Ok(other) => {
                    return refuse(
                        Refusal::Auth,
                        format!("expected a proof, got {}", other.kind()),
                    );
                }
                Err(e) => return refuse(refusal_of(&e, &clock), format!("no proof: {e}")),
            }
            Some((session, secret.clone()))
        }
    };
    if s.peers.connected(&peer) {
        return refuse(
            Refusal::Check,
            format!("an agent called {peer} is connected already"),
        );
    }
    if s.peers.len() >= limits.peers {
        return refuse(
            Refusal::Peers,
            format!(
                "this agent has as many peers as limits.peers allows ({})",
                limits.peers
            ),
        );
    }
    let known = match Known::from_metadata(&theirs.regions, limits) {
        Ok(k) => k,
        Err((kind, why)) => return refuse(kind, format!("its metadata: {why}")),
    };
    // Checked before the welcome is made: it makes staging buffers for this connection.
    let pairs = match paths(&theirs.nics, &s.nic_infos(), limits.paths) {
        Ok(p) => p,
        Err(why) => return refuse(Refusal::Paths, why),
    };
    let mine = s.metadata_for(Some((&peer, nonce)));
    let welcomed = oob.send(&Wire::Welcome {
        metadata: mine.clone(),
        proof: auth
            .as_ref()
            .map(|(session, secret)| session.proof(secret, "welcome", &mine)),
    });
    let r = match welcomed {
        Ok(()) => {
            s.peers.begin(nonce, pairs.len(), auth);
            let r = accept_paths(s, &oob, &peer, &pairs, qps, nonce, &theirs, clock);
            s.peers.end(nonce);
            r
        }
        Err(e) => Err(e.into()),
    };
    match r {
        Ok(built) => {
            finish(s, oob, (theirs, nonce), known, built, &mine);
            Ok(())
        }
        Err(e) => {
            if clock.expired() {
                s.peers.count_refusal(Refusal::HandshakeTime);
            }
            // The staging buffers its welcome made for this connection go: a peer that
            // fails its handshakes must not fill limits.staging_bytes.
            for entry in s.registry.live() {
                entry.drop_peer_stage((&peer, nonce));
            }
            Err(e)
        }
    }
}

/// The listening side's paths: queue pairs, then the lease link the other side opens.
#[allow(clippy::too_many_arguments)]
fn accept_paths(
    s: &Arc<AgentInner>,
    oob: &Oob,
    peer: &str,
    pairs: &[(String, String)],
    qps: usize,
    nonce: u64,
    theirs: &Metadata,
    clock: Clock,
) -> Result<Vec<Path>> {
    let mut built = Vec::with_capacity(pairs.len());
    for (i, (their_nic, my_nic)) in pairs.iter().enumerate() {
        let local = nic_index(s, my_nic, peer)?;
        let mtu = path_mtu(s, local, theirs, their_nic);
        let lanes = lanes(s, local, qps, mtu, oob, clock.step(peer)?)?;
        // The connecting side opens this path's lease link next.
        let t = clock.step(peer)?;
        let deadline = Instant::now() + t;
        let link_oob = loop {
            if let Some(o) = s.peers.take_link(nonce, i) {
                break o;
            }
            if Instant::now() > deadline {
                return Err(handshake_err(
                    peer,
                    format!("no lease link for path {i} within {} ms", t.as_millis()),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        link_oob.set_max_message(s.cfg.limits.message_bytes);
        let link = LeaseLink::open(s.nics[local].dev(), link_oob, clock.step(peer)?)?;
        if let Err(e) = link_gid_matches(&link, theirs, their_nic, peer) {
            s.peers.count_refusal(Refusal::Auth);
            return Err(e);
        }
        built.push(Path::new(local, their_nic, lanes, link));
    }
    Ok(built)
}

/// The connecting side of a handshake.
pub(crate) fn connect(s: &Arc<AgentInner>, addr: &str) -> Result<Peer> {
    let clock = Clock::start(&s.cfg);
    let limits = &s.cfg.limits;
    if s.peers.len() >= limits.peers {
        return Err(Error::invalid(
            format!("agent {}", s.name),
            "limits.peers",
            limits.peers,
            "as many peers connected as it allows: no more connections",
        ));
    }
    let oob = Oob::connect(addr, clock.step(addr)?)?;
    oob.set_max_message(limits.message_bytes);
    let nonce = nonce();
    let mine = s.metadata();
    let secret = s.cfg.secret.as_ref();
    let c = secret.map(|_| crate::auth::challenge()).transpose()?;
    oob.send(&Wire::Hello {
        version: VERSION,
        metadata: mine.clone(),
        qps: s.cfg.qps_per_path,
        nonce,
        challenge: c,
    })?;
    let refused = |why: String| Err(handshake_err(addr, format!("refused: {}", shown(&why))));
    let mut session = None;
    let mut msg = clock.recv(&oob, addr)?;
    if let (Some(secret), Some(c)) = (secret, c) {
        // The listener proves the secret first, over this agent's identity; then this agent.
        match msg {
            Wire::Challenge { challenge, proof } => {
                let ses = Session {
                    c,
                    l: challenge,
                    nonce,
                };
                if !ses.check(secret, "listener", &mine, &proof) {
                    return Err(handshake_err(
                        addr,
                        "the listener's proof does not match: it does not hold this agent's \
                         secret",
                    ));
                }
                oob.send(&Wire::Proof {
                    proof: ses.proof(secret, "connector", &mine),
                })?;
                session = Some(ses);
                msg = clock.recv(&oob, addr)?;
            }
            Wire::Refuse { why } => return refused(why),
            other => {
                return Err(handshake_err(
                    addr,
                    format!(
                        "the listener proved no secret (it answered with a {}): this agent \
                         connects only to peers that hold its secret",
                        other.kind()
                    ),
                ));
            }
        }
    }
    let theirs = match msg {
        Wire::Welcome { metadata, proof } => {
            // What the listener says is checked before any of it is used.
            metadata.check()?;
            if let (Some(secret), Some(ses)) = (secret, &session)
                && !proof.is_some_and(|p| ses.check(secret, "welcome", &metadata, &p))
            {
                return Err(handshake_err(
                    addr,
                    format!(
                        "the welcome's proof does not match the name and NICs it declares ({})",
                        metadata.agent
                    ),
                ));
            }
            metadata
        }
        Wire::Refuse { why } => return refused(why),
        Wire::Challenge { .. } => {
            return Err(handshake_err(
                addr,
                "the listener asks for a secret, and this agent has none \
                 (AgentBuilder::secret)",
            ));
        }
        other => {
            return Err(handshake_err(
                addr,
                format!("expected a welcome, got a {}", other.kind()),
            ));
        }
    };
    let peer = theirs.agent.clone();
    let pairs =
        paths(&mine.nics, &theirs.nics, limits.paths).map_err(|why| handshake_err(&peer, why))?;
    let known = Known::from_metadata(&theirs.regions, limits)
        .map_err(|(_, why)| handshake_err(&peer, format!("its metadata: {why}")))?;
    let mut built = Vec::with_capacity(pairs.len());
    for (i, (my_nic, their_nic)) in pairs.iter().enumerate() {
        let local = nic_index(s, my_nic, &peer)?;
        let mtu = path_mtu(s, local, &theirs, their_nic);
        let lanes = lanes(s, local, s.cfg.qps_per_path, mtu, &oob, clock.step(&peer)?)?;
        let link_oob = Oob::connect(addr, clock.step(&peer)?)?;
        link_oob.set_max_message(limits.message_bytes);
        link_oob.send(&Wire::Link {
            nonce,
            path: i,
            proof: match (secret, &session) {
                (Some(secret), Some(ses)) => Some(ses.link_proof(secret, i)),
                _ => None,
            },
        })?;
        let link = LeaseLink::open(s.nics[local].dev(), link_oob, clock.step(&peer)?)?;
        link_gid_matches(&link, &theirs, their_nic, &peer)?;
        built.push(Path::new(local, their_nic, lanes, link));
    }
    Ok(Peer {
        shared: finish(s, oob, (theirs, nonce), known, built, &mine),
    })
}

fn nic_index(s: &AgentInner, nic: &str, peer: &str) -> Result<usize> {
    s.nics.index_of(nic).ok_or_else(|| {
        handshake_err(
            peer,
            format!("path names NIC {nic}, which agent {} does not use", s.name),
        )
    })
}

/// `n` queue pairs on NIC `local`, each connected to the peer's over `oob`.
/// The smaller of both ends' active MTUs: the path MTU both queue pairs must use.
fn path_mtu(s: &AgentInner, local: usize, theirs: &Metadata, their_nic: &str) -> Mtu {
    let mine = s.nics[local].mtu();
    let other = theirs
        .nics
        .iter()
        .find(|n| n.name == their_nic)
        .map_or(mine.bytes(), |n| n.mtu);
    [
        Mtu::Mtu256,
        Mtu::Mtu512,
        Mtu::Mtu1024,
        Mtu::Mtu2048,
        Mtu::Mtu4096,
    ]
    .into_iter()
    .rev()
    .find(|m| m.bytes() <= mine.bytes().min(other))
    .unwrap_or(Mtu::Mtu256)
}

fn lanes(
    s: &AgentInner,
    local: usize,
    n: usize,
    mtu: Mtu,
    oob: &Oob,
    t: Duration,
) -> Result<Vec<Arc<Lane>>> {
    let nic = &s.nics[local];
    let caps = QpCaps {
        max_send_wr: s.cfg.depth,
        max_recv_wr: 1,
        ..QpCaps::default()
    };
    let qps = (0..n)
        .map(|_| nic.pd().create_qp(nic.cq(), nic.cq(), caps))
        .collect::<std::result::Result<Vec<Qp>, _>>()?;
    crate::raw::connect_over(&qps, oob, mtu, t)?;
    Ok(qps
        .into_iter()
        .map(|qp| Arc::new(Lane::new(qp, local)))
        .collect())
}

fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Both sides: the peer is connected (by the handshake of nonce `session`) — list it, start
/// its control threads, and grant it leases on every registration; `mine` is the metadata this
/// side sent it.
fn finish(
    s: &Arc<AgentInner>,
    oob: Oob,
    (theirs, session): (Metadata, u64),
    known: Known,
    paths: Vec<Path>,
    mine: &Metadata,
) -> Arc<PeerShared> {
    let host: Weak<dyn PeerHost> = Arc::downgrade(s) as Weak<dyn PeerHost>;
    let (peer, rx) = PeerShared::new(
        (theirs.agent.clone(), session),
        host,
        s.cfg.limits,
        known,
        paths,
        oob,
    );
    // Listed before its reader starts: a reader that finds the peer gone at once retires it
    // from the list, which it cannot do before the peer is in it (a peer that left during the
    // handshake stayed listed for good when the push came after the reader's retire).
    s.peers.add(peer.clone());
    peer.start(rx);
    // Listed first (above), then every live registration granted and announced: one
    // registered while the handshake ran (after its metadata was sent) is not missed, and one
    // registered from now on is announced by the registration itself (grants are
    // deduplicated).
    for e in s
        .registry
        .live()
        .iter()
        .filter(|e| e.publish.allows(&peer.name))
    {
        s.announce_to(&peer, e);
    }
    // One the metadata listed and that went while the handshake ran (before the peer was
    // listed, so its going told the others only): the peer is told now.
    for r in &mine.regions {
        match s.registry.get(r.id) {
            Some(e) if e.revoked_at().is_none() && !e.deregistered.load(Ordering::Acquire) => {}
            Some(e) => {
                let why = if e.deregistered.load(Ordering::Acquire) {
                    crate::event::GoneWhy::Deregistered
                } else {
                    crate::event::GoneWhy::Freed
                };
                s.tell_gone_to(&peer, e.id, e.revoked_at().unwrap_or(e.epoch), why);
            }
            None => {
                let (epoch, why) = match s.registry.buried(r.id) {
                    Some(epoch) => (epoch, crate::event::GoneWhy::Freed),
                    None => (r.epoch, crate::event::GoneWhy::Deregistered),
                };
                s.tell_gone_to(&peer, r.id, epoch, why);
            }
        }
    }
    // An agent dropped while this handshake ran closes what it just connected.
    if s.stop.load(Ordering::Acquire) {
        peer.close("the agent stopped during the handshake");
    }
    tracing::info!(agent = %s.name, peer = %peer.name, paths = peer.paths.len(), "peer connected");
    peer
}

/// A peer's text as a log line may show it: at most 256 characters, control characters escaped.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(256).collect();
    cut.escape_default().to_string()
}

/// The lease link's far end must be the NIC the peer declared for this path (its GID, which the
/// handshake's proofs cover): a link that names another identity is refused.
fn link_gid_matches(
    link: &LeaseLink,
    theirs: &Metadata,
    their_nic: &str,
    peer: &str,
) -> Result<()> {
    let declared = theirs
        .nics
        .iter()
        .find(|n| n.name == their_nic)
        .map(|n| n.gid);
    if declared == Some(link.peer_gid()) {
        return Ok(());
    }
    Err(handshake_err(
        peer,
        format!(
            "the lease link for {their_nic} comes from GID {:02x?} ({}), not the GID {} declared \
             for it",
            link.peer_gid(),
            shown(link.peer_name()),
            declared.map_or_else(|| "none".into(), |g| format!("{g:02x?}"))
        ),
    ))
}
