#![cfg(feature = "verbs")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The verbs backend on a real device (Soft-RoCE in the qemu testbed, or a NIC), used directly
//! through the backend traits.
//!
//! Without a device every test prints why and passes, unless `DMAPLANE_REQUIRE_RDMA=1`, which
//! turns "no device" into a failure. `DMAPLANE_RDMA_DEVICE` picks the device (default: the first).
//!
//! `rc_between_two_processes` runs this test binary a second time as the passive peer
//! (`helper_verbs_peer`, selected by `DMAPLANE_VERBS_ROLE=peer`); the two swap `ConnInfo` over
//! the out-of-band TCP connection on 127.0.0.1 and then move bytes over a real RC connection.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::process::{Child, Command, Stdio};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use dmaplane_core::{AddrList, AddrSpace, DmaRange, Hints};
use dmaplane_rdma::backend::{
    CqBackend, DeviceBackend, DmaBufMr, MrBackend, MrRequest, PdBackend, QpBackend,
};
use dmaplane_rdma::oob::{ConnInfo, Oob, OobListener, RemoteMrInfo};
use dmaplane_rdma::verbs::{VerbsDevice, list_devices};
use dmaplane_rdma::{
    Completion, MrAccess, QpAttr, QpCaps, QpState, RdmaError, RecvWr, RemoteAddr, SendWr, SgList,
    Sge, WcOpcode, WcStatus,
};
use serde::{Deserialize, Serialize};

const REQUIRE_ENV: &str = "DMAPLANE_REQUIRE_RDMA";
const DEVICE_ENV: &str = "DMAPLANE_RDMA_DEVICE";
const ROLE_ENV: &str = "DMAPLANE_VERBS_ROLE";
const OOB_ENV: &str = "DMAPLANE_VERBS_OOB";

/// Generous: Soft-RoCE under qemu's software emulation is slow.
const OP_TIMEOUT: Duration = Duration::from_secs(60);

fn required() -> bool {
    std::env::var(REQUIRE_ENV).as_deref() == Ok("1")
}

/// The device under test, or `None` after saying why the test is skipped.
fn device(test: &str) -> Option<Arc<VerbsDevice>> {
    let name = std::env::var(DEVICE_ENV).ok();
    match VerbsDevice::open(name.as_deref()) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(
                !required(),
                "{REQUIRE_ENV}=1 but no RDMA device for {test}: {e}"
            );
            eprintln!("{test}: skipped: no RDMA device: {e}");
            None
        }
    }
}

// --- memory -------------------------------------------------------------------------------------

/// Page-aligned memory the NIC reads and writes: only touched through raw pointers, so the
/// compiler assumes nothing about bytes the device changed.
struct Buf {
    ptr: NonNull<u8>,
    len: usize,
}

impl Buf {
    fn new(len: usize) -> Buf {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size (every caller asks for > 0 bytes).
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).expect("allocation failed");
        Buf { ptr, len }
    }

    fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: in bounds (checked); `data` is a separate allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(off), data.len())
        };
        fence(Ordering::SeqCst);
    }

    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len);
        fence(Ordering::SeqCst);
        let mut v = vec![0u8; len];
        // SAFETY: in bounds (checked); `v` is a separate allocation.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), v.as_mut_ptr(), len) };
        v
    }

    fn list(&self) -> AddrList {
        AddrList::single(
            AddrSpace::ProcessVa,
            Hints::HOST_MEMORY,
            1,
            DmaRange::new(self.addr(), self.len as u64),
        )
        .unwrap()
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { dealloc(self.ptr.as_ptr(), layout) };
    }
}

/// A deterministic byte stream per seed (xorshift), so both sides can produce and check it.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn first_mismatch(got: &[u8], want: &[u8]) -> Option<usize> {
    if got.len() != want.len() {
        return Some(got.len().min(want.len()));
    }
    got.iter().zip(want).position(|(a, b)| a != b)
}

// --- one side of a connection -------------------------------------------------------------------

struct Side {
    dev: Arc<VerbsDevice>,
    // Drop order: QP, then MR, then the memory.
    qp: Arc<dyn QpBackend>,
    cq: Arc<dyn CqBackend>,
    mr: Arc<dyn MrBackend>,
    pd: Arc<dyn PdBackend>,
    buf: Buf,
}

impl Side {
    fn new(dev: &Arc<VerbsDevice>, len: usize) -> Side {
        let pd = dev.alloc_pd().unwrap();
        let cq = dev.create_cq(512).unwrap();
        let qp = pd.create_qp(&cq, &cq, QpCaps::default()).unwrap();
        let buf = Buf::new(len);
        let list = buf.list();
        let mr = pd
            .reg_mr(&MrRequest {
                list: &list,
                iova: buf.addr(),
                access: MrAccess::ALL,
                dmabuf_fd: None,
            })
            .unwrap();
        assert_eq!(mr.len(), len as u64);
        assert_eq!(mr.iova(), buf.addr());
        Side {
            dev: Arc::clone(dev),
            qp,
            cq,
            mr,
            pd,
            buf,
        }
    }

    fn info(&self) -> ConnInfo {
        ConnInfo::new(
            self.qp.endpoint(),
            vec![RemoteMrInfo {
                addr: self.mr.iova(),
                len: self.mr.len(),
                rkey: self.mr.rkey(),
            }],
        )
    }

    fn to_init(&self) {
        self.qp
            .modify(&QpAttr::init(self.dev.port(), MrAccess::ALL))
            .unwrap();
        assert_eq!(self.qp.state(), QpState::Init);
    }

    fn to_rts(&self, remote: &ConnInfo) {
        let mtu = self.dev.active_mtu();
        self.qp
            .modify(&QpAttr::rtr(remote.remote_qp(), mtu))
            .unwrap();
        assert_eq!(self.qp.state(), QpState::Rtr);
        self.qp
            .modify(&QpAttr::rts(self.qp.endpoint().psn))
            .unwrap();
        assert_eq!(self.qp.state(), QpState::Rts);
    }

