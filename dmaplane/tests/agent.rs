//! The Agent end to end on the simulated testbed: transfers verified byte for byte, revoke and
//! peer loss surfaced as typed errors with the fabric's oracle clean, the registration cache,
//! metadata blobs, and bad input.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmaplane::{Agent, Error, Event, Memory, Metadata, Peer, Region, Side, Status, Testbed};

mod common;
use common::{T, block_on, meet_under_way, pattern};

/// Memory on each side, registered, and a's connection to b.
struct Link {
    src: Memory,
    dst: Memory,
    ra: Region,
    rb: Region,
    peer: Peer,
}

fn link(a: &Agent, b: &Agent, len: u64) -> Link {
    let (src, dst) = (
        a.alloc_host("src", len).unwrap(),
        b.alloc_host("dst", len).unwrap(),
    );
    let (ra, rb) = (a.register(&src).unwrap(), b.register(&dst).unwrap());
    let peer = a.connect(&b.metadata_blob().unwrap()).unwrap();
    Link {
        src,
        dst,
        ra,
        rb,
        peer,
    }
}

/// The receiving agent most tests use: `b` on nic1.
fn agent_b(tb: &Arc<Testbed>) -> Agent {
    Agent::builder("b")
        .testbed(tb.clone())
        .nics(["nic1"])
        .build()
        .unwrap()
}

fn pair(tb: &Arc<Testbed>) -> (Agent, Agent) {
    let a = Agent::builder("a")
        .testbed(tb.clone())
        .nics(["nic0"])
        .build()
        .unwrap();
    (a, agent_b(tb))
}

#[test]
fn write_and_read_move_every_byte_striped_over_queue_pairs() {
    let tb = Testbed::builtin().unwrap();
    let a = Agent::builder("a")
        .testbed(tb.clone())
        .nics(["nic0"])
        .chunk(256 << 10)
        .qps_per_path(4)
        .build()
        .unwrap();
    let b = agent_b(&tb);
    const LEN: u64 = 8 << 20;
    let Link {
        src,
        dst,
        ra,
        rb,
        peer,
    } = link(&a, &b, LEN);
    let data = pattern(1, LEN as usize);
    src.write(0, &data).unwrap();
    assert_eq!(peer.name(), "b");
    let t = a
        .write(
            &peer,
            &[ra.all()],
            &[peer.desc(rb.id(), 0, LEN).unwrap()],
            None,
        )
        .unwrap();
    assert_eq!(t.requests(), 32);
    t.wait(T).unwrap();
    assert!(matches!(t.status(), Status::Done));
    let mut got = vec![0u8; LEN as usize];
    dst.read(0, &mut got).unwrap();
    assert!(got == data);
    // READ back a scattered list into a second local buffer.
    let back = a.alloc_host("back", LEN).unwrap();
    let rback = a.register(&back).unwrap();
    let local: Vec<_> = (0..8)
        .map(|k| rback.desc(k * (1 << 20), 4096).unwrap())
        .collect();
    let remote: Vec<_> = (0..8)
        .map(|k| peer.desc(rb.id(), (7 - k) * (1 << 20), 4096).unwrap())
        .collect();
    a.read(&peer, &local, &remote, None)
        .unwrap()
        .wait(T)
        .unwrap();
    for k in 0..8u64 {
        let mut g = vec![0u8; 4096];
        back.read(k * (1 << 20), &mut g).unwrap();
        let off = ((7 - k) * (1 << 20)) as usize;
        assert_eq!(g, data[off..off + 4096], "READ {k}");
    }
    let v = tb.fabric().oracle().verdict();
    assert!(v.is_clean(), "{v}");
    let s = a.stats();
    assert_eq!((s.transfers_done, s.transfers_failed), (2, 0), "{s:?}");
}

