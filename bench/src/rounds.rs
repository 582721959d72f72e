//! Paired rounds: the two sides of a comparison run back to back in every round, the order
//! swapped from one round to the next, so that what drifts over the run (a virtual disk, the
//! host's other load, frequency) falls on both sides alike. The result is the median of the
//! rounds' ratios, reported with the lowest and highest: the noise, next to the effect.

use serde::Serialize;

/// The median of some rounds' values, with their range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub low: f64,
    pub high: f64,
}

impl Spread {
    /// `None` for no values (NaNs sort last and are kept: a NaN ratio is a bug to be seen).
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Spread {
            median: median(&v)?,
            low: *v.first()?,
            high: *v.last()?,
        })
    }
}

/// The median of sorted `v` (the mean of the middle two for an even count); `None` if empty.
pub fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// Whether round `round` (from 0) runs the reference before the side measured against it.
pub const fn reference_first(round: u32) -> bool {
    round.is_multiple_of(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spread_is_the_median_and_the_extremes_in_any_order() {
        let s = Spread::of(&[1.2, 0.8, 1.0]).unwrap();
        assert_eq!((s.median, s.low, s.high), (1.0, 0.8, 1.2));
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.median, s.low, s.high), (2.5, 1.0, 4.0));
        assert_eq!(Spread::of(&[]), None);
        assert!(reference_first(0) && !reference_first(1) && reference_first(2));
    }
}
