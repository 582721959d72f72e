//! RC queue pairs: creation, the modify state machine, and posting chains of work requests.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};

use crate::sync::lock;

use rdma_mummy_sys as sys;
use sideway::ibverbs::queue_pair::{BasicQueuePair, CreateQueuePairErrorKind, QueuePair as _};

use crate::backend::{CqBackend, QpBackend};
use crate::error::{RdmaError, Result};
use crate::qp::{QpAttr, QpCaps, QpState, RemoteQp, check_modify};
use crate::wc::WcOpcode;
use crate::wr::{Queue, RecvWr, SendOp, SendWr, SgList, Sge, check_post};

use super::cq::VerbsCq;
use super::device::DevInner;
use super::ffi;
use super::mr::ibv_access;
use super::pd::VerbsPd;
use super::track::WrTrack;

/// Hop limit in the GRH of RoCE / global address vectors.
const HOP_LIMIT: u8 = 64;

/// PSNs are 24 bits.
const PSN_MASK: u32 = 0x00ff_ffff;

/// A random first send PSN (24 bits), as `ibv_rc_pingpong` draws one.
fn random_psn() -> u32 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    (h.finish() as u32) & PSN_MASK
}

struct Meta {
    /// Our view of the state: what the last successful modify set.
    state: QpState,
    /// The port set at `RESET → INIT` (address vectors use it).
    port: u8,
}

/// An RC QP.
pub struct VerbsQp {
    dev: Arc<DevInner>,
    qpn: u32,
    psn: u32,
    caps: QpCaps,
    meta: Mutex<Meta>,
    track: Arc<Mutex<WrTrack>>,
    // Field order is drop order: the QP is destroyed before the CQ handles below let go.
    qp: BasicQueuePair,
    send_cq: Arc<dyn CqBackend>,
    recv_cq: Arc<dyn CqBackend>,
}

fn as_verbs_cq<'a>(dev: &DevInner, cq: &'a Arc<dyn CqBackend>, which: &str) -> Result<&'a VerbsCq> {
    let any: &dyn std::any::Any = &**cq;
    let vcq = any
        .downcast_ref::<VerbsCq>()
        .ok_or_else(|| RdmaError::Backend {
            device: dev.name.clone(),
            op: "ibv_create_qp",
            why: format!("the {which} CQ {cq:?} is not a verbs CQ"),
        })?;
    Ok(vcq)
}

impl VerbsQp {
    pub(crate) fn create(
        pd: &VerbsPd,
        send_cq: &Arc<dyn CqBackend>,
        recv_cq: &Arc<dyn CqBackend>,
        caps: QpCaps,
    ) -> Result<VerbsQp> {
        let dev = &pd.dev;
        let scq = as_verbs_cq(dev, send_cq, "send")?;
        let rcq = as_verbs_cq(dev, recv_cq, "receive")?;
        let lim = dev.limits;
        let too_big = [
            ("max_send_wr", caps.max_send_wr, lim.max_qp_wr),
            ("max_recv_wr", caps.max_recv_wr, lim.max_qp_wr),
            ("max_send_sge", caps.max_send_sge, lim.max_sge),
            ("max_recv_sge", caps.max_recv_sge, lim.max_sge),
        ]
        .into_iter()
        .find(|&(_, want, max)| want > max);
        if let Some((name, want, max)) = too_big {
            return Err(RdmaError::Backend {
                device: dev.name.clone(),
                op: "ibv_create_qp",
                why: format!("{name} = {want} exceeds the device's limit {max}"),
            });
        }
        let qp = pd
            .pd
            .create_qp_builder()
            .setup_max_send_wr(caps.max_send_wr)
            .setup_max_recv_wr(caps.max_recv_wr)
            .setup_max_send_sge(caps.max_send_sge)
            .setup_max_recv_sge(caps.max_recv_sge)
            .setup_max_inline_data(0)
            .setup_send_cq(Arc::clone(&scq.cq))
            .setup_recv_cq(Arc::clone(&rcq.cq))
            .build()
            .map_err(|e| {
                let errno = match &e.0 {
                    CreateQueuePairErrorKind::Ibverbs(io) => io.raw_os_error().unwrap_or(0),
                    _ => 0,
                };
                dev.os_err("ibv_create_qp", errno, format_args!("RC, {caps:?}"))
            })?;
        // SAFETY: the QP was just created and is live; qp_num is a plain field.
        let qpn = unsafe { (*qp.qp().as_ptr()).qp_num };
        let track = Arc::new(Mutex::new(WrTrack::default()));
        scq.attach(qpn, &track);
        rcq.attach(qpn, &track);
        Ok(VerbsQp {
            dev: Arc::clone(dev),
            qpn,
            psn: random_psn(),
            caps,
            meta: Mutex::new(Meta {
                state: QpState::Reset,
                port: dev.port,
            }),
            track,
            qp,
            send_cq: Arc::clone(send_cq),
            recv_cq: Arc::clone(recv_cq),
        })
    }

