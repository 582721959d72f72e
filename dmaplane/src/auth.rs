//! Peer authentication: a shared secret, proven both ways on the handshake by HMAC-SHA256
//! challenge–response, bound to the names and NIC GIDs each side declares.
//!
//! The connecting side sends a random challenge with its hello; the listener answers with its
//! own challenge and a proof over both challenges, the handshake nonce and the connector's
//! identity; the connector checks it and answers with its proof; only then does the listener
//! send its metadata, with a proof over its own identity. Every lease-link connection of the
//! handshake carries a proof over its path. A peer without the secret learns nothing but that
//! it was refused; one that declares another's name or GIDs cannot produce the proofs for them.
//!
//! The secret authenticates, it does not encrypt: the bytes on the control connection and the
//! data itself are not confidential.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::metadata::Metadata;

/// Bytes of a challenge and of a proof.
pub(crate) const PROOF: usize = 32;
/// The shortest secret accepted, in bytes.
pub const MIN_SECRET: usize = 16;
/// The longest secret accepted, in bytes.
pub const MAX_SECRET: usize = 4096;

type HmacSha256 = Hmac<Sha256>;

/// A shared secret. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(std::sync::Arc<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Secret {
    /// A secret of [`MIN_SECRET`] to [`MAX_SECRET`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Secret> {
        let b: Vec<u8> = bytes.into();
        if b.len() < MIN_SECRET || b.len() > MAX_SECRET {
            return Err(Error::invalid(
                "agent",
                "secret",
                format!("{} bytes", b.len()),
                format!("{MIN_SECRET} to {MAX_SECRET} bytes"),
            ));
        }
        Ok(Secret(std::sync::Arc::new(b)))
    }

    /// The secret in a file: its bytes, without a trailing newline. The file must be readable
    /// by its owner only (as ssh asks of a private key): one that its group or others may
    /// read is refused, naming its mode.
    pub fn from_file(path: &std::path::Path) -> Result<Secret> {
        let bad = |why: String| Error::invalid("agent", "secret_file", path.display(), why);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(bad(format!(
                    "its mode is {mode:03o}: its group or others may read it; make it the \
                     owner's only (chmod 600)"
                )));
            }
        }
        let mut b = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
            b.pop();
        }
        Secret::new(b)
    }

    /// A new random secret (32 bytes from the operating system), written as 64 hexadecimal
    /// characters and a newline to `path`, a new file readable by its owner only; the secret
    /// is what [`Secret::from_file`] reads back. An existing file is not overwritten.
    pub fn create_file(path: &std::path::Path) -> Result<Secret> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw)
            .map_err(|e| Error::setup("agent", format!("no random bytes for a secret: {e}")))?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let written = o.open(path).and_then(|mut f| {
            use std::io::Write;
            f.write_all(hex.as_bytes())?;
            f.write_all(b"\n")
        });
        written.map_err(|e| {
            Error::invalid(
                "agent",
                "secret_file",
                path.display(),
                format!("cannot create it: {e}"),
            )
        })?;
        Secret::new(hex.into_bytes())
    }

    fn mac(&self, role: &str) -> HmacSha256 {
        // HMAC takes a key of any length.
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        m.update(b"dmaplane-auth-v1\0");
        m.update(role.as_bytes());
        m.update(&[0]);
        m
    }
}

/// A fresh random challenge.
pub(crate) fn challenge() -> Result<[u8; PROOF]> {
    let mut c = [0u8; PROOF];
    getrandom::fill(&mut c)
        .map_err(|e| Error::setup("agent", format!("no random bytes for a challenge: {e}")))?;
    Ok(c)
}

/// What both proofs of one handshake cover.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Session {
    /// The connector's challenge.
    pub(crate) c: [u8; PROOF],
    /// The listener's challenge.
    pub(crate) l: [u8; PROOF],
    /// The handshake's nonce.
    pub(crate) nonce: u64,
}

/// An identity as the proofs bind it: the agent's name and every NIC it declares with its GID.
fn identity(m: &mut HmacSha256, who: &Metadata) {
    m.update(&(who.agent.len() as u64).to_le_bytes());
    m.update(who.agent.as_bytes());
    m.update(&(who.nics.len() as u64).to_le_bytes());
    for n in &who.nics {
        m.update(&(n.name.len() as u64).to_le_bytes());
        m.update(n.name.as_bytes());
        m.update(&n.gid);
    }
}

