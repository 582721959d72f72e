//! Remote leases over a real TCP connection on 127.0.0.1, between two simulated NICs: the owner
//! revokes, the holder is told over TCP, quiesces and acks over TCP; a holder that never acks
//! is cut off, counted, and its later writes fail at the NIC without landing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmaplane_core::Exporter;
use dmaplane_core::fabric::{Fabric, HostMemory};
use dmaplane_core::topology::builtin;
use dmaplane_rdma::oob::{Oob, OobListener};
use dmaplane_rdma::*;

const T: Duration = Duration::from_secs(10);

struct Host {
    mem: dmaplane_core::fabric::DeviceId,
    nic: dmaplane_core::fabric::DeviceId,
    dev: Device,
    pd: Pd,
    cq: Cq,
}

fn host(net: &SimNetwork, mem: &str, nic: &str) -> Host {
    let sim = net.nic(nic).unwrap();
    let nic = sim.device_id();
    let dev = Device::new(sim);
    Host {
        mem: net.fabric().device(mem).unwrap(),
        nic,
        pd: dev.alloc_pd().unwrap(),
        cq: dev.create_cq(4096).unwrap(),
        dev,
    }
}

fn import(h: &Host, m: &HostMemory) -> Mr {
    h.pd.import("buf", ImportOptions::default(), None, |i, a| {
        m.attach(i, h.nic, a)
    })
    .unwrap()
}

/// Holder (nic0) and owner (nic1), one connected QP pair, and a lease link each over TCP.
struct Setup {
    fabric: Fabric,
    holder: Host,
    owner: Host,
    hqp: Qp,
    _oqp: Qp,
    hlink: LeaseLink,
    olink: LeaseLink,
}

fn setup() -> Setup {
    let fabric = Fabric::with_topology(builtin::testbed());
    let net = SimNetwork::new(&fabric);
    let holder = host(&net, "mem0", "nic0");
    let owner = host(&net, "mem1", "nic1");
    let hqp = holder
        .pd
        .create_qp(&holder.cq, &holder.cq, QpCaps::default())
        .unwrap();
    let oqp = owner
        .pd
        .create_qp(&owner.cq, &owner.cq, QpCaps::default())
        .unwrap();
    hqp.connect(oqp.endpoint(), MrAccess::ALL).unwrap();
    oqp.connect(hqp.endpoint(), MrAccess::ALL).unwrap();
    let listener = OobListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    // Both sides swap hellos at once, as two processes would.
    let (olink, hlink) = std::thread::scope(|s| {
        let hdev = holder.dev.clone();
        let h = s.spawn(move || LeaseLink::open(&hdev, Oob::connect(addr, T).unwrap(), T));
        let o = LeaseLink::open(&owner.dev, listener.accept(T).unwrap(), T).unwrap();
        (o, h.join().unwrap().unwrap())
    });
    assert_eq!(olink.peer_gid(), holder.dev.gid());
    assert_eq!(hlink.peer_gid(), owner.dev.gid());
    assert_eq!(hlink.peer_name(), owner.dev.name());
    Setup {
        fabric,
        holder,
        owner,
        hqp,
        _oqp: oqp,
        hlink,
        olink,
    }
}

/// Reap completions on `cq` until `n` arrived.
fn reap(cq: &Cq, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + T;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(Instant::now() < deadline, "{} of {n}: {got:?}", got.len());
        let want = n - got.len();
        if cq.poll(&mut got, want).unwrap() == 0 {
            cq.wait(Duration::from_millis(1)).unwrap();
        }
    }
    got
}

