//! A peer on the TCP backend's data port that breaks the rules on purpose: it holds a valid token
//! (so it passes the hello) and then sends frames it should not, or stalls in the middle of one.
//! The NIC refuses, counts, and never lets such a peer hold up a revoke; strangers that never
//! say hello are bounded and counted. The same of the shared-memory lanes: a lane without the
//! token, one asking for keys it was not granted, one that never drops its view, one that sends
//! garbage.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmaplane_core::user::UserBuffer;
use dmaplane_rdma::tcp::frame::{self, FIRST, HEADER, Header, Kind, LAST};
use dmaplane_rdma::tcp::{MAX_UNPROVEN, gid_of, proof};
use dmaplane_rdma::*;

const T: Duration = Duration::from_secs(10);

struct Target {
    nic: Arc<TcpNic>,
    _dev: Device,
    pd: Pd,
    cq: Cq,
    /// The responder QP the hostile peer talks to, and the QP it claims to be.
    qp: Qp,
    peer_qpn: u32,
}

/// A responder QP connected to a (never used) QP of another NIC, whose number the hostile peer
/// claims.
fn target() -> (Target, Qp) {
    let nic = Arc::new(TcpNic::loopback("target").unwrap());
    let dev = Device::new(nic.clone());
    let pd = dev.alloc_pd().unwrap();
    let cq = dev.create_cq(256).unwrap();
    let qp = pd.create_qp(&cq, &cq, QpCaps::default()).unwrap();
    let other = Arc::new(TcpNic::loopback("other").unwrap());
    let odev = Device::new(other);
    let opd = odev.alloc_pd().unwrap();
    let ocq = odev.create_cq(256).unwrap();
    let oqp = opd.create_qp(&ocq, &ocq, QpCaps::default()).unwrap();
    qp.connect(oqp.endpoint(), MrAccess::ALL).unwrap();
    let peer_qpn = oqp.qpn();
    (
        Target {
            nic,
            _dev: dev,
            pd,
            cq,
            qp,
            peer_qpn,
        },
        oqp,
    )
}

fn read_header(s: &mut TcpStream) -> Header {
    let mut b = [0u8; HEADER];
    s.read_exact(&mut b).unwrap();
    Header::decode(&b, false).unwrap()
}

/// Connect to the target's data port and pass the hello with the real token.
fn hello(t: &Target) -> TcpStream {
    hello_and_lane(t).0
}

