//! The queue-pair state (`enum ibv_qp_state`), shared by every backend and by the errors that
//! name one.

use std::fmt;

use serde::{Deserialize, Serialize};

/// `enum ibv_qp_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum QpState {
    Reset,
    Init,
    /// Ready to receive.
    Rtr,
    /// Ready to send.
    Rts,
    /// Send queue drain: work already started completes, nothing new starts.
    Sqd,
    /// Send queue error (UC/UD only in the spec; kept for completeness).
    Sqe,
    /// Error: everything outstanding completes as flushed.
    Err,
}

impl QpState {
    /// The numeric value of `enum ibv_qp_state`.
    pub const fn ibv(self) -> u32 {
        match self {
            QpState::Reset => 0,
            QpState::Init => 1,
            QpState::Rtr => 2,
            QpState::Rts => 3,
            QpState::Sqd => 4,
            QpState::Sqe => 5,
            QpState::Err => 6,
        }
    }

    /// From the numeric value of `enum ibv_qp_state` (`ibv_query_qp`, a state kept in an
    /// atomic); `None` for a number the enum does not have.
    pub const fn from_ibv(v: u32) -> Option<QpState> {
        Some(match v {
            0 => QpState::Reset,
            1 => QpState::Init,
            2 => QpState::Rtr,
            3 => QpState::Rts,
            4 => QpState::Sqd,
            5 => QpState::Sqe,
            6 => QpState::Err,
            _ => return None,
        })
    }

    /// Receives may be posted (and will be consumed) in this state.
    pub const fn can_post_recv(self) -> bool {
        !matches!(self, QpState::Reset)
    }

    /// Sends may be posted in this state (in SQD they queue without starting; in ERR they
    /// complete at once as flushed).
    pub const fn can_post_send(self) -> bool {
        matches!(
            self,
            QpState::Rts | QpState::Sqd | QpState::Sqe | QpState::Err
        )
    }
}

impl fmt::Display for QpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QpState::Reset => "RESET",
            QpState::Init => "INIT",
            QpState::Rtr => "RTR",
            QpState::Rts => "RTS",
            QpState::Sqd => "SQD",
            QpState::Sqe => "SQE",
            QpState::Err => "ERR",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_through_its_number_and_others_are_none() {
        for s in [
            QpState::Reset,
            QpState::Init,
            QpState::Rtr,
            QpState::Rts,
            QpState::Sqd,
            QpState::Sqe,
            QpState::Err,
        ] {
            assert_eq!(QpState::from_ibv(s.ibv()), Some(s));
        }
        assert_eq!(QpState::from_ibv(7), None);
    }
}
