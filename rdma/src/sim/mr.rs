//! Simulated memory regions: a translation table of fabric bus addresses, one entry per page of
//! the size `best_page_size` picks, keyed by lkey/rkey, checked on every access.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use dmaplane_core::pgsz::{MLX5_PGSZ_BITMAP, best_page_size};
use dmaplane_core::{AddrList, AddrSpace};

use crate::access::MrAccess;
use crate::backend::{MrBackend, MrKeys, Translation};
use crate::error::{RdmaError, Result};

use super::{NicShared, read, write};

/// Why an access through an MR failed (the simulator's vendor syndrome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MrFault {
    Zapped = 1,
    OutOfBounds = 2,
    Access = 3,
    Pd = 4,
    Key = 5,
}

#[derive(Debug)]
pub(crate) struct SimMr {
    pub(crate) key: u32,
    pub(crate) pd: u32,
    iova: u64,
    len: u64,
    access: MrAccess,
    page_size: u64,
    /// Bus address of each page; `None` once zapped. Accesses hold it for reading while they
    /// copy, so `zap` (write) waits for them.
    table: RwLock<Option<Vec<u64>>>,
    /// A zap waits for `table`: a multi-packet message holding it lets go after its packet.
    zapping: std::sync::atomic::AtomicBool,
    /// The NIC's modelled driver-call time ([`crate::sim::SimNic::set_call_latency`]).
    call_latency: Arc<AtomicU64>,
}

impl SimMr {
    pub(crate) fn new(
        key: u32,
        pd: u32,
        list: &AddrList,
        iova: u64,
        access: MrAccess,
    ) -> Result<SimMr> {
        access
            .validate()
            .map_err(|why| RdmaError::InvalidRegistration {
                field: "access",
                value: access.to_string(),
                why: why.into(),
            })?;
        let offset = match list.space() {
            AddrSpace::CpuPhys | AddrSpace::Iova { .. } => 0,
            AddrSpace::PciBus { bus_offset, .. } => bus_offset,
            other => {
                return Err(RdmaError::InvalidRegistration {
                    field: "list.space",
                    value: format!("{other:?}"),
                    why: "the simulated NIC DMAs fabric bus addresses: CpuPhys, PciBus or Iova"
                        .into(),
                });
            }
        };
        let len = list.total_len();
        if iova.checked_add(len).is_none() {
            return Err(RdmaError::InvalidRegistration {
                field: "iova",
                value: format!("{iova:#x}"),
                why: format!("iova + length {len:#x} overflows"),
            });
        }
        let pg = best_page_size(list, iova, MLX5_PGSZ_BITMAP).ok_or_else(|| {
            RdmaError::InvalidRegistration {
                field: "iova",
                value: format!("{iova:#x}"),
                why: "no supported page size fits the list's alignment at this iova".into(),
            }
        })?;
        let size = pg.size;
        // Page i covers iova [base + i*size, ...), base = iova rounded down.
        let base = iova & !(size - 1);
        let mut table = Vec::with_capacity(usize::try_from(pg.entries).unwrap_or(0));
        let mut va = iova;
        for r in list.ranges() {
            let bus = r.addr.wrapping_add(offset);
            let end = va + r.len;
            // First page of this range starts at the page boundary at or below va.
            let mut page_va = va & !(size - 1);
            while page_va < end {
                if page_va >= base + table.len() as u64 * size {
                    table.push(bus.wrapping_add(page_va).wrapping_sub(va));
                }
                page_va += size;
            }
            va = end;
        }
        Ok(SimMr {
            key,
            pd,
            iova,
            len,
            access,
            page_size: size,
            table: RwLock::new(Some(table)),
            zapping: std::sync::atomic::AtomicBool::new(false),
            call_latency: Arc::default(),
        })
    }

    /// Run `f` over the bus segments of `[addr, addr+len)` with the translation held, after the
    /// bounds and access checks. `f` gets `(bus, len)` pairs with adjacent pages merged.
    pub(crate) fn with_segments<R>(
        &self,
        addr: u64,
        len: u64,
        need: MrAccess,
        mut f: impl FnMut(&mut dyn Iterator<Item = (u64, u64)>) -> R,
    ) -> std::result::Result<R, MrFault> {
        if !self.access.contains(need) {
            return Err(MrFault::Access);
        }
        let in_bounds = addr >= self.iova
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= self.iova + self.len);
        if !in_bounds {
            return Err(MrFault::OutOfBounds);
        }
        let guard = read(&self.table);
        let Some(table) = guard.as_ref() else {
            return Err(MrFault::Zapped);
        };
        let size = self.page_size;
        let base = self.iova & !(size - 1);
        let mut it = Segments {
            table,
            size,
            base,
            cur: addr,
            end: addr + len,
        };
        Ok(f(&mut it))
    }

    /// A zap is waiting for (or done with) the translation.
    /// Share the NIC's modelled driver-call time.
    pub(crate) fn with_call_latency(mut self, latency: Arc<AtomicU64>) -> SimMr {
        self.call_latency = latency;
        self
    }

    pub(crate) fn zapping(&self) -> bool {
        self.zapping.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn check(&self, addr: u64, len: u64, need: MrAccess) -> Result<(), MrFault> {
        self.with_segments(addr, len, need, |_| ())
    }
}

