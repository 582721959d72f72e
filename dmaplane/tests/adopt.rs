//! A caller's buffers as registrations: NICs read and write them in place, and they come back
//! (the same allocation) only after every NIC that reached them was revoked.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use dmaplane::{Agent, Error, Side, Testbed};

mod common;
use common::{T, meet_under_way, pattern};

fn agent(tb: &Arc<Testbed>, name: &str, nic: &str, fault: Option<dmaplane::Fault>) -> Agent {
    Agent::builder(name)
        .testbed(tb.clone())
        .nics([nic])
        .inject(fault)
        .build()
        .unwrap()
}

/// A WRITE of all of `src` to all of the peer's `dst`.
fn write_all(
    a: &Agent,
    peer: &dmaplane::Peer,
    src: &dmaplane::Region,
    dst: &dmaplane::Region,
) -> dmaplane::Transfer {
    let remote = peer.desc(dst.id(), 0, src.len()).unwrap();
    a.write(peer, &[src.all()], std::slice::from_ref(&remote), None)
        .unwrap()
}

#[test]
fn a_callers_buffers_are_written_and_read_in_place_and_handed_back() {
    let tb = Testbed::builtin().unwrap();
    let (a, b) = (agent(&tb, "a", "nic0", None), agent(&tb, "b", "nic1", None));
    // Not a whole number of pages: a caller's buffer is whatever the caller has.
    const LEN: usize = (4 << 20) + 1000;
    let (src, dst, back) = (pattern(1, LEN), vec![0u8; LEN], vec![0u8; LEN]);
    let (src_at, dst_at, back_at) = (src.as_ptr(), dst.as_ptr(), back.as_ptr());
    let src = a.adopt("src", src).unwrap();
    let back = a.adopt("back", back).unwrap();
    let dst = b.adopt("dst", dst).unwrap();
    let (rs, rback, rd) = (
        a.register(&src).unwrap(),
        a.register(&back).unwrap(),
        b.register(&dst).unwrap(),
    );
    let peer = a.connect(&b.metadata_blob().unwrap()).unwrap();
    let remote = [peer.desc(rd.id(), 0, LEN as u64).unwrap()];
    a.write(&peer, &[rs.all()], &remote, None)
        .unwrap()
        .wait(T)
        .unwrap();
    a.read(&peer, &[rback.all()], &remote, None)
        .unwrap()
        .wait(T)
        .unwrap();
    let dst = dst.reclaim(T).unwrap();
    let back = back.reclaim(T).unwrap();
    let src = src.reclaim(T).unwrap();
    assert_eq!(
        (src.as_ptr(), dst.as_ptr(), back.as_ptr()),
        (src_at, dst_at, back_at),
        "the NICs worked on the caller's own allocations"
    );
    assert!(
        dst == pattern(1, LEN),
        "the WRITE landed in the caller's buffer"
    );
    assert!(back == dst, "the READ landed in the caller's buffer");
    let v = tb.fabric().oracle().verdict();
    assert!(v.is_clean(), "{v}: {:?}", v.violations);
}

#[test]
fn reclaiming_a_buffer_under_a_transfer_is_a_typed_error_and_it_comes_back_after_the_ack() {
    let tb = Testbed::builtin().unwrap();
    let (a, b) = (agent(&tb, "a", "nic0", None), agent(&tb, "b", "nic1", None));
    const LEN: u64 = 64 << 20;
    let src = a.alloc_host("src", LEN).unwrap();
    src.write(0, &pattern(2, LEN as usize)).unwrap();
    let rs = a.register(&src).unwrap();
    let peer_of = |dst: &dmaplane::Memory| {
        let rd = b.register(dst).unwrap();
        let peer = a.connect(&b.metadata_blob().unwrap()).unwrap();
        (rd, peer)
    };
    let mut found = None;
    for i in 0..20 {
        let dst = b
            .adopt(&format!("dst{i}"), vec![0u8; LEN as usize])
            .unwrap();
        let (rd, peer) = peer_of(&dst);
        let (reclaimed, outcome) = meet_under_way(
            || write_all(&a, &peer, &rs, &rd),
            |_| dst.reclaim(Duration::from_secs(2)),
        );
        if outcome.is_err() {
            found = Some((reclaimed.unwrap(), outcome, rd));
            break;
        }
    }
    let (buf, outcome, rd) = found.expect("no reclaim met a transfer under way");
    assert_eq!(buf.len(), LEN as usize);
    match outcome {
        Err(Error::Revoked {
            side: Side::Remote,
            region,
            ..
        }) => assert_eq!(region, rd.id()),
        other => panic!("expected the remote revoke, got {other:?}"),
    }
    // What landed before the revoke is the source's bytes, in place; nothing after the ack.
    let want = pattern(2, LEN as usize);
    let landed = buf.iter().zip(&want).filter(|(x, y)| x == y).count();
    assert!(landed > 0, "nothing landed in the caller's buffer");
    let v = tb.fabric().oracle().verdict();
    assert!(v.is_clean(), "{v}: {:?}", v.violations);
    assert!(v.acks >= 1, "{v}");
}