    fn sge(&self, off: usize, len: usize) -> Sge {
        Sge {
            addr: self.buf.addr() + off as u64,
            length: len as u32,
            lkey: self.mr.lkey(),
        }
    }

    /// Wait for `n` completions (any kind) or fail with what arrived.
    fn completions(&self, n: usize) -> Vec<Completion> {
        wait_for(&self.cq, n)
    }

    /// Post one send-queue request and expect it to complete successfully as `op`.
    fn run(&self, wr: SendWr, op: WcOpcode) -> Completion {
        self.qp.post_send(&[wr]).1.unwrap();
        let c = self.completions(1)[0];
        assert_eq!(c.wr_id, wr.wr_id, "{c:?}");
        assert_eq!(c.status, WcStatus::Success, "{c:?}");
        assert_eq!(c.opcode, op, "{c:?}");
        assert_eq!(c.qp_num, self.qp.qpn());
        c
    }
}

fn wait_for(cq: &Arc<dyn CqBackend>, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + OP_TIMEOUT;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out: {} of {n} completions: {got:?}",
            got.len()
        );
        if cq.wait(left.min(Duration::from_secs(1))).unwrap() {
            let want = n - got.len();
            cq.poll(&mut got, want).unwrap();
        }
    }
    got
}

/// Two QPs of this process connected to each other (the loopback of `ibv_rc_pingpong` on one host).
fn loopback_pair(dev: &Arc<VerbsDevice>, len: usize) -> (Side, Side) {
    let a = Side::new(dev, len);
    let b = Side::new(dev, len);
    a.to_init();
    b.to_init();
    let (ia, ib) = (a.info(), b.info());
    a.to_rts(&ib);
    b.to_rts(&ia);
    (a, b)
}

fn remote(info: &ConnInfo, off: usize) -> RemoteAddr {
    RemoteAddr {
        addr: info.mrs[0].addr + off as u64,
        rkey: info.mrs[0].rkey,
    }
}

// --- single-process tests -----------------------------------------------------------------------

#[test]
fn no_panic_and_clean_errors_without_or_with_a_device() {
    match list_devices() {
        Ok(names) => {
            eprintln!("devices: {names:?}");
            let e = VerbsDevice::open(Some("no-such-rdma-device")).unwrap_err();
            match e {
                RdmaError::UnknownDevice { name, available } => {
                    assert_eq!(name, "no-such-rdma-device");
                    for n in &names {
                        assert!(available.contains(n.as_str()), "{available}");
                    }
                }
                RdmaError::NoDevice { .. } if names.is_empty() => {}
                other => panic!("unexpected error {other}"),
            }
        }
        Err(RdmaError::NoDevice { why }) => {
            assert!(!required(), "{REQUIRE_ENV}=1 but: {why}");
            eprintln!("no RDMA here: {why}");
            let e = VerbsDevice::open(None).unwrap_err();
            assert!(matches!(e, RdmaError::NoDevice { .. }), "{e}");
        }
        Err(e) => panic!("list_devices: unexpected error {e}"),
    }
}

#[test]
fn device_enumeration_and_info() {
    let Some(dev) = device("device_enumeration_and_info") else {
        return;
    };
    let names = list_devices().unwrap();
    assert!(names.iter().any(|n| n == dev.name()), "{names:?}");
    let info = dev.info();
    eprintln!(
        "{info:#?}\nGID index {} ({})",
        dev.gid_index(),
        dev.gid_source()
    );
    assert_eq!(info.name, dev.name());
    assert_eq!(info.port, 1);
    assert_eq!(
        info.port_state, "ACTIVE",
        "port 1 of {} is not active",
        info.name
    );
    assert!(
        info.max_mr_size > 0 && info.max_qp_wr > 0 && info.max_sge > 0,
        "{info:?}"
    );
    assert!(
        info.page_size_cap & 4096 != 0 || info.page_size_cap == 0,
        "{info:?}"
    );
    if dev.is_roce() {
        assert_ne!(info.gid, [0; 16], "RoCE port without a GID");
    }
    if dev.name().starts_with("rxe") {
        assert!(
            matches!(info.dmabuf_mr, DmaBufMr::Unsupported { .. }),
            "rxe has no dma-buf MRs: {:?}",
            info.dmabuf_mr
        );
    }
    let spaces: Vec<_> = dev.accepts().iter().map(|a| a.space).collect();
    assert_eq!(
        spaces,
        [
            dmaplane_core::SpaceKind::DmaBuf,
            dmaplane_core::SpaceKind::ProcessVa,
            dmaplane_core::SpaceKind::DeviceVa
        ]
    );
    // Nothing pending must not block.
    let t = Instant::now();
    let _ = dev.poll_async_event();
    assert!(t.elapsed() < Duration::from_secs(1));
}

