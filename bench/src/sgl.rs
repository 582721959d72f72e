//! Address list vs scatterlist model: registration of one buffer, both ways.
//!
//! Each side is timed from its input to a DMA-mapped representation with its MR page size chosen:
//! - address list: (4 KiB pages) `AddrList::from_pfns` walks the pinned pages, merging
//!   contiguous ones and validating; (huge pages) one range per folio; (BAR) the BAR is one
//!   range; then map to DMA addresses and `best_page_size`.
//! - scatterlist: `sg_alloc_table_from_pages` over the page array; DMA-map it; the same page-size
//!   rule over the mapped segments.
//!
//! The page array and the page map are inputs built before timing. A BAR's ZONE_DEVICE page map
//! is timed separately (`pagemap_ns`: once per BAR, not per registration) and counted in the
//! scatterlist's metadata; system RAM's memory map exists anyway and is not counted.

use std::time::Instant;

use dmaplane_core::pgsz::{MLX5_PGSZ_BITMAP, best_page_size, best_page_size_of};
use dmaplane_core::sgl::{DmaMapper, PAGE_SHIFT, PAGE_SIZE, PageMap, SgTable};
use dmaplane_core::{AddrList, AddrSpace, DmaRange, Hints, Route};
use serde::Serialize;

const GIB: u64 = 1 << 30;
/// Where the simulated BARs sit in CPU physical space (above 1 TiB, as on big machines).
const BAR_PHYS: u64 = 1 << 40;
/// The sim's host bridge bus offset: bus = phys − offset.
const BUS_OFFSET: u64 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// A contiguous 1 GiB BAR.
    Bar1G,
    /// A contiguous 64 GiB BAR.
    Bar64G,
    /// 1 GiB of host memory in 2 MiB huge pages, scattered.
    Huge2M,
    /// 1 GiB of host memory in 4 KiB pages, scattered.
    Frag4K,
}

impl Scenario {
    pub const ALL: [Scenario; 4] = [
        Scenario::Bar1G,
        Scenario::Bar64G,
        Scenario::Huge2M,
        Scenario::Frag4K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Bar1G => "bar-1g-contiguous",
            Scenario::Bar64G => "bar-64g-contiguous",
            Scenario::Huge2M => "host-1g-2m-hugepages",
            Scenario::Frag4K => "host-1g-4k-fragmented",
        }
    }

    pub fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    pub fn bytes(self) -> u64 {
        match self {
            Scenario::Bar64G => 64 * GIB,
            _ => GIB,
        }
    }

    fn is_bar(self) -> bool {
        matches!(self, Scenario::Bar1G | Scenario::Bar64G)
    }
}

/// The prepared inputs of one scenario (built once, untimed).
#[derive(Debug)]
pub struct Input {
    pub scenario: Scenario,
    /// The page array a scatterlist is built from (`struct page **` as pfns).
    pub pfns: Vec<u64>,
    /// ZONE_DEVICE page map for a BAR; `None` for host memory.
    pub pagemap: Option<PageMap>,
    pub pagemap_ns: u64,
    /// Huge-page memory: the folios, which is what an address-list exporter walks (one range
    /// each); the scatterlist API needs the 4 KiB page array instead.
    pub folios: Vec<DmaRange>,
}

