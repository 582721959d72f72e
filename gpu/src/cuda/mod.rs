//! The CUDA backend: a real GPU through the CUDA driver API (cudarc, `libcuda` loaded at run
//! time, bindings pinned to CUDA 12.8).
//!
//! - [`probe`]: what the machine has (library, `cuInit`, driver version, devices), never panics.
//! - [`CudaGpu`] / [`devices`]: one device's retained primary context, made current on the calling
//!   thread before every driver call (calls may come from any thread).
//! - Allocations (`cuMemAlloc`) start on a 64 KiB GPU page and are padded to whole GPU pages, so
//!   the dma-buf covers them exactly and a peer-memory registration pins pages that belong to the
//!   allocation alone. They are exported to real devices ([`crate::DmaClient::External`]) as, best
//!   first, a dma-buf (`cuMemGetHandleForAddressRange`, asked for the PCIe mapping through BAR1
//!   first, then with flags 0) and their device VA ("peer-memory style", what nvidia-peermem
//!   resolves). The dma-buf is made lazily, on the first offer, and kept.
//! - The copy engine imports this process's virtual addresses (host memory, or a peer's MMIO
//!   mapping), registered with `cuMemHostRegister`; copies are synchronous `cuMemcpy` under
//!   unified addressing, so a copy has finished when the import's gate pass is dropped.
//! - [`host_copy_bandwidth`]: H2D / D2H bytes per second from registered host memory.
//!
//! Free is a revoke: NVIDIA's exporter keeps the memory alive while an importer (an MR) holds the
//! dma-buf, and `cuMemFree` does not tell it. So every importer is revoked first, and when one
//! does not quiesce in time the memory is leaked (never `cuMemFree`d, and the device's context is
//! kept) so that the importer can never write into a reuse of it.
//!
//! Without `libcuda` every entry point returns [`GpuError::CudaUnavailable`](crate::GpuError)
//! naming the library names searched: cudarc panics on a missing library or symbol, so nothing
//! here calls into the driver before the library and every symbol used were found.
//!
//! `fake_libcuda.c` (next to this file, not built with the crate) is a strict fake driver the
//! integration tests build and run the GPU tests against where there is no GPU.

mod alloc;
mod bandwidth;
mod device;
mod driver;
mod pci;
mod probe;
mod ranges;
mod register;

pub use bandwidth::host_copy_bandwidth;
pub use device::{Bound, CudaGpu, devices, pointer_ordinal};
pub use probe::{CudaProbe, InitOutcome, probe};

/// The GPU page: the unit nvidia-peermem pins and the alignment and size unit of every
/// allocation of this backend.
pub const GPU_PAGE: u64 = 64 << 10;

/// The coarsest granule (at most [`GPU_PAGE`]) that a list starting at `addr` with `len` bytes
/// is aligned to: 64 KiB or 4 KiB where the numbers allow, finer where they do not.
pub(crate) fn granule(addr: u64, len: u64) -> u64 {
    let zeros = (addr | len).trailing_zeros().min(GPU_PAGE.trailing_zeros());
    1 << zeros
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granule_is_the_coarsest_alignment_up_to_a_gpu_page() {
        assert_eq!(granule(0, 2 << 20), GPU_PAGE);
        assert_eq!(granule(0x7f00_0001_0000, 0x1_0000), GPU_PAGE);
        assert_eq!(granule(0x7f00_0000_1000, 0x1_0000), 4096);
        assert_eq!(granule(0, 1000), 8);
        assert_eq!(granule(0, 1), 1);
        // Nothing set: a zero list never reaches here (lists are non-empty), but it stays a
        // GPU page rather than overflowing.
        assert_eq!(granule(0, 0), GPU_PAGE);
    }
}
