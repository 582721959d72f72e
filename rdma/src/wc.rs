//! Work completions with verbs-compatible status codes.

use std::fmt;

use serde::Serialize;

/// `enum ibv_wc_status` (the values are the verbs ABI's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WcStatus {
    Success,
    /// A local length error: the receive buffer was too small, or a length was invalid.
    LocLenErr,
    LocQpOpErr,
    /// A local key, bound or access check failed.
    LocProtErr,
    /// The QP was in ERR: the request never started.
    WrFlushErr,
    /// The responder rejected the request (bad opcode for its QP, length).
    RemInvReqErr,
    /// The responder's key, bounds or access check failed.
    RemAccessErr,
    RemOpErr,
    /// The peer did not answer (unreachable or its QP is gone).
    RetryExcErr,
    /// The peer had no receive posted.
    RnrRetryExcErr,
    GeneralErr,
}

impl WcStatus {
    /// The verbs numeric value.
    pub const fn ibv(self) -> u32 {
        match self {
            WcStatus::Success => 0,
            WcStatus::LocLenErr => 1,
            WcStatus::LocQpOpErr => 2,
            WcStatus::LocProtErr => 4,
            WcStatus::WrFlushErr => 5,
            WcStatus::RemInvReqErr => 9,
            WcStatus::RemAccessErr => 10,
            WcStatus::RemOpErr => 11,
            WcStatus::RetryExcErr => 12,
            WcStatus::RnrRetryExcErr => 13,
            WcStatus::GeneralErr => 21,
        }
    }

    /// From the verbs numeric value; unknown values map to `GeneralErr`.
    pub const fn from_ibv(v: u32) -> WcStatus {
        match v {
            0 => WcStatus::Success,
            1 => WcStatus::LocLenErr,
            2 => WcStatus::LocQpOpErr,
            4 | 8 => WcStatus::LocProtErr,
            5 => WcStatus::WrFlushErr,
            9 => WcStatus::RemInvReqErr,
            10 => WcStatus::RemAccessErr,
            11 => WcStatus::RemOpErr,
            12 => WcStatus::RetryExcErr,
            13 => WcStatus::RnrRetryExcErr,
            _ => WcStatus::GeneralErr,
        }
    }

    pub const fn is_ok(self) -> bool {
        matches!(self, WcStatus::Success)
    }

    /// `ibv_wc_status_str` spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            WcStatus::Success => "success",
            WcStatus::LocLenErr => "local length error",
            WcStatus::LocQpOpErr => "local QP operation error",
            WcStatus::LocProtErr => "local protection error",
            WcStatus::WrFlushErr => "Work Request Flushed Error",
            WcStatus::RemInvReqErr => "remote invalid request error",
            WcStatus::RemAccessErr => "remote access error",
            WcStatus::RemOpErr => "remote operation error",
            WcStatus::RetryExcErr => "transport retry counter exceeded",
            WcStatus::RnrRetryExcErr => "RNR retry counter exceeded",
            WcStatus::GeneralErr => "general error",
        }
    }
}

impl fmt::Display for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.as_str(), self.ibv())
    }
}

/// `enum ibv_wc_opcode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WcOpcode {
    Send,
    RdmaWrite,
    RdmaRead,
    Recv,
    RecvRdmaWithImm,
}

/// One completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Completion {
    pub wr_id: u64,
    pub status: WcStatus,
    pub opcode: WcOpcode,
    /// Bytes moved (receives: bytes received; READ: bytes read).
    pub byte_len: u32,
    pub imm: Option<u32>,
    pub qp_num: u32,
    /// The vendor syndrome: in the simulator, why a check failed (0 on success).
    pub vendor_err: u32,
}

impl Completion {
    /// A completion of `qpn`'s request `wr_id` (no vendor syndrome).
    pub const fn new(
        qpn: u32,
        wr_id: u64,
        status: WcStatus,
        opcode: WcOpcode,
        byte_len: u32,
        imm: Option<u32>,
    ) -> Completion {
        Completion {
            wr_id,
            status,
            opcode,
            byte_len,
            imm,
            qp_num: qpn,
            vendor_err: 0,
        }
    }

    pub fn is_send(&self) -> bool {
        !matches!(self.opcode, WcOpcode::Recv | WcOpcode::RecvRdmaWithImm)
    }
}