struct Segments<'a> {
    table: &'a [u64],
    size: u64,
    base: u64,
    cur: u64,
    end: u64,
}

impl Iterator for Segments<'_> {
    type Item = (u64, u64);
    fn next(&mut self) -> Option<(u64, u64)> {
        if self.cur >= self.end {
            return None;
        }
        let page = ((self.cur - self.base) / self.size) as usize;
        let in_page = (self.cur - self.base) % self.size;
        let bus = self.table.get(page)? + in_page;
        let mut len = (self.size - in_page).min(self.end - self.cur);
        let mut next = page + 1;
        // Merge physically contiguous following pages.
        while self.cur + len < self.end {
            match self.table.get(next) {
                Some(&b) if b == bus + len => {
                    len = (len + self.size).min(self.end - self.cur);
                    next += 1;
                }
                _ => break,
            }
        }
        self.cur += len;
        Some((bus, len))
    }
}

impl MrBackend for SimMr {
    fn keys(&self) -> MrKeys {
        // lkey = rkey on the simulated NIC.
        MrKeys {
            lkey: self.key,
            rkey: self.key,
            iova: self.iova,
            len: self.len,
            access: self.access,
        }
    }
    fn translation(&self) -> Translation {
        let entries = read(&self.table).as_ref().map_or(0, |t| t.len() as u64);
        Translation {
            page_size: self.page_size,
            entries,
        }
    }
    fn zap(&self) -> Result<()> {
        NicShared::driver_call(&self.call_latency);
        self.zapping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        *write(&self.table) = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmaplane_core::{DmaRange, Hints};

    fn list(ranges: &[(u64, u64)]) -> AddrList {
        AddrList::new(
            AddrSpace::CpuPhys,
            Hints::HOST_MEMORY,
            4096,
            ranges
                .iter()
                .map(|&(a, l)| DmaRange::new(a, l))
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    fn segs(mr: &SimMr, addr: u64, len: u64) -> Vec<(u64, u64)> {
        mr.with_segments(addr, len, MrAccess::NONE, |it| it.collect())
            .unwrap()
    }

    #[test]
    fn contiguous_gigabyte_is_one_entry() {
        let l = list(&[(1 << 30, 1 << 30)]);
        let mr = SimMr::new(1, 0, &l, 1 << 30, MrAccess::ALL).unwrap();
        assert_eq!(
            mr.translation(),
            Translation {
                page_size: 1 << 30,
                entries: 1
            }
        );
        assert_eq!(segs(&mr, (1 << 30) + 5, 100), vec![((1 << 30) + 5, 100)]);
    }

    #[test]
    fn fragmented_translation_matches_the_list() {
        // Three 8 KiB pieces scattered; iova 0x10000.
        let l = list(&[
            (0x40_0000, 0x2000),
            (0x10_0000, 0x2000),
            (0x80_2000, 0x2000),
        ]);
        let mr = SimMr::new(1, 0, &l, 0x10000, MrAccess::ALL).unwrap();
        assert_eq!(mr.translation().page_size, 0x2000);
        assert_eq!(mr.translation().entries, 3);
        // A read across all three pieces walks each.
        assert_eq!(
            segs(&mr, 0x11000, 0x4000),
            vec![
                (0x40_1000, 0x1000),
                (0x10_0000, 0x2000),
                (0x80_2000, 0x1000)
            ]
        );
        assert_eq!(
            mr.check(0x10000, 0x6001, MrAccess::NONE),
            Err(MrFault::OutOfBounds)
        );
        assert_eq!(
            mr.check(0xffff, 1, MrAccess::NONE),
            Err(MrFault::OutOfBounds)
        );
        mr.zap().unwrap();
        assert_eq!(mr.check(0x10000, 1, MrAccess::NONE), Err(MrFault::Zapped));
    }

    #[test]
    fn access_rights_checked_and_remote_write_needs_local_write() {
        let l = list(&[(0x1000, 0x1000)]);
        let mr = SimMr::new(1, 0, &l, 0x1000, MrAccess::REMOTE_READ).unwrap();
        assert_eq!(
            mr.check(0x1000, 8, MrAccess::REMOTE_WRITE),
            Err(MrFault::Access)
        );
        assert!(mr.check(0x1000, 8, MrAccess::REMOTE_READ).is_ok());
        let e = SimMr::new(1, 0, &l, 0x1000, MrAccess::REMOTE_WRITE).unwrap_err();
        assert!(
            e.to_string().contains("REMOTE_WRITE requires LOCAL_WRITE"),
            "{e}"
        );
        let pva = AddrList::new(
            AddrSpace::ProcessVa,
            Hints::HOST_MEMORY,
            4096,
            vec![DmaRange::new(0x1000, 0x1000)],
        )
        .unwrap();
        let e = SimMr::new(1, 0, &pva, 0x1000, MrAccess::ALL).unwrap_err();
        assert!(e.to_string().contains("list.space"), "{e}");
    }
}
