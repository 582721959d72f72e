//! Peer memory for the copy engine: ranges of this process's address space (host memory, or a
//! peer's MMIO mapping) registered with `cuMemHostRegister`.
//!
//! Registration is per process (`PORTABLE`: every context sees it), and the driver refuses to
//! register pages twice. So registrations are counted per page-rounded span in one table for the
//! process: the same buffer imported twice (by two GPUs, or again by a refresh before the old
//! registration is dropped) shares one driver registration, unregistered with the last user. A
//! span the driver reports as registered already, by someone outside this table, is used as it
//! is and never unregistered here.
//!
//! Copies need no translation: under unified addressing the copy engine takes the host address
//! itself (`cuMemcpy` infers the direction from the pointers, and for registered memory the
//! device pointer `cuMemHostGetDevicePointer` would return is the same address), so
//! [`Registration::translate`] is the identity.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::sys;
use dmaplane_core::{AddrList, AddrSpace, MemKind};

use super::device::GpuShared;
use super::driver;
use super::ranges::RangeKey;
use crate::backend::Registration;
use crate::error::{GpuError, Result};

/// A span registered with the driver and its users.
#[derive(Debug)]
struct Span {
    refs: u32,
    /// Registered by this table (and so unregistered by it).
    owned: bool,
}

/// Every span registered through this backend, by `(start, len)`.
fn spans() -> MutexGuard<'static, BTreeMap<(u64, u64), Span>> {
    static SPANS: Mutex<BTreeMap<(u64, u64), Span>> = Mutex::new(BTreeMap::new());
    SPANS.lock().unwrap_or_else(|e| e.into_inner())
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
    /// Keys of the process table this registration holds a count on.
    spans: Vec<(u64, u64)>,
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
            return Err(GpuError::Invalid {
                field: "list.space",
                value: list.space().to_string(),
                why: format!(
                    "the copy engine of {} takes this process's virtual addresses (process-va: \
                     host memory or a peer's MMIO mapping, registered with cuMemHostRegister); \
                     {name} is in {}",
                    gpu.label(),
                    list.space()
                ),
            });
        }
        let mmio = list.hints().mem == MemKind::Mmio;
        let mut flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
        if mmio {
            flags |= sys::CU_MEMHOSTREGISTER_IOMEMORY;
        }
        let page = host_page_size();
        let wanted =
            page_spans(list.ranges().iter().map(|r| (r.addr, r.len)), page).ok_or_else(|| {
                GpuError::Invalid {
                    field: "list",
                    value: format!("{} ranges", list.len()),
                    why: format!("{name}: a range ends past the top of the address space"),
                }
            })?;
        let mut reg = HostRegistration {
            gpu,
            name: name.to_string(),
            spans: Vec::with_capacity(wanted.len()),
            ranges: Vec::with_capacity(list.len()),
        };
        reg.gpu.ctx.bind()?;
        {
            let mut table = spans();
            for (start, len) in wanted {
                if let Some(s) = table.get_mut(&(start, len)) {
                    s.refs += 1;
                    reg.spans.push((start, len));
                    continue;
                }
                let bytes = usize::try_from(len).map_err(|_| GpuError::Invalid {
                    field: "list",
                    value: format!("{start:#x}+{len:#x}"),
                    why: "larger than this machine's address space".into(),
                })?;
                let owned = match driver::host_register(start, bytes, flags) {
                    Ok(()) => true,
                    Err(e) if e.0 == sys::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED => {
                        tracing::debug!(gpu = %reg.gpu.label(), name, start = format_args!("{start:#x}"), len, "span registered elsewhere already: used as it is");
                        false
                    }
                    Err(e) => {
                        let hint = if mmio {
                            " (IOMEMORY needs a mapping of a device BAR, VM_IO|VM_PFNMAP)"
                        } else {
                            ""
                        };
                        // `reg` drops here and gives back the spans taken so far.
                        drop(table);
                        return Err(reg.gpu.ctx.err_with(
                            "cuMemHostRegister",
                            format!("{name}: [{start:#x}, +{len:#x}) flags {flags:#x}{hint}"),
                            e,
                        ));
                    }
                };
                table.insert((start, len), Span { refs: 1, owned });
                reg.spans.push((start, len));
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

impl Registration for HostRegistration {
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
        if self.spans.is_empty() {
            return;
        }
        let bound = self.gpu.ctx.bind();
        let mut table = spans();
        for key in self.spans.drain(..) {
            let Some(s) = table.get_mut(&key) else {
                continue;
            };
            s.refs -= 1;
            if s.refs > 0 {
                continue;
            }
            let owned = s.owned;
            table.remove(&key);
            if !owned {
                continue;
            }
            let res = match &bound {
                Ok(()) => driver::host_unregister(key.0).map_err(driver::describe),
                Err(e) => Err(e.to_string()),
            };
            if let Err(why) = res {
                tracing::error!(gpu = %self.gpu.label(), name = %self.name, start = format_args!("{:#x}", key.0), len = key.1, why, "cuMemHostUnregister failed");
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
