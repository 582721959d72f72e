//! The simulated NIC end to end: real bytes through the fabric, precise errors for bad input,
//! and revoke by quiescing.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use dmaplane_core::fabric::{Fabric, HostMemory};
use dmaplane_core::topology::builtin;
use dmaplane_core::{AddrList, AddrSpace, DmaRange, Exporter, Hints};
use dmaplane_rdma::*;

struct Side {
    mem: dmaplane_core::fabric::DeviceId,
    nic: dmaplane_core::fabric::DeviceId,
    dev: Device,
    pd: Pd,
    cq: Cq,
}

fn side(net: &SimNetwork, mem: &str, nic: &str) -> Side {
    let sim = net.nic(nic).unwrap();
    let nic = sim.device_id();
    let dev = Device::new(sim);
    let pd = dev.alloc_pd().unwrap();
    let cq = dev.create_cq(4096).unwrap();
    Side {
        mem: net.fabric().device(mem).unwrap(),
        nic,
        dev,
        pd,
        cq,
    }
}

fn import(s: &Side, m: &HostMemory, opts: ImportOptions) -> Mr {
    s.pd.import("buf", opts, None, |i, a| m.attach(i, s.nic, a))
        .unwrap()
}

/// Host memory of `size` bytes on each side, imported by its NIC (a's with the default options,
/// b's with `b_opts`).
fn regions(
    fabric: &Fabric,
    a: &Side,
    b: &Side,
    size: u64,
    b_opts: ImportOptions,
) -> (HostMemory, HostMemory, Mr, Mr) {
    let ma = HostMemory::new(fabric, a.mem, "a", size).unwrap();
    let mb = HostMemory::new(fabric, b.mem, "b", size).unwrap();
    let ra = import(a, &ma, ImportOptions::default());
    let rb = import(b, &mb, b_opts);
    (ma, mb, ra, rb)
}

fn wait_one(cq: &Cq) -> Completion {
    let mut v = Vec::new();
    for _ in 0..10_000 {
        cq.poll(&mut v, 1).unwrap();
        if let Some(c) = v.pop() {
            return c;
        }
        cq.wait(Duration::from_millis(1)).unwrap();
    }
    panic!("no completion");
}

fn setup() -> (Fabric, Side, Side, Qp, Qp) {
    let fabric = Fabric::with_topology(builtin::testbed());
    let net = SimNetwork::new(&fabric);
    let a = side(&net, "mem0", "nic0");
    let b = side(&net, "mem1", "nic1");
    let qa = a.pd.create_qp(&a.cq, &a.cq, QpCaps::default()).unwrap();
    let qb = b.pd.create_qp(&b.cq, &b.cq, QpCaps::default()).unwrap();
    qa.connect(qb.endpoint(), MrAccess::ALL).unwrap();
    qb.connect(qa.endpoint(), MrAccess::ALL).unwrap();
    (fabric, a, b, qa, qb)
}

#[test]
fn write_read_send_move_real_bytes() {
    let (fabric, a, b, qa, qb) = setup();
    let (ma, mb, ra, rb) = regions(&fabric, &a, &b, 1 << 20, ImportOptions::default());
    let remote = b.dev.lease(&rb, &a.dev);
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    assert!(ma.write(0, &data));
    qa.post_send(&[SendWr::write(1, ra.sge(0, 65536), remote.at(4096))])
        .unwrap();
    let c = wait_one(&a.cq);
    assert_eq!(
        (c.wr_id, c.status, c.byte_len),
        (1, WcStatus::Success, 65536)
    );
    let mut got = vec![0; 65536];
    assert!(mb.read(4096, &mut got));
    assert_eq!(got, data);
    // READ it back into another place of A.
    qa.post_send(&[SendWr::read(2, ra.sge(1 << 19, 65536), remote.at(4096))])
        .unwrap();
    assert_eq!(wait_one(&a.cq).status, WcStatus::Success);
    assert!(ma.read(1 << 19, &mut got));
    assert_eq!(got, data);
    // SEND with immediate into a posted receive.
    qb.post_recv(&[RecvWr::new(9, rb.sge(0, 4096))]).unwrap();
    qa.post_send(&[SendWr::send(3, ra.sge(0, 100)).with_imm(77)])
        .unwrap();
    assert_eq!(wait_one(&a.cq).status, WcStatus::Success);
    let r = wait_one(&b.cq);
    assert_eq!(
        (r.wr_id, r.opcode, r.byte_len, r.imm),
        (9, WcOpcode::Recv, 100, Some(77))
    );
    assert!(mb.read(0, &mut got[..100]));
    assert_eq!(&got[..100], &data[..100]);
    assert_eq!(
        fabric.faults(a.nic).total() + fabric.faults(b.nic).total(),
        0
    );
}