#[test]
fn revoke_over_tcp_is_acked_after_the_holder_quiesces() {
    let s = setup();
    let src_mem = HostMemory::new(&s.fabric, s.holder.mem, "src", 1 << 22).unwrap();
    let dst_mem = HostMemory::new(&s.fabric, s.owner.mem, "dst", 1 << 22).unwrap();
    let src = import(&s.holder, &src_mem);
    let dst = import(&s.owner, &dst_mem);
    let sent = s.olink.grant(&dst).unwrap();
    let remote = s.hlink.next_grant(T).unwrap();
    assert_eq!(
        (remote.addr(), remote.len(), remote.rkey()),
        (sent.addr, sent.len, sent.rkey)
    );
    assert_eq!(remote.access(), dst.access());
    assert!(s.hlink.try_grant().is_none());

    // Traffic that lands, checked.
    let data: Vec<u8> = (0..16384u32).map(|i| (i * 31 + 7) as u8).collect();
    assert!(src_mem.write(0, &data));
    s.hqp
        .post_send(&[SendWr::write(1, src.sge(0, 16384), remote.at(8192))])
        .unwrap();
    assert_eq!(reap(&s.holder.cq, 1)[0].status, WcStatus::Success);
    let mut got = vec![0u8; 16384];
    assert!(dst_mem.read(8192, &mut got));
    assert_eq!(got, data);

    // In flight when the owner revokes: the LeaseRevoke crosses TCP, the holder flushes its QP,
    // and its ack crosses back before the fence.
    let wrs: Vec<SendWr> = (0..200)
        .map(|i| SendWr::write(100 + i, src.sge(i * 16384, 16384), remote.at(i * 16384)))
        .collect();
    s.hqp.post_send(&wrs).unwrap();
    let deadline = Duration::from_secs(4);
    let (report, wcs) = std::thread::scope(|sc| {
        let r = sc.spawn(|| dst_mem.revoke(deadline));
        (r.join().unwrap(), reap(&s.holder.cq, 200))
    });
    assert!(report.is_clean(), "{report}");
    // Acked, not cut off (the cut-off is at three quarters of the deadline).
    assert!(
        Duration::from_micros(report.elapsed_us) < deadline * 3 / 4,
        "{report}"
    );
    let mut seen = [0u32; 200];
    for c in &wcs {
        assert!(
            matches!(c.status, WcStatus::Success | WcStatus::WrFlushErr),
            "{c:?}"
        );
        seen[(c.wr_id - 100) as usize] += 1;
    }
    assert!(seen.iter().all(|&n| n == 1), "every request exactly once");
    let (o, h) = (s.owner.dev.stats(), s.holder.dev.stats());
    assert_eq!(
        (o.leases_revoked, o.lease_acks, o.holders_cut_off),
        (1, 1, 0)
    );
    assert!(h.qps_flushed <= 1, "{h:?}");
    assert!(remote.is_revoked());
    assert_eq!(dst.revoked_at(), Some(0));
    // New posts to the revoked lease fail at once, with the epoch.
    let e = s
        .hqp
        .post_send(&[SendWr::write(9, src.sge(0, 8), remote.at(0))])
        .unwrap_err();
    assert!(matches!(e, RdmaError::Revoked { epoch: 0, .. }), "{e}");
    // Nothing reached memory after the owner's fence or its ack: the writer into dst is the
    // owner's NIC (the responder), and the oracle judges it.
    let v = s.fabric.oracle().verdict();
    assert!(v.is_clean(), "{v}: {:?}", v.violations);
    assert_eq!(v.acks, 1, "{v}");
    assert_eq!(s.fabric.faults(s.owner.nic).total(), 0);

    // A second export, granted over the same link, works as the first did.
    let dst2_mem = HostMemory::new(&s.fabric, s.owner.mem, "dst2", 1 << 16).unwrap();
    let dst2 = import(&s.owner, &dst2_mem);
    s.olink.grant(&dst2).unwrap();
    let remote2 = s.hlink.next_grant(T).unwrap();
    assert_eq!(remote2.rkey(), dst2.rkey());
    // The QP recovered after its flush: the write goes through.
    s.hqp
        .post_send(&[SendWr::write(2, src.sge(0, 4096), remote2.at(0))])
        .unwrap();
    assert_eq!(reap(&s.holder.cq, 1)[0].status, WcStatus::Success);
    let mut got = vec![0u8; 4096];
    assert!(dst2_mem.read(0, &mut got));
    assert_eq!(got, data[..4096]);
}