    fn raw(&self) -> *mut sys::ibv_qp {
        // SAFETY: only the pointer is taken; `self.qp` keeps the QP alive while `self` lives.
        unsafe { self.qp.qp() }.as_ptr()
    }

    /// `ibv_query_qp` for the state: the hardware may have moved the QP to ERR on its own.
    fn query_state(&self) -> Option<QpState> {
        self.query_drain().map(|(state, _)| state)
    }

    /// `ibv_query_qp` for the state and `sq_draining`.
    fn query_drain(&self) -> Option<(QpState, bool)> {
        // SAFETY: both are plain data (integers, unions of integers, nullable pointers).
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        let mask = sys::ibv_qp_attr_mask::IBV_QP_STATE.0 as i32;
        // SAFETY: the QP is live; `attr` and `init` are writable structs of the right types.
        let ret = unsafe { sys::ibv_query_qp(self.raw(), &mut attr, mask, &mut init) };
        if ret != 0 {
            tracing::debug!(
                qpn = self.qpn,
                "ibv_query_qp (sq_draining): {}",
                ffi::errno_text(ffi::ret_errno(ret))
            );
            return None;
        }
        Some((QpState::from_ibv(attr.qp_state)?, attr.sq_draining != 0))
    }

    /// (next send PSN, next expected receive PSN) as the device reports them.
    fn query_psns(&self) -> Result<(u32, u32)> {
        // SAFETY: both are plain data (integers, unions of integers, nullable pointers).
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        let mask = (sys::ibv_qp_attr_mask::IBV_QP_SQ_PSN.0 | sys::ibv_qp_attr_mask::IBV_QP_RQ_PSN.0)
            as i32;
        // SAFETY: the QP is live; `attr` and `init` are writable structs of the right types.
        let ret = unsafe { sys::ibv_query_qp(self.raw(), &mut attr, mask, &mut init) };
        if ret != 0 {
            return Err(RdmaError::Backend {
                op: "ibv_query_qp (send/receive PSNs)",
                device: self.dev.name.clone(),
                why: ffi::errno_text(ffi::ret_errno(ret)),
            });
        }
        Ok((attr.sq_psn & PSN_MASK, attr.rq_psn & PSN_MASK))
    }

    /// The requested queue sizes.
    pub fn caps(&self) -> QpCaps {
        self.caps
    }

    fn invalid_attr(
        &self,
        attr: &'static str,
        value: impl fmt::Display,
        why: &'static str,
    ) -> RdmaError {
        RdmaError::InvalidAttr {
            qpn: self.qpn,
            attr,
            value: value.to_string(),
            why,
        }
    }