#[test]
fn a_notification_arrives_after_the_data_and_a_future_resolves() {
    let tb = Testbed::builtin().unwrap();
    let (a, b) = pair(&tb);
    let Link {
        src,
        dst,
        ra,
        rb,
        peer,
    } = link(&a, &b, 1 << 20);
    src.write(0, &pattern(2, 1 << 20)).unwrap();
    let t = a
        .write(
            &peer,
            &[ra.all()],
            &[peer.desc(rb.id(), 0, 1 << 20).unwrap()],
            Some(dmaplane::Notify::new("", b"kv-ready".to_vec())),
        )
        .unwrap();
    block_on(t).unwrap();
    let n = b.next_notification(T).expect("no notification");
    assert_eq!(
        (n.from.as_str(), n.bytes.as_slice()),
        ("a", &b"kv-ready"[..])
    );
    // Data first: when the notification is read, every byte is there.
    let mut got = vec![0u8; 1 << 20];
    dst.read(0, &mut got).unwrap();
    assert!(got == pattern(2, 1 << 20));
    assert_eq!(b.stats().notifications_received, 1);
}

/// Free the receiver's memory while a 64 MiB WRITE into it is under way: the transfer ends
/// with a typed error naming the remote region and its epoch, every request completed once,
/// and the oracle saw nothing land after the fence or the ack.
#[test]
fn freeing_the_destination_mid_transfer_is_a_typed_error_and_nothing_lands_after() {
    let tb = Testbed::builtin().unwrap();
    let (a, b) = pair(&tb);
    const LEN: u64 = 64 << 20;
    let Link {
        src: _src,
        dst,
        ra,
        rb,
        peer,
    } = link(&a, &b, LEN);
    dst.write(0, &vec![0; LEN as usize]).unwrap();
    // Small chunks: many requests, so the free meets them in flight.
    let mut outcome = None;
    for _ in 0..20 {
        let t = a
            .write(
                &peer,
                &[ra.all()],
                &[peer.desc(rb.id(), 0, LEN).unwrap()],
                None,
            )
            .unwrap();
        std::thread::sleep(Duration::from_micros(300));
        if !matches!(t.status(), Status::InProgress { .. }) {
            continue;
        }
        let report = dst.free(Duration::from_secs(2)).unwrap();
        outcome = Some((t.wait(T), report));
        break;
    }
    let (r, report) = outcome.expect("every transfer finished before the free could meet it");
    assert!(report.is_clean(), "{report}");
    match r {
        Err(Error::Revoked {
            side: Side::Remote,
            region,
            epoch,
            ..
        }) => {
            assert_eq!((region, epoch), (rb.id(), 0));
        }
        other => panic!("expected a remote revoke, got {other:?}"),
    }
    let v = tb.fabric().oracle().verdict();
    assert!(v.is_clean(), "{v}: {:?}", v.violations);
    assert!(v.acks >= 1, "{v}");
    assert_eq!(b.cached_registrations(&dst), 0);
    // Every request got exactly one completion: nothing is left in flight.
    let s = a.stats();
    assert_eq!(s.transfers_failed, 1, "{s:?}");
}

/// Free the sender's own memory mid-transfer: the error names the local region.
#[test]
fn freeing_the_source_mid_transfer_names_the_local_region() {
    let tb = Testbed::builtin().unwrap();
    let a = Agent::builder("a")
        .testbed(tb.clone())
        .nics(["nic0"])
        .chunk(64 << 10)
        .build()
        .unwrap();
    let b = agent_b(&tb);
    const LEN: u64 = 64 << 20;
    let Link {
        src,
        dst: _dst,
        ra,
        rb,
        peer,
    } = link(&a, &b, LEN);
    src.write(0, &vec![1; LEN as usize]).unwrap();
    let t = a
        .write(
            &peer,
            &[ra.all()],
            &[peer.desc(rb.id(), 0, LEN).unwrap()],
            None,
        )
        .unwrap();
    let report = src.free(Duration::from_secs(2)).unwrap();
    assert!(report.is_clean(), "{report}");
    match t.wait(T) {
        Err(Error::Revoked {
            side: Side::Local,
            region,
            ..
        }) => assert_eq!(region, ra.id()),
        // The free came after the last request completed.
        Ok(()) => {}
        other => panic!("expected a local revoke, got {other:?}"),
    }
    let v = tb.fabric().oracle().verdict();
    assert!(v.is_clean(), "{v}");
    // A new transfer from freed memory is refused up front.
    let e = a
        .write(
            &peer,
            &[ra.all()],
            &[peer.desc(rb.id(), 0, LEN).unwrap()],
            None,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Revoked {
                side: Side::Local,
                ..
            }
        ),
        "{e}"
    );
}

