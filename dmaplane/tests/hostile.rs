//! Peers that lie, over real sockets: what they send is validated and bounded before it is used,
//! nothing they send panics a thread of the agent, and the agent keeps serving its honest peers.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use dmaplane::auth::Secret;
use dmaplane::{Agent, Error, Limits, Testbed};
use dmaplane_rdma::oob::{Oob, OobListener};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

/// A `hello` as a peer would send it, from `agent`'s real metadata with its name replaced.
fn hello(agent: &Agent, name: &str) -> Value {
    let mut metadata = serde_json::to_value(agent.metadata()).unwrap();
    metadata["agent"] = json!(name);
    json!({"msg": "hello", "version": dmaplane::metadata::VERSION, "metadata": metadata, "qps": 1, "nonce": 7})
}

/// Send one `hello` over a fresh connection and return the answer (`None` when the
/// connection closed without one).
fn say_hello(to: &Agent, hello: &Value) -> Option<Value> {
    let oob = Oob::connect(to.listen_addr(), T).unwrap();
    oob.send(hello).unwrap();
    oob.recv::<Value>(T).ok()
}

fn secret(byte: u8) -> Secret {
    Secret::new(vec![byte; 32]).unwrap()
}

fn agent(tb: &std::sync::Arc<Testbed>, name: &str, nic: &str, s: Option<Secret>) -> Agent {
    let mut b = Agent::builder(name).testbed(tb.clone()).nics([nic]);
    if let Some(s) = s {
        b = b.secret(s);
    }
    b.build().unwrap()
}

