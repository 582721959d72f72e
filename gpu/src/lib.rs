//! dmaplane-gpu: GPU memory as an exporter and the GPU copy engine as an importer, one set of
//! types ([`Gpu`], [`DeviceMemory`], [`PeerMemory`], [`Loc`]) over two backends:
//!
//! - [`sim`]: device memory behind a BAR1 aperture on the core's simulated fabric, a copy engine
//!   that DMAs through the fabric's checks; runs everywhere.
//! - [`cuda`]: a real GPU through the CUDA driver API (cudarc, loaded at run time): dma-buf export
//!   of device memory, host registration, copies. Without `libcuda` every entry point returns
//!   [`GpuError::CudaUnavailable`]; nothing panics.
//!
//! Freeing device memory is a revoke ([`DeviceMemory::free`]): no importer — a NIC's queue pairs
//! and MRs, a remote lease, another copy engine — can touch the memory after the free returns.

pub mod backend;
pub mod cuda;
pub mod device;
pub mod error;
mod import;
pub mod sim;

pub use backend::{BackendKind, DmaBufSupport, DmaClient, GpuInfo};
pub use device::{DeviceMemory, Gpu, Loc, PeerMemory};
pub use error::{GpuError, Result};
pub use sim::SimGpu;
