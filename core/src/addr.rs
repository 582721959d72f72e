//! Address lists: the replacement for scatterlists keyed to `struct page`.
//!
//! An [`AddrList`] is an immutable, validated list of [`DmaRange`]s in one [`AddrSpace`], with the
//! [`Hints`] that say how to access them. The order of the ranges is the order of the bytes: the
//! range at index `i` holds the buffer bytes that follow those of range `i - 1`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::hints::Hints;

/// One contiguous range: the kernel's `struct phys_vec { paddr, len }`, 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(C)]
pub struct DmaRange {
    pub addr: u64,
    pub len: u64,
}

impl DmaRange {
    pub const fn new(addr: u64, len: u64) -> DmaRange {
        DmaRange { addr, len }
    }

    /// One past the last byte, or `None` when `addr + len` overflows.
    pub const fn end(&self) -> Option<u64> {
        self.addr.checked_add(self.len)
    }
}

impl fmt::Display for DmaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, +{:#x})", self.addr, self.len)
    }
}

/// Identity of a kernel dma-buf: the device and inode of its file, stable across dup'd fds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DmaBufId {
    pub dev: u64,
    pub ino: u64,
}

/// What the numbers in a list mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "space")]
pub enum AddrSpace {
    /// CPU physical addresses (`THRU_HOST_BRIDGE` P2P programs these, or an IOVA for them).
    CpuPhys,
    /// PCI bus addresses below `root` (a root port / host bridge index): bus = phys − bus_offset.
    PciBus { root: u32, bus_offset: u64 },
    /// I/O virtual addresses in one IOMMU domain.
    Iova { domain: u32 },
    /// This process's virtual addresses (`ibv_reg_mr`, io_uring fixed buffers, `cuMemHostRegister`).
    ProcessVa,
    /// Offsets into a kernel dma-buf, resolved by the kernel importer.
    DmaBuf { id: DmaBufId },
    /// A device's own virtual addresses (GPU VA).
    DeviceVa { device: u32 },
}

/// The kind of an [`AddrSpace`], without its parameters: what importers name in an `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpaceKind {
    CpuPhys,
    PciBus,
    Iova,
    ProcessVa,
    DmaBuf,
    DeviceVa,
}

impl AddrSpace {
    pub const fn kind(&self) -> SpaceKind {
        match self {
            AddrSpace::CpuPhys => SpaceKind::CpuPhys,
            AddrSpace::PciBus { .. } => SpaceKind::PciBus,
            AddrSpace::Iova { .. } => SpaceKind::Iova,
            AddrSpace::ProcessVa => SpaceKind::ProcessVa,
            AddrSpace::DmaBuf { .. } => SpaceKind::DmaBuf,
            AddrSpace::DeviceVa { .. } => SpaceKind::DeviceVa,
        }
    }
}

impl fmt::Display for SpaceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SpaceKind::CpuPhys => "cpu-phys",
            SpaceKind::PciBus => "pci-bus",
            SpaceKind::Iova => "iova",
            SpaceKind::ProcessVa => "process-va",
            SpaceKind::DmaBuf => "dma-buf",
            SpaceKind::DeviceVa => "device-va",
        })
    }
}

impl fmt::Display for AddrSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddrSpace::PciBus { root, bus_offset } => {
                write!(f, "pci-bus(root {root}, offset {bus_offset:#x})")
            }
            AddrSpace::Iova { domain } => write!(f, "iova(domain {domain})"),
            AddrSpace::DmaBuf { id } => write!(f, "dma-buf(dev {}, ino {})", id.dev, id.ino),
            AddrSpace::DeviceVa { device } => write!(f, "device-va(device {device})"),
            other => write!(f, "{}", other.kind()),
        }
    }
}