    /// Translate `attr` (already checked) into `ibv_qp_attr` + mask.
    fn build_attr(&self, attr: &QpAttr, meta: &Meta) -> Result<(sys::ibv_qp_attr, u32)> {
        use sys::ibv_qp_attr_mask as m;
        // SAFETY: ibv_qp_attr is plain data (integers and unions of integers).
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        let mut mask = 0u32;
        let lim = self.dev.limits;
        if let Some(s) = attr.state {
            a.qp_state = s.ibv();
            mask |= m::IBV_QP_STATE.0;
        }
        if let Some(p) = attr.port {
            a.port_num = p;
            mask |= m::IBV_QP_PORT.0;
        }
        if let Some(k) = attr.pkey_index {
            a.pkey_index = k;
            mask |= m::IBV_QP_PKEY_INDEX.0;
        }
        if let Some(acc) = attr.access {
            a.qp_access_flags = ibv_access(acc);
            mask |= m::IBV_QP_ACCESS_FLAGS.0;
        }
        if let Some(mtu) = attr.path_mtu {
            a.path_mtu = mtu.ibv();
            mask |= m::IBV_QP_PATH_MTU.0;
        }
        if let Some(d) = attr.dest {
            let global = d.gid != [0; 16];
            if !global && self.dev.link_layer == 2 {
                return Err(self.invalid_attr(
                    "dest",
                    format_args!("qpn {:#x}, gid all zero", d.qpn),
                    "RoCE needs the remote port's GID",
                ));
            }
            if d.qpn > PSN_MASK {
                return Err(self.invalid_attr(
                    "dest",
                    format_args!("qpn {:#x}", d.qpn),
                    "QPNs are 24 bits",
                ));
            }
            a.dest_qp_num = d.qpn;
            a.ah_attr.dlid = d.lid;
            a.ah_attr.sl = 0;
            a.ah_attr.src_path_bits = 0;
            a.ah_attr.static_rate = 0;
            a.ah_attr.port_num = attr.port.unwrap_or(meta.port);
            if global {
                a.ah_attr.is_global = 1;
                a.ah_attr.grh.dgid = sys::ibv_gid { raw: d.gid };
                a.ah_attr.grh.sgid_index = self.dev.gid_index;
                a.ah_attr.grh.hop_limit = HOP_LIMIT;
                a.ah_attr.grh.flow_label = 0;
                a.ah_attr.grh.traffic_class = 0;
            }
            mask |= m::IBV_QP_AV.0 | m::IBV_QP_DEST_QPN.0;
        }
        if let Some(psn) = attr.rq_psn {
            if psn > PSN_MASK {
                return Err(self.invalid_attr("rq_psn", psn, "PSNs are 24 bits"));
            }
            a.rq_psn = psn;
            mask |= m::IBV_QP_RQ_PSN.0;
        }
        if let Some(psn) = attr.sq_psn {
            if psn > PSN_MASK {
                return Err(self.invalid_attr("sq_psn", psn, "PSNs are 24 bits"));
            }
            a.sq_psn = psn;
            mask |= m::IBV_QP_SQ_PSN.0;
        }
        if let Some(n) = attr.max_dest_rd_atomic {
            a.max_dest_rd_atomic = n.min(lim.max_qp_rd_atom);
            mask |= m::IBV_QP_MAX_DEST_RD_ATOMIC.0;
        }
        if let Some(t) = attr.min_rnr_timer {
            if t > 31 {
                return Err(self.invalid_attr(
                    "min_rnr_timer",
                    t,
                    "the RNR timer code is 5 bits (0..=31)",
                ));
            }
            a.min_rnr_timer = t;
            mask |= m::IBV_QP_MIN_RNR_TIMER.0;
        }
        if let Some(t) = attr.timeout {
            if t > 31 {
                return Err(self.invalid_attr(
                    "timeout",
                    t,
                    "the ACK timeout exponent is 5 bits (0..=31)",
                ));
            }
            a.timeout = t;
            mask |= m::IBV_QP_TIMEOUT.0;
        }
        if let Some(n) = attr.retry_cnt {
            if n > 7 {
                return Err(self.invalid_attr("retry_cnt", n, "at most 7"));
            }
            a.retry_cnt = n;
            mask |= m::IBV_QP_RETRY_CNT.0;
        }
        if let Some(n) = attr.rnr_retry {
            if n > 7 {
                return Err(self.invalid_attr("rnr_retry", n, "at most 7 (7 = retry forever)"));
            }
            a.rnr_retry = n;
            mask |= m::IBV_QP_RNR_RETRY.0;
        }
        if let Some(n) = attr.max_rd_atomic {
            a.max_rd_atomic = n.min(lim.max_qp_init_rd_atom);
            mask |= m::IBV_QP_MAX_QP_RD_ATOMIC.0;
        }
        if let Some(b) = attr.en_sqd_async_notify {
            a.en_sqd_async_notify = u8::from(b);
            mask |= m::IBV_QP_EN_SQD_ASYNC_NOTIFY.0;
        }
        Ok((a, mask))
    }

