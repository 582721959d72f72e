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

fn agent(name: &str) -> Agent {
    Agent::builder(name)
        .tcp()
        .stall_timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

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