/// A peer that goes away: transfers to it end with PeerLost (or stall) within the stall
/// timeout — never a hang.
#[test]
fn a_peer_that_goes_away_ends_transfers_within_the_stall_timeout() {
    let tb = Testbed::builtin().unwrap();
    let a = Agent::builder("a")
        .testbed(tb.clone())
        .nics(["nic0"])
        .stall_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let b = agent_b(&tb);
    let Link {
        src: _src,
        dst,
        ra,
        rb,
        peer,
    } = link(&a, &b, 1 << 20);
    let remote = peer.desc(rb.id(), 0, 1 << 20).unwrap();
    drop((rb, dst));
    drop(b);
    let start = Instant::now();
    while peer.lost().is_none() && start.elapsed() < T {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        peer.lost().is_some(),
        "the peer's departure was never noticed"
    );
    let e = match a.write(&peer, &[ra.all()], std::slice::from_ref(&remote), None) {
        Err(e) => e,
        Ok(t) => t.wait(T).unwrap_err(),
    };
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(
        matches!(e, Error::PeerLost { ref peer, .. } if peer == "b"),
        "{e}"
    );
    assert!(
        a.events()
            .iter()
            .any(|e| matches!(e, dmaplane::Event::PeerLost { peer, .. } if peer == "b"))
    );
}

#[test]
fn the_registration_cache_hands_out_sub_ranges_and_forgets_freed_memory() {
    let tb = Testbed::builtin().unwrap();
    let a = Agent::builder("a")
        .testbed(tb)
        .nics(["nic0"])
        .build()
        .unwrap();
    let mem = a.alloc_host("pool", 64 << 20).unwrap();
    let first: Vec<_> = (0..64)
        .map(|k| a.register_range(&mem, k << 20, 1 << 20).unwrap())
        .collect();
    let s1 = a.stats().cache;
    assert_eq!((s1.misses, s1.hits), (64, 0));
    // The same ranges again, and pieces inside them: lookups.
    let again: Vec<_> = (0..64)
        .map(|k| a.register_range(&mem, (k << 20) + 4096, 8192).unwrap())
        .collect();
    let s2 = a.stats().cache;
    assert_eq!((s2.misses, s2.hits), (64, 64));
    assert_eq!(again[5].id(), first[5].id());
    drop((first, again));
    // Dropped handles stay cached (a later registration is still a hit).
    a.register_range(&mem, 3 << 20, 1 << 20).unwrap();
    assert_eq!(a.stats().cache.hits, 65);
    assert_eq!(a.cached_registrations(&mem), 64);
    mem.free(Duration::from_secs(1)).unwrap();
    assert_eq!(
        a.cached_registrations(&mem),
        0,
        "freed memory must not stay registered"
    );
    let e = a.register(&mem).unwrap_err();
    assert!(e.to_string().contains("freed"), "{e}");
}

#[test]
fn metadata_blobs_round_trip_and_bad_ones_say_what_is_wrong() {
    let tb = Testbed::builtin().unwrap();
    let a = Agent::builder("a")
        .testbed(tb)
        .nics(["nic0"])
        .build()
        .unwrap();
    let m = a.alloc_host("x", 1 << 16).unwrap();
    let r = a.register(&m).unwrap();
    let blob = a.metadata_blob().unwrap();
    let back = Metadata::from_blob(&blob).unwrap();
    assert_eq!(back, a.metadata());
    assert_eq!(back.region(r.id()).unwrap().keys.len(), 1);
    let check = |b: &[u8], want: &str| {
        let e = Metadata::from_blob(b).unwrap_err().to_string();
        assert!(e.contains(want), "{e} (wanted {want:?})");
    };
    check(&blob[..5], "truncated");
    check(&blob[..blob.len() - 3], "truncated");
    let mut v = blob.clone();
    v[4] = 9;
    check(&v, "version 9");
    let mut v = blob.clone();
    v[0] = b'X';
    check(&v, "not dmaplane metadata");
    let mut v = blob.clone();
    let n = v.len();
    v[n - 2] = b'#';
    check(&v, "malformed JSON");
    check(&vec![0u8; (16 << 20) + 1], "more than");
    let mut v = blob.clone();
    v.extend_from_slice(b"junk");
    check(&v, "trailing");
}

