//! What two agents say on the control connection: the handshake (`hello`, then with a secret
//! `challenge` and `proof` ([`crate::auth`]), `welcome` or `refuse`, `link`), then
//! registrations, notifications, staging and `bye`. One JSON line each.

use serde::{Deserialize, Serialize};

use crate::auth::PROOF;
use crate::metadata::{Metadata, RegionInfo};
use crate::stage::{StageFailure, StageRange};

/// What travels on the control connection (one JSON line each).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "msg")]
pub(crate) enum Wire {
    Hello {
        version: u16,
        metadata: Metadata,
        qps: usize,
        nonce: u64,
        /// The connector's challenge, when it holds a secret.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        challenge: Option<[u8; PROOF]>,
    },
    /// The listener's challenge and its proof over the connector's identity.
    Challenge {
        challenge: [u8; PROOF],
        proof: [u8; PROOF],
    },
    /// The connector's proof over its own identity.
    Proof {
        proof: [u8; PROOF],
    },
    Welcome {
        metadata: Metadata,
        /// With a secret: the listener's proof over its own identity.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proof: Option<[u8; PROOF]>,
    },
    Refuse {
        why: String,
    },
    Link {
        nonce: u64,
        path: usize,
        /// With a secret: the proof for this path of this handshake.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proof: Option<[u8; PROOF]>,
    },
    Region {
        info: RegionInfo,
    },
    Notify {
        transfer: u64,
        bytes: Vec<u8>,
    },
    /// Copy these ranges of the receiver's staged registrations into device memory (`land`,
    /// after a WRITE) or out of it into their staging buffers (before a READ); answered by
    /// `staged`.
    Stage {
        transfer: u64,
        land: bool,
        ranges: Vec<StageRange>,
    },
    Staged {
        transfer: u64,
        failure: Option<StageFailure>,
    },
    Bye,
}

impl Wire {
    /// The message's kind, as the wire names it (for errors: never the peer's contents).
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Wire::Hello { .. } => "hello",
            Wire::Challenge { .. } => "challenge",
            Wire::Proof { .. } => "proof",
            Wire::Welcome { .. } => "welcome",
            Wire::Refuse { .. } => "refuse",
            Wire::Link { .. } => "link",
            Wire::Region { .. } => "region",
            Wire::Notify { .. } => "notify",
            Wire::Stage { .. } => "stage",
            Wire::Staged { .. } => "staged",
            Wire::Bye => "bye",
        }
    }
}
