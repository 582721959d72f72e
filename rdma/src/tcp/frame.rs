//! The TCP backend's wire: fixed 32-byte headers, each followed by `payload` bytes.
//!
//! A requester's connection carries, from the requester: `hello` (once, answering the
//! responder's `challenge`), then `write`, `send` and `read` frames and, when its QP goes to
//! ERR, `flush`; from the responder: `challenge`, `welcome` or `refuse`, then `ack`, `nak`,
//! `read-resp` frames and `flush-ack`.
//!
//! A message of more than one frame is sent as frames of at most [`MAX_PAYLOAD`] bytes, each
//! naming its own remote address, so the responder checks key, bounds and access per frame and
//! a zap refuses the next frame, as a NIC refuses the next packet. Every header is checked in
//! full by [`Header::decode`] before anything else happens: magic, kind, the direction it may
//! travel in, flags, and a payload length bounded for its kind. A peer's bytes never size an
//! allocation.
//!
//! Layout (little endian): `magic u16, kind u8, flags u8, seq u32, payload u32, rkey u32,
//! addr u64, arg u32, reserved u32` (zero).

use crate::wc::WcStatus;

/// Header size on the wire.
pub const HEADER: usize = 32;
/// The most payload bytes in one frame: a revoke waits for at most one frame per queue pair.
pub const MAX_PAYLOAD: u32 = 256 << 10;
/// The protocol version a `hello` names.
pub const VERSION: u32 = 1;
/// Bytes of a `hello`'s payload: the requester's GID and its proof.
pub const HELLO_PAYLOAD: u32 = 16 + 32;
/// Bytes of a `challenge`'s payload: the responder's nonce.
pub const CHALLENGE_PAYLOAD: u32 = 32;

const MAGIC: u16 = 0xd17a;

/// This frame is the first of its message.
pub const FIRST: u8 = 1;
/// This frame is the last of its message.
pub const LAST: u8 = 2;
/// `arg` carries an immediate (WRITE or SEND with immediate, on the last frame).
pub const IMM: u8 = 4;
const FLAGS: u8 = FIRST | LAST | IMM;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Requester: `rkey` = the responder's QPN, `arg` = the requester's QPN, `addr` = version;
    /// payload: GID and proof.
    Hello,
    /// Requester: payload bytes for `[addr, +payload)` of `rkey`.
    Write,
    /// Requester: payload bytes of a SEND.
    Send,
    /// Requester: read `arg` bytes at `addr` of `rkey`.
    Read,
    /// Requester: its QP went to ERR; answer `flush-ack` once everything before is done.
    Flush,
    /// Responder: payload is its nonce.
    Challenge,
    Welcome,
    /// Responder: `arg` is a [`Refusal`] code.
    Refuse,
    /// Responder: message `seq` is done (written, or received).
    Ack,
    /// Responder: message `seq` failed with the status in `arg`; the connection ends.
    Nak,
    /// Responder: payload bytes of READ `seq`.
    ReadResp,
    /// Responder: everything before the flush is done; nothing after it will be.
    FlushAck,
}

impl Kind {
    const ALL: [Kind; 12] = [
        Kind::Hello,
        Kind::Write,
        Kind::Send,
        Kind::Read,
        Kind::Flush,
        Kind::Challenge,
        Kind::Welcome,
        Kind::Refuse,
        Kind::Ack,
        Kind::Nak,
        Kind::ReadResp,
        Kind::FlushAck,
    ];

    const fn code(self) -> u8 {
        match self {
            Kind::Hello => 1,
            Kind::Write => 2,
            Kind::Send => 3,
            Kind::Read => 4,
            Kind::Flush => 5,
            Kind::Challenge => 16,
            Kind::Welcome => 17,
            Kind::Refuse => 18,
            Kind::Ack => 19,
            Kind::Nak => 20,
            Kind::ReadResp => 21,
            Kind::FlushAck => 22,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Write => "write",
            Kind::Send => "send",
            Kind::Read => "read",
            Kind::Flush => "flush",
            Kind::Challenge => "challenge",
            Kind::Welcome => "welcome",
            Kind::Refuse => "refuse",
            Kind::Ack => "ack",
            Kind::Nak => "nak",
            Kind::ReadResp => "read-resp",
            Kind::FlushAck => "flush-ack",
        }
    }

    /// Sent by the requester (else by the responder).
    pub const fn sent_by_requester(self) -> bool {
        self.code() < 16
    }

    /// The payload bytes a frame of this kind may carry: (least, most).
    const fn payload_bounds(self) -> (u32, u32) {
        match self {
            Kind::Hello => (HELLO_PAYLOAD, HELLO_PAYLOAD),
            Kind::Challenge => (CHALLENGE_PAYLOAD, CHALLENGE_PAYLOAD),
            // A message may be empty: one frame of nothing.
            Kind::Write | Kind::ReadResp | Kind::Send => (0, MAX_PAYLOAD),
            _ => (0, 0),
        }
    }
}

/// Why a responder refused a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The QP is not ready yet (RESET or INIT): try again, as RC retries.
    NotReady = 1,
    /// The proof is wrong, or the QP is connected to another: never retried.
    Denied = 2,
    /// No such QP.
    NoQp = 3,
    /// The hello's version is not this one.
    Version = 4,
}

impl Refusal {
    pub fn from_code(c: u32) -> Option<Refusal> {
        [
            Refusal::NotReady,
            Refusal::Denied,
            Refusal::NoQp,
            Refusal::Version,
        ]
        .into_iter()
        .find(|r| *r as u32 == c)
    }
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub flags: u8,
    pub seq: u32,
    pub payload: u32,
    pub rkey: u32,
    pub addr: u64,
    pub arg: u32,
}

