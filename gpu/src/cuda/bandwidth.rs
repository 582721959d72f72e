//! Host ↔ device copy bandwidth of a CUDA device: what `dmaplane bench p2p` reports as the
//! bounce path on CUDA machines.

use std::time::{Duration, Instant};

use dmaplane_core::fabric::Mapping;
use dmaplane_core::{AddrList, AddrSpace, DmaRange, Hints};

use super::CudaGpu;
use crate::backend::GpuBackend;
use crate::error::{GpuError, Result};

/// H2D and D2H bandwidth in bytes per second: `iters` synchronous copies of `bytes` each way
/// between page-aligned host memory registered with `cuMemHostRegister` and a device
/// allocation, timed around the copies after one warm-up copy each way. The copies take the
/// copy engine's own path (`cuMemcpy`, then a wait for it to finish).
pub fn host_copy_bandwidth(gpu: &CudaGpu, bytes: u64, iters: u32) -> Result<(f64, f64)> {
    if bytes == 0 || iters == 0 {
        return Err(GpuError::invalid(
            if bytes == 0 { "bytes" } else { "iters" },
            "0",
            "a bandwidth needs at least one byte copied at least once",
        ));
    }
    // Declared first so that it is unmapped last, after the registration is gone.
    let host = Mapping::memfd("cuda-bandwidth", bytes)
        .map_err(|e| GpuError::invalid("bytes", bytes.to_string(), format!("host buffer: {e}")))?;
    host.fill(0xa5);
    let va = host.process_va();
    let list = AddrList::single(
        AddrSpace::ProcessVa,
        Hints::HOST_MEMORY,
        super::granule(va, bytes),
        DmaRange::new(va, bytes),
    )
    .map_err(|e| GpuError::invalid("bytes", bytes.to_string(), e.to_string()))?;
    let reg = gpu.register("bandwidth host buffer", &list)?;
    let dev = gpu.alloc("bandwidth device buffer", bytes)?;
    let (h, d) = (reg.translate(va), dev.copy_addr());
    gpu.copy(h, d, bytes)?;
    gpu.copy(d, h, bytes)?;
    let time = |src: u64, dst: u64| -> Result<Duration> {
        let start = Instant::now();
        for _ in 0..iters {
            gpu.copy(src, dst, bytes)?;
        }
        Ok(start.elapsed())
    };
    let h2d = time(h, d)?;
    let d2h = time(d, h)?;
    let rate = |t: Duration| (bytes as f64 * f64::from(iters)) / t.as_secs_f64().max(1e-9);
    tracing::debug!(gpu = %gpu.ordinal(), bytes, iters, h2d = rate(h2d), d2h = rate(d2h), "host copy bandwidth");
    Ok((rate(h2d), rate(d2h)))
}
