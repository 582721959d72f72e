//! Staging on the simulated testbed: GPU memory a NIC cannot reach peer to peer (gpu2 and
//! nic0, gpu0 and nic1 sit on different sockets) goes through a host buffer on the GPU's NUMA
//! node, on either side of a transfer, every byte verified; a free under a staged transfer is
//! a typed error with the oracle clean.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use dmaplane::{Agent, Error, NicPath, Side, Testbed};

mod common;
use common::{T, meet_under_way, pattern};

/// `a` on nic0, `b` on nic1: the GPUs each uses are on the other socket.
fn pair(tb: &Arc<Testbed>) -> (Agent, Agent) {
    let a = Agent::builder("a")
        .testbed(tb.clone())
        .nics(["nic0"])
        .chunk(256 << 10)
        .build()
        .unwrap();
    let b = Agent::builder("b")
        .testbed(tb.clone())
        .nics(["nic1"])
        .chunk(256 << 10)
        .build()
        .unwrap();
    (a, b)
}

#[test]
fn gpu_memory_no_nic_reaches_is_staged_on_both_sides_and_every_byte_moves() {
    let tb = Testbed::builtin().unwrap();
    let (a, b) = pair(&tb);
    const LEN: u64 = 8 << 20;
    let src = a.alloc_gpu("src", "gpu2", LEN).unwrap();
    let dst = b.alloc_gpu("dst", "gpu0", LEN).unwrap();
    let data = pattern(3, LEN as usize);
    src.write(0, &data).unwrap();
    dst.write(0, &vec![0; LEN as usize]).unwrap();
    let (ra, rb) = (a.register(&src).unwrap(), b.register(&dst).unwrap());
    match &ra.paths()[0] {
        NicPath::Staged { nic, through, why } => {
            assert_eq!((nic.as_str(), through.as_str()), ("nic0", "mem1"));
            assert!(!why.is_empty());
        }
        other => panic!("gpu2 → nic0 should be staged, got {other:?}"),
    }
    assert!(rb.paths()[0].is_staged(), "{:?}", rb.paths());
    let peer = a.connect(&b.metadata_blob().unwrap()).unwrap();
    let info = peer.region(rb.id()).unwrap();
    assert!(info.keys.iter().all(|k| k.staged), "{info:?}");

    // Scattered pieces, out of order, with a notification: it arrives after the peer copied
    // every piece into device memory.
    const PIECE: u64 = 1 << 20;
    let order = [5u64, 0, 7, 2, 1, 6, 3, 4];
    let local: Vec<_> = order
        .iter()
        .map(|&i| ra.desc(i * PIECE, PIECE).unwrap())
        .collect();
    let remote: Vec<_> = order
        .iter()
        .map(|&i| peer.desc(rb.id(), ((i + 3) % 8) * PIECE, PIECE).unwrap())
        .collect();
    let t = a
        .write(
            &peer,
            &local,
            &remote,
            Some(dmaplane::Notify::new("", b"landed".to_vec())),
        )
        .unwrap();
    t.wait(T).unwrap();
    let note = b.next_notification(T).expect("notified");
    assert_eq!(note.bytes, b"landed");
    let mut got = vec![0u8; LEN as usize];
    dst.read(0, &mut got).unwrap();
    for i in 0..8u64 {
        let at = (((i + 3) % 8) * PIECE) as usize;
        assert!(
            got[at..at + PIECE as usize] == data[(i * PIECE) as usize..((i + 1) * PIECE) as usize],
            "piece {i} did not land at {at:#x}"
        );
    }

    // READ it back into a second staged allocation.
    let back = a.alloc_gpu("back", "gpu2", LEN).unwrap();
    back.write(0, &vec![0; LEN as usize]).unwrap();
    let rback = a.register(&back).unwrap();
    let t = a
        .read(
            &peer,
            &[rback.all()],
            &[peer.desc(rb.id(), 0, LEN).unwrap()],
            None,
        )
        .unwrap();
    t.wait(T).unwrap();
    let mut again = vec![0u8; LEN as usize];
    back.read(0, &mut again).unwrap();
    assert!(again == got, "READ through both staging buffers differs");

    let v = tb.fabric().oracle().verdict();
    assert!(v.is_clean(), "{v}: {:?}", v.violations);
}

