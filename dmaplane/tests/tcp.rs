#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The Agent on TCP NICs ([`dmaplane_rdma::tcp`]): what a user with two ordinary hosts gets.
//! Two agents of this process on loopback here; `tools/tests/agent_tcp.rs` runs them as two
//! processes.

use std::time::Duration;

use dmaplane::{Agent, Error, Side};

const T: Duration = Duration::from_secs(60);

fn pattern(len: u64, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i ^ seed).wrapping_mul(2654435761) >> 11) as u8)
        .collect()
}

mod common;
use common::tcp_agent as agent;

#[test]
fn two_agents_write_and_read_verified_bytes_over_tcp_nics() {
    let (a, b) = (agent("a"), agent("b"));
    const LEN: u64 = 16 << 20;
    let src = a.alloc_host("src", LEN).unwrap();
    let back = a.alloc_host("back", LEN).unwrap();
    let dst = b.alloc_host("dst", LEN).unwrap();
    let data = pattern(LEN, 1);
    src.write(0, &data).unwrap();
    let (rs, rback) = (a.register(&src).unwrap(), a.register(&back).unwrap());
    let rd = b.register(&dst).unwrap();
    let peer = a.connect_to(&b.listen_addr().to_string()).unwrap();
    let remote = peer.desc(rd.id(), 0, LEN).unwrap();
    a.write(
        &peer,
        &[rs.all()],
        std::slice::from_ref(&remote),
        Some(dmaplane::Notify::new("", b"done".to_vec())),
    )
    .unwrap()
    .wait(T)
    .unwrap();
    let n = b.next_notification(T).expect("the notification");
    assert_eq!(n.bytes, b"done");
    let mut got = vec![0u8; LEN as usize];
    dst.read(0, &mut got).unwrap();
    assert!(got == data, "the WRITE landed different bytes");
    // The other way round: b's bytes, READ by a into its own memory.
    let data2 = pattern(LEN, 2);
    dst.write(0, &data2).unwrap();
    a.read(&peer, &[rback.all()], std::slice::from_ref(&remote), None)
        .unwrap()
        .wait(T)
        .unwrap();
    back.read(0, &mut got).unwrap();
    assert!(got == data2, "the READ brought back different bytes");
    assert_eq!(a.metadata().backend, "tcp");
}

/// The peer frees its memory under a stream of WRITEs: the transfer ends with a typed error
/// naming the remote side, and the connection lives on.
#[test]
fn a_free_under_a_transfer_is_a_typed_error_and_the_pair_lives_on() {
    let (a, b) = (agent("a2"), agent("b2"));
    const LEN: u64 = 64 << 20;
    let src = a.alloc_host("src", LEN).unwrap();
    let (dst, spare) = (
        b.alloc_host("dst", LEN).unwrap(),
        b.alloc_host("spare", 1 << 20).unwrap(),
    );
    let rs = a.register(&src).unwrap();
    let (rd, rspare) = (b.register(&dst).unwrap(), b.register(&spare).unwrap());
    let peer = a.connect_to(&b.listen_addr().to_string()).unwrap();
    let remote = peer.desc(rd.id(), 0, LEN).unwrap();
    let t = a
        .write(&peer, &[rs.all()], std::slice::from_ref(&remote), None)
        .unwrap();
    std::thread::sleep(Duration::from_millis(5));
    dst.free(Duration::from_secs(30)).unwrap();
    match t.wait(T) {
        Err(Error::Revoked {
            side: Side::Remote, ..
        }) => {}
        Ok(()) => eprintln!("the WRITE finished before the free"),
        other => panic!("expected a remote revoke, got {other:?}"),
    }
    let small = rs.desc(0, 1 << 20).unwrap();
    a.write(
        &peer,
        &[small],
        &[peer.desc(rspare.id(), 0, 1 << 20).unwrap()],
        None,
    )
    .unwrap()
    .wait(T)
    .unwrap();
}

/// A TCP agent and a simulated one cannot reach each other: the handshake says so.
#[test]
fn agents_of_different_backends_are_refused_at_the_handshake_saying_why() {
    let a = agent("a3");
    let s = Agent::builder("s3").build().unwrap();
    let e = s.connect_to(&a.listen_addr().to_string()).unwrap_err();
    let e = e.to_string();
    assert!(e.contains("sim NICs") && e.contains("tcp"), "{e}");
}

/// A READ's notification, a notification on its own, and a peer's free told to the reader,
/// over TCP NICs (on the socket path and on shared memory).
#[test]
fn a_reads_notification_and_a_peers_free_reach_the_other_side_over_tcp() {
    for shm in [false, true] {
        let build = |name: &str| {
            Agent::builder(name)
                .tcp()
                .tcp_shm(shm)
                .stall_timeout(Duration::from_secs(20))
                .build()
                .unwrap()
        };
        let (decode, prefill) = (build("decode"), build("prefill"));
        const BLOCK: u64 = 64 << 10;
        let kv = prefill.alloc_host("kv", 16 * BLOCK).unwrap();
        let data = pattern(16 * BLOCK, 5);
        kv.write(0, &data).unwrap();
        let _pool = prefill.register(&kv).unwrap();
        let peer = decode.connect(&prefill.metadata_blob().unwrap()).unwrap();
        let info = peer.wait_region("kv", T).unwrap();
        let theirs = peer.blocks(info.id, BLOCK).unwrap();
        let mine_mem = decode.alloc_host("mine", 4 * BLOCK).unwrap();
        let mine = decode.register(&mine_mem).unwrap().blocks(BLOCK).unwrap();
        let t = decode
            .read_blocks(
                &peer,
                &mine,
                &[0, 1, 2, 3],
                &theirs,
                &[9, 2, 15, 4],
                Some(dmaplane::Notify::new("done:1", b"read".to_vec())),
            )
            .unwrap();
        t.wait(T).unwrap();
        let n = prefill
            .next_notification_matching(&dmaplane::NotifyFilter::any().from("decode"), T)
            .unwrap();
        assert_eq!((n.tag.as_str(), n.transfer), ("done:1", Some(t.id())));
        for (slot, id) in [9u64, 2, 15, 4].into_iter().enumerate() {
            let mut got = vec![0u8; BLOCK as usize];
            mine_mem.read(slot as u64 * BLOCK, &mut got).unwrap();
            let at = (id * BLOCK) as usize;
            assert_eq!(got, data[at..at + BLOCK as usize], "shm {shm}: block {id}");
        }
        let p = prefill.peer("decode").unwrap();
        prefill
            .notify(&p, dmaplane::Notify::tag_only("on its own"))
            .unwrap();
        assert_eq!(decode.next_notification(T).unwrap().tag, "on its own");
        kv.free(T).unwrap();
        let due = std::time::Instant::now() + T;
        let gone = loop {
            if let Some(e) = decode
                .events()
                .into_iter()
                .find(|e| matches!(e, dmaplane::Event::PeerRegionGone { .. }))
            {
                break e;
            }
            assert!(
                std::time::Instant::now() < due,
                "shm {shm}: decode was not told"
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        assert!(
            matches!(&gone, dmaplane::Event::PeerRegionGone { peer, region, .. } if peer == "prefill" && *region == info.id),
            "{gone:?}"
        );
        let e = decode
            .read_blocks(&peer, &mine, &[0], &theirs, &[0], None)
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
    }
}