#[test]
fn bad_input_is_refused_naming_the_field() {
    let tb = Testbed::builtin().unwrap();
    let e = Agent::builder("x")
        .testbed(tb.clone())
        .nics(["nic9"])
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nics") && e.contains("nic9") && e.contains("nic0"),
        "{e}"
    );
    let e = Agent::builder("x")
        .testbed(tb.clone())
        .listen("0.0.0.0:0")
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("listen") && e.contains("advertise"), "{e}");
    // With the address to advertise, a wildcard listener is reachable through the metadata.
    let w = Agent::builder("w")
        .testbed(tb.clone())
        .nics(["nic2"])
        .listen("0.0.0.0:0")
        .advertise("127.0.0.1")
        .insecure(true)
        .build()
        .unwrap();
    assert_eq!(
        w.metadata().handshake,
        format!("127.0.0.1:{}", w.listen_addr().port())
    );
    let e = Agent::builder("x")
        .testbed(tb.clone())
        .depth(0)
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("depth"), "{e}");
    let (a, b) = pair(&tb);
    let e = Agent::builder("c")
        .testbed(tb.clone())
        .nics(["nic1"])
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("agent b uses it"), "{e}");
    let m = a.alloc_host("m", 1 << 20).unwrap();
    let r = a.register(&m).unwrap();
    let e = a.register_range(&m, 1 << 20, 1).unwrap_err().to_string();
    assert!(e.contains("range"), "{e}");
    let e = r.desc(1 << 20, 1).unwrap_err().to_string();
    assert!(e.contains("desc"), "{e}");
    let bm = b.alloc_host("bm", 1 << 16).unwrap();
    let rb = b.register(&bm).unwrap();
    let peer = a.connect(&b.metadata_blob().unwrap()).unwrap();
    let e = peer.desc(rb.id(), 0, 1 << 20).unwrap_err().to_string();
    assert!(e.contains("outside") && e.contains("65536"), "{e}");
    let e = peer.desc(999, 0, 1).unwrap_err().to_string();
    assert!(e.contains("region") && e.contains("999"), "{e}");
    let e = a
        .write(
            &peer,
            &[r.desc(0, 10).unwrap()],
            &[peer.desc(rb.id(), 0, 20).unwrap()],
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("pair 0") && e.contains("10 bytes"), "{e}");
    let e = a.write(&peer, &[], &[], None).unwrap_err().to_string();
    assert!(e.contains("descriptors"), "{e}");
    let e = a.register(&bm).unwrap_err().to_string();
    assert!(e.contains("another agent"), "{e}");
}

/// The peer goes away while a transfer to it is in flight: it ends with an error naming the
/// peer within the stall timeout, and every request it posted completed once.
#[test]
fn a_peer_lost_mid_transfer_ends_it_with_an_error_naming_the_peer() {
    let tb = Testbed::builtin().unwrap();
    let stall = Duration::from_secs(2);
    let a = Agent::builder("a")
        .testbed(tb.clone())
        .nics(["nic0"])
        .chunk(64 << 10)
        .stall_timeout(stall)
        .build()
        .unwrap();
    let b = agent_b(&tb);
    const LEN: u64 = 256 << 20;
    let Link {
        src: _src,
        dst,
        ra,
        rb,
        peer,
    } = link(&a, &b, LEN);
    let t = a
        .write(
            &peer,
            &[ra.all()],
            &[peer.desc(rb.id(), 0, LEN).unwrap()],
            None,
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(2));
    let start = Instant::now();
    drop((rb, dst, b));
    let r = t.wait(T);
    let took = start.elapsed();
    eprintln!("after {took:?}: {r:?}");
    match r {
        Err(Error::PeerLost { peer, .. })
        | Err(Error::Stalled { peer, .. })
        | Err(Error::Failed { peer, .. }) => {
            assert_eq!(peer, "b");
        }
        // The memory went with the agent: revoked under the transfer.
        Err(Error::Revoked {
            side: Side::Remote, ..
        }) => {}
        Ok(()) => assert!(
            took < Duration::from_millis(50),
            "done long after the peer left"
        ),
        Err(e) => panic!("unexpected: {e}"),
    }
    assert!(took < stall + Duration::from_secs(3), "took {took:?}");
}

/// Wait until `t` has completed at least `n` requests (or ended).
fn until_done(t: &dmaplane::Transfer, n: u64) {
    let start = Instant::now();
    while matches!(t.status(), Status::InProgress { done, .. } if done < n) && start.elapsed() < T {
        std::hint::spin_loop();
    }
}

