#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! What serving engines need from the Agent: notifications on any transfer and on their own,
//! by sender and tag; prepared block lists by index; descriptors that belong to their side and
//! their peer; the reader told when a peer's region goes; transfers held for revoke tests.

mod common;

use std::time::Duration;

use common::{T, block_on, pattern};
use dmaplane::{
    Agent, Error, Event, GoneWhy, Notify, NotifyFilter, Peer, Region, Side, Status, Testbed,
};

const BLOCK: u64 = 64 << 10;

fn pair(tb: &std::sync::Arc<Testbed>, early: bool) -> (Agent, Agent) {
    let a = Agent::builder("decode")
        .testbed(tb.clone())
        .nics(["nic1"])
        .chunk(16 << 10)
        .inject_early_notify(early)
        .build()
        .unwrap();
    let b = Agent::builder("prefill")
        .testbed(tb.clone())
        .nics(["nic0"])
        .build()
        .unwrap();
    (a, b)
}

/// `a` (decode) and `b` (prefill), a block of host memory each, `a` connected to `b`.
struct Link {
    a: Agent,
    b: Agent,
    mine: dmaplane::Memory,
    theirs: dmaplane::Memory,
    ra: Region,
    rb: Region,
    peer: Peer,
}

fn link(early: bool) -> Link {
    let tb = Testbed::builtin().unwrap();
    let (a, b) = pair(&tb, early);
    let mine = a.alloc_host("mine", BLOCK).unwrap();
    let theirs = b.alloc_host("kv", BLOCK).unwrap();
    let (ra, rb) = (a.register(&mine).unwrap(), b.register(&theirs).unwrap());
    let peer = a.connect(&b.metadata_blob().unwrap()).unwrap();
    Link {
        a,
        b,
        mine,
        theirs,
        ra,
        rb,
        peer,
    }
}

/// One round of the ordering check: `a` WRITEs (or READs) one block with a notification
/// tagged for the round; `b` takes the notification and at once checks its memory (a WRITE:
/// every byte landed) or overwrites it (a READ: `a` must still have read every original byte).
/// With `hold`, the transfer is held after its first request until `b` has looked (a
/// notification that is not early is not there yet). Whether the round saw the order broken.
fn order_broken(l: &Link, write: bool, round: u64, hold: bool) -> bool {
    let data = pattern(round, BLOCK as usize);
    let tag = format!("order:{round}");
    let remote = l.peer.desc(l.rb.id(), 0, BLOCK).unwrap();
    let held = hold.then(|| l.a.hold_transfers(1));
    let t = if write {
        l.mine.write(0, &data).unwrap();
        l.a.write(
            &l.peer,
            &[l.ra.all()],
            &[remote],
            Some(Notify::tag_only(&tag)),
        )
        .unwrap()
    } else {
        l.theirs.write(0, &data).unwrap();
        l.a.read(
            &l.peer,
            &[l.ra.all()],
            &[remote],
            Some(Notify::tag_only(&tag)),
        )
        .unwrap()
    };
    if let Some(h) = &held {
        h.wait_held(&t, T).unwrap();
    }
    let filter = NotifyFilter::any().from("decode").tag(&tag);
    let wait = if hold { Duration::from_millis(50) } else { T };
    let mut broken = false;
    let early = l.b.next_notification_matching(&filter, wait);
    match &early {
        Some(n) => {
            assert_eq!(n.transfer, Some(t.id()));
            if write {
                let mut got = vec![0u8; BLOCK as usize];
                l.theirs.read(0, &mut got).unwrap();
                broken |= got != data;
            } else {
                // The target reuses the block the moment it is told the READ is over.
                l.theirs.write(0, &vec![0xee; BLOCK as usize]).unwrap();
            }
        }
        None => assert!(hold, "round {round}: no notification"),
    }
    drop(held);
    t.wait(T).unwrap();
    if !write {
        let mut got = vec![0u8; BLOCK as usize];
        l.mine.read(0, &mut got).unwrap();
        broken |= got != data;
    }
    if early.is_none() {
        // Released: the notification follows the data now.
        let late = l.b.next_notification_matching(&filter, T);
        assert!(late.is_some(), "round {round}: the notification was lost");
    }
    broken
}

#[test]
fn a_notification_never_arrives_before_its_write_or_read_1000_rounds_each() {
    let l = link(false);
    for write in [true, false] {
        let misses: Vec<u64> = (0..1000)
            .filter(|&round| order_broken(&l, write, round, round % 50 == 0))
            .collect();
        assert!(
            misses.is_empty(),
            "{}: the order broke in rounds {misses:?}",
            if write { "WRITE" } else { "READ" }
        );
    }
    assert_eq!(l.b.stats().notifications_received, 2000);
}

