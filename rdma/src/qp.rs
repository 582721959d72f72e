//! Queue-pair states, attributes and the verbs modify rules (RC), shared by every backend.
//!
//! The rules are the IB spec's table for `ibv_modify_qp` on an RC queue pair: which transitions
//! exist, and which attributes each one requires. A backend calls [`check_modify`] before it
//! touches anything, so an illegal transition or a missing attribute is the same error on the
//! simulator and on real hardware.

use serde::{Deserialize, Serialize};

use crate::access::MrAccess;
use crate::error::RdmaError;
pub use crate::qp_state::QpState;
use crate::wr::{Queue, RecvWr, SendWr, check_post};

/// The remote end of a connected QP: what `INIT → RTR` needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteQp {
    pub qpn: u32,
    /// RoCE GID of the remote port (the simulator derives one from the fabric device).
    pub gid: [u8; 16],
    pub lid: u16,
    /// The remote's first receive PSN (our `rq_psn` is the remote's `sq_psn`).
    pub psn: u32,
    /// The TCP backend's data port at that GID (0 on IB/RoCE and the simulator, where the GID
    /// alone reaches the port).
    #[serde(default)]
    pub port: u16,
    /// The TCP backend's connection token of that QP: a requester proves it holds it before
    /// the responder takes a frame from it (zeros elsewhere). Told only over the agents'
    /// authenticated control connection.
    #[serde(default)]
    pub token: [u8; 16],
}

impl RemoteQp {
    /// An endpoint without a data port or token (IB/RoCE, the simulator).
    pub const fn verbs(qpn: u32, gid: [u8; 16], lid: u16, psn: u32) -> RemoteQp {
        RemoteQp {
            qpn,
            gid,
            lid,
            psn,
            port: 0,
            token: [0; 16],
        }
    }
}

/// Path MTU (`enum ibv_mtu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mtu {
    Mtu256,
    Mtu512,
    Mtu1024,
    Mtu2048,
    Mtu4096,
}

impl Mtu {
    pub const fn bytes(self) -> u32 {
        match self {
            Mtu::Mtu256 => 256,
            Mtu::Mtu512 => 512,
            Mtu::Mtu1024 => 1024,
            Mtu::Mtu2048 => 2048,
            Mtu::Mtu4096 => 4096,
        }
    }

    pub const fn ibv(self) -> u32 {
        match self {
            Mtu::Mtu256 => 1,
            Mtu::Mtu512 => 2,
            Mtu::Mtu1024 => 3,
            Mtu::Mtu2048 => 4,
            Mtu::Mtu4096 => 5,
        }
    }
}

/// Attributes for one `modify`; `None` means "not in the mask".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QpAttr {
    pub state: Option<QpState>,
    pub port: Option<u8>,
    pub pkey_index: Option<u16>,
    /// Remote operations the QP allows as a responder.
    pub access: Option<MrAccess>,
    pub path_mtu: Option<Mtu>,
    pub dest: Option<RemoteQp>,
    pub rq_psn: Option<u32>,
    pub sq_psn: Option<u32>,
    pub max_dest_rd_atomic: Option<u8>,
    pub min_rnr_timer: Option<u8>,
    pub timeout: Option<u8>,
    pub retry_cnt: Option<u8>,
    pub rnr_retry: Option<u8>,
    pub max_rd_atomic: Option<u8>,
    /// SQD only: ask for an async "drained" event.
    pub en_sqd_async_notify: Option<bool>,
}

impl QpAttr {
    /// `RESET → INIT` with the usual attributes.
    pub fn init(port: u8, access: MrAccess) -> QpAttr {
        QpAttr {
            state: Some(QpState::Init),
            port: Some(port),
            pkey_index: Some(0),
            access: Some(access),
            ..QpAttr::default()
        }
    }

    /// `INIT → RTR` towards `dest`.
    pub fn rtr(dest: RemoteQp, mtu: Mtu) -> QpAttr {
        QpAttr {
            state: Some(QpState::Rtr),
            path_mtu: Some(mtu),
            rq_psn: Some(dest.psn),
            dest: Some(dest),
            max_dest_rd_atomic: Some(16),
            min_rnr_timer: Some(12),
            ..QpAttr::default()
        }
    }

    /// `RTR → RTS` with our first send PSN.
    pub fn rts(sq_psn: u32) -> QpAttr {
        QpAttr {
            state: Some(QpState::Rts),
            sq_psn: Some(sq_psn),
            timeout: Some(14),
            retry_cnt: Some(7),
            rnr_retry: Some(7),
            max_rd_atomic: Some(16),
            ..QpAttr::default()
        }
    }

