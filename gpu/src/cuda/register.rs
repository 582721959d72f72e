//! Peer memory for the copy engine: ranges of this process's address space (host memory, or a
//! peer's MMIO mapping) registered with `cuMemHostRegister`.
//!
//! Registration is per process (`PORTABLE`: every context sees it), and the driver refuses to
//! register a page twice (`CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED`, even for a partial
//! overlap). So every driver registration this backend makes is counted in one table for the
//! process, and the table's registrations never overlap: a list whose pages are partly
//! registered already takes a count on those registrations and registers only the gaps between
//! them. A registration is unregistered with its last user, in the context of the GPU that made
//! it (kept alive until then). A gap the driver reports as registered already, by someone
//! outside this table, is used as it is and never unregistered here.
//!
//! A copy may then cross from one registration into the next; the driver resolves a host
//! pointer to one registration, so [`pieces`] cuts copies at their boundaries.
//!
//! Copies need no translation: under unified addressing the copy engine takes the host address
//! itself (`cuMemcpy` infers the direction from the pointers, and for registered memory the
//! device pointer `cuMemHostGetDevicePointer` would return is the same address), so
//! [`Registration::translate`] is the identity.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use dmaplane_core::sync::lock;

use cudarc::driver::sys;
use dmaplane_core::{AddrList, AddrSpace, MemKind};

use super::device::GpuShared;
use super::driver;
use super::ranges::RangeKey;
use crate::backend::CopyRegistration;
use crate::error::{GpuError, Result};

/// A driver registration and its users.
#[derive(Debug)]
struct Span {
    len: u64,
    refs: u32,
    /// The GPU whose context registered it (and unregisters it); `None` when it was registered
    /// outside this table and is only used here.
    owner: Option<Arc<GpuShared>>,
}

impl Span {
    fn end(&self, start: u64) -> u64 {
        start + self.len
    }
}

type Table = BTreeMap<u64, Span>;

/// Every driver registration made through this backend, by start address; they never overlap.
fn spans() -> MutexGuard<'static, Table> {
    static SPANS: Mutex<Table> = Mutex::new(BTreeMap::new());
    lock(&SPANS)
}

/// `(start, end)` of the registrations overlapping `[s, e)`, ascending.
fn overlapping(table: &Table, s: u64, e: u64) -> Vec<(u64, u64)> {
    // Sorted by start and disjoint, so ends are sorted too: walk back from the last start
    // below `e` while the registration still reaches past `s`.
    let mut v: Vec<(u64, u64)> = table
        .range(..e)
        .rev()
        .map(|(&a, sp)| (a, sp.end(a)))
        .take_while(|&(_, b)| b > s)
        .collect();
    v.reverse();
    v
}

/// The pieces `(offset, len)` a copy of `len` bytes between `src` and `dst` must be cut into so
/// that neither side of a piece crosses from one host registration into another.
pub(super) fn pieces(src: u64, dst: u64, len: u64) -> Vec<(u64, u64)> {
    let mut cuts = vec![0, len];
    {
        let table = spans();
        for base in [src, dst] {
            let Some(end) = base.checked_add(len) else {
                continue;
            };
            for (a, b) in overlapping(&table, base, end) {
                for edge in [a, b] {
                    if edge > base && edge < end {
                        cuts.push(edge - base);
                    }
                }
            }
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2).map(|w| (w[0], w[1] - w[0])).collect()
}

/// The host's page size, from the auxiliary vector (`AT_PAGESZ`); 4 KiB if it cannot be read.
fn host_page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        const AT_PAGESZ: u64 = 6;
        let auxv = std::fs::read("/proc/self/auxv").unwrap_or_default();
        auxv.chunks_exact(16)
            .filter_map(|e| {
                let key = u64::from_ne_bytes(e[..8].try_into().ok()?);
                let val = u64::from_ne_bytes(e[8..].try_into().ok()?);
                (key == AT_PAGESZ).then_some(val)
            })
            .find(|p| p.is_power_of_two())
            .unwrap_or(4096)
    })
}