/// A small deterministic generator (xorshift64*), so runs are repeatable without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Frames `0..n` in a deterministic random order, scaled by `stride` and offset by `base`.
fn scattered(n: u64, stride: u64, base: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut rng = Rng(seed | 1);
    for i in (1..v.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v.iter().map(|f| base + f * stride).collect()
}

impl Input {
    pub fn prepare(scenario: Scenario) -> Input {
        let bytes = scenario.bytes();
        let pages = bytes / PAGE_SIZE;
        match scenario {
            Scenario::Bar1G | Scenario::Bar64G => {
                let t = Instant::now();
                let map = PageMap::zone_device(BAR_PHYS, bytes, 1);
                let pagemap_ns = t.elapsed().as_nanos() as u64;
                let pfns: Vec<u64> = map.pfns().collect();
                Input {
                    scenario,
                    pfns,
                    pagemap: Some(map),
                    pagemap_ns,
                    folios: Vec::new(),
                }
            }
            Scenario::Huge2M => {
                let per = (2 << 20) / PAGE_SIZE;
                // 512 huge frames scattered over 64 GiB of RAM.
                let frames = scattered(bytes / (2 << 20), 64, 1 << 20, 0x5eed);
                let pfns = frames
                    .iter()
                    .flat_map(|f| (0..per).map(move |i| f * per + i))
                    .collect();
                let folios = frames
                    .iter()
                    .map(|f| DmaRange::new(f * (2 << 20), 2 << 20))
                    .collect();
                Input {
                    scenario,
                    pfns,
                    pagemap: None,
                    pagemap_ns: 0,
                    folios,
                }
            }
            Scenario::Frag4K => {
                // Every page its own frame, scattered over 4x the buffer: a long-running machine.
                let pfns = scattered(pages, 4, 1 << 20, 0xf4a9);
                Input {
                    scenario,
                    pfns,
                    pagemap: None,
                    pagemap_ns: 0,
                    folios: Vec::new(),
                }
            }
        }
    }
}

/// What one registration produced (so the optimiser cannot drop the work).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    pub bytes: u64,
    pub entries: u64,
    pub page_size: u64,
    pub list_entries: u64,
}

impl Produced {
    const EMPTY: Produced = Produced {
        bytes: 0,
        entries: 0,
        page_size: 0,
        list_entries: 0,
    };
}

/// Address-list registration: build, validate, map, choose the page size.
pub fn addrlist_register(input: &Input) -> Produced {
    let scenario = input.scenario;
    let built = match scenario {
        Scenario::Bar1G | Scenario::Bar64G => {
            let range = DmaRange::new(BAR_PHYS, scenario.bytes());
            AddrList::single(
                AddrSpace::CpuPhys,
                Hints::device_bar(Route::BusAddr),
                PAGE_SIZE,
                range,
            )
        }
        Scenario::Huge2M => AddrList::new(
            AddrSpace::CpuPhys,
            Hints::HOST_MEMORY,
            PAGE_SIZE,
            input.folios.clone(),
        ),
        Scenario::Frag4K => AddrList::from_pfns(
            AddrSpace::CpuPhys,
            Hints::HOST_MEMORY,
            PAGE_SHIFT,
            &input.pfns,
        ),
    };
    // A list that fails validation here is a bug in the scenario, reported as an empty side.
    let Ok(list) = built else {
        return Produced::EMPTY;
    };
    let space = list.space();
    // DMA-map: program bus addresses (phys − bus offset) for the P2P route; host memory is
    // direct-mapped (no IOMMU), the same as the scatterlist side.
    let mapped_space = if scenario.is_bar() {
        AddrSpace::PciBus {
            root: 0,
            bus_offset: BUS_OFFSET,
        }
    } else {
        space
    };
    let Ok(mapped) = list.translate(mapped_space, BUS_OFFSET) else {
        return Produced::EMPTY;
    };
    let pg = best_page_size(&mapped, 0, MLX5_PGSZ_BITMAP);
    Produced {
        bytes: mapped.metadata_bytes(),
        entries: pg.map_or(0, |p| p.entries),
        page_size: pg.map_or(0, |p| p.size),
        list_entries: mapped.len() as u64,
    }
}

/// Scatterlist registration: build from the page array, DMA-map, choose the page size.
pub fn sgtable_register(input: &Input) -> Produced {
    let length = input.pfns.len() as u64 * PAGE_SIZE;
    let Ok(mut table) = SgTable::from_pages(&input.pfns, 0, length, u64::MAX) else {
        return Produced::EMPTY;
    };
    let segs = table.dma_map(DmaMapper::Direct {
        bus_offset: BUS_OFFSET,
    });
    let pg = best_page_size_of(table.dma_segments(), 0, MLX5_PGSZ_BITMAP);
    let pagemap = input.pagemap.as_ref().map_or(0, |m| m.metadata_bytes());
    Produced {
        bytes: table.metadata_bytes() + pagemap,
        entries: pg.map_or(0, |p| p.entries),
        page_size: pg.map_or(0, |p| p.size),
        list_entries: segs as u64,
    }
}