/// Deregister a region while a transfer uses it, on either side: the transfer ends with a
/// typed error naming the side and the region, every request completed once, the oracle saw
/// nothing out of order, and the memory itself lives on — registered again, it moves every
/// byte.
#[test]
fn deregistering_under_a_transfer_is_a_typed_error_and_the_memory_lives_on() {
    let tb = Testbed::builtin().unwrap();
    // Few requests in flight, so the deregistration meets the batch part way.
    let a = Agent::builder("a")
        .testbed(tb.clone())
        .nics(["nic0"])
        .chunk(64 << 10)
        .depth(4)
        .build()
        .unwrap();
    let b = agent_b(&tb);
    const LEN: u64 = 32 << 20;
    let Link {
        src,
        dst,
        ra,
        rb,
        peer,
    } = link(&a, &b, LEN);
    let data = pattern(5, LEN as usize);
    src.write(0, &data).unwrap();
    dst.write(0, &vec![0; LEN as usize]).unwrap();
    let quarter = (LEN / (64 << 10)) / 4;

    // The receiver deregisters its region under the WRITE.
    let t = a
        .write(
            &peer,
            &[ra.all()],
            &[peer.desc(rb.id(), 0, LEN).unwrap()],
            None,
        )
        .unwrap();
    until_done(&t, quarter);
    b.deregister(&rb, Duration::from_secs(2)).unwrap();
    // From here on no WRITE may reach the memory: poison its last MiB (the requests go in
    // order, so that part comes last, long after this), and find it untouched once the
    // transfer has ended (the oracle judges exporter revokes; a deregistration is the NIC's).
    const POISON: u8 = 0xee;
    const TAIL: u64 = LEN - (1 << 20);
    dst.write(TAIL, &[POISON; 1 << 20]).unwrap();
    let r = t.wait(T);
    let mut seen = vec![0u8; 1 << 20];
    dst.read(TAIL, &mut seen).unwrap();
    let hit = seen.iter().position(|&x| x != POISON);
    assert_eq!(
        hit, None,
        "a WRITE landed after the deregistration returned"
    );
    match r {
        Err(Error::Revoked {
            side: Side::Remote,
            region,
            ..
        }) => assert_eq!(region, rb.id()),
        other => panic!("expected a remote revoke, got {other:?}"),
    }

    // The sender deregisters its own region under a WRITE into a new registration.
    let rb2 = b.register(&dst).unwrap();
    assert_ne!(
        rb2.id(),
        rb.id(),
        "a deregistered entry must not be handed out again"
    );
    while peer.region(rb2.id()).is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let remote = peer.desc(rb2.id(), 0, LEN).unwrap();
    let t = a
        .write(&peer, &[ra.all()], std::slice::from_ref(&remote), None)
        .unwrap();
    until_done(&t, quarter);
    a.deregister(&ra, Duration::from_secs(2)).unwrap();
    match t.wait(T) {
        Err(Error::Revoked {
            side: Side::Local,
            region,
            why,
            ..
        }) => {
            assert_eq!(region, ra.id());
            assert!(why.contains("deregistered"), "{why}");
        }
        other => panic!("expected a local revoke, got {other:?}"),
    }
    let e = a
        .write(&peer, &[ra.all()], std::slice::from_ref(&remote), None)
        .unwrap_err();
    assert!(
        matches!(e, Error::Invalid(_) | Error::Revoked { .. }),
        "{e}"
    );

    // Both memories live on.
    let ra2 = a.register(&src).unwrap();
    a.write(&peer, &[ra2.all()], std::slice::from_ref(&remote), None)
        .unwrap()
        .wait(T)
        .unwrap();
    let mut got = vec![0u8; LEN as usize];
    dst.read(0, &mut got).unwrap();
    assert!(got == data, "the bytes after re-registration differ");
    let v = tb.fabric().oracle().verdict();
    assert!(v.is_clean(), "{v}: {:?}", v.violations);
    let s = a.stats();
    assert_eq!((s.transfers_failed, s.transfers_done), (2, 1), "{s:?}");
}

