//! The bytes `serve --fill` writes and `write`/`read --verify` check: a function of the
//! position and a seed, so any range can be checked without the whole.

/// The byte at `pos` of pattern `seed`.
fn byte(seed: u64, pos: u64) -> u8 {
    let x = (pos ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0x2545_f491_4f6c_dd1d);
    (x >> 56) as u8
}

/// Fill `buf` with pattern `seed` from position `at`.
pub fn fill(buf: &mut [u8], seed: u64, at: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = byte(seed, at + i as u64);
    }
}

/// The first position in `buf` (read from position `at`) that differs from pattern `seed`.
pub fn first_difference(buf: &[u8], seed: u64, at: u64) -> Option<u64> {
    buf.iter()
        .enumerate()
        .find(|(i, b)| **b != byte(seed, at + *i as u64))
        .map(|(i, _)| at + i as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_checks_against_the_same_pattern_and_not_another() {
        let mut b = vec![0u8; 4096];
        fill(&mut b, 7, 100);
        assert_eq!(first_difference(&b, 7, 100), None);
        assert!(first_difference(&b, 8, 100).is_some());
        assert!(first_difference(&b, 7, 101).is_some());
        b[17] ^= 1;
        assert_eq!(first_difference(&b, 7, 100), Some(117));
    }
}
