//! Errors of every GPU backend: each names the device, the field or the allocation concerned.

use dmaplane_core::fabric::DmaFault;
use dmaplane_core::{AttachError, Invalid};

pub type Result<T, E = GpuError> = std::result::Result<T, E>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum GpuError {
    /// No CUDA driver library on this machine, or it would not initialise.
    #[error("CUDA unavailable: {why}")]
    CudaUnavailable { why: String },
    /// A CUDA driver call failed.
    #[error("CUDA {call} on {device}: {why}")]
    Cuda {
        call: &'static str,
        device: String,
        why: String,
    },
    #[error("no GPU {what}: {why}")]
    NoDevice { what: String, why: String },
    /// A caller-supplied value out of range.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{gpu}: out of device memory allocating {requested} bytes ({used} of {total} in use)")]
    OutOfMemory {
        gpu: String,
        requested: u64,
        used: u64,
        total: u64,
    },
    /// A peer-visible allocation does not fit in what is left of the BAR1 aperture.
    #[error(
        "{gpu}: BAR1 aperture full: exporting {alloc} ({requested} bytes) needs BAR1 space, but \
         {mapped} of the {aperture}-byte aperture are mapped by {allocations} allocation(s); \
         free peer-visible allocations or use a GPU with a larger (resizable) BAR1"
    )]
    Bar1Full {
        gpu: String,
        alloc: String,
        requested: u64,
        mapped: u64,
        aperture: u64,
        allocations: usize,
    },
    /// The allocation was freed (or is being freed): no export, copy or access any more.
    #[error("{alloc} on {gpu} is freed")]
    Freed { gpu: String, alloc: String },
    /// Imported memory whose exporter revoked it.
    #[error("imported {import} is revoked by its exporter: {why}")]
    Revoked { import: String, why: String },
    /// A free whose importers did not all quiesce in time.
    #[error(
        "free of {alloc} on {gpu} timed out after {deadline_us} us waiting for {}: {}",
        importers.join(", "),
        if *released { "they were fenced off by force and the memory released" }
        else { "the memory stays allocated (leaked) so that they can never write into a reuse" }
    )]
    FreeTimedOut {
        gpu: String,
        alloc: String,
        importers: Vec<String>,
        deadline_us: u64,
        released: bool,
        /// The revoke's ack, with every importer's answer.
        report: Box<dmaplane_core::RevokeReport>,
    },
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// A copy the fabric refused (simulated IOMMU fault); it touched no memory.
    #[error("copy engine of {gpu}: {fault}")]
    Fault { gpu: String, fault: DmaFault },
    #[error("{op} is not supported by {backend}: {why}")]
    Unsupported {
        op: &'static str,
        backend: String,
        why: String,
    },
}

impl GpuError {
    /// A refused value: the field, the value and why (the GPU or allocation is named in `why`).
    pub(crate) fn invalid(
        field: &'static str,
        value: impl std::fmt::Display,
        why: impl Into<String>,
    ) -> GpuError {
        GpuError::Invalid(Invalid::new("", field, value, why))
    }
}
