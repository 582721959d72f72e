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
    /// The NIC's name in the topology (e.g. `nic0`).
    pub name: String,
    /// The port GID (the identity leases are keyed by).
    pub gid: [u8; 16],
    /// The NUMA node the NIC sits on.
    pub numa: u32,
    /// The port's active path MTU in bytes (queue pairs use the smaller of both ends').
    pub mtu: u32,
}

/// A region's key on one NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionKey {
    /// The NIC's name.
    pub nic: String,
    /// The remote key a peer's requests through this NIC carry.
    pub rkey: u32,
    /// The region's base address on this NIC (its MR's IOVA); remote offsets are added to it.
    pub addr: u64,
    /// The key is of a host staging buffer, not of the memory itself: the owner copies what
    /// lands there into the memory when told (and stages what a READ will fetch).
    #[serde(default)]
    pub staged: bool,
}

/// One registered region as peers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    /// The registration id descriptors name.
    pub id: u32,
    /// The name of the memory it registers.
    pub name: String,
    /// Bytes registered (the range asked for, rounded out to whole pages within the memory).
    pub len: u64,
    /// Where the memory lives.
    pub location: Location,
    /// The file it serves, when it is a published file region
    /// ([`crate::Agent::publish_file`]): its keys are staged from and landed in the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The memory's export epoch when registered.
    pub epoch: u64,
    /// One key per NIC that serves it.
    pub keys: Vec<RegionKey>,
}

/// What a peer needs to connect to this agent and address its memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The metadata format version ([`VERSION`] for what this build writes).
    pub version: u16,
    /// The agent's name.
    pub agent: String,
    /// Where the agent's handshake listener is (`host:port`).
    pub handshake: String,
    /// The backend (`sim` or `verbs`).
    pub backend: String,
    /// The NICs the agent uses, in its order.
    pub nics: Vec<NicInfo>,
    /// Its live (not revoked) registrations, by id.
    pub regions: Vec<RegionInfo>,
}

impl Metadata {
    /// The region called `name`.
    pub fn region_named(&self, name: &str) -> Option<&RegionInfo> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// The region with registration id `id`.
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
    ///
    /// Fails with [`Error::Metadata`] for a blob over [`MAX_BLOB`] bytes, one shorter than its
    /// header or its stated length (`truncated`), one with trailing bytes, a wrong magic or
    /// version, or JSON that does not parse.
    ///
    /// ```
    /// use dmaplane::{Agent, Metadata, Testbed};
    /// # fn main() -> dmaplane::Result<()> {
    /// let testbed = Testbed::builtin()?;
    /// let agent = Agent::builder("a").testbed(testbed).nics(["nic0"]).build()?;
    /// let blob = agent.metadata_blob()?;
    /// let meta = Metadata::from_blob(&blob)?;
    /// assert_eq!(meta.agent, "a");
    /// assert_eq!(meta.nics[0].name, "nic0");
    ///
    /// let err = Metadata::from_blob(&blob[..blob.len() - 1]).unwrap_err();
    /// assert!(err.to_string().contains("truncated"), "{err}");
    /// # Ok(()) }
    /// ```
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