/// Two NICs on the memory's NUMA node: the transfer is striped over both rails (every NIC
/// pair is a path; the best-ranked ones share the requests), and a NIC on the other node is
/// left out for host memory on this one.
#[test]
fn a_transfer_is_striped_over_the_rails_that_serve_the_memory_best() {
    let tb = Testbed::builtin().unwrap();
    let a = Agent::builder("a")
        .testbed(tb.clone())
        .nics(["nic1", "nic2"])
        .chunk(256 << 10)
        .build()
        .unwrap();
    let b = Agent::builder("b")
        .testbed(tb.clone())
        .nics(["nic0"])
        .build()
        .unwrap();
    const LEN: u64 = 16 << 20;
    // Host memory on socket 1, where both of a's NICs are.
    let src = a.alloc_host_on("src", "mem1", LEN).unwrap();
    let dst = b.alloc_host("dst", LEN).unwrap();
    let data = pattern(9, LEN as usize);
    src.write(0, &data).unwrap();
    let (ra, rb) = (a.register(&src).unwrap(), b.register(&dst).unwrap());
    assert_eq!(ra.paths().len(), 2);
    let peer = a.connect(&b.metadata_blob().unwrap()).unwrap();
    assert_eq!(peer.paths(), 2);
    a.write(
        &peer,
        &[ra.all()],
        &[peer.desc(rb.id(), 0, LEN).unwrap()],
        None,
    )
    .unwrap()
    .wait(T)
    .unwrap();
    let mut got = vec![0u8; LEN as usize];
    dst.read(0, &mut got).unwrap();
    assert!(got == data);
    let by = a.requests_by_nic();
    assert_eq!(
        by,
        vec![("nic1".to_string(), 32), ("nic2".to_string(), 32)],
        "{by:?}"
    );
    // GPU memory on gpu2 (below nic1's switch): nic1 alone is best.
    let g = a.alloc_gpu("g", "gpu2", LEN).unwrap();
    let rg = a.register(&g).unwrap();
    a.write(
        &peer,
        &[rg.all()],
        &[peer.desc(rb.id(), 0, LEN).unwrap()],
        None,
    )
    .unwrap()
    .wait(T)
    .unwrap();
    let by = a.requests_by_nic();
    assert_eq!(
        by,
        vec![("nic1".to_string(), 96), ("nic2".to_string(), 32)],
        "{by:?}"
    );
}

/// Two transfers on one queue pair; the receiver frees the first one's memory: the flush that
/// the free causes on the shared queue pair ends the first with the typed error, and the
/// second — whose memory is fine — goes again and lands whole.
#[test]
fn a_revoke_of_one_transfer_does_not_fail_another_on_the_same_queue_pair() {
    let tb = Testbed::builtin().unwrap();
    // One queue pair of 8; 4 MiB requests: both transfers have requests queued on it when
    // the free's flush comes.
    let a = Agent::builder("a")
        .testbed(tb.clone())
        .nics(["nic0"])
        .qps_per_path(1)
        .depth(8)
        .chunk(4 << 20)
        .build()
        .unwrap();
    let b = agent_b(&tb);
    const LEN: u64 = 32 << 20;
    let src = a.alloc_host("src", LEN).unwrap();
    let data = pattern(11, LEN as usize);
    src.write(0, &data).unwrap();
    let (d1, d2) = (
        b.alloc_host("d1", LEN).unwrap(),
        b.alloc_host("d2", LEN).unwrap(),
    );
    d1.write(0, &vec![0; LEN as usize]).unwrap();
    d2.write(0, &vec![0; LEN as usize]).unwrap();
    let ra = a.register(&src).unwrap();
    let (r1, r2) = (b.register(&d1).unwrap(), b.register(&d2).unwrap());
    let peer = a.connect(&b.metadata_blob().unwrap()).unwrap();
    let t1 = a
        .write(
            &peer,
            &[ra.desc(0, 16 << 20).unwrap()],
            &[peer.desc(r1.id(), 0, 16 << 20).unwrap()],
            None,
        )
        .unwrap();
    let t2 = a
        .write(
            &peer,
            &[ra.all()],
            &[peer.desc(r2.id(), 0, LEN).unwrap()],
            None,
        )
        .unwrap();
    d1.free(Duration::from_secs(2)).unwrap();
    assert!(matches!(
        t1.wait(T),
        Err(Error::Revoked {
            side: Side::Remote,
            ..
        }) | Ok(())
    ));
    t2.wait(T).unwrap();
    let mut got = vec![0u8; LEN as usize];
    d2.read(0, &mut got).unwrap();
    assert!(got == data, "the second transfer's bytes differ");
}