/// Why a list of ranges is not a valid [`AddrList`]. Every variant names the offending range(s).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrListError {
    #[error("address list is empty: at least one range is required")]
    Empty,
    #[error("granule {granule:#x} is not a power of two")]
    BadGranule { granule: u64 },
    #[error("range {index} {range} has zero length")]
    ZeroLength { index: usize, range: DmaRange },
    #[error("range {index} {range}: addr + len overflows u64")]
    Overflow { index: usize, range: DmaRange },
    #[error("range {index} {range}: {field} {value:#x} is not aligned to the granule {granule:#x}")]
    Misaligned {
        index: usize,
        range: DmaRange,
        field: &'static str,
        value: u64,
        granule: u64,
    },
    #[error("range {first} {first_range} overlaps range {second} {second_range}")]
    Overlap {
        first: usize,
        first_range: DmaRange,
        second: usize,
        second_range: DmaRange,
    },
    #[error("total length of the list overflows u64 at range {index} {range}")]
    TotalOverflow { index: usize, range: DmaRange },
    #[error("range {index} {range}: translating by -{offset:#x} underflows")]
    Underflow {
        index: usize,
        range: DmaRange,
        offset: u64,
    },
    #[error("translation offset {offset:#x} is not aligned to the granule {granule:#x}")]
    MisalignedOffset { offset: u64, granule: u64 },
    #[error("slice [{offset:#x}, +{len:#x}) is outside the list's {total:#x} bytes or empty")]
    SliceOutOfBounds { offset: u64, len: u64, total: u64 },
}

/// A validated, immutable list of DMA ranges in one address space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "AddrListRepr", into = "AddrListRepr")]
pub struct AddrList {
    space: AddrSpace,
    hints: Hints,
    granule: u64,
    total: u64,
    ranges: Box<[DmaRange]>,
}

#[derive(Serialize, Deserialize)]
struct AddrListRepr {
    space: AddrSpace,
    hints: Hints,
    granule: u64,
    ranges: Vec<DmaRange>,
}

impl TryFrom<AddrListRepr> for AddrList {
    type Error = AddrListError;
    fn try_from(r: AddrListRepr) -> Result<Self, Self::Error> {
        AddrList::new(r.space, r.hints, r.granule, r.ranges)
    }
}

impl From<AddrList> for AddrListRepr {
    fn from(l: AddrList) -> Self {
        AddrListRepr {
            space: l.space,
            hints: l.hints,
            granule: l.granule,
            ranges: l.ranges.into_vec(),
        }
    }
}

impl AddrList {
    /// Validate `ranges` and build the list. `granule` (a power of two; 1 for byte granular) is
    /// the alignment every range start and length must have.
    pub fn new(
        space: AddrSpace,
        hints: Hints,
        granule: u64,
        ranges: impl Into<Vec<DmaRange>>,
    ) -> Result<AddrList, AddrListError> {
        let ranges: Vec<DmaRange> = ranges.into();
        let total = validate(granule, &ranges)?;
        Ok(AddrList {
            space,
            hints,
            granule,
            total,
            ranges: ranges.into_boxed_slice(),
        })
    }