impl Session {
    fn start(&self, secret: &Secret, role: &str) -> HmacSha256 {
        let mut m = secret.mac(role);
        m.update(&self.c);
        m.update(&self.l);
        m.update(&self.nonce.to_le_bytes());
        m
    }

    /// The proof `role` (`listener`, `connector`, `welcome`) gives over `who`'s identity.
    pub(crate) fn proof(&self, secret: &Secret, role: &str, who: &Metadata) -> [u8; PROOF] {
        let mut m = self.start(secret, role);
        identity(&mut m, who);
        m.finalize().into_bytes().into()
    }

    /// Whether `proof` is the one `role` gives over `who` (compared in constant time).
    pub(crate) fn check(&self, secret: &Secret, role: &str, who: &Metadata, proof: &[u8]) -> bool {
        let mut m = self.start(secret, role);
        identity(&mut m, who);
        m.verify_slice(proof).is_ok()
    }

    /// The proof a lease-link connection for `path` carries.
    pub(crate) fn link_proof(&self, secret: &Secret, path: usize) -> [u8; PROOF] {
        let mut m = self.start(secret, "link");
        m.update(&(path as u64).to_le_bytes());
        m.finalize().into_bytes().into()
    }

    /// Whether `proof` is the one for `path`'s lease link.
    pub(crate) fn check_link(&self, secret: &Secret, path: usize, proof: &[u8]) -> bool {
        let mut m = self.start(secret, "link");
        m.update(&(path as u64).to_le_bytes());
        m.verify_slice(proof).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_is_created_for_its_owner_only_and_read_back_and_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("dmaplane-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        let _ = std::fs::remove_file(&path);
        let made = Secret::create_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Secret::from_file(&path).unwrap(), made);
        // Not overwritten.
        let e = Secret::create_file(&path).unwrap_err().to_string();
        assert!(e.contains("cannot create"), "{e}");
        // Readable by others: refused, naming the mode.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Secret::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("644") && e.contains("chmod 600"), "{e}");
        // Too short: refused, naming the length.
        let short = dir.join("short");
        std::fs::write(&short, "abc\n").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Secret::from_file(&short).unwrap_err().to_string();
        assert!(e.contains("3 bytes"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn who(name: &str, gid: u8) -> Metadata {
        Metadata {
            version: crate::metadata::VERSION,
            agent: name.into(),
            handshake: "127.0.0.1:1".into(),
            backend: "sim".into(),
            nics: vec![crate::metadata::NicInfo {
                name: "nic0".into(),
                gid: [gid; 16],
                numa: 0,
                mtu: 4096,
            }],
            regions: Vec::new(),
        }
    }

    #[test]
    fn a_proof_holds_only_for_the_secret_the_session_and_the_identity_it_was_made_for() {
        let k = Secret::new(vec![7u8; 32]).unwrap();
        let other = Secret::new(vec![8u8; 32]).unwrap();
        let s = Session {
            c: challenge().unwrap(),
            l: challenge().unwrap(),
            nonce: 9,
        };
        let a = who("a", 1);
        let p = s.proof(&k, "connector", &a);
        assert!(s.check(&k, "connector", &a, &p));
        assert!(!s.check(&other, "connector", &a, &p), "another secret");
        assert!(!s.check(&k, "listener", &a, &p), "another role");
        assert!(!s.check(&k, "connector", &who("b", 1), &p), "another name");
        assert!(!s.check(&k, "connector", &who("a", 2), &p), "another GID");
        let s2 = Session { nonce: 10, ..s };
        assert!(!s2.check(&k, "connector", &a, &p), "another handshake");
        let l = s.link_proof(&k, 0);
        assert!(s.check_link(&k, 0, &l));
        assert!(!s.check_link(&k, 1, &l), "another path");
        assert!(Secret::new(vec![1u8; 15]).is_err());
        assert_eq!(format!("{k:?}"), "Secret(32 bytes)");
    }
}
