//! The memory a stress run writes, verifies and poisons, as the CPU sees it, and the bytes
//! each request writes.

use dmaplane_core::dmabuf::DmaBufMemory;
use dmaplane_core::fabric::{HostMemory, WindowHandle};
use dmaplane_gpu::DeviceMemory;

/// What revoked memory is filled with at its ack: any other byte found there later was
/// written after the ack.
pub const POISON: u8 = 0xd5;

/// Memory the stress writes, verifies and poisons through the CPU.
pub trait Bytes: Send + Sync + std::fmt::Debug {
    /// Read `buf.len()` bytes at `off`; false when they cannot be read (out of range, gone).
    fn read(&self, off: u64, buf: &mut [u8]) -> bool;
    /// Write `data` at `off`; false when it cannot be written.
    fn write(&self, off: u64, data: &[u8]) -> bool;
    /// Its length in bytes.
    fn len(&self) -> u64;
    /// Whether it has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A window's memory, seen directly (a retired window stays readable after its unmap).
impl Bytes for WindowHandle {
    fn read(&self, off: u64, buf: &mut [u8]) -> bool {
        self.memory().read(off, buf)
    }
    fn write(&self, off: u64, data: &[u8]) -> bool {
        self.memory().write(off, data)
    }
    fn len(&self) -> u64 {
        WindowHandle::len(self)
    }
}

impl Bytes for HostMemory {
    fn read(&self, off: u64, buf: &mut [u8]) -> bool {
        HostMemory::read(self, off, buf)
    }
    fn write(&self, off: u64, data: &[u8]) -> bool {
        HostMemory::write(self, off, data)
    }
    fn len(&self) -> u64 {
        HostMemory::len(self)
    }
}

/// udmabuf pages are ordinary cache-coherent host memory: the CPU view shows what the NIC
/// wrote once the completion is seen.
impl Bytes for DmaBufMemory {
    fn read(&self, off: u64, buf: &mut [u8]) -> bool {
        DmaBufMemory::read(self, off, buf).is_ok()
    }
    fn write(&self, off: u64, data: &[u8]) -> bool {
        DmaBufMemory::write(self, off, data).is_ok()
    }
    fn len(&self) -> u64 {
        DmaBufMemory::len(self)
    }
}

/// Device memory, through the host copy the driver offers (simulated or CUDA).
impl Bytes for DeviceMemory {
    fn read(&self, off: u64, buf: &mut [u8]) -> bool {
        DeviceMemory::read(self, off, buf).is_ok()
    }
    fn write(&self, off: u64, data: &[u8]) -> bool {
        DeviceMemory::write(self, off, data).is_ok()
    }
    fn len(&self) -> u64 {
        DeviceMemory::len(self)
    }
}

/// The bytes a request with `tag` writes ([`dmaplane_core::pattern`]), in `buf`.
pub fn pattern(tag: u64, len: usize, buf: &mut Vec<u8>) {
    buf.clear();
    buf.resize(len, 0);
    dmaplane_core::pattern::fill(tag, 0, buf);
}

/// Deterministic generator for the revoke schedule.
pub fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Fill all of `mem` with [`POISON`]; false when some of it could not be written.
pub fn poison(mem: &dyn Bytes) -> bool {
    let chunk = vec![POISON; 1 << 16];
    let mut off = 0;
    while off < mem.len() {
        let n = (mem.len() - off).min(chunk.len() as u64) as usize;
        if !mem.write(off, &chunk[..n]) {
            return false;
        }
        off += n as u64;
    }
    true
}

/// Pages of `mem` that are no longer all poison (an unreadable page counts). Compared with
/// `memcmp` against a poison page, 64 KiB per read: this runs on every revoke cycle, next to
/// the traffic it must not starve.
pub fn poison_damage(mem: &dyn Bytes) -> u64 {
    const PAGE: usize = 4096;
    let page = [POISON; PAGE];
    let mut buf = vec![0u8; 16 * PAGE];
    let (mut bad, mut off) = (0, 0);
    while off < mem.len() {
        let n = (mem.len() - off).min(buf.len() as u64) as usize;
        if !mem.read(off, &mut buf[..n]) {
            bad += n.div_ceil(PAGE) as u64;
        } else {
            bad += buf[..n]
                .chunks(PAGE)
                .filter(|c| **c != page[..c.len()])
                .count() as u64;
        }
        off += n as u64;
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmaplane_core::sync::lock;
    use std::sync::Mutex;

    #[derive(Debug)]
    struct Buf(Mutex<Vec<u8>>);

    impl Bytes for Buf {
        fn read(&self, off: u64, buf: &mut [u8]) -> bool {
            let v = lock(&self.0);
            let o = off as usize;
            match v.get(o..o + buf.len()) {
                Some(s) => {
                    buf.copy_from_slice(s);
                    true
                }
                None => false,
            }
        }
        fn write(&self, off: u64, data: &[u8]) -> bool {
            let mut v = lock(&self.0);
            let o = off as usize;
            match v.get_mut(o..o + data.len()) {
                Some(s) => {
                    s.copy_from_slice(data);
                    true
                }
                None => false,
            }
        }
        fn len(&self) -> u64 {
            lock(&self.0).len() as u64
        }
    }

    #[test]
    fn poison_damage_counts_every_touched_page_and_nothing_else() {
        let m = Buf(Mutex::new(vec![0; 40 * 4096 + 100]));
        assert!(poison(&m));
        assert_eq!(poison_damage(&m), 0);
        assert!(m.write(5 * 4096 + 17, &[1]));
        assert!(m.write(40 * 4096 + 99, &[2]));
        assert!(m.write(20 * 4096 - 1, &[3, 4]));
        assert_eq!(poison_damage(&m), 4);
    }
}