/// One row of `dmaplane bench sgl`.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub buffer_bytes: u64,
    pub addrlist_ns: u64,
    pub sgtable_ns: u64,
    pub addrlist_bytes: u64,
    pub sgtable_bytes: u64,
    /// MR translation entries (pages of the chosen size).
    pub addrlist_entries: u64,
    pub sgtable_entries: u64,
    pub addrlist_page_size: u64,
    pub sgtable_page_size: u64,
    /// Ranges in the address list / DMA segments in the scatterlist.
    pub addrlist_ranges: u64,
    pub sgtable_segments: u64,
    /// One-time cost of the BAR's ZONE_DEVICE page map (0 for host memory).
    pub pagemap_ns: u64,
    /// sgtable / addrlist: how many times faster and smaller the address list is.
    pub time_ratio: f64,
    pub bytes_ratio: f64,
    pub iterations: u32,
}

fn median_ns(iters: u32, mut f: impl FnMut() -> Produced) -> (u64, Produced) {
    // Untimed warm-up: both sides then run with the allocator in its steady state (the kernel's
    // slab caches are warm too), instead of paying first-touch page faults.
    for _ in 0..2 {
        std::hint::black_box(f());
    }
    let mut times = Vec::with_capacity(iters as usize);
    let mut last = None;
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        let side = std::hint::black_box(f());
        times.push(t.elapsed().as_nanos() as u64);
        last = Some(side);
    }
    times.sort_unstable();
    let side = last.unwrap_or(Produced::EMPTY);
    (times[times.len() / 2].max(1), side)
}

/// Keep freed memory in the process: glibc otherwise returns large blocks to the kernel and the
/// next registration pays first-touch page faults — the allocator's policy, not the data
/// structure's cost (the kernel's allocators hand out already-mapped memory).
pub fn steady_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes glibc's allocator thresholds; any value is valid and it is
    // called before the measured allocations.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Measure one scenario: the median of `iters` registrations each way.
pub fn measure(scenario: Scenario, iters: u32) -> Row {
    steady_allocator();
    let input = Input::prepare(scenario);
    let (addrlist_ns, a) = median_ns(iters, || addrlist_register(std::hint::black_box(&input)));
    let (sgtable_ns, s) = median_ns(iters, || sgtable_register(std::hint::black_box(&input)));
    Row {
        scenario: scenario.name(),
        buffer_bytes: scenario.bytes(),
        addrlist_ns,
        sgtable_ns,
        addrlist_bytes: a.bytes,
        sgtable_bytes: s.bytes,
        addrlist_entries: a.entries,
        sgtable_entries: s.entries,
        addrlist_page_size: a.page_size,
        sgtable_page_size: s.page_size,
        addrlist_ranges: a.list_entries,
        sgtable_segments: s.list_entries,
        pagemap_ns: input.pagemap_ns,
        time_ratio: sgtable_ns as f64 / addrlist_ns as f64,
        bytes_ratio: s.bytes as f64 / a.bytes.max(1) as f64,
        iterations: iters,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shapes (not timings): entries, bytes and page sizes follow from the scenario.
    #[test]
    fn scenario_shapes() {
        let bar = Input::prepare(Scenario::Bar1G);
        let a = addrlist_register(&bar);
        let s = sgtable_register(&bar);
        assert_eq!((a.list_entries, a.entries, a.page_size), (1, 1, GIB));
        assert_eq!(s.list_entries, 1);
        assert_eq!(s.bytes, 16 + 32 + GIB / PAGE_SIZE * 64);
        assert!(s.bytes / a.bytes >= 10_000);

        let frag = Input::prepare(Scenario::Frag4K);
        let a = addrlist_register(&frag);
        let s = sgtable_register(&frag);
        assert_eq!(a.list_entries, s.list_entries);
        assert_eq!(a.entries, s.entries);
        assert!(a.bytes <= s.bytes, "{a:?} vs {s:?}");

        let huge = Input::prepare(Scenario::Huge2M);
        let a = addrlist_register(&huge);
        assert!(a.list_entries <= 512);
        assert_eq!(a.page_size, 2 << 20);
    }
}