#[test]
fn a_notification_sent_early_is_caught_by_the_ordering_check() {
    // The injected fault sends the notification at the post: with the transfer held after its
    // first request, the receiver sees it before the data, every time.
    let l = link(true);
    assert!(
        order_broken(&l, true, 1, true),
        "an early WRITE notification went unseen"
    );
    assert!(
        order_broken(&l, false, 2, true),
        "an early READ notification went unseen"
    );
}

#[test]
fn notifications_on_their_own_by_sender_tag_and_prefix_and_awaited() {
    let tb = Testbed::builtin().unwrap();
    let (a, b) = pair(&tb, false);
    let c = Agent::builder("other")
        .testbed(tb.clone())
        .nics(["nic2"])
        .build()
        .unwrap();
    let from_a = a.connect(&b.metadata_blob().unwrap()).unwrap();
    let from_c = c.connect(&b.metadata_blob().unwrap()).unwrap();
    a.notify(&from_a, Notify::new("done:1", b"a1".to_vec()))
        .unwrap();
    a.notify(&from_a, Notify::new("done:2", b"a2".to_vec()))
        .unwrap();
    c.notify(&from_c, Notify::new("kv:7", b"c".to_vec()))
        .unwrap();
    // By sender: c's, though a's came first (a's stay queued).
    let n = b.next_notification_from("other", T).unwrap();
    assert_eq!(
        (n.from.as_str(), n.tag.as_str(), n.transfer),
        ("other", "kv:7", None)
    );
    // By tag, out of order: a's second first.
    let n = b
        .next_notification_matching(&NotifyFilter::any().tag("done:2"), T)
        .unwrap();
    assert_eq!(n.bytes, b"a2");
    // Awaited, by prefix.
    let n = block_on(b.notification(NotifyFilter::any().tag_prefix("done:")));
    assert_eq!(
        (n.from.as_str(), n.bytes.as_slice()),
        ("decode", &b"a1"[..])
    );
    // A future that waits is woken by the arrival (block_on fails a task never woken).
    let waiter = {
        let b = b.clone();
        std::thread::spawn(move || block_on(b.notification(NotifyFilter::any().from("decode"))))
    };
    std::thread::sleep(Duration::from_millis(50));
    a.notify(&from_a, Notify::tag_only("late")).unwrap();
    assert_eq!(waiter.join().unwrap().tag, "late");
    assert!(b.next_notification(Duration::from_millis(20)).is_none());
    // Bad tags are refused naming the field, before anything is sent.
    let e = a
        .notify(&from_a, Notify::tag_only("x".repeat(300)))
        .unwrap_err();
    assert!(e.to_string().contains("notify.tag"), "{e}");
    let e = a.notify(&from_a, Notify::tag_only("a\nb")).unwrap_err();
    assert!(e.to_string().contains("control characters"), "{e}");
    assert_eq!(a.stats().notifications_sent, 3);
}

#[test]
fn a_notification_on_its_own_follows_the_transfers_notified_before_it() {
    let l = link(false);
    let remote = l.peer.desc(l.rb.id(), 0, BLOCK).unwrap();
    for i in 0..20 {
        l.a.write(
            &l.peer,
            &[l.ra.all()],
            std::slice::from_ref(&remote),
            Some(Notify::tag_only(format!("t{i}"))),
        )
        .unwrap()
        .wait(T)
        .unwrap();
        l.a.notify(&l.peer, Notify::tag_only(format!("n{i}")))
            .unwrap();
    }
    let tags: Vec<String> = (0..40)
        .map(|_| l.b.next_notification(T).unwrap().tag)
        .collect();
    let want: Vec<String> = (0..20)
        .flat_map(|i| [format!("t{i}"), format!("n{i}")])
        .collect();
    assert_eq!(tags, want);
}