#[test]
fn a_holder_that_never_acks_is_cut_off_and_its_writes_never_land() {
    let mut s = setup();
    let src_mem = HostMemory::new(&s.fabric, s.holder.mem, "src", 1 << 16).unwrap();
    let dst_mem = HostMemory::new(&s.fabric, s.owner.mem, "dst", 1 << 16).unwrap();
    let src = import(&s.holder, &src_mem);
    let dst = import(&s.owner, &dst_mem);
    s.olink.grant(&dst).unwrap();
    let remote = s.hlink.next_grant(T).unwrap();
    // The holder hangs: the connection stays open, nothing it receives is handled.
    s.hlink.stop_receiving();
    assert!(s.hlink.ended().is_some());

    let deadline = Duration::from_millis(400);
    let report = dst_mem.revoke(deadline);
    let took = Duration::from_micros(report.elapsed_us);
    assert!(
        took >= deadline * 3 / 4 - Duration::from_millis(5),
        "{report}"
    );
    assert!(
        took < deadline,
        "the cut-off comes before the deadline: {report}"
    );
    let o = s.owner.dev.stats();
    assert_eq!(
        (o.leases_revoked, o.lease_acks, o.holders_cut_off),
        (1, 0, 1)
    );
    // The holder never heard of the revoke, so it posts; the NIC refuses the zapped key.
    assert!(!remote.is_revoked());
    assert!(src_mem.write(0, &[0xab; 4096]));
    s.hqp
        .post_send(&[SendWr::write(7, src.sge(0, 4096), remote.at(0))])
        .unwrap();
    let c = reap(&s.holder.cq, 1)[0];
    assert_eq!((c.wr_id, c.status), (7, WcStatus::RemAccessErr), "{c:?}");
    let mut got = vec![0u8; 4096];
    assert!(dst_mem.read(0, &mut got));
    assert!(
        got.iter().all(|&b| b != 0xab),
        "a write landed after the cut-off"
    );
}

#[test]
fn a_holder_whose_connection_is_gone_is_cut_off() {
    let s = setup();
    let dst_mem = HostMemory::new(&s.fabric, s.owner.mem, "dst", 1 << 16).unwrap();
    let dst = import(&s.owner, &dst_mem);
    s.olink.grant(&dst).unwrap();
    let _remote: Arc<RemoteMr> = s.hlink.next_grant(T).unwrap();
    drop(s.hlink);
    // The owner's receiver sees the close.
    let t = Instant::now();
    while s.olink.ended().is_none() {
        assert!(t.elapsed() < T, "the owner never saw the close");
        std::thread::sleep(Duration::from_millis(5));
    }
    let report = dst_mem.revoke(Duration::from_millis(400));
    assert_eq!(s.owner.dev.stats().holders_cut_off, 1, "{report}");
    assert_eq!(s.owner.dev.stats().lease_acks, 0);
    assert_eq!(dst.revoked_at(), Some(0));
    // A grant to a revoked region is refused.
    let e = s.olink.grant(&dst).unwrap_err();
    assert!(matches!(e, RdmaError::Revoked { .. }), "{e}");
}

#[test]
fn hello_must_come_first() {
    let listener = OobListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    let t = std::thread::spawn(move || {
        let o = Oob::connect(addr, T).unwrap();
        o.send(&serde_json::json!({"control": "nonsense"})).unwrap();
        // Keep the connection open until the other side has read it.
        std::thread::sleep(Duration::from_millis(200));
    });
    let fabric = Fabric::with_topology(builtin::testbed());
    let net = SimNetwork::new(&fabric);
    let h = host(&net, "mem0", "nic0");
    let e = LeaseLink::open(&h.dev, listener.accept(T).unwrap(), T).unwrap_err();
    assert!(matches!(e, RdmaError::Connection { .. }), "{e}");
    t.join().unwrap();
}

