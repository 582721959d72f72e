//! Completion queues: `ibv_poll_cq` into [`Completion`]s, and blocking waits on a completion
//! channel.
//!
//! `wait` follows the verbs recipe: arm (`ibv_req_notify_cq`), then poll once more so a
//! completion that slipped in before the arm is not missed, then sleep in `poll(2)` on the
//! channel fd; each channel event is fetched and acknowledged at once (so `ibv_destroy_cq`
//! never waits) and the loop re-arms. Completions `wait` takes off the CQ while looking are kept
//! in order and handed out by the next `poll` before anything newer.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, Weak};

use crate::sync::lock;
use std::time::{Duration, Instant};

use rdma_mummy_sys as sys;
use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, CompletionQueue as _,
    CreateCompletionChannelErrorKind, CreateCompletionQueueErrorKind,
};

use crate::backend::CqBackend;
use crate::error::{RdmaError, Result};
use crate::wc::{Completion, WcOpcode, WcStatus};

use super::device::DevInner;
use super::ffi;
use super::track::WrTrack;

/// Completions fetched per `ibv_poll_cq` call.
const BATCH: usize = 32;

/// A CQ with its own completion channel.
pub struct VerbsCq {
    dev: Arc<DevInner>,
    depth: u32,
    // Field order is drop order: the CQ is destroyed before the channel it reports to (sideway's
    // CQ also holds the channel).
    pub(crate) cq: Arc<BasicCompletionQueue>,
    channel: Arc<CompletionChannel>,
    state: Mutex<CqState>,
    wait_lock: Mutex<()>,
    /// Work-request bookkeeping of the QPs that complete here, by QP number.
    tracks: Mutex<HashMap<u32, Weak<Mutex<WrTrack>>>>,
}

#[derive(Default)]
struct CqState {
    /// Taken off the CQ by `wait`, not yet handed out by `poll`.
    pending: VecDeque<Completion>,
}

impl VerbsCq {
    pub(crate) fn new(dev: &Arc<DevInner>, depth: u32) -> Result<VerbsCq> {
        if depth == 0 || depth > dev.limits.max_cqe {
            return Err(RdmaError::Backend {
                device: dev.name.clone(),
                op: "ibv_create_cq",
                why: format!(
                    "depth {depth} is outside 1..={} (max_cqe)",
                    dev.limits.max_cqe
                ),
            });
        }
        let channel = dev.ctx.create_comp_channel().map_err(|e| {
            let errno = match &e.0 {
                CreateCompletionChannelErrorKind::Ibverbs(io) => io.raw_os_error().unwrap_or(0),
                _ => 0,
            };
            dev.os_err("ibv_create_comp_channel", errno, "")
        })?;
        channel.set_nonblocking(true).map_err(|e| {
            dev.os_err(
                "fcntl(comp_channel, O_NONBLOCK)",
                e.raw_os_error().unwrap_or(0),
                "",
            )
        })?;
        let cq = dev
            .ctx
            .create_cq_builder()
            .setup_cqe(depth)
            .setup_comp_channel(&channel, 0)
            .build()
            .map_err(|e| {
                let errno = match &e.0 {
                    CreateCompletionQueueErrorKind::Ibverbs(io) => io.raw_os_error().unwrap_or(0),
                    _ => 0,
                };
                dev.os_err("ibv_create_cq", errno, format_args!("depth {depth}"))
            })?;
        Ok(VerbsCq {
            dev: Arc::clone(dev),
            depth,
            cq,
            channel,
            state: Mutex::new(CqState::default()),
            wait_lock: Mutex::new(()),
            tracks: Mutex::new(HashMap::new()),
        })
    }

    pub fn depth(&self) -> u32 {
        self.depth
    }

    fn raw_cq(&self) -> *mut sys::ibv_cq {
        // SAFETY: only the pointer is taken; `self.cq` keeps the CQ alive while `self` lives.
        unsafe { self.cq.cq() }.as_ptr()
    }

