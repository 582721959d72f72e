//! The scatterlist model: what the kernel builds today, for comparison and for legacy importers.
//!
//! - [`PageMap`]: one 64-byte `struct page`-like descriptor per 4 KiB page. Host memory has one
//!   anyway (not counted against the scatterlist); a BAR needs a ZONE_DEVICE page map before it
//!   can appear in a scatterlist at all (counted: 1.56 % of the BAR).
//! - [`SgTable`]: 32-byte entries allocated in chained 4 KiB chunks (127 usable entries and one
//!   chain link per full chunk), each entry capped at `UINT_MAX` bytes.
//! - Construction from a page array walks every page and coalesces physically contiguous ones up
//!   to `max_segment` (`sg_alloc_table_from_pages_segment`); [`SgTable::dma_map`] fills the DMA
//!   side, merging segments under an IOMMU; [`SgTable::from_addr_list`] is the kernel's
//!   `dma_buf_phys_vec_to_sgt`.

use serde::Serialize;

use crate::addr::AddrList;

pub const PAGE_SIZE: u64 = 4096;
pub const PAGE_SHIFT: u32 = 12;
/// The per-entry cap: `length` and `dma_length` are `unsigned int`.
pub const UINT_MAX: u64 = u32::MAX as u64;
/// Entries in one 4 KiB chunk of scatterlist (the last slot of a full chunk is the chain link).
pub const SG_CHUNK_ENTRIES: usize = (PAGE_SIZE as usize) / std::mem::size_of::<SgEntry>();
/// `struct sg_table { sgl, nents, orig_nents }`.
pub const SG_TABLE_HEADER: u64 = 16;

/// The model of `struct page`: 64 bytes, as on x86-64.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
pub struct PageDesc {
    pub flags: u64,
    /// ZONE_DEVICE pages point at their `dev_pagemap` (here: the owning map's id).
    pub pgmap: u64,
    pub refcount: u32,
    pub mapcount: u32,
    _rest: [u64; 5],
}

/// A page map: `struct page` for every page frame in `[base_pfn, base_pfn + len)`.
#[derive(Debug)]
pub struct PageMap {
    base_pfn: u64,
    pages: Vec<PageDesc>,
    /// Whether this map exists only for the scatterlist path (ZONE_DEVICE for a BAR).
    device: bool,
}

/// Page-map flag: the page belongs to a P2P (ZONE_DEVICE) provider.
pub const PG_P2PDMA: u64 = 1 << 0;

impl PageMap {
    /// The ZONE_DEVICE page map the kernel creates (`devm_memremap_pages`) for a BAR at `phys`.
    pub fn zone_device(phys: u64, len: u64, pgmap_id: u64) -> PageMap {
        let n = (len / PAGE_SIZE) as usize;
        let mut pages = Vec::with_capacity(n);
        pages.resize(
            n,
            PageDesc {
                flags: PG_P2PDMA,
                pgmap: pgmap_id,
                refcount: 1,
                ..PageDesc::default()
            },
        );
        PageMap {
            base_pfn: phys >> PAGE_SHIFT,
            pages,
            device: true,
        }
    }

    /// The memory map of system RAM at `phys` (exists anyway; not counted as metadata).
    pub fn system(phys: u64, len: u64) -> PageMap {
        PageMap {
            base_pfn: phys >> PAGE_SHIFT,
            pages: vec![PageDesc::default(); (len / PAGE_SIZE) as usize],
            device: false,
        }
    }

    pub fn pfns(&self) -> std::ops::Range<u64> {
        self.base_pfn..self.base_pfn + self.pages.len() as u64
    }

    pub fn page(&self, pfn: u64) -> Option<&PageDesc> {
        let i = usize::try_from(pfn.checked_sub(self.base_pfn)?).ok()?;
        self.pages.get(i)
    }

    /// Bytes this map costs the scatterlist path: all of it for ZONE_DEVICE, nothing for RAM.
    pub fn metadata_bytes(&self) -> u64 {
        if self.device {
            (self.pages.len() * std::mem::size_of::<PageDesc>()) as u64
        } else {
            0
        }
    }
}

/// `struct scatterlist` on 64-bit: 32 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct SgEntry {
    /// Page frame number of the first page (0 for address-only entries), low bits: chain/end.
    pub page_link: u64,
    pub offset: u32,
    pub length: u32,
    pub dma_address: u64,
    pub dma_length: u32,
    pub flags: u32,
}

const SG_CHAIN: u64 = 0x1;
const SG_END: u64 = 0x2;