    /// Build the scatter/gather array of one request into `sges`; returns (offset, count).
    /// The front of every post: the state and scatter-list checks, then every request's
    /// scatter list packed into one array, with each request's (start, count) in it.
    fn checked_sges<'w>(
        &self,
        queue: Queue,
        max_sge: u32,
        reqs: impl Iterator<Item = (u64, &'w SgList)> + Clone,
    ) -> Result<PackedSges> {
        check_post(
            self.qpn,
            lock(&self.meta).state,
            queue,
            max_sge,
            reqs.clone(),
        )?;
        let mut sges = Vec::new();
        let spans = reqs
            .map(|(_, sg)| {
                let list: &[Sge] = sg.as_slice();
                let start = sges.len();
                sges.extend(list.iter().map(|s| sys::ibv_sge {
                    addr: s.addr,
                    length: s.length,
                    lkey: s.lkey,
                }));
                (start, list.len())
            })
            .collect();
        Ok((sges, spans))
    }

    fn queue_full(&self, queue: Queue, depth: u32) -> RdmaError {
        RdmaError::QueueFull {
            qpn: self.qpn,
            queue: queue.name(),
            depth,
        }
    }

    /// The back of every post: what the provider took, and its refusal of the rest, if any.
    fn posted(
        &self,
        call: &'static str,
        ret: i32,
        posted: usize,
        refused: Option<u64>,
        n: usize,
    ) -> (usize, Result<()>) {
        if ret == 0 {
            return (posted, Ok(()));
        }
        let errno = ffi::ret_errno(ret);
        (
            posted,
            Err(self.post_error(call, errno, refused.unwrap_or(0), posted, n)),
        )
    }

    fn post_error(
        &self,
        op: &'static str,
        errno: i32,
        wr_id: u64,
        index: usize,
        n: usize,
    ) -> RdmaError {
        if errno == libc::ENOMEM {
            let depth = if op == "ibv_post_send" {
                self.caps.max_send_wr
            } else {
                self.caps.max_recv_wr
            };
            return RdmaError::QueueFull {
                qpn: self.qpn,
                queue: if op == "ibv_post_send" {
                    Queue::Send.name()
                } else {
                    Queue::Recv.name()
                },
                depth,
            };
        }
        let partial = if index > 0 {
            format!("; the {index} request(s) before it were posted")
        } else {
            String::new()
        };
        self.dev.os_err(
            op,
            errno,
            format_args!(
                "QP {:#x}, work request {wr_id} ({} of {n}){partial}",
                self.qpn,
                index + 1
            ),
        )
    }
}

/// Link `v[i].next = &v[i + 1]` and return the head. Only raw pointers into the buffer are used
/// after the head is taken, so the links stay valid until the vector is touched again.
fn chain<T>(v: &mut [T], mut set_next: impl FnMut(&mut T, *mut T)) -> *mut T {
    let n = v.len();
    let base = v.as_mut_ptr();
    for i in 0..n.saturating_sub(1) {
        // SAFETY: `i + 1 < n`: both pointers are inside the slice, which is not borrowed
        // otherwise while the links are written.
        unsafe { set_next(&mut *base.add(i), base.add(i + 1)) };
    }
    base
}

fn wc_opcode(op: SendOp) -> WcOpcode {
    match op {
        SendOp::Send | SendOp::SendWithImm(_) => WcOpcode::Send,
        SendOp::RdmaWrite | SendOp::RdmaWriteWithImm(_) => WcOpcode::RdmaWrite,
        SendOp::RdmaRead => WcOpcode::RdmaRead,
    }
}

impl fmt::Debug for VerbsQp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerbsQp")
            .field("device", &self.dev.name)
            .field("qpn", &format_args!("{:#x}", self.qpn))
            .field("state", &lock(&self.meta).state)
            .finish_non_exhaustive()
    }
}