    /// A QP that completes on this CQ registers its bookkeeping here.
    pub(crate) fn attach(&self, qpn: u32, track: &Arc<Mutex<WrTrack>>) {
        let mut tracks = lock(&self.tracks);
        tracks.retain(|_, w| w.strong_count() > 0);
        tracks.insert(qpn, Arc::downgrade(track));
    }

    pub(crate) fn detach(&self, qpn: u32, track: &Arc<Mutex<WrTrack>>) {
        let mut tracks = lock(&self.tracks);
        if tracks
            .get(&qpn)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(track)))
        {
            tracks.remove(&qpn);
        }
    }

    /// Poll up to `max` (≤ BATCH) completions straight off the CQ into `sink`.
    fn poll_raw(&self, max: usize, mut sink: impl FnMut(Completion)) -> Result<usize> {
        // SAFETY: ibv_wc is plain data (integers and a union of integers); all-zero is valid.
        let mut wcs: [sys::ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
        let want = max.min(BATCH);
        // SAFETY: the CQ is live; `wcs` has room for `want` (≤ BATCH) entries. `want` fits i32.
        let got = unsafe { sys::ibv_poll_cq(self.raw_cq(), want as i32, wcs.as_mut_ptr()) };
        if got < 0 {
            return Err(self.dev.os_err("ibv_poll_cq", ffi::ret_errno(got), ""));
        }
        let got = usize::try_from(got).unwrap_or(0).min(want);
        if got == 0 {
            return Ok(0);
        }
        let tracks = lock(&self.tracks);
        for wc in &wcs[..got] {
            let track = tracks.get(&wc.qp_num).and_then(Weak::upgrade);
            sink(convert(wc, track.as_deref()));
        }
        Ok(got)
    }

    fn arm(&self) -> Result<()> {
        // SAFETY: the CQ is live; 0 = notify on any completion.
        let ret = unsafe { sys::ibv_req_notify_cq(self.raw_cq(), 0) };
        if ret != 0 {
            return Err(self
                .dev
                .os_err("ibv_req_notify_cq", ffi::ret_errno(ret), ""));
        }
        Ok(())
    }

    /// Sleep on the channel fd for at most `timeout`; true when it became readable.
    fn sleep_on_channel(&self, timeout: Duration) -> Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.channel.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let ret = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ret < 0 {
            let errno = ffi::last_errno();
            if errno == libc::EINTR {
                return Ok(false);
            }
            return Err(self.dev.os_err("poll(comp_channel)", errno, ""));
        }
        Ok(ret > 0)
    }

    /// Fetch and acknowledge the events waiting on the channel (non-blocking).
    fn drain_channel(&self) -> Result<()> {
        // SAFETY: only the pointer is taken; the channel is kept alive by `self.channel`.
        let channel = unsafe { self.channel.comp_channel() }.as_ptr();
        loop {
            let mut ev_cq: *mut sys::ibv_cq = std::ptr::null_mut();
            let mut ev_ctx: *mut std::ffi::c_void = std::ptr::null_mut();
            // SAFETY: the channel is live and its fd non-blocking; the out-parameters are valid.
            let ret = unsafe { sys::ibv_get_cq_event(channel, &mut ev_cq, &mut ev_ctx) };
            if ret != 0 {
                let errno = ffi::last_errno();
                if errno == libc::EAGAIN || errno == libc::EINTR {
                    return Ok(());
                }
                return Err(self.dev.os_err("ibv_get_cq_event", errno, ""));
            }
            if !ev_cq.is_null() {
                // SAFETY: `ev_cq` is the CQ the event was for (the only one on this channel:
                // ours); each fetched event is acknowledged exactly once.
                unsafe { sys::ibv_ack_cq_events(ev_cq, 1) };
            }
        }
    }
}

impl fmt::Debug for VerbsCq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerbsCq")
            .field("device", &self.dev.name)
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}

impl CqBackend for VerbsCq {
    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize> {
        let mut st = lock(&self.state);
        let mut n = 0;
        while n < max {
            let Some(c) = st.pending.pop_front() else {
                break;
            };
            out.push(c);
            n += 1;
        }
        while n < max {
            let want = (max - n).min(BATCH);
            let got = self.poll_raw(want, |c| out.push(c))?;
            n += got;
            if got < want {
                break;
            }
        }
        Ok(n)
    }