#[test]
fn names_with_control_characters_are_refused_by_field_and_the_listener_keeps_serving() {
    let tb = Testbed::builtin().unwrap();
    let a = agent(&tb, "a", "nic0", None);
    let liar = agent(&tb, "liar", "nic2", None);
    // More hellos than the listener serves at once: each must be answered and released (a
    // thread that panicked on the name used to keep its slot, and 64 of them shut the listener).
    for (i, bad) in ["evil\0peer", "tab\tname", "", &"x".repeat(256)]
        .iter()
        .cycle()
        .take(70)
        .enumerate()
    {
        let answer = say_hello(&a, &hello(&liar, bad));
        let answer = answer.unwrap_or_else(|| panic!("hello {i} ({bad:?}) got no answer"));
        assert_eq!(answer["msg"], "refuse", "hello {i} ({bad:?}): {answer}");
        let why = answer["why"].as_str().unwrap();
        assert!(why.contains("agent"), "hello {i}: {why}");
    }
    // Nobody was listed, and an honest peer still gets in.
    assert!(a.peers().is_empty(), "{:?}", a.peers());
    let b = agent(&tb, "b", "nic1", None);
    let peer = b.connect_to(&a.listen_addr().to_string()).unwrap();
    assert_eq!(peer.name(), "a");
    assert!(a.stats().refused.check >= 70, "{:?}", a.stats());
    // Every handshake's slot is given back (the honest one's as its thread ends).
    let due = std::time::Instant::now() + T;
    while a.stats().handshakes_under_way > 0 && std::time::Instant::now() < due {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(a.stats().handshakes_under_way, 0, "{:?}", a.stats());
}

#[test]
fn a_listener_that_names_itself_with_a_nul_gets_an_error_not_a_panic() {
    let tb = Testbed::builtin().unwrap();
    let b = agent(&tb, "b", "nic1", None);
    let other = agent(&tb, "other", "nic0", None);
    let listener = OobListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    let mut metadata = serde_json::to_value(other.metadata()).unwrap();
    metadata["agent"] = json!("lis\0tener");
    // No NICs: no paths to build, so the caller goes straight on to list the peer.
    metadata["nics"] = json!([]);
    let fake = std::thread::spawn(move || {
        let oob = listener.accept(T).unwrap();
        let _hello: Value = oob.recv(T).unwrap();
        oob.send(&json!({"msg": "welcome", "metadata": metadata}))
            .unwrap();
        // Hold the connection until the caller gave up.
        let _ = oob.recv::<Value>(Duration::from_secs(2));
    });
    let e = b.connect_to(&addr.to_string()).unwrap_err();
    assert!(matches!(&e, Error::Invalid(i) if i.field == "agent"), "{e}");
    fake.join().unwrap();
    assert!(b.peers().is_empty());
}

#[test]
fn agents_that_share_a_secret_meet_and_move_data() {
    let tb = Testbed::builtin().unwrap();
    let a = agent(&tb, "a", "nic0", Some(secret(1)));
    let b = agent(&tb, "b", "nic1", Some(secret(1)));
    let src = a.alloc_host("src", 64 << 10).unwrap();
    let dst = b.alloc_host("dst", 64 << 10).unwrap();
    src.write(0, &[5u8; 4096]).unwrap();
    let (ra, rb) = (a.register(&src).unwrap(), b.register(&dst).unwrap());
    let peer = a.connect_to(&b.listen_addr().to_string()).unwrap();
    let t = a
        .write(
            &peer,
            &[ra.desc(0, 4096).unwrap()],
            &[peer.desc(rb.id(), 0, 4096).unwrap()],
            None,
        )
        .unwrap();
    t.wait(T).unwrap();
    let mut got = [0u8; 4096];
    dst.read(0, &mut got).unwrap();
    assert_eq!(got, [5u8; 4096]);
}

#[test]
fn a_peer_without_the_secret_or_with_another_is_refused_saying_why_and_learns_nothing() {
    let tb = Testbed::builtin().unwrap();
    let a = agent(&tb, "a", "nic0", Some(secret(1)));
    let mem = a.alloc_host("weights", 1 << 20).unwrap();
    let _r = a.register(&mem).unwrap();
    let addr = a.listen_addr().to_string();
    // No secret: refused by the listener, which says why.
    let none = agent(&tb, "none", "nic1", None);
    let e = none.connect_to(&addr).unwrap_err().to_string();
    assert!(e.contains("refused") && e.contains("secret"), "{e}");
    // Another secret: the listener's proof does not match, so the connector stops first.
    let other = agent(&tb, "other", "nic2", Some(secret(2)));
    let e = other.connect_to(&addr).unwrap_err().to_string();
    assert!(e.contains("proof does not match"), "{e}");
    // The other way round: a connector with a secret refuses a listener that proves none.
    drop(other);
    let open = agent(&tb, "open", "nic2", None);
    let e = a
        .connect_to(&open.listen_addr().to_string())
        .unwrap_err()
        .to_string();
    assert!(e.contains("proved no secret"), "{e}");
    // A plain client's hello is refused, and the answer carries nothing of the agent.
    let answer = say_hello(&a, &hello(&none, "plain")).unwrap();
    assert_eq!(answer["msg"], "refuse", "{answer}");
    assert!(!answer.to_string().contains("weights"), "{answer}");
    assert!(!answer.to_string().contains("rkey"), "{answer}");
    assert!(a.peers().is_empty() && none.peers().is_empty());
    assert!(a.stats().refused.auth >= 2, "{:?}", a.stats());
}

#[test]
fn a_client_that_answers_the_challenge_with_a_forged_proof_is_refused() {
    let tb = Testbed::builtin().unwrap();
    let a = agent(&tb, "a", "nic0", Some(secret(1)));
    let liar = agent(&tb, "liar", "nic1", None);
    let mut h = hello(&liar, "liar");
    h["challenge"] = json!(vec![3u8; 32]);
    let oob = Oob::connect(a.listen_addr(), T).unwrap();
    oob.send(&h).unwrap();
    let challenge: Value = oob.recv(T).unwrap();
    assert_eq!(challenge["msg"], "challenge", "{challenge}");
    oob.send(&json!({"msg": "proof", "proof": vec![0u8; 32]}))
        .unwrap();
    let answer: Value = oob.recv(T).unwrap();
    assert_eq!(answer["msg"], "refuse", "{answer}");
    assert!(
        answer["why"].as_str().unwrap().contains("does not match"),
        "{answer}"
    );
    // A lease link for no handshake under way is refused and counted too.
    let before = a.stats().refused.check;
    let link = Oob::connect(a.listen_addr(), T).unwrap();
    link.send(&json!({"msg": "link", "nonce": 5, "path": 0, "proof": vec![1u8; 32]}))
        .unwrap();
    let due = std::time::Instant::now() + T;
    while a.stats().refused.check == before && std::time::Instant::now() < due {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(a.stats().refused.check, before + 1);
    assert!(a.peers().is_empty());
}

#[test]
fn a_routable_listener_needs_a_secret_or_an_explicit_opt_out() {
    let tb = Testbed::builtin().unwrap();
    // A routable address: this host's own, when it has one besides loopback.
    let Some(ip) = routable_ip() else {
        eprintln!("no routable address on this host: nothing to check");
        return;
    };
    let e = Agent::builder("x")
        .testbed(tb.clone())
        .nics(["nic0"])
        .listen(format!("{ip}:0"))
        .build()
        .unwrap_err();
    assert!(
        matches!(&e, Error::Invalid(i) if i.field == "listen" && i.why.contains("secret")),
        "{e}"
    );
    Agent::builder("y")
        .testbed(tb.clone())
        .nics(["nic1"])
        .listen(format!("{ip}:0"))
        .secret(secret(1))
        .build()
        .unwrap();
    Agent::builder("z")
        .testbed(tb)
        .nics(["nic2"])
        .listen(format!("{ip}:0"))
        .insecure(true)
        .build()
        .unwrap();
}

/// This host's address toward the outside, if it has one (no packet is sent).
fn routable_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn a_peer_that_floods_notifications_is_bounded_and_the_others_still_get_through() {
    let tb = Testbed::builtin().unwrap();
    let flood = agent(&tb, "flood", "nic0", None);
    let per_peer = 64;
    let b = Agent::builder("b")
        .testbed(tb.clone())
        .nics(["nic1"])
        .limits(Limits {
            notifications: per_peer,
            ..Limits::default()
        })
        .build()
        .unwrap();
    let honest = agent(&tb, "honest", "nic2", None);
    let dst = b.alloc_host("dst", 64 << 10).unwrap();
    let rb = b.register(&dst).unwrap();
    let link = |from: &Agent| {
        let src = from.alloc_host("src", 4096).unwrap();
        let ra = from.register(&src).unwrap();
        let peer = from.connect(&b.metadata_blob().unwrap()).unwrap();
        (src, ra, peer)
    };
    let (fl, hl) = (link(&flood), link(&honest));
    let send = |from: &Agent, l: &(dmaplane::Memory, dmaplane::Region, dmaplane::Peer), n| {
        let (_, ra, peer) = l;
        for i in 0..n {
            let t = from
                .write(
                    peer,
                    &[ra.desc(0, 64).unwrap()],
                    &[peer.desc(rb.id(), 0, 64).unwrap()],
                    Some(dmaplane::Notify::new(
                        "",
                        format!("{i}").as_bytes().to_vec(),
                    )),
                )
                .unwrap();
            t.wait(T).unwrap();
        }
    };
    let extra = 100;
    send(&flood, &fl, per_peer + extra);
    send(&honest, &hl, 1);
    // Every notification was sent; the flooder's beyond its share were refused and counted.
    let due = std::time::Instant::now() + T;
    while (b.stats().notifications_received < per_peer as u64 + 1
        || b.stats().refused.notifications < extra as u64)
        && std::time::Instant::now() < due
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let got = b.notifications();
    let from = |who: &str| got.iter().filter(|n| n.from == who).count();
    assert_eq!(from("flood"), per_peer, "{:?}", b.stats());
    assert_eq!(from("honest"), 1);
    assert_eq!(
        b.stats().refused.notifications,
        extra as u64,
        "{:?}",
        b.stats()
    );
    // Read, the flooder's share is free again.
    send(&flood, &fl, 1);
    assert_eq!(b.next_notification(T).map(|n| n.from), Some("flood".into()));
}

#[test]
fn a_read_only_registration_refuses_a_peers_write_at_the_nic_and_serves_its_read() {
    use dmaplane::Publish;
    let tb = Testbed::builtin().unwrap();
    let a = agent(&tb, "a", "nic0", None);
    let b = agent(&tb, "b", "nic1", None);
    let weights = b.alloc_host("weights", 64 << 10).unwrap();
    weights.write(0, &[4u8; 4096]).unwrap();
    let rb = b
        .register_with(&weights, 0, 64 << 10, Publish::all().read_only())
        .unwrap();
    let buf = a.alloc_host("buf", 64 << 10).unwrap();
    buf.write(0, &[9u8; 4096]).unwrap();
    let ra = a.register(&buf).unwrap();
    let peer = a.connect(&b.metadata_blob().unwrap()).unwrap();
    let remote = peer.desc(rb.id(), 0, 4096).unwrap();
    // A READ of it is served.
    a.read(
        &peer,
        &[ra.desc(4096, 4096).unwrap()],
        std::slice::from_ref(&remote),
        None,
    )
    .unwrap()
    .wait(T)
    .unwrap();
    let mut got = [0u8; 4096];
    buf.read(4096, &mut got).unwrap();
    assert_eq!(got, [4u8; 4096]);
    // A WRITE into it is refused by b's NIC: nothing lands.
    let e = a
        .write(
            &peer,
            &[ra.desc(0, 4096).unwrap()],
            std::slice::from_ref(&remote),
            None,
        )
        .unwrap()
        .wait(T)
        .unwrap_err();
    assert!(e.to_string().contains("needs remote-write"), "{e}");
    weights.read(0, &mut got).unwrap();
    assert_eq!(got, [4u8; 4096], "the WRITE landed in read-only memory");
}

#[test]
fn a_registration_published_to_named_peers_is_unknown_to_the_others() {
    use dmaplane::Publish;
    let tb = Testbed::builtin().unwrap();
    let owner = agent(&tb, "owner", "nic0", None);
    let kv = owner.alloc_host("kv", 64 << 10).unwrap();
    let open = owner.register(&kv).unwrap();
    let mine = owner.alloc_host("for-trainer", 64 << 10).unwrap();
    let named = owner
        .register_with(&mine, 0, 64 << 10, Publish::all().to(["trainer"]).unwrap())
        .unwrap();
    // Not in what anyone may get.
    assert!(owner.metadata().region(named.id()).is_none());
    assert!(owner.metadata().region(open.id()).is_some());
    let other = agent(&tb, "other", "nic1", None);
    let trainer = agent(&tb, "trainer", "nic2", None);
    let addr = owner.listen_addr().to_string();
    let po = other.connect_to(&addr).unwrap();
    let pt = trainer.connect_to(&addr).unwrap();
    // Announcements trail the welcome, in order on each peer's control connection: once a
    // marker registered after the others has arrived, everything before it has too.
    let marker = owner
        .register(&owner.alloc_host("marker", 4096).unwrap())
        .unwrap();
    let seen = |p: &dmaplane::Peer, id: u32| {
        let due = std::time::Instant::now() + T;
        while p.region(id).is_none() && std::time::Instant::now() < due {
            std::thread::sleep(Duration::from_millis(2));
        }
        p.region(id).is_some()
    };
    assert!(seen(&po, marker.id()) && seen(&pt, marker.id()));
    assert!(po.region(open.id()).is_some());
    assert!(
        po.region(named.id()).is_none(),
        "announced to a peer it is not published to"
    );
    assert!(pt.region(named.id()).is_some());
    // Registered after both connected: announced to the named peer only.
    let later = owner
        .register_with(&mine, 0, 4096, Publish::all().to(["trainer"]).unwrap())
        .unwrap();
    let marker = owner
        .register(&owner.alloc_host("marker2", 4096).unwrap())
        .unwrap();
    assert!(seen(&po, marker.id()) && seen(&pt, marker.id()));
    assert!(pt.region(later.id()).is_some());
    assert!(po.region(later.id()).is_none());
}

/// An agent on `nic` with `limits`.
fn limited(tb: &std::sync::Arc<Testbed>, name: &str, nic: &str, limits: Limits) -> Agent {
    Agent::builder(name)
        .testbed(tb.clone())
        .nics([nic])
        .limits(limits)
        .build()
        .unwrap()
}

/// Wait until `done` holds (or fail after [`T`], showing `what`).
fn until(what: &str, done: impl Fn() -> bool) {
    let due = std::time::Instant::now() + T;
    while !done() {
        assert!(std::time::Instant::now() < due, "never: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn hellos_over_the_peer_path_queue_pair_and_region_limits_are_refused_naming_each() {
    let tb = Testbed::builtin().unwrap();
    let a = limited(
        &tb,
        "a",
        "nic0",
        Limits {
            paths: 2,
            qps_per_path: 4,
            regions: 3,
            ..Limits::default()
        },
    );
    let liar = agent(&tb, "liar", "nic2", None);
    let m = liar.alloc_host("m", 1 << 20).unwrap();
    let refused = |h: &Value| {
        let answer = say_hello(&a, h).unwrap();
        assert_eq!(answer["msg"], "refuse", "{answer}");
        answer["why"].as_str().unwrap().to_string()
    };
    // Queue pairs: more per path than the limit.
    let mut h = hello(&liar, "liar");
    h["qps"] = json!(5);
    assert!(refused(&h).contains("limits.qps_per_path"));
    // Paths: three NICs declared times one here.
    let mut h = hello(&liar, "liar");
    let nic = h["metadata"]["nics"][0].clone();
    h["metadata"]["nics"] = json!([nic.clone(), nic.clone(), nic]);
    assert!(refused(&h).contains("limits.paths"));
    // Regions: four registrations listed in the hello's metadata.
    for i in 0..4 {
        liar.register_range(&m, i * 4096, 4096).unwrap();
    }
    assert!(refused(&hello(&liar, "liar")).contains("limits.regions"));
    let r = a.stats().refused;
    assert_eq!((r.qps_per_path, r.paths, r.regions), (1, 1, 1), "{r:?}");
    assert!(a.peers().is_empty());
}

#[test]
fn a_peer_over_the_peer_limit_is_refused_and_the_first_keeps_working() {
    let tb = Testbed::builtin().unwrap();
    let a = limited(
        &tb,
        "a",
        "nic0",
        Limits {
            peers: 1,
            ..Limits::default()
        },
    );
    let b = agent(&tb, "b", "nic1", None);
    let c = agent(&tb, "c", "nic2", None);
    let src = b.alloc_host("src", 4096).unwrap();
    let rb = b.register(&src).unwrap();
    let dst = a.alloc_host("dst", 4096).unwrap();
    let ra = a.register(&dst).unwrap();
    let peer = b.connect_to(&a.listen_addr().to_string()).unwrap();
    let e = c
        .connect_to(&a.listen_addr().to_string())
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits.peers"), "{e}");
    assert_eq!(a.stats().refused.peers, 1);
    // The honest peer is still served.
    b.write(
        &peer,
        &[rb.desc(0, 4096).unwrap()],
        &[peer.desc(ra.id(), 0, 4096).unwrap()],
        None,
    )
    .unwrap()
    .wait(T)
    .unwrap();
}

#[test]
fn announcements_beyond_a_peers_region_limits_are_refused_and_counted() {
    let tb = Testbed::builtin().unwrap();
    let a = limited(
        &tb,
        "a",
        "nic0",
        Limits {
            regions: 2,
            ..Limits::default()
        },
    );
    let b = agent(&tb, "b", "nic1", None);
    let peer = a.connect_to(&b.listen_addr().to_string()).unwrap();
    let m = b.alloc_host("m", 1 << 20).unwrap();
    for i in 0..5 {
        b.register_range(&m, i * 4096, 4096).unwrap();
    }
    until("three announcements refused", || {
        a.stats().refused.regions == 3
    });
    assert_eq!(peer.regions().len(), 2);
    // Bytes: a peer whose descriptions would take more than the bound.
    let tight = limited(
        &tb,
        "tight",
        "nic2",
        Limits {
            region_bytes: 300,
            ..Limits::default()
        },
    );
    let peer = tight.connect_to(&b.listen_addr().to_string());
    let e = peer.unwrap_err().to_string();
    assert!(e.contains("limits.region_bytes"), "{e}");
}

#[test]
fn a_message_longer_than_the_limit_is_refused_and_its_bytes_let_go() {
    let tb = Testbed::builtin().unwrap();
    let a = limited(
        &tb,
        "a",
        "nic0",
        Limits {
            message_bytes: 64 << 10,
            ..Limits::default()
        },
    );
    let oob = std::net::TcpStream::connect(a.listen_addr()).unwrap();
    use std::io::Write;
    // No newline: the agent must stop reading once past the limit, not buffer it all.
    let _ = (&oob).write_all(&vec![b'x'; 1 << 20]);
    until("the long message refused", || {
        a.stats().refused.message_bytes == 1
    });
    until("its slot given back", || {
        a.stats().handshakes_under_way == 0
    });
}

#[test]
fn a_handshake_held_slow_is_cut_at_the_handshake_time_limit() {
    let tb = Testbed::builtin().unwrap();
    let a = Agent::builder("a")
        .testbed(tb.clone())
        .nics(["nic0"])
        .secret(secret(1))
        .limits(Limits {
            handshake_time: Duration::from_millis(300),
            ..Limits::default()
        })
        .build()
        .unwrap();
    let liar = agent(&tb, "liar", "nic1", None);
    // One says nothing at all; one says hello, takes the challenge and never proves.
    let silent = Oob::connect(a.listen_addr(), T).unwrap();
    let mut h = hello(&liar, "liar");
    h["challenge"] = json!(vec![3u8; 32]);
    let slow = Oob::connect(a.listen_addr(), T).unwrap();
    slow.send(&h).unwrap();
    let challenge: Value = slow.recv(T).unwrap();
    assert_eq!(challenge["msg"], "challenge", "{challenge}");
    let start = std::time::Instant::now();
    until("both handshakes cut", || {
        a.stats().refused.handshake_time == 2 && a.stats().handshakes_under_way == 0
    });
    // Well before the 30 s a step may take.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let answer: Value = slow.recv(T).unwrap();
    assert!(
        answer["why"]
            .as_str()
            .unwrap()
            .contains("limits.handshake_time"),
        "{answer}"
    );
    drop(silent);
}

#[test]
fn a_peer_that_falls_silent_is_lost_at_the_idle_limit_and_keepalives_keep_honest_ones() {
    let tb = Testbed::builtin().unwrap();
    let quick = Limits {
        idle: Duration::from_millis(400),
        keepalive: Duration::from_millis(100),
        ..Limits::default()
    };
    let a = limited(&tb, "a", "nic0", quick);
    // b pings every 100 ms: kept. c pings every 30 s: silent longer than a waits.
    let b = limited(&tb, "b", "nic1", quick);
    let c = agent(&tb, "c", "nic2", None);
    let pb = b.connect_to(&a.listen_addr().to_string()).unwrap();
    let pc = c.connect_to(&a.listen_addr().to_string()).unwrap();
    until("the silent peer lost", || a.stats().refused.idle == 1);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(a.stats().refused.idle, 1, "{:?}", a.stats());
    let names: Vec<String> = a
        .peers()
        .iter()
        .filter(|p| p.lost().is_none())
        .map(|p| p.name().to_string())
        .collect();
    assert_eq!(names, ["b"]);
    assert!(pb.lost().is_none());
    until("c sees the connection end", || pc.lost().is_some());
}

#[test]
fn a_stage_request_over_the_range_limit_is_refused_naming_it() {
    let tb = Testbed::builtin().unwrap();
    let a = agent(&tb, "a", "nic0", None);
    // gpu0 is on the other socket from nic1: b's registration of it is staged, and a WRITE
    // into it asks b to land the ranges.
    let b = limited(
        &tb,
        "b",
        "nic1",
        Limits {
            stage_ranges: 2,
            ..Limits::default()
        },
    );
    let src = a.alloc_host("src", 1 << 20).unwrap();
    let dst = b.alloc_gpu("dst", "gpu0", 1 << 20).unwrap();
    let (ra, rb) = (a.register(&src).unwrap(), b.register(&dst).unwrap());
    let peer = a.connect_to(&b.listen_addr().to_string()).unwrap();
    let pieces = |n: u64| -> (Vec<dmaplane::Desc>, Vec<dmaplane::RemoteDesc>) {
        (0..n)
            .map(|i| {
                (
                    ra.desc(i * 8192, 4096).unwrap(),
                    peer.desc(rb.id(), i * 8192, 4096).unwrap(),
                )
            })
            .unzip()
    };
    let (l, r) = pieces(2);
    a.write(&peer, &l, &r, None).unwrap().wait(T).unwrap();
    let (l, r) = pieces(3);
    let e = a
        .write(&peer, &l, &r, None)
        .unwrap()
        .wait(T)
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits.stage_ranges"), "{e}");
    assert_eq!(b.stats().refused.stage_ranges, 1);
}

#[test]
fn a_peer_declaring_a_connected_peers_name_is_refused() {
    let tb = Testbed::builtin().unwrap();
    let a = agent(&tb, "a", "nic0", None);
    let b = agent(&tb, "b", "nic1", None);
    let liar = agent(&tb, "liar", "nic2", None);
    b.connect_to(&a.listen_addr().to_string()).unwrap();
    let answer = say_hello(&a, &hello(&liar, "b")).unwrap();
    assert_eq!(answer["msg"], "refuse", "{answer}");
    let why = answer["why"].as_str().unwrap();
    assert!(why.contains("connected already"), "{why}");
    assert_eq!(a.stats().refused.check, 1, "{:?}", a.stats());
    // The honest one, under its own name, still gets in.
    let peer = liar.connect_to(&a.listen_addr().to_string()).unwrap();
    assert_eq!(peer.name(), "a");
}

#[test]
fn staging_buffers_for_peers_stop_at_the_limit_and_come_back_when_a_peer_goes() {
    const LEN: u64 = 64 << 10;
    let tb = Testbed::builtin().unwrap();
    // gpu0 sits on the other socket from nic1: b stages it, one buffer per peer.
    let b = limited(
        &tb,
        "b",
        "nic1",
        Limits {
            staging_bytes: LEN,
            ..Limits::default()
        },
    );
    let dst = b.alloc_gpu("dst", "gpu0", LEN).unwrap();
    let rb = b.register(&dst).unwrap();
    let a = agent(&tb, "a", "nic0", None);
    let c = agent(&tb, "c", "nic2", None);
    let pa = a.connect_to(&b.listen_addr().to_string()).unwrap();
    assert_eq!(pa.region(rb.id()).unwrap().keys.len(), 1);
    // The budget is a's buffer: c is told of the registration, without a key to reach it.
    let pc = c.connect_to(&b.listen_addr().to_string()).unwrap();
    assert!(pc.region(rb.id()).unwrap().keys.is_empty());
    until("c's buffer refused", || {
        b.stats().refused.staging_bytes == 1
    });
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(b.stats().refused.staging_bytes, 1, "{:?}", b.stats());
    // a goes: its buffer is given back, and the next peer gets one.
    drop(pa);
    drop(a);
    drop(pc);
    drop(c);
    until("a's buffer given back", || b.peers().is_empty());
    let d = agent(&tb, "d", "nic0", None);
    let pd = d.connect_to(&b.listen_addr().to_string()).unwrap();
    assert_eq!(pd.region(rb.id()).unwrap().keys.len(), 1);
}