#[test]
fn memory_the_agent_allocated_is_not_reclaimed_and_a_buffer_whose_nic_missed_the_ack_is_kept() {
    let tb = Testbed::builtin().unwrap();
    {
        let a = agent(&tb, "a", "nic0", None);
        let own = a.alloc_host("own", 4096).unwrap();
        let err = own.reclaim(T).map(|v| v.len()).unwrap_err();
        assert!(err.to_string().contains("Agent::adopt"), "{err}");
        assert!(!own.is_freed(), "a refused reclaim leaves the memory alone");
    }

    // A reclaim whose deadline no NIC can meet (requests are in flight): the revoke goes on
    // (the transfer ends revoked, the fabric fences the NIC off), but the buffer is kept.
    // Whether requests are still in flight when the reclaim lands is a race the test cannot
    // win every time (the transfer may finish between the look at its status and the
    // reclaim): a reclaim that met no request hands the buffer back, honestly, and the test
    // tries again with a new buffer until one meets a NIC that misses the ack.
    // Each attempt has agents of its own: a WRITE that met the zapped region in an earlier
    // attempt broke that connection's queue pairs.
    const LEN: u64 = 64 << 20;
    let mut met = None;
    for attempt in 0..20 {
        let (a, b) = (agent(&tb, "a", "nic0", None), agent(&tb, "b", "nic1", None));
        let src = a.alloc_host("src", LEN).unwrap();
        let rs = a.register(&src).unwrap();
        let dst = b
            .adopt(&format!("dst-{attempt}"), vec![0u8; LEN as usize])
            .unwrap();
        let rd = b.register(&dst).unwrap();
        let peer = a.connect(&b.metadata_blob().unwrap()).unwrap();
        let remote = peer.desc(rd.id(), 0, LEN).unwrap();
        let (kept, outcome) = meet_under_way(
            || {
                a.write(&peer, &[rs.all()], std::slice::from_ref(&remote), None)
                    .unwrap()
            },
            |_| dst.reclaim(Duration::ZERO).map(|v| v.len()),
        );
        match kept {
            // Nothing was in flight after all: handed back whole.
            Ok(len) => assert_eq!(len, LEN as usize),
            Err(err) => {
                met = Some((err, outcome, dst));
                break;
            }
        }
    }
    let Some((err, outcome, dst)) = met else {
        panic!("no reclaim met a request in flight in 20 tries");
    };
    assert!(err.to_string().contains("not handed back"), "{err}");
    assert!(err.to_string().contains("missed the deadline"), "{err}");
    assert!(dst.is_freed());
    // The NIC was fenced off before it quiesced, so its request may end with the remote
    // access error the responder gave instead of the revoke.
    assert!(
        matches!(
            outcome,
            Err(Error::Revoked { .. }) | Err(Error::Failed { .. })
        ),
        "{outcome:?}"
    );
    // The NIC that missed the deadline is fenced off by the fabric, which the oracle sees;
    // nothing reached the memory after the ack.
    let v = tb.fabric().oracle().verdict();
    assert_eq!((v.dma_after_fence, v.dma_after_ack), (0, 0), "{v}");
    assert_eq!(v.reused_before_ack, 0, "{v}");
}

#[test]
fn the_testbed_has_no_kernel_dma_bufs_to_import() {
    let tb = Testbed::builtin().unwrap();
    let a = agent(&tb, "a", "nic0", None);
    let fd = std::os::fd::OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    let err = a.import_dmabuf("x", fd).map(|m| m.len()).unwrap_err();
    assert!(err.to_string().contains("no kernel dma-bufs"), "{err}");
}

/// Memory lent by another owner ([`dmaplane::Lent`]): a boxed slice that records when it is
/// given back.
struct Lender {
    bytes: Box<[u8]>,
    read_only: bool,
    returned: Arc<std::sync::atomic::AtomicBool>,
}

