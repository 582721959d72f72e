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
    /// A notification: with the sender's transfer id when it came with one.
    Notify {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transfer: Option<u64>,
        #[serde(default)]
        tag: String,
        bytes: Vec<u8>,
    },
    /// The sender's registration `region` is gone (revoked at `epoch`): the receiver forgets
    /// it, refuses descriptors of it and tells its application ([`crate::Event::PeerRegionGone`]).
    Gone {
        region: u32,
        epoch: u64,
        why: crate::event::GoneWhy,
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
    /// Nothing to say: sent on an otherwise idle control connection every
    /// [`crate::Limits::keepalive`], so the peer does not take this agent for gone.
    Ping,
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
            Wire::Gone { .. } => "gone",
            Wire::Stage { .. } => "stage",
            Wire::Staged { .. } => "staged",
            Wire::Ping => "ping",
            Wire::Bye => "bye",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Location;
    use crate::metadata::{NicInfo, RegionKey, VERSION};
    use proptest::prelude::*;

    /// What the agent does with a message before anything else: decode it, then check what
    /// the peer declared in it. `Ok` only for what is safe to use.
    fn receive(line: &[u8]) -> std::result::Result<Wire, String> {
        let w: Wire = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        match &w {
            Wire::Hello { metadata, .. } | Wire::Welcome { metadata, .. } => {
                metadata.check().map_err(|e| e.to_string())?;
            }
            Wire::Region { info } => info.check("peer").map_err(|e| e.to_string())?,
            _ => {}
        }
        Ok(w)
    }

    /// Text a peer may send: any string, control characters included, or one around the
    /// length bound.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => "[a-z0-9:._-]{1,12}",
            1 => "[a-z]{0,4}[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}][a-z]{0,4}",
            1 => any::<String>(),
            1 => (250usize..260).prop_map(|n| "n".repeat(n)),
            1 => Just(String::new()),
        ]
    }

    fn metadata() -> impl Strategy<Value = Metadata> {
        (
            text(),
            text(),
            prop::collection::vec((text(), any::<[u8; 16]>()), 0..4),
            prop::collection::vec((any::<u32>(), text(), text(), text()), 0..4),
        )
            .prop_map(|(agent, handshake, nics, regions)| Metadata {
                version: VERSION,
                agent,
                handshake,
                backend: "sim".into(),
                nics: nics
                    .into_iter()
                    .map(|(name, gid)| NicInfo {
                        name,
                        gid,
                        numa: 0,
                        mtu: 4096,
                    })
                    .collect(),
                regions: regions
                    .into_iter()
                    .map(|(id, name, device, nic)| RegionInfo {
                        id,
                        name,
                        len: 4096,
                        location: Location::Host(device),
                        file: None,
                        epoch: 1,
                        keys: vec![RegionKey {
                            nic,
                            rkey: 1,
                            addr: 0,
                            staged: false,
                        }],
                    })
                    .collect(),
            })
    }

    /// Every name a message carries: what ends up in thread names and logs.
    fn names(w: &Wire) -> Vec<String> {
        let mut v = Vec::new();
        let mut of = |m: &Metadata| {
            v.push(m.agent.clone());
            v.extend(m.nics.iter().map(|n| n.name.clone()));
            for r in &m.regions {
                v.push(r.name.clone());
                v.extend(r.keys.iter().map(|k| k.nic.clone()));
            }
        };
        match w {
            Wire::Hello { metadata, .. } | Wire::Welcome { metadata, .. } => of(metadata),
            _ => {}
        }
        v
    }

    proptest! {
        /// Any bytes at all: decoding and checking never panics, and neither does reading a
        /// metadata blob.
        #[test]
        fn any_bytes_are_refused_or_decoded_never_a_panic(
            line in prop::collection::vec(any::<u8>(), 0..2048)
        ) {
            let _ = receive(&line);
            let _ = Metadata::from_blob(&line);
        }

        /// A hello or a welcome with any names: accepted only when every name is 1 to 255
        /// bytes without control characters (so it can name a thread), and what is accepted
        /// reads back the same from a blob.
        #[test]
        fn a_hello_is_accepted_only_with_names_that_are_safe_to_use(
            m in metadata(), nonce in any::<u64>(), welcome in any::<bool>()
        ) {
            let w = if welcome {
                Wire::Welcome { metadata: m.clone(), proof: None }
            } else {
                Wire::Hello { version: VERSION, metadata: m.clone(), qps: 1, nonce, challenge: None }
            };
            let line = serde_json::to_vec(&w).unwrap_or_default();
            if let Ok(got) = receive(&line) {
                for n in names(&got) {
                    prop_assert!(!n.is_empty() && n.len() <= 255, "{:?}", n);
                    prop_assert!(!n.chars().any(char::is_control), "{:?}", n);
                    prop_assert!(std::ffi::CString::new(n.clone()).is_ok(), "{:?}", n);
                }
                let blob = m.to_blob().unwrap_or_default();
                prop_assert_eq!(Metadata::from_blob(&blob).ok(), Some(m));
            } else {
                prop_assert!(Metadata::from_blob(&m.to_blob().unwrap_or_default()).is_err());
            }
        }
    }
}
