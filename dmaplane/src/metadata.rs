//! Agent metadata: one versioned, serialisable blob that tells a peer how to reach this agent —
//! its handshake address, its NICs, and its registered regions with their keys and epochs.
//!
//! The blob is `DMPL`, a little-endian `u16` version, a `u32` length, then that many bytes of
//! JSON. [`Metadata::from_blob`] refuses a blob that is truncated, oversized, of another version
//! or malformed, saying which.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::memory::Location;

/// The version this build writes and reads.
pub const VERSION: u16 = 1;
/// The largest blob accepted.
pub const MAX_BLOB: usize = 16 << 20;
const MAGIC: &[u8; 4] = b"DMPL";
const HEADER: usize = 4 + 2 + 4;

/// One NIC of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicInfo {
    pub name: String,
    pub gid: [u8; 16],
    pub numa: u32,
}

/// A region's key on one NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionKey {
    pub nic: String,
    pub rkey: u32,
    pub addr: u64,
}

/// One registered region as peers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    pub id: u32,
    pub name: String,
    pub len: u64,
    pub location: Location,
    /// The memory's export epoch when registered.
    pub epoch: u64,
    /// One key per NIC that serves it.
    pub keys: Vec<RegionKey>,
}

/// What a peer needs to connect to this agent and address its memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub version: u16,
    pub agent: String,
    /// Where the agent's handshake listener is (`host:port`).
    pub handshake: String,
    /// The backend (`sim` or `verbs`).
    pub backend: String,
    pub nics: Vec<NicInfo>,
    pub regions: Vec<RegionInfo>,
}

impl Metadata {
    /// The region called `name`.
    pub fn region_named(&self, name: &str) -> Option<&RegionInfo> {
        self.regions.iter().find(|r| r.name == name)
    }

    pub fn region(&self, id: u32) -> Option<&RegionInfo> {
        self.regions.iter().find(|r| r.id == id)
    }

    /// The blob: header, then JSON.
    pub fn to_blob(&self) -> Result<Vec<u8>> {
        let json =
            serde_json::to_vec(self).map_err(|e| Error::Metadata(format!("cannot encode: {e}")))?;
        if json.len() + HEADER > MAX_BLOB {
            return Err(Error::Metadata(format!(
                "{} bytes encoded, more than the {MAX_BLOB} a blob may hold ({} regions)",
                json.len() + HEADER,
                self.regions.len()
            )));
        }
        let mut out = Vec::with_capacity(HEADER + json.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        Ok(out)
    }

    /// Read a blob from [`Metadata::to_blob`].
    pub fn from_blob(blob: &[u8]) -> Result<Metadata> {
        if blob.len() > MAX_BLOB {
            return Err(Error::Metadata(format!(
                "{} bytes, more than the {MAX_BLOB} accepted",
                blob.len()
            )));
        }
        if blob.len() < HEADER {
            return Err(Error::Metadata(format!(
                "truncated: {} bytes, shorter than the {HEADER}-byte header",
                blob.len()
            )));
        }
        if &blob[..4] != MAGIC {
            return Err(Error::Metadata(format!(
                "starts with {:02x?}, not \"DMPL\": not dmaplane metadata",
                &blob[..4]
            )));
        }
        let version = u16::from_le_bytes([blob[4], blob[5]]);
        if version != VERSION {
            return Err(Error::Metadata(format!(
                "version {version}; this build reads version {VERSION}"
            )));
        }
        let len = u32::from_le_bytes([blob[6], blob[7], blob[8], blob[9]]) as usize;
        let body = &blob[HEADER..];
        if body.len() != len {
            return Err(Error::Metadata(format!(
                "the header says {len} bytes of JSON, {} follow ({})",
                body.len(),
                if body.len() < len {
                    "truncated"
                } else {
                    "trailing bytes"
                }
            )));
        }
        let m: Metadata = serde_json::from_slice(body)
            .map_err(|e| Error::Metadata(format!("malformed JSON: {e}")))?;
        if m.version != version {
            return Err(Error::Metadata(format!(
                "header version {version}, body version {}",
                m.version
            )));
        }
        Ok(m)
    }
}
