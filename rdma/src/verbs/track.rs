//! Outstanding work requests per QP, so error completions can be classified.
//!
//! Verbs defines only `wr_id`, `status`, `qp_num` and `vendor_err` for a completion with an
//! error status: the opcode is garbage (rxe reports flushed receives as `IBV_WC_SEND`, mlx5
//! leaves it unset). The layer above routes completions by [`Completion::is_send`], so the
//! backend remembers what it posted, in queue order, and names the opcode itself. Send and
//! receive queues complete in order on an RC QP, which keeps this a pair of FIFOs.
//!
//! [`Completion::is_send`]: crate::wc::Completion::is_send

use std::collections::VecDeque;

use crate::wc::WcOpcode;

#[derive(Debug, Default)]
pub(crate) struct WrTrack {
    /// Posted send requests not yet known complete: `(wr_id, opcode)`. A completion retires
    /// its request and every older one (unsignaled requests complete silently, in order).
    pub send: VecDeque<(u64, WcOpcode)>,
    /// Posted receives not yet completed.
    pub recv: VecDeque<u64>,
}

pub(crate) const fn is_recv(op: WcOpcode) -> bool {
    matches!(op, WcOpcode::Recv | WcOpcode::RecvRdmaWithImm)
}

impl WrTrack {
    /// Retire the request a completion reports and say what it was.
    ///
    /// `reported` is the hardware's opcode when the status is success (trusted), `None` for an
    /// error completion; `raw_is_recv` is the receive bit of the raw opcode, the tie-breaker
    /// when a `wr_id` is outstanding on both queues.
    pub fn retire(
        &mut self,
        wr_id: u64,
        reported: Option<WcOpcode>,
        raw_is_recv: bool,
    ) -> Option<WcOpcode> {
        if let Some(op) = reported {
            if is_recv(op) {
                self.retire_recv(wr_id);
            } else {
                self.retire_send(wr_id);
            }
            return Some(op);
        }
        let recv_pos = self.recv.iter().position(|&id| id == wr_id);
        let send_pos = self.send.iter().position(|&(id, _)| id == wr_id);
        match (recv_pos, send_pos) {
            (Some(_), None) => {
                self.retire_recv(wr_id);
                Some(WcOpcode::Recv)
            }
            (None, Some(_)) => self.retire_send(wr_id),
            (Some(_), Some(_)) if raw_is_recv => {
                self.retire_recv(wr_id);
                Some(WcOpcode::Recv)
            }
            (Some(_), Some(_)) => self.retire_send(wr_id),
            (None, None) => None,
        }
    }

    fn retire_recv(&mut self, wr_id: u64) {
        if self.recv.front() == Some(&wr_id) {
            self.recv.pop_front();
        } else if let Some(p) = self.recv.iter().position(|&id| id == wr_id) {
            self.recv.remove(p);
        }
    }

    fn retire_send(&mut self, wr_id: u64) -> Option<WcOpcode> {
        let p = self.send.iter().position(|&(id, _)| id == wr_id)?;
        let op = self.send[p].1;
        self.send.drain(..=p);
        Some(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushed_receives_are_receives() {
        let mut t = WrTrack::default();
        t.recv.extend([1, 2, 3]);
        t.send.push_back((10, WcOpcode::RdmaWrite));
        assert_eq!(t.retire(1, None, false), Some(WcOpcode::Recv));
        assert_eq!(t.retire(10, None, false), Some(WcOpcode::RdmaWrite));
        assert_eq!(t.retire(2, None, false), Some(WcOpcode::Recv));
        assert_eq!(t.recv.len(), 1);
        assert!(t.send.is_empty());
        assert_eq!(t.retire(99, None, false), None);
    }

    #[test]
    fn signaled_completion_retires_older_unsignaled() {
        let mut t = WrTrack::default();
        t.send.extend([
            (1, WcOpcode::RdmaWrite),
            (2, WcOpcode::RdmaWrite),
            (3, WcOpcode::Send),
        ]);
        assert_eq!(
            t.retire(2, Some(WcOpcode::RdmaWrite), false),
            Some(WcOpcode::RdmaWrite)
        );
        assert_eq!(t.send.len(), 1);
        assert_eq!(t.retire(3, None, false), Some(WcOpcode::Send));
        assert!(t.send.is_empty());
    }

    #[test]
    fn ambiguous_id_uses_raw_bit() {
        let mut t = WrTrack::default();
        t.recv.push_back(5);
        t.send.push_back((5, WcOpcode::RdmaRead));
        assert_eq!(t.retire(5, None, true), Some(WcOpcode::Recv));
        assert_eq!(t.retire(5, None, false), Some(WcOpcode::RdmaRead));
    }
}