#[test]
fn grants_a_peer_could_abuse_are_ignored() {
    let listener = OobListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    let peer = std::thread::spawn(move || {
        let o = Oob::connect(addr, T).unwrap();
        o.send(&serde_json::json!({"hello": {"gid": vec![9u8; 16], "name": "rogue"}}))
            .unwrap();
        let _hello: serde_json::Value = o.recv(T).unwrap();
        // Wraps around the address space; unknown access bits; then a good one.
        let mr = |addr: u64, len: u64| serde_json::json!({"addr": addr, "len": len, "rkey": 5});
        for (m, access) in [
            (mr(u64::MAX - 10, 4096), 7),
            (mr(0x1000, 4096), 0x80),
            (mr(0x2000, 4096), 7),
        ] {
            o.send(&serde_json::json!({"grant": {"mr": m, "access": access}}))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
    });
    let fabric = Fabric::with_topology(builtin::testbed());
    let net = SimNetwork::new(&fabric);
    let h = host(&net, "mem0", "nic0");
    let link = LeaseLink::open(&h.dev, listener.accept(T).unwrap(), T).unwrap();
    assert_eq!(link.peer_name(), "rogue");
    let r = link.next_grant(T).unwrap();
    assert_eq!(
        (r.addr(), r.len(), r.access()),
        (0x2000, 4096, MrAccess::ALL)
    );
    assert!(link.try_grant().is_none());
    peer.join().unwrap();
    // The peer closed: no more grants, and the link says why.
    let e = link.next_grant(T).unwrap_err();
    assert!(e.to_string().contains("no more grants"), "{e}");
}

/// A holder that stops reading its lease link: grants (one per registration) queue up to the
/// bound and are then refused at once, naming the queue; none waits on the socket, so a
/// registration is never held up by a peer (before, each grant wrote the socket itself, and
/// once its buffers were full every grant waited out the 5 s write timeout).
#[test]
fn grants_to_a_holder_that_stopped_reading_never_block() {
    let listener = OobListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let silent = std::thread::spawn(move || {
        let o = Oob::connect(addr, T).unwrap();
        o.send(&serde_json::json!({"hello": {"gid": vec![9u8; 16], "name": "silent"}}))
            .unwrap();
        // Never reads again, until the test is over.
        let _ = stop_rx.recv();
        drop(o);
    });
    let fabric = Fabric::with_topology(builtin::testbed());
    let net = SimNetwork::new(&fabric);
    let owner = host(&net, "mem1", "nic1");
    let link = LeaseLink::open(&owner.dev, listener.accept(T).unwrap(), T).unwrap();
    let mem = HostMemory::new(&fabric, owner.mem, "buf", 4096).unwrap();
    let mr = import(&owner, &mem);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut refused = None;
            // Far more than the socket buffers hold.
            for _ in 0..200_000 {
                if let Err(e) = link.grant(&mr) {
                    refused = Some(e);
                    break;
                }
            }
            let _ = done_tx.send(refused);
        });
        // Generous: the grants take milliseconds; a grant that waited on the socket would
        // take 5 s each, from the first one the socket did not take.
        let refused = done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("grants to a holder that stopped reading blocked");
        let e = refused.expect("a full queue was never refused");
        assert!(e.to_string().contains("lease control"), "{e}");
        let _ = stop_tx.send(());
    });
    silent.join().unwrap();
}