/// Direct beats staged: with a NIC that reaches the GPU peer to peer and one that does not,
/// every request goes through the direct one.
#[test]
fn a_direct_path_is_preferred_over_a_staged_one() {
    let tb = Testbed::builtin().unwrap();
    let a = Agent::builder("a")
        .testbed(tb.clone())
        .nics(["nic0", "nic1"])
        .build()
        .unwrap();
    let b = Agent::builder("b")
        .testbed(tb.clone())
        .nics(["nic2"])
        .build()
        .unwrap();
    const LEN: u64 = 4 << 20;
    let src = a.alloc_gpu("src", "gpu0", LEN).unwrap();
    src.write(0, &pattern(9, LEN as usize)).unwrap();
    let dst = b.alloc_host("dst", LEN).unwrap();
    let (ra, rb) = (a.register(&src).unwrap(), b.register(&dst).unwrap());
    let kinds: Vec<bool> = ra.paths().iter().map(NicPath::is_staged).collect();
    assert_eq!(kinds, [false, true], "{:?}", ra.paths());
    let peer = a.connect(&b.metadata_blob().unwrap()).unwrap();
    a.write(
        &peer,
        &[ra.all()],
        &[peer.desc(rb.id(), 0, LEN).unwrap()],
        None,
    )
    .unwrap()
    .wait(T)
    .unwrap();
    let by_nic = a.requests_by_nic();
    assert_eq!(by_nic[1].1, 0, "the staged NIC was used: {by_nic:?}");
    let mut got = vec![0u8; LEN as usize];
    dst.read(0, &mut got).unwrap();
    assert!(got == pattern(9, LEN as usize));
}

/// Free staged GPU memory under a transfer, on the receiving side and then on the sending
/// side: a typed revoke naming the side and the region, the fabric's oracle clean (nothing
/// touched the staging buffer or the memory after the ack), and the memory's registrations
/// gone from the cache.
#[test]
fn freeing_staged_gpu_memory_mid_transfer_is_a_typed_revoke() {
    for receiver in [true, false] {
        let tb = Testbed::builtin().unwrap();
        let (a, b) = pair(&tb);
        const LEN: u64 = 64 << 20;
        let src = a.alloc_gpu("src", "gpu2", LEN).unwrap();
        let dst = b.alloc_gpu("dst", "gpu0", LEN).unwrap();
        let (ra, rb) = (a.register(&src).unwrap(), b.register(&dst).unwrap());
        let peer = a.connect(&b.metadata_blob().unwrap()).unwrap();
        let victim = if receiver { &dst } else { &src };
        let (report, r) = meet_under_way(
            || {
                let remote = peer.desc(rb.id(), 0, LEN).unwrap();
                a.write(&peer, &[ra.all()], std::slice::from_ref(&remote), None)
                    .unwrap()
            },
            |_| victim.free(Duration::from_secs(2)).unwrap(),
        );
        assert!(report.is_clean(), "{report}");
        let (side, region) = if receiver {
            (Side::Remote, rb.id())
        } else {
            (Side::Local, ra.id())
        };
        match r {
            Err(Error::Revoked {
                side: s, region: g, ..
            }) => assert_eq!((s, g), (side, region), "receiver = {receiver}"),
            other => panic!("receiver = {receiver}: expected a revoke, got {other:?}"),
        }
        let v = tb.fabric().oracle().verdict();
        assert!(v.is_clean(), "{v}: {:?}", v.violations);
        assert!(v.acks >= 1, "{v}");
        let freed = if receiver { (&b, &dst) } else { (&a, &src) };
        assert_eq!(freed.0.cached_registrations(freed.1), 0);
    }
}