#[test]
fn a_descriptor_of_one_peer_used_with_another_is_refused_naming_both() {
    let tb = Testbed::builtin().unwrap();
    let (a, b) = pair(&tb, false);
    let c = Agent::builder("other")
        .testbed(tb.clone())
        .nics(["nic2"])
        .build()
        .unwrap();
    let rb = b.register(&b.alloc_host("kv", BLOCK).unwrap()).unwrap();
    let rc = c.register(&c.alloc_host("kv", BLOCK).unwrap()).unwrap();
    assert_eq!(rb.id(), rc.id(), "the same number on both peers: the trap");
    let ra = a.register(&a.alloc_host("mine", BLOCK).unwrap()).unwrap();
    let to_b = a.connect(&b.metadata_blob().unwrap()).unwrap();
    let to_c = a.connect(&c.metadata_blob().unwrap()).unwrap();
    let of_b = to_b.desc(rb.id(), 0, BLOCK).unwrap();
    let e = a
        .read(&to_c, &[ra.all()], std::slice::from_ref(&of_b), None)
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Invalid(_)), "{e:?}");
    assert!(
        msg.contains("peer prefill") && msg.contains("peer other"),
        "{msg}"
    );
    // Blocks carry their peer too.
    let blocks_of_b = to_b.blocks(rb.id(), BLOCK / 4).unwrap();
    let mine = ra.blocks(BLOCK / 4).unwrap();
    let e = a
        .read_blocks(&to_c, &mine, &[0], &blocks_of_b, &[0], None)
        .unwrap_err();
    assert!(e.to_string().contains("peer prefill"), "{e}");
    // With the right peer it goes.
    a.read(&to_b, &[ra.all()], &[of_b], None)
        .unwrap()
        .wait(T)
        .unwrap();
}

#[test]
fn prepared_block_lists_move_blocks_by_index_and_post_again() {
    let tb = Testbed::builtin().unwrap();
    let (a, b) = pair(&tb, false);
    const BLK: u64 = 4096;
    let kv = b.alloc_gpu("kv", "gpu0", 64 * BLK).unwrap();
    let data = pattern(9, (64 * BLK) as usize);
    kv.write(0, &data).unwrap();
    let _pool = b.register(&kv).unwrap();
    let peer = a.connect(&b.metadata_blob().unwrap()).unwrap();
    let info = peer.wait_region("kv", T).unwrap();
    let theirs = peer.blocks(info.id, BLK).unwrap();
    let dst = a.alloc_gpu("kv", "gpu2", 80 * BLK).unwrap();
    let mine = a.register(&dst).unwrap().blocks(BLK).unwrap();
    assert_eq!((theirs.len(), mine.len()), (64, 80));
    let ids = [3usize, 17, 5, 63, 0];
    let slots = [79usize, 0, 40, 41, 2];
    let prepared = a.prepare_read(&peer, &mine, &slots, &theirs, &ids).unwrap();
    assert_eq!(prepared.bytes(), 5 * BLK);
    for round in 0..3 {
        dst.write(0, &vec![0u8; (80 * BLK) as usize]).unwrap();
        prepared
            .post(Some(Notify::tag_only(format!("r{round}"))))
            .unwrap()
            .wait(T)
            .unwrap();
        for (&id, &slot) in ids.iter().zip(&slots) {
            let mut got = vec![0u8; BLK as usize];
            dst.read(slot as u64 * BLK, &mut got).unwrap();
            let at = id * BLK as usize;
            assert_eq!(
                got,
                data[at..at + BLK as usize],
                "round {round}: block {id}"
            );
        }
        let n = b.next_notification_from("decode", T).unwrap();
        assert_eq!(n.tag, format!("r{round}"));
    }
    // Bad indices name the list and the index.
    let e = a
        .read_blocks(&peer, &mine, &[80], &theirs, &[0], None)
        .unwrap_err();
    assert!(e.to_string().contains("indices[0] = 80"), "{e}");
    assert!(e.to_string().contains("80 blocks"), "{e}");
    let e = a
        .read_blocks(&peer, &mine, &[0, 1], &theirs, &[0], None)
        .unwrap_err();
    assert!(e.to_string().contains("same length"), "{e}");
    // The peer frees its pool: a post of the prepared READ is refused, typed.
    kv.free(T).unwrap();
    let gone = wait_event(&a, |e| matches!(e, Event::PeerRegionGone { .. }));
    assert!(matches!(
        gone,
        Event::PeerRegionGone {
            why: GoneWhy::Freed,
            ..
        }
    ));
    match prepared.post(None) {
        Err(Error::Revoked {
            side: Side::Remote,
            region,
            ..
        }) => assert_eq!(region, info.id),
        other => panic!("a post after the free: {other:?}"),
    }
}

