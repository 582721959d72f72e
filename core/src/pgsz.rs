//! MR page-size selection: the rule of the kernel's `ib_umem_find_best_pgsz`.
//!
//! An MR's translation table maps its IOVA range with ONE page size. A page size works when,
//! for every range, the IOVA and the DMA address agree in all bits below it, and every range
//! boundary other than the very start and end falls on a page boundary. The kernel accumulates
//! the differing bits into a mask and takes the largest supported size below its lowest set bit,
//! capped so that no page is larger than the span needs.

use serde::Serialize;

use crate::addr::AddrList;

/// 4 KiB … 1 GiB, every power of two: what a ConnectX-class NIC advertises for MRs.
pub const MLX5_PGSZ_BITMAP: u64 = {
    let mut bits = 0u64;
    let mut shift = 12;
    while shift <= 30 {
        bits |= 1 << shift;
        shift += 1;
    }
    bits
};

/// The chosen page size and the translation entries it costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PageSize {
    pub size: u64,
    /// Entries in the translation table: pages of `size` covering `[iova, iova + length)`.
    pub entries: u64,
}

/// Best page size for `list` mapped at `iova`, from the sizes in `supported` (bit `n` = 2^n).
/// `None` when no supported size works (the kernel returns 0).
pub fn best_page_size(list: &AddrList, iova: u64, supported: u64) -> Option<PageSize> {
    best_page_size_of(
        list.ranges().iter().map(|r| (r.addr, r.len)),
        iova,
        supported,
    )
}

/// The same rule over any sequence of `(dma address, length)` segments (a DMA-mapped scatterlist
/// goes through here too).
pub fn best_page_size_of(
    segments: impl IntoIterator<Item = (u64, u64)>,
    iova: u64,
    supported: u64,
) -> Option<PageSize> {
    // One pass: OR commutes, so the cap (which needs the total length) is added at the end, and
    // "every boundary but the last" is applied when the next segment shows up.
    let mut mask = 0u64;
    let mut va = iova;
    let mut length = 0u64;
    let mut pending_boundary = None;
    for (addr, len) in segments {
        if let Some(b) = pending_boundary.take() {
            mask |= b;
        }
        mask |= addr ^ va;
        va = va.wrapping_add(len);
        length = length.checked_add(len)?;
        pending_boundary = Some(va);
    }
    if length == 0 || supported == 0 {
        return None;
    }
    let last_va = iova.checked_add(length - 1)?;
    // Sizes whose bit lies above the highest bit that changes across the span are larger than
    // needed: they cap the choice.
    mask |= supported & !low_mask(bits_per(last_va ^ iova));
    let mut allowed = supported;
    if mask != 0 {
        let tz = mask.trailing_zeros();
        allowed &= if tz >= 63 {
            u64::MAX
        } else {
            (1u64 << (tz + 1)) - 1
        };
    }
    if allowed == 0 {
        return None;
    }
    let size = 1u64 << (63 - allowed.leading_zeros());
    Some(PageSize {
        size,
        entries: num_blocks(iova, length, size),
    })
}

/// Pages of `size` needed to cover `[iova, iova + length)` (`ib_umem_num_dma_blocks`).
pub fn num_blocks(iova: u64, length: u64, size: u64) -> u64 {
    let first = iova / size;
    let last = (iova as u128 + length as u128).div_ceil(size as u128) as u64;
    last - first
}

/// Number of bits needed to represent `x` (0 for 0).
fn bits_per(x: u64) -> u32 {
    64 - x.leading_zeros()
}

/// Bits `0..n` set.
fn low_mask(n: u32) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::addr::{AddrSpace, DmaRange};
    use crate::hints::Hints;
    use proptest::prelude::*;

    fn list(r: &[(u64, u64)]) -> AddrList {
        AddrList::new(
            AddrSpace::CpuPhys,
            Hints::HOST_MEMORY,
            4096,
            r.iter()
                .map(|&(a, l)| DmaRange::new(a, l))
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn contiguous_aligned_bar_takes_the_largest_page() {
        let l = list(&[(1 << 40, 1 << 30)]);
        assert_eq!(
            best_page_size(&l, 0, MLX5_PGSZ_BITMAP),
            Some(PageSize {
                size: 1 << 30,
                entries: 1
            })
        );
        let l = list(&[(1 << 40, 64 << 30)]);
        assert_eq!(
            best_page_size(&l, 0, MLX5_PGSZ_BITMAP),
            Some(PageSize {
                size: 1 << 30,
                entries: 64
            })
        );
    }

    #[test]
    fn small_span_is_capped() {
        // 8 KiB at a 1 GiB-aligned address must not use a 1 GiB page.
        let l = list(&[(1 << 30, 8192)]);
        assert_eq!(best_page_size(&l, 0, MLX5_PGSZ_BITMAP).unwrap().size, 8192);
    }

    #[test]
    fn fragmented_pages_need_4k() {
        let l = list(&[(0x10000, 0x1000), (0x3000, 0x1000)]);
        assert_eq!(
            best_page_size(&l, 0, MLX5_PGSZ_BITMAP),
            Some(PageSize {
                size: 4096,
                entries: 2
            })
        );
        assert_eq!(best_page_size(&l, 0, 1 << 21), None);
    }

    /// Independent oracle: try every supported size; the valid ones are those where each range's
    /// start agrees with its IOVA below the size, and each inner boundary is aligned.
    fn brute(segs: &[(u64, u64)], iova: u64, supported: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for shift in 0..63 {
            let p = 1u64 << shift;
            if supported & p == 0 {
                continue;
            }
            let mut va = iova;
            let mut ok = true;
            for (i, &(a, l)) in segs.iter().enumerate() {
                if a % p != va % p {
                    ok = false;
                }
                va += l;
                if i + 1 != segs.len() && !va.is_multiple_of(p) {
                    ok = false;
                }
            }
            if ok {
                let total: u64 = segs.iter().map(|s| s.1).sum();
                out.push((p, num_blocks(iova, total, p)));
            }
        }
        out
    }

    proptest! {
        #[test]
        fn matches_brute_force(
            raw in proptest::collection::vec((0u64..1 << 12, 1u64..1 << 10), 1..6),
            iova_pages in 0u64..1 << 10,
            supported in any::<u32>(),
        ) {
            // Build non-overlapping segments in 4 KiB units.
            let mut addr_base = 0u64;
            let segs: Vec<(u64, u64)> = raw.iter().map(|&(gap, len)| {
                addr_base += gap * 4096;
                let s = (addr_base, len * 4096);
                addr_base += len * 4096;
                s
            }).collect();
            let iova = iova_pages * 4096;
            let supported = (supported as u64) << 12;
            let valid = brute(&segs, iova, supported);
            match best_page_size_of(segs.iter().copied(), iova, supported) {
                None => prop_assert!(valid.is_empty(), "none chosen but {:?} valid", valid),
                Some(p) => {
                    prop_assert!(valid.iter().any(|v| v.0 == p.size), "{:?} not valid: {:?}", p, valid);
                    let min = valid.iter().map(|v| v.1).min().unwrap();
                    prop_assert_eq!(p.entries, min, "{:?} not minimal among {:?}", p, valid);
                }
            }
        }
    }
}