    /// The list for an array of page frames (pinned memory: the pages of a buffer in order),
    /// merging physically contiguous frames. Pages are aligned by construction; a frame that
    /// appears twice is an overlap, found with one bit per frame of the array's span.
    pub fn from_pfns(
        space: AddrSpace,
        hints: Hints,
        page_shift: u32,
        pfns: &[u64],
    ) -> Result<AddrList, AddrListError> {
        let page = 1u64
            .checked_shl(page_shift)
            .filter(|_| page_shift < 64)
            .unwrap_or(0);
        if pfns.is_empty() {
            return Err(AddrListError::Empty);
        }
        // One pass for both bounds, in chunks the compiler can vectorise.
        let (lo, hi) = pfns.chunks(8).fold((u64::MAX, 0u64), |(lo, hi), c| {
            let (mut l, mut h) = (lo, hi);
            for &p in c {
                l = l.min(p);
                h = h.max(p);
            }
            (l, h)
        });
        if page == 0 || hi > (u64::MAX >> page_shift) - 1 {
            // Frames whose addresses overflow: let full validation name the first one.
            let ranges: Vec<DmaRange> = pfns
                .iter()
                .map(|&p| DmaRange::new(p.wrapping_shl(page_shift), page))
                .collect();
            return AddrList::new(space, hints, page.max(1), ranges);
        }
        // Dense frames (scattered 4 KiB pages): look for duplicates with one bit per frame in the
        // same pass that merges. Sparse frames (huge pages spread over RAM): merge only, then
        // validate the few ranges that result instead of a bitmap of the whole span.
        let span = hi - lo + 1;
        let dense = span <= (pfns.len() as u64).saturating_mul(8);
        let mut seen = if dense {
            vec![0u64; usize::try_from(span.div_ceil(64)).unwrap_or(usize::MAX)]
        } else {
            Vec::new()
        };
        let mut dup = 0u64;
        let mut ranges: Vec<DmaRange> = Vec::with_capacity(if dense { pfns.len() } else { 0 });
        for &pfn in pfns {
            if dense {
                let bit = pfn - lo;
                let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
                dup |= seen[w] & m;
                seen[w] |= m;
            }
            let addr = pfn << page_shift;
            match ranges.last_mut() {
                Some(r) if r.addr + r.len == addr => r.len += page,
                _ => ranges.push(DmaRange::new(addr, page)),
            }
        }
        if !dense || dup != 0 {
            // Full validation: the sparse case's overlap check, or naming the duplicate.
            return AddrList::new(space, hints, page, ranges);
        }
        let total = pfns.len() as u64 * page;
        Ok(AddrList {
            space,
            hints,
            granule: page,
            total,
            ranges: ranges.into_boxed_slice(),
        })
    }

    /// A list of one range.
    pub fn single(
        space: AddrSpace,
        hints: Hints,
        granule: u64,
        range: DmaRange,
    ) -> Result<AddrList, AddrListError> {
        AddrList::new(space, hints, granule, vec![range])
    }

    pub fn space(&self) -> AddrSpace {
        self.space
    }

    pub fn hints(&self) -> Hints {
        self.hints
    }

    pub fn granule(&self) -> u64 {
        self.granule
    }

