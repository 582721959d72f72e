//! One CUDA device: its retained primary context, what it reports about itself, and the
//! [`GpuBackend`] over it.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;
use dmaplane_core::{Accept, Access, AddrList, SpaceKind};

use super::alloc::CudaAlloc;
use super::driver::{self, DMABUF_MIN_VERSION};
use super::pci;
use super::ranges::CopyRanges;
use super::register::{self, HostRegistration};
use crate::backend::{
    AllocBackend, BackendKind, CopyRegistration, DmaBufSupport, GpuBackend, GpuInfo,
};
use crate::device::Gpu;
use crate::error::{GpuError, Result};

/// The name of device `ordinal`: unique in the process (the model is in the description).
pub(super) fn label(ordinal: u32) -> String {
    format!("cuda:{ordinal}")
}

/// A retained primary context. The driver API is thread safe and a primary context may be
/// current on any number of threads, so every call binds it first ([`Context::bind`]), and
/// puts back what was current when done: a thread that also runs the CUDA runtime (PyTorch,
/// NCCL) on another device must not find its calls landing in this context.
#[derive(Debug)]
pub struct Context {
    pub(super) ordinal: u32,
    pub(super) label: String,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: `ctx` is a driver handle, not a pointer this crate dereferences; the driver API is
// thread safe and a primary context may be made current on any thread.
unsafe impl Send for Context {}
// SAFETY: as above; `&Context` only offers `bind` and error formatting.
unsafe impl Sync for Context {}

impl Context {
    fn retain(ordinal: u32, dev: sys::CUdevice) -> Result<Context> {
        let label = label(ordinal);
        // SAFETY: `dev` came from `cuDeviceGet`; the retain is released exactly once, in drop.
        let ctx = unsafe { result::primary_ctx::retain(dev) }.map_err(|e| GpuError::Cuda {
            call: "cuDevicePrimaryCtxRetain",
            device: label.clone(),
            why: driver::describe(e),
        })?;
        Ok(Context {
            ordinal,
            label,
            dev,
            ctx,
        })
    }

    /// Make the context current on the calling thread until the guard drops.
    pub(super) fn bind(&self) -> Result<Bound<'_>> {
        // SAFETY: `ctx` is this device's primary context, retained for as long as `self` lives,
        // which the guard's borrow outlasts.
        unsafe { driver::ctx_push(self.ctx) }.map_err(|e| self.err("cuCtxPushCurrent", e))?;
        Ok(Bound {
            ctx: self,
            _this_thread: PhantomData,
        })
    }

    /// A failed driver call on this device.
    pub(super) fn err(&self, call: &'static str, e: DriverError) -> GpuError {
        self.err_with(call, String::new(), e)
    }

    /// A failed driver call on this device, with what it was doing (`"{what}: "` prefixed).
    pub(super) fn err_with(&self, call: &'static str, what: String, e: DriverError) -> GpuError {
        let why = driver::describe(e);
        GpuError::Cuda {
            call,
            device: self.label.clone(),
            why: if what.is_empty() {
                why
            } else {
                format!("{what}: {why}")
            },
        }
    }
}

/// A CUDA context made current on the calling thread; dropping the guard restores the context
/// that was current before.
///
/// The driver keeps a stack of current contexts *per thread*: the push happens on the thread
/// that binds, so the pop must happen on that thread too. Dropped on another thread, the guard
/// would pop whatever that thread had made current (PyTorch's context, say) and leave this one
/// current here for good. So the guard is neither `Send` nor `Sync`, although [`CudaGpu`] is
/// both. This does not compile:
///
/// ```compile_fail
/// fn send<T: Send>() {}
/// send::<dmaplane_gpu::cuda::Bound<'static>>();
/// ```
///
/// while the type itself is there to name (so the example above fails for being `!Send`, not
/// for a wrong path):
///
/// ```
/// fn named(_: Option<dmaplane_gpu::cuda::Bound<'_>>) {}
/// named(None);
/// ```
#[must_use = "the context is current only while the guard lives"]
#[derive(Debug)]
pub struct Bound<'a> {
    ctx: &'a Context,
    /// `!Send` and `!Sync`: the pop must run on the thread that pushed.
    _this_thread: PhantomData<*const ()>,
}