/// [`hello`], and the lane listener the welcome names.
fn hello_and_lane(t: &Target) -> (TcpStream, u64) {
    let mut s = TcpStream::connect(t.nic.addr()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let c = read_header(&mut s);
    assert_eq!(c.kind, Kind::Challenge);
    let mut nonce = [0u8; 32];
    s.read_exact(&mut nonce).unwrap();
    let ep = t.qp.endpoint();
    let gid = gid_of("127.0.0.1".parse().unwrap());
    let mut h = Header::new(Kind::Hello);
    h.rkey = ep.qpn;
    h.arg = t.peer_qpn;
    h.addr = u64::from(frame::VERSION);
    h.payload = frame::HELLO_PAYLOAD;
    let mut out = h.encode().to_vec();
    out.extend_from_slice(&gid);
    out.extend_from_slice(&proof(&ep.token, &nonce, ep.qpn, t.peer_qpn, &gid));
    s.write_all(&out).unwrap();
    let w = read_header(&mut s);
    assert_eq!(w.kind, Kind::Welcome);
    (s, w.addr)
}

fn write_frame(seq: u32, rkey: u32, addr: u64, payload: u32) -> [u8; HEADER] {
    let mut h = Header::new(Kind::Write);
    h.seq = seq;
    h.flags = FIRST | LAST;
    h.rkey = rkey;
    h.addr = addr;
    h.payload = payload;
    h.encode()
}

/// The peer sends a frame's header and half its payload, then stalls. A revoke must not wait
/// for it: the zap waits for one system call, never for a peer. After the revoke's ack the rest
/// of the frame lands nowhere.
#[test]
fn a_peer_stalled_in_the_middle_of_a_frame_does_not_hold_up_a_revoke() {
    let (t, _other) = target();
    const LEN: u64 = 1 << 20;
    let ub = UserBuffer::anonymous("target", LEN).unwrap();
    let mr =
        t.pd.import("target", ImportOptions::default(), None, |i, a| {
            ub.attach(i, a)
        })
        .unwrap();
    let mut s = hello(&t);
    s.write_all(&write_frame(0, mr.rkey(), mr.iova(), frame::MAX_PAYLOAD))
        .unwrap();
    s.write_all(&vec![0xab; (frame::MAX_PAYLOAD / 2) as usize])
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let ub = Arc::new(ub);
    let (tx, rx) = std::sync::mpsc::channel();
    let u = ub.clone();
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let report = u.revoke(T);
        let _ = tx.send((report, t0.elapsed()));
    });
    let Ok((report, took)) = rx.recv_timeout(Duration::from_secs(2)) else {
        panic!("the revoke is still waiting for a peer stalled in the middle of a frame");
    };
    assert!(report.is_clean(), "{report}");
    assert!(
        took < Duration::from_secs(1),
        "the revoke waited {took:?} for a stalled peer"
    );
    assert!(ub.write(0, &vec![0x5a; LEN as usize]));
    // The rest of the frame, and another: nothing lands.
    s.write_all(&vec![0xcd; (frame::MAX_PAYLOAD / 2) as usize])
        .unwrap();
    let _ = s.write_all(&write_frame(1, mr.rkey(), mr.iova(), 4096));
    let _ = s.write_all(&[0xee; 4096]);
    let h = read_header(&mut s);
    assert_eq!((h.kind, h.seq), (Kind::Nak, 0), "{h:?}");
    assert_eq!(frame::nak_status(h.arg), WcStatus::RemAccessErr);
    std::thread::sleep(Duration::from_millis(50));
    let mut got = vec![0u8; LEN as usize];
    assert!(ub.read(0, &mut got));
    assert!(
        got.iter().all(|&b| b == 0x5a),
        "bytes landed after the revoke's ack"
    );
    assert!(t.nic.stats().frames_refused >= 1);
}

