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
pub const VERSION: u16 = 2;
/// The largest blob accepted.
pub const MAX_BLOB: usize = 16 << 20;
/// The longest name (of an agent, a NIC, a region) a peer may send, in bytes.
pub const MAX_NAME: usize = 255;
/// The most NICs an agent may declare (and keys a region may carry).
pub const MAX_NICS: usize = 64;
/// The longest file path a region may name, in bytes.
pub const MAX_PATH: usize = 4096;
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
    /// The backend (`sim`, `verbs` or `tcp`).
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
        m.check()?;
        Ok(m)
    }

    /// Check what a peer sent before any of it is used: every name 1 to [`MAX_NAME`] bytes
    /// without control characters (they end up in thread names and logs), at most
    /// [`MAX_NICS`] NICs, and each region as [`RegionInfo::check`] says. The error names the
    /// field and the value.
    pub fn check(&self) -> Result<()> {
        check_name("metadata", "agent", &self.agent)?;
        let what = || format!("metadata of {}", self.agent);
        check_text(&what(), "handshake", &self.handshake, MAX_NAME)?;
        check_text(&what(), "backend", &self.backend, MAX_NAME)?;
        if self.nics.len() > MAX_NICS {
            return Err(Error::invalid(
                what(),
                "nics",
                self.nics.len(),
                format!("at most {MAX_NICS} NICs"),
            ));
        }
        for n in &self.nics {
            check_name(&what(), "nics.name", &n.name)?;
        }
        for r in &self.regions {
            r.check(&self.agent)?;
        }
        Ok(())
    }
}

impl RegionInfo {
    /// The memory this description takes when kept (what [`crate::Limits::region_bytes`]
    /// bounds): the struct, its strings and its keys.
    pub fn footprint(&self) -> usize {
        std::mem::size_of::<RegionInfo>()
            + self.name.len()
            + self.location.device().len()
            + self.file.as_ref().map_or(0, String::len)
            + self
                .keys
                .iter()
                .map(|k| std::mem::size_of::<RegionKey>() + k.nic.len())
                .sum::<usize>()
    }

    /// Check a region a peer (`agent`) announced: its name and its location's device as
    /// [`check_name`] says, at most
    /// [`MAX_NICS`] keys each naming a NIC, a file path of at most [`MAX_PATH`] bytes without
    /// control characters.
    pub fn check(&self, agent: &str) -> Result<()> {
        let what = || format!("region {} of {agent}", self.id);
        check_name(&what(), "name", &self.name)?;
        check_name(&what(), "location", self.location.device())?;
        if self.keys.len() > MAX_NICS {
            return Err(Error::invalid(
                what(),
                "keys",
                self.keys.len(),
                format!("at most {MAX_NICS} keys (one per NIC)"),
            ));
        }
        for k in &self.keys {
            check_name(&what(), "keys.nic", &k.nic)?;
        }
        if let Some(f) = &self.file {
            check_text(&what(), "file", f, MAX_PATH)?;
        }
        Ok(())
    }
}

/// A name a peer sent (or an application chose): 1 to [`MAX_NAME`] bytes, no control
/// characters. The error shows the value escaped.
pub fn check_name(what: &str, field: &'static str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(
            what,
            field,
            "\"\"",
            "empty: names are 1 to 255 bytes",
        ));
    }
    check_text(what, field, name, MAX_NAME)
}

/// Text a peer sent: at most `max` bytes, no control characters.
fn check_text(what: &str, field: &'static str, text: &str, max: usize) -> Result<()> {
    if text.len() > max {
        let shown: String = text.chars().take(32).collect();
        return Err(Error::invalid(
            what,
            field,
            format!("{shown:?}... ({} bytes)", text.len()),
            format!("longer than {max} bytes"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(Error::invalid(
            what,
            field,
            format!("{text:?}"),
            "contains control characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Metadata {
        Metadata {
            version: VERSION,
            agent: "a".into(),
            handshake: "127.0.0.1:1".into(),
            backend: "sim".into(),
            nics: vec![NicInfo {
                name: "nic0".into(),
                gid: [0; 16],
                numa: 0,
                mtu: 4096,
            }],
            regions: vec![RegionInfo {
                id: 1,
                name: "kv".into(),
                len: 4096,
                location: Location::Host("mem0".into()),
                file: None,
                epoch: 1,
                keys: vec![RegionKey {
                    nic: "nic0".into(),
                    rkey: 1,
                    addr: 0,
                    staged: false,
                }],
            }],
        }
    }

    /// The field a refusal names.
    fn refused(m: &Metadata) -> &'static str {
        match m.check() {
            Err(Error::Invalid(i)) => i.field,
            other => panic!("not refused by field: {other:?}"),
        }
    }

    #[test]
    fn what_a_peer_declares_is_refused_by_field_when_it_could_harm_a_thread_or_a_log() {
        assert!(meta().check().is_ok());
        let mut m = meta();
        m.agent = "a\0b".into();
        assert_eq!(refused(&m), "agent");
        m.agent = "x".repeat(256);
        assert_eq!(refused(&m), "agent");
        m.agent = String::new();
        assert_eq!(refused(&m), "agent");
        let mut m = meta();
        m.nics[0].name = "nic\n0".into();
        assert_eq!(refused(&m), "nics.name");
        let mut m = meta();
        m.nics = vec![m.nics[0].clone(); MAX_NICS + 1];
        assert_eq!(refused(&m), "nics");
        let mut m = meta();
        m.regions[0].name = "kv\u{7}".into();
        assert_eq!(refused(&m), "name");
        let mut m = meta();
        m.regions[0].keys[0].nic = String::new();
        assert_eq!(refused(&m), "keys.nic");
        let mut m = meta();
        m.regions[0].file = Some("/".repeat(MAX_PATH + 1));
        assert_eq!(refused(&m), "file");
        let mut m = meta();
        m.handshake = "host\r\n:1".into();
        assert_eq!(refused(&m), "handshake");
        // A blob is checked as it is read.
        let mut m = meta();
        m.agent = "a\0b".into();
        let e = Metadata::from_blob(&m.to_blob().unwrap()).unwrap_err();
        assert!(matches!(&e, Error::Invalid(i) if i.field == "agent"), "{e}");
    }
}