impl Drop for Bound<'_> {
    fn drop(&mut self) {
        if let Err(e) = driver::ctx_pop() {
            tracing::warn!(gpu = %self.ctx.label, error = %driver::describe(e), "cuCtxPopCurrent failed");
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: releases the one retain taken in `retain`, on the device it was taken on.
        if let Err(e) = unsafe { result::primary_ctx::release(self.dev) } {
            tracing::debug!(gpu = %self.label, error = %driver::describe(e), "primary context release failed");
        }
    }
}

/// What a GPU shares with its allocations and registrations.
#[derive(Debug)]
pub(super) struct GpuShared {
    /// Fixed facts; `bar1_mapped` is filled in from the counter.
    pub(super) info: GpuInfo,
    /// Bytes of allocations exported as a dma-buf: what importers may map through BAR1.
    pub(super) bar1_mapped: AtomicU64,
    /// What the copy engine may touch.
    pub(super) ranges: CopyRanges,
    pub(super) ctx: Context,
}

impl GpuShared {
    pub(super) fn label(&self) -> &str {
        &self.ctx.label
    }

    pub(super) fn dmabuf_supported(&self) -> std::result::Result<(), &str> {
        match &self.info.dmabuf {
            DmaBufSupport::Supported => Ok(()),
            DmaBufSupport::Unsupported { why } => Err(why),
        }
    }
}

/// A CUDA device. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CudaGpu {
    shared: Arc<GpuShared>,
}

/// Every CUDA device, in ordinal order. [`GpuError::CudaUnavailable`] without the driver library
/// or without devices.
pub fn devices() -> Result<Vec<Gpu>> {
    Ok(CudaGpu::all()?.into_iter().map(CudaGpu::into_gpu).collect())
}

/// The ordinal of the CUDA device whose memory `addr` is; `None` when it is not device memory
/// (host, managed or unknown to the driver). [`GpuError::CudaUnavailable`] without the driver.
pub fn pointer_ordinal(addr: u64) -> Result<Option<u32>> {
    driver::ready()?;
    Ok(match driver::pointer_device(addr) {
        Ok(Some(o)) => u32::try_from(o).ok(),
        Ok(None) | Err(_) => None,
    })
}

/// The number of devices, or why there are none.
fn count() -> Result<u32> {
    driver::ready()?;
    let n = result::device::get_count().map_err(|e| GpuError::CudaUnavailable {
        why: format!("cuDeviceGetCount failed: {}", driver::describe(e)),
    })?;
    match u32::try_from(n) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(GpuError::CudaUnavailable {
            why: format!("the CUDA driver reports {n} devices"),
        }),
    }
}

fn device(ordinal: u32) -> Result<sys::CUdevice> {
    let raw = i32::try_from(ordinal).map_err(|_| {
        GpuError::invalid("ordinal", ordinal.to_string(), "CUDA ordinals are C ints")
    })?;
    result::device::get(raw).map_err(|e| GpuError::NoDevice {
        what: label(ordinal),
        why: format!("cuDeviceGet: {}", driver::describe(e)),
    })
}

fn attribute(dev: sys::CUdevice, attr: sys::CUdevice_attribute) -> Result<i32, DriverError> {
    // SAFETY: `dev` came from `cuDeviceGet`; the driver writes one int.
    unsafe { result::device::get_attribute(dev, attr) }
}