    /// Only a state change (`RTS → SQD`, `SQD → RTS`, `* → ERR`, `* → RESET`).
    pub fn to(state: QpState) -> QpAttr {
        QpAttr {
            state: Some(state),
            ..QpAttr::default()
        }
    }

    fn has(&self, name: &str) -> bool {
        match name {
            "port" => self.port.is_some(),
            "pkey_index" => self.pkey_index.is_some(),
            "access" => self.access.is_some(),
            "path_mtu" => self.path_mtu.is_some(),
            "dest" => self.dest.is_some(),
            "rq_psn" => self.rq_psn.is_some(),
            "sq_psn" => self.sq_psn.is_some(),
            "max_dest_rd_atomic" => self.max_dest_rd_atomic.is_some(),
            "min_rnr_timer" => self.min_rnr_timer.is_some(),
            "timeout" => self.timeout.is_some(),
            "retry_cnt" => self.retry_cnt.is_some(),
            "rnr_retry" => self.rnr_retry.is_some(),
            "max_rd_atomic" => self.max_rd_atomic.is_some(),
            _ => false,
        }
    }
}

/// Required attributes per transition (IB spec, RC).
fn required(from: QpState, to: QpState) -> Option<&'static [&'static str]> {
    use QpState::*;
    Some(match (from, to) {
        (_, Reset) | (_, Err) => &[],
        (Reset, Init) => &["port", "pkey_index", "access"],
        (Init, Init) => &[],
        (Init, Rtr) => &[
            "path_mtu",
            "dest",
            "rq_psn",
            "max_dest_rd_atomic",
            "min_rnr_timer",
        ],
        (Rtr, Rts) => &[
            "sq_psn",
            "timeout",
            "retry_cnt",
            "rnr_retry",
            "max_rd_atomic",
        ],
        (Rts, Rts) | (Rts, Sqd) | (Sqd, Sqd) | (Sqd, Rts) | (Sqe, Rts) => &[],
        _ => return None,
    })
}

/// Check `attr` against the modify rules for a QP in `from`. Returns the target state.
pub fn check_modify(qpn: u32, from: QpState, attr: &QpAttr) -> Result<QpState, RdmaError> {
    let to = attr.state.unwrap_or(from);
    let Some(req) = required(from, to) else {
        return Err(RdmaError::IllegalTransition { qpn, from, to });
    };
    if let Some(missing) = req.iter().find(|a| !attr.has(a)) {
        return Err(RdmaError::MissingAttr {
            qpn,
            from,
            to,
            attr: missing,
        });
    }
    if let Some(a) = attr.access {
        a.validate().map_err(|why| RdmaError::InvalidAttr {
            qpn,
            attr: "access",
            value: a.to_string(),
            why,
        })?;
    }
    if let Some(p) = attr.port
        && p == 0
    {
        return Err(RdmaError::InvalidAttr {
            qpn,
            attr: "port",
            value: "0".into(),
            why: "ports are numbered from 1",
        });
    }
    Ok(to)
}

/// Queue sizes asked for at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
}

/// Most work requests per queue of a software NIC (the simulator, the TCP backend).
pub const SOFT_MAX_QP_WR: u32 = 1 << 15;

impl QpCaps {
    /// Check the capabilities asked of a software NIC's queue pair.
    pub(crate) fn check_soft(&self, qpn: u32) -> Result<(), RdmaError> {
        let bad = |attr: &'static str, value: u32, why: &'static str| RdmaError::InvalidAttr {
            qpn,
            attr,
            value: value.to_string(),
            why,
        };
        if self.max_send_wr == 0 || self.max_send_wr > SOFT_MAX_QP_WR {
            return Err(bad("max_send_wr", self.max_send_wr, "must be 1..=32768"));
        }
        if self.max_recv_wr > SOFT_MAX_QP_WR {
            return Err(bad(
                "max_recv_wr",
                self.max_recv_wr,
                "must be at most 32768",
            ));
        }
        for (n, v) in [
            ("max_send_sge", self.max_send_sge),
            ("max_recv_sge", self.max_recv_sge),
        ] {
            if v as usize > crate::wr::MAX_SGE {
                return Err(bad(n, v, "more scatter/gather entries than the device has"));
            }
        }
        Ok(())
    }

    /// Room for one more request on `queue` holding `len`.
    pub(crate) fn check_room(&self, qpn: u32, len: usize, queue: Queue) -> Result<(), RdmaError> {
        let depth = match queue {
            Queue::Send => self.max_send_wr,
            Queue::Recv => self.max_recv_wr,
        };
        if len >= depth as usize {
            return Err(RdmaError::QueueFull {
                qpn,
                queue: queue.name(),
                depth,
            });
        }
        Ok(())
    }