/// Why a header was refused. Names the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame magic {0:#06x} is not {MAGIC:#06x}: not a dmaplane TCP peer")]
    Magic(u16),
    #[error("frame kind {0} is unknown")]
    Kind(u8),
    #[error("a {kind} frame travels the other way")]
    Direction { kind: &'static str },
    #[error("frame flags {flags:#x} of a {kind} frame: unknown bits")]
    Flags { kind: &'static str, flags: u8 },
    #[error("a {kind} frame's payload of {payload} bytes is outside {least}..={most}")]
    Payload {
        kind: &'static str,
        payload: u32,
        least: u32,
        most: u32,
    },
    #[error("a {kind} frame's reserved word is {word:#x}, not 0")]
    Reserved { kind: &'static str, word: u32 },
}

impl Header {
    pub fn new(kind: Kind) -> Header {
        Header {
            kind,
            flags: 0,
            seq: 0,
            payload: 0,
            rkey: 0,
            addr: 0,
            arg: 0,
        }
    }

    pub fn encode(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[2] = self.kind.code();
        b[3] = self.flags;
        b[4..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..12].copy_from_slice(&self.payload.to_le_bytes());
        b[12..16].copy_from_slice(&self.rkey.to_le_bytes());
        b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        b[24..28].copy_from_slice(&self.arg.to_le_bytes());
        b
    }

    /// Decode and check a header that travelled from the requester (`from_requester`) or from
    /// the responder.
    pub fn decode(b: &[u8; HEADER], from_requester: bool) -> Result<Header, FrameError> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let magic = u16::from_le_bytes([b[0], b[1]]);
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.code() == b[2])
            .ok_or(FrameError::Kind(b[2]))?;
        if kind.sent_by_requester() != from_requester {
            return Err(FrameError::Direction { kind: kind.name() });
        }
        let flags = b[3];
        if flags & !FLAGS != 0 {
            return Err(FrameError::Flags {
                kind: kind.name(),
                flags,
            });
        }
        let payload = u32_at(8);
        let (least, most) = kind.payload_bounds();
        if payload < least || payload > most {
            return Err(FrameError::Payload {
                kind: kind.name(),
                payload,
                least,
                most,
            });
        }
        let word = u32_at(28);
        if word != 0 {
            return Err(FrameError::Reserved {
                kind: kind.name(),
                word,
            });
        }
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&b[16..24]);
        Ok(Header {
            kind,
            flags,
            seq: u32_at(4),
            payload,
            rkey: u32_at(12),
            addr: u64::from_le_bytes(addr),
            arg: u32_at(24),
        })
    }

    pub fn first(&self) -> bool {
        self.flags & FIRST != 0
    }

    pub fn last(&self) -> bool {
        self.flags & LAST != 0
    }

    /// The immediate of a last frame that carries one.
    pub fn imm(&self) -> Option<u32> {
        (self.flags & IMM != 0).then_some(self.arg)
    }
}

/// The status a `nak` carries, as the requester's completion shows it. Only the statuses a
/// responder reports travel; anything else reads as a remote operational error.
pub fn nak_status(arg: u32) -> WcStatus {
    match WcStatus::from_ibv(arg) {
        s @ (WcStatus::RemAccessErr
        | WcStatus::RemInvReqErr
        | WcStatus::RemOpErr
        | WcStatus::RnrRetryExcErr
        | WcStatus::RetryExcErr) => s,
        _ => WcStatus::RemOpErr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_kind_round_trips_in_its_direction_only() {
        for kind in Kind::ALL {
            let (least, _) = kind.payload_bounds();
            let h = Header {
                kind,
                flags: FIRST | LAST,
                seq: 7,
                payload: least,
                rkey: 0x1234,
                addr: 0xdead_beef_0000,
                arg: 42,
            };
            let b = h.encode();
            assert_eq!(Header::decode(&b, kind.sent_by_requester()), Ok(h));
            assert_eq!(
                Header::decode(&b, !kind.sent_by_requester()),
                Err(FrameError::Direction { kind: kind.name() })
            );
        }
    }

    #[test]
    fn bad_headers_are_named() {
        let mut h = Header::new(Kind::Write);
        h.payload = MAX_PAYLOAD + 1;
        let e = Header::decode(&h.encode(), true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a write frame's payload of 262145 bytes is outside 0..=262144"
        );
        let mut b = Header::new(Kind::Ack).encode();
        b[0] = 0;
        assert!(matches!(
            Header::decode(&b, false),
            Err(FrameError::Magic(_))
        ));
        let mut b = Header::new(Kind::Ack).encode();
        b[3] = 0x80;
        assert!(matches!(
            Header::decode(&b, false),
            Err(FrameError::Flags { .. })
        ));
        let mut b = Header::new(Kind::Ack).encode();
        b[30] = 1;
        assert!(matches!(
            Header::decode(&b, false),
            Err(FrameError::Reserved { .. })
        ));
        let mut b = Header::new(Kind::Ack).encode();
        b[2] = 99;
        assert_eq!(Header::decode(&b, false), Err(FrameError::Kind(99)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2048)
        ))]

        /// Any 32 bytes: the decoder answers (never panics), and what it accepts is within its
        /// kind's bounds and encodes back to the same bytes.
        #[test]
        fn any_header_is_refused_or_bounded(b in proptest::array::uniform32(any::<u8>()), req in any::<bool>()) {
            if let Ok(h) = Header::decode(&b, req) {
                let (least, most) = h.kind.payload_bounds();
                prop_assert!(h.payload >= least && h.payload <= most);
                prop_assert!(h.payload <= MAX_PAYLOAD);
                prop_assert_eq!(h.kind.sent_by_requester(), req);
                prop_assert_eq!(h.encode(), b);
            }
        }
    }
}
