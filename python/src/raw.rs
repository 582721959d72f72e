//! Memory lent by address (`Agent.register_address`): what NIXL's `(addr, len, dev, label)`
//! tuples name. The caller owns the memory and promises to keep it alive and in place until the
//! registration is deregistered — NIXL's contract, which nothing here can enforce; what can be
//! checked is checked: the range must lie in mappings of this process (`/proc/self/maps`),
//! and it is lent read-only where a mapping is not writable.

use std::ptr::NonNull;

use pyo3::prelude::*;

use crate::errors::invalid;

/// `len` bytes at `addr` of this process, lent on the caller's word.
pub(crate) struct RawRange {
    ptr: NonNull<u8>,
    len: usize,
    read_only: bool,
}

// SAFETY: a plain address range; the bytes are touched only by the fabric's atomic copies and
// the NICs ([`dmaplane::Lent`]'s contract).
unsafe impl Send for RawRange {}
// SAFETY: as above: no method hands out references into the bytes.
unsafe impl Sync for RawRange {}

impl RawRange {
    /// The range, once checked against this process's mappings: refused naming the address
    /// when a byte of it is not mapped.
    pub(crate) fn new(addr: u64, len: u64) -> PyResult<RawRange> {
        if len == 0 {
            return Err(invalid("length", 0, "at least 1 byte"));
        }
        let end = addr
            .checked_add(len)
            .ok_or_else(|| invalid("length", len, "addr + length overflows"))?;
        let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| {
            invalid(
                "addr",
                format!("{addr:#x}"),
                &format!("cannot read /proc/self/maps to check it ({e})"),
            )
        })?;
        let (covered, writable) = covered(&maps, addr, end);
        if !covered {
            return Err(invalid(
                "addr",
                format!("{addr:#x}+{len:#x}"),
                "not mapped in this process: give the address and length of memory you own \
                 and keep alive until deregistered (or register the object itself)",
            ));
        }
        let ptr = NonNull::new(addr as usize as *mut u8)
            .ok_or_else(|| invalid("addr", 0, "the null address"))?;
        Ok(RawRange {
            ptr,
            len: usize::try_from(len).map_err(|_| invalid("length", len, "too large"))?,
            read_only: !writable,
        })
    }
}

/// Whether `[addr, end)` is covered by the mappings listed in `maps` (the format of
/// `/proc/<pid>/maps`), and whether every one of them is writable.
fn covered(maps: &str, addr: u64, end: u64) -> (bool, bool) {
    let mut ranges: Vec<(u64, u64, bool)> = maps
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (lo, hi) = parts.next()?.split_once('-')?;
            let perms = parts.next()?;
            Some((
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
                perms.as_bytes().get(1) == Some(&b'w'),
            ))
        })
        .collect();
    ranges.sort_unstable();
    let (mut at, mut writable) = (addr, true);
    for (lo, hi, w) in ranges {
        if hi <= at {
            continue;
        }
        if lo > at {
            return (false, false);
        }
        writable &= w;
        at = hi;
        if at >= end {
            return (true, writable);
        }
    }
    (false, false)
}

// SAFETY: `ptr`/`len` lie in this process's mappings (checked at creation); the caller of
// `Agent.register_address` promised, as NIXL requires, that they stay alive and in place until
// the registration is deregistered; they never change.
unsafe impl dmaplane::Lent for RawRange {
    fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::covered;

    const MAPS: &str = "\
00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/dbus-daemon
00651000-00652000 rw-p 00051000 08:02 173521 /usr/bin/dbus-daemon
00652000-00655000 rw-p 00000000 00:00 0 [heap]
7fff0000-7fff1000 rw-p 00000000 00:00 0
";

    #[test]
    fn a_range_is_covered_across_adjacent_mappings_and_not_across_a_hole() {
        assert_eq!(covered(MAPS, 0x651000, 0x655000), (true, true));
        assert_eq!(covered(MAPS, 0x400000, 0x401000), (true, false));
        assert_eq!(covered(MAPS, 0x654000, 0x656000), (false, false));
        assert_eq!(covered(MAPS, 0x10, 0x20), (false, false));
        assert_eq!(covered(MAPS, 0x7fff0000, 0x7fff1000), (true, true));
    }
}