    /// One send request as a software provider checks it when it takes it from the chain: the
    /// state, its elements, its length, and room beside the `queued` ones.
    pub(crate) fn check_send(
        &self,
        qpn: u32,
        state: QpState,
        queued: usize,
        wr: &SendWr,
    ) -> Result<(), RdmaError> {
        check_post(
            qpn,
            state,
            Queue::Send,
            self.max_send_sge,
            [(wr.wr_id, &wr.sg)],
        )?;
        if wr.sg.total() > u64::from(u32::MAX) {
            return Err(RdmaError::BadWorkRequest {
                qpn,
                wr_id: wr.wr_id,
                op: wr.op.name(),
                what: format!("a length of at most 4 GiB - 1 (got {})", wr.sg.total()),
            });
        }
        self.check_room(qpn, queued, Queue::Send)
    }

    /// One receive request, likewise.
    pub(crate) fn check_recv(
        &self,
        qpn: u32,
        state: QpState,
        queued: usize,
        wr: &RecvWr,
    ) -> Result<(), RdmaError> {
        check_post(
            qpn,
            state,
            Queue::Recv,
            self.max_recv_sge,
            [(wr.wr_id, &wr.sg)],
        )?;
        self.check_room(qpn, queued, Queue::Recv)
    }
}

impl Default for QpCaps {
    fn default() -> Self {
        QpCaps {
            max_send_wr: 256,
            max_recv_wr: 256,
            max_send_sge: crate::wr::MAX_SGE as u32,
            max_recv_sge: crate::wr::MAX_SGE as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use QpState::*;

    const ALL: [QpState; 7] = [Reset, Init, Rtr, Rts, Sqd, Sqe, Err];

    fn full(to: QpState) -> QpAttr {
        let mut a = QpAttr::init(1, MrAccess::ALL);
        let r = QpAttr::rtr(RemoteQp::verbs(9, [0; 16], 0, 1), Mtu::Mtu4096);
        let s = QpAttr::rts(5);
        a.path_mtu = r.path_mtu;
        a.dest = r.dest;
        a.rq_psn = r.rq_psn;
        a.max_dest_rd_atomic = r.max_dest_rd_atomic;
        a.min_rnr_timer = r.min_rnr_timer;
        a.sq_psn = s.sq_psn;
        a.timeout = s.timeout;
        a.retry_cnt = s.retry_cnt;
        a.rnr_retry = s.rnr_retry;
        a.max_rd_atomic = s.max_rd_atomic;
        a.state = Some(to);
        a
    }

    #[test]
    fn legal_transitions_are_exactly_the_spec_table() {
        let legal = [
            (Reset, Init),
            (Init, Init),
            (Init, Rtr),
            (Rtr, Rts),
            (Rts, Rts),
            (Rts, Sqd),
            (Sqd, Sqd),
            (Sqd, Rts),
            (Sqe, Rts),
        ];
        for from in ALL {
            for to in ALL {
                let ok = to == Reset || to == Err || legal.contains(&(from, to));
                let got = check_modify(7, from, &full(to));
                assert_eq!(got.is_ok(), ok, "{from} -> {to}: {got:?}");
                if !ok {
                    assert_eq!(
                        got.unwrap_err().to_string(),
                        format!("QP 0x7: illegal transition {from} -> {to}")
                    );
                }
            }
        }
    }

    #[test]
    fn missing_attribute_is_named() {
        let mut a = QpAttr::rtr(RemoteQp::verbs(1, [0; 16], 0, 0), Mtu::Mtu1024);
        a.dest = None;
        let e = check_modify(3, Init, &a).unwrap_err();
        assert_eq!(
            e.to_string(),
            "QP 0x3: INIT -> RTR needs attribute `dest` (not in the mask)"
        );
        let e = check_modify(3, Rtr, &QpAttr::to(Rts)).unwrap_err();
        assert!(e.to_string().contains("`sq_psn`"), "{e}");
    }

    #[test]
    fn bad_access_and_port_rejected() {
        let mut a = QpAttr::init(1, MrAccess::REMOTE_WRITE);
        let e = check_modify(1, Reset, &a).unwrap_err();
        assert!(
            e.to_string().contains("REMOTE_WRITE requires LOCAL_WRITE"),
            "{e}"
        );
        a = QpAttr::init(0, MrAccess::ALL);
        let e = check_modify(1, Reset, &a).unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
    }
}
