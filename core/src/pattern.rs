//! Test data that says where it belongs: a stream of 8-byte words, each unique to its stream
//! (`seed`) and its position, so a byte that landed in the wrong place, came from the wrong
//! request or was never written is told from the right one. Generated a word at a time, so that
//! filling and checking cost a data path little CPU. The demo, the stress, the benches and
//! `dmaplane load` all write and verify with it.

/// Word `k` of stream `seed`.
pub const fn word(seed: u64, k: u64) -> u64 {
    seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Fill `buf` with stream `seed` from byte `offset` of the stream on.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    // Up to the next word boundary.
    let head = usize::try_from((8 - offset % 8) % 8)
        .unwrap_or(0)
        .min(buf.len());
    let (first, rest) = buf.split_at_mut(head);
    for b in first {
        *b = word(seed, pos / 8).to_le_bytes()[(pos % 8) as usize];
        pos += 1;
    }
    let mut words = rest.chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&word(seed, pos / 8).to_le_bytes());
        pos += 8;
    }
    let tail = words.into_remainder();
    let n = tail.len();
    tail.copy_from_slice(&word(seed, pos / 8).to_le_bytes()[..n]);
}

/// The first `len` bytes of stream `seed`.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    fill(seed, 0, &mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_differ_by_seed_and_position() {
        let (a, b) = (bytes(1, 4099), bytes(2, 4099));
        assert_eq!(a.len(), 4099);
        assert!(a.chunks(8).zip(b.chunks(8)).all(|(x, y)| x != y));
        assert!(a.chunks(8).zip(a.chunks(8).skip(1)).all(|(x, y)| x != y));
    }

    #[test]
    fn a_piece_filled_at_its_offset_is_that_piece_of_the_stream() {
        let whole = bytes(7, 100);
        for (off, len) in [(0, 100), (3, 20), (8, 8), (13, 0), (95, 5), (1, 6)] {
            let mut piece = vec![0; len];
            fill(7, off as u64, &mut piece);
            assert_eq!(piece, whole[off..off + len], "offset {off}, {len} bytes");
        }
    }
}