impl QpBackend for VerbsQp {
    fn qpn(&self) -> u32 {
        self.qpn
    }

    /// Queried from the device (so a QP the hardware moved to ERR reads ERR); the last state
    /// this object set when the query fails.
    fn state(&self) -> QpState {
        let mut meta = lock(&self.meta);
        if let Some(s) = self.query_state() {
            meta.state = s;
        }
        meta.state
    }

    fn endpoint(&self) -> RemoteQp {
        RemoteQp::verbs(self.qpn, self.dev.gid, self.dev.lid, self.psn)
    }

    fn next_psns(&self) -> Result<Option<(u32, u32)>> {
        self.query_psns().map(Some)
    }

    /// `sq_draining` as the device reports it: the provider clears it once every message that
    /// started before `RTS → SQD` is acknowledged (rxe: the completer caught up with the
    /// requester; mlx5: the QP context left SQ_DRAINING).
    fn sq_draining(&self) -> Option<bool> {
        let (state, draining) = self.query_drain()?;
        Some(state == QpState::Sqd && draining)
    }

    fn modify(&self, attr: &QpAttr) -> Result<()> {
        let mut meta = lock(&self.meta);
        let from = self.query_state().unwrap_or(meta.state);
        meta.state = from;
        let to = check_modify(self.qpn, from, attr)?;
        let (mut a, mask) = self.build_attr(attr, &meta)?;
        // SAFETY: the QP is live; `a` is a fully initialised ibv_qp_attr whose fields named in
        // `mask` hold the requested values.
        let ret = unsafe { sys::ibv_modify_qp(self.raw(), &mut a, mask as i32) };
        if ret != 0 {
            let errno = ffi::ret_errno(ret);
            let hint = if errno == libc::ETIMEDOUT && attr.dest.is_some() {
                " (the destination GID's MAC address could not be resolved)"
            } else {
                ""
            };
            return Err(self.dev.os_err(
                "ibv_modify_qp",
                errno,
                format_args!(
                    "QP {:#x} {from} -> {to}, attr mask {mask:#x}{hint}",
                    self.qpn
                ),
            ));
        }
        meta.state = to;
        if let Some(p) = attr.port {
            meta.port = p;
        }
        Ok(())
    }

    fn post_send(&self, wrs: &[SendWr]) -> (usize, Result<()>) {
        if wrs.is_empty() {
            return (0, Ok(()));
        }
        let (mut sges, spans) = match self.checked_sges(
            Queue::Send,
            self.caps.max_send_sge,
            wrs.iter().map(|w| (w.wr_id, &w.sg)),
        ) {
            Ok(packed) => packed,
            Err(e) => return (0, Err(e)),
        };
        let sge_base = sges.as_mut_ptr();
        let mut raw: Vec<sys::ibv_send_wr> = Vec::with_capacity(wrs.len());
        for (w, &(start, count)) in wrs.iter().zip(&spans) {
            // SAFETY: ibv_send_wr is plain data and nullable pointers; all-zero is valid.
            let mut r: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
            r.wr_id = w.wr_id;
            r.num_sge = count as i32;
            r.sg_list = if count == 0 {
                std::ptr::null_mut()
            } else {
                sge_base.wrapping_add(start)
            };
            if w.signaled {
                r.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
            }
            use sys::ibv_wr_opcode::*;
            let (opcode, imm) = match w.op {
                SendOp::Send => (IBV_WR_SEND, None),
                SendOp::SendWithImm(i) => (IBV_WR_SEND_WITH_IMM, Some(i)),
                SendOp::RdmaWrite => (IBV_WR_RDMA_WRITE, None),
                SendOp::RdmaWriteWithImm(i) => (IBV_WR_RDMA_WRITE_WITH_IMM, Some(i)),
                SendOp::RdmaRead => (IBV_WR_RDMA_READ, None),
            };
            r.opcode = opcode;
            if let Some(i) = imm {
                r.imm_data_invalidated_rkey_union.imm_data = i.to_be();
            }
            if w.op.is_one_sided() {
                r.wr.rdma = sys::rdma_t {
                    remote_addr: w.remote.addr,
                    rkey: w.remote.rkey,
                };
            }
            raw.push(r);
        }
        let base = chain(&mut raw, |r, next| r.next = next);
        let mut track = lock(&self.track);
        if track.send.len() + wrs.len() > self.caps.max_send_wr as usize {
            return (0, Err(self.queue_full(Queue::Send, self.caps.max_send_wr)));
        }
        let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the QP is live; `raw` is a well-formed chain whose sg_list pointers point into
        // `sges`, and both vectors outlive the call (the provider copies the requests).
        let ret = unsafe { sys::ibv_post_send(self.raw(), base, &mut bad) };
        let posted = posted_before(ret, bad, base, wrs.len());
        track
            .send
            .extend(wrs[..posted].iter().map(|w| (w.wr_id, wc_opcode(w.op))));
        drop(track);
        let refused = wrs.get(posted).map(|w| w.wr_id);
        self.posted("ibv_post_send", ret, posted, refused, wrs.len())
    }