// SAFETY: the box is one allocation that neither moves nor is freed until the lender drops,
// and no code touches it through references meanwhile (the test reads it only through the
// agent's `Memory::read`).
unsafe impl dmaplane::Lent for Lender {
    fn ptr(&self) -> std::ptr::NonNull<u8> {
        std::ptr::NonNull::from(&self.bytes[0])
    }
    fn len(&self) -> usize {
        self.bytes.len()
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
}

impl Drop for Lender {
    fn drop(&mut self) {
        self.returned
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn lender(
    bytes: Vec<u8>,
    read_only: bool,
) -> (Box<dyn dmaplane::Lent>, Arc<std::sync::atomic::AtomicBool>) {
    let returned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let l = Lender {
        bytes: bytes.into_boxed_slice(),
        read_only,
        returned: returned.clone(),
    };
    (Box::new(l), returned)
}

#[test]
fn lent_memory_is_moved_in_place_and_given_back_only_at_the_free() {
    let tb = Testbed::builtin().unwrap();
    let (a, b) = (agent(&tb, "a", "nic0", None), agent(&tb, "b", "nic1", None));
    const LEN: usize = 1 << 20;
    let (l, returned) = lender(vec![0u8; LEN], false);
    let mine = a.lend("lent", l).unwrap();
    let ra = a.register(&mine).unwrap();
    let theirs = b.alloc_host("theirs", LEN as u64).unwrap();
    let data = pattern(4, LEN);
    theirs.write(0, &data).unwrap();
    let rb = b.register(&theirs).unwrap();
    let peer = a.connect(&b.metadata_blob().unwrap()).unwrap();
    let remote = peer.desc(rb.id(), 0, LEN as u64).unwrap();
    a.read(&peer, &[ra.all()], std::slice::from_ref(&remote), None)
        .unwrap()
        .wait(T)
        .unwrap();
    let mut got = vec![0u8; LEN];
    mine.read(0, &mut got).unwrap();
    assert_eq!(got, data, "the READ landed in the lent bytes");
    drop(ra);
    assert!(!returned.load(std::sync::atomic::Ordering::SeqCst));
    mine.free(T).unwrap();
    // Given back once the last reference of the revoked memory goes (the engine's and the
    // NICs' go right after the free).
    let due = std::time::Instant::now() + T;
    while !returned.load(std::sync::atomic::Ordering::SeqCst) && std::time::Instant::now() < due {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(
        returned.load(std::sync::atomic::Ordering::SeqCst),
        "the lender is dropped after the free"
    );
}

#[test]
fn read_only_lent_memory_is_a_source_never_a_target() {
    let tb = Testbed::builtin().unwrap();
    let (a, b) = (agent(&tb, "a", "nic0", None), agent(&tb, "b", "nic1", None));
    const LEN: usize = 64 << 10;
    let data = pattern(6, LEN);
    let (l, _) = lender(data.clone(), true);
    let weights = a.lend("weights", l).unwrap();
    assert!(weights.is_read_only());
    let ra = a.register(&weights).unwrap();
    assert!(ra.publish().is_read_only(), "peers get no write right");
    let dst = b.alloc_host("dst", LEN as u64).unwrap();
    let rb = b.register(&dst).unwrap();
    let peer = a.connect(&b.metadata_blob().unwrap()).unwrap();
    let remote = peer.desc(rb.id(), 0, LEN as u64).unwrap();
    // A source: written to the peer.
    a.write(&peer, &[ra.all()], std::slice::from_ref(&remote), None)
        .unwrap()
        .wait(T)
        .unwrap();
    let mut got = vec![0u8; LEN];
    dst.read(0, &mut got).unwrap();
    assert_eq!(got, data);
    // Never a target: a READ into it is refused naming why, and so is a local write.
    let e = a
        .read(&peer, &[ra.all()], std::slice::from_ref(&remote), None)
        .unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    assert!(weights.write(0, b"x").is_err());
    // The peer's WRITE into it is refused by the NIC (no remote write right), bytes unchanged.
    // The connection a made serves b too (a second one is refused).
    let due = std::time::Instant::now() + T;
    let mut back = b.peer("a");
    while back.is_none() && std::time::Instant::now() < due {
        std::thread::sleep(std::time::Duration::from_millis(1));
        back = b.peer("a");
    }
    let back = back.expect("a connected to b");
    let mut into = back.desc(ra.id(), 0, LEN as u64);
    while into.is_err() && std::time::Instant::now() < due {
        std::thread::sleep(std::time::Duration::from_millis(1));
        into = back.desc(ra.id(), 0, LEN as u64);
    }
    let into = into.unwrap();
    let e = b
        .write(&back, &[rb.all()], std::slice::from_ref(&into), None)
        .and_then(|t| t.wait(T));
    assert!(e.is_err(), "a peer wrote into read-only lent memory");
    weights.read(0, &mut got).unwrap();
    assert_eq!(got, data);
}