#[test]
fn illegal_transitions_and_posting_in_the_wrong_state() {
    let Some(dev) = device("illegal_transitions_and_posting_in_the_wrong_state") else {
        return;
    };
    let side = Side::new(&dev, 4096);
    let qp = &side.qp;
    assert_eq!(qp.state(), QpState::Reset);
    let e = qp
        .post_send(&[SendWr::send(1, side.sge(0, 8))])
        .1
        .unwrap_err();
    assert!(
        matches!(
            e,
            RdmaError::WrongState {
                state: QpState::Reset,
                ..
            }
        ),
        "{e}"
    );
    let e = qp
        .post_recv(&[RecvWr::new(2, side.sge(0, 8))])
        .1
        .unwrap_err();
    assert!(
        matches!(
            e,
            RdmaError::WrongState {
                state: QpState::Reset,
                ..
            }
        ),
        "{e}"
    );
    let e = qp.modify(&QpAttr::rts(1)).unwrap_err();
    assert!(
        matches!(
            e,
            RdmaError::IllegalTransition {
                from: QpState::Reset,
                to: QpState::Rts,
                ..
            }
        ),
        "{e}"
    );
    side.to_init();
    let e = qp.modify(&QpAttr::to(QpState::Rts)).unwrap_err();
    assert!(
        matches!(
            e,
            RdmaError::IllegalTransition {
                from: QpState::Init,
                ..
            }
        ),
        "{e}"
    );
    let mut rtr = QpAttr::rtr(side.qp.endpoint(), dev.active_mtu());
    rtr.dest = None;
    let e = qp.modify(&rtr).unwrap_err();
    assert!(
        matches!(e, RdmaError::MissingAttr { attr: "dest", .. }),
        "{e}"
    );
    // Receives may be posted in INIT, sends may not.
    let e = qp
        .post_send(&[SendWr::send(3, side.sge(0, 8))])
        .1
        .unwrap_err();
    assert!(
        matches!(
            e,
            RdmaError::WrongState {
                state: QpState::Init,
                ..
            }
        ),
        "{e}"
    );
    qp.post_recv(&[RecvWr::new(4, side.sge(0, 8))]).1.unwrap();
    // The failed attempts changed nothing.
    assert_eq!(qp.state(), QpState::Init);
    // Too many scatter/gather entries for the QP's caps.
    let caps = QpCaps {
        max_send_sge: 1,
        max_recv_sge: 1,
        ..QpCaps::default()
    };
    let small = side.pd.create_qp(&side.cq, &side.cq, caps).unwrap();
    small
        .modify(&QpAttr::init(dev.port(), MrAccess::ALL))
        .unwrap();
    let two = SgList::from_slice(&[side.sge(0, 8), side.sge(8, 8)]).unwrap();
    let e = small
        .post_recv(&[RecvWr { wr_id: 5, sg: two }])
        .1
        .unwrap_err();
    assert!(
        matches!(e, RdmaError::TooManySge { n: 2, max: 1, .. }),
        "{e}"
    );
}

#[test]
fn error_state_flushes_every_outstanding_receive() {
    let Some(dev) = device("error_state_flushes_every_outstanding_receive") else {
        return;
    };
    let side = Side::new(&dev, 64 * 1024);
    side.to_init();
    let wrs: Vec<RecvWr> = (0..16u64)
        .map(|i| RecvWr::new(100 + i, side.sge(i as usize * 4096, 4096)))
        .collect();
    side.qp.post_recv(&wrs[..10]).1.unwrap();
    side.qp.post_recv(&wrs[10..]).1.unwrap();
    side.qp.modify(&QpAttr::to(QpState::Err)).unwrap();
    assert_eq!(side.qp.state(), QpState::Err);
    let got = side.completions(16);
    for (i, c) in got.iter().enumerate() {
        assert_eq!(c.status, WcStatus::WrFlushErr, "{c:?}");
        assert_eq!(c.wr_id, 100 + i as u64, "receives flush in order: {got:?}");
        assert_eq!(c.opcode, WcOpcode::Recv, "{c:?}");
        assert!(!c.is_send());
        assert_eq!(c.qp_num, side.qp.qpn());
    }
    // Nothing more, and back to RESET works.
    let mut more = Vec::new();
    assert_eq!(side.cq.poll(&mut more, 8).unwrap(), 0, "{more:?}");
    assert!(!side.cq.wait(Duration::from_millis(50)).unwrap());
    side.qp.modify(&QpAttr::to(QpState::Reset)).unwrap();
    assert_eq!(side.qp.state(), QpState::Reset);
}