/// The page-rounded spans covering `ranges`, sorted, overlapping and touching ones merged.
fn page_spans(ranges: impl IntoIterator<Item = (u64, u64)>, page: u64) -> Option<Vec<(u64, u64)>> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for (addr, len) in ranges {
        let start = addr - addr % page;
        let end = addr.checked_add(len)?.checked_next_multiple_of(page)?;
        spans.push((start, end));
    }
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (s, e) in spans {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    Some(merged.into_iter().map(|(s, e)| (s, e - s)).collect())
}

/// A list registered for the copy engine of one GPU; unregistered on drop.
#[derive(Debug)]
pub(super) struct HostRegistration {
    gpu: Arc<GpuShared>,
    name: String,
    /// Starts of the process table's registrations this one holds a count on.
    spans: Vec<u64>,
    /// The list's ranges in the GPU's copy table.
    ranges: Vec<RangeKey>,
}

impl HostRegistration {
    pub(super) fn new(
        gpu: Arc<GpuShared>,
        name: &str,
        list: &AddrList,
    ) -> Result<HostRegistration> {
        if list.space() != AddrSpace::ProcessVa {
            return Err(GpuError::invalid(
                "list.space",
                list.space().to_string(),
                format!(
                    "the copy engine of {} takes this process's virtual addresses (process-va: \
                     host memory or a peer's MMIO mapping, registered with cuMemHostRegister); \
                     {name} is in {}",
                    gpu.label(),
                    list.space()
                ),
            ));
        }
        let mmio = list.hints().mem == MemKind::Mmio;
        let mut flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
        if mmio {
            flags |= sys::CU_MEMHOSTREGISTER_IOMEMORY;
        }
        let page = host_page_size();
        let wanted =
            page_spans(list.ranges().iter().map(|r| (r.addr, r.len)), page).ok_or_else(|| {
                GpuError::invalid(
                    "list",
                    format!("{} ranges", list.len()),
                    format!("{name}: a range ends past the top of the address space"),
                )
            })?;
        let mut reg = HostRegistration {
            gpu,
            name: name.to_string(),
            spans: Vec::with_capacity(wanted.len()),
            ranges: Vec::with_capacity(list.len()),
        };
        {
            let gpu = reg.gpu.clone();
            let _bound = gpu.ctx.bind()?;
            // Dropped before `reg` on an early return: its drop takes the table again.
            let mut table = spans();
            for (start, len) in wanted {
                let end = start + len;
                let mut at = start;
                for (a, b) in overlapping(&table, start, end) {
                    if a > at {
                        reg.register_gap(&mut table, at, a - at, flags)?;
                    }
                    if let Some(sp) = table.get_mut(&a) {
                        sp.refs += 1;
                        reg.spans.push(a);
                    }
                    at = at.max(b);
                }
                if at < end {
                    reg.register_gap(&mut table, at, end - at, flags)?;
                }
            }
        }
        for r in list.ranges() {
            // Validated lists do not wrap, so `add` always admits them.
            if let Some(key) = reg.gpu.ranges.add(r.addr, r.len) {
                reg.ranges.push(key);
            }
        }
        tracing::debug!(gpu = %reg.gpu.label(), name, ranges = list.len(), spans = reg.spans.len(), mmio, "host memory registered");
        Ok(reg)
    }
}