/// How the DMA side is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DmaMapper {
    /// No IOMMU (or passthrough): the DMA address is the physical address minus `bus_offset`.
    Direct { bus_offset: u64 },
    /// An IOMMU: the whole list is mapped contiguously at `iova_base`, and adjacent entries merge
    /// into one DMA segment while it stays within `max_segment` and joins fall on page boundaries.
    Iommu { iova_base: u64, max_segment: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SgError {
    #[error("page array is empty")]
    NoPages,
    #[error("max_segment {0:#x} is smaller than one page")]
    BadMaxSegment(u64),
    #[error("offset {offset:#x} + length {length:#x} exceeds the pages' {bytes:#x} bytes")]
    BadSpan {
        offset: u64,
        length: u64,
        bytes: u64,
    },
}

/// Entries used in chunk `k` of `len` slots, of `total` slots in all: every chunk but the last
/// gives its final slot to the chain link.
fn chunk_used(k: usize, len: usize, total: usize) -> usize {
    if (k + 1) * SG_CHUNK_ENTRIES < total {
        len - 1
    } else {
        len
    }
}

/// A scatterlist table: CPU side (pages) and, after [`SgTable::dma_map`], the DMA side.
///
/// The chunks are laid out back to back in one allocation (chunk `k` is slots
/// `128k..128k+128`), so the benchmark measures the table's work rather than the user-space
/// allocator's policy; the bytes counted are exactly the kernel's chained chunks.
#[derive(Debug, Default)]
pub struct SgTable {
    slots: Vec<SgEntry>,
    nents: usize,
    dma_nents: usize,
}

impl SgTable {
    /// Room for `nents` entries in chained chunks, as `sg_alloc_table` lays them out: a full
    /// chunk holds 127 entries and a chain link; the last chunk holds exactly what is left.
    fn alloc(nents: usize) -> SgTable {
        let per = SG_CHUNK_ENTRIES - 1;
        let full = if nents > SG_CHUNK_ENTRIES {
            (nents - 2) / per
        } else {
            0
        };
        let total = full * SG_CHUNK_ENTRIES + (nents - full * per);
        let mut slots = vec![SgEntry::default(); total];
        for k in 0..full {
            slots[k * SG_CHUNK_ENTRIES + per].page_link = SG_CHAIN;
        }
        SgTable {
            slots,
            nents,
            dma_nents: 0,
        }
    }

    /// Entry slots in order (skipping chain links).
    fn entries_mut(&mut self) -> impl Iterator<Item = &mut SgEntry> {
        let total = self.slots.len();
        self.slots
            .chunks_mut(SG_CHUNK_ENTRIES)
            .enumerate()
            .flat_map(move |(k, c)| {
                let used = chunk_used(k, c.len(), total);
                c[..used].iter_mut()
            })
    }

    /// The entries, in order.
    pub fn entries(&self) -> impl Iterator<Item = &SgEntry> {
        let total = self.slots.len();
        self.slots
            .chunks(SG_CHUNK_ENTRIES)
            .enumerate()
            .flat_map(move |(k, c)| c[..chunk_used(k, c.len(), total)].iter())
    }

    /// Build from a page array (`struct page **` → pfns here), `offset` into the first page and
    /// `length` bytes, coalescing physically contiguous pages into entries of at most
    /// `max_segment` bytes (rounded down to pages, capped at `UINT_MAX`).
    pub fn from_pages(
        pfns: &[u64],
        offset: u64,
        length: u64,
        max_segment: u64,
    ) -> Result<SgTable, SgError> {
        if pfns.is_empty() {
            return Err(SgError::NoPages);
        }
        let max_seg = (max_segment.min(UINT_MAX)) & !(PAGE_SIZE - 1);
        if max_seg == 0 {
            return Err(SgError::BadMaxSegment(max_segment));
        }
        let bytes = pfns.len() as u64 * PAGE_SIZE;
        if offset >= PAGE_SIZE
            || offset.checked_add(length).is_none_or(|e| e > bytes)
            || length == 0
        {
            return Err(SgError::BadSpan {
                offset,
                length,
                bytes,
            });
        }
        let npages = (offset + length).div_ceil(PAGE_SIZE) as usize;
        let pfns = &pfns[..npages];
        // First pass: count chunks, as the kernel does before allocating.
        let max_pages = (max_seg / PAGE_SIZE) as usize;
        let mut nents = 0usize;
        let mut run = 0usize;
        for i in 0..npages {
            if i > 0 && run < max_pages && pfns[i] == pfns[i - 1] + 1 {
                run += 1;
            } else {
                nents += 1;
                run = 1;
            }
        }
        let mut table = SgTable::alloc(nents);
        // Second pass: fill.
        let mut slots = table.entries_mut();
        let mut i = 0usize;
        let mut left = length;
        let mut off = offset;
        while i < npages {
            let start = i;
            i += 1;
            while i < npages && i - start < max_pages && pfns[i] == pfns[i - 1] + 1 {
                i += 1;
            }
            let span = ((i - start) as u64 * PAGE_SIZE - off).min(left);
            if let Some(e) = slots.next() {
                e.page_link = pfns[start] << PAGE_SHIFT;
                e.offset = off as u32;
                e.length = span as u32;
            }
            left -= span;
            off = 0;
        }
        drop(slots);
        table.mark_end();
        Ok(table)
    }

    /// `dma_buf_phys_vec_to_sgt`: an address-only table for a legacy importer, one entry per
    /// range piece of at most `UINT_MAX` (page-rounded) bytes. No pages: DMA side only.
    pub fn from_addr_list(list: &AddrList) -> SgTable {
        let cap = UINT_MAX & !(PAGE_SIZE - 1);
        let nents: usize = list
            .ranges()
            .iter()
            .map(|r| r.len.div_ceil(cap) as usize)
            .sum();
        let mut table = SgTable::alloc(nents);
        let mut slots = table.entries_mut();
        for r in list.ranges() {
            let mut addr = r.addr;
            let mut left = r.len;
            while left > 0 {
                let n = left.min(cap);
                if let Some(e) = slots.next() {
                    e.dma_address = addr;
                    e.dma_length = n as u32;
                }
                addr += n;
                left -= n;
            }
        }
        drop(slots);
        table.dma_nents = nents;
        table.mark_end();
        table
    }

    fn mark_end(&mut self) {
        if let Some(last) = self.entries_mut().last() {
            last.page_link |= SG_END;
        }
    }

    /// Fill the DMA side (`dma_map_sgtable`). Returns the number of DMA segments.
    pub fn dma_map(&mut self, mapper: DmaMapper) -> usize {
        let mut out = 0usize;
        match mapper {
            DmaMapper::Direct { bus_offset } => {
                for e in self.entries_mut() {
                    let phys = (e.page_link & !(PAGE_SIZE - 1)) + e.offset as u64;
                    e.dma_address = phys.wrapping_sub(bus_offset);
                    e.dma_length = e.length;
                    out += 1;
                }
            }
            DmaMapper::Iommu {
                iova_base,
                max_segment,
            } => {
                let max_seg = max_segment.min(UINT_MAX);
                // Positions of the current DMA segment (chunk, slot) are tracked by value: write
                // merged segments to the front of the list, as iommu_dma_map_sg does.
                let mut segs: Vec<(u64, u64)> = Vec::new();
                let mut iova = iova_base;
                let mut prev_end_aligned = false;
                for e in self.entries() {
                    let start = iova + e.offset as u64;
                    let len = e.length as u64;
                    let joins = prev_end_aligned && e.offset == 0;
                    match segs.last_mut() {
                        Some(cur) if joins && cur.1 + len <= max_seg => cur.1 += len,
                        _ => segs.push((start, len)),
                    }
                    iova += (e.offset as u64 + len).next_multiple_of(PAGE_SIZE);
                    prev_end_aligned = (e.offset as u64 + len).is_multiple_of(PAGE_SIZE);
                }
                let mut it = segs.iter();
                for e in self.entries_mut() {
                    match it.next() {
                        Some(&(a, l)) => {
                            e.dma_address = a;
                            e.dma_length = l as u32;
                        }
                        None => {
                            e.dma_address = 0;
                            e.dma_length = 0;
                        }
                    }
                }
                out = segs.len();
            }
        }
        self.dma_nents = out;
        out
    }

    /// CPU-side entries.
    pub fn nents(&self) -> usize {
        self.nents
    }

    /// DMA segments after mapping.
    pub fn dma_nents(&self) -> usize {
        self.dma_nents
    }

    /// The DMA segments `(address, length)`.
    pub fn dma_segments(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.entries()
            .take(self.dma_nents)
            .map(|e| (e.dma_address, e.dma_length as u64))
    }

    /// Chunks of the kernel layout (each a separate allocation there, chained).
    pub fn chunks(&self) -> usize {
        self.slots.len().div_ceil(SG_CHUNK_ENTRIES)
    }

    /// Exact bytes held: the table header plus every chunk (entries and chain links).
    pub fn metadata_bytes(&self) -> u64 {
        SG_TABLE_HEADER + std::mem::size_of_val(&*self.slots) as u64
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::addr::{AddrSpace, DmaRange};
    use crate::hints::Hints;
    use proptest::prelude::*;

    #[test]
    fn sizes_match_the_kernel() {
        assert_eq!(std::mem::size_of::<SgEntry>(), 32);
        assert_eq!(std::mem::size_of::<PageDesc>(), 64);
        assert_eq!(SG_CHUNK_ENTRIES, 128);
    }

    #[test]
    fn contiguous_bar_is_one_entry_below_uint_max() {
        let map = PageMap::zone_device(1 << 40, 1 << 30, 7);
        let pfns: Vec<u64> = map.pfns().collect();
        let mut t = SgTable::from_pages(&pfns, 0, 1 << 30, u64::MAX).unwrap();
        assert_eq!(t.nents(), 1);
        assert_eq!(t.dma_map(DmaMapper::Direct { bus_offset: 0 }), 1);
        assert_eq!(t.dma_segments().next(), Some((1 << 40, 1 << 30)));
        assert_eq!(map.metadata_bytes(), (1 << 30) / 4096 * 64);
        assert_eq!(t.metadata_bytes(), 16 + 32);
    }

    #[test]
    fn uint_max_splits_big_ranges() {
        let l = AddrList::single(
            AddrSpace::CpuPhys,
            Hints::HOST_MEMORY,
            4096,
            DmaRange::new(0, 64 << 30),
        )
        .unwrap();
        let t = SgTable::from_addr_list(&l);
        let cap = UINT_MAX & !4095;
        assert_eq!(t.nents(), (64u64 << 30).div_ceil(cap) as usize);
        assert_eq!(t.dma_segments().map(|s| s.1).sum::<u64>(), 64 << 30);
        assert!(t.dma_segments().all(|s| s.1 <= UINT_MAX));
    }

    #[test]
    fn iommu_merges_fragmented_pages() {
        let pfns: Vec<u64> = (0..300).map(|i| i * 2 + 100).collect();
        let mut t = SgTable::from_pages(&pfns, 0, 300 * 4096, u64::MAX).unwrap();
        assert_eq!(t.nents(), 300);
        assert_eq!(t.chunks(), 3);
        assert_eq!(
            t.dma_map(DmaMapper::Iommu {
                iova_base: 1 << 32,
                max_segment: 65536
            }),
            300 * 4096 / 65536 + 1
        );
        assert_eq!(t.dma_segments().map(|s| s.1).sum::<u64>(), 300 * 4096);
        let mut d = SgTable::from_pages(&pfns, 0, 300 * 4096, u64::MAX).unwrap();
        assert_eq!(d.dma_map(DmaMapper::Direct { bus_offset: 0 }), 300);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert_eq!(
            SgTable::from_pages(&[], 0, 1, u64::MAX).unwrap_err(),
            SgError::NoPages
        );
        assert!(matches!(
            SgTable::from_pages(&[1], 0, 8192, u64::MAX),
            Err(SgError::BadSpan { .. })
        ));
        assert!(matches!(
            SgTable::from_pages(&[1], 0, 4096, 100),
            Err(SgError::BadMaxSegment(100))
        ));
    }

    /// Independent count: entries from runs, bytes from the chunk rule written differently.
    fn expected(pfns: &[u64], max_pages: usize) -> (usize, u64) {
        let mut runs = Vec::new();
        for (i, &p) in pfns.iter().enumerate() {
            match runs.last_mut() {
                Some((last, n)) if *last + 1 == p && *n < max_pages && i > 0 => {
                    *last = p;
                    *n += 1;
                }
                _ => runs.push((p, 1usize)),
            }
        }
        let nents = runs.len();
        // Full chunks of 128 slots carry 127 entries; the tail chunk is exactly what is left.
        let mut slots = 0usize;
        let mut left = nents;
        while left > 128 {
            slots += 128;
            left -= 127;
        }
        slots += left;
        (nents, 16 + 32 * slots as u64)
    }

    proptest! {
        #[test]
        fn entries_and_bytes_match_independent_count(
            steps in proptest::collection::vec(prop_oneof![Just(1u64), 2u64..5], 1..900),
            max_pages in 1usize..40,
        ) {
            let mut pfn = 1000u64;
            let pfns: Vec<u64> = steps.iter().map(|s| { pfn += s; pfn }).collect();
            let t = SgTable::from_pages(&pfns, 0, pfns.len() as u64 * 4096, max_pages as u64 * 4096).unwrap();
            let (nents, bytes) = expected(&pfns, max_pages);
            prop_assert_eq!(t.nents(), nents);
            prop_assert_eq!(t.metadata_bytes(), bytes);
            prop_assert_eq!(t.entries().map(|e| e.length as u64).sum::<u64>(), pfns.len() as u64 * 4096);
        }
    }
}