fn wait_event(a: &Agent, want: impl Fn(&Event) -> bool) -> Event {
    let due = std::time::Instant::now() + T;
    let mut seen = Vec::new();
    while std::time::Instant::now() < due {
        for e in a.events() {
            if want(&e) {
                return e;
            }
            seen.push(e);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("no such event; saw {seen:?}");
}

#[test]
fn the_reader_is_told_when_a_peer_frees_and_its_held_transfer_ends_typed() {
    let l = link(false);
    let remote = l.peer.desc(l.rb.id(), 0, BLOCK).unwrap();
    let hold = l.a.hold_transfers(1);
    let t =
        l.a.read(&l.peer, &[l.ra.all()], std::slice::from_ref(&remote), None)
            .unwrap();
    hold.wait_held(&t, T).unwrap();
    assert!(matches!(
        t.status(),
        Status::InProgress { done: 1, total: 4 }
    ));
    let report = l.theirs.free(T).unwrap();
    let err = t.wait(T).unwrap_err();
    let msg = err.to_string();
    match &err {
        Error::Revoked {
            side: Side::Remote,
            region,
            name,
            ..
        } => assert_eq!((*region, name.as_str()), (l.rb.id(), "kv")),
        other => panic!("{other:?}"),
    }
    // The message names the peer that freed it and the agent whose lease went, in words.
    assert!(msg.contains("peer prefill"), "{msg}");
    assert!(msg.contains("decode's lease"), "{msg}");
    assert!(!msg.contains("prefill holds no lease"), "{msg}");
    drop(hold);
    let e = wait_event(&l.a, |e| matches!(e, Event::PeerRegionGone { .. }));
    assert_eq!(
        e,
        Event::PeerRegionGone {
            peer: "prefill".into(),
            region: l.rb.id(),
            name: "kv".into(),
            epoch: report.epoch,
            why: GoneWhy::Freed,
        }
    );
    // Descriptors of it are refused from now on, typed, saying what the peer did.
    let e = l.peer.desc(l.rb.id(), 0, 4096).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Revoked {
                side: Side::Remote,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("peer prefill freed its memory"),
        "{e}"
    );
    let e =
        l.a.read(&l.peer, &[l.ra.all()], &[remote], None)
            .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Revoked {
                side: Side::Remote,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(l.peer.region(l.rb.id()).is_none());
}

#[test]
fn the_reader_is_told_of_a_deregistration_and_waits_for_the_next_region() {
    let l = link(false);
    l.b.deregister(&l.rb, T).unwrap();
    let e = wait_event(&l.a, |e| matches!(e, Event::PeerRegionGone { .. }));
    assert!(
        matches!(&e, Event::PeerRegionGone { why: GoneWhy::Deregistered, region, .. } if *region == l.rb.id()),
        "{e:?}"
    );
    let e = l.peer.desc(l.rb.id(), 0, 4096).unwrap_err();
    assert!(e.to_string().contains("deregistered it"), "{e}");
    // The next pool, waited for by name.
    let waiter = {
        let peer = l.peer.clone();
        std::thread::spawn(move || peer.wait_region("kv-2", T))
    };
    std::thread::sleep(Duration::from_millis(30));
    let next = l.b.alloc_host("kv-2", BLOCK).unwrap();
    let r2 = l.b.register(&next).unwrap();
    assert_eq!(waiter.join().unwrap().unwrap().id, r2.id());
    // A peer that goes ends a wait at once, naming why.
    let waiter = {
        let peer = l.peer.clone();
        std::thread::spawn(move || peer.wait_region("never", T))
    };
    drop(l.b);
    let e = waiter.join().unwrap().unwrap_err();
    assert!(matches!(e, Error::PeerLost { .. }), "{e:?}");
}

#[test]
fn a_held_transfer_whose_memory_stays_goes_on_at_the_release() {
    let l = link(false);
    let data = pattern(3, BLOCK as usize);
    l.theirs.write(0, &data).unwrap();
    let remote = l.peer.desc(l.rb.id(), 0, BLOCK).unwrap();
    let hold = l.a.hold_transfers(2);
    let t = l.a.read(&l.peer, &[l.ra.all()], &[remote], None).unwrap();
    hold.wait_held(&t, T).unwrap();
    // Held well past the stall timeout's share of a test: still in progress, not stalled.
    std::thread::sleep(Duration::from_millis(200));
    assert!(matches!(
        t.status(),
        Status::InProgress { done: 2, total: 4 }
    ));
    hold.release();
    t.wait(T).unwrap();
    let mut got = vec![0u8; BLOCK as usize];
    l.mine.read(0, &mut got).unwrap();
    assert_eq!(got, data);
}