/// Frames that break the rules end the connection, counted: a frame past the region's end, an
/// unknown key, one out of sequence, a second hello, a header that is not one.
#[test]
fn frames_that_break_the_rules_are_refused_counted_and_land_nothing() {
    let (t, _other) = target();
    let mem = dmaplane_core::fabric::Mapping::memfd("dst", 1 << 20).unwrap();
    let list = dmaplane_core::AddrList::single(
        dmaplane_core::AddrSpace::ProcessVa,
        dmaplane_core::Hints::HOST_MEMORY,
        1,
        dmaplane_core::DmaRange::new(mem.process_va(), 1 << 20),
    )
    .unwrap();
    let mr = t.pd.reg_mr(&list, MrAccess::ALL).unwrap();
    let end = mr.iova() + (1 << 20);
    let cases: Vec<(&str, Vec<u8>, Option<WcStatus>)> = vec![
        (
            "past the region's end",
            [
                write_frame(0, mr.rkey(), end - 100, 4096).to_vec(),
                vec![1; 4096],
            ]
            .concat(),
            Some(WcStatus::RemAccessErr),
        ),
        (
            "an unknown key",
            [
                write_frame(0, mr.rkey() ^ 0xff, mr.iova(), 64).to_vec(),
                vec![1; 64],
            ]
            .concat(),
            Some(WcStatus::RemAccessErr),
        ),
        (
            "out of sequence",
            [
                write_frame(7, mr.rkey(), mr.iova(), 64).to_vec(),
                vec![1; 64],
            ]
            .concat(),
            None,
        ),
        (
            "a second hello",
            {
                let mut h = Header::new(Kind::Hello);
                h.payload = frame::HELLO_PAYLOAD;
                [h.encode().to_vec(), vec![0; frame::HELLO_PAYLOAD as usize]].concat()
            },
            None,
        ),
        ("not a header", vec![0xff; HEADER], None),
    ];
    for (i, (what, bytes, nak)) in cases.into_iter().enumerate() {
        // Each case on a fresh pairing: a refused connection may leave the QP in ERR.
        if t.qp.state() != QpState::Rts {
            t.qp.modify(&QpAttr::to(QpState::Reset)).unwrap();
        }
        let before = t.nic.stats().frames_refused;
        if t.qp.state() == QpState::Reset {
            let dest = RemoteQp {
                port: 1,
                ..RemoteQp::verbs(t.peer_qpn, gid_of("127.0.0.1".parse().unwrap()), 0, 0)
            };
            t.qp.connect(dest, MrAccess::ALL).unwrap();
        }
        let mut s = hello(&t);
        s.write_all(&bytes).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        match nak {
            Some(st) => {
                assert!(rest.len() >= HEADER, "case {i} ({what}): no answer");
                let h = Header::decode(rest[..HEADER].try_into().unwrap(), false).unwrap();
                assert_eq!(
                    (h.kind, frame::nak_status(h.arg)),
                    (Kind::Nak, st),
                    "case {i} ({what})"
                );
            }
            None => assert!(
                rest.is_empty(),
                "case {i} ({what}): expected the connection to end unanswered, got {} bytes",
                rest.len()
            ),
        }
        assert_eq!(
            t.nic.stats().frames_refused,
            before + 1,
            "case {i} ({what}) was not counted"
        );
    }
    let mut got = vec![0u8; 1 << 20];
    assert!(mem.read(0, &mut got));
    assert!(got.iter().all(|&b| b == 0), "a refused frame landed bytes");
}