impl HostRegistration {
    /// Register `[start, start + len)`, which no registration of the table covers, and take
    /// the first count on it. On error the caller drops `self`, giving back what it took.
    fn register_gap(&mut self, table: &mut Table, start: u64, len: u64, flags: u32) -> Result<()> {
        let mmio = flags & sys::CU_MEMHOSTREGISTER_IOMEMORY != 0;
        let bytes = usize::try_from(len).map_err(|_| {
            GpuError::invalid(
                "list",
                format!("{start:#x}+{len:#x}"),
                "larger than this machine's address space",
            )
        })?;
        let owner = match driver::host_register(start, bytes, flags) {
            Ok(()) => Some(self.gpu.clone()),
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED => {
                // Registered outside this table; if only in part, the rest of the gap is not
                // pinned, and copies through it take the driver's pageable path.
                tracing::warn!(gpu = %self.gpu.label(), name = %self.name, start = format_args!("{start:#x}"), len, "pages registered outside dmaplane already: used as they are");
                None
            }
            Err(e) => {
                let hint = if mmio {
                    " (IOMEMORY takes a mapping of a device BAR, VM_IO|VM_PFNMAP, and the driver \
                     may refuse it without root or CAP_SYS_ADMIN)"
                } else {
                    ""
                };
                return Err(self.gpu.ctx.err_with(
                    "cuMemHostRegister",
                    format!(
                        "{}: [{start:#x}, +{len:#x}) flags {flags:#x}{hint}",
                        self.name
                    ),
                    e,
                ));
            }
        };
        table.insert(
            start,
            Span {
                len,
                refs: 1,
                owner,
            },
        );
        self.spans.push(start);
        Ok(())
    }
}

impl CopyRegistration for HostRegistration {
    fn translate(&self, addr: u64) -> u64 {
        addr
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        // Copies first: none may be under way once the ranges are out of the table.
        for key in self.ranges.drain(..) {
            self.gpu.ranges.remove(key);
        }
        let mut table = spans();
        for key in self.spans.drain(..) {
            let Some(sp) = table.get_mut(&key) else {
                continue;
            };
            sp.refs -= 1;
            if sp.refs > 0 {
                continue;
            }
            let Some(sp) = table.remove(&key) else {
                continue;
            };
            let Some(owner) = sp.owner else {
                continue;
            };
            // Unregistered in the context that registered it, whichever GPU drops it last.
            let res = match owner.ctx.bind() {
                Ok(_bound) => driver::host_unregister(key).map_err(driver::describe),
                Err(e) => Err(e.to_string()),
            };
            if let Err(why) = res {
                tracing::error!(gpu = %owner.label(), name = %self.name, start = format_args!("{key:#x}"), len = sp.len, why, "cuMemHostUnregister failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_size_comes_from_the_auxiliary_vector() {
        let p = host_page_size();
        assert!(p.is_power_of_two() && p >= 4096, "{p}");
    }

    #[test]
    fn overlapping_finds_exactly_the_registrations_a_range_touches() {
        let mut t = Table::new();
        for (start, len) in [(0x1000, 0x1000), (0x3000, 0x2000), (0x8000, 0x1000)] {
            t.insert(
                start,
                Span {
                    len,
                    refs: 1,
                    owner: None,
                },
            );
        }
        assert_eq!(overlapping(&t, 0x0, 0x1000), vec![]);
        assert_eq!(
            overlapping(&t, 0x1fff, 0x3001),
            vec![(0x1000, 0x2000), (0x3000, 0x5000)]
        );
        assert_eq!(overlapping(&t, 0x2000, 0x3000), vec![]);
        assert_eq!(
            overlapping(&t, 0x4000, 0x9000),
            vec![(0x3000, 0x5000), (0x8000, 0x9000)]
        );
        assert_eq!(overlapping(&t, 0x9000, 0xa000), vec![]);
    }

    #[test]
    fn spans_are_page_rounded_and_merged() {
        let p = 4096;
        assert_eq!(
            page_spans([(0x1000, 0x1000)], p),
            Some(vec![(0x1000, 0x1000)])
        );
        // Unaligned ranges sharing a page become one span; order does not matter.
        assert_eq!(
            page_spans([(0x3100, 0x100), (0x1010, 0x2000)], p),
            Some(vec![(0x1000, 0x3000)])
        );
        // Touching spans merge, separate ones stay apart.
        assert_eq!(
            page_spans([(0x1000, 0x1000), (0x2000, 0x1000), (0x8000, 1)], p),
            Some(vec![(0x1000, 0x2000), (0x8000, 0x1000)])
        );
        assert_eq!(page_spans([(u64::MAX - 10, 5)], p), None);
    }
}
