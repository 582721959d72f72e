//! What two agents say on the control connection: the handshake (`hello`, `welcome`,
//! `refuse`, `link`), then registrations, notifications, staging and `bye`. One JSON line each.

use serde::{Deserialize, Serialize};

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
    },
    Welcome {
        metadata: Metadata,
    },
    Refuse {
        why: String,
    },
    Link {
        nonce: u64,
        path: usize,
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