    fn wait(&self, timeout: Duration) -> Result<bool> {
        let _one_waiter = lock(&self.wait_lock);
        let deadline = Instant::now() + timeout;
        loop {
            if !lock(&self.state).pending.is_empty() {
                return Ok(true);
            }
            self.arm()?;
            {
                let mut st = lock(&self.state);
                let pending = &mut st.pending;
                if self.poll_raw(BATCH, |c| pending.push_back(c))? > 0 {
                    return Ok(true);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            if self.sleep_on_channel(deadline - now)? {
                self.drain_channel()?;
            }
        }
    }
}

fn opcode_from_ibv(op: u32) -> Option<WcOpcode> {
    use sys::ibv_wc_opcode::*;
    Some(match op {
        IBV_WC_SEND => WcOpcode::Send,
        IBV_WC_RDMA_WRITE => WcOpcode::RdmaWrite,
        IBV_WC_RDMA_READ => WcOpcode::RdmaRead,
        IBV_WC_RECV => WcOpcode::Recv,
        IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvRdmaWithImm,
        _ => return None,
    })
}

/// One `ibv_wc` as a [`Completion`]; the opcode of an error completion comes from `track`.
fn convert(wc: &sys::ibv_wc, track: Option<&Mutex<WrTrack>>) -> Completion {
    let status = WcStatus::from_ibv(wc.status);
    let raw_is_recv = wc.opcode & sys::ibv_wc_opcode::IBV_WC_RECV != 0;
    let reported = if status.is_ok() {
        opcode_from_ibv(wc.opcode)
    } else {
        None
    };
    let tracked = track.and_then(|t| lock(t).retire(wc.wr_id, reported, raw_is_recv));
    let opcode = tracked.or(reported).unwrap_or(if raw_is_recv {
        WcOpcode::Recv
    } else {
        opcode_from_ibv(wc.opcode).unwrap_or(WcOpcode::Send)
    });
    let imm = if status.is_ok() && wc.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0 {
        // SAFETY: with IBV_WC_WITH_IMM the union holds the immediate (network byte order).
        Some(u32::from_be(unsafe {
            wc.imm_data_invalidated_rkey_union.imm_data
        }))
    } else {
        None
    };
    Completion {
        wr_id: wc.wr_id,
        status,
        opcode,
        byte_len: wc.byte_len,
        imm,
        qp_num: wc.qp_num,
        vendor_err: wc.vendor_err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wc(status: u32, opcode: u32, wr_id: u64) -> sys::ibv_wc {
        // SAFETY: plain data, all-zero is valid.
        let mut wc: sys::ibv_wc = unsafe { std::mem::zeroed() };
        wc.status = status;
        wc.opcode = opcode;
        wc.wr_id = wr_id;
        wc.qp_num = 0x11;
        wc
    }

    #[test]
    fn converts_status_opcode_and_imm() {
        let mut w = wc(0, sys::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM, 7);
        w.wc_flags = sys::ibv_wc_flags::IBV_WC_WITH_IMM.0;
        w.imm_data_invalidated_rkey_union.imm_data = 0xdead_beef_u32.to_be();
        w.byte_len = 64;
        let c = convert(&w, None);
        assert_eq!(c.status, WcStatus::Success);
        assert_eq!(c.opcode, WcOpcode::RecvRdmaWithImm);
        assert_eq!(c.imm, Some(0xdead_beef));
        assert_eq!(c.byte_len, 64);
        assert_eq!(c.qp_num, 0x11);
        assert!(!c.is_send());
    }

    #[test]
    fn flushed_receive_reported_as_send_is_a_receive() {
        // rxe fills opcode 0 (IBV_WC_SEND) into flushed receive completions.
        let track = Mutex::new(WrTrack::default());
        lock(&track).recv.extend([1, 2]);
        let c = convert(&wc(5, 0, 1), Some(&track));
        assert_eq!(c.status, WcStatus::WrFlushErr);
        assert_eq!(c.opcode, WcOpcode::Recv);
        assert!(!c.is_send());
        assert_eq!(lock(&track).recv.len(), 1);
    }
}