/// What device `ordinal` reports about itself (no context needed). `version` is the driver's.
pub(super) fn device_info(ordinal: u32, version: i32) -> Result<GpuInfo> {
    let name = label(ordinal);
    let dev = device(ordinal)?;
    let cuda = |call: &'static str, e: DriverError| GpuError::Cuda {
        call,
        device: name.clone(),
        why: driver::describe(e),
    };
    let model = driver::device_name(dev).map_err(|e| cuda("cuDeviceGetName", e))?;
    // SAFETY: `dev` came from `cuDeviceGet`.
    let memory =
        unsafe { result::device::total_mem(dev) }.map_err(|e| cuda("cuDeviceTotalMem", e))? as u64;
    let pci = match driver::pci_bus_id(dev) {
        Ok(raw) => pci::normalize_bus_id(&raw).or_else(|| {
            tracing::warn!(gpu = %name, raw, "cuDeviceGetPCIBusId gave no PCI address");
            None
        }),
        Err(e) => {
            tracing::warn!(gpu = %name, error = %driver::describe(e), "cuDeviceGetPCIBusId failed");
            None
        }
    };
    let bar1_bytes = pci.as_deref().and_then(pci::bar1_size);
    use sys::CUdevice_attribute as A;
    let cc = (
        attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).unwrap_or(0),
        attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR).unwrap_or(0),
    );
    Ok(GpuInfo {
        name,
        backend: BackendKind::Cuda,
        description: format!(
            "{model} (compute {}.{}, CUDA driver {})",
            cc.0,
            cc.1,
            driver::version_string(version)
        ),
        pci,
        memory_bytes: memory,
        bar1_bytes,
        bar1_mapped: 0,
        dmabuf: dmabuf_support(dev, version),
    })
}

/// Whether the device exports its memory as dma-bufs, and why not.
fn dmabuf_support(dev: sys::CUdevice, version: i32) -> DmaBufSupport {
    let unsupported = |why: String| DmaBufSupport::Unsupported { why };
    if version < DMABUF_MIN_VERSION {
        return unsupported(format!(
            "CUDA driver {} is older than 11.7, the first with cuMemGetHandleForAddressRange",
            driver::version_string(version)
        ));
    }
    if !driver::driver().dmabuf_symbol {
        return unsupported(format!("libcuda does not export {}", driver::DMABUF_SYMBOL));
    }
    match attribute(
        dev,
        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED,
    ) {
        Ok(0) => unsupported(format!(
            "CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED is 0: {}",
            kernel_module_hint()
        )),
        Ok(_) => DmaBufSupport::Supported,
        Err(e) => unsupported(format!(
            "CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED: {}",
            driver::describe(e)
        )),
    }
}

/// Why a driver may refuse dma-buf export, from which kernel module is loaded.
fn kernel_module_hint() -> &'static str {
    match std::fs::read_to_string("/proc/driver/nvidia/version") {
        Ok(v) if v.contains("Open Kernel Module") => {
            "the open kernel module is loaded, so the kernel or the platform refuses it (dma-buf \
             export needs Linux 5.12 or later)"
        }
        Ok(_) => {
            "the proprietary kernel module is loaded; dma-buf export needs the open kernel modules"
        }
        Err(_) => "dma-buf export needs the open kernel modules (nvidia-open)",
    }
}

impl CudaGpu {
    /// Device `ordinal`, its primary context retained.
    pub fn new(ordinal: u32) -> Result<CudaGpu> {
        let version = driver::ready()?;
        let n = count()?;
        if ordinal >= n {
            return Err(GpuError::NoDevice {
                what: label(ordinal),
                why: format!(
                    "the CUDA driver reports {n} device(s), ordinals 0..={}",
                    n - 1
                ),
            });
        }
        let info = device_info(ordinal, version)?;
        let dev = device(ordinal)?;
        let unified = attribute(
            dev,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING,
        )
        .unwrap_or(0);
        if unified == 0 {
            return Err(GpuError::Unsupported {
                op: "copies",
                backend: "cuda".into(),
                why: format!(
                    "{} has no unified addressing; the copy engine needs cuMemcpy on host and \
                     device pointers alike",
                    info.name
                ),
            });
        }
        let ctx = Context::retain(ordinal, dev)?;
        tracing::debug!(gpu = %info.name, description = %info.description, pci = ?info.pci, dmabuf = ?info.dmabuf, "CUDA device opened");
        Ok(CudaGpu {
            shared: Arc::new(GpuShared {
                info,
                bar1_mapped: AtomicU64::new(0),
                ranges: CopyRanges::default(),
                ctx,
            }),
        })
    }