/// Strangers that connect and never say hello: at most MAX_UNPROVEN wait at once, the rest are
/// closed at once and counted; the NIC still serves a proper peer afterwards.
#[test]
fn connections_that_never_say_hello_are_bounded_and_counted() {
    let (t, _other) = target();
    let strangers: Vec<TcpStream> = (0..MAX_UNPROVEN + 20)
        .map(|_| TcpStream::connect(t.nic.addr()).unwrap())
        .collect();
    let due = Instant::now() + T;
    while t.nic.stats().unproven_closed < 20 && Instant::now() < due {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(t.nic.stats().unproven_closed >= 20, "{:?}", t.nic.stats());
    drop(strangers);
    // Their slots come back: a proper peer is served.
    let due = Instant::now() + T;
    loop {
        let mut s = TcpStream::connect(t.nic.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut b = [0u8; HEADER];
        if s.read_exact(&mut b).is_ok() {
            drop(s);
            break;
        }
        assert!(Instant::now() < due, "no slot came back");
    }
    let _s = hello(&t);
    assert!(t.nic.stats().connections >= 1);
}

/// A SEND under way into the first posted receive, its peer stalled, when the QP goes to ERR:
/// the responder stops serving at once, and every receive completes exactly once and in order —
/// the one under way first, never reported flushed while bytes may still land in it.
#[test]
fn receives_complete_once_and_in_order_when_a_send_under_way_meets_a_flush() {
    let (t, _other) = target();
    let mem = dmaplane_core::fabric::Mapping::memfd("rq", 3 * 4096).unwrap();
    let list = dmaplane_core::AddrList::single(
        dmaplane_core::AddrSpace::ProcessVa,
        dmaplane_core::Hints::HOST_MEMORY,
        1,
        dmaplane_core::DmaRange::new(mem.process_va(), 3 * 4096),
    )
    .unwrap();
    let mr = t.pd.reg_mr(&list, MrAccess::ALL).unwrap();
    let recvs: Vec<RecvWr> = (0..3)
        .map(|i| RecvWr::new(i + 1, mr.sge(i * 4096, 4096)))
        .collect();
    t.qp.post_recv(&recvs).unwrap();
    let mut s = hello(&t);
    let mut h = Header::new(Kind::Send);
    h.flags = FIRST | LAST;
    h.payload = 4096;
    s.write_all(&h.encode()).unwrap();
    s.write_all(&[7; 1000]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // The flush waits for the receive under way — and the responder, its QP in ERR, stops
    // waiting for the stalled peer: no peer can hold a flush (and a revoke behind it) for long.
    let flushed_at = Instant::now();
    t.qp.modify(&QpAttr::to(QpState::Err)).unwrap();
    let mut wcs = Vec::new();
    let due = Instant::now() + T;
    while wcs.len() < 3 && Instant::now() < due {
        t.cq.poll(&mut wcs, 16).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = flushed_at.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the flush waited {took:?} for the stalled peer: {wcs:?}"
    );
    std::thread::sleep(Duration::from_millis(50));
    t.cq.poll(&mut wcs, 16).unwrap();
    drop(s);
    let got: Vec<(u64, WcStatus)> = wcs.iter().map(|w| (w.wr_id, w.status)).collect();
    assert_eq!(
        got,
        [
            (1, WcStatus::WrFlushErr),
            (2, WcStatus::WrFlushErr),
            (3, WcStatus::WrFlushErr)
        ]
    );
}

mod lanes {
    use super::*;
    use dmaplane_rdma::tcp::shm::{self, Got, Kind as L, MapRefusal, Msg, Refusal};
    use std::os::fd::{AsFd, OwnedFd};

    /// A lane to the target's listener `id`, its hello answered with the token when `token`
    /// (else with a wrong proof). Returns the lane and the owner's answer.
    fn lane(t: &Target, id: u64, token: bool) -> (OwnedFd, Msg) {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let sock = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        rustix::net::connect(&sock, &shm::address(id).unwrap()).unwrap();
        shm::set_timeout(sock.as_fd(), T).unwrap();
        let Got::Msg(c, None) = shm::recv(sock.as_fd()).unwrap() else {
            panic!("no challenge");
        };
        if c.kind == L::Refuse {
            return (sock, c);
        }
        assert_eq!(c.kind, L::Challenge);
        let ep = t.qp.endpoint();
        let gid = gid_of("127.0.0.1".parse().unwrap());
        let key = if token { ep.token } else { [7u8; 16] };
        let mut h = Msg::with(L::Hello, ep.qpn);
        h.b = t.peer_qpn;
        h.gid = gid;
        h.blob = proof(&key, &shm::lane_nonce(&c.blob), ep.qpn, t.peer_qpn, &gid);
        shm::send(sock.as_fd(), &h, None).unwrap();
        let Got::Msg(a, None) = shm::recv(sock.as_fd()).unwrap() else {
            panic!("no answer to the hello");
        };
        (sock, a)
    }

    /// The next message (a file with it, if any).
    fn next(sock: &OwnedFd) -> (Msg, Option<OwnedFd>) {
        match shm::recv(sock.as_fd()).unwrap() {
            Got::Msg(m, f) => (m, f),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    fn memfd_mr(t: &Target, len: u64, access: MrAccess) -> (dmaplane_core::fabric::Mapping, Mr) {
        let mem = dmaplane_core::fabric::Mapping::memfd("lane-dst", len).unwrap();
        let list = dmaplane_core::AddrList::single(
            dmaplane_core::AddrSpace::ProcessVa,
            dmaplane_core::Hints::HOST_MEMORY,
            1,
            dmaplane_core::DmaRange::new(mem.process_va(), len),
        )
        .unwrap();
        let mr = t.pd.reg_mr(&list, access).unwrap();
        (mem, mr)
    }

    #[test]
    fn a_lane_without_the_token_is_refused_and_counted() {
        let (t, _other) = target();
        let (_s, id) = hello_and_lane(&t);
        assert_ne!(id, 0, "the welcome names no lane listener");
        let before = t.nic.stats();
        let (_l, a) = lane(&t, id, false);
        assert_eq!((a.kind, a.code), (L::Refuse, Refusal::Denied as u8));
        let after = t.nic.stats();
        assert_eq!(after.hellos_refused, before.hellos_refused + 1);
        assert_eq!(after.lanes, before.lanes);
        let (_l, a) = lane(&t, id, true);
        assert_eq!(a.kind, L::Welcome, "the token opens it");
        assert_eq!(t.nic.stats().lanes, before.lanes + 1);
        // A NIC with the path off refuses every lane.
        t.nic.set_shm(false);
        let (_l, a) = lane(&t, id, true);
        assert_eq!((a.kind, a.code), (L::Refuse, Refusal::Off as u8));
    }

    /// A proven lane gets views of what its QP may reach and nothing else: a key of another
    /// protection domain is refused (and the QP goes to ERR, as a nak does); a region it may
    /// only read comes as a file it cannot map for writing.
    #[test]
    fn a_lane_gets_only_what_was_granted() {
        let (t, _other) = target();
        let (_s, id) = hello_and_lane(&t);
        let (l, a) = lane(&t, id, true);
        assert_eq!(a.kind, L::Welcome);
        let (_ro_mem, ro) = memfd_mr(&t, 1 << 16, MrAccess::LOCAL_WRITE | MrAccess::REMOTE_READ);
        shm::send(l.as_fd(), &Msg::with(L::Map, ro.rkey()), None).unwrap();
        let (m, f) = next(&l);
        assert_eq!((m.kind, m.a), (L::Mapped, ro.rkey()));
        let f = f.expect("a view comes with its file");
        // SAFETY: a fresh mapping the kernel places; never touched, unmapped at once.
        let rw = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                1 << 16,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &f,
                0,
            )
        };
        assert_eq!(
            rw.err(),
            Some(rustix::io::Errno::ACCESS),
            "a read-only region came writable"
        );
        // Another protection domain's region: refused, counted, and the QP is in ERR.
        let other_pd = Device::new(t.nic.clone()).alloc_pd().unwrap();
        let mem = dmaplane_core::fabric::Mapping::memfd("other-pd", 4096).unwrap();
        let list = dmaplane_core::AddrList::single(
            dmaplane_core::AddrSpace::ProcessVa,
            dmaplane_core::Hints::HOST_MEMORY,
            1,
            dmaplane_core::DmaRange::new(mem.process_va(), 4096),
        )
        .unwrap();
        let foreign = other_pd.reg_mr(&list, MrAccess::ALL).unwrap();
        let before = t.nic.stats();
        shm::send(l.as_fd(), &Msg::with(L::Map, foreign.rkey()), None).unwrap();
        let (m, f) = next(&l);
        assert_eq!(
            (m.kind, m.a, m.code, f.is_none()),
            (
                L::MapRefused,
                foreign.rkey(),
                MapRefusal::Denied as u8,
                true
            )
        );
        let after = t.nic.stats();
        assert_eq!(after.frames_refused, before.frames_refused + 1);
        assert_eq!(after.views_shared, before.views_shared);
        assert_eq!(
            t.qp.state(),
            QpState::Err,
            "a refused key moves the QP to ERR"
        );
    }

    /// A lane that never answers `unmap`: the zap fails after UNMAP_WAIT, naming it, and the
    /// revoke reports the importer late — it is never acknowledged as clean.
    #[test]
    fn a_lane_that_keeps_its_view_makes_the_revoke_fail_not_lie() {
        let (t, _other) = target();
        let (_s, id) = hello_and_lane(&t);
        let (l, a) = lane(&t, id, true);
        assert_eq!(a.kind, L::Welcome);
        let ub = UserBuffer::memfd("kept", 1 << 16).unwrap();
        let mr =
            t.pd.import("kept", ImportOptions::default(), None, |i, acc| {
                ub.attach(i, acc)
            })
            .unwrap();
        shm::send(l.as_fd(), &Msg::with(L::Map, mr.rkey()), None).unwrap();
        assert_eq!(next(&l).0.kind, L::Mapped);
        let t0 = Instant::now();
        let report = ub.revoke(dmaplane_rdma::tcp::UNMAP_WAIT + Duration::from_secs(2));
        let took = t0.elapsed();
        assert!(
            !report.is_clean(),
            "the revoke was acknowledged clean: {report}"
        );
        assert!(took >= dmaplane_rdma::tcp::UNMAP_WAIT, "{took:?}");
        assert!(took < T, "the revoke took {took:?}");
        let (m, _) = next(&l);
        assert_eq!(
            (m.kind, m.a),
            (L::Unmap, mr.rkey()),
            "the lane was told to unmap"
        );
    }

    /// A region dropped without a revoke (a caller's `Mr` let go) asks its views back before it
    /// lets go of the memory: the drop waits for the peer's answer.
    #[test]
    fn a_region_dropped_without_a_revoke_asks_its_views_back() {
        let (t, _other) = target();
        let (_s, id) = hello_and_lane(&t);
        let (l, a) = lane(&t, id, true);
        assert_eq!(a.kind, L::Welcome);
        let (_mem, mr) = memfd_mr(&t, 1 << 16, MrAccess::ALL);
        let rkey = mr.rkey();
        shm::send(l.as_fd(), &Msg::with(L::Map, rkey), None).unwrap();
        assert_eq!(next(&l).0.kind, L::Mapped);
        // The peer's engine: answers the unmap once it comes.
        let peer = std::thread::spawn(move || {
            let (m, _) = next(&l);
            assert_eq!(
                (m.kind, m.a),
                (L::Unmap, rkey),
                "the view was not asked back"
            );
            shm::send(l.as_fd(), &Msg::with(L::Unmapped, rkey), None).unwrap();
            l
        });
        let before = t.nic.stats().views_dropped;
        drop(mr);
        let _l = peer.join().unwrap();
        assert_eq!(t.nic.stats().views_dropped, before + 1);
    }

    /// A QP that stops taking requests (ERR) winds its lane up: every view is asked back.
    #[test]
    fn a_qp_that_stops_responding_asks_its_views_back() {
        let (t, _other) = target();
        let (_s, id) = hello_and_lane(&t);
        let (l, a) = lane(&t, id, true);
        assert_eq!(a.kind, L::Welcome);
        let (_mem, mr) = memfd_mr(&t, 1 << 16, MrAccess::ALL);
        shm::send(l.as_fd(), &Msg::with(L::Map, mr.rkey()), None).unwrap();
        assert_eq!(next(&l).0.kind, L::Mapped);
        t.qp.modify(&QpAttr::to(QpState::Err)).unwrap();
        let (m, _) = next(&l);
        assert_eq!((m.kind, m.a), (L::Unmap, mr.rkey()));
        shm::send(l.as_fd(), &Msg::with(L::Unmapped, mr.rkey()), None).unwrap();
        // All dropped: the lane is closed.
        let due = Instant::now() + T;
        loop {
            match shm::recv(l.as_fd()).unwrap() {
                Got::End => break,
                Got::Nothing if Instant::now() < due => {}
                other => panic!("expected the lane's end, got {other:?}"),
            }
        }
    }

    /// Garbage on a proven lane closes it.
    #[test]
    fn garbage_on_a_lane_closes_it() {
        let (t, _other) = target();
        let (_s, id) = hello_and_lane(&t);
        let (l, a) = lane(&t, id, true);
        assert_eq!(a.kind, L::Welcome);
        rustix::net::send(&l, &[0xffu8; shm::LEN], rustix::net::SendFlags::empty()).unwrap();
        assert!(matches!(shm::recv(l.as_fd()).unwrap(), Got::End));
    }
}