#[test]
fn multi_range_and_foreign_lists_are_refused() {
    let Some(dev) = device("multi_range_and_foreign_lists_are_refused") else {
        return;
    };
    let pd = dev.alloc_pd().unwrap();
    let buf = Buf::new(3 * 4096);
    let two = AddrList::new(
        AddrSpace::ProcessVa,
        Hints::HOST_MEMORY,
        4096,
        vec![
            DmaRange::new(buf.addr(), 4096),
            DmaRange::new(buf.addr() + 8192, 4096),
        ],
    )
    .unwrap();
    let e = pd
        .reg_mr(&MrRequest {
            list: &two,
            iova: buf.addr(),
            access: MrAccess::LOCAL_WRITE,
            dmabuf_fd: None,
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            RdmaError::InvalidRegistration {
                field: "list.ranges",
                ..
            }
        ),
        "{e}"
    );
    let phys = AddrList::single(
        AddrSpace::CpuPhys,
        Hints::HOST_MEMORY,
        4096,
        DmaRange::new(0x1000, 4096),
    )
    .unwrap();
    let e = pd
        .reg_mr(&MrRequest {
            list: &phys,
            iova: 0x1000,
            access: MrAccess::LOCAL_WRITE,
            dmabuf_fd: None,
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            RdmaError::InvalidRegistration {
                field: "list.space",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn loopback_write_read_sqd_and_zap() {
    let Some(dev) = device("loopback_write_read_sqd_and_zap") else {
        return;
    };
    let (a, b) = loopback_pair(&dev, 256 * 1024);
    let ib = b.info();
    // WRITE a → b, READ it back into another place of a.
    let data = pattern(7, 100_000);
    a.buf.write(0, &data);
    a.run(
        SendWr::write(1, a.sge(0, data.len()), remote(&ib, 333)),
        WcOpcode::RdmaWrite,
    );
    assert_eq!(b.buf.read(333, data.len()), data);
    let c = a.run(
        SendWr::read(2, a.sge(128 * 1024, data.len()), remote(&ib, 333)),
        WcOpcode::RdmaRead,
    );
    assert_eq!(c.byte_len as usize, data.len());
    assert_eq!(a.buf.read(128 * 1024, data.len()), data);

    // One chain of four WRITEs, only the last signaled: its completion retires all four.
    let chunks = pattern(9, 4 * 4096);
    a.buf.write(0, &chunks);
    let wrs: Vec<SendWr> = (0..4u64)
        .map(|i| {
            let off = i as usize * 4096;
            let w = SendWr::write(10 + i, a.sge(off, 4096), remote(&ib, 200_000 + off));
            if i < 3 { w.unsignaled() } else { w }
        })
        .collect();
    a.qp.post_send(&wrs).1.unwrap();
    let c = a.completions(1)[0];
    assert_eq!(
        (c.wr_id, c.status, c.opcode),
        (13, WcStatus::Success, WcOpcode::RdmaWrite)
    );
    assert_eq!(b.buf.read(200_000, chunks.len()), chunks);

    // RTS → SQD (asking for the drained event) → RTS, then the QP still works.
    let mut sqd = QpAttr::to(QpState::Sqd);
    sqd.en_sqd_async_notify = Some(true);
    a.qp.modify(&sqd).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut drained = false;
    while Instant::now() < deadline && !drained {
        match dev.poll_async_event() {
            Some(ev) if ev.kind == "SQ_DRAINED" => {
                assert_eq!(ev.qpn, Some(a.qp.qpn()), "{ev:?}");
                drained = true;
            }
            Some(ev) => eprintln!("async event: {ev:?}"),
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    eprintln!("SQ_DRAINED event seen: {drained}");
    let s = a.qp.state();
    assert!(
        matches!(s, QpState::Sqd | QpState::Rts),
        "after RTS -> SQD: {s}"
    );
    // SQD -> RTS is refused while the drain is still under way (rxe: EINVAL): retry briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.qp.state() != QpState::Rts {
        match a.qp.modify(&QpAttr::to(QpState::Rts)) {
            Ok(()) => {}
            Err(e) if Instant::now() < deadline => {
                eprintln!("SQD -> RTS not yet: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("SQD -> RTS: {e}"),
        }
    }
    let more = pattern(8, 5000);
    a.buf.write(0, &more);
    a.run(
        SendWr::write(3, a.sge(0, more.len()), remote(&ib, 0)),
        WcOpcode::RdmaWrite,
    );
    assert_eq!(b.buf.read(0, more.len()), more);

    // Zap b's MR: a's next WRITE through the old rkey is refused by the responder.
    b.mr.zap().unwrap();
    b.mr.zap().unwrap();
    a.qp.post_send(&[SendWr::write(4, a.sge(0, 64), remote(&ib, 0))])
        .1
        .unwrap();
    let c = a.completions(1)[0];
    assert_eq!(c.wr_id, 4);
    assert_eq!(c.status, WcStatus::RemAccessErr, "{c:?}");
    assert_eq!(
        c.opcode,
        WcOpcode::RdmaWrite,
        "opcode from the backend's records: {c:?}"
    );
    // The requester moves to ERR around the time it reports the error.
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.qp.state() != QpState::Err {
        assert!(
            Instant::now() < deadline,
            "QP still {} after a fatal error",
            a.qp.state()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn dmabuf_registration_on_a_provider_without_support_is_unsupported() {
    let Some(dev) = device("dmabuf_registration_on_a_provider_without_support_is_unsupported")
    else {
        return;
    };
    let udmabuf = match dmaplane_core::dmabuf::UdmaBuf::new("dmaplane-verbs-test", 64 * 1024) {
        Ok(u) => u.into_memory(),
        Err(e) => {
            eprintln!("skipped: cannot create a udmabuf: {e}");
            return;
        }
    };
    let list = AddrList::single(
        AddrSpace::DmaBuf { id: udmabuf.id() },
        Hints::HOST_MEMORY,
        4096,
        DmaRange::new(0, udmabuf.len()),
    )
    .unwrap();
    let pd = dev.alloc_pd().unwrap();
    let req = MrRequest {
        list: &list,
        iova: 0,
        access: MrAccess::LOCAL_WRITE | MrAccess::REMOTE_WRITE,
        dmabuf_fd: Some(udmabuf.fd()),
    };
    match (pd.reg_mr(&req), dev.info().dmabuf_mr) {
        (
            Err(RdmaError::Unsupported { op, why, .. }),
            DmaBufMr::Unsupported { .. } | DmaBufMr::Unknown,
        ) => {
            assert_eq!(op, "ibv_reg_dmabuf_mr");
            assert!(why.contains("EOPNOTSUPP"), "{why}");
        }
        (Ok(mr), DmaBufMr::Supported | DmaBufMr::Unknown) => {
            assert!(
                !dev.name().starts_with("rxe"),
                "rxe registered a dma-buf MR: {mr:?}"
            );
            assert_eq!(mr.len(), udmabuf.len());
        }
        (got, probed) => panic!("registration {got:?} disagrees with the probe {probed:?}"),
    }
    // Without the fd it is a clean registration error.
    let e = pd
        .reg_mr(&MrRequest {
            dmabuf_fd: None,
            ..req
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            RdmaError::InvalidRegistration {
                field: "dmabuf_fd",
                ..
            }
        ),
        "{e}"
    );
}

// --- two processes ------------------------------------------------------------------------------

/// Control messages between the active side (this process) and the peer process.
#[derive(Debug, Serialize, Deserialize)]
enum Ctl {
    /// Peer: receives are posted and the QP is in RTS.
    Ready,
    /// Peer: check `[off, off + len)` of your buffer holds `pattern(seed, len)`.
    Check {
        off: usize,
        len: usize,
        seed: u64,
    },
    /// Peer: fill `[off, off + len)` with `pattern(seed, len)`.
    Fill {
        off: usize,
        len: usize,
        seed: u64,
    },
    /// Peer: expect one receive completion: a SEND of `pattern(seed, len)` (with `imm`), or a
    /// WRITE_WITH_IMM whose data landed at `write_off`.
    ExpectRecv {
        len: usize,
        seed: u64,
        imm: Option<u32>,
        write_off: Option<usize>,
    },
    Ok,
    Fail(String),
    Bye,
}

const PEER_BUF: usize = 2 * 1024 * 1024;
/// Receive slots live at the top of the peer's buffer.
const RECV_OFF: usize = 1536 * 1024;
const RECV_SLOT: usize = 64 * 1024;
const RECV_SLOTS: u64 = 8;

fn expect_ok(oob: &Oob) {
    match oob.recv::<Ctl>(OP_TIMEOUT).unwrap() {
        Ctl::Ok => {}
        other => panic!("peer answered {other:?}"),
    }
}

/// The peer process and the file its output goes to (a file, not a pipe: a full pipe would
/// stall the peer while this process waits for it).
struct Peer {
    child: Child,
    log: std::path::PathBuf,
}

fn spawn_peer(addr: std::net::SocketAddr) -> Peer {
    let exe = std::env::current_exe().unwrap();
    let log = std::env::temp_dir().join(format!("dmaplane-verbs-peer-{}.log", std::process::id()));
    let out = std::fs::File::create(&log).unwrap();
    let err = out.try_clone().unwrap();
    let child = Command::new(exe)
        .args([
            "--exact",
            "helper_verbs_peer",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, "peer")
        .env(OOB_ENV, addr.to_string())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    Peer { child, log }
}

fn finish_peer(mut peer: Peer) {
    let deadline = Instant::now() + OP_TIMEOUT;
    let status = loop {
        if let Some(status) = peer.child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = peer.child.kill();
            let _ = peer.child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&peer.log).unwrap_or_default();
    let _ = std::fs::remove_file(&peer.log);
    match status {
        None => panic!("peer process hung:\n{text}"),
        Some(s) => {
            assert!(s.success(), "peer process failed ({s}):\n{text}");
            assert!(
                text.contains("1 passed"),
                "the peer did not run its test:\n{text}"
            );
        }
    }
}

#[test]
fn rc_between_two_processes() {
    let Some(dev) = device("rc_between_two_processes") else {
        return;
    };
    let listener = OobListener::bind("127.0.0.1:0").unwrap();
    let child = spawn_peer(listener.local_addr());
    let oob = match listener.accept(OP_TIMEOUT) {
        Ok(o) => o,
        Err(e) => {
            let log = std::fs::read_to_string(&child.log).unwrap_or_default();
            finish_peer(child);
            panic!("the peer never connected: {e}\n{log}");
        }
    };
    let me = Side::new(&dev, PEER_BUF);
    me.to_init();
    let peer = oob.exchange(&me.info()).unwrap();
    assert_eq!(peer.mrs.len(), 1);
    assert_eq!(peer.mrs[0].len, PEER_BUF as u64);
    me.to_rts(&peer);
    match oob.recv::<Ctl>(OP_TIMEOUT).unwrap() {
        Ctl::Ready => {}
        other => panic!("peer said {other:?}"),
    }
    let mut wr_id = 1000;
    let mut next = || {
        wr_id += 1;
        wr_id
    };

    // RDMA WRITE of several sizes at unaligned offsets; the peer checks every byte.
    for (i, &len) in [1usize, 7, 64, 1000, 4096, 4097, 65_536, 1 << 20]
        .iter()
        .enumerate()
    {
        let off = (i * 4099) % 4096;
        let seed = 1 + i as u64;
        me.buf.write(off, &pattern(seed, len));
        let c = me.run(
            SendWr::write(next(), me.sge(off, len), remote(&peer, off)),
            WcOpcode::RdmaWrite,
        );
        let _ = c;
        oob.send(&Ctl::Check { off, len, seed }).unwrap();
        expect_ok(&oob);
    }

    // RDMA READ of several sizes: the peer fills, we read and check every byte.
    for (i, &len) in [1usize, 13, 4096, 12_345, 300_000, 1 << 20]
        .iter()
        .enumerate()
    {
        let off = (i * 777) % 4096;
        let seed = 100 + i as u64;
        oob.send(&Ctl::Fill { off, len, seed }).unwrap();
        expect_ok(&oob);
        let local = 1024 * 1024 - off;
        me.buf.write(local, &vec![0u8; len.min(PEER_BUF - local)]);
        let c = me.run(
            SendWr::read(next(), me.sge(local, len), remote(&peer, off)),
            WcOpcode::RdmaRead,
        );
        assert_eq!(c.byte_len as usize, len);
        let got = me.buf.read(local, len);
        assert_eq!(
            first_mismatch(&got, &pattern(seed, len)),
            None,
            "READ of {len} bytes"
        );
    }

    // SEND / RECV, SEND_WITH_IMM, and a SEND gathered from three SGEs.
    for (k, (len, imm)) in [
        (3000usize, None),
        (1, Some(0xabcd_0123u32)),
        (RECV_SLOT, None),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 200 + k as u64;
        me.buf.write(0, &pattern(seed, len));
        oob.send(&Ctl::ExpectRecv {
            len,
            seed,
            imm,
            write_off: None,
        })
        .unwrap();
        let mut wr = SendWr::send(next(), me.sge(0, len));
        if let Some(i) = imm {
            wr = wr.with_imm(i);
        }
        me.run(wr, WcOpcode::Send);
        expect_ok(&oob);
    }
    let seed = 300;
    let data = pattern(seed, 9000);
    me.buf.write(10_000, &data[..1000]);
    me.buf.write(50_000, &data[1000..5000]);
    me.buf.write(90_000, &data[5000..]);
    let sg = SgList::from_slice(&[
        me.sge(10_000, 1000),
        me.sge(50_000, 4000),
        me.sge(90_000, 4000),
    ])
    .unwrap();
    oob.send(&Ctl::ExpectRecv {
        len: 9000,
        seed,
        imm: None,
        write_off: None,
    })
    .unwrap();
    me.run(
        SendWr::send(next(), me.sge(0, 0)).with_sg(sg),
        WcOpcode::Send,
    );
    expect_ok(&oob);

    // RDMA WRITE_WITH_IMM: data lands in the peer's buffer and consumes one of its receives.
    let (off, len, seed, imm) = (12_345usize, 5000usize, 400u64, 0x00c0_ffee_u32);
    me.buf.write(off, &pattern(seed, len));
    oob.send(&Ctl::ExpectRecv {
        len,
        seed,
        imm: Some(imm),
        write_off: Some(off),
    })
    .unwrap();
    me.run(
        SendWr::write_imm(next(), me.sge(off, len), remote(&peer, off), imm),
        WcOpcode::RdmaWrite,
    );
    expect_ok(&oob);

    oob.send(&Ctl::Bye).unwrap();
    finish_peer(child);
}

/// The passive peer of `rc_between_two_processes` (runs only in the process that test spawns).
#[test]
#[ignore = "helper process of rc_between_two_processes"]
fn helper_verbs_peer() {
    if std::env::var(ROLE_ENV).as_deref() != Ok("peer") {
        return;
    }
    let addr = std::env::var(OOB_ENV).unwrap();
    let oob = Oob::connect(addr.as_str(), OP_TIMEOUT).unwrap();
    let dev = VerbsDevice::open(std::env::var(DEVICE_ENV).ok().as_deref()).unwrap();
    let me = Side::new(&dev, PEER_BUF);
    me.to_init();
    let recv = |slot: u64| {
        RecvWr::new(
            slot,
            me.sge(RECV_OFF + slot as usize * RECV_SLOT, RECV_SLOT),
        )
    };
    let wrs: Vec<RecvWr> = (0..RECV_SLOTS).map(recv).collect();
    me.qp.post_recv(&wrs).1.unwrap();
    let active = oob.exchange(&me.info()).unwrap();
    me.to_rts(&active);
    oob.send(&Ctl::Ready).unwrap();
    let verdict = |r: Result<(), String>| match r {
        Ok(()) => Ctl::Ok,
        Err(e) => Ctl::Fail(e),
    };
    loop {
        let msg: Ctl = oob.recv(Duration::from_secs(300)).unwrap();
        let answer = match msg {
            Ctl::Check { off, len, seed } => verdict(
                match first_mismatch(&me.buf.read(off, len), &pattern(seed, len)) {
                    None => Ok(()),
                    Some(at) => Err(format!("WRITE of {len} bytes at {off}: byte {at} differs")),
                },
            ),
            Ctl::Fill { off, len, seed } => {
                me.buf.write(off, &pattern(seed, len));
                Ctl::Ok
            }
            Ctl::ExpectRecv {
                len,
                seed,
                imm,
                write_off,
            } => {
                let c = me.completions(1)[0];
                let check = || -> Result<(), String> {
                    if c.status != WcStatus::Success {
                        return Err(format!("receive failed: {c:?}"));
                    }
                    if c.imm != imm || c.byte_len as usize != len {
                        return Err(format!("expected {len} bytes, imm {imm:?}: {c:?}"));
                    }
                    let (want_op, at) = match write_off {
                        Some(off) => (WcOpcode::RecvRdmaWithImm, off),
                        None => (WcOpcode::Recv, RECV_OFF + c.wr_id as usize * RECV_SLOT),
                    };
                    if c.opcode != want_op || c.is_send() {
                        return Err(format!("expected {want_op:?}: {c:?}"));
                    }
                    if let Some(at_byte) =
                        first_mismatch(&me.buf.read(at, len), &pattern(seed, len))
                    {
                        return Err(format!("received data differs at byte {at_byte}: {c:?}"));
                    }
                    Ok(())
                };
                let r = check();
                // Give the slot back.
                me.qp.post_recv(&[recv(c.wr_id % RECV_SLOTS)]).1.unwrap();
                verdict(r)
            }
            Ctl::Bye => break,
            other => Ctl::Fail(format!("unexpected {other:?}")),
        };
        oob.send(&answer).unwrap();
    }
}

// --- dma-buf export through the safe layer ------------------------------------------------------

/// `DMAPLANE_REQUIRE_DMABUF=1` (the testbed sets it) turns "no udmabuf" into a failure.
fn udmabuf(test: &str, len: u64) -> Option<dmaplane_core::dmabuf::DmaBufMemory> {
    match dmaplane_core::dmabuf::UdmaBuf::new(test, len) {
        Ok(u) => Some(u.into_memory()),
        Err(e) => {
            assert!(
                std::env::var("DMAPLANE_REQUIRE_DMABUF").as_deref() != Ok("1"),
                "DMAPLANE_REQUIRE_DMABUF=1 but no udmabuf for {test}: {e}"
            );
            eprintln!("{test}: skipped: cannot create a udmabuf: {e}");
            None
        }
    }
}

/// Poll `cq` until `n` completions arrived (or fail after `OP_TIMEOUT`).
fn reap(cq: &dmaplane_rdma::Cq, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + OP_TIMEOUT;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "timed out: {} of {n} completions: {got:?}",
            got.len()
        );
        let want = n - got.len();
        if cq.poll(&mut got, want).unwrap() == 0 {
            cq.wait(Duration::from_millis(100)).unwrap();
        }
    }
    got
}

/// Two contexts of one device playing two hosts: the owner imports `mem`, the holder registers a
/// source buffer of the same length by address; one RC QP each, connected; the holder's lease.
struct Lab {
    owner: dmaplane_rdma::Device,
    holder: dmaplane_rdma::Device,
    opd: dmaplane_rdma::Pd,
    hcq: dmaplane_rdma::Cq,
    mr: dmaplane_rdma::Mr,
    src: Buf,
    src_mr: dmaplane_rdma::Mr,
    hqp: dmaplane_rdma::Qp,
    remote: Arc<dmaplane_rdma::RemoteMr>,
    // Kept alive for the connection.
    _oqp: (dmaplane_rdma::Qp, dmaplane_rdma::Cq),
}

fn lab(
    vdev: Arc<VerbsDevice>,
    name: &str,
    mem: &dmaplane_core::dmabuf::DmaBufMemory,
    opts: dmaplane_rdma::ImportOptions,
) -> Lab {
    use dmaplane_rdma::Device;
    let owner = Device::new(vdev);
    let holder = Device::new(VerbsDevice::open(Some(owner.name())).unwrap());
    let (opd, hpd) = (owner.alloc_pd().unwrap(), holder.alloc_pd().unwrap());
    let (ocq, hcq) = (
        owner.create_cq(256).unwrap(),
        holder.create_cq(256).unwrap(),
    );
    let mr = opd
        .import(name, opts, Some(mem.fd()), |i, a| mem.attach(i, a))
        .unwrap();
    let src = Buf::new(mr.len() as usize);
    let src_mr = hpd.reg_mr(&src.list(), MrAccess::LOCAL_WRITE).unwrap();
    let caps = QpCaps::default();
    let hqp = hpd.create_qp(&hcq, &hcq, caps).unwrap();
    let oqp = opd.create_qp(&ocq, &ocq, caps).unwrap();
    hqp.connect(oqp.endpoint(), MrAccess::ALL).unwrap();
    oqp.connect(hqp.endpoint(), MrAccess::ALL).unwrap();
    let remote = owner.lease(&mr, &holder);
    Lab {
        owner,
        holder,
        opd,
        hcq,
        mr,
        src,
        src_mr,
        hqp,
        remote,
        _oqp: (oqp, ocq),
    }
}

/// udmabuf export → `Pd::import` → the provider refuses the dma-buf MR (rxe: EOPNOTSUPP) →
/// negotiation falls back to the buffer's process mapping, and says so → RDMA WRITEs into it
/// from a second context, every byte checked through the exporter's CPU view → revoke.
#[test]
fn udmabuf_import_falls_back_to_process_va_and_writes_land() {
    use dmaplane_rdma::ImportOptions;
    let test = "udmabuf_import_falls_back_to_process_va_and_writes_land";
    let Some(vdev) = device(test) else {
        return;
    };
    const LEN: u64 = 1 << 20;
    let Some(mem) = udmabuf("verbs-import", LEN) else {
        return;
    };
    let dmabuf_mr = vdev.info().dmabuf_mr;
    let opts = ImportOptions {
        access: MrAccess::ALL,
        ..ImportOptions::default()
    };
    let Lab {
        owner,
        holder,
        opd,
        hcq,
        mr,
        src,
        src_mr,
        hqp,
        remote,
        _oqp,
    } = lab(vdev, "udmabuf", &mem, opts);
    let how = mr.negotiation().unwrap();
    eprintln!("negotiation: {how}");
    match dmabuf_mr {
        DmaBufMr::Supported => assert!(how.contains("dma-buf"), "{how}"),
        DmaBufMr::Unsupported { .. } | DmaBufMr::Unknown => {
            assert!(how.contains("ibv_reg_dmabuf_mr refused"), "{how}");
            assert!(how.contains("EOPNOTSUPP"), "{how}");
            assert!(how.contains("fell back from DmaBuf"), "{how}");
            assert!(how.contains("took offer 1 (process-va"), "{how}");
            assert_eq!(mr.iova(), mem.process_va(), "{how}");
        }
    }
    assert_eq!(mr.len(), LEN);

    // Sizes across page and MTU boundaries, at unaligned offsets; then one batch of 32.
    let mut wr_id = 0;
    for (i, &len) in [1usize, 63, 4096, 4097, 65_536, 300_001].iter().enumerate() {
        let off = (i * 4099 + 17) % 8192;
        let data = pattern(500 + i as u64, len);
        src.write(off, &data);
        wr_id += 1;
        let sge = src_mr.sge(off as u64, len as u32);
        hqp.post_send(&[SendWr::write(wr_id, sge, remote.at(off as u64))])
            .unwrap();
        let c = reap(&hcq, 1)[0];
        assert_eq!(
            (c.wr_id, c.status, c.opcode),
            (wr_id, WcStatus::Success, WcOpcode::RdmaWrite)
        );
        let mut got = vec![0u8; len];
        mem.read(off as u64, &mut got).unwrap();
        assert_eq!(first_mismatch(&got, &data), None, "WRITE of {len} at {off}");
    }
    let wrs: Vec<SendWr> = (0..32u64)
        .map(|k| {
            let off = k * 32 * 1024;
            src.write(off as usize, &pattern(700 + k, 8192));
            SendWr::write(1000 + k, src_mr.sge(off, 8192), remote.at(off + 100))
        })
        .collect();
    hqp.post_send(&wrs).unwrap();
    for c in reap(&hcq, 32) {
        assert_eq!(c.status, WcStatus::Success, "{c:?}");
    }
    for k in 0..32u64 {
        let mut got = vec![0u8; 8192];
        mem.read(k * 32 * 1024 + 100, &mut got).unwrap();
        assert_eq!(
            first_mismatch(&got, &pattern(700 + k, 8192)),
            None,
            "batch {k}"
        );
    }

    // Revoke with WRITEs outstanding: the holder stops its QP (the default policy), reaps,
    // acks; the MR is zapped; posts to it are refused with the epoch.
    let mtu = owner_mtu(&owner);
    let wrs: Vec<SendWr> = (0..16u64)
        .map(|k| SendWr::write(2000 + k, src_mr.sge(k * 4096, mtu), remote.at(k * 4096)))
        .collect();
    hqp.post_send(&wrs).unwrap();
    let (report, wcs) = std::thread::scope(|s| {
        // Reap only once the revoke has begun, so the holder finds them outstanding.
        let r = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            reap(&hcq, 16)
        });
        let report = mem.revoke(Duration::from_secs(20));
        (report, r.join().unwrap())
    });
    assert!(report.is_clean(), "{report}");
    for c in &wcs {
        assert!(
            matches!(c.status, WcStatus::Success | WcStatus::WrFlushErr),
            "{c:?}"
        );
    }
    assert_eq!(mr.revoked_at(), Some(0));
    let e = hqp
        .post_send(&[SendWr::write(9, src_mr.sge(0, 8), remote.at(0))])
        .unwrap_err();
    assert!(matches!(e, RdmaError::Revoked { epoch: 0, .. }), "{e}");
    assert_eq!(owner.stats().lease_acks, 1);
    assert_eq!(owner.stats().holders_cut_off, 0);
    eprintln!("revoke took {} us", report.elapsed_us);
    // The QP once ran multi-packet WRITEs (above), so the default stops it at a boundary.
    let hs = holder.stats();
    assert_eq!((hs.qps_stopped, hs.qps_flushed), (1, 0), "{hs:?}");

    // A second export on the same connection: a QP that was flushed came back to RTS resuming
    // its PSNs (the owner's responder kept expecting the next one), so the WRITE lands — had
    // it started over, the responder would have acked it as a duplicate and dropped it.
    let Some(mem2) = udmabuf("verbs-import-2", LEN) else {
        return;
    };
    let mr2 = opd
        .import("udmabuf-2", opts, Some(mem2.fd()), |i, a| mem2.attach(i, a))
        .unwrap();
    let remote2 = owner.lease(&mr2, &holder);
    let deadline = Instant::now() + OP_TIMEOUT;
    while hqp.state() != QpState::Rts {
        assert!(Instant::now() < deadline, "QP stuck in {}", hqp.state());
        std::thread::sleep(Duration::from_millis(10));
    }
    for k in 0..4u64 {
        let data = pattern(900 + k, 4096);
        src.write(0, &data);
        hqp.post_send(&[SendWr::write(
            3000 + k,
            src_mr.sge(0, 4096),
            remote2.at(k * 8192),
        )])
        .unwrap();
        let c = reap(&hcq, 1)[0];
        assert_eq!((c.wr_id, c.status), (3000 + k, WcStatus::Success), "{c:?}");
        let mut got = vec![0u8; 4096];
        mem2.read(k * 8192, &mut got).unwrap();
        assert_eq!(
            first_mismatch(&got, &data),
            None,
            "WRITE {k} after recovery"
        );
    }
}

/// The largest one-packet WRITE on this device's port (its active MTU).
fn owner_mtu(dev: &dmaplane_rdma::Device) -> u32 {
    VerbsDevice::open(Some(dev.name()))
        .unwrap()
        .active_mtu()
        .bytes()
}

/// The default policy on a real device: a revoke meets multi-packet WRITEs in flight, each QP
/// moves to SQD, the message under way is acknowledged whole (the quiesce layer polls
/// `sq_draining`), what did not start is flushed, and the connection survives: no message was
/// cut, so the owner's responder is at a message boundary and later multi-packet WRITEs land.
#[test]
fn a_boundary_stop_lands_multi_packet_writes_whole_and_keeps_the_connection() {
    use dmaplane_rdma::{ImportOptions, QuiescePolicy};
    let test = "a_boundary_stop_lands_multi_packet_writes_whole_and_keeps_the_connection";
    let Some(vdev) = device(test) else {
        return;
    };
    const LEN: u64 = 4 << 20;
    const WRITE: u32 = 64 << 10;
    let (Some(mem), Some(mem2)) = (
        udmabuf("verbs-boundary", LEN),
        udmabuf("verbs-boundary-2", LEN),
    ) else {
        return;
    };
    let opts = ImportOptions::default();
    assert!(matches!(opts.policy, QuiescePolicy::Boundary { .. }));
    let Lab {
        owner,
        holder,
        opd,
        hcq,
        mr: _mr,
        src,
        src_mr,
        hqp,
        remote,
        _oqp,
    } = lab(vdev, "boundary", &mem, opts);
    let mtu = owner_mtu(&owner);
    assert!(
        WRITE > mtu,
        "a {WRITE} B WRITE fits one {mtu} B packet: nothing to cut"
    );

    let n = 64u64;
    for k in 0..n {
        src.write(
            (k * u64::from(WRITE)) as usize,
            &pattern(4000 + k, WRITE as usize),
        );
    }
    let wrs: Vec<SendWr> = (0..n)
        .map(|k| {
            let off = k * u64::from(WRITE);
            SendWr::write(k, src_mr.sge(off, WRITE), remote.at(off))
        })
        .collect();
    hqp.post_send(&wrs).unwrap();
    let (report, wcs) = std::thread::scope(|s| {
        let r = s.spawn(|| reap(&hcq, n as usize));
        (mem.revoke(Duration::from_secs(20)), r.join().unwrap())
    });
    assert!(report.is_clean(), "{report}");
    let stats = holder.stats();
    eprintln!("revoke took {} us; holder {stats:?}", report.elapsed_us);
    assert_eq!(owner.stats().lease_acks, 1, "{:?}", owner.stats());
    assert_eq!(
        (stats.qps_flushed, stats.drains_timed_out),
        (0, 0),
        "the holder's QP must stop at a boundary, not flush: {stats:?}"
    );
    // Every WRITE completed once; each success landed whole (the poll saw the drain end).
    let mut ok = 0;
    for c in &wcs {
        match c.status {
            WcStatus::Success => {
                ok += 1;
                let off = c.wr_id * u64::from(WRITE);
                let mut got = vec![0u8; WRITE as usize];
                mem.read(off, &mut got).unwrap();
                assert_eq!(
                    first_mismatch(&got, &pattern(4000 + c.wr_id, WRITE as usize)),
                    None,
                    "WRITE {} before the revoke",
                    c.wr_id
                );
            }
            WcStatus::WrFlushErr => {}
            s => panic!(
                "WRITE {}: {s:?} (a cut message breaks the connection)",
                c.wr_id
            ),
        }
    }
    eprintln!("{ok} of {n} WRITEs landed before the stop, the rest were flushed");
    // Flushed WRITEs mean the revoke met the QP with work queued: it stopped at a boundary.
    if ok < n {
        assert_eq!(stats.qps_stopped, 1, "{stats:?}");
    }

    // The connection is intact: multi-packet WRITEs into a second export land.
    let mr2 = opd
        .import("boundary-2", opts, Some(mem2.fd()), |i, a| {
            mem2.attach(i, a)
        })
        .unwrap();
    let remote2 = owner.lease(&mr2, &holder);
    let deadline = Instant::now() + OP_TIMEOUT;
    while hqp.state() != QpState::Rts {
        assert!(Instant::now() < deadline, "QP stuck in {}", hqp.state());
        std::thread::sleep(Duration::from_millis(10));
    }
    for k in 0..4u64 {
        let data = pattern(5000 + k, WRITE as usize);
        src.write(0, &data);
        hqp.post_send(&[SendWr::write(
            100 + k,
            src_mr.sge(0, WRITE),
            remote2.at(k * 65536),
        )])
        .unwrap();
        let c = reap(&hcq, 1)[0];
        assert_eq!((c.wr_id, c.status), (100 + k, WcStatus::Success), "{c:?}");
        let mut got = vec![0u8; WRITE as usize];
        mem2.read(k * 65536, &mut got).unwrap();
        assert_eq!(
            first_mismatch(&got, &data),
            None,
            "WRITE {k} after the stop"
        );
    }
}
