//! What the Agent's integration tests share.
#![allow(dead_code)]

use std::time::Duration;

/// How long any one wait in a test may take.
pub const T: Duration = Duration::from_secs(20);

/// Position- and seed-dependent bytes, so a misplaced or stale chunk shows.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) as u8)
        .collect()
}