#[test]
fn bad_input_gets_precise_errors() {
    let (fabric, a, b, qa, _qb) = setup();
    let ma = HostMemory::new(&fabric, a.mem, "a", 1 << 16).unwrap();
    let mb = HostMemory::new(&fabric, b.mem, "b", 1 << 16).unwrap();
    let ra = import(&a, &ma, ImportOptions::default());
    let ro = import(
        &b,
        &mb,
        ImportOptions {
            access: MrAccess::REMOTE_READ,
            ..ImportOptions::default()
        },
    );
    let remote = b.dev.lease(&ro, &a.dev);
    // Wrong key.
    let mut sge = ra.sge(0, 8);
    sge.lkey ^= 0xdead;
    let e = qa
        .post_send(&[SendWr::write(1, sge, remote.at(0))])
        .unwrap_err();
    assert!(
        matches!(
            e,
            RdmaError::BadKey {
                key_kind: "lkey",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("no memory region with lkey"), "{e}");
    // Out of bounds, local and remote.
    let e = qa
        .post_send(&[SendWr::write(1, ra.sge(65530, 8), remote.at(0))])
        .unwrap_err();
    assert!(e.to_string().contains("is outside MR"), "{e}");
    let e = qa
        .post_send(&[SendWr::read(1, ra.sge(0, 8), remote.at(65530))])
        .unwrap_err();
    assert!(matches!(e, RdmaError::OutOfBounds { .. }), "{e}");
    // Missing access right: the remote region is read-only.
    let e = qa
        .post_send(&[SendWr::write(1, ra.sge(0, 8), remote.at(0))])
        .unwrap_err();
    assert!(e.to_string().contains("needs remote-write"), "{e}");
    // Illegal transition and post in the wrong state.
    let q = a.pd.create_qp(&a.cq, &a.cq, QpCaps::default()).unwrap();
    let e = q.modify(&QpAttr::to(QpState::Rts)).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("QP {:#x}: illegal transition RESET -> RTS", q.qpn())
    );
    let e = q.post_send(&[SendWr::send(1, ra.sge(0, 8))]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("QP {:#x}: cannot post send in state RESET", q.qpn())
    );
    // Registration of a list the NIC cannot use.
    let l = AddrList::new(
        AddrSpace::ProcessVa,
        Hints::HOST_MEMORY,
        4096,
        vec![DmaRange::new(0x1000, 0x1000)],
    )
    .unwrap();
    let e = a.pd.reg_mr(&l, MrAccess::ALL).unwrap_err();
    assert!(e.to_string().contains("list.space"), "{e}");
    // Nothing reached the fabric.
    assert_eq!(fabric.faults(a.nic).total(), 0);
}

/// A provider takes a batch up to the first request it refuses (mlx5 and rxe do). The requests
/// it took are in flight: the safe layer tracks them, so their completions find their slots and
/// a revoke's scan finds the QP that runs them.
#[test]
fn a_batch_the_provider_takes_in_part_is_tracked_and_quiesced() {
    let fabric = Fabric::with_topology(builtin::testbed());
    let net = SimNetwork::new(&fabric);
    let a = side(&net, "mem0", "nic0");
    let b = side(&net, "mem1", "nic1");
    let caps = QpCaps {
        max_send_sge: 1,
        ..QpCaps::default()
    };
    let qa = a.pd.create_qp(&a.cq, &a.cq, caps).unwrap();
    let qb = b.pd.create_qp(&b.cq, &b.cq, caps).unwrap();
    qa.connect(qb.endpoint(), MrAccess::ALL).unwrap();
    qb.connect(qa.endpoint(), MrAccess::ALL).unwrap();
    let flush = ImportOptions {
        policy: QuiescePolicy::Flush,
        ..ImportOptions::default()
    };
    let (_ma, mb, ra, rb) = regions(&fabric, &a, &b, 8 << 20, flush);
    let remote = b.dev.lease(&rb, &a.dev);
    let big = SendWr::write(7, ra.sge(0, 4 << 20), remote.at(0));
    let two = SgList::from_slice(&[ra.sge(0, 8), ra.sge(8, 8)]).unwrap();
    let bad = SendWr {
        sg: two,
        ..SendWr::write(8, ra.sge(0, 8), remote.at(0))
    };
    let e = qa.post_send(&[big, bad]).unwrap_err();
    assert!(
        matches!(
            &e,
            RdmaError::PartlyPosted { posted: 1, of: 2, refused: 8, source, .. }
                if matches!(**source, RdmaError::TooManySge { wr_id: 8, n: 2, max: 1, .. })
        ),
        "{e}"
    );
    assert_eq!(e.posted_prefix(), 1);
    assert!(e.to_string().contains("1 of 2 requests posted"), "{e}");
    assert_eq!(qa.outstanding(), (1, 0));
    // A revoke now must find the WRITE the provider took, and quiesce its QP.
    let report = mb.revoke(Duration::from_secs(1));
    assert!(report.is_clean(), "{report}");
    assert_eq!(
        a.dev.stats().qps_flushed,
        1,
        "the revoke's scan missed the QP"
    );
    let c = wait_one(&a.cq);
    assert_eq!(c.wr_id, 7, "{c:?}");
    assert!(
        matches!(c.status, WcStatus::Success | WcStatus::WrFlushErr),
        "{c:?}"
    );
    assert_eq!(qa.outstanding(), (0, 0));
    let v = fabric.oracle().verdict();
    assert!(v.is_clean(), "{v}: {:?}", v.violations);
}

#[test]
fn revoke_flushes_in_flight_work_and_fails_new_posts() {
    let (fabric, a, b, qa, _qb) = setup();
    let ma = HostMemory::new(&fabric, a.mem, "a", 1 << 22).unwrap();
    let mb = HostMemory::new(&fabric, b.mem, "b", 1 << 22).unwrap();
    let ra = import(&a, &ma, ImportOptions::default());
    let flush = ImportOptions {
        policy: QuiescePolicy::Flush,
        ..ImportOptions::default()
    };
    let rb = import(&b, &mb, flush);
    let remote = b.dev.lease(&rb, &a.dev);
    let wrs: Vec<SendWr> = (0..200)
        .map(|i| SendWr::write(i, ra.sge(i * 16384, 16384), remote.at(i * 16384)))
        .collect();
    qa.post_send(&wrs).unwrap();
    let report = mb.revoke(Duration::from_secs(1));
    assert!(report.is_clean(), "{report}");
    // New posts naming the revoked rkey fail at once, with the epoch.
    let e = qa
        .post_send(&[SendWr::write(999, ra.sge(0, 8), remote.at(0))])
        .unwrap_err();
    assert!(matches!(e, RdmaError::Revoked { epoch: 0, .. }), "{e}");
    // Every posted request completes exactly once: successes, then flushes.
    let mut seen = vec![0u32; 200];
    let mut v = Vec::new();
    while seen.iter().sum::<u32>() < 200 {
        let c = wait_one(&a.cq);
        assert!(
            matches!(c.status, WcStatus::Success | WcStatus::WrFlushErr),
            "{c:?}"
        );
        seen[c.wr_id as usize] += 1;
        v.push(c.status);
    }
    assert!(seen.iter().all(|&n| n == 1));
    // Flushes only after the successes (in order), and nothing touched memory after the ack.
    let first_flush = v
        .iter()
        .position(|s| *s == WcStatus::WrFlushErr)
        .unwrap_or(v.len());
    assert!(v[first_flush..].iter().all(|s| *s == WcStatus::WrFlushErr));
    // The writer into the revoked memory is b's NIC (the responder), judged by the oracle.
    let v = fabric.oracle().verdict();
    assert!(v.is_clean(), "{v}: {:?}", v.violations);
    assert_eq!((v.fences, v.acks), (1, 1), "{v}");
    assert_eq!(fabric.faults(b.nic).total(), 0);
    assert_eq!(a.dev.stats().qps_flushed, 1);
    assert_eq!(b.dev.stats().lease_acks, 1);
    // Recovery: once the flushes are reaped the QP is back in RTS.
    assert_eq!(qa.state(), QpState::Rts);
    let _ = Arc::strong_count(&remote);
}

#[test]
fn a_boundary_stops_flush_leaves_a_qp_back_in_rts_alone() {
    // A boundary stop ends with a flush of what stayed queued; when the QP already went back
    // to RTS (everything it had completed and was reaped before the stop's call back ran),
    // that flush must not happen: nobody would bring the QP out of ERR again, and every
    // later request on it would be flushed (seen as a transfer failing with WrFlushErr after
    // a free had met an earlier one).
    let (_fabric, _a, _b, qa, _qb) = setup();
    assert!(!qa.flush_stopped().unwrap());
    assert_eq!(qa.state(), QpState::Rts);
    qa.modify(&QpAttr::to(QpState::Sqd)).unwrap();
    assert!(qa.flush_stopped().unwrap());
    assert_eq!(qa.state(), QpState::Err);
}

#[test]
fn a_drained_qp_goes_back_to_rts_even_without_recover() {
    let (fabric, a, _b, qa, _qb) = setup();
    let ma = HostMemory::new(&fabric, a.mem, "a", 1 << 20).unwrap();
    let mr = import(
        &a,
        &ma,
        ImportOptions {
            policy: QuiescePolicy::Drain {
                deadline: Duration::from_secs(1),
            },
            recover: false,
            ..ImportOptions::default()
        },
    );
    // Receives reference the region: the revoke drains the QP through SQD.
    qa.post_recv(&[RecvWr::new(1, mr.sge(0, 4096))]).unwrap();
    let report = ma.revoke(Duration::from_secs(2));
    assert!(report.is_clean(), "{report}");
    let mut v = Vec::new();
    for _ in 0..2000 {
        a.cq.poll(&mut v, 16).unwrap();
        if qa.state() == QpState::Rts {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        qa.state(),
        QpState::Rts,
        "a drained QP must not stay in SQD"
    );
}

#[test]
fn the_old_key_of_a_refreshed_region_is_refused() {
    let (fabric, a, b, qa, _qb) = setup();
    let ma = HostMemory::new(&fabric, a.mem, "a", 1 << 20).unwrap();
    let mb = HostMemory::new(&fabric, b.mem, "b", 1 << 20).unwrap();
    let ra = import(
        &a,
        &ma,
        ImportOptions {
            kind: dmaplane_core::ImporterKind::Dynamic,
            ..ImportOptions::default()
        },
    );
    let rb = import(&b, &mb, ImportOptions::default());
    let remote = b.dev.lease(&rb, &a.dev);
    let old = ra.sge(0, 64);
    assert!(ma.relocate(Duration::from_secs(1)).unwrap().is_clean());
    ra.refresh(&a.pd).unwrap();
    assert_ne!(ra.lkey(), old.lkey);
    // A post still naming the old key must not pass (it would reach zapped memory).
    let e = qa
        .post_send(&[SendWr::write(7, old, remote.at(0))])
        .unwrap_err();
    assert!(
        matches!(e, RdmaError::BadKey { .. } | RdmaError::Revoked { .. }),
        "{e}"
    );
    // The new key works.
    qa.post_send(&[SendWr::write(8, ra.sge(0, 64), remote.at(0))])
        .unwrap();
    let c = wait_one(&a.cq);
    assert_eq!((c.wr_id, c.status), (8, WcStatus::Success));
}

/// The CPUs a thread of this process named `name` may run on, from /proc.
fn thread_cpus(name: &str) -> Option<String> {
    for t in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = t.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        if comm.trim() == name {
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string());
        }
    }
    None
}