/// A peer that grants without end: this device records at most `limit_leases` of its keys
/// (each refused one is named), a key granted again replaces its lease, and a hello naming
/// the device with control characters is refused.
#[test]
fn a_peer_cannot_grow_the_leases_held_past_the_limit() {
    let listener = OobListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    let peer = std::thread::spawn(move || {
        let o = Oob::connect(addr, T).unwrap();
        o.send(&serde_json::json!({"hello": {"gid": vec![9u8; 16], "name": "greedy"}}))
            .unwrap();
        let _hello: serde_json::Value = o.recv(T).unwrap();
        let grant = |rkey: u32| serde_json::json!({"grant": {"mr": {"addr": 0x1000, "len": 4096, "rkey": rkey}, "access": 7}});
        // Keys 1, 2, 3, then 1 again.
        for rkey in [1, 2, 3, 1] {
            o.send(&grant(rkey)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
    });
    let fabric = Fabric::with_topology(builtin::testbed());
    let net = SimNetwork::new(&fabric);
    let h = host(&net, "mem0", "nic0");
    h.dev.limit_leases(2);
    let link = LeaseLink::open(&h.dev, listener.accept(T).unwrap(), T).unwrap();
    let mut got = Vec::new();
    while let Ok(r) = link.next_grant(Duration::from_millis(500)) {
        got.push(r.rkey());
    }
    assert_eq!(
        got,
        [1, 2, 1],
        "key 3 is past the limit; key 1 again replaces its lease"
    );
    peer.join().unwrap();
    // The direct call names why.
    let info = oob::RemoteMrInfo {
        addr: 0x1000,
        len: 4096,
        rkey: 4,
    };
    let e = h
        .dev
        .hold([9; 16], "greedy", info, MrAccess::ALL, link.control_link())
        .unwrap_err();
    assert!(e.to_string().contains("limit_leases"), "{e}");
    // Key 3 came over the link (key 4 was this test's own call).
    assert_eq!(h.dev.stats().lease_messages_refused, 1);

    // A device name with a control character in the lease hello.
    let listener = OobListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    let liar = std::thread::spawn(move || {
        let o = Oob::connect(addr, T).unwrap();
        o.send(&serde_json::json!({"hello": {"gid": vec![9u8; 16], "name": "nic\u{1b}[2J"}}))
            .unwrap();
        let _ = o.recv::<serde_json::Value>(Duration::from_millis(500));
    });
    let h2 = host(&net, "mem1", "nic1");
    let e = LeaseLink::open(&h2.dev, listener.accept(T).unwrap(), T).unwrap_err();
    assert!(e.to_string().contains("control characters"), "{e}");
    liar.join().unwrap();
}

/// Two holders that share a GID (two processes on one NIC, or one that declares the other's):
/// an ack speaks only for the link it came over. A liar that acks twice for the GID settles
/// its own hold, never the other holder's: the hung holder is still cut off at the deadline's
/// three quarters (before, the second ack let the revoke finish as if it had acknowledged).
#[test]
fn an_ack_settles_only_the_holder_of_its_own_link() {
    let mut s = setup();
    let dst_mem = HostMemory::new(&s.fabric, s.owner.mem, "dst", 1 << 16).unwrap();
    let dst = import(&s.owner, &dst_mem);
    // The liar declares the honest holder's GID.
    let gid = s.holder.dev.gid();
    let listener = OobListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    let liar = std::thread::spawn(move || {
        let o = Oob::connect(addr, T).unwrap();
        o.send(&serde_json::json!({"hello": {"gid": gid, "name": "liar"}}))
            .unwrap();
        let _hello: serde_json::Value = o.recv(T).unwrap();
        // Its grant, then the revoke: answered with two acks in the honest holder's name.
        loop {
            let m: serde_json::Value = o.recv(T).unwrap();
            if let Some(r) = m["control"].get("LeaseRevoke") {
                let ack = serde_json::json!({"control": {"LeaseAck": {
                    "holder": gid, "rkey": r["rkey"], "epoch": r["epoch"]
                }}});
                o.send(&ack).unwrap();
                o.send(&ack).unwrap();
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(600));
    });
    let liar_link = LeaseLink::open(&s.owner.dev, listener.accept(T).unwrap(), T).unwrap();
    s.olink.grant(&dst).unwrap();
    liar_link.grant(&dst).unwrap();
    let _remote = s.hlink.next_grant(T).unwrap();
    // The honest holder hangs: it will never ack.
    s.hlink.stop_receiving();

    let deadline = Duration::from_millis(400);
    let report = dst_mem.revoke(deadline);
    let o = s.owner.dev.stats();
    assert_eq!(o.leases_revoked, 2, "{report}");
    assert_eq!(
        o.holders_cut_off, 1,
        "the liar's second ack settled the hung holder: {report}"
    );
    let took = Duration::from_micros(report.elapsed_us);
    assert!(
        took >= deadline * 3 / 4 - Duration::from_millis(5),
        "{report}"
    );
    liar.join().unwrap();
}

/// The holder side: a revoke speaks only for the leases granted over its link, and a grant
/// cannot replace a lease of another open link. A liar that declares the owner's GID on a link
/// of its own can neither withdraw nor replace the owner's lease.
#[test]
fn a_revoke_over_another_link_leaves_the_lease_alone() {
    let s = setup();
    let dst_mem = HostMemory::new(&s.fabric, s.owner.mem, "dst", 1 << 16).unwrap();
    let dst = import(&s.owner, &dst_mem);
    s.olink.grant(&dst).unwrap();
    let remote = s.hlink.next_grant(T).unwrap();
    let owner_gid = s.owner.dev.gid();
    let listener = OobListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    let rkey = remote.rkey();
    let liar = std::thread::spawn(move || {
        let o = Oob::connect(addr, T).unwrap();
        o.send(&serde_json::json!({"hello": {"gid": owner_gid, "name": "liar"}}))
            .unwrap();
        let _hello: serde_json::Value = o.recv(T).unwrap();
        // The owner's key, granted again by the liar (replacing the lease marks it revoked).
        o.send(&serde_json::json!({"grant": {"mr": {"addr": 0, "len": 4096, "rkey": rkey}, "access": 7}}))
            .unwrap();
        let revoke = ControlMsg::LeaseRevoke {
            owner: owner_gid,
            rkey,
            epoch: 0,
            policy: QuiescePolicy::default(),
        };
        o.send(&serde_json::json!({ "control": revoke })).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    });
    let _liar_link = LeaseLink::open(&s.holder.dev, listener.accept(T).unwrap(), T).unwrap();
    liar.join().unwrap();
    assert!(
        !remote.is_revoked(),
        "the liar's grant or revoke withdrew the owner's lease"
    );
    assert_eq!(s.holder.dev.stats().lease_messages_refused, 2);
    // The owner's own revoke still does.
    dst_mem.revoke(Duration::from_millis(400));
    assert!(remote.is_revoked());
}