    fn post_recv(&self, wrs: &[RecvWr]) -> (usize, Result<()>) {
        if wrs.is_empty() {
            return (0, Ok(()));
        }
        let (mut sges, spans) = match self.checked_sges(
            Queue::Recv,
            self.caps.max_recv_sge,
            wrs.iter().map(|w| (w.wr_id, &w.sg)),
        ) {
            Ok(packed) => packed,
            Err(e) => return (0, Err(e)),
        };
        let sge_base = sges.as_mut_ptr();
        let mut raw: Vec<sys::ibv_recv_wr> = wrs
            .iter()
            .zip(&spans)
            .map(|(w, &(start, count))| sys::ibv_recv_wr {
                wr_id: w.wr_id,
                next: std::ptr::null_mut(),
                sg_list: if count == 0 {
                    std::ptr::null_mut()
                } else {
                    sge_base.wrapping_add(start)
                },
                num_sge: count as i32,
            })
            .collect();
        let base = chain(&mut raw, |r, next| r.next = next);
        let mut track = lock(&self.track);
        if track.recv.len() + wrs.len() > self.caps.max_recv_wr as usize {
            return (0, Err(self.queue_full(Queue::Recv, self.caps.max_recv_wr)));
        }
        let mut bad: *mut sys::ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: the QP is live; `raw` is a well-formed chain into `sges`; both outlive the call.
        let ret = unsafe { sys::ibv_post_recv(self.raw(), base, &mut bad) };
        let posted = posted_before(ret, bad, base, wrs.len());
        track.recv.extend(wrs[..posted].iter().map(|w| w.wr_id));
        drop(track);
        let refused = wrs.get(posted).map(|w| w.wr_id);
        self.posted("ibv_post_recv", ret, posted, refused, wrs.len())
    }
}

/// Every request's scatter-gather elements in one array, and each request's (start, count) in it.
type PackedSges = (Vec<sys::ibv_sge>, Vec<(usize, usize)>);

/// How many requests of a chain starting at `base` the provider took: all when `ret` is 0, else
/// those before the one it reported in `bad` (none when it reported nothing).
fn posted_before<T>(ret: i32, bad: *mut T, base: *mut T, n: usize) -> usize {
    if ret == 0 {
        return n;
    }
    if bad.is_null() {
        return 0;
    }
    // SAFETY: a non-null `bad` is the element of the chain at `base` that the provider
    // refused; both point into the same vector.
    usize::try_from(unsafe { bad.offset_from(base) })
        .unwrap_or(0)
        .min(n)
}

impl Drop for VerbsQp {
    fn drop(&mut self) {
        for cq in [&self.send_cq, &self.recv_cq] {
            let any: &dyn std::any::Any = &**cq;
            if let Some(vcq) = any.downcast_ref::<VerbsCq>() {
                vcq.detach(self.qpn, &self.track);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psn_is_24_bits_and_varies() {
        let a: Vec<u32> = (0..8).map(|_| random_psn()).collect();
        assert!(a.iter().all(|&p| p <= PSN_MASK));
        assert!(a.windows(2).any(|w| w[0] != w[1]));
    }
}