/// Registrations made while a handshake runs are announced to the new peer too.
#[test]
fn registrations_made_during_the_handshake_reach_the_peer() {
    let tb = Testbed::builtin().unwrap();
    let (a, b) = pair(&tb);
    let mem = b.alloc_host("many", 64 << 20).unwrap();
    let blob = b.metadata_blob().unwrap();
    let (peer, ids) = std::thread::scope(|s| {
        let reg = s.spawn(|| {
            (0..256u64)
                .map(|k| b.register_range(&mem, k << 18, 1 << 18).unwrap())
                .collect::<Vec<_>>()
        });
        let peer = a.connect(&blob).unwrap();
        (peer, reg.join().unwrap())
    });
    let start = Instant::now();
    while ids.iter().any(|r| peer.region(r.id()).is_none()) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "registrations never announced"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Many lanes of a deep queue each, tiny chunks: the engine never has more requests out on a
/// NIC than its completion queue holds, so a transfer of 131072 requests completes.
#[test]
fn a_batch_never_overruns_the_completion_queue() {
    let tb = Testbed::builtin().unwrap();
    let a = Agent::builder("a")
        .testbed(tb.clone())
        .nics(["nic0"])
        .qps_per_path(64)
        .depth(4096)
        .chunk(64)
        .build()
        .unwrap();
    let b = agent_b(&tb);
    const LEN: u64 = 8 << 20;
    let Link {
        src,
        dst,
        ra,
        rb,
        peer,
    } = link(&a, &b, LEN);
    let data = pattern(12, LEN as usize);
    src.write(0, &data).unwrap();
    let t = a
        .write(
            &peer,
            &[ra.all()],
            &[peer.desc(rb.id(), 0, LEN).unwrap()],
            None,
        )
        .unwrap();
    assert_eq!(t.requests(), 131072);
    t.wait(Duration::from_secs(120)).unwrap();
    let mut got = vec![0u8; LEN as usize];
    dst.read(0, &mut got).unwrap();
    assert!(got == data);
}

/// A peer that comes and goes, again and again: each lost peer is let go of (no list, no
/// threads, no sockets kept).
#[test]
fn lost_peers_are_let_go_of() {
    let tb = Testbed::builtin().unwrap();
    let a = Agent::builder("a")
        .testbed(tb.clone())
        .nics(["nic0"])
        .build()
        .unwrap();
    // Many times: a peer that leaves while the listening side still finishes its handshake
    // must be let go of too (it stayed listed when the listing came after the loss).
    for _ in 0..30 {
        let b = agent_b(&tb);
        let _p = b.connect_to(&a.listen_addr().to_string()).unwrap();
        drop(b);
    }
    let start = Instant::now();
    while !a.peers().is_empty() {
        assert!(
            start.elapsed() < T,
            "{} lost peers still listed",
            a.peers().len()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A lease-link message for no handshake under way is dropped at once, not kept.
#[test]
fn a_stray_lease_link_is_dropped() {
    use std::io::{Read, Write};
    let tb = Testbed::builtin().unwrap();
    let a = Agent::builder("a")
        .testbed(tb)
        .nics(["nic0"])
        .build()
        .unwrap();
    let mut c = std::net::TcpStream::connect(a.listen_addr()).unwrap();
    c.write_all(b"{\"msg\":\"link\",\"nonce\":1,\"path\":0}\n")
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        c.read(&mut buf).unwrap(),
        0,
        "the listener kept the connection"
    );
}

/// The checks can fail: free the destination (quarantined, poisoned at the ack) under a
/// transfer whose sender acks the lease revoke and keeps writing. The honest run ends with the
/// typed revoke; the lying one is caught — its WRITEs after the ack met the zapped region and
/// the receiving NIC refused them — and in both nothing landed after the ack (oracle clean,
/// poison untouched).
#[test]
fn a_holder_that_writes_after_its_ack_is_refused_at_the_zapped_region() {
    const POISON: u8 = 0xee;
    for lying in [false, true] {
        let tb = Testbed::builtin().unwrap();
        let a = Agent::builder("a")
            .testbed(tb.clone())
            .nics(["nic0"])
            .chunk(64 << 10)
            .inject(lying.then_some(dmaplane::Fault::AckThenWrite))
            .build()
            .unwrap();
        let b = agent_b(&tb);
        const LEN: u64 = 64 << 20;
        let Link {
            src: _src,
            dst,
            ra,
            rb,
            peer,
        } = link(&a, &b, LEN);
        let ((report, q), r) = meet_under_way(
            || {
                let remote = peer.desc(rb.id(), 0, LEN).unwrap();
                a.write(&peer, &[ra.all()], std::slice::from_ref(&remote), None)
                    .unwrap()
            },
            |_| {
                let (report, q) = dst.free_quarantined(Duration::from_secs(2)).unwrap();
                q.fill(POISON).unwrap();
                (report, q)
            },
        );
        assert!(report.is_clean(), "{report}");
        // Honest: the typed remote revoke, nothing seen after the ack. Lying: its WRITEs after
        // the ack reached the zapped region and the receiving NIC refused them (a remote access
        // error — an honest holder never makes one), so nothing landed either.
        match (&r, lying) {
            (
                Err(Error::Revoked {
                    side: Side::Remote, ..
                }),
                false,
            ) => {}
            (Err(Error::Failed { status, .. }), true) if status.contains("RemAccessErr") => {}
            _ => panic!("lying = {lying}: {r:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
        let v = tb.fabric().oracle().verdict();
        assert!(v.is_clean(), "lying = {lying}: {v}: {:?}", v.violations);
        assert_eq!(q.first_change(POISON).unwrap(), None, "lying = {lying}");
        // The refused WRITEs left their queue pairs in the error state for good: a later
        // transfer, to new and valid memory, goes over the queue pairs still whole, or is
        // refused at once naming the broken ones — never a storm of flushes or a stall.
        let fresh = b.alloc_host("fresh", 1 << 20).unwrap();
        let rf = b.register(&fresh).unwrap();
        let due = Instant::now() + T;
        while peer.region(rf.id()).is_none() && Instant::now() < due {
            std::thread::sleep(Duration::from_millis(1));
        }
        let remote = peer.desc(rf.id(), 0, 1 << 20).unwrap();
        let start = Instant::now();
        match a.write(
            &peer,
            &[ra.desc(0, 1 << 20).unwrap()],
            std::slice::from_ref(&remote),
            None,
        ) {
            Ok(t) => t.wait(T).unwrap(),
            Err(Error::Invalid(i)) if lying && i.why.contains("broken") => {}
            Err(e) => panic!("lying = {lying}: {e}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }
}

/// A lease holder that ignores the revoke is cut off when the deadline passes, and the owner's
/// agent says so: an `Event::LeaseCutOff` naming the memory and `stats().holders_cut_off`. An
/// honest holder never is.
#[test]
fn a_holder_that_ignores_a_revoke_is_cut_off_and_reported() {
    for ignoring in [false, true] {
        let tb = Testbed::builtin().unwrap();
        let a = Agent::builder("a")
            .testbed(tb.clone())
            .nics(["nic0"])
            .inject(ignoring.then_some(dmaplane::Fault::IgnoreLeaseRevoke))
            .build()
            .unwrap();
        let b = agent_b(&tb);
        let Link {
            src: _src,
            dst,
            ra,
            rb,
            peer,
        } = link(&a, &b, 1 << 20);
        a.write(
            &peer,
            &[ra.all()],
            &[peer.desc(rb.id(), 0, 1 << 20).unwrap()],
            None,
        )
        .unwrap()
        .wait(T)
        .unwrap();
        dst.free(Duration::from_millis(300)).unwrap();
        let cut: Vec<Event> = b
            .events()
            .into_iter()
            .filter(|e| matches!(e, Event::LeaseCutOff { .. }))
            .collect();
        if ignoring {
            assert_eq!(b.stats().holders_cut_off, 1, "{:?}", b.stats());
            assert!(
                matches!(&cut[..], [Event::LeaseCutOff { memory, holders: 1 }] if memory == "dst"),
                "{cut:?}"
            );
        } else {
            assert_eq!(b.stats().holders_cut_off, 0);
            assert!(cut.is_empty(), "{cut:?}");
        }
    }
}