    pub fn ranges(&self) -> &[DmaRange] {
        &self.ranges
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Always false: construction rejects empty lists.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Bytes covered by all ranges.
    pub fn total_len(&self) -> u64 {
        self.total
    }

    /// Bytes of metadata this list holds: the header plus 16 bytes a range.
    pub fn metadata_bytes(&self) -> u64 {
        (std::mem::size_of::<AddrList>() + std::mem::size_of_val(&*self.ranges)) as u64
    }

    /// The same list with other hints (an exporter specialising an offer per importer).
    pub fn with_hints(&self, hints: Hints) -> AddrList {
        AddrList {
            hints,
            ..self.clone()
        }
    }

    /// The same ranges shifted down by `offset` into another address space (bus = phys − offset),
    /// in place. A constant shift keeps order and disjointness, so only underflow and alignment
    /// are checked.
    pub fn translate(mut self, space: AddrSpace, offset: u64) -> Result<AddrList, AddrListError> {
        if offset & (self.granule - 1) != 0 {
            return Err(AddrListError::MisalignedOffset {
                offset,
                granule: self.granule,
            });
        }
        if let Some((index, r)) = self
            .ranges
            .iter()
            .enumerate()
            .find(|(_, r)| r.addr < offset)
        {
            return Err(AddrListError::Underflow {
                index,
                range: *r,
                offset,
            });
        }
        if offset != 0 {
            for r in self.ranges.iter_mut() {
                r.addr -= offset;
            }
        }
        self.space = space;
        Ok(self)
    }

    /// The pieces of the list that hold buffer bytes `[offset, offset + len)`, in order.
    /// Walks the ranges from the start: importers that look up often build their own table.
    pub fn slice(&self, offset: u64, len: u64) -> Result<Vec<DmaRange>, AddrListError> {
        let oob = AddrListError::SliceOutOfBounds {
            offset,
            len,
            total: self.total,
        };
        let end = offset.checked_add(len).ok_or(oob.clone())?;
        if len == 0 || end > self.total {
            return Err(oob);
        }
        let mut out = Vec::new();
        let mut pos = 0u64;
        for r in self.ranges.iter() {
            let (r_start, r_end) = (pos, pos + r.len);
            pos = r_end;
            if r_end <= offset {
                continue;
            }
            if r_start >= end {
                break;
            }
            let from = offset.max(r_start);
            let to = end.min(r_end);
            out.push(DmaRange::new(r.addr + (from - r_start), to - from));
        }
        Ok(out)
    }
}

/// Check every invariant; returns the total length.
///
/// The hot loop only accumulates flags (no early exits, so it pipelines); when one is raised a
/// second, slow pass finds the first offending range for the error.
fn validate(granule: u64, ranges: &[DmaRange]) -> Result<u64, AddrListError> {
    if granule == 0 || !granule.is_power_of_two() {
        return Err(AddrListError::BadGranule { granule });
    }
    if ranges.is_empty() {
        return Err(AddrListError::Empty);
    }
    let mask = granule - 1;
    let (mut total, mut bad, mut descending) = (0u64, false, false);
    let (mut prev_end, mut lo, mut hi, mut bits) = (0u64, u64::MAX, 0u64, 0u64);
    for r in ranges {
        let (end, overflow) = r.addr.overflowing_add(r.len);
        let (sum, total_overflow) = total.overflowing_add(r.len);
        total = sum;
        bad |= overflow | total_overflow | (r.len == 0);
        bits |= r.addr | r.len;
        descending |= r.addr < prev_end;
        prev_end = end;
        lo = lo.min(r.addr);
        hi = hi.max(end);
    }
    if bad || bits & mask != 0 {
        return Err(first_invalid(granule, ranges));
    }
    if descending {
        // The coarsest unit every range is aligned to; if the span in such units is small
        // (scattered pages of one machine's RAM), a bitmap finds overlaps in linear time.
        let unit_shift = bits.trailing_zeros();
        let span_units = (hi - lo) >> unit_shift;
        let budget = (ranges.len() as u64)
            .saturating_mul(64)
            .saturating_add(1 << 20);
        if span_units <= budget {
            check_overlap_bitmap(ranges, lo, unit_shift, span_units)?;
        } else {
            check_overlap_unordered(ranges)?;
        }
    }
    Ok(total)
}

/// The slow path of [`validate`]: the first range that breaks a per-range invariant.
fn first_invalid(granule: u64, ranges: &[DmaRange]) -> AddrListError {
    let mask = granule - 1;
    let mut total = 0u64;
    for (index, r) in ranges.iter().enumerate() {
        let range = *r;
        if r.len == 0 {
            return AddrListError::ZeroLength { index, range };
        }
        if r.end().is_none() {
            return AddrListError::Overflow { index, range };
        }
        if r.addr & mask != 0 {
            return misaligned(index, range, "addr", r.addr, granule);
        }
        if r.len & mask != 0 {
            return misaligned(index, range, "len", r.len, granule);
        }
        match total.checked_add(r.len) {
            Some(t) => total = t,
            None => return AddrListError::TotalOverflow { index, range },
        }
    }
    // Unreachable: `validate` calls this only when one of the checks above fails somewhere.
    AddrListError::Empty
}

/// Overlap check with one bit per `1 << shift` bytes of `[lo, lo + span << shift)`.
fn check_overlap_bitmap(
    ranges: &[DmaRange],
    lo: u64,
    shift: u32,
    span: u64,
) -> Result<(), AddrListError> {
    let words = usize::try_from(span.div_ceil(64)).unwrap_or(usize::MAX);
    let mut map = vec![0u64; words];
    let mut collided = 0u64;
    for r in ranges {
        let s = (r.addr - lo) >> shift;
        let e = s + (r.len >> shift);
        let (sw, ew) = ((s / 64) as usize, ((e - 1) / 64) as usize);
        if sw == ew {
            // The common case (a page, or a few): one word, no branch on the result.
            let m = (u64::MAX << (s % 64)) & (u64::MAX >> (63 - (e - 1) % 64));
            collided |= map[sw] & m;
            map[sw] |= m;
        } else if !test_and_set(&mut map, s, e) {
            collided = 1;
        }
    }
    if collided == 0 {
        return Ok(());
    }
    // Error path: sort to name the first pair that overlaps.
    check_overlap_unordered(ranges)
}

/// Set bits `[s, e)`; false (and nothing guaranteed about the map) if any was already set.
fn test_and_set(map: &mut [u64], s: u64, e: u64) -> bool {
    let (sw, ew) = ((s / 64) as usize, ((e - 1) / 64) as usize);
    let head = u64::MAX << (s % 64);
    let tail = u64::MAX >> (63 - (e - 1) % 64);
    if sw == ew {
        let m = head & tail;
        let old = map[sw];
        map[sw] = old | m;
        return old & m == 0;
    }
    let mut clean = map[sw] & head == 0 && map[ew] & tail == 0;
    map[sw] |= head;
    map[ew] |= tail;
    for w in &mut map[sw + 1..ew] {
        clean &= *w == 0;
        *w = u64::MAX;
    }
    clean
}

fn misaligned(
    index: usize,
    range: DmaRange,
    field: &'static str,
    value: u64,
    granule: u64,
) -> AddrListError {
    AddrListError::Misaligned {
        index,
        range,
        field,
        value,
        granule,
    }
}

fn check_overlap_unordered(ranges: &[DmaRange]) -> Result<(), AddrListError> {
    let mut order: Vec<(u64, u32)> = Vec::with_capacity(ranges.len());
    let mut idx = 0u32;
    for r in ranges {
        order.push((r.addr, idx));
        idx = idx.wrapping_add(1);
    }
    // More than u32::MAX ranges cannot be indexed this way; fall back to the slow, exact path.
    if ranges.len() > u32::MAX as usize {
        let mut order: Vec<(u64, usize)> = ranges
            .iter()
            .enumerate()
            .map(|(i, r)| (r.addr, i))
            .collect();
        order.sort_unstable();
        return scan_sorted(ranges, order.into_iter());
    }
    order.sort_unstable();
    scan_sorted(ranges, order.into_iter().map(|(a, i)| (a, i as usize)))
}

fn scan_sorted(
    ranges: &[DmaRange],
    sorted: impl Iterator<Item = (u64, usize)>,
) -> Result<(), AddrListError> {
    let mut prev: Option<(usize, u64)> = None;
    for (_, i) in sorted {
        let r = ranges[i];
        if let Some((p, p_end)) = prev
            && r.addr < p_end
        {
            let (first, second) = if p < i { (p, i) } else { (i, p) };
            return Err(AddrListError::Overlap {
                first,
                first_range: ranges[first],
                second,
                second_range: ranges[second],
            });
        }
        // Validated above: no overflow.
        let end = r.addr + r.len;
        if prev.is_none_or(|(_, p_end)| end > p_end) {
            prev = Some((i, end));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn list(ranges: &[(u64, u64)]) -> Result<AddrList, AddrListError> {
        AddrList::new(
            AddrSpace::CpuPhys,
            Hints::HOST_MEMORY,
            4096,
            ranges
                .iter()
                .map(|&(a, l)| DmaRange::new(a, l))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn range_is_16_bytes() {
        assert_eq!(std::mem::size_of::<DmaRange>(), 16);
    }

    #[test]
    fn rejects_each_invariant_with_the_offending_range() {
        assert_eq!(list(&[]).unwrap_err(), AddrListError::Empty);
        let e = list(&[(0, 4096), (8192, 0)]).unwrap_err();
        assert!(
            e.to_string()
                .contains("range 1 [0x2000, +0x0) has zero length"),
            "{e}"
        );
        let e = list(&[(u64::MAX - 4095, 8192)]).unwrap_err();
        assert!(matches!(e, AddrListError::Overflow { index: 0, .. }), "{e}");
        let e = list(&[(0x1000, 0x1000), (0x2100, 0x1000)]).unwrap_err();
        assert!(e.to_string().contains("range 1"), "{e}");
        assert!(e.to_string().contains("addr 0x2100"), "{e}");
        let e = list(&[(0x1000, 0x1800)]).unwrap_err();
        assert!(e.to_string().contains("len 0x1800"), "{e}");
        let e = list(&[(0x10000, 0x2000), (0x0, 0x1000), (0x11000, 0x1000)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "range 0 [0x10000, +0x2000) overlaps range 2 [0x11000, +0x1000)"
        );
        let e = AddrList::new(AddrSpace::CpuPhys, Hints::HOST_MEMORY, 3, vec![]).unwrap_err();
        assert_eq!(e, AddrListError::BadGranule { granule: 3 });
    }

    #[test]
    fn from_pfns_coalesces_and_catches_duplicates() {
        let l = AddrList::from_pfns(AddrSpace::CpuPhys, Hints::HOST_MEMORY, 12, &[5, 6, 7, 2, 9])
            .unwrap();
        assert_eq!(
            l.ranges(),
            &[
                DmaRange::new(0x5000, 0x3000),
                DmaRange::new(0x2000, 0x1000),
                DmaRange::new(0x9000, 0x1000)
            ]
        );
        assert_eq!(l.total_len(), 5 * 4096);
        let e = AddrList::from_pfns(AddrSpace::CpuPhys, Hints::HOST_MEMORY, 12, &[5, 6, 2, 6])
            .unwrap_err();
        assert!(matches!(e, AddrListError::Overlap { .. }), "{e}");
        assert_eq!(
            AddrList::from_pfns(AddrSpace::CpuPhys, Hints::HOST_MEMORY, 12, &[]).unwrap_err(),
            AddrListError::Empty
        );
        // Frames spread too far for the bitmap still validate, through the general path.
        let far =
            AddrList::from_pfns(AddrSpace::CpuPhys, Hints::HOST_MEMORY, 12, &[1, 1 << 40]).unwrap();
        assert_eq!(far.len(), 2);
        assert!(
            AddrList::from_pfns(AddrSpace::CpuPhys, Hints::HOST_MEMORY, 12, &[u64::MAX]).is_err()
        );
    }

    #[test]
    fn translate_checks_underflow_and_alignment() {
        let l = list(&[(0x10000, 0x2000), (0x4000, 0x1000)]).unwrap();
        let t = l
            .clone()
            .translate(
                AddrSpace::PciBus {
                    root: 0,
                    bus_offset: 0x4000,
                },
                0x4000,
            )
            .unwrap();
        assert_eq!(t.ranges()[1], DmaRange::new(0, 0x1000));
        assert_eq!(t.total_len(), l.total_len());
        let e = l.clone().translate(AddrSpace::CpuPhys, 0x5000).unwrap_err();
        assert!(e.to_string().contains("range 1 [0x4000, +0x1000)"), "{e}");
        assert!(matches!(
            l.translate(AddrSpace::CpuPhys, 0x10),
            Err(AddrListError::MisalignedOffset { .. })
        ));
    }

    #[test]
    fn slice_walks_ranges() {
        let l = list(&[(0x10000, 0x2000), (0x0, 0x1000)]).unwrap();
        assert_eq!(l.total_len(), 0x3000);
        assert_eq!(
            l.slice(0x1800, 0x1000).unwrap(),
            vec![DmaRange::new(0x11800, 0x800), DmaRange::new(0x0, 0x800)]
        );
        assert!(l.slice(0x2000, 0x2000).is_err());
        assert!(l.slice(0, 0).is_err());
        assert!(l.slice(u64::MAX, 2).is_err());
    }

    #[test]
    fn serde_round_trip_revalidates() {
        let l = list(&[(0x10000, 0x2000), (0x0, 0x1000)]).unwrap();
        let json = serde_json::to_string(&l).unwrap();
        let back: AddrList = serde_json::from_str(&json).unwrap();
        assert_eq!(back, l);
        let bad = json.replace("\"len\":8192", "\"len\":0");
        let err = serde_json::from_str::<AddrList>(&bad).unwrap_err();
        assert!(err.to_string().contains("zero length"), "{err}");
    }

    /// Independent oracle: every pair checked.
    fn overlaps_brute(r: &[(u64, u64)]) -> bool {
        for i in 0..r.len() {
            for j in i + 1..r.len() {
                let (a, al) = r[i];
                let (b, bl) = r[j];
                if a < b + bl && b < a + al {
                    return true;
                }
            }
        }
        false
    }

    proptest! {
        #[test]
        fn validation_matches_oracle(raw in proptest::collection::vec((0u64..64, 0u64..6), 0..12)) {
            let ranges: Vec<(u64, u64)> = raw.iter().map(|&(a, l)| (a * 4096, l * 4096)).collect();
            let res = list(&ranges);
            let expect_ok = !ranges.is_empty()
                && ranges.iter().all(|&(_, l)| l > 0)
                && !overlaps_brute(&ranges);
            prop_assert_eq!(res.is_ok(), expect_ok, "{:?} -> {:?}", ranges, res);
            if let Ok(l) = res {
                prop_assert_eq!(l.total_len(), ranges.iter().map(|r| r.1).sum::<u64>());
                prop_assert_eq!(l.metadata_bytes() as usize,
                    std::mem::size_of::<AddrList>() + 16 * ranges.len());
            }
        }

        /// `from_pfns` (dense bitmap and sparse paths) accepts exactly what per-page validation
        /// accepts, and covers the same bytes.
        #[test]
        fn from_pfns_matches_per_page_validation(raw in proptest::collection::vec(0u64..40, 1..40), spread in 1u64..2000) {
            let pfns: Vec<u64> = raw.iter().map(|p| p * spread).collect();
            let pages: Vec<(u64, u64)> = pfns.iter().map(|p| (p << 12, 4096)).collect();
            let fast = AddrList::from_pfns(AddrSpace::CpuPhys, Hints::HOST_MEMORY, 12, &pfns);
            let full = list(&pages);
            prop_assert_eq!(fast.is_ok(), full.is_ok(), "{:?}: {:?} vs {:?}", pfns, fast, full);
            if let (Ok(f), Ok(_)) = (fast, full) {
                prop_assert_eq!(f.total_len(), 4096 * pfns.len() as u64);
                let mut bytes: Vec<u64> = f.ranges().iter().flat_map(|r| (r.addr..r.addr + r.len).step_by(4096)).collect();
                bytes.dedup();
                prop_assert_eq!(bytes, pages.iter().map(|p| p.0).collect::<Vec<_>>());
            }
        }

        /// Ranges spread over a huge span take the sorting path instead of the bitmap.
        #[test]
        fn sparse_validation_matches_oracle(raw in proptest::collection::vec((0u64..64, 1u64..6, any::<bool>()), 1..12)) {
            let ranges: Vec<(u64, u64)> = raw.iter()
                .map(|&(a, l, far)| (a * 4096 + if far { 1 << 50 } else { 0 }, l * 4096))
                .collect();
            let res = list(&ranges);
            prop_assert_eq!(res.is_ok(), !overlaps_brute(&ranges), "{:?} -> {:?}", ranges, res);
            if let Err(AddrListError::Overlap { first, second, .. }) = res {
                let (a, b) = (ranges[first], ranges[second]);
                prop_assert!(first < second && a.0 < b.0 + b.1 && b.0 < a.0 + a.1);
            }
        }

        #[test]
        fn slices_cover_exactly(lens in proptest::collection::vec(1u64..5, 1..8), off in 0u64..40, len in 1u64..40) {
            let mut addr = 1u64 << 20;
            let ranges: Vec<(u64, u64)> = lens.iter().rev().map(|&l| {
                addr += 0x10_0000; (addr, l * 4096)
            }).collect();
            let l = list(&ranges).unwrap();
            let (off, len) = (off * 1024, len * 1024);
            match l.slice(off, len) {
                Ok(pieces) => prop_assert_eq!(pieces.iter().map(|p| p.len).sum::<u64>(), len),
                Err(_) => prop_assert!(off + len > l.total_len()),
            }
        }
    }
}
