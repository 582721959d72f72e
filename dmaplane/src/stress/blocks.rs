//! What the agent-level stress writes and checks: self-describing blocks (an epoch, a slot
//! and a sequence number in a header, the body derived from them), the notification naming
//! each, and the check a freed block must pass — whole, its own, and at least as new as the
//! newest notification for it.

/// A block's header: magic, epoch, slot, sequence number.
const MAGIC: &[u8; 4] = b"DMPS";
/// Bytes of a block's header.
pub const HEADER: usize = 4 + 8 + 4 + 8;

/// A block's bytes: the header, then a body derived from it.
pub fn block(epoch: u64, slot: u32, seq: u64, size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    let mut h = Vec::with_capacity(HEADER);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&epoch.to_le_bytes());
    h.extend_from_slice(&slot.to_le_bytes());
    h.extend_from_slice(&seq.to_le_bytes());
    let n = HEADER.min(size);
    b[..n].copy_from_slice(&h[..n]);
    let seed = epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (u64::from(slot) << 32) ^ seq;
    for (i, x) in b.iter_mut().enumerate().skip(n) {
        *x = ((i as u64).wrapping_mul(2654435761) ^ seed).to_le_bytes()[i % 8];
    }
    b
}

/// The notification a block's WRITE carries: epoch, slot, sequence number.
pub fn note(epoch: u64, slot: u32, seq: u64) -> Vec<u8> {
    let mut n = epoch.to_le_bytes().to_vec();
    n.extend_from_slice(&slot.to_le_bytes());
    n.extend_from_slice(&seq.to_le_bytes());
    n
}

/// The (epoch, slot, sequence number) a notification names, if it is one of ours.
pub fn parse_note(b: &[u8]) -> Option<(u64, u32, u64)> {
    if b.len() != 20 {
        return None;
    }
    Some((
        u64::from_le_bytes(b[0..8].try_into().ok()?),
        u32::from_le_bytes(b[8..12].try_into().ok()?),
        u64::from_le_bytes(b[12..20].try_into().ok()?),
    ))
}

/// A freed block: never written (zero, when no notification named it), or whole and at least
/// as new as the newest notification for it.
pub fn check_block(b: &[u8], epoch: u64, slot: u32, newest: u64) -> Result<(), String> {
    if b.iter().all(|&x| x == 0) {
        return if newest == 0 {
            Ok(())
        } else {
            Err(format!("empty, though WRITE {newest} into it was notified"))
        };
    }
    let n = HEADER.min(b.len());
    if b.len() < HEADER || &b[..4] != MAGIC {
        return Err("no block header: a torn or foreign WRITE".into());
    }
    let e = u64::from_le_bytes(b[4..12].try_into().unwrap_or_default());
    let s = u32::from_le_bytes(b[12..16].try_into().unwrap_or_default());
    let q = u64::from_le_bytes(b[16..24].try_into().unwrap_or_default());
    if (e, s) != (epoch, slot) {
        return Err(format!("holds epoch {e} slot {s}'s block"));
    }
    if q < newest {
        return Err(format!("holds WRITE {q}, older than the notified {newest}"));
    }
    if b[n..] != block(e, s, q, b.len())[n..] {
        return Err(format!("WRITE {q}'s body differs from its header: torn"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block check can fail: every way a freed block can be wrong is named.
    #[test]
    fn a_freed_block_that_is_torn_stale_foreign_or_missing_is_refused() {
        let size = 4096;
        let good = block(3, 1, 7, size);
        assert_eq!(check_block(&good, 3, 1, 7), Ok(()));
        assert_eq!(
            check_block(&good, 3, 1, 5),
            Ok(()),
            "newer than notified is fine"
        );
        assert_eq!(
            check_block(&vec![0; size], 3, 1, 0),
            Ok(()),
            "never written"
        );
        let mut torn = good.clone();
        torn[size / 2..].copy_from_slice(&block(3, 1, 8, size)[size / 2..]);
        let why = |b: &[u8], e, s, q| check_block(b, e, s, q).unwrap_err();
        assert!(why(&torn, 3, 1, 7).contains("torn"));
        assert!(why(&good, 3, 1, 9).contains("older"));
        assert!(why(&good, 4, 1, 7).contains("epoch 3"));
        assert!(why(&good, 3, 2, 7).contains("slot 1"));
        assert!(why(&vec![0; size], 3, 1, 2).contains("empty"));
        assert!(why(&vec![0xee; size], 3, 1, 2).contains("header"));
    }
}