#[test]
fn engines_run_on_the_cpus_they_were_given() {
    let cpus = dmaplane_core::cpu::allowed().unwrap();
    let last = *cpus.last().unwrap();
    let fabric = Fabric::with_topology(builtin::testbed());
    let net = SimNetwork::new(&fabric).with_engine_cpus(&[last]);
    // A name no other test's NIC uses: the engine thread is `sim-nic-<name>`.
    // (Thread names stop at 15 bytes: this one fits.)
    fabric.add_device("nic-pin");
    let _nic = net.nic("nic-pin").unwrap();
    let mut seen = None;
    for _ in 0..200 {
        seen = thread_cpus("sim-nic-nic-pin");
        if seen.as_deref() == Some(last.to_string().as_str()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(seen, Some(last.to_string()));
}

/// WRITEs from a to b's leased region, then b's memory revoked under them; `fault` on `who`.
/// Returns the oracle's verdict and the completions' statuses.
fn revoke_under_writes(
    inject: Option<(Fault, bool)>,
) -> (dmaplane_core::fabric::Verdict, Vec<WcStatus>) {
    let (fabric, a, b, qa, _qb) = setup();
    if let Some((f, on_importer)) = inject {
        if on_importer {
            b.dev.inject(Some(f))
        } else {
            a.dev.inject(Some(f))
        }
    }
    let (_ma, mb, ra, rb) = regions(&fabric, &a, &b, 1 << 22, ImportOptions::default());
    let remote = b.dev.lease(&rb, &a.dev);
    let wrs: Vec<SendWr> = (0..200)
        .map(|i| {
            SendWr::write(
                i,
                ra.sge(i * 16384 % (1 << 22), 16384),
                remote.at(i * 16384 % (1 << 22)),
            )
        })
        .collect();
    qa.post_send(&wrs).unwrap();
    // Under load: the first WRITE has landed, the others are queued or on their way.
    let first = wait_one(&a.cq);
    mb.revoke(Duration::from_millis(200));
    // One more WRITE after the ack, as a holder that ignores its lease would post it.
    let expect = 200
        + usize::from(
            qa.post_send(&[SendWr::write(999, ra.sge(0, 64), remote.at(0))])
                .is_ok(),
        );
    let mut statuses = vec![first.status];
    let mut v = Vec::new();
    for _ in 0..2000 {
        a.cq.poll(&mut v, 256).unwrap();
        statuses.extend(v.drain(..).map(|c| c.status));
        if statuses.len() >= expect {
            break;
        }
        a.cq.wait(Duration::from_millis(1)).unwrap();
    }
    (fabric.oracle().verdict(), statuses)
}

#[test]
fn an_honest_revoke_under_writes_is_clean_every_time() {
    for _ in 0..10 {
        let (v, st) = revoke_under_writes(None);
        assert!(v.is_clean(), "{v}: {:?}", v.violations);
        assert!(
            st.iter()
                .all(|s| matches!(s, WcStatus::Success | WcStatus::WrFlushErr)),
            "{st:?}"
        );
    }
}

#[test]
fn an_early_fence_is_named_by_the_oracle() {
    // Whether a WRITE is still landing when the lying fence is signalled depends on timing:
    // within a few rounds one is.
    let caught = (0..20).find_map(|_| {
        let (v, _) = revoke_under_writes(Some((Fault::EarlyFence, true)));
        (v.dma_after_fence > 0).then_some(v)
    });
    let v = caught.expect("an early fence was never caught");
    assert!(v.by_culprit.contains_key("nic1/buf"), "{:?}", v.by_culprit);
}

#[test]
fn a_holder_that_ignores_or_acks_early_hits_the_zapped_region() {
    for f in [Fault::IgnoreLeaseRevoke, Fault::AckThenWrite] {
        let (v, st) = revoke_under_writes(Some((f, false)));
        // The owner zapped before its fence: the NIC refused the holder's WRITEs, nothing reached
        // memory after the fence...
        assert!(v.is_clean(), "{f}: {v}");
        // ...and the holder sees remote access errors where an honest one sees flushes.
        assert!(st.contains(&WcStatus::RemAccessErr), "{f}: {st:?}");
    }
}

#[test]
fn without_the_zap_a_straggler_reaches_the_fabric_and_the_oracle_sees_it() {
    for inject in [false, true] {
        let (fabric, a, b, qa, _qb) = setup();
        if inject {
            b.dev.inject(Some(Fault::NoZap));
        }
        let (_ma, mb, ra, rb) = regions(&fabric, &a, &b, 1 << 16, ImportOptions::default());
        assert!(mb.revoke(Duration::from_secs(1)).is_clean());
        // A packet still on the wire: no lease stops it at the holder, only the zap at the owner.
        let straggler = RemoteAddr {
            addr: rb.iova(),
            rkey: rb.rkey(),
        };
        qa.post_send(&[SendWr::write(1, ra.sge(0, 64), straggler)])
            .unwrap();
        let c = wait_one(&a.cq);
        assert_eq!(c.status, WcStatus::RemAccessErr);
        let v = fabric.oracle().verdict();
        if inject {
            assert_eq!(v.blocked_by_backstop, 1, "{v}");
            assert_eq!(v.dma_after_fence, 1, "{v}");
            assert!(v.by_culprit.contains_key("nic1/buf"), "{:?}", v.by_culprit);
        } else {
            assert!(v.is_clean(), "the zapped MR refused it at the NIC: {v}");
        }
    }
}

#[test]
fn without_a_qp_quiesce_the_requests_meet_the_zapped_region() {
    // a's own QP reads a's region while a's memory is revoked: honest, the QP is flushed; without
    // the quiesce its requests run into the zapped MR (local protection errors).
    let run = |inject: bool| {
        let (fabric, a, b, qa, _qb) = setup();
        if inject {
            a.dev.inject(Some(Fault::NoQpQuiesce));
        }
        let (ma, _mb, ra, rb) = regions(&fabric, &a, &b, 1 << 22, ImportOptions::default());
        let remote = b.dev.lease(&rb, &a.dev);
        let wrs: Vec<SendWr> = (0..200)
            .map(|i| SendWr::write(i, ra.sge(i * 16384, 16384), remote.at(i * 16384)))
            .collect();
        qa.post_send(&wrs).unwrap();
        assert!(ma.revoke(Duration::from_secs(1)).is_clean());
        let st: Vec<WcStatus> = (0..200)
            .map_while(|_| {
                let mut v = Vec::new();
                for _ in 0..1000 {
                    a.cq.poll(&mut v, 1).unwrap();
                    if let Some(c) = v.pop() {
                        return Some(c.status);
                    }
                    a.cq.wait(Duration::from_millis(1)).unwrap();
                }
                None
            })
            .collect();
        let q = a.dev.stats();
        (q.qps_stopped + q.qps_flushed, st, fabric.oracle().verdict())
    };
    let (stopped, st, v) = run(false);
    assert_eq!(stopped, 1, "the default policy stops the QP at a boundary");
    assert!(!st.contains(&WcStatus::LocProtErr), "{st:?}");
    assert!(v.is_clean(), "{v}");
    let caught = (0..20).find_map(|_| {
        let (quiesced, st, v) = run(true);
        assert_eq!(quiesced, 0);
        assert!(
            v.dma_after_fence == 0 || v.by_culprit.contains_key("nic0/buf"),
            "{v}"
        );
        st.contains(&WcStatus::LocProtErr).then_some(st)
    });
    assert!(caught.is_some(), "the skipped quiesce was never visible");
}

/// A move that lands while a dynamic importer re-registers after the previous one must not let
/// the refresh revive the region on memory the exporter already moved away: whenever the region
/// is live, its registration is of the current window.
#[test]
fn a_refresh_overtaken_by_a_second_move_does_not_revive_the_region() {
    let (fabric, a, _b, _qa, _qb) = setup();
    let ma = HostMemory::new(&fabric, a.mem, "a", 1 << 16).unwrap();
    let ra = import(
        &a,
        &ma,
        ImportOptions {
            kind: dmaplane_core::ImporterKind::Dynamic,
            ..ImportOptions::default()
        },
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    let stale = std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..3000 {
                ma.relocate(Duration::from_secs(1)).unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let mut stale = 0u32;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            if ra.refresh(&a.pd).is_ok() {
                // Under the mover's serialisation: a live region is of the current window, or
                // a move has begun since (then it is marked revoked by now or about to be).
                let (epoch, base) = (ma.epoch(), ma.window().base());
                if ra.revoked_at().is_none() && ra.iova() != base && ma.epoch() == epoch {
                    stale += 1;
                }
            }
        }
        stale
    });
    // Once everything stopped: live means current.
    let _ = ra.refresh(&a.pd);
    if ra.revoked_at().is_none() {
        assert_eq!(
            ra.iova(),
            ma.window().base(),
            "a live region maps moved memory"
        );
    }
    assert_eq!(
        stale, 0,
        "refresh revived a region on moved memory {stale} time(s)"
    );
}

/// Eight 1 MiB WRITEs (256 packets each) from a to b's leased region, b's memory revoked under
/// them with `policy`; then a fresh region on b and one more WRITE over the same connection.
/// Returns (a WRITE was cut mid-message, the bytes of the flushed WRITEs that landed were partial,
/// the status of the WRITE after the revoke, the oracle's verdict).
fn revoke_big_writes(
    policy: QuiescePolicy,
) -> (bool, bool, WcStatus, dmaplane_core::fabric::Verdict, u64) {
    const N: u64 = 8;
    const SZ: u64 = 1 << 20;
    let (fabric, a, b, qa, _qb) = setup();
    let ma = HostMemory::new(&fabric, a.mem, "a", N * SZ).unwrap();
    let mb = HostMemory::new(&fabric, b.mem, "b", N * SZ).unwrap();
    assert!(ma.write(0, &vec![0xab; (N * SZ) as usize]));
    let ra = import(&a, &ma, ImportOptions::default());
    let opts = ImportOptions {
        policy,
        ..ImportOptions::default()
    };
    let rb = import(&b, &mb, opts);
    let remote = b.dev.lease(&rb, &a.dev);
    let wrs: Vec<SendWr> = (0..N)
        .map(|i| SendWr::write(i, ra.sge(i * SZ, SZ as u32), remote.at(i * SZ)))
        .collect();
    qa.post_send(&wrs).unwrap();
    std::thread::sleep(Duration::from_micros(50));
    assert!(mb.revoke(Duration::from_secs(2)).is_clean());
    let mut partial = false;
    let mut flushed = 0;
    for _ in 0..N {
        let c = wait_one(&a.cq);
        if c.status == WcStatus::WrFlushErr {
            flushed += 1;
            let mut got = vec![0u8; SZ as usize];
            assert!(mb.window().memory().read(c.wr_id * SZ, &mut got));
            let landed = got.iter().filter(|&&x| x == 0xab).count();
            partial |= landed > 0 && landed < got.len();
        } else {
            assert_eq!(c.status, WcStatus::Success, "{c:?}");
        }
    }
    let cut = a.dev.async_events().iter().any(|e| e.kind == "MESSAGE_CUT");
    // The same QPs, a new region: does the connection still carry a WRITE?
    for _ in 0..1000 {
        if qa.state() == QpState::Rts {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mb2 = HostMemory::new(&fabric, b.mem, "b2", 1 << 16).unwrap();
    let rb2 = import(&b, &mb2, ImportOptions::default());
    let remote2 = b.dev.lease(&rb2, &a.dev);
    qa.post_send(&[SendWr::write(99, ra.sge(0, 4096), remote2.at(0))])
        .unwrap();
    let after = wait_one(&a.cq).status;
    (cut, partial, after, fabric.oracle().verdict(), flushed)
}

#[test]
fn a_flush_cuts_a_multi_packet_write_and_breaks_the_connection() {
    let seen = (0..20).find_map(|_| {
        let (cut, partial, after, v, _) = revoke_big_writes(QuiescePolicy::Flush);
        assert!(v.is_clean(), "nothing after the fence even so: {v}");
        cut.then_some((partial, after))
    });
    let (partial, after) = seen.expect("no WRITE was ever cut mid-message");
    assert!(partial, "the cut WRITE's region is partly written");
    // As on a ConnectX NIC: the responder was left mid-message, the next request breaks it.
    assert_eq!(after, WcStatus::RetryExcErr);
}

#[test]
fn the_default_stops_at_a_message_boundary_and_keeps_the_connection() {
    let mut met_traffic = 0;
    for _ in 0..5 {
        let (cut, partial, after, v, flushed) = revoke_big_writes(QuiescePolicy::DEFAULT);
        assert!(!cut, "the default policy cut a message");
        assert!(!partial, "a flushed WRITE landed in part");
        assert_eq!(after, WcStatus::Success, "the connection did not survive");
        assert!(v.is_clean(), "{v}");
        met_traffic += u32::from(flushed > 0);
    }
    assert!(
        met_traffic > 0,
        "no revoke met a WRITE in flight: the test proved nothing"
    );
}

/// An import of a sub-range registers only those bytes: offset 0 of the MR is the range's
/// first byte, the MR is as long as the range, and a bad range is refused naming it.
#[test]
fn a_range_import_registers_only_the_range() {
    let (fabric, a, b, qa, _qb) = setup();
    let ma = HostMemory::new(&fabric, a.mem, "a", 1 << 20).unwrap();
    let mb = HostMemory::new(&fabric, b.mem, "b", 1 << 20).unwrap();
    let ra = import(&a, &ma, ImportOptions::default());
    let part = ImportOptions {
        range: Some((64 << 10, 128 << 10)),
        ..ImportOptions::default()
    };
    let rb = import(&b, &mb, part);
    assert_eq!(rb.len(), 128 << 10);
    let remote = b.dev.lease(&rb, &a.dev);
    assert!(ma.write(0, &[0x5a; 4096]));
    qa.post_send(&[SendWr::write(1, ra.sge(0, 4096), remote.at(4096))])
        .unwrap();
    assert_eq!(wait_one(&a.cq).status, WcStatus::Success);
    let mut got = vec![0u8; 4096];
    assert!(mb.read((64 << 10) + 4096, &mut got));
    assert!(got.iter().all(|&x| x == 0x5a));
    // Past the range's end: refused by the MR's bounds, not written beyond it.
    let e = qa
        .post_send(&[SendWr::write(2, ra.sge(0, 4096), remote.at(128 << 10))])
        .unwrap_err();
    assert!(e.to_string().contains("is outside MR"), "{e}");
    for (range, why) in [
        ((100, 4096), "granule"),
        ((1 << 20, 4096), "outside the list"),
    ] {
        let opts = ImportOptions {
            range: Some(range),
            ..ImportOptions::default()
        };
        let e =
            b.pd.import("bad", opts, None, |i, acc| mb.attach(i, b.nic, acc))
                .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("range") && s.contains(why), "{s}");
    }
}