    /// Every CUDA device, in ordinal order.
    pub fn all() -> Result<Vec<CudaGpu>> {
        (0..count()?).map(CudaGpu::new).collect()
    }

    pub fn into_gpu(self) -> Gpu {
        Gpu::new(Arc::new(self))
    }

    pub fn ordinal(&self) -> u32 {
        self.shared.ctx.ordinal
    }
}

impl GpuBackend for CudaGpu {
    fn info(&self) -> GpuInfo {
        GpuInfo {
            bar1_mapped: self.shared.bar1_mapped.load(Ordering::Relaxed),
            ..self.shared.info.clone()
        }
    }

    fn accepts(&self) -> Vec<Accept> {
        // This process's virtual addresses, registered with cuMemHostRegister: host memory, and
        // a peer's MMIO mapping (IOMEMORY).
        vec![Accept::new(SpaceKind::ProcessVa, Access::READ_WRITE).with_mmio()]
    }

    fn alloc(&self, name: &str, size: u64) -> Result<Arc<dyn AllocBackend>> {
        Ok(Arc::new(CudaAlloc::new(self.shared.clone(), name, size)?))
    }

    fn lend(
        &self,
        name: &str,
        addr: u64,
        len: u64,
        keeper: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<Arc<dyn AllocBackend>> {
        Ok(Arc::new(CudaAlloc::lend(
            self.shared.clone(),
            name,
            addr,
            len,
            keeper,
        )?))
    }

    fn register(&self, name: &str, list: &AddrList) -> Result<Box<dyn CopyRegistration>> {
        Ok(Box::new(HostRegistration::new(
            self.shared.clone(),
            name,
            list,
        )?))
    }

    fn copy(&self, src: u64, dst: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let s = &self.shared;
        // Held until the copy has finished: the ranges cannot go away under it.
        let admitted = s.ranges.read();
        for (field, addr) in [("src", src), ("dst", dst)] {
            if !admitted.contains(addr, len) {
                return Err(GpuError::invalid(
                    field,
                    format!("{addr:#x}+{len:#x}"),
                    format!(
                        "not inside one live allocation or registered host range of {}",
                        s.label()
                    ),
                ));
            }
        }
        if src < dst.saturating_add(len) && dst < src.saturating_add(len) {
            return Err(GpuError::invalid(
                "dst",
                format!("{dst:#x}+{len:#x}"),
                format!("overlaps the source {src:#x}+{len:#x}; cuMemcpy leaves that undefined"),
            ));
        }
        if usize::try_from(len).is_err() {
            return Err(GpuError::invalid(
                "len",
                len.to_string(),
                "larger than this machine's address space",
            ));
        }
        let _bound = s.ctx.bind()?;
        // One call per piece that stays inside one host registration on each side.
        for (off, n) in register::pieces(src, dst, len) {
            // SAFETY: each range lies in one live allocation of this device or one live host
            // registration, checked against the table their owners keep (a piece lies inside its
            // range); `admitted` holds the table until the (synchronous) copies have finished,
            // and owners leave it before cuMemFree or cuMemHostUnregister. No Rust reference
            // aliases device memory or registered host memory: both are written only through raw
            // pointers and the driver. `n <= len` fits usize (checked above).
            let copied = unsafe { driver::memcpy(dst + off, src + off, n as usize) };
            copied.map_err(|e| {
                s.ctx
                    .err_with("cuMemcpy", format!("{src:#x} -> {dst:#x}, {len} bytes"), e)
            })?;
        }
        drop(admitted);
        Ok(())
    }
}
