//! Work requests: small `Copy` entries with builders, like `ibv_send_wr` / `ibv_recv_wr`.

use serde::Serialize;

/// Most scatter/gather entries in one work request.
pub const MAX_SGE: usize = 4;

/// One scatter/gather element: `length` bytes at `addr` in the MR named by `lkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Sge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

/// An inline list of up to [`MAX_SGE`] elements (no allocation per work request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SgList {
    items: [Sge; MAX_SGE],
    len: u8,
}

impl SgList {
    pub fn one(sge: Sge) -> SgList {
        let mut l = SgList::default();
        l.items[0] = sge;
        l.len = 1;
        l
    }

    /// Fails with the count when more than [`MAX_SGE`] are given.
    pub fn from_slice(sges: &[Sge]) -> Result<SgList, usize> {
        if sges.len() > MAX_SGE {
            return Err(sges.len());
        }
        let mut l = SgList::default();
        l.items[..sges.len()].copy_from_slice(sges);
        l.len = sges.len() as u8;
        Ok(l)
    }

    pub fn as_slice(&self) -> &[Sge] {
        &self.items[..usize::from(self.len)]
    }

    /// Total bytes; `u64` so a caller's overflow shows as a length error, not a wrap.
    pub fn total(&self) -> u64 {
        self.as_slice().iter().map(|s| u64::from(s.length)).sum()
    }
}

/// Which queue of a QP a post goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    Send,
    Recv,
}

impl Queue {
    pub const fn name(self) -> &'static str {
        match self {
            Queue::Send => "send",
            Queue::Recv => "recv",
        }
    }
}

/// Take a batch as a provider takes a chain: `take` checks and queues one request; the first it
/// refuses stops the batch, and what came before it stays posted. Returns how many were taken
/// and the refusal (see [`crate::backend::QpBackend::post_send`]).
pub(crate) fn take_prefix<T>(
    wrs: &[T],
    mut take: impl FnMut(&T) -> Result<(), crate::RdmaError>,
) -> (usize, Result<(), crate::RdmaError>) {
    for (i, wr) in wrs.iter().enumerate() {
        if let Err(e) = take(wr) {
            return (i, Err(e));
        }
    }
    (wrs.len(), Ok(()))
}

/// What every backend's post path checks first, in this order: the QP's state accepts posts to
/// `queue`, then no request in `reqs` (`(wr_id, its list)`) has more elements than the QP was
/// created for (`max_sge`).
pub fn check_post<'a>(
    qpn: u32,
    state: crate::qp_state::QpState,
    queue: Queue,
    max_sge: u32,
    reqs: impl IntoIterator<Item = (u64, &'a SgList)>,
) -> crate::Result<()> {
    let open = match queue {
        Queue::Send => state.can_post_send(),
        Queue::Recv => state.can_post_recv(),
    };
    if !open {
        return Err(crate::RdmaError::WrongState {
            qpn,
            state,
            op: queue.name(),
        });
    }
    check_sge_limit(qpn, max_sge, reqs)
}

/// The first request in `reqs` with more elements than the QP was created for.
fn check_sge_limit<'a>(
    qpn: u32,
    max: u32,
    reqs: impl IntoIterator<Item = (u64, &'a SgList)>,
) -> crate::Result<()> {
    let max = max as usize;
    match reqs.into_iter().find(|(_, sg)| sg.as_slice().len() > max) {
        Some((wr_id, sg)) => Err(crate::RdmaError::TooManySge {
            qpn,
            wr_id,
            n: sg.as_slice().len(),
            max,
        }),
        None => Ok(()),
    }
}

/// `enum ibv_wr_opcode` (the RC subset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SendOp {
    Send,
    SendWithImm(u32),
    RdmaWrite,
    RdmaWriteWithImm(u32),
    RdmaRead,
}

impl SendOp {
    /// One-sided operations need a remote address and rkey.
    pub const fn is_one_sided(self) -> bool {
        matches!(
            self,
            SendOp::RdmaWrite | SendOp::RdmaWriteWithImm(_) | SendOp::RdmaRead
        )
    }

    /// The local buffer is written (READ responses land in it).
    pub const fn writes_local(self) -> bool {
        matches!(self, SendOp::RdmaRead)
    }

    /// The opcode its completion carries.
    pub const fn wc_opcode(self) -> crate::wc::WcOpcode {
        use crate::wc::WcOpcode;
        match self {
            SendOp::Send | SendOp::SendWithImm(_) => WcOpcode::Send,
            SendOp::RdmaWrite | SendOp::RdmaWriteWithImm(_) => WcOpcode::RdmaWrite,
            SendOp::RdmaRead => WcOpcode::RdmaRead,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            SendOp::Send => "SEND",
            SendOp::SendWithImm(_) => "SEND_WITH_IMM",
            SendOp::RdmaWrite => "RDMA_WRITE",
            SendOp::RdmaWriteWithImm(_) => "RDMA_WRITE_WITH_IMM",
            SendOp::RdmaRead => "RDMA_READ",
        }
    }
}

/// Remote side of a one-sided operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RemoteAddr {
    pub addr: u64,
    pub rkey: u32,
}

/// A send-queue work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendWr {
    pub wr_id: u64,
    pub op: SendOp,
    pub sg: SgList,
    pub remote: RemoteAddr,
    /// Generate a completion on success (errors always complete).
    pub signaled: bool,
}

impl SendWr {
    fn new(wr_id: u64, op: SendOp, sg: SgList, remote: RemoteAddr) -> SendWr {
        SendWr {
            wr_id,
            op,
            sg,
            remote,
            signaled: true,
        }
    }

    pub fn send(wr_id: u64, sge: Sge) -> SendWr {
        SendWr::new(wr_id, SendOp::Send, SgList::one(sge), RemoteAddr::default())
    }

    pub fn write(wr_id: u64, sge: Sge, remote: RemoteAddr) -> SendWr {
        SendWr::new(wr_id, SendOp::RdmaWrite, SgList::one(sge), remote)
    }

    pub fn write_imm(wr_id: u64, sge: Sge, remote: RemoteAddr, imm: u32) -> SendWr {
        SendWr::new(
            wr_id,
            SendOp::RdmaWriteWithImm(imm),
            SgList::one(sge),
            remote,
        )
    }

    pub fn read(wr_id: u64, sge: Sge, remote: RemoteAddr) -> SendWr {
        SendWr::new(wr_id, SendOp::RdmaRead, SgList::one(sge), remote)
    }

    /// Replace the scatter/gather list.
    pub fn with_sg(mut self, sg: SgList) -> SendWr {
        self.sg = sg;
        self
    }

    pub fn with_imm(mut self, imm: u32) -> SendWr {
        self.op = match self.op {
            SendOp::Send | SendOp::SendWithImm(_) => SendOp::SendWithImm(imm),
            SendOp::RdmaWrite | SendOp::RdmaWriteWithImm(_) => SendOp::RdmaWriteWithImm(imm),
            op => op,
        };
        self
    }

    pub fn unsignaled(mut self) -> SendWr {
        self.signaled = false;
        self
    }
}

/// A receive-queue work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvWr {
    pub wr_id: u64,
    pub sg: SgList,
}

impl RecvWr {
    pub fn new(wr_id: u64, sge: Sge) -> RecvWr {
        RecvWr {
            wr_id,
            sg: SgList::one(sge),
        }
    }

    /// A receive with no buffer (for WRITE_WITH_IMM notifications).
    pub fn empty(wr_id: u64) -> RecvWr {
        RecvWr {
            wr_id,
            sg: SgList::default(),
        }
    }
}
